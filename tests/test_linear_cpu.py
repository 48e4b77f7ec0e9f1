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


# ------------------------------------------------------------------------------ the split-bf16 fp32 linear


def test_split_linear_registered_batch_invariant():
    kdef = get_kernel_def("linear")
    assert kdef.batch_invariant and kdef.space is not None and kdef.harness is not None
    assert {1024, 4096} <= {c["K"] for c in kdef.configs}


def test_three_bf16_parts_hold_any_fp32_exactly():
    """The split the kernel runs (x = hi + mid + lo, each the bf16 rounding of what is left) loses nothing, over
    random fp32 values spanning 80 binades, subnormal-free: the products with bf16 weights are then exact."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g) * torch.exp2(torch.randint(-40, 40, (100_000,), generator=g).float())
    hi = x.bfloat16()
    rest = x - hi.float()
    mid = rest.bfloat16()
    lo = (rest - mid.float()).bfloat16()
    assert torch.equal(hi.double() + mid.double() + lo.double(), x.double())


@pytest.mark.parametrize(
    ("fn", "x", "w", "exc", "match"),
    [
        ("linear", torch.zeros(4, 128), torch.zeros(64, 128), TypeError, "weight"),
        ("linear", torch.zeros(4, 96), torch.zeros(64, 96, dtype=torch.bfloat16), ValueError, "multiple of 64"),
        ("linear", torch.zeros(4, 64), torch.zeros(64, 128, dtype=torch.bfloat16), ValueError,
         r"x must have shape \[\.\.\., 128\]"),
        ("linear", torch.zeros(4, 128, dtype=torch.int32), torch.zeros(64, 128, dtype=torch.bfloat16), TypeError,
         "x"),
        ("linear", torch.zeros(4, 128), torch.zeros(64, 128, dtype=torch.bfloat16).t().contiguous().t(), ValueError,
         "weight"),
        ("linear", torch.zeros(4, 128), torch.zeros(64, 128, dtype=torch.bfloat16), ValueError, "CUDA"),
        ("grouped_linear", torch.zeros(4, 3, 128), torch.zeros(64, 128, dtype=torch.bfloat16), ValueError,
         "G=3 dividing"),
        ("grouped_linear", torch.zeros(128), torch.zeros(64, 128, dtype=torch.bfloat16), ValueError, "G, K"),
    ],
)
def test_split_linear_bad_input(fn, x, w, exc, match):
    with pytest.raises(exc, match=match):
        getattr(tilev4, fn)(x, w)
