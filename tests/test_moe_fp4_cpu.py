"""FP4 expert weights without a GPU: the host quantisation against the reference bit for bit, the FP4 → FP8
expansion the kernels perform (exact up to a scale spread of 2^8 inside a 128-K block), input checks, registry."""

import importlib

import pytest
import torch

from tilev4.kernels import get_kernel_def
from tilev4.reference.quant import (
    dequant_fp4_weight,
    e8m0_decode,
    e8m0_encode,
    fp4_e2m1_quantize,
    fp4_e2m1_simulate,
    pack_fp4,
)

F = importlib.import_module("tilev4.kernels.moe_fp4")
K = importlib.import_module("tilev4.kernels.moe")


def _weights(e, n, k, g, spread=0.0):
    """Gaussian weights whose 32-groups are scaled by 2^U(-spread/2, spread/2), with zeros mixed in."""
    w = torch.randn(e, n, k, generator=g) * 0.02
    if spread:
        w *= torch.exp2((torch.rand(e, n, k // 32, 1, generator=g) - 0.5) * spread).expand(-1, -1, -1, 32).reshape(
            e, n, k)
    w[..., 5::7] = 0.0
    return w


def _flat_weights(e, n, k, g):
    """Uniform weights with every 32-group's amax exactly 0.06: all scales 2^-6 (0.06 / 6 = 0.01 <= 2^-6)."""
    w = (torch.rand(e, n, k, generator=g) * 2 - 1) * 0.05
    w[..., ::32] = 0.06
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_matches_reference_bit_for_bit(gen, dtype):
    w = _weights(3, 40, 256, gen, spread=6.0).to(dtype)
    q = F.quantize_fp4_weight(w)
    assert q.data.dtype == torch.uint8 and q.data.shape == (3, 40, 128)
    assert q.scale.dtype == torch.uint8 and q.scale.shape == (3, 40, 8)
    for i in range(3):
        v, s = fp4_e2m1_quantize(w[i], 32)
        assert torch.equal(q.data[i], pack_fp4(v))
        assert torch.equal(q.scale[i], e8m0_encode(s))
        # and the stored weight is the reference's FP4 simulation of w
        assert torch.equal(dequant_fp4_weight(q.data[i], q.scale[i]), fp4_e2m1_simulate(w[i], 32))


def test_quantize_layout_by_hand():
    """Low nibble = even element, nibble = sign bit 8 | index into (0, .5, 1, 1.5, 2, 3, 4, 6); e8m0 = exp + 127."""
    w = torch.zeros(1, 128)
    w[0, :4] = torch.tensor([0.5, -6.0, 1.5, 3.0])  # amax 6 -> scale 1, values on the grid
    w[0, 32] = 12.0  # second group: amax 12 -> scale 2, 12 = 6 * 2
    q = F.quantize_fp4_weight(w)
    assert q.data.shape == (1, 64) and q.scale.shape == (1, 4)
    assert q.data[0, 0].item() == 0x1 | (0xF << 4)  # 0.5 -> 1, -6 -> 8 | 7
    assert q.data[0, 1].item() == 0x3 | (0x5 << 4)  # 1.5 -> 3, 3 -> 5
    assert q.data[0, 16].item() == 0x7  # 12 / 2 = 6 -> 7, the odd neighbour 0 -> 0
    assert q.scale[0].tolist() == [127, 128, 1, 1]  # 2^0, 2^1, and zero groups at the floor 6·2^-126 / 6


def test_quantize_rejects_bad_input():
    with pytest.raises(TypeError, match="w must be float32 or bfloat16"):
        F.quantize_fp4_weight(torch.zeros(2, 128, dtype=torch.float16))
    with pytest.raises(ValueError, match="multiple of 128"):
        F.quantize_fp4_weight(torch.zeros(2, 96))
    with pytest.raises(ValueError, match=r"w must be \[E, N, K\] or \[N, K\]"):
        F.quantize_fp4_weight(torch.zeros(128))


def _byte_perm(x, y, sel) -> torch.Tensor:
    """PTX ``prmt.b32`` (CUDA ``__byte_perm(x, y, sel)``) on int64 tensors holding 32-bit words: byte i of the result
    is byte ``sel_i & 7`` of the pair (y:x), its sign replicated when ``sel_i & 8``; selector bits past 16 ignored."""
    x, y, sel = (torch.as_tensor(v, dtype=torch.int64) for v in (x, y, sel))
    out = torch.zeros(torch.broadcast_shapes(x.shape, y.shape, sel.shape), dtype=torch.int64)
    for i in range(4):
        s = (sel >> 4 * i) & 15
        idx = s & 7
        byte = torch.where(idx < 4, x >> 8 * (idx & 3), y >> 8 * (idx & 3)) & 255
        byte = torch.where(s >= 8, torch.where(byte >= 128, 255, 0), byte)
        out = out | byte << 8 * i
    return out


def _e4m3_byte(bits: torch.Tensor) -> torch.Tensor:
    """fp32 bit pattern -> e4m3 byte, round to nearest even (torch's cast, as the hardware's cvt)."""
    return bits.to(torch.int32).view(torch.float32).to(torch.float8_e4m3fn).view(torch.uint8).long()


# the kernel's expansion arithmetic (moe_fp4._group_shift / _magnitude_table / _e4m3_words) on int64 tensors
HOST = F._WordOps(int, int, torch.maximum, lambda a, b: a.clamp(max=b), _byte_perm, _e4m3_byte,
                  lambda a, m, b: (a & m) | b)
GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _expand_words(w: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The e4m3 bytes [..., 8] the kernel writes for packed words ``w`` (8 codes, element 0 in the low nibble) at
    shift ``j`` (already clamped to 20): the branch on j <= FAST_SHIFT picks the table."""
    fast = F._magnitude_table(j, True, HOST)
    slow = F._magnitude_table(j, False, HOST)
    lo, hi = (torch.where(j <= F.FAST_SHIFT, f, s) for f, s in zip(fast, slow, strict=True))
    words = F._e4m3_words(w, lo, hi, HOST)
    return torch.stack([(words[i // 4] >> 8 * (i % 4)) & 255 for i in range(8)], -1).to(torch.uint8)


def _codes(w: torch.Tensor) -> torch.Tensor:
    return torch.stack([(w >> 4 * i) & 15 for i in range(8)], -1)


def _values(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes -> values (code 8 is −0)."""
    mag = GRID[codes & 7]
    return torch.where(codes >= 8, -mag, mag)


def test_expansion_words_are_the_e4m3_rounding_of_v_times_2_to_minus_j():
    """For every code in every nibble of a word (all 2^16 low halves, each with a distinct high half) and every
    shift, the kernel's table lookup gives the bytes of rne_e4m3(v · 2^-j) — sign of zero included — through the
    table path for j <= 5 and the converted path above; v · 2^-j itself for j <= 8 (the module docstring)."""
    lo16 = torch.arange(1 << 16)
    w = (lo16 | ((lo16 * 0x9E37 + 0x1234) & 0xFFFF) << 16).repeat_interleave(24)  # odd factor: a bijection
    j = torch.arange(24).repeat(1 << 16)
    got = _expand_words(w, j.clamp(max=F.SHIFT_CLAMP))  # [65536·24, 8]
    exact = _values(_codes(w)) * torch.exp2(-j.float())[:, None]  # float32: exact, and v · 2^-j for all j
    assert torch.equal(got, exact.to(torch.float8_e4m3fn).view(torch.uint8))  # torch's cast: nearest even
    got = got.view(torch.float8_e4m3fn).float()
    small = j <= F.MAX_EXACT_SHIFT
    assert torch.equal(got[small], exact[small])
    assert not torch.equal(got[j == 9], exact[j == 9])  # the bound is tight: 0.5 · 2^-9 is not in e4m3
    assert (got[j >= 13] == 0).all()
    assert (got[j <= F.FAST_SHIFT] != 0).sum() == (exact[j <= F.FAST_SHIFT] != 0).sum()  # no normal flushed


def _words(data: torch.Tensor) -> torch.Tensor:
    """Little-endian 32-bit words (int64) of packed bytes [..., 4·W] -> [..., W]."""
    b = data.reshape(*data.shape[:-1], -1, 4).long()
    return (b << torch.tensor([0, 8, 16, 24])).sum(-1)


def _bytes(words: torch.Tensor) -> torch.Tensor:
    return torch.stack([(words >> 8 * i) & 255 for i in range(4)], -1).flatten(-2).to(torch.uint8)


def test_prepared_layout_by_hand():
    """Element e of a word negative alone: its sign moves to bit 7 of byte e (e < 4) or bit 3 of byte e − 4; the
    magnitudes stay where they are."""
    for e in range(8):
        w = torch.tensor([(0x8 | 0x5) << 4 * e])  # code −3 at element e, +0 elsewhere
        got = _words(F.prepare_fp4_weight(F.FP4Weight(_bytes(w)[None, None].repeat(1, 1, 16),
                                                      torch.ones(1, 1, 4, dtype=torch.uint8))).data[0, 0, :4])
        sign = 1 << (8 * e + 7) if e < 4 else 1 << (8 * (e - 4) + 3)
        assert got.item() == (0x5 << 4 * e) | sign, e


def test_prepared_words_expand_to_the_checkpoint_bytes():
    """The kernel arithmetic on prepared words (two instructions fewer) gives the bytes of the checkpoint words,
    for every code in every nibble (all 2^16 low halves, each with a distinct high half) on both table paths."""
    lo16 = torch.arange(1 << 16)
    w = lo16 | ((lo16 * 0x9E37 + 0x1234) & 0xFFFF) << 16
    prepared = _words(F.prepare_fp4_weight(F.FP4Weight(_bytes(w).view(1, -1, 64),
                                                       torch.ones(1, (1 << 16) // 16, 4, dtype=torch.uint8))).data)
    prepared = prepared.flatten()
    assert not torch.equal(prepared, w)
    for j in (0, 3, 7, 12):
        fast = j <= F.FAST_SHIFT
        lo, hi = F._magnitude_table(torch.full_like(w, j), fast, HOST)
        want = F._e4m3_words(w, lo, hi, HOST)
        got = F._e4m3_words(prepared, lo, hi, HOST, prepared=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), j


def test_prepare_round_trip_and_expansion(gen):
    q = F.quantize_fp4_weight(_weights(2, 24, 256, gen, spread=12.0))
    noise = F.FP4Weight(torch.randint(0, 256, q.data.shape, generator=gen, dtype=torch.uint8).view(torch.int8),
                        q.scale.view(torch.float8_e8m0fnu))  # the checkpoint's dtypes
    for w in (q, noise):
        p = F.prepare_fp4_weight(w)
        assert p.layout == "prepared" and p.data.dtype == torch.uint8 and p.data.shape == w.data.shape
        assert torch.equal(p.scale, w.scale.view(torch.uint8))
        again = F.prepare_fp4_weight(p)  # already prepared: the same bytes, not a copy
        assert again.layout == "prepared" and again.data.data_ptr() == p.data.data_ptr()
        back = F.checkpoint_fp4_weight(p)
        assert back.layout == "checkpoint" and torch.equal(back.data, w.data.view(torch.uint8))
        assert torch.equal((p.data & 0x77), (w.data.view(torch.uint8) & 0x77))  # magnitudes in place
        assert torch.equal(F.expand_fp4_weight(p), F.expand_fp4_weight(w))
        assert F.fp4_expansion_is_exact(p) == F.fp4_expansion_is_exact(w)
    one = F.quantize_fp4_weight(_weights(1, 8, 128, gen)[0])  # [N, K/2]: one expert
    p1 = F.prepare_fp4_weight(one)
    assert p1.data.shape == one.data.shape
    assert torch.equal(F.checkpoint_fp4_weight(p1).data, one.data)


def test_magnitude_tables_agree_where_both_hold():
    """The exponent-field table equals the converted one for every j <= FAST_SHIFT (and its smallest non-zero byte,
    0.5 · 2^-5, is e4m3's smallest normal 0x08), so the branch only chooses the cheaper construction."""
    j = torch.arange(F.FAST_SHIFT + 1)
    fast, slow = F._magnitude_table(j, True, HOST), F._magnitude_table(j, False, HOST)
    assert all(torch.equal(f, s) for f, s in zip(fast, slow, strict=True))
    assert ((fast[0] >> 8) & 255)[-1] == 0x08


def test_group_shift_from_the_scale_word(gen):
    b = torch.randint(1, 255, (4096, 4), generator=gen)
    b[:64] = b[:64, :1]  # equal scales: j = 0
    b[64:128, 2] = 254  # far spreads: clamped to 20
    b[64:128, (0, 1, 3)] = 2
    sc = (b << torch.tensor([0, 8, 16, 24])).sum(-1).to(torch.int32).long()  # the int32 word, as the kernel reads it
    for g in range(4):
        b_max, j = F._group_shift(sc, g, HOST)
        assert torch.equal(b_max, b.amax(-1))
        assert torch.equal(j, (b.amax(-1) - b[:, g]).clamp(max=F.SHIFT_CLAMP))


def _emulate_expand(w: F.FP4Weight) -> torch.Tensor:
    """The kernels' expanded weights [E, N, K] from the raw bytes, step by step as _expand takes them: 32-bit words
    of packed codes and of the four scale bytes of a K block, (b_max, j), table, lookup, times S = 2^(b_max − 127)
    (from the bits ``b_max << 23``)."""
    e, n, kp = w.data.shape
    words = w.data.reshape(e, n, kp // 4, 4).long()
    words = (words << torch.tensor([0, 8, 16, 24])).sum(-1).reshape(e, n, kp // 64, 4, 4)  # [.., KB, group, word]
    sc = (w.scale.reshape(e, n, -1, 4).long() << torch.tensor([0, 8, 16, 24])).sum(-1).to(torch.int32).long()
    out = []
    for g in range(4):
        b_max, j = F._group_shift(sc, g, HOST)  # [E, N, KB]
        out.append(_expand_words(words[..., g, :], j[..., None]).view(torch.float8_e4m3fn).float().flatten(-2))
    big = (b_max << 23).to(torch.int32).view(torch.float32)[..., None, None]
    return (torch.stack(out, -2) * big).reshape(e, n, -1)


@pytest.mark.parametrize("spread", [4.0, 30.0])
def test_emulated_kernel_expansion_is_expand_fp4_weight(gen, spread):
    """End to end on the host: packed bytes and scale bytes through the kernel's word arithmetic give exactly
    expand_fp4_weight — for ordinary weights and for scale spreads that take the rounding path (and its clamp)."""
    q = F.quantize_fp4_weight(_weights(2, 48, 512, gen, spread=spread))
    assert F.fp4_expansion_is_exact(q) == (spread < 8)
    assert torch.equal(_emulate_expand(q), F.expand_fp4_weight(q))
    noise = F.FP4Weight(torch.randint(0, 256, q.data.shape, generator=gen, dtype=torch.uint8),
                        torch.randint(1, 255, q.scale.shape, generator=gen, dtype=torch.uint8))  # random codes, bytes
    assert torch.equal(_emulate_expand(noise), F.expand_fp4_weight(noise))


def test_expanded_weight_is_the_dequantised_weight_for_ordinary_weights(gen):
    w = _weights(2, 64, 512, gen, spread=4.0)  # 32-group scales spread over 2^4: far inside 2^8
    q = F.quantize_fp4_weight(w)
    assert F.fp4_expansion_is_exact(q)
    deq = torch.stack([dequant_fp4_weight(q.data[i], q.scale[i]) for i in range(2)])
    assert torch.equal(F.expand_fp4_weight(q), deq)


def test_checkpoint_dtypes_are_the_same_bytes(gen):
    """The checkpoint stores packed FP4 as int8 and the scales as float8_e8m0fnu (tilev4.model.weights)."""
    from tilev4.model.weights import quantize_fp4_weight as checkpoint_quantize

    w = _weights(2, 16, 256, gen, spread=3.0)
    q = F.quantize_fp4_weight(w)
    packed, scale = zip(*(checkpoint_quantize(w[i]) for i in range(2)), strict=True)
    ckpt = F.FP4Weight(torch.stack(packed), torch.stack(scale))
    assert ckpt.data.dtype == torch.int8 and ckpt.scale.dtype == torch.float8_e8m0fnu
    assert torch.equal(ckpt.data.view(torch.uint8), q.data) and torch.equal(ckpt.scale.view(torch.uint8), q.scale)
    assert torch.equal(F.expand_fp4_weight(ckpt), F.expand_fp4_weight(q))
    checked = F._check_fp4_weight("w", ckpt, 2, 16, 256, torch.device("cpu"))
    assert checked.data.dtype == torch.uint8 and checked.scale.dtype == torch.uint8


def test_expanded_weight_rounds_only_past_a_spread_of_2_to_8(gen):
    w = _flat_weights(1, 8, 256, gen)
    w[0, 0, 32:64] *= 2.0**-9  # row 0, block 0: group 1 is 2^9 below the others -> rounded
    w[0, 1, 32:64] *= 2.0**-8  # row 1: 2^8 below -> still exact
    w[0, 2, 32:64] = 0.0  # row 2: an all-zero group (floor scale, ~2^-126) -> 0 is exact at any shift
    q = F.quantize_fp4_weight(w)
    deq = dequant_fp4_weight(q.data[0], q.scale[0])
    got = F.expand_fp4_weight(q)[0]
    assert not F.fp4_expansion_is_exact(q)
    diff = got != deq
    assert diff[0, 32:64].any() and not diff[0, :32].any() and not diff[0, 64:].any()
    assert not diff[1:].any()
    big = e8m0_decode(q.scale[0, 0, :4]).max()  # S of row 0, block 0
    assert ((got[0, 32:64] - deq[0, 32:64]).abs() <= 2.0**-10 * big).all()
    w[0, 0, 32:64] *= 2.0  # back to a spread of 2^8 everywhere: exact
    assert F.fp4_expansion_is_exact(F.quantize_fp4_weight(w))


def test_registry_entries():
    up, down = get_kernel_def("moe_up_fp4"), get_kernel_def("moe_down_fp4")
    assert up.default_config == {"dim": 4096} and down.default_config == {"inter": 2048}
    for kdef in (up, down):
        assert kdef.batch_invariant and "moe" in kdef.tags and "fp4" in kdef.tags and kdef.summary
    assert "fp4" in K.WEIGHT_FORMATS


@pytest.mark.parametrize(("build", "kwargs"), [(F.build_moe_up_fp4, {"dim": 4000}),
                                               (F.build_moe_down_fp4, {"inter": 2000})])
def test_factories_reject_k_off_the_scale_block(build, kwargs):
    with pytest.raises(ValueError, match="multiple of 128"):
        build(**kwargs)


def test_swap_schedule_is_taken_for_few_rows_an_expert():
    """The ops' rule: the swap schedule while an expert gets at most SWAP_MAX_ROWS_PER_EXPERT rows on average (the
    V4-Flash decode batches; more for the up-projection, whose swap program gains more), the tuned schedule (no
    extra keys) past that and for no rows."""
    assert F.SWAP_MAX_ROWS_PER_EXPERT["up"] >= F.SWAP_MAX_ROWS_PER_EXPERT["down"] >= 2
    for kind in ("up", "down"):
        cap = F.SWAP_MAX_ROWS_PER_EXPERT[kind]
        assert F.swap_config(kind, 64 * 6, 256) == F.SWAP_CONFIG[kind]  # 64 tokens, top-6 of 256
        assert F.swap_config(kind, cap * 256, 256)["schedule"] == "swap"
        assert F.swap_config(kind, cap * 256 + 1, 256) == {}
        assert F.swap_config(kind, 8192 * 6, 256) == {}
        assert F.swap_config(kind, 0, 256) == {}
    assert F.swap_config("up", 768 * 6, 256)["schedule"] == "swap" and F.swap_config("down", 768 * 6, 256) == {}
    assert F.swap_config("up", 1, 1) is not F.SWAP_CONFIG["up"]  # a copy: the op may add keys
    with pytest.raises(ValueError, match="kind must be one of"):
        F.swap_config("gate", 1, 1)


@pytest.mark.parametrize("build", [F.build_moe_up_fp4, F.build_moe_down_fp4])
def test_swap_schedule_needs_the_128_row_table(build):
    with pytest.raises(ValueError, match="block_m must be 128 for the 'swap' schedule"):
        build(2048, block_m=192, schedule="swap")
    with pytest.raises(ValueError, match="schedule must be one of"):
        build(2048, schedule="swapped")


@pytest.mark.parametrize("build", [F.build_moe_up_fp4, F.build_moe_down_fp4])
def test_swap_schedule_takes_128_weight_rows_a_cta(build):
    """block_n is the swap CTA's weight rows (output columns), 64 a warpgroup: 128 only, and the ops' configs say so."""
    with pytest.raises(ValueError, match=r"block_n must be 128 for the 'swap' schedule.*got 64"):
        build(2048, schedule="swap", block_n=64)
    assert all(c["block_n"] == F.SWAP_BLOCK_N == 128 for c in F.SWAP_CONFIG.values())


def _perm(n=6, dim=256, num_experts=4):
    """A CPU stand-in for a permutation: enough for the input checks, which run before any launch."""
    i32 = torch.int32
    return K.MoEPermutation(num_experts, 2, K.BLOCK_M, torch.zeros(num_experts, dtype=i32),
                            torch.zeros(num_experts + 1, dtype=i32), torch.zeros(n, dtype=i32),
                            torch.zeros(n // 2, 2, dtype=i32), torch.zeros(num_experts + 1, dtype=i32),
                            torch.zeros(8, dtype=i32), torch.zeros(n, dim, dtype=torch.bfloat16), torch.zeros(n))


def _fp4(e, n, k):
    return F.FP4Weight(torch.zeros(e, n, k // 2, dtype=torch.uint8), torch.zeros(e, n, k // 32, dtype=torch.uint8))


def _act(n, k):
    return torch.zeros(n, k, dtype=torch.float8_e4m3fn), torch.ones(n, k // 128)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: F.moe_up_fp4(_perm(), *_act(6, 256), "w", _fp4(4, 128, 256)), TypeError,
         "w1 must be an FP4Weight"),
        (lambda: F.moe_up_fp4(_perm(), *_act(6, 256), _fp4(4, 128, 256), _fp4(4, 128, 128)), ValueError,
         r"w3.data must have shape \[4, 128, 128\]"),
        (lambda: F.moe_up_fp4(_perm(), *_act(6, 256), _fp4(4, 96, 256), _fp4(4, 96, 256)), ValueError,
         "inter=96 must be a positive multiple of 128"),
        (lambda: F.moe_up_fp4(_perm(), *_act(6, 128), _fp4(4, 128, 256), _fp4(4, 128, 256)), ValueError,
         r"x8 must have shape \[6, 256\]"),
        (lambda: F.moe_up_fp4(_perm(), _act(6, 256)[0], torch.ones(6, 2).double(), _fp4(4, 128, 256),
                              _fp4(4, 128, 256)), TypeError, "x8 scale must be float32"),
        (lambda: F.moe_up_fp4(_perm(), *_act(6, 256), _fp4(4, 128, 256),
                              F.FP4Weight(_fp4(4, 128, 256).data, torch.zeros(4, 128, 8))), TypeError,
         "w3.scale must be uint8"),
        (lambda: F.moe_up_fp4(_perm(), *_act(6, 256), _fp4(4, 128, 256), _fp4(4, 128, 256), swiglu_limit=0.0),
         ValueError, "swiglu_limit"),
        (lambda: F.moe_down_fp4(_perm(), *_act(6, 200), _fp4(4, 256, 200)), ValueError, "inter=200"),
        (lambda: F.moe_up_fp4(_perm(), *_act(6, 256), F.prepare_fp4_weight(_fp4(4, 128, 256)), _fp4(4, 128, 256)),
         ValueError, "must share a layout, got {'w1': 'prepared', 'w3': 'checkpoint'}"),
        (lambda: F.moe_down_fp4(_perm(), *_act(6, 128), F.FP4Weight(*_fp4(4, 256, 128)[:2], "packed")), ValueError,
         r"w2.layout must be one of \('checkpoint', 'prepared'\), got 'packed'"),
        (lambda: F.prepare_fp4_weight(F.FP4Weight(*_fp4(2, 4, 256)[:2], "Prepared")), ValueError,
         "w.layout must be one of"),
        (lambda: F.prepare_fp4_weight(torch.zeros(2, 4, 128, dtype=torch.uint8)), TypeError,
         "w must be an FP4Weight"),
        (lambda: F.build_moe_up_fp4(256, layout="prepared4"), ValueError,
         r"layout must be one of \('checkpoint', 'prepared'\), got 'prepared4'"),
        (lambda: F.moe_down_fp4(_perm(), *_act(6, 128), F.FP4Weight(
            torch.zeros(4 * 256 * 64 + 8, dtype=torch.uint8)[8:].view(4, 256, 64), _fp4(4, 256, 128).scale)),
         ValueError, "w2.data must start at a 16-byte aligned address"),
        (lambda: F.moe_down_fp4(_perm(), *_act(6, 128), _fp4(3, 256, 128)), ValueError,
         r"w2.data must have shape \[4, 256, 64\]"),
        (lambda: F.moe_down_fp4(_perm(), *_act(6, 128), _fp4(4, 256, 128), out=torch.zeros(6, 256)), TypeError,
         "out must be bfloat16"),
        (lambda: F.expand_fp4_weight(F.FP4Weight(torch.zeros(2, 4, 48, dtype=torch.uint8),
                                                 torch.zeros(2, 4, 3, dtype=torch.uint8))), ValueError,
         "multiple of 128"),
        (lambda: K.moe_experts(torch.zeros(4, 256).bfloat16(), torch.rand(4, 2),
                               torch.zeros(4, 2, dtype=torch.int32), *(_fp4(4, 128, 256),) * 3,
                               weight_format="fp4"), ValueError, r"w2.data must have shape \[4, 256, 64\]"),
        (lambda: K.moe_experts(torch.zeros(4, 256).bfloat16(), torch.rand(4, 2),
                               torch.zeros(4, 2, dtype=torch.int32), torch.zeros(4, 128, 256).bfloat16(),
                               torch.zeros(4, 256, 128).bfloat16(), torch.zeros(4, 128, 256).bfloat16(),
                               weight_format="fp4"), TypeError, "w1 must be an FP4Weight"),
        (lambda: K.moe_experts(torch.zeros(4, 256).bfloat16(), torch.rand(4, 2),
                               torch.zeros(4, 2, dtype=torch.int32), _fp4(4, 96, 256), _fp4(4, 256, 96),
                               _fp4(4, 96, 256), weight_format="fp4"), ValueError,
         "needs dim and inter multiples of 128"),
        (lambda: K.moe_experts(torch.zeros(4, 256).bfloat16(), torch.rand(4, 2),
                               torch.zeros(4, 2, dtype=torch.int32), _fp4(4, 128, 256), _fp4(4, 256, 128),
                               _fp4(4, 128, 256), weight_format="fp4"), ValueError, "x must be a CUDA tensor"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
