"""rmsnorm and fp8_quantize kernels against the fp32 reference (GPU), their batch invariance (GPU, hypothesis), and
their input checks (CPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tilev4
from tilev4 import reference as R

gpu = pytest.mark.gpu
BF16_ULP = 2.0**-8  # bf16 has 8 significant bits: one rounding step is at most this, relatively


def _cuda_randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda") * scale


@gpu
@pytest.mark.parametrize(("n", "d"), [(1, 4096), (37, 4096), (300, 7168), (5, 512), (64, 1536)])
def test_rmsnorm_matches_reference(n, d):
    x = _cuda_randn(n, d, seed=n * d, scale=3.0).bfloat16()
    w = _cuda_randn(d, seed=d + 1).float()
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    y = tilev4.rmsnorm(x, w, out=out)
    ref = R.rmsnorm(x.cpu(), w.cpu())
    assert not torch.isnan(y).any()
    # the kernel sums x² in another order than torch: the fp32 result differs by a few ulps,
    # which can move the bf16 rounding by one step — hence one bf16 ulp, relative
    torch.testing.assert_close(y.cpu().float(), ref, rtol=BF16_ULP, atol=1e-6)


@gpu
def test_rmsnorm_batch_invariant():
    x = _cuda_randn(64, 4096, seed=7).bfloat16()
    w = _cuda_randn(4096, seed=8).float()
    full = tilev4.rmsnorm(x, w)
    for n in (1, 3, 17, 63):
        assert torch.equal(tilev4.rmsnorm(x[:n].contiguous(), w), full[:n])
    assert torch.equal(tilev4.rmsnorm(x[40:41].contiguous(), w), full[40:41])


def _row_batches(row: torch.Tensor, n1: int, at1: int, n2: int, at2: int, seed: int):
    """``(x, at)``: ``row`` at row ``at1 % n1`` of ``n1`` random rows, at ``at2 % n2`` of ``n2`` others, and alone."""
    out = []
    for i, (n, at) in enumerate(((n1, at1 % n1), (n2, at2 % n2))):
        x = _cuda_randn(n, row.shape[-1], seed=seed + 10 + i, scale=3.0).bfloat16()
        x[at] = row
        out.append((x, at))
    return [*out, (row.view(1, -1), 0)]


_INVARIANCE = dict(n1=st.integers(1, 300), n2=st.integers(1, 300), at1=st.integers(0, 299), at2=st.integers(0, 299),
                   seed=st.integers(0, 2**20))


@gpu
@settings(max_examples=10, deadline=None)
@given(d=st.sampled_from([512, 1536, 4096, 7168]), **_INVARIANCE)
def test_rmsnorm_row_is_batch_invariant(d, n1, n2, at1, at2, seed):
    """A row's bits do not depend on the batch's size, the row's place in it or the other rows (one row alone too)."""
    row = _cuda_randn(d, seed=seed, scale=3.0).bfloat16()
    w = _cuda_randn(d, seed=seed + 1).float()
    ys = [tilev4.rmsnorm(x, w, out=torch.full_like(x, float("nan")))[at]
          for x, at in _row_batches(row, n1, at1, n2, at2, seed)]
    assert not torch.isnan(ys[-1]).any()
    for y in ys[:-1]:
        assert torch.equal(y.view(torch.int16), ys[-1].view(torch.int16))


@gpu
@settings(max_examples=10, deadline=None)
@given(k=st.sampled_from([128, 2048, 4096, 7168]), **_INVARIANCE)
def test_fp8_quantize_row_is_batch_invariant(k, n1, n2, at1, at2, seed):
    """fp8_quantize: a row's bytes and scales do not depend on the batch (nor on the row's place or the others)."""
    row = _cuda_randn(k, seed=seed, scale=5.0).bfloat16()
    rows = []
    for x, at in _row_batches(row, n1, at1, n2, at2, seed):
        q = torch.full(x.shape, float("nan"), device="cuda").to(torch.float8_e4m3fn)
        s = torch.full((x.shape[0], k // 128), float("nan"), device="cuda")
        q, s = tilev4.fp8_quantize(x, out=(q, s))
        rows.append((q[at].view(torch.uint8), s[at]))
    assert not torch.isnan(rows[-1][1]).any()
    for q, s in rows[:-1]:
        assert torch.equal(q, rows[-1][0]) and torch.equal(s, rows[-1][1])


@gpu
@pytest.mark.parametrize(("n", "k"), [(1, 4096), (33, 4096), (257, 7168), (8, 2048)])
def test_fp8_quantize_bit_exact(n, k):
    x = _cuda_randn(n, k, seed=n + k, scale=5.0)
    x[0, :128] *= 1e-6  # a block under the amax floor
    x[-1, 128:256] = 448.0 * 2.0**-3  # a block whose amax is exactly 448·2^k
    x = x.bfloat16()
    q = torch.full((n, k), float("nan"), device="cuda").to(torch.float8_e4m3fn)
    s = torch.full((n, k // 128), float("nan"), device="cuda")
    q, s = tilev4.fp8_quantize(x, out=(q, s))
    q_ref, s_ref = R.fp8_e4m3_quantize(x.cpu(), 128)
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))


@gpu
def test_empty_inputs():
    x = torch.empty(0, 4096, device="cuda", dtype=torch.bfloat16)
    assert tilev4.rmsnorm(x, torch.ones(4096, device="cuda")).shape == (0, 4096)
    q, s = tilev4.fp8_quantize(x)
    assert q.shape == (0, 4096) and s.shape == (0, 32)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: tilev4.rmsnorm(torch.randn(4, 64), torch.ones(64)), TypeError, "x must be bfloat16"),
        (lambda: tilev4.rmsnorm(torch.randn(4, 64).bfloat16(), torch.ones(64)), ValueError, "CUDA"),
        (lambda: tilev4.rmsnorm(torch.randn(64, 4).bfloat16().t(), torch.ones(64)), ValueError, "contiguous"),
        (lambda: tilev4.fp8_quantize(torch.randn(4, 128)), TypeError, "x must be bfloat16"),
        (lambda: tilev4.fp8_quantize(torch.randn(4, 4, 128).bfloat16()), ValueError, "2 dimensions"),
        (lambda: tilev4.fp8_quantize("x"), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@gpu
def test_bad_input_on_gpu():
    x = torch.randn(4, 100, device="cuda").bfloat16()
    with pytest.raises(ValueError, match="multiple of 128"):
        tilev4.fp8_quantize(x)
    with pytest.raises(ValueError, match="weight"):
        tilev4.rmsnorm(x, torch.ones(99, device="cuda"))
