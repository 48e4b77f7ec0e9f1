"""FP8 e4m3 activation quantisation with power-of-two (ue8m0) block scales.

``q, scale = fp8_quantize(x)``: x [N, K] bf16 → q [N, K] float8_e4m3fn, scale [N, K/128] fp32,
blocks of 1×128 along K, ``scale = 2^ceil(log2(max(amax, 1e-4) / 448))``, ``q = rne(x / scale)``.
This is what the FP8 GEMMs (MoE and linears) consume; it matches
:func:`tilev4.reference.fp8_e4m3_quantize` bit-exactly.

Dimension glossary: N rows (tokens, dynamic), K columns (static), BK = quantisation block.

The power-of-two scale is computed from the bits of ``amax``, not with ``log2``: for
``qmax = 1.f × 2^E`` and ``amax = 1.m × 2^e`` the smallest ``k`` with ``qmax·2^k >= amax`` is
``e − E`` if ``1.m <= 1.f`` else ``e − E + 1`` — exact, whereas ``ceil(log2(·))`` of a rounded
quotient can be off by one at powers of two.

Tuning: ``block_rows`` and ``threads`` (:data:`FP8_QUANTIZE_SPACE`); K shares a config per bucket
(``K<=2048``, ``K<=4096``, ``K>4096``); the config never depends on N.
"""


import math
from collections.abc import Mapping
from typing import Any

import tilelang.language as T
import torch

from tilev4._checks import check_tensor
from tilev4.autotune.harness import TuningCase, TuningHarness
from tilev4.autotune.space import Space
from tilev4.kernels.registry import compile_kernel, register

__all__ = ["FP8_QUANTIZE_SPACE", "build_fp8_quantize", "fp8_quantize", "pow2_scale_bits"]

FP8_MAX = 448.0
FP8_AMAX_FLOOR = 1e-4
MAX_FRAGMENT_BYTES_PER_THREAD = 768  # x (fp32) and q (fp8) fragments


def _tile_fits_threads(c: Mapping[str, Any]) -> str | None:
    tile = c["block_rows"] * c["BK"]
    if tile % c["threads"]:
        return f"block_rows*BK={tile} not a multiple of threads={c['threads']}"
    if tile * 5 // c["threads"] > MAX_FRAGMENT_BYTES_PER_THREAD:
        return f"{tile * 5 // c['threads']} B of fragments per thread > {MAX_FRAGMENT_BYTES_PER_THREAD}"
    return None


FP8_QUANTIZE_SPACE = Space(
    params={"block_rows": (1, 2, 4, 8, 16, 32), "threads": (32, 64, 128, 256)},
    constraints=(_tile_fits_threads,),
    smem_bytes=lambda c: 4 * c["block_rows"] * (c["threads"] // 32),  # cross-warp amax
)


def _fp8_bucket(problem: Mapping[str, Any]) -> str:
    k = problem["K"]
    size = "K<=2048" if k <= 2048 else "K<=4096" if k <= 4096 else "K>4096"
    return f"BK={problem['BK']},{size}"


def _fp8_case(problem: Mapping[str, Any], n: int, gen: torch.Generator, device: str, reference: bool) -> TuningCase:
    from tilev4 import reference as R

    k, bk = problem["K"], problem["BK"]
    g = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    x = torch.randn(n, k, generator=g, device=device) * 5
    x[0, :bk] *= 1e-6  # a block under the amax floor
    x = x.bfloat16()
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=device)
    scale = torch.empty(n, k // bk, device=device)
    expected = tuple(t.to(device) for t in R.fp8_e4m3_quantize(x.cpu(), bk)) if reference else None
    return TuningCase((x, q, scale), outputs=(1, 2), expected=expected, rows=n)


def _fp8_check(outputs: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> str | None:
    q, scale = outputs
    if not torch.equal(q.view(torch.uint8), expected[0].view(torch.uint8)):
        return "q differs from the reference (must be bit-exact)"
    if not torch.equal(scale, expected[1]):
        return "scale differs from the reference (must be bit-exact)"
    return None


def _fp8_slice(case: TuningCase, start: int, stop: int) -> TuningCase:
    x, q, scale = case.args
    xs = x[start:stop].contiguous()
    return TuningCase((xs, torch.empty_like(q[start:stop]), torch.empty_like(scale[start:stop])), outputs=(1, 2),
                      expected=None, rows=stop - start)


def pow2_scale_bits(amax: T.PrimExpr, qmax: float) -> tuple[T.PrimExpr, T.PrimExpr]:
    """(scale, 1/scale) as fp32 expressions: the smallest power of two with ``qmax·scale >= amax``.

    ``amax`` must be a positive normal fp32 expression (callers floor it first).
    """
    mant_q, exp_q = math.frexp(qmax)  # qmax = mant_q * 2^exp_q, mant_q in [0.5, 1)
    qmax_exp = exp_q - 1
    qmax_mant_bits = int((mant_q * 2 - 1) * (1 << 23))
    bits = T.reinterpret(amax, T.int32)
    e = T.shift_right(bits, 23) - 127  # amax = 1.m × 2^e
    k = e - qmax_exp + T.if_then_else(T.bitwise_and(bits, 0x7FFFFF) > qmax_mant_bits, 1, 0)
    scale = T.reinterpret(T.shift_left(k + 127, 23), T.float32)
    inv_scale = T.reinterpret(T.shift_left(127 - k, 23), T.float32)
    return scale, inv_scale


@register(
    "fp8_quantize",
    configs=[{"K": 4096}, {"K": 2048}, {"K": 7168}, {"K": 3072}, {"K": 1024}],
    tags=("quant", "batch_invariant"),
    space=FP8_QUANTIZE_SPACE,
    bucket=_fp8_bucket,
    harness=TuningHarness(_fp8_case, _fp8_check, sizes=(67, 16384), batch_slice=_fp8_slice),
)
def build_fp8_quantize(K: int, BK: int = 128, block_rows: int = 8, threads: int = 128):
    """FP8 e4m3 1×128 activation quantiser with ue8m0 scales (bf16 in)."""
    if K % BK:
        raise ValueError(f"K={K} must be a multiple of BK={BK}")
    N = T.dynamic("N")
    num_blocks = K // BK

    @T.prim_func
    def fp8_quantize_kernel(
        x: T.Tensor[(N, K), T.bfloat16],
        q: T.Tensor[(N, K), T.float8_e4m3fn],
        scale: T.Tensor[(N, num_blocks), T.float32],
    ):
        with T.Kernel(T.ceildiv(N, block_rows), num_blocks, threads=threads) as (bx, by):
            x_frag = T.alloc_fragment((block_rows, BK), T.float32)
            q_frag = T.alloc_fragment((block_rows, BK), T.float8_e4m3fn)
            amax_frag = T.alloc_fragment((block_rows,), T.float32)
            inv_frag = T.alloc_fragment((block_rows,), T.float32)
            T.copy(x[bx * block_rows, by * BK], x_frag)
            T.reduce_absmax(x_frag, amax_frag, dim=1)  # amax = x.abs().amax(-1)  [rows]
            for i in T.Parallel(block_rows):
                s, inv = pow2_scale_bits(T.max(amax_frag[i], FP8_AMAX_FLOOR), FP8_MAX)
                inv_frag[i] = inv
                if bx * block_rows + i < N:
                    scale[bx * block_rows + i, by] = s
            for i, j in T.Parallel(block_rows, BK):
                q_frag[i, j] = x_frag[i, j] * inv_frag[i]  # |x / scale| <= 448: no saturation needed
            T.copy(q_frag, q[bx * block_rows, by * BK])

    return fp8_quantize_kernel


def fp8_quantize(
    x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise activations to FP8 e4m3 with 1×128 power-of-two scales.

    Args:
        x: [N, K] bf16, contiguous, CUDA; K a multiple of 128. N may be 0.
        out: optional preallocated ``(q, scale)``: q [N, K] float8_e4m3fn, scale [N, K/128] fp32.

    Returns:
        ``(q, scale)`` with ``x ≈ q * scale`` per block; identical bits to
        ``tilev4.reference.fp8_e4m3_quantize(x, 128)``. Each row is computed alone, so the
        result is batch-invariant.
    """
    check_tensor("x", x, dtype=torch.bfloat16, ndim=2, contiguous=True)
    if x.device.type != "cuda":
        raise ValueError(f"x must be a CUDA tensor, got device {x.device}")
    n, k = x.shape
    if k % 128:
        raise ValueError(f"x: K={k} must be a multiple of 128")
    if out is None:
        q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=x.device)
        scale = torch.empty(n, k // 128, dtype=torch.float32, device=x.device)
    else:
        q, scale = out
        check_tensor("out[0]", q, dtype=torch.float8_e4m3fn, shape=(n, k), contiguous=True, device=x.device)
        check_tensor("out[1]", scale, dtype=torch.float32, shape=(n, k // 128), contiguous=True, device=x.device)
    if n == 0:
        return q, scale
    compile_kernel("fp8_quantize", {"K": k})(x, q, scale)
    return q, scale
