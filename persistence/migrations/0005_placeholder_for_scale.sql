-- Placeholder so that the feed branch's migration keeps its assigned number (versions
-- must be 1..N without gaps). The lead drops this file when merging the real one.
SELECT 1;
