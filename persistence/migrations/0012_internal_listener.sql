-- Trust boundaries: walletd processes deliver transfer legs to each other on a listener of
-- their own (the internal listener, its own port and its own credential), never on the public
-- port clients and HAProxy reach. Each live process publishes where that listener is beside
-- its public URL; a lease's owner is joined to its member row to find it. NULL: a process that
-- has no internal listener (started before this migration): no leg is sent to it.
ALTER TABLE walletd_members ADD COLUMN internal_url text;
