"""Fused RMSNorm: ``y = bf16(x * rsqrt(mean(x², -1) + eps) * weight)`` in fp32.

Dimension glossary: N rows (dynamic), D hidden size (static). One CTA normalises
``block_rows`` whole rows, so a row's reduction order never depends on N or on the other
rows: the kernel is batch-invariant by construction.

Tuning: ``block_rows`` and ``threads`` (:data:`RMSNORM_SPACE`); hidden sizes share a config per
bucket (``D<=1536``, ``D<=4096``, ``D>4096``); the config never depends on N.
"""

from collections.abc import Mapping
from typing import Any

import tilelang.language as T
import torch

from tilev4._checks import check_tensor
from tilev4.autotune.harness import TuningCase, TuningHarness
from tilev4.autotune.space import Space
from tilev4.kernels.registry import compile_kernel, register

__all__ = ["RMSNORM_SPACE", "build_rmsnorm", "rmsnorm"]

MAX_FRAGMENT_BYTES_PER_THREAD = 768  # x, x² (fp32) and y (bf16) fragments: past ~192 registers they spill


def _whole_elements_per_thread(c: Mapping[str, Any]) -> str | None:
    if (c["block_rows"] * c["D"]) % c["threads"]:
        return f"block_rows*D={c['block_rows'] * c['D']} not a multiple of threads={c['threads']}"
    return None


def _fragment_registers(c: Mapping[str, Any]) -> str | None:
    per_thread = c["block_rows"] * c["D"] * (4 + 4 + 2) // c["threads"]
    if per_thread > MAX_FRAGMENT_BYTES_PER_THREAD:
        return f"{per_thread} B of fragments per thread > {MAX_FRAGMENT_BYTES_PER_THREAD}"
    return None


def _rows_split_evenly(c: Mapping[str, Any]) -> str | None:
    # several rows per CTA: unless each row's threads/block_rows threads split its D/8 8-wide vectors evenly,
    # TileLang's layout inference replicates the whole [block_rows, D] fragment in every thread (seen for
    # D=7168, 2 rows, 512 threads: 7168 fp32 per thread, and nvcc's front end then runs for many minutes)
    per_row = c["threads"] // c["block_rows"]
    if c["block_rows"] > 1 and (c["D"] // 8) % max(per_row, 1):
        return f"D/8={c['D'] // 8} vectors do not split over threads/block_rows={per_row}"
    return None


RMSNORM_SPACE = Space(
    params={"block_rows": (1, 2, 4, 8), "threads": (64, 128, 256, 512)},
    constraints=(_whole_elements_per_thread, _fragment_registers, _rows_split_evenly),
    smem_bytes=lambda c: 4 * c["block_rows"] * (c["threads"] // 32),  # cross-warp partial sums
)


def _rmsnorm_bucket(problem: Mapping[str, Any]) -> str:
    d = problem["D"]
    return "D<=1536" if d <= 1536 else "D<=4096" if d <= 4096 else "D>4096"


def _rmsnorm_case(problem: Mapping[str, Any], n: int, gen: torch.Generator, device: str, reference: bool) -> TuningCase:
    from tilev4 import reference as R

    d, eps = problem["D"], problem["eps"]
    g = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    x = (torch.randn(n, d, generator=g, device=device) * 3).bfloat16()
    w = torch.randn(d, generator=g, device=device)
    expected = (R.rmsnorm(x.cpu(), w.cpu(), eps).to(device),) if reference else None
    return TuningCase((x, w, torch.empty_like(x)), outputs=(2,), expected=expected, rows=n)


def _rmsnorm_check(outputs: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> str | None:
    y, ref = outputs[0].float(), expected[0]
    if torch.isnan(y).any():
        return "NaN in y"
    excess = ((y - ref).abs() - (2.0**-8 * ref.abs() + 1e-6)).max().item()  # one bf16 ulp, as the tests
    return f"|y - ref| exceeds one bf16 ulp by {excess:.3g}" if excess > 0 else None


def _rmsnorm_slice(case: TuningCase, start: int, stop: int) -> TuningCase:
    x, w, _ = case.args
    xs = x[start:stop].contiguous()
    return TuningCase((xs, w, torch.empty_like(xs)), outputs=(2,), expected=None, rows=stop - start)


@register(
    "rmsnorm",
    configs=[{"D": 4096}, {"D": 7168}, {"D": 1024}, {"D": 1536}, {"D": 512}],
    tags=("norm", "batch_invariant"),
    space=RMSNORM_SPACE,
    bucket=_rmsnorm_bucket,
    harness=TuningHarness(_rmsnorm_case, _rmsnorm_check, sizes=(67, 16384), batch_slice=_rmsnorm_slice),
)
def build_rmsnorm(D: int, eps: float = 1e-6, block_rows: int = 1, threads: int = 128):
    """RMSNorm over the last dim, bf16 in/out, fp32 weight and math."""
    N = T.dynamic("N")

    @T.prim_func
    def rmsnorm_kernel(
        x: T.Tensor[(N, D), T.bfloat16],
        weight: T.Tensor[(D,), T.float32],
        y: T.Tensor[(N, D), T.bfloat16],
    ):
        with T.Kernel(T.ceildiv(N, block_rows), threads=threads) as bx:
            x_frag = T.alloc_fragment((block_rows, D), T.float32)
            sq_frag = T.alloc_fragment((block_rows, D), T.float32)
            y_frag = T.alloc_fragment((block_rows, D), T.bfloat16)
            rstd_frag = T.alloc_fragment((block_rows,), T.float32)
            T.copy(x[bx * block_rows, 0], x_frag)
            for i, j in T.Parallel(block_rows, D):
                sq_frag[i, j] = x_frag[i, j] * x_frag[i, j]
            T.reduce_sum(sq_frag, rstd_frag, dim=1)  # sum(x², -1)  [rows]
            for i in T.Parallel(block_rows):
                rstd_frag[i] = T.rsqrt(rstd_frag[i] / D + eps)
            for i, j in T.Parallel(block_rows, D):
                y_frag[i, j] = x_frag[i, j] * rstd_frag[i] * weight[j]
            T.copy(y_frag, y[bx * block_rows, 0])

    return rmsnorm_kernel


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of the last dim.

    Args:
        x: [..., D] bf16, contiguous, CUDA. Leading dims are flattened; may be empty.
        weight: [D] fp32.
        eps: added to the mean square (the V4 value is 1e-6).
        out: optional preallocated [..., D] bf16 output.

    Returns:
        bf16 [..., D]; matches ``tilev4.reference.rmsnorm(x, weight).bfloat16()`` to within one
        bf16 rounding (the fp32 sum is reduced in a different order than torch's).
    """
    check_tensor("x", x, dtype=torch.bfloat16, contiguous=True)
    if x.device.type != "cuda":
        raise ValueError(f"x must be a CUDA tensor, got device {x.device}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a scalar")
    d = x.shape[-1]
    check_tensor("weight", weight, dtype=torch.float32, shape=(d,), contiguous=True, device=x.device)
    if out is None:
        out = torch.empty_like(x)
    else:
        check_tensor("out", out, dtype=torch.bfloat16, shape=tuple(x.shape), contiguous=True, device=x.device)
    if x.numel() == 0:
        return out
    kernel = compile_kernel("rmsnorm", {"D": d, "eps": float(eps)})
    kernel(x.view(-1, d), weight, out.view(-1, d))
    return out
