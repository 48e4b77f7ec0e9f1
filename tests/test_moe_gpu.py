"""MoE kernels on the GPU: routing, permutation, grouped SwiGLU GEMMs and combine against the fp32 reference.

Tolerances (``_check_experts``), for an output ``out`` against ``tilev4.reference.moe``:

* the output is rounded to bf16 once (relative 2^-9); 2^-8·|ref| also absorbs the fp32 sum order;
* every routed term ``w·expert(x)`` and the shared term go through two bf16 roundings: h before the
  down projection (relative 2^-9 per element, which reaches y as a random-sign sum of standard
  deviation ~2^-9/√3 · rms(y) — the row's rms, not the element, since an element near 0 gets the
  same absolute error) and y itself (2^-9·|y|). Over ~10^5 elements the extreme is ~5σ, so a term
  is off by at most ~3·2^-9·(|y| + rms(y)); we allow 2^-6·(|y| + rms_row(y)) per term, summed;
* the fp32 GEMMs differ from torch's only in accumulation order (~1e-6 relative): negligible.

A wrong expert, slot, weight or clamp moves an element by about the size of a term, 30× the
allowance. Integer outputs (ids, counts, offsets, positions) and anything that claims batch
invariance are compared bit for bit; outputs are poisoned (NaN / -1) before every launch and NaN
never passes a check.
"""

import functools
import importlib

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tilev4.reference import moe as R

K = importlib.import_module("tilev4.kernels.moe")  # tilev4.kernels also exports the function `moe`

pytestmark = pytest.mark.gpu
OUT_ULP = 2.0**-8  # bf16 output rounding (2^-9) with a factor 2 for the fp32 summation order
TERM_TOL = 2.0**-6  # per routed / shared term, see the module docstring
# scores: the logits are fp32 sums in another order; the tensor core truncates (round toward zero) once per
# 16-term step, 3·dim/16 steps, so |Δlogit| <= 3·dim/16 · 2^-23 · |partial sum| ≈ 2e-4 at dim 4096 in the worst
# case, ~1e-5 typically, and ds/dlogit <= 0.5. A gate weight rounded to bf16 instead of split exactly would be off
# by ~1e-3 per logit: the mean error (~3e-4 then, ~1e-5 here) tells the two apart.
SCORE_TOL = {"atol": 3e-4, "rtol": 1e-4}
SCORE_MEAN_ERR = 5e-5
NEAR_TIE = 2 * 3e-4  # two keys closer than twice the score tolerance may come out in either order
WEIGHT_TOL = {"atol": 0.0, "rtol": 2e-6}  # the same fp32 ops on the same scores, sum of k values reordered


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _randn(*shape, g, scale=1.0, dtype=torch.bfloat16):
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


def _layer(dim, inter, num_experts, shared_inter, seed):
    """Gate (fp32) and expert weights (bf16) scaled so that gate / up logits are ~N(0, |x|²)."""
    g = _gen(seed)
    gate = _randn(num_experts, dim, g=g, scale=dim**-0.5, dtype=torch.float32)
    bias = _randn(num_experts, g=g, scale=0.1, dtype=torch.float32)
    w1 = _randn(num_experts, inter, dim, g=g, scale=dim**-0.5)
    w3 = _randn(num_experts, inter, dim, g=g, scale=dim**-0.5)
    w2 = _randn(num_experts, dim, inter, g=g, scale=inter**-0.5)
    shared = None
    if shared_inter:
        shared = (_randn(shared_inter, dim, g=g, scale=dim**-0.5),
                  _randn(dim, shared_inter, g=g, scale=shared_inter**-0.5),
                  _randn(shared_inter, dim, g=g, scale=dim**-0.5))
    return gate, bias, w1, w2, w3, shared


def _random_routing(num_tokens, top_k, num_experts, g, used=None):
    """Distinct experts per token (from ``used`` if given) and positive weights."""
    pool = torch.arange(num_experts, device="cuda") if used is None else torch.tensor(used, device="cuda")
    keys = torch.rand(num_tokens, pool.numel(), generator=g, device="cuda")
    experts = pool[keys.topk(top_k, dim=-1).indices].to(torch.int32)
    weights = torch.rand(num_tokens, top_k, generator=g, device="cuda") + 0.1
    return weights, experts


def _poison(*shape, dtype):
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device="cuda")


def _reference(x, weights, experts, w1, w2, w3, shared, limit):
    """``R.moe`` on the CPU in fp32, and the per-element tolerance scale Σ_terms (|term| + rms_row(term))."""
    xf, wts, ex = x.float().cpu(), weights.cpu(), experts.cpu().long()
    w1c, w2c, w3c = w1.cpu(), w2.cpu(), w3.cpu()
    routed = [(w1c[e], w2c[e], w3c[e]) for e in range(w1.shape[0])]
    shared_c = None if shared is None else tuple(t.cpu() for t in shared)
    ref = R.moe(xf, wts, ex, routed, shared_c, limit)
    scale = torch.zeros_like(ref)
    for e, (a, b, c) in enumerate(routed):
        tok, slot = torch.nonzero(ex == e, as_tuple=True)
        if tok.numel():
            term = R.swiglu_expert(xf[tok], a, b, c, wts[tok, slot], limit)  # [n_e, dim]
            scale.index_add_(0, tok, term.abs() + term.square().mean(-1, keepdim=True).sqrt())
    if shared_c is not None:
        term = R.swiglu_expert(xf, *shared_c)
        scale += term.abs() + term.square().mean(-1, keepdim=True).sqrt()
    return ref, scale


def _check_experts(out, ref, scale, bf16_out=True):
    out = out.float().cpu()
    assert not torch.isnan(out).any(), "NaN in the output"
    tol = (OUT_ULP if bf16_out else 0.0) * ref.abs() + TERM_TOL * scale + 1e-6
    excess = (out - ref).abs() - tol
    assert (excess <= 0).all(), f"max excess {excess.max().item():.3g} at {divmod(int(excess.argmax()), ref.shape[1])}"


# ------------------------------------------------------------------------------------------------ routing


def _expected_ids(scores, bias, top_k):
    """The reference's selection rule applied to the kernel's own scores: stable sort of s + bias, descending."""
    key = scores if bias is None else scores + bias
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :top_k].to(torch.int32)


@pytest.mark.parametrize(("dim", "num_experts", "top_k", "num_tokens"),
                         [(256, 8, 2, 67), (4096, 256, 6, 300), (4096, 256, 6, 1), (4096, 256, 6, 129)])
def test_route_score_layer(dim, num_experts, top_k, num_tokens):
    g = _gen(dim + num_tokens)
    x = _randn(num_tokens, dim, g=g)
    gate, bias, *_ = _layer(dim, 8, num_experts, 0, seed=dim)
    out = (_poison(num_tokens, top_k, dtype=torch.float32), _poison(num_tokens, top_k, dtype=torch.int32),
           _poison(num_tokens, num_experts, dtype=torch.float32))
    weights, experts, scores = K.moe_route(x, gate, bias, top_k, 1.5, return_scores=True, out=out)
    assert not torch.isnan(scores).any() and not torch.isnan(weights).any()
    # scores: fp32 logits from the exact 3×bf16 split, against fp64
    ref_scores = torch.sqrt(torch.nn.functional.softplus(x.double() @ gate.double().T)).float()
    torch.testing.assert_close(scores, ref_scores, **SCORE_TOL)
    assert (scores - ref_scores).abs().mean() < SCORE_MEAN_ERR
    # ids: bit-exact against the reference rule on the kernel's own scores (ties -> smaller id)
    assert torch.equal(experts, _expected_ids(scores, bias, top_k))
    # weights: s_sel / Σ s_sel · route_scale on the kernel's scores; they sum to route_scale
    sel = scores.gather(1, experts.long())
    torch.testing.assert_close(weights, sel / sel.sum(-1, keepdim=True) * 1.5, **WEIGHT_TOL)
    torch.testing.assert_close(weights.sum(-1), torch.full((num_tokens,), 1.5, device="cuda"), atol=0, rtol=1e-5)
    # against the CPU reference: only near-ties may pick differently
    ref_w, ref_e = R.moe_gate(x.cpu(), gate.cpu(), bias.cpu(), top_k, 1.5)
    key = (torch.sqrt(torch.nn.functional.softplus(x.cpu().float() @ gate.cpu().T)) + bias.cpu())
    differ = experts.cpu() != ref_e
    if differ.any():
        gap = (key.gather(1, experts.cpu().long()) - key.gather(1, ref_e.long())).abs()
        assert (gap[differ] < NEAR_TIE).all(), "a selection differs from the reference away from a near-tie"
    same = ~differ.any(-1)
    torch.testing.assert_close(weights.cpu()[same], ref_w[same], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("dim", "num_experts", "top_k"), [(256, 8, 2), (4096, 256, 6)])
def test_route_ties_go_to_the_smaller_expert_id(dim, num_experts, top_k):
    x = _randn(33, dim, g=_gen(5))
    gate = torch.zeros(num_experts, dim, device="cuda")  # every logit is exactly 0: all scores tie
    weights, experts = K.moe_route(x, gate, None, top_k, 1.5)
    assert torch.equal(experts.cpu(), torch.arange(top_k, dtype=torch.int32).expand(33, top_k))
    torch.testing.assert_close(weights, torch.full_like(weights, 1.5 / top_k), atol=0, rtol=1e-6)
    bias = torch.zeros(num_experts, device="cuda")
    bias[torch.arange(num_experts) % 3 == 1] = 0.5  # ties within the raised group and within the rest
    _, experts = K.moe_route(x, gate, bias, top_k, 1.5)
    raised = [e for e in range(num_experts) if e % 3 == 1]
    expected = (raised + [e for e in range(num_experts) if e % 3 != 1])[:top_k]
    assert torch.equal(experts.cpu(), torch.tensor(expected, dtype=torch.int32).expand(33, top_k))


@pytest.mark.parametrize(("dim", "num_experts", "top_k"), [(256, 8, 2), (4096, 256, 6)])
def test_route_hash_layer(dim, num_experts, top_k):
    g = _gen(11)
    num_tokens, vocab = 77, 1000
    x = _randn(num_tokens, dim, g=g)
    gate, *_ = _layer(dim, 8, num_experts, 0, seed=3)
    tid2eid = torch.randint(0, num_experts, (vocab, top_k), generator=g, device="cuda", dtype=torch.int32)
    tid2eid[7] = num_experts - 1  # a row naming one expert twice (the reference counts it twice)
    token_ids = torch.randint(0, vocab, (num_tokens,), generator=g, device="cuda")  # int64, as the model has them
    token_ids[:3] = 7
    weights, experts, scores = K.moe_route(x, gate, None, top_k, 1.5, tid2eid, token_ids, return_scores=True)
    assert torch.equal(experts, tid2eid[token_ids])
    sel = scores.gather(1, experts.long())
    torch.testing.assert_close(weights, sel / sel.sum(-1, keepdim=True) * 1.5, **WEIGHT_TOL)
    ref_w, ref_e = R.moe_gate(x.cpu(), gate.cpu(), None, top_k, 1.5, tid2eid.cpu(), token_ids.cpu())
    assert torch.equal(experts.cpu(), ref_e)
    torch.testing.assert_close(weights.cpu(), ref_w, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ permutation


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "pattern"),
    [(3000, 6, 256, "random"), (500, 2, 16, "two experts"), (1, 6, 256, "random"), (700, 4, 8, "duplicates"),
     (129, 1, 1, "random")],
)
def test_permutation_is_the_stable_sort(monkeypatch, num_tokens, top_k, num_experts, pattern):
    monkeypatch.setattr(K, "_POISON_SCRATCH", True)  # every internal buffer starts as NaN / -1
    g = _gen(num_tokens)
    x = _randn(num_tokens, 264, g=g)
    weights, experts = _random_routing(num_tokens, top_k, num_experts, g)
    if pattern == "two experts":  # most experts empty, two with many M tiles
        experts = torch.where(experts % 2 == 0, 3, 11).to(torch.int32)
    if pattern == "duplicates":
        experts[::5, 1] = experts[::5, 0]
    perm = K.moe_permute(x, weights, experts, num_experts)
    flat = experts.flatten().long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    tiles = (counts + K.BLOCK_M - 1) // K.BLOCK_M
    zero = torch.zeros(1, dtype=torch.long, device="cuda")
    assert torch.equal(perm.counts.long(), counts)
    assert torch.equal(perm.offsets.long(), torch.cat([zero, counts.cumsum(0)]))
    assert torch.equal(perm.sorted_tokens.long(), order // top_k)
    pair_pos = torch.empty_like(flat)
    pair_pos[order] = torch.arange(flat.numel(), device="cuda")
    assert torch.equal(perm.pair_pos.long().flatten(), pair_pos)
    assert torch.equal(perm.tile_offsets.long(), torch.cat([zero, tiles.cumsum(0)]))
    num_tiles = int(tiles.sum())
    tile_expert = torch.repeat_interleave(torch.arange(num_experts, device="cuda"), tiles)
    assert torch.equal(perm.tile_expert[:num_tiles].long(), tile_expert)
    # each M tile's record: expert, the expert's first M tile, its first row, its rows; zeros past the last tile
    first_tile = torch.cat([zero, tiles.cumsum(0)])[tile_expert]
    first_row = torch.cat([zero, counts.cumsum(0)])[tile_expert]
    want = torch.stack([tile_expert, first_tile, first_row, counts[tile_expert]], 1)
    assert torch.equal(perm.tile_info[:num_tiles].long(), want)
    assert not perm.tile_info[num_tiles:].any()
    assert torch.equal(perm.x_sorted, x[order // top_k])
    assert torch.equal(perm.w_sorted, weights.flatten()[order])


def test_permutation_gathers_a_payload():
    """``payload`` (e.g. FP8 rows quantised once a token) is gathered instead of x, the rest of the permutation
    unchanged; a bf16 GEMM refuses a permutation of FP8 rows; bad payloads are refused."""
    from tilev4.kernels import fp8_quantize

    g = _gen(8)
    x = _randn(300, 384, g=g, scale=3.0)
    weights, experts = _random_routing(300, 3, 7, g)
    x8, _ = fp8_quantize(x)
    plain = K.moe_permute(x, weights, experts, 7)
    perm = K.moe_permute(x, weights, experts, 7, payload=x8)
    assert perm.x_sorted.dtype == torch.float8_e4m3fn
    assert torch.equal(perm.x_sorted.view(torch.uint8), x8.view(torch.uint8)[plain.sorted_tokens.long()])
    for f in ("counts", "offsets", "sorted_tokens", "pair_pos", "tile_offsets", "w_sorted"):
        assert torch.equal(getattr(perm, f), getattr(plain, f)), f
    w = _randn(7, 128, 384, g=g, scale=0.05)
    with pytest.raises(TypeError, match=r"perm\.x_sorted"):
        K.moe_up(perm, w, w, 10.0)
    with pytest.raises(ValueError, match="payload"):
        K.moe_permute(x, weights, experts, 7, payload=x8[:, :256].contiguous())
    with pytest.raises(TypeError, match="payload"):
        K.moe_permute(x, weights, experts, 7, payload=x.float())


# ------------------------------------------------------------------------------------------------ experts


EXPERT_CASES = {
    # dim, inter, E, top_k, T, shared inter, x scale (4: some gate / up logits pass the clamp at 10)
    "tiny": (256, 128, 8, 2, 67, 128, 4.0),
    "flash": (4096, 2048, 16, 6, 40, 2048, 4.0),
    "odd sizes": (264, 200, 5, 3, 33, 72, 4.0),  # K, N and the shared expert not multiples of the tiles
    "no shared": (256, 128, 8, 2, 50, 0, 1.0),
}


@pytest.mark.parametrize("case", list(EXPERT_CASES))
def test_experts_match_reference(case):
    dim, inter, num_experts, top_k, num_tokens, shared_inter, scale = EXPERT_CASES[case]
    _, _, w1, w2, w3, shared = _layer(dim, inter, num_experts, shared_inter, seed=len(case))
    g = _gen(1 + len(case))
    x = _randn(num_tokens, dim, g=g, scale=scale)
    # the last expert receives no token
    weights, experts = _random_routing(num_tokens, top_k, num_experts, g, used=range(num_experts - 1))
    out = K.moe_experts(x, weights, experts, w1, w2, w3, shared, 10.0, out=_poison(num_tokens, dim,
                                                                                   dtype=torch.bfloat16))
    ref, tol_scale = _reference(x, weights, experts, w1, w2, w3, shared, 10.0)
    _check_experts(out, ref, tol_scale)
    # fp32 output: the same accumulator, not rounded; rounding it gives the bf16 output bit for bit
    out32 = K.moe_experts(x, weights, experts, w1, w2, w3, shared, 10.0, out_dtype=torch.float32,
                          out=_poison(num_tokens, dim, dtype=torch.float32))
    _check_experts(out32, ref, tol_scale, bf16_out=False)
    assert torch.equal(out32.bfloat16(), out)
    # deterministic: a second run gives the same bits
    assert torch.equal(K.moe_experts(x, weights, experts, w1, w2, w3, shared, 10.0), out)


@pytest.mark.parametrize(("case", "used"), [("tiny", None), ("odd sizes", None), ("flash", None),
                                            ("tiny", (1, 5)), ("flash", (0, 3, 9, 10, 12, 15))])
def test_gemm_schedules_agree_bit_for_bit(case, used):
    """ws (TMA producer + wgmma consumers) and pipelined (cp.async) run the same wgmma sequence over K: the same
    bits, in grouped mode (partial tiles, tiles with one live 64-row half, an empty expert) and in dense mode."""
    from tilev4.kernels import compile_kernel

    dim, inter, num_experts, top_k, num_tokens, _, scale = EXPERT_CASES[case]
    _, _, w1, w2, w3, _ = _layer(dim, inter, num_experts, 0, seed=41 + len(case))
    g = _gen(42)
    num_tokens = 300 if used else num_tokens  # few experts used: 300+ rows each, 3+ M tiles
    x = _randn(num_tokens, dim, g=g, scale=scale)
    weights, experts = _random_routing(num_tokens, top_k, num_experts, g,
                                       used=used or range(num_experts - 1))
    perm = K.moe_permute(x, weights, experts, num_experts)
    n = perm.x_sorted.shape[0]
    tables = (perm.offsets, perm.tile_offsets, perm.tile_info)  # the bf16 GEMMs read the tiles' records
    outs = {}
    for schedule in K.GEMM_SCHEDULES:
        up = compile_kernel("moe_up", {"dim": dim, "block_m": perm.block_m, "schedule": schedule})
        down = compile_kernel("moe_down", {"inter": inter, "block_m": perm.block_m, "schedule": schedule})
        up_dense = compile_kernel("moe_up", {"dim": dim, "dense": True, "schedule": schedule})
        down_dense = compile_kernel("moe_down", {"inter": inter, "dense": True, "schedule": schedule})
        h = _poison(n, inter, dtype=torch.bfloat16)
        up(perm.x_sorted, perm.w_sorted, w1, w3, *tables, h, 10.0)
        y = _poison(n, dim, dtype=torch.bfloat16)
        down(h, w2, *tables, y)
        hd = _poison(num_tokens, inter, dtype=torch.bfloat16)
        up_dense(x, w1[:1], w3[:1], hd, float("inf"))
        yd = _poison(num_tokens, dim, dtype=torch.bfloat16)
        down_dense(hd, w2[:1], yd)
        outs[schedule] = (h, y, hd, yd)
    for name, a, b in zip(("h", "y", "dense h", "dense y"), *outs.values()):
        assert not torch.isnan(a).any(), name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("block_m", [128, 192])
def test_partly_filled_slabs_of_every_size(block_m):
    """The ws programs load a partly filled 64-row slab as 8-row boxes and zero the rest of it in shared memory
    (:func:`tilev4.kernels.moe_ws.zero_padding`): experts of 1-63 rows past 0, 64 and 128 (the last slab of each
    consumer warpgroup partly filled, every box count, a box cut by the segment's end, the last rows of x_sorted) give
    the pipelined schedule's bits (whole slabs by cp.async), NaN-free from poisoned outputs, and match the fp32
    reference."""
    from tilev4.kernels import compile_kernel

    dim, inter = 256, 128
    counts = [c + base for base in (0, 64, 128) for c in range(1, 64, 2)] + [64, 128, 192, 63]
    num_experts = len(counts)
    _, _, w1, w2, w3, _ = _layer(dim, inter, num_experts, 0, seed=71)
    g = _gen(72)
    ids = torch.repeat_interleave(torch.arange(num_experts, device="cuda"), torch.tensor(counts, device="cuda"))
    experts = ids[torch.randperm(ids.numel(), generator=g, device="cuda")].to(torch.int32).view(-1, 1)
    num_tokens = experts.shape[0]
    x = _randn(num_tokens, dim, g=g, scale=4.0)
    weights = torch.rand(num_tokens, 1, generator=g, device="cuda") + 0.1
    perm = K.moe_permute(x, weights, experts, num_experts, up_block_m=block_m)
    n = perm.x_sorted.shape[0]
    bm, tile_offsets, tile_info = K._bf16_tiles(perm)
    tables = (perm.offsets, tile_offsets, tile_info)
    cfg = K.UP_192_CONFIG if bm == 192 else {"block_m": bm}
    down_cfg = K.DOWN_192_CONFIG if bm == 192 else {"block_m": bm}
    outs = {}
    for schedule in ("ws", "pipelined"):
        if bm == 192 and schedule == "pipelined":  # the 192-row table is ws-only; its bits are the 128-row table's
            perm128 = K.moe_permute(x, weights, experts, num_experts, up_block_m=128)
            tables = (perm128.offsets, perm128.tile_offsets, perm128.tile_info)
            cfg, down_cfg = {"block_m": 128}, {"block_m": 128}
        up = compile_kernel("moe_up", {"dim": dim, **cfg, "schedule": schedule})
        down = compile_kernel("moe_down", {"inter": inter, **down_cfg, "schedule": schedule})
        h = _poison(n, inter, dtype=torch.bfloat16)
        up(perm.x_sorted, perm.w_sorted, w1, w3, *tables, h, 10.0)
        y = _poison(n, dim, dtype=torch.bfloat16)
        down(h, w2, *tables, y)
        outs[schedule] = (h, y)
    for name, a, b in zip(("h", "y"), *outs.values()):
        assert not torch.isnan(a).any(), name
        assert torch.equal(a, b), name
    out = K.moe_experts(x, weights, experts, w1, w2, w3, None, 10.0, up_block_m=block_m)
    ref, tol_scale = _reference(x, weights, experts, w1, w2, w3, None, 10.0)
    _check_experts(out, ref, tol_scale)


UP_TILE_CASES = {
    # dim, inter, E, top_k, T, experts used: rows an expert around 160 (one 192-row tile each), a mix of
    # 129-192 / <= 128 / > 192 rows, all experts <= 128 rows (no 192-row tile), 300 rows each (128-row tiles only)
    "129-192 rows": (4096, 2048, 16, 6, 430, None),
    "mixed counts": (256, 384, 10, 1, 0, (150, 60, 250, 0, 170, 128, 129, 193, 192, 1)),  # rows an expert
    "small experts": (264, 200, 8, 2, 67, None),
    "300 rows each": (256, 128, 8, 2, 300, (1, 5)),
}


@pytest.mark.parametrize("case", list(UP_TILE_CASES))
def test_192_row_tiles_give_the_bits_of_128(case):
    """The bf16 expert GEMMs' own tile table (``perm.up_tiles``: one 192-row tile of three consumer warpgroups for
    an expert of 129-192 rows, 128-row tiles otherwise; the up- and the down-projection) computes each row with the
    same wgmma sequence over K as the 128-row table: the same bits, NaN-free from NaN-poisoned outputs; the table is
    the one ``tiles_of`` defines."""
    from tilev4.kernels.moe_tuning import tile_tables

    dim, inter, num_experts, top_k, num_tokens, used = UP_TILE_CASES[case]
    _, _, w1, w2, w3, _ = _layer(dim, inter, num_experts, 0, seed=51 + len(case))
    g = _gen(52 + len(case))
    x = _randn(max(num_tokens, 1), dim, g=g, scale=4.0)
    if case == "mixed counts":  # top-1 routing with these rows an expert, in a shuffled token order
        ids = torch.repeat_interleave(torch.arange(num_experts, device="cuda"), torch.tensor(used, device="cuda"))
        experts = ids[torch.randperm(ids.numel(), generator=g, device="cuda")].to(torch.int32).view(-1, 1)
        num_tokens = experts.shape[0]
        x = _randn(num_tokens, dim, g=g, scale=4.0)
        weights = torch.rand(num_tokens, 1, generator=g, device="cuda") + 0.1
    else:
        weights, experts = _random_routing(num_tokens, top_k, num_experts, g, used=used or range(num_experts))
    perm192 = K.moe_permute(x, weights, experts, num_experts, up_block_m=192)
    perm128 = K.moe_permute(x, weights, experts, num_experts, up_block_m=128)
    assert perm128.up_tiles is None and perm192.up_tiles is not None and perm192.up_tiles[0] == 192
    n = perm192.x_sorted.shape[0]
    _, want_offsets, want_expert = tile_tables(perm192.counts, 192, n)
    tiles = int(want_offsets[-1])
    assert torch.equal(perm192.up_tiles[1], want_offsets)
    assert torch.equal(perm192.up_tiles[2][:tiles], want_expert[:tiles])
    counts = perm192.counts.cpu()
    if case == "129-192 rows":
        assert ((counts > 128) & (counts <= 192)).sum() >= num_experts // 2, counts  # the 192-row tile is exercised
    h192 = K.moe_up(perm192, w1, w3, 10.0, out=_poison(n, inter, dtype=torch.bfloat16))
    h128 = K.moe_up(perm128, w1, w3, 10.0, out=_poison(n, inter, dtype=torch.bfloat16))
    assert not torch.isnan(h192).any()
    assert torch.equal(h192, h128)
    y192 = K.moe_down(perm192, h128, w2, out=_poison(n, dim, dtype=torch.bfloat16))
    y128 = K.moe_down(perm128, h128, w2, out=_poison(n, dim, dtype=torch.bfloat16))
    assert not torch.isnan(y192).any()
    assert torch.equal(y192, y128)


def test_moe_tables_128_192_and_the_default_give_the_same_bits():
    """``tilev4.moe(..., up_block_m=...)`` changes the tiling, not a bit: 128, 192 and the default's choice (192 here,
    where the mean rows an expert is in (128, 192])."""
    dim, inter, num_experts, top_k, num_tokens, shared_inter, scale = EXPERT_CASES["flash"]
    gate, bias, w1, w2, w3, shared = _layer(dim, inter, num_experts, shared_inter, seed=61)
    x = _randn(12 * num_tokens, dim, g=_gen(62), scale=scale)  # ~180 rows an expert: 192-row tiles in use
    assert K.choose_up_block_m(x.shape[0] * top_k, num_experts) == 192
    args = (x, gate, bias, w1, w2, w3, shared)
    want = K.moe(*args, top_k=top_k, up_block_m=128)
    for up_block_m in (192, None):
        got = K.moe(*args, top_k=top_k, up_block_m=up_block_m, out=_poison(*want.shape, dtype=torch.bfloat16))
        assert not torch.isnan(got).any()
        assert torch.equal(got, want), up_block_m


def test_experts_with_few_used_experts_and_poisoned_scratch(monkeypatch):
    dim, inter, num_experts, top_k, num_tokens = 256, 128, 8, 2, 300
    _, _, w1, w2, w3, shared = _layer(dim, inter, num_experts, 128, seed=21)
    g = _gen(22)
    x = _randn(num_tokens, dim, g=g, scale=2.0)
    weights, experts = _random_routing(num_tokens, top_k, num_experts, g, used=[1, 5])  # 300 rows each: 3 tiles
    clean = K.moe_experts(x, weights, experts, w1, w2, w3, shared)
    monkeypatch.setattr(K, "_POISON_SCRATCH", True)  # h, x_sorted / y_sorted, tables: NaN / -1 before launch
    out = K.moe_experts(x, weights, experts, w1, w2, w3, shared)
    assert torch.equal(out, clean)
    ref, tol_scale = _reference(x, weights, experts, w1, w2, w3, shared, 10.0)
    _check_experts(out, ref, tol_scale)


def test_pieces_compose_to_moe_experts():
    dim, inter, num_experts, top_k, num_tokens = 256, 128, 8, 2, 45
    _, _, w1, w2, w3, shared = _layer(dim, inter, num_experts, 128, seed=31)
    g = _gen(32)
    x = _randn(num_tokens, dim, g=g)
    weights, experts = _random_routing(num_tokens, top_k, num_experts, g)
    perm = K.moe_permute(x, weights, experts, num_experts)
    n = num_tokens * top_k
    h = K.moe_up(perm, w1, w3, 10.0, out=_poison(n, inter, dtype=torch.bfloat16))
    y = K.moe_down(perm, h, w2, out=_poison(n, dim, dtype=torch.bfloat16))
    ys = K.moe_shared_expert(x, *shared, out=_poison(num_tokens, dim, dtype=torch.bfloat16))
    out = K.moe_combine(y, perm.pair_pos, ys, out=_poison(num_tokens, dim, dtype=torch.bfloat16))
    assert not torch.isnan(h).any() and not torch.isnan(y).any() and not torch.isnan(ys).any()
    assert torch.equal(out, K.moe_experts(x, weights, experts, w1, w2, w3, shared))
    # h rows are the reference's h (fp32) rounded once to bf16
    xf, rows = x.float().cpu(), perm.sorted_tokens.long().cpu()
    ex = experts.flatten().cpu()[torch.sort(experts.flatten().cpu().long(), stable=True).indices]
    gate = torch.einsum("nd,nid->ni", xf[rows], w1.cpu().float()[ex.long()])
    up = torch.einsum("nd,nid->ni", xf[rows], w3.cpu().float()[ex.long()])
    h_ref = torch.nn.functional.silu(gate.clamp(max=10.0)) * up.clamp(-10.0, 10.0) * perm.w_sorted.cpu()[:, None]
    torch.testing.assert_close(h.float().cpu(), h_ref, atol=1e-4, rtol=2.0**-8)


def test_zero_tokens():
    dim, inter, num_experts = 256, 128, 8
    gate, bias, w1, w2, w3, shared = _layer(dim, inter, num_experts, 128, seed=41)
    x = torch.empty(0, dim, device="cuda", dtype=torch.bfloat16)
    weights, experts, scores = K.moe_route(x, gate, bias, 2, 1.5, return_scores=True)
    assert weights.shape == (0, 2) and experts.shape == (0, 2) and scores.shape == (0, num_experts)
    out = K.moe_experts(x, weights, experts, w1, w2, w3, shared)
    assert out.shape == (0, dim) and out.dtype == torch.bfloat16
    assert K.moe(x, gate, bias, w1, w2, w3, shared, top_k=2).shape == (0, dim)
    assert K.moe_shared_expert(x, *shared).shape == (0, dim)


def test_full_layer_matches_reference_routing_and_experts():
    dim, inter, num_experts, top_k, num_tokens = 256, 128, 8, 2, 90
    gate, bias, w1, w2, w3, shared = _layer(dim, inter, num_experts, 128, seed=51)
    x = _randn(num_tokens, dim, g=_gen(52), scale=3.0)
    out = K.moe(x, gate, bias, w1, w2, w3, shared, top_k=top_k, route_scale=1.5)
    weights, experts = K.moe_route(x, gate, bias, top_k, 1.5)
    ref, tol_scale = _reference(x, weights, experts, w1, w2, w3, shared, 10.0)
    _check_experts(out, ref, tol_scale)


def test_nan_token_stays_nan_and_alone():
    dim, inter, num_experts, top_k, num_tokens = 256, 128, 8, 2, 40
    gate, bias, w1, w2, w3, shared = _layer(dim, inter, num_experts, 128, seed=61)
    x = _randn(num_tokens, dim, g=_gen(62), scale=20.0)  # large: the clamp is active on many elements
    clean = K.moe(x, gate, bias, w1, w2, w3, shared, top_k=top_k)
    x[3, 5] = float("nan")
    out = K.moe(x, gate, bias, w1, w2, w3, shared, top_k=top_k)
    assert torch.isnan(out[3]).all(), "a NaN input must not be hidden (e.g. by the clamp)"
    keep = torch.arange(num_tokens, device="cuda") != 3
    assert torch.equal(out[keep], clean[keep])
    # with a finite routing the clamp alone must still propagate it
    weights, experts = _random_routing(num_tokens, top_k, num_experts, _gen(63))
    out = K.moe_experts(x, weights, experts, w1, w2, w3, None)
    assert torch.isnan(out[3]).all()
    assert not torch.isnan(out[keep]).any()


# ------------------------------------------------------------------------------------------------ batch invariance


@functools.lru_cache(maxsize=1)
def _invariance_layer():
    """V4-Flash gate (dim 4096, 256 experts, top-6) with small experts; 4 experts favoured so that their
    segments span many M tiles and the probe token lands at every kind of tile offset."""
    gate, bias, w1, w2, w3, shared = _layer(4096, 256, 256, 256, seed=71)
    bias[:4] += 3.0
    probe = _randn(1, 4096, g=_gen(72))
    alone = K.moe(probe, gate, bias, w1, w2, w3, shared)
    return gate, bias, w1, w2, w3, shared, probe, alone


@settings(max_examples=10, deadline=None, derandomize=True)
@given(n=st.integers(1, 600), pos=st.integers(0, 10**6), seed=st.integers(0, 2**31 - 1))
@example(n=2000, pos=1999, seed=1)
@example(n=1, pos=0, seed=2)
def test_batch_invariance(n, pos, seed):
    gate, bias, w1, w2, w3, shared, probe, alone = _invariance_layer()
    pos %= n
    batch = _randn(n, 4096, g=_gen(seed))
    batch[pos] = probe[0]
    out = K.moe(batch, gate, bias, w1, w2, w3, shared)
    assert not torch.isnan(alone).any()
    assert torch.equal(out[pos], alone[0]), f"token at {pos} of {n} differs from the token alone"


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_on_gpu():
    dim, inter, num_experts = 256, 128, 8
    gate, bias, w1, w2, w3, shared = _layer(dim, inter, num_experts, 128, seed=81)
    x = _randn(4, dim, g=_gen(82))
    weights = torch.rand(4, 2, device="cuda")
    experts = torch.tensor([[0, 1], [2, 8], [3, 4], [5, 6]], device="cuda", dtype=torch.int32)
    with pytest.raises(ValueError, match=r"experts must lie in \[0, 8\).*got 8"):
        K.moe_experts(x, weights, experts, w1, w2, w3, shared)
    tid2eid = torch.zeros(100, 2, device="cuda", dtype=torch.int32)
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 100\).*got 100"):
        K.moe_route(x, gate, None, 2, 1.5, tid2eid, torch.tensor([0, 1, 100, 2], device="cuda"))
    tid2eid[5, 1] = -1
    with pytest.raises(ValueError, match=r"tid2eid must lie in \[0, 8\).*got -1"):
        K.moe_route(x, gate, None, 2, 1.5, tid2eid, torch.tensor([0, 1, 2, 3], device="cuda"))
    misaligned = torch.empty(w1.numel() + 1, device="cuda", dtype=torch.bfloat16)[1:].view(w1.shape)
    with pytest.raises(ValueError, match="w1 must start at a 16-byte aligned address"):
        K.moe_experts(x, weights, experts.clamp(max=7), misaligned, w2, w3, shared)
    with pytest.raises(ValueError, match="weight must be on cuda"):
        K.moe_route(x, gate.cpu(), bias, 2, 1.5)


# ------------------------------------------------------------------------------------------------ FP8 weights

F = importlib.import_module("tilev4.kernels.moe_fp8")
FP8Weight = F.FP8Weight
FP8_ACC = 2.0**-10  # bound on the FP8 tensor-core accumulation error relative to Σ|products| of a 128-K block


def _dequant(w: "F.FP8Weight") -> torch.Tensor:
    """[E, N, K] fp32 from FP8 data and 128×128 scales (on the CPU)."""
    data, scale = w.data.cpu().float(), w.scale.cpu()
    n, k = data.shape[1:]
    return data * scale.repeat_interleave(128, 1)[:, :n].repeat_interleave(128, 2)[:, :, :k]


def _dequant_act(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] from FP8 activations and their 1×128 scales (on the CPU)."""
    return q.cpu().float() * scale.cpu().repeat_interleave(128, 1)


FP8_CASES = {
    # dim, inter, E, top_k, T, shared inter, x scale
    "small": (256, 256, 8, 2, 67, 128, 4.0),
    "flash": (4096, 2048, 16, 6, 40, 2048, 4.0),
    "ragged tiles": (384, 640, 5, 3, 301, 0, 1.0),  # several M tiles per expert, N not a multiple of 128
}


def _check_fp8_activation_layer(x, weights, experts, q, d, shared, moe_up, moe_down, weight_format):
    """The two GEMMs of a layer whose activations are quantised to FP8 (FP8 or FP4 weights ``q = (w1, w2, w3)``,
    ``d`` their fp32 values as the kernels use them), each against fp32 math on its own dequantised inputs; then the
    layer (``moe_experts`` with ``weight_format``) bit for bit as the composition of the two. Returns its output.

    The FP8 products and the power-of-two promotions are exact, so each GEMM differs from fp32 only by the tensor
    core's block sums and one bf16 rounding: FP8 wgmma sums a 128-long K block with a reduced-precision accumulator
    (~14 bits kept) before the fp32 promotion, so per output |err| <= FP8_ACC · Σ_k |a_k·b_k|, propagated through the
    SwiGLU (|∂h/∂gate| <= 1.1·|up|·w, |∂h/∂up| = |silu(gate)|·w; the clamps only shrink it)."""
    from tilev4.kernels import fp8_quantize

    q1, q2, q3 = q
    num_tokens, dim = x.shape
    num_experts, inter, top_k = d[0].shape[0], d[0].shape[1], experts.shape[1]
    perm = K.moe_permute(x, weights, experts, num_experts)
    n = num_tokens * top_k
    x8, xs = fp8_quantize(perm.x_sorted)
    h = moe_up(perm, x8, xs, q1, q3, 10.0, out=_poison(n, inter, dtype=torch.bfloat16))
    h8, hs = fp8_quantize(h)
    y = moe_down(perm, h8, hs, q2, out=_poison(n, dim, dtype=torch.bfloat16))
    _check_fp8_activation_gemms(perm, experts, (x8, xs), (h8, hs), h, y, d)
    ys = None if shared is None else K.moe_shared_expert(x, *shared)
    expected = K.moe_combine(y, perm.pair_pos, ys)
    out = K.moe_experts(x, weights, experts, q1, q2, q3, shared, 10.0, weight_format=weight_format,
                        out=_poison(num_tokens, dim, dtype=torch.bfloat16))
    assert torch.equal(out, expected)
    return out


def _check_fp8_activation_gemms(perm, experts, x_q, h_q, h, y, d):
    """h = up(x8) and y = down(h8) of a permutation (FP8 activations ``x_q = (x8, xs)``, ``h_q = (h8, hs)``; ``d``
    the weights' fp32 values as the kernels use them) against fp32 math, to the tolerance derived in
    :func:`_check_fp8_activation_layer`."""
    d1, d2, d3 = d
    num_experts, inter, dim = d1.shape[0], d1.shape[1], d1.shape[2]
    n = perm.x_sorted.shape[0]
    assert not torch.isnan(h).any() and not torch.isnan(y).any()
    ex = torch.sort(experts.flatten().cpu().long(), stable=True).values  # expert of each sorted row
    xq, hq, wts = _dequant_act(*x_q), _dequant_act(*h_q), perm.w_sorted.cpu()
    h_ref, y_ref = torch.zeros(n, inter), torch.zeros(n, dim)
    h_tol, y_tol = torch.zeros(n, inter), torch.zeros(n, dim)
    for e in range(num_experts):
        rows = torch.nonzero(ex == e).flatten()
        if rows.numel():
            gate, up = xq[rows] @ d1[e].T, xq[rows] @ d3[e].T
            h_ref[rows] = torch.nn.functional.silu(gate.clamp(max=10.0)) * up.clamp(-10.0, 10.0) * wts[rows, None]
            y_ref[rows] = hq[rows] @ d2[e].T
            dg, du = FP8_ACC * (xq[rows].abs() @ d1[e].T.abs()), FP8_ACC * (xq[rows].abs() @ d3[e].T.abs())
            g_c, u_c = gate.clamp(max=10.0), up.clamp(-10.0, 10.0)
            h_tol[rows] = (1.1 * u_c.abs() * dg + torch.nn.functional.silu(g_c).abs() * du) * wts[rows, None]
            y_tol[rows] = FP8_ACC * (hq[rows].abs() @ d2[e].T.abs())
    for name, got, ref, tol in (("h", h, h_ref, h_tol), ("y", y, y_ref, y_tol)):
        excess = (got.float().cpu() - ref).abs() - (tol + 2.0**-8 * ref.abs() + 1e-6)  # + one bf16 rounding
        assert (excess <= 0).all(), f"{name}: max excess {excess.max().item():.3g}"


@pytest.mark.parametrize("case", list(FP8_CASES))
def test_fp8_experts_match_reference(case):
    """Each FP8 GEMM against fp32 math on its own (dequantised) inputs, then the layer as their composition.

    The FP8 products and the power-of-two promotions are exact, so each GEMM differs from fp32 only by the
    order of the fp32 sums and one bf16 rounding (the tolerance of the bf16 pieces test). The end-to-end
    comparison with a reference that re-quantises h itself would not be sharp: an h element one bf16 ulp
    off can round to the neighbouring FP8 value (1/16 relative), so the layer is checked bit for bit as
    the composition of the checked pieces instead."""
    dim, inter, num_experts, top_k, num_tokens, shared_inter, scale = FP8_CASES[case]
    _, _, w1, w2, w3, shared = _layer(dim, inter, num_experts, shared_inter, seed=100 + len(case))
    q1, q2, q3 = (F.quantize_fp8_weight(w) for w in (w1, w2, w3))
    d1, d2, d3 = _dequant(q1), _dequant(q2), _dequant(q3)
    g = _gen(200 + len(case))
    x = _randn(num_tokens, dim, g=g, scale=scale)
    weights, experts = _random_routing(num_tokens, top_k, num_experts, g, used=range(num_experts - 1))
    out = _check_fp8_activation_layer(x, weights, experts, (q1, q2, q3), (d1, d2, d3), shared, F.moe_up_fp8,
                                      F.moe_down_fp8, "fp8")
    # and it approximates the bf16-weight layer: five e4m3 roundings (x, W1, W3, h, W2) of ~3% rms each add
    # to ~7% in quadrature; a wrong scale (2x) or a wrong expert moves the output by ~100%
    ref_bf16, _ = _reference(x, weights, experts, w1, w2, w3, shared, 10.0)
    rel = ((out.float().cpu() - ref_bf16).norm() / ref_bf16.norm()).item()
    assert rel < 0.15, rel


@pytest.mark.parametrize("case", list(FP8_CASES))
@pytest.mark.parametrize("block_n", [128, 64])
def test_fp8_gemm_schedules_agree_bit_for_bit(case, block_n):
    """The FP8 ws kernels (TMA producer, wgmma consumers promoting per K block) and the pipelined ones: the same
    wgmma sequence and promotions, so the same bits."""
    from tilev4.kernels import compile_kernel, fp8_quantize

    dim, inter, num_experts, top_k, num_tokens, _, scale = FP8_CASES[case]
    _, _, w1, w2, w3, _ = _layer(dim, inter, num_experts, 0, seed=300 + len(case))
    q1, q2, q3 = (F.quantize_fp8_weight(w) for w in (w1, w2, w3))
    g = _gen(301)
    x = _randn(num_tokens, dim, g=g, scale=scale)
    weights, experts = _random_routing(num_tokens, top_k, num_experts, g, used=range(num_experts - 1))
    perm = K.moe_permute(x, weights, experts, num_experts)
    n = perm.x_sorted.shape[0]
    tables = (perm.offsets, perm.tile_offsets, perm.tile_info)  # the expert GEMMs read the tiles' records
    x8, xs = fp8_quantize(perm.x_sorted)
    outs = {}
    for schedule in F.SCHEDULES:
        cfg = {"block_m": perm.block_m, "block_n": block_n, "schedule": schedule}
        h = _poison(n, inter, dtype=torch.bfloat16)
        compile_kernel("moe_up_fp8", {"dim": dim, **cfg})(x8, xs, perm.w_sorted, q1.data, q1.scale, q3.data, q3.scale,
                                                          *tables, h, 10.0)
        h8, hs = fp8_quantize(h)
        y = _poison(n, dim, dtype=torch.bfloat16)
        compile_kernel("moe_down_fp8", {"inter": inter, **cfg})(h8, hs, q2.data, q2.scale, *tables, y)
        outs[schedule] = (h, y)
    for name, a, b in zip(("h", "y"), *outs.values()):
        assert not torch.isnan(a).any(), name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", list(FP8_CASES))
def test_fp8_down_wide_tile_gives_the_bits_of_128(case):
    """The 128 × 256 down tile (two 128-column halves of W2 a stage) against 128 × 128 and 128 × 64: every element
    is the same wgmma steps and promotions, so the same bits — also where dim is not a multiple of 256 (the last
    tile's second half lies past N: zero-filled loads, a clamped scale index, clipped stores). Against fp32 math:
    test_fp8_experts_match_reference, which runs the default (256)."""
    from tilev4.kernels import compile_kernel, fp8_quantize

    dim, inter, num_experts, top_k, num_tokens, _, scale = FP8_CASES[case]
    _, _, _, w2, _, _ = _layer(dim, inter, num_experts, 0, seed=310 + len(case))
    q2 = F.quantize_fp8_weight(w2)
    g = _gen(311)
    x = _randn(num_tokens, dim, g=g, scale=scale)
    weights, experts = _random_routing(num_tokens, top_k, num_experts, g, used=range(num_experts - 1))
    perm = K.moe_permute(x, weights, experts, num_experts)
    n = perm.x_sorted.shape[0]
    h8, hs = fp8_quantize(_randn(n, inter, g=g, scale=scale))
    outs = {}
    for block_n in (256, 128, 64):
        y = _poison(n, dim, dtype=torch.bfloat16)
        compile_kernel("moe_down_fp8", {"inter": inter, "block_m": perm.block_m, "block_n": block_n})(
            h8, hs, q2.data, q2.scale, perm.offsets, perm.tile_offsets, perm.tile_info, y)
        assert not torch.isnan(y).any(), block_n
        outs[block_n] = y
    assert torch.equal(outs[256], outs[128])
    assert torch.equal(outs[256], outs[64])


@pytest.mark.parametrize("case", list(FP8_CASES))
@pytest.mark.parametrize("limit", [10.0, None])
def test_fp8_up_quantizes_h_as_fp8_quantize_does(case, limit):
    """``moe_up_fp8(quantize=True)`` (h quantised in the epilogue) writes exactly ``fp8_quantize`` of the bf16 h:
    partial M tiles, an expert without rows, with and without the clamp."""
    from tilev4.kernels import fp8_quantize

    dim, inter, num_experts, top_k, num_tokens, _, scale = FP8_CASES[case]
    _, _, w1, _, w3, _ = _layer(dim, inter, num_experts, 0, seed=310 + len(case))
    q1, q3 = F.quantize_fp8_weight(w1), F.quantize_fp8_weight(w3)
    g = _gen(311)
    x = _randn(num_tokens, dim, g=g, scale=scale)
    weights, experts = _random_routing(num_tokens, top_k, num_experts, g, used=range(num_experts - 1))
    perm = K.moe_permute(x, weights, experts, num_experts)
    n = perm.x_sorted.shape[0]
    x8, xs = fp8_quantize(perm.x_sorted)
    ref8, ref_s = fp8_quantize(F.moe_up_fp8(perm, x8, xs, q1, q3, limit))
    h8 = torch.full((n, inter), 0x7F, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)  # NaN bytes
    hs = torch.full((n, inter // 128), float("nan"), device="cuda")
    got = F.moe_up_fp8(perm, x8, xs, q1, q3, limit, out=(h8, hs), quantize=True)
    assert got[0] is h8 and got[1] is hs
    assert torch.equal(h8.view(torch.uint8), ref8.view(torch.uint8))
    assert torch.equal(hs, ref_s)
    with pytest.raises(TypeError, match="out must be an"):
        F.moe_up_fp8(perm, x8, xs, q1, q3, limit, out=h8, quantize=True)


def test_fp8_weight_quantisation_is_exact_on_its_grid():
    w = _randn(3, 200, 384, g=_gen(300), scale=0.02, dtype=torch.float32)
    q = F.quantize_fp8_weight(w)
    assert q.data.dtype == torch.float8_e4m3fn and q.scale.shape == (3, 2, 3)
    assert torch.equal(torch.exp2(torch.log2(q.scale).round()), q.scale)  # powers of two
    back = _dequant(q)
    assert torch.equal(_dequant(F.quantize_fp8_weight(back.cuda())), back)  # idempotent
    # round to nearest: within half a quantum — 2^-4 relative for normal e4m3 values (3 mantissa bits), half
    # the subnormal step 2^-9 (times the block scale) below the normal range
    s = q.scale.cpu().repeat_interleave(128, 1)[:, :200].repeat_interleave(128, 2)
    err = (back - w.cpu()).abs()
    assert (err <= torch.maximum(2.0**-4 * w.cpu().abs(), 2.0**-10 * s)).all(), err.max().item()


@settings(max_examples=8, deadline=None, derandomize=True)
@given(n=st.integers(1, 700), pos=st.integers(0, 10**6), seed=st.integers(0, 2**31 - 1))
@example(n=2000, pos=1999, seed=1)
def test_fp8_batch_invariance(n, pos, seed):
    gate, bias, _, _, _, shared, probe, _ = _invariance_layer()
    q = _fp8_invariance_weights()
    pos %= n
    batch = _randn(n, 4096, g=_gen(seed))
    batch[pos] = probe[0]
    alone = K.moe(probe, gate, bias, *q, shared, weight_format="fp8")
    out = K.moe(batch, gate, bias, *q, shared, weight_format="fp8")
    assert not torch.isnan(alone).any()
    assert torch.equal(out[pos], alone[0]), f"token at {pos} of {n} differs from the token alone"


@functools.lru_cache(maxsize=1)
def _fp8_invariance_weights():
    _, _, w1, w2, w3, _, _, _ = _invariance_layer()
    return tuple(F.quantize_fp8_weight(w) for w in (w1, w2, w3))


# ------------------------------------------------------------------------------------------------ dense FP8 linear


@pytest.mark.parametrize(("m", "n", "k"), [(1, 4096, 4096), (67, 640, 1024), (300, 200, 384)])
def test_fp8_linear_matches_reference(m, n, k):
    """``tilev4.fp8_linear`` against fp32 math on its dequantised inputs (x quantised 1×128 as the op does),
    within the FP8 tensor-core accumulation bound; e8m0 byte scales give the same bits as fp32 scales."""
    import tilev4
    from tilev4.reference.quant import e8m0_encode, fp8_e4m3_simulate

    g = _gen(500 + m)
    w = F.quantize_fp8_weight(_randn(n, k, g=g, scale=k**-0.5, dtype=torch.float32))
    x = _randn(m, k, g=g, scale=2.0)
    y = tilev4.fp8_linear(x, w.data, w.scale)
    assert y.shape == (m, n) and y.dtype == torch.float32 and not torch.isnan(y).any()
    xq = fp8_e4m3_simulate(x.float().cpu(), 128)
    wd = _dequant(FP8Weight(w.data.unsqueeze(0), w.scale.unsqueeze(0)))[0]
    ref = xq @ wd.T
    bound = FP8_ACC * (xq.abs() @ wd.abs().T) + 1e-6
    excess = (y.cpu() - ref).abs() - bound
    assert (excess <= 0).all(), f"max excess {excess.max().item():.3g}"
    assert torch.equal(tilev4.fp8_linear(x, w.data, e8m0_encode(w.scale)), y)
    yb = tilev4.fp8_linear(x, w.data, w.scale, out_dtype=torch.bfloat16)
    assert torch.equal(yb, y.bfloat16())


@settings(max_examples=8, deadline=None, derandomize=True)
@given(n=st.integers(1, 700), pos=st.integers(0, 10**6), seed=st.integers(0, 2**31 - 1))
@example(n=300, pos=63, seed=600)  # the last row of a 64-row tile ...
@example(n=300, pos=64, seed=600)  # ... and the first of the next
def test_fp8_linear_rows_are_batch_invariant(n, pos, seed):
    """A row of ``fp8_linear`` gives the same bits alone as in a batch of ``n`` random rows, wherever it is."""
    import tilev4

    pos %= n
    g = _gen(seed)
    w = F.quantize_fp8_weight(_randn(512, 4096, g=g, scale=4096**-0.5, dtype=torch.float32))
    x = _randn(n, 4096, g=g)
    full = tilev4.fp8_linear(x, w.data, w.scale)
    alone = tilev4.fp8_linear(x[pos : pos + 1], w.data, w.scale)
    assert not torch.isnan(alone).any()
    assert torch.equal(full[pos], alone[0])


# ------------------------------------------------------------------------------------------------ FP4 weights

F4 = importlib.import_module("tilev4.kernels.moe_fp4")


def _expanded(w: "F4.FP4Weight") -> torch.Tensor:
    """[E, N, K] fp32: the FP4 weights as the kernels use them (expanded to e4m3 at the 128-K block's largest
    scale; the dequantised weights themselves whenever F4.fp4_expansion_is_exact), computed on the GPU, returned
    on the CPU."""
    return F4.expand_fp4_weight(w).cpu()


def _spread(w: torch.Tensor, g: torch.Generator, spread: float) -> torch.Tensor:
    """Scale each 32-group along K by 2^U(-spread/2, spread/2): scales within a 128-K block then differ by up to
    2^spread, past the 2^8 of the exact expansion for spread > 8."""
    if not spread:
        return w
    e, n, k = w.shape
    f = torch.exp2((torch.rand(e, n, k // 32, 1, generator=g, device="cuda") - 0.5) * spread)
    return (w.float().view(e, n, k // 32, 32) * f).view(e, n, k).to(w.dtype)


FP4_CASES = {
    # dim, inter, E, top_k, T, shared inter, x scale, spread of the 32-group scales (log2)
    "small": (256, 256, 8, 2, 67, 128, 4.0, 0.0),
    "flash": (4096, 2048, 16, 6, 40, 2048, 4.0, 0.0),
    "ragged tiles": (384, 640, 5, 3, 301, 0, 1.0, 0.0),  # several M tiles per expert, N not a multiple of 128
    "scale spread": (256, 384, 4, 2, 50, 0, 2.0, 14.0),  # shifts j up to ~14: subnormal e4m3, rounding, flushes
    "decode": (4096, 2048, 64, 6, 8, 0, 4.0, 0.0),  # ~1 row an expert: the ops take the swap schedule
}


@pytest.mark.parametrize("case", list(FP4_CASES))
def test_fp4_experts_match_reference(case):
    """Each FP4 GEMM against fp32 math on its own inputs (FP8 activations dequantised, the weights as expanded),
    then the layer as their composition (bit for bit), as for FP8 weights.

    The expansion v·2^-j → e4m3 is exact (checked: the expanded weights are the dequantised ones) unless a 128-K
    block's scales spread past 2^8 ("scale spread", where some elements round: the reference then uses the
    same rounded weights, expand_fp4_weight, whose rounding the CPU tests check). The FP8 products and the
    power-of-two promotions (per row and per column) are exact, so the tolerance is the FP8 one: the tensor
    core's block sum (FP8_ACC of Σ|products|, propagated through the SwiGLU) and one bf16 rounding."""
    dim, inter, num_experts, top_k, num_tokens, shared_inter, scale, spread = FP4_CASES[case]
    _, _, w1, w2, w3, shared = _layer(dim, inter, num_experts, shared_inter, seed=400 + len(case))
    g = _gen(500 + len(case))
    w1, w2, w3 = (_spread(w, g, spread) for w in (w1, w2, w3))
    q1, q2, q3 = (F4.quantize_fp4_weight(w) for w in (w1, w2, w3))
    d1, d2, d3 = _expanded(q1), _expanded(q2), _expanded(q3)
    if not spread:
        assert all(F4.fp4_expansion_is_exact(q) for q in (q1, q2, q3))
    else:
        assert not F4.fp4_expansion_is_exact(q1)  # the case does reach the rounding shifts
    host = F4.quantize_fp4_weight(w2[:2].cpu())  # the host prep does not depend on the device
    assert torch.equal(q2.data[:2].cpu(), host.data) and torch.equal(q2.scale[:2].cpu(), host.scale)
    x = _randn(num_tokens, dim, g=g, scale=scale)
    weights, experts = _random_routing(num_tokens, top_k, num_experts, g, used=range(num_experts - 1))
    out = _check_fp8_activation_layer(x, weights, experts, (q1, q2, q3), (d1, d2, d3), shared, F4.moe_up_fp4,
                                      F4.moe_down_fp4, "fp4")
    # and it approximates the fp32 layer on the same weights: the FP8 roundings of x and h (~3% rms each) give ~5%
    # (~8% with the scale spread, where h's 1x128 blocks mix magnitudes; both measured in a CPU emulation); a wrong
    # scale (2x), nibble order or expert moves the output by ~100%
    ref_fp4, _ = _reference(x, weights, experts, d1, d2, d3, shared, 10.0)
    rel = ((out.float().cpu() - ref_fp4).norm() / ref_fp4.norm()).item()
    assert rel < 0.15, rel


@pytest.mark.parametrize("case", list(FP4_CASES))
@pytest.mark.parametrize("config", [{"schedule": "pipelined"}, {"schedule": "ws", "packed_stages": 2, "num_stages": 3},
                                    {"schedule": "ws", "producer_warpgroups": 1, "block_n": 32},
                                    {"schedule": "ws"}, {"schedule": "swap", "packed_stages": 3, "block_n": 128}])
def test_fp4_gemm_configs_give_the_default_bits(case, config):
    """The FP4 GEMMs in the other configs the ops and the tuner may pick: the pipelined schedule (one [128, 128] FP8
    GEMM a K block over W1 stacked on W3, where the ws kernel runs one wgmma a weight), the warp-specialised one
    with a packed ring shallower than its stages, or one producer warpgroup and narrow tiles, the ws schedule where
    the op takes the swap one ("decode") and the swap schedule with another packed ring (weights as the wgmma's M,
    rows as its N, in passes of 16 rows a warpgroup: every case but "decode" has tiles of several passes). The same
    sums of the same products, so the op's bits (the down-projection on the op's h8, so that both GEMMs are checked
    on the same inputs); and against fp32 math."""
    from tilev4.kernels import compile_kernel, fp8_quantize

    dim, inter, num_experts, top_k, num_tokens, _, scale, spread = FP4_CASES[case]
    _, _, w1, w2, w3, _ = _layer(dim, inter, num_experts, 0, seed=600 + len(case))
    g = _gen(700 + len(case))
    q1, q2, q3 = (F4.quantize_fp4_weight(_spread(w, g, spread)) for w in (w1, w2, w3))
    x = _randn(num_tokens, dim, g=g, scale=scale)
    weights, experts = _random_routing(num_tokens, top_k, num_experts, g, used=range(num_experts - 1))
    perm = K.moe_permute(x, weights, experts, num_experts)
    n = perm.x_sorted.shape[0]
    tables = (perm.offsets, perm.tile_offsets, perm.tile_info)  # the expert GEMMs read the tiles' records
    x8, xs = fp8_quantize(perm.x_sorted)
    h_default = F4.moe_up_fp4(perm, x8, xs, q1, q3, 10.0, out=_poison(n, inter, dtype=torch.bfloat16))
    h8, hs = fp8_quantize(h_default)
    y_default = F4.moe_down_fp4(perm, h8, hs, q2, out=_poison(n, dim, dtype=torch.bfloat16))
    cfg = {"block_m": perm.block_m, **config}
    h = _poison(n, inter, dtype=torch.bfloat16)
    compile_kernel("moe_up_fp4", {"dim": dim, **cfg})(x8, xs, perm.w_sorted, q1.data, q1.scale, q3.data, q3.scale,
                                                      *tables, h, 10.0)
    y = _poison(n, dim, dtype=torch.bfloat16)
    compile_kernel("moe_down_fp4", {"inter": inter, **cfg})(h8, hs, q2.data, q2.scale, *tables, y)
    _check_fp8_activation_gemms(perm, experts, (x8, xs), (h8, hs), h, y, tuple(_expanded(q) for q in (q1, q2, q3)))
    assert torch.equal(h, h_default) and torch.equal(y, y_default)


@pytest.mark.parametrize(("case", "config"), [
    ("scale spread", {"schedule": "pipelined"}), ("scale spread", {"schedule": "ws"}),
    ("scale spread", {"schedule": "swap", "packed_stages": 3, "block_n": 128}),
    ("ragged tiles", {"schedule": "ws", "producer_warpgroups": 1, "block_n": 32}), ("decode", None)])
def test_fp4_prepared_layout_gives_the_checkpoint_bits(case, config):
    """Weights in the prepared layout (prepare_fp4_weight on the GPU: sign bits moved, two instructions a word less
    in the expansion) give the checkpoint layout's bits: through the ops (which take the swap schedule for
    "decode") and the whole layer (moe_experts), and in each schedule's program (``config``), including the
    rounding path of a scale spread past 2^8."""
    from tilev4.kernels import compile_kernel, fp8_quantize

    dim, inter, num_experts, top_k, num_tokens, _, scale, spread = FP4_CASES[case]
    _, _, w1, w2, w3, _ = _layer(dim, inter, num_experts, 0, seed=650 + len(case))
    g = _gen(750 + len(case))
    q = tuple(F4.quantize_fp4_weight(_spread(w, g, spread)) for w in (w1, w2, w3))
    p1, p2, p3 = (F4.prepare_fp4_weight(w) for w in q)
    assert p1.layout == "prepared" and not torch.equal(p1.data, q[0].data)
    x = _randn(num_tokens, dim, g=g, scale=scale)
    weights, experts = _random_routing(num_tokens, top_k, num_experts, g, used=range(num_experts - 1))
    perm = K.moe_permute(x, weights, experts, num_experts)
    n = perm.x_sorted.shape[0]
    x8, xs = fp8_quantize(perm.x_sorted)
    h_ckpt = F4.moe_up_fp4(perm, x8, xs, q[0], q[2], 10.0, out=_poison(n, inter, dtype=torch.bfloat16))
    h8, hs = fp8_quantize(h_ckpt)
    y_ckpt = F4.moe_down_fp4(perm, h8, hs, q[1], out=_poison(n, dim, dtype=torch.bfloat16))
    assert not torch.isnan(h_ckpt).any() and not torch.isnan(y_ckpt).any()
    h = F4.moe_up_fp4(perm, x8, xs, p1, p3, 10.0, out=_poison(n, inter, dtype=torch.bfloat16))
    y = F4.moe_down_fp4(perm, h8, hs, p2, out=_poison(n, dim, dtype=torch.bfloat16))
    assert torch.equal(h, h_ckpt) and torch.equal(y, y_ckpt)
    if config is None:
        layer = K.moe_experts(x, weights, experts, q[0], q[1], q[2], weight_format="fp4")
        assert torch.equal(K.moe_experts(x, weights, experts, p1, p2, p3, weight_format="fp4"), layer)
        return
    tables = (perm.offsets, perm.tile_offsets, perm.tile_info)
    cfg = {"block_m": perm.block_m, "layout": "prepared", **config}
    h = _poison(n, inter, dtype=torch.bfloat16)
    compile_kernel("moe_up_fp4", {"dim": dim, **cfg})(x8, xs, perm.w_sorted, p1.data, p1.scale, p3.data, p3.scale,
                                                      *tables, h, 10.0)
    y = _poison(n, dim, dtype=torch.bfloat16)
    compile_kernel("moe_down_fp4", {"inter": inter, **cfg})(h8, hs, p2.data, p2.scale, *tables, y)
    assert torch.equal(h, h_ckpt) and torch.equal(y, y_ckpt)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(n=st.integers(1, 700), pos=st.integers(0, 10**6), seed=st.integers(0, 2**31 - 1))
@example(n=2000, pos=1999, seed=1)
def test_fp4_batch_invariance(n, pos, seed):
    gate, bias, _, _, _, shared, probe, _ = _invariance_layer()
    q = _fp4_invariance_weights()
    pos %= n
    batch = _randn(n, 4096, g=_gen(seed))
    batch[pos] = probe[0]
    alone = K.moe(probe, gate, bias, *q, shared, weight_format="fp4")
    out = K.moe(batch, gate, bias, *q, shared, weight_format="fp4")
    assert not torch.isnan(alone).any()
    assert torch.equal(out[pos], alone[0]), f"token at {pos} of {n} differs from the token alone"


@functools.lru_cache(maxsize=1)
def _fp4_invariance_weights():
    _, _, w1, w2, w3, _, _, _ = _invariance_layer()
    return tuple(F4.quantize_fp4_weight(w) for w in (w1, w2, w3))
