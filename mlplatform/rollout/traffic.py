"""Which version answers a flight: a stable share of flights goes to the canary.

A flight's place in [0, 1) is fixed by its id (the first 8 bytes of the SHA-256 of
``flight_id``), so the same flight always gets the same model, whichever server process or
restart answers it, and raising the share from 10% to 20% keeps the first 10% where they were.
"""

from __future__ import annotations

import hashlib

DEFAULT_CANARY_SHARE = 0.10


def place(flight_id: str) -> float:
    """The flight's place in [0, 1), uniform over flight ids and the same everywhere."""
    digest = hashlib.sha256(flight_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def to_canary(flight_id: str, share: float) -> bool:
    """Whether the canary answers this flight when it gets ``share`` of the traffic."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the canary share must be within 0..1, not {share}")
    return place(flight_id) < share
