-- Refusals are replayed too: a keyed operation the engine refused for a business reason
-- (insufficient funds, balance limit) is recorded, so a retry with the same key gets the
-- same 409 instead of being decided again (and perhaps applied after a deposit). An
-- idempotency key is used at most once per wallet: by a log row or by a refusal.
--
-- fence_seq is the wallet's seq the refusal was decided on (not counting its own batch's
-- moves). The append writes the refusal only once that seq is stored: a refusal decided on
-- the pending state of an earlier batch that never committed is never recorded (WD002, like
-- a snapshot move that is behind; the engine retries once the earlier batch has committed).

CREATE TABLE wallet_refusals (
    wallet_id        uuid        NOT NULL,
    idempotency_key  text        NOT NULL,
    kind             smallint    NOT NULL,
    amount           bigint      NOT NULL,
    reason           smallint    NOT NULL,
    balance_seen     bigint      NOT NULL,
    fence_seq        bigint      NOT NULL,
    created_at       timestamptz NOT NULL,
    PRIMARY KEY (wallet_id, idempotency_key),
    CONSTRAINT wallet_refusals_kind CHECK (kind IN (1, 2)),
    CONSTRAINT wallet_refusals_reason CHECK (reason IN (1, 2)),
    CONSTRAINT wallet_refusals_amount_positive CHECK (amount > 0 AND amount <= 100000000000000),
    CONSTRAINT wallet_refusals_balance_range
        CHECK (balance_seen >= 0 AND balance_seen <= 100000000000000000),
    CONSTRAINT wallet_refusals_key_length CHECK (char_length(idempotency_key) BETWEEN 1 AND 255)
);

DROP FUNCTION walletd_append_batch(
    uuid[], bigint[], text[], text[],
    uuid[], bigint[], smallint[], bigint[], bigint[], text[], bigint[],
    uuid[], bigint[], bigint[], bigint[], bigint[]
);

CREATE FUNCTION walletd_append_batch(
    new_ids uuid[], new_created_us bigint[], new_keys text[], new_fingerprints text[],
    op_wallets uuid[], op_seqs bigint[], op_kinds smallint[], op_amounts bigint[],
    op_balances bigint[], op_keys text[], op_created_us bigint[],
    snap_ids uuid[], snap_prev_seqs bigint[], snap_seqs bigint[], snap_balances bigint[],
    snap_updated_us bigint[],
    ref_wallets uuid[], ref_keys text[], ref_kinds smallint[], ref_amounts bigint[],
    ref_reasons smallint[], ref_balances bigint[], ref_fence_seqs bigint[],
    ref_created_us bigint[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    moved bigint;
    ready bigint;
    behind bigint;
    expected bigint;
BEGIN
    -- Lock the snapshot rows first (and those of refused wallets, in the same statement and
    -- order, so two batches never wait for each other in a cycle). A batch written while an
    -- earlier one of the same shard is still committing must wait for it here: its checks
    -- below then run with a fresh snapshot and see the earlier batch's seq. Without the
    -- lock, the UPDATE's snapshot would hold the old row version, whose seq fails the
    -- fencing condition, and the batch would be refused instead of waiting (READ COMMITTED
    -- only re-checks rows that matched).
    IF cardinality(ref_wallets) > 0 THEN
        PERFORM 1 FROM wallets WHERE id = ANY(snap_ids || ref_wallets) ORDER BY id
            FOR NO KEY UPDATE;
    ELSE
        PERFORM 1 FROM wallets WHERE id = ANY(snap_ids) ORDER BY id FOR NO KEY UPDATE;
    END IF;

    -- Fencing, before anything is written. The engine sends batch N+1 while N may still be
    -- on its way: N+1 can reach the server first and take the locks before N does. A
    -- wallet behind the expected seq (or not visible yet: created by N) then means "an
    -- earlier batch has not landed": WD002, which the engine retries once N has committed.
    -- A wallet ahead of it means another writer: WD001.
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
        -- A refusal rests on its wallet's state at fence_seq: that state must be stored
        -- (later batches of the shard may already have moved it further).
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

    -- Every log row's wallet is one whose snapshot this batch moves (and whose seq was
    -- just checked above, so it exists). This replaces the foreign key from the log to the
    -- snapshot, whose per-row trigger cost more PostgreSQL CPU than the rest of the append.
    IF EXISTS (SELECT 1
                 FROM unnest(op_wallets) AS o(id)
                 LEFT JOIN unnest(snap_ids) AS s(id) ON s.id = o.id
                WHERE s.id IS NULL) THEN
        RAISE EXCEPTION 'walletd: a log row names a wallet the batch does not move'
            USING ERRCODE = 'WD003';
    END IF;
    -- A key a refusal used is not used again by an operation (an index probe per keyed
    -- log row, and only while refusals exist at all).
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

    INSERT INTO wallet_operations (wallet_id, seq, kind, amount, balance_after, idempotency_key,
                                   created_at)
    SELECT o.wallet_id, o.seq, o.kind, o.amount, o.balance_after, o.key,
           timestamptz 'epoch' + o.created_us * interval '1 microsecond'
      FROM unnest(op_wallets, op_seqs, op_kinds, op_amounts, op_balances, op_keys, op_created_us)
           AS o(wallet_id, seq, kind, amount, balance_after, key, created_us);

    IF cardinality(ref_wallets) > 0 THEN
        INSERT INTO wallet_refusals (wallet_id, idempotency_key, kind, amount, reason,
                                     balance_seen, fence_seq, created_at)
        SELECT r.wallet_id, r.key, r.kind, r.amount, r.reason, r.balance_seen, r.fence_seq,
               timestamptz 'epoch' + r.created_us * interval '1 microsecond'
          FROM unnest(ref_wallets, ref_keys, ref_kinds, ref_amounts, ref_reasons, ref_balances,
                      ref_fence_seqs, ref_created_us)
               AS r(wallet_id, key, kind, amount, reason, balance_seen, fence_seq, created_us);
    END IF;

    UPDATE wallets AS w
       SET balance = s.balance, seq = s.seq,
           updated_at = timestamptz 'epoch' + s.updated_us * interval '1 microsecond'
      FROM unnest(snap_ids, snap_prev_seqs, snap_seqs, snap_balances, snap_updated_us)
           AS s(id, prev_seq, seq, balance, updated_us)
     WHERE w.id = s.id AND w.seq = s.prev_seq;
    GET DIAGNOSTICS moved = ROW_COUNT;
    IF moved <> coalesce(cardinality(snap_ids), 0) THEN
        RAISE EXCEPTION 'walletd: % of % snapshots moved; another writer changed them',
            moved, cardinality(snap_ids) USING ERRCODE = 'WD001';
    END IF;
END;
$$;
