-- Placeholder for migration 0014 of the parallel branch "currency", so that this branch's
-- numbering has no gap; the branch's own migration replaces this file at merge.
SELECT 1;
