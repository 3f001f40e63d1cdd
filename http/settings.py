"""Settings of the HTTP edge (the CLI fills them from flags and the environment)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HttpSettings"]


@dataclass(frozen=True, slots=True)
class HttpSettings:
    body_bytes_max: int = 64 * 1024
    body_read_timeout_s: float = 10.0
    bulk_body_bytes_max: int = 1024 * 1024
    history_limit_default: int = 50
    history_limit_max: int = 500
    api_keys: tuple[str, ...] = ()
    access_log: bool = False

    def __post_init__(self) -> None:
        if self.body_bytes_max < 1024:
            raise ValueError("body_bytes_max must be at least 1024")
        if not self.body_read_timeout_s > 0:
            raise ValueError("body_read_timeout_s must be greater than 0")
        if self.bulk_body_bytes_max < self.body_bytes_max:
            raise ValueError("bulk_body_bytes_max must be at least body_bytes_max")
        if not 1 <= self.history_limit_default <= self.history_limit_max:
            raise ValueError("history_limit_default must be within 1..history_limit_max")
