"""The reference's building blocks (quantisation, rmsnorm, Hadamard, RoPE) against naive math."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilev4 import reference as R

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def naive_fp8_block(x: list[float]) -> list[float]:
    """One ue8m0 FP8 block, element by element from the spec text."""
    amax = max(max(abs(v) for v in x), 1e-4)
    scale = 2.0 ** math.ceil(math.log2(amax / 448.0))
    out = []
    for v in x:
        q = float(torch.tensor(v / scale).to(torch.float8_e4m3fn).float())
        out.append(q * scale)
    return out


def naive_fp4_value(y: float) -> float:
    """Round y (|y| <= 6) to the e2m1 grid, ties to the even-mantissa code."""
    a = abs(y)
    best = min(range(8), key=lambda i: (abs(GRID[i] - a), i % 2))  # even code = even mantissa
    return math.copysign(GRID[best], y) if GRID[best] else 0.0


def test_fp8_matches_naive(gen):
    x = torch.randn(3, 256, generator=gen) * torch.tensor([1e-3, 1.0, 300.0]).repeat_interleave(1).view(3, 1)
    got = R.fp8_e4m3_simulate(x, block=64)
    for r in range(3):
        for b in range(4):
            blk = x[r, b * 64 : (b + 1) * 64].tolist()
            assert got[r, b * 64 : (b + 1) * 64].tolist() == naive_fp8_block(blk)


def test_fp8_scale_is_power_of_two_and_rounded_up(gen):
    x = torch.randn(8, 128, generator=gen) * 10
    q, s = R.fp8_e4m3_quantize(x, 128)
    e = torch.log2(s)
    assert torch.equal(e, torch.round(e))
    amax = x.abs().amax(-1, keepdim=True)  # [8, 1], one block per row
    assert (s * 448 >= amax).all() and (s * 224 < amax).all()
    assert q.dtype == torch.float8_e4m3fn


def test_fp8_amax_floor():
    x = torch.zeros(1, 128)
    _, s = R.fp8_e4m3_quantize(x, 128)
    assert s.item() == 2.0 ** math.ceil(math.log2(1e-4 / 448))
    assert torch.equal(R.fp8_e4m3_simulate(x), x)


def test_fp4_matches_naive(gen):
    x = torch.randn(4, 64, generator=gen) * 3
    got = R.fp4_e2m1_simulate(x, 32)
    for r in range(4):
        for b in range(2):
            blk = x[r, b * 32 : (b + 1) * 32].tolist()
            amax = max(max(abs(v) for v in blk), 6 * 2.0**-126)
            scale = 2.0 ** math.ceil(math.log2(amax / 6))
            want = [naive_fp4_value(v / scale) * scale for v in blk]
            assert got[r, b * 32 : (b + 1) * 32].tolist() == want


def test_fp4_ties_round_to_even():
    # a block whose amax is exactly 6 keeps scale 1, so the midpoints are seen as they are
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    x = torch.tensor([[*mids, 6.0] + [0.0] * 24])
    got = R.fp4_e2m1_simulate(x)[0, :8].tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-20, 20), block=st.sampled_from([32, 64, 128]))
def test_quant_idempotent(seed, log_scale, block):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 256, generator=g) * 2.0**log_scale
    y8 = R.fp8_e4m3_simulate(x, block)
    assert torch.equal(R.fp8_e4m3_simulate(y8, block), y8)
    y4 = R.fp4_e2m1_simulate(x, 32)
    assert torch.equal(R.fp4_e2m1_simulate(y4, 32), y4)
    assert not torch.isnan(y8).any() and not torch.isnan(y4).any()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), exp=st.integers(-22, 30))
def test_quant_exact_on_representable(seed, exp):
    # exp >= -22 keeps the FP8 block amax (448·2^exp) above the 1e-4 floor; below it the
    # floored scale is larger than needed, and exactness is not promised.
    g = torch.Generator().manual_seed(seed)
    # FP4: grid values times one power of two per block, with 6 present so the scale is exact
    codes = torch.randint(0, 8, (2, 32), generator=g)
    signs = torch.where(torch.rand(2, 32, generator=g) < 0.5, -1.0, 1.0)
    v = torch.tensor(GRID)[codes] * signs
    v[:, 0] = 6.0
    x4 = v * 2.0**exp
    assert torch.equal(R.fp4_e2m1_simulate(x4), x4)
    # FP8: any e4m3 value times a power of two, with 448 present
    e4 = (torch.randn(2, 128, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    e4[:, 0] = 448.0
    x8 = e4 * 2.0**exp
    assert torch.equal(R.fp8_e4m3_simulate(x8, 128), x8)


def test_fp4_pack_roundtrip_and_layout(gen):
    v, _ = R.fp4_e2m1_quantize(torch.randn(3, 64, generator=gen))
    p = R.pack_fp4(v)
    assert p.dtype == torch.uint8 and p.shape == (3, 32)
    assert torch.equal(R.unpack_fp4(p), v)
    # low nibble = even element: [1.0, -6.0] → codes 2 and 8|7
    assert R.pack_fp4(torch.tensor([[1.0, -6.0]])).item() == 2 | (15 << 4)


def test_e8m0_and_weight_dequant(gen):
    s = torch.tensor([2.0**-3, 1.0, 2.0**5])
    assert torch.equal(R.e8m0_decode(R.e8m0_encode(s)), s)
    w = (torch.randn(200, 300, generator=gen) * 10).to(torch.float8_e4m3fn)
    sc = torch.exp2(torch.randint(-4, 4, (2, 3), generator=gen).float())
    got = R.dequant_fp8_weight(w, sc)
    assert got[130, 260].item() == w[130, 260].float().item() * sc[1, 2].item()
    v, s4 = R.fp4_e2m1_quantize(torch.randn(4, 64, generator=gen))
    assert torch.equal(R.dequant_fp4_weight(R.pack_fp4(v), R.e8m0_encode(s4)), R.fp4_e2m1_simulate(
        (v.view(4, 2, 32) * s4.unsqueeze(-1)).view(4, 64)))


def test_kv_fp8_keeps_rope_dims(gen):
    kv = torch.randn(2, 5, 512, generator=gen)
    y = R.kv_fp8_simulate(kv)
    assert torch.equal(y[..., 448:], kv[..., 448:])
    assert torch.equal(y[..., :448], R.fp8_e4m3_simulate(kv[..., :448], 64))


def test_rmsnorm_naive(gen):
    x = torch.randn(3, 16, generator=gen)
    w = torch.randn(16, generator=gen)
    got = R.rmsnorm(x, w)
    for r in range(3):
        ms = sum(v * v for v in x[r].tolist()) / 16
        want = [v / math.sqrt(ms + 1e-6) * wv for v, wv in zip(x[r].tolist(), w.tolist())]
        # fp32 vs python double arithmetic: a few ulps
        torch.testing.assert_close(got[r], torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_hadamard_naive_and_orthonormal(gen):
    n = 16
    x = torch.randn(2, n, generator=gen)
    got = R.hadamard_rotate(x)
    for i in range(n):
        # H[i, j] = (-1)^popcount(i & j) for the Sylvester ordering
        want = sum(x[:, j] * (-1) ** bin(i & j).count("1") for j in range(n)) / math.sqrt(n)
        torch.testing.assert_close(got[:, i], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(R.hadamard_rotate(got), x, rtol=1e-5, atol=1e-5)  # H/√n is an involution


def test_rope_naive(gen):
    cfg = R.RopeConfig(rope_dim=8, theta=10000.0)
    x = torch.randn(1, 2, 12, generator=gen)
    pos = torch.tensor([[3, 1000]])
    got = R.apply_rope(x, pos, cfg)
    assert torch.equal(got[..., :4], x[..., :4])
    for s in range(2):
        for i in range(4):
            f = 1.0 / 10000 ** (2 * i / 8)
            a, b = x[0, s, 4 + 2 * i].item(), x[0, s, 5 + 2 * i].item()
            c = complex(a, b) * complex(math.cos(pos[0, s].item() * f), math.sin(pos[0, s].item() * f))
            assert abs(got[0, s, 4 + 2 * i].item() - c.real) < 1e-4
            assert abs(got[0, s, 5 + 2 * i].item() - c.imag) < 1e-4
    torch.testing.assert_close(R.apply_rope(got, pos, cfg, inverse=True), x, rtol=1e-5, atol=1e-5)


def test_yarn_frequencies():
    base = R.rope_frequencies(R.RopeConfig(theta=160000.0))
    yarn = R.rope_frequencies(R.RopeConfig.compressed())
    d = 64
    low = math.floor(d * math.log(65536 / (32 * 2 * math.pi)) / (2 * math.log(160000)))
    high = math.ceil(d * math.log(65536 / (1 * 2 * math.pi)) / (2 * math.log(160000)))
    for i in range(32):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        want = base[i].item() * (1 - ramp) + base[i].item() / 16 * ramp
        assert abs(yarn[i].item() - want) <= 1e-6 * base[i].item()
    assert yarn[0] == base[0] and torch.allclose(yarn[-1], base[-1] / 16)


@pytest.mark.parametrize(
    ("fn", "args", "exc", "match"),
    [
        (R.fp8_e4m3_simulate, (torch.randn(2, 100),), ValueError, "block=128"),
        (R.fp8_e4m3_simulate, (torch.randint(0, 3, (2, 128)),), TypeError, "x must be"),
        (R.fp4_e2m1_simulate, ([1.0, 2.0],), TypeError, "torch.Tensor"),
        (R.rmsnorm, (torch.randn(2, 8), torch.randn(9)), ValueError, "weight"),
        (R.hadamard_matrix, (12,), ValueError, "power of two"),
        (R.apply_rope, (torch.randn(2, 3, 64), torch.arange(3), R.RopeConfig()), ValueError, "positions"),
        (R.pack_fp4, (torch.tensor([[0.7, 1.0]]),), ValueError, "e2m1 grid"),
        (R.e8m0_encode, (torch.tensor([3.0]),), ValueError, "powers of two"),
    ],
)
def test_bad_input(fn, args, exc, match):
    with pytest.raises(exc, match=match):
        fn(*args)
