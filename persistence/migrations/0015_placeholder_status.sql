-- Placeholder for migration 0015 of the parallel branch "status", so that this branch's
-- numbering has no gap; the branch's own migration replaces this file at merge.
SELECT 1;
