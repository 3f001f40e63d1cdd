-- Which API key moved this money: every log row and recorded refusal names the key whose
-- request wrote it (its name, never its secret; http/keys.py). NULL when auth is off, and
-- for rows no request wrote (an expired hold's release by the sweep). A transfer's legs
-- carry the key that asked for the transfer, on whichever process applies them; the
-- transfer's own actor is its debit row's (read back through the leg key), so the
-- transfers table and walletd_append_transfers are unchanged.
--
-- Nullable, no default: adding the columns rewrites nothing. The append gains two
-- trailing arguments defaulting to NULL, so callers of the 28-argument form keep working.

ALTER TABLE wallet_operations ADD COLUMN actor text;
ALTER TABLE wallet_operations ADD CONSTRAINT wallet_operations_actor_length
    CHECK (char_length(actor) <= 64);
ALTER TABLE wallet_refusals ADD COLUMN actor text;

DROP FUNCTION walletd_append_batch(
    uuid[], bigint[], text[], text[],
    uuid[], bigint[], smallint[], bigint[], bigint[], text[], bigint[],
    uuid[], bigint[], bigint[], bigint[], bigint[],
    uuid[], text[], smallint[], bigint[], smallint[], bigint[], bigint[], bigint[],
    bigint[], text[], bigint[], text[]
);

CREATE FUNCTION walletd_append_batch(
    new_ids uuid[], new_created_us bigint[], new_keys text[], new_fingerprints text[],
    op_wallets uuid[], op_seqs bigint[], op_kinds smallint[], op_amounts bigint[],
    op_balances bigint[], op_keys text[], op_created_us bigint[],
    snap_ids uuid[], snap_prev_seqs bigint[], snap_seqs bigint[], snap_balances bigint[],
    snap_updated_us bigint[],
    ref_wallets uuid[], ref_keys text[], ref_kinds smallint[], ref_amounts bigint[],
    ref_reasons smallint[], ref_balances bigint[], ref_fence_seqs bigint[],
    ref_created_us bigint[],
    op_held bigint[] DEFAULT NULL, op_references text[] DEFAULT NULL,
    snap_held bigint[] DEFAULT NULL, ref_references text[] DEFAULT NULL,
    op_actors text[] DEFAULT NULL, ref_actors text[] DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    moved bigint;
    ready bigint;
    behind bigint;
    expected bigint;
BEGIN
    -- Unchanged from migration 0008 but for the actor of each log row and refusal.
    IF cardinality(ref_wallets) > 0 THEN
        PERFORM 1 FROM wallets WHERE id = ANY(snap_ids || ref_wallets) ORDER BY id
            FOR NO KEY UPDATE;
    ELSE
        PERFORM 1 FROM wallets WHERE id = ANY(snap_ids) ORDER BY id FOR NO KEY UPDATE;
    END IF;

    SELECT count(*) FILTER (WHERE w.seq = s.prev_seq),
           count(*) FILTER (WHERE w.seq IS NULL OR w.seq < s.prev_seq)
      INTO ready, behind
      FROM unnest(snap_ids, snap_prev_seqs) AS s(id, prev_seq)
      LEFT JOIN wallets AS w ON w.id = s.id
     WHERE NOT (s.id = ANY(new_ids));
    expected := coalesce(cardinality(snap_ids), 0)
                - (SELECT count(*) FROM unnest(snap_ids) AS i(id) WHERE i.id = ANY(new_ids));
    IF ready <> expected THEN
        IF behind > 0 THEN
            RAISE EXCEPTION 'walletd: % snapshots are behind this batch; an earlier batch has not landed',
                behind USING ERRCODE = 'WD002';
        END IF;
        RAISE EXCEPTION 'walletd: % of % snapshots at the expected seq; another writer changed them',
            ready, expected USING ERRCODE = 'WD001';
    END IF;

    IF cardinality(ref_wallets) > 0 THEN
        IF EXISTS (SELECT 1
                     FROM unnest(ref_wallets, ref_fence_seqs) AS r(id, fence_seq)
                     LEFT JOIN wallets AS w ON w.id = r.id
                    WHERE NOT (r.id = ANY(new_ids))
                      AND (w.seq IS NULL OR w.seq < r.fence_seq)) THEN
            RAISE EXCEPTION 'walletd: a refusal rests on a wallet state that has not landed'
                USING ERRCODE = 'WD002';
        END IF;
        IF EXISTS (SELECT 1
                     FROM unnest(ref_wallets, ref_keys) AS r(id, key)
                     JOIN wallet_operations AS o
                       ON o.wallet_id = r.id AND o.idempotency_key = r.key) THEN
            RAISE EXCEPTION 'walletd: a refusal reuses the idempotency key of an operation'
                USING ERRCODE = 'WD004';
        END IF;
    END IF;

    IF EXISTS (SELECT 1
                 FROM unnest(op_wallets) AS o(id)
                 LEFT JOIN unnest(snap_ids) AS s(id) ON s.id = o.id
                WHERE s.id IS NULL) THEN
        RAISE EXCEPTION 'walletd: a log row names a wallet the batch does not move'
            USING ERRCODE = 'WD003';
    END IF;
    IF EXISTS (SELECT 1 FROM wallet_refusals LIMIT 1) AND EXISTS (
        SELECT 1
          FROM unnest(op_wallets, op_keys) AS o(id, key)
          JOIN wallet_refusals AS r ON r.wallet_id = o.id AND r.idempotency_key = o.key) THEN
        RAISE EXCEPTION 'walletd: an operation reuses the idempotency key of a refusal'
            USING ERRCODE = 'WD004';
    END IF;

    INSERT INTO wallets (id, balance, seq, created_at, updated_at, create_idempotency_key,
                         create_fingerprint)
    SELECT n.id, 0, 0,
           timestamptz 'epoch' + n.created_us * interval '1 microsecond',
           timestamptz 'epoch' + n.created_us * interval '1 microsecond',
           n.key, n.fingerprint
      FROM unnest(new_ids, new_created_us, new_keys, new_fingerprints)
           AS n(id, created_us, key, fingerprint);

    -- unnest pads the shorter arrays with NULLs: an omitted op_held means held_after 0.
    INSERT INTO wallet_operations (wallet_id, seq, kind, amount, balance_after, idempotency_key,
                                   created_at, held_after, reference, actor)
    SELECT o.wallet_id, o.seq, o.kind, o.amount, o.balance_after, o.key,
           timestamptz 'epoch' + o.created_us * interval '1 microsecond',
           coalesce(o.held, 0), o.reference, o.actor
      FROM unnest(op_wallets, op_seqs, op_kinds, op_amounts, op_balances, op_keys, op_created_us,
                  op_held, op_references, op_actors)
           AS o(wallet_id, seq, kind, amount, balance_after, key, created_us, held, reference,
                actor)
     WHERE o.wallet_id IS NOT NULL;

    IF cardinality(ref_wallets) > 0 THEN
        INSERT INTO wallet_refusals (wallet_id, idempotency_key, kind, amount, reason,
                                     balance_seen, fence_seq, created_at, reference, actor)
        SELECT r.wallet_id, r.key, r.kind, r.amount, r.reason, r.balance_seen, r.fence_seq,
               timestamptz 'epoch' + r.created_us * interval '1 microsecond', r.reference,
               r.actor
          FROM unnest(ref_wallets, ref_keys, ref_kinds, ref_amounts, ref_reasons, ref_balances,
                      ref_fence_seqs, ref_created_us, ref_references, ref_actors)
               AS r(wallet_id, key, kind, amount, reason, balance_seen, fence_seq, created_us,
                    reference, actor)
         WHERE r.wallet_id IS NOT NULL;
    END IF;

    UPDATE wallets AS w
       SET balance = s.balance, seq = s.seq, held = coalesce(s.held, w.held),
           updated_at = timestamptz 'epoch' + s.updated_us * interval '1 microsecond'
      FROM unnest(snap_ids, snap_prev_seqs, snap_seqs, snap_balances, snap_updated_us, snap_held)
           AS s(id, prev_seq, seq, balance, updated_us, held)
     WHERE w.id = s.id AND w.seq = s.prev_seq;
    GET DIAGNOSTICS moved = ROW_COUNT;
    IF moved <> coalesce(cardinality(snap_ids), 0) THEN
        RAISE EXCEPTION 'walletd: % of % snapshots moved; another writer changed them',
            moved, cardinality(snap_ids) USING ERRCODE = 'WD001';
    END IF;
END;
$$;
