-- The snapshot (wallets) and the durable log (wallet_operations), written together by
-- walletd_append_batch in one transaction, so balance = sum(log) at every commit.

CREATE TABLE wallets (
    id                      uuid PRIMARY KEY,
    balance                 bigint      NOT NULL DEFAULT 0,
    seq                     bigint      NOT NULL DEFAULT 0,
    created_at              timestamptz NOT NULL,
    updated_at              timestamptz NOT NULL,
    create_idempotency_key  text,
    create_fingerprint      text        NOT NULL DEFAULT '',
    CONSTRAINT wallets_balance_range CHECK (balance >= 0 AND balance <= 100000000000000000),
    CONSTRAINT wallets_seq_nonnegative CHECK (seq >= 0),
    CONSTRAINT wallets_create_key_length CHECK (char_length(create_idempotency_key) BETWEEN 1 AND 255)
);

CREATE UNIQUE INDEX wallets_create_idempotency_key ON wallets (create_idempotency_key)
    WHERE create_idempotency_key IS NOT NULL;

CREATE TABLE wallet_operations (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    wallet_id        uuid        NOT NULL REFERENCES wallets (id),
    seq              bigint      NOT NULL,
    kind             smallint    NOT NULL,
    amount           bigint      NOT NULL,
    balance_after    bigint      NOT NULL,
    idempotency_key  text,
    created_at       timestamptz NOT NULL,
    CONSTRAINT wallet_operations_wallet_seq UNIQUE (wallet_id, seq),
    CONSTRAINT wallet_operations_kind CHECK (kind IN (1, 2)),
    CONSTRAINT wallet_operations_amount_positive CHECK (amount > 0 AND amount <= 100000000000000),
    CONSTRAINT wallet_operations_balance_range
        CHECK (balance_after >= 0 AND balance_after <= 100000000000000000),
    CONSTRAINT wallet_operations_seq_positive CHECK (seq >= 1),
    CONSTRAINT wallet_operations_key_length CHECK (char_length(idempotency_key) BETWEEN 1 AND 255)
);

CREATE UNIQUE INDEX wallet_operations_idempotency_key ON wallet_operations (wallet_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- One round trip, one transaction: create wallets, append log rows, move snapshots.
-- A snapshot moves only from the seq the engine saw (prev_seq): a stale or second writer
-- fails the whole batch instead of interleaving (SQLSTATE WD001).
CREATE FUNCTION walletd_append_batch(
    new_ids uuid[], new_created_us bigint[], new_keys text[], new_fingerprints text[],
    op_wallets uuid[], op_seqs bigint[], op_kinds smallint[], op_amounts bigint[],
    op_balances bigint[], op_keys text[], op_created_us bigint[],
    snap_ids uuid[], snap_prev_seqs bigint[], snap_seqs bigint[], snap_balances bigint[],
    snap_updated_us bigint[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    moved bigint;
BEGIN
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
