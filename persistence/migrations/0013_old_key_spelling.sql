-- A bulk item without a key of its own was stored under "<request key>/<index>", a key a
-- client can send too; walletd now stores it under "<request key><US><index>" (US = 0x1F,
-- which no client key holds). A bulk request sent before the upgrade and retried after it
-- must still replay its items, never apply them twice: the lookup of a derived key also
-- takes a row keyed "<request key>/<index>", but only one that existed before this
-- migration (persistence/postgres_log.py). A row written since under "R/0" is a client's
-- key and never an item of bulk request R.
--
-- old_key_spelling marks those rows: true on every row that exists now, NULL on every row
-- written from now on. The column is added with DEFAULT true, which PostgreSQL (11+) keeps
-- in the catalog for the existing rows (no rewrite, no scan), then loses its default, so a
-- new row stores nothing but a bit of its null bitmap (rows with a NULL key or reference
-- carry one already; a NOT NULL false cost 7 bytes a row, measured). Each ALTER locks its
-- table briefly (ACCESS EXCLUSIVE): a transaction writing the table either commits before
-- the column exists (its rows read true) or waits and writes after (NULL). Rows written
-- after it by a walletd of the old version (still running) would read NULL: stop every
-- old walletd before the first new one starts (docs/OPERATIONS.md, Idempotency keys).

ALTER TABLE wallet_operations ADD COLUMN old_key_spelling boolean DEFAULT true;
ALTER TABLE wallet_operations ALTER COLUMN old_key_spelling DROP DEFAULT;

ALTER TABLE wallet_refusals ADD COLUMN old_key_spelling boolean DEFAULT true;
ALTER TABLE wallet_refusals ALTER COLUMN old_key_spelling DROP DEFAULT;
