"""Counter-based random masks: the bits of element i depend only on (genome_hash, tensor name, i).

docs/method.md ("Masks") fixes the generator: seed = first 8 bytes (big-endian) of sha256(genome_hash + ":" +
name); for flat index i, z = splitmix64 finaliser of seed + (i + 1) * 0x9E3779B97F4A7C15. The top 24 bits drive
the mother's mask, bits 16..39 the father's. Any chunking, thread split or device draws the same bits, so a merge
is byte-identical on any worker in any order.

torch has no unsigned 64-bit arithmetic, but int64 multiply and add wrap modulo 2^64 like uint64 does; only the
right shifts differ (arithmetic), so they are masked back to logical shifts. On CPU the C kernel draws the same bits
(darwin/_kernels.c); torch is imported only where these torch forms run.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
U24 = 1 << 24
# CPU chunks: below torch's parallel grain (32768), so a chunk's ops never fork OpenMP threads (chunks run in parallel
# instead), and small enough that the int64 temporaries stay in cache (4M-element chunks run about 7x slower).
CHUNK = 32_000
# CUDA chunks: large, so kernel launches do not dominate.
CUDA_CHUNK = 1 << 22


def _signed(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def tensor_seed(genome_hash: str, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{genome_hash}:{name}".encode()).digest()[:8], "big")


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix(seed: int, start: int, stop: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The raw 64-bit outputs (as int64) for flat indices [start, stop)."""
    import torch

    z = torch.arange(start + 1, stop + 1, dtype=torch.int64, device=device)
    z.mul_(_signed(GOLDEN)).add_(_signed(seed))
    z.bitwise_xor_(_shr(z, 30)).mul_(_signed(MIX1))
    z.bitwise_xor_(_shr(z, 27)).mul_(_signed(MIX2))
    z.bitwise_xor_(_shr(z, 31))
    return z


def threshold(density: float) -> int:
    """u < density with u = k / 2^24 holds exactly when the integer k < ceil(density * 2^24)."""
    return math.ceil(density * U24)


def keep_masks(seed: int, start: int, stop: int, density_a: float | None, density_b: float,
               device: str | torch.device = "cpu") -> tuple[torch.Tensor | None, torch.Tensor]:
    """(father keep mask or None, mother keep mask) for flat indices [start, stop)."""
    z = splitmix(seed, start, stop, device)
    keep_b = _shr(z, 40) < threshold(density_b)
    keep_a = ((z >> 16) & (U24 - 1)) < threshold(density_a) if density_a is not None else None
    return keep_a, keep_b


def uniforms(seed: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_a, u_b) as float64 in [0, 1): for tests and inspection, not the merge's hot path."""
    z = splitmix(seed, 0, numel)
    return ((z >> 16) & (U24 - 1)).double() / U24, _shr(z, 40).double() / U24
