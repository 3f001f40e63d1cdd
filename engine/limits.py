"""Every bound of the engine, declared once, with the relations between them asserted.

Each limit has a defined behaviour when hit:
- ``mailbox_commands_max``: a command past it is refused at once with ``OVERLOADED`` (503).
  The default (1024) is about 0.3 s of work at this machine's ~3,500 operations/s: a
  queue much longer only makes accepted requests wait seconds under overload (measured in
  docs/BENCHMARKS.md, "Memory and overload").
- ``batch_ops_max``: a shard drains at most this many commands into one commit.
- ``resident_wallets_max``: past it, clean idle wallets are evicted (passivation); dirty ones
  stay until their batch commits, so the overshoot is at most two batches.
- ``idempotency_keys_max``: the in-memory key cache forgets its oldest entries; PostgreSQL
  remains the authority, so a forgotten key costs one lookup, never a double apply. Each
  shard's share holds at least two batches, so a key is never forgotten before it commits.
- ``bulk_items_max``: the most operations one bulk request holds (None: 1,000, or the
  mailbox bound when smaller). A request is admitted whole, so it must fit an empty
  mailbox. Its operations travel as groups of at most ``batch_ops_max`` (one command each,
  never split), so batches stay within ``batch_ops_max``; an atomic request is one group,
  so it holds at most ``batch_ops_max`` operations: one batch, one transaction. At most
  10^6: derived item keys leave room for six index digits (http/bulk.py).
- ``bulk_admission_wait_s`` / ``bulk_waiting_max``: a bulk request whose items do not all
  fit the mailboxes now waits for room, first come first served, at most this long and
  with at most this many others; past either it is refused whole with ``OVERLOADED``.
- ``commit_timeout_s`` / ``load_timeout_s``: a storage call past it is failed as outcome-unknown
  (503 ``UNAVAILABLE``) and the shard re-reads the wallets it touched.
- ``shard_restarts_max`` per ``shard_restart_window_s``: a shard whose loop crashed (a broken
  invariant) is restarted from storage, its memory dropped; one more crash within the window
  and the engine gives up: it stops accepting work (``/readyz`` fails) and asks the process
  to exit non-zero, so its own supervisor restarts it.
- ``transfer_redrive_interval_s``: a PENDING transfer (debited, not yet credited or
  refunded) that no request is driving is driven again once it is this old, and the loop
  looks for such transfers this often; so money stays in flight about this long at most
  after a 503 or a restart, while the owners answer.
- ``transfer_redrive_batch_max``: at most this many PENDING transfers are driven again at
  once (and never more than one mailbox holds); the rest wait for the next pass, which
  goes on after the last one chosen (engine/transfers.py, ``TransferCoordinator.redrive``).
- ``payment_postings_max``: a payment has at most this many postings (422 past it); each
  of its phases sends that many legs at once, so it also bounds what one payment puts in
  the owners' mailboxes and how many payments a re-drive pass takes (its batch divided by
  it).
- ``holds_per_wallet_max``: a wallet has at most this many PENDING holds; one more is
  refused with 409 ``TOO_MANY_HOLDS`` (nothing written). It bounds what loading a wallet
  reads and keeps in memory with it.
- ``hold_expires_in_s_default`` / ``hold_expires_in_s_max``: a hold without ``expires_in_s``
  expires after the default; a longer one than the max is refused with 422.
- ``hold_sweep_interval_s`` / ``hold_sweep_batch_max``: the sweep looks for PENDING holds
  past their expires_at this often and releases at most this many per pass (a full pass
  is followed by another at once). So an expired hold's money is back in ``available``
  within one interval plus a commit, while at most a batch expires per interval. A capture
  or void after expires_at is refused whether or not the sweep has run.
- ``refusal_isolation_commits_max``: when storage refuses a batch for what it holds (a
  constraint the ledger could not foresee: ``StorageRefused``), the shard re-applies its
  commands (and those of the batches that rested on it) in halves, one commit at a time,
  until each refused command stands alone and is answered alone (engine/shard.py). Per
  refused batch at most this many commits; past it, every command not answered yet is
  answered 503 ``UNAVAILABLE`` (nothing of it was applied). One offender among n commands
  needs about 2 * log2(n) commits (20 for a full batch of 1,024).
- ``transfer_leg_tries_max``: a transfer leg that no process takes for sure (its shard has
  no live owner, the owner cannot be connected to, or it lost the shard: nothing applied)
  is tried again after the next read of the ownership table, this many times in all; then
  the request answers 503 (a debit: ``NOT_OWNER``, nothing applied; a credit or refund:
  the transfer stays PENDING, visible, for the re-drive).
- ``currency_cache_wallets_max``: wallet currencies a transfer coordinator remembers (a
  currency never changes, so an entry is never stale; ~150 bytes each); past it the least
  recently used is forgotten and read again at its owner when next needed.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineLimits"]

# ``pipelines`` is the number of actor loops (``Shard`` objects, each with its mailbox and
# commit pipeline) in one process; the cluster's shards (units of ownership and routing,
# engine/ownership.py) are spread over them by ``shard % pipelines``. The per-shard bounds
# below are per pipeline.


@dataclass(frozen=True, slots=True)
class EngineLimits:
    pipelines: int = 1
    mailbox_commands_max: int = 1024
    # A whole bulk request (1,000 items by default) fits one batch: one commit, one fence,
    # one key lookup instead of four at 256 (+21% bulk operations/s: docs/BENCHMARKS.md,
    # "A bulk request, one commit").
    batch_ops_max: int = 1024
    inflight_batches_max: int = 2
    resident_wallets_max: int = 1_000_000
    idempotency_keys_max: int = 100_000
    commit_timeout_s: float = 5.0
    load_timeout_s: float = 5.0
    bulk_items_max: int | None = None
    bulk_admission_wait_s: float = 1.0
    bulk_waiting_max: int = 16
    shard_restarts_max: int = 3
    shard_restart_window_s: float = 60.0
    transfer_redrive_interval_s: float = 2.0
    transfer_redrive_batch_max: int = 256
    payment_postings_max: int = 16
    holds_per_wallet_max: int = 100
    hold_expires_in_s_default: int = 86_400
    hold_expires_in_s_max: int = 30 * 86_400
    hold_sweep_interval_s: float = 1.0
    hold_sweep_batch_max: int = 256
    transfer_leg_tries_max: int = 3
    refusal_isolation_commits_max: int = 64
    currency_cache_wallets_max: int = 65_536

    def __post_init__(self) -> None:
        if not 1 <= self.pipelines <= 1024:
            raise ValueError("pipelines must be within 1..1024")
        if self.batch_ops_max < 1:
            raise ValueError("batch_ops_max must be at least 1")
        if not 1 <= self.inflight_batches_max <= 16:
            raise ValueError("inflight_batches_max must be within 1..16")
        if self.mailbox_commands_max < self.batch_ops_max:
            raise ValueError(
                f"mailbox_commands_max = {self.mailbox_commands_max} must hold at least one"
                f" full batch: lower batch_ops_max = {self.batch_ops_max} with it"
            )
        if self.resident_wallets_max < self.pipelines:
            raise ValueError("resident_wallets_max must allow one wallet per pipeline")
        if not 1 <= self.bulk_ops_max <= min(self.mailbox_commands_max, 10**6):
            raise ValueError("bulk_items_max must be within 1..mailbox_commands_max (a bulk "
                             "request must fit an empty mailbox)")  # fmt: skip
        if (
            self.idempotency_keys_per_shard_max
            < (self.inflight_batches_max + 1) * self.batch_ops_max
        ):
            raise ValueError(
                "idempotency_keys_max must hold every open batch of each shard "
                "(inflight_batches_max + 1 batches)"
            )
        if not 0 <= self.bulk_admission_wait_s <= 60 or not 1 <= self.bulk_waiting_max <= 1024:
            raise ValueError("bulk_admission_wait_s must be 0..60 and bulk_waiting_max 1..1024")
        if self.commit_timeout_s <= 0 or self.load_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.shard_restarts_max < 0 or self.shard_restart_window_s <= 0:
            raise ValueError(
                "shard_restarts_max must be at least 0 and shard_restart_window_s positive"
            )
        if self.transfer_redrive_interval_s <= 0:
            raise ValueError("transfer_redrive_interval_s must be positive")
        if self.transfer_redrive_batch_max < 1:
            raise ValueError("transfer_redrive_batch_max must be at least 1")
        if not 1 <= self.payment_postings_max <= 256:
            raise ValueError("payment_postings_max must be within 1..256")
        if not 1 <= self.holds_per_wallet_max <= 10_000:
            raise ValueError("holds_per_wallet_max must be within 1..10000")
        if not 1 <= self.hold_expires_in_s_default <= self.hold_expires_in_s_max <= 10**8:
            raise ValueError(
                "hold expiry: 1 <= hold_expires_in_s_default <= hold_expires_in_s_max <= 1e8"
            )
        if self.hold_sweep_interval_s <= 0 or self.hold_sweep_batch_max < 1:
            raise ValueError(
                "hold_sweep_interval_s must be positive and hold_sweep_batch_max at least 1"
            )
        if not 1 <= self.transfer_leg_tries_max <= 100:
            raise ValueError("transfer_leg_tries_max must be within 1..100")
        if not 1 <= self.refusal_isolation_commits_max <= 10_000:
            raise ValueError("refusal_isolation_commits_max must be within 1..10000")
        if not 1 <= self.currency_cache_wallets_max <= 10_000_000:
            raise ValueError("currency_cache_wallets_max must be within 1..10000000")

    @property
    def bulk_ops_max(self) -> int:
        """The effective ``bulk_items_max``."""
        if self.bulk_items_max is not None:
            return self.bulk_items_max
        return min(1000, self.mailbox_commands_max)

    @property
    def resident_wallets_per_shard_max(self) -> int:
        return max(1, self.resident_wallets_max // self.pipelines)

    @property
    def idempotency_keys_per_shard_max(self) -> int:
        return self.idempotency_keys_max // self.pipelines
