"""tilev4: TileLang kernels for the DeepSeek-V4 architecture, with an fp32 reference.

Public ops run TileLang kernels on CUDA tensors; :mod:`tilev4.reference` holds the same math
in plain fp32 torch for the CPU and for tests.
"""

from tilev4.kernels import (
    compress_decode,
    compress_prefill,
    csa_attention,
    fp8_quantize,
    hca_attention,
    moe,
    moe_experts,
    moe_route,
    rmsnorm,
    sparse_attention,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "compress_decode",
    "compress_prefill",
    "csa_attention",
    "fp8_quantize",
    "hca_attention",
    "moe",
    "moe_experts",
    "moe_route",
    "rmsnorm",
    "sparse_attention",
]
