"""Deterministic random streams: every draw of the phantom comes from (seed, a kind, a key).

A patient, a study or an image has its own `np.random.Generator`, so a table, an image or a report
is the same whatever else was generated before it, in whatever order or process.
"""

from __future__ import annotations

import hashlib

import numpy as np


def stable_int_hash(key) -> int:
    """A 63-bit integer from a string key, the same in every process and Python version."""
    return int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "little") >> 1


def rng(seed: int, kind: str, key: str, *more: int) -> np.random.Generator:
    """The generator of one (kind, key) stream, e.g. ("patient", "p00012") or ("image", image_id)."""
    return np.random.default_rng([int(seed), stable_int_hash(f"{kind}:{key}"), *map(int, more)])
