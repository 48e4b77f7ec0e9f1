"""MoE expert GEMMs with FP4 e2m1 weights (e8m0 scales per 32 along K), expanded to FP8 in shared memory.

Semantics: the FP8 path of :mod:`tilev4.kernels.moe_fp8` with the weights of the released checkpoint:
``w[n, k] = v[n, k] · s[n, k // 32]``, ``v`` an e2m1 value (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6) and ``s``
a power of two (an e8m0 byte, ``2^(byte − 127)``). The activations are quantised 1×128 to FP8 e4m3 exactly
as for FP8 weights (:func:`tilev4.fp8_quantize`), so the GEMM is FP4 × FP8 — run on the FP8 tensor cores
(Hopper has no FP4 MMA) after expanding each weight tile to e4m3 in shared memory.

Expansion. Per weight row ``n`` and K block of 128 (four scales ``s_g = 2^(b_g − 127)``) let
``S = max_g s_g`` and ``j_g = b_max − b_g >= 0``; then ``w = (v · 2^−j_g) · S`` and the kernel writes the
e4m3 byte of ``v · 2^−j`` (round to nearest even) to shared memory. e4m3 holds ``m · 2^e`` for 3-bit
mantissas down to its subnormal step ``2^−9``; an e2m1 value is ``{1, 2, 3} · 2^−1`` times a power of two
up to ``2^1`` (6 = 3·2), so ``v · 2^−j`` is exact for every ``j <= 8`` (the smallest, ``2^−1·2^−8 = 2^−9``,
is e4m3's smallest subnormal; 1.5·2^−8 = 3·2^−9 too) and at most 6 <= 448. Hence:

* **exact** whenever, in every 128-K block of every weight row, the four per-32 scales lie within a
  factor ``2^8`` of each other (groups of all zeros do not count: 0 is exact for any ``j``). The weights
  of :func:`quantize_fp4_weight` and of the checkpoint are like that except for pathological rows;
  :func:`fp4_expansion_is_exact` checks a weight;
* otherwise the elements of the groups with ``j >= 9`` are rounded to the e4m3 grid at ``S`` (round to
  nearest even): an error of at most ``2^−10 · S`` per element (half the subnormal step ``2^−9 · S``), on
  elements that are themselves at most ``6 · 2^−9 · S`` while the block's largest exceeds ``3 · S``; those
  with ``j >= 13`` flush to 0. :func:`expand_fp4_weight` gives the weights exactly as the kernels use them.

The promotion of the FP8 tensor-core block sum ``t = x8[:, kb] · w8[:, kb]ᵀ`` is then
``acc[i, n] += t[i, n] · sx[i, kb] · S[n, kb]`` — a per-row activation scale times a per-column weight
scale (from shared memory), both powers of two, so the promotion is exact and the only roundings are
the FP8 tensor core's block sum and the fp32 sum over K blocks, as for FP8 weights.

The e4m3 bytes are made by table lookup, a 32-bit word of eight codes at a time (a thread takes 16
packed bytes — a whole 32-group, so one ``j`` — or 8 for small tiles). Per step the thread builds the
e4m3 bytes of the eight magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 at shift ``j`` (two words): for ``j <= 5``
every non-zero ``v · 2^−j`` is a normal e4m3 number, whose byte is that of ``|v|`` with ``8·j`` taken
off its exponent field; for ``j >= 6`` (subnormal results, rounding) the fp32 bit pattern of each
``m · 2^−j`` is built with integer operations (``j`` clamped to 20, past which everything rounds to 0
anyway, so that the exponent field stays positive) and converted by the hardware (round to nearest
even), behind a branch uniform over the 32-group and rarely taken. Then per word four ``__byte_perm``:
two look the magnitudes up in the table, two gather the sign bits, put on top by a masked OR (also on
a zero: the byte of a negative value's rounding to 0 is that of −0, 0x80); for prepared weights
(:func:`prepare_fp4_weight`) the sign bits are already in place and the two gathers go. One 16-byte load brings 32
codes and one 16-byte store writes 16 bytes into the GEMM's swizzled tile, bank-conflict free.
:func:`_e4m3_words` and its helpers build both the kernel's expressions and the host emulation that
the CPU tests check against the per-element rounding for every code and shift.

Kernels (tile → expert map and batch invariance exactly as the bf16 and FP8 kernels):

* ``moe_up_fp4`` — ``h = silu(min(x W1ᵀ, l)) · clamp(x W3ᵀ, ±l) · w`` → bf16. A ``ws`` CTA computes 64 columns
  of h from 64 rows of W1 and the same 64 rows of W3 (a ``swap`` CTA 128).
* ``moe_down_fp4`` — ``y = h W2ᵀ`` → bf16, from ``h`` quantised 1×128 (a separate
  :func:`tilev4.fp8_quantize` launch).

Three schedules (``schedule``):

* ``ws`` (the default, :func:`_build_fp4_ws`): warp-specialised as the bf16 and FP8 kernels — producer
  warpgroups that TMA-load the packed bytes and the activations and expand the weights into each stage while two
  consumer warpgroups run the FP8 wgmma and the promotions of the stage before.
* ``swap`` (:func:`_build_fp4_swap`): for tiles of few rows (decode), the weights as the wgmma's M and the rows as
  its N, 128 weight rows a CTA, every thread expanding, two or three CTAs an SM. Same bits as ``ws``; the ops take
  it while the rows an expert gets on average are few (:func:`swap_config`).
* ``pipelined``: every thread copies (cp.async), expands and computes in turn. Its B tile stacks the 64 rows of W1
  over the same rows of W3, so one [128, 128] FP8 GEMM per K block gives gate and up side by side: two fp32
  [128, 128] register tiles (accumulator and block sum) where the FP8 kernel's layout — two GEMMs, three tiles —
  plus the column scales spilled past 255 registers. Per K block the copies, the expansion and a synchronous GEMM
  run one after the other behind block-wide barriers (three per K block for down, four for up;
  :func:`_loads_last`); 195 / 199 registers a thread (up / down), no spills (ptxas, sm_90a).

Layouts: ``FP4Weight(data, scale)`` with data [E, N, K/2] uint8 (two e2m1 codes per byte, the low nibble
holds the even element; a code is sign bit 8 | magnitude index 0..7 into 0, 0.5, 1, 1.5, 2, 3, 4, 6) and
scale [E, N, K/32] uint8 e8m0 bytes (``2^(byte − 127)``; byte 255, e8m0's NaN, is not expected; byte 0,
``2^−127``, is read as 0 — :func:`quantize_fp4_weight` never writes either); the checkpoint's int8 data and
float8_e8m0fnu scales are taken as the same bytes. ``FP4Weight.layout == "prepared"`` (:func:`prepare_fp4_weight`,
once at load time) moves each word's sign bits to where the expansion puts them (:func:`_e4m3_words`: 7 instructions
a word of 8 codes instead of 9); the kernels take either layout (the ``layout`` factory key) with the same bits.
K (dim for the up projection,
inter for the down projection) is a multiple of 128 and static (a kernel per size).

Tuning notes: every CTA that reads a weight tile expands it again (the M tiles of an expert each do), ~1.1
integer instructions per element for the lookup on the fast path (~0.9 for prepared weights), ~2 with the scale
bytes, the table,
addressing and the 16-byte shared loads and stores (~65 a thread per 32-group). The schedules give the same bits:
the pipelined kernel's m64 × 128 wgmma over the stacked tile sums each element as the ws kernel's m64 × 64 a weight
does (measured on the H200; ``tests/test_moe_gpu.py`` checks it), and so does the swap kernel's m64 × 8 with the
operands swapped. Tuned (:mod:`tilev4.kernels.moe_tuning`): ``schedule`` (ws or pipelined), ``num_stages`` and
``packed_stages`` (ws), ``block_n`` (down); ``block_m`` is the permutation's (a problem key). The swap schedule is
not a tuning candidate (the tuning buckets do not tell decode from prefill): the ops take it by the rows an expert
gets on average (:func:`swap_config`, measured on the H200).

Dimension glossary: NR sorted rows (T·k), D dim, I inter, E experts, MT max M tiles, KB = K/128,
KP = K/2 packed bytes, KS = K/32 scales.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import tilelang.language as T
import torch
from tilelang.layout import make_swizzled_layout

from tilev4._checks import check_aligned, check_tensor
from tilev4._fastmath import FAST_SOURCE
from tilev4.kernels.moe import _NO_WS, BLOCK_M, MoEPermutation, _grouped_tile
from tilev4.kernels.moe_fp8 import QuantFormat, grouped_down, grouped_up
from tilev4.kernels.moe_tuning import (
    MOE_DOWN_FP4_HARNESS,
    MOE_DOWN_FP4_SPACE,
    MOE_UP_FP4_HARNESS,
    MOE_UP_FP4_SPACE,
    down_bucket,
    up_bucket,
)
from tilev4.kernels.moe_ws import (
    HALF_M,
    _grouped_record,
    cap_keep_nan,
    check_ws_schedule,
    clamp_keep_nan,
    load_route_weights,
    shared_buffers,
    silu,
    store_part,
)
from tilev4.kernels.registry import register

__all__ = ["FP4Weight", "build_moe_down_fp4", "build_moe_up_fp4", "checkpoint_fp4_weight", "expand_fp4_weight",
           "fp4_expansion_is_exact", "moe_down_fp4", "moe_up_fp4", "prepare_fp4_weight", "quantize_fp4_weight",
           "swap_config", "swap_ctas"]

SCALE_BLOCK = 128  # K block of the FP8 tensor-core sum and of the promotion (as for FP8 weights)
FP4_BLOCK = 32  # K elements per e8m0 weight scale
GROUPS = SCALE_BLOCK // FP4_BLOCK  # scales per row and K block
MAX_EXACT_SHIFT = 8  # v · 2^-j is exact in e4m3 for every e2m1 value v when j <= 8
SHIFT_CLAMP = 20  # j past 12 rounds everything to 0; clamping keeps the fp32 exponent field positive
FAST_SHIFT = 5  # j <= 5 keeps every non-zero v · 2^-j a normal e4m3 number (0.5 · 2^-5 = 2^-6, exponent field 1)
_E4M3_LO, _E4M3_HI = 0x3C383000, 0x4C484440  # e4m3 bytes of 0, 0.5, 1, 1.5 | 2, 3, 4, 6 (little-endian)
_DATA_DTYPES = (torch.uint8, torch.int8)  # the checkpoint stores the packed bytes as int8
_SCALE_DTYPES = (torch.uint8, torch.float8_e8m0fnu)  # ... and the scales as float8_e8m0fnu
_PASS_CONFIGS = _NO_WS  # cp.async software pipeline (see moe.py): its copies are disable_tma


class FP4Weight(NamedTuple):
    """Stacked FP4 expert weights: data [E, N, K/2] uint8 (low nibble = even element), scale [E, N, K/32]
    uint8 e8m0 bytes. The checkpoint's dtypes (int8 data, float8_e8m0fnu scales) are accepted as the same
    bytes. ``layout``: ``"checkpoint"`` (the released format: a code's sign is bit 3 of its nibble) or
    ``"prepared"`` (:func:`prepare_fp4_weight`: the same magnitudes with the sign bits moved within each 32-bit
    word, which the kernels expand with two instructions a word fewer)."""

    data: torch.Tensor
    scale: torch.Tensor
    layout: str = "checkpoint"


LAYOUTS = ("checkpoint", "prepared")


def _is_prepared(layout: object, name: str = "layout") -> bool:
    """Whether ``layout`` (one of :data:`LAYOUTS`, else a ValueError naming ``name``) is the prepared one."""
    if layout not in LAYOUTS:
        raise ValueError(f"{name} must be one of {LAYOUTS}, got {layout!r}")
    return layout == "prepared"


def prepare_fp4_weight(w: FP4Weight) -> FP4Weight:
    """The ``"prepared"`` layout of FP4 weights (on their device, one pass over the packed bytes; a prepared
    weight is returned as it is, as uint8 views): in every 32-bit word of packed bytes (8 elements, element ``e``
    at nibble ``e``) the magnitudes stay where they are and the sign of element ``b`` (b = 0..3) moves to bit 7 of
    byte ``b``, that of element ``4 + b`` to bit 3 of byte ``b`` — where the expansion's masked ORs want them
    (:func:`_e4m3_words`).
    The scales are unchanged. The FP4 ops take either layout and give the same bits, the prepared one faster:
    prepare a checkpoint's expert weights once, when they are loaded. :func:`checkpoint_fp4_weight` undoes it.
    ``[N, K/2]`` weights (one expert) are taken as well."""
    w = _check_any_fp4(w)
    if w.layout == "prepared":
        return w
    c = w.data.reshape(*w.data.shape[:-1], -1, 4)  # the four bytes of each word
    s = torch.stack(((c >> 3) & 1, (c >> 7) & 1), -1).flatten(-2)  # the signs of elements 0..7 (2b, 2b + 1: byte b)
    data = (c & 0x77) | (s[..., 4:] << 3) | (s[..., :4] << 7)
    return FP4Weight(data.reshape(w.data.shape), w.scale, "prepared")


def checkpoint_fp4_weight(w: FP4Weight) -> FP4Weight:
    """The checkpoint layout of FP4 weights (the inverse of :func:`prepare_fp4_weight`; a checkpoint-layout
    weight is returned as it is, as uint8 views)."""
    w = _check_any_fp4(w)
    if w.layout == "checkpoint":
        return w
    c = w.data.reshape(*w.data.shape[:-1], -1, 4)
    s = torch.cat(((c >> 7) & 1, (c >> 3) & 1), -1)  # the signs of elements 0..3, then 4..7
    data = (c & 0x77) | (s[..., 0::2] << 3) | (s[..., 1::2] << 7)
    return FP4Weight(data.reshape(w.data.shape), w.scale)


def quantize_fp4_weight(w: torch.Tensor) -> FP4Weight:
    """Quantise [E, N, K] (or [N, K]) weights to packed FP4 e2m1 with e8m0 scales per 32 along K (host prep).

    Bit for bit :func:`tilev4.reference.quant.fp4_e2m1_quantize` (block 32) followed by
    :func:`~tilev4.reference.quant.pack_fp4` and :func:`~tilev4.reference.quant.e8m0_encode` — the format
    of the released checkpoint's expert weights. Runs one expert at a time (the reference makes several
    fp32 temporaries of the input's size).
    """
    from tilev4.reference.quant import e8m0_encode, fp4_e2m1_quantize, pack_fp4

    check_tensor("w", w, dtype=(torch.float32, torch.bfloat16))
    if w.ndim not in (2, 3):
        raise ValueError(f"w must be [E, N, K] or [N, K], got shape {tuple(w.shape)}")
    squeeze = w.ndim == 2
    w3 = w.unsqueeze(0) if squeeze else w
    e, n, k = w3.shape
    if k % SCALE_BLOCK:
        raise ValueError(f"w: K={k} must be a multiple of {SCALE_BLOCK}")
    data = torch.empty(e, n, k // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(e, n, k // FP4_BLOCK, dtype=torch.uint8, device=w.device)
    for i in range(e):
        v, s = fp4_e2m1_quantize(w3[i], FP4_BLOCK)  # [N, K] e2m1 values, [N, K/32] powers of two
        data[i] = pack_fp4(v)
        scale[i] = e8m0_encode(s)
    if squeeze:
        return FP4Weight(data[0], scale[0])
    return FP4Weight(data, scale)


def _shifts(w: FP4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e2m1 values [E, N, KB, 4, 32], shifts j [E, N, KB, 4], block scale exponents b_max [E, N, KB])."""
    from tilev4.reference.quant import unpack_fp4

    e, n, ks = w.scale.shape
    v = unpack_fp4(w.data).reshape(e, n, ks // GROUPS, GROUPS, FP4_BLOCK)
    b = w.scale.long().reshape(e, n, ks // GROUPS, GROUPS)
    b_max = b.amax(-1)
    return v, b_max[..., None] - b, b_max


def expand_fp4_weight(w: FP4Weight) -> torch.Tensor:
    """The weights as the FP4 kernels use them: fp32 [E, N, K] = ``rne_e4m3(v · 2^−j) · S`` (see the module
    docstring); equal to the dequantised weight whenever :func:`fp4_expansion_is_exact`. Either layout."""
    w = checkpoint_fp4_weight(w)
    v, j, b_max = _shifts(w)
    e, n = w.data.shape[:2]
    part = (v * torch.exp2(-j.float())[..., None]).to(torch.float8_e4m3fn).float()  # exact for j <= 8
    big = torch.exp2(b_max.float() - 127.0)[..., None, None]  # S, a power of two
    return (part * big).reshape(e, n, -1)


def fp4_expansion_is_exact(w: FP4Weight) -> bool:
    """True when every non-zero 32-group's scale is within ``2^8`` of its row's largest in the 128-K block,
    so that the kernels compute with exactly the dequantised weights (one host sync). Either layout."""
    w = checkpoint_fp4_weight(w)
    v, j, _ = _shifts(w)
    nonzero = (v != 0).any(-1)
    return not bool(((j > MAX_EXACT_SHIFT) & nonzero).any())


def _as_bytes(w: FP4Weight) -> FP4Weight:
    """The uint8 views of checkpoint dtypes (int8 packed data, float8_e8m0fnu scales): the same bytes."""
    return FP4Weight(w.data.view(torch.uint8), w.scale.view(torch.uint8), w.layout)


def _check_fp4_layout(name: str, w: object) -> FP4Weight:
    if not isinstance(w, FP4Weight):
        raise TypeError(f"{name} must be an FP4Weight(data, scale), got {type(w).__name__}")
    _is_prepared(w.layout, f"{name}.layout")
    check_tensor(f"{name}.data", w.data, dtype=_DATA_DTYPES, ndim=3, contiguous=True)
    e, n, kp = w.data.shape
    if (2 * kp) % SCALE_BLOCK:
        raise ValueError(f"{name}.data: K = 2·{kp} = {2 * kp} must be a multiple of {SCALE_BLOCK}")
    check_tensor(f"{name}.scale", w.scale, dtype=_SCALE_DTYPES, shape=(e, n, 2 * kp // FP4_BLOCK), contiguous=True,
                 device=w.data.device)
    return _as_bytes(w)


def _check_any_fp4(w: object) -> FP4Weight:
    """:func:`_check_fp4_layout` of a stacked [E, N, K/2] or a single [N, K/2] weight (uint8 views)."""
    if isinstance(w, FP4Weight) and isinstance(w.data, torch.Tensor) and isinstance(w.scale, torch.Tensor) \
            and w.data.ndim == 2 and w.scale.ndim == 2:
        one = _check_fp4_layout("w", FP4Weight(w.data[None], w.scale[None], w.layout))
        return FP4Weight(one.data[0], one.scale[0], one.layout)
    return _check_fp4_layout("w", w)


def _check_fp4_weight(name: str, w: object, e: int, n: int, k: int, device: torch.device) -> FP4Weight:
    """Check an FP4Weight of logical shape [e, n, k] on ``device``; returns its uint8 views."""
    if not isinstance(w, FP4Weight):
        raise TypeError(f"{name} must be an FP4Weight(data, scale), got {type(w).__name__}")
    _is_prepared(w.layout, f"{name}.layout")
    check_tensor(f"{name}.data", w.data, dtype=_DATA_DTYPES, shape=(e, n, k // 2), contiguous=True, device=device)
    check_tensor(f"{name}.scale", w.scale, dtype=_SCALE_DTYPES, shape=(e, n, k // FP4_BLOCK), contiguous=True,
                 device=device)
    check_aligned(f"{name}.data", w.data)
    check_aligned(f"{name}.scale", w.scale)
    return _as_bytes(w)


class _WordOps(NamedTuple):
    """The operations the expansion arithmetic needs beyond Python's operators, so that one definition
    (:func:`_group_shift`, :func:`_magnitude_table`, :func:`_e4m3_words`) builds both the kernel's expressions
    (:data:`_TL_OPS`) and the host emulation the CPU tests run over every code and shift."""

    u32: Callable[[int], Any]  # an unsigned 32-bit constant
    i32: Callable[[int], Any]  # a signed 32-bit constant
    max: Callable[[Any, Any], Any]
    min: Callable[[Any, Any], Any]
    byte_perm: Callable[[Any, Any, Any], Any]  # CUDA __byte_perm(x, y, s): byte i = byte s_i of the pair (y:x)
    e4m3_byte: Callable[[Any], Any]  # fp32 bit pattern -> its e4m3 byte (round to nearest even), as u32
    and_or: Callable[[Any, Any, Any], Any]  # (a & m) | b
    hi16: Callable[[Any], Any] = lambda x: x >> 16  # the upper half-word (the upper four selectors)


# (a & m) | b as one LOP3: ptxas left the expansion's sign merge as an AND and an OR (two instructions a word).
# PRMT and the shift of the upper selectors as PTX: __byte_perm masks each selector nibble to 3 bits itself (a LOP3
# per selector word), and the compiler rewrites (w & M) >> 16 as (w >> 16) & (M >> 16) (one mask more): with
# them a word's two selectors cost three instructions, here two (the mask, then the shift; sm_90a SASS)
AND_OR_SOURCE = """
__device__ __forceinline__ unsigned tilev4_and_or(unsigned a, unsigned m, unsigned b) {
  unsigned d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(m), "r"(b));
  return d;
}
__device__ __forceinline__ unsigned tilev4_prmt(unsigned x, unsigned y, unsigned s) {
  unsigned d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(x), "r"(y), "r"(s));
  return d;
}
__device__ __forceinline__ unsigned tilev4_hi16(unsigned x) {
  unsigned d;
  asm("shr.b32 %0, %1, 16;" : "=r"(d) : "r"(x));
  return d;
}
"""

_TL_OPS = _WordOps(
    T.uint32, T.int32, T.max, T.min,
    lambda x, y, sel: T.call_extern(T.uint32, "tilev4_prmt", x, y, sel),
    lambda bits: T.cast(T.reinterpret(T.cast(T.reinterpret(bits, T.float32), T.float8_e4m3fn), T.uint8), T.uint32),
    lambda a, m, b: T.call_extern(T.uint32, "tilev4_and_or", a, m, b),
    lambda x: T.call_extern(T.uint32, "tilev4_hi16", x),
)


def _import_sources(up: bool) -> None:
    """The device helpers an FP4 program calls: the expansion's LOP3 and PRMT (and silu's ex2 / rcp for the
    up-projection)."""
    T.import_source(FAST_SOURCE + AND_OR_SOURCE if up else AND_OR_SOURCE)


def _group_shift(sc: Any, g: Any, ops: _WordOps) -> tuple[Any, Any]:
    """(b_max, j) from the word ``sc`` of a row's four e8m0 bytes of a K block (group 0 lowest, int32): the largest
    byte and ``j = min(b_max − b_g, 20)`` of 32-group ``g``."""
    b = [(sc >> (8 * i)) & 255 for i in range(GROUPS)]
    b_max = ops.max(ops.max(b[0], b[1]), ops.max(b[2], b[3]))
    return b_max, ops.min(b_max - ((sc >> (8 * g)) & 255), SHIFT_CLAMP)


def _magnitude_table(j: Any, fast: bool, ops: _WordOps) -> tuple[Any, Any]:
    """The e4m3 bytes of rne(m_c · 2^−j) for the magnitudes m_c = 0, 0.5, 1, 1.5 | 2, 3, 4, 6 (c = 0 .. 7), as two
    little-endian words — a :func:`_e4m3_words` lookup table.

    ``fast`` (valid for ``j <= FAST_SHIFT``): the table at scale 1 with ``8·j`` taken off every non-zero byte
    (its exponent field; the smallest, 0.5 = 0x30, stays >= 0x08, normal, so no byte borrows). Otherwise (the
    rounding path, ``j <= 20``): each ``m_c · 2^−j`` as an fp32 bit pattern — c = 2e + m (e2m1 exponent e, mantissa
    m) is ``(252 + c) << 22`` for c >= 2 and 0.5 = ``252 << 22``; 2^−j lowers the exponent field, which stays
    positive — converted by the hardware."""
    if fast:
        return ops.u32(_E4M3_LO) - j * ops.u32(0x08080800), ops.u32(_E4M3_HI) - j * ops.u32(0x08080808)
    words = []
    for first in (0, 4):
        word = ops.u32(0)
        for byte in range(4):
            c = first + byte
            if c:  # c = 0 (the zero) stays 0x00
                bits = ops.i32((252 + c if c >= 2 else 252) << 22) - (j << 23)
                word = word | (ops.e4m3_byte(bits) << ops.u32(8 * byte))
        words.append(word)
    return words[0], words[1]


def _e4m3_words(w: Any, lo: Any, hi: Any, ops: _WordOps, prepared: bool = False) -> tuple[Any, Any]:
    """The e4m3 bytes of the eight codes of the packed word ``w`` (element 0 in the low nibble) through the table
    (lo, hi) of :func:`_magnitude_table`: two words, elements 0..3 and 4..7, element 0 in the low byte.

    The magnitudes are two byte permutes of the table with the indices ``w & 0x7777…`` (a selector nibble's top
    bit would sign-extend, so it is cleared; only the low 16 bits select). Checkpoint layout: the sign of element
    2b + 1 is bit 7 of byte b of ``w`` and that of element 2b bit 7 of byte b of ``w << 4``: a byte permute of that
    pair interleaves them (0x5140: bytes 0, 4, 1, 5 of (w:w << 4)) and a masked OR puts them on top — also on a
    zero, as the rounding of a negative value gives (the byte of −0 is 0x80). 9 instructions a word. ``prepared``
    (:func:`prepare_fp4_weight`): the signs of elements 0..3 are already bits 7 of the word's bytes and those of
    elements 4..7 bits 3, so the masked ORs take ``w`` and ``w << 4`` as they are: 7 instructions a word."""
    m = w & ops.u32(0x77777777)
    signs = ops.u32(0x80808080)
    ws = w << ops.u32(4)
    if prepared:
        return (ops.and_or(w, signs, ops.byte_perm(lo, hi, m)),
                ops.and_or(ws, signs, ops.byte_perm(lo, hi, ops.hi16(m))))
    return (ops.and_or(ops.byte_perm(ws, w, ops.u32(0x5140)), signs, ops.byte_perm(lo, hi, m)),
            ops.and_or(ops.byte_perm(ws, w, ops.u32(0x7362)), signs, ops.byte_perm(lo, hi, ops.hi16(m))))


def _loads_last(loads: int, compute: int, num_stages: int) -> tuple[list[int], list[int]]:
    """``T.Pipelined`` (order, stage) of a K-loop body of ``loads`` tile copies followed by ``compute`` statements:
    the copies of K block k + num_stages are issued after the compute of block k, into the buffers it has just
    released — num_stages buffers and blocks in flight, as in TileLang's automatic plan, which however issues each
    copy right after its own last reader (the expansion for the packed weights, the GEMM for the activations),
    each behind a barrier of its own. Issued together they share one: 3 (down) / 4 (up) barriers per K block
    instead of 5 / 7."""
    return [compute + i for i in range(loads)] + list(range(compute)), [0] * loads + [num_stages] * compute


def _expand_vec(rows: int, threads: int) -> int:
    """Packed bytes a thread expands per step for a [rows, 128] tile: 16 (a whole 32-group) when every thread gets
    at least one such step, else 8 (half a group), so that small tiles still keep all threads busy."""
    return 16 if rows * SCALE_BLOCK // 2 >= 16 * threads else 8


@T.macro
def _expand(q_shared, s_shared, b_shared, sw_shared, qw, ow, tab, k, BN, BK, off, threads, prepared):
    """b_shared[off + n, kk] = rne_e4m3(v[n, kk] · 2^−j), ``j = min(b_max − b_g, 20)`` (see the module docstring),
    for the packed tile q_shared [BN, BK/2] of K block k, and S = 2^(b_max − 127) of each row into
    sw_shared[off + n] (for the promotion).

    A thread takes VEC packed bytes (2·VEC elements of one 32-group, so one ``j``) per step: one 8/16-byte shared
    load of the codes, one 32-bit load of the row's four scale bytes, the step's magnitude table (the rounding
    path's, ``j >= 6``, behind a branch that is rarely taken and uniform over a 32-group), four byte permutes and
    two masked ORs per 8 elements, and one 16-byte store per 16 elements (b_shared's swizzle moves 16-byte pieces
    whole; a quarter warp's stores hit distinct banks). ``qw`` / ``ow`` / ``tab``: the thread's local words.
    """
    VEC = 4 * qw.shape[0]  # packed bytes per thread and step (_expand_vec)
    PARTS = BK // 2 // VEC  # steps per row
    STEPS = T.ceildiv(BN * PARTS, threads)
    s32 = T.view(s_shared, (BN, s_shared.shape[1] // GROUPS), T.uint32)  # a row's 4 scale bytes per K block
    qb = T.view(qw, (VEC,), T.uint8)
    ob = T.view(ow, (2 * VEC,), T.float8_e4m3fn)
    tx = T.get_thread_binding()
    for it in T.unroll(STEPS):
        idx = it * threads + tx
        if BN * PARTS % threads == 0 or idx < BN * PARTS:
            n = idx // PARTS
            part = idx % PARTS
            b_max, j = _group_shift(T.cast(s32[n, k], T.int32), part * VEC // (FP4_BLOCK // 2), _TL_OPS)
            if part == 0:
                sw_shared[off + n] = T.reinterpret(b_max << 23, T.float32)  # exact 2^(b - 127); b = 0 reads as 0
            if j <= FAST_SHIFT:
                tab[0], tab[1] = _magnitude_table(T.cast(j, T.uint32), True, _TL_OPS)
            else:
                tab[0], tab[1] = _magnitude_table(j, False, _TL_OPS)
            for v in T.vectorized(VEC):
                qb[v] = q_shared[n, part * VEC + v]
            for i in T.unroll(VEC // 4):
                ow[2 * i], ow[2 * i + 1] = _e4m3_words(qw[i], tab[0], tab[1], _TL_OPS, prepared)
            for h in T.unroll(VEC // 8):
                for v in T.vectorized(16):
                    b_shared[off + n, part * 2 * VEC + 16 * h + v] = ob[16 * h + v]


def _expansion_steps(BN: int, KS: int, PT: int, SRC: int, prepared: bool) -> tuple[Any, Any, Any]:
    """The macros ``(load_steps, convert_all, load_packed)`` of an expansion by ``PT`` threads (thread ``ptx`` of
    them) of the [BN, 64]-byte packed blocks of ``SRC`` weight sources into [BN, 128] e4m3 tiles: the first loads
    the packed bytes and scale words of a thread's steps of one source into registers, the second converts every
    source's steps, the third TMA-loads a K block of every source's packed bytes into a slot of the packed ring.
    Each thread takes ``BN·4/PT`` 16-byte steps (32-groups) a source and K block; ``load_steps`` with
    ``scales=False`` leaves the scale words to the caller."""
    CHUNKS = BN * GROUPS // PT  # steps of a thread, a source and K block
    NCH = SRC * CHUNKS  # steps of a thread per K block
    fp8 = T.float8_e4m3fn

    @T.macro
    def load_steps(q_s, s_s, src, ps, k, ptx, qv, sv, scales=True):
        """First phase of a K block's expansion, for weight source ``src``: each step's 16 packed bytes (from packed
        slot ``ps``) and its row's four scale bytes of K block ``k`` into registers — every load of the K block
        before any arithmetic, so that their latencies overlap."""
        s32 = T.view(s_s, (BN, KS // GROUPS), T.uint32) if scales else None  # a row's 4 scale bytes per K block
        qb = T.view(qv, (NCH * 16,), T.uint8)
        for it in T.unroll(CHUNKS):
            n = (it * PT + ptx) // GROUPS
            if scales:  # (else the caller has the step's scale word in sv)
                sv[src * CHUNKS + it] = s32[n, k]
            for v in T.vectorized(16):
                qb[(src * CHUNKS + it) * 16 + v] = q_s[ps, n, (ptx % GROUPS) * 16 + v]

    @T.macro
    def convert_steps(b_s, sw_s, src, slot, ptx, qv, sv, ow, tab, slow, rounding):
        """The e4m3 bytes of source ``src``'s steps into stage ``slot`` of its tile ``b_s`` (the arithmetic of
        :func:`_expand`). ``rounding=False``: every step with the fast table at ``min(j, FAST_SHIFT)`` — no branch,
        so that the steps interleave — with the rows' block scales into ``sw_s[slot]``, and ``slow`` set where a
        step's shift needs the rounding path; ``rounding=True``: those steps again with it (rare: a 128-K block whose
        scales spread past 2^5), overwriting their bytes."""
        ob = T.view(ow, (32,), fp8)
        part = ptx % GROUPS  # the 32-group: PT is a multiple of GROUPS
        for it in T.unroll(CHUNKS):
            c = src * CHUNKS + it
            n = (it * PT + ptx) // GROUPS
            b_max, j = _group_shift(T.cast(sv[c], T.int32), part, _TL_OPS)
            if rounding:
                if j > FAST_SHIFT:
                    tab[0], tab[1] = _magnitude_table(j, False, _TL_OPS)
                    for i in T.unroll(4):
                        ow[2 * i], ow[2 * i + 1] = _e4m3_words(qv[4 * c + i], tab[0], tab[1], _TL_OPS, prepared)
                    for h in T.unroll(2):
                        for v in T.vectorized(16):
                            b_s[slot, n, part * 32 + 16 * h + v] = ob[16 * h + v]
            else:
                if part == 0:
                    sw_s[slot, n] = T.reinterpret(b_max << 23, T.float32)  # exact 2^(b - 127)
                slow[0] = slow[0] | T.cast(j > FAST_SHIFT, T.int32)
                tab[0], tab[1] = _magnitude_table(T.cast(T.min(j, FAST_SHIFT), T.uint32), True, _TL_OPS)
                for i in T.unroll(4):
                    ow[2 * i], ow[2 * i + 1] = _e4m3_words(qv[4 * c + i], tab[0], tab[1], _TL_OPS, prepared)
                for h in T.unroll(2):
                    for v in T.vectorized(16):
                        b_s[slot, n, part * 32 + 16 * h + v] = ob[16 * h + v]

    @T.macro
    def convert_all(b_s, sw_s, slot, ptx, qv, sv, ow, tab, slow, rounding):
        """:func:`convert_steps` of every source's steps of a thread (each thread takes steps of every source)."""
        convert_steps(b_s[0], sw_s[0], 0, slot, ptx, qv, sv, ow, tab, slow, rounding)
        if SRC == 2:
            convert_steps(b_s[1], sw_s[1], 1, slot, ptx, qv, sv, ow, tab, slow, rounding)

    @T.macro
    def load_packed(qs_g, q_s, qfull, e, n0, k, ps):
        """K block ``k`` of the packed bytes of every source into packed slot ``ps``, then the producer's arrival."""
        KP = SCALE_BLOCK // 2  # packed bytes of a row and K block
        T.tma_copy(qs_g[0][e, n0:n0 + BN, k * KP:(k + 1) * KP], q_s[0][ps, :, :], barrier=qfull[ps])
        if SRC == 2:
            T.tma_copy(qs_g[1][e, n0:n0 + BN, k * KP:(k + 1) * KP], q_s[1][ps, :, :], barrier=qfull[ps])
        T.barrier_arrive(qfull[ps])

    return load_steps, convert_all, load_packed


def _grouped_prim_func(kind: str, schedule: str, K: int, dims: tuple, body: Any) -> Any:
    """The prim_func ``moe_{kind}_fp4_{schedule}`` with the ops' arguments around a builder's ``body`` macro (its
    arguments: activations and their scales, the weight sources' packed bytes and scales (lists), the routing
    weights, the output, the clamp and the tile tables); ``dims`` the dynamic (NR, N, E, MT) the body uses."""
    NR, N, E, MT = dims
    KB, KP, KS = K // SCALE_BLOCK, K // 2, K // FP4_BLOCK
    fp8 = T.float8_e4m3fn
    if kind == "up":

        def kernel(
            x8: T.Tensor[(NR, K), fp8],
            xs: T.Tensor[(NR, KB), T.float32],
            w_sorted: T.Tensor[(NR,), T.float32],
            w1: T.Tensor[(E, N, KP), T.uint8],
            w1s: T.Tensor[(E, N, KS), T.uint8],
            w3: T.Tensor[(E, N, KP), T.uint8],
            w3s: T.Tensor[(E, N, KS), T.uint8],
            offsets: T.Tensor[(E + 1,), T.int32],
            tile_offsets: T.Tensor[(E + 1,), T.int32],
            tile_info: T.Tensor[(MT, 4), T.int32],
            h: T.Tensor[(NR, N), T.bfloat16],
            limit: T.float32,
        ):
            body(x8, xs, [w1, w3], [w1s, w3s], w_sorted, h, limit, offsets, tile_offsets, tile_info)

    else:

        def kernel(
            h8: T.Tensor[(NR, K), fp8],
            hs: T.Tensor[(NR, KB), T.float32],
            w2: T.Tensor[(E, N, KP), T.uint8],
            w2s: T.Tensor[(E, N, KS), T.uint8],
            offsets: T.Tensor[(E + 1,), T.int32],
            tile_offsets: T.Tensor[(E + 1,), T.int32],
            tile_info: T.Tensor[(MT, 4), T.int32],
            y: T.Tensor[(NR, N), T.bfloat16],
        ):
            body(h8, hs, [w2], [w2s], None, y, None, offsets, tile_offsets, tile_info)

    kernel.__name__ = kernel.__qualname__ = f"moe_{kind}_fp4_{schedule}"  # TileLang names the program after it
    return T.prim_func(kernel)


SCHEDULES = ("ws", "pipelined", "swap")
# setmaxnreg of each producer and each consumer thread by producer warpgroups: with one, 64 + 2·216 <= 504 (the launch
# allocation of 384 threads); with two, 80 + 176 <= 256 (512 threads, 128 each)
WS_REGS = {1: (64, 216), 2: (80, 176)}
PRODUCER_BARRIER = 9  # named barrier of the producer threads (1, 2: the consumers' epilogues; 3+: TileLang's)


def _build_fp4_ws(kind: str, K: int, block_n: int, num_stages: int, packed_stages: int,
                  producer_warpgroups: int = 2, prepared: bool = False) -> Any:
    """Warp-specialised FP4 expert GEMM (``kind`` "up": SwiGLU epilogue, "down": bf16 out), grouped.

    A CTA computes one ``128 × block_n`` output tile (the tile table and launch order of every expert GEMM) with two
    consumer warpgroups and ``producer_warpgroups`` producer warpgroups:

    * **producers** (warpgroup 2 and up, :data:`WS_REGS`): keep ``packed_stages`` K blocks of packed e2m1 bytes in
      flight by TMA (``block_n × 64`` bytes a weight and K block) and load the tile's e8m0 scales once
      (``block_n × K/32`` bytes a weight). Per K block they wait until the consumers released the stage, TMA-load
      the FP8 activation rows into it (the second 64-row slab only when the tile has rows there; one elected
      thread issues every copy), then expand the packed block into the stage's swizzled e4m3 weight tile(s) with
      each row's block scale ``S`` beside them (the arithmetic of :func:`_expand`, 16 packed bytes a thread and
      step: every step's loads first, then the steps with the fast table and no branch, then — rarely — the steps
      whose shift needs the rounding path again), refill the packed slot they have read, fence the generic-proxy
      stores for the tensor cores and arrive on the stage's ``full`` barrier.
    * **consumers** (warpgroups 0 and 1): warpgroup ``w`` owns rows ``64·w ..`` of the tile. Per K block one FP8
      wgmma sequence a weight tile (W1 and W3, or W2) into scratch accumulators, then the exact power-of-two
      promotion ``acc += t · sx[row] · S[col]`` (the pipelined kernel's expression) and the stage's release.
      Then the epilogue of the bf16 ``ws`` kernels (:func:`tilev4.kernels.moe_ws.store_part`): staged in shared
      memory, TMA-stored when all 64 rows are valid.

    The expansion is the producers' bottleneck: a warp's steps are chains of dependent integer instructions, so
    what hides their latency is the number of expanding warps. On the H200 (V4-Flash dims; the session 35 log in
    ``benchmarks/logs/``) two producer warpgroups instead of one take 0.80 of the up-projection's time at
    8192 tokens and 0.86-0.87 elsewhere; with the expansion removed (an ablation) the kernels would take 0.56-0.64
    of one warpgroup's time. Two producer warpgroups leave 176 registers a consumer (512 threads): enough for the
    64 × 128 accumulator and scratch tile of either kernel, so ``block_n`` is 64 for the up-projection (two 64-row
    weight tiles) and 128 or 64 for the down-projection.

    The pipelined kernel stacks W1 over W3 in one B tile (one wgmma of n = 2·block_n, a fragment layout in which the
    SwiGLU's gate and up elements of an output are columns ``j`` and ``block_n + j`` of one accumulator: TileLang's
    layout inference rejects that pairing in a ``T.Parallel`` loop, hence two weight tiles here). The promotion is
    the pipelined kernel's expression, and the two give the same bits (see the module's tuning notes); each is
    batch-invariant (a row's sums do not depend on the other rows of its tile).
    """
    up = kind == "up"
    SRC = 2 if up else 1  # weight sources of a B tile: W1 and W3, or W2
    BN, BK, S, PS = block_n, SCALE_BLOCK, num_stages, packed_stages
    KB, KS = K // SCALE_BLOCK, K // FP4_BLOCK
    WG = 128  # threads of a warpgroup
    if producer_warpgroups not in WS_REGS:
        raise ValueError(f"producer_warpgroups must be one of {sorted(WS_REGS)}, got {producer_warpgroups}")
    PT = WG * producer_warpgroups  # producer threads (all of them expand)
    P_REGS, C_REGS = WS_REGS[producer_warpgroups]
    if block_n not in (32, 64, 128):
        raise ValueError(f"block_n must be 32, 64 or 128 for the ws FP4 kernels, got {block_n}")
    SS = BN * GROUPS  # 16-byte (32-group) expansion steps of a weight source and K block
    if SS % PT:
        # (splitting the producer threads by source instead puts TileLang's barriers into per-source branches,
        # where they take the consumers' barrier ids: a hang)
        raise ValueError(f"block_n={block_n}: the {SS} expansion steps of a weight tile and K block do not split "
                         f"evenly over {PT} producer threads (producer_warpgroups={producer_warpgroups})")
    NCH = SRC * SS // PT  # steps of a thread per K block
    NR, N, E, MT = (T.dynamic(n) for n in ("NR", "N", "E", "MT"))
    fp8 = T.float8_e4m3fn

    load_steps, convert_all, load_packed = _expansion_steps(BN, KS, PT, SRC, prepared)

    @T.macro
    def producer(a, qs_g, ss_g, a_s, q_s, s_s, b_s, sw_s, full, empty, qfull, e, row0, rows, n0, tx, qv, sv, ow, tab,
                 slow):
        T.set_max_nreg(P_REGS, 0)
        ptx = tx - 2 * WG
        for p in T.unroll(min(PS, KB)):
            load_packed(qs_g, q_s, qfull, e, n0, p, p)
        # the tile's scales, [BN, K/32] bytes of each source, by the producer's threads while the first packed
        # blocks are on their way (not by TMA: a row of K/32 bytes is not a multiple of 16 bytes for K < 512).
        # Python-level source index: a list of buffers cannot be indexed by a loop variable.
        T.copy(ss_g[0][e, n0:n0 + BN, 0:KS], s_s[0], disable_tma=True)
        if SRC == 2:
            T.copy(ss_g[1][e, n0:n0 + BN, 0:KS], s_s[1], disable_tma=True)
        T.sync_threads(barrier_id=PRODUCER_BARRIER, arrive_count=PT)
        for ki in T.serial(KB):
            slot = ki % S
            ps = ki % PS
            T.barrier_wait(empty[slot], ((ki // S) & 1) ^ 1)  # the consumers are done with the stage
            T.tma_copy(a[row0:row0 + HALF_M, ki * BK:(ki + 1) * BK], a_s[0][slot, :, :], barrier=full[slot])
            if rows > HALF_M:
                T.tma_copy(a[row0 + HALF_M:row0 + BLOCK_M, ki * BK:(ki + 1) * BK], a_s[1][slot, :, :],
                           barrier=full[slot])
            T.barrier_wait(qfull[ps], (ki // PS) & 1)
            load_steps(q_s[0], s_s[0], 0, ps, ki, ptx, qv, sv)
            if SRC == 2:
                load_steps(q_s[1], s_s[1], 1, ps, ki, ptx, qv, sv)
            T.sync_threads(barrier_id=PRODUCER_BARRIER, arrive_count=PT)  # every thread has read packed slot ps
            if ki + PS < KB:
                load_packed(qs_g, q_s, qfull, e, n0, ki + PS, ps)
            slow[0] = 0
            convert_all(b_s, sw_s, slot, ptx, qv, sv, ow, tab, slow, False)
            if slow[0] != 0:
                convert_all(b_s, sw_s, slot, ptx, qv, sv, ow, tab, slow, True)
            T.fence_proxy_async()  # the generic-proxy stores of the B tile, before the wgmma (async proxy) reads it
            T.barrier_arrive(full[slot])

    @T.macro
    def consumer(w, a_scale, wts, out, limit, a_s, b_s, sw_s, o_s, w_s, acc, t, cur, nxt, full, empty, tx, row0,
                 rows, n0):
        T.set_max_nreg(C_REGS, 1)
        rw = rows - w * HALF_M  # this warpgroup's valid rows (<= 0: none)
        r0 = row0 + w * HALF_M
        if rw > 0:
            T.clear(acc[0])
            if SRC == 2:
                T.clear(acc[1])
            for i in T.Parallel(HALF_M):
                nxt[i] = T.if_then_else(i < rw, a_scale[r0 + i, 0], 0.0)
        for ki in T.serial(KB):
            slot = ki % S
            T.barrier_wait(full[slot], (ki // S) & 1)
            if rw > 0:
                T.wgmma_gemm(a_s[slot, :, :], b_s[0][slot, :, :], t[0], transpose_B=True, clear_accum=True)
                if SRC == 2:
                    T.wgmma_gemm(a_s[slot, :, :], b_s[1][slot, :, :], t[1], transpose_B=True, clear_accum=True)
                for i in T.Parallel(HALF_M):
                    cur[i] = nxt[i]
                if ki + 1 < KB:  # the next K block's row scales load while this one runs
                    for i in T.Parallel(HALF_M):
                        nxt[i] = T.if_then_else(i < rw, a_scale[r0 + i, ki + 1], 0.0)
                T.wait_wgmma(0)
                for i, j in T.Parallel(HALF_M, BN):  # exact power-of-two rescale, fp32 sum (the pipelined order)
                    acc[0][i, j] += t[0][i, j] * cur[i] * sw_s[0][slot, j]
                if SRC == 2:
                    for i, j in T.Parallel(HALF_M, BN):
                        acc[1][i, j] += t[1][i, j] * cur[i] * sw_s[1][slot, j]
            if tx % 32 == 0:
                T.barrier_arrive(empty[slot])
        if rw > 0:
            if up:
                load_route_weights(rw, r0, wts, w_s)
            store_part(0, w, rw, r0, n0, out, limit, o_s, w_s, acc, N, BN, up)

    @T.macro
    def body(a, a_scale, qs_g, ss_g, wts, out, limit, offsets, tile_offsets, tile_info):
        with T.Kernel(MT * T.ceildiv(N, BN), threads=2 * WG + PT) as bx:
            _import_sources(up)
            a0_s = T.alloc_shared((S, HALF_M, BK), fp8)
            a1_s = T.alloc_shared((S, HALF_M, BK), fp8)
            b_s = shared_buffers("b_s", SRC, (S, BN, BK), fp8)  # the expanded weight tiles
            q_s = shared_buffers("q_s", SRC, (PS, BN, BK // 2), T.uint8)
            s_s = shared_buffers("s_s", SRC, (BN, KS), T.uint8)
            sw_s = shared_buffers("sw_s", SRC, (S, BN), T.float32)  # their rows' block scales S
            o0_s = T.alloc_shared((HALF_M, BN), T.bfloat16)
            o1_s = T.alloc_shared((HALF_M, BN), T.bfloat16)
            w0_s = T.alloc_shared((HALF_M,), T.float32) if up else None
            w1_s = T.alloc_shared((HALF_M,), T.float32) if up else None
            acc0 = [T.alloc_fragment((HALF_M, BN), T.float32) for _ in range(SRC)]  # (gate, up) or (y,)
            acc1 = [T.alloc_fragment((HALF_M, BN), T.float32) for _ in range(SRC)]
            t0 = [T.alloc_fragment((HALF_M, BN), T.float32) for _ in range(SRC)]  # a K block's FP8 sums
            t1 = [T.alloc_fragment((HALF_M, BN), T.float32) for _ in range(SRC)]
            cur0 = T.alloc_fragment((HALF_M,), T.float32)
            cur1 = T.alloc_fragment((HALF_M,), T.float32)
            nxt0 = T.alloc_fragment((HALF_M,), T.float32)
            nxt1 = T.alloc_fragment((HALF_M,), T.float32)
            qv = T.alloc_local((4 * NCH,), T.uint32)  # the packed bytes of a producer thread's steps (16 each)
            sv = T.alloc_local((NCH,), T.uint32)  # ... and the scale bytes of their rows
            ow = T.alloc_local((8,), T.uint32)  # a step's 32 e4m3 bytes
            tab = T.alloc_local((2,), T.uint32)  # the step's e4m3 bytes of the eight magnitudes
            slow = T.alloc_local((1,), T.int32)  # a step of this K block needs the rounding path
            full = T.alloc_barrier([PT] * S)  # the producer's threads (+ the A bytes)
            empty = T.alloc_barrier([8] * S)  # lane 0 of each consumer warp
            qfull = T.alloc_barrier([PT] * PS)  # the packed bytes of a K block
            T.annotate_layout({buf: make_swizzled_layout(buf) for buf in [a0_s, a1_s, *b_s, o0_s, o1_s]})
            NNT = T.ceildiv(N, BN)
            tx = T.get_thread_binding()
            e = T.alloc_var(T.int32, init=0)
            row0 = T.alloc_var(T.int32, init=0)
            rows = T.alloc_var(T.int32, init=0)
            n0 = T.alloc_var(T.int32, init=0)
            live = T.alloc_var(T.bool)
            _grouped_record(bx, NNT, tile_info, e, row0, rows, n0, live, BN)
            if live:  # CTAs past the real tiles exit
                if tx >= 2 * WG:
                    producer(a, qs_g, ss_g, [a0_s, a1_s], q_s, s_s, b_s, sw_s, full, empty, qfull, e, row0, rows,
                             n0, tx, qv, sv, ow, tab, slow)
                elif tx < WG:
                    consumer(0, a_scale, wts, out, limit, a0_s, b_s, sw_s, o0_s, w0_s, acc0, t0, cur0, nxt0, full,
                             empty, tx, row0, rows, n0)
                else:
                    consumer(1, a_scale, wts, out, limit, a1_s, b_s, sw_s, o1_s, w1_s, acc1, t1, cur1, nxt1, full,
                             empty, tx, row0, rows, n0)

    return _grouped_prim_func(kind, "ws", K, (NR, N, E, MT), body)


SWAP_ROWS = 8  # the swap schedule's rows of one wgmma (its N)
SWAP_GROUP = 16  # rows of the tile in one pass of the swap schedule's K loop
SWAP_BLOCK_N = 128  # weight rows (output columns) of a swap CTA: 64 a warpgroup
SWAP_CTAS = 3  # CTAs of the swap schedule an SM where its shared memory lets them (swap_ctas)
# the ops' swap schedule (packed ring depths: the up-projection's 2 keeps two CTAs an SM in shared memory, the
# down-projection's 4 three; every tunable given, so that the ops' swap configs never consult the tuned records of
# the ws schedule; the swap program reads schedule, block_n and packed_stages only)
SWAP_CONFIG = {kind: {"schedule": "swap", "block_n": SWAP_BLOCK_N, "packed_stages": stages, "num_stages": 4,
                      "threads": 256} for kind, stages in (("up", 2), ("down", 4))}
# ... and while the rows an expert gets on average are at most these: on the H200 (V4-Flash dims, the benchmark's
# routing; benchmarks/logs/, session 48) the swap programs took 0.57 / 0.71 of the ws programs' time (up / down) at 6
# rows an expert (256 tokens), 0.74 / 0.89 at 12, 0.95 / 1.13 at 18, 1.15 / 1.37 at 24 and 1.54 / 1.82 at 36
SWAP_MAX_ROWS_PER_EXPERT = {"up": 18, "down": 12}


def _swap_shared_bytes(kind: str, packed_stages: int) -> int:
    """Shared memory of a swap CTA: the pass's rows (two K blocks), each weight source's expanded tiles (two), packed
    ring and block scales, the rows' activation scales and routing weights."""
    src = 2 if kind == "up" else 1
    BN, BK = SWAP_BLOCK_N, SCALE_BLOCK
    return 2 * SWAP_GROUP * BK + src * (2 * BN * BK + packed_stages * BN * BK // 2 + 2 * BN * 4) \
        + 2 * SWAP_GROUP * 4 + BLOCK_M * 4


def swap_ctas(kind: str, packed_stages: int) -> int:
    """CTAs of the swap schedule an SM (its launch bounds): :data:`SWAP_CTAS`, or fewer where their shared memory
    (:func:`_swap_shared_bytes`, plus 1 KB a CTA the hardware keeps and 1 KB of alignment) exceeds the SM's 227 KB."""
    return max(1, min(SWAP_CTAS, 232448 // (_swap_shared_bytes(kind, packed_stages) + 2048)))


def _build_fp4_swap(kind: str, K: int, packed_stages: int, block_m: int = BLOCK_M,
                    block_n: int = SWAP_BLOCK_N, prepared: bool = False) -> Any:
    """FP4 expert GEMM for tiles of few rows (decode): the operands swapped, every thread expanding.

    The ``ws`` kernels run each 64-row slab as the M of an m64 wgmma, whatever it holds: at decode a tile has one or
    two rows, so the tensor cores do ~50x the useful work, and two of the four warpgroups (the consumers) wait while
    two expand. Here the weights are the M and the rows the N of the wgmma, in chunks of :data:`SWAP_ROWS`:
    ``tᵀ = W8[:, kb] · x8[rows, kb]ᵀ`` (m64 n8 k32), a chunk only where the tile has rows. The promotion is the ``ws``
    kernel's expression on the transposed tile, ``acc += t · sx[row] · S[col]``, and the FP8 tensor core sums each
    element as in the other orientation (measured on the H200, tested), so both schedules give the same bits and the
    choice between them cannot change a row's output (batch invariance).

    A CTA is two warpgroups and computes one ``128 × 128`` output tile of the tile table (:data:`SWAP_BLOCK_N` weight
    rows): warpgroup ``w`` runs the wgmma on weight rows ``64·w ..`` over every row of the tile, :data:`SWAP_GROUP`
    rows a pass (a tile of up to 16 rows, every decode tile, is one pass over K; each further pass expands the
    weights again, so the ops give tiles of many rows to the ``ws`` schedule: :func:`swap_config`). 128 weight rows a
    CTA rather than 64 give each thread twice the expansion per K block for the same barrier, waits, loads and loop
    (H200: 0.77-0.88 of the 64-row program's time). :func:`swap_ctas` CTAs an SM (few registers; the up-projection's
    two expanded sources take two CTAs' worth of shared memory). The passes are one flat loop of K blocks:

    * every thread takes two 16-byte expansion steps a weight source (the ``ws`` producers' arithmetic,
      :func:`_expansion_steps`) from a TMA ring of ``packed_stages`` packed K blocks; the scale words of its rows
      come through registers, loaded a K block ahead (0 past the weight rows: N need not be a multiple of 128); then
      a CTA-wide barrier;
    * warpgroup 1 issues every load: the packed bytes, the pass's activation rows of the next K block (TMA) and,
      a K block ahead through a register, their scales;
    * each warpgroup's first chunk's wgmma of a K block runs while it expands the next one, and is waited for and
      promoted just before the next barrier, with no condition on the wait (a tile has at least one row; ptxas
      serialises every wgmma of a kernel that waits in a divergent path). The other chunk waits at once.

    The expanded tiles, the activation rows and scales are double-buffered. The accumulators stay in registers and
    each pass stores its rows from them. ``block_n`` must be :data:`SWAP_BLOCK_N`; ``num_stages``, ``threads`` and
    ``producer_warpgroups`` are the other schedules'."""
    if block_m != BLOCK_M:
        raise ValueError(f"block_m must be {BLOCK_M} for the 'swap' schedule (the tile table's 128-row tiles), "
                         f"got {block_m}")
    if block_n != SWAP_BLOCK_N:
        raise ValueError(f"block_n must be {SWAP_BLOCK_N} for the 'swap' schedule (64 weight rows a warpgroup), "
                         f"got {block_n}")
    up = kind == "up"
    SRC = 2 if up else 1
    BN, HB, BK, PS, RN, GR = SWAP_BLOCK_N, HALF_M, SCALE_BLOCK, packed_stages, SWAP_ROWS, SWAP_GROUP
    KB, KS = K // SCALE_BLOCK, K // FP4_BLOCK
    WG = 128
    PT = 2 * WG  # every thread expands
    CH = BN * GROUPS // PT  # expansion steps of a thread, a source and K block (its rows: c·64 + tx / 4)
    NCH = SRC * CH
    CHUNK_IDS, SOURCE_IDS, STEP_IDS = tuple(range(GR // RN)), tuple(range(SRC)), tuple(range(CH))
    NR, N, E, MT = (T.dynamic(n) for n in ("NR", "N", "E", "MT"))
    fp8 = T.float8_e4m3fn
    load_steps, convert_all, load_packed = _expansion_steps(BN, KS, PT, SRC, prepared)

    @T.macro
    def load_rows(a, a_s, afull, row0, g, k, buf):
        """Pass ``g``'s rows of K block ``k`` into buffer ``buf`` (rows past the tile are read and never used)."""
        r = row0 + g * GR
        T.tma_copy(a[r:r + GR, k * BK:(k + 1) * BK], a_s[buf, :, :], barrier=afull[buf])
        T.barrier_arrive(afull[buf])

    def scale_of(a_scale, row0, rows, g, k, j):
        """Activation scale of row ``j`` (0 .. GR) of pass ``g`` in K block ``k``; 0 past the tile's rows."""
        return T.if_then_else(g * GR + j < rows, a_scale[row0 + g * GR + j, k], 0.0)

    def scale_word(s32g, s, e, n0, c, tx, k):
        """The four e8m0 bytes of K block ``k`` of the row of step ``c`` of thread ``tx``; 0 past the weight rows."""
        n = n0 + c * (PT // GROUPS) + tx // GROUPS
        return T.if_then_else(n < N, s32g[s][e, n, k], T.uint32(0))

    @T.macro
    def promote(c, w, acc, t, xs_s, sw_s, buf):
        for s in SOURCE_IDS:
            for n, i in T.Parallel(HB, RN):
                acc[c][s][n, i] += t[s][n, i] * xs_s[buf, c * RN + i] * sw_s[s][buf, w * HB + n]

    @T.macro
    def store(w, g, rows, acc, out, limit, w_s, row0, n0):
        for c in CHUNK_IDS:
            for n, i in T.Parallel(HB, RN):
                j = g * GR + c * RN + i  # the row in the tile
                col = n0 + w * HB + n
                if j < rows and col < N:
                    if up:
                        out[row0 + j, col] = T.cast(
                            silu(cap_keep_nan(acc[c][0][n, i], limit)) * clamp_keep_nan(acc[c][1][n, i], limit)
                            * w_s[j], T.bfloat16)
                    else:
                        out[row0 + j, col] = T.cast(acc[c][0][n, i], T.bfloat16)
            for s in SOURCE_IDS:
                T.clear(acc[c][s])

    @T.macro
    def part(w, a, a_scale, qs_g, s32g, out, limit, a_s, b_s, q_s, sw_s, xs_s, w_s, acc, t, tf, qfull, afull,
             tx, row0, rows, e, n0, qv, sv, sr, ow, tab, slow, xr, n_pass):
        NP = n_pass * KB
        for c in CHUNK_IDS:
            for s in SOURCE_IDS:
                T.clear(acc[c][s])
        for it in T.serial(n_pass * KB):
            g = it // KB
            ki = it % KB
            buf = it % 2
            ps = it % PS
            T.barrier_wait(qfull[ps], (it // PS) & 1)
            for s in SOURCE_IDS:  # this K block's scale words, loaded an iteration ago; the next one's now
                for c in STEP_IDS:
                    sv[s * CH + c] = sr[s * CH + c]
                    sr[s * CH + c] = scale_word(s32g, s, e, n0, c, tx, (ki + 1) % KB)
            load_steps(q_s[0], None, 0, ps, ki, tx, qv, sv, scales=False)
            if SRC == 2:
                load_steps(q_s[1], None, 1, ps, ki, tx, qv, sv, scales=False)
            slow[0] = 0
            convert_all(b_s, sw_s, buf, tx, qv, sv, ow, tab, slow, False)
            if slow[0] != 0:
                convert_all(b_s, sw_s, buf, tx, qv, sv, ow, tab, slow, True)
            T.wait_wgmma(0)  # the first chunk of the previous K block (unconditional: see _build_fp4_swap)
            if it > 0:
                promote(0, w, acc, tf, xs_s, sw_s, 1 - buf)
            if T.And(ki == 0, it > 0):  # the previous pass is complete
                store(w, g - 1, rows, acc, out, limit, w_s, row0, n0)
            T.fence_proxy_async()  # the generic-proxy stores of the weight tiles, before the wgmma reads them
            T.sync_threads()
            if w == 1:  # warpgroup 1 issues every load
                if it + PS < NP:
                    load_packed(qs_g, q_s, qfull, e, n0, (it + PS) % KB, ps)
                if it + 1 < NP:
                    load_rows(a, a_s, afull, row0, (it + 1) // KB, (it + 1) % KB, 1 - buf)
                    if tx - WG < GR:
                        xs_s[1 - buf, tx - WG] = xr[0]
                        if it + 2 < NP:
                            xr[0] = scale_of(a_scale, row0, rows, (it + 2) // KB, (it + 2) % KB, tx - WG)
            T.barrier_wait(afull[buf], (it // 2) & 1)
            for s in SOURCE_IDS:  # [HB, BK] @ [BK, RN] -> [HB, RN]: this warpgroup's weight rows
                T.wgmma_gemm(b_s[s][buf, w * HB:(w + 1) * HB, :], a_s[buf, 0:RN, :], tf[s], transpose_B=True,
                             clear_accum=True)
            for c in CHUNK_IDS[1:]:
                if g * GR + c * RN < rows:
                    for s in SOURCE_IDS:
                        T.wgmma_gemm(b_s[s][buf, w * HB:(w + 1) * HB, :], a_s[buf, c * RN:(c + 1) * RN, :], t[s],
                                     transpose_B=True, clear_accum=True)
                    T.wait_wgmma(0)
                    promote(c, w, acc, t, xs_s, sw_s, buf)
        T.wait_wgmma(0)  # the first chunk of the last K block
        promote(0, w, acc, tf, xs_s, sw_s, (n_pass * KB - 1) % 2)
        store(w, n_pass - 1, rows, acc, out, limit, w_s, row0, n0)

    @T.macro
    def body(a, a_scale, qs_g, ss_g, wts, out, limit, offsets, tile_offsets, tile_info):
        with T.Kernel(MT * T.ceildiv(N, BN), threads=PT) as bx:
            T.annotate_min_blocks_per_sm(swap_ctas(kind, packed_stages))
            T.annotate_pass_configs({"tl.disable_thread_storage_sync": True, "tl.disable_buffer_init_check": True,
                                     **_NO_WS})
            _import_sources(up)
            a_s = T.alloc_shared((2, GR, BK), fp8)  # a pass's rows
            b_s = shared_buffers("b_s", SRC, (2, BN, BK), fp8)  # the expanded weight tiles
            q_s = shared_buffers("q_s", SRC, (PS, BN, BK // 2), T.uint8)
            sw_s = shared_buffers("sw_s", SRC, (2, BN), T.float32)  # their rows' block scales S
            xs_s = T.alloc_shared((2, GR), T.float32)  # the pass's rows' activation scales of a K block
            w_s = T.alloc_shared((BLOCK_M,), T.float32) if up else None
            acc0 = [[T.alloc_fragment((HB, RN), T.float32) for _ in range(SRC)] for _ in CHUNK_IDS]
            acc1 = [[T.alloc_fragment((HB, RN), T.float32) for _ in range(SRC)] for _ in CHUNK_IDS]
            t0 = [T.alloc_fragment((HB, RN), T.float32) for _ in range(SRC)]
            t1 = [T.alloc_fragment((HB, RN), T.float32) for _ in range(SRC)]
            tf0 = [T.alloc_fragment((HB, RN), T.float32) for _ in range(SRC)]
            tf1 = [T.alloc_fragment((HB, RN), T.float32) for _ in range(SRC)]
            xr = T.alloc_local((1,), T.float32)
            qv = T.alloc_local((4 * NCH,), T.uint32)
            sv = T.alloc_local((NCH,), T.uint32)
            sr = T.alloc_local((NCH,), T.uint32)
            s32g = [T.view(g, (E, N, KS // GROUPS), T.uint32) for g in ss_g]
            ow = T.alloc_local((8,), T.uint32)
            tab = T.alloc_local((2,), T.uint32)
            slow = T.alloc_local((1,), T.int32)
            qfull = T.alloc_barrier([WG] * PS)
            afull = T.alloc_barrier([WG] * 2)
            T.annotate_layout({buf: make_swizzled_layout(buf) for buf in [a_s, *b_s]})
            NNT = T.ceildiv(N, BN)
            tx = T.get_thread_binding()
            e = T.alloc_var(T.int32, init=0)
            row0 = T.alloc_var(T.int32, init=0)
            rows = T.alloc_var(T.int32, init=0)
            n0 = T.alloc_var(T.int32, init=0)
            live = T.alloc_var(T.bool)
            _grouped_record(bx, NNT, tile_info, e, row0, rows, n0, live, BN)
            if live:
                n_pass = T.ceildiv(rows, GR)
                if tx >= WG:
                    for p in T.unroll(PS):
                        if p < n_pass * KB:
                            load_packed(qs_g, q_s, qfull, e, n0, p % KB, p)
                    load_rows(a, a_s, afull, row0, 0, 0, 0)
                for s in SOURCE_IDS:
                    for c in STEP_IDS:
                        sr[s * CH + c] = scale_word(s32g, s, e, n0, c, tx, 0)
                for j in T.Parallel(GR):
                    xs_s[0, j] = scale_of(a_scale, row0, rows, 0, 0, j)
                if T.And(tx >= WG, tx - WG < GR):
                    xr[0] = scale_of(a_scale, row0, rows, 1 // KB, 1 % KB, tx - WG)
                if up:
                    for i in T.Parallel(BLOCK_M):
                        w_s[i] = T.if_then_else(i < rows, wts[row0 + i], 0.0)
                T.sync_threads()
                if tx < WG:
                    part(0, a, a_scale, qs_g, s32g, out, limit, a_s, b_s, q_s, sw_s, xs_s, w_s, acc0, t0, tf0, qfull,
                         afull, tx, row0, rows, e, n0, qv, sv, sr, ow, tab, slow, xr, n_pass)
                else:
                    part(1, a, a_scale, qs_g, s32g, out, limit, a_s, b_s, q_s, sw_s, xs_s, w_s, acc1, t1, tf1, qfull,
                         afull, tx, row0, rows, e, n0, qv, sv, sr, ow, tab, slow, xr, n_pass)

    return _grouped_prim_func(kind, "swap", K, (NR, N, E, MT), body)


@register("moe_up_fp4", configs=[{"dim": 4096}, {"dim": 4096, "layout": "prepared"}],
          tags=("moe", "fp4", "batch_invariant"), space=MOE_UP_FP4_SPACE, bucket=up_bucket, harness=MOE_UP_FP4_HARNESS)
def build_moe_up_fp4(dim: int, block_m: int = BLOCK_M, block_n: int = 64, num_stages: int = 4, threads: int = 256,
                     schedule: str = "ws", packed_stages: int = 4, producer_warpgroups: int = 2,
                     layout: str = "checkpoint"):
    """MoE grouped up-projection, FP4 weights (expanded to FP8) × FP8 activations, SwiGLU and weight fused.
    ``schedule``: "ws" (:func:`_build_fp4_ws`: ``packed_stages`` K blocks of packed bytes in flight,
    ``producer_warpgroups`` expanding them), "pipelined" (every thread copies, expands and computes in turn;
    ``threads``) or "swap" (:func:`_build_fp4_swap`: tiles of few rows, the rows as the wgmma's N; the ops take it
    for decode-sized batches, :func:`swap_config`). ``layout``: the weights' :attr:`FP4Weight.layout` (the ops
    pass it for prepared weights)."""
    if dim % SCALE_BLOCK:
        raise ValueError(f"dim={dim} must be a multiple of {SCALE_BLOCK}")
    check_ws_schedule(schedule, block_m, SCHEDULES)
    prepared = _is_prepared(layout)
    if schedule == "ws":
        return _build_fp4_ws("up", dim, block_n, num_stages, packed_stages, producer_warpgroups, prepared)
    if schedule == "swap":
        return _build_fp4_swap("up", dim, packed_stages, block_m, block_n, prepared)
    # One GEMM per K block with B = [W1 rows; W3 rows] (2·block_n rows): the accumulator holds gate in its
    # first block_n columns and up in the others — two fp32 tiles of [BM, 2·BN] (acc, t) instead of the
    # three [BM, BN] tiles of two GEMMs, which with the promotion's column scales did not fit 255 registers.
    BM, BN, BK = block_m, block_n, SCALE_BLOCK
    D, KB, KP, KS = dim, dim // SCALE_BLOCK, dim // 2, dim // FP4_BLOCK
    NR, I, E, MT = (T.dynamic(n) for n in ("NR", "I", "E", "MT"))
    policy = T.GemmWarpPolicy.FullRow
    fp8 = T.float8_e4m3fn
    order, stage = _loads_last(3, 5, num_stages)  # x8, W1, W3 | sx, expand W1, expand W3, GEMM, promotion

    @T.prim_func
    def moe_up_fp4_kernel(
        x8: T.Tensor[(NR, D), fp8],
        xs: T.Tensor[(NR, KB), T.float32],
        w_sorted: T.Tensor[(NR,), T.float32],
        w1: T.Tensor[(E, I, KP), T.uint8],
        w1s: T.Tensor[(E, I, KS), T.uint8],
        w3: T.Tensor[(E, I, KP), T.uint8],
        w3s: T.Tensor[(E, I, KS), T.uint8],
        offsets: T.Tensor[(E + 1,), T.int32],
        tile_offsets: T.Tensor[(E + 1,), T.int32],
        tile_info: T.Tensor[(MT, 4), T.int32],
        h: T.Tensor[(NR, I), T.bfloat16],
        limit: T.float32,
    ):
        T.annotate_pass_configs(_PASS_CONFIGS)
        with T.Kernel(MT * T.ceildiv(I, BN), threads=threads) as bx:
            _import_sources(True)
            a_shared = T.alloc_shared((BM, BK), fp8)
            q1_shared = T.alloc_shared((BN, BK // 2), T.uint8)
            q3_shared = T.alloc_shared((BN, BK // 2), T.uint8)
            s1_shared = T.alloc_shared((BN, KS), T.uint8)
            s3_shared = T.alloc_shared((BN, KS), T.uint8)
            b_shared = T.alloc_shared((2 * BN, BK), fp8)  # rows [0, BN): W1, rows [BN, 2·BN): W3
            sw_shared = T.alloc_shared((2 * BN,), T.float32)
            c_shared = T.alloc_shared((BM, 2 * BN), T.float32)
            w_shared = T.alloc_shared((BM,), T.float32)
            acc = T.alloc_fragment((BM, 2 * BN), T.float32)  # [gate | up]
            t_frag = T.alloc_fragment((BM, 2 * BN), T.float32)
            sx = T.alloc_fragment((BM,), T.float32)
            qw = T.alloc_local((_expand_vec(BN, threads) // 4,), T.uint32)  # the packed bytes of an expansion step
            ow = T.alloc_local((_expand_vec(BN, threads) // 2,), T.uint32)  # ... and their e4m3 bytes
            tab = T.alloc_local((2,), T.uint32)  # the step's e4m3 bytes of the eight magnitudes
            e = T.alloc_var(T.int32)
            a0 = T.alloc_var(T.int32)
            c = T.alloc_var(T.int32)
            row0 = T.alloc_var(T.int32)
            rows = T.alloc_var(T.int32)
            n0 = T.alloc_var(T.int32)
            if bx // T.ceildiv(I, BN) < tile_offsets[E]:  # CTAs past the real tiles exit
                _grouped_tile(bx, T.ceildiv(I, BN), tile_info, tile_offsets, offsets, e, a0, c, row0, rows, n0,
                              BM, BN)
                for i in T.Parallel(BM):
                    w_shared[i] = T.if_then_else(i < rows, w_sorted[row0 + i], 0.0)
                T.copy(w1s[e, n0, 0], s1_shared, disable_tma=True)  # [BN, K/32] e8m0: the tile's scales, loaded once
                T.copy(w3s[e, n0, 0], s3_shared, disable_tma=True)
                T.clear(acc)
                for k in T.Pipelined(KB, order=order, stage=stage):
                    T.copy(x8[row0, k * BK], a_shared, disable_tma=True)  # rows past NR read as 0 (cp.async zero-fill)
                    T.copy(w1[e, n0, k * (BK // 2)], q1_shared, disable_tma=True)  # [BN, 64] packed e2m1
                    T.copy(w3[e, n0, k * (BK // 2)], q3_shared, disable_tma=True)
                    for i in T.Parallel(BM):  # the row's activation scale of this K block (a power of two)
                        sx[i] = T.if_then_else(row0 + i < NR, xs[row0 + i, k], 0.0)
                    _expand(q1_shared, s1_shared, b_shared, sw_shared, qw, ow, tab, k, BN, BK, 0, threads, prepared)
                    _expand(q3_shared, s3_shared, b_shared, sw_shared, qw, ow, tab, k, BN, BK, BN, threads, prepared)
                    # [BM, BK] @ [BK, 2·BN] -> [BM, 2·BN]
                    T.gemm(a_shared, b_shared, t_frag, transpose_B=True, policy=policy, clear_accum=True)
                    for i, j in T.Parallel(BM, 2 * BN):  # promote: exact power-of-two rescale, fp32 sum
                        acc[i, j] += t_frag[i, j] * sx[i] * sw_shared[j]
                T.copy(acc, c_shared, disable_tma=True)
                for i, j in T.Parallel(BM, BN):  # as the bf16 kernel: NaN kept
                    g = cap_keep_nan(c_shared[i, j], limit)
                    u = clamp_keep_nan(c_shared[i, BN + j], limit)
                    if i < rows:
                        h[row0 + i, n0 + j] = T.cast(silu(g) * u * w_shared[i], T.bfloat16)

    return moe_up_fp4_kernel


@register("moe_down_fp4", configs=[{"inter": 2048}, {"inter": 2048, "layout": "prepared"}],
          tags=("moe", "fp4", "batch_invariant"), space=MOE_DOWN_FP4_SPACE, bucket=down_bucket,
          harness=MOE_DOWN_FP4_HARNESS)
def build_moe_down_fp4(inter: int, block_m: int = BLOCK_M, block_n: int = 128, num_stages: int = 4,
                       threads: int = 256, schedule: str = "ws", packed_stages: int = 4, producer_warpgroups: int = 2,
                       layout: str = "checkpoint"):
    """MoE grouped down-projection, FP4 weights (expanded to FP8) × FP8 activations: y = h·W2ᵀ (bf16 out).
    ``schedule``, ``packed_stages``, ``producer_warpgroups`` and ``layout``: as for :func:`build_moe_up_fp4`."""
    if inter % SCALE_BLOCK:
        raise ValueError(f"inter={inter} must be a multiple of {SCALE_BLOCK}")
    check_ws_schedule(schedule, block_m, SCHEDULES)
    prepared = _is_prepared(layout)
    if schedule == "ws":
        return _build_fp4_ws("down", inter, block_n, num_stages, packed_stages, producer_warpgroups, prepared)
    if schedule == "swap":
        return _build_fp4_swap("down", inter, packed_stages, block_m, block_n, prepared)
    BM, BN, BK = block_m, block_n, SCALE_BLOCK
    I, KB, KP, KS = inter, inter // SCALE_BLOCK, inter // 2, inter // FP4_BLOCK
    NR, D, E, MT = (T.dynamic(n) for n in ("NR", "D", "E", "MT"))
    policy = T.GemmWarpPolicy.FullRow
    fp8 = T.float8_e4m3fn
    order, stage = _loads_last(2, 4, num_stages)  # h8, W2 | sx, expand, GEMM, promotion

    @T.prim_func
    def moe_down_fp4_kernel(
        h8: T.Tensor[(NR, I), fp8],
        hs: T.Tensor[(NR, KB), T.float32],
        w2: T.Tensor[(E, D, KP), T.uint8],
        w2s: T.Tensor[(E, D, KS), T.uint8],
        offsets: T.Tensor[(E + 1,), T.int32],
        tile_offsets: T.Tensor[(E + 1,), T.int32],
        tile_info: T.Tensor[(MT, 4), T.int32],
        y: T.Tensor[(NR, D), T.bfloat16],
    ):
        T.annotate_pass_configs(_PASS_CONFIGS)
        with T.Kernel(MT * T.ceildiv(D, BN), threads=threads) as bx:
            _import_sources(False)
            a_shared = T.alloc_shared((BM, BK), fp8)
            q_shared = T.alloc_shared((BN, BK // 2), T.uint8)
            s_shared = T.alloc_shared((BN, KS), T.uint8)
            b_shared = T.alloc_shared((BN, BK), fp8)
            sw_shared = T.alloc_shared((BN,), T.float32)
            acc = T.alloc_fragment((BM, BN), T.float32)
            t_frag = T.alloc_fragment((BM, BN), T.float32)
            sx = T.alloc_fragment((BM,), T.float32)
            qw = T.alloc_local((_expand_vec(BN, threads) // 4,), T.uint32)  # the packed bytes of an expansion step
            ow = T.alloc_local((_expand_vec(BN, threads) // 2,), T.uint32)  # ... and their e4m3 bytes
            tab = T.alloc_local((2,), T.uint32)  # the step's e4m3 bytes of the eight magnitudes
            e = T.alloc_var(T.int32)
            a0 = T.alloc_var(T.int32)
            c = T.alloc_var(T.int32)
            row0 = T.alloc_var(T.int32)
            rows = T.alloc_var(T.int32)
            n0 = T.alloc_var(T.int32)
            if bx // T.ceildiv(D, BN) < tile_offsets[E]:
                _grouped_tile(bx, T.ceildiv(D, BN), tile_info, tile_offsets, offsets, e, a0, c, row0, rows, n0,
                              BM, BN)
                T.copy(w2s[e, n0, 0], s_shared, disable_tma=True)  # [BN, K/32] e8m0: the tile's scales, loaded once
                T.clear(acc)
                for k in T.Pipelined(KB, order=order, stage=stage):
                    T.copy(h8[row0, k * BK], a_shared, disable_tma=True)
                    T.copy(w2[e, n0, k * (BK // 2)], q_shared, disable_tma=True)  # [BN, 64] packed e2m1
                    for i in T.Parallel(BM):
                        sx[i] = T.if_then_else(row0 + i < NR, hs[row0 + i, k], 0.0)
                    _expand(q_shared, s_shared, b_shared, sw_shared, qw, ow, tab, k, BN, BK, 0, threads, prepared)
                    T.gemm(a_shared, b_shared, t_frag, transpose_B=True, policy=policy, clear_accum=True)
                    for i, j in T.Parallel(BM, BN):  # [BM, BK] @ [BK, BN], promoted per row and column
                        acc[i, j] += t_frag[i, j] * sx[i] * sw_shared[j]
                for i, j in T.Parallel(BM, BN):
                    if i < rows:
                        y[row0 + i, n0 + j] = T.cast(acc[i, j], T.bfloat16)

    return moe_down_fp4_kernel


def _check_act(name: str, q: object, s: object, n: int, k: int, device: torch.device) -> None:
    check_tensor(name, q, dtype=torch.float8_e4m3fn, shape=(n, k), contiguous=True, device=device)
    check_tensor(f"{name} scale", s, dtype=torch.float32, shape=(n, k // SCALE_BLOCK), contiguous=True,
                 device=device)
    check_aligned(name, q)


def swap_config(kind: str, num_rows: int, num_experts: int, block_m: int = BLOCK_M) -> dict[str, Any]:
    """The config keys the FP4 ops add for ``num_rows`` sorted rows over ``num_experts`` experts: the swap schedule
    (:data:`SWAP_CONFIG`) while the rows an expert gets on average are at most ``kind``'s
    :data:`SWAP_MAX_ROWS_PER_EXPERT`, else none (the tuned schedule); none for a tile table of other than 128-row tiles
    (the swap kernel's). The schedules give the same bits, so the choice cannot change a row's output (and the up- and
    down-projections of one batch may take different ones)."""
    if kind not in SWAP_CONFIG:
        raise ValueError(f"kind must be one of {sorted(SWAP_CONFIG)}, got {kind!r}")
    if block_m != BLOCK_M or not 0 < num_rows <= SWAP_MAX_ROWS_PER_EXPERT[kind] * num_experts:
        return {}
    return dict(SWAP_CONFIG[kind])


def layout_config(weights: dict[str, FP4Weight]) -> dict[str, Any]:
    """The config key the FP4 ops add for their weights' layout: ``{"layout": "prepared"}`` for prepared weights,
    none for the checkpoint layout (the factories' default). The weights of one call must share a layout."""
    layouts = {name: w.layout for name, w in weights.items()}
    if len(set(layouts.values())) > 1:
        raise ValueError(f"the FP4 weights of one call must share a layout, got {layouts}")
    return {"layout": "prepared"} if "prepared" in layouts.values() else {}


FP4_FORMAT = QuantFormat("FP4", FP4Weight, _check_fp4_weight, _check_act, "moe_up_fp4", "moe_down_fp4",
                         inter_multiple=SCALE_BLOCK, rows_config=swap_config, weight_config=layout_config)


def moe_up_fp4(
    perm: MoEPermutation,
    x8: torch.Tensor,
    x_scale: torch.Tensor,
    w1: FP4Weight,
    w3: FP4Weight,
    swiglu_limit: float | None = 10.0,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped FP4-weight up-projection with the SwiGLU fused (the FP4 form of :func:`tilev4.kernels.moe.moe_up`).

    Runs the swap schedule while an expert gets at most :data:`SWAP_MAX_ROWS_PER_EXPERT` rows on average (decode
    batches: :func:`swap_config`), else the tuned one; both give the same bits.

    Args:
        perm: the permutation (:func:`tilev4.kernels.moe.moe_permute`); N = its sorted rows.
        x8, x_scale: the sorted rows quantised 1×128, [N, dim] float8_e4m3fn and [N, dim/128] fp32:
            ``fp8_quantize(perm.x_sorted)``, or for a permutation of FP8 rows (``moe_permute(payload=x8_tokens)``)
            ``perm.x_sorted`` and the token scales gathered by ``perm.sorted_tokens``.
        w1, w3: :class:`FP4Weight` of [E, inter, dim] (data [E, inter, dim/2] uint8, scale [E, inter, dim/32]
            uint8 e8m0); dim and inter multiples of 128; both in the checkpoint layout or both prepared
            (:func:`prepare_fp4_weight`: the same bits, faster).
        swiglu_limit: the routed-expert clamp, or None.
        out: optional preallocated [N, inter] bf16.

    Returns:
        h [N, inter] bf16 in sorted-row order.
    """
    return grouped_up(FP4_FORMAT, perm, x8, x_scale, w1, w3, swiglu_limit, out)


def moe_down_fp4(
    perm: MoEPermutation,
    h8: torch.Tensor,
    h_scale: torch.Tensor,
    w2: FP4Weight,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped FP4-weight down-projection ``y = h W2ᵀ`` per expert (the FP4 form of ``moe_down``); the schedule is
    chosen as for :func:`moe_up_fp4`.

    Args:
        perm: the permutation; N = its sorted rows.
        h8, h_scale: ``fp8_quantize(h)``: [N, inter] float8_e4m3fn and [N, inter/128] fp32.
        w2: :class:`FP4Weight` of [E, dim, inter] (data [E, dim, inter/2], scale [E, dim, inter/32]);
            inter a multiple of 128; either layout (prepared: faster).
        out: optional preallocated [N, dim] bf16.

    Returns:
        y [N, dim] bf16 in sorted-row order.
    """
    return grouped_down(FP4_FORMAT, perm, h8, h_scale, w2, out)
