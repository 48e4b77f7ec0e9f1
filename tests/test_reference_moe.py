"""CPU tests of the fp32 MoE reference against naive loops written from the spec text.

The naive functions below use Python floats (fp64), ``sorted`` with an explicit
``(-key, expert id)`` order and per-token loops; they share no code with
:mod:`tilev4.reference.moe`. Routing indices are compared bit-exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilev4.reference.moe import moe, moe_gate, swiglu_expert

# Tolerances (fp32 reference vs fp64 naive loops):
# * Gate weights: logits are dim-term (16) fp32 dot products of O(1) terms, error <= 16·u·Σ|terms|
#   ≈ 5e-6 worst case; sqrt∘softplus has slope <= 1/2 near the O(1) logits used here and the
#   normalisation adds a few ulps; weights are O(route_scale / top_k) ≈ 0.5. atol/rtol 1e-5.
GATE_TOL = {"atol": 1e-5, "rtol": 1e-5}
# * Expert outputs: two fp32 GEMMs (K = dim = 16, then K = inter = 8); the inputs give gate/up of
#   std ~12 and outputs up to ~150 without the clamp, so rounding is ~(K·u) ≈ 1e-6 relative to the
#   sum of |terms|: rtol 1e-5 plus atol 1e-4 for outputs where large terms cancel (measured worst
#   1.6e-5 absolute on |y| ≈ 150), while a wrong clamp, a missing routing weight or a lost expert
#   changes outputs by O(1).
EXPERT_TOL = {"atol": 1e-4, "rtol": 1e-5}
# * Hand-computed clamp cases: one product per output, only elementwise rounding (silu and two
#   multiplies, ~4 ulps): rtol 1e-6, atol 0 (the expected values include 3.5e-9, kept relative).
HAND_TOL = {"atol": 0.0, "rtol": 1e-6}


# --------------------------------------------------------------------------- naive spec loops


def _softplus(v: float) -> float:
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def _silu(v: float) -> float:
    return v / (1.0 + math.exp(-v))


def naive_gate(x, weight, bias, top_k, route_scale, tid2eid=None, token_ids=None):
    """Per token: s_e = sqrt(softplus(x·W_e)); top_k of s+bias (ties: smaller id) or the hash row."""
    x, weight = x.double().tolist(), weight.double().tolist()
    bias = None if bias is None else bias.double().tolist()
    all_w, all_e = [], []
    for t, xt in enumerate(x):
        s = [math.sqrt(_softplus(sum(a * b for a, b in zip(xt, we)))) for we in weight]
        if tid2eid is not None:
            chosen = [int(e) for e in tid2eid[int(token_ids[t])]]
        else:
            key = [s[e] + (0.0 if bias is None else bias[e]) for e in range(len(weight))]
            chosen = sorted(range(len(weight)), key=lambda e, key=key: (-key[e], e))[:top_k]
        total = sum(s[e] for e in chosen)
        all_w.append([s[e] / total * route_scale for e in chosen])
        all_e.append(chosen)
    return torch.tensor(all_w, dtype=torch.float64).view(-1, top_k), torch.tensor(all_e, dtype=torch.int32).view(
        -1, top_k
    )


def naive_expert_token(xt, w1, w2, w3, rw, limit):
    """One token through one SwiGLU expert; lists of fp64 floats in, list out."""
    inter, dim = len(w1), len(xt)
    h = []
    for i in range(inter):
        gate = sum(xt[d] * w1[i][d] for d in range(dim))
        up = sum(xt[d] * w3[i][d] for d in range(dim))
        if limit is not None:
            up = min(max(up, -limit), limit)
            gate = min(gate, limit)
        h.append(_silu(gate) * up * rw)
    return [sum(h[i] * w2[d][i] for i in range(inter)) for d in range(dim)]


def naive_moe(x, weights, experts, routed, shared, limit):
    xs = x.double().tolist()
    lists = [[w.double().tolist() for w in triple] for triple in routed]
    shared_l = None if shared is None else [w.double().tolist() for w in shared]
    out = []
    for t, xt in enumerate(xs):
        acc = [0.0] * len(xt)
        for k in range(experts.shape[1]):
            w1, w2, w3 = lists[int(experts[t, k])]
            y = naive_expert_token(xt, w1, w2, w3, float(weights[t, k]), limit)
            acc = [a + b for a, b in zip(acc, y)]
        if shared_l is not None:
            y = naive_expert_token(xt, *shared_l, 1.0, None)
            acc = [a + b for a, b in zip(acc, y)]
        out.append(acc)
    return torch.tensor(out, dtype=torch.float64).view(len(xs), x.shape[1])


def make_expert(g: torch.Generator, dim: int, inter: int, std: float = 1.0, dtype=torch.float32):
    w1 = (torch.randn(inter, dim, generator=g) * std).to(dtype)
    w2 = (torch.randn(dim, inter, generator=g) / math.sqrt(inter)).to(dtype)
    w3 = (torch.randn(inter, dim, generator=g) * std).to(dtype)
    return w1, w2, w3


# --------------------------------------------------------------------------- gate


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_gate_score_layer_matches_naive(x_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    T, dim, E, k = 9, 16, 12, 4
    x = torch.randn(T, dim, generator=g).to(x_dtype)
    weight = torch.randn(E, dim, generator=g) / math.sqrt(dim)
    bias = torch.randn(E, generator=g) * 0.5  # comparable to s, so it changes the selection
    weights, experts = moe_gate(x, weight, bias, top_k=k, route_scale=1.5)
    want_w, want_e = naive_gate(x, weight, bias, k, 1.5)
    assert experts.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(experts, want_e)
    torch.testing.assert_close(weights.double(), want_w, **GATE_TOL)
    # The bias must have mattered here (else the test would not tell selection-by-s from s+bias).
    _, unbiased = naive_gate(x, weight, None, k, 1.5)
    assert not torch.equal(unbiased, want_e)


def test_gate_without_bias_matches_naive() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 16, generator=g)
    weight = torch.randn(10, 16, generator=g) / 4
    weights, experts = moe_gate(x, weight, None, top_k=6, route_scale=2.5)
    want_w, want_e = naive_gate(x, weight, None, 6, 2.5)
    assert torch.equal(experts, want_e)
    torch.testing.assert_close(weights.double(), want_w, **GATE_TOL)


def test_gate_ties_go_to_smaller_expert_id() -> None:
    # Integer-valued x and weights in quarter steps make every logit exact in fp32 (|logit| <= 16,
    # multiples of 1/4), so duplicated gate rows give bit-identical scores: exact ties.
    g = torch.Generator().manual_seed(3)
    T, dim, E, k = 16, 16, 12, 5
    x = torch.randint(-2, 3, (T, dim), generator=g).float()
    weight = torch.randint(-2, 3, (E, dim), generator=g).float() / 4
    weight[7] = weight[2]
    weight[9] = weight[2]
    weight[11] = weight[0]
    weight[4] = weight[0]
    bias = torch.randint(-2, 3, (E,), generator=g).float() / 8
    bias[[7, 9]] = bias[2].item()
    bias[[11, 4]] = bias[0].item()
    weights, experts = moe_gate(x, weight, bias, top_k=k)
    want_w, want_e = naive_gate(x, weight, bias, k, 1.5)
    assert torch.equal(experts, want_e)
    torch.testing.assert_close(weights.double(), want_w, **GATE_TOL)
    # The construction must actually put tied experts into the selection.
    tied_groups = [{2, 7, 9}, {0, 4, 11}]
    assert any(len(set(row.tolist()) & grp) >= 2 for row in experts for grp in tied_groups)


def test_gate_all_tied_selects_lowest_ids_in_order() -> None:
    # A zero gate weight ties every expert: each token must get experts 0..k-1 in that order,
    # with equal weights route_scale / k.
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    weights, experts = moe_gate(x, torch.zeros(10, 8), torch.full((10,), 0.25), top_k=6, route_scale=1.5)
    assert torch.equal(experts, torch.arange(6, dtype=torch.int32).expand(5, 6))
    torch.testing.assert_close(weights, torch.full((5, 6), 0.25), atol=0, rtol=1e-6)  # 1.5/6, ~1 ulp


def test_gate_hash_layer_matches_naive() -> None:
    g = torch.Generator().manual_seed(5)
    T, dim, E, k, vocab = 11, 16, 10, 4, 20
    x = torch.randn(T, dim, generator=g)
    weight = torch.randn(E, dim, generator=g) / 4
    tid2eid = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(vocab)]).to(torch.int32)
    token_ids = torch.randint(0, vocab, (T,), generator=g)
    weights, experts = moe_gate(x, weight, None, top_k=k, route_scale=1.5, tid2eid=tid2eid, token_ids=token_ids)
    want_w, want_e = naive_gate(x, weight, None, k, 1.5, tid2eid.tolist(), token_ids.tolist())
    assert torch.equal(experts, want_e)  # table order, not score order
    torch.testing.assert_close(weights.double(), want_w, **GATE_TOL)
    # Table order differs from score order somewhere (otherwise the check above is weaker).
    _, by_score = naive_gate(x, weight, None, k, 1.5)
    assert not torch.equal(by_score, want_e)


@pytest.mark.parametrize("hashed", [False, True])
def test_gate_no_tokens(hashed: bool) -> None:
    x = torch.zeros(0, 16)
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(6))
    kwargs = {}
    if hashed:
        kwargs = {"tid2eid": torch.zeros(5, 6, dtype=torch.int64), "token_ids": torch.zeros(0, dtype=torch.int64)}
    weights, experts = moe_gate(x, weight, None, top_k=6, **kwargs)
    assert weights.shape == (0, 6) and weights.dtype == torch.float32
    assert experts.shape == (0, 6) and experts.dtype == torch.int32


_route_scale = st.floats(0.1, 4.0, allow_nan=False, allow_infinity=False)


# Weights sum to route_scale: each weight is fl(fl(s_e / fl(Σ s)) · route_scale); the sum is taken
# in fp64 here, so the error is at most (top_k + 1)·u = 9 · 6e-8 = 5.4e-7 relative for top_k <= 8
# (V4 uses 6): rel 1e-6 holds for every input, not only typical ones.
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_tokens=st.integers(0, 6),
    num_experts=st.integers(1, 16),
    k_frac=st.floats(0.0, 1.0),
    dim=st.integers(1, 16),
    route_scale=_route_scale,
    use_bias=st.booleans(),
)
def test_gate_score_layer_properties(seed, num_tokens, num_experts, k_frac, dim, route_scale, use_bias) -> None:
    g = torch.Generator().manual_seed(seed)
    top_k = max(1, min(8, num_experts, round(k_frac * num_experts)))
    x = torch.randn(num_tokens, dim, generator=g) * 2
    weight = torch.randn(num_experts, dim, generator=g)
    bias = torch.randn(num_experts, generator=g) if use_bias else None
    weights, experts = moe_gate(x, weight, bias, top_k=top_k, route_scale=route_scale)
    assert weights.shape == experts.shape == (num_tokens, top_k)
    assert ((experts >= 0) & (experts < num_experts)).all()
    for row in experts.tolist():
        assert len(set(row)) == top_k  # unique
    assert (weights > 0).all()
    torch.testing.assert_close(
        weights.double().sum(-1), torch.full((num_tokens,), route_scale, dtype=torch.float64), atol=0, rtol=1e-6
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_tokens=st.integers(0, 6),
    num_experts=st.integers(1, 16),
    top_k=st.integers(1, 8),
    vocab=st.integers(1, 30),
    route_scale=_route_scale,
)
def test_gate_hash_layer_properties(seed, num_tokens, num_experts, top_k, vocab, route_scale) -> None:
    g = torch.Generator().manual_seed(seed)
    top_k = min(top_k, num_experts)
    x = torch.randn(num_tokens, 8, generator=g) * 2
    weight = torch.randn(num_experts, 8, generator=g)
    tid2eid = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(vocab)])
    token_ids = torch.randint(0, vocab, (num_tokens,), generator=g)
    weights, experts = moe_gate(x, weight, top_k=top_k, route_scale=route_scale, tid2eid=tid2eid, token_ids=token_ids)
    assert torch.equal(experts, tid2eid[token_ids].to(torch.int32))
    torch.testing.assert_close(  # same bound and reason as for score layers
        weights.double().sum(-1), torch.full((num_tokens,), route_scale, dtype=torch.float64), atol=0, rtol=1e-6
    )


# --------------------------------------------------------------------------- experts


def test_swiglu_clamp_by_hand() -> None:
    # x = e_0 picks column 0 of w1 / w3: gate = [25, -25, 5], up = [-25, 25, 3]; w2 = I.
    x = torch.tensor([[1.0, 0.0, 0.0]])
    w1 = torch.zeros(3, 3)
    w3 = torch.zeros(3, 3)
    w1[:, 0] = torch.tensor([25.0, -25.0, 5.0])
    w3[:, 0] = torch.tensor([-25.0, 25.0, 3.0])
    w2 = torch.eye(3)
    rw = torch.tensor([0.5])
    clamped = swiglu_expert(x, w1, w2, w3, route_weight=rw, swiglu_limit=10.0)
    # gate clamped only from above (25 -> 10; -25 stays), up clamped both ways (-25 -> -10, 25 -> 10).
    want = [0.5 * _silu(10.0) * -10.0, 0.5 * _silu(-25.0) * 10.0, 0.5 * _silu(5.0) * 3.0]
    torch.testing.assert_close(clamped.double(), torch.tensor([want], dtype=torch.float64), **HAND_TOL)
    free = swiglu_expert(x, w1, w2, w3, route_weight=rw)
    want_free = [0.5 * _silu(25.0) * -25.0, 0.5 * _silu(-25.0) * 25.0, 0.5 * _silu(5.0) * 3.0]
    torch.testing.assert_close(free.double(), torch.tensor([want_free], dtype=torch.float64), **HAND_TOL)


@pytest.mark.parametrize("limit", [None, 10.0, 0.75])
def test_swiglu_expert_matches_naive(limit: float | None) -> None:
    g = torch.Generator().manual_seed(7)
    T, dim, inter = 6, 16, 8
    x = torch.randn(T, dim, generator=g) * 3  # gate/up std ~12: many exceed the limit 10
    w1, w2, w3 = make_expert(g, dim, inter)
    rw = torch.rand(T, generator=g)
    got = swiglu_expert(x, w1, w2, w3, route_weight=rw, swiglu_limit=limit)
    xs, l1, l2, l3 = (t.double().tolist() for t in (x, w1, w2, w3))
    want = torch.tensor(
        [naive_expert_token(xs[t], l1, l2, l3, rw[t].item(), limit) for t in range(T)], dtype=torch.float64
    )
    assert got.dtype == torch.float32 and got.shape == (T, dim)
    torch.testing.assert_close(got.double(), want, **EXPERT_TOL)
    if limit is not None:
        assert (x @ w3.T).abs().max() > limit and (x @ w1.T).max() > limit  # the clamp was exercised


def test_moe_matches_naive_with_idle_experts() -> None:
    g = torch.Generator().manual_seed(8)
    T, dim, inter, E, k = 12, 16, 8, 8, 3
    x = torch.randn(T, dim, generator=g) * 3
    used = torch.tensor([0, 1, 2, 5])  # experts 3, 4, 6, 7 receive no token
    experts = torch.stack([used[torch.randperm(4, generator=g)[:k]] for _ in range(T)]).to(torch.int32)
    weights = torch.rand(T, k, generator=g) + 0.1
    routed = [make_expert(g, dim, inter, dtype=torch.bfloat16 if e % 2 else torch.float32) for e in range(E)]
    for e in (3, 4, 6, 7):  # poison idle experts: any use of them would give NaN
        routed[e] = tuple(torch.full_like(w, float("nan")) for w in routed[e])
    shared = make_expert(g, dim, 2 * inter)
    got = moe(x, weights, experts, routed, shared)
    want = naive_moe(x, weights, experts, routed, shared, 10.0)
    assert got.dtype == torch.float32 and got.shape == (T, dim)
    torch.testing.assert_close(got.double(), want, **EXPERT_TOL)
    # The shared expert is not clamped (its inputs exceed 10 here, so clamping it would show).
    assert (x @ shared[0].T).abs().max() > 10
    clamped_shared = naive_moe(x, weights, experts, routed, None, 10.0) + torch.tensor(
        [naive_expert_token(xt, *(w.double().tolist() for w in shared), 1.0, 10.0) for xt in x.double().tolist()],
        dtype=torch.float64,
    )
    assert (clamped_shared - want).abs().max() > 1.0


def test_moe_end_to_end_with_gate_and_no_shared() -> None:
    g = torch.Generator().manual_seed(9)
    T, dim, inter, E, k = 10, 16, 8, 6, 2
    x = torch.randn(T, dim, generator=g)
    weights, experts = moe_gate(x, torch.randn(E, dim, generator=g), torch.randn(E, generator=g), top_k=k)
    routed = [make_expert(g, dim, inter) for _ in range(E)]
    got = moe(x, weights, experts, routed, None, swiglu_limit=0.5)
    torch.testing.assert_close(got.double(), naive_moe(x, weights, experts, routed, None, 0.5), **EXPERT_TOL)


def test_moe_no_tokens() -> None:
    g = torch.Generator().manual_seed(10)
    routed = [make_expert(g, 16, 8) for _ in range(4)]
    out = moe(
        torch.zeros(0, 16), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int32), routed, make_expert(g, 16, 8)
    )
    assert out.shape == (0, 16) and out.dtype == torch.float32


# --------------------------------------------------------------------------- bad input


def test_gate_bad_input() -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 8, generator=g)
    weight = torch.randn(6, 8, generator=g)
    with pytest.raises(TypeError, match=r"^x must be"):
        moe_gate(x.to(torch.int32), weight)
    with pytest.raises(ValueError, match=r"^weight must have shape \[6, 8\], got \[6, 7\]"):
        moe_gate(x, weight[:, :7])
    with pytest.raises(ValueError, match=r"^top_k must be <= the number of experts E=6, got 7"):
        moe_gate(x, weight, top_k=7)
    with pytest.raises(ValueError, match=r"^top_k must be >= 1, got 0"):
        moe_gate(x, weight, top_k=0)
    with pytest.raises(ValueError, match=r"^route_scale must be a finite number > 0, got -1.0"):
        moe_gate(x, weight, top_k=2, route_scale=-1.0)
    with pytest.raises(TypeError, match=r"^bias must be float32, got bfloat16"):
        moe_gate(x, weight, torch.zeros(6, dtype=torch.bfloat16), top_k=2)
    with pytest.raises(ValueError, match=r"^bias must have shape \[6\], got \[5\]"):
        moe_gate(x, weight, torch.zeros(5), top_k=2)
    tid2eid = torch.randint(0, 6, (10, 2), generator=g)
    token_ids = torch.tensor([0, 9, 3])
    with pytest.raises(ValueError, match=r"^bias must be None for a hash layer"):
        moe_gate(x, weight, torch.zeros(6), top_k=2, tid2eid=tid2eid, token_ids=token_ids)
    with pytest.raises(ValueError, match=r"token_ids is None"):
        moe_gate(x, weight, top_k=2, tid2eid=tid2eid)
    with pytest.raises(ValueError, match=r"tid2eid is None"):
        moe_gate(x, weight, top_k=2, token_ids=token_ids)
    with pytest.raises(ValueError, match=r"^token_ids must lie in \[0, 10\) \(token ids, vocab=10\), got 10"):
        moe_gate(x, weight, top_k=2, tid2eid=tid2eid, token_ids=torch.tensor([0, 10, 3]))
    with pytest.raises(ValueError, match=r"^token_ids must have shape \[3\], got \[2\]"):
        moe_gate(x, weight, top_k=2, tid2eid=tid2eid, token_ids=token_ids[:2])
    with pytest.raises(TypeError, match=r"^token_ids must be int32 or int64, got float32"):
        moe_gate(x, weight, top_k=2, tid2eid=tid2eid, token_ids=token_ids.float())
    bad_table = tid2eid.clone()
    bad_table[4, 1] = 6
    with pytest.raises(ValueError, match=r"^tid2eid must lie in \[0, 6\) \(expert ids, E=6\), got 6"):
        moe_gate(x, weight, top_k=2, tid2eid=bad_table, token_ids=token_ids)
    with pytest.raises(ValueError, match=r"^tid2eid must have shape \[10, 3\], got \[10, 2\]"):
        moe_gate(x, weight, top_k=3, tid2eid=tid2eid, token_ids=token_ids)


def test_expert_and_moe_bad_input() -> None:
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 8, generator=g)
    w1, w2, w3 = make_expert(g, 8, 4)
    with pytest.raises(ValueError, match=r"^w2 must have shape \[8, 4\], got \[4, 8\]"):
        swiglu_expert(x, w1, w2.T, w3)
    with pytest.raises(ValueError, match=r"^w3 must have shape \[4, 8\], got \[5, 8\]"):
        swiglu_expert(x, w1, w2, torch.zeros(5, 8))
    with pytest.raises(ValueError, match=r"^route_weight must have shape \[3\], got \[2\]"):
        swiglu_expert(x, w1, w2, w3, route_weight=torch.ones(2))
    with pytest.raises(ValueError, match=r"^swiglu_limit must be a finite number > 0, got 0"):
        swiglu_expert(x, w1, w2, w3, swiglu_limit=0)
    routed = [make_expert(g, 8, 4) for _ in range(4)]
    weights = torch.ones(3, 2)
    experts = torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^experts must lie in \[0, 4\) \(expert ids, E=4\), got 4"):
        moe(x, weights, torch.tensor([[0, 1], [2, 4], [1, 2]]), routed, None)
    with pytest.raises(ValueError, match=r"^experts must lie in \[0, 4\) \(expert ids, E=4\), got -1"):
        moe(x, weights, torch.tensor([[0, 1], [2, -1], [1, 2]]), routed, None)
    with pytest.raises(ValueError, match=r"^experts must have shape \[3, 2\], got \[3, 1\]"):
        moe(x, weights, experts[:, :1], routed, None)
    with pytest.raises(TypeError, match=r"^weights must be float32, got bfloat16"):
        moe(x, weights.bfloat16(), experts, routed, None)
    bad = list(routed)
    bad[2] = (w1, w2, torch.zeros(4, 7))
    with pytest.raises(ValueError, match=r"^routed\[2\]\.w3 must have shape \[4, 8\], got \[4, 7\]"):
        moe(x, weights, experts, bad, None)
    bad[2] = (w1, w2)
    with pytest.raises(TypeError, match=r"^routed\[2\] must be a \(w1, w2, w3\) triple"):
        moe(x, weights, experts, bad, None)
    with pytest.raises(ValueError, match=r"^shared\.w2 must have shape \[8, 4\], got \[8, 5\]"):
        moe(x, weights, experts, routed, (w1, torch.zeros(8, 5), w3))
    with pytest.raises(TypeError, match=r"^routed must be a non-empty sequence"):
        moe(x, weights, experts, [], None)
