-- Wallet status (ACTIVE 1, FROZEN 2, CLOSED 3) and overdraft limit (docs/ARCHITECTURE.md,
-- "Wallet status and overdraft").
--
-- A wallet may go below zero down to -overdraft_limit: the floor moves from
-- "0 <= held <= balance" to "0 <= held <= balance + overdraft_limit" (available =
-- balance - held + overdraft_limit >= 0), on the snapshot and on every log row. Both are
-- changed only by a WALLET_UPDATE log row (kind 9, amount 0, balance and held unchanged),
-- which carries the wallet's status and limit from its seq on (status_after,
-- overdraft_limit_after); the wallets row holds the latest.
--
-- Independent of walletd_append_batch (not redefined here): the WALLET_UPDATE rows travel
-- in its log-row arrays like any row, and a second function of the same statement,
-- walletd_append_wallet_updates, called after the others whenever the batch has such a
-- row, fills their status and limit and moves the wallets row. So the floors cannot be
-- immediate CHECKs (a batch that raises a limit and uses it moves the snapshot before the
-- limit): they are constraint triggers deferred to the commit of the statement's
-- transaction, which fire only for a row below zero (WHEN: free for every other row) and
-- read the limit in force then:
--
--   wallets            balance - held >= -overdraft_limit        (23514 at commit)
--   wallet_operations  balance_after - held_after >= -(the overdraft_limit_after of the
--                      wallet's last WALLET_UPDATE row at or before the row's seq; 0
--                      without one)                               (23514 at commit)
--
-- CLOSED is final: a closed wallet has balance 0 and nothing held (CHECK), and a trigger
-- refuses any change of its row (so no log row can be added: every row moves its
-- snapshot); only `walletd restore`, which rebuilds snapshots from the log under every
-- shard lease, passes it (it sets walletd.restoring for its transaction). walletd_append_wallet_updates refuses a close while the wallet has a PENDING
-- hold or a PENDING transfer from or to it (WD009), after the batch's own transfers and
-- holds are written.

ALTER TABLE wallets ADD COLUMN status smallint NOT NULL DEFAULT 1;
ALTER TABLE wallets ADD COLUMN overdraft_limit bigint NOT NULL DEFAULT 0;
ALTER TABLE wallets ADD CONSTRAINT wallets_status CHECK (status BETWEEN 1 AND 3);
ALTER TABLE wallets ADD CONSTRAINT wallets_overdraft_limit_range
    CHECK (overdraft_limit >= 0 AND overdraft_limit <= 100000000000000);
ALTER TABLE wallets ADD CONSTRAINT wallets_closed_is_empty
    CHECK (status <> 3 OR (balance = 0 AND held = 0));
ALTER TABLE wallets DROP CONSTRAINT wallets_balance_range;
ALTER TABLE wallets ADD CONSTRAINT wallets_balance_range
    CHECK (balance >= -100000000000000000 AND balance <= 100000000000000000);
ALTER TABLE wallets DROP CONSTRAINT wallets_held_within_balance;
ALTER TABLE wallets ADD CONSTRAINT wallets_held_nonnegative CHECK (held >= 0);

ALTER TABLE wallet_operations ADD COLUMN status_after smallint;
ALTER TABLE wallet_operations ADD COLUMN overdraft_limit_after bigint;
ALTER TABLE wallet_operations DROP CONSTRAINT wallet_operations_kind;
ALTER TABLE wallet_operations ADD CONSTRAINT wallet_operations_kind
    CHECK (kind BETWEEN 1 AND 9) NOT VALID;
ALTER TABLE wallet_operations VALIDATE CONSTRAINT wallet_operations_kind;
ALTER TABLE wallet_operations DROP CONSTRAINT wallet_operations_amount_positive;
ALTER TABLE wallet_operations ADD CONSTRAINT wallet_operations_amount_positive
    CHECK (CASE WHEN kind = 9 THEN amount = 0 ELSE amount > 0 AND amount <= 100000000000000 END)
    NOT VALID;
ALTER TABLE wallet_operations VALIDATE CONSTRAINT wallet_operations_amount_positive;
ALTER TABLE wallet_operations DROP CONSTRAINT wallet_operations_balance_range;
ALTER TABLE wallet_operations ADD CONSTRAINT wallet_operations_balance_range
    CHECK (balance_after >= -100000000000000000 AND balance_after <= 100000000000000000)
    NOT VALID;
ALTER TABLE wallet_operations VALIDATE CONSTRAINT wallet_operations_balance_range;
ALTER TABLE wallet_operations ADD CONSTRAINT wallet_operations_update_terms
    CHECK (status_after BETWEEN 1 AND 3
           AND overdraft_limit_after BETWEEN 0 AND 100000000000000);
-- The WALLET_UPDATE rows of a wallet, for the limit in force at a seq (small: one entry
-- per update).
CREATE INDEX wallet_operations_updates ON wallet_operations (wallet_id, seq) WHERE kind = 9;

-- A refusal's balance_seen is the wallet's available money, which a limit can raise above
-- the balance ceiling.
ALTER TABLE wallet_refusals DROP CONSTRAINT wallet_refusals_reason;
ALTER TABLE wallet_refusals ADD CONSTRAINT wallet_refusals_reason CHECK (reason BETWEEN 1 AND 4);
ALTER TABLE wallet_refusals DROP CONSTRAINT wallet_refusals_balance_range;
ALTER TABLE wallet_refusals ADD CONSTRAINT wallet_refusals_balance_range
    CHECK (balance_seen >= 0 AND balance_seen <= 200000000000000000);

CREATE FUNCTION walletd_overdraft_limit_at(wallet uuid, at_seq bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT o.overdraft_limit_after FROM wallet_operations o
                      WHERE o.wallet_id = wallet AND o.kind = 9 AND o.seq <= at_seq
                      ORDER BY o.seq DESC LIMIT 1), 0)
$$;

CREATE FUNCTION walletd_wallet_floor() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    current wallets%ROWTYPE;
BEGIN
    SELECT * INTO current FROM wallets WHERE id = NEW.id;
    IF current.balance - current.held < -current.overdraft_limit THEN
        RAISE EXCEPTION 'walletd: wallet % is below its floor (balance %, held %, overdraft_limit %)',
            current.id, current.balance, current.held, current.overdraft_limit
            USING ERRCODE = '23514';
    END IF;
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER wallets_floor AFTER INSERT OR UPDATE ON wallets
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.balance < NEW.held) EXECUTE FUNCTION walletd_wallet_floor();

CREATE FUNCTION walletd_log_row_floor() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    floor_limit bigint := walletd_overdraft_limit_at(NEW.wallet_id, NEW.seq);
BEGIN
    IF NEW.balance_after - NEW.held_after < -floor_limit THEN
        RAISE EXCEPTION 'walletd: log row (%, %) is below its floor (balance_after %, held_after %, overdraft_limit %)',
            NEW.wallet_id, NEW.seq, NEW.balance_after, NEW.held_after, floor_limit
            USING ERRCODE = '23514';
    END IF;
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER wallet_operations_floor AFTER INSERT ON wallet_operations
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.balance_after < NEW.held_after) EXECUTE FUNCTION walletd_log_row_floor();

CREATE FUNCTION walletd_closed_is_final() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'walletd: wallet % is CLOSED; it never changes again', OLD.id
        USING ERRCODE = '23514';
END;
$$;

CREATE TRIGGER wallets_closed_is_final BEFORE UPDATE ON wallets
    FOR EACH ROW
    WHEN (OLD.status = 3 AND current_setting('walletd.restoring', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION walletd_closed_is_final();

-- The changes of a batch's WALLET_UPDATE rows: exactly one per such row of the batch
-- (given again as op_*: the statement names walletd_append_batch's parameters twice),
-- else WD008 and nothing is written. A close of a wallet with a PENDING hold or transfer
-- is WD009. The wallets row takes each wallet's last change.
CREATE FUNCTION walletd_append_wallet_updates(
    upd_ids uuid[], upd_seqs bigint[], upd_statuses smallint[], upd_limits bigint[],
    op_wallets uuid[], op_seqs bigint[], op_kinds smallint[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT coalesce(u.id, o.wallet_id) AS wallet_id, coalesce(u.seq, o.seq) AS seq INTO bad
      FROM unnest(upd_ids, upd_seqs) AS u(id, seq)
      FULL JOIN (SELECT * FROM unnest(op_wallets, op_seqs, op_kinds) AS x(wallet_id, seq, kind)
                  WHERE x.kind = 9) AS o
        ON o.wallet_id = u.id AND o.seq = u.seq
     WHERE u.id IS NULL OR o.wallet_id IS NULL
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'walletd: WALLET_UPDATE row (%, %) does not match a wallet update of its batch',
            bad.wallet_id, bad.seq USING ERRCODE = 'WD008';
    END IF;

    SELECT u.id INTO bad
      FROM unnest(upd_ids, upd_statuses) AS u(id, status)
     WHERE u.status = 3
       AND (EXISTS (SELECT 1 FROM holds h WHERE h.wallet_id = u.id AND h.status = 1)
            OR EXISTS (SELECT 1 FROM transfers t
                        WHERE t.status = 1 AND (t.from_wallet_id = u.id OR t.to_wallet_id = u.id)))
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'walletd: wallet % has a PENDING hold or transfer; it cannot close',
            bad.id USING ERRCODE = 'WD009';
    END IF;

    UPDATE wallet_operations AS o
       SET status_after = u.status, overdraft_limit_after = u.overdraft_limit
      FROM unnest(upd_ids, upd_seqs, upd_statuses, upd_limits) AS u(id, seq, status, overdraft_limit)
     WHERE o.wallet_id = u.id AND o.seq = u.seq AND o.kind = 9;

    UPDATE wallets AS w
       SET status = last.status, overdraft_limit = last.overdraft_limit
      FROM (SELECT DISTINCT ON (u.id) u.id, u.status, u.overdraft_limit
              FROM unnest(upd_ids, upd_seqs, upd_statuses, upd_limits)
                   AS u(id, seq, status, overdraft_limit)
             ORDER BY u.id, u.seq DESC) AS last
     WHERE w.id = last.id;
END;
$$;
