"""``tilev4.linear`` / ``tilev4.grouped_linear`` (fp32 x split into three bf16 parts, bf16 W) on the GPU.

Reference: fp64 math on the same inputs. Bound per output (:func:`tilev4.kernels.split_linear.split_linear_bound`):
the split is exact and bf16 × bf16 products are exact, so the error is the fp32 accumulation — one truncation per
16-term tensor-core step for each of the three partial GEMMs, relative to Σ|x·w| — plus the final fp32 rounding.
An activation rounded to bf16 instead of split would be off by ~2^-9 relative, hundreds of times the bound for
K >= 128; a wrong row, column or group is off by the size of the output. Outputs are compared bit for bit where
batch invariance is claimed; NaN never passes.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tilev4
from tilev4.kernels.split_linear import split_linear_bound

pytestmark = pytest.mark.gpu


def _x(shape, g, spread=8.0):
    """fp32 values over ~2·spread binades (all 24 mantissa bits matter)."""
    x = torch.randn(*shape, generator=g, device="cuda")
    return x * torch.exp2(torch.randn(*shape, generator=g, device="cuda") * spread / 3).round()


def _check(y, x, w):
    assert not torch.isnan(y).any()
    ref = x.double() @ w.double().T
    excess = (y.double() - ref).abs() - split_linear_bound(x, w)
    assert (excess <= 0).all(), f"max excess {excess.max().item():.3g}"


@pytest.mark.parametrize(("m", "n", "k"), [(1, 1024, 1024), (5, 8, 128), (64, 100, 256), (65, 4096, 1024),
                                            (300, 200, 2048), (1000, 640, 4096)])
def test_linear_matches_fp64(m, n, k):
    g = torch.Generator(device="cuda").manual_seed(m * 7 + n)
    x = _x((m, k), g)
    w = (torch.randn(n, k, generator=g, device="cuda") * k**-0.5).bfloat16()
    y = tilev4.linear(x, w)
    assert y.shape == (m, n) and y.dtype == torch.float32
    _check(y, x, w)
    # a bf16-rounded activation would fail the bound: the test can tell the split from a plain bf16 GEMM
    yb = (x.bfloat16().double() @ w.double().T)
    assert ((yb - x.double() @ w.double().T).abs() > split_linear_bound(x, w)).any()


@pytest.mark.parametrize(("m", "g", "r", "k"), [(1, 4, 256, 2048), (37, 2, 128, 2048), (130, 8, 64, 512)])
def test_grouped_linear_matches_fp64(m, g, r, k):
    gen = torch.Generator(device="cuda").manual_seed(m + g)
    x = _x((m, g, k), gen)
    w = (torch.randn(g * r, k, generator=gen, device="cuda") * k**-0.5).bfloat16()
    y = tilev4.grouped_linear(x, w)
    assert y.shape == (m, g, r)
    for j in range(g):
        _check(y[:, j], x[:, j], w[j * r : (j + 1) * r])


def test_leading_dims_and_input_dtypes():
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = _x((2, 3, 5, 256), gen)
    w = (torch.randn(96, 256, generator=gen, device="cuda") * 0.06).bfloat16()
    y = tilev4.linear(x, w)
    assert torch.equal(y, tilev4.linear(x.reshape(-1, 256), w).view(2, 3, 5, 96))
    xb = x.bfloat16()
    assert torch.equal(tilev4.linear(xb, w), tilev4.linear(xb.float(), w))
    assert tilev4.linear(x[:0], w).shape == (0, 3, 5, 96)
    xs = _x((7, 320), gen)[:, 64:]  # a strided view: made contiguous
    assert torch.equal(tilev4.linear(xs, w), tilev4.linear(xs.contiguous(), w))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 300), row=st.data(), grouped=st.booleans())
def test_rows_are_batch_invariant(m, row, grouped):
    """A row's output is bitwise the same alone and inside a batch of any size, at any position."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    k = 1024
    w = (torch.randn(512, k, generator=gen, device="cuda") * k**-0.5).bfloat16()
    x = _x((300, 4, k) if grouped else (300, k), gen)
    r = row.draw(st.integers(0, m - 1))
    op = tilev4.grouped_linear if grouped else tilev4.linear
    full = op(x[:m], w)
    assert torch.equal(op(x[r : r + 1], w)[0], full[r])
