"""One way to derive every seed from the run's base seed, so that no two streams (eval questions, train questions,
rollouts, minibatch order, teacher samples) share a seed by accident."""
from __future__ import annotations

import hashlib

SEED_BITS = 31  # some generators (numpy's legacy seeding, used by reasoning-gym tasks) take at most 32 bits


def derive_seed(base: int, *parts: object) -> int:
    """A seed in [0, 2**31) that is a pure function of the base seed and the named parts, e.g.
    derive_seed(seed, "rollout", 12). Different parts give unrelated seeds, so reasoning-gym's `Random(seed + i)`
    item ranges of different streams are as far apart as random 31-bit numbers."""
    key = repr((int(base),) + tuple(parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> (64 - SEED_BITS)
