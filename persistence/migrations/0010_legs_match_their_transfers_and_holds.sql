-- Storage refuses a log row that moves money unlike its transfer or hold (docs/ARCHITECTURE.md,
-- "Transfers": "Storage checks every leg"; "Holds"). Until now the append wrote whatever leg
-- the engine sent: a TRANSFER_IN of 1,000,000,000.00 for a transfer of 0.01, or for another
-- wallet than the transfer's `to`, was stored, the transfer read COMPLETED and money was
-- minted. Now the statement that writes a batch checks, set-based over its arrays, that
-- its transfer legs and its hold rows are exactly the ones its transfer and hold rows call
-- for, and refuses the whole statement otherwise (nothing written):
--
--   WD006  a transfer leg (TRANSFER_OUT / TRANSFER_IN / TRANSFER_REFUND row) that is not
--          the leg of a transfer this statement opens or closes, with its wallet and amount,
--          or such a transfer without its leg:
--            opened               -> TRANSFER_OUT    on `from`, amount
--            closed COMPLETED     -> TRANSFER_IN     on `to`,   amount
--            closed FAILED        -> TRANSFER_REFUND on `from`, amount
--   WD007  a HOLD / CAPTURE / RELEASE row that is not one its hold's creation or
--          resolution calls for, or such a creation or resolution without its rows:
--            created              -> HOLD of the amount
--            resolved             -> CAPTURE of `captured` (if any) + RELEASE of the rest
--                                    (captured + released = the hold's amount)
--            captured into another wallet -> RELEASE of the whole amount, and the transfer
--                                    named by the hold: from the hold's wallet to
--                                    `to_wallet_id`, of `captured`, its TRANSFER_OUT in
--                                    this batch (so it is opened by this statement)
--
-- A row is tied to its transfer or hold by its key, "<US>KIND:<id>" (engine/commands.py),
-- which the unique (wallet_id, idempotency_key) index already makes one per wallet: with
-- the wallet also checked, a transfer has at most one leg of each kind, ever.
--
-- How: walletd_append_transfers and walletd_append_holds now also receive the batch's log
-- rows (the same parameters as walletd_append_batch's, sent once: the statement names them
-- twice) and compare them with what their own rows expect, in both directions, by one full
-- join on the key. PostgresLog calls each of them whenever the batch carries a row of its
-- kinds, not only when it opens or closes something, so a leg row without its transfer
-- meets the check too. They run after walletd_append_batch in the same statement (its
-- fencing first: a batch that is early gets WD002, never one of these), and after their own
-- inserts and closes (WD004 / WD005 first: a transfer or hold closed by another driver
-- keeps its own, retried answer). walletd_append_batch is unchanged.

DROP FUNCTION walletd_append_transfers(
    uuid[], uuid[], uuid[], bigint[], text[], bigint[], uuid[], smallint[], text[], bigint[]
);

CREATE FUNCTION walletd_append_transfers(
    t_ids uuid[], t_from uuid[], t_to uuid[], t_amounts bigint[], t_references text[],
    t_created_us bigint[],
    u_ids uuid[], u_statuses smallint[], u_failures text[], u_updated_us bigint[],
    op_wallets uuid[], op_seqs bigint[], op_kinds smallint[], op_amounts bigint[],
    op_keys text[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    closed bigint;
    -- The closed transfers as the close found them: id, new status, the wallet its leg
    -- belongs to, amount.
    c_ids uuid[];
    c_statuses smallint[];
    c_wallets uuid[];
    c_amounts bigint[];
    bad record;
    kinds CONSTANT text[] := ARRAY['DEPOSIT', 'WITHDRAW', 'TRANSFER_OUT', 'TRANSFER_IN',
                                   'TRANSFER_REFUND', 'HOLD', 'CAPTURE', 'RELEASE'];
BEGIN
    INSERT INTO transfers (id, from_wallet_id, to_wallet_id, amount, reference, status,
                           failure_code, created_at, updated_at)
    SELECT t.id, t.from_id, t.to_id, t.amount, t.reference, 1, NULL,
           timestamptz 'epoch' + t.created_us * interval '1 microsecond',
           timestamptz 'epoch' + t.created_us * interval '1 microsecond'
      FROM unnest(t_ids, t_from, t_to, t_amounts, t_references, t_created_us)
           AS t(id, from_id, to_id, amount, reference, created_us);

    -- The close returns what the check needs of each transfer (its wallets and amount: the
    -- close itself names neither), so the check below reads no table: its plan cannot
    -- turn into a scan of a table whose statistics are stale.
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

    -- The legs this statement's transfers call for (e), against the batch's leg rows (a).
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
END;
$$;

DROP FUNCTION walletd_append_holds(
    uuid[], uuid[], integer[], bigint[], bigint[], text[], text[], text[], bigint[],
    uuid[], smallint[], bigint[], uuid[], uuid[], text[], text[], bigint[]
);

CREATE FUNCTION walletd_append_holds(
    h_ids uuid[], h_wallets uuid[], h_shards integer[], h_amounts bigint[],
    h_expires_us bigint[], h_references text[], h_keys text[], h_fingerprints text[],
    h_created_us bigint[],
    u_ids uuid[], u_statuses smallint[], u_captured bigint[], u_to_wallets uuid[],
    u_transfers uuid[], u_keys text[], u_fingerprints text[], u_updated_us bigint[],
    op_wallets uuid[], op_seqs bigint[], op_kinds smallint[], op_amounts bigint[],
    op_keys text[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    closed bigint;
    -- The resolved holds as the close found them: id, wallet, amount, and the update's
    -- captured, to_wallet_id, transfer_id.
    c_ids uuid[];
    c_wallets uuid[];
    c_amounts bigint[];
    c_captured bigint[];
    c_to_wallets uuid[];
    c_transfers uuid[];
    bad record;
    kinds CONSTANT text[] := ARRAY['DEPOSIT', 'WITHDRAW', 'TRANSFER_OUT', 'TRANSFER_IN',
                                   'TRANSFER_REFUND', 'HOLD', 'CAPTURE', 'RELEASE'];
BEGIN
    INSERT INTO holds (id, wallet_id, shard, amount, status, expires_at, reference, create_key,
                       create_fingerprint, created_at, updated_at)
    SELECT h.id, h.wallet_id, h.shard, h.amount, 1,
           timestamptz 'epoch' + h.expires_us * interval '1 microsecond',
           h.reference, h.key, h.fingerprint,
           timestamptz 'epoch' + h.created_us * interval '1 microsecond',
           timestamptz 'epoch' + h.created_us * interval '1 microsecond'
      FROM unnest(h_ids, h_wallets, h_shards, h_amounts, h_expires_us, h_references, h_keys,
                  h_fingerprints, h_created_us)
           AS h(id, wallet_id, shard, amount, expires_us, reference, key, fingerprint,
                created_us);

    -- As for transfers: the close returns each hold's wallet and amount for the check.
    WITH c AS (
        UPDATE holds AS h
           SET status = u.status, captured = u.captured, to_wallet_id = u.to_wallet,
               transfer_id = u.transfer, resolve_key = u.key,
               resolve_fingerprint = u.fingerprint,
               updated_at = timestamptz 'epoch' + u.updated_us * interval '1 microsecond'
          FROM unnest(u_ids, u_statuses, u_captured, u_to_wallets, u_transfers, u_keys,
                      u_fingerprints, u_updated_us)
               AS u(id, status, captured, to_wallet, transfer, key, fingerprint, updated_us)
         WHERE h.id = u.id AND h.status = 1
        RETURNING h.id, h.wallet_id, h.amount, u.captured, u.to_wallet, u.transfer)
    SELECT count(*), array_agg(c.id), array_agg(c.wallet_id), array_agg(c.amount),
           array_agg(c.captured), array_agg(c.to_wallet), array_agg(c.transfer)
      INTO closed, c_ids, c_wallets, c_amounts, c_captured, c_to_wallets, c_transfers
      FROM c;
    IF closed <> coalesce(cardinality(u_ids), 0) THEN
        RAISE EXCEPTION 'walletd: % of % holds closed; the others were not PENDING',
            closed, cardinality(u_ids) USING ERRCODE = 'WD005';
    END IF;

    -- The rows this statement's holds call for (e), against the batch's HOLD / CAPTURE /
    -- RELEASE rows (a). Captured into another wallet, the whole hold is released and the captured part
    -- leaves as the transfer's TRANSFER_OUT (checked below), never as a CAPTURE.
    SELECT e.hold_id, e.kind AS want_kind, e.wallet_id AS want_wallet,
           e.amount AS want_amount,
           a.wallet_id, a.seq, a.kind, a.amount, a.key
      INTO bad
      FROM (SELECT h.id AS hold_id, 6::smallint AS kind, h.wallet_id, h.amount,
                   E'\x1fHOLD:' || h.id AS key
              FROM unnest(h_ids, h_wallets, h_amounts) AS h(id, wallet_id, amount)
            UNION ALL
            SELECT c.id, r.kind, c.wallet_id, r.amount, r.prefix || c.id
              FROM unnest(c_ids, c_wallets, c_amounts, c_captured, c_to_wallets)
                   AS c(id, wallet_id, amount, captured, to_wallet)
             CROSS JOIN LATERAL (VALUES
                   (7::smallint, E'\x1fCAPTURE:',
                    CASE WHEN c.to_wallet IS NULL THEN c.captured ELSE 0 END),
                   (8::smallint, E'\x1fRELEASE:',
                    CASE WHEN c.to_wallet IS NULL THEN c.amount - c.captured ELSE c.amount END))
                   AS r(kind, prefix, amount)
             WHERE r.amount <> 0) AS e
      FULL JOIN (SELECT *
                   FROM unnest(op_wallets, op_seqs, op_kinds, op_amounts, op_keys)
                        AS o(wallet_id, seq, kind, amount, key)
                  WHERE o.kind BETWEEN 6 AND 8) AS a
        ON a.key = e.key
     WHERE e.hold_id IS NULL OR a.seq IS NULL
        OR a.wallet_id IS DISTINCT FROM e.wallet_id OR a.kind IS DISTINCT FROM e.kind
        OR a.amount IS DISTINCT FROM e.amount
     LIMIT 1;
    IF FOUND THEN
        IF bad.hold_id IS NULL THEN
            RAISE EXCEPTION 'walletd: log row (wallet %, seq %, % of %) belongs to no hold this '
                'statement creates or resolves', bad.wallet_id, bad.seq, kinds[bad.kind],
                bad.amount USING ERRCODE = 'WD007';
        ELSIF bad.seq IS NULL THEN
            RAISE EXCEPTION 'walletd: hold % has no % row of % on wallet % in this batch',
                bad.hold_id, kinds[bad.want_kind], bad.want_amount, bad.want_wallet
                USING ERRCODE = 'WD007';
        END IF;
        RAISE EXCEPTION 'walletd: log row (wallet %, seq %, % of %) does not match hold %, '
            'whose % is % on wallet %', bad.wallet_id, bad.seq, kinds[bad.kind], bad.amount,
            bad.hold_id, kinds[bad.want_kind], bad.want_amount, bad.want_wallet
            USING ERRCODE = 'WD007';
    END IF;

    -- A capture into another wallet names the transfer it opened: from the hold's wallet
    -- to to_wallet_id, of the captured amount, with its TRANSFER_OUT in this batch (which
    -- walletd_append_transfers, earlier in the statement, matched to a transfer it opened).
    -- Most resolutions name none: a plain expression (no query to plan) skips the check.
    IF coalesce(cardinality(array_remove(c_to_wallets, NULL)), 0) = 0
       AND coalesce(cardinality(array_remove(c_transfers, NULL)), 0) = 0 THEN
        RETURN;
    END IF;
    SELECT c.id, c.to_wallet, c.transfer, c.captured, c.wallet_id
      INTO bad
      FROM unnest(c_ids, c_wallets, c_captured, c_to_wallets, c_transfers)
           AS c(id, wallet_id, captured, to_wallet, transfer)
      LEFT JOIN transfers AS t ON t.id = c.transfer
     WHERE (c.to_wallet IS NOT NULL OR c.transfer IS NOT NULL)
       AND (t.id IS NULL OR c.to_wallet IS NULL
            OR t.from_wallet_id <> c.wallet_id OR t.to_wallet_id <> c.to_wallet
            OR t.amount <> c.captured
            OR NOT EXISTS (
                SELECT 1
                  FROM unnest(op_wallets, op_kinds, op_amounts, op_keys)
                       AS o(wallet_id, kind, amount, key)
                 WHERE o.kind = 3 AND o.key = E'\x1fTRANSFER_OUT:' || c.transfer
                   AND o.wallet_id = c.wallet_id AND o.amount = c.captured))
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'walletd: hold % captured % into wallet % by transfer %, which this '
            'statement does not open from wallet % with that amount and receiver', bad.id,
            bad.captured, bad.to_wallet, bad.transfer, bad.wallet_id USING ERRCODE = 'WD007';
    END IF;
END;
$$;
