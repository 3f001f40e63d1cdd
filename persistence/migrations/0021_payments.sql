-- Payments: several postings applied all together or not at all (docs/ARCHITECTURE.md,
-- "Payments"). A payment is a row here plus one transfer per posting (payment_postings names
-- it; its id is derived from the payment's, engine/payments.py); its legs are the transfers'
-- legs, so conservation is the transfers' (money in flight is in PENDING transfers).
--
-- The payment's phase is decided here, once (walletd_decide_payment, a compare-and-set
-- under the payment row's lock):
--   1 DEBITING   the postings are being debited (each opens its transfer, PENDING)
--   2 CREDITING  every posting was debited (and maybe credited already, by a joint commit)
--                and no receiver waiting for its credit is CLOSED: credits only. The
--                receivers' wallet rows are locked (FOR SHARE) while this is decided, so a
--                close either committed before (seen: FAILING instead) or meets the
--                PENDING postings after (WD009): a credit is never refused for CLOSED.
--   3 FAILING    a debit was refused (or a receiver is CLOSED): refunds only. Each posting
--                not debited yet gets its transfer row now, FAILED with failure_code
--                PAYMENT_NOT_DEBITED and no leg, so its debit can never be stored after
--                (the transfer's primary key); one being stored meanwhile is waited for.
-- COMPLETED / FAILED are not stored: a payment is final when every posting's transfer is
-- COMPLETED (phase 2) or FAILED (phase 3).
--
-- Both are also called for many payments at once (walletd_open_payments,
-- walletd_decide_payments): one statement and one flush per wave of payments. They commit
-- synchronously like every walletd write: what they write is in the change feed at once
-- (payment.created, payment.decided), and a feed position must never be taken back.
--
-- The change feed (persistence/log_reads.py FEED_SOURCES) has two events per payment, each at
-- its own position (xid8 of the writing transaction, an id of wallet_operations_id_seq, as
-- every feed source): payment.created (the row's insert) and payment.decided (the decision).

CREATE TABLE payments (
    id            uuid        PRIMARY KEY,
    phase         smallint    NOT NULL DEFAULT 1,
    postings      smallint    NOT NULL,
    currency      text        NOT NULL,
    exponent      smallint    NOT NULL,
    reference     text,
    metadata      jsonb,
    actor         text,
    -- The posting refused first, its code, which side refused, the balance it was seen at.
    failed_index  smallint,
    failure_code  text,
    failed_side   text,
    balance_seen  bigint,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    created_xid   xid8        NOT NULL DEFAULT pg_current_xact_id(),
    feed_id       bigint      NOT NULL DEFAULT nextval('wallet_operations_id_seq'),
    decided_xid   xid8,
    decided_feed_id bigint,
    CONSTRAINT payments_phase CHECK (phase IN (1, 2, 3)),
    CONSTRAINT payments_postings CHECK (postings BETWEEN 1 AND 256),
    CONSTRAINT payments_reference_length CHECK (char_length(reference) <= 255),
    CONSTRAINT payments_actor_length CHECK (char_length(actor) <= 64),
    CONSTRAINT payments_metadata CHECK (metadata IS NULL OR walletd_metadata_ok(metadata)),
    CONSTRAINT payments_failure_only_when_failing CHECK (
        (phase = 3) = (failure_code IS NOT NULL) AND (phase = 3) = (failed_index IS NOT NULL)
        AND (phase = 3) = (failed_side IN ('from', 'to')))
);

-- The re-drive reads the payments still DEBITING (few at any time), oldest first.
CREATE INDEX payments_debiting ON payments (created_at) WHERE phase = 1;
-- The feed reads each event source in position order.
CREATE INDEX payments_feed ON payments (created_xid, feed_id);
CREATE INDEX payments_decided_feed ON payments (decided_xid, decided_feed_id)
    WHERE decided_xid IS NOT NULL;

CREATE TABLE payment_postings (
    transfer_id     uuid     PRIMARY KEY,
    payment_id      uuid     NOT NULL REFERENCES payments (id),
    idx             smallint NOT NULL,
    from_wallet_id  uuid     NOT NULL,
    to_wallet_id    uuid     NOT NULL,
    amount          bigint   NOT NULL,
    metadata        jsonb,
    CONSTRAINT payment_postings_index UNIQUE (payment_id, idx),
    CONSTRAINT payment_postings_amount CHECK (amount > 0 AND amount <= 100000000000000),
    CONSTRAINT payment_postings_two_wallets CHECK (from_wallet_id <> to_wallet_id),
    CONSTRAINT payment_postings_metadata CHECK (metadata IS NULL OR walletd_metadata_ok(metadata))
);

-- Stores a payment (phase 1) with its postings unless one is stored under its id; returns
-- the stored one's creation instant (the caller's own instant: it stored it).
CREATE FUNCTION walletd_open_payment(
    p_id uuid, p_currency text, p_exponent smallint, p_reference text, p_metadata jsonb,
    p_actor text, p_created_us bigint,
    s_transfer_ids uuid[], s_from uuid[], s_to uuid[], s_amounts bigint[], s_metadata jsonb[]
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    stored_us bigint;
BEGIN
    INSERT INTO payments (id, phase, postings, currency, exponent, reference, metadata, actor,
                          created_at, updated_at)
    VALUES (p_id, 1, cardinality(s_transfer_ids), p_currency, p_exponent, p_reference,
            p_metadata, p_actor,
            timestamptz 'epoch' + p_created_us * interval '1 microsecond',
            timestamptz 'epoch' + p_created_us * interval '1 microsecond')
    ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN
        SELECT (extract(epoch FROM created_at) * 1000000)::bigint INTO stored_us
          FROM payments WHERE id = p_id;
        RETURN stored_us;
    END IF;
    INSERT INTO payment_postings (transfer_id, payment_id, idx, from_wallet_id, to_wallet_id,
                                  amount, metadata)
    SELECT s.transfer_id, p_id, (s.n - 1)::smallint, s.from_id, s.to_id, s.amount, s.metadata
      FROM unnest(s_transfer_ids, s_from, s_to, s_amounts, s_metadata)
           WITH ORDINALITY AS s(transfer_id, from_id, to_id, amount, metadata, n);
    RETURN p_created_us;
END;
$$;

-- The decision (header). Returns the phase stored after: another driver's, if it decided
-- first; 0 when refused, nothing written: no such payment, or CREDITING with a posting not
-- PENDING.
CREATE FUNCTION walletd_decide_payment(
    p_id uuid, p_phase smallint, p_index smallint, p_code text, p_seen bigint, p_now_us bigint
) RETURNS smallint
LANGUAGE plpgsql AS $$
DECLARE
    current smallint;
    side text := CASE WHEN p_phase = 3 THEN 'from' END;
    closed_index smallint;
    now_ts timestamptz := timestamptz 'epoch' + p_now_us * interval '1 microsecond';
BEGIN
    SELECT phase INTO current FROM payments WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    IF current <> 1 THEN
        RETURN current;
    END IF;
    IF p_phase = 2 THEN
        -- Every posting debited and not refunded: PENDING, or COMPLETED by a joint commit
        -- (every posting's debit and credit in one batch, engine/payments.py).
        IF EXISTS (SELECT 1 FROM payment_postings pp
                     LEFT JOIN transfers t ON t.id = pp.transfer_id
                    WHERE pp.payment_id = p_id AND (t.status IS NULL OR t.status = 3)) THEN
            RETURN 0;
        END IF;
        -- Lock the receivers (in id order: two payments never wait on each other in a
        -- circle), then read their status after the lock, in a new statement's snapshot.
        PERFORM 1 FROM wallets w
          WHERE w.id IN (SELECT pp.to_wallet_id FROM payment_postings pp WHERE pp.payment_id = p_id)
          ORDER BY w.id FOR SHARE;
        -- A receiver CLOSED while its posting still waits for the credit (one credited
        -- already may have been emptied and closed since: its posting is done).
        SELECT pp.idx INTO closed_index
          FROM payment_postings pp JOIN wallets w ON w.id = pp.to_wallet_id
          JOIN transfers t ON t.id = pp.transfer_id
         WHERE pp.payment_id = p_id AND w.status = 3 AND t.status = 1
         ORDER BY pp.idx LIMIT 1;
        IF FOUND THEN
            p_phase := 3; p_index := closed_index; p_code := 'WALLET_CLOSED';
            p_seen := NULL; side := 'to';
        END IF;
    END IF;
    IF p_phase = 3 THEN
        INSERT INTO transfers (id, from_wallet_id, to_wallet_id, amount, reference, status,
                               failure_code, created_at, updated_at)
        SELECT pp.transfer_id, pp.from_wallet_id, pp.to_wallet_id, pp.amount, p.reference, 3,
               'PAYMENT_NOT_DEBITED', now_ts, now_ts
          FROM payment_postings pp JOIN payments p ON p.id = pp.payment_id
         WHERE pp.payment_id = p_id
        ON CONFLICT (id) DO NOTHING;
    END IF;
    UPDATE payments
       SET phase = p_phase, failed_index = p_index, failure_code = p_code,
           balance_seen = p_seen, failed_side = side, updated_at = now_ts,
           decided_xid = pg_current_xact_id(),
           decided_feed_id = nextval('wallet_operations_id_seq')
     WHERE id = p_id;
    RETURN p_phase;
END;
$$;

-- Many payments opened in one statement (a wave: engine/payments.py coalesces the requests
-- that arrive while one runs), each as walletd_open_payment does it. Posting i of payment k
-- is element s_offsets[k] + i of the s_ arrays (s_counts[k] of them). Returns each
-- payment's stored creation instant, in order.
CREATE FUNCTION walletd_open_payments(
    p_ids uuid[], p_currencies text[], p_exponents smallint[], p_references text[],
    p_metadata jsonb[], p_actors text[], p_created_us bigint[], s_counts int[],
    s_transfer_ids uuid[], s_from uuid[], s_to uuid[], s_amounts bigint[], s_metadata jsonb[]
) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    stored bigint[] := '{}';
    first int := 1;
    last int;
BEGIN
    FOR k IN 1 .. coalesce(cardinality(p_ids), 0) LOOP
        last := first + s_counts[k] - 1;
        stored := stored || walletd_open_payment(
            p_ids[k], p_currencies[k], p_exponents[k], p_references[k], p_metadata[k],
            p_actors[k], p_created_us[k], s_transfer_ids[first:last], s_from[first:last],
            s_to[first:last], s_amounts[first:last], s_metadata[first:last]);
        first := last + 1;
    END LOOP;
    RETURN stored;
END;
$$;

-- Many decisions in one statement (a wave), each as walletd_decide_payment takes it. Every
-- receiver of the wave is locked first, in id order, so that two waves (or a wave and a
-- shard's commit, which locks one shard's rows) never wait on each other in a circle; the
-- caller sends the payments in id order, which orders their rows' locks too. Returns each
-- payment's phase after (0: refused), in order.
CREATE FUNCTION walletd_decide_payments(
    p_ids uuid[], p_phases smallint[], p_indexes smallint[], p_codes text[], p_seens bigint[],
    p_now_us bigint
) RETURNS smallint[]
LANGUAGE plpgsql AS $$
DECLARE
    decided smallint[] := '{}';
BEGIN
    PERFORM 1 FROM wallets w
      WHERE w.id IN (SELECT pp.to_wallet_id FROM payment_postings pp
                      WHERE pp.payment_id = ANY(p_ids))
      ORDER BY w.id FOR SHARE;
    FOR k IN 1 .. coalesce(cardinality(p_ids), 0) LOOP
        decided := decided || walletd_decide_payment(
            p_ids[k], p_phases[k], p_indexes[k], p_codes[k], p_seens[k], p_now_us);
    END LOOP;
    RETURN decided;
END;
$$;
