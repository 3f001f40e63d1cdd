-- The PENDING transfers out of a wallet, read with the wallet whenever it is loaded
-- (persistence/postgres_log.py, _PENDING_OUT): the room under the balance ceiling their
-- refunds may need back is kept from other credits (docs/ARCHITECTURE.md, "Transfers").
-- Through transfers_from (every transfer a wallet ever sent) that read grows with the
-- sender's history: 8.8 ms for a sender of 200,000 transfers in a 1,000,000-row table,
-- against 0.26 ms through this index, which holds only the few PENDING rows. Partial on
-- status = 1, so a transfer leaves it when it closes. Its predicate also names
-- from_wallet_id IS NOT NULL (always true: the column is NOT NULL), which a query implies
-- only through a condition on the sender itself (the load's from_wallet_id = ANY(...)): a
-- listing's status filter alone does not, so listings are never drawn to it (with the plain
-- `WHERE status = 1` the planner ANDed it into a PENDING page's bitmap and read past the
-- page: tests/test_listings.py saw it).
CREATE INDEX IF NOT EXISTS transfers_pending_by_sender ON transfers (from_wallet_id)
    WHERE status = 1 AND from_wallet_id IS NOT NULL;
