"""tilev4: TileLang kernels for the DeepSeek-V4 architecture, with an fp32 reference.

Public ops run TileLang kernels on CUDA tensors; :mod:`tilev4.reference` holds the same math
in plain fp32 torch for the CPU and for tests.
"""

from tilev4.kernels import (
    compress_decode,
    compress_prefill,
    csa_attention,
    fp8_linear,
    fp8_quantize,
    grouped_linear,
    hca_attention,
    indexer_fp8_cast,
    indexer_logits,
    indexer_topk,
    linear,
    mhc_head_pre,
    mhc_post,
    mhc_pre,
    moe,
    moe_experts,
    moe_route,
    rmsnorm,
    sparse_attention,
    topk_select,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "compress_decode",
    "compress_prefill",
    "csa_attention",
    "fp8_linear",
    "fp8_quantize",
    "grouped_linear",
    "hca_attention",
    "indexer_fp8_cast",
    "indexer_logits",
    "indexer_topk",
    "linear",
    "mhc_head_pre",
    "mhc_post",
    "mhc_pre",
    "moe",
    "moe_experts",
    "moe_route",
    "rmsnorm",
    "sparse_attention",
    "topk_select",
]
