-- Transfers between wallets (docs/ARCHITECTURE.md, "Transfers"): a saga of one-shard
-- commits. The debit commit writes a TRANSFER_OUT log row and the transfer as PENDING; the
-- credit commit writes a TRANSFER_IN log row and moves the transfer to COMPLETED; a refused
-- credit is compensated by a TRANSFER_REFUND log row that moves it to FAILED. Each leg's
-- log row carries the key "<US>KIND:transfer-id" (US = the unit separator, which no client
-- key may contain), so the unique (wallet_id, idempotency_key) index makes applying a leg
-- twice impossible.
--
-- Conservation, at every commit: sum(wallets.balance) + sum(amount of PENDING transfers)
-- = sum(DEPOSIT) - sum(WITHDRAW).

ALTER TABLE wallet_operations DROP CONSTRAINT wallet_operations_kind;
ALTER TABLE wallet_operations ADD CONSTRAINT wallet_operations_kind CHECK (kind BETWEEN 1 AND 5);

CREATE TABLE transfers (
    id              uuid        PRIMARY KEY,
    from_wallet_id  uuid        NOT NULL,
    to_wallet_id    uuid        NOT NULL,
    amount          bigint      NOT NULL,
    reference       text,
    -- 1 PENDING (debited, money in flight), 2 COMPLETED, 3 FAILED (debit refunded).
    status          smallint    NOT NULL,
    failure_code    text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    CONSTRAINT transfers_status CHECK (status IN (1, 2, 3)),
    CONSTRAINT transfers_amount_positive CHECK (amount > 0 AND amount <= 100000000000000),
    CONSTRAINT transfers_two_wallets CHECK (from_wallet_id <> to_wallet_id),
    CONSTRAINT transfers_reference_length CHECK (char_length(reference) <= 255),
    CONSTRAINT transfers_failure_only_when_failed CHECK ((status = 3) = (failure_code IS NOT NULL))
);

-- Recovery reads the PENDING transfers (few at any time) oldest first.
CREATE INDEX transfers_pending ON transfers (created_at) WHERE status = 1;

-- Called in the same statement as walletd_append_batch (one statement, one transaction):
-- inserts the transfers opened by debit legs, and closes the ones whose credit or refund
-- leg the batch carries. A transfer closes once: a close of a transfer that is not PENDING
-- refuses the whole statement (WD004), so a credit and a refund can never both land.
CREATE FUNCTION walletd_append_transfers(
    t_ids uuid[], t_from uuid[], t_to uuid[], t_amounts bigint[], t_references text[],
    t_created_us bigint[],
    u_ids uuid[], u_statuses smallint[], u_failures text[], u_updated_us bigint[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    closed bigint;
BEGIN
    INSERT INTO transfers (id, from_wallet_id, to_wallet_id, amount, reference, status,
                           failure_code, created_at, updated_at)
    SELECT t.id, t.from_id, t.to_id, t.amount, t.reference, 1, NULL,
           timestamptz 'epoch' + t.created_us * interval '1 microsecond',
           timestamptz 'epoch' + t.created_us * interval '1 microsecond'
      FROM unnest(t_ids, t_from, t_to, t_amounts, t_references, t_created_us)
           AS t(id, from_id, to_id, amount, reference, created_us);

    UPDATE transfers AS t
       SET status = u.status, failure_code = u.failure,
           updated_at = timestamptz 'epoch' + u.updated_us * interval '1 microsecond'
      FROM unnest(u_ids, u_statuses, u_failures, u_updated_us)
           AS u(id, status, failure, updated_us)
     WHERE t.id = u.id AND t.status = 1;
    GET DIAGNOSTICS closed = ROW_COUNT;
    IF closed <> coalesce(cardinality(u_ids), 0) THEN
        RAISE EXCEPTION 'walletd: % of % transfers closed; the others were not PENDING',
            closed, cardinality(u_ids) USING ERRCODE = 'WD004';
    END IF;
END;
$$;
