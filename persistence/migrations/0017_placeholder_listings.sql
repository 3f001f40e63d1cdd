-- Placeholder on the webhooks branch for migration 0017, which the listings branch adds; the
-- lead drops this file at merge (migration numbers must have no gaps).
SELECT 1;
