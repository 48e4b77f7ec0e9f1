"""CPU tests of tilev4.reference.attention against naive loops written from the spec text."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilev4.reference.attention import (
    compressed_indices,
    compressed_visible_count,
    concat_key_sets,
    sparse_attention,
    window_indices,
)

# fp32 reference vs a float64 naive loop: scores are sums of D <= 128 products of O(1) values and the
# softmax runs over <= 40 keys, so the fp32 rounding error is ~1e-6 on outputs of magnitude <= ~3.
ATOL, RTOL = 1e-5, 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def naive_attention(q, kv, sink, indices, scale):
    """Loops over b, s, h and the listed slots; float64; returns (o, lse)."""
    b, s, h, d = q.shape
    o = torch.zeros(b, s, h, d, dtype=torch.float64)
    lse = torch.full((b, s, h), -math.inf, dtype=torch.float64)
    for bi in range(b):
        for si in range(s):
            keys = [int(j) for j in indices[bi, si] if int(j) != -1]
            for hi in range(h):
                if not keys:
                    continue  # empty key set: output 0 (with or without a sink)
                qv = q[bi, si, hi].double()
                logits = [scale * float(qv @ kv[bi, j].double()) for j in keys]
                big = max(logits)
                if sink is not None:
                    big = max(big, float(sink[hi]))
                num = torch.zeros(d, dtype=torch.float64)
                den = 0.0
                for j, logit in zip(keys, logits):
                    num += math.exp(logit - big) * kv[bi, j].double()
                    den += math.exp(logit - big)
                if sink is not None:
                    den += math.exp(float(sink[hi]) - big)
                o[bi, si, hi] = num / den
                lse[bi, si, hi] = math.log(sum(math.exp(x) for x in logits))
    return o, lse


def _random_indices(g, b, s, k, n, p_unused=0.3):
    idx = torch.randint(0, n, (b, s, k), generator=g)
    unused = torch.rand(b, s, k, generator=g) < p_unused
    return torch.where(unused, -1, idx).to(torch.int32)


@pytest.mark.parametrize("with_sink", [False, True])
def test_sparse_attention_matches_naive(with_sink):
    g = _gen(1234 + with_sink)
    b, s, h, d, n, k = 2, 6, 5, 64, 23, 12  # H = 5: not a multiple of 16
    q = torch.randn(b, s, h, d, generator=g)
    kv = torch.randn(b, n, d, generator=g)
    sink = torch.randn(h, generator=g) if with_sink else None
    idx = _random_indices(g, b, s, k, n)
    idx[0, 1] = -1  # a query whose slots are all unused: empty key set
    idx[1, 2, 4:] = -1  # a whole block of slots unused
    idx[1, 3, :4] = 7  # one key listed four times
    scale = d**-0.5
    o, lse = sparse_attention(q, kv, sink, idx, return_lse=True)
    o_ref, lse_ref = naive_attention(q, kv, sink, idx, scale)
    torch.testing.assert_close(o, o_ref.float(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, lse_ref.float(), atol=ATOL, rtol=RTOL)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.equal(o[0, 1], torch.zeros(h, d))
    assert torch.isneginf(lse[0, 1]).all()
    assert not torch.isnan(o).any()


@pytest.mark.parametrize("with_sink", [False, True])
def test_empty_key_sets_give_exact_zero(with_sink):
    g = _gen(7)
    b, s, h, d, n = 2, 3, 3, 32, 5
    q = torch.randn(b, s, h, d, generator=g)
    kv = torch.randn(b, n, d, generator=g)
    sink = torch.randn(h, generator=g) if with_sink else None
    for idx in (
        torch.full((b, s, 4), -1, dtype=torch.int32),  # all slots unused
        torch.empty(b, s, 0, dtype=torch.int32),  # no slots at all
    ):
        o, lse = sparse_attention(q, kv, sink, idx, return_lse=True)
        assert torch.equal(o, torch.zeros(b, s, h, d))
        assert torch.isneginf(lse).all()
    o = sparse_attention(q, kv[:, :0], sink, torch.full((b, s, 2), -1, dtype=torch.int32))  # n = 0
    assert torch.equal(o, torch.zeros(b, s, h, d))


def test_duplicated_index_counts_as_many_times_as_listed():
    g = _gen(11)
    d = 16
    q = torch.randn(1, 1, 1, d, generator=g)
    kv = torch.randn(1, 2, d, generator=g)
    sink = torch.tensor([0.3])
    o = sparse_attention(q, kv, sink, torch.tensor([[[1, 1, -1]]], dtype=torch.int32))
    s1 = float(q[0, 0, 0] @ kv[0, 1]) * d**-0.5
    # closed form for the multiset {1, 1}: 2 e^{s1} v1 / (2 e^{s1} + e^{sink})
    w = 2 * math.exp(s1) / (2 * math.exp(s1) + math.exp(0.3))
    torch.testing.assert_close(o[0, 0, 0], w * kv[0, 1], atol=1e-6, rtol=1e-6)  # one softmax over 3 terms


def test_scale_and_half_precision_queries():
    g = _gen(5)
    b, s, h, d, n, k = 1, 4, 3, 32, 9, 6
    q = torch.randn(b, s, h, d, generator=g).bfloat16()
    kv = torch.randn(b, n, d, generator=g).half()
    idx = _random_indices(g, b, s, k, n)
    o = sparse_attention(q, kv, None, idx, scale=0.3)
    o_ref, _ = naive_attention(q.float(), kv.float(), None, idx, 0.3)
    # bf16/fp16 inputs are upcast exactly, so the fp32 tolerance applies
    torch.testing.assert_close(o, o_ref.float(), atol=ATOL, rtol=RTOL)


def test_window_indices_matches_naive():
    positions = torch.tensor([[0, 1, 5, 127, 128, 300]])
    for window in (1, 4, 128):
        out = window_indices(positions, window)
        assert out.dtype == torch.int32 and out.shape == (1, 6, window)
        for j, t in enumerate(positions[0].tolist()):
            want = [p if p >= 0 else -1 for p in range(t - window + 1, t + 1)]
            assert out[0, j].tolist() == want


def test_window_attention_on_a_sequence_shorter_than_the_window():
    # s_kv = 10 < W = 128: the window set is every earlier token, i.e. causal attention
    g = _gen(21)
    n, h, d = 10, 3, 32
    q = torch.randn(1, n, h, d, generator=g)
    kv = torch.randn(1, n, d, generator=g)
    sink = torch.randn(h, generator=g)
    positions = torch.arange(n).unsqueeze(0)
    o = sparse_attention(q, kv, sink, window_indices(positions))
    causal = torch.tensor([[[j if j <= t else -1 for j in range(n)] for t in range(n)]], dtype=torch.int32)
    o_ref, _ = naive_attention(q, kv, sink, causal, d**-0.5)
    torch.testing.assert_close(o, o_ref.float(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("ratio", [4, 128])
def test_compressed_indices_match_naive(ratio):
    positions = torch.tensor([[0, 2, 3, 4, 7, 126, 127, 128, 255, 256, 600]])
    count = compressed_visible_count(positions, ratio)
    idx = compressed_indices(positions, ratio)
    assert idx.dtype == torch.int32
    largest = max((t + 1) // ratio for t in positions[0].tolist())
    assert idx.shape == (1, positions.shape[1], largest)
    for j, t in enumerate(positions[0].tolist()):
        visible = [c for c in range(largest) if c * ratio + ratio - 1 <= t]  # block complete at or before t
        assert int(count[0, j]) == len(visible)
        assert idx[0, j].tolist() == visible + [-1] * (largest - len(visible))
    wide = compressed_indices(positions, ratio, max_entries=largest + 3)
    assert torch.equal(wide[..., :largest], idx) and (wide[..., largest:] == -1).all()
    with pytest.raises(ValueError, match="max_entries"):
        compressed_indices(positions, ratio, max_entries=largest - 1)


@pytest.mark.parametrize("with_sink", [False, True])
def test_queries_before_the_first_compressed_entry_get_zero(with_sink):
    # compressed-only key sets (HCA without the window): t < 127 sees no entry at all
    g = _gen(41 + with_sink)
    h, d = 3, 64
    positions = torch.tensor([[0, 3, 126, 127, 300]])
    q = torch.randn(1, 5, h, d, generator=g)
    comp = torch.randn(1, 2, d, generator=g)
    sink = torch.randn(h, generator=g) if with_sink else None
    o = sparse_attention(q, comp, sink, compressed_indices(positions, 128, max_entries=2))
    assert torch.equal(o[0, :3], torch.zeros(3, h, d)) and not torch.isnan(o).any()
    assert (o[0, 3:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("ratio", [4, 128])
def test_union_of_window_and_compressed_sets(ratio):
    g = _gen(31 + ratio)
    b, h, d = 2, 5, 64
    n = 2 * ratio + 3  # tokens in the raw stream
    s = 4
    positions = torch.tensor([[0, ratio - 1, ratio + 1, n - 1], [1, ratio, 2 * ratio - 1, n - 2]])
    q = torch.randn(b, s, h, d, generator=g)
    kv = torch.randn(b, n, d, generator=g)
    n_c = n // ratio
    comp = torch.randn(b, n_c, d, generator=g)
    sink = torch.randn(h, generator=g)
    w_idx, c_idx = window_indices(positions, window=8), compressed_indices(positions, ratio)
    kv_cat, idx_cat = concat_key_sets(kv, comp, w_idx, c_idx)
    assert kv_cat.shape == (b, n + n_c, d) and idx_cat.shape == (b, s, 8 + c_idx.shape[-1])
    o = sparse_attention(q, kv_cat, sink, idx_cat)
    # naive: the key list is the window tokens max(0, t-7)..t then the visible compressed entries
    o_ref = torch.zeros(b, s, h, d, dtype=torch.float64)
    for bi in range(b):
        for si in range(s):
            t = int(positions[bi, si])
            keys = [kv[bi, p] for p in range(max(0, t - 7), t + 1)]
            keys += [comp[bi, c] for c in range((t + 1) // ratio)]
            keys_t = torch.stack(keys).unsqueeze(0)  # [1, K, D]
            listed = torch.arange(len(keys), dtype=torch.int32).view(1, 1, -1)
            o_ref[bi, si] = naive_attention(q[bi : bi + 1, si : si + 1], keys_t, sink, listed, d**-0.5)[0][0, 0]
    torch.testing.assert_close(o, o_ref.float(), atol=ATOL, rtol=RTOL)


def test_bad_inputs_raise_with_the_argument_named():
    g = _gen(3)
    q = torch.randn(1, 2, 3, 16, generator=g)
    kv = torch.randn(1, 5, 16, generator=g)
    idx = torch.tensor([[[0, 4, -1], [1, -1, -1]]], dtype=torch.int32)
    with pytest.raises(TypeError, match="q must be"):
        sparse_attention(q.long(), kv, None, idx)
    with pytest.raises(TypeError, match="indices must be int32"):
        sparse_attention(q, kv, None, idx.long())
    with pytest.raises(ValueError, match=r"kv must have shape \[1, \*, 16\]"):
        sparse_attention(q, kv[..., :8], None, idx)
    with pytest.raises(ValueError, match=r"indices must have shape \[1, 2, \*\]"):
        sparse_attention(q, kv, None, idx[:, :1])
    with pytest.raises(ValueError, match=r"indices must be < n=5.*got 5"):
        sparse_attention(q, kv, None, torch.where(idx == 4, 5, idx))
    with pytest.raises(ValueError, match=r"indices must be >= -1.*got -2"):
        sparse_attention(q, kv, None, torch.where(idx == 4, -2, idx))
    with pytest.raises(ValueError, match=r"sink must have shape \[3\]"):
        sparse_attention(q, kv, torch.zeros(4), idx)
    with pytest.raises(TypeError, match="sink must be float32"):
        sparse_attention(q, kv, torch.zeros(3, dtype=torch.bfloat16), idx)
    with pytest.raises(ValueError, match="sink must not hold NaN"):
        sparse_attention(q, kv, torch.tensor([0.0, math.nan, 0.0]), idx)
    with pytest.raises(ValueError, match="scale"):
        sparse_attention(q, kv, None, idx, scale=math.inf)
    pos = torch.tensor([[0, 5]])
    with pytest.raises(ValueError, match="ratio must be one of \\[4, 128\\], got 8"):
        compressed_indices(pos, 8)
    with pytest.raises(ValueError, match="ratio"):
        compressed_visible_count(pos, 0)
    with pytest.raises(ValueError, match="positions must be >= 0, got -1"):
        window_indices(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="positions must be"):
        window_indices(pos.float())
    with pytest.raises(ValueError, match="window must be >= 1"):
        window_indices(pos, 0)
    comp = torch.randn(1, 2, 16, generator=g)
    w_idx = window_indices(pos, 4)
    with pytest.raises(ValueError, match=r"window_idx must be < n=5.*got 5"):
        concat_key_sets(kv, comp, w_idx, compressed_indices(pos, 4))
    with pytest.raises(ValueError, match=r"compressed_idx must be < n=2.*got 2"):
        concat_key_sets(torch.randn(1, 6, 16), comp, w_idx, torch.tensor([[[0], [2]]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"compressed must have shape \[1, \*, 16\]"):
        concat_key_sets(torch.randn(1, 6, 16), comp[..., :8], w_idx, compressed_indices(pos, 4))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    h=st.integers(1, 6),
    s=st.integers(1, 5),
    k=st.integers(0, 9),
    n=st.integers(0, 12),
    with_sink=st.booleans(),
)
def test_property_empty_rows_zero_and_never_nan(seed, h, s, k, n, with_sink):
    g = _gen(seed)
    b, d = 2, 16
    # logits up to ~±60: large enough that a missing max-shift would overflow e^s in fp32
    q = 4 * torch.randn(b, s, h, d, generator=g)
    kv = 4 * torch.randn(b, n, d, generator=g)
    sink = 10 * torch.randn(h, generator=g) if with_sink else None
    if n:
        idx = _random_indices(g, b, s, k, n, p_unused=0.5)
    else:
        idx = torch.full((b, s, k), -1, dtype=torch.int32)
    o, lse = sparse_attention(q, kv, sink, idx, return_lse=True)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    empty = (idx < 0).all(-1)  # [b, s]
    assert torch.equal(o[empty], torch.zeros_like(o[empty]))
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    o_ref, lse_ref = naive_attention(q, kv, sink, idx, d**-0.5)
    # logits are 16x larger than in the fixed tests, so the fp32 rounding of s_j (~1e-5 absolute) enters
    # the softmax weights: 1e-4 bounds it for outputs of magnitude <= ~15
    torch.testing.assert_close(o, o_ref.float(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref.float(), atol=1e-4, rtol=1e-5)
