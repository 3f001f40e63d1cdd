-- A placeholder: version 14 belongs to the "currency" branch, merged beside this one. It
-- exists only so that this branch's migrations run without a gap; it changes nothing, and
-- the merge replaces it with the real 0014.
SELECT 1;
