-- Placeholder on the "refunds" branch only: version 19 belongs to another branch (wallet
-- listing indexes), merged before this one; its file replaces this one at the merge.
SELECT 1;
