"""Randomized Hadamard transforms (numerics.md §4): rht(a) = H_n (sigma * a) per n-chunk.

Signs are applied on the input side, before H: applying them after H would leave the magnitudes the
quantizer sees equal to those of a fixed transform. Both operands of one GEMM are rotated along their
shared inner dimension with the same sigma, so (A D H)(B D H)^T = A B^T and no inverse is needed.
"""
from __future__ import annotations

import functools
import math

import torch

SUPPORTED_SIZES = (16, 32, 128)


def _sylvester(n: int, device=None) -> torch.Tensor:
    """H_n in float64 on `device` by Sylvester's construction (natural order), built there."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


@functools.lru_cache(maxsize=None)
def _hadamard_cpu(n: int) -> torch.Tensor:
    return _sylvester(n)


_ON_DEVICE: dict = {}


def hadamard_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Orthonormal, symmetric Sylvester Hadamard matrix H_n. On a GPU it is kept per (n, dtype, device)
    once made outside a CUDA-graph capture; inside one (where a host-to-device copy is not allowed) it
    is built on the device by the same Sylvester steps (the same values: +-1 / sqrt(n), exact)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return _hadamard_cpu(n).to(dtype=dtype, device=device)
    key = (n, dtype, str(device))
    cached = _ON_DEVICE.get(key)
    if cached is not None:
        return cached
    if torch.cuda.is_current_stream_capturing():
        return _sylvester(n, device).to(dtype)
    h = _ON_DEVICE[key] = _hadamard_cpu(n).to(dtype=dtype, device=device)
    return h


def rht(a: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of `a` in n-chunks: (a * sigma) @ H_n, n = len(signs), in float32."""
    n = signs.numel()
    if a.shape[-1] % n:
        raise ValueError(f"RHT-{n} needs the rotated dim ({a.shape[-1]}) to be a multiple of {n}")
    # contiguous first: the same values then always take the same BLAS path (bitwise reproducible
    # whether the operand arrived transposed, padded or sliced)
    chunks = a.float().contiguous().reshape(*a.shape[:-1], a.shape[-1] // n, n) * signs.to(a.device, torch.float32)
    rotated = chunks @ hadamard_matrix(n, torch.float32, a.device)
    return rotated.reshape(a.shape)


def inverse_rht(a: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Inverse of rht: (a @ H_n) * sigma (H is symmetric and orthonormal)."""
    n = signs.numel()
    if a.shape[-1] % n:
        raise ValueError(f"RHT-{n} needs the rotated dim ({a.shape[-1]}) to be a multiple of {n}")
    chunks = a.float().reshape(*a.shape[:-1], a.shape[-1] // n, n)
    restored = (chunks @ hadamard_matrix(n, torch.float32, a.device)) * signs.to(a.device, torch.float32)
    return restored.reshape(a.shape)
