"""A random stream whose bits are fixed: the same numbers on every machine and every NumPy version.

``np.random.default_rng``'s methods (``standard_normal``, ``random``, ``integers``) may change
their algorithms between NumPy releases; only the bit generator underneath is promised. The
kernel-scale cases are generated where they run, on the user's NumPy, and must give the inputs
their manifest's digest names, so they draw from this stream instead: SplitMix64 (Steele, Lea and
Flood; the seeding generator of xoshiro) on a counter, in unsigned 64-bit integer arithmetic,
turned into floats by exact operations only:

* ``random``: the top 53 bits over ``2**53``, exactly, in [0, 1);
* ``standard_normal``: ``sqrt(3) * (u1 + u2 + u3 + u4 - 2)``, the Irwin-Hall sum of four
  uniforms: mean 0, variance 1, bell-shaped, within +-2 sqrt(3); IEEE sums and one product, no
  libm (a Box-Muller transform would need log and cos, which differ between machines);
* ``integers``: the 64-bit value modulo the range (a bias below 2**-40 for the ranges used).

Each call consumes as many counter values as numbers it returns (four per normal), in order.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SQRT3 = 1.7320508075688772  # the float64 nearest sqrt(3)


def seed_of(name: str) -> int:
    """A stable 64-bit seed from a name (the first 8 bytes of its sha256, little-endian)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def splitmix64(seed: int, start: int, count: int) -> np.ndarray:
    """The SplitMix64 outputs ``start`` to ``start + count - 1`` of the stream seeded ``seed``."""
    with np.errstate(over="ignore"):
        index = np.arange(start + 1, start + count + 1, dtype=np.uint64)
        z = np.uint64(seed % 2**64) + index * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


class FixedStream:
    """The stream as a generator: the subset of ``np.random.Generator`` the generator uses."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.drawn = 0

    def _bits(self, count: int) -> np.ndarray:
        bits = splitmix64(self.seed, self.drawn, count)
        self.drawn += count
        return bits

    def random(self, shape: int | tuple[int, ...] = ()) -> np.ndarray:
        """Uniform float64 in [0, 1): the top 53 bits of each value over 2**53 (exact)."""
        n = int(np.prod(shape, dtype=np.int64))
        return ((self._bits(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53).reshape(shape)

    def standard_normal(self, shape: int | tuple[int, ...] = ()) -> np.ndarray:
        """Mean 0, variance 1: ``sqrt(3) * (u1 + u2 + u3 + u4 - 2)`` of four uniforms, summed in order."""
        n = int(np.prod(shape, dtype=np.int64))
        u = self.random((n, 4))
        total = ((u[:, 0] + u[:, 1]) + u[:, 2]) + u[:, 3]
        return (_SQRT3 * (total - 2.0)).reshape(shape)

    def integers(self, low: int, high: int, size: int | tuple[int, ...] = ()) -> np.ndarray:
        """Integers in [low, high): each 64-bit value modulo the range, plus ``low``."""
        n = int(np.prod(size, dtype=np.int64))
        return (low + (self._bits(n) % np.uint64(high - low)).astype(np.int64)).reshape(size)
