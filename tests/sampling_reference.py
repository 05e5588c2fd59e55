"""A pure-Python reference of the sampling draw (sampling.cu's formulas, in Python integers and
numpy float32 arithmetic), for tests/test_sampler.py (CPU) and tests/cuda/test_sampling.py (GPU)."""

import math

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15

# (stream key, position) pairs: zero, +-1, the int64 extremes, bit patterns, large positions.
KEYS = [0, 1, -1, 2**63 - 1, -(2**63), 0x0123456789ABCDEF, -0x5A5A5A5A5A5A5A5B, 1234567]
POSITIONS = [0, 1, 2, 17, 1000, 2**31 - 1, 2**40 + 3]
TABLE = [(k, p) for k in KEYS for p in POSITIONS]


def splitmix64(z: int) -> int:
    """One step of splitmix64 (Steele, Lea & Flood 2014; Vigna's splitmix64.c), on 64-bit unsigned z."""
    z = (z + GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def bits(key: int, position: int, i: int) -> int:
    """The 23 random bits behind token i of a draw: sampling.cu's `h >> 41`."""
    row_key = splitmix64((key & MASK64) ^ splitmix64(position & MASK64))
    return splitmix64((row_key + i * GOLDEN) & MASK64) >> 41


def offset(b: int) -> float:
    """c = logf(-logf(u)) for u = (b + 0.5) / 2^23, each log rounded to float32."""
    u = (b + 0.5) / 2**23
    return float(np.float32(math.log(-float(np.float32(math.log(u))))))


def draw(logits: list[float], key: int, position: int, temperature: float, keep=None) -> tuple[int, float]:
    """(token, score): argmax over the kept tokens of x_i - c_i in float32, x = (logit - max) / T,
    the lowest index on ties."""
    lg = np.asarray(logits, dtype=np.float32)
    x = (lg - lg.max()) / np.float32(temperature)
    best, best_i = -math.inf, -1
    for i, xi in enumerate(x):
        if keep is not None and not keep[i]:
            continue
        s = float(np.float32(xi) - np.float32(offset(bits(key, position, i))))
        if s > best:
            best, best_i = s, i
    return best_i, best
