-- Placeholder on the scopes branch only, so that 0011 applies without a gap: the sqlcheck
-- branch owns this migration (same file name); take its version when merging.
SELECT 1;
