"""The DeepSeek-V4 spec (``shared/spec/deepseek-v4.md``) as plain fp32 torch.

Every kernel in :mod:`tilev4.kernels` is tested against these functions, and the CPU
path of :mod:`tilev4.model` runs on them. They favour clarity over speed, run on any
device, validate their inputs and return fp32.
"""

from tilev4.reference.norm import hadamard_matrix, hadamard_rotate, rmsnorm
from tilev4.reference.quant import (
    FP4_E2M1_GRID,
    FP4_MAX,
    FP8_E4M3_MAX,
    dequant_fp4_weight,
    dequant_fp8_weight,
    e8m0_decode,
    e8m0_encode,
    fp4_e2m1_quantize,
    fp4_e2m1_simulate,
    fp8_e4m3_quantize,
    fp8_e4m3_simulate,
    kv_fp8_simulate,
    pack_fp4,
    unpack_fp4,
)
from tilev4.reference.rope import RopeConfig, apply_rope, rope_frequencies

__all__ = [
    "FP4_E2M1_GRID",
    "FP4_MAX",
    "FP8_E4M3_MAX",
    "RopeConfig",
    "apply_rope",
    "dequant_fp4_weight",
    "dequant_fp8_weight",
    "e8m0_decode",
    "e8m0_encode",
    "fp4_e2m1_quantize",
    "fp4_e2m1_simulate",
    "fp8_e4m3_quantize",
    "fp8_e4m3_simulate",
    "hadamard_matrix",
    "hadamard_rotate",
    "kv_fp8_simulate",
    "pack_fp4",
    "rmsnorm",
    "rope_frequencies",
    "unpack_fp4",
]
