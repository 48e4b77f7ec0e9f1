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


def _byte_perm(x: int, y: int, sel: torch.Tensor) -> torch.Tensor:
    """CUDA ``__byte_perm(x, y, sel)`` for selector nibbles 0..7: byte i of the result is byte sel_i of (y:x)."""
    table = torch.tensor([(x >> 8 * i) & 255 for i in range(4)] + [(y >> 8 * i) & 255 for i in range(4)])
    return sum(table[(sel >> 4 * i) & 7] << 8 * i for i in range(4))


def _vsubus4(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CUDA ``__vsubus4``: per-byte unsigned saturating subtraction."""
    return sum(((((a >> 8 * i) & 255) - ((b >> 8 * i) & 255)).clamp(min=0)) << 8 * i for i in range(4))


def _kernel_bytes(p16: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The kernel's expansion (moe_fp4._expand) in int64 torch ops: the 4 e4m3 bytes of the codes in p16 at
    shift min(j, 20) — the byte-permute path for j <= 5, the fp32-bits path above. Returns [..., 4] uint8."""
    j = j.clamp(max=F.SHIFT_CLAMP)
    mags = _byte_perm(F._E4M3_LO, F._E4M3_HI, p16 & 0x7777)
    signs = _byte_perm(0x8000, 0, (p16 >> 3) & 0x1111)
    word = _vsubus4(mags, j * 0x08080808) | signs
    out = []
    for i in range(4):
        fast = ((word >> 8 * i) & 255).to(torch.uint8)
        code = (p16 >> 4 * i) & 15
        mag = code & 7
        bits = torch.where(mag >= 2, (252 + mag) << 22, torch.full_like(mag, 252 << 22)) - (j << 23)
        a = torch.where(mag == 0, torch.zeros(mag.shape), bits.to(torch.int32).view(torch.float32))
        slow = torch.where(code >= 8, -a, a).to(torch.float8_e4m3fn).view(torch.uint8)
        out.append(torch.where(j <= F.FAST_SHIFT, fast, slow))
    return torch.stack(out, -1)


def test_expansion_formula_is_the_e4m3_rounding_of_v_times_2_to_minus_j():
    """For every 4 codes and every shift the kernel's bit construction gives rne_e4m3(v · 2^-j) (both paths), and
    that is v · 2^-j itself for j <= 8 (the derivation in the module docstring)."""
    p16 = torch.arange(1 << 16).repeat_interleave(24)
    j = torch.arange(24).repeat(1 << 16)
    got = _kernel_bytes(p16, j).view(torch.float8_e4m3fn).float().double()  # [65536·24, 4]
    codes = torch.stack([(p16 >> 4 * i) & 15 for i in range(4)], -1)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    v = torch.where(codes >= 8, -grid[codes & 7], grid[codes & 7])
    exact = v * torch.exp2(-j.double())[:, None]
    assert torch.equal(got, exact.float().to(torch.float8_e4m3fn).float().double())  # torch's cast: nearest even
    small = j <= F.MAX_EXACT_SHIFT
    assert torch.equal(got[small], exact[small])
    assert not torch.equal(got[j == 9], exact[j == 9])  # the bound is tight: 0.5 · 2^-9 is not in e4m3
    assert (got[j >= 13] == 0).all()


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
