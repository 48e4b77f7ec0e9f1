"""The ops the runtime calls, per device: the switch point between the reference and the TileLang kernels.

:class:`ReferenceOps` runs every op of the model on :mod:`tilev4.reference` (plain fp32 torch, any
device). :class:`KernelOps` is what CUDA tensors get: it is the place where each op is replaced by its
TileLang kernel once that kernel matches the reference within its test's tolerance. None is switched
yet, so on CUDA the same reference math runs on GPU tensors; the planned mapping is

=========================  =============================================================================
op                         kernel (``tilev4.kernels``)
=========================  =============================================================================
rmsnorm                    ``rmsnorm`` (bf16 out; batch-invariant)
linear (FP8 weights)       FP8 GEMM after ``fp8_quantize`` of the activations (1×128, ue8m0)
sparse_attention           ``csa_attention`` / ``hca_attention`` (window ring + top-k / dense compressed)
                           or ``sparse_attention`` for window-only layers
compressor, indexer, MoE,  not written yet; the reference runs
mHC
=========================  =============================================================================

Every op has the signature of the reference function it stands for (see that function's docstring for
shapes), except :meth:`ReferenceOps.linear` and :meth:`ReferenceOps.grouped_linear`, which take a
:class:`Linear` (the weight as stored in the checkpoint, plus its scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tilev4.reference import attention as _attention
from tilev4.reference import compressor as _compressor
from tilev4.reference import indexer as _indexer
from tilev4.reference import mhc as _mhc
from tilev4.reference import moe as _moe
from tilev4.reference.norm import rmsnorm
from tilev4.reference.quant import dequant_fp4_weight, dequant_fp8_weight, kv_fp8_simulate
from tilev4.reference.rope import apply_rope

__all__ = ["KernelOps", "Linear", "ReferenceOps", "ops_for_device"]


@dataclass
class Linear:
    """A linear layer's weight as the checkpoint stores it.

    Attributes:
        weight: [N, K] float8_e4m3fn (FP8, with ``scale`` [⌈N/128⌉, ⌈K/128⌉] e8m0), [N, K/2] int8/uint8
            (packed FP4, with ``scale`` [N, K/32] e8m0), or [N, K] bf16/fp32 (``scale`` None).
        scale: the e8m0 block scales, or None.
    """

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _dense64: torch.Tensor | None = field(default=None, repr=False)

    def dense(self) -> torch.Tensor:
        """The dequantised fp32 weight [N, K] (computed once, then cached)."""
        if self._dense is None:
            w = self.weight
            if self.scale is None:
                self._dense = w.float()
            elif w.dtype == torch.float8_e4m3fn:
                self._dense = dequant_fp8_weight(w, self.scale, 128)
            else:
                self._dense = dequant_fp4_weight(w, self.scale, 32)
        return self._dense

    def dense64(self) -> torch.Tensor:
        """:meth:`dense` in fp64 (exact: every stored value is an fp32 number), cached."""
        if self._dense64 is None:
            self._dense64 = self.dense().double()
        return self._dense64


class ReferenceOps:
    """Every op on :mod:`tilev4.reference` (fp32 math, any device)."""

    name = "reference"

    @staticmethod
    def linear(x: torch.Tensor, lin: Linear) -> torch.Tensor:
        """``x @ Wᵀ`` rounded to fp32: x [..., K], W [N, K] → fp32 [..., N].

        Accumulated in fp64 and rounded once: a CPU BLAS picks its blocking (and so its fp32 summation
        order) by the number of rows, which would make a token's activations depend on how many tokens
        share the call (prefill vs decode) by an ulp — enough to move an FP8/FP4-simulated value across a
        rounding boundary now and then. With fp64 accumulation the rounded result is the same for any M
        (up to a ~1e-16 relative chance).
        """
        return (x.double() @ lin.dense64().T).float()  # [..., K] @ [K, N] -> [..., N]

    @staticmethod
    def grouped_linear(x: torch.Tensor, lin: Linear) -> torch.Tensor:
        """Group g of ``x`` through rows ``g·R … g·R + R − 1`` of W: x [..., G, K], W [G·R, K] → fp32 [..., G, R]
        (fp64 accumulation, as :meth:`linear`)."""
        g, k = x.shape[-2], x.shape[-1]
        w = lin.dense64().view(g, -1, k)  # [G, R, K]
        return torch.einsum("...gk,grk->...gr", x.double(), w).float()  # [..., G, K] @ [G, K, R] -> [..., G, R]

    rmsnorm = staticmethod(rmsnorm)
    apply_rope = staticmethod(apply_rope)
    kv_fp8_simulate = staticmethod(kv_fp8_simulate)
    compressor_prefill = staticmethod(_compressor.compressor_prefill)
    compressor_decode_step = staticmethod(_compressor.compressor_decode_step)
    indexer_prepare_queries = staticmethod(_indexer.indexer_prepare_queries)
    indexer_scores = staticmethod(_indexer.indexer_scores)
    indexer_topk = staticmethod(_indexer.indexer_topk)
    window_indices = staticmethod(_attention.window_indices)
    compressed_indices = staticmethod(_attention.compressed_indices)
    concat_key_sets = staticmethod(_attention.concat_key_sets)
    sparse_attention = staticmethod(_attention.sparse_attention)
    moe_gate = staticmethod(_moe.moe_gate)
    moe = staticmethod(_moe.moe)
    mhc_pre = staticmethod(_mhc.mhc_pre)
    mhc_post = staticmethod(_mhc.mhc_post)
    mhc_head = staticmethod(_mhc.mhc_head)


class KernelOps(ReferenceOps):
    """The CUDA backend: TileLang kernels where they are switched in (none yet, see the module docstring)."""

    name = "tilelang"


def ops_for_device(device: torch.device | str) -> ReferenceOps:
    """:class:`KernelOps` for a CUDA device, :class:`ReferenceOps` for everything else."""
    return KernelOps() if torch.device(device).type == "cuda" else ReferenceOps()
