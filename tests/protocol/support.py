"""Deterministic keys and a fixed clock for the protocol tests."""

from __future__ import annotations

from datetime import UTC, datetime

from msp_protocol.keys import SigningKey

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
APPLIANCE = "appliance-1"
SITE = "site-clinic-1"


def key(n: int) -> SigningKey:
    """A deterministic key: seed = n repeated."""
    return SigningKey(bytes([n]) * 32)
