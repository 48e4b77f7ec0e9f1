"""TileLang kernels. Importing this package registers every kernel in the registry."""

from tilev4.kernels.attention import csa_attention, hca_attention, sparse_attention
from tilev4.kernels.compressor import compress_decode, compress_prefill
from tilev4.kernels.indexer import indexer_fp8_cast, indexer_logits, indexer_topk, topk_select
from tilev4.kernels.linear import fp8_linear
from tilev4.kernels.mhc import mhc_head_pre, mhc_post, mhc_pre
from tilev4.kernels.moe import (
    moe,
    moe_combine,
    moe_down,
    moe_experts,
    moe_permute,
    moe_route,
    moe_shared_expert,
    moe_up,
)
from tilev4.kernels.moe_fp4 import FP4Weight, moe_down_fp4, moe_up_fp4, prepare_fp4_weight, quantize_fp4_weight
from tilev4.kernels.moe_fp8 import FP8Weight, moe_down_fp8, moe_up_fp8, quantize_fp8_weight
from tilev4.kernels.quant import fp8_quantize
from tilev4.kernels.registry import (
    DEFAULT_AOT_ARCH,
    KernelDef,
    compile_kernel,
    current_arch,
    get_kernel_def,
    iter_registry,
    registry_names,
)
from tilev4.kernels.rmsnorm import rmsnorm
from tilev4.kernels.split_linear import grouped_linear, linear

__all__ = [
    "DEFAULT_AOT_ARCH",
    "FP4Weight",
    "FP8Weight",
    "KernelDef",
    "compile_kernel",
    "compress_decode",
    "compress_prefill",
    "csa_attention",
    "current_arch",
    "fp8_linear",
    "fp8_quantize",
    "get_kernel_def",
    "grouped_linear",
    "hca_attention",
    "indexer_fp8_cast",
    "indexer_logits",
    "indexer_topk",
    "iter_registry",
    "linear",
    "mhc_head_pre",
    "mhc_post",
    "mhc_pre",
    "moe",
    "moe_combine",
    "moe_down",
    "moe_down_fp4",
    "moe_down_fp8",
    "moe_experts",
    "moe_permute",
    "moe_route",
    "moe_shared_expert",
    "moe_up",
    "moe_up_fp4",
    "moe_up_fp8",
    "prepare_fp4_weight",
    "quantize_fp4_weight",
    "quantize_fp8_weight",
    "registry_names",
    "rmsnorm",
    "sparse_attention",
    "topk_select",
]
