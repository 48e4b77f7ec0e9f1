"""fp32 linear on the bf16 tensor cores: ``y = x·Wᵀ`` for fp32 activations and bf16 weights, fp32 out.

This is the model's linear (:class:`tilev4.model.backend.KernelOps`): the checkpoint's FP8 weights with their
power-of-two 128×128 scales, and its bf16 projections, are exact in bf16, so the weight is stored once in bf16
and only the activation needs care. Each fp32 activation is split exactly into three bf16 parts,
``x = hi + mid + lo`` (each the bf16 rounding of what is left: 3 × 8 significant bits cover fp32's 24), and
the kernel runs ``lo·Wᵀ + mid·Wᵀ + hi·Wᵀ`` on the tensor cores with fp32 accumulation. Every product is
exact, so the only difference from fp64 math rounded to fp32 is the order (and the tensor core's truncating
alignment) of the fp32 additions — the same argument as the MoE gate's split weight (:mod:`tilev4.kernels.moe`).

Grouped form (V4's grouped output projection ``wo_a``): ``x`` [M, G, K], ``W`` [G, N, K] → ``y`` [M, G, N],
group ``g`` of every row through its own ``N`` rows of W; the plain linear is ``G = 1``.

Schedule: grid (⌈N / block_n⌉, ⌈M / block_m⌉, G); a CTA streams its ``block_m`` rows of x (fp32) and its
``block_n`` weight rows (bf16) through a TMA pipeline over K, splits the x tile in registers (the A operand of
three register-sourced wgmma per K step into one accumulator), then stores the rows and columns inside
``[M, N]``. Measured on the H200 at decode shapes (M = 4): ~12-14 µs for K = 1024, ~5 µs for K = 256 whatever N
up to 8192 — the cost grows with K (~0.7 µs a 64-wide K step), not with N (cuBLAS bf16: ~5 µs, fp64: 10-31 µs);
the build drains the wgmma pipe after each of the three products of a step (``T.gemm``'s wait). Issuing the
three products back to back with one wait per step (``T.wgmma_gemm`` + ``T.wait_wgmma``) gave wrong results on
the H200 under this pipeline, so it is not offered.
The model stacks the projections of one input into one call (:meth:`tilev4.model.backend.KernelOps.linears`).

Dimension glossary: ``M`` rows (dynamic), ``G`` groups (dynamic), ``N`` output features per group (dynamic),
``K`` input features (static: the pipeline needs a constant trip count; a multiple of ``block_k``).

Batch invariance: every output element is one row's dot product over the full K in a fixed ``block_k`` order,
independent of the row's place in its tile, and the config never depends on M — so a row's output is bitwise
the same whatever the other rows (and the same in prefill and decode). No split-K.

Tuning: ``block_m`` (64 / 128 rows, one warpgroup per 64), ``block_n``, ``block_k`` and ``num_stages`` (the
warp-specialised pipeline is a config, measured slower at decode shapes, not a candidate);
one config per K range (``K<=1024``, ``K<=4096``, ``K>4096``), never per M.
"""

from collections.abc import Mapping
from typing import Any

import tilelang.language as T
import torch

from tilev4._checks import check_tensor
from tilev4.autotune.harness import TuningHarness
from tilev4.autotune.space import Space
from tilev4.kernels.moe_tuning import (
    ABS_FLOOR,
    TOKENS,
    Bounded,
    RowCase,
    _accumulators,
    _device_gen,
    _k_range,
    _randn,
    _smem,
    _warpgroup_rows,
    bf16_acc,
    check_bounded,
    slice_rows,
)
from tilev4.kernels.registry import compile_kernel, register

__all__ = ["build_linear", "grouped_linear", "linear", "split_linear_bound"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_SPLIT_PARTS = 3  # hi + mid + lo
MAX_SPLIT_REGS = 160  # 32-bit registers a thread for the x tile, its bf16 parts and the accumulator


# --------------------------------------------------------------------------------------------------- tuning


def linear_bucket(problem: Mapping[str, Any]) -> str:
    """``K<=1024`` / ``K<=4096`` / ``K>4096``."""
    return _k_range("K", problem["K"], (1024, 4096))


def _linear_smem(c: Mapping[str, Any]) -> int:
    bm, bn, bk, s = c["block_m"], c["block_n"], c["block_k"], c["num_stages"]
    return _smem(s * bm * bk * 4, s * bn * bk * 2)  # x (fp32), w (bf16) per stage


def _split_registers(c: Mapping[str, Any]) -> str | None:
    """The x tile and its three parts live in registers: (4 + 3·2) bytes per element, plus the accumulator."""
    per_thread = (c["block_m"] * c["block_k"] * 10 + c["block_m"] * c["block_n"] * 4) // (4 * c["threads"])
    if per_thread > MAX_SPLIT_REGS:
        return f"~{per_thread} registers a thread for x, its parts and the accumulator > {MAX_SPLIT_REGS}"
    return None


def _divides_k(c: Mapping[str, Any]) -> str | None:
    if c["K"] % c["block_k"]:
        return f"block_k={c['block_k']} does not divide K={c['K']}"
    return None


LINEAR_SPACE = Space(
    params={"block_m": (64, 128), "block_n": (64, 32, 128), "block_k": (64, 128), "num_stages": (3, 4),
            "threads": (128, 256)},
    constraints=(_warpgroup_rows, _accumulators(1), _divides_k, _split_registers),
    smem_bytes=_linear_smem,
)

_HARNESS_N = 1024  # output features of a tuning case


def split_linear_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Error bound of :func:`linear` against fp64 math, per output (fp64): the fp32 accumulation of the three
    partial GEMMs (one truncation per 16-term tensor-core step, relative to Σ|x·w|) + the final fp32 rounding."""
    xd, wd = x.double(), weight.double()
    return _SPLIT_PARTS * bf16_acc(x.shape[-1]) * (xd.abs() @ wd.abs().T) + 2.0**-24 * (xd @ wd.T).abs() + ABS_FLOOR


def _linear_case(problem: Mapping[str, Any], n: int, gen: torch.Generator, device: str, reference: bool) -> RowCase:
    """x [n, 1, K] fp32 (a wide dynamic range: the split must keep all 24 bits), W [1, 1024, K] bf16."""
    k = problem["K"]
    g = _device_gen(gen, device)
    x = _randn((n, 1, k), g, device) * torch.exp2(_randn((n, 1, k), g, device, 2.0)).round()
    w = _randn((1, _HARNESS_N, k), g, device, k**-0.5).bfloat16()
    y = torch.empty(n, 1, _HARNESS_N, device=device)
    expected = None
    if reference:
        ref = x[:, 0].double() @ w[0].double().T
        expected = (Bounded(ref.unsqueeze(1), split_linear_bound(x[:, 0], w[0]).unsqueeze(1)),)
    return RowCase((x, w, y), (2,), expected, n, row_args=(0,))


LINEAR_HARNESS = TuningHarness(_linear_case, check_bounded, sizes=TOKENS, size_name="M", batch_slice=slice_rows)


# --------------------------------------------------------------------------------------------------- kernel


@register("linear", configs=[{"K": 1024}, {"K": 256}, {"K": 2048}, {"K": 4096}, {"K": 128}, {"K": 512}, {"K": 8192}],
          tags=("linear", "batch_invariant"), space=LINEAR_SPACE, bucket=linear_bucket, harness=LINEAR_HARNESS)
def build_linear(K: int, block_m: int = 64, block_n: int = 64, block_k: int = 64, num_stages: int = 3,
                 threads: int = 128, warp_specialized: bool = False):
    """fp32 linear (grouped): x fp32 split exactly into 3 bf16 parts, bf16 W, fp32 accumulation on the tensor cores."""
    if K <= 0 or K % block_k:
        raise ValueError(f"K={K} must be a positive multiple of block_k={block_k}")
    if threads != 2 * block_m:
        raise ValueError(f"threads={threads} must be 2·block_m={2 * block_m} (one warpgroup per 64 rows)")
    BM, BN, BK = block_m, block_n, block_k
    M = T.dynamic("M")
    G = T.dynamic("G")
    N = T.dynamic("N")

    @T.prim_func
    def linear_kernel(
        x: T.Tensor((M, G, K), T.float32),
        w: T.Tensor((G, N, K), T.bfloat16),
        y: T.Tensor((M, G, N), T.float32),
    ):
        if not warp_specialized:
            T.annotate_pass_configs({"tl.disable_warp_specialized": True})
        with T.Kernel(T.ceildiv(N, BN), T.ceildiv(M, BM), G, threads=threads) as (bx, by, g):
            x_shared = T.alloc_shared((BM, BK), T.float32)
            w_shared = T.alloc_shared((BN, BK), T.bfloat16)
            acc = T.alloc_fragment((BM, BN), T.float32)
            T.clear(acc)
            x_frag = T.alloc_fragment((BM, BK), T.float32)
            hi_frag = T.alloc_fragment((BM, BK), T.bfloat16)
            mid_frag = T.alloc_fragment((BM, BK), T.bfloat16)
            lo_frag = T.alloc_fragment((BM, BK), T.bfloat16)
            for k in T.Pipelined(K // BK, num_stages=num_stages):
                # rows past M / N read as 0 (bounds-checked copies)
                T.copy(x[by * BM : by * BM + BM, g, k * BK : k * BK + BK], x_shared)
                T.copy(w[g, bx * BN : bx * BN + BN, k * BK : k * BK + BK], w_shared)
                T.copy(x_shared, x_frag)
                for i, j in T.Parallel(BM, BK):
                    # x = hi + mid + lo exactly: each part is the bf16 rounding of what is left
                    hi_frag[i, j] = T.cast(x_frag[i, j], T.bfloat16)
                    mid_frag[i, j] = T.cast(x_frag[i, j] - T.cast(hi_frag[i, j], T.float32), T.bfloat16)
                    lo_frag[i, j] = T.cast(x_frag[i, j] - T.cast(hi_frag[i, j], T.float32)
                                           - T.cast(mid_frag[i, j], T.float32), T.bfloat16)
                # the A operand from registers (wgmma RS): [BM, BK] @ [BK, BN] -> [BM, BN]
                T.gemm(lo_frag, w_shared, acc, transpose_B=True)
                T.gemm(mid_frag, w_shared, acc, transpose_B=True)
                T.gemm(hi_frag, w_shared, acc, transpose_B=True)
            for i, j in T.Parallel(BM, BN):
                if by * BM + i < M and bx * BN + j < N:
                    y[by * BM + i, g, bx * BN + j] = acc[i, j]

    return linear_kernel


# ------------------------------------------------------------------------------------------------ public ops


def _run(x3: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """x3 [M, G, K] fp32 contiguous, w3 [G, N, K] bf16 contiguous → fp32 [M, G, N]."""
    m, g, k = x3.shape
    # the copies are TMA loads: base addresses 16-byte aligned (a view into a larger tensor may not be)
    x3 = x3 if x3.data_ptr() % 16 == 0 else x3.clone()
    w3 = w3 if w3.data_ptr() % 16 == 0 else w3.clone()
    y = torch.empty(m, g, w3.shape[1], dtype=torch.float32, device=x3.device)
    if y.numel():
        with torch.cuda.device(x3.device):
            compile_kernel("linear", {"K": k})(x3, w3, y)
    return y


def _check_weight(weight: torch.Tensor) -> None:
    check_tensor("weight", weight, dtype=torch.bfloat16, ndim=2, contiguous=True)
    k = weight.shape[-1]
    if k == 0 or k % 64:
        raise ValueError(f"weight: K={k} must be a positive multiple of 64")


def _as_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x checked (dtype, device; its shape is checked by the caller first) as contiguous fp32."""
    check_tensor("x", x, dtype=_FLOATS, device=weight.device)
    if weight.device.type != "cuda":
        raise ValueError(f"weight must be a CUDA tensor, got device {weight.device}")
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weightᵀ`` in fp32 on the bf16 tensor cores (x split exactly into three bf16 parts).

    Args:
        x: [..., K] fp32 (bf16 / fp16 are widened), CUDA.
        weight: [N, K] bf16, contiguous, on x's device; K a multiple of 64.

    Returns:
        fp32 [..., N]: fp64 math on (x, weight) up to the fp32 order of the K-sum (every product is exact).
        A row's result is bitwise the same whatever the other rows (any leading shape, prefill or decode).
    """
    _check_weight(weight)
    n, k = weight.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., {k}], got {list(x.shape)}")
    x = _as_f32(x, weight)
    lead = x.shape[:-1]
    y = _run(x.reshape(-1, 1, k), weight.view(1, n, k))
    return y.view(*lead, n)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Group ``g`` of ``x`` through rows ``g·R … g·R + R − 1`` of ``weight``, in fp32 as :func:`linear`.

    Args:
        x: [..., G, K] fp32 (bf16 / fp16 are widened), CUDA.
        weight: [G·R, K] bf16, contiguous; K a multiple of 64.

    Returns:
        fp32 [..., G, R].
    """
    _check_weight(weight)
    if x.dim() < 2:
        raise ValueError(f"x must have shape [..., G, K], got {list(x.shape)}")
    g, k = x.shape[-2], x.shape[-1]
    if weight.shape[1] != k or g == 0 or weight.shape[0] % g:
        raise ValueError(f"weight must have shape [G·R, {k}] with G={g} dividing its rows, got {list(weight.shape)}")
    x = _as_f32(x, weight)
    lead = x.shape[:-2]
    r = weight.shape[0] // g
    y = _run(x.reshape(-1, g, k), weight.view(g, r, k))
    return y.view(*lead, g, r)
