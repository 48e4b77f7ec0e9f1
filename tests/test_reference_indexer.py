"""CPU tests of tilev4.reference.indexer against naive loops written from the spec text."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilev4.reference.indexer import indexer_prepare_queries, indexer_scores, indexer_topk
from tilev4.reference.quant import fp4_e2m1_simulate
from tilev4.reference.rope import RopeConfig, rope_frequencies


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def naive_scores(q, w, k, positions, ratio):
    """I[t, c] = Σ_h w[t, h] · ReLU(q[t, h] · k[c]); -inf unless c < (t+1) // ratio. float64 loops."""
    b, s, hi, _ = q.shape
    n_c = k.shape[1]
    out = torch.full((b, s, n_c), -math.inf, dtype=torch.float64)
    for bi in range(b):
        for si in range(s):
            t = int(positions[bi, si])
            for c in range(n_c):
                if c * ratio + ratio - 1 > t:  # block of entry c not complete at t
                    continue
                total = 0.0
                for h in range(hi):
                    total += float(w[bi, si, h]) * max(0.0, float(q[bi, si, h].double() @ k[bi, c].double()))
                out[bi, si, c] = total
    return out


def naive_topk(scores, top_k, offset):
    """Python sort of (−score, index): descending score, ties by the smaller index, -inf never chosen."""
    b, s, n_c = scores.shape
    out = torch.full((b, s, top_k), -1, dtype=torch.int32)
    for bi in range(b):
        for si in range(s):
            row = [(-float(scores[bi, si, c]), c) for c in range(n_c) if float(scores[bi, si, c]) != -math.inf]
            for j, (_, c) in enumerate(sorted(row)[:top_k]):
                out[bi, si, j] = c + offset
    return out


def naive_hadamard(d):
    """H[i, j] = (-1)^popcount(i & j) / sqrt(d) (the Sylvester order), float64."""
    return torch.tensor(
        [[(-1.0) ** bin(i & j).count("1") for j in range(d)] for i in range(d)], dtype=torch.float64
    ) / math.sqrt(d)


def assert_within_one_fp4_step(actual, expected, block=32):
    """FP4 outputs whose fp32 inputs differ by a few ulps (another summation order) may round to a
    neighbouring e2m1 code, or, if the block amax crosses a power of two, use the next scale. One e2m1 step
    at value v is at most max(0.5, |v|/2) in units of the block scale (grid 0, .5, 1, 1.5, 2, 3, 4, 6)."""
    a = actual.reshape(-1, block)
    e = expected.reshape(-1, block)
    amax = torch.maximum(a.abs().amax(-1, keepdim=True), e.abs().amax(-1, keepdim=True))
    scale = torch.exp2(torch.ceil(torch.log2(amax.clamp_min(6 * 2.0**-126) / 6)))  # [nb, 1]
    bound = torch.maximum(0.5 * scale, 0.5 * torch.maximum(a.abs(), e.abs())) + 1e-6
    assert ((a - e).abs() <= bound).all()
    # a flip needs an input within a few ulps of a rounding midpoint: it must stay rare
    assert (a != e).float().mean() <= 0.01


def test_prepare_queries_matches_naive():
    g = _gen(101)
    b, s, hi, d = 2, 3, 5, 128
    q = torch.randn(b, s, hi, d, generator=g).bfloat16()
    positions = torch.tensor([[0, 7, 300], [5, 6, 65000]])
    cfg = RopeConfig.compressed()
    out = indexer_prepare_queries(q, positions)
    assert out.dtype == torch.float32 and out.shape == (b, s, hi, d)
    freqs = rope_frequencies(cfg)  # fp32 [32]
    had = naive_hadamard(d)
    expected = torch.zeros(b, s, hi, d)
    for bi in range(b):
        for si in range(s):
            t = int(positions[bi, si])
            # the angle t·freq is an fp32 product (as in the released code), the rotation is float64
            angle = (t * freqs).double()  # [32]
            for h in range(hi):
                x = q[bi, si, h].double().clone()
                pairs = torch.complex(x[-64::2], x[-63::2]) * torch.polar(torch.ones_like(angle), angle)
                x[-64::2], x[-63::2] = pairs.real, pairs.imag  # interleaved rotation of the last 64 dims
                expected[bi, si, h] = fp4_e2m1_simulate((x @ had).float(), block=32)
    assert_within_one_fp4_step(out, expected)


def test_scores_match_naive_and_mask_invisible_entries():
    g = _gen(202)
    b, s, hi, d, n_c = 2, 5, 3, 32, 7
    q = torch.randn(b, s, hi, d, generator=g)
    w = torch.randn(b, s, hi, generator=g).bfloat16()
    k = torch.randn(b, n_c, d, generator=g)
    positions = torch.tensor([[0, 3, 4, 11, 27], [2, 7, 8, 15, 40]])
    out = indexer_scores(q, w, k, positions)
    ref = naive_scores(q, w, k, positions, 4)
    # float64 loops vs fp32 einsums over d = 32 and HI = 3: rounding ~1e-6 on scores of magnitude ~10
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    visible = torch.arange(n_c) < ((positions + 1) // 4).unsqueeze(-1)
    assert torch.isneginf(out[~visible]).all() and torch.isfinite(out[visible]).all()


def test_topk_ties_padding_and_offset():
    scores = torch.tensor(
        [
            [
                [1.0, 3.0, 3.0, -math.inf, 0.0, 3.0],  # a three-way tie: ascending index among the tied
                [0.0, -0.0, 0.0, 0.0, -math.inf, -math.inf],  # ±0 tie
                [-math.inf] * 6,  # nothing visible: all -1
                [2.0, -math.inf, -5.0, -math.inf, -math.inf, -math.inf],  # fewer visible than top_k
            ]
        ]
    )
    out = indexer_topk(scores, 4, offset=10)
    assert out.dtype == torch.int32
    assert out.tolist() == [[[11, 12, 15, 10], [10, 11, 12, 13], [-1] * 4, [10, 12, -1, -1]]]
    wide = indexer_topk(scores, 9)  # top_k > n_c: padded with -1
    assert wide.shape == (1, 4, 9) and wide[0, 0].tolist() == [1, 2, 5, 0, 4, -1, -1, -1, -1]


def test_topk_matches_naive_with_many_ties():
    g = _gen(303)
    scores = torch.randint(-3, 3, (2, 6, 40), generator=g).float()  # 6 distinct values: ties everywhere
    scores[torch.rand(2, 6, 40, generator=g) < 0.3] = -math.inf
    for top_k in (1, 5, 40, 64):
        assert torch.equal(indexer_topk(scores, top_k, offset=3), naive_topk(scores, top_k, 3))


def test_bad_inputs_raise_with_the_argument_named():
    g = _gen(4)
    q = torch.randn(1, 2, 3, 32, generator=g)
    w = torch.randn(1, 2, 3, generator=g)
    k = torch.randn(1, 4, 32, generator=g)
    pos = torch.tensor([[3, 9]])
    with pytest.raises(ValueError, match="ratio must be one of \\[4, 128\\], got 8"):
        indexer_scores(q, w, k, pos, ratio=8)
    with pytest.raises(TypeError, match="q must be"):
        indexer_scores(q.int(), w, k, pos)
    with pytest.raises(ValueError, match=r"w must have shape \[1, 2, 3\]"):
        indexer_scores(q, w[..., :2], k, pos)
    with pytest.raises(ValueError, match=r"k must have shape \[1, \*, 32\]"):
        indexer_scores(q, w, k[..., :16], pos)
    with pytest.raises(ValueError, match="positions must be >= 0, got -1"):
        indexer_scores(q, w, k, torch.tensor([[-1, 9]]))
    with pytest.raises(ValueError, match=r"positions must have shape \[1, 2\]"):
        indexer_scores(q, w, k, pos[:, :1])
    with pytest.raises(ValueError, match=r"q: head dim must be a power of two.*got 96"):
        indexer_prepare_queries(torch.randn(1, 2, 3, 96, generator=g), pos)
    with pytest.raises(TypeError, match="positions must be"):
        indexer_prepare_queries(torch.randn(1, 2, 3, 64, generator=g), pos.float())
    scores = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        indexer_topk(scores, 0)
    with pytest.raises(ValueError, match="offset must be >= 0, got -3"):
        indexer_topk(scores, 2, offset=-3)
    with pytest.raises(TypeError, match="top_k must be an int"):
        indexer_topk(scores, 2.0)
    scores[0, 1, 3] = math.nan
    with pytest.raises(ValueError, match=r"scores must not contain NaN.*\[0, 1, 3\]"):
        indexer_topk(scores, 2)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    s=st.integers(1, 6),
    n_c=st.integers(0, 20),
    top_k=st.integers(1, 12),
    offset=st.integers(0, 50),
)
def test_property_selection_is_visible_unique_and_naive(seed, s, n_c, top_k, offset):
    g = _gen(seed)
    b, hi, d = 2, 3, 32
    q = torch.randn(b, s, hi, d, generator=g)
    w = torch.randn(b, s, hi, generator=g)
    k = torch.randn(b, n_c, d, generator=g)
    positions = torch.randint(0, 4 * n_c + 8, (b, s), generator=g)  # some queries see nothing
    scores = indexer_scores(q, w, k, positions)
    idx = indexer_topk(scores, top_k, offset)
    visible = (positions + 1) // 4  # [b, s]
    for bi in range(b):
        for si in range(s):
            chosen = [int(i) for i in idx[bi, si] if int(i) != -1]
            want = min(top_k, min(int(visible[bi, si]), n_c))
            assert len(chosen) == want and len(set(chosen)) == want
            assert all(0 <= c - offset < int(visible[bi, si]) for c in chosen)
            assert idx[bi, si, want:].eq(-1).all()  # -1 only after the selected slots
            vals = [float(scores[bi, si, c - offset]) for c in chosen]
            assert vals == sorted(vals, reverse=True)
    assert torch.equal(idx, naive_topk(scores, top_k, offset))
