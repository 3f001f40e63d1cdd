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

-- As of / since / until: the last rows at or before an instant, one index descent. The
-- engine stamps a wallet's operations in non-decreasing created_at (never before the last
-- one), so (created_at, seq) orders a wallet's log as seq does.
CREATE INDEX wallet_operations_wallet_time ON wallet_operations (wallet_id, created_at, seq);
