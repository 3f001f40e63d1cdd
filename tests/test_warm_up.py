"""Warm-up at start, through the real wiring: the newest wallets are resident at once."""

from __future__ import annotations

import argparse
import uuid

import asyncpg

from walletd.cli.config import load_config
from walletd.cli.service import running_services


async def test_serve_warms_the_most_recently_updated_wallets(database_url: str) -> None:
    """With WALLETD_WARM_WALLETS=2, the two most recently updated wallets are resident
    before the first request, and the older one is not."""
    ids = [uuid.uuid4() for _ in range(3)]
    connection = await asyncpg.connect(database_url)
    try:
        for age_minutes, wallet_id in zip((30, 20, 10), ids, strict=True):
            await connection.execute(
                "INSERT INTO wallets (id, created_at, updated_at) "
                "VALUES ($1, now() - $2 * interval '1 minute', now() - $2 * interval '1 minute')",
                wallet_id,
                age_minutes,
            )
    finally:
        await connection.close()
    config = load_config(
        argparse.Namespace(),
        {"WALLETD_DATABASE_URL": database_url, "WALLETD_WARM_WALLETS": "2"},
    )
    async with running_services(config) as services:
        engine = services.engine
        assert engine.resident_wallets() == 2
        assert engine.read_resident(ids[0]) is None  # the oldest
        assert engine.read_resident(ids[1]) is not None
        assert engine.read_resident(ids[2]) is not None
