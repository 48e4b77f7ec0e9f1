"""CPU tests of the lightning-indexer ops: the FP8 storage helper, the scale folding the kernel relies on,
input validation and the registry (the kernels themselves run in tests/test_indexer_gpu.py)."""

import math

import pytest
import torch

import tilev4
from tilev4.kernels import get_kernel_def
from tilev4.kernels.indexer import _MAX_TOPK_N, _topk_key_bits, indexer_fp8_cast
from tilev4.reference.indexer import indexer_scores
from tilev4.reference.quant import fp4_e2m1_simulate


def _fp4(*shape, g, spread=0.0):
    """FP4-simulated values (block 32) whose blocks' magnitudes differ by up to 2^spread."""
    x = torch.randn(*shape, generator=g)
    if spread:
        blocks = x.shape[-1] // 32
        x = x * torch.exp2(torch.rand(*shape[:-1], blocks, generator=g) * -spread).repeat_interleave(32, -1)
    return fp4_e2m1_simulate(x, block=32)


def test_fp8_cast_is_exact_on_fp4_values(gen):
    x = _fp4(3, 5, 64, 128, g=gen, spread=12.0)  # blocks up to 2^12 apart within a row
    x[0, 0, 0] = 0.0  # a zero row
    x[1, 2, 3, :64] = 0.0
    x8, scale = indexer_fp8_cast(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    assert torch.equal(x8.float() * scale.unsqueeze(-1), x)
    # scales are powers of two and the row maximum sits in (224, 448]
    mant, _ = torch.frexp(scale)
    assert (mant == 0.5).all()
    amax = x8.float().abs().amax(-1)
    nonzero = x.abs().amax(-1) > 0
    assert ((amax[nonzero] > 224) & (amax[nonzero] <= 448)).all()
    # bf16 input of the same values gives the same storage
    x8b, scaleb = indexer_fp8_cast(x.bfloat16())
    assert torch.equal(x8b.view(torch.uint8), x8.view(torch.uint8)) and torch.equal(scaleb, scale)


def test_fp8_cast_rejects_inexact_values_unless_asked(gen):
    x = _fp4(4, 128, g=gen)
    x[2, 5] = x[2].abs().max() * 2.0**-30  # a lone value 2^30 below its row's maximum: under e4m3's range
    with pytest.raises(ValueError, match=r"not exactly representable.*first at \[2, 5\]"):
        indexer_fp8_cast(x)
    x8, scale = indexer_fp8_cast(x, exact=False)
    back = x8.float() * scale.unsqueeze(-1)
    assert torch.equal(back[[0, 1, 3]], x[[0, 1, 3]]) and back[2, 5] == 0
    with pytest.raises(ValueError, match="x must be finite"):
        indexer_fp8_cast(torch.tensor([[1.0, math.inf]]))
    with pytest.raises(TypeError, match="x must be"):
        indexer_fp8_cast(torch.ones(2, 4, dtype=torch.int32))


def test_scale_folding_reproduces_the_reference(gen):
    """What the kernel computes, I = s_k · Σ_h (w·s_q) · ReLU(q8 · k8), equals the reference's scores."""
    b, s, h, d, n = 2, 3, 64, 128, 40
    q = _fp4(b, s, h, d, g=gen, spread=3.0)
    k = _fp4(b, n, d, g=gen, spread=3.0)
    w = torch.randn(b, s, h, generator=gen)
    positions = torch.tensor([[0, 50, 400], [3, 4, 159]])
    q8, qs = indexer_fp8_cast(q)
    k8, ks = indexer_fp8_cast(k)
    acc = torch.einsum("bshd,bcd->bshc", q8.double(), k8.double())  # exact: integer-valued products
    folded = torch.einsum("bshc,bsh->bsc", acc.relu(), (w * qs).double()) * ks.double().unsqueeze(1)
    ref = indexer_scores(q, w, k, positions)
    visible = torch.isfinite(ref)
    assert torch.equal(visible, torch.arange(n) < ((positions + 1) // 4).unsqueeze(-1))
    # the reference sums in fp32: ~1e-6 relative to the sum of |terms|
    bound = torch.einsum("bshc,bsh->bsc", torch.einsum("bshd,bcd->bshc", q.double(), k.double()).relu(),
                         w.double().abs())
    assert ((folded - ref.double()).abs()[visible] <= 1e-5 * bound[visible] + 1e-30).all()


def test_topk_key_fits_64_bits_in_whole_digits():
    for n in (1, 2, 3, 1000, 1024, 1025, 32768, 262144, _MAX_TOPK_N):
        for digit_bits in (10, 11, 12):  # 256, 512, 1024 threads (4 histogram bins each)
            ib, pad = _topk_key_bits(n, digit_bits)
            assert (n - 1) < 2**ib and (32 + ib + pad) % digit_bits == 0 and 32 + ib + pad <= 64


def test_registry_entries():
    logits = get_kernel_def("indexer_logits")
    assert {(c["H"], c["D"]) for c in logits.configs} == {(64, 128), (8, 128)} and logits.batch_invariant
    topk = get_kernel_def("topk_select")
    assert {c["K"] for c in topk.configs} == {512, 1024, 32} and topk.batch_invariant


def _logits_args(b=1, s=2, n=8, h=64, d=128):
    return {
        "q8": torch.zeros(b, s, h, d, dtype=torch.float8_e4m3fn),
        "q_scale": torch.ones(b, s, h),
        "w": torch.ones(b, s, h),
        "k8": torch.zeros(b, n, d, dtype=torch.float8_e4m3fn),
        "k_scale": torch.ones(b, n),
        "positions": torch.tensor([[7, 8]] * b),
    }


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"q8": torch.zeros(1, 2, 64, 128)}, TypeError, "q8 must be"),
        ({"q8": torch.zeros(1, 2, 12, 128, dtype=torch.float8_e4m3fn)}, ValueError,
         r"H in \(8, 16, 32, 64\) heads of D=128, got H=12"),
        ({"q_scale": torch.ones(1, 2, 63)}, ValueError, r"q_scale must have shape \[1, 2, 64\]"),
        ({"w": torch.ones(1, 2, 64, dtype=torch.int32)}, TypeError, "w must be"),
        ({"k8": torch.zeros(1, 8, 64, dtype=torch.float8_e4m3fn)}, ValueError, r"k8 must have shape \[1, \*, 128\]"),
        ({"k_scale": torch.ones(1, 9)}, ValueError, r"k_scale must have shape \[1, 8\]"),
        ({"positions": torch.tensor([[7.0, 8.0]])}, TypeError, "positions must be"),
        ({"ratio": 8}, ValueError, r"ratio must be one of \[4, 128\], got 8"),
        ({"k_lens": torch.tensor([1, 2])}, ValueError, r"k_lens must have shape \[1\]"),
        ({}, ValueError, "q8 must be a CUDA tensor"),
    ],
)
def test_indexer_logits_bad_inputs(change, error, match):
    args = _logits_args()
    args.update(change)
    with pytest.raises(error, match=match):
        tilev4.indexer_logits(**args)


def test_indexer_topk_bad_inputs():
    with pytest.raises(ValueError, match="q8 must be a CUDA tensor"):
        tilev4.indexer_topk(**_logits_args(), top_k=512)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((torch.zeros(2, 8, dtype=torch.float64), 4), {}, TypeError, "logits must be"),
        ((torch.zeros(2, 8), 0), {}, ValueError, "k must be >= 1, got 0"),
        ((torch.zeros(2, 8), 4096), {}, ValueError, "k must be <= 2048, got 4096"),
        ((torch.zeros(2, 8), 4.0), {}, TypeError, "k must be an int"),
        ((torch.zeros(2, 8), 4), {"offset": -1}, ValueError, "offset must be >= 0, got -1"),
        ((torch.zeros(2, 8), 4), {"lengths": torch.tensor([1, 2, 3])}, ValueError, r"lengths must have shape \[2\]"),
        ((torch.zeros(2, 8).t(), 4), {}, ValueError, "logits must be contiguous"),
        ((torch.zeros(2, 8), 4), {}, ValueError, "logits must be a CUDA tensor"),
        ((torch.zeros(()), 4), {}, ValueError, "at least 1 dim"),
    ],
)
def test_topk_select_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        tilev4.topk_select(*args, **kwargs)


def test_topk_select_rejects_too_many_entries():
    big = torch.empty(1, _MAX_TOPK_N + 1, device="meta")
    with pytest.raises(ValueError, match=f"N must be <= {_MAX_TOPK_N}"):
        tilev4.topk_select(big, 4)
