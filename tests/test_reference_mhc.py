"""CPU tests of the fp32 mHC reference against naive loops written from the spec text.

The naive functions below use Python floats (fp64) and explicit loops over streams, rows and
columns; they share no code with :mod:`tilev4.reference.mhc`.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilev4.reference.mhc import (
    mhc_coefficients,
    mhc_head,
    mhc_mix,
    mhc_post,
    mhc_pre,
    sinkhorn,
)

EPS = 1e-6
N = 4  # streams

# Every comparison also runs with a large eps (LARGE_EPS) and a distinct norm_eps: with the V4 value
# 1e-6 a missing or misplaced epsilon changes results by ~1e-6 relative, below any honest fp32
# tolerance, while 0.05 makes each use of eps visible.
LARGE_EPS = 0.05
EPS_CASES = [(EPS, 1e-6), (LARGE_EPS, 0.01)]  # (eps, norm_eps)

# Tolerances (fp32 reference vs fp64 naive loops):
# * Sinkhorn entries lie in [0, 1]; each of the 2·iters normalisations rounds every entry by a few
#   ulps of 1 (1.2e-7) and the iteration does not amplify earlier errors (it is a contraction in
#   Hilbert's projective metric). Measured worst over 6000 random 4×4 inputs with logits of std
#   1, 3 and 10: 2.0e-7. 1e-6 (~8 ulps of 1) leaves headroom without hiding a wrong step (a
#   missing round or a row/column swap moves entries by > 1e-3).
SINKHORN_ATOL = 1e-6
# * mix: a 4·dim = 32-term fp32 dot product of O(1) terms, error <= 32·u·Σ|terms| ≈ 2e-6 · |mix|
#   in the worst case; the inputs give |mix| = O(1), so atol 1e-5 / rtol 1e-5 bound it with margin.
MIX_TOL = {"atol": 1e-5, "rtol": 1e-5}
# * pre/post go through sigmoid (Lipschitz 1/4) of a quantity with the error above: 1e-5 again.
COEF_TOL = {"atol": 1e-5, "rtol": 1e-5}
# * x = rmsnorm(Σ_i pre_i h_i) and h' are O(1) values built from ~4 + dim fp32 terms whose inputs
#   carry the 1e-5 errors above: atol 2e-5 / rtol 2e-5.
OUT_TOL = {"atol": 2e-5, "rtol": 2e-5}
# * head logits: a dim-term (8) dot product of the O(1) normalised x (error 2e-5) with O(1)
#   weights: |Δ| <= Σ|w|·2e-5 ≈ 1.6e-4 worst case; use atol 1e-4 / rtol 1e-5 (typical error 1e-6).
HEAD_TOL = {"atol": 1e-4, "rtol": 1e-5}


# --------------------------------------------------------------------------- naive spec loops


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def naive_sinkhorn(logits: list[list[float]], iters: int, eps: float = EPS) -> list[list[float]]:
    """Spec: softmax over k, + eps; columns ÷ (sum + eps); iters−1 × (rows ÷, columns ÷)."""
    c = [[0.0] * N for _ in range(N)]
    for j in range(N):
        m = max(logits[j])
        e = [math.exp(logits[j][k] - m) for k in range(N)]
        z = sum(e)
        for k in range(N):
            c[j][k] = e[k] / z + eps

    def columns() -> None:
        for k in range(N):
            col = sum(c[j][k] for j in range(N))
            for j in range(N):
                c[j][k] = c[j][k] / (col + eps)

    def rows() -> None:
        for j in range(N):
            row = sum(c[j][k] for k in range(N))
            for k in range(N):
                c[j][k] = c[j][k] / (row + eps)

    columns()
    for _ in range(iters - 1):
        rows()
        columns()
    return c


def naive_mix(hs: list[list[float]], fn: list[list[float]], eps: float = EPS) -> list[float]:
    """hs: the 4 streams of one token, each [dim]; fn: [M][4·dim] with index i·dim + d."""
    flat = [v for stream in hs for v in stream]
    r = 1.0 / math.sqrt(sum(v * v for v in flat) / len(flat) + eps)
    return [sum(flat[q] * row[q] for q in range(len(flat))) * r for row in fn]


def naive_coefficients(mix: list[float], base: list[float], scale: list[float], iters: int = 20, eps: float = EPS):
    pre = [_sigmoid(mix[i] * scale[0] + base[i]) + eps for i in range(N)]
    post = [2.0 * _sigmoid(mix[N + i] * scale[1] + base[N + i]) for i in range(N)]
    logits = [[mix[8 + 4 * j + k] * scale[2] + base[8 + 4 * j + k] for k in range(N)] for j in range(N)]
    return pre, post, naive_sinkhorn(logits, iters, eps)


def naive_rmsnorm(x: list[float], w: list[float], eps: float = 1e-6) -> list[float]:
    r = 1.0 / math.sqrt(sum(v * v for v in x) / len(x) + eps)
    return [x[d] * r * w[d] for d in range(len(x))]


def naive_collapse(pre: list[float], hs: list[list[float]]) -> list[float]:
    dim = len(hs[0])
    return [sum(pre[i] * hs[i][d] for i in range(N)) for d in range(dim)]


# --------------------------------------------------------------------------- inputs


def make_params(g: torch.Generator, b: int, s: int, dim: int, dtype: torch.dtype = torch.float32):
    h = torch.randn(b, s, N, dim, generator=g).to(dtype)
    # fn rows of norm ~1 so that mix = O(1), comb logits of std ~1-2 (a realistic operating range).
    fn = torch.randn(24, N * dim, generator=g) / math.sqrt(N * dim)
    base = torch.randn(24, generator=g)
    scale = torch.rand(3, generator=g) + 0.5
    norm_weight = torch.rand(dim, generator=g) + 0.5
    return h, fn, base, scale, norm_weight


# --------------------------------------------------------------------------- sinkhorn


@pytest.mark.parametrize("eps", [EPS, LARGE_EPS])
@pytest.mark.parametrize("iters", [1, 2, 3, 20])
def test_sinkhorn_matches_naive_rounds(iters: int, eps: float) -> None:
    g = torch.Generator().manual_seed(100 + iters)
    logits = torch.randn(5, 3, N, N, generator=g) * 2
    got = sinkhorn(logits, iters=iters, eps=eps)
    want = torch.tensor(
        [[naive_sinkhorn(m, iters, eps) for m in batch] for batch in logits.double().tolist()], dtype=torch.float64
    )
    assert got.dtype == torch.float32 and got.shape == logits.shape
    torch.testing.assert_close(got.double(), want, atol=SINKHORN_ATOL, rtol=0)


def test_sinkhorn_rounds_are_distinguishable() -> None:
    # Guards the comparison above: one round more or less must move the result far beyond the
    # tolerance. Logits of std 3 keep some matrices far from converged after 19 rounds (measured
    # max change from round 19 to 20: 9e-4; from round 1 to 2: 0.22), so an off-by-one is visible.
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(16, N, N, generator=g) * 3
    assert (sinkhorn(logits, iters=19) - sinkhorn(logits, iters=20)).abs().max() > 100 * SINKHORN_ATOL
    assert (sinkhorn(logits, iters=1) - sinkhorn(logits, iters=2)).abs().max() > 100 * SINKHORN_ATOL


def test_sinkhorn_orientation() -> None:
    # Softmax runs over k (the last index): a single large logit in row 0 must dominate row 0
    # after one round, where the column division has not yet rebalanced rows.
    logits = torch.zeros(N, N)
    logits[0, 2] = 8.0
    comb = sinkhorn(logits, iters=1)
    want = naive_sinkhorn(logits.double().tolist(), 1)
    torch.testing.assert_close(comb.double(), torch.tensor(want, dtype=torch.float64), atol=SINKHORN_ATOL, rtol=0)
    # Softmax over j instead would leave comb[1, 2] ≈ 3e-4 (row 0 takes column 2's mass).
    assert comb[0, 2] > 0.5 and comb[1, 2] > 0.1


# Doubly-stochastic property. Tolerances, reasoned and measured:
# * Columns: the last step divides each column by (its sum S + eps), so a column sums to
#   S/(S + eps) = 1 − eps/(S + eps), plus the rounding of 4 divisions and of the 4-term fp32 sum
#   (≤ ~5 ulps of 1 ≈ 6e-7). Before that step a row normalisation divided every row by its sum,
#   which is ≤ 4 (four entries ≤ 1 after the previous column step), so S ≥ ~1/4 for any logits
#   once iters ≥ 2: |col sum − 1| ≤ 4·eps + 6e-7 < COL_SUM_TOL_ANY = 5e-6 (hill-climbing search
#   over |logit| ≤ 20: worst 3.5e-6). In the operating range below rows have converged, S ≈ 1, so
#   |col sum − 1| ≤ eps + 6e-7 < COL_SUM_TOL = 2e-6 (searched worst: 1.2e-6).
# * Rows only converge. With |logit| ≤ 1 the Birkhoff–Hopf contraction ratio is
#   tanh(Δ/4)² ≤ tanh(1)² = 0.58 per round (Δ ≤ 4 is the log of the largest cross-ratio), so 19 rounds
#   guarantee a row error ≤ e^{4·0.58^19} − 1 ≈ 1.3e-4; measured over all 2^16 matrices with entries
#   ±1, 2e5 uniform ones and a hill-climbing search for the worst case: 1.2e-6 (the eps/rounding
#   floor). ROW_SUM_TOL = 1e-5. For larger logits 20 rounds do NOT make rows sum to 1 (measured
#   worst row error 4e-2 for logits of std 2, 8e-2 for std 10), so no row bound is claimed there.
COL_SUM_TOL = 2e-6
COL_SUM_TOL_ANY = 5e-6
ROW_SUM_TOL = 1e-5

_logit = st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False, width=32)
_wide_logit = st.floats(-20.0, 20.0, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=25, deadline=None)
@given(st.lists(_logit, min_size=16, max_size=16), st.integers(20, 40))
def test_sinkhorn_doubly_stochastic_small_logits(values: list[float], iters: int) -> None:
    comb = sinkhorn(torch.tensor(values).view(N, N), iters=iters)
    assert (comb > 0).all()
    assert (comb.sum(-2) - 1).abs().max() <= COL_SUM_TOL
    assert (comb.sum(-1) - 1).abs().max() <= ROW_SUM_TOL


@settings(max_examples=25, deadline=None)
@given(st.lists(_wide_logit, min_size=16, max_size=16), st.integers(2, 40))
def test_sinkhorn_columns_sum_to_one_any_scale(values: list[float], iters: int) -> None:
    comb = sinkhorn(torch.tensor(values).view(N, N), iters=iters)
    assert torch.isfinite(comb).all() and (comb > 0).all()
    assert (comb.sum(-2) - 1).abs().max() <= COL_SUM_TOL_ANY


def test_sinkhorn_random_batch_doubly_stochastic() -> None:
    # The same bounds on a seeded batch of the operating range (uniform in [-1, 1]).
    g = torch.Generator().manual_seed(11)
    comb = sinkhorn(torch.rand(4096, N, N, generator=g) * 2 - 1)
    assert (comb.sum(-2) - 1).abs().max() <= COL_SUM_TOL
    assert (comb.sum(-1) - 1).abs().max() <= ROW_SUM_TOL


# --------------------------------------------------------------------------- mix / coefficients


@pytest.mark.parametrize("eps", [EPS, LARGE_EPS])
def test_mhc_mix_matches_naive(eps: float) -> None:
    g = torch.Generator().manual_seed(1)
    h, fn, *_ = make_params(g, 2, 3, 8)
    got = mhc_mix(h, fn, eps=eps)
    want = torch.tensor(
        [[naive_mix(tok, fn.double().tolist(), eps) for tok in seq] for seq in h.double().tolist()],
        dtype=torch.float64,
    )
    assert got.dtype == torch.float32 and got.shape == (2, 3, 24)
    torch.testing.assert_close(got.double(), want, **MIX_TOL)


def test_mhc_mix_bf16_streams_upcast() -> None:
    # bf16 h is upcast exactly; the fp32 math must then match the naive loops on the same values.
    g = torch.Generator().manual_seed(2)
    h, fn, *_ = make_params(g, 1, 4, 8, dtype=torch.bfloat16)
    got = mhc_mix(h, fn[:4])
    want = torch.tensor(
        [[naive_mix(tok, fn[:4].double().tolist()) for tok in seq] for seq in h.double().tolist()],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got.double(), want, **MIX_TOL)


@pytest.mark.parametrize("eps", [EPS, LARGE_EPS])
def test_mhc_coefficients_match_naive(eps: float) -> None:
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(2, 3, 24, generator=g)
    base = torch.randn(24, generator=g)
    scale = torch.rand(3, generator=g) + 0.5
    pre, post, comb = mhc_coefficients(mix, base, scale, eps=eps)
    want_pre, want_post, want_comb = [], [], []
    for seq in mix.double().tolist():
        for tok in seq:
            p, q, c = naive_coefficients(tok, base.double().tolist(), scale.double().tolist(), eps=eps)
            want_pre.append(p)
            want_post.append(q)
            want_comb.append(c)
    f64 = torch.float64
    torch.testing.assert_close(pre.double(), torch.tensor(want_pre, dtype=f64).view(2, 3, N), **COEF_TOL)
    torch.testing.assert_close(post.double(), torch.tensor(want_post, dtype=f64).view(2, 3, N), **COEF_TOL)
    torch.testing.assert_close(
        comb.double(), torch.tensor(want_comb, dtype=f64).view(2, 3, N, N), atol=SINKHORN_ATOL, rtol=0
    )
    assert (pre > 0).all() and (post > 0).all() and (post < 2).all()


def test_mhc_coefficients_saturated_pre_is_eps() -> None:
    # sigmoid(-200) is exactly 0 in fp32, so pre must be exactly eps (and post exactly 0).
    base = torch.zeros(24)
    base[:8] = -200.0
    pre, post, _ = mhc_coefficients(torch.zeros(1, 2, 24), base, torch.ones(3))
    assert torch.equal(pre, torch.full((1, 2, N), EPS))
    assert torch.equal(post, torch.zeros(1, 2, N))


def test_mhc_coefficients_comb_index_layout() -> None:
    # comb[j, k] comes from mix index 8 + 4j + k (row-major), not 8 + 4k + j.
    mix = torch.zeros(1, 1, 24)
    base = torch.zeros(24)
    base[8 + 4 * 1 + 3] = 6.0  # j = 1, k = 3
    _, _, comb = mhc_coefficients(mix, base, torch.ones(3), iters=1)
    assert comb[0, 0].argmax().item() == 1 * N + 3


# --------------------------------------------------------------------------- pre / post / head


@pytest.mark.parametrize(("eps", "norm_eps"), EPS_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mhc_pre_matches_naive(dtype: torch.dtype, eps: float, norm_eps: float) -> None:
    g = torch.Generator().manual_seed(4)
    b, s, dim = 2, 3, 8
    h, fn, base, scale, norm_weight = make_params(g, b, s, dim, dtype)
    h = h * 0.1  # mean square ~0.01, comparable to norm_eps = 0.01, so a swapped eps shows
    x, post, comb = mhc_pre(h, fn, base, scale, norm_weight, eps=eps, norm_eps=norm_eps)
    fn64, base64, scale64, w64 = (t.double().tolist() for t in (fn, base, scale, norm_weight))
    want_x, want_post, want_comb = [], [], []
    for seq in h.double().tolist():
        for tok in seq:
            pre, q, c = naive_coefficients(naive_mix(tok, fn64, eps), base64, scale64, eps=eps)
            want_x.append(naive_rmsnorm(naive_collapse(pre, tok), w64, norm_eps))
            want_post.append(q)
            want_comb.append(c)
    f64 = torch.float64
    assert x.dtype == torch.float32 and x.shape == (b, s, dim)
    torch.testing.assert_close(x.double(), torch.tensor(want_x, dtype=f64).view(b, s, dim), **OUT_TOL)
    torch.testing.assert_close(post.double(), torch.tensor(want_post, dtype=f64).view(b, s, N), **COEF_TOL)
    torch.testing.assert_close(
        comb.double(), torch.tensor(want_comb, dtype=f64).view(b, s, N, N), atol=SINKHORN_ATOL, rtol=0
    )


def test_mhc_post_matches_naive() -> None:
    g = torch.Generator().manual_seed(5)
    b, s, dim = 2, 3, 8
    h = torch.randn(b, s, N, dim, generator=g)
    f_out = torch.randn(b, s, dim, generator=g)
    post = torch.rand(b, s, N, generator=g) * 2
    comb = torch.rand(b, s, N, N, generator=g)  # not doubly stochastic on purpose: tests j vs k
    got = mhc_post(h, f_out, post, comb)
    want = torch.zeros(b, s, N, dim, dtype=torch.float64)
    hl, fl, pl, cl = (t.double().tolist() for t in (h, f_out, post, comb))
    for bi in range(b):
        for si in range(s):
            for k in range(N):
                for d in range(dim):
                    acc = pl[bi][si][k] * fl[bi][si][d]
                    for j in range(N):
                        acc += cl[bi][si][j][k] * hl[bi][si][j][d]
                    want[bi, si, k, d] = acc
    assert got.dtype == torch.float32 and got.shape == (b, s, N, dim)
    torch.testing.assert_close(got.double(), want, **OUT_TOL)


@pytest.mark.parametrize(("eps", "norm_eps"), EPS_CASES)
def test_mhc_head_matches_naive_last_position(eps: float, norm_eps: float) -> None:
    g = torch.Generator().manual_seed(6)
    b, s, dim, vocab = 2, 5, 8, 11
    h = torch.randn(b, s, N, dim, generator=g) * 0.1  # mean square ~ norm_eps (see mhc_pre)
    fn = torch.randn(N, N * dim, generator=g) / math.sqrt(N * dim)
    base = torch.randn(N, generator=g)
    scale = torch.rand(1, generator=g) + 0.5
    norm_weight = torch.rand(dim, generator=g) + 0.5
    head_weight = torch.randn(vocab, dim, generator=g)
    got = mhc_head(h, fn, base, scale, norm_weight, head_weight, eps=eps, norm_eps=norm_eps)
    want = []
    for seq in h.double().tolist():
        tok = seq[-1]
        mix = naive_mix(tok, fn.double().tolist(), eps)
        pre = [_sigmoid(mix[i] * scale.item() + base[i].item()) + eps for i in range(N)]
        x = naive_rmsnorm(naive_collapse(pre, tok), norm_weight.double().tolist(), norm_eps)
        want.append([sum(x[d] * row[d] for d in range(dim)) for row in head_weight.double().tolist()])
    assert got.dtype == torch.float32 and got.shape == (b, vocab)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), **HEAD_TOL)

    # Only the last position matters: rewriting the others must not change a bit.
    h2 = h.clone()
    h2[:, :-1] = torch.randn(b, s - 1, N, dim, generator=g)
    assert torch.equal(mhc_head(h2, fn, base, scale, norm_weight, head_weight, eps=eps, norm_eps=norm_eps), got)
    # ... and the last one does.
    h2[:, -1] += 1.0
    assert not torch.allclose(mhc_head(h2, fn, base, scale, norm_weight, head_weight, eps=eps, norm_eps=norm_eps), got)


def test_empty_batch() -> None:
    g = torch.Generator().manual_seed(8)
    h, fn, base, scale, norm_weight = make_params(g, 2, 0, 8)
    x, post, comb = mhc_pre(h, fn, base, scale, norm_weight)
    assert x.shape == (2, 0, 8) and post.shape == (2, 0, N) and comb.shape == (2, 0, N, N)
    assert mhc_post(h, x, post, comb).shape == (2, 0, N, 8)


# --------------------------------------------------------------------------- bad input


def test_bad_input_errors() -> None:
    g = torch.Generator().manual_seed(9)
    h, fn, base, scale, norm_weight = make_params(g, 1, 2, 8)
    with pytest.raises(ValueError, match=r"^h must have shape \[\*, \*, 4, \*\], got \[1, 2, 3, 8\]"):
        mhc_mix(h[:, :, :3], fn)
    with pytest.raises(TypeError, match=r"^h must be"):
        mhc_mix(h.to(torch.int32), fn)
    with pytest.raises(ValueError, match=r"^fn must have shape \[24, 32\], got \[24, 28\]"):
        mhc_pre(h, fn[:, :28], base, scale, norm_weight)
    with pytest.raises(TypeError, match=r"^fn must be float32, got bfloat16"):
        mhc_mix(h, fn.bfloat16())
    with pytest.raises(TypeError, match=r"^base must be float32, got bfloat16"):
        mhc_coefficients(torch.zeros(1, 1, 24), base.bfloat16(), scale)
    with pytest.raises(ValueError, match=r"^scale must have shape \[3\], got \[2\]"):
        mhc_coefficients(torch.zeros(1, 1, 24), base, scale[:2])
    with pytest.raises(ValueError, match=r"^mix must have shape \[\*, \*, 24\], got \[1, 1, 23\]"):
        mhc_coefficients(torch.zeros(1, 1, 23), base, scale)
    with pytest.raises(ValueError, match=r"^norm_weight must have shape \[8\], got \[7\]"):
        mhc_pre(h, fn, base, scale, norm_weight[:7])
    with pytest.raises(ValueError, match=r"^logits must have shape \[\.\.\., n, n\], got \[4, 3\]"):
        sinkhorn(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"^iters must be >= 1, got 0"):
        sinkhorn(torch.zeros(4, 4), iters=0)
    with pytest.raises(TypeError, match=r"^iters must be an int"):
        sinkhorn(torch.zeros(4, 4), iters=2.0)
    f_out = torch.zeros(1, 2, 8)
    post = torch.zeros(1, 2, N)
    comb = torch.zeros(1, 2, N, N)
    with pytest.raises(ValueError, match=r"^f_out must have shape \[1, 2, 8\], got \[1, 2, 7\]"):
        mhc_post(h, f_out[..., :7], post, comb)
    with pytest.raises(ValueError, match=r"^post must have shape \[1, 2, 4\], got \[1, 1, 4\]"):
        mhc_post(h, f_out, post[:, :1], comb)
    with pytest.raises(ValueError, match=r"^comb must have shape \[1, 2, 4, 4\], got \[1, 2, 4, 3\]"):
        mhc_post(h, f_out, post, comb[..., :3])
    head_fn, head_base, head_scale = fn[:4], base[:4], scale[:1]
    head_weight = torch.zeros(11, 8)
    with pytest.raises(ValueError, match=r"^h must hold at least one position \(s >= 1\), got shape \[1, 0, 4, 8\]"):
        mhc_head(h[:, :0], head_fn, head_base, head_scale, norm_weight, head_weight)
    with pytest.raises(ValueError, match=r"^head_weight must have shape \[11, 8\], got \[11, 9\]"):
        mhc_head(h, head_fn, head_base, head_scale, norm_weight, torch.zeros(11, 9))
    with pytest.raises(ValueError, match=r"^fn must have shape \[4, 32\], got \[24, 32\]"):
        mhc_head(h, fn, head_base, head_scale, norm_weight, head_weight)
    with pytest.raises(ValueError, match=r"^scale must have shape \[1\], got \[3\]"):
        mhc_head(h, head_fn, head_base, scale, norm_weight, head_weight)
