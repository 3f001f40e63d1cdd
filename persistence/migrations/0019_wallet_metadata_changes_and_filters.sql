-- A wallet's metadata changes (PATCH /api/v1/wallets/{id}, docs/API.md "Changing a
-- wallet"), and the wallet listing's status and currency filters (persistence/listings.py).
--
-- Metadata changes. Every WALLET_UPDATE row (kind 9) written from now on carries, in its
-- metadata column, the wallet's metadata after the change, whatever the change (NULL: an
-- empty object); the append moves wallets.metadata with it (snap_metadata of migration
-- "metadata": '{}' for an emptied one, NULL leaves it). So the wallet's metadata at a seq
-- is that of its last WALLET_UPDATE row at or before it, else its creation's. Before this
-- migration metadata could not change, so the rows of earlier status and limit changes
-- take the wallet's metadata now (the creation's) below: one statement over the few rows
-- of the partial index wallet_operations_updates.
--
-- The creation's metadata is part of what the creation request was, its fingerprint
-- (engine/router.py create_wallet: the JSON text [<id|currency>, [[key, value], ...]] when
-- it had metadata; never starting with "[" otherwise), which never changes:
-- walletd_creation_metadata reads it back, for as-of reads before the first change, the
-- wallet.created feed event, verify and restore.

UPDATE wallet_operations AS o
   SET metadata = w.metadata
  FROM wallets w
 WHERE o.kind = 9 AND o.wallet_id = w.id AND o.metadata IS NULL AND w.metadata IS NOT NULL;

CREATE FUNCTION walletd_creation_metadata(create_fingerprint text) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN left(create_fingerprint, 1) = '['
                THEN (SELECT jsonb_object_agg(p.pair ->> 0, p.pair ->> 1)
                        FROM jsonb_array_elements(create_fingerprint::jsonb -> 1) AS p(pair))
           END
$$;

-- Listing filters: GET /api/v1/wallets?status=... and ?currency=... each drive a page
-- through an index of their own, like the transfers' and holds' status filters (migration
-- "listings"). Neither column changes on a snapshot move, so balance updates stay HOT; a
-- status change (rare, a PATCH) takes a new entry. The metadata[key]=value filter has no
-- index: `metadata @> $n` is checked on the rows a page reads, bounded (docs/API.md).
-- IF NOT EXISTS: buildable beforehand with CREATE INDEX CONCURRENTLY (docs/OPERATIONS.md).
CREATE INDEX IF NOT EXISTS wallets_by_currency ON wallets (currency, created_at, id);
CREATE INDEX IF NOT EXISTS wallets_by_status ON wallets (status, created_at, id);
