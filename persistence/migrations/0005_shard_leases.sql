-- Scale-out: the shard is the unit of ownership. Each `walletd serve` process owns a set of
-- shards through leases kept here; the epoch of a lease is its fencing token, and every
-- append carries the (shard, epoch) pairs it writes (docs/SCALING.md).

-- The cluster's shard count, stored by the first `walletd serve` and checked by every later
-- one: a process with another count would route wallets to other shards, so it is refused.
CREATE TABLE walletd_cluster (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    shard_count integer NOT NULL CHECK (shard_count BETWEEN 1 AND 4096)
);

-- One row per shard, created with the cluster row. owner NULL = released. A lease whose
-- expires_at (the database's clock) has passed may be taken by anyone, bumping the epoch.
CREATE TABLE walletd_shard_leases (
    shard      integer PRIMARY KEY,
    owner      text,
    owner_url  text,
    epoch      bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);

-- The live processes, so that each can compute its fair share of the shards.
CREATE TABLE walletd_members (
    owner      text PRIMARY KEY,
    url        text NOT NULL,
    expires_at timestamptz NOT NULL
);

-- The fence, called in the same statement as the append:
--     SELECT walletd_append_batch(...) FROM walletd_fence(shards, epochs)
-- It locks the lease rows of the shards the batch writes FOR KEY SHARE: a successor's claim,
-- which locks the row FOR UPDATE before bumping the epoch, waits for an append in flight,
-- and every append after the bump sees the new epoch (a locking read returns the newest row
-- version). Renewals (a plain UPDATE of expires_at: FOR NO KEY UPDATE) do not conflict with
-- KEY SHARE, so a busy owner's appends never starve its own renewals. A batch whose epoch is
-- not the stored one is refused with WDF01 before anything is written. An empty fence (tests
-- that drive the engine without leases) checks nothing.
CREATE FUNCTION walletd_fence(fence_shards integer[], fence_epochs bigint[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    current bigint;
BEGIN
    IF coalesce(cardinality(fence_shards), 0) = 0 THEN
        RETURN 0;
    END IF;
    SELECT count(*) INTO current
      FROM (SELECT l.shard, l.epoch
              FROM walletd_shard_leases AS l
             WHERE l.shard = ANY(fence_shards)
             ORDER BY l.shard
               FOR KEY SHARE) AS l
      JOIN unnest(fence_shards, fence_epochs) AS f(shard, epoch)
        ON f.shard = l.shard AND f.epoch = l.epoch;
    IF current <> cardinality(fence_shards) THEN
        RAISE EXCEPTION 'walletd: % of % shard epochs are stale; another process owns the shard',
            cardinality(fence_shards) - current, cardinality(fence_shards)
            USING ERRCODE = 'WDF01';
    END IF;
    RETURN current;
END;
$$;
