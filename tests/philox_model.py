"""An independent model of the projection spec (docs/design.md) in Python ints and NumPy float32.

Deliberately written apart from vera_kernels.projection: the tests compare the
two, so they must not share code.
"""

import math

import numpy as np

MASK = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Random123's Philox4x32-10 on Python ints: four 32-bit words."""
    c = list(counter)
    k0, k1 = key
    for rnd in range(10):
        if rnd > 0:
            k0 = (k0 + 0x9E3779B9) & MASK
            k1 = (k1 + 0xBB67AE85) & MASK
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c[3] ^ k1) & MASK, p0 & MASK]
    return c


KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK,) * 4, (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def spec_matrix(matrix: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """The spec's float32 matrix, one Philox call per element (slow; keep shapes small)."""
    m = {"A": 0, "B": 1}[matrix]
    key = (seed & MASK, seed >> 32)
    bound = np.float32(math.sqrt(6.0 / cols))
    out = np.empty((rows, cols), dtype=np.float32)
    for i in range(rows):
        for j in range(cols):
            w = philox4x32_10((j >> 2, i, m, 0), key)[j & 3]
            v = np.float32(w >> 8) * np.float32(2.0**-23) - np.float32(1.0)
            out[i, j] = np.float32(v * bound)
    return out
