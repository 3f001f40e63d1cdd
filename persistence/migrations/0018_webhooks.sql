-- Webhooks fed from the change feed (docs/API.md, "Webhooks"). A subscription names a URL
-- and the event types it wants; a sender delivers the feed's events to it in feed order,
-- one event per request, signed with the subscription's secret.

-- The subscriptions. The secret is stored as generated: the sender needs it to sign (an HMAC
-- key cannot be kept as a one-way hash). It is shown once, at creation, and never again by
-- the API; whoever can read this table can sign as walletd.
CREATE TABLE walletd_webhooks (
    id          uuid PRIMARY KEY,
    url         text NOT NULL CHECK (length(url) BETWEEN 1 AND 2048),
    event_types text[] NOT NULL,
    enabled     boolean NOT NULL DEFAULT true,
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The cursor of each subscription: the feed position of the last event it has taken
-- (delivered, or skipped as not wanted); the sender resumes after it. The lease columns say
-- which process delivers it, until when (the database's clock): one deliverer at a time in a
-- cluster, as with the shard leases. failing_since: set when an event stayed undelivered for
-- the whole retry period; the sender then stops, and the cursor stays where it was.
CREATE TABLE walletd_webhook_cursors (
    webhook_id       uuid PRIMARY KEY REFERENCES walletd_webhooks (id) ON DELETE CASCADE,
    position_xid     bigint NOT NULL DEFAULT 0,
    position_id      bigint NOT NULL DEFAULT 0,
    lease_owner      text,
    lease_expires_at timestamptz NOT NULL DEFAULT '-infinity',
    -- The first failed attempt of the event at the cursor (NULL: its last attempt, if any,
    -- succeeded); the retry period counts from it.
    retrying_since   timestamptz,
    failing_since    timestamptz
);

-- The attempts log: each request the sender (or a redelivery) made. Bounded per
-- subscription: the sender deletes all but the newest rows (webhook_deliveries_kept).
CREATE TABLE walletd_webhook_deliveries (
    id           bigserial PRIMARY KEY,
    webhook_id   uuid NOT NULL REFERENCES walletd_webhooks (id) ON DELETE CASCADE,
    position     text NOT NULL,
    event_type   text NOT NULL,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    -- The HTTP status the endpoint answered; NULL when there was no answer (error says why).
    status       integer,
    error        text,
    duration_ms  integer NOT NULL,
    redelivery   boolean NOT NULL DEFAULT false
);
CREATE INDEX walletd_webhook_deliveries_newest ON walletd_webhook_deliveries (webhook_id, id DESC);
