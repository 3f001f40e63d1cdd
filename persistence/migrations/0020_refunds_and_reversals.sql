-- Refunds and reversals (docs/ARCHITECTURE.md, "Refunds and reversals"; docs/API.md,
-- "Refunds" and "Reversals").
--
-- A refund is a transfer (the same saga, legs and re-drive) from a COMPLETED transfer's
-- receiver back to its sender; `refund_of` names that transfer. Storage holds the bound:
-- the refunds of a transfer that are not FAILED sum to at most its amount. The append of a
-- batch that opens refunds locks each refunded transfer's row (FOR UPDATE) before it
-- inserts them, then checks, on a fresh snapshot of every statement (READ COMMITTED), that
-- each refunded transfer is COMPLETED, is no refund itself, that the refund goes between
-- its wallets the other way, and that the bound holds; else the whole statement is refused
-- (WD010) and nothing is written. So two processes (or two batches) that refund one
-- transfer at once decide one after the other, and the second sees the first.
--
-- A reversal is a log row of kind 10 (DEPOSIT_REVERSAL: the deposit's amount taken back
-- out) or 11 (WITHDRAW_REVERSAL: the withdrawal's amount put back), keyed
-- "<US>REVERSAL:<seq of the reversed row>:<digest of the client's key>"
-- (engine/commands.py reversal_key). A unique index on (wallet, that seq) over those kinds
-- makes a second reversal of one operation impossible, whatever its key. Their refusals
-- (a deposit's reversal the wallet cannot pay) are recorded like a keyed withdrawal's.

ALTER TABLE transfers ADD COLUMN refund_of uuid;
-- The refunds of a transfer, newest first (GET /api/v1/transfers?refund_of=, and the sum
-- of the bound): a partial index, empty of every transfer that is not a refund.
CREATE INDEX IF NOT EXISTS transfers_refunds ON transfers (refund_of, created_at, id)
    WHERE refund_of IS NOT NULL;

ALTER TABLE wallet_operations DROP CONSTRAINT wallet_operations_kind;
ALTER TABLE wallet_operations ADD CONSTRAINT wallet_operations_kind
    CHECK (kind BETWEEN 1 AND 11) NOT VALID;
ALTER TABLE wallet_operations VALIDATE CONSTRAINT wallet_operations_kind;
ALTER TABLE wallet_refusals DROP CONSTRAINT wallet_refusals_kind;
ALTER TABLE wallet_refusals ADD CONSTRAINT wallet_refusals_kind
    CHECK (kind IN (1, 2, 3, 6, 10, 11));

CREATE UNIQUE INDEX IF NOT EXISTS wallet_operations_reversed_once
    ON wallet_operations (wallet_id, (split_part(idempotency_key, ':', 2)))
    WHERE kind IN (10, 11);

-- As in migration 0010, plus `t_refund_of` (last, NULL by default: a caller that sends
-- none opens no refund) and the refunds' check (WD010).
DROP FUNCTION walletd_append_transfers(
    uuid[], uuid[], uuid[], bigint[], text[], bigint[], uuid[], smallint[], text[], bigint[],
    uuid[], bigint[], smallint[], bigint[], text[]
);

CREATE FUNCTION walletd_append_transfers(
    t_ids uuid[], t_from uuid[], t_to uuid[], t_amounts bigint[], t_references text[],
    t_created_us bigint[],
    u_ids uuid[], u_statuses smallint[], u_failures text[], u_updated_us bigint[],
    op_wallets uuid[], op_seqs bigint[], op_kinds smallint[], op_amounts bigint[],
    op_keys text[], t_refund_of uuid[] DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    closed bigint;
    c_ids uuid[];
    c_statuses smallint[];
    c_wallets uuid[];
    c_amounts bigint[];
    bad record;
    refunds boolean := coalesce(cardinality(array_remove(t_refund_of, NULL)), 0) > 0;
    kinds CONSTANT text[] := ARRAY['DEPOSIT', 'WITHDRAW', 'TRANSFER_OUT', 'TRANSFER_IN',
                                   'TRANSFER_REFUND', 'HOLD', 'CAPTURE', 'RELEASE',
                                   'WALLET_UPDATE', 'DEPOSIT_REVERSAL', 'WITHDRAW_REVERSAL'];
BEGIN
    IF refunds THEN
        -- One decision per refunded transfer at a time: a concurrent append refunding it
        -- waits here until this one ends, and then sees its refunds.
        PERFORM 1 FROM transfers WHERE id = ANY(t_refund_of) ORDER BY id FOR UPDATE;
    END IF;

    -- unnest pads t_refund_of with NULLs when it is shorter (or NULL): no refund.
    INSERT INTO transfers (id, from_wallet_id, to_wallet_id, amount, reference, status,
                           failure_code, created_at, updated_at, refund_of)
    SELECT t.id, t.from_id, t.to_id, t.amount, t.reference, 1, NULL,
           timestamptz 'epoch' + t.created_us * interval '1 microsecond',
           timestamptz 'epoch' + t.created_us * interval '1 microsecond',
           t.refund_of
      FROM unnest(t_ids, t_from, t_to, t_amounts, t_references, t_created_us, t_refund_of)
           AS t(id, from_id, to_id, amount, reference, created_us, refund_of)
     WHERE t.id IS NOT NULL;

    WITH c AS (
        UPDATE transfers AS t
           SET status = u.status, failure_code = u.failure,
               updated_at = timestamptz 'epoch' + u.updated_us * interval '1 microsecond'
          FROM unnest(u_ids, u_statuses, u_failures, u_updated_us)
               AS u(id, status, failure, updated_us)
         WHERE t.id = u.id AND t.status = 1
        RETURNING t.id, u.status,
                  CASE u.status WHEN 2 THEN t.to_wallet_id WHEN 3 THEN t.from_wallet_id END
                      AS wallet_id,
                  t.amount)
    SELECT count(*), array_agg(c.id), array_agg(c.status), array_agg(c.wallet_id),
           array_agg(c.amount)
      INTO closed, c_ids, c_statuses, c_wallets, c_amounts
      FROM c;
    IF closed <> coalesce(cardinality(u_ids), 0) THEN
        RAISE EXCEPTION 'walletd: % of % transfers closed; the others were not PENDING',
            closed, cardinality(u_ids) USING ERRCODE = 'WD004';
    END IF;

    SELECT e.transfer_id, e.kind AS want_kind, e.wallet_id AS want_wallet,
           e.amount AS want_amount, u_status,
           a.wallet_id, a.seq, a.kind, a.amount, a.key
      INTO bad
      FROM (SELECT t.id AS transfer_id, 3::smallint AS kind, t.from_id AS wallet_id, t.amount,
                   E'\x1fTRANSFER_OUT:' || t.id AS key, NULL::smallint AS u_status
              FROM unnest(t_ids, t_from, t_amounts) AS t(id, from_id, amount)
            UNION ALL
            SELECT c.id,
                   CASE c.status WHEN 2 THEN 4 WHEN 3 THEN 5 END::smallint,
                   c.wallet_id, c.amount,
                   CASE c.status WHEN 2 THEN E'\x1fTRANSFER_IN:'
                                 WHEN 3 THEN E'\x1fTRANSFER_REFUND:' END || c.id,
                   c.status
              FROM unnest(c_ids, c_statuses, c_wallets, c_amounts)
                   AS c(id, status, wallet_id, amount)) AS e
      FULL JOIN (SELECT *
                   FROM unnest(op_wallets, op_seqs, op_kinds, op_amounts, op_keys)
                        AS o(wallet_id, seq, kind, amount, key)
                  WHERE o.kind BETWEEN 3 AND 5) AS a
        ON a.key = e.key
     WHERE e.transfer_id IS NULL OR a.seq IS NULL
        OR a.wallet_id IS DISTINCT FROM e.wallet_id OR a.kind IS DISTINCT FROM e.kind
        OR a.amount IS DISTINCT FROM e.amount
     LIMIT 1;
    IF FOUND THEN
        IF bad.transfer_id IS NULL THEN
            RAISE EXCEPTION 'walletd: log row (wallet %, seq %, % of %) is the leg of no '
                'transfer this statement opens or closes', bad.wallet_id, bad.seq,
                kinds[bad.kind], bad.amount USING ERRCODE = 'WD006';
        ELSIF bad.want_kind IS NULL THEN
            RAISE EXCEPTION 'walletd: transfer % closed as status %: only COMPLETED (2) or '
                'FAILED (3) close a transfer', bad.transfer_id, bad.u_status
                USING ERRCODE = 'WD006';
        ELSIF bad.seq IS NULL THEN
            RAISE EXCEPTION 'walletd: transfer % has no % row of % on wallet % in this batch',
                bad.transfer_id, kinds[bad.want_kind], bad.want_amount, bad.want_wallet
                USING ERRCODE = 'WD006';
        END IF;
        RAISE EXCEPTION 'walletd: log row (wallet %, seq %, % of %) does not match transfer %, '
            'whose % is % on wallet %', bad.wallet_id, bad.seq, kinds[bad.kind], bad.amount,
            bad.transfer_id, kinds[bad.want_kind], bad.want_amount, bad.want_wallet
            USING ERRCODE = 'WD006';
    END IF;

    IF NOT refunds THEN
        RETURN;
    END IF;
    -- Each refunded transfer (o) against the refunds this statement opens (n) and all of
    -- its refunds that are not FAILED, this statement's included.
    SELECT n.id, n.refund_of, o.id AS original, o.status, o.refund_of AS original_refund_of,
           o.amount,
           (SELECT coalesce(sum(r.amount), 0) FROM transfers r
             WHERE r.refund_of = n.refund_of AND r.status <> 3) AS refunded
      INTO bad
      FROM unnest(t_ids, t_from, t_to, t_refund_of) AS n(id, from_id, to_id, refund_of)
      LEFT JOIN transfers o ON o.id = n.refund_of
     WHERE n.refund_of IS NOT NULL
       AND (o.id IS NULL OR o.status <> 2 OR o.refund_of IS NOT NULL
            OR n.from_id <> o.to_wallet_id OR n.to_id <> o.from_wallet_id
            OR (SELECT coalesce(sum(r.amount), 0) FROM transfers r
                 WHERE r.refund_of = n.refund_of AND r.status <> 3) > o.amount)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'walletd: refund % of transfer % refused: % (status %, amount %, '
            'refunds not FAILED %)', bad.id, bad.refund_of,
            CASE WHEN bad.original IS NULL THEN 'no such transfer'
                 WHEN bad.status <> 2 THEN 'it is not COMPLETED'
                 WHEN bad.original_refund_of IS NOT NULL THEN 'it is a refund'
                 WHEN bad.refunded > bad.amount THEN 'the refunds would pass its amount'
                 ELSE 'not between its wallets the other way' END,
            bad.status, bad.amount, bad.refunded USING ERRCODE = 'WD010';
    END IF;
END;
$$;
