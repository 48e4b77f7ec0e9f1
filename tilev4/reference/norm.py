"""RMSNorm and the Hadamard rotation, in fp32."""

from __future__ import annotations

import functools
import math

import torch

from tilev4._checks import check_tensor

__all__ = ["hadamard_matrix", "hadamard_rotate", "rmsnorm"]

RMS_EPS = 1e-6


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = RMS_EPS) -> torch.Tensor:
    """``x * rsqrt(mean(x², -1) + eps) * weight`` along the last dim, in fp32.

    x: [..., D] any float dtype; weight: [D] or ``None`` (no weight, as for the per-head query norm).
    Returns fp32 [..., D].
    """
    check_tensor("x", x, dtype=(torch.float32, torch.bfloat16, torch.float16))
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        check_tensor("weight", weight, shape=(x.shape[-1],))
        y = y * weight.float()
    return y


@functools.lru_cache(maxsize=8)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int) -> torch.Tensor:
    """The Sylvester-ordered Hadamard matrix of size ``n`` (a power of two), fp32, entries ±1."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of two, got {n}")
    return _sylvester(n).clone()


@functools.lru_cache(maxsize=16)
def _hadamard_on(n: int, device: torch.device) -> torch.Tensor:
    """:func:`hadamard_matrix` on ``device``, made once (a CUDA graph being recorded cannot copy it there)."""
    return hadamard_matrix(n).to(device)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_n * n^-1/2`` along the last dim (n a power of two); fp32 out. H is symmetric."""
    check_tensor("x", x, dtype=(torch.float32, torch.bfloat16, torch.float16))
    n = x.shape[-1]
    h = _hadamard_on(n, x.device)
    return (x.float() @ h) * (1.0 / math.sqrt(n))
