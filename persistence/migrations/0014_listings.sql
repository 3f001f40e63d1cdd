-- Listings (GET /api/v1/wallets, /transfers, /holds; persistence/listings.py): pages newest
-- first in (created_at, id) order, resumed by keyset (a cursor holds the last position).
-- Each page is read through one of these indexes, so its cost is bounded by the page, not
-- by the table: a backward range scan from the cursor, of at most a few pages' worth of
-- rows (a filter without an index of its own is checked on those rows only).
--
--   listing     no filter / created range          status               wallet
--   wallets     wallets_listing                    (its branch)         -
--   transfers   transfers_by_status, each status   transfers_by_status  transfers_from + _to
--   holds       holds_by_status, each status       holds_by_status      holds_by_wallet
--
-- created_at and id never change, so wallets_listing keeps the snapshot moves HOT. A
-- transfer's or a hold's close changes its status, which the partial indexes of migrations
-- "transfers" and "holds" already cover (those updates were never HOT), so each index here
-- takes an entry when the row is written and another when it closes: measured in
-- docs/BENCHMARKS.md ("Listings"). Hence no (created_at, id) index on transfers or holds:
-- a page with no status reads one range of the status index per status, merged.
--
-- IF NOT EXISTS: an operator with large tables may build these beforehand with CREATE INDEX
-- CONCURRENTLY (same names and columns) so that this migration takes no write lock
-- (docs/OPERATIONS.md, "The change feed and as-of reads").

CREATE INDEX IF NOT EXISTS wallets_listing ON wallets (created_at, id);

CREATE INDEX IF NOT EXISTS transfers_by_status ON transfers (status, created_at, id);
CREATE INDEX IF NOT EXISTS transfers_from ON transfers (from_wallet_id, created_at, id);
CREATE INDEX IF NOT EXISTS transfers_to ON transfers (to_wallet_id, created_at, id);
-- transfers_by_status serves the re-drive's read of the PENDING transfers (status 1 in
-- (created_at, id) order, persistence/postgres_log.py) as the partial index of migration
-- "transfers" did, and that one, smaller, drew the planner to it for a listing's PENDING page
-- followed by a sort that reads past the page (tests/test_listings.py saw it).
DROP INDEX IF EXISTS transfers_pending;

CREATE INDEX IF NOT EXISTS holds_by_status ON holds (status, created_at, id);
CREATE INDEX IF NOT EXISTS holds_by_wallet ON holds (wallet_id, created_at, id);
