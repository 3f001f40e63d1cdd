"""Webhook subscriptions: what a subscription is, and the storage port the HTTP edge's
sender and routes use (persistence/webhooks.py is the PostgreSQL recorder).

A subscription's cursor is the feed position of the last event it has taken (delivered
with a 2xx, or passed over as a type it does not want). Its lease says which process
delivers it: every cursor move is fenced by the lease (``advance`` answers False to a
process whose lease has lapsed), so a deliverer that lost its lease cannot move the cursor
another one owns.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Final
from uuid import UUID

from walletd.engine.log_reads import FeedPosition

__all__ = [
    "EVENT_TYPES",
    "Claim",
    "Delivery",
    "Subscription",
    "WebhookStore",
]

# The change feed's event types (persistence/log_reads.py FEED_SOURCES): what a subscription
# may ask for.
EVENT_TYPES: Final = (
    "wallet.created",
    "operation.applied",
    "wallet.updated",
    "payment.created",
    "payment.decided",
)


@dataclass(frozen=True, slots=True)
class Subscription:
    id: UUID
    url: str
    event_types: tuple[str, ...]
    enabled: bool
    created_at_us: int
    updated_at_us: int
    position: FeedPosition
    # Set when an event stayed undelivered for the whole retry period: no more deliveries
    # until the subscription is enabled again (PATCH {"enabled": true}).
    failing_since_us: int | None


@dataclass(frozen=True, slots=True)
class Claim:
    """A subscription this process delivers now: where to, with what, from where."""

    id: UUID
    url: str
    event_types: frozenset[str]
    # Repr-free: a logged claim must not carry the signing secret.
    secret: str
    position: FeedPosition

    def __repr__(self) -> str:
        return f"Claim(id={self.id}, url={self.url!r}, position={self.position})"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One attempt: the event it carried, and what the endpoint answered."""

    id: int
    webhook_id: UUID
    position: FeedPosition
    event_type: str
    attempted_at_us: int
    status: int | None  # None: no answer (``error`` says why)
    error: str | None
    duration_ms: int
    redelivery: bool

    @property
    def succeeded(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class WebhookStore(abc.ABC):
    """Subscriptions, their cursors and leases, and the attempts log.

    Contract:
    - ``create`` starts the cursor at ``position``, or, when None, after every event
      committed so far (the subscription sees what happens from now on).
    - ``claim`` renews this owner's leases and takes expired ones, of enabled subscriptions
      that are not failing, up to ``limit`` in all; it returns every lease the owner holds.
    - ``advance`` moves the cursor forward and ends the retrying state, only while the
      owner's lease is live; False otherwise (the caller stops delivering).
    - ``retrying`` starts the retry clock of the event at the cursor when not running, and
      returns its age in seconds (None: the lease is lost).
    - ``record`` appends an attempt and keeps only the newest ``keep`` of the subscription.
    - ``update`` with ``enabled=True`` clears the failing state (the cursor is kept).
    """

    @abc.abstractmethod
    async def create(
        self,
        subscription_id: UUID,
        url: str,
        event_types: tuple[str, ...],
        enabled: bool,
        secret: str,
        position: FeedPosition | None,
        count_max: int,
    ) -> Subscription | None:
        """The new subscription, or None when ``count_max`` exist already."""  # fmt: skip

    @abc.abstractmethod
    async def list_all(self, limit: int) -> list[Subscription]: ...

    @abc.abstractmethod
    async def get(self, subscription_id: UUID) -> Subscription | None: ...

    @abc.abstractmethod
    async def update(
        self, subscription_id: UUID, url: str | None, event_types: tuple[str, ...] | None,
        enabled: bool | None,
    ) -> Subscription | None: ...  # fmt: skip

    @abc.abstractmethod
    async def delete(self, subscription_id: UUID) -> bool: ...

    @abc.abstractmethod
    async def secret(self, subscription_id: UUID) -> str | None: ...

    @abc.abstractmethod
    async def claim(self, owner: str, ttl_s: float, limit: int) -> list[Claim]: ...

    @abc.abstractmethod
    async def release(self, owner: str) -> None: ...

    @abc.abstractmethod
    async def advance(self, subscription_id: UUID, owner: str, position: FeedPosition) -> bool: ...

    @abc.abstractmethod
    async def retrying(self, subscription_id: UUID, owner: str) -> float | None: ...

    @abc.abstractmethod
    async def mark_failing(self, subscription_id: UUID, owner: str) -> None: ...

    @abc.abstractmethod
    async def record(
        self, subscription_id: UUID, position: FeedPosition, event_type: str,
        status: int | None, error: str | None, duration_ms: int, redelivery: bool, keep: int,
    ) -> Delivery: ...  # fmt: skip

    @abc.abstractmethod
    async def deliveries(self, subscription_id: UUID, limit: int) -> list[Delivery]: ...

    @abc.abstractmethod
    async def delivery(self, subscription_id: UUID, delivery_id: int) -> Delivery | None: ...

    @abc.abstractmethod
    async def failing_count(self) -> int: ...
