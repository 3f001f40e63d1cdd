-- Placeholder on the webhooks branch for migration 0015, which the status branch adds; the
-- lead drops this file at merge (migration numbers must have no gaps).
SELECT 1;
