-- Placeholder on the webhooks branch for migration 0016, which the metadata branch adds; the
-- lead drops this file at merge (migration numbers must have no gaps).
SELECT 1;
