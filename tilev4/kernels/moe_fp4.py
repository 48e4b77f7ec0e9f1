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

The e4m3 bytes are made four at a time (a thread takes two packed bytes — four consecutive elements of
one 32-group, so one ``j``): for ``j <= 5`` every non-zero ``v · 2^−j`` is a normal e4m3 number, whose byte
is the byte of ``|v|`` (a ``__byte_perm`` lookup of the magnitude indices in the 8-byte table of
0, 0.5, 1, 1.5, 2, 3, 4, 6) with ``8·j`` taken off its exponent field (``__vsubus4``: 0 stays 0) and the
sign bit set (a second ``__byte_perm``); for ``j >= 6`` (subnormal results, rounding) each element's fp32
bit pattern of ``v · 2^−j`` is built with integer operations (``j`` clamped to 20, past which everything
rounds to 0 anyway, so that the exponent field stays positive) and converted by the hardware
(``cvt.rn.satfinite.e4m3x2.f32``: round to nearest even). A 32-bit store writes the four bytes.

Kernels (schedule, tile → expert map and batch invariance exactly as the bf16 and FP8 kernels):

* ``moe_up_fp4`` — ``h = silu(min(x W1ᵀ, l)) · clamp(x W3ᵀ, ±l) · w`` → bf16. A CTA computes 64 columns of
  h: its B tile stacks 64 rows of W1 over the same 64 rows of W3, so one [128, 128] FP8 GEMM per K block
  gives gate and up side by side: two fp32 [128, 128] register tiles (accumulator and block sum) where the
  FP8 kernel's layout — two GEMMs, three tiles — plus the column scales spilled past 255 registers.
* ``moe_down_fp4`` — ``y = h W2ᵀ`` → bf16, from ``h`` quantised 1×128 (a separate
  :func:`tilev4.fp8_quantize` launch).

Layouts: ``FP4Weight(data, scale)`` with data [E, N, K/2] uint8 (two e2m1 codes per byte, the low nibble
holds the even element; a code is sign bit 8 | magnitude index 0..7 into 0, 0.5, 1, 1.5, 2, 3, 4, 6) and
scale [E, N, K/32] uint8 e8m0 bytes (``2^(byte − 127)``; byte 255, e8m0's NaN, is not expected; byte 0,
``2^−127``, is read as 0 — :func:`quantize_fp4_weight` never writes either); the checkpoint's int8 data and
float8_e8m0fnu scales are taken as the same bytes. K (dim for the up projection,
inter for the down projection) is a multiple of 128 and static (a kernel per size).

Tuning notes: every CTA that reads a weight tile expands it again (the M tiles of an expert each do), ~5
integer instructions per element on the fast path, serialised with the (synchronous) FP8 wgmma of the K
block: prefill, compute-bound, should run slower than with FP8 weights; decode, weight-bandwidth-bound,
reads half the bytes of FP8. 184 / 187 registers a thread (up / down), no spills (ptxas, sm_90a). Tuned
(:mod:`tilev4.kernels.moe_tuning`): ``block_n`` (up 64 / 32: its B tile is 2·block_n rows; down 128 / 64) and
``num_stages``; ``block_m`` is the permutation's (a problem key).

Dimension glossary: NR sorted rows (T·k), D dim, I inter, E experts, MT max M tiles, KB = K/128,
KP = K/2 packed bytes, KS = K/32 scales.
"""

from typing import NamedTuple

import tilelang.language as T
import torch

from tilev4._checks import check_tensor
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
from tilev4.kernels.registry import register

__all__ = ["FP4Weight", "build_moe_down_fp4", "build_moe_up_fp4", "expand_fp4_weight", "fp4_expansion_is_exact",
           "moe_down_fp4", "moe_up_fp4", "quantize_fp4_weight"]

SCALE_BLOCK = 128  # K block of the FP8 tensor-core sum and of the promotion (as for FP8 weights)
FP4_BLOCK = 32  # K elements per e8m0 weight scale
GROUPS = SCALE_BLOCK // FP4_BLOCK  # scales per row and K block
MAX_EXACT_SHIFT = 8  # v · 2^-j is exact in e4m3 for every e2m1 value v when j <= 8
SHIFT_CLAMP = 20  # j past 12 rounds everything to 0; clamping keeps the fp32 exponent field positive
FAST_SHIFT = 5  # j <= 5 keeps every non-zero v · 2^-j a normal e4m3 number (0.5 · 2^-5 = 2^-6, exponent field 1)
_E4M3_LO, _E4M3_HI = 0x3C383000, 0x4C484440  # e4m3 bytes of 0, 0.5, 1, 1.5 | 2, 3, 4, 6 (little-endian)
_DATA_DTYPES = (torch.uint8, torch.int8)  # the checkpoint stores the packed bytes as int8
_SCALE_DTYPES = (torch.uint8, torch.float8_e8m0fnu)  # ... and the scales as float8_e8m0fnu
_PASS_CONFIGS = {**_NO_WS, "tl.disable_tma_lower": True}  # cp.async software pipeline (see moe.py)


class FP4Weight(NamedTuple):
    """Stacked FP4 expert weights: data [E, N, K/2] uint8 (low nibble = even element), scale [E, N, K/32]
    uint8 e8m0 bytes. The checkpoint's dtypes (int8 data, float8_e8m0fnu scales) are accepted as the same
    bytes."""

    data: torch.Tensor
    scale: torch.Tensor


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
    docstring); equal to the dequantised weight whenever :func:`fp4_expansion_is_exact`."""
    w = _check_fp4_layout("w", w)
    v, j, b_max = _shifts(w)
    e, n = w.data.shape[:2]
    part = (v * torch.exp2(-j.float())[..., None]).to(torch.float8_e4m3fn).float()  # exact for j <= 8
    big = torch.exp2(b_max.float() - 127.0)[..., None, None]  # S, a power of two
    return (part * big).reshape(e, n, -1)


def fp4_expansion_is_exact(w: FP4Weight) -> bool:
    """True when every non-zero 32-group's scale is within ``2^8`` of its row's largest in the 128-K block,
    so that the kernels compute with exactly the dequantised weights (one host sync)."""
    w = _check_fp4_layout("w", w)
    v, j, _ = _shifts(w)
    nonzero = (v != 0).any(-1)
    return not bool(((j > MAX_EXACT_SHIFT) & nonzero).any())


def _as_bytes(w: FP4Weight) -> FP4Weight:
    """The uint8 views of checkpoint dtypes (int8 packed data, float8_e8m0fnu scales): the same bytes."""
    return FP4Weight(w.data.view(torch.uint8), w.scale.view(torch.uint8))


def _check_fp4_layout(name: str, w: object) -> FP4Weight:
    if not isinstance(w, FP4Weight):
        raise TypeError(f"{name} must be an FP4Weight(data, scale), got {type(w).__name__}")
    check_tensor(f"{name}.data", w.data, dtype=_DATA_DTYPES, ndim=3, contiguous=True)
    e, n, kp = w.data.shape
    if (2 * kp) % SCALE_BLOCK:
        raise ValueError(f"{name}.data: K = 2·{kp} = {2 * kp} must be a multiple of {SCALE_BLOCK}")
    check_tensor(f"{name}.scale", w.scale, dtype=_SCALE_DTYPES, shape=(e, n, 2 * kp // FP4_BLOCK), contiguous=True,
                 device=w.data.device)
    return _as_bytes(w)


def _check_fp4_weight(name: str, w: object, e: int, n: int, k: int, device: torch.device) -> FP4Weight:
    """Check an FP4Weight of logical shape [e, n, k] on ``device``; returns its uint8 views."""
    if not isinstance(w, FP4Weight):
        raise TypeError(f"{name} must be an FP4Weight(data, scale), got {type(w).__name__}")
    check_tensor(f"{name}.data", w.data, dtype=_DATA_DTYPES, shape=(e, n, k // 2), contiguous=True, device=device)
    check_tensor(f"{name}.scale", w.scale, dtype=_SCALE_DTYPES, shape=(e, n, k // FP4_BLOCK), contiguous=True,
                 device=device)
    _check_aligned(f"{name}.data", w.data)
    _check_aligned(f"{name}.scale", w.scale)
    return _as_bytes(w)


def _check_aligned(name: str, t: torch.Tensor) -> None:
    """The kernels load rows in 16-byte pieces (the row strides are multiples of 16 through the shapes)."""
    if t.data_ptr() % 16:
        raise ValueError(f"{name} must start at a 16-byte aligned address, got storage offset {t.storage_offset()}")


@T.macro
def _scale_block(s_shared, smax_shared, sw_shared, k, BN, off):
    """Per weight row n of the tile: the largest e8m0 byte b_max of K block k and S = 2^(b_max − 127), stored
    at row off + n."""
    for n in T.Parallel(BN):
        g0 = k * GROUPS
        b = T.max(T.max(T.cast(s_shared[n, g0], T.int32), T.cast(s_shared[n, g0 + 1], T.int32)),
                  T.max(T.cast(s_shared[n, g0 + 2], T.int32), T.cast(s_shared[n, g0 + 3], T.int32)))
        smax_shared[off + n] = b
        sw_shared[off + n] = T.reinterpret(b << 23, T.float32)  # exact 2^(b - 127) for b >= 1; b = 0 reads as 0


@T.macro
def _expand(q_shared, s_shared, smax_shared, b_shared, k, BN, BK, off):
    """b_shared[off + n, kk] = rne_e4m3(v[n, kk] · 2^-j), j = b_max[n] − b[n, kk // 32] (see the module
    docstring), for the packed tile q_shared [BN, BK/2] of K block k; a thread makes 4 elements at a time."""
    for n, g in T.Parallel(BN, BK // 4):
        j = T.min(smax_shared[off + n] - T.cast(s_shared[n, k * GROUPS + g // (FP4_BLOCK // 4)], T.int32),
                  SHIFT_CLAMP)
        # the codes of elements 4g .. 4g+3, one nibble each (sign bit 8 | magnitude 0..7), element 4g lowest
        p16 = T.cast(q_shared[n, 2 * g], T.uint32) | (T.cast(q_shared[n, 2 * g + 1], T.uint32) << 8)
        # j <= 5: the four e4m3 bytes at once — the magnitudes' bytes at scale 1 by a byte permute of the table
        # (0, 0.5, 1, 1.5, 2, 3, 4, 6), 8·j off each exponent field (saturating: 0 stays 0; the others stay
        # normal), the sign bits on top
        mags = T.call_extern(T.uint32, "__byte_perm", T.uint32(_E4M3_LO), T.uint32(_E4M3_HI), p16 & T.uint32(0x7777))
        signs = T.call_extern(T.uint32, "__byte_perm", T.uint32(0x8000), T.uint32(0),
                              (p16 >> T.uint32(3)) & T.uint32(0x1111))
        word = T.call_extern(T.uint32, "__vsubus4", mags, T.cast(j, T.uint32) * T.uint32(0x08080808)) | signs
        for i in T.vectorized(4):
            fast = T.cast((word >> T.cast(8 * i, T.uint32)) & T.uint32(255), T.uint8)
            # j >= 6 (subnormal results, rounding past 8): the fp32 bits of |v|·2^-j, converted by the hardware.
            # Magnitude index c = 2e + m (e2m1 exponent e, mantissa m) is ((126 + e) << 23 | m << 22) =
            # (252 + c) << 22 for e >= 1; c = 1 is 0.5 = 252 << 22; 2^-j lowers the exponent field
            code = T.cast((p16 >> T.cast(4 * i, T.uint32)) & T.uint32(15), T.int32)
            mag = code & 7
            bits = T.if_then_else(mag >= 2, (252 + mag) << 22, 252 << 22) - (j << 23)
            a = T.if_then_else(mag == 0, T.float32(0), T.reinterpret(bits, T.float32))
            b_shared[off + n, 4 * g + i] = T.if_then_else(
                j <= FAST_SHIFT, T.reinterpret(fast, T.float8_e4m3fn),
                T.cast(T.if_then_else(code >= 8, -a, a), T.float8_e4m3fn))


@register("moe_up_fp4", configs=[{"dim": 4096}], tags=("moe", "fp4", "batch_invariant"), space=MOE_UP_FP4_SPACE,
          bucket=up_bucket, harness=MOE_UP_FP4_HARNESS)
def build_moe_up_fp4(dim: int, block_m: int = BLOCK_M, block_n: int = 64, num_stages: int = 3, threads: int = 256):
    """MoE grouped up-projection, FP4 weights (expanded to FP8) × FP8 activations, SwiGLU and weight fused."""
    if dim % SCALE_BLOCK:
        raise ValueError(f"dim={dim} must be a multiple of {SCALE_BLOCK}")
    # One GEMM per K block with B = [W1 rows; W3 rows] (2·block_n rows): the accumulator holds gate in its
    # first block_n columns and up in the others — two fp32 tiles of [BM, 2·BN] (acc, t) instead of the
    # three [BM, BN] tiles of two GEMMs, which with the promotion's column scales did not fit 255 registers.
    BM, BN, BK = block_m, block_n, SCALE_BLOCK
    D, KB, KP, KS = dim, dim // SCALE_BLOCK, dim // 2, dim // FP4_BLOCK
    NR, I, E, MT = (T.dynamic(n) for n in ("NR", "I", "E", "MT"))
    policy = T.GemmWarpPolicy.FullRow
    fp8 = T.float8_e4m3fn

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
        tile_expert: T.Tensor[(MT,), T.int32],
        h: T.Tensor[(NR, I), T.bfloat16],
        limit: T.float32,
    ):
        T.annotate_pass_configs(_PASS_CONFIGS)
        with T.Kernel(MT * T.ceildiv(I, BN), threads=threads) as bx:
            a_shared = T.alloc_shared((BM, BK), fp8)
            q1_shared = T.alloc_shared((BN, BK // 2), T.uint8)
            q3_shared = T.alloc_shared((BN, BK // 2), T.uint8)
            s1_shared = T.alloc_shared((BN, KS), T.uint8)
            s3_shared = T.alloc_shared((BN, KS), T.uint8)
            b_shared = T.alloc_shared((2 * BN, BK), fp8)  # rows [0, BN): W1, rows [BN, 2·BN): W3
            smax_shared = T.alloc_shared((2 * BN,), T.int32)
            sw_shared = T.alloc_shared((2 * BN,), T.float32)
            c_shared = T.alloc_shared((BM, 2 * BN), T.float32)
            w_shared = T.alloc_shared((BM,), T.float32)
            acc = T.alloc_fragment((BM, 2 * BN), T.float32)  # [gate | up]
            t_frag = T.alloc_fragment((BM, 2 * BN), T.float32)
            sx = T.alloc_fragment((BM,), T.float32)
            e = T.alloc_var(T.int32)
            a0 = T.alloc_var(T.int32)
            c = T.alloc_var(T.int32)
            row0 = T.alloc_var(T.int32)
            rows = T.alloc_var(T.int32)
            n0 = T.alloc_var(T.int32)
            if bx // T.ceildiv(I, BN) < tile_offsets[E]:  # CTAs past the real tiles exit
                _grouped_tile(bx, T.ceildiv(I, BN), tile_expert, tile_offsets, offsets, e, a0, c, row0, rows, n0,
                              BM, BN)
                for i in T.Parallel(BM):
                    w_shared[i] = T.if_then_else(i < rows, w_sorted[row0 + i], 0.0)
                T.copy(w1s[e, n0, 0], s1_shared)  # [BN, K/32] e8m0: the tile's scales, loaded once
                T.copy(w3s[e, n0, 0], s3_shared)
                T.clear(acc)
                for k in T.Pipelined(KB, num_stages=num_stages):
                    T.copy(x8[row0, k * BK], a_shared)  # rows past NR read as 0 (zero-filling cp.async)
                    T.copy(w1[e, n0, k * (BK // 2)], q1_shared)  # [BN, 64] packed e2m1
                    T.copy(w3[e, n0, k * (BK // 2)], q3_shared)
                    for i in T.Parallel(BM):  # the row's activation scale of this K block (a power of two)
                        sx[i] = T.if_then_else(row0 + i < NR, xs[row0 + i, k], 0.0)
                    _scale_block(s1_shared, smax_shared, sw_shared, k, BN, 0)
                    _scale_block(s3_shared, smax_shared, sw_shared, k, BN, BN)
                    _expand(q1_shared, s1_shared, smax_shared, b_shared, k, BN, BK, 0)
                    _expand(q3_shared, s3_shared, smax_shared, b_shared, k, BN, BK, BN)
                    # [BM, BK] @ [BK, 2·BN] -> [BM, 2·BN]
                    T.gemm(a_shared, b_shared, t_frag, transpose_B=True, policy=policy, clear_accum=True)
                    for i, j in T.Parallel(BM, 2 * BN):  # promote: exact power-of-two rescale, fp32 sum
                        acc[i, j] += t_frag[i, j] * sx[i] * sw_shared[j]
                T.copy(acc, c_shared)
                for i, j in T.Parallel(BM, BN):  # as the bf16 kernel: selects keep NaN
                    g = T.if_then_else(c_shared[i, j] > limit, limit, c_shared[i, j])
                    u = T.if_then_else(c_shared[i, BN + j] > limit, limit,
                                       T.if_then_else(c_shared[i, BN + j] < -limit, -limit, c_shared[i, BN + j]))
                    if i < rows:
                        h[row0 + i, n0 + j] = T.cast(g / (1.0 + T.exp(-g)) * u * w_shared[i], T.bfloat16)

    return moe_up_fp4_kernel


@register("moe_down_fp4", configs=[{"inter": 2048}], tags=("moe", "fp4", "batch_invariant"),
          space=MOE_DOWN_FP4_SPACE, bucket=down_bucket, harness=MOE_DOWN_FP4_HARNESS)
def build_moe_down_fp4(inter: int, block_m: int = BLOCK_M, block_n: int = 128, num_stages: int = 4,
                       threads: int = 256):
    """MoE grouped down-projection, FP4 weights (expanded to FP8) × FP8 activations: y = h·W2ᵀ (bf16 out)."""
    if inter % SCALE_BLOCK:
        raise ValueError(f"inter={inter} must be a multiple of {SCALE_BLOCK}")
    BM, BN, BK = block_m, block_n, SCALE_BLOCK
    I, KB, KP, KS = inter, inter // SCALE_BLOCK, inter // 2, inter // FP4_BLOCK
    NR, D, E, MT = (T.dynamic(n) for n in ("NR", "D", "E", "MT"))
    policy = T.GemmWarpPolicy.FullRow
    fp8 = T.float8_e4m3fn

    @T.prim_func
    def moe_down_fp4_kernel(
        h8: T.Tensor[(NR, I), fp8],
        hs: T.Tensor[(NR, KB), T.float32],
        w2: T.Tensor[(E, D, KP), T.uint8],
        w2s: T.Tensor[(E, D, KS), T.uint8],
        offsets: T.Tensor[(E + 1,), T.int32],
        tile_offsets: T.Tensor[(E + 1,), T.int32],
        tile_expert: T.Tensor[(MT,), T.int32],
        y: T.Tensor[(NR, D), T.bfloat16],
    ):
        T.annotate_pass_configs(_PASS_CONFIGS)
        with T.Kernel(MT * T.ceildiv(D, BN), threads=threads) as bx:
            a_shared = T.alloc_shared((BM, BK), fp8)
            q_shared = T.alloc_shared((BN, BK // 2), T.uint8)
            s_shared = T.alloc_shared((BN, KS), T.uint8)
            b_shared = T.alloc_shared((BN, BK), fp8)
            smax_shared = T.alloc_shared((BN,), T.int32)
            sw_shared = T.alloc_shared((BN,), T.float32)
            acc = T.alloc_fragment((BM, BN), T.float32)
            t_frag = T.alloc_fragment((BM, BN), T.float32)
            sx = T.alloc_fragment((BM,), T.float32)
            e = T.alloc_var(T.int32)
            a0 = T.alloc_var(T.int32)
            c = T.alloc_var(T.int32)
            row0 = T.alloc_var(T.int32)
            rows = T.alloc_var(T.int32)
            n0 = T.alloc_var(T.int32)
            if bx // T.ceildiv(D, BN) < tile_offsets[E]:
                _grouped_tile(bx, T.ceildiv(D, BN), tile_expert, tile_offsets, offsets, e, a0, c, row0, rows, n0,
                              BM, BN)
                T.copy(w2s[e, n0, 0], s_shared)  # [BN, K/32] e8m0: the tile's scales, loaded once
                T.clear(acc)
                for k in T.Pipelined(KB, num_stages=num_stages):
                    T.copy(h8[row0, k * BK], a_shared)
                    T.copy(w2[e, n0, k * (BK // 2)], q_shared)  # [BN, 64] packed e2m1
                    for i in T.Parallel(BM):
                        sx[i] = T.if_then_else(row0 + i < NR, hs[row0 + i, k], 0.0)
                    _scale_block(s_shared, smax_shared, sw_shared, k, BN, 0)
                    _expand(q_shared, s_shared, smax_shared, b_shared, k, BN, BK, 0)
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
    _check_aligned(name, q)


FP4_FORMAT = QuantFormat("FP4", FP4Weight, _check_fp4_weight, _check_act, "moe_up_fp4", "moe_down_fp4",
                         inter_multiple=SCALE_BLOCK)


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

    Args:
        perm: the permutation (:func:`tilev4.kernels.moe.moe_permute`); N = its sorted rows.
        x8, x_scale: ``fp8_quantize(perm.x_sorted)``: [N, dim] float8_e4m3fn and [N, dim/128] fp32.
        w1, w3: :class:`FP4Weight` of [E, inter, dim] (data [E, inter, dim/2] uint8, scale [E, inter, dim/32]
            uint8 e8m0); dim and inter multiples of 128.
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
    """Grouped FP4-weight down-projection ``y = h W2ᵀ`` per expert (the FP4 form of ``moe_down``).

    Args:
        perm: the permutation; N = its sorted rows.
        h8, h_scale: ``fp8_quantize(h)``: [N, inter] float8_e4m3fn and [N, inter/128] fp32.
        w2: :class:`FP4Weight` of [E, dim, inter] (data [E, dim, inter/2], scale [E, dim, inter/32]);
            inter a multiple of 128.
        out: optional preallocated [N, dim] bf16.

    Returns:
        y [N, dim] bf16 in sorted-row order.
    """
    return grouped_down(FP4_FORMAT, perm, h8, h_scale, w2, out)
