"""TileLang kernels. Importing this package registers every kernel in the registry."""

from tilev4.kernels.attention import csa_attention, hca_attention, sparse_attention
from tilev4.kernels.compressor import compress_decode, compress_prefill
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

__all__ = [
    "DEFAULT_AOT_ARCH",
    "KernelDef",
    "compile_kernel",
    "compress_decode",
    "compress_prefill",
    "csa_attention",
    "current_arch",
    "fp8_quantize",
    "get_kernel_def",
    "hca_attention",
    "iter_registry",
    "moe",
    "moe_combine",
    "moe_down",
    "moe_experts",
    "moe_permute",
    "moe_route",
    "moe_shared_expert",
    "moe_up",
    "registry_names",
    "rmsnorm",
    "sparse_attention",
]
