"""rmsnorm and fp8_quantize kernels against the fp32 reference (GPU), and their input checks (CPU)."""

import pytest
import torch

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
