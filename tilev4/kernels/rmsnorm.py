"""Fused RMSNorm: ``y = bf16(x * rsqrt(mean(x², -1) + eps) * weight)`` in fp32.

Dimension glossary: N rows (dynamic), D hidden size (static). One CTA normalises
``block_rows`` whole rows, so a row's reduction order never depends on N or on the other
rows: the kernel is batch-invariant by construction.
"""


import tilelang.language as T
import torch

from tilev4._checks import check_tensor
from tilev4.kernels.registry import compile_kernel, register

__all__ = ["build_rmsnorm", "rmsnorm"]


@register(
    "rmsnorm",
    configs=[{"D": 4096}, {"D": 7168}, {"D": 1024}, {"D": 1536}, {"D": 512}],
    tags=("norm", "batch_invariant"),
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
