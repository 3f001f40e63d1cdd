-- The log as a product: a change feed that never skips, and reads by instant.
--
-- Feed position = (xid, id): the writing transaction's id (xid8, 64-bit, never wraps) and
-- the row's id. A reader returns only rows whose xid is below the oldest transaction still
-- running (pg_snapshot_xmin), ordered by (xid, id): every transaction below that bound has
-- ended, so no row can later appear behind a position a reader has passed, although
-- concurrent batches commit in another order than they drew ids. The write path is
-- unchanged: the columns fill themselves from their defaults, so walletd_append_batch needs
-- no new version, and no lock or counter row is shared between writers.
--
-- Rows written before this migration get fixed xids below every real transaction
-- (wallet creations 0, operations 1), so they come first in the feed, creations before
-- operations. Real xids start at 3.

ALTER TABLE wallet_operations ADD COLUMN xid xid8 NOT NULL DEFAULT '1';
ALTER TABLE wallet_operations ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE INDEX wallet_operations_feed ON wallet_operations (xid, id);

-- A wallet creation's position draws its id from the log's own sequence, so positions are
-- unique over both tables and a creation precedes the operations of its batch.
ALTER TABLE wallets ADD COLUMN created_xid xid8 NOT NULL DEFAULT '0';
ALTER TABLE wallets ALTER COLUMN created_xid SET DEFAULT pg_current_xact_id();
ALTER TABLE wallets ADD COLUMN feed_id bigint;
UPDATE wallets AS w
   SET feed_id = n.feed_id
  FROM (SELECT id, nextval('wallet_operations_id_seq') AS feed_id
          FROM (SELECT id FROM wallets ORDER BY created_at, id) AS ordered) AS n
 WHERE w.id = n.id;
ALTER TABLE wallets ALTER COLUMN feed_id SET DEFAULT nextval('wallet_operations_id_seq');
ALTER TABLE wallets ALTER COLUMN feed_id SET NOT NULL;
CREATE INDEX wallets_feed ON wallets (created_xid, feed_id);

-- As of / since / until, without another index on the log. The engine stamps a wallet's
-- operations in non-decreasing created_at (never before the wallet's last one; walletd
-- verify checks it), so the last seq at or before an instant is found by binary search
-- over the (wallet_id, seq) index: at most 63 probes, each one index lookup. An index on
-- (wallet_id, created_at, seq) would make it one descent, but cost every append about 10%
-- more PostgreSQL CPU at batch sizes 10 to 100 (docs/BENCHMARKS.md, "The log as a
-- product"); as-of reads are rare, appends are the hot path.
CREATE FUNCTION walletd_last_seq_at(wallet uuid, upto timestamptz, inclusive boolean)
RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    lo bigint := 0;  -- created_at(lo) is before upto (seq 0: before every operation)
    hi bigint;       -- the answer is at most hi
    mid bigint;
    stamped timestamptz;
BEGIN
    SELECT seq INTO hi FROM wallets WHERE id = wallet;
    IF hi IS NULL THEN
        RETURN NULL;
    END IF;
    WHILE lo < hi LOOP
        mid := (lo + hi + 1) / 2;
        SELECT created_at INTO stamped FROM wallet_operations
         WHERE wallet_id = wallet AND seq = mid;
        IF stamped < upto OR (inclusive AND stamped = upto) THEN
            lo := mid;
        ELSE
            hi := mid - 1;
        END IF;
    END LOOP;
    RETURN lo;
END;
$$;
