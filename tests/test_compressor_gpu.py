"""Compressor kernels on the GPU against the fp32 reference (:mod:`tilev4.reference.compressor`).

Tolerances, kernel entry ``a`` against reference entry ``e`` (:func:`check_entries`):

* unquantised values (``quant=None``, and the 64 rope dims of ``quant="attention"``): the kernel pools as
  ``Σ e^{s−M}·kv / Σ e^{s−M}`` in chunks where torch normalises the softmax first, sums the rmsnorm in
  another order and takes cos/sin from CUDA's libm: ~1e-6 absolute on entries of magnitude <= ~5, so
  ``atol = rtol = 2e-5`` for an fp32 cache; a bf16 cache adds one rounding (``rtol = 2^-8``, twice the
  half-ulp 2^-9);
* quantised values: an FP8 / FP4 value times a power-of-two scale is exact in bf16 and fp32, but a value
  computed ~1e-6 away from the reference's can round to the neighbouring code (or an amax near a power of
  two to the neighbouring scale). So every element must lie within one quantum of the format at its
  magnitude (FP8 e4m3: ``2^-3·|v| + 2^-9·scale``; FP4 e2m1: ``max(scale/2, |v|/2)``) and at most 1 % of
  the elements (at least 2) may differ at all. The quantisation itself is checked EXACTLY in
  :func:`test_quantisation_is_exact`: the kernel's quantised entries against the reference quantiser
  applied to the kernel's own unquantised entries.

Everything that claims identical arithmetic is compared bit for bit: prefill-then-decode against one
long prefill, two prefills against one, a sequence in a batch against the sequence alone (batch
invariance), and every state tensor against the reference's (copies and one fp32 add). Caches are
poisoned with NaN before a launch: rows the call must not write stay NaN, NaN never passes a check.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilev4.kernels.compressor import compress_decode, compress_prefill
from tilev4.reference.compressor import CompressorState, compressor_decode_step, compressor_prefill

pytestmark = pytest.mark.gpu

VARIANTS = [(4, 512, "attention"), (128, 512, "attention"), (4, 128, "indexer")]
IDS = ["m4-D512-attention", "m128-D512-attention", "m4-D128-indexer"]
FIELDS = ("kv", "score", "prev_kv", "prev_score", "num_tokens")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(g, ratio, d):
    """ape [m, C] and the rmsnorm weight [D], fp32 on the GPU."""
    coff = 2 if ratio == 4 else 1
    ape = torch.randn(ratio, coff * d, generator=g)
    weight = 0.5 + torch.rand(d, generator=g)
    return ape.cuda(), weight.cuda()


def _rows(g, b, n, ratio, d, dtype=torch.bfloat16):
    """kv' [b, n, C] and gate [b, n, C] (spread-out softmax weights), on the GPU in ``dtype``."""
    coff = 2 if ratio == 4 else 1
    kv = torch.randn(b, n, coff * d, generator=g)
    gate = 2 * torch.randn(b, n, coff * d, generator=g)
    return kv.to(dtype).cuda(), gate.to(dtype).cuda()


def _cache(b, rows, d, dtype=torch.bfloat16):
    return torch.full((b, rows, d), float("nan"), dtype=dtype, device="cuda")


def _state_to(state: CompressorState, device) -> CompressorState:
    """A copy of ``state`` on ``device`` (always a copy, also on the same device)."""
    return CompressorState(
        *(None if getattr(state, f) is None else getattr(state, f).to(device, copy=True) for f in FIELDS)
    )


def _state_cat(states) -> CompressorState:
    return CompressorState(
        *(None if getattr(states[0], f) is None else torch.cat([getattr(s, f) for s in states]) for f in FIELDS)
    )


def _state_row(state: CompressorState, j: int) -> CompressorState:
    return CompressorState(*(None if getattr(state, f) is None else getattr(state, f)[j : j + 1] for f in FIELDS))


def assert_states_equal(actual: CompressorState, expected: CompressorState):
    for f in FIELDS:
        a, e = getattr(actual, f), getattr(expected, f)
        if e is None:
            assert a is None, f"state.{f} should be None"
            continue
        a = a.cpu()
        e = e.cpu()
        assert a.shape == e.shape, f"state.{f}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert torch.equal(a, e), f"state.{f} differs from the reference at {(a != e).nonzero()[:5].tolist()}"


def check_entries(actual: torch.Tensor, expected: torch.Tensor, quant, rope_dim: int = 64):
    """``actual`` (kernel cache rows, bf16 or fp32) against ``expected`` (fp32 reference entries); see the
    module docstring for the tolerances."""
    assert actual.shape == expected.shape, f"{tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol = 2.0**-8 if actual.dtype == torch.bfloat16 else 2e-5
    a, e = actual.float().cpu(), expected.float().cpu()
    assert not torch.isnan(a).any(), "NaN in the kernel's entries (an entry was not written?)"
    d = a.shape[-1]
    if quant is None:
        torch.testing.assert_close(a, e, atol=2e-5, rtol=rtol)
        return
    if quant == "attention":
        nope = d - rope_dim
        torch.testing.assert_close(a[..., nope:], e[..., nope:], atol=2e-5, rtol=rtol)
        a, e = a[..., :nope].reshape(-1, 64), e[..., :nope].reshape(-1, 64)
        floor, qmax = 1e-4, 448.0
    else:
        a, e = a.reshape(-1, 32), e.reshape(-1, 32)
        floor, qmax = 6 * 2.0**-126, 6.0
    big = torch.maximum(a.abs(), e.abs())
    scale = torch.exp2(torch.ceil(torch.log2(big.amax(-1, keepdim=True).clamp_min(floor) / qmax)))
    if quant == "attention":
        bound = 2.0**-3 * big + 2.0**-9 * scale
    else:
        bound = torch.maximum(0.5 * scale, 0.5 * big)
    excess = (a - e).abs() - bound
    assert (excess <= 1e-6).all(), f"a quantised value is off by more than one quantum: max excess {excess.max()}"
    differ = int((a != e).sum())
    assert differ <= max(2, a.numel() // 100), f"{differ} of {a.numel()} quantised values differ"


_FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _pow2_scale_exact(xb: torch.Tensor, qmax: float, floor: float) -> torch.Tensor:
    """``2^ceil(log2(max(amax, floor) / qmax))`` per row of xb, in float64 (exact for fp32 inputs, where
    fp32 ``log2`` can round a value just above a power of two down onto it)."""
    amax = xb.double().abs().amax(-1, keepdim=True).clamp_min(floor)
    return torch.exp2(torch.ceil(torch.log2(amax / qmax)))


def fp8_exact(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """dequant(quant(x)): FP8 e4m3 (RNE) in blocks along the last dim, exact power-of-two scales; CPU fp32."""
    xb = x.float().cpu().reshape(-1, block)
    scale = _pow2_scale_exact(xb, 448.0, 1e-4).float()
    q = (xb / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    return (q * scale).reshape(x.shape)


def fp4_exact(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """dequant(quant(x)): FP4 e2m1 (nearest, ties to the even code) in blocks, exact scales; CPU fp32."""
    xb = x.double().cpu().reshape(-1, block)
    scale = _pow2_scale_exact(xb, 6.0, 6.0 * 2.0**-126)
    a = (xb.abs() / scale).clamp(max=6.0)
    dist = (a.unsqueeze(-1) - _FP4_GRID).abs() + (torch.arange(8) % 2) * 1e-12  # a tie goes to the even code
    v = _FP4_GRID[dist.argmin(-1)] * torch.sign(xb) * scale
    return v.float().reshape(x.shape)


def _reference(kv, gate, ape, weight, ratio, quant, state=None):
    """The fp32 reference on the CPU with the kernel's (bf16) inputs."""
    return compressor_prefill(kv.cpu(), gate.cpu(), ape.cpu(), weight.cpu(), ratio, quant=quant,
                              state=None if state is None else _state_to(state, "cpu"))


# ------------------------------------------------------------------ prefill against the reference


@pytest.mark.parametrize(("ratio", "d", "quant"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("extra", [0, 3])
def test_prefill_matches_reference(ratio, d, quant, extra):
    g = _gen(100 * ratio + d + extra)
    blocks = 37 if ratio == 4 else 3  # m = 4: 37 entries over 10 CTAs; m = 128: 3 entries
    n = blocks * ratio + extra
    b = 2
    kv, gate = _rows(g, b, n, ratio, d)
    ape, weight = _params(g, ratio, d)
    cache = _cache(b, blocks + 2, d)
    state = compress_prefill(kv, gate, ape, weight, cache, ratio, quant=quant)
    expected, ref_state = _reference(kv, gate, ape, weight, ratio, quant)
    check_entries(cache[:, :blocks], expected, quant)
    assert torch.isnan(cache[:, blocks:].float()).all(), "rows past the completed entries were written"
    assert_states_equal(state, ref_state)


@pytest.mark.parametrize(("ratio", "d", "quant"), VARIANTS, ids=IDS)
def test_prefill_fp32_in_and_out(ratio, d, quant):
    g = _gen(7 * ratio + d)
    n = 5 * ratio + 1
    kv, gate = _rows(g, 2, n, ratio, d, dtype=torch.float32)
    ape, weight = _params(g, ratio, d)
    for q in (None, quant):
        cache = _cache(2, 5, d, dtype=torch.float32)
        state = compress_prefill(kv, gate, ape, weight, cache, ratio, quant=q)
        expected, ref_state = _reference(kv, gate, ape, weight, ratio, q)
        check_entries(cache, expected, q)
        assert_states_equal(state, ref_state)


@pytest.mark.parametrize(("ratio", "d", "quant"), VARIANTS, ids=IDS)
def test_prefill_shorter_than_a_block_only_updates_the_state(ratio, d, quant):
    g = _gen(11 + ratio)
    n = 3 if ratio == 4 else 100
    kv, gate = _rows(g, 3, n, ratio, d)
    ape, weight = _params(g, ratio, d)
    cache = _cache(3, 2, d)
    state = compress_prefill(kv, gate, ape, weight, cache, ratio, quant=quant)
    assert torch.isnan(cache.float()).all()
    assert_states_equal(state, _reference(kv, gate, ape, weight, ratio, quant)[1])


@pytest.mark.parametrize(("ratio", "d", "quant"), VARIANTS, ids=IDS)
def test_quantisation_is_exact(ratio, d, quant):
    """The quantised entries equal the reference quantiser applied to the kernel's own unquantised entries."""
    g = _gen(23 + ratio + d)
    n = (24 if ratio == 4 else 3) * ratio
    kv, gate = _rows(g, 2, n, ratio, d)
    ape, weight = _params(g, ratio, d)
    plain = _cache(2, n // ratio, d, dtype=torch.float32)
    quantised = _cache(2, n // ratio, d, dtype=torch.float32)
    compress_prefill(kv, gate, ape, weight, plain, ratio, quant=None)
    compress_prefill(kv, gate, ape, weight, quantised, ratio, quant=quant)
    if quant == "attention":
        # [:448]: y = pooled · rstd · w, the same products in both programs -> the same FP8 codes and scales
        assert torch.equal(quantised[..., :448].cpu(), fp8_exact(plain[..., :448]))
        # the rope dims are not quantised: the same rounded operations in both programs (no FMA contraction)
        assert torch.equal(quantised[..., 448:], plain[..., 448:])
    else:
        # the kernel's butterflies in the same order: a single add or subtract per element and stage
        x = plain.clone()
        for bit in range(int(math.log2(d))):
            h = 1 << bit
            x = x.view(*x.shape[:-1], d // (2 * h), 2, h)
            x = torch.stack([x[..., 0, :] + x[..., 1, :], x[..., 0, :] - x[..., 1, :]], dim=-2).reshape(plain.shape)
        expected = fp4_exact(x * (1.0 / math.sqrt(d)))
        same = (quantised.cpu() == expected).float().mean().item()
        # both programs round the same operations (no FMA contraction), so this should be 1.0; a code could
        # flip only if the roped inputs of the rotation differed by an ulp, next to a rounding midpoint
        assert same >= 0.999, f"only {same:.5f} of the FP4 values equal the reference quantiser's"
        check_entries(quantised, expected, "indexer")


# ------------------------------------------------------------------ decode against the reference


def _starts(ratio, b, g):
    if ratio == 4:
        return torch.randint(0, 14, (b,), generator=g).tolist()
    near = torch.tensor([120, 125, 126, 127, 128, 250, 254, 255])  # a few tokens before / at a block end
    return near[torch.randint(0, len(near), (b,), generator=g)].tolist()


def _prefilled_states(kv, gate, ape, weight, ratio, quant, starts):
    """The reference state of each sequence after its first ``starts[j]`` tokens, as one batch on the CPU."""
    states = []
    for j, k in enumerate(starts):
        states.append(_reference(kv[j : j + 1, :k], gate[j : j + 1, :k], ape, weight, ratio, quant)[1])
    return _state_cat(states)


@pytest.mark.parametrize(("ratio", "d", "quant"), VARIANTS, ids=IDS)
def test_ragged_decode_matches_reference(ratio, d, quant):
    g = _gen(31 * ratio + d)
    b, steps = 6, 9
    starts = _starts(ratio, b, g)
    n = max(starts) + steps
    kv, gate = _rows(g, b, n, ratio, d)
    ape, weight = _params(g, ratio, d)
    ref_state = _prefilled_states(kv, gate, ape, weight, ratio, quant, starts)
    state = _state_to(ref_state, "cuda")
    cache = _cache(b, n // ratio + 1, d)
    expected = torch.full((b, n // ratio + 1, d), float("nan"))
    rows = torch.arange(b)
    for step in range(steps):
        pos = torch.tensor(starts) + step
        kv_t, gate_t = kv[rows, pos].contiguous(), gate[rows, pos].contiguous()
        compress_decode(kv_t, gate_t, ape, weight, cache, state, ratio, quant=quant)
        e, emitted, index, ref_state = compressor_decode_step(
            kv_t.cpu(), gate_t.cpu(), ref_state, ape.cpu(), weight.cpu(), ratio, quant=quant)
        for j in emitted.nonzero().flatten().tolist():
            expected[j, index[j]] = e[j]
    assert_states_equal(state, ref_state)
    written = ~torch.isnan(expected[..., 0])
    assert written.any(), "the test emitted nothing"
    assert torch.equal(~torch.isnan(cache[..., 0].float().cpu()), written), "entries written at the wrong rows"
    check_entries(cache.cpu()[written], expected[written], quant)


@pytest.mark.parametrize(("ratio", "d", "quant"), VARIANTS, ids=IDS)
def test_decode_in_a_cuda_graph(ratio, d, quant):
    """validate=False: the step captures and replays; replays advance the state like plain steps."""
    g = _gen(41 + ratio)
    b = 3
    kv, gate = _rows(g, b, 1, ratio, d)
    kv, gate = kv[:, 0].contiguous(), gate[:, 0].contiguous()
    ape, weight = _params(g, ratio, d)
    start = torch.tensor([ratio - 2, 2 * ratio - 1, 0])
    base = CompressorState.empty(b, ratio, d, "cuda")
    base = CompressorState(base.kv, base.score, base.prev_kv, base.prev_score, start.cuda())
    plain_state = _state_to(base, "cuda")
    graph_state = _state_to(base, "cuda")
    plain_cache, graph_cache = _cache(b, 4, d), _cache(b, 4, d)
    compress_decode(kv, gate, ape, weight, graph_cache, graph_state, ratio, quant=quant, validate=False)  # warm-up
    compress_decode(kv, gate, ape, weight, plain_cache, plain_state, ratio, quant=quant)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        compress_decode(kv, gate, ape, weight, graph_cache, graph_state, ratio, quant=quant, validate=False)
    for _ in range(3):
        graph.replay()
        compress_decode(kv, gate, ape, weight, plain_cache, plain_state, ratio, quant=quant)
    torch.cuda.synchronize()
    assert_states_equal(graph_state, plain_state)
    assert torch.equal(graph_cache.isnan(), plain_cache.isnan())
    assert torch.equal(graph_cache.nan_to_num(), plain_cache.nan_to_num())


# ------------------------------------------------------------------ identical arithmetic: bit for bit


@pytest.mark.parametrize(("ratio", "d", "quant"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), data=st.data())
def test_property_prefill_then_decode_equals_one_prefill(ratio, d, quant, cache_dtype, seed, data):
    b = 3
    g = _gen(seed)
    if ratio == 4:
        heads = data.draw(st.lists(st.integers(0, 13), min_size=b, max_size=b), label="heads")
        steps = data.draw(st.integers(1, 10), label="steps")
    else:
        heads = data.draw(st.lists(st.sampled_from([0, 5, 126, 127, 128, 129, 255]), min_size=b, max_size=b),
                          label="heads")
        steps = data.draw(st.sampled_from([1, 2, 3, 130]), label="steps")
    totals = [k + steps for k in heads]
    kv, gate = _rows(g, b, max(totals), ratio, d)
    ape, weight = _params(g, ratio, d)
    rows = max(totals) // ratio + 1
    split_cache = _cache(b, rows, d, cache_dtype)
    states = []
    for j, k in enumerate(heads):  # each sequence prefilled alone to its own length ...
        one = _cache(1, rows, d, cache_dtype)
        states.append(compress_prefill(kv[j : j + 1, :k].contiguous(), gate[j : j + 1, :k].contiguous(), ape, weight,
                                       one, ratio, quant=quant))
        split_cache[j] = one[0]
    state = _state_cat(states)
    for step in range(steps):  # ... then decoded together, ragged
        pos = torch.tensor(heads) + step
        idx = torch.arange(b)
        compress_decode(kv[idx, pos].contiguous(), gate[idx, pos].contiguous(), ape, weight, split_cache, state, ratio,
                        quant=quant)
    for j, total in enumerate(totals):
        full = _cache(1, rows, d, cache_dtype)
        full_state = compress_prefill(kv[j : j + 1, :total].contiguous(), gate[j : j + 1, :total].contiguous(), ape,
                                      weight, full, ratio, quant=quant)
        done = total // ratio
        assert torch.equal(split_cache[j, :done], full[0, :done]), f"sequence {j}: entries differ"
        assert torch.isnan(split_cache[j, done:].float()).all() and torch.isnan(full[0, done:].float()).all()
        assert_states_equal(_state_row(state, j), full_state)


@pytest.mark.parametrize(("ratio", "d", "quant"), VARIANTS, ids=IDS)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), data=st.data())
def test_property_ragged_continued_prefill_is_batch_invariant(ratio, d, quant, seed, data):
    """Two prefills equal one, and a sequence continued in a ragged batch equals the sequence alone."""
    g = _gen(seed)
    b = data.draw(st.integers(1, 4), label="b")
    if ratio == 4:
        heads = data.draw(st.lists(st.integers(0, 9), min_size=b, max_size=b), label="heads")
        n = data.draw(st.integers(1, 14), label="n")
    else:
        heads = data.draw(st.lists(st.sampled_from([0, 3, 127, 128, 200]), min_size=b, max_size=b), label="heads")
        n = data.draw(st.sampled_from([1, 60, 128, 200]), label="n")
    totals = [k + n for k in heads]
    kv, gate = _rows(g, b, max(totals), ratio, d)
    ape, weight = _params(g, ratio, d)
    rows = max(totals) // ratio + 1
    states, caches = [], []
    for j, k in enumerate(heads):
        one = _cache(1, rows, d)
        states.append(compress_prefill(kv[j : j + 1, :k].contiguous(), gate[j : j + 1, :k].contiguous(), ape, weight,
                                       one, ratio, quant=quant))
        caches.append(one)
    batch_cache = torch.cat(caches)
    tail_kv = torch.stack([kv[j, k : k + n] for j, k in enumerate(heads)])
    tail_gate = torch.stack([gate[j, k : k + n] for j, k in enumerate(heads)])
    batch_state = compress_prefill(tail_kv, tail_gate, ape, weight, batch_cache, ratio, quant=quant,
                                   state=_state_cat(states))
    for j, total in enumerate(totals):
        alone = caches[j].clone()
        alone_state = compress_prefill(tail_kv[j : j + 1].contiguous(), tail_gate[j : j + 1].contiguous(), ape, weight,
                                       alone, ratio, quant=quant, state=states[j])
        full = _cache(1, rows, d)
        full_state = compress_prefill(kv[j : j + 1, :total].contiguous(), gate[j : j + 1, :total].contiguous(), ape,
                                      weight, full, ratio, quant=quant)
        done = total // ratio
        assert torch.equal(batch_cache[j, :done], alone[0, :done]), f"sequence {j}: batch != alone"
        assert torch.equal(alone[0, :done], full[0, :done]), f"sequence {j}: two prefills != one"
        assert torch.isnan(batch_cache[j, done:].float()).all()
        assert_states_equal(_state_row(batch_state, j), alone_state)
        assert_states_equal(alone_state, full_state)


def _schedule_configs(ratio: int, d: int, quant: str) -> list[dict]:
    """CTA shapes and schedules of the prefill, the direct one first: all must give the same bits."""
    from tilev4.kernels.compressor import _default_block_entries

    e0 = _default_block_entries(ratio, d, decode=False)
    base = {"ratio": ratio, "D": d, "quant": quant}
    small = max(1, e0 // 2) if ratio == 4 else 1
    return [
        dict(base, block_entries=e0),
        dict(base, block_entries=small),
        dict(base, block_entries=small, schedule="stream", num_stages=2, entry_steps=1),
        dict(base, block_entries=small, schedule="stream", num_stages=3, entry_steps=2),
        dict(base, block_entries=max(1, small // 2), schedule="stream", num_stages=2, entry_steps=4),
    ]


@pytest.mark.parametrize(("ratio", "d", "quant"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("n", [1, 7, 300, 4099])
def test_prefill_schedules_give_the_same_bits(ratio, d, quant, n):
    """The direct and stream schedules, at several CTA shapes, on a ragged batch whose starts lie in the first
    two blocks (the head entries read the state) and whose lengths end inside a CTA: the same cache rows
    (rows not completed stay NaN) and the same new state, bit for bit."""
    from tilev4.kernels import compressor as C
    from tilev4.kernels.registry import compile_kernel

    problem = {"ratio": ratio, "D": d, "quant": quant, "in_dtype": "bfloat16", "out_dtype": "bfloat16",
               "rope_dim": 64}
    heads = [0, 3, 2 * ratio - 1]
    g = torch.Generator(device="cuda").manual_seed(n + ratio)
    params, st = C._tuning_inputs(problem, torch.tensor(heads, device="cuda"), (3, n), g, "cuda")
    rows = (max(heads) + n) // ratio + 2
    state = C._kernel_state(st)
    results = []
    for cfg in _schedule_configs(ratio, d, quant):
        cache = _cache(3, rows, d)
        new = [torch.full_like(t, float("nan")) if t.is_floating_point() else torch.full_like(t, -7) for t in state]
        compile_kernel("compressor_prefill", cfg)(*params, *state, cache, *new[1:], new[0])
        results.append((cfg, cache.cpu(), [t.cpu() for t in new]))
    cfg0, cache0, new0 = results[0]
    done = [(t0 + n) // ratio for t0 in heads]
    for j, t0 in enumerate(heads):  # the entries completed are written, no other row
        assert not torch.isnan(cache0[j, t0 // ratio:done[j]].float()).any()
        assert torch.isnan(cache0[j, done[j]:].float()).all() and torch.isnan(cache0[j, :t0 // ratio].float()).all()
    for cfg, cache, new in results[1:]:
        assert torch.equal(cache.view(torch.int16), cache0.view(torch.int16)), f"{cfg} vs {cfg0}: cache rows differ"
        for a, b in zip(new, new0):
            assert torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                               b.view(torch.int32) if b.is_floating_point() else b), f"{cfg}: the new state differs"
