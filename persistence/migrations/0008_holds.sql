-- Holds (docs/ARCHITECTURE.md, "Holds"): authorize -> capture / void / expire, and the
-- client's reference on operations.
--
-- A hold reserves part of a wallet's balance: the money stays in `balance` (everything the
-- wallet owns) and is counted in `held`; available = balance - held is what withdrawals,
-- transfers and new holds may take. Each move is a log row, so balance = sum(log) holds
-- as before, and held_after records held after each row:
--   HOLD (6)     amount reserved          balance unchanged   held + amount
--   CAPTURE (7)  captured, leaves        balance - amount    held - amount
--   RELEASE (8)  rest given back         balance unchanged   held - amount
-- A HOLD/CAPTURE/RELEASE row's key is "<US>KIND:<hold id>" (like a transfer leg's), so the
-- unique (wallet_id, idempotency_key) index makes a second capture or release impossible.
--
-- Invariants (walletd verify): held = sum(amount of PENDING holds) per wallet;
-- 0 <= held <= balance (checked here on every snapshot move);
-- sum(balance) + sum(PENDING transfers) = deposits - withdrawals - captures.
-- The feed carries holds through their log rows (HOLD / CAPTURE / RELEASE with the hold
-- id), so the holds table needs no feed position of its own.

ALTER TABLE wallets ADD COLUMN held bigint NOT NULL DEFAULT 0;
ALTER TABLE wallets ADD CONSTRAINT wallets_held_within_balance
    CHECK (held >= 0 AND held <= balance);

ALTER TABLE wallet_operations ADD COLUMN held_after bigint NOT NULL DEFAULT 0;
ALTER TABLE wallet_operations ADD COLUMN reference text;
ALTER TABLE wallet_operations ADD CONSTRAINT wallet_operations_reference_length
    CHECK (char_length(reference) <= 255);
ALTER TABLE wallet_operations DROP CONSTRAINT wallet_operations_kind;
ALTER TABLE wallet_operations ADD CONSTRAINT wallet_operations_kind CHECK (kind BETWEEN 1 AND 8);

-- A keyed refusal is replayed only for the same request, reference included.
ALTER TABLE wallet_refusals ADD COLUMN reference text;

CREATE TABLE holds (
    id                  uuid        PRIMARY KEY,
    wallet_id           uuid        NOT NULL,
    -- The wallet's shard (= the hold id's: ids are drawn so), for the expiry sweep of the
    -- shards one process serves.
    shard               integer     NOT NULL,
    amount              bigint      NOT NULL,
    -- 1 PENDING, 2 CAPTURED, 3 VOIDED, 4 EXPIRED.
    status              smallint    NOT NULL,
    expires_at          timestamptz NOT NULL,
    captured            bigint      NOT NULL DEFAULT 0,
    -- Capture into another wallet (a transfer opened by the capture); NULL: captured out.
    to_wallet_id        uuid,
    transfer_id         uuid,
    reference           text,
    create_key          text,
    create_fingerprint  text        NOT NULL,
    resolve_key         text,
    resolve_fingerprint text,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    CONSTRAINT holds_status CHECK (status BETWEEN 1 AND 4),
    CONSTRAINT holds_amount_positive CHECK (amount > 0 AND amount <= 100000000000000),
    CONSTRAINT holds_captured CHECK (captured >= 0 AND captured <= amount
                                     AND (captured = 0 OR status = 2)),
    CONSTRAINT holds_reference_length CHECK (char_length(reference) <= 255)
);

-- Loading a wallet reads its PENDING holds; the sweep reads the expired ones per shard.
CREATE INDEX holds_pending_by_wallet ON holds (wallet_id) WHERE status = 1;
CREATE INDEX holds_pending_by_expiry ON holds (shard, expires_at) WHERE status = 1;

-- The append gains held per snapshot, held_after and reference per log row, reference per
-- refusal. They default to NULL (held unchanged, held_after 0, no reference), so callers
-- of the 24-argument form keep working.
DROP FUNCTION walletd_append_batch(
    uuid[], bigint[], text[], text[],
    uuid[], bigint[], smallint[], bigint[], bigint[], text[], bigint[],
    uuid[], bigint[], bigint[], bigint[], bigint[],
    uuid[], text[], smallint[], bigint[], smallint[], bigint[], bigint[], bigint[]
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
    snap_held bigint[] DEFAULT NULL, ref_references text[] DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    moved bigint;
    ready bigint;
    behind bigint;
    expected bigint;
BEGIN
    -- Unchanged from migration 0004 up to the inserts (locks, then fencing): see there.
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
                                   created_at, held_after, reference)
    SELECT o.wallet_id, o.seq, o.kind, o.amount, o.balance_after, o.key,
           timestamptz 'epoch' + o.created_us * interval '1 microsecond',
           coalesce(o.held, 0), o.reference
      FROM unnest(op_wallets, op_seqs, op_kinds, op_amounts, op_balances, op_keys, op_created_us,
                  op_held, op_references)
           AS o(wallet_id, seq, kind, amount, balance_after, key, created_us, held, reference)
     WHERE o.wallet_id IS NOT NULL;

    IF cardinality(ref_wallets) > 0 THEN
        INSERT INTO wallet_refusals (wallet_id, idempotency_key, kind, amount, reason,
                                     balance_seen, fence_seq, created_at, reference)
        SELECT r.wallet_id, r.key, r.kind, r.amount, r.reason, r.balance_seen, r.fence_seq,
               timestamptz 'epoch' + r.created_us * interval '1 microsecond', r.reference
          FROM unnest(ref_wallets, ref_keys, ref_kinds, ref_amounts, ref_reasons, ref_balances,
                      ref_fence_seqs, ref_created_us, ref_references)
               AS r(wallet_id, key, kind, amount, reason, balance_seen, fence_seq, created_us,
                    reference)
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

-- Called in the same statement as walletd_append_batch (one statement, one transaction),
-- only by batches that create or resolve holds: inserts the new PENDING holds and closes
-- the resolved ones. A hold closes once: closing one that is not PENDING refuses the whole
-- statement (WD005).
CREATE FUNCTION walletd_append_holds(
    h_ids uuid[], h_wallets uuid[], h_shards integer[], h_amounts bigint[],
    h_expires_us bigint[], h_references text[], h_keys text[], h_fingerprints text[],
    h_created_us bigint[],
    u_ids uuid[], u_statuses smallint[], u_captured bigint[], u_to_wallets uuid[],
    u_transfers uuid[], u_keys text[], u_fingerprints text[], u_updated_us bigint[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    closed bigint;
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

    UPDATE holds AS h
       SET status = u.status, captured = u.captured, to_wallet_id = u.to_wallet,
           transfer_id = u.transfer, resolve_key = u.key, resolve_fingerprint = u.fingerprint,
           updated_at = timestamptz 'epoch' + u.updated_us * interval '1 microsecond'
      FROM unnest(u_ids, u_statuses, u_captured, u_to_wallets, u_transfers, u_keys,
                  u_fingerprints, u_updated_us)
           AS u(id, status, captured, to_wallet, transfer, key, fingerprint, updated_us)
     WHERE h.id = u.id AND h.status = 1;
    GET DIAGNOSTICS closed = ROW_COUNT;
    IF closed <> coalesce(cardinality(u_ids), 0) THEN
        RAISE EXCEPTION 'walletd: % of % holds closed; the others were not PENDING',
            closed, cardinality(u_ids) USING ERRCODE = 'WD005';
    END IF;
END;
$$;
