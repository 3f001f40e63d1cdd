-- Listings (GET /api/v1/wallets, /transfers, /holds; persistence/listings.py): pages newest
-- first in (created_at, id) order, resumed by keyset (a cursor holds the last position).
-- Each page is read through one of these indexes, so its cost is bounded by the page, not
-- by the table: a backward range scan from the cursor, of at most a few pages' worth of
-- rows (a filter without an index of its own is checked on those rows only).
--
--   listing     no filter / created range    status               wallet
--   wallets     wallets_listing              (its branch)         -
--   transfers   transfers_listing            transfers_by_status  transfers_from + transfers_to
--   holds       holds_listing                holds_by_status      holds_by_wallet
--
-- created_at and id never change, so wallets_listing keeps the snapshot moves HOT. A
-- transfer's or a hold's close changes its status, which the partial indexes of migrations
-- "transfers" and "holds" already cover (those updates were never HOT): the new indexes add
-- index entries to that write, measured in docs/BENCHMARKS.md ("Listings").
--
-- IF NOT EXISTS: an operator with large tables may build these beforehand with CREATE INDEX
-- CONCURRENTLY (same names and columns) so that this migration takes no write lock
-- (docs/OPERATIONS.md, "The change feed and as-of reads").

CREATE INDEX IF NOT EXISTS wallets_listing ON wallets (created_at, id);

CREATE INDEX IF NOT EXISTS transfers_listing ON transfers (created_at, id);
CREATE INDEX IF NOT EXISTS transfers_by_status ON transfers (status, created_at, id);
CREATE INDEX IF NOT EXISTS transfers_from ON transfers (from_wallet_id, created_at, id);
CREATE INDEX IF NOT EXISTS transfers_to ON transfers (to_wallet_id, created_at, id);
-- transfers_by_status serves the re-drive's read of the PENDING transfers (status 1 in
-- (created_at, id) order, persistence/postgres_log.py) as the partial index of migration
-- "transfers" did, and that one, smaller, drew the planner to it for a listing's PENDING page
-- followed by a sort that reads past the page (tests/test_listings.py saw it).
DROP INDEX IF EXISTS transfers_pending;

CREATE INDEX IF NOT EXISTS holds_listing ON holds (created_at, id);
CREATE INDEX IF NOT EXISTS holds_by_status ON holds (status, created_at, id);
CREATE INDEX IF NOT EXISTS holds_by_wallet ON holds (wallet_id, created_at, id);
