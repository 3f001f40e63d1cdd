-- Metadata (docs/API.md, "Metadata"): a client's object of strings on wallets (given at
-- creation), operations, transfers and holds (fixed at creation, part of the request's
-- identity). Bounds as Stripe's, the same constants as engine/bounds.py: at most 50 keys,
-- a key 1 to 40 characters, a value at most 500, every value a string.
--
-- Where it is stored, jsonb, NULL when there is none (no encoding, no bytes, on the path of
-- a request that sends none):
--   wallets.metadata             the wallet's metadata now. Set at creation; a later
--                                update (a merge) moves it with the snapshot
--                                (snap_metadata below: NULL = unchanged) beside the log row
--                                that records the change.
--   wallet_operations.metadata   the metadata of what wrote the row: a deposit's or
--                                withdrawal's own, a transfer's on each of its legs, a
--                                hold's on its HOLD / CAPTURE / RELEASE rows (as reference).
--   wallet_refusals.metadata     a keyed refusal is replayed only for the same request,
--                                metadata included.
-- A transfer's metadata is its debit row's and a hold's its HOLD row's, read back through
-- the row's key like a transfer's actor (migration "actors_on_log_rows"): the transfers and
-- holds tables and their append functions are unchanged.
--
-- Nullable, no default: adding the columns rewrites nothing. The append gains four
-- trailing arguments defaulting to NULL, so callers of the 30-argument form keep working.

-- Whether a jsonb value is a metadata object within the bounds. A CHECK calls it only for a
-- non-NULL value (the OR short-circuits). PL/pgSQL, not SQL: the planner tries to inline a
-- SQL function each time it prepares the CHECK (every append, with or without metadata),
-- which parses its body; a PL/pgSQL one is only called, and only for a row with metadata.
CREATE FUNCTION walletd_metadata_ok(metadata jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN jsonb_typeof(metadata) = 'object'
       AND (SELECT count(*) <= 50
                   AND coalesce(bool_and(jsonb_typeof(e.value) = 'string'
                                         AND char_length(e.key) BETWEEN 1 AND 40
                                         AND char_length(e.value #>> '{}') <= 500), true)
              FROM jsonb_each(metadata) AS e);
END;
$$;

ALTER TABLE wallets ADD COLUMN metadata jsonb;
ALTER TABLE wallets ADD CONSTRAINT wallets_metadata
    CHECK (metadata IS NULL OR walletd_metadata_ok(metadata));
ALTER TABLE wallet_operations ADD COLUMN metadata jsonb;
ALTER TABLE wallet_operations ADD CONSTRAINT wallet_operations_metadata
    CHECK (metadata IS NULL OR walletd_metadata_ok(metadata));
ALTER TABLE wallet_refusals ADD COLUMN metadata jsonb;
ALTER TABLE wallet_refusals ADD CONSTRAINT wallet_refusals_metadata
    CHECK (metadata IS NULL OR walletd_metadata_ok(metadata));

DROP FUNCTION walletd_append_batch(
    uuid[], bigint[], text[], text[],
    uuid[], bigint[], smallint[], bigint[], bigint[], text[], bigint[],
    uuid[], bigint[], bigint[], bigint[], bigint[],
    uuid[], text[], smallint[], bigint[], smallint[], bigint[], bigint[], bigint[],
    bigint[], text[], bigint[], text[],
    text[], text[]
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
    op_actors text[] DEFAULT NULL, ref_actors text[] DEFAULT NULL,
    new_metadata jsonb[] DEFAULT NULL, op_metadata jsonb[] DEFAULT NULL,
    ref_metadata jsonb[] DEFAULT NULL, snap_metadata jsonb[] DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    moved bigint;
    ready bigint;
    behind bigint;
    expected bigint;
BEGIN
    -- Unchanged from migration 0011 but for the metadata of each new wallet, log row,
    -- refusal and snapshot.
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

    -- unnest pads the shorter arrays with NULLs: an omitted new_metadata means none.
    INSERT INTO wallets (id, balance, seq, created_at, updated_at, create_idempotency_key,
                         create_fingerprint, metadata)
    SELECT n.id, 0, 0,
           timestamptz 'epoch' + n.created_us * interval '1 microsecond',
           timestamptz 'epoch' + n.created_us * interval '1 microsecond',
           n.key, n.fingerprint, n.metadata
      FROM unnest(new_ids, new_created_us, new_keys, new_fingerprints, new_metadata)
           AS n(id, created_us, key, fingerprint, metadata)
     WHERE n.id IS NOT NULL;

    -- unnest pads the shorter arrays with NULLs: an omitted op_held means held_after 0.
    INSERT INTO wallet_operations (wallet_id, seq, kind, amount, balance_after, idempotency_key,
                                   created_at, held_after, reference, actor, metadata)
    SELECT o.wallet_id, o.seq, o.kind, o.amount, o.balance_after, o.key,
           timestamptz 'epoch' + o.created_us * interval '1 microsecond',
           coalesce(o.held, 0), o.reference, o.actor, o.metadata
      FROM unnest(op_wallets, op_seqs, op_kinds, op_amounts, op_balances, op_keys, op_created_us,
                  op_held, op_references, op_actors, op_metadata)
           AS o(wallet_id, seq, kind, amount, balance_after, key, created_us, held, reference,
                actor, metadata)
     WHERE o.wallet_id IS NOT NULL;

    IF cardinality(ref_wallets) > 0 THEN
        INSERT INTO wallet_refusals (wallet_id, idempotency_key, kind, amount, reason,
                                     balance_seen, fence_seq, created_at, reference, actor,
                                     metadata)
        SELECT r.wallet_id, r.key, r.kind, r.amount, r.reason, r.balance_seen, r.fence_seq,
               timestamptz 'epoch' + r.created_us * interval '1 microsecond', r.reference,
               r.actor, r.metadata
          FROM unnest(ref_wallets, ref_keys, ref_kinds, ref_amounts, ref_reasons, ref_balances,
                      ref_fence_seqs, ref_created_us, ref_references, ref_actors, ref_metadata)
               AS r(wallet_id, key, kind, amount, reason, balance_seen, fence_seq, created_us,
                    reference, actor, metadata)
         WHERE r.wallet_id IS NOT NULL;
    END IF;

    -- A snapshot's metadata NULL (every move of money): the wallet's stays as it is.
    UPDATE wallets AS w
       SET balance = s.balance, seq = s.seq, held = coalesce(s.held, w.held),
           updated_at = timestamptz 'epoch' + s.updated_us * interval '1 microsecond',
           metadata = coalesce(s.metadata, w.metadata)
      FROM unnest(snap_ids, snap_prev_seqs, snap_seqs, snap_balances, snap_updated_us, snap_held,
                  snap_metadata)
           AS s(id, prev_seq, seq, balance, updated_us, held, metadata)
     WHERE w.id = s.id AND w.seq = s.prev_seq;
    GET DIAGNOSTICS moved = ROW_COUNT;
    IF moved <> coalesce(cardinality(snap_ids), 0) THEN
        RAISE EXCEPTION 'walletd: % of % snapshots moved; another writer changed them',
            moved, cardinality(snap_ids) USING ERRCODE = 'WD001';
    END IF;
END;
$$;
