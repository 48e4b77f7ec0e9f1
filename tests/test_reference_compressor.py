"""CPU tests of tilev4.reference.compressor against naive loops written from the spec text."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilev4.reference.compressor import (
    CompressorState,
    compressor_coff,
    compressor_decode_step,
    compressor_prefill,
)
from tilev4.reference.quant import fp4_e2m1_simulate, kv_fp8_simulate
from tilev4.reference.rope import RopeConfig, apply_rope

# fp32 reference vs float64 naive loops: a softmax over <= 128 positions and an rmsnorm over D <= 512,
# rounding ~1e-6 relative on entries of magnitude <= ~4 (rms 1 times a weight in [0.5, 1.5]).
ATOL, RTOL = 1e-5, 1e-5
# entry dim per quantisation: the attention cache needs D - 64 = 448 FP8 dims, the indexer a power of 2
DIM = {None: 128, "attention": 512, "indexer": 128}


@pytest.fixture(autouse=True)
def _one_thread():
    """The decode loops run thousands of small ops, where handing work to a second thread costs more
    than it saves (and a lot more on a loaded 2-core machine); run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(g, b, n, ratio, d):
    width = compressor_coff(ratio) * d
    kv = torch.randn(b, n, width, generator=g)
    gate = 2 * torch.randn(b, n, width, generator=g)  # spread-out softmax weights
    ape = torch.randn(ratio, width, generator=g)
    weight = 0.5 + torch.rand(d, generator=g)
    return kv, gate, ape, weight


def naive_hadamard(d):
    """H[i, j] = (-1)^popcount(i & j) / sqrt(d) (the Sylvester order), float64."""
    return torch.tensor(
        [[(-1.0) ** bin(i & j).count("1") for j in range(d)] for i in range(d)], dtype=torch.float64
    ) / math.sqrt(d)


def naive_compressor(kv, gate, ape, weight, ratio, rope=None, quant=None):
    """All entries of a prefill from position 0, written from the spec text (float64 pooling)."""
    rope = rope or RopeConfig.compressed()
    b, n, _ = kv.shape
    d = weight.shape[0]
    out = torch.zeros(b, n // ratio, d)
    for bi in range(b):
        for i in range(n // ratio):
            terms = []  # (score, value) per position: each [D]
            if ratio == 128:  # the 128 tokens of block i, all channels
                for j in range(128 * i, 128 * i + 128):
                    terms.append((gate[bi, j].double() + ape[j % 128].double(), kv[bi, j].double()))
            else:  # previous block through [:D] (none for i = 0), current block through [D:]
                for j in range(4 * (i - 1), 4 * i) if i > 0 else ():
                    terms.append(((gate[bi, j].double() + ape[j % 4].double())[:d], kv[bi, j, :d].double()))
                for j in range(4 * i, 4 * i + 4):
                    terms.append(((gate[bi, j].double() + ape[j % 4].double())[d:], kv[bi, j, d:].double()))
            top = torch.stack([sc for sc, _ in terms]).amax(0)
            num = sum(torch.exp(sc - top) * v for sc, v in terms)
            den = sum(torch.exp(sc - top) for sc, _ in terms)
            pooled = num / den
            x = pooled / torch.sqrt(pooled.square().mean() + 1e-6) * weight.double()
            x = apply_rope(x.float().unsqueeze(0), torch.tensor([i * ratio]), rope)[0]
            if quant == "attention":
                x = kv_fp8_simulate(x)
            elif quant == "indexer":
                x = fp4_e2m1_simulate((x.double() @ naive_hadamard(d)).float(), block=32)
            out[bi, i] = x
    return out


def assert_entries_match(actual, expected, quant):
    """Compare compressor outputs computed along two routes (different fp32 summation orders).

    quant None: ATOL/RTOL. Quantised: the unquantised values differ by a few ulps, which can move one
    across a rounding midpoint of the FP8/FP4 grid (or move a block amax across a power of two, giving
    the next scale), so an element may differ by ONE quantisation step of its block: at most
    2^-3·|v| + 2^-9·scale for FP8 e4m3 (3 mantissa bits, subnormal spacing 2^-9) and at most
    max(0.5, |v|/2)·scale for FP4 e2m1 (grid 0, .5, 1, 1.5, 2, 3, 4, 6). Such flips need an input within
    a few ulps of a midpoint, so they must also be rare.
    """
    assert actual.shape == expected.shape
    if quant is None:
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)
        return
    if quant == "attention":  # FP8 on [:448] in blocks of 64, the 64 rope dims unquantised
        torch.testing.assert_close(actual[..., 448:], expected[..., 448:], atol=ATOL, rtol=RTOL)
        a, e = actual[..., :448].reshape(-1, 64), expected[..., :448].reshape(-1, 64)
        floor, qmax = 1e-4, 448.0
    else:  # FP4 of the Hadamard-rotated entry in blocks of 32
        a, e = actual.reshape(-1, 32), expected.reshape(-1, 32)
        floor, qmax = 6 * 2.0**-126, 6.0
    big = torch.maximum(a.abs(), e.abs())
    scale = torch.exp2(torch.ceil(torch.log2(big.amax(-1, keepdim=True).clamp_min(floor) / qmax)))
    if quant == "attention":
        bound = 2.0**-3 * big + 2.0**-9 * scale
    else:
        bound = torch.maximum(0.5 * scale, 0.5 * big)
    assert ((a - e).abs() <= bound + 1e-6).all()
    assert int((a != e).sum()) <= max(2, a.numel() // 100)


def _decode_all(kv, gate, state, ape, weight, ratio, quant):
    """Decode every token of kv/gate [b, n, C] one step at a time; returns (entries [b, E, D], state)."""
    rows = []
    for j in range(kv.shape[1]):
        e, emitted, _, state = compressor_decode_step(kv[:, j], gate[:, j], state, ape, weight, ratio, quant=quant)
        assert emitted.all() or not emitted.any()  # a prefilled (non-ragged) batch emits in lockstep
        if emitted.any():
            rows.append(e.unsqueeze(1))
    d = weight.shape[0]
    return (torch.cat(rows, 1) if rows else torch.zeros(kv.shape[0], 0, d)), state


def _assert_states_equal(a: CompressorState, b: CompressorState):
    # the buffers are copies of the inputs (and gate + ape, one fp32 add): bit-exact along any route
    assert torch.equal(a.num_tokens, b.num_tokens)
    assert torch.equal(a.kv, b.kv) and torch.equal(a.score, b.score)
    if a.prev_kv is None:
        assert b.prev_kv is None and a.prev_score is None and b.prev_score is None
    else:
        assert torch.equal(a.prev_kv, b.prev_kv) and torch.equal(a.prev_score, b.prev_score)


@pytest.mark.parametrize(
    ("ratio", "quant", "n"),
    [
        (4, None, 23),
        (128, None, 261),
        (4, "attention", 13),
        (128, "attention", 131),
        (4, "indexer", 22),
        (128, "indexer", 256),
    ],
)
def test_prefill_matches_naive(ratio, quant, n):
    g = _gen(1000 + ratio + n)
    d = DIM[quant]
    kv, gate, ape, weight = _inputs(g, 2, n, ratio, d)
    entries, state = compressor_prefill(kv.bfloat16(), gate.bfloat16(), ape, weight, ratio, quant=quant)
    assert entries.dtype == torch.float32 and entries.shape == (2, n // ratio, d)
    expected = naive_compressor(kv.bfloat16().float(), gate.bfloat16().float(), ape, weight, ratio, quant=quant)
    assert_entries_match(entries, expected, quant)
    assert state.num_tokens.tolist() == [n, n]


def test_prefill_honours_the_rope_config():
    g = _gen(77)
    kv, gate, ape, weight = _inputs(g, 1, 12, 4, 64)
    rope = RopeConfig.window()
    entries, _ = compressor_prefill(kv, gate, ape, weight, 4, rope=rope)
    assert_entries_match(entries, naive_compressor(kv, gate, ape, weight, 4, rope=rope), None)


def test_overlap_routes_previous_block_through_low_channels():
    # m = 4: tokens 0..3 feed entry 0 through channels [D:] and entry 1 through channels [:D]
    g = _gen(88)
    d = 64
    kv, gate, ape, weight = _inputs(g, 1, 12, 4, d)
    base, _ = compressor_prefill(kv, gate, ape, weight, 4)
    hi = kv.clone()
    hi[:, :4, d:] += 1.0
    lo = kv.clone()
    lo[:, :4, :d] += 1.0
    late = kv.clone()
    late[:, 4:, :] += 1.0
    out_hi, _ = compressor_prefill(hi, gate, ape, weight, 4)
    out_lo, _ = compressor_prefill(lo, gate, ape, weight, 4)
    out_late, _ = compressor_prefill(late, gate, ape, weight, 4)
    assert not torch.equal(out_hi[:, 0], base[:, 0]) and torch.equal(out_hi[:, 1:], base[:, 1:])
    assert torch.equal(out_lo[:, 0], base[:, 0]) and not torch.equal(out_lo[:, 1], base[:, 1])
    assert torch.equal(out_lo[:, 2], base[:, 2])
    assert torch.equal(out_late[:, 0], base[:, 0])  # entry 0 sees tokens 0..3 only


def test_decode_emits_on_block_ends_and_zero_elsewhere():
    g = _gen(99)
    d = 64
    kv, gate, ape, weight = _inputs(g, 1, 9, 4, d)
    state = CompressorState.empty(1, 4, d)
    expected = naive_compressor(kv, gate, ape, weight, 4)
    for t in range(9):
        e, emitted, index, state = compressor_decode_step(kv[:, t], gate[:, t], state, ape, weight, 4)
        assert e.dtype == torch.float32 and index.dtype == torch.int64 and emitted.dtype == torch.bool
        if (t + 1) % 4 == 0:
            assert emitted.tolist() == [True] and index.tolist() == [t // 4]
            assert_entries_match(e, expected[:, t // 4], None)
        else:
            assert emitted.tolist() == [False] and index.tolist() == [-1]
            assert torch.equal(e, torch.zeros(1, d))
    assert state.num_tokens.tolist() == [9]


def test_input_state_is_not_modified():
    g = _gen(5)
    d = 64
    for ratio in (4, 128):
        kv, gate, ape, weight = _inputs(g, 2, ratio + 3, ratio, d)
        _, state = compressor_prefill(kv[:, : ratio - 1], gate[:, : ratio - 1], ape, weight, ratio)
        snapshot = CompressorState(
            *(None if x is None else x.clone() for x in (state.kv, state.score, state.prev_kv, state.prev_score)),
            num_tokens=state.num_tokens.clone(),
        )
        compressor_prefill(kv[:, ratio - 1 :], gate[:, ratio - 1 :], ape, weight, ratio, state=state)
        compressor_decode_step(kv[:, -1], gate[:, -1], state, ape, weight, ratio)  # emits an entry
        _assert_states_equal(state, snapshot)


def test_bad_inputs_raise_with_the_argument_named():
    g = _gen(6)
    d = 64
    kv, gate, ape, weight = _inputs(g, 2, 8, 4, d)
    with pytest.raises(ValueError, match="ratio must be one of \\[4, 128\\], got 8"):
        compressor_prefill(kv, gate, ape, weight, 8)
    with pytest.raises(ValueError, match="ratio"):
        CompressorState.empty(2, 16, d)
    with pytest.raises(TypeError, match="kv must be"):
        compressor_prefill(kv.long(), gate, ape, weight, 4)
    with pytest.raises(ValueError, match="kv must have last dimension coff\\*D=128 for ratio 4, got 64"):
        compressor_prefill(kv[..., :d], gate[..., :d], ape, weight, 4)
    with pytest.raises(ValueError, match=r"gate must have shape \[2, 8, 128\]"):
        compressor_prefill(kv, gate[:, :7], ape, weight, 4)
    with pytest.raises(ValueError, match=r"ape must have shape \[4, 128\]"):
        compressor_prefill(kv, gate, ape[:3], weight, 4)
    with pytest.raises(ValueError, match="quant must be None, 'attention' or 'indexer', got 'fp8'"):
        compressor_prefill(kv, gate, ape, weight, 4, quant="fp8")
    with pytest.raises(ValueError, match=r"quant='attention' needs.*got D=64"):
        compressor_prefill(kv, gate, ape, weight, 4, quant="attention")
    with pytest.raises(ValueError, match="rope_dim"):
        compressor_prefill(kv[..., :64], gate[..., :64], ape[:, :64], weight[:32], 4)
    ragged = CompressorState.empty(2, 4, d)
    ragged = CompressorState(ragged.kv, ragged.score, ragged.prev_kv, ragged.prev_score, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"state.num_tokens must be equal across the batch.*\[0, 3\]"):
        compressor_prefill(kv, gate, ape, weight, 4, state=ragged)
    with pytest.raises(ValueError, match=r"state.kv must have shape \[2, 4, 128\]"):
        compressor_decode_step(kv[:, 0], gate[:, 0], CompressorState.empty(2, 128, d), ape, weight, 4)
    with pytest.raises(TypeError, match="state must be a CompressorState"):
        compressor_decode_step(kv[:, 0], gate[:, 0], None, ape, weight, 4)
    with pytest.raises(ValueError, match=r"gate must have shape \[2, 128\]"):
        compressor_decode_step(kv[:, 0], gate[:1, 0], CompressorState.empty(2, 4, d), ape, weight, 4)
    with pytest.raises(TypeError, match=r"state.num_tokens must be int64"):
        compressor_decode_step(
            kv[:, 0],
            gate[:, 0],
            ragged.__class__(ragged.kv, ragged.score, ragged.prev_kv, ragged.prev_score, ragged.num_tokens.int()),
            ape,
            weight,
            4,
        )


_QUANTS = st.sampled_from([None, "attention", "indexer"])


def _token_counts(ratio: int) -> st.SearchStrategy[int]:
    """Token counts. For m = 4 any small count; for m = 128 counts from 5 before to 2 after a block
    boundary, where the emission, the buffer reset and the prefill/decode hand-over happen (a draw from
    0..262 would rarely land next to one; sampled_from spreads the draws evenly over the cases)."""
    if ratio == 4:
        return st.integers(0, 14)
    return st.tuples(st.sampled_from([0, 1, 2]), st.sampled_from(range(-2, 6))).map(
        lambda blocks_back: max(0, blocks_back[0] * ratio - blocks_back[1])
    )


def _decode_steps(ratio: int) -> st.SearchStrategy[int]:
    """Decode steps: a few (crossing a boundary from up to 5 before it) or more than a whole block."""
    if ratio == 4:
        return st.integers(0, 12)
    return st.sampled_from([0, 1, 3, 6, 9, ratio, ratio + 8])


@pytest.mark.parametrize("ratio", [4, 128])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), quant=_QUANTS, data=st.data())
def test_property_prefill_then_decode_equals_one_prefill(ratio, seed, quant, data):
    k = data.draw(_token_counts(ratio), label="k")
    n = k + data.draw(_decode_steps(ratio), label="n - k")
    g = _gen(seed)
    d = DIM[quant]
    kv, gate, ape, weight = _inputs(g, 2, n, ratio, d)
    # the same tokens without quantisation first: the pooling logic must agree to fp32 rounding
    for q in dict.fromkeys([None, quant]):
        full, full_state = compressor_prefill(kv, gate, ape, weight, ratio, quant=q)
        head, state = compressor_prefill(kv[:, :k], gate[:, :k], ape, weight, ratio, quant=q)
        tail, state = _decode_all(kv[:, k:], gate[:, k:], state, ape, weight, ratio, q)
        assert_entries_match(torch.cat([head, tail], 1), full, q)
        _assert_states_equal(state, full_state)


@pytest.mark.parametrize("ratio", [4, 128])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), quant=_QUANTS, data=st.data())
def test_property_two_prefills_equal_one(ratio, seed, quant, data):
    k = data.draw(_token_counts(ratio), label="k")
    n = k + data.draw(_token_counts(ratio), label="n - k")
    g = _gen(seed)
    d = DIM[quant]
    kv, gate, ape, weight = _inputs(g, 2, n, ratio, d)
    for q in dict.fromkeys([None, quant]):
        full, full_state = compressor_prefill(kv, gate, ape, weight, ratio, quant=q)
        head, state = compressor_prefill(kv[:, :k], gate[:, :k], ape, weight, ratio, quant=q)
        tail, state = compressor_prefill(kv[:, k:], gate[:, k:], ape, weight, ratio, quant=q, state=state)
        assert head.shape[1] == k // ratio and tail.shape[1] == n // ratio - k // ratio
        assert_entries_match(torch.cat([head, tail], 1), full, q)
        _assert_states_equal(state, full_state)


@pytest.mark.parametrize("ratio", [4, 128])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), quant=_QUANTS, data=st.data())
def test_property_ragged_decode_matches_decoding_alone(ratio, seed, quant, data):
    if ratio == 4:
        start = st.integers(0, 14)
    else:  # up to 8 tokens before the end of block 0 or 1: most examples emit for some sequences only
        start = st.tuples(st.sampled_from([1, 2]), st.sampled_from(range(-2, 9))).map(lambda bb: bb[0] * 128 - bb[1])
    starts = data.draw(st.lists(start, min_size=3, max_size=3), label="starts")
    steps = data.draw(st.sampled_from(range(1, 10)), label="steps")
    g = _gen(seed)
    d = DIM[quant]
    b = len(starts)
    kv, gate, ape, weight = _inputs(g, b, max(starts) + steps, ratio, d)
    # each sequence prefilled alone to its own length, then decoded together from its own position
    alone = [
        compressor_prefill(kv[i : i + 1, : starts[i]], gate[i : i + 1, : starts[i]], ape, weight, ratio, quant=quant)[1]
        for i in range(b)
    ]
    fields = ("kv", "score", "prev_kv", "prev_score", "num_tokens")
    batch = CompressorState(
        *(None if getattr(alone[0], f) is None else torch.cat([getattr(s, f) for s in alone]) for f in fields)
    )
    for step in range(steps):
        pos = torch.tensor([s + step for s in starts])
        rows = torch.arange(b)
        e, emitted, index, batch = compressor_decode_step(
            kv[rows, pos], gate[rows, pos], batch, ape, weight, ratio, quant=quant
        )
        assert torch.equal(emitted, (pos + 1) % ratio == 0)
        assert torch.equal(index, torch.where(emitted, pos // ratio, -1))
        for i in range(b):
            e_i, emitted_i, index_i, alone[i] = compressor_decode_step(
                kv[i : i + 1, pos[i]], gate[i : i + 1, pos[i]], alone[i], ape, weight, ratio, quant=quant
            )
            assert torch.equal(emitted_i, emitted[i : i + 1]) and torch.equal(index_i, index[i : i + 1])
            if emitted_i.item():
                assert_entries_match(e[i : i + 1], e_i, quant)
            else:
                assert torch.equal(e[i], torch.zeros(d)) and torch.equal(e_i[0], torch.zeros(d))
    for i in range(b):
        _assert_states_equal(
            CompressorState(*(None if getattr(batch, f) is None else getattr(batch, f)[i : i + 1] for f in fields)),
            alone[i],
        )
