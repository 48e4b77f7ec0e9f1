"""Fused compressor kernels: gated m-to-1 pooling → rmsnorm → RoPE → cache quantisation, written into the cache.

Semantics (``shared/spec/deepseek-v4.md``, "Compressor" and "Quantisation";
:mod:`tilev4.reference.compressor` is the fp32 reference). A token at position ``t`` has the projected
rows ``kv'`` and ``g`` (width ``C = coff·D``) and the score ``g + ape[t % m]``. Entry ``i`` pools, per
channel, a softmax over positions of the score weighting ``kv'``:

* m = 128 (coff 1): the tokens ``128i … 128i+127``, all D channels;
* m = 4 (coff 2): the previous block ``4i−4 … 4i−1`` through channels ``[:D]`` and the current block
  ``4i … 4i+3`` through ``[D:]``, one softmax over the 8 (entry 0: the previous half is masked);

then ``rmsnorm(weight, eps=1e-6)`` → RoPE on the last ``rope_dim`` (64) dims at position ``i·m`` → the
quantisation simulation of the cache (``quant``): ``"attention"`` FP8 e4m3 on ``[:D−64]`` in blocks of 64
with power-of-two (ue8m0) scales; ``"indexer"`` the Hadamard rotation of all D dims (scale ``D^-1/2``),
then FP4 e2m1 in blocks of 32 with power-of-two scales; ``"none"`` nothing. The entry is written to
``cache[b, i]``.

Cache layout: ``cache`` [b, n_c, D], bf16 (default) or fp32, entry ``i`` of sequence ``b`` in row
``cache[b, i]`` — what :func:`tilev4.kernels.attention.csa_attention` / ``hca_attention`` read as
``kv_compressed`` and what :class:`tilev4.model.cache.KVCache` keeps (fp32 there). The stored values are
the dequantised ones: an FP8 (or FP4) value times its power-of-two scale is exact in bf16, so a bf16 cache
loses nothing on the quantised dims and rounds only the 64 rope dims to bf16 (as the production layout
stores them).

Streaming state: the reference's :class:`~tilev4.reference.compressor.CompressorState` — fp32 ``kv`` and
``score`` [b, m, C] rows of the incomplete block (row r = offset r; unseen rows 0 / −inf), for m = 4 also
``prev_kv`` / ``prev_score`` [b, m, C] of the previous complete block, and ``num_tokens`` int64 [b].
:func:`compress_prefill` continues each sequence from its own ``num_tokens`` (a ragged start is allowed,
unlike the reference) and returns a new state; :func:`compress_decode` appends one token per sequence and
updates the state in place (no allocation: it can be captured in a CUDA graph).

Exactness: a prefill and the decode steps that produce the same entry load the same fp32 values
(``float(kv)``, ``float(g) + ape``: one fp32 add, the same in both) and reduce them with the same code in
the same order, compiled without FMA contraction (``-fmad=false``, so neither program can fuse an
expression the other rounds twice), so prefill-then-decode gives the SAME BITS as one long prefill, and an
entry never depends on the other sequences or on the batch size (batch-invariant). Against the fp32 reference the pooled
values differ by fp32 rounding (the softmax is evaluated as ``Σ e^{s−M}·kv / Σ e^{s−M}`` in chunks, the
Hadamard transform as a butterfly), which can move a quantised value by one quantum of its format.

Dimension glossary: ``b`` batch, ``n`` new tokens per sequence, ``m`` ratio (4 or 128), ``coff`` 2 for
m = 4 else 1, ``D`` entry dim (512 attention, 128 indexer), ``C = coff·D``, ``n_c`` cache rows,
``R`` rope dims (64), ``P`` pooled positions (8 for m = 4, 128 for m = 128).

Thread layout: a thread owns 8 consecutive channels of an entry (one 16-byte bf16 load per row), so an
entry takes ``TPE = D/8`` lanes (64 for D = 512, 16 for D = 128); RoPE pairs and the 8-channel slices of
the quantisation blocks lie inside a thread, block maxima, the rmsnorm sum (a butterfly, then the entry's
warps in order) and the Hadamard butterflies across lanes use warp shuffles. For m = 4 an entry pools 8
rows in two chunks of 4; for m = 128 an entry pools 2 row groups of 64 rows each (chunks of 4 rows),
combined in shared memory in group order (H200, s = 65536: 0.67 of copy BW against 0.62 with 4 groups of 32
rows and 0.62 with 1 group of 128 — more rows a thread keeps more loads in flight an SM, fewer groups a
shorter combine). The RoPE angles of an entry are computed once each (``sincosf``: one
argument reduction for both), spread over the lanes of the warp that holds the rope dims, and gathered by
shuffles. A cross-lane Hadamard stage is ``fma(y, ±1, y_partner)`` (the add's rounding in one instruction) and
the FP4 rounding one ``rint`` at the step of the value's binade. On the H200 these three took the indexer
variant's prefill from 0.49 to 0.59 of copy BW; its pooling alone (no finish, no ``ape``) runs at ~0.64, and
the m = 128 variant is bound by its row loads (neither its finish, ``ape``, more warps an SM, two chunks in
flight a thread, an L2 prefetch of later chunks nor interleaved row groups moved it past 0.68). These fractions
were timed after a flush that WROTE the L2 full of dirty lines; with the benchmarks' read flush (whose lines the
kernel need not write back) the same programs reach 0.92 (m = 4), 0.78 (m = 128) and 0.70 (indexer). The pooling
shape is fixed per (m, D), shared by prefill and decode, which is what makes the two bit-identical. The
weights ``2^x`` are ``ex2.approx.ftz`` and the pooled ``num / den`` is ``__fdividef``, in both programs.

Prefill schedules (same bits):

* ``"direct"``: a CTA pools ``block_entries`` entries; each thread loads its chunk's rows from global memory
  with no branch around the loads, so that they are all in flight at once. An entry whose rows are all new
  tokens (every entry but a sequence's first one or two) takes a path with neither the clamp to the first new
  token nor the state loads (380 instead of 553 instructions a 4-row chunk for m = 128); the others load the
  rows before the first new token from the state after the clamped loads.
* ``"stream"`` (the default): the one or two *head* entries of a sequence (those with a row before its first
  new token, read from the state) run as above in their own CTA; every other (*body*) CTA pools
  ``block_entries · entry_steps`` consecutive entries, the row chunks of ``block_entries`` entries at a time
  copied by ``cp.async`` into a ``num_stages``-deep shared-memory ring (a step's rows are one contiguous run,
  or for m = 128 one run per row group), registers capped so that 512 threads fit an SM.

A prefill grid has one extra CTA per sequence that writes the new streaming state.

Configs (compile-time keys): ``ratio``, ``D``, ``quant`` (``"attention"``, ``"indexer"`` with D <= 256,
``"none"``), ``in_dtype`` of kv'/gate and ``out_dtype`` of the cache (``"bfloat16"`` default, or
``"float32"``), ``rope_dim`` (64). Shipped (built ahead of time): bf16 in/out for (m=4, D=512, attention),
(m=128, D=512, attention), (m=4, D=128, indexer); other combinations compile on first use. Sequence counts
and lengths are dynamic.

Tuning: ``block_entries``, the entries (prefill) or sequences (decode) one CTA handles, and the prefill's
``schedule``, ``num_stages`` and ``entry_steps`` (:data:`COMPRESSOR_PREFILL_SPACE`,
:data:`COMPRESSOR_DECODE_SPACE`), one bucket per (m, D). The pooling shape (see above) is not tunable: prefill
and decode must share it. An entry's arithmetic does not depend on the other entries of its CTA nor on the
schedule, so a tuned config keeps every bit (prefill ≡ decode, batch invariance).
"""

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import tilelang.language as T
import torch

from tilev4._checks import check_aligned, check_int, check_same_device, check_tensor
from tilev4._fastmath import EX2_SOURCE, LOG2E, ex2  # the pooling's exponentials in base 2
from tilev4.autotune.harness import TuningCase, TuningHarness
from tilev4.autotune.space import Space
from tilev4.kernels.quant import pow2_scale_bits
from tilev4.kernels.registry import compile_kernel, register
from tilev4.reference.compressor import CompressorState
from tilev4.reference.rope import RopeConfig, rope_frequencies

__all__ = [
    "COMPRESSOR_DECODE_SPACE",
    "COMPRESSOR_PREFILL_SPACE",
    "build_compressor_decode",
    "build_compressor_prefill",
    "compress_decode",
    "compress_prefill",
]

VEC = 8  # channels per thread: one 16-byte bf16 load per row
RMS_EPS = 1e-6
FP8_MAX, FP8_BLOCK, FP8_AMAX_FLOOR = 448.0, 64, 1e-4
FP4_MAX, FP4_BLOCK, FP4_AMAX_FLOOR = 6.0, 32, 6.0 * 2.0**-126
QUANTS = ("attention", "indexer", "none")
RATIOS = (4, 128)
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_COMPRESSED_ROPE = RopeConfig.compressed()
# No FMA contraction (nvcc -fmad=false): every product and sum is rounded on its own, as in the fp32 reference,
# so that the prefill and decode programs cannot fuse the same expression differently (their bit equality
# rests on it). The kernels are memory-bound: the extra instructions cost nothing measurable.
_PASS_CONFIGS = {"tl.device_compile_flags": ["-fmad=false"]}
_STREAM_PASS_CONFIGS = {"tl.disable_warp_specialized": True}  # the ring's copies are cp.async (disable_tma)


SINCOS_SOURCE = """
__device__ __forceinline__ void tilev4_sincos(float x, float* s, float* c) {
  sincosf(x, s, c);
}
"""


def _sincos(x, sn, cs, t):
    """sn[t], cs[t] = sinf(x), cosf(x) through one ``sincosf`` (one argument reduction for both); the program
    must import :data:`SINCOS_SOURCE`."""
    return T.evaluate(T.call_extern("handle", "tilev4_sincos", x, T.address_of(sn[t]), T.address_of(cs[t])))


def _div(x, y):
    """x / y as ``__fdividef`` (reciprocal and product, within 2 ulp; y is a softmax denominator in [1, 2^8])."""
    return T.call_extern(T.float32, "__fdividef", x, y)


def _pool_shape(ratio: int, D: int) -> tuple[int, int, int]:
    """(row_groups, chunk, entries per prefill CTA) for (m, D); shared by prefill and decode."""
    tpe = D // VEC
    if ratio == 4:
        return 1, 4, max(1, 256 // tpe)
    return 2, 4, 1


def _default_block_entries(ratio: int, D: int, decode: bool) -> int:
    """Entries per CTA when nothing is tuned: 256 threads for a prefill, one warp (at least) for a decode step."""
    groups, _, per_cta = _pool_shape(ratio, D)
    return max(1, 32 // (groups * (D // VEC))) if decode else per_cta


def _cta_threads(ratio: int, D: int, block_entries: int) -> int:
    return _pool_shape(ratio, D)[0] * block_entries * (D // VEC)


def _check_build(ratio: int, D: int, quant: str, in_dtype: str, out_dtype: str, rope_dim: int) -> None:
    if ratio not in RATIOS:
        raise ValueError(f"ratio must be one of {RATIOS}, got {ratio}")
    if D < 64 or D > 1024 or D & (D - 1):
        raise ValueError(f"D must be a power of two in [64, 1024], got {D}")
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    if in_dtype not in _DTYPES or out_dtype not in _DTYPES:
        raise ValueError(f"in_dtype/out_dtype must be one of {sorted(_DTYPES)}, got {in_dtype!r}/{out_dtype!r}")
    if rope_dim <= 0 or rope_dim % VEC or rope_dim > D:
        raise ValueError(f"rope_dim must be a positive multiple of {VEC} and <= D={D}, got {rope_dim}")
    if quant == "attention" and ((D - rope_dim) <= 0 or (D - rope_dim) % FP8_BLOCK):
        raise ValueError(f"quant='attention' needs D - rope_dim to be a positive multiple of 64, got D={D}")
    if quant == "indexer" and D > 256:
        raise ValueError(f"quant='indexer' needs D <= 256 (the Hadamard butterflies stay inside a warp), got D={D}")


def _program(ratio: int, D: int, quant: str, in_dtype: str, out_dtype: str, rope_dim: int, decode: bool,
             block_entries: int, schedule: str = "direct", num_stages: int = 2, entry_steps: int = 1):
    """The prefill (``decode=False``) or decode-step program; see the module docstring."""
    _check_build(ratio, D, quant, in_dtype, out_dtype, rope_dim)
    overlap = ratio == 4
    coff = 2 if overlap else 1
    C = coff * D
    TPE = D // VEC  # lanes per entry
    G, CH, _ = _pool_shape(ratio, D)
    EPC = block_entries or _default_block_entries(ratio, D, decode)  # entries (decode: sequences) per CTA
    threads = G * EPC * TPE
    if EPC < 1 or threads % 32 or threads > 1024:  # whole warps: the shuffles use the full mask
        raise ValueError(f"block_entries={EPC}: {G}·{EPC}·{TPE} = {threads} threads must be a multiple of 32 "
                         f"and <= 1024")
    P = 2 * ratio if overlap else ratio  # pooled positions
    span = ratio if overlap else 0  # an entry's first row is i·m − span
    RPG = P // G  # rows per group
    NCH = RPG // CH  # chunks per group
    ROWS_OWNED = ratio if overlap else RPG  # state rows a decode thread reads and resets
    PM = ratio if overlap else 1  # rows of prev_kv / prev_score (a 1-row dummy for m = 128)
    NOPE = D - rope_dim
    R2 = rope_dim // 2
    LOG_TPE = int(math.log2(TPE))
    WPE = max(1, TPE // 32)  # warps an entry spans
    LOG_WARP = int(math.log2(min(TPE, 32)))
    RW0 = TPE - min(TPE, 32)  # first lane of the warp (or entry, when smaller) that holds the rope lanes
    PPL = -(-(rope_dim // 2) // min(TPE, 32))  # rope angles a lane of that warp computes
    h_scale = 1.0 / math.sqrt(D)  # as the reference: x @ H * (1 / sqrt(D))
    f32 = T.float32
    neg_inf = -T.infinity(f32)
    in_dt = T.bfloat16 if in_dtype == "bfloat16" else T.float32
    out_dt = T.bfloat16 if out_dtype == "bfloat16" else T.float32
    B = T.dynamic("B")
    NC = T.dynamic("NC")

    @T.macro
    def load_state(st_kv, st_score, st_pkv, st_pscore, s, p, base, col, kv_l, sc_l, j):
        """Row at absolute position p (< the first new token) from the state; base = its current block start."""
        if overlap:
            if p >= base:
                for v in T.vectorized(VEC):
                    kv_l[j * VEC + v] = st_kv[s, p - base, col + v]
                for v in T.vectorized(VEC):
                    sc_l[j * VEC + v] = st_score[s, p - base, col + v]
            else:  # the previous (complete) block
                for v in T.vectorized(VEC):
                    kv_l[j * VEC + v] = st_pkv[s, p - base + ratio, col + v]
                for v in T.vectorized(VEC):
                    sc_l[j * VEC + v] = st_pscore[s, p - base + ratio, col + v]
        else:
            for v in T.vectorized(VEC):
                kv_l[j * VEC + v] = st_kv[s, p - base, col + v]
            for v in T.vectorized(VEC):
                sc_l[j * VEC + v] = st_score[s, p - base, col + v]

    @T.macro
    def load_new(kv, gate, ape, s, row, p, col, kv_l, sc_l, j):
        """New token ``row`` (absolute position p): kv' and its score gate + ape[p % m], fp32."""
        for v in T.vectorized(VEC):
            kv_l[j * VEC + v] = T.cast(kv[s, row, col + v], f32)
        for v in T.vectorized(VEC):
            sc_l[j * VEC + v] = T.cast(gate[s, row, col + v], f32) + ape[p % ratio, col + v]

    @T.macro
    def chunk_update(kv_l, sc_l, mx, den, num):
        """Online softmax over the CH rows in kv_l/sc_l, per channel: (mx, den, num) rescaled and extended.

        A weight is ``2^(s·log2e − M·log2e)`` (one fma and exp2f). A chunk of masked rows (score −inf, e.g.
        entry 0's previous half) has M = −inf: the offset is then taken as 0, so every weight is 2^−inf = 0
        and the sums (0 so far, as M was −inf) stay 0."""
        for v in T.unroll(VEC):
            cm = T.alloc_var(f32)
            cm = mx[v]
            for j in T.unroll(CH):
                cm = T.max(cm, sc_l[j * VEC + v])
            off = T.if_then_else(cm == neg_inf, T.float32(0.0), -cm * LOG2E)
            alpha = ex2(T.fma(mx[v], LOG2E, off))
            den[v] = den[v] * alpha
            num[v] = num[v] * alpha
            for j in T.unroll(CH):
                ev = ex2(T.fma(sc_l[j * VEC + v], LOG2E, off))
                den[v] = den[v] + ev
                num[v] = T.fma(ev, kv_l[j * VEC + v], num[v])
            mx[v] = cm

    @T.macro
    def combine(mx, den, num, y, part_mx, part_den, part_num, g, e, lane):
        """pooled = num / den over the G row groups (fixed group order), into y; all threads get it."""
        if G == 1:
            for v in T.unroll(VEC):
                y[v] = _div(num[v], den[v])
        else:
            for v in T.unroll(VEC):
                part_mx[g, e, lane * VEC + v] = mx[v]
                part_den[g, e, lane * VEC + v] = den[v]
                part_num[g, e, lane * VEC + v] = num[v]
            T.sync_threads()
            for v in T.unroll(VEC):
                mm = T.alloc_var(f32)
                dd = T.alloc_var(f32)
                nn = T.alloc_var(f32)
                mm = part_mx[0, e, lane * VEC + v]
                for gg in T.unroll(1, G):
                    mm = T.max(mm, part_mx[gg, e, lane * VEC + v])
                dd = 0.0
                nn = 0.0
                for gg in T.unroll(G):
                    w = ex2((part_mx[gg, e, lane * VEC + v] - mm) * LOG2E)
                    dd = dd + part_den[gg, e, lane * VEC + v] * w
                    nn = nn + part_num[gg, e, lane * VEC + v] * w
                y[v] = _div(nn, dd)

    @T.macro
    def finish(y, weight, freqs, red, g, e, lane, pos):
        """rmsnorm → RoPE at ``pos`` → quantisation simulation, on this thread's 8 channels of y."""
        c0 = lane * VEC
        ss = T.alloc_var(f32)
        ss = 0.0
        for v in T.unroll(VEC):
            ss = ss + y[v] * y[v]
        for k in T.unroll(LOG_WARP):  # butterfly over the entry's lanes of this warp: every lane gets the same bits
            ss = ss + T.shfl_xor(ss, 1 << k)
        tot = T.alloc_var(f32)
        if WPE == 1:
            tot = ss
        else:  # the entry spans WPE warps: their sums in warp order
            if g == 0 and lane % 32 == 0:
                red[e, lane // 32] = ss
            T.sync_threads()
            tot = red[e, 0]
            for ww in T.unroll(1, WPE):
                tot = tot + red[e, ww]
        rstd = 1.0 / T.sqrt(tot / D + RMS_EPS)  # x * rsqrt(mean(x²) + eps) * w
        for v in T.unroll(VEC):
            y[v] = y[v] * rstd * weight[c0 + v]
        # RoPE: interleaved pairs (2k, 2k+1) of the last R dims, at the entry's position
        if PPL <= VEC // 2:  # every lane of the warp holding the rope lanes computes PPL angles; owners gather them
            if lane >= RW0:  # the whole warp (uniform), as the shuffles need
                cs_l = T.alloc_local((PPL,), f32)
                sn_l = T.alloc_local((PPL,), f32)
                for t in T.unroll(PPL):
                    pidx = T.min((lane - RW0) * PPL + t, R2 - 1)
                    ang = T.cast(T.cast(pos, T.float64) * T.cast(freqs[pidx], T.float64), f32)
                    _sincos(ang, sn_l, cs_l, t)
                lane0 = T.get_thread_binding() % 32 - (lane - RW0)  # warp lane of the group's lane RW0
                for k in T.unroll(VEC // 2):
                    src = lane0 + (T.max(c0 - NOPE, 0) // 2 + k) // PPL  # pair (c0 − NOPE)/2 + k; k % PPL its slot
                    cs = T.shfl_sync(cs_l[k % PPL], src)
                    sn = T.shfl_sync(sn_l[k % PPL], src)
                    if c0 >= NOPE:
                        re = y[2 * k]
                        im = y[2 * k + 1]
                        y[2 * k] = re * cs - im * sn
                        y[2 * k + 1] = re * sn + im * cs
        elif c0 >= NOPE:
            for k in T.unroll(VEC // 2):
                ang = T.cast(T.cast(pos, T.float64) * T.cast(freqs[(c0 - NOPE) // 2 + k], T.float64), f32)
                cs = T.cos(ang)
                sn = T.sin(ang)
                re = y[2 * k]
                im = y[2 * k + 1]
                y[2 * k] = re * cs - im * sn
                y[2 * k + 1] = re * sn + im * cs
        if quant == "attention":  # FP8 e4m3 on [:NOPE], blocks of 64 = 8 lanes
            amax = T.alloc_var(f32)
            amax = 0.0
            for v in T.unroll(VEC):
                amax = T.max(amax, T.abs(y[v]))
            for k in T.unroll(3):
                amax = T.max(amax, T.shfl_xor(amax, 1 << k))
            if c0 < NOPE:
                scale, inv = pow2_scale_bits(T.max(amax, FP8_AMAX_FLOOR), FP8_MAX)
                for v in T.unroll(VEC):
                    y[v] = T.cast(T.cast(y[v] * inv, T.float8_e4m3fn), f32) * scale
        if quant == "indexer":  # x @ H_D * D^-1/2 (butterflies), then FP4 e2m1, blocks of 32 = 4 lanes
            for hb in T.unroll(3):  # channel bits 0..2: inside the thread
                for q in T.unroll(VEC // 2):
                    lo = (q >> hb) * (2 << hb) + (q & ((1 << hb) - 1))
                    u = y[lo]
                    w = y[lo + (1 << hb)]
                    y[lo] = u + w
                    y[lo + (1 << hb)] = u - w
            for hb in T.unroll(LOG_TPE):  # channel bits 3..: across lanes
                # y + other (bit clear) or other − y (bit set) as fma(y, ±1, other): an exact product, so the
                # same single rounding as the add, in one instruction
                sgn = T.if_then_else((lane >> hb) & 1 == 0, T.float32(1.0), T.float32(-1.0))
                for v in T.unroll(VEC):
                    other = T.shfl_xor(y[v], 1 << hb)
                    y[v] = T.fma(y[v], sgn, other)
            amax = T.alloc_var(f32)
            amax = 0.0
            for v in T.unroll(VEC):
                y[v] = y[v] * h_scale
                amax = T.max(amax, T.abs(y[v]))
            for k in T.unroll(2):
                amax = T.max(amax, T.shfl_xor(amax, 1 << k))
            scale, inv = pow2_scale_bits(T.max(amax, FP4_AMAX_FLOOR), FP4_MAX)
            for v in T.unroll(VEC):
                a = T.min(T.abs(y[v] * inv), FP4_MAX)
                # round to the e2m1 grid, ties to the even code: steps 0.5 below 2, 1 below 4, then 2 (a·(1/step)
                # and the product back are exact: powers of two)
                lo, mid = a < 2.0, a < 4.0
                up = T.if_then_else(lo, T.float32(2.0), T.if_then_else(mid, T.float32(1.0), T.float32(0.5)))
                step = T.if_then_else(lo, T.float32(0.5), T.if_then_else(mid, T.float32(1.0), T.float32(2.0)))
                qa = T.nearbyint(a * up) * step
                y[v] = T.if_then_else(y[v] < 0.0, -qa, qa) * scale

    @T.macro
    def reset_sums(mx, den, num):
        """An entry's running (max, den, num) before its first chunk."""
        for v in T.unroll(VEC):
            mx[v] = neg_inf
            den[v] = 0.0
            num[v] = 0.0

    @T.macro
    def emit_entry(mx, den, num, y, part_mx, part_den, part_num, red, weight, freqs, cache, s, i, pos, emit, g, e,
                   lane, c0):
        """Entry i (RoPE position ``pos``) from the pooled sums: combine → finish → ``cache[s, i]`` where ``emit``
        (the block is complete) and i is a cache row. Every thread takes part (barriers and shuffles)."""
        combine(mx, den, num, y, part_mx, part_den, part_num, g, e, lane)
        finish(y, weight, freqs, red, g, e, lane, pos)
        if emit and g == 0 and i < NC:
            for v in T.vectorized(VEC):
                cache[s, i, c0 + v] = T.cast(y[v], out_dt)

    if not decode:
        N = T.dynamic("n")

        def alloc_pool():
            """A thread's running (max, den, num) and pooled value, and the shared row-group partials and rmsnorm
            sums of :func:`combine` / :func:`finish`."""
            return (T.alloc_local((VEC,), f32), T.alloc_local((VEC,), f32), T.alloc_local((VEC,), f32),
                    T.alloc_local((VEC,), f32), T.alloc_shared((G, EPC, D), f32), T.alloc_shared((G, EPC, D), f32),
                    T.alloc_shared((G, EPC, D), f32), T.alloc_shared((EPC, WPE), f32))

        @T.macro
        def carry_row(kv, gate, ape, st_kv, st_score, st_pkv, st_pscore, dst_kv, dst_score, s, r, p, t0, base, col,
                      kv_l, sc_l):
            """Row ``r`` of the new state from position p: a new row (p >= t0) or one of the old state."""
            if p >= t0:
                load_new(kv, gate, ape, s, p - t0, p, col, kv_l, sc_l, 0)
            else:
                load_state(st_kv, st_score, st_pkv, st_pscore, s, p, base, col, kv_l, sc_l, 0)
            for v in T.vectorized(VEC):
                dst_kv[s, r, col + v] = kv_l[v]
            for v in T.vectorized(VEC):
                dst_score[s, r, col + v] = sc_l[v]

        @T.macro
        def write_state(kv, gate, ape, num_tokens, st_kv, st_score, st_pkv, st_pscore, new_kv, new_score, new_pkv,
                        new_pscore, new_num_tokens, s, tx, t0, base, total, kv_l, sc_l):
            """The new streaming state of sequence s, from the state and the new rows (one CTA)."""
            cur_base = (total // ratio) * ratio
            for it in T.serial((ratio * C // VEC + threads - 1) // threads):
                idx = it * threads + tx
                if idx < ratio * C // VEC:
                    r = idx // (C // VEC)
                    col = (idx % (C // VEC)) * VEC
                    p = cur_base + r
                    if p < total:
                        carry_row(kv, gate, ape, st_kv, st_score, st_pkv, st_pscore, new_kv, new_score, s, r, p, t0,
                                  base, col, kv_l, sc_l)
                    else:
                        for v in T.vectorized(VEC):
                            new_kv[s, r, col + v] = 0.0
                        for v in T.vectorized(VEC):
                            new_score[s, r, col + v] = neg_inf
                    if overlap:
                        p2 = cur_base - ratio + r  # the last complete block
                        carry_row(kv, gate, ape, st_kv, st_score, st_pkv, st_pscore, new_pkv, new_pscore, s, r, p2,
                                  t0, base, col, kv_l, sc_l)
            if tx == 0:
                new_num_tokens[s] = num_tokens[s] + N

        @T.macro
        def pool_entries(kv, gate, ape, weight, freqs, st_kv, st_score, st_pkv, st_pscore, cache, s, t0, base, ent,
                         valid, g, e, lane, c0, kv_l, sc_l, mx, den, num, y, part_mx, part_den, part_num, red):
            """Entry ``t0 // m + ent`` of sequence s from global memory, rows before t0 from the state (one entry
            per (e, lane) thread of every row group)."""
            i = t0 // ratio + ent  # its absolute index
            reset_sums(mx, den, num)
            if valid and i * ratio - span >= t0:  # every row is a new token: no clamp, no state rows
                for ck in T.serial(NCH):
                    for j in T.unroll(CH):
                        # pooled position rr: row i·m − span + rr, ape row rr % m; m = 4 reads the previous block
                        # (rr < 4) through [:D] and the current one through [D:] (for m = 128, rr // m is 0)
                        rr = g * RPG + ck * CH + j
                        load_new(kv, gate, ape, s, i * ratio - span + rr - t0, rr, c0 + (rr // ratio) * D,
                                 kv_l, sc_l, j)
                    chunk_update(kv_l, sc_l, mx, den, num)
            elif valid:
                for ck in T.serial(NCH):
                    # the chunk's rows from kv'/gate first, with no branch around the loads (a row
                    # before the first new token is clamped to it here and replaced from the state
                    # below), so that all CH rows are in flight at once
                    for j in T.unroll(CH):
                        rr = g * RPG + ck * CH + j  # pooled position
                        if overlap:  # rows 0..3: previous block via [:D]; 4..7: current via [D:]
                            p = T.max(i * ratio - ratio + rr, t0)
                            load_new(kv, gate, ape, s, p - t0, p, c0 + (rr // ratio) * D, kv_l, sc_l, j)
                        else:
                            p = T.max(i * ratio + rr, t0)
                            load_new(kv, gate, ape, s, p - t0, p, c0, kv_l, sc_l, j)
                    for j in T.unroll(CH):
                        rr = g * RPG + ck * CH + j
                        if overlap:
                            p = i * ratio - ratio + rr
                            if p < t0:
                                load_state(st_kv, st_score, st_pkv, st_pscore, s, p, base,
                                           c0 + (rr // ratio) * D, kv_l, sc_l, j)
                        else:
                            p = i * ratio + rr
                            if p < t0:
                                load_state(st_kv, st_score, st_pkv, st_pscore, s, p, base, c0, kv_l, sc_l, j)
                    chunk_update(kv_l, sc_l, mx, den, num)
            emit_entry(mx, den, num, y, part_mx, part_den, part_num, red, weight, freqs, cache, s, i, i * ratio,
                       valid, g, e, lane, c0)

        # "direct": CTA bx pools entries bx·EPC …; "stream": head CTAs pool the entries that read rows of the
        # state (the first one or two of a sequence) the same way, body CTAs stream the rest of the rows through
        # a shared-memory ring. The last CTA of a sequence writes its new state.
        direct = schedule == "direct"
        HEADS = -(-(2 if overlap else 1) // EPC)  # CTAs for the (at most 2, m = 4; 1, m = 128) head entries
        ROWS = G * EPC * CH  # rows of a chunk tile (kv' and gate each)
        STEPS = entry_steps * NCH  # pipelined steps of a body CTA: NCH chunks of EPC entries, entry_steps times
        if direct:
            grid_x = (N // ratio + EPC) // EPC  # ceil((n // m + 1) / EPC): entries a call can complete
        else:
            grid_x = HEADS + (N // ratio + EPC * entry_steps) // (EPC * entry_steps)

        @T.macro
        def end_entry(mx, den, num, y, part_mx, part_den, part_num, red, weight, freqs, cache, s, i, i_end, g, e,
                      lane, c0):
            """Entry i into the cache (if complete), then the sums restart for the CTA's next entry."""
            emit_entry(mx, den, num, y, part_mx, part_den, part_num, red, weight, freqs, cache, s, i, i * ratio,
                       i < i_end, g, e, lane, c0)
            reset_sums(mx, den, num)

        @T.prim_func
        def compressor_prefill_kernel(
            kv: T.Tensor[(B, N, C), in_dt],
            gate: T.Tensor[(B, N, C), in_dt],
            ape: T.Tensor[(ratio, C), f32],
            weight: T.Tensor[(D,), f32],
            freqs: T.Tensor[(R2,), f32],
            num_tokens: T.Tensor[(B,), T.int64],
            st_kv: T.Tensor[(B, ratio, C), f32],
            st_score: T.Tensor[(B, ratio, C), f32],
            st_pkv: T.Tensor[(B, PM, C), f32],
            st_pscore: T.Tensor[(B, PM, C), f32],
            cache: T.Tensor[(B, NC, D), out_dt],
            new_kv: T.Tensor[(B, ratio, C), f32],
            new_score: T.Tensor[(B, ratio, C), f32],
            new_pkv: T.Tensor[(B, PM, C), f32],
            new_pscore: T.Tensor[(B, PM, C), f32],
            new_num_tokens: T.Tensor[(B,), T.int64],
        ):
            with T.Kernel(grid_x + 1, B, threads=threads) as (bx, s):
                T.import_source(EX2_SOURCE + SINCOS_SOURCE)
                if not direct:
                    T.annotate_min_blocks_per_sm(max(1, 512 // threads))  # registers capped: 512 threads an SM
                tx = T.get_thread_binding()
                lane = tx % TPE
                e = (tx // TPE) % EPC
                g = tx // (TPE * EPC)
                c0 = lane * VEC
                kv_l = T.alloc_local((CH * VEC,), f32)
                sc_l = T.alloc_local((CH * VEC,), f32)
                mx, den, num, y, part_mx, part_den, part_num, red = alloc_pool()  # shared by head and body CTAs
                t0 = T.cast(num_tokens[s], T.int32)  # position of the first new token
                base = (t0 // ratio) * ratio  # start of the block the state holds
                total = t0 + N
                first = t0 // ratio  # first entry this call can complete
                i_end = total // ratio  # entries first … i_end − 1 complete
                i_body = T.min((t0 + span + ratio - 1) // ratio, i_end)  # stream: first entry with no row before t0
                if bx == grid_x:
                    write_state(kv, gate, ape, num_tokens, st_kv, st_score, st_pkv, st_pscore, new_kv, new_score,
                                new_pkv, new_pscore, new_num_tokens, s, tx, t0, base, total, kv_l, sc_l)
                elif direct or bx < HEADS:
                    ent = bx * EPC + e  # entry of this call
                    pool_entries(kv, gate, ape, weight, freqs, st_kv, st_score, st_pkv, st_pscore, cache, s, t0,
                                 base, ent, ent < (i_end if direct else i_body) - first, g, e, lane, c0, kv_l, sc_l,
                                 mx, den, num, y, part_mx, part_den, part_num, red)
                else:
                    i_cta = i_body + (bx - HEADS) * (EPC * entry_steps)  # the CTA's first entry
                    if i_cta < i_end:
                        kv_sh = T.alloc_shared((ROWS, D), in_dt)
                        g_sh = T.alloc_shared((ROWS, D), in_dt)
                        reset_sums(mx, den, num)
                        for k in T.Pipelined(STEPS, num_stages=num_stages):
                            i_step = i_cta + (k // NCH) * EPC  # the step's first entry
                            ck = k % NCH
                            if overlap:  # EPC consecutive entries' chunk ck: one run of rows, half ck of the channels
                                r0 = i_step * ratio - ratio + ck * CH - t0
                                T.copy(kv[s, r0:r0 + ROWS, ck * D:ck * D + D], kv_sh, disable_tma=True)
                                T.copy(gate[s, r0:r0 + ROWS, ck * D:ck * D + D], g_sh, disable_tma=True)
                            else:  # group gg of entry ee: its CH rows of chunk ck
                                for q in T.unroll(G * EPC):
                                    r0 = (i_step + q % EPC) * ratio + (q // EPC) * RPG + ck * CH - t0
                                    T.copy(kv[s, r0:r0 + CH, 0:D], kv_sh[q * CH:q * CH + CH, :], disable_tma=True)
                                    T.copy(gate[s, r0:r0 + CH, 0:D], g_sh[q * CH:q * CH + CH, :], disable_tma=True)
                            for j in T.unroll(CH):
                                row = (g * EPC + e) * CH + j
                                rr = g * RPG + ck * CH + j  # pooled position; its offset in the block below
                                for v in T.vectorized(VEC):
                                    kv_l[j * VEC + v] = T.cast(kv_sh[row, c0 + v], f32)
                                for v in T.vectorized(VEC):
                                    sc_l[j * VEC + v] = (T.cast(g_sh[row, c0 + v], f32)
                                                         + ape[rr % ratio, c0 + (rr // ratio) * D + v])
                            chunk_update(kv_l, sc_l, mx, den, num)
                            if entry_steps > 1 and ck == NCH - 1:
                                end_entry(mx, den, num, y, part_mx, part_den, part_num, red, weight, freqs, cache, s,
                                          i_step + e, i_end, g, e, lane, c0)
                        if entry_steps == 1:  # after the loop
                            end_entry(mx, den, num, y, part_mx, part_den, part_num, red, weight, freqs, cache, s,
                                      i_cta + e, i_end, g, e, lane, c0)


        pass_configs = _PASS_CONFIGS if direct else {**_PASS_CONFIGS, **_STREAM_PASS_CONFIGS}
        return compressor_prefill_kernel.with_attr("tilelang_pass_configs", pass_configs)


    @T.prim_func
    def compressor_decode_kernel(
        kv: T.Tensor[(B, C), in_dt],
        gate: T.Tensor[(B, C), in_dt],
        ape: T.Tensor[(ratio, C), f32],
        weight: T.Tensor[(D,), f32],
        freqs: T.Tensor[(R2,), f32],
        num_tokens: T.Tensor[(B,), T.int64],
        st_kv: T.Tensor[(B, ratio, C), f32],
        st_score: T.Tensor[(B, ratio, C), f32],
        st_pkv: T.Tensor[(B, PM, C), f32],
        st_pscore: T.Tensor[(B, PM, C), f32],
        cache: T.Tensor[(B, NC, D), out_dt],
    ):
        with T.Kernel(T.ceildiv(B, EPC), threads=threads) as bx:
            T.import_source(EX2_SOURCE + SINCOS_SOURCE)
            tx = T.get_thread_binding()
            lane = tx % TPE
            e = (tx // TPE) % EPC
            g = tx // (TPE * EPC)
            c0 = lane * VEC
            kv_l = T.alloc_local((CH * VEC,), f32)
            sc_l = T.alloc_local((CH * VEC,), f32)
            mx = T.alloc_local((VEC,), f32)
            den = T.alloc_local((VEC,), f32)
            num = T.alloc_local((VEC,), f32)
            y = T.alloc_local((VEC,), f32)
            part_mx = T.alloc_shared((G, EPC, D), f32)
            part_den = T.alloc_shared((G, EPC, D), f32)
            part_num = T.alloc_shared((G, EPC, D), f32)
            red = T.alloc_shared((EPC, WPE), f32)
            s = bx * EPC + e
            live = s < B
            t = T.alloc_var(T.int32)
            t = 0
            if live:
                t = T.cast(num_tokens[s], T.int32)
            r_new = t % ratio
            emit = live and (t + 1) % ratio == 0
            i = t // ratio
            base = i * ratio
            # 1. the new row into the current block, by the threads that own (and later read) its elements
            owner = live if overlap else (live and r_new // RPG == g)
            if owner:
                for hh in T.unroll(coff):
                    for v in T.vectorized(VEC):
                        st_kv[s, r_new, hh * D + c0 + v] = T.cast(kv[s, hh * D + c0 + v], f32)
                    for v in T.vectorized(VEC):
                        st_score[s, r_new, hh * D + c0 + v] = (
                            T.cast(gate[s, hh * D + c0 + v], f32) + ape[r_new, hh * D + c0 + v]
                        )
            # 2. the entry, where the block is complete: the same pooling as the prefill's
            reset_sums(mx, den, num)
            if emit:
                for ck in T.serial(NCH):
                    for j in T.unroll(CH):
                        rr = g * RPG + ck * CH + j
                        if overlap:
                            load_state(st_kv, st_score, st_pkv, st_pscore, s, base - ratio + rr, base,
                                       c0 + (rr // ratio) * D, kv_l, sc_l, j)
                        else:
                            load_state(st_kv, st_score, st_pkv, st_pscore, s, base + rr, base, c0, kv_l, sc_l, j)
                    chunk_update(kv_l, sc_l, mx, den, num)
            emit_entry(mx, den, num, y, part_mx, part_den, part_num, red, weight, freqs, cache, s, i, base, emit, g,
                       e, lane, c0)
            # 3. an emitted block becomes the previous half (m = 4); the current block starts empty.
            #    Every element below is read and written by the one thread that read it above.
            if emit:
                for rr in T.serial(ROWS_OWNED):
                    row = rr + (0 if overlap else g * RPG)
                    for hh in T.unroll(coff):
                        if overlap:
                            for v in T.vectorized(VEC):
                                st_pkv[s, row, hh * D + c0 + v] = st_kv[s, row, hh * D + c0 + v]
                            for v in T.vectorized(VEC):
                                st_pscore[s, row, hh * D + c0 + v] = st_score[s, row, hh * D + c0 + v]
                        for v in T.vectorized(VEC):
                            st_kv[s, row, hh * D + c0 + v] = 0.0
                        for v in T.vectorized(VEC):
                            st_score[s, row, hh * D + c0 + v] = neg_inf
            T.sync_threads()
            if live and g == 0 and lane == 0:  # after the barrier: every thread has read num_tokens[s]
                num_tokens[s] = num_tokens[s] + 1

    return compressor_decode_kernel.with_attr("tilelang_pass_configs", _PASS_CONFIGS)


def _configs() -> list[dict[str, Any]]:
    return [
        {"ratio": 4, "D": 512, "quant": "attention"},
        {"ratio": 128, "D": 512, "quant": "attention"},
        {"ratio": 4, "D": 128, "quant": "indexer"},
    ]


# ------------------------------------------------------------------------------------------------- tuning


def _whole_warps(c: Mapping[str, Any]) -> str | None:
    threads = _cta_threads(c["ratio"], c["D"], c["block_entries"])
    if threads % 32 or threads > 1024:
        return f"{threads} threads: not whole warps, or more than 1024"
    return None


def _stream_knobs(c: Mapping[str, Any]) -> str | None:
    """The stream schedule's knobs only vary with it. Tuned CTA sizes: 64-512 threads (direct), 128-256
    (stream), the range where the H200 measurements put every winner."""
    threads = _cta_threads(c["ratio"], c["D"], c["block_entries"])
    if c.get("schedule", "direct") == "direct":
        if (c.get("num_stages", 2), c.get("entry_steps", 1)) != (2, 1):
            return "num_stages/entry_steps are knobs of the stream schedule"
        if not 64 <= threads <= 512:
            return f"direct CTAs of {threads} threads (tuned: 64-512)"
    elif not 128 <= threads <= 256:
        return f"stream CTAs of {threads} threads (tuned: 128-256)"
    return None


def _pool_smem(c: Mapping[str, Any]) -> int:
    groups, tpe = _pool_shape(c["ratio"], c["D"])[0], c["D"] // VEC
    nbytes = 4 * c["block_entries"] * (3 * groups * c["D"] + tpe)  # the row groups' (max, den, num), rmsnorm sums
    if c.get("schedule", "direct") == "stream":  # the ring of kv'/gate chunk tiles
        itemsize = 2 if c.get("in_dtype", "bfloat16") == "bfloat16" else 4
        rows = groups * c["block_entries"] * _pool_shape(c["ratio"], c["D"])[1]
        nbytes += c["num_stages"] * 2 * rows * c["D"] * itemsize
    return nbytes


# Prefill defaults per (m, D): the fastest on the H200 at s = 65536 from position 0, bf16 (fractions of the
# same-run copy bandwidth; direct at its default CTA size for comparison): m = 4, D = 512: 0.85 (direct 0.80);
# m = 128 (2 row groups): direct, 2 entries a CTA 0.67 (1 entry 0.66, 4 entries 0.65; stream 0.63, entry_steps 2:
# 0.53, 4: 0.37); indexer: 0.48 (entry_steps 4: 0.51; direct 0.47). Three stages were never faster than two.
_PREFILL_DEFAULTS = {
    (4, 512): {"schedule": "stream", "block_entries": 2, "num_stages": 2, "entry_steps": 1},
    (128, 512): {"schedule": "direct", "block_entries": 2, "num_stages": 2, "entry_steps": 1},
    (4, 128): {"schedule": "stream", "block_entries": 8, "num_stages": 2, "entry_steps": 1},
}


def _prefill_heuristic(p: Mapping[str, Any]) -> dict[str, Any]:
    known = _PREFILL_DEFAULTS.get((p["ratio"], p["D"]))
    if known is not None:
        return dict(known)
    # other shapes: the stream schedule with CTAs of 128-256 threads
    groups, tpe = _pool_shape(p["ratio"], p["D"])[0], p["D"] // VEC
    entries = max(1, 128 // (groups * tpe))
    return {"schedule": "stream", "block_entries": entries, "num_stages": 2, "entry_steps": 1}


def _space(decode: bool) -> Space:
    """``block_entries``: entries per CTA (decode: sequences per CTA). The pooling shape (row groups, chunks)
    is NOT tunable: prefill and decode must share it to stay bit-identical. An entry's arithmetic does not
    depend on the other entries of its CTA, nor on the schedule, so every candidate gives the default's bits."""
    if decode:
        return Space(
            params={"block_entries": (1, 2, 4, 8, 16, 32, 64)},
            constraints=(_whole_warps,),
            smem_bytes=_pool_smem,
            heuristic=lambda p: {"block_entries": _default_block_entries(p["ratio"], p["D"], True)},
        )
    return Space(
        params={"schedule": ("direct", "stream"), "block_entries": (1, 2, 4, 8, 16, 32, 64), "num_stages": (2,),
                "entry_steps": (1, 2)},
        constraints=(_whole_warps, _stream_knobs),
        smem_bytes=_pool_smem,
        heuristic=_prefill_heuristic,
    )


COMPRESSOR_PREFILL_SPACE = _space(decode=False)
COMPRESSOR_DECODE_SPACE = _space(decode=True)
TUNE_SEQUENCES = 4  # sequences of a tuning prefill (ragged starts); the harness size is the new tokens of each


def _compressor_bucket(problem: Mapping[str, Any]) -> str:
    """(m, D) fix the pooling shape and the lanes per entry; quant, dtypes and rope_dim share a config."""
    return f"ratio={problem['ratio']},D={problem['D']}"


@dataclasses.dataclass(frozen=True)
class _EntryFormat:
    """What the cache check needs to know of the problem (the last item of a compressor case's ``expected``)."""

    quant: str
    rope_dim: int


def _tuning_inputs(problem: Mapping[str, Any], num_tokens: torch.Tensor, rows: tuple[int, ...], g: torch.Generator,
                   device: str) -> tuple[tuple[torch.Tensor, ...], CompressorState]:
    """(kv, gate, ape, weight, freqs) at the scales of tests/test_compressor_gpu.py — kv' and gate ``rows``
    [..., C] in the input dtype — and the streaming state after ``num_tokens[j]`` tokens: random fp32 rows for
    the tokens seen in the current block and, once a block is complete, the previous block (m = 4);
    0 / −inf elsewhere, as :class:`CompressorState` keeps them."""
    ratio, d = problem["ratio"], problem["D"]
    c = (2 if ratio == 4 else 1) * d
    dt = _DTYPES[problem["in_dtype"]]
    kv = torch.randn(*rows, c, generator=g, device=device).to(dt)
    gate = (2 * torch.randn(*rows, c, generator=g, device=device)).to(dt)
    ape = torch.randn(ratio, c, generator=g, device=device)
    weight = 0.5 + torch.rand(d, generator=g, device=device)
    freqs = rope_frequencies(dataclasses.replace(_COMPRESSED_ROPE, rope_dim=problem["rope_dim"])).to(device)
    b = num_tokens.shape[0]
    st = CompressorState.empty(b, ratio, d, device)
    seen = (torch.arange(ratio, device=device) < (num_tokens % ratio).unsqueeze(1)).unsqueeze(-1)  # [b, m, 1]
    st.kv.copy_(torch.where(seen, torch.randn(b, ratio, c, generator=g, device=device), st.kv))
    st.score.copy_(torch.where(seen, 2 * torch.randn(b, ratio, c, generator=g, device=device), st.score))
    if ratio == 4:
        done = (num_tokens >= ratio).view(b, 1, 1)
        st.prev_kv.copy_(torch.where(done, torch.randn(b, ratio, c, generator=g, device=device), st.prev_kv))
        st.prev_score.copy_(torch.where(done, 2 * torch.randn(b, ratio, c, generator=g, device=device),
                                        st.prev_score))
    st.num_tokens.copy_(num_tokens)
    return (kv, gate, ape, weight, freqs), st


def _kernel_state(st: CompressorState) -> tuple[torch.Tensor, ...]:
    """(num_tokens, kv, score, prev_kv, prev_score) as the kernels take them ([b, 1, C] zeros for m = 128)."""
    if st.prev_kv is not None:
        return st.num_tokens, st.kv, st.score, st.prev_kv, st.prev_score
    dummy = torch.zeros(st.kv.shape[0], 1, st.kv.shape[2], device=st.kv.device)
    return st.num_tokens, st.kv, st.score, dummy, dummy.clone()


def _ref_args(problem: Mapping[str, Any]) -> dict[str, Any]:
    return {"rope": dataclasses.replace(_COMPRESSED_ROPE, rope_dim=problem["rope_dim"]),
            "quant": None if problem["quant"] == "none" else problem["quant"]}


def _ref_state(st: CompressorState) -> tuple[torch.Tensor, ...]:
    """The state tensors a case checks, in the order of its outputs after the cache (on the CPU)."""
    return tuple(t.cpu() for t in (st.num_tokens, st.kv, st.score, st.prev_kv, st.prev_score) if t is not None)


def _expected(problem: Mapping[str, Any], refs: tuple[torch.Tensor, ...], device: str) -> tuple[Any, ...]:
    """(entries, state…) on the device, then the :class:`_EntryFormat` the check reads."""
    return (*(t.to(device) for t in refs), _EntryFormat(problem["quant"], problem["rope_dim"]))


def _prefill_case(problem: Mapping[str, Any], n: int, gen: torch.Generator, device: str, reference: bool,
                  sequences: int = TUNE_SEQUENCES) -> TuningCase:
    """``sequences`` sequences with ragged starts (0 … 2m − 1 tokens already seen), ``n`` new tokens each."""
    from tilev4.reference.compressor import compressor_prefill

    ratio, d = problem["ratio"], problem["D"]
    heads = torch.randint(0, 2 * ratio, (sequences,), generator=gen)
    g = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    params, st = _tuning_inputs(problem, heads.to(device), (sequences, n), g, device)
    rows = (int(heads.max()) + n) // ratio + 1  # one row past the last entry completed: it must stay as it was
    cache = torch.empty(sequences, rows, d, dtype=_DTYPES[problem["out_dtype"]], device=device)
    state = _kernel_state(st)
    new_state = tuple(torch.empty_like(t) for t in state)
    # the kernel takes the old state as (num_tokens, kv, score, prev_kv, prev_score) but writes the new one as
    # (kv, score, prev_kv, prev_score, num_tokens): args 11..15
    args = (*params, *state, cache, *new_state[1:], new_state[0])
    outputs = (10, 15, 11, 12) + ((13, 14) if ratio == 4 else ())  # cache, num_tokens, kv, score, prev_kv, prev_score
    expected = None
    if reference:
        kv, gate, ape, weight, _ = (t.cpu() for t in params)
        entries = torch.full((sequences, rows, d), math.nan)
        new = []
        for j, t0 in enumerate(heads.tolist()):
            one = CompressorState(*(None if t is None else t[j:j + 1].cpu() for t in (
                st.kv, st.score, st.prev_kv, st.prev_score, st.num_tokens)))
            e, one_new = compressor_prefill(kv[j:j + 1], gate[j:j + 1], ape, weight, ratio, state=one,
                                            **_ref_args(problem))
            entries[j, t0 // ratio:t0 // ratio + e.shape[1]] = e[0]
            new.append(_ref_state(one_new))
        states = tuple(torch.cat(parts) for parts in zip(*new))
        expected = _expected(problem, (entries, *states), device)
    return TuningCase(args, outputs=outputs, expected=expected, rows=sequences)


def _prefill_slice(case: TuningCase, start: int, stop: int) -> TuningCase:
    kv, gate, ape, weight, freqs, *rest = case.args
    state, cache, new_state = rest[:5], rest[5], rest[6:]  # new_state in the kernel's order: kv … num_tokens
    args = (kv[start:stop].clone(), gate[start:stop].clone(), ape, weight, freqs,
            *(t[start:stop].clone() for t in state), *(torch.empty_like(t[start:stop]) for t in (cache, *new_state)))
    return TuningCase(args, outputs=case.outputs, expected=None, rows=stop - start)


def _decode_case(problem: Mapping[str, Any], n: int, gen: torch.Generator, device: str,
                 reference: bool) -> TuningCase:
    """One step of ``n`` sequences in their first three blocks: every other one completes a block (emits an
    entry), the others stop anywhere in theirs. The state is updated in place: ``initial`` restores it."""
    from tilev4.reference.compressor import compressor_decode_step

    ratio, d = problem["ratio"], problem["D"]
    offset = torch.where(torch.arange(n) % 2 == 0, ratio - 1, torch.randint(0, ratio, (n,), generator=gen))
    t = torch.randint(0, 3, (n,), generator=gen) * ratio + offset  # [n] tokens seen
    g = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    params, st = _tuning_inputs(problem, t.to(device), (n,), g, device)
    rows = 4  # entries 0 … 2, and a row that must stay as it was
    cache = torch.empty(n, rows, d, dtype=_DTYPES[problem["out_dtype"]], device=device)
    args = (*params, *_kernel_state(st), cache)
    in_place = (5, 6, 7) + ((8, 9) if ratio == 4 else ())  # num_tokens, kv, score, prev_kv, prev_score
    expected = None
    if reference:
        kv, gate, ape, weight, _ = (t.cpu() for t in params)
        cpu_state = CompressorState(*(None if x is None else x.cpu() for x in (
            st.kv, st.score, st.prev_kv, st.prev_score, st.num_tokens)))
        e, emitted, index, new = compressor_decode_step(kv, gate, cpu_state, ape, weight, ratio, **_ref_args(problem))
        entries = torch.full((n, rows, d), math.nan)
        sel = emitted.nonzero().squeeze(1)
        entries[sel, index[sel]] = e[sel]
        expected = _expected(problem, (entries, *_ref_state(new)), device)
    return TuningCase(args, outputs=(10, *in_place), expected=expected, rows=n,
                      initial={i: args[i].clone() for i in in_place})


def _decode_slice(case: TuningCase, start: int, stop: int) -> TuningCase:
    """Sequences [start, stop) from the state the case started from (its own tensors have moved on)."""
    initial = case.initial or {}
    args = []
    for i, a in enumerate(case.args):
        a = initial.get(i, a)
        args.append(a[start:stop].clone() if i in (0, 1, 5, 6, 7, 8, 9) else a)  # kv, gate and the state
    args[10] = torch.empty_like(case.args[10][start:stop])  # the cache
    return TuningCase(tuple(args), outputs=case.outputs, expected=None, rows=stop - start,
                      initial={i: args[i].clone() for i in initial})


def _entries_check(actual: torch.Tensor, expected: torch.Tensor, fmt: _EntryFormat) -> str | None:
    """Cache rows against the reference's entries, with the tolerances of tests/test_compressor_gpu.py.

    ``expected`` is NaN at the rows the call must not write: they must still hold the poison (NaN).
    Unquantised values (and the rope dims of ``attention``): atol 2e-5, rtol 2e-5 (fp32 cache) or 2^-8
    (bf16 cache). Quantised values: every one within one quantum of its format at its magnitude, and at
    most 1 % of them (at least 2) different at all.
    """
    a, e = actual.float(), expected.float()
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        return "NaN in a written entry, or a row written that the call must not write"
    written = ~torch.isnan(e[..., 0])
    a, e = a[written], e[written]  # [entries, D]
    d = a.shape[-1]
    quantised = {"attention": d - fmt.rope_dim, "indexer": d, "none": 0}[fmt.quant]  # the first dims
    rtol = 2.0**-8 if actual.dtype == torch.bfloat16 else 2e-5
    if quantised < d and a.numel():
        excess = ((a[:, quantised:] - e[:, quantised:]).abs() - (2e-5 + rtol * e[:, quantised:].abs())).max().item()
        if excess > 0:
            return f"an unquantised value exceeds atol 2e-5 + rtol {rtol:.3g} by {excess:.3g}"
    if quantised == 0 or not a.numel():
        return None
    block, floor, qmax = ((FP8_BLOCK, FP8_AMAX_FLOOR, FP8_MAX) if fmt.quant == "attention"
                          else (FP4_BLOCK, FP4_AMAX_FLOOR, FP4_MAX))
    qa, qe = a[:, :quantised].reshape(-1, block), e[:, :quantised].reshape(-1, block)
    big = torch.maximum(qa.abs(), qe.abs())
    scale = torch.exp2(torch.ceil(torch.log2(big.amax(-1, keepdim=True).clamp_min(floor) / qmax)))
    bound = 2.0**-3 * big + 2.0**-9 * scale if fmt.quant == "attention" else torch.maximum(0.5 * scale, 0.5 * big)
    over = ((qa - qe).abs() - bound).max().item()
    if over > 1e-6:
        return f"a quantised value is off by more than one quantum (by {over:.3g})"
    differ = int((qa != qe).sum())
    if differ > max(2, qa.numel() // 100):
        return f"{differ} of {qa.numel()} quantised values differ from the reference (at most 1 %)"
    return None


def _compressor_check(outputs: tuple[torch.Tensor, ...], expected: tuple[Any, ...]) -> str | None:
    """The cache as :func:`_entries_check`; the new state bit for bit (copies and one fp32 add, as the GPU tests)."""
    *refs, fmt = expected
    why = _entries_check(outputs[0], refs[0], fmt)
    if why:
        return why
    for name, got, ref in zip(("num_tokens", "kv", "score", "prev_kv", "prev_score"), outputs[1:], refs[1:]):
        if not torch.equal(got, ref):
            return f"state.{name} differs from the reference (must be bit-exact)"
    return None


@register("compressor_prefill", configs=_configs(), tags=("compressor", "batch_invariant"),
          space=COMPRESSOR_PREFILL_SPACE, bucket=_compressor_bucket,
          harness=TuningHarness(_prefill_case, _compressor_check, sizes=(512, 4096, 16384), size_name="n",
                                batch_slice=_prefill_slice))
def build_compressor_prefill(ratio: int, D: int, quant: str, in_dtype: str = "bfloat16",
                             out_dtype: str = "bfloat16", rope_dim: int = 64, block_entries: int = 0,
                             schedule: str = "direct", num_stages: int = 2, entry_steps: int = 1):
    """Compressor prefill: pool the new tokens' complete blocks into cache entries, write the new state.

    ``block_entries`` (tunable; 0: the default for (m, D)) is the number of entries a CTA pools at a time.
    ``schedule``: ``"direct"`` (every thread loads its rows from global memory, one CTA per ``block_entries``
    entries) or ``"stream"`` (a body CTA pools ``block_entries · entry_steps`` entries, their row chunks
    staged through a ``num_stages``-deep shared-memory pipeline, registers capped so that 512 threads fit an
    SM). Same bits either way.
    """
    if schedule not in ("direct", "stream"):
        raise ValueError(f"schedule must be 'direct' or 'stream', got {schedule!r}")
    if schedule == "direct" and (num_stages, entry_steps) != (2, 1):
        raise ValueError(f"num_stages and entry_steps are knobs of the stream schedule, got "
                         f"{(num_stages, entry_steps)} with 'direct'")
    check_int("num_stages", num_stages, min_value=1)
    check_int("entry_steps", entry_steps, min_value=1)
    return _program(ratio, D, quant, in_dtype, out_dtype, rope_dim, False, block_entries, schedule, num_stages,
                    entry_steps)


@register("compressor_decode", configs=_configs(), tags=("compressor", "batch_invariant"),
          space=COMPRESSOR_DECODE_SPACE, bucket=_compressor_bucket,
          harness=TuningHarness(_decode_case, _compressor_check, sizes=(64, 1024), size_name="b",
                                batch_slice=_decode_slice))
def build_compressor_decode(ratio: int, D: int, quant: str, in_dtype: str = "bfloat16",
                            out_dtype: str = "bfloat16", rope_dim: int = 64, block_entries: int = 0):
    """Compressor decode step: append one token per sequence (ragged), emit completed entries, state in place.

    ``block_entries`` (tunable; 0: the default for (m, D)) is the number of sequences a CTA steps.
    """
    return _program(ratio, D, quant, in_dtype, out_dtype, rope_dim, True, block_entries)


@functools.lru_cache(maxsize=16)
def _frequencies(rope: RopeConfig, device: str) -> torch.Tensor:
    return rope_frequencies(rope).to(device)  # fp32 [rope_dim / 2]


def _check_cuda(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}")


def _check_aligned(**tensors: torch.Tensor | None) -> None:
    """The kernels move 8 channels per 16-byte (bf16) or 2×16-byte (fp32) access: base addresses must be 16-byte
    aligned (a contiguous slice of whole rows is; a tensor offset by a few elements is not)."""
    for name, t in tensors.items():
        check_aligned(name, t)


def _check_params(
    ape: torch.Tensor, norm_weight: torch.Tensor, cache: torch.Tensor, ratio: int, quant: str | None, rope: RopeConfig
) -> tuple[int, int, str]:
    """Validate what prefill and decode share; returns ``(D, C, quant key)``."""
    check_int("ratio", ratio, choices=RATIOS)
    if quant not in ("attention", "indexer", None):
        raise ValueError(f"quant must be 'attention', 'indexer' or None, got {quant!r}")
    if not isinstance(rope, RopeConfig):
        raise TypeError(f"rope must be a RopeConfig, got {type(rope).__name__}")
    check_tensor("norm_weight", norm_weight, dtype=torch.float32, ndim=1, contiguous=True)
    d = norm_weight.shape[0]
    if d < 64 or d > 1024 or d & (d - 1):
        raise ValueError(f"norm_weight: the entry dim D must be a power of two in [64, 1024], got D={d}")
    if rope.rope_dim % VEC or rope.rope_dim > d:
        raise ValueError(f"rope.rope_dim must be a multiple of {VEC} and <= D={d}, got {rope.rope_dim}")
    if quant == "attention" and (d - rope.rope_dim <= 0 or (d - rope.rope_dim) % FP8_BLOCK):
        raise ValueError(f"quant='attention' needs D - rope_dim to be a positive multiple of 64, got D={d}")
    if quant == "indexer" and d > 256:
        raise ValueError(f"quant='indexer' needs D <= 256 (the Hadamard butterflies stay inside a warp), got D={d}")
    c = (2 if ratio == 4 else 1) * d
    check_tensor("ape", ape, dtype=torch.float32, shape=(ratio, c), contiguous=True)
    check_tensor("cache", cache, dtype=(torch.bfloat16, torch.float32), ndim=3, contiguous=True)
    if cache.shape[2] != d:
        raise ValueError(f"cache must have shape [b, n_c, D={d}], got {list(cache.shape)}")
    return d, c, quant or "none"


def _check_state(state: object, b: int, ratio: int, c: int, device: torch.device) -> CompressorState:
    if not isinstance(state, CompressorState):
        raise TypeError(f"state must be a CompressorState, got {type(state).__name__}")
    for f in ("kv", "score") + (("prev_kv", "prev_score") if ratio == 4 else ()):
        check_tensor(f"state.{f}", getattr(state, f), dtype=torch.float32, shape=(b, ratio, c), contiguous=True,
                     device=device)
    if ratio == 128 and (state.prev_kv is not None or state.prev_score is not None):
        raise ValueError("state.prev_kv and state.prev_score must be None for ratio 128 (no overlap)")
    check_tensor("state.num_tokens", state.num_tokens, dtype=torch.int64, shape=(b,), contiguous=True, device=device)
    return state


_DUMMIES: dict[tuple[int, int, str], torch.Tensor] = {}


def _prev_or_dummy(t: torch.Tensor | None, b: int, c: int, device: torch.device) -> torch.Tensor:
    """``t``, or (m = 128, no previous block) a [b, 1, C] stand-in that the kernel never touches."""
    if t is not None:
        return t
    key = (b, c, str(device))
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(b, 1, c, dtype=torch.float32, device=device)
    return _DUMMIES[key]


def _config(ratio: int, d: int, quant: str, kv: torch.Tensor, cache: torch.Tensor, rope: RopeConfig) -> dict[str, Any]:
    cfg: dict[str, Any] = {"ratio": ratio, "D": d, "quant": quant}
    if kv.dtype != torch.bfloat16:
        cfg["in_dtype"] = "float32"
    if cache.dtype != torch.bfloat16:
        cfg["out_dtype"] = "float32"
    if rope.rope_dim != 64:
        cfg["rope_dim"] = rope.rope_dim
    return cfg


def compress_prefill(
    kv: torch.Tensor,
    gate: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    cache: torch.Tensor,
    ratio: int,
    *,
    quant: str | None = "attention",
    rope: RopeConfig = _COMPRESSED_ROPE,
    state: CompressorState | None = None,
    validate: bool = True,
) -> CompressorState:
    """Compress ``n`` new tokens of every sequence into the cache (one fused kernel).

    Every tensor must be contiguous, on one CUDA device, and start at a 16-byte aligned address.

    Args:
        kv: [b, n, coff·D] bf16 or fp32, contiguous, CUDA: the projected rows ``x @ Wkv_c`` of the new tokens
            (coff = 2 for m = 4, 1 for m = 128).
        gate: [b, n, coff·D], the dtype of ``kv``: the projected gate rows ``x @ Wgate_c``.
        ape: [m, coff·D] fp32, the positional bias of the gate by offset in the block.
        norm_weight: [D] fp32, the rmsnorm weight (D is read from its length; a power of two, 64 … 1024).
        cache: [b, n_c, D] bf16 or fp32, contiguous: the compressed cache. Entry ``i`` of sequence ``j`` is
            written to ``cache[j, i]``; rows not completed by this call are left as they are.
        ratio: m, 4 (overlapping) or 128.
        quant: ``"attention"`` (FP8 on ``[:D−64]``, block 64), ``"indexer"`` (Hadamard, then FP4, block 32)
            or ``None``.
        rope: the RoPE applied to the last ``rope.rope_dim`` dims at position ``i·m`` (YaRN included).
        state: where each sequence left off (a :class:`CompressorState` on the device, fp32 contiguous), or
            ``None`` for fresh sequences. Sequence ``j``'s new tokens have positions
            ``state.num_tokens[j] …`` (may differ between sequences); the entries completed are
            ``num_tokens[j] // m … (num_tokens[j] + n) // m − 1``.
        validate: check on the host (one device sync) that every completed entry fits in ``cache``;
            without it, entries past ``n_c`` are dropped.

    Returns:
        The new :class:`CompressorState` (new tensors; ``state`` is not modified), equal bit for bit to
        :func:`tilev4.reference.compressor_prefill`'s.
    """
    d, c, qkey = _check_params(ape, norm_weight, cache, ratio, quant, rope)
    check_tensor("kv", kv, dtype=(torch.bfloat16, torch.float32), ndim=3, contiguous=True)
    b, n, width = kv.shape
    if width != c:
        raise ValueError(f"kv must have last dimension coff*D={c} for ratio {ratio}, got {width}")
    check_tensor("gate", gate, dtype=kv.dtype, shape=(b, n, c), contiguous=True)
    if cache.shape[0] != b:
        raise ValueError(f"cache must have shape [b={b}, n_c, {d}], got {list(cache.shape)}")
    check_same_device(kv=kv, gate=gate, ape=ape, norm_weight=norm_weight, cache=cache)
    if state is not None:
        _check_state(state, b, ratio, c, kv.device)
    _check_cuda("kv", kv)
    if state is None:
        state = CompressorState.empty(b, ratio, d, kv.device)
    _check_aligned(kv=kv, gate=gate, ape=ape, norm_weight=norm_weight, cache=cache, **{
        f"state.{f}": getattr(state, f) for f in ("kv", "score", "prev_kv", "prev_score")})
    if validate and b:
        need = int(((state.num_tokens + n) // ratio).max())
        if need > cache.shape[1]:
            raise ValueError(f"cache has {cache.shape[1]} entry rows but the prefill completes entries up to "
                             f"index {need - 1} (num_tokens {state.num_tokens.tolist()} + n={n})")
    if b == 0 or n == 0:
        return CompressorState(*(None if t is None else t.clone() for t in (
            state.kv, state.score, state.prev_kv, state.prev_score, state.num_tokens)))
    overlap = ratio == 4
    new = CompressorState(
        kv=torch.empty_like(state.kv),
        score=torch.empty_like(state.score),
        prev_kv=torch.empty_like(state.prev_kv) if overlap else None,
        prev_score=torch.empty_like(state.prev_score) if overlap else None,
        num_tokens=torch.empty_like(state.num_tokens),
    )
    kernel = compile_kernel("compressor_prefill", _config(ratio, d, qkey, kv, cache, rope))
    kernel(kv, gate, ape, norm_weight, _frequencies(rope, str(kv.device)), state.num_tokens, state.kv, state.score,
           _prev_or_dummy(state.prev_kv, b, c, kv.device), _prev_or_dummy(state.prev_score, b, c, kv.device), cache,
           new.kv, new.score, _prev_or_dummy(new.prev_kv, b, c, kv.device),
           _prev_or_dummy(new.prev_score, b, c, kv.device), new.num_tokens)
    return new


def compress_decode(
    kv: torch.Tensor,
    gate: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    cache: torch.Tensor,
    state: CompressorState,
    ratio: int,
    *,
    quant: str | None = "attention",
    rope: RopeConfig = _COMPRESSED_ROPE,
    validate: bool = True,
) -> None:
    """Append one token to each sequence of a ragged batch; write the entries that complete (one kernel).

    Sequence ``j``'s token has position ``t = state.num_tokens[j]``; its row goes into the state, and if
    ``(t + 1) % m == 0`` entry ``t // m`` is written to ``cache[j, t // m]`` and (m = 4) the block becomes
    the previous half. ``state`` is updated IN PLACE (``num_tokens`` included), so that a step allocates
    nothing and can be captured in a CUDA graph; its values equal :func:`tilev4.reference.compressor_decode_step`'s
    new state bit for bit.

    Every tensor must be contiguous, on one CUDA device, and start at a 16-byte aligned address.

    Args:
        kv: [b, coff·D] bf16 or fp32, contiguous, CUDA: the projected row of each sequence's new token.
        gate: [b, coff·D], the dtype of ``kv``: its projected gate row.
        ape, norm_weight, cache, ratio, quant, rope: as in :func:`compress_prefill`.
        state: the :class:`CompressorState` of the ``b`` sequences (fp32 contiguous, on the device).
        validate: check on the host (one device sync) that every entry that may complete fits in ``cache``;
            pass ``False`` inside a CUDA graph (entries past ``n_c`` are then dropped).
    """
    d, c, qkey = _check_params(ape, norm_weight, cache, ratio, quant, rope)
    check_tensor("kv", kv, dtype=(torch.bfloat16, torch.float32), ndim=2, contiguous=True)
    b, width = kv.shape
    if width != c:
        raise ValueError(f"kv must have last dimension coff*D={c} for ratio {ratio}, got {width}")
    check_tensor("gate", gate, dtype=kv.dtype, shape=(b, c), contiguous=True)
    if cache.shape[0] != b:
        raise ValueError(f"cache must have shape [b={b}, n_c, {d}], got {list(cache.shape)}")
    check_same_device(kv=kv, gate=gate, ape=ape, norm_weight=norm_weight, cache=cache)
    _check_state(state, b, ratio, c, kv.device)
    _check_cuda("kv", kv)
    _check_aligned(kv=kv, gate=gate, ape=ape, norm_weight=norm_weight, cache=cache, **{
        f"state.{f}": getattr(state, f) for f in ("kv", "score", "prev_kv", "prev_score")})
    if b == 0:
        return
    if validate:
        need = int(((state.num_tokens + 1) // ratio).max())
        if need > cache.shape[1]:
            raise ValueError(f"cache has {cache.shape[1]} entry rows but this step completes entry {need - 1} "
                             f"(num_tokens {state.num_tokens.tolist()})")
    kernel = compile_kernel("compressor_decode", _config(ratio, d, qkey, kv, cache, rope))
    kernel(kv, gate, ape, norm_weight, _frequencies(rope, str(kv.device)), state.num_tokens, state.kv, state.score,
           _prev_or_dummy(state.prev_kv, b, c, kv.device), _prev_or_dummy(state.prev_score, b, c, kv.device), cache)
