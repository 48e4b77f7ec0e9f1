"""``tilev4.fp8_linear`` without a GPU: registry entry and input validation (the math is in test_moe_gpu.py)."""

import pytest
import torch

import tilev4
from tilev4.kernels import get_kernel_def


def _w(n=256, k=256):
    return torch.zeros(n, k).to(torch.float8_e4m3fn), torch.ones(-(-n // 128), k // 128)


def test_registered_batch_invariant():
    kdef = get_kernel_def("fp8_linear")
    assert kdef.batch_invariant and {"K": 4096} in [dict(c) for c in kdef.configs]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"weight": torch.zeros(256, 256)}, TypeError, "weight"),
        ({"weight": torch.zeros(256, 200).to(torch.float8_e4m3fn)}, ValueError, "multiple of 128"),
        ({"x": torch.zeros(4, 128, dtype=torch.bfloat16)}, ValueError, r"x must have shape \[\.\.\., 256\]"),
        ({"x": torch.zeros(4, 256, dtype=torch.int32)}, TypeError, "x"),
        ({"scale": torch.ones(2, 3)}, ValueError, "scale"),
        ({"scale": torch.ones(2, 2, dtype=torch.float16)}, TypeError, "scale"),
        ({}, ValueError, "CUDA"),
    ],
)
def test_bad_input(kwargs, exc, match):
    w, s = _w()
    args = {"x": torch.zeros(4, 256, dtype=torch.bfloat16), "weight": w, "scale": s, **kwargs}
    with pytest.raises(exc, match=match):
        tilev4.fp8_linear(args["x"], args["weight"], args["scale"])


def test_bad_out_dtype():
    w, s = _w()
    with pytest.raises(TypeError, match="out_dtype"):
        tilev4.fp8_linear(torch.zeros(4, 256, dtype=torch.bfloat16), w, s, out_dtype=torch.float16)
