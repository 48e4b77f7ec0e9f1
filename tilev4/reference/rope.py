"""Interleaved rotary embedding on the LAST ``rope_dim`` dims, with optional YaRN.

Pairs ``(x[2i], x[2i+1])`` of the rope slice form complex numbers rotated by
``pos * freq[i]``; the inverse rotation (used on the attention output) is the conjugate.
V4 uses theta 10000 without YaRN for sliding-window layers and theta 160000 with YaRN
(factor 16, original length 65536, beta_fast 32, beta_slow 1) for compressed layers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from tilev4._checks import check_tensor

__all__ = ["RopeConfig", "apply_rope", "rope_frequencies"]


@dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters. ``yarn_factor`` of 1 disables YaRN."""

    rope_dim: int = 64
    theta: float = 10000.0
    yarn_factor: float = 1.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self) -> None:
        if self.rope_dim <= 0 or self.rope_dim % 2:
            raise ValueError(f"rope_dim must be a positive even number, got {self.rope_dim}")
        if self.theta <= 1:
            raise ValueError(f"theta must be > 1, got {self.theta}")
        if self.yarn_factor < 1:
            raise ValueError(f"yarn_factor must be >= 1, got {self.yarn_factor}")

    @classmethod
    def window(cls) -> RopeConfig:
        """Sliding-window (ratio 0) layers."""
        return cls(theta=10000.0)

    @classmethod
    def compressed(cls) -> RopeConfig:
        """CSA / HCA layers (and their compressors and indexer)."""
        return cls(theta=160000.0, yarn_factor=16.0)


def _correction_dim(num_rotations: float, dim: int, base: float, max_len: int) -> float:
    return dim * math.log(max_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


@functools.lru_cache(maxsize=64)
def _frequencies_on(cfg: RopeConfig, device: torch.device) -> torch.Tensor:
    """:func:`rope_frequencies` in fp64 on ``device``, made once (a CUDA graph being recorded cannot copy it)."""
    return rope_frequencies(cfg).to(device).double()


def rope_frequencies(cfg: RopeConfig) -> torch.Tensor:
    """Angular frequency per rotated pair: fp32 [rope_dim // 2]."""
    d = cfg.rope_dim
    freqs = 1.0 / (cfg.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # [d/2]
    if cfg.yarn_factor > 1:
        low = max(math.floor(_correction_dim(cfg.beta_fast, d, cfg.theta, cfg.original_seq_len)), 0)
        high = min(math.ceil(_correction_dim(cfg.beta_slow, d, cfg.theta, cfg.original_seq_len)), d - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [d/2]
        # ramp 0 (fast pairs) keeps the frequency, ramp 1 (slow pairs) divides it by the factor
        freqs = freqs / cfg.yarn_factor * ramp + freqs * (1 - ramp)
    return freqs


def apply_rope(
    x: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig, inverse: bool = False
) -> torch.Tensor:
    """Rotate the last ``cfg.rope_dim`` dims of ``x`` [..., D] by ``positions``; fp32 out.

    positions: integer tensor whose shape is a prefix of ``x.shape[:-1]`` (e.g. [b, s] for
    x [b, s, H, D]); it broadcasts over the remaining dims. ``inverse=True`` rotates back.
    """
    check_tensor("x", x, dtype=(torch.float32, torch.bfloat16, torch.float16))
    check_tensor("positions", positions, dtype=(torch.int32, torch.int64))
    r = cfg.rope_dim
    if x.shape[-1] < r:
        raise ValueError(f"x: last dimension {x.shape[-1]} is smaller than rope_dim={r}")
    k = positions.dim()
    if tuple(positions.shape) != tuple(x.shape[:k]) or k >= x.dim():
        raise ValueError(
            f"positions shape {list(positions.shape)} must be a prefix of x.shape[:-1]={list(x.shape[:-1])}"
        )
    angle = positions.double().unsqueeze(-1) * _frequencies_on(cfg, x.device)  # [*pos, r/2]
    angle = angle.float()
    angle = angle.reshape(*angle.shape[:-1], *([1] * (x.dim() - 1 - k)), r // 2)  # broadcast over heads
    cos, sin = torch.cos(angle), torch.sin(angle)
    if inverse:
        sin = -sin
    xf = x.float()
    xr = xf[..., -r:].reshape(*x.shape[:-1], r // 2, 2)
    re, im = xr[..., 0], xr[..., 1]
    out_r = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).reshape(*x.shape[:-1], r)
    return torch.cat([xf[..., :-r], out_r], dim=-1)
