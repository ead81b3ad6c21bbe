"""Counter-based noise: Philox4x32-10 and Box-Muller normals (the reference).

Every noise value growkern draws is a pure function of (seed, stream, row,
column), so the stream is independent of launch shape, thread count and
chunking, and every backend can reproduce it bit for bit:

    key     = (seed, stream)             two 32-bit words
    counter = (row, column, 0, 0)        four 32-bit words
    x0, x1, _, _ = Philox4x32-10(counter, key)
    u1 = (x0 + 1) * 2**-32               in (0, 1], so log(u1) is finite
    u2 = x1 * 2**-32                     in [0, 1)
    z  = sqrt(-2 log u1) * cos(2 pi u2)

Philox4x32-10 is Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"
(SC'11); the known-answer vectors in tests/test_philox.py are Random123's.
"""
from __future__ import annotations

import numpy as np

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF
TWO_POW_MINUS_32 = 2.0 ** -32


def philox4x32(counter, key, rounds: int = 10):
    """Philox4x32 on arrays: counter is 4 uint32 arrays (broadcastable), key 2 uint32 scalars/arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & MASK32 for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) & MASK32 for k in key)
    for i in range(rounds):
        if i:
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
        p0 = c0 * np.uint64(M0)  # < 2**64: exact in uint64
        p1 = c2 * np.uint64(M1)
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def check_key(seed: int, stream: int) -> None:
    for name, v in (("seed", seed), ("stream", stream)):
        if not (isinstance(v, (int, np.integer)) and 0 <= int(v) <= MASK32):
            raise ValueError(f"{name} must be an int in [0, 2**32), got {v!r}")


def normal(seed: int, stream: int, rows, cols) -> np.ndarray:
    """Standard normals N(seed, stream, row, col) in float64, broadcasting rows against cols."""
    check_key(seed, stream)
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if (rows < 0).any() or (cols < 0).any():
        raise ValueError("noise counters (row, column) must be >= 0")
    x0, x1, _, _ = philox4x32((rows, cols, 0, 0), (seed, stream))
    u1 = (x0.astype(np.float64) + 1.0) * TWO_POW_MINUS_32
    u2 = x1.astype(np.float64) * TWO_POW_MINUS_32
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
