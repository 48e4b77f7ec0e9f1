"""FP8 e4m3 and FP4 e2m1 block quantisation, simulated in fp32.

Dimension glossary: the quantisation blocks run along the LAST dimension of the input.

* FP8 e4m3: max 448. Per-block absmax scale ``amax / 448`` with ``amax`` floored at 1e-4;
  with ``ue8m0=True`` (what V4 uses everywhere) the scale is rounded UP to a power of two,
  ``2^ceil(log2(amax / 448))``, so that it fits an e8m0 byte.
* FP4 e2m1: values {0, 0.5, 1, 1.5, 2, 3, 4, 6} and their negatives, block 32, scale
  ``2^ceil(log2(amax / 6))`` with ``amax`` floored at ``6 * 2^-126``. Rounding is
  round-to-nearest-even on the e2m1 grid (ties go to the code with an even mantissa),
  which is what ``cvt.rn.satfinite.e2m1x2.f32`` does on the GPU.

A ``*_simulate`` function returns ``dequantise(quantise(x))`` in fp32. Packed formats:
FP4 values are stored two per byte, the low nibble holding the even element; e8m0 scale
bytes hold ``exponent + 127``.
"""

from __future__ import annotations

import functools
import math

import torch

from tilev4._checks import check_dtype, check_int, check_tensor

__all__ = [
    "FP4_E2M1_GRID",
    "FP4_MAX",
    "FP8_E4M3_MAX",
    "dequant_fp4_weight",
    "dequant_fp8_weight",
    "e8m0_decode",
    "e8m0_encode",
    "fp4_e2m1_quantize",
    "fp4_e2m1_simulate",
    "fp8_e4m3_quantize",
    "fp8_e4m3_simulate",
    "kv_fp8_simulate",
    "pack_fp4",
    "unpack_fp4",
]

FP8_E4M3_MAX = 448.0
FP4_MAX = 6.0
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6.0 * 2.0**-126
FP4_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring grid values; a tie rounds to the even-mantissa code.
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_FP4_TIE_ROUNDS_UP = (False, True, False, True, False, True, False)


def _blocked(name: str, x: torch.Tensor, block: int) -> torch.Tensor:
    check_int("block", block, min_value=1)
    if x.dim() == 0 or x.shape[-1] % block != 0:
        raise ValueError(f"{name}: last dimension {tuple(x.shape)[-1:] or '()'} is not a multiple of block={block}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _pow2_scale(amax: torch.Tensor, qmax: float, floor: float, ue8m0: bool) -> torch.Tensor:
    amax = amax.clamp_min(floor)
    scale = amax / qmax
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def fp8_e4m3_quantize(x: torch.Tensor, block: int = 128, ue8m0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` [..., n] to FP8 e4m3 with one scale per ``block`` elements.

    Returns ``(q, scale)``: ``q`` [..., n] float8_e4m3fn and ``scale`` [..., n // block] fp32,
    with ``x ≈ q * scale`` blockwise.
    """
    check_tensor("x", x, dtype=(torch.float32, torch.bfloat16, torch.float16))
    xb = _blocked("x", x, block)  # [..., nb, block]
    scale = _pow2_scale(xb.abs().amax(-1, keepdim=True), FP8_E4M3_MAX, FP8_AMAX_FLOOR, ue8m0)
    q = (xb / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), scale.squeeze(-1)


def fp8_e4m3_simulate(x: torch.Tensor, block: int = 128, ue8m0: bool = True) -> torch.Tensor:
    """``dequantise(quantise(x))`` for FP8 e4m3 blocks of ``block`` along the last dim; fp32 out."""
    q, scale = fp8_e4m3_quantize(x, block, ue8m0)
    qb = q.float().reshape(*x.shape[:-1], -1, block)  # [..., nb, block]
    return (qb * scale.unsqueeze(-1)).reshape(x.shape)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float | bool, ...], dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """A small constant table on ``device``, made once per (dtype, device): a CUDA graph being recorded cannot
    copy it from the host (the first, eager call makes it). Read-only."""
    return torch.tensor(values, dtype=dtype, device=device)


def _round_e2m1(a: torch.Tensor) -> torch.Tensor:
    """Round non-negative ``a`` (already clamped to [0, 6]) to the e2m1 grid; returns codes 0..7."""
    mids = _constant(tuple(_FP4_MIDPOINTS), a.dtype, a.device)
    code = torch.bucketize(a, mids)  # mids[code-1] < a <= mids[code]
    tie = a == mids[code.clamp(max=len(_FP4_MIDPOINTS) - 1)]
    ups = _constant(tuple(_FP4_TIE_ROUNDS_UP), None, a.device)[code.clamp(max=len(_FP4_MIDPOINTS) - 1)]
    return code + (tie & ups).long()


def fp4_e2m1_quantize(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` [..., n] to FP4 e2m1 with power-of-two scales per ``block`` elements.

    Returns ``(v, scale)``: ``v`` [..., n] fp32 holding e2m1 values (exactly on the grid,
    signed) and ``scale`` [..., n // block] fp32 powers of two, ``x ≈ v * scale``.
    Use :func:`pack_fp4` to get the two-per-byte storage format.
    """
    check_tensor("x", x, dtype=(torch.float32, torch.bfloat16, torch.float16))
    xb = _blocked("x", x, block)  # [..., nb, block]
    scale = _pow2_scale(xb.abs().amax(-1, keepdim=True), FP4_MAX, FP4_AMAX_FLOOR, True)
    y = (xb / scale).clamp(-FP4_MAX, FP4_MAX)
    grid = _constant(tuple(FP4_E2M1_GRID), torch.float32, x.device)
    v = grid[_round_e2m1(y.abs())] * torch.sign(y)
    return v.reshape(x.shape), scale.squeeze(-1)


def fp4_e2m1_simulate(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """``dequantise(quantise(x))`` for FP4 e2m1 blocks of ``block`` along the last dim; fp32 out."""
    v, scale = fp4_e2m1_quantize(x, block)
    return (v.reshape(*x.shape[:-1], -1, block) * scale.unsqueeze(-1)).reshape(x.shape)


def pack_fp4(v: torch.Tensor) -> torch.Tensor:
    """Pack e2m1 values ``v`` [..., n] (exactly on the grid) into uint8 [..., n // 2].

    Nibble = sign bit (8) | magnitude code (0..7); the low nibble holds the even element.
    """
    check_tensor("v", v, dtype=(torch.float32, torch.bfloat16))
    if v.shape[-1] % 2:
        raise ValueError(f"v: last dimension must be even to pack two per byte, got {v.shape[-1]}")
    a = v.float().abs()
    grid = torch.tensor(FP4_E2M1_GRID, dtype=torch.float32, device=v.device)
    code = torch.bucketize(a, grid)
    if (code > 7).any() or (grid[code.clamp(max=7)] != a).any():
        raise ValueError("v: values must lie exactly on the e2m1 grid (use fp4_e2m1_quantize first)")
    nib = (code | (torch.signbit(v.float()).long() << 3)).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: uint8 [..., n // 2] → fp32 e2m1 values [..., n]."""
    check_tensor("packed", packed, dtype=(torch.uint8, torch.int8))
    p = packed.view(torch.uint8).long()
    nib = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*p.shape[:-1], -1)
    grid = torch.tensor(FP4_E2M1_GRID, dtype=torch.float32, device=packed.device)
    mag = grid[nib & 7]
    return torch.where((nib & 8) != 0, -mag, mag)


def e8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales → e8m0 bytes (uint8, ``exponent + 127``)."""
    check_tensor("scale", scale, dtype=torch.float32)
    e = torch.log2(scale)
    if not torch.equal(e, torch.round(e)) or (e < -127).any() or (e > 127).any():
        raise ValueError("scale: e8m0 holds only powers of two in [2^-127, 2^127]")
    return (e + 127).to(torch.uint8)


def e8m0_decode(scale: torch.Tensor) -> torch.Tensor:
    """e8m0 scales (uint8 bytes or ``torch.float8_e8m0fnu``) or fp32 scales → fp32."""
    if scale.dtype == torch.float32:
        return scale
    if scale.dtype == getattr(torch, "float8_e8m0fnu", None):
        scale = scale.view(torch.uint8)
    check_dtype("scale", scale, (torch.uint8, torch.float32))
    return torch.exp2(scale.float() - 127.0)


def dequant_fp8_weight(w: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """FP8 e4m3 weight [N, K] with block scales [ceil(N/block), ceil(K/block)] → fp32 [N, K]."""
    check_tensor("w", w, dtype=torch.float8_e4m3fn, ndim=2)
    n, k = w.shape
    sn, sk = math.ceil(n / block), math.ceil(k / block)
    check_tensor("scale", scale, shape=(sn, sk))
    s = e8m0_decode(scale).repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return w.float() * s


def dequant_fp4_weight(w: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    """FP4 e2m1 weight packed [N, K/2] uint8 with scales [N, K/block] → fp32 [N, K]."""
    check_tensor("w", w, dtype=(torch.uint8, torch.int8), ndim=2)
    n, k = w.shape[0], w.shape[1] * 2
    if k % block:
        raise ValueError(f"w: K={k} is not a multiple of block={block}")
    check_tensor("scale", scale, shape=(n, k // block))
    v = unpack_fp4(w).reshape(n, k // block, block)
    return (v * e8m0_decode(scale).unsqueeze(-1)).reshape(n, k)


def kv_fp8_simulate(kv: torch.Tensor, nope_dim: int = 448, block: int = 64) -> torch.Tensor:
    """The KV-cache storage simulation: FP8 e4m3 (ue8m0, block 64) on ``kv[..., :nope_dim]``,
    the remaining (rope) dims kept as they are. kv: [..., 512] → fp32 [..., 512]."""
    check_tensor("kv", kv, dtype=(torch.float32, torch.bfloat16, torch.float16))
    if kv.shape[-1] < nope_dim:
        raise ValueError(f"kv: last dimension {kv.shape[-1]} is smaller than nope_dim={nope_dim}")
    kvf = kv.float()
    return torch.cat([fp8_e4m3_simulate(kvf[..., :nope_dim], block), kvf[..., nope_dim:]], dim=-1)
