"""Settings of the HTTP edge (the CLI fills them from flags and the environment)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HttpSettings"]


@dataclass(frozen=True, slots=True)
class HttpSettings:
    body_bytes_max: int = 64 * 1024
    history_limit_default: int = 50
    history_limit_max: int = 500
    api_keys: tuple[str, ...] = ()
    access_log: bool = False
    forward_timeout_s: float = 10.0
    forward_connections_max: int = 64

    def __post_init__(self) -> None:
        if self.body_bytes_max < 1024:
            raise ValueError("body_bytes_max must be at least 1024")
        if not 1 <= self.history_limit_default <= self.history_limit_max:
            raise ValueError("history_limit_default must be within 1..history_limit_max")
        if self.forward_timeout_s <= 0 or self.forward_connections_max < 1:
            raise ValueError("forwarding needs a positive timeout and at least one connection")
