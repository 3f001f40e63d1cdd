-- A transfer opened and closed by one append is inserted closed (docs/ARCHITECTURE.md,
-- "Transfers"). Until now `walletd_append_transfers` inserted every opened transfer PENDING
-- and then updated the ones the same batch closes (both legs in one commit: most
-- transfers). `status` is indexed (transfers_by_status, transfers_pending_by_sender), so
-- that update was never HOT: a second row version and a second entry in each of the
-- table's indexes for every such transfer, and a dead tuple for vacuum. Now the opened
-- rows are merged with the batch's closes before the insert; only the transfers opened
-- by an earlier statement are updated. Everything the function checks stays as it was:
-- a close of a transfer not PENDING (WD004; a transfer closed twice in one statement is
-- refused so too), the legs against the transfers (WD006), the refunds' bound (WD010).

CREATE OR REPLACE FUNCTION walletd_append_transfers(
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

    -- One close per transfer: a batch never closes one twice, and the merge below would
    -- otherwise insert it twice.
    IF coalesce(cardinality(u_ids), 0) > 1
       AND cardinality(u_ids) <> (SELECT count(DISTINCT u) FROM unnest(u_ids) AS u) THEN
        RAISE EXCEPTION 'walletd: a transfer is closed twice in one statement'
            USING ERRCODE = 'WD004';
    END IF;

    -- A transfer this statement opens and closes (both legs in one commit) is inserted
    -- closed: one row version, not a PENDING one and its non-HOT update (status is indexed).
    -- unnest pads t_refund_of with NULLs when it is shorter (or NULL): no refund.
    WITH opened AS (
        INSERT INTO transfers (id, from_wallet_id, to_wallet_id, amount, reference, status,
                               failure_code, created_at, updated_at, refund_of)
        SELECT t.id, t.from_id, t.to_id, t.amount, t.reference, coalesce(u.status, 1),
               u.failure,
               timestamptz 'epoch' + t.created_us * interval '1 microsecond',
               timestamptz 'epoch' + coalesce(u.updated_us, t.created_us)
                   * interval '1 microsecond',
               t.refund_of
          FROM unnest(t_ids, t_from, t_to, t_amounts, t_references, t_created_us, t_refund_of)
               AS t(id, from_id, to_id, amount, reference, created_us, refund_of)
          LEFT JOIN unnest(u_ids, u_statuses, u_failures, u_updated_us)
               AS u(id, status, failure, updated_us) ON u.id = t.id
         WHERE t.id IS NOT NULL
        RETURNING id, status, from_wallet_id, to_wallet_id, amount
    ), updated AS (
        -- The transfers opened by an earlier statement (this statement's own rows are not
        -- visible to its sibling UPDATE: one snapshot for all of them).
        UPDATE transfers AS t
           SET status = u.status, failure_code = u.failure,
               updated_at = timestamptz 'epoch' + u.updated_us * interval '1 microsecond'
          FROM unnest(u_ids, u_statuses, u_failures, u_updated_us)
               AS u(id, status, failure, updated_us)
         WHERE t.id = u.id AND t.status = 1
        RETURNING t.id, u.status, t.from_wallet_id, t.to_wallet_id, t.amount
    ), c AS (
        SELECT * FROM opened WHERE id = ANY(u_ids)
        UNION ALL
        SELECT * FROM updated
    )
    SELECT count(*), array_agg(c.id), array_agg(c.status),
           array_agg(CASE c.status WHEN 2 THEN c.to_wallet_id WHEN 3 THEN c.from_wallet_id END),
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
