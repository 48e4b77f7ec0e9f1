"""Dense FP8 linear ``y = x·Wᵀ`` for the checkpoint's FP8 weights (e4m3, 128×128 power-of-two block scales).

Semantics: ``x`` (bf16) is quantised 1×128 on the fly by :func:`tilev4.fp8_quantize` (ue8m0 scales), then
``y[m, n] = Σ_kb (Σ_{k in kb} x8[m, k]·w8[n, k]) · sx[m, kb] · sw[n/128, kb]`` with the inner sums on the FP8
tensor cores and the promotion into fp32 once per 128-K block (exact: power-of-two scales). The GEMM is the
dense mode of the grouped FP8 GEMM of :mod:`tilev4.kernels.moe_fp8` (same schedule, one weight).

Dimension glossary: M rows (dynamic), N output features (dynamic), K input features (static, a multiple of 128).
Batch invariance: every row is computed alone over the full K in a fixed order, the config never depends on M,
so a row's output is bitwise the same whatever the other rows.

Tuning (:mod:`tilev4.kernels.moe_tuning`): ``block_m`` (64 / 128, with one warpgroup per 64 rows), ``block_n``
(128 / 64: one weight scale per tile) and ``num_stages``; K shares a config per range (``K<=1024``,
``K<=4096``, ``K>4096``), never per M.
"""

import torch

from tilev4._checks import check_tensor
from tilev4.kernels.moe_fp8 import SCALE_BLOCK, _build_fp8_gemm
from tilev4.kernels.moe_tuning import FP8_LINEAR_HARNESS, FP8_LINEAR_SPACE, fp8_linear_bucket
from tilev4.kernels.quant import fp8_quantize
from tilev4.kernels.registry import compile_kernel, register
from tilev4.reference.quant import e8m0_decode

__all__ = ["build_fp8_linear", "fp8_linear"]

_OUT = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


@register("fp8_linear", configs=[{"K": 4096}], tags=("linear", "fp8", "batch_invariant"), space=FP8_LINEAR_SPACE,
          bucket=fp8_linear_bucket, harness=FP8_LINEAR_HARNESS)
def build_fp8_linear(K: int, block_m: int = 64, block_n: int = 128, num_stages: int = 4, threads: int = 128,
                     group_m: int = 8, out_dtype: str = "float32"):
    """Dense FP8 linear y = x·Wᵀ: x quantised 1×128, W e4m3 with 128×128 power-of-two scales, fp32 accumulation."""
    return _build_fp8_gemm(K, True, block_m, block_n, num_stages, threads, group_m, out_dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x @ dequant(weight, scale)ᵀ`` with x quantised to FP8 1×128 (the production FP8 linear).

    Args:
        x: [..., K] bf16 (other float dtypes are cast to bf16 first), CUDA; K a multiple of 128.
        weight: [N, K] float8_e4m3fn, contiguous.
        scale: [⌈N/128⌉, K/128] fp32 powers of two, or the checkpoint's e8m0 bytes (uint8 / float8_e8m0fnu).
        out_dtype: fp32 (default) or bf16.

    Returns:
        [..., N] ``out_dtype``. Against fp32 math on the dequantised inputs: exact products, fp32 promotion per
        128-K block; the FP8 tensor cores' reduced-precision accumulation inside a block is the only other
        error (see the GPU tests for the bound).
    """
    if out_dtype not in _OUT:
        raise TypeError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    check_tensor("weight", weight, dtype=torch.float8_e4m3fn, ndim=2, contiguous=True)
    n, k = weight.shape
    if k % SCALE_BLOCK:
        raise ValueError(f"weight: K={k} must be a multiple of {SCALE_BLOCK}")
    check_tensor("x", x, dtype=(torch.bfloat16, torch.float32, torch.float16), device=weight.device)
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., {k}], got {list(x.shape)}")
    if scale.dtype == getattr(torch, "float8_e8m0fnu", None):
        scale = scale.view(torch.uint8)
    check_tensor("scale", scale, dtype=(torch.float32, torch.uint8), shape=(-(-n // SCALE_BLOCK), k // SCALE_BLOCK),
                 device=weight.device)
    if weight.device.type != "cuda":
        raise ValueError(f"weight must be a CUDA tensor, got device {weight.device}")
    scale = e8m0_decode(scale)  # e8m0 bytes: 2^(byte − 127), exact in fp32
    x2 = x.reshape(-1, k).to(torch.bfloat16).contiguous()
    out = torch.empty(x2.shape[0], n, dtype=out_dtype, device=x.device)
    if x2.shape[0]:
        x8, xs = fp8_quantize(x2)
        with torch.cuda.device(x.device):
            compile_kernel("fp8_linear", {"K": k, "out_dtype": _OUT[out_dtype]})(
                x8, xs, weight.unsqueeze(0), scale.contiguous().unsqueeze(0), out)
    return out.view(*x.shape[:-1], n)
