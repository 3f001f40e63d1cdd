-- Placeholder for migration 0016 of the parallel branch "metadata", so that this branch's
-- numbering has no gap; the branch's own migration replaces this file at merge.
SELECT 1;
