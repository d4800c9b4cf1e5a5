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


@functools.lru_cache(maxsize=None)
def hadamard_pm1(n: int) -> torch.Tensor:
    """H_n * sqrt(n), i.e. its +-1 entries, float64 on the CPU (made once per size)."""
    return torch.sign(_hadamard_cpu(n))


def rht(a: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of `a` in n-chunks: (a * sigma) @ H_n, n = len(signs), as FP32.

    On the CPU the result is RN_fp32(sum of the +-sigma*a terms) * RN_fp32(n^-1/2): the sum is taken
    in FP64 and rounded once, which is what the kernels compute under the interpreter (dot_pm1, then
    the same FP32 scaling). An FP32 matmul would not do: its summation order is the BLAS's, and
    OpenBLAS (numpy, under the interpreter) and MKL (torch) pick different sgemm kernels on different
    CPUs, so kernel and twin would differ by an ulp on some machines and agree on others. The FP64
    sum of n FP32 terms is exact, hence order-free, while the terms lie within 2^(29 - log2 n) of
    the largest one (beyond that it differs from the exact sum by less than 2^-29 of it); a zero sum is
    +0. On a GPU:
    an FP32 matmul with H's entries +-RN_fp32(n^-1/2) (TF32 as the caller has set it)."""
    n = signs.numel()
    if a.shape[-1] % n:
        raise ValueError(f"RHT-{n} needs the rotated dim ({a.shape[-1]}) to be a multiple of {n}")
    sigma = signs.to(a.device, torch.float32)
    if a.device.type == "cpu":
        chunks = a.double().reshape(*a.shape[:-1], a.shape[-1] // n, n) * sigma.double()
        sums = (chunks @ hadamard_pm1(n)).float() + 0.0   # + 0: an all-zero chunk gives +0 whatever the BLAS
        return (sums * torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32)).reshape(a.shape)
    # contiguous first: the same values then always take the same BLAS path (bitwise reproducible
    # whether the operand arrived transposed, padded or sliced)
    chunks = a.float().contiguous().reshape(*a.shape[:-1], a.shape[-1] // n, n) * sigma
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
