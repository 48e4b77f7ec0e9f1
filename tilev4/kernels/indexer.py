"""Lightning indexer (CSA layers): FP8 logits ``I[t, c]`` and the top-k selection of compressed entries.

Semantics (spec, "Lightning indexer"; :mod:`tilev4.reference.indexer`)::

    I[t, c] = Σ_h w[t, h] · ReLU(q_I[t, h] · K_I[c])        (−inf unless c < visible[t])
    visible[t] = min((pos[t] + 1) // ratio, n_keys[b])
    idx[t, :] = the min(top_k, #visible) entries with the largest I[t, c], by score descending, equal
                scores by the smaller index, + offset; −1 in the unused slots

Dimension glossary: ``B`` sequences, ``S`` query tokens per sequence, ``N`` compressed entries (key
slots per sequence), ``H`` indexer heads (64), ``D`` indexer head dim (128), ``BQ`` queries per CTA,
``BC`` entries per GEMM tile, ``SPLIT`` entries per CTA, ``R`` rows of a logits matrix, ``K`` top_k.

FP8 storage (:func:`indexer_fp8_cast`): ``q_I`` and ``K_I`` are FP4-simulated (e2m1 value × a
power-of-two scale per block of 32). Each row of D values (a head of one query, a key) is stored as
float8_e4m3fn values ``x8`` and one fp32 power-of-two scale ``s`` per row with ``x = x8 · s`` exactly:
``s = 2^ceil(log2(amax / 448))`` puts the row's largest value at 256 or 384 (an FP4 value has a
1-bit mantissa), and every block of the row whose scale is at least ``2^-16`` of the largest block's
is still exact (e4m3 reaches 2^-9 with subnormals). Since ``s > 0`` is a power of two,
``ReLU(s_q s_k · acc) = s_q s_k · ReLU(acc)`` and every product ``q8 · k8`` is exact in fp32, so::

    I[t, c] = s_k[c] · Σ_h (w[t, h] · s_q[t, h]) · ReLU(q8[t, h] · k8[c])

is the reference value up to the fp32 order of the head sum. (The D-sum is exact on both sides: with
a row's FP4 blocks within a few binades of each other, the products are small integers in one unit —
e.g. ≤ 144 units of 1024 when all blocks share a scale — well inside both the tensor core's aligned
accumulation and fp32.)

Logits kernel (``indexer_logits``): grid (N / SPLIT, S / BQ, B), one warpgroup a CTA; a CTA loads the FP8
queries of its BQ queries ([BQ·H, D], once) and the folded head weights, then streams the visible key tiles of
its entry range: ``acc[BC, BQ·H] = k8[BC, D] @ q8[BQ·H, D]ᵀ`` on the FP8 tensor cores (fp32 accumulation;
entries on the wgmma M side so the head sum is a row reduction), then the epilogue on the accumulator's registers
(:data:`HEAD_SUM_SOURCE`): per thread a chain of fused ``max(acc, 0) · w`` multiply-adds over the heads it holds,
a reduce-scatter of the four partial sums of a lane quad (three shuffles; each lane ends with one logit), × key
scale, the visibility mask, and one fp32 store a lane. Written with ``reduce_sum`` over a fragment, the same
epilogue took ~340 instructions a warp a tile (products and sums not contracted, a four-way all-reduce, one lane
in four storing); this one takes ~256. The default ``tma`` schedule
keeps ``num_stages`` key tiles in flight by TMA (warp 0 refills a stage once every warp is past it, mbarrier
per stage), loops over the visible tiles only, and stores −inf for the rest of the range without a wgmma;
``min_ctas=4`` caps the registers at 128 so four CTAs share an SM and one CTA's wgmma overlaps the others'
epilogues. A stage is handed back for its refill either after a CTA barrier at the end of the tile (BQ=2) or, with
no CTA barrier in the loop, by each warp arriving on the stage's ``empty`` mbarrier right after its wgmma (BQ=1:
8 % faster there, 4 % slower at BQ=2 on the H200); the two give the same bits. The ``pipelined`` schedule
(every thread issuing cp.async copies, a static trip count) stays buildable; it is slower on the H200. Each
logit is computed alone (no split over D or over the heads), so a query's row does not depend on B, S, the other
queries of its CTA, SPLIT, the stage count or the stage release (checked by the GPU tests).

Top-k kernel (``topk_select``): one CTA (``threads``, 512 by default) per row; radix select,
``log2(4·threads)`` bits per pass (11 at 512 threads: 4 histogram bins per thread), over the 64-bit key
``(order(value) << IB) | (N − 1 − c)`` (``order`` maps fp32 to uint32 monotonically, ``IB`` = bits of
N − 1), which is unique per entry, so "ties by the smaller index" is just a larger key. Rows whose length is a
multiple of 4 are read with 16-byte loads (``vec=4``). With ``prefilter`` (the default) a first pass keeps a few
running maxima a thread (no atomics; the signed order of the bits, exact): about 4·K maxima of disjoint entry
sets, whose K-th largest top digit d0 is a lower bound of the K-th largest key (K distinct entries reach it).
The second pass reads the row again (mostly from L2) and keys, counts (shared-memory atomics on the top digit)
and keeps in shared memory only the entries of top digit >= d0 — on normal rows ~2 % of them. The filtered
passes (this one, and the select pass below) do not key a passing value where it is found: a ballot a value
queues the few passing values of each load in the warp's staging slots, and once 32 are queued the warp keys
them with all lanes busy (a rare passing value otherwise holds up all 32 lanes of its warp). A block scan
(shuffles within each warp, then over the warp totals) finds the digit d* of the K-th largest key; the later
digits are found over the kept keys only (histograms with one atomic per group of equal digits in a warp:
``__match_any_sync``), stopping as soon as the keys above the prefix number exactly K. When more than ``cap``
(4096) entries pass the bound (heavy ties), the row is read again as without the prefilter: the keys above d*
are selected, the d* bin kept (or, if that is larger than ``cap`` too, searched by re-reading the row), with the
same result. Entries −inf or past the row's length are never selected. The selected keys are bitonic-sorted
descending with each key in a register (warp shuffles for partners closer than 32, two alternating shared
buffers beyond) and written as ``c + offset`` (−1 after the last). The result is exactly a stable sort of
``-logits`` (top K), so it is deterministic and batch-invariant whatever the build; :func:`topk_select` runs
1024-thread CTAs when there are fewer than two rows per SM (decode: a few long rows). NaN logits are not allowed
(not checked: such an entry is treated as −inf).

Decode: the logits of a query are 4 bytes per entry against 128 FP8 key bytes, so the two-pass path
(logits, then select over the visible prefix) costs ~3% of the key traffic; no fused kernel.

Tuning notes: one warpgroup per CTA (BC = 64 entries = the wgmma M), so that several CTAs share an SM and one
CTA's wgmma overlaps another's epilogue. ``BQ`` trades the wgmma N width (BQ·64; N=64 is borderline on
shared-memory bandwidth) against wasted columns when S < BQ: decode (S=1) uses BQ=1, prefill BQ=2 by default.
Every build sums a logit's heads in the same order (:data:`HEAD_SUM_SOURCE`), so BQ=1 and BQ=2 — and SPLIT,
the stage count, the stage release and the schedule — give the same bits: a query's logits do not depend on B,
S, its slot in a CTA or the tuned config, and no separate batch-invariant build is needed (the GPU tests check
bit-equality across every build, batch size, position and S).

Tuning (:data:`INDEXER_LOGITS_SPACE`, :data:`TOPK_SPACE`): the logits tune BQ, SPLIT and num_stages, one
bucket per mode (prefill, decode; :func:`_logits_problem` picks it from S, never from a size); none of them
changes a bit. The top-k tunes ``threads``, ``unroll``
and ``prefilter`` (one bucket per sort width and load width), which change the passes and the loads in flight,
not the result.
"""

import functools
import math
from collections.abc import Mapping
from typing import Any

import tilelang.language as T
import torch
from tilelang.layout import make_swizzled_layout

from tilev4._checks import capturing, check_aligned, check_int, check_same_device, check_tensor
from tilev4.autotune.harness import TuningCase, TuningHarness
from tilev4.autotune.space import Space
from tilev4.kernels.registry import compile_kernel, register, resolve_config

__all__ = [
    "FP8_ROW_MAX",
    "build_indexer_logits",
    "build_topk_select",
    "indexer_fp8_cast",
    "indexer_logits",
    "indexer_topk",
    "topk_select",
]

FP8_ROW_MAX = 448.0
_RATIOS = (4, 128)
LOGITS_HEADS = (8, 16, 32, 64)  # indexer heads the logits kernel takes (the wgmma N side is BQ·H, a multiple of 8)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_NO_WS = {"tl.disable_warp_specialized": True}
_NO_AUTO_SYNC = {"tl.disable_warp_specialized": True, "tl.disable_thread_storage_sync": True}
_MAX_GRID_YZ = 65535  # CUDA grid limit of the query-block and batch dims
LOGITS_REL_TOL = 1e-5  # of Σ_h |w_h|·ReLU(q_h·k): the fp32 head-sum order (tests/test_indexer_gpu.py)


# ------------------------------------------------------------------------------------------------- logits


MAX_ACC_REGISTERS = 64  # fp32 accumulators per thread (BC·BQ·H / threads): BQ=2 already takes 167 registers


def _one_query_per_cta(c: Mapping[str, Any]) -> str | None:
    """A decode step (S = 1) would leave the other query slots of a CTA empty."""
    if c["decode"] and c["BQ"] != 1:
        return f"BQ={c['BQ']}: decode builds take one query per CTA"
    return None


def _logits_tiles(c: Mapping[str, Any]) -> str | None:
    if c["SPLIT"] % c["BC"]:
        return f"SPLIT={c['SPLIT']} is not a multiple of BC={c['BC']}"
    acc = c["BC"] * c["BQ"] * c["H"] // c["threads"]
    if acc > MAX_ACC_REGISTERS:
        return f"{acc} accumulator registers per thread > {MAX_ACC_REGISTERS}"
    return None


# BQ (the wgmma N width), the entry range of a CTA and the key pipeline depth. BC and threads stay at one
# warpgroup of 64 entries (several CTAs per SM, see the module docstring). SPLIT above 2048 is left out: the
# query tile a CTA loads is 3-6 % of its key traffic at 2048 (BQ=1-2), while a shorter range cuts the tiles a
# causal prefill computes past the last visible entry.
INDEXER_LOGITS_SPACE = Space(
    # measured on the H200 (S=4096, N=4096..65536): tma with min_ctas=4 at 0.58-0.64 of the FP8 peak, tma with
    # min_ctas=1 0.54-0.59, pipelined 0.48-0.57; the slower two stay buildable, out of the tuned space
    params={"schedule": ("tma",), "BQ": (1, 2), "SPLIT": (1024, 2048), "num_stages": (3, 4), "min_ctas": (4,)},
    constraints=(_one_query_per_cta, _logits_tiles),
    smem_bytes=lambda c: c["BQ"] * c["H"] * c["D"] + c["num_stages"] * c["BC"] * (c["D"] + 4) + 4 * c["BQ"],
    heuristic=lambda p: {"schedule": "tma", "BQ": 1 if p["decode"] else 2, "SPLIT": 2048,
                         "num_stages": 4, "min_ctas": 4},
)
LOGITS_TUNE_ENTRIES = 16384  # compressed entries per sequence in a tuning case
LOGITS_TUNE_QUERIES = 128  # queries per sequence of a prefill tuning case (decode: 1); the size is all queries


def _logits_mode(problem: Mapping[str, Any]) -> str:
    return "decode" if problem["decode"] else "prefill"


def _logits_bucket(problem: Mapping[str, Any]) -> str:
    return f"H={problem['H']},D={problem['D']},{_logits_mode(problem)}"


def _logits_case(problem: Mapping[str, Any], n: int, gen: torch.Generator, device: str, reference: bool,
                 entries: int = LOGITS_TUNE_ENTRIES, seq_queries: int = LOGITS_TUNE_QUERIES) -> TuningCase:
    """``n`` queries: decode ``n`` sequences of one query (ragged ``k_lens``, FP8 NaN bytes and infinite
    scales in the padding), else ``n / seq_queries`` sequences of ``seq_queries`` queries at sorted random
    positions (from none visible to all). FP4-simulated q and k, head weights at the model's scale, as
    tests/test_indexer_gpu.py draws them.

    ``expected`` is (reference logits, Σ_h |w_h|·ReLU(q_h·k)) — the tolerance scale of the check — in fp64:
    the reference's formula (:func:`tilev4.reference.indexer_scores`) with the exact products of FP4 values
    and a head sum far more exact than the kernel's fp32 one, so the check holds the kernel to the GPU
    tests' tolerance against the exact value.
    """
    from tilev4.reference.quant import fp4_e2m1_simulate

    h, d = problem["H"], problem["D"]
    b, s = (n, 1) if problem["decode"] else (max(1, n // seq_queries), min(n, seq_queries))
    g = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    q = fp4_e2m1_simulate(torch.randn(b, s, h, d, generator=g, device=device), block=32)
    k = fp4_e2m1_simulate(torch.randn(b, entries, d, generator=g, device=device), block=32)
    w = torch.randn(b, s, h, generator=g, device=device) * (h**-0.5 * d**-0.5)
    positions = torch.randint(0, 4 * entries + 8, (b, s), generator=g, device=device).sort(-1).values
    k_lens = torch.randint(0, entries + 1, (b,), generator=g, device=device) if problem["decode"] else None
    visible = _visible_counts(positions, 4, entries, k_lens)  # [b, s]
    q8, q_scale = indexer_fp8_cast(q)
    k8, k_scale = indexer_fp8_cast(k)
    if k_lens is not None:  # padding slots hold garbage: it must not leak
        pad = torch.arange(entries, device=device) >= k_lens.unsqueeze(1)  # [b, entries]
        k8 = k8.view(torch.uint8).masked_fill(pad.unsqueeze(-1), 0x7F).view(torch.float8_e4m3fn)
        k_scale = k_scale.masked_fill(pad, math.inf)
    out = torch.empty(b, s, entries, device=device)
    expected = None
    if reference:
        ref = torch.empty(b, s, entries, dtype=torch.float64, device=device)
        bound = torch.empty_like(ref)
        step = max(1, (1 << 27) // (s * h * entries))  # sequences per chunk: <= 1 GiB of fp64 products
        for i in range(0, b, step):
            qk = torch.einsum("bshd,bcd->bshc", q[i:i + step].double(), k[i:i + step].double()).relu_()
            wi = w[i:i + step].double()
            ref[i:i + step] = torch.einsum("bshc,bsh->bsc", qk, wi)
            bound[i:i + step] = torch.einsum("bshc,bsh->bsc", qk, wi.abs())
        hidden = torch.arange(entries, device=device) >= visible.unsqueeze(-1)  # [b, s, entries]
        expected = (ref.masked_fill_(hidden, -math.inf), bound)
    args = (q8, (w * q_scale).contiguous(), k8, k_scale, visible, out)
    return TuningCase(args, outputs=(5,), expected=expected, rows=b)


def _logits_check(outputs: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> str | None:
    """As tests/test_indexer_gpu.py: −inf exactly where not visible, finite elsewhere and within 1e-5 of
    Σ_h |w_h|·ReLU(q_h·k) of the reference (the fp32 head-sum order; see the module docstring)."""
    out, (ref, bound) = outputs[0], expected
    if torch.isnan(out).any():
        return "NaN in the logits"
    visible = torch.isfinite(ref)
    if not torch.isneginf(out[~visible]).all():
        return "an entry that is not visible is not −inf"
    if not torch.isfinite(out[visible]).all():
        return "a visible entry is not finite"
    bad = visible & ((out.double() - ref).abs() > LOGITS_REL_TOL * bound + 1e-30)
    if bad.any():
        return f"{int(bad.sum())} logits off by more than {LOGITS_REL_TOL} of Σ_h |w_h|·ReLU(q_h·k)"
    return None


def _logits_slice(case: TuningCase, start: int, stop: int) -> TuningCase:
    *inputs, out = case.args
    sub = tuple(t[start:stop].clone() for t in inputs)
    return TuningCase((*sub, torch.empty_like(out[start:stop])), outputs=(5,), expected=None, rows=stop - start)


def _check_logits_shape(H: int, D: int, BC: int, SPLIT: int) -> None:
    if SPLIT % BC:
        raise ValueError(f"SPLIT={SPLIT} must be a multiple of BC={BC}")
    if D % 32 or H % 8:
        raise ValueError(f"D={D} must be a multiple of 32 and H={H} of 8")


@T.macro
def _visible_range(visible, vis_shared, row0, by, S, BQ, num_vis: T.Ref):
    """The visible counts of the CTA's queries into ``vis_shared`` (0 past S), their maximum into ``num_vis``."""
    num_vis = 0
    for j in T.serial(BQ):
        num_vis = T.max(num_vis, T.if_then_else(by * BQ + j < S, visible[row0 + j], 0))
    for j in T.Parallel(BQ):
        vis_shared[j] = T.if_then_else(by * BQ + j < S, visible[row0 + j], 0)


@T.macro
def _cta_range(visible, vis_shared, num_vis: T.Ref, bx, by, bz, S, N, BQ, BC, SPLIT):
    """The CTA's first query row, its entry range ``[c0, c_end)`` cut at the visible entries (counts into
    ``vis_shared`` / ``num_vis``, :func:`_visible_range`) and the key tiles that range takes."""
    row0 = bz * S + by * BQ  # first query row of the CTA
    c0 = bx * SPLIT  # first entry of the CTA
    _visible_range(visible, vis_shared, row0, by, S, BQ, num_vis)
    c_end = T.min(T.min(c0 + SPLIT, N), num_vis)  # entries this CTA scores: [c0, c_end)
    num_tiles = T.ceildiv(T.max(c_end - c0, 0), BC)
    return row0, c0, num_tiles


# The head sum of a tile, per thread, on the wgmma accumulator in its native register order (m64, N = BQ·H: the
# thread holds rows r and r+8, r = 16·warp + lane/4, of columns 8i + 2·(lane%4) + e, e in {0, 1}, at register
# 4i + 2·half + e). Each thread sums its 2·H/8 columns of every (query j, row half) with a chain of fused
# ReLU·w multiply-adds, then the four lanes of a quad reduce-scatter their partials with three shuffles: lane q keeps
# (half = q>>1 and, for BQ = 2, j = q&1). The quad's sum is (p_a + p_{a^2}) + (p_{a^1} + p_{a^3}) at every lane a
# (fp32 addition commutes exactly), so a logit has the same bits for BQ = 1 and BQ = 2 and whatever lane stores it.
HEAD_SUM_SOURCE = """
template <int BQ, int H>
__device__ __forceinline__ float tilev4_head_sum(const float* acc, const float* w) {
  constexpr int I = H / 8;
  float p[BQ][2];
#pragma unroll
  for (int j = 0; j < BQ; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < I; ++i) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s = __fmaf_rn(fmaxf(acc[(j * I + i) * 4 + half * 2 + e], 0.0f), w[(j * I + i) * 2 + e], s);
        }
      }
      p[j][half] = s;
    }
  }
  const int lane = threadIdx.x & 31;
  const bool hi = (lane & 2) != 0;
  float k[BQ];
#pragma unroll
  for (int j = 0; j < BQ; ++j) {
    const float send = hi ? p[j][0] : p[j][1];
    k[j] = (hi ? p[j][1] : p[j][0]) + __shfl_xor_sync(0xffffffffu, send, 2);
  }
  if constexpr (BQ == 2) {
    const bool odd = (lane & 1) != 0;
    const float send = odd ? k[0] : k[1];
    return (odd ? k[1] : k[0]) + __shfl_xor_sync(0xffffffffu, send, 1);
  } else {
    return k[0] + __shfl_xor_sync(0xffffffffu, k[0], 1);
  }
}
"""


def _tile_entry(tx, BQ: int):
    """(query j, entry c of the tile) whose logit this thread holds after :data:`HEAD_SUM_SOURCE`'s head sum, and
    whether it stores it (for BQ = 1 two lanes hold each logit: the even one stores)."""
    lane = tx % 32
    c = (tx // 32) * 16 + lane // 4 + ((lane // 2) % 2) * 8
    if BQ == 2:
        return lane % 2, c, True
    return 0, c, lane % 2 == 0


@T.macro
def _load_head_weights(qw, w_loc, row0, by, S, BQ, H, tx):
    """The thread's head weights (the columns it holds of each query, :data:`HEAD_SUM_SOURCE`); 0 past S."""
    for j, i, e in T.grid(BQ, H // 8, 2):
        w_loc[(j * (H // 8) + i) * 2 + e] = T.if_then_else(
            by * BQ + j < S, qw[row0 + j, i * 8 + (tx % 4) * 2 + e], 0.0)


@T.macro
def _load_key_scale(ks, ks_val: T.Ref, bz, N, col0, BQ, tx):
    """The key scale of the entry this thread stores (:func:`_tile_entry`); plain load, in flight during the wgmma."""
    _, c, _ = _tile_entry(tx, BQ)
    ks_val = T.if_then_else(col0 + c < N, ks[bz * N + col0 + c], 0.0)  # noqa: F841 (a T.Ref)


@T.macro
def _score_tile(acc, w_loc, ks_val: T.Ref, logit: T.Ref, vis_shared, out, row0, col0, by, S, N, BQ, H, tx):
    """A tile's epilogue: the head sum of w · ReLU(q·k) (:data:`HEAD_SUM_SOURCE`) into ``logit``, × key scale, the
    mask and the store of entries ``col0 .. col0 + BC`` (one store a thread)."""
    logit = T.call_extern(T.float32, f"tilev4_head_sum<{BQ}, {H}>", acc.access_ptr("r"), w_loc.access_ptr("r"))
    j, c, stores = _tile_entry(tx, BQ)
    col = col0 + c
    if stores and by * BQ + j < S and col < N:
        out[row0 + j, col] = T.if_then_else(col < vis_shared[j], logit * ks_val, -T.infinity(T.float32))


@T.macro
def _store_hidden(out, row0, col0, by, S, N, BC, BQ):
    """−inf for entries ``col0 .. col0 + BC`` (not visible to any query of the CTA)."""
    for j, c in T.Parallel(BQ, BC):
        col = col0 + c
        if by * BQ + j < S and col < N:
            out[row0 + j, col] = -T.infinity(T.float32)


def _logits_tma_cta(H: int, D: int, BQ: int, BC: int, SPLIT: int, num_stages: int, min_ctas: int, release: str,
                    S, N):
    """The ``tma`` schedule's CTA of :func:`build_indexer_logits`.

    One warpgroup a CTA. Warp 0 keeps ``num_stages`` key tiles in flight by TMA (one
    elected lane issues), each stage on its own ``full`` mbarrier; the warpgroup waits for a stage and runs the
    wgmma, and warp 0 refills the stage with the tile ``num_stages`` ahead once every warp is past it:
    ``release="barrier"``, after the tile's epilogue and a CTA barrier; ``"mbarrier"``, as soon as each warp has
    arrived on the stage's ``empty`` mbarrier after its wgmma (one lane a warp), before warp 0's own epilogue,
    with no CTA barrier in the loop. The automatic shared-memory syncs are off (they put a second CTA barrier
    before each wgmma); the ones the kernel needs, after the visible counts and after the query tile, are
    explicit. Same bits either way (H200, S=4096: BQ=2 is faster with the barrier, BQ=1 with the mbarrier, which
    is what a build takes when ``release`` is left out). No thread computes copy addresses, and the loop stops
    at the CTA's last visible tile (the rest of its range is stored as −inf without a wgmma). Keys past the flat
    ``[B·N, D]`` tensor read as zero (TMA bounds); keys of the next sequence that a last tile reaches are masked
    by the visibility test like any invisible entry.
    """
    NH = BQ * H
    num_blocks = SPLIT // BC
    ST = num_stages

    @T.macro
    def refill(k, k_shared, full, bz, N, c0, it, slot):
        """Warp 0: stage ``slot`` gets the key tile ``num_stages`` ahead of tile ``it`` (one elected lane)."""
        nxt = c0 + (it + ST) * BC
        T.tma_copy(k[bz * N + nxt:bz * N + nxt + BC, 0:D], k_shared[slot, :, :], barrier=full[slot])
        T.barrier_arrive(full[slot])

    @T.macro
    def cta(q, qw, k, ks, visible, out, bx, by, bz):
        q_shared = T.alloc_shared((NH, D), T.float8_e4m3fn)
        T.annotate_min_blocks_per_sm(min_ctas)
        k_shared = T.alloc_shared((ST, BC, D), T.float8_e4m3fn)
        full = T.alloc_barrier([32] * ST)  # warp 0's lanes (+ the TMA bytes)
        if release == "mbarrier":
            empty = T.alloc_barrier([4] * ST)  # one lane of each warp, past its wgmma of the stage
        acc = T.alloc_fragment((BC, NH), T.float32)
        w_loc = T.alloc_local((NH // 4,), T.float32)
        ks_val = T.alloc_var(T.float32)
        logit = T.alloc_var(T.float32)
        vis_shared = T.alloc_shared((BQ,), T.int32)
        num_vis = T.alloc_var(T.int32)
        T.import_source(HEAD_SUM_SOURCE)
        T.annotate_layout({k_shared: make_swizzled_layout(k_shared), q_shared: make_swizzled_layout(q_shared)})
        tx = T.get_thread_binding()

        row0, c0, num_tiles = _cta_range(visible, vis_shared, num_vis, bx, by, bz, S, N, BQ, BC, SPLIT)
        T.sync_threads()  # vis_shared (the automatic shared-memory syncs are off: this and the one below suffice)

        if num_tiles > 0:
            if tx < 32:  # warp 0 issues (one elected lane) and arrives
                for i in T.serial(T.min(num_tiles, ST)):
                    T.tma_copy(k[bz * N + c0 + i * BC:bz * N + c0 + (i + 1) * BC, 0:D], k_shared[i, :, :],
                               barrier=full[i])
                    T.barrier_arrive(full[i])
            T.copy(q[row0 * H, 0], q_shared)
            _load_head_weights(qw, w_loc, row0, by, S, BQ, H, tx)
            T.fence_proxy_async()  # the query tile's plain stores, before the wgmma (async proxy) reads them
            T.sync_threads()
            for it in T.serial(num_tiles):
                slot = it % ST
                # the key scale: a plain load (a TMA map of [B, N] fp32 needs N·4 % 16 == 0), in flight during the
                # wgmma
                _load_key_scale(ks, ks_val, bz, N, c0 + it * BC, BQ, tx)
                T.barrier_wait(full[slot], (it // ST) & 1)
                # [BC, D] @ [BQ·H, D]ᵀ -> [BC, BQ·H]
                T.gemm(k_shared[slot, :, :], q_shared, acc, transpose_B=True, clear_accum=True,
                       policy=T.GemmWarpPolicy.FullRow)
                if release == "mbarrier":
                    if tx % 32 == 0:  # this warp's wgmma has read the stage
                        T.barrier_arrive(empty[slot])
                    if tx < 32 and it + ST < num_tiles:  # refill it once all four warps are past it
                        T.barrier_wait(empty[slot], (it // ST) & 1)
                        refill(k, k_shared, full, bz, N, c0, it, slot)
                _score_tile(acc, w_loc, ks_val, logit, vis_shared, out, row0, c0 + it * BC, by, S, N, BQ, H, tx)
                if release == "barrier":
                    T.sync_threads()  # every warp is past the stage: refill it
                    if tx < 32 and it + ST < num_tiles:
                        refill(k, k_shared, full, bz, N, c0, it, slot)
        for it in T.serial(num_tiles, num_blocks):  # the rest of the range is not visible to any query
            _store_hidden(out, row0, c0 + it * BC, by, S, N, BC, BQ)

    return cta


def _logits_pipelined_cta(H: int, D: int, BQ: int, BC: int, SPLIT: int, num_stages: int, S, N):
    """The ``pipelined`` schedule's CTA: every thread issues cp.async copies of the key tiles, software-pipelined
    over a static trip count."""
    NH = BQ * H
    num_blocks = SPLIT // BC

    @T.macro
    def cta(q, qw, k, ks, visible, out, bx, by, bz):
        q_shared = T.alloc_shared((NH, D), T.float8_e4m3fn)
        k_shared = T.alloc_shared((BC, D), T.float8_e4m3fn)
        acc = T.alloc_fragment((BC, NH), T.float32)
        w_loc = T.alloc_local((NH // 4,), T.float32)
        ks_val = T.alloc_var(T.float32)
        logit = T.alloc_var(T.float32)
        vis_shared = T.alloc_shared((BQ,), T.int32)
        num_vis = T.alloc_var(T.int32)
        T.import_source(HEAD_SUM_SOURCE)
        tx = T.get_thread_binding()

        row0, c0, num_tiles = _cta_range(visible, vis_shared, num_vis, bx, by, bz, S, N, BQ, BC, SPLIT)

        if num_tiles > 0:
            T.copy(q[row0 * H, 0], q_shared)
            _load_head_weights(qw, w_loc, row0, by, S, BQ, H, tx)
            # a static trip count (a dynamic one breaks this TileLang's pipeline epilogue): tiles
            # past the last visible one reload it and store −inf
            for it in T.Pipelined(num_blocks, num_stages=num_stages):
                tile = T.min(it, num_tiles - 1)
                T.copy(k[bz * N + c0 + tile * BC, 0], k_shared)
                _load_key_scale(ks, ks_val, bz, N, c0 + tile * BC, BQ, tx)
                # [BC, D] @ [BQ·H, D]ᵀ -> [BC, BQ·H]
                T.gemm(k_shared, q_shared, acc, transpose_B=True, clear_accum=True,
                       policy=T.GemmWarpPolicy.FullRow)
                _score_tile(acc, w_loc, ks_val, logit, vis_shared, out, row0, c0 + it * BC, by, S, N, BQ, H, tx)
        else:
            for it in T.serial(num_blocks):
                _store_hidden(out, row0, c0 + it * BC, by, S, N, BC, BQ)

    return cta


@register(
    "indexer_logits",
    configs=[{"H": 64, "D": 128}, {"H": 64, "D": 128, "decode": True}, {"H": 8, "D": 128},
             {"H": 8, "D": 128, "decode": True}],
    tags=("indexer", "batch_invariant"),
    space=INDEXER_LOGITS_SPACE,
    bucket=_logits_bucket,
    harness=TuningHarness(_logits_case, _logits_check, sizes=(512,), size_name="queries", batch_slice=_logits_slice),
)
def build_indexer_logits(H: int = 64, D: int = 128, decode: bool = False, BQ: int = 2, BC: int = 64,
                         SPLIT: int = 2048, num_stages: int = 3, threads: int = 128, schedule: str = "tma",
                         min_ctas: int = 1, release: str | None = None):
    """Lightning-indexer logits on FP8 tensor cores: I = s_k · Σ_h w_h · ReLU(k8 · q8_h), masked.

    ``decode`` (S = 1) is the problem key; it takes BQ=1 (:func:`_one_query_per_cta`). Tunable: schedule, BQ
    (1 or 2), SPLIT, num_stages. ``schedule="tma"``: one thread refills the key ring by TMA (mbarriers), the loop
    runs over the visible tiles only; ``"pipelined"``: every thread issues cp.async copies (static trip count).
    Both run the same wgmma and epilogue (:data:`HEAD_SUM_SOURCE`: explicit fused multiply-adds, one order), so
    every build gives the same bits. ``min_ctas`` (tma): CTAs an SM must hold
    (``__launch_bounds__``), which caps the registers (4: 128 a thread). ``release`` (tma; not tuned, follows BQ
    when left out): how a key stage is handed back for its refill, ``"barrier"`` (a CTA barrier after the tile's
    epilogue) or ``"mbarrier"`` (each warp arrives after its wgmma; no CTA barrier in the loop), same bits.
    """
    if schedule not in ("tma", "pipelined"):
        raise ValueError(f"schedule must be 'tma' or 'pipelined', got {schedule!r}")
    if BQ not in (1, 2):
        raise ValueError(f"BQ must be 1 or 2, got {BQ}")
    if min_ctas not in (1, 2, 3, 4):
        raise ValueError(f"min_ctas must be in 1..4, got {min_ctas}")
    if schedule == "pipelined" and min_ctas != 1:
        raise ValueError(f"min_ctas is a knob of the tma schedule, got {min_ctas} with {schedule!r}")
    if release is None:  # the faster one on the H200 at S=4096, N=16384 (same bits): BQ=2 -4 %, BQ=1 +8 %
        release = "mbarrier" if schedule == "tma" and BQ == 1 else "barrier"
    if release not in ("barrier", "mbarrier"):
        raise ValueError(f"release must be 'barrier' or 'mbarrier', got {release!r}")
    if schedule == "pipelined" and release != "barrier":
        raise ValueError(f"release is a knob of the tma schedule, got {release!r} with {schedule!r}")
    _check_logits_shape(H, D, BC, SPLIT)
    if threads != 128:  # the epilogue reads the accumulator of one m64 wgmma warpgroup (HEAD_SUM_SOURCE)
        raise ValueError(f"the logits kernel runs one warpgroup (threads=128), got {threads}")
    B = T.dynamic("B")
    S = T.dynamic("S")
    N = T.dynamic("N")
    if schedule == "tma":
        cta = _logits_tma_cta(H, D, BQ, BC, SPLIT, num_stages, min_ctas, release, S, N)
    else:
        cta = _logits_pipelined_cta(H, D, BQ, BC, SPLIT, num_stages, S, N)

    @T.prim_func
    def indexer_logits_kernel(
        q4: T.Tensor[(B, S, H, D), T.float8_e4m3fn],
        qw3: T.Tensor[(B, S, H), T.float32],  # w · s_q
        k3: T.Tensor[(B, N, D), T.float8_e4m3fn],
        ks2: T.Tensor[(B, N), T.float32],  # s_k
        visible2: T.Tensor[(B, S), T.int32],  # entries c < visible[b, s] are scored
        out3: T.Tensor[(B, S, N), T.float32],
    ):
        T.annotate_pass_configs(_NO_AUTO_SYNC if schedule == "tma" else _NO_WS)
        q = T.reshape(q4, (B * S * H, D))  # flat views: a CTA's rows are one contiguous range
        qw = T.reshape(qw3, (B * S, H))
        k = T.reshape(k3, (B * N, D))
        ks = T.reshape(ks2, (B * N,))
        visible = T.reshape(visible2, (B * S,))
        out = T.reshape(out3, (B * S, N))
        with T.Kernel(T.ceildiv(N, SPLIT), T.ceildiv(S, BQ), B, threads=threads) as (bx, by, bz):
            cta(q, qw, k, ks, visible, out, bx, by, bz)

    return indexer_logits_kernel


# -------------------------------------------------------------------------------------------------- top-k

_TOPK_THREADS = 1024  # the largest CTA size (few long rows run it; see _TOPK_FEW_ROWS_PER_SM)
_TOPK_BPT = 4  # histogram bins a thread owns: a pass reads log2(4 · threads) bits (11 at 512 threads)
_DIGIT_BITS = 12  # of a 1024-thread CTA: (4 · 1024 bins) = 2^12
_TOPK_UNROLL = 8  # scalar row loads a thread has in flight per loop step (tunable; 4 of 16 bytes by default)
_TOPK_CAP = 4096  # keys kept in shared memory (64-bit each); more re-read the row
# Fewer rows than this many per SM run 1024-thread CTAs whatever the tuned CTA size: one CTA a row cannot fill the
# GPU, so a row's speed is what counts (H200, 64 rows of 262144: 0.079 ms at 1024 threads, 0.64 ms at 256; 4096 rows
# of 32768 favour 256-512). The selection is exact whatever the CTA size, so this changes no bit.
_TOPK_FEW_ROWS_PER_SM = 2
_INT32_MIN = -(2**31)


def _order_key(v):
    """fp32 → uint32 in the same order (−0.0 and +0.0 the same key, as the reference's sort treats them)."""
    raw = T.reinterpret(v, T.uint32)
    # zero tested on the bits: a float compare may flush subnormals to zero
    bits = T.if_then_else(T.bitwise_and(raw, T.uint32(0x7FFFFFFF)) == T.uint32(0), T.uint32(0), raw)
    return T.if_then_else(T.shift_right(bits, T.uint32(31)) == T.uint32(1),
                          T.bitwise_not(bits), T.bitwise_or(bits, T.uint32(0x80000000)))


def _entry_key(ukey, c, n, ib, pad):
    """The unique 64-bit key of entry c: ``((ukey << ib) | (n − 1 − c)) << pad`` (larger = selected first)."""
    low = T.cast(n - 1 - c, T.uint64)
    return T.shift_left(T.bitwise_or(T.shift_left(T.cast(ukey, T.uint64), T.cast(ib, T.uint64)), low),
                        T.cast(pad, T.uint64))


def _topk_sort_width(k: int) -> int:
    return 1 << max(1, (k - 1).bit_length())


def _topk_default_threads(k: int) -> int:
    """512 threads (two CTAs an SM; the fastest on the H200 for 4096 rows at k = 512 and 1024), more when the
    bitonic sort needs them."""
    return max(512, _topk_sort_width(k) // 2)


def _topk_slots(k: int, threads: int, unroll: int) -> int:
    """Running maxima a thread keeps in the prefilter pass: about 4·K of them in the CTA (<= unroll)."""
    return max(1, min(8, unroll, 4 * _topk_sort_width(k) // threads))


def _topk_stage_group(entries: int) -> int:
    """Values a thread tests between two drains of its warp's staging slots in the filtered passes (the largest
    divisor of its values of a step up to 8): one group adds at most 32 a value to the <= 31 a drain leaves."""
    return next(g for g in range(min(8, entries), 0, -1) if entries % g == 0)


def _topk_sort_fits(c: Mapping[str, Any]) -> str | None:
    if _topk_sort_width(c["K"]) // 2 > c["threads"]:
        return f"the bitonic sort of {_topk_sort_width(c['K'])} keys needs >= {_topk_sort_width(c['K']) // 2} threads"
    return None


def _topk_default_unroll(vec: int) -> int:
    """8 scalar loads or 4 16-byte loads a thread in flight (16 values: the registers of 4 CTAs of 256)."""
    return _TOPK_UNROLL if vec == 1 else 4


TOPK_SPACE = Space(
    # 1024-thread CTAs (one an SM) were the slowest for 4096 rows at every k (H200); few rows get them anyway
    params={"threads": (256, 512), "unroll": (4, 8), "prefilter": (True, False)},
    constraints=(_topk_sort_fits,),
    # histogram (4 bins per thread), warp totals, the selected keys (two sort buffers), the kept keys, the state,
    # the staging slots of the filtered passes (value and entry, 32·(group + 1) a warp)
    smem_bytes=lambda c: 4 * _TOPK_BPT * c["threads"] + c["threads"] // 8 + 16 * _topk_sort_width(c["K"])
    + 8 * _TOPK_CAP + 20 + c["threads"] // 32 * 8 * 32 * (_topk_stage_group(c["unroll"] * c.get("vec", 1)) + 1),
    heuristic=lambda p: {"threads": _topk_default_threads(p["K"]), "unroll": _topk_default_unroll(p.get("vec", 1)),
                         "prefilter": True},
)
TOPK_TUNE_ENTRIES = 32768  # logits per row in a tuning case; the harness size is the number of rows


def _topk_bucket(problem: Mapping[str, Any]) -> str:
    """Widths K that sort the same number of keys share a config (scalar and 16-byte loads apart)."""
    return f"K<={_topk_sort_width(problem['K'])},vec={problem.get('vec', 1)}"


def _topk_case(problem: Mapping[str, Any], n: int, gen: torch.Generator, device: str, reference: bool,
               entries: int = TOPK_TUNE_ENTRIES) -> TuningCase:
    """``n`` rows of ``entries`` logits shaped like the indexer's (a visible prefix of real-valued scores): normal
    values over the whole row for most rows; every eighth row 7 distinct values (ties everywhere, decided by the
    index), every eighth (another) 10 % −inf, every eighth (another) a random length; the first rows of length
    0, 1, K − 1 and all; an offset. The reference: a stable sort of −logits over the candidates (CPU)."""
    from tilev4.reference.indexer import indexer_topk

    k = problem["K"]
    g = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    logits = torch.randn(n, entries, generator=g, device=device)
    kind = torch.arange(n, device=device) % 8
    ties = kind == 3
    logits[ties] = torch.randint(-3, 4, (int(ties.sum()), entries), generator=g, device=device).float()
    holes = (kind == 5).unsqueeze(1) & (torch.rand(n, entries, generator=g, device=device) < 0.1)
    logits[holes] = -math.inf
    lengths = torch.full((n,), entries, dtype=torch.int32, device=device)
    short = kind == 6
    lengths[short] = torch.randint(0, entries + 1, (int(short.sum()),), generator=g, device=device, dtype=torch.int32)
    edge = torch.tensor([0, 1, k - 1, entries], dtype=torch.int32, device=device).clamp(0, entries)[:n]
    lengths[:edge.numel()] = edge
    out = torch.empty(n, k, dtype=torch.int32, device=device)
    offset = 7
    expected = None
    if reference:
        hidden = torch.arange(entries, device=device) >= lengths.unsqueeze(1)  # [n, entries]
        masked = logits.masked_fill(hidden, -math.inf).cpu()
        expected = (indexer_topk(masked[None], k, offset)[0].to(device),)
    vec = problem.get("vec", 1)
    args = (logits.view(n, entries // vec, vec), lengths, out, offset, _topk_key_bits(entries)[0])
    return TuningCase(args, outputs=(2,), expected=expected, rows=n)


def _topk_check(outputs: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> str | None:
    if not torch.equal(outputs[0], expected[0]):
        bad = int((outputs[0] != expected[0]).any(-1).sum())
        return f"{bad} rows differ from the stable sort of -logits (must be bit-exact)"
    return None


def _topk_slice(case: TuningCase, start: int, stop: int) -> TuningCase:
    logits, lengths, out, offset, ib = case.args
    args = (logits[start:stop].clone(), lengths[start:stop].clone(), torch.empty_like(out[start:stop]), offset, ib)
    return TuningCase(args, outputs=(2,), expected=None, rows=stop - start)


@register(
    "topk_select",
    # V4 (rows of a multiple of 4 entries: 16-byte loads); the scaled-down `small` model (top-32)
    configs=[{"K": 512, "vec": 4}, {"K": 1024, "vec": 4}, {"K": 512}, {"K": 1024}, {"K": 32}],
    tags=("indexer", "batch_invariant"),
    space=TOPK_SPACE,
    bucket=_topk_bucket,
    harness=TuningHarness(_topk_case, _topk_check, sizes=(512, 4096), size_name="R", batch_slice=_topk_slice),
)
def build_topk_select(K: int = 512, vec: int = 1, threads: int = 512, cap: int = _TOPK_CAP,
                      unroll: int = _TOPK_UNROLL, prefilter: bool = True):
    """Per-row top-K of fp32 logits (radix select on a unique 64-bit key, bitonic sort), −inf never chosen.

    ``threads`` (tunable): a power of two in [64, 1024] with ``threads >= sort width / 2``; a pass
    reads ``log2(2·threads)`` bits of the key (2 histogram bins per thread). ``cap``: how many keys are kept
    in shared memory for the later passes (more are searched by re-reading the row; same result).
    ``unroll`` (tunable): row loads a thread has in flight per loop step. ``prefilter`` (tunable): a first
    pass of running maxima bounds the K-th largest value from below, so that only the values above the
    bound are keyed, counted and kept (see the module docstring); off, the first pass histograms every value.
    """
    if K < 1 or K > 2048:
        raise ValueError(f"K must be in [1, 2048], got {K}")
    KP = _topk_sort_width(K)  # sort width, a power of two >= K
    if threads < 64 or threads > 1024 or threads & (threads - 1) or KP // 2 > threads:
        raise ValueError(f"threads must be a power of two in [64, 1024] and >= {KP // 2} (K={K}), got {threads}")
    if cap < KP:
        raise ValueError(f"cap must be >= the sort width {KP} (K={K}), got {cap}")
    if unroll < 1 or unroll > 32:
        raise ValueError(f"unroll must be in [1, 32], got {unroll}")
    if vec not in (1, 4):
        raise ValueError(f"vec must be 1 or 4, got {vec}")
    num_warps = threads // 32
    digit_bits = (_TOPK_BPT * threads).bit_length() - 1
    num_bins = _TOPK_BPT * threads
    BPT = _TOPK_BPT
    max_passes = -(-64 // digit_bits)
    top_shift = 32 - digit_bits
    U = unroll
    V = vec  # floats a load reads (4: 16-byte loads; the row length is then a multiple of 4)
    E = U * V  # entries a thread has in flight per step
    CAP = cap
    M = _topk_slots(K, threads, E)  # running maxima a thread keeps (prefilter)
    G = _topk_stage_group(E)  # values a thread tests between two drains of its warp's staging slots
    QCAP = 32 * (G + 1)  # a warp's staging slots: <= 31 left queued by a drain + 32 a value of a group
    R = T.dynamic("R")
    NV = T.dynamic("NV")
    N = NV * V

    def col(i, e, tx):
        """The entry of a thread's e-th value in step i: V consecutive entries per load, loads ``threads`` apart."""
        return ((i * U + e // V) * threads + tx) * V + e % V
    neg_inf = -T.infinity(T.float32)
    # the signed order of a float's bits (bits ^ 0x7FFFFFFF when negative) of −inf: slots at or below hold nothing
    neg_inf_ord = -2139095041

    @T.macro
    def find_digit(hist, warp_sum, state, need, tx, lane, warp):
        """state[0:3] = (d*, count above d*, count in d*) of the need-th largest key of the histogram
        (d* = −1 when fewer than need are counted). Ends with a barrier."""
        cnt = T.alloc_var(T.int32)
        cnt = 0
        for b in T.unroll(BPT):
            cnt = cnt + hist[BPT * tx + b]
        for st in T.unroll(5):
            below = T.shfl_down(cnt, 1 << st)
            if lane + (1 << st) < 32:
                cnt = cnt + below
        if lane == 0:
            warp_sum[warp] = cnt
        T.sync_threads()
        # the warps above: every warp suffix-scans the warp totals (lane l: warps >= l) and takes lane warp + 1
        wt = T.alloc_var(T.int32)
        wt = 0
        if lane < num_warps:
            wt = warp_sum[lane]
        for st in T.unroll(5):
            below_w = T.shfl_down(wt, 1 << st)
            if lane + (1 << st) < 32:
                wt = wt + below_w
        above = T.shfl_sync(wt, T.min(warp + 1, 31))
        if warp + 1 < num_warps:
            cnt = cnt + above
        # cnt counts the keys in bins >= BPT·tx; walk up the thread's bins
        for b in T.unroll(BPT):
            here = hist[BPT * tx + b]
            if cnt >= need and cnt - here < need:
                state[0] = BPT * tx + b
                state[1] = cnt - here
                state[2] = here
            cnt = cnt - here
        T.sync_threads()

    def digit_floor(d):
        """The smallest float whose top digit is >= d: a one-compare pre-test of the exact digit test
        (−inf, no pre-test, when d <= 0 or that boundary is 0, subnormal or NaN)."""
        klo = T.shift_left(T.cast(T.max(d, 0), T.uint32), T.uint32(top_shift))
        fbits = T.if_then_else(T.shift_right(klo, T.uint32(31)) == T.uint32(1),
                               T.bitwise_and(klo, T.uint32(0x7FFFFFFF)), T.bitwise_not(klo))
        fexp = T.bitwise_and(fbits, T.uint32(0x7F800000))
        return T.if_then_else(T.And(d > 0, T.And(fexp != T.uint32(0), fexp != T.uint32(0x7F800000))),
                              T.reinterpret(fbits, T.float32), neg_inf)

    RK = max(1, KP // threads)  # keys a thread holds in the sort (threads >= KP / 2)
    steps = []  # (size, stride, shared-memory buffer) of each compare-exchange step
    n_smem = 0
    for lsize in range(KP.bit_length() - 1):
        for lstride in range(lsize + 1):
            stride = 1 << (lsize - lstride)
            use = -1
            if 32 <= stride < threads:
                use = n_smem % 2
                n_smem += 1
            steps.append((2 << lsize, stride, use))

    @T.macro
    def load_step(logits, vals, r, i, tx, row_len):
        """vals[j·V + v] = entry col(i, j·V + v) of row r, −inf past its length: U loads of V floats in flight."""
        for j in T.unroll(U):
            if (i * U + j) * threads + tx < NV:
                for v in T.vectorized(V):
                    vals[j * V + v] = logits[r, (i * U + j) * threads + tx, v]
            else:
                for v in T.vectorized(V):
                    vals[j * V + v] = neg_inf
            for v in T.unroll(V):
                if ((i * U + j) * threads + tx) * V + v >= row_len:
                    vals[j * V + v] = neg_inf

    @T.macro
    def stage_group(vals, i, jg, tx, lane, warp, f_lo, stage_val, stage_col, qn: T.Ref):
        """Queue the values ``jg·G .. jg·G + G − 1`` of step ``i`` that pass the pre-test (> −inf and >= ``f_lo``)
        in the warp's staging slots: a ballot a value, and the lanes that pass write (value, entry) to the warp's
        next free slots. :func:`drain` then keys them with every lane of the warp busy, instead of each rare
        passing value holding up the whole warp."""
        for e in T.unroll(jg * G, jg * G + G):
            hit = T.if_then_else(T.And(vals[e] > neg_inf, vals[e] >= f_lo), 1, 0)
            bal = T.cast(T.ballot_sync(hit), T.uint32)
            if bal != T.uint32(0):
                if hit == 1:
                    below = T.bitwise_and(bal, T.shift_left(T.uint32(1), T.cast(lane, T.uint32)) - T.uint32(1))
                    slot = warp * QCAP + qn + T.call_extern(T.int32, "__popc", below)
                    stage_val[slot] = vals[e]
                    stage_col[slot] = col(i, e, tx)
                qn = qn + T.call_extern(T.int32, "__popc", bal)

    @T.macro
    def drain(mode, final, stage_val, stage_col, qn: T.Ref, lane, warp, hist, state, sel, cand, bound, use_cand, ib,
              pad):
        """Key the warp's queued values, 32 at a time from the top of its slots: whole rounds of 32 (the rest stay
        at the bottom), or all of them when ``final``. ``mode`` "keep" (prefilter pass): a value of top digit
        >= ``bound`` is counted and kept; "select": above digit ``bound`` it is selected, in it kept when
        ``use_cand``."""
        n_rounds = T.ceildiv(qn, 32) if final else qn // 32
        if n_rounds > 0:
            T.sync_warp()
            for rr in T.serial(n_rounds):
                slot = qn - 32 * (rr + 1) + lane
                if slot >= 0:
                    ukey = _order_key(stage_val[warp * QCAP + slot])
                    dig = T.cast(T.shift_right(ukey, T.uint32(top_shift)), T.int32)
                    if dig >= bound:
                        key = _entry_key(ukey, stage_col[warp * QCAP + slot], N, ib, pad)
                        if mode == "keep":
                            T.atomic_add(hist[dig], 1)
                            part = T.atomic_add(state[4], 1, return_prev=True)
                            if part < CAP:
                                cand[part] = key
                        elif dig > bound:
                            sel[T.atomic_add(state[3], 1, return_prev=True)] = key
                        elif use_cand == 1:
                            cand[T.atomic_add(state[4], 1, return_prev=True)] = key
            T.sync_warp()
            qn = T.max(qn - 32 * n_rounds, 0)

    @T.macro
    def filtered_pass(mode, logits, vals, r, tx, row_len, num_steps, lane, warp, f_lo: T.Ref, stage_val,
                      stage_col, qn: T.Ref, hist, state, sel, cand, bound: T.Ref, use_cand: T.Ref, ib, pad):
        """A pass over the row that keys only the values passing the pre-test ``>= f_lo``: queued a group of loads
        at a time (:func:`stage_group`) and keyed a warp's 32 at a time (:func:`drain`, ``mode``), the rest at
        the end."""
        qn = 0
        for i in T.serial(num_steps):
            load_step(logits, vals, r, i, tx, row_len)
            for jg in T.unroll(E // G):
                stage_group(vals, i, jg, tx, lane, warp, f_lo, stage_val, stage_col, qn)
                drain(mode, False, stage_val, stage_col, qn, lane, warp, hist, state, sel, cand, bound, use_cand,
                      ib, pad)
        drain(mode, True, stage_val, stage_col, qn, lane, warp, hist, state, sel, cand, bound, use_cand, ib, pad)

    @T.macro
    def sort_step(keys, sel, sel2, tx, size, stride, buf):
        """One bitonic compare-exchange at distance ``stride`` inside blocks of ``size`` (descending when
        the position's ``size`` bit is 0): the lower position keeps the larger key there."""
        if stride >= threads:  # RK = 2, stride = threads: the partner is the thread's other key
            hi = T.max(keys[0], keys[1])
            keys[1] = T.min(keys[0], keys[1])
            keys[0] = hi
        elif stride >= 32:
            for i in T.unroll(RK):
                if i * threads + tx < KP:
                    if buf == 0:
                        sel2[i * threads + tx] = keys[i]
                    else:
                        sel[i * threads + tx] = keys[i]
            T.sync_threads()
            for i in T.unroll(RK):
                if i * threads + tx < KP:
                    other = T.alloc_var(T.uint64)
                    if buf == 0:
                        other = sel2[T.bitwise_xor(i * threads + tx, stride)]
                    else:
                        other = sel[T.bitwise_xor(i * threads + tx, stride)]
                    keys[i] = T.if_then_else(
                        (T.bitwise_and(i * threads + tx, stride) == 0) == (T.bitwise_and(i * threads + tx, size) == 0),
                        T.max(keys[i], other), T.min(keys[i], other))
        else:
            for i in T.unroll(RK):
                other = T.shfl_xor(keys[i], stride)
                keys[i] = T.if_then_else(
                    (T.bitwise_and(i * threads + tx, stride) == 0) == (T.bitwise_and(i * threads + tx, size) == 0),
                    T.max(keys[i], other), T.min(keys[i], other))

    @T.macro
    def count_digit(hist, part, digit, peers, lane):
        """hist[digit] += 1 for every lane with ``part``: one atomic per group of equal digits in the warp (every
        lane takes part in the vote; lanes without a key carry digit 0xFFFFFFFF)."""
        peers = T.match_any_sync(digit)
        if part == 1:
            if T.bitwise_and(peers, T.shift_left(T.uint32(1), T.cast(lane, T.uint32)) - T.uint32(1)) == T.uint32(0):
                T.atomic_add(hist[T.cast(digit, T.int32)], T.call_extern(T.int32, "__popc", peers))

    @T.macro
    def digit_histogram(cand, hist, n_keys, prefix, shift, tx, lane):
        """hist[d] += the kept keys whose digits above ``shift`` are ``prefix`` and whose digit at ``shift``
        is d: one atomic per group of equal digits in a warp."""
        part = T.alloc_var(T.int32)
        digit = T.alloc_var(T.uint32)
        peers = T.alloc_var(T.uint32)
        key = T.alloc_var(T.uint64)
        for i in T.serial(T.ceildiv(n_keys, threads)):
            part = 0
            digit = T.uint32(0xFFFFFFFF)
            if i * threads + tx < n_keys:
                key = cand[i * threads + tx]
                if T.shift_right(key, T.cast(shift + digit_bits, T.uint64)) == prefix:
                    part = 1
                    digit = T.cast(T.bitwise_and(T.shift_right(key, T.cast(shift, T.uint64)),
                                                 T.uint64(num_bins - 1)), T.uint32)
            count_digit(hist, part, digit, peers, lane)

    @T.prim_func
    def topk_select_kernel(
        logits: T.Tensor[(R, NV, V), T.float32],  # [R, N] viewed as loads of V floats
        lengths: T.Tensor[(R,), T.int32],  # entries c >= lengths[r] are not candidates
        out: T.Tensor[(R, K), T.int32],
        offset: T.int32,  # added to every selected index
        ib: T.int32,  # index bits: N − 1 < 2^ib
    ):
        T.annotate_pass_configs(_NO_AUTO_SYNC)
        with T.Kernel(R, threads=threads) as r:
            # 64 registers a thread: two 512-thread CTAs share an SM, one loading its row while the other sorts
            T.annotate_min_blocks_per_sm(max(1, 1024 // threads))
            tx = T.get_thread_binding()
            hist = T.alloc_shared((num_bins,), T.int32)
            warp_sum = T.alloc_shared((num_warps,), T.int32)
            sel = T.alloc_shared((KP,), T.uint64)
            sel2 = T.alloc_shared((KP,), T.uint64)  # the sort's second exchange buffer
            cand = T.alloc_shared((CAP,), T.uint64)
            stage_val = T.alloc_shared((num_warps * QCAP,), T.float32)  # the filtered passes' queued values
            stage_col = T.alloc_shared((num_warps * QCAP,), T.int32)  # and their entries
            keys = T.alloc_local((RK,), T.uint64)
            # [d*, count above d*, count in d*, selected keys, kept keys]
            state = T.alloc_shared((5,), T.int32)
            vals = T.alloc_local((E,), T.float32)
            slots = T.alloc_local((M,), T.int32)
            prefix = T.alloc_var(T.uint64)
            need = T.alloc_var(T.int32)
            level = T.alloc_var(T.int32)
            done = T.alloc_var(T.int32)
            thr = T.alloc_var(T.int32)
            d0 = T.alloc_var(T.int32)
            f_lo = T.alloc_var(T.float32)
            use_cand = T.alloc_var(T.int32)
            superset = T.alloc_var(T.int32)
            n_cand = T.alloc_var(T.int32)
            part = T.alloc_var(T.int32)
            digit = T.alloc_var(T.uint32)
            peers = T.alloc_var(T.uint32)
            ukey = T.alloc_var(T.uint32)
            key = T.alloc_var(T.uint64)
            raw = T.alloc_var(T.int32)
            qn = T.alloc_var(T.int32)  # values queued in the warp's staging slots (the same in every lane)

            lane = tx % 32
            warp = tx // 32
            pad = (digit_bits - (32 + ib) % digit_bits) % digit_bits
            total_bits = 32 + ib + pad
            num_passes = total_bits // digit_bits
            row_len = T.max(T.min(lengths[r], N), 0)
            num_steps = T.ceildiv(row_len, threads * E)

            for i in T.serial(KP // threads + 1):
                if i * threads + tx < KP:
                    sel[i * threads + tx] = T.uint64(0)
            for b in T.unroll(BPT):
                hist[BPT * tx + b] = 0
            if tx == 0:
                state[0] = -1
                state[3] = 0
                state[4] = 0
            T.sync_threads()
            need = K
            superset = 0
            if prefilter:
                # pass 0 (global): M running maxima a thread (signed order of the bits: exact, no float flush),
                # the top digits of all threads' maxima histogrammed. The need-th largest digit d0 is a lower
                # bound: at least K distinct entries (the maxima counted in bins >= d0) have a top digit >= d0.
                for m in T.unroll(M):
                    slots[m] = _INT32_MIN
                for i in T.serial(num_steps):
                    load_step(logits, vals, r, i, tx, row_len)
                    for j in T.unroll(E):
                        raw = T.reinterpret(vals[j], T.int32)
                        raw = T.bitwise_xor(raw, T.bitwise_and(T.shift_right(raw, 31), 0x7FFFFFFF))
                        slots[j % M] = T.max(slots[j % M], raw)
                for m in T.unroll(M):
                    if slots[m] > neg_inf_ord:  # −0 is counted as the largest negative value: a lower bound
                        T.atomic_add(hist[T.cast(T.shift_right(T.bitwise_xor(T.cast(slots[m], T.uint32),
                                                                             T.uint32(0x80000000)),
                                                               T.uint32(top_shift)), T.int32)], 1)
                T.sync_threads()
                find_digit(hist, warp_sum, state, need, tx, lane, warp)
                d0 = T.max(state[0], 0)  # fewer than K maxima: no bound
                f_lo = digit_floor(d0)
                for b in T.unroll(BPT):
                    hist[BPT * tx + b] = 0
                T.sync_threads()
                if tx == 0:
                    state[0] = -1
                # pass 1 (global): the entries with top digit >= d0 are counted by top digit and kept (up to CAP)
                filtered_pass("keep", logits, vals, r, tx, row_len, num_steps, lane, warp, f_lo, stage_val,
                              stage_col, qn, hist, state, sel, cand, d0, use_cand, ib, pad)
            else:
                # pass 1 (global): histogram of the top digit of every value key
                for i in T.serial(num_steps):
                    load_step(logits, vals, r, i, tx, row_len)
                    for j in T.unroll(E):
                        if vals[j] > neg_inf:
                            T.atomic_add(hist[T.cast(T.shift_right(_order_key(vals[j]), T.uint32(top_shift)),
                                                     T.int32)], 1)
            T.sync_threads()
            find_digit(hist, warp_sum, state, need, tx, lane, warp)
            if prefilter:
                # every entry of top digit >= d0 is kept: the later passes and the selection read only those
                if state[4] <= CAP:
                    superset = 1
            n_cand = state[4]
            prefix = T.uint64(0)
            level = total_bits
            done = 0
            use_cand = superset
            thr = state[0]
            if thr < 0:  # fewer candidates than K: every candidate is selected
                done = 1
            else:
                need = need - state[1]
                prefix = T.cast(thr, T.uint64)
                level = total_bits - digit_bits
                if state[2] == need:
                    done = 1
                if state[2] <= CAP:
                    use_cand = 1
            f_lo = digit_floor(thr)
            T.sync_threads()

            if superset == 0:
                # pass 2 (global): keys above the threshold digit are selected, the threshold bin is kept
                if tx == 0:
                    state[4] = 0
                T.sync_threads()
                filtered_pass("select", logits, vals, r, tx, row_len, num_steps, lane, warp, f_lo, stage_val,
                              stage_col, qn, hist, state, sel, cand, thr, use_cand, ib, pad)
                T.sync_threads()
                n_cand = state[4]

            # more digits, over the kept keys (shared memory) or, when they did not fit, the row again
            for p in T.serial(max_passes - 1):
                if done == 0 and p + 1 < num_passes:
                    shift = total_bits - (p + 2) * digit_bits
                    for b in T.unroll(BPT):
                        hist[BPT * tx + b] = 0
                    if tx == 0:
                        state[0] = -1
                    T.sync_threads()
                    if use_cand == 1:
                        digit_histogram(cand, hist, n_cand, prefix, shift, tx, lane)
                    else:
                        for i in T.serial(num_steps):
                            load_step(logits, vals, r, i, tx, row_len)
                            for j in T.unroll(E):
                                part = 0
                                digit = T.uint32(0xFFFFFFFF)
                                if vals[j] > neg_inf:
                                    key = _entry_key(_order_key(vals[j]), col(i, j, tx), N, ib, pad)
                                    if T.shift_right(key, T.cast(shift + digit_bits, T.uint64)) == prefix:
                                        part = 1
                                        digit = T.cast(T.bitwise_and(T.shift_right(key, T.cast(shift, T.uint64)),
                                                                     T.uint64(num_bins - 1)), T.uint32)
                                count_digit(hist, part, digit, peers, lane)
                    T.sync_threads()
                    find_digit(hist, warp_sum, state, need, tx, lane, warp)
                    need = need - state[1]
                    prefix = T.bitwise_or(T.shift_left(prefix, T.uint64(digit_bits)), T.cast(state[0], T.uint64))
                    level = shift
                    if state[2] == need:
                        done = 1
                    T.sync_threads()

            # the selected kept keys: the threshold bin's, or (superset) every kept key at or above the prefix
            if use_cand == 1:
                for i in T.serial(T.ceildiv(n_cand, threads)):
                    if i * threads + tx < n_cand:
                        key = cand[i * threads + tx]
                        if T.shift_right(key, T.cast(level, T.uint64)) >= prefix:
                            sel[T.atomic_add(state[3], 1, return_prev=True)] = key
            elif thr >= 0:
                for i in T.serial(num_steps):
                    load_step(logits, vals, r, i, tx, row_len)
                    for j in T.unroll(E):
                        if vals[j] > neg_inf:
                            ukey = _order_key(vals[j])
                            if T.cast(T.shift_right(ukey, T.uint32(top_shift)), T.int32) == thr:
                                key = _entry_key(ukey, col(i, j, tx), N, ib, pad)
                                if T.shift_right(key, T.cast(level, T.uint64)) >= prefix:
                                    sel[T.atomic_add(state[3], 1, return_prev=True)] = key
            T.sync_threads()
            # bitonic sort, descending: position p = tx + i·threads holds keys[i]; a compare-exchange partner
            # at distance < 32 is a lane of the same warp (shuffle), further ones go through shared memory
            # (two buffers, alternating: one barrier a step); the RK = 2 step at distance `threads` stays
            # in the thread. Positions >= KP (threads > KP) hold 0 and only pair among themselves.
            for i in T.unroll(RK):
                keys[i] = T.uint64(0)
                if i * threads + tx < KP:
                    keys[i] = sel[i * threads + tx]
            for size, stride, buf in steps:  # a Python loop: one compare-exchange step each, unrolled here
                sort_step(keys, sel, sel2, tx, size, stride, buf)
            for i in T.unroll(RK):
                if i * threads + tx < K:
                    out[r, i * threads + tx] = T.if_then_else(
                        keys[i] == T.uint64(0), -1,
                        N - 1 - T.cast(T.bitwise_and(T.shift_right(keys[i], T.cast(pad, T.uint64)),
                                                     T.shift_left(T.uint64(1), T.cast(ib, T.uint64)) - T.uint64(1)),
                                       T.int32) + offset)

    return topk_select_kernel


# ------------------------------------------------------------------------------------------------- public


def indexer_fp8_cast(x: torch.Tensor, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4-simulated indexer values → FP8 e4m3 rows with one power-of-two scale per row (exactly).

    Args:
        x: [..., D] fp32/bf16/fp16, e.g. the prepared queries ``[B, S, H, D]``
            (:func:`tilev4.reference.indexer_prepare_queries`) or the indexer keys ``[B, N, D]``.
        exact: if True (default), raise ``ValueError`` when some value is not exactly
            ``x8 · scale`` (an FP4 block more than 2^16 below the row's largest; not an FP4 value).

    Returns:
        ``(x8, scale)``: x8 float8_e4m3fn [..., D], scale fp32 [...], ``scale = 2^ceil(log2(amax/448))``
        per row (amax floored at 2^-100; a zero row gets a tiny scale and zeros), ``x = x8 · scale``.
    """
    check_tensor("x", x, dtype=_FLOATS)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {list(x.shape)}")
    xf = x.float()
    if not capturing() and not torch.isfinite(xf).all():
        raise ValueError("x must be finite")
    amax = xf.abs().amax(-1).clamp_min(2.0**-100)  # [...]
    # the smallest power of two with 448 · scale >= amax (frexp: amax = m · 2^e, m in [0.5, 1))
    mant, exp = torch.frexp(amax / FP8_ROW_MAX)
    exp = torch.where(mant == 0.5, exp - 1, exp)  # an exact power of two
    scale = torch.ldexp(torch.ones_like(amax), exp)  # [...]
    x8 = (xf / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    if exact:
        back = x8.float() * scale.unsqueeze(-1)
        bad = back != xf
        if bad.any():
            where = bad.nonzero()[0].tolist()
            raise ValueError(f"x is not exactly representable as FP8 e4m3 × a per-row power-of-two scale "
                             f"(first at {where}: {float(xf[tuple(where)])!r}); pass exact=False to round")
    return x8, scale


def _logits_problem(S: int, H: int = 64, D: int = 128) -> dict[str, Any]:
    """The compiled problem (no tunables): decode (S = 1) and prefill are tuned apart; every build gives the same
    bits (:data:`HEAD_SUM_SOURCE`)."""
    return {"H": H, "D": D, "decode": S == 1}


@register(
    "indexer_logits_prep",
    # the model's prefill and decode (int64 positions, fp32 w) and the benchmark's; others compile on first use
    configs=[{"pos_dtype": "int64"}, {"pos_dtype": "int64", "k_lens_dtype": "int64"}, {}],
    tags=("indexer", "batch_invariant"),
)
def build_indexer_logits_prep(ratio: int = 4, pos_dtype: str = "int32", w_dtype: str = "float32",
                              k_lens_dtype: str = "none", threads: int = 256):
    """The logits kernel's per-query inputs in one launch (instead of a chain of small torch ops).

    ``visible[b, s] = min((pos + 1) // ratio, cap)`` (floor division; ``cap = min(k_lens[b], N)``, or ``N``
    without ``k_lens``) and ``qw[b, s, h] = float(w) · q_scale`` (the query scale folded into the head weight:
    one fp32 product, as the torch expression computes it). A thread takes one ``(b, s, h)``; the thread of
    ``h = 0`` also writes ``visible``. Not tuned.
    """
    if ratio not in _RATIOS:
        raise ValueError(f"ratio must be one of {_RATIOS}, got {ratio}")
    for name, value, allowed in (("pos_dtype", pos_dtype, ("int32", "int64")),
                                 ("w_dtype", w_dtype, ("float32", "bfloat16", "float16")),
                                 ("k_lens_dtype", k_lens_dtype, ("none", "int32", "int64"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    B, S, H = T.dynamic("B"), T.dynamic("S"), T.dynamic("H")
    has_lens = k_lens_dtype != "none"
    lens_dt = k_lens_dtype if has_lens else "int32"

    @T.prim_func
    def indexer_logits_prep_kernel(
        positions: T.Tensor[(B, S), pos_dtype],
        w: T.Tensor[(B, S, H), w_dtype],
        q_scale: T.Tensor[(B, S, H), T.float32],
        k_lens: T.Tensor[(B,), lens_dt],  # ignored without k_lens (any [B] int tensor)
        n: T.int32,
        visible: T.Tensor[(B, S), T.int32],
        qw: T.Tensor[(B, S, H), T.float32],
    ):
        pos = T.reshape(positions, (B * S,))  # flat views: thread i takes element i of qw
        wf = T.reshape(w, (B * S * H,))
        qs = T.reshape(q_scale, (B * S * H,))
        vis_out = T.reshape(visible, (B * S,))
        qw_out = T.reshape(qw, (B * S * H,))
        with T.Kernel(T.ceildiv(B * S * H, threads), threads=threads) as bx:
            i = bx * threads + T.get_thread_binding()
            if i < B * S * H:
                qw_out[i] = T.cast(wf[i], T.float32) * qs[i]
                if T.truncmod(i, H) == 0:
                    row = T.truncdiv(i, H)
                    vis = T.floordiv(T.cast(pos[row], T.int64) + 1, ratio)  # floor: a negative position sees nothing
                    cap = T.cast(n, T.int64)
                    if has_lens:
                        cap = T.min(T.cast(k_lens[T.truncdiv(row, S)], T.int64), cap)
                    vis_out[row] = T.cast(T.min(vis, cap), T.int32)

    return indexer_logits_prep_kernel


def _dtype_name(dtype: torch.dtype) -> str:
    """``torch.int64`` → ``"int64"``: the dtype names the builders take."""
    return str(dtype).removeprefix("torch.")


def _logits_inputs(positions: torch.Tensor, w: torch.Tensor, q_scale: torch.Tensor, ratio: int, n: int,
                   k_lens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(visible, qw)`` of :func:`build_indexer_logits_prep`, one launch; equal to
    ``(_visible_counts(positions, ratio, n, k_lens), w.float() * q_scale)``."""
    b, s, h = w.shape
    visible = torch.empty(b, s, dtype=torch.int32, device=w.device)
    qw = torch.empty(b, s, h, dtype=torch.float32, device=w.device)
    config = {"ratio": ratio, "pos_dtype": _dtype_name(positions.dtype), "w_dtype": _dtype_name(w.dtype),
              "k_lens_dtype": "none" if k_lens is None else _dtype_name(k_lens.dtype)}
    lens = visible.view(-1)[:b] if k_lens is None else k_lens.contiguous()  # without k_lens: never read
    compile_kernel("indexer_logits_prep", config)(positions.contiguous(), w.contiguous(), q_scale, lens, n, visible,
                                                  qw)
    return visible, qw


def _visible_counts(positions: torch.Tensor, ratio: int, n: int, k_lens: torch.Tensor | None) -> torch.Tensor:
    """int32 [B, S]: min((pos + 1) // ratio, k_lens[b] (or N))."""
    vis = torch.div(positions.long() + 1, ratio, rounding_mode="floor")  # [B, S]
    cap = torch.full_like(vis[:, :1], n) if k_lens is None else k_lens.long().clamp_max(n).unsqueeze(1)
    return torch.minimum(vis, cap).to(torch.int32)


def indexer_logits(
    q8: torch.Tensor,
    q_scale: torch.Tensor,
    w: torch.Tensor,
    k8: torch.Tensor,
    k_scale: torch.Tensor,
    positions: torch.Tensor,
    *,
    ratio: int = 4,
    k_lens: torch.Tensor | None = None,
    batch_invariant: bool = False,
    out: torch.Tensor | None = None,
    return_visible: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Lightning-indexer logits ``I[b, s, c] = Σ_h w · ReLU(q_I · K_I[c])`` on FP8 tensor cores.

    Prefill is ``B = 1`` (S queries of one sequence), decode is ``S = 1`` (a ragged batch: ``k8`` padded to
    the longest sequence, ``k_lens`` the valid entries of each).

    Args:
        q8: float8_e4m3fn [B, S, H, D=128] (H: 64 in V4; 8, 16 or 32 for scaled-down models), q_scale: fp32
            [B, S, H] — the prepared queries as
            :func:`indexer_fp8_cast` stores them.
        w: fp32/bf16/fp16 [B, S, H], the head weights (already scaled by the caller).
        k8: float8_e4m3fn [B, N, D], k_scale: fp32 [B, N] — the compressed indexer keys (same cast).
        positions: int32/int64 [B, S], absolute position of each query (>= 0; not checked on the
            device, to stay free of host syncs: a negative position sees nothing).
        ratio: compression ratio m (4 for CSA; 128 accepted): entry c is visible iff c < (pos+1)//m.
        k_lens: optional int32/int64 [B], valid entries per sequence (<= N); entries past it are hidden.
        batch_invariant: accepted for symmetry with the other ops; every build is batch-invariant (below), so it
            changes nothing.
        out: optional fp32 [B, S, N] contiguous output.
        return_visible: also return the int32 [B, S] visible-entry counts the mask used.

    Returns:
        fp32 [B, S, N] (with ``return_visible``, ``(logits, visible)``); −inf where not visible. Equal to
        :func:`tilev4.reference.indexer_scores` of the dequantised inputs up to the fp32 order of the 64-head sum.
        A query's row never depends on B, S, the other queries or the tuned config: every build sums the heads in
        the same order.
    """
    check_tensor("q8", q8, dtype=torch.float8_e4m3fn, ndim=4, contiguous=True)
    b, s, h, d = q8.shape
    if h not in LOGITS_HEADS or d != 128:
        raise ValueError(f"q8 must have H in {LOGITS_HEADS} heads of D=128, got H={h}, D={d}")
    check_tensor("q_scale", q_scale, dtype=torch.float32, shape=(b, s, h), contiguous=True)
    check_tensor("w", w, dtype=_FLOATS, shape=(b, s, h))
    check_tensor("k8", k8, dtype=torch.float8_e4m3fn, ndim=3, contiguous=True)
    n = k8.shape[1]
    if k8.shape[0] != b or k8.shape[2] != d:
        raise ValueError(f"k8 must have shape [{b}, *, {d}], got {list(k8.shape)}")
    check_tensor("k_scale", k_scale, dtype=torch.float32, shape=(b, n), contiguous=True)
    check_tensor("positions", positions, dtype=(torch.int32, torch.int64), shape=(b, s))
    check_int("ratio", ratio, choices=_RATIOS)
    if k_lens is not None:
        check_tensor("k_lens", k_lens, dtype=(torch.int32, torch.int64), shape=(b,))
    check_same_device(q8=q8, q_scale=q_scale, w=w, k8=k8, k_scale=k_scale, positions=positions, k_lens=k_lens)
    check_aligned("k8", k8)  # the keys are read by TMA
    if q8.device.type != "cuda":
        raise ValueError(f"q8 must be a CUDA tensor, got device {q8.device}")
    if out is None:
        out = torch.empty(b, s, n, dtype=torch.float32, device=q8.device)
    else:
        check_tensor("out", out, dtype=torch.float32, shape=(b, s, n), contiguous=True, device=q8.device)
    if out.numel() == 0:
        return (out, _visible_counts(positions, ratio, n, k_lens)) if return_visible else out
    del batch_invariant  # every build is batch-invariant
    problem = _logits_problem(s, h, d)
    bq = 1  # the query-block grid dim is ceil(S / BQ): only a long S needs the resolved (tuned) BQ
    if s > _MAX_GRID_YZ:
        bq = dict(resolve_config("indexer_logits", problem).items)["BQ"]
    if b > _MAX_GRID_YZ or -(-s // bq) > _MAX_GRID_YZ:
        raise ValueError(f"q8: B={b} and ceil(S/BQ) for S={s}, BQ={bq} must be <= {_MAX_GRID_YZ}")
    # [B, S] visible entries and [B, S, H] w · s_q (the query scale folded into the head weight), one launch
    visible, qw = _logits_inputs(positions, w, q_scale, ratio, n, k_lens)
    compile_kernel("indexer_logits", problem)(q8, qw, k8, k_scale, visible, out)
    if return_visible:
        return out, visible
    return out


_MAX_TOPK_N = 1 << 23  # the 64-bit key holds 32 value bits + 23 index bits (+ padding to 5 digits)


def _topk_key_bits(n: int, digit_bits: int = _DIGIT_BITS) -> tuple[int, int]:
    """(IB, pad): index bits of N − 1 and the padding that makes 32 + IB + pad a whole number of digits
    (the kernel derives pad from IB the same way, for its own digit width)."""
    ib = max(n - 1, 0).bit_length()
    return ib, (-(32 + ib)) % digit_bits


def topk_select(
    logits: torch.Tensor,
    k: int,
    *,
    lengths: torch.Tensor | None = None,
    offset: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row top-k indices of a logits matrix, ordered by value descending, ties by the smaller index.

    Args:
        logits: fp32 [R, N] (or [..., N], flattened to rows), contiguous, CUDA; N <= 2^23. −inf entries
            are never selected; NaN is not allowed (such an entry is treated as −inf, unchecked).
        k: int, one of the compiled widths (512, 1024) or any int in [1, 2048] (compiled on first use).
        lengths: optional int32/int64 [R] (or [...]): only entries ``c < lengths[r]`` are candidates
            (default N).
        offset: int >= 0 added to every selected index; −1 slots stay −1.
        out: optional int32 [R, k] (or [..., k]) contiguous output.

    Returns:
        int32 [..., k]: the ``min(k, #candidates)`` selected indices + offset, then −1 — bit-exactly
        ``torch.sort(-logits, stable=True)`` restricted to the candidates
        (:func:`tilev4.reference.indexer_topk`). Each row is computed alone (batch-invariant).
    """
    check_tensor("logits", logits, dtype=torch.float32, contiguous=True)
    if logits.dim() < 1:
        raise ValueError("logits must have at least 1 dim, got a scalar")
    check_int("k", k, min_value=1)
    if k > 2048:
        raise ValueError(f"k must be <= 2048, got {k}")
    check_int("offset", offset, min_value=0)
    lead, n = tuple(logits.shape[:-1]), logits.shape[-1]
    if n > _MAX_TOPK_N:
        raise ValueError(f"logits: N must be <= {_MAX_TOPK_N}, got {n}")
    if offset + n > 2**31 - 1:
        raise ValueError(f"offset + N must fit int32, got {offset + n}")
    if lengths is not None:
        check_tensor("lengths", lengths, dtype=(torch.int32, torch.int64), shape=lead)
        check_same_device(logits=logits, lengths=lengths)
    if logits.device.type != "cuda":
        raise ValueError(f"logits must be a CUDA tensor, got device {logits.device}")
    if out is None:
        out = torch.empty(*lead, k, dtype=torch.int32, device=logits.device)
    else:
        check_tensor("out", out, dtype=torch.int32, shape=(*lead, k), contiguous=True, device=logits.device)
    rows = math.prod(lead)
    if rows == 0:
        return out
    if n == 0:
        return out.fill_(-1)
    if lengths is None:
        lens = torch.full((rows,), n, dtype=torch.int32, device=logits.device)
    else:
        lens = lengths.reshape(rows).clamp(0, n).to(torch.int32)
    ib, _ = _topk_key_bits(n)
    vec = 4 if n % 4 == 0 and logits.data_ptr() % 16 == 0 else 1  # 16-byte loads when every row is aligned
    config: dict[str, Any] = {"K": k, "vec": vec}
    if rows < _TOPK_FEW_ROWS_PER_SM * _sm_count(logits.device):
        config["threads"] = _TOPK_THREADS  # few long rows (decode): the widest CTA (see _TOPK_FEW_ROWS_PER_SM)
    compile_kernel("topk_select", config)(logits.view(rows, n // vec, vec), lens, out.view(rows, k), offset, ib)
    return out


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def indexer_topk(
    q8: torch.Tensor,
    q_scale: torch.Tensor,
    w: torch.Tensor,
    k8: torch.Tensor,
    k_scale: torch.Tensor,
    positions: torch.Tensor,
    top_k: int,
    *,
    ratio: int = 4,
    k_lens: torch.Tensor | None = None,
    offset: int = 0,
    batch_invariant: bool = False,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The lightning indexer end to end: :func:`indexer_logits`, then :func:`topk_select` of the visible prefix.

    Args: as :func:`indexer_logits` (q8 [B, S, 64, 128] fp8, q_scale [B, S, 64], w [B, S, 64],
        k8 [B, N, 128] fp8, k_scale [B, N], positions [B, S], ratio, k_lens, batch_invariant), plus ``top_k`` (512 or
        1024 compiled ahead; any int in [1, 2048]) and ``offset`` (added to every selected index).

    Returns:
        int32 [B, S, top_k]: per query the ``min(top_k, visible)`` best entries (score descending, ties
        by the smaller index) + offset, then −1; with ``return_logits`` also the fp32 [B, S, N] logits
        the selection was made from. Two passes: the logits are 4 bytes per entry against 128 FP8
        key bytes (~3% extra traffic), and the select reads only each query's visible prefix.
    """
    logits, lengths = indexer_logits(q8, q_scale, w, k8, k_scale, positions, ratio=ratio, k_lens=k_lens,
                                     batch_invariant=batch_invariant, return_visible=True)  # lengths: [B, S]
    idx = topk_select(logits, top_k, lengths=lengths, offset=offset)
    return (idx, logits) if return_logits else idx
