"""Mixture-of-experts on the GPU: routing, the token → expert permutation, grouped SwiGLU GEMMs, combine.

Semantics: :mod:`tilev4.reference.moe` (spec section "MoE"). The layer runs as nine launches and
never synchronises with the host (``validate=False``):

1. ``moe_gate`` — per block of 64 tokens (two warpgroups, up to 256 experts per pass):
   ``s = sqrt(softplus(x @ Wgᵀ))`` [T, E] in fp32, then
   top-k of ``s + bias`` by k rounds of argmax (strictly greater wins, so equal keys go to the
   smaller expert id), or the hash table ``tid2eid[token_ids]``; ``w = s_sel / Σ s_sel · route_scale``.
   The gate GEMM splits the fp32 weight exactly into three bf16 parts, ``Wg = hi + mid + lo``
   (each a round-to-nearest of the remainder: 3 × 8 significant bits cover fp32's 24), and runs
   ``x·lo + x·mid + x·hi`` on the tensor cores with fp32 accumulation. bf16 × bf16 products are
   exact, so the only difference from an fp32 GEMM is the order (and the tensor core's
   truncating alignment) of the fp32 additions: ``|Δlogit| ≲ 3·dim·2⁻²³·Σ|x_i·w_i|`` in the worst
   case, a few fp32 ulps of the largest partial sum in practice.
2. ``moe_count`` — per chunk of 1024 (token, slot) pairs: each pair's rank among the chunk's pairs
   of the same expert (one thread per expert walks the chunk in order) and the chunk's histogram.
3. ``moe_scan`` — one CTA: per expert, an exclusive scan of the chunk histograms (chunk bases), the
   counts, the offsets [E+1], the M-tile offsets [E+1], the tile → expert table and each M tile's record
   ``tile_info`` (expert, its first M tile, first row, rows), from which the expert GEMMs resolve their tiles.
4. ``moe_scatter`` — each pair's sorted row ``offsets[e] + chunk_base[chunk, e] + rank``: the order
   within an expert is the pair order ``t·k + s`` (stable), fixed by scans, never by atomics. It
   copies ``x[t]`` and the routing weight to that row.
5. ``moe_up`` — grouped GEMM over M tiles of ``block_m`` sorted rows inside one expert (a tile
   never spans two experts; rows past the segment are masked at the store, never copied):
   ``gate = x W1ᵀ``, ``up = x W3ᵀ`` (two B operands, two accumulators, wgmma), then
   ``h = silu(min(gate, limit)) · clamp(up, ±limit) · w`` in fp32, stored bf16.
6. ``moe_down`` — the same schedule: ``y = h W2ᵀ`` per expert, stored bf16 (in the rows of the
   permuted x, which are dead by then).
7. / 8. the shared expert: the same two kernels in ``dense`` mode (all tokens, one weight, no
   clamp, weight 1).
9. ``moe_combine`` — per token, ``Σ_s y[pair_pos[t, s]]`` in slot order plus the shared output,
   in fp32, one CTA per token: a fixed order and no atomics.

Grouped GEMM schedule: a 1-D grid of ``max_tiles · ⌈N/block_n⌉`` CTAs, ``max_tiles =
⌈T·k/block_m⌉ + min(E, T·k)`` (the worst case), CTAs past the real tile count exit at once. CTA
``b`` takes M tile ``q = b // num_n_tiles`` to find its expert ``e`` (first tile ``a_e``,
``c_e`` tiles) and then ``n = (b − a_e·num_n_tiles) // c_e``, ``m = (b − a_e·num_n_tiles) % c_e``:
the tiles of one expert are consecutive in launch order, M fastest, so CTAs that share a
weight tile run together (weights come from HBM once, the expert's rows stay in L2). Dense mode
uses groups of ``group_m`` M tiles the same way.

Batch invariance: a token's output is bitwise the same whatever the other tokens. Every GEMM
runs the full K in one CTA in a fixed ``block_k`` order (no split-K), each output element's
reduction is independent of the row's place in its tile, the configs never depend on T, and the
combine adds the slots in a fixed order. The gate computes each row alone in the same way.

Weight formats: the GEMM kernels here take bf16 expert weights ([E, inter, dim] / [E, dim, inter]);
``moe_experts(weight_format=...)`` runs FP8 (:mod:`tilev4.kernels.moe_fp8`) or FP4
(:mod:`tilev4.kernels.moe_fp4`) routed weights through their own kernels.

Dimension glossary: T tokens (dynamic, may be 0), dim hidden size, E routed experts, k = top_k,
inter expert intermediate size, N = T·k (token, slot) pairs = sorted rows, NC = ⌈N/chunk⌉ chunks,
MT = max_tiles. Compile-time sizes: the gate (dim, E, k), the combine (dim, k), and the K extent of
each expert GEMM (dim for ``moe_up``, inter for ``moe_down``: the software pipeline needs a constant
trip count); every other size, token counts included, is a run-time argument.

Schedules of the expert GEMMs (``schedule``, a tunable): ``ws`` (the default,
:mod:`tilev4.kernels.moe_ws`) — a TMA producer warpgroup and two wgmma consumer warpgroups on mbarriers,
a consumer with no valid row skipping its wgmma; ``pipelined`` — the cp.async multi-stage software
pipeline here, every thread loading and computing. Both run the same wgmma sequence over K, so they give
bitwise the same output. (TileLang's automatic warp specialisation of the pipelined loop deadlocked on the
H200 for one shape, T=2000, inter 256, so it stays off.)

Tuning (:mod:`tilev4.kernels.moe_tuning`): the GEMMs tune ``schedule``, ``block_n`` and ``num_stages``,
the gate ``block_k``, ``block_e`` and ``num_stages``, the combine ``threads``. ``block_m`` stays a problem key:
the permutation's tile table is built for it, so :func:`moe_up` / :func:`moe_down` compile the GEMMs for
``perm.block_m`` (``BLOCK_M``). The permutation kernels are not tuned (see :func:`build_moe_count`).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import tilelang.language as T
import torch

from tilev4._checks import check_aligned, check_int, check_tensor
from tilev4._fastmath import FAST_SOURCE
from tilev4.kernels.moe_tuning import (
    MOE_COMBINE_HARNESS,
    MOE_COMBINE_SPACE,
    MOE_DOWN_HARNESS,
    MOE_DOWN_SPACE,
    MOE_GATE_HARNESS,
    MOE_GATE_SPACE,
    MOE_UP_HARNESS,
    MOE_UP_SPACE,
    combine_bucket,
    down_bucket,
    gate_bucket,
    up_bucket,
)
from tilev4.kernels.moe_ws import (
    WS_BLOCK_MS,
    build_ws_gemm,
    cap_keep_nan,
    check_ws_schedule,
    clamp_keep_nan,
    silu,
    tiles_of,
)
from tilev4.kernels.registry import compile_kernel, register

__all__ = [
    "BLOCK_M",
    "CHUNK",
    "WEIGHT_FORMATS",
    "MoEPermutation",
    "build_moe_combine",
    "build_moe_count",
    "build_moe_down",
    "build_moe_gate",
    "build_moe_scan",
    "build_moe_scatter",
    "build_moe_up",
    "choose_up_block_m",
    "moe",
    "moe_combine",
    "moe_down",
    "moe_experts",
    "moe_permute",
    "moe_route",
    "moe_shared_expert",
    "moe_up",
]

WEIGHT_FORMATS = ("bf16", "fp8", "fp4")  # routed experts; fp8: tilev4.kernels.moe_fp8, fp4: tilev4.kernels.moe_fp4
BLOCK_M = 128  # M tile of the grouped GEMMs (a problem key, not tuned): the scan builds the tile table for it
# the bf16 expert GEMMs' own tile table (MoEPermutation.up_tiles, named for the up-projection, which took it first;
# choose_up_block_m): an expert of 129-192 rows is one 192-row tile of three consumer warpgroups (one weight stream
# instead of two); larger experts take 128-row tiles, the last one with up to 192 rows (tiles_of). The bf16 up- and
# down-projections both run it; the FP8 / FP4 GEMMs read the 128-row table.
UP_BLOCK_M = 192
UP_BLOCK_MS = WS_BLOCK_MS
# up_block_m=None takes the 192-row table when a balanced routing would give an expert this many rows on average
AUTO_UP_ROWS = (BLOCK_M, UP_BLOCK_M)  # (low, high]: T·k/E in it
# the 192-row tile's one config: it stages its output in the A slabs, two 64-column chunks a weight tile, and
# 4 stages fill shared memory (229.9 KB)
UP_192_CONFIG = {"block_m": 192, "schedule": "ws", "block_n": 128, "block_k": 64, "num_stages": 4, "threads": 256}
# the down-projection's 192-row tile: three consumers, each 256-column tile two 128-column weight tiles (a consumer's
# 160 registers hold two 64 x 128 accumulators), staged in the A slabs, 4 stages (229 376 bytes)
DOWN_192_CONFIG = {"block_m": 192, "schedule": "ws", "block_n": 256, "block_k": 64, "num_stages": 4, "threads": 256}
CHUNK = 1024  # (token, slot) pairs per chunk of the permutation
MAX_EXPERTS = 1024  # the scan keeps the counts of all experts in shared memory
MAX_GATE_EXPERTS = 384  # the gate keeps a [64, E] fp32 score tile in shared memory (V4-Pro: 384)
SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus: x above it is returned as is
NO_CLAMP = float("inf")  # min(g, inf) = g and clamp(u, -inf, inf) = u bit for bit

_NO_WS = {"tl.disable_warp_specialized": True}
GEMM_SCHEDULES = ("ws", "pipelined")  # bf16 expert GEMMs: tilev4.kernels.moe_ws, or the cp.async pipeline here


def _check_weight_format(weight_format: str) -> None:
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")


def _check_gemm_format(weight_format: str) -> None:
    """The bf16 GEMM factories: the FP8 / FP4 GEMMs are their own kernels (moe_up_fp8 / moe_up_fp4, ...)."""
    if weight_format != "bf16":
        raise ValueError(f"weight_format must be 'bf16' for this kernel (FP8: moe_up_fp8 / moe_down_fp8, FP4: "
                         f"moe_up_fp4 / moe_down_fp4), got {weight_format!r}")


# ---------------------------------------------------------------------------------------------------- routing


@register(
    "moe_gate",
    configs=[
        {"dim": 4096, "num_experts": 256, "top_k": 6},
        {"dim": 4096, "num_experts": 256, "top_k": 6, "hash": True},
        {"dim": 256, "num_experts": 8, "top_k": 2},
    ],
    tags=("moe", "batch_invariant"),
    space=MOE_GATE_SPACE,
    bucket=gate_bucket,
    harness=MOE_GATE_HARNESS,
)
def build_moe_gate(dim: int, num_experts: int, top_k: int, route_scale: float = 1.5, hash: bool = False,
                   block_tokens: int = 64, block_k: int = 32, block_e: int = 256, num_stages: int = 2):
    """MoE gate: sqrt(softplus) scores in fp32 (3×bf16 split GEMM), top-k of score+bias or a hash table."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if num_experts > MAX_GATE_EXPERTS:
        raise ValueError(f"num_experts must be <= {MAX_GATE_EXPERTS}, got {num_experts}")
    E, BT, BK = num_experts, block_tokens, block_k
    BE = min(block_e, -(-E // 16) * 16)  # experts per GEMM pass (wgmma N)
    threads = 256 if BE >= 128 else 128  # two warpgroups split the experts of a pass
    num_passes = -(-E // BE)
    SP = E + 1 if E % 2 == 0 else E  # odd row stride: a thread per row reads conflict-free
    NT = T.dynamic("num_tokens")
    V = T.dynamic("vocab")

    @T.macro
    def scores_tile(x, weight, s_shared, x_shared, w_shared, hi_shared, mid_shared, lo_shared, acc, bx):
        """s_shared[:, :E] = sqrt(softplus(x[rows] @ weightᵀ)) for the CTA's BT rows."""
        for p in T.serial(num_passes):
            T.clear(acc)
            for k in T.Pipelined(T.ceildiv(dim, BK), num_stages=num_stages):
                T.copy(x[bx * BT, k * BK], x_shared)
                T.copy(weight[p * BE, k * BK], w_shared)  # rows past E read as 0 (zero-filling cp.async)
                for i, j in T.Parallel(BE, BK):
                    # w = hi + mid + lo exactly: each part is the bf16 rounding of what is left
                    hi = T.cast(w_shared[i, j], T.bfloat16)
                    rest = w_shared[i, j] - T.cast(hi, T.float32)
                    mid = T.cast(rest, T.bfloat16)
                    hi_shared[i, j] = hi
                    mid_shared[i, j] = mid
                    lo_shared[i, j] = T.cast(rest - T.cast(mid, T.float32), T.bfloat16)
                T.gemm(x_shared, lo_shared, acc, transpose_B=True)  # [BT, BK] @ [BK, BE] -> [BT, BE]
                T.gemm(x_shared, mid_shared, acc, transpose_B=True)
                T.gemm(x_shared, hi_shared, acc, transpose_B=True)
            for i, j in T.Parallel(BT, BE):
                if p * BE + j < E:
                    # s = sqrt(softplus(logit)), softplus as torch: identity above the threshold
                    s_shared[i, p * BE + j] = T.sqrt(T.if_then_else(
                        acc[i, j] > SOFTPLUS_THRESHOLD, acc[i, j], T.log1p(T.exp(acc[i, j]))))

    @T.macro
    def write_scores(scores, s_shared, bx):
        for i, e in T.Parallel(BT, E):
            if bx * BT + i < NT:
                scores[bx * BT + i, e] = s_shared[i, e]

    @T.macro
    def write_weights(weights, experts, sel_id, sel_s, total: T.Ref, t):
        total = 0.0
        for r in T.serial(top_k):  # Σ s_sel, slot order
            total = total + sel_s[r]
        for r in T.serial(top_k):
            weights[t, r] = sel_s[r] / total * route_scale
            experts[t, r] = sel_id[r]

    if not hash:

        @T.prim_func
        def moe_gate_kernel(
            x: T.Tensor[(NT, dim), T.bfloat16],
            weight: T.Tensor[(E, dim), T.float32],
            bias: T.Tensor[(E,), T.float32],
            scores: T.Tensor[(NT, E), T.float32],
            weights: T.Tensor[(NT, top_k), T.float32],
            experts: T.Tensor[(NT, top_k), T.int32],
        ):
            T.annotate_pass_configs(_NO_WS)
            with T.Kernel(T.ceildiv(NT, BT), threads=threads) as bx:
                x_shared = T.alloc_shared((BT, BK), T.bfloat16)
                w_shared = T.alloc_shared((BE, BK), T.float32)
                hi_shared = T.alloc_shared((BE, BK), T.bfloat16)
                mid_shared = T.alloc_shared((BE, BK), T.bfloat16)
                lo_shared = T.alloc_shared((BE, BK), T.bfloat16)
                s_shared = T.alloc_shared((BT, SP), T.float32)
                bias_shared = T.alloc_shared((E,), T.float32)
                acc = T.alloc_fragment((BT, BE), T.float32)
                sel_id = T.alloc_local((top_k,), T.int32)
                sel_s = T.alloc_local((top_k,), T.float32)
                best = T.alloc_var(T.float32)
                bid = T.alloc_var(T.int32)
                total = T.alloc_var(T.float32)
                scores_tile(x, weight, s_shared, x_shared, w_shared, hi_shared, mid_shared, lo_shared, acc, bx)
                for e in T.Parallel(E):
                    bias_shared[e] = bias[e]
                T.sync_threads()
                write_scores(scores, s_shared, bx)
                T.sync_threads()  # the top-k below overwrites s_shared
                tx = T.get_thread_binding()
                if tx < BT and bx * BT + tx < NT:
                    for r in T.serial(top_k):
                        # argmax of s + bias over the experts not taken; strictly greater wins,
                        # so among equal keys the smallest expert id is taken first
                        best = -T.infinity(T.float32)
                        bid = -1
                        for e in T.serial(E):
                            if s_shared[tx, e] + bias_shared[e] > best:
                                best = s_shared[tx, e] + bias_shared[e]
                                bid = e
                        bid = T.max(bid, 0)  # only a NaN row finds nothing
                        sel_id[r] = bid
                        sel_s[r] = s_shared[tx, bid]
                        s_shared[tx, bid] = -T.infinity(T.float32)  # taken
                    write_weights(weights, experts, sel_id, sel_s, total, bx * BT + tx)

        return moe_gate_kernel

    @T.prim_func
    def moe_gate_hash_kernel(
        x: T.Tensor[(NT, dim), T.bfloat16],
        weight: T.Tensor[(E, dim), T.float32],
        tid2eid: T.Tensor[(V, top_k), T.int32],
        token_ids: T.Tensor[(NT,), T.int32],
        scores: T.Tensor[(NT, E), T.float32],
        weights: T.Tensor[(NT, top_k), T.float32],
        experts: T.Tensor[(NT, top_k), T.int32],
    ):
        T.annotate_pass_configs(_NO_WS)
        with T.Kernel(T.ceildiv(NT, BT), threads=threads) as bx:
            x_shared = T.alloc_shared((BT, BK), T.bfloat16)
            w_shared = T.alloc_shared((BE, BK), T.float32)
            hi_shared = T.alloc_shared((BE, BK), T.bfloat16)
            mid_shared = T.alloc_shared((BE, BK), T.bfloat16)
            lo_shared = T.alloc_shared((BE, BK), T.bfloat16)
            s_shared = T.alloc_shared((BT, SP), T.float32)
            acc = T.alloc_fragment((BT, BE), T.float32)
            sel_id = T.alloc_local((top_k,), T.int32)
            sel_s = T.alloc_local((top_k,), T.float32)
            tok = T.alloc_var(T.int32)
            total = T.alloc_var(T.float32)
            scores_tile(x, weight, s_shared, x_shared, w_shared, hi_shared, mid_shared, lo_shared, acc, bx)
            T.sync_threads()
            write_scores(scores, s_shared, bx)
            tx = T.get_thread_binding()
            if tx < BT and bx * BT + tx < NT:
                tok = T.min(T.max(token_ids[bx * BT + tx], 0), V - 1)  # in range when validated
                for r in T.serial(top_k):  # experts = tid2eid[token], table order
                    sel_id[r] = T.min(T.max(tid2eid[tok, r], 0), E - 1)
                    sel_s[r] = s_shared[tx, sel_id[r]]
                write_weights(weights, experts, sel_id, sel_s, total, bx * BT + tx)

    return moe_gate_hash_kernel


# ------------------------------------------------------------------------------------------------ permutation


@register("moe_count", configs=[{}], tags=("moe", "batch_invariant"))
def build_moe_count(chunk: int = CHUNK, threads: int = 256):
    """MoE permutation, step 1: per chunk of pairs, each pair's rank within its expert and the histogram.

    Not tuned, nor are ``moe_scan`` and ``moe_scatter``. ``chunk`` and the scan's ``block_m`` are part of
    the permutation's contract (the op sizes the chunk tables with ``CHUNK``, the scatter indexes them with
    it, the GEMMs read the tile table built for ``BLOCK_M``), so they are problem keys. ``threads`` (and the
    scatter's ``block_pairs`` / ``block_words``) are free, but these outputs are ranks, scans and positions
    in the expert order of the whole batch: the rows of a sub-batch's outputs are not rows of the full
    batch's, so the tuner's bit-exact sub-batch check of a batch-invariant kernel does not apply to them;
    and the launches are short (count and scan walk the E experts in one or two passes of ``threads``; the
    scatter is a row copy).
    """
    N, E, NC = T.dynamic("N"), T.dynamic("E"), T.dynamic("NC")

    @T.prim_func
    def moe_count_kernel(
        experts: T.Tensor[(N,), T.int32],
        local_rank: T.Tensor[(N,), T.int32],
        chunk_counts: T.Tensor[(NC, E), T.int32],
    ):
        T.annotate_pass_configs(_NO_WS)
        with T.Kernel(NC, threads=threads) as bc:
            ex_shared = T.alloc_shared((chunk,), T.int32)
            rank_shared = T.alloc_shared((chunk,), T.int32)
            cnt = T.alloc_var(T.int32)
            for i in T.Parallel(chunk):
                # ids are clamped to [0, E) (in range when validated); -1 marks the tail
                ex_shared[i] = T.if_then_else(bc * chunk + i < N,
                                              T.min(T.max(experts[bc * chunk + i], 0), E - 1), -1)
                rank_shared[i] = 0
            T.sync_threads()
            tx = T.get_thread_binding()
            for eb in T.serial(T.ceildiv(E, threads)):
                # thread tx owns expert eb·threads + tx and numbers its pairs in pair order
                cnt = 0
                for q in T.serial(chunk):
                    if ex_shared[q] == eb * threads + tx:
                        rank_shared[q] = cnt
                        cnt = cnt + 1
                if eb * threads + tx < E:
                    chunk_counts[bc, eb * threads + tx] = cnt
            T.sync_threads()
            for i in T.Parallel(chunk):
                if bc * chunk + i < N:
                    local_rank[bc * chunk + i] = rank_shared[i]

    return moe_count_kernel


@register("moe_scan", configs=[{}], tags=("moe", "batch_invariant"))
def build_moe_scan(block_m: int = BLOCK_M, threads: int = 256):
    """MoE permutation, step 2 (one CTA): chunk bases, counts, offsets, M-tile offsets, tile → expert and each M
    tile's record ``(expert, the expert's first M tile, its first row, its rows)`` (zeros past the last tile).

    Not tuned (see :func:`build_moe_count`); ``block_m`` must be the grouped GEMMs' (the op passes it).
    """
    E, NC, MT = T.dynamic("E"), T.dynamic("NC"), T.dynamic("MT")

    @T.prim_func
    def moe_scan_kernel(
        chunk_counts: T.Tensor[(NC, E), T.int32],
        chunk_base: T.Tensor[(NC, E), T.int32],
        counts: T.Tensor[(E,), T.int32],
        offsets: T.Tensor[(E + 1,), T.int32],
        tile_offsets: T.Tensor[(E + 1,), T.int32],
        tile_expert: T.Tensor[(MT,), T.int32],
        tile_info: T.Tensor[(MT, 4), T.int32],
    ):
        T.annotate_pass_configs(_NO_WS)
        with T.Kernel(1, threads=threads):
            cnt_shared = T.alloc_shared((MAX_EXPERTS,), T.int32)
            run = T.alloc_var(T.int32)
            off = T.alloc_var(T.int32)
            toff = T.alloc_var(T.int32)
            tx = T.get_thread_binding()
            for eb in T.serial(T.ceildiv(E, threads)):
                if eb * threads + tx < E:
                    run = 0
                    for c in T.serial(NC):  # chunk_base[:, e] = exclusive cumsum of chunk_counts[:, e]
                        chunk_base[c, eb * threads + tx] = run
                        run = run + chunk_counts[c, eb * threads + tx]
                    cnt_shared[eb * threads + tx] = run
                    counts[eb * threads + tx] = run
            T.sync_threads()
            for eb in T.serial(T.ceildiv(E, threads)):
                if eb * threads + tx < E:
                    off = 0
                    toff = 0
                    for j in T.serial(eb * threads + tx):  # exclusive scans over the experts before
                        off = off + cnt_shared[j]
                        toff = toff + tiles_of(cnt_shared[j], block_m)
                    offsets[eb * threads + tx] = off
                    tile_offsets[eb * threads + tx] = toff
                    run = cnt_shared[eb * threads + tx]  # a loop extent must not read shared memory
                    if eb * threads + tx == E - 1:
                        offsets[E] = off + run
                        tile_offsets[E] = toff + tiles_of(run, block_m)
                    for j in T.serial(tiles_of(run, block_m)):
                        tile_expert[toff + j] = eb * threads + tx
                        tile_info[toff + j, 0] = eb * threads + tx
                        tile_info[toff + j, 1] = toff
                        tile_info[toff + j, 2] = off
                        tile_info[toff + j, 3] = run
            T.sync_threads()  # tile_offsets[E] is written; the records past the last tile read as no rows
            for jb in T.serial(T.ceildiv(MT, threads)):
                if jb * threads + tx < MT and jb * threads + tx >= tile_offsets[E]:
                    for q in T.serial(4):
                        tile_info[jb * threads + tx, q] = 0

    return moe_scan_kernel


@register("moe_scatter", configs=[{}], tags=("moe", "batch_invariant"))
def build_moe_scatter(chunk: int = CHUNK, block_pairs: int = 8, block_words: int = 128, threads: int = 256):
    """MoE permutation, step 3: each pair's sorted row; x rows and routing weights copied there.

    Not tuned (see :func:`build_moe_count`).
    """
    NT, K, N, W, E, NC = (T.dynamic(n) for n in ("num_tokens", "K", "N", "W", "E", "NC"))
    BP, BW = block_pairs, block_words

    @T.prim_func
    def moe_scatter_kernel(
        x: T.Tensor[(NT, W), T.int64],  # x rows as 8-byte words (4 bf16)
        weights: T.Tensor[(NT, K), T.float32],
        experts: T.Tensor[(NT, K), T.int32],
        local_rank: T.Tensor[(N,), T.int32],
        chunk_base: T.Tensor[(NC, E), T.int32],
        offsets: T.Tensor[(E + 1,), T.int32],
        x_sorted: T.Tensor[(N, W), T.int64],
        w_sorted: T.Tensor[(N,), T.float32],
        sorted_tokens: T.Tensor[(N,), T.int32],
        pair_pos: T.Tensor[(NT, K), T.int32],
    ):
        T.annotate_pass_configs(_NO_WS)
        with T.Kernel(T.ceildiv(N, BP), threads=threads) as bp:
            pos_shared = T.alloc_shared((BP,), T.int32)
            tok_shared = T.alloc_shared((BP,), T.int32)
            p = T.alloc_var(T.int32)
            e = T.alloc_var(T.int32)
            pos = T.alloc_var(T.int32)
            tx = T.get_thread_binding()
            if tx < BP:
                p = bp * BP + tx
                pos_shared[tx] = -1
                tok_shared[tx] = 0
                if p < N:
                    # pair p = t·k + s goes to row offsets[e] + chunk_base[p // chunk, e] + rank
                    e = T.min(T.max(experts[p // K, p % K], 0), E - 1)
                    pos = offsets[e] + chunk_base[p // chunk, e] + local_rank[p]
                    pos_shared[tx] = pos
                    tok_shared[tx] = p // K
                    pair_pos[p // K, p % K] = pos
                    sorted_tokens[pos] = p // K
                    w_sorted[pos] = weights[p // K, p % K]
            T.sync_threads()
            for wb in T.serial(T.ceildiv(W, BW)):
                for i, j in T.Parallel(BP, BW):
                    if pos_shared[i] >= 0 and wb * BW + j < W:
                        x_sorted[pos_shared[i], wb * BW + j] = x[tok_shared[i], wb * BW + j]

    return moe_scatter_kernel


# ------------------------------------------------------------------------------------------------ grouped GEMMs


@T.macro
def _grouped_tile(bx, num_n_tiles, tile_info, tile_offsets, offsets, e: T.Ref, a0: T.Ref, c: T.Ref, row0: T.Ref,
                  rows: T.Ref, n0: T.Ref, BM, BN):
    """Expert ``e``, first row, valid rows and first column of CTA ``bx`` in the grouped schedule of the pipelined
    (cp.async) programs, every weight format: the expert from column 0 of ``moe_scan``'s ``tile_info``."""
    e = tile_info[bx // num_n_tiles, 0]
    a0 = tile_offsets[e]  # first M tile of the expert
    c = tile_offsets[e + 1] - a0  # its M tiles
    n0 = ((bx - a0 * num_n_tiles) // c) * BN  # noqa: F841 (T.Ref: stores into the caller's variable)
    row0 = offsets[e] + ((bx - a0 * num_n_tiles) % c) * BM
    rows = T.min(BM, offsets[e + 1] - row0)  # noqa: F841


@T.macro
def _dense_tile(bx, num_n_tiles, num_rows, group_m, a0: T.Ref, c: T.Ref, row0: T.Ref, rows: T.Ref, n0: T.Ref, BM, BN):
    """First row, valid rows and first column of CTA ``bx`` in dense mode (groups of ``group_m`` M tiles)."""
    a0 = (bx // (group_m * num_n_tiles)) * group_m  # first M tile of the group
    c = T.min(group_m, T.ceildiv(num_rows, BM) - a0)
    n0 = ((bx - a0 * num_n_tiles) // c) * BN  # noqa: F841 (T.Ref: stores into the caller's variable)
    row0 = (a0 + (bx - a0 * num_n_tiles) % c) * BM
    rows = T.min(BM, num_rows - row0)  # noqa: F841


@T.macro
def _swiglu_store(h, limit, row0, rows, n0, gate_frag, up_frag, h_shared, w_shared, weighted, BM, BN):
    """The up-projection epilogue: ``h = silu(min(gate, l)) · clamp(up, ±l) [· w]`` in fp32, bf16 rows of the
    segment stored (rows past it belong to the next expert)."""
    for i, j in T.Parallel(BM, BN):
        g = cap_keep_nan(gate_frag[i, j], limit)
        u = clamp_keep_nan(up_frag[i, j], limit)
        if weighted:
            h_shared[i, j] = T.cast(silu(g) * u * w_shared[i], T.bfloat16)
        else:
            h_shared[i, j] = T.cast(silu(g) * u, T.bfloat16)
    for i, j in T.Parallel(BM, BN):
        if i < rows:
            h[row0 + i, n0 + j] = h_shared[i, j]


@register(
    "moe_up",
    configs=[{"dim": 4096}, {"dim": 4096, "dense": True}],  # V4-Flash; other sizes compile on first use
    tags=("moe", "batch_invariant"),
    space=MOE_UP_SPACE,
    bucket=up_bucket,
    harness=MOE_UP_HARNESS,
)
def build_moe_up(dim: int, dense: bool = False, weight_format: str = "bf16", block_m: int = BLOCK_M,
                 schedule: str = "ws", block_n: int = 128, block_k: int = 64, num_stages: int = 4, threads: int = 256,
                 group_m: int = 8):
    """MoE grouped up-projection: x·W1ᵀ and x·W3ᵀ per expert, SwiGLU with clamp and routing weight fused."""
    _check_gemm_format(weight_format)
    check_ws_schedule(schedule, block_m, GEMM_SCHEDULES, WS_BLOCK_MS)
    if schedule == "ws":
        return build_ws_gemm("up", dim, dense, block_n, block_k, num_stages, group_m, block_m)
    pass_configs = _NO_WS  # every copy below is a cp.async (disable_tma): the software pipeline's loads
    BM, BN, BK = block_m, block_n, block_k
    NR, I, E, MT = (T.dynamic(n) for n in ("NR", "I", "E", "MT"))
    D = dim  # static: the K loop of a software pipeline needs a constant trip count
    policy = T.GemmWarpPolicy.FullRow  # each warpgroup owns 64 rows × all BN columns

    @T.macro
    def mainloop(x, w1, w3, e, row0, n0, a_shared, b1_shared, b3_shared, gate_frag, up_frag):
        T.clear(gate_frag)
        T.clear(up_frag)
        for k in T.Pipelined(T.ceildiv(D, BK), num_stages=num_stages):
            T.copy(x[row0, k * BK], a_shared, disable_tma=True)  # rows past NR read as 0 (zero-filling cp.async)
            T.copy(w1[e, n0, k * BK], b1_shared, disable_tma=True)
            T.copy(w3[e, n0, k * BK], b3_shared, disable_tma=True)
            T.gemm(a_shared, b1_shared, gate_frag, transpose_B=True, policy=policy)  # [BM, BK] @ [BK, BN]
            T.gemm(a_shared, b3_shared, up_frag, transpose_B=True, policy=policy)  # [BM, BK] @ [BK, BN]

    @T.macro
    def epilogue(h, limit, row0, rows, n0, gate_frag, up_frag, h_shared, w_shared, weighted):
        _swiglu_store(h, limit, row0, rows, n0, gate_frag, up_frag, h_shared, w_shared, weighted, BM, BN)

    if dense:

        @T.prim_func
        def moe_up_dense_kernel(
            x: T.Tensor[(NR, D), T.bfloat16],
            w1: T.Tensor[(1, I, D), T.bfloat16],
            w3: T.Tensor[(1, I, D), T.bfloat16],
            h: T.Tensor[(NR, I), T.bfloat16],
            limit: T.float32,
        ):
            T.annotate_pass_configs(pass_configs)
            with T.Kernel(T.ceildiv(NR, BM) * T.ceildiv(I, BN), threads=threads) as bx:
                T.import_source(FAST_SOURCE)  # silu's ex2 / rcp
                a_shared = T.alloc_shared((BM, BK), T.bfloat16)
                b1_shared = T.alloc_shared((BN, BK), T.bfloat16)
                b3_shared = T.alloc_shared((BN, BK), T.bfloat16)
                h_shared = T.alloc_shared((BM, BN), T.bfloat16)
                gate_frag = T.alloc_fragment((BM, BN), T.float32)
                up_frag = T.alloc_fragment((BM, BN), T.float32)
                a0 = T.alloc_var(T.int32)
                c = T.alloc_var(T.int32)
                row0 = T.alloc_var(T.int32)
                rows = T.alloc_var(T.int32)
                n0 = T.alloc_var(T.int32)
                _dense_tile(bx, T.ceildiv(I, BN), NR, group_m, a0, c, row0, rows, n0, BM, BN)
                mainloop(x, w1, w3, 0, row0, n0, a_shared, b1_shared, b3_shared, gate_frag, up_frag)
                epilogue(h, limit, row0, rows, n0, gate_frag, up_frag, h_shared, None, False)

        return moe_up_dense_kernel

    @T.prim_func
    def moe_up_kernel(
        x_sorted: T.Tensor[(NR, D), T.bfloat16],
        w_sorted: T.Tensor[(NR,), T.float32],
        w1: T.Tensor[(E, I, D), T.bfloat16],
        w3: T.Tensor[(E, I, D), T.bfloat16],
        offsets: T.Tensor[(E + 1,), T.int32],
        tile_offsets: T.Tensor[(E + 1,), T.int32],
        tile_info: T.Tensor[(MT, 4), T.int32],
        h: T.Tensor[(NR, I), T.bfloat16],
        limit: T.float32,
    ):
        T.annotate_pass_configs(pass_configs)
        with T.Kernel(MT * T.ceildiv(I, BN), threads=threads) as bx:
            T.import_source(FAST_SOURCE)  # silu's ex2 / rcp
            a_shared = T.alloc_shared((BM, BK), T.bfloat16)
            b1_shared = T.alloc_shared((BN, BK), T.bfloat16)
            b3_shared = T.alloc_shared((BN, BK), T.bfloat16)
            h_shared = T.alloc_shared((BM, BN), T.bfloat16)
            w_shared = T.alloc_shared((BM,), T.float32)
            gate_frag = T.alloc_fragment((BM, BN), T.float32)
            up_frag = T.alloc_fragment((BM, BN), T.float32)
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
                mainloop(x_sorted, w1, w3, e, row0, n0, a_shared, b1_shared, b3_shared, gate_frag, up_frag)
                epilogue(h, limit, row0, rows, n0, gate_frag, up_frag, h_shared, w_shared, True)

    return moe_up_kernel


@register(
    "moe_down",
    configs=[{"inter": 2048}, {"inter": 2048, "dense": True}],
    tags=("moe", "batch_invariant"),
    space=MOE_DOWN_SPACE,
    bucket=down_bucket,
    harness=MOE_DOWN_HARNESS,
)
def build_moe_down(inter: int, dense: bool = False, weight_format: str = "bf16", block_m: int = BLOCK_M,
                   schedule: str = "ws", block_n: int = 256, block_k: int = 64, num_stages: int = 4,
                   threads: int = 256, group_m: int = 8):
    """MoE grouped down-projection: y = h·W2ᵀ per expert (bf16 out)."""
    _check_gemm_format(weight_format)
    check_ws_schedule(schedule, block_m, GEMM_SCHEDULES, WS_BLOCK_MS)
    if schedule == "ws":
        return build_ws_gemm("down", inter, dense, block_n, block_k, num_stages, group_m, block_m)
    pass_configs = _NO_WS  # every copy below is a cp.async (disable_tma), as in build_moe_up
    BM, BN, BK = block_m, block_n, block_k
    NR, D, E, MT = (T.dynamic(n) for n in ("NR", "D", "E", "MT"))
    I = inter  # static: the K loop of a software pipeline needs a constant trip count
    policy = T.GemmWarpPolicy.FullRow

    @T.macro
    def mainloop_epilogue(h, w2, y, e, row0, rows, n0, a_shared, b_shared, acc):
        T.clear(acc)
        for k in T.Pipelined(T.ceildiv(I, BK), num_stages=num_stages):
            T.copy(h[row0, k * BK], a_shared, disable_tma=True)
            T.copy(w2[e, n0, k * BK], b_shared, disable_tma=True)
            T.gemm(a_shared, b_shared, acc, transpose_B=True, policy=policy)  # [BM, BK] @ [BK, BN] -> [BM, BN]
        for i, j in T.Parallel(BM, BN):
            if i < rows:  # rows past the expert's segment belong to the next expert: never stored
                y[row0 + i, n0 + j] = T.cast(acc[i, j], T.bfloat16)

    if dense:

        @T.prim_func
        def moe_down_dense_kernel(
            h: T.Tensor[(NR, I), T.bfloat16],
            w2: T.Tensor[(1, D, I), T.bfloat16],
            y: T.Tensor[(NR, D), T.bfloat16],
        ):
            T.annotate_pass_configs(pass_configs)
            with T.Kernel(T.ceildiv(NR, BM) * T.ceildiv(D, BN), threads=threads) as bx:
                a_shared = T.alloc_shared((BM, BK), T.bfloat16)
                b_shared = T.alloc_shared((BN, BK), T.bfloat16)
                acc = T.alloc_fragment((BM, BN), T.float32)
                a0 = T.alloc_var(T.int32)
                c = T.alloc_var(T.int32)
                row0 = T.alloc_var(T.int32)
                rows = T.alloc_var(T.int32)
                n0 = T.alloc_var(T.int32)
                _dense_tile(bx, T.ceildiv(D, BN), NR, group_m, a0, c, row0, rows, n0, BM, BN)
                mainloop_epilogue(h, w2, y, 0, row0, rows, n0, a_shared, b_shared, acc)

        return moe_down_dense_kernel

    @T.prim_func
    def moe_down_kernel(
        h: T.Tensor[(NR, I), T.bfloat16],
        w2: T.Tensor[(E, D, I), T.bfloat16],
        offsets: T.Tensor[(E + 1,), T.int32],
        tile_offsets: T.Tensor[(E + 1,), T.int32],
        tile_info: T.Tensor[(MT, 4), T.int32],
        y: T.Tensor[(NR, D), T.bfloat16],
    ):
        T.annotate_pass_configs(pass_configs)
        with T.Kernel(MT * T.ceildiv(D, BN), threads=threads) as bx:
            a_shared = T.alloc_shared((BM, BK), T.bfloat16)
            b_shared = T.alloc_shared((BN, BK), T.bfloat16)
            acc = T.alloc_fragment((BM, BN), T.float32)
            e = T.alloc_var(T.int32)
            a0 = T.alloc_var(T.int32)
            c = T.alloc_var(T.int32)
            row0 = T.alloc_var(T.int32)
            rows = T.alloc_var(T.int32)
            n0 = T.alloc_var(T.int32)
            if bx // T.ceildiv(D, BN) < tile_offsets[E]:
                _grouped_tile(bx, T.ceildiv(D, BN), tile_info, tile_offsets, offsets, e, a0, c, row0, rows, n0,
                              BM, BN)
                mainloop_epilogue(h, w2, y, e, row0, rows, n0, a_shared, b_shared, acc)

    return moe_down_kernel


# ------------------------------------------------------------------------------------------------ combine


@register(
    "moe_combine",
    configs=[{"dim": 4096, "top_k": 6}, {"dim": 256, "top_k": 2}],
    tags=("moe", "batch_invariant"),
    space=MOE_COMBINE_SPACE,
    bucket=combine_bucket,
    harness=MOE_COMBINE_HARNESS,
)
def build_moe_combine(dim: int, top_k: int, has_shared: bool = True, out_dtype: str = "bfloat16",
                      threads: int = 128):
    """MoE combine: per token, the top_k routed rows in slot order plus the shared expert, in fp32."""
    if out_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"out_dtype must be 'bfloat16' or 'float32', got {out_dtype!r}")
    NT, NR = T.dynamic("num_tokens"), T.dynamic("NR")
    out_t = T.bfloat16 if out_dtype == "bfloat16" else T.float32
    BD = min(1024, 1 << (dim - 1).bit_length())  # columns per pass (a power of two; the tail is masked)

    @T.macro
    def body(y_sorted, pair_pos, y_shared, out, with_shared):
        with T.Kernel(NT, threads=threads) as t:
            pos_shared = T.alloc_shared((top_k,), T.int32)
            acc = T.alloc_fragment((BD,), T.float32)
            for s in T.Parallel(top_k):
                pos_shared[s] = pair_pos[t, s]
            for dc in T.serial(T.ceildiv(dim, BD)):
                T.clear(acc)
                for s in T.serial(top_k):  # out = ((y_0 + y_1) + …) + y_{k-1}, fixed order
                    for d in T.Parallel(BD):
                        if dc * BD + d < dim:
                            acc[d] = acc[d] + T.cast(y_sorted[pos_shared[s], dc * BD + d], T.float32)
                if with_shared:
                    for d in T.Parallel(BD):
                        if dc * BD + d < dim:
                            acc[d] = acc[d] + T.cast(y_shared[t, dc * BD + d], T.float32)
                for d in T.Parallel(BD):
                    if dc * BD + d < dim:
                        out[t, dc * BD + d] = T.cast(acc[d], out_t)

    if has_shared:

        @T.prim_func
        def moe_combine_kernel(
            y_sorted: T.Tensor[(NR, dim), T.bfloat16],
            pair_pos: T.Tensor[(NT, top_k), T.int32],
            y_shared: T.Tensor[(NT, dim), T.bfloat16],
            out: T.Tensor[(NT, dim), out_t],
        ):
            T.annotate_pass_configs(_NO_WS)
            body(y_sorted, pair_pos, y_shared, out, True)

        return moe_combine_kernel

    @T.prim_func
    def moe_combine_routed_kernel(
        y_sorted: T.Tensor[(NR, dim), T.bfloat16],
        pair_pos: T.Tensor[(NT, top_k), T.int32],
        out: T.Tensor[(NT, dim), out_t],
    ):
        T.annotate_pass_configs(_NO_WS)
        body(y_sorted, pair_pos, None, out, False)

    return moe_combine_routed_kernel


# ------------------------------------------------------------------------------------------------ public ops

_POISON_SCRATCH = False  # tests set it: scratch buffers start as NaN / -1 so that a missed write shows


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if not _POISON_SCRATCH:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def _check_cuda(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}")


def _check_limit(swiglu_limit: float | None) -> float:
    if swiglu_limit is None:
        return NO_CLAMP
    if isinstance(swiglu_limit, bool) or not isinstance(swiglu_limit, (int, float)):
        raise TypeError(f"swiglu_limit must be a float or None, got {type(swiglu_limit).__name__} {swiglu_limit!r}")
    if not math.isfinite(swiglu_limit) or swiglu_limit <= 0:
        raise ValueError(f"swiglu_limit must be a finite number > 0 or None, got {swiglu_limit}")
    return float(swiglu_limit)


def _as_int32(name: str, t: object, shape: Sequence[int | None], device: torch.device) -> torch.Tensor:
    check_tensor(name, t, dtype=(torch.int32, torch.int64), shape=shape, device=device)
    return t.to(torch.int32).contiguous()


def _check_range(checks: Sequence[tuple[str, torch.Tensor, int, str]]) -> None:
    """Every entry of each integer tensor lies in ``[0, upper)``; one host sync for all of them."""
    checks = [c for c in checks if c[1].numel()]
    if not checks:
        return
    bad = torch.stack([((t < 0) | (t >= upper)).any() for _, t, upper, _ in checks]).tolist()
    for (name, t, upper, what), is_bad in zip(checks, bad):
        if is_bad:
            value = t[(t < 0) | (t >= upper)][0].item()
            raise ValueError(f"{name} must lie in [0, {upper}) ({what}), got {value}")


_ZEROS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _zero_bias(num_experts: int, device: torch.device) -> torch.Tensor:
    key = (device, num_experts)
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros(num_experts, dtype=torch.float32, device=device)
    return _ZEROS[key]


def moe_route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    top_k: int = 6,
    route_scale: float = 1.5,
    tid2eid: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    *,
    return_scores: bool = False,
    validate: bool = True,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Route each token to ``top_k`` experts (the kernel form of :func:`tilev4.reference.moe_gate`).

    Args:
        x: [T, dim] bf16 hidden states, contiguous, CUDA; dim a multiple of 8; T may be 0.
        weight: [E, dim] fp32 gate weight (E <= 384).
        bias: [E] fp32 selection bias of a score layer, or None (no bias). None for a hash layer.
        top_k: experts per token, ``1 <= top_k <= E``.
        route_scale: positive factor applied to the normalised weights.
        tid2eid: [vocab, top_k] int32 / int64 hash table (a hash layer), entries in ``[0, E)``.
        token_ids: [T] int32 / int64 token ids in ``[0, vocab)``; given iff ``tid2eid`` is.
        return_scores: also return the fp32 scores ``sqrt(softplus(x Wgᵀ))`` [T, E].
        validate: check the table and token ids on the device (one host sync); pass False on
            hot paths (CUDA graphs) once they are known to be in range (out-of-range ids are then
            clamped, never read out of bounds).
        out: optional preallocated ``(weights, experts, scores)``.

    Returns:
        ``(weights, experts)`` (and ``scores``): weights fp32 [T, top_k] summing to route_scale,
        experts int32 [T, top_k]; score layers order them by ``s + bias`` descending, equal keys
        by the smaller expert id; hash layers in table order. The logits are fp32 from an exact
        3×bf16 split of the weight (see the module docstring), so they differ from an fp32 GEMM
        only by the order of the fp32 additions; the selection is exact given the scores returned.
    """
    check_tensor("x", x, dtype=torch.bfloat16, ndim=2, contiguous=True)
    num_tokens, dim = x.shape
    check_tensor("weight", weight, dtype=torch.float32, ndim=2, contiguous=True, device=x.device)
    num_experts = weight.shape[0]
    check_tensor("weight", weight, shape=(num_experts, dim))
    if not 1 <= num_experts <= MAX_GATE_EXPERTS:
        raise ValueError(f"weight must have between 1 and {MAX_GATE_EXPERTS} expert rows, got {num_experts}")
    if dim % 8:
        raise ValueError(f"x: dim={dim} must be a multiple of 8")
    check_int("top_k", top_k, min_value=1)
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= the number of experts E={num_experts}, got {top_k}")
    if isinstance(route_scale, bool) or not isinstance(route_scale, (int, float)):
        raise TypeError(f"route_scale must be a float, got {type(route_scale).__name__} {route_scale!r}")
    if not math.isfinite(route_scale) or route_scale <= 0:
        raise ValueError(f"route_scale must be a finite number > 0, got {route_scale}")
    if (tid2eid is None) != (token_ids is None):
        missing = "token_ids" if token_ids is None else "tid2eid"
        raise ValueError(f"a hash layer needs both tid2eid and token_ids; {missing} is None")
    is_hash = tid2eid is not None
    if is_hash:
        if bias is not None:
            raise ValueError("bias must be None for a hash layer (tid2eid given), got a tensor")
        check_tensor("tid2eid", tid2eid, dtype=(torch.int32, torch.int64), ndim=2)
        tid2eid = _as_int32("tid2eid", tid2eid, (tid2eid.shape[0], top_k), x.device)
        if tid2eid.shape[0] == 0:
            raise ValueError("tid2eid must have at least one row, got shape [0, top_k]")
        token_ids = _as_int32("token_ids", token_ids, (num_tokens,), x.device)
    elif bias is not None:
        check_tensor("bias", bias, dtype=torch.float32, shape=(num_experts,), contiguous=True, device=x.device)
    _check_cuda("x", x)
    if is_hash and validate:
        _check_range([("tid2eid", tid2eid, num_experts, f"expert ids, E={num_experts}"),
                      ("token_ids", token_ids, tid2eid.shape[0], f"token ids, vocab={tid2eid.shape[0]}")])
    if out is None:
        weights = _empty((num_tokens, top_k), torch.float32, x.device)
        experts = _empty((num_tokens, top_k), torch.int32, x.device)
        scores = _empty((num_tokens, num_experts), torch.float32, x.device)
    else:
        weights, experts, scores = out
        check_tensor("out[0]", weights, dtype=torch.float32, shape=(num_tokens, top_k), contiguous=True,
                     device=x.device)
        check_tensor("out[1]", experts, dtype=torch.int32, shape=(num_tokens, top_k), contiguous=True,
                     device=x.device)
        check_tensor("out[2]", scores, dtype=torch.float32, shape=(num_tokens, num_experts), contiguous=True,
                     device=x.device)
    if num_tokens:
        cfg = {"dim": dim, "num_experts": num_experts, "top_k": top_k, "route_scale": float(route_scale),
               "hash": is_hash}
        with torch.cuda.device(x.device):
            kernel = compile_kernel("moe_gate", cfg)
            if is_hash:
                kernel(x, weight, tid2eid, token_ids, scores, weights, experts)
            else:
                kernel(x, weight, _zero_bias(num_experts, x.device) if bias is None else bias, scores, weights,
                       experts)
    return (weights, experts, scores) if return_scores else (weights, experts)


@dataclass(frozen=True)
class MoEPermutation:
    """The token → expert permutation of one routing, built on the GPU (N = T·top_k sorted rows).

    Attributes:
        num_experts, top_k, block_m: E, k and the M tile the tile table is built for (the grouped GEMMs
            are compiled for it).
        counts: [E] int32 (token, slot) pairs per expert.
        offsets: [E+1] int32 first sorted row of each expert (``offsets[E] = N``).
        sorted_tokens: [N] int32 token of each sorted row; within an expert rows follow the pair
            order ``t·k + s`` (stable).
        pair_pos: [T, k] int32 sorted row of each (token, slot).
        tile_offsets: [E+1] int32 first M tile of each expert (``ceil(counts / block_m)`` tiles).
        tile_expert: [max_tiles] int32 expert of each M tile; entries ``>= tile_offsets[E]`` unused (no expert GEMM
            reads it: they read ``tile_info``).
        x_sorted: [N, dim] bf16 ``x[sorted_tokens]`` (or the gathered payload, in its dtype).
        w_sorted: [N] fp32 routing weight of each sorted row.
        up_tiles: ``(block_m, tile_offsets, tile_expert, tile_info)`` of the bf16 expert GEMMs (up and down) when
            they have their own tile table (``moe_permute(up_block_m=192)``), else None (they read the one above).
        tile_info: [max_tiles, 4] int32 each M tile's record ``(expert, the expert's first M tile, its first row,
            its rows)``, zeros past the last tile: the expert GEMMs (bf16, FP8, FP4) resolve a CTA's tile from it
            with one load (``tile_expert`` → ``tile_offsets`` → ``offsets`` is three dependent ones).
    """

    num_experts: int
    top_k: int
    block_m: int
    counts: torch.Tensor
    offsets: torch.Tensor
    sorted_tokens: torch.Tensor
    pair_pos: torch.Tensor
    tile_offsets: torch.Tensor
    tile_expert: torch.Tensor
    x_sorted: torch.Tensor
    w_sorted: torch.Tensor
    up_tiles: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    tile_info: torch.Tensor | None = None


def _check_routing(x: object, weights: object, experts: object) -> torch.Tensor:
    """Check x [T, dim] bf16, weights [T, k] fp32 and experts [T, k]; return the experts as int32."""
    check_tensor("x", x, dtype=torch.bfloat16, ndim=2, contiguous=True)
    num_tokens, dim = x.shape
    if dim % 8:
        raise ValueError(f"x: dim={dim} must be a multiple of 8")
    if x.storage_offset() % 8:
        raise ValueError(f"x must start at a 16-byte aligned row offset, got storage offset {x.storage_offset()}")
    check_tensor("weights", weights, dtype=torch.float32, ndim=2, contiguous=True, device=x.device)
    top_k = weights.shape[1]
    check_tensor("weights", weights, shape=(num_tokens, top_k))
    if top_k < 1:
        raise ValueError(f"weights must have at least one slot per token, got shape {list(weights.shape)}")
    return _as_int32("experts", experts, (num_tokens, top_k), x.device)


def _max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """M tiles in the worst case: every non-empty expert may end in a partial tile."""
    return -(-num_pairs // min(block_m, BLOCK_M)) + min(num_experts, num_pairs)


def choose_up_block_m(num_pairs: int, num_experts: int) -> int:
    """The bf16 expert GEMMs' M tile that ``moe_permute(up_block_m=None)`` takes for ``num_pairs`` (token, slot)
    pairs over ``num_experts`` experts: 192 when the mean rows an expert, ``num_pairs / num_experts``, is in
    :data:`AUTO_UP_ROWS` = (128, 192] — where a balanced routing gives most experts 129-192 rows (one 192-row tile
    instead of two 128-row ones; H200: 0.81-0.85 of the up-projection's time and 0.86 of the down-projection's at 144
    to 192 rows, but 0.99-1.02 at 48, 96, 240 and 384, where the tables are the same or nearly so) — else 128. A
    host-side rule on the shapes: the counts are on the device, and reading them would cost a sync."""
    lo, hi = AUTO_UP_ROWS
    return UP_BLOCK_M if lo * num_experts < num_pairs <= hi * num_experts else BLOCK_M


def _check_up_block_m(up_block_m: object) -> None:
    if up_block_m is not None and (type(up_block_m) is not int or up_block_m not in UP_BLOCK_MS):
        raise ValueError(f"up_block_m must be None or one of {UP_BLOCK_MS}, got {up_block_m!r}")


def moe_permute(
    x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, num_experts: int, *, validate: bool = True,
    payload: torch.Tensor | None = None, up_block_m: int | None = None,
) -> MoEPermutation:
    """Sort the (token, slot) pairs by expert, stably, and gather x and the weights in that order.

    Args:
        x: [T, dim] bf16, contiguous, CUDA; dim a multiple of 8.
        weights: [T, k] fp32 routing weights.
        experts: [T, k] int32 / int64 expert ids in ``[0, num_experts)`` (int64 is converted).
        num_experts: E, ``1 <= E <= 1024``.
        validate: check the expert ids on the device (one host sync); with False, ids out of range
            are clamped (never read out of bounds).
        payload: what to gather instead of x, [T, dim] of any 1- or 2-byte dtype (e.g. ``fp8_quantize(x)[0]``,
            so that the FP8 expert GEMMs gather FP8 rows instead of quantising the gathered bf16 rows);
            ``perm.x_sorted`` then has its dtype.
        up_block_m: the M tile of the bf16 expert GEMMs' table (the name is the up-projection's, which took it
            first; the down-projection runs the same table): None (the default) chooses, or one of
            :data:`UP_BLOCK_MS`. 128 shares the table above. 192 adds a second table (``perm.up_tiles``, one more
            scan launch) in which an expert of 129-192 rows is one 192-row tile (and a larger expert's last 1-64
            rows join its last 128-row tile: ``tiles_of``): :func:`moe_up` and :func:`moe_down` then run it with
            three consumer warpgroups and one weight stream instead of two CTAs each streaming it. Both give the
            same bits. On the H200 (``tools/moe_up_tiles.py``, alternating order) the 192-row table takes 0.81-0.82
            of the up-projection's time with 168 or 192 rows an expert (balanced routings), 1.01 with 240 (no
            expert fits one 192-row tile) and 0.96-0.97 on the benchmark's random gate (experts of a few rows to
            ~1000); the down-projection's, 0.86 at 192 rows an expert and 0.97-0.98 on the random gate at 4096-16384
            tokens (``benchmarks/logs/h200-2026-12-01-session38.md``). None takes 192 when ``T·k/E`` is in
            (128, 192] (:func:`choose_up_block_m`: the rows a load-balanced gate gives an expert; the counts
            themselves are on the device) and 128 otherwise or with a payload (its FP8 / FP4 GEMMs read the
            128-row table).

    Returns:
        :class:`MoEPermutation`. Three launches (count, scan, scatter; a second scan for ``up_tiles``), no host
        sync, no atomics.
    """
    _check_up_block_m(up_block_m)
    if payload is not None and up_block_m not in (None, BLOCK_M):
        raise ValueError(f"up_block_m={up_block_m} is for bf16 rows; a payload's GEMMs read the {BLOCK_M}-row table")
    experts = _check_routing(x, weights, experts)
    num_tokens, top_k = experts.shape
    if up_block_m is None:
        up_block_m = BLOCK_M if payload is not None else choose_up_block_m(num_tokens * top_k, num_experts)
    dim = x.shape[1]
    if payload is not None:
        check_tensor("payload", payload, ndim=2, shape=(num_tokens, dim), contiguous=True, device=x.device)
        if payload.element_size() not in (1, 2):
            raise TypeError(f"payload must have a 1- or 2-byte dtype, got {payload.dtype}")
        if (dim * payload.element_size()) % 8 or payload.storage_offset() * payload.element_size() % 16:
            raise ValueError(f"payload rows must be whole 8-byte words starting 16-byte aligned, got dim={dim}, "
                             f"{payload.dtype}, storage offset {payload.storage_offset()}")
    src = x if payload is None else payload
    check_int("num_experts", num_experts, min_value=1)
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"num_experts must be <= {MAX_EXPERTS}, got {num_experts}")
    _check_cuda("x", x)
    if validate:
        _check_range([("experts", experts, num_experts, f"expert ids, E={num_experts}")])
    n = num_tokens * top_k
    dev = x.device
    num_chunks = -(-n // CHUNK)
    perm = MoEPermutation(
        num_experts=num_experts,
        top_k=top_k,
        block_m=BLOCK_M,
        counts=_empty((num_experts,), torch.int32, dev),
        offsets=_empty((num_experts + 1,), torch.int32, dev),
        sorted_tokens=_empty((n,), torch.int32, dev),
        pair_pos=_empty((num_tokens, top_k), torch.int32, dev),
        tile_offsets=_empty((num_experts + 1,), torch.int32, dev),
        tile_expert=_empty((max(_max_tiles(n, num_experts, BLOCK_M), 1),), torch.int32, dev),
        tile_info=_empty((max(_max_tiles(n, num_experts, BLOCK_M), 1), 4), torch.int32, dev),
        x_sorted=_empty((n, dim), src.dtype, dev),
        w_sorted=_empty((n,), torch.float32, dev),
        up_tiles=None if up_block_m == BLOCK_M else (
            up_block_m, _empty((num_experts + 1,), torch.int32, dev),
            _empty((max(_max_tiles(n, num_experts, up_block_m), 1),), torch.int32, dev),
            _empty((max(_max_tiles(n, num_experts, up_block_m), 1), 4), torch.int32, dev)),
    )
    if n == 0:
        for t in (perm.counts, perm.offsets, perm.tile_offsets, *([perm.up_tiles[1]] if perm.up_tiles else [])):
            t.zero_()
        return perm
    local_rank = _empty((n,), torch.int32, dev)
    chunk_counts = _empty((num_chunks, num_experts), torch.int32, dev)
    chunk_base = _empty((num_chunks, num_experts), torch.int32, dev)
    with torch.cuda.device(dev):
        compile_kernel("moe_count", {})(experts.view(-1), local_rank, chunk_counts)
        compile_kernel("moe_scan", {"block_m": perm.block_m})(chunk_counts, chunk_base, perm.counts, perm.offsets,
                                                              perm.tile_offsets, perm.tile_expert, perm.tile_info)
        compile_kernel("moe_scatter", {})(src.view(torch.int64), weights, experts, local_rank, chunk_base,
                                          perm.offsets, perm.x_sorted.view(torch.int64), perm.w_sorted,
                                          perm.sorted_tokens, perm.pair_pos)
        if perm.up_tiles is not None:  # the same scan for the 192-row table; its other outputs are scratch
            bm, up_offsets, up_expert, up_info = perm.up_tiles
            compile_kernel("moe_scan", {"block_m": bm})(chunk_counts, torch.empty_like(chunk_base),
                                                        torch.empty_like(perm.counts), torch.empty_like(perm.offsets),
                                                        up_offsets, up_expert, up_info)
    return perm


def _check_stacked(name: str, w: object, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    check_tensor(name, w, dtype=torch.bfloat16, shape=shape, contiguous=True, device=device)
    check_aligned(name, w)
    return w


def _check_tile_info(tile_info: object) -> torch.Tensor:
    """``tile_info`` if it is tile records; else (a permutation not built by :func:`moe_permute`) the ValueError
    naming ``perm.tile_info``."""
    if not isinstance(tile_info, torch.Tensor):
        raise ValueError(f"perm.tile_info must be the tile records moe_permute builds, got {type(tile_info).__name__}")
    return tile_info


def _bf16_tiles(perm: MoEPermutation) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(block_m, tile_offsets, tile_info)`` of the table the bf16 expert GEMMs run (the 192-row one when there is
    one); a permutation without tile records (not built by :func:`moe_permute`) is refused."""
    if perm.up_tiles is not None:
        bm, tile_offsets, _, tile_info = perm.up_tiles
    else:
        bm, tile_offsets, tile_info = perm.block_m, perm.tile_offsets, perm.tile_info
    return bm, tile_offsets, _check_tile_info(tile_info)


def moe_up(
    perm: MoEPermutation,
    w1: torch.Tensor,
    w3: torch.Tensor,
    swiglu_limit: float | None = 10.0,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped up-projection with the SwiGLU fused: ``h = silu(min(x W1ᵀ, l)) · clamp(x W3ᵀ, ±l) · w``.

    Args:
        perm: the permutation (:func:`moe_permute`).
        w1, w3: [E, inter, dim] bf16 expert gate / up weights, contiguous; inter a multiple of 8.
        swiglu_limit: the routed-expert clamp ``l``, or None for none.
        out: optional preallocated [N, inter] bf16.

    Returns:
        h [N, inter] bf16 in sorted-row order (fp32 math, one bf16 rounding).
    """
    limit = _check_limit(swiglu_limit)
    x_sorted = perm.x_sorted
    check_tensor("perm.x_sorted", x_sorted, dtype=torch.bfloat16)  # not a permutation of an FP8 payload
    n, dim = x_sorted.shape
    dev = x_sorted.device
    check_tensor("w1", w1, dtype=torch.bfloat16, ndim=3)
    inter = w1.shape[1]
    if inter % 8 or inter == 0:
        raise ValueError(f"w1: inter={inter} must be a positive multiple of 8")
    _check_stacked("w1", w1, (perm.num_experts, inter, dim), dev)
    _check_stacked("w3", w3, (perm.num_experts, inter, dim), dev)
    if out is None:
        out = _empty((n, inter), torch.bfloat16, dev)
    else:
        check_tensor("out", out, dtype=torch.bfloat16, shape=(n, inter), contiguous=True, device=dev)
        check_aligned("out", out)
    if n:
        with torch.cuda.device(dev):
            bm, tile_offsets, tile_info = _bf16_tiles(perm)
            # the table's M tile; the 192-row tile has one config (UP_192_CONFIG)
            config = {"dim": dim, **(UP_192_CONFIG if bm == UP_BLOCK_M else {"block_m": bm})}
            kernel = compile_kernel("moe_up", config)
            kernel(x_sorted, perm.w_sorted, w1, w3, perm.offsets, tile_offsets, tile_info, out, limit)
    return out


def moe_down(perm: MoEPermutation, h: torch.Tensor, w2: torch.Tensor, *, out: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Grouped down-projection: ``y = h W2ᵀ`` per expert.

    Args:
        perm: the permutation (:func:`moe_permute`).
        h: [N, inter] bf16 from :func:`moe_up`.
        w2: [E, dim, inter] bf16 expert down weights, contiguous.
        out: optional preallocated [N, dim] bf16 (``perm.x_sorted`` may be reused: it is not read).

    Returns:
        y [N, dim] bf16 in sorted-row order (fp32 accumulation, one bf16 rounding). With ``perm.up_tiles`` (the
        192-row table) the tiles are those of :func:`moe_up`; the bits are those of the 128-row table.
    """
    n, dim = perm.x_sorted.shape
    dev = perm.x_sorted.device
    check_tensor("h", h, dtype=torch.bfloat16, ndim=2, contiguous=True, device=dev)
    inter = h.shape[1]
    check_tensor("h", h, shape=(n, inter))
    check_aligned("h", h)
    _check_stacked("w2", w2, (perm.num_experts, dim, inter), dev)
    if out is None:
        out = _empty((n, dim), torch.bfloat16, dev)
    else:
        check_tensor("out", out, dtype=torch.bfloat16, shape=(n, dim), contiguous=True, device=dev)
        check_aligned("out", out)
    if n:
        with torch.cuda.device(dev):
            bm, tile_offsets, tile_info = _bf16_tiles(perm)
            # the table's M tile; the 192-row tile has one config (DOWN_192_CONFIG)
            config = {"inter": inter, **(DOWN_192_CONFIG if bm == UP_BLOCK_M else {"block_m": bm})}
            kernel = compile_kernel("moe_down", config)
            kernel(h, w2, perm.offsets, tile_offsets, tile_info, out)
    return out


def _check_dense(prefix: str, w1: object, w2: object, w3: object, dim: int, device: torch.device) -> int:
    check_tensor(f"{prefix}w1", w1, dtype=torch.bfloat16, ndim=2, contiguous=True, device=device)
    inter = w1.shape[0]
    if inter % 8 or inter == 0:
        raise ValueError(f"{prefix}w1: inter={inter} must be a positive multiple of 8")
    check_tensor(f"{prefix}w1", w1, shape=(inter, dim))
    check_tensor(f"{prefix}w3", w3, dtype=torch.bfloat16, shape=(inter, dim), contiguous=True, device=device)
    check_tensor(f"{prefix}w2", w2, dtype=torch.bfloat16, shape=(dim, inter), contiguous=True, device=device)
    for name, w in ((f"{prefix}w1", w1), (f"{prefix}w2", w2), (f"{prefix}w3", w3)):
        check_aligned(name, w)
    return inter


def moe_shared_expert(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    swiglu_limit: float | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The shared expert, a dense SwiGLU: ``(silu(x W1ᵀ) · x W3ᵀ) W2ᵀ`` (no clamp, weight 1, by default).

    Args:
        x: [T, dim] bf16, contiguous, CUDA. w1, w3: [inter, dim] bf16. w2: [dim, inter] bf16.
        swiglu_limit: optional clamp as for the routed experts (V4: None).
        out: optional preallocated [T, dim] bf16.

    Returns:
        [T, dim] bf16 (h rounded to bf16 between the two GEMMs, fp32 accumulation).
    """
    limit = _check_limit(swiglu_limit)
    check_tensor("x", x, dtype=torch.bfloat16, ndim=2, contiguous=True)
    check_aligned("x", x)
    num_tokens, dim = x.shape
    if dim % 8:
        raise ValueError(f"x: dim={dim} must be a multiple of 8")
    inter = _check_dense("", w1, w2, w3, dim, x.device)
    _check_cuda("x", x)
    if out is None:
        out = _empty((num_tokens, dim), torch.bfloat16, x.device)
    else:
        check_tensor("out", out, dtype=torch.bfloat16, shape=(num_tokens, dim), contiguous=True, device=x.device)
        check_aligned("out", out)
    if num_tokens:
        h = _empty((num_tokens, inter), torch.bfloat16, x.device)
        with torch.cuda.device(x.device):
            compile_kernel("moe_up", {"dim": dim, "dense": True})(x, w1.unsqueeze(0), w3.unsqueeze(0), h, limit)
            compile_kernel("moe_down", {"inter": inter, "dense": True})(h, w2.unsqueeze(0), out)
    return out


_OUT_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def moe_combine(
    y_sorted: torch.Tensor,
    pair_pos: torch.Tensor,
    y_shared: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per token, ``Σ_s y_sorted[pair_pos[t, s]] (+ y_shared[t])`` in fp32, slots in order, no atomics.

    Args:
        y_sorted: [N, dim] bf16 routed outputs in sorted-row order (:func:`moe_down`).
        pair_pos: [T, k] int32 sorted row of each (token, slot), rows in ``[0, N)``.
        y_shared: [T, dim] bf16 shared-expert output, or None.
        out_dtype: bf16 or fp32.
        out: optional preallocated [T, dim] of ``out_dtype``.

    Returns:
        [T, dim] ``out_dtype``: ``((y_0 + y_1) + …) + y_shared`` in fp32, rounded once.
    """
    check_tensor("y_sorted", y_sorted, dtype=torch.bfloat16, ndim=2, contiguous=True)
    dim = y_sorted.shape[1]
    check_tensor("pair_pos", pair_pos, dtype=torch.int32, ndim=2, contiguous=True, device=y_sorted.device)
    num_tokens, top_k = pair_pos.shape
    if top_k < 1:
        raise ValueError(f"pair_pos must have at least one slot per token, got shape {list(pair_pos.shape)}")
    if y_shared is not None:
        check_tensor("y_shared", y_shared, dtype=torch.bfloat16, shape=(num_tokens, dim), contiguous=True,
                     device=y_sorted.device)
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    _check_cuda("y_sorted", y_sorted)
    if out is None:
        out = _empty((num_tokens, dim), out_dtype, y_sorted.device)
    else:
        check_tensor("out", out, dtype=out_dtype, shape=(num_tokens, dim), contiguous=True, device=y_sorted.device)
    if num_tokens:
        cfg = {"dim": dim, "top_k": top_k, "has_shared": y_shared is not None, "out_dtype": _OUT_DTYPES[out_dtype]}
        with torch.cuda.device(y_sorted.device):
            kernel = compile_kernel("moe_combine", cfg)
            if y_shared is None:
                kernel(y_sorted, pair_pos, out)
            else:
                kernel(y_sorted, pair_pos, y_shared, out)
    return out


def moe_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    swiglu_limit: float | None = 10.0,
    *,
    weight_format: str = "bf16",
    out_dtype: torch.dtype = torch.bfloat16,
    validate: bool = True,
    out: torch.Tensor | None = None,
    up_block_m: int | None = None,
) -> torch.Tensor:
    """The routed experts a routing selected, weighted and summed, plus the shared expert.

    The kernel form of :func:`tilev4.reference.moe`, with the routed weights stacked.

    Args:
        x: [T, dim] bf16 tokens, contiguous, CUDA; dim a multiple of 8; T may be 0.
        weights: [T, k] fp32 routing weights; experts: [T, k] int32 / int64 ids in ``[0, E)``.
        w1, w3: [E, inter, dim] bf16 routed gate / up weights; w2: [E, dim, inter] bf16. With
            ``weight_format="fp8"``: :class:`tilev4.kernels.moe_fp8.FP8Weight` triples (e4m3 data and
            128×128 power-of-two scales); with ``"fp4"``: :class:`tilev4.kernels.moe_fp4.FP4Weight`
            triples (packed e2m1 data and e8m0 scales per 32 along K, expanded to FP8 in the kernels);
            for both dim and inter are multiples of 128 and the activations are quantised 1×128 to FP8
            on the fly (x after the permutation, h between the GEMMs).
        shared: ``(w1, w2, w3)`` of the shared expert ([inter_s, dim], [dim, inter_s],
            [inter_s, dim] bf16; run on every token with weight 1 and no clamp), or None.
        swiglu_limit: routed-expert clamp (``up`` to [−l, l], ``gate`` to <= l), None for none.
        weight_format: "bf16", "fp8" or "fp4" (routed experts; the shared expert stays bf16).
        out_dtype: bf16 or fp32 output.
        validate: check the expert ids on the device (one host sync).
        out: optional preallocated [T, dim] of ``out_dtype``.
        up_block_m: the M tile of the bf16 expert GEMMs' table, up and down (see :func:`moe_permute`: 192 is
            faster for balanced routings, the same bits): None chooses (:func:`choose_up_block_m`; 128 for FP8 / FP4
            weights), 128 or 192 (bf16 weights only).

    Returns:
        [T, dim] ``Σ_s weights[t, s] · expert_{experts[t, s]}(x[t]) + shared(x[t])``. h and each
        expert's output are rounded to bf16 (as the production kernels do), the sum is fp32 in slot
        order; a token's output does not depend on the other tokens (bitwise).
    """
    _check_weight_format(weight_format)
    _check_limit(swiglu_limit)
    _check_up_block_m(up_block_m)
    if weight_format != "bf16" and up_block_m not in (None, BLOCK_M):
        raise ValueError(f"up_block_m={up_block_m} needs bf16 weights, got weight_format={weight_format!r}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    _check_routing(x, weights, experts)
    num_tokens, dim = x.shape
    quantized = weight_format in ("fp8", "fp4")
    if quantized:
        from tilev4.kernels import moe_fp8 as F

        if weight_format == "fp8":
            fmt = F.FP8_FORMAT
        else:
            from tilev4.kernels.moe_fp4 import FP4_FORMAT as fmt
        cls, check = fmt.weight_cls, fmt.check_weight
        if not isinstance(w1, cls):
            raise TypeError(f"w1 must be an {cls.__name__}(data, scale) for weight_format={weight_format!r}, "
                            f"got {type(w1).__name__}")
        check_tensor("w1.data", w1.data, ndim=3, device=x.device)
        num_experts, inter = w1.data.shape[0], w1.data.shape[1]
        if dim % F.SCALE_BLOCK or inter % F.SCALE_BLOCK:
            raise ValueError(f"weight_format={weight_format!r} needs dim and inter multiples of {F.SCALE_BLOCK}, "
                             f"got dim={dim}, inter={inter}")
        check("w1", w1, num_experts, inter, dim, x.device)
        check("w3", w3, num_experts, inter, dim, x.device)
        check("w2", w2, num_experts, dim, inter, x.device)
    else:
        check_tensor("w1", w1, dtype=torch.bfloat16, ndim=3, device=x.device)
        num_experts, inter = w1.shape[0], w1.shape[1]
    if inter % 8 or inter == 0:
        raise ValueError(f"w1: inter={inter} must be a positive multiple of 8")
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"w1 must have at most {MAX_EXPERTS} experts, got {num_experts}")
    if not quantized:
        _check_stacked("w1", w1, (num_experts, inter, dim), x.device)
        _check_stacked("w3", w3, (num_experts, inter, dim), x.device)
        _check_stacked("w2", w2, (num_experts, dim, inter), x.device)
    if shared is not None:
        if not isinstance(shared, Sequence) or len(shared) != 3:
            raise TypeError(f"shared must be a (w1, w2, w3) triple or None, got {type(shared).__name__}")
        _check_dense("shared.", *shared, dim, x.device)
    if out is None:
        out = _empty((num_tokens, dim), out_dtype, x.device)
    else:
        check_tensor("out", out, dtype=out_dtype, shape=(num_tokens, dim), contiguous=True, device=x.device)
    _check_cuda("x", x)
    if num_tokens == 0:
        return out
    if quantized:  # the activations are quantised 1×128 to FP8 on the fly for both weight formats
        from tilev4.kernels.quant import fp8_quantize

        # each token is quantised once and its FP8 row gathered (a row's blocks do not depend on the slot)
        x8_tokens, xs_tokens = fp8_quantize(x)
        perm = moe_permute(x, weights, experts, num_experts, validate=validate, payload=x8_tokens)
        x8, xs = perm.x_sorted, xs_tokens.index_select(0, perm.sorted_tokens)
        if weight_format == "fp8":  # h quantised in the up-projection's epilogue
            h8, hs = F.grouped_up(fmt, perm, x8, xs, w1, w3, swiglu_limit, None, quantize=True)
        else:
            h8, hs = fp8_quantize(F.grouped_up(fmt, perm, x8, xs, w1, w3, swiglu_limit, None))
        y_sorted = F.grouped_down(fmt, perm, h8, hs, w2, None)
    else:
        perm = moe_permute(x, weights, experts, num_experts, validate=validate, up_block_m=up_block_m)
        h = moe_up(perm, w1, w3, swiglu_limit)
        y_sorted = moe_down(perm, h, w2, out=perm.x_sorted)  # x_sorted is dead after the up-projection
    y_shared = None if shared is None else moe_shared_expert(x, *shared)
    return moe_combine(y_sorted, perm.pair_pos, y_shared, out_dtype=out_dtype, out=out)


def moe(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    *,
    top_k: int = 6,
    route_scale: float = 1.5,
    swiglu_limit: float | None = 10.0,
    tid2eid: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    weight_format: str = "bf16",
    out_dtype: torch.dtype = torch.bfloat16,
    validate: bool = True,
    out: torch.Tensor | None = None,
    up_block_m: int | None = None,
) -> torch.Tensor:
    """The MoE layer: :func:`moe_route` then :func:`moe_experts` (nine launches, ten with the 192-row table; no
    host sync when ``validate=False``).

    Args:
        x: [T, dim] bf16. gate_weight: [E, dim] fp32. gate_bias: [E] fp32 or None (None for a
            hash layer). w1, w3: [E, inter, dim] bf16; w2: [E, dim, inter] bf16.
        shared, swiglu_limit, weight_format, out_dtype, out, up_block_m: as in :func:`moe_experts`.
        top_k, route_scale, tid2eid, token_ids: as in :func:`moe_route`.
        validate: device-side range checks of the hash table, token ids and expert ids.

    Returns:
        [T, dim] ``out_dtype``, matching ``tilev4.reference.moe(x, *reference.moe_gate(...), ...)``
        to bf16 rounding (see :func:`moe_experts`), bitwise batch-invariant.
    """
    weights, experts = moe_route(x, gate_weight, gate_bias, top_k, route_scale, tid2eid, token_ids,
                                 validate=validate)
    return moe_experts(x, weights, experts, w1, w2, w3, shared, swiglu_limit, weight_format=weight_format,
                       out_dtype=out_dtype, validate=False, out=out, up_block_m=up_block_m)
