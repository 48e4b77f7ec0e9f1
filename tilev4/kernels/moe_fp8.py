"""MoE expert GEMMs with FP8 e4m3 weights (128×128 power-of-two block scales) on Hopper FP8 tensor cores.

Semantics: the bf16 path of :mod:`tilev4.kernels.moe` with the weights dequantised (``w = q · s``
per 128×128 block) and the activations quantised 1×128 on the fly (:func:`tilev4.fp8_quantize`,
ue8m0 scales): ``x ≈ x8 · sx`` per row and 128-column block. Both scales are powers of two.

Per M tile and K block of 128 (one scale block on each side) the CTA runs the FP8 wgmma into a
scratch accumulator ``t = x8[:, kb] · w8[:, kb]ᵀ`` and promotes it into the fp32 accumulator
``acc += t · sx[row, kb] · sw[n_block, kb]`` — a power-of-two product, so the promotion itself is
exact and the only rounding is the fp32 sum over K blocks (the FP8 tensor-core sum within a block
is promoted every 128 K, the practice that keeps its reduced-precision accumulation harmless).

Kernels (schedule, tile → expert map and batch invariance exactly as the bf16 kernels):

* ``moe_up_fp8`` — ``h = silu(min(x W1ᵀ, l)) · clamp(x W3ᵀ, ±l) · w`` → bf16.
* ``moe_down_fp8`` — ``y = h W2ᵀ`` → bf16, from ``h`` quantised 1×128 (a separate
  :func:`tilev4.fp8_quantize` launch).

Layouts: ``FP8Weight(data, scale)`` with data [E, N, K] float8_e4m3fn and scale [E, ⌈N/128⌉, K/128]
fp32 (powers of two; the checkpoint's e8m0 bytes decode to these exactly). K (dim for the up
projection, inter for the down projection) is a multiple of 128 and static (a kernel per size).

Tuning (:mod:`tilev4.kernels.moe_tuning`): ``block_n`` (128 / 64: one weight scale per tile; the down-projection
also 256, its default: two 128-column halves) and ``num_stages``; ``block_m`` is the permutation's (a problem key:
the tile table is built for it).

Dimension glossary: NR sorted rows (T·k), D dim, I inter, E experts, MT max M tiles, KB = K/128.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import tilelang.language as T
import torch
from tilelang.layout import make_swizzled_layout

from tilev4._checks import check_aligned, check_tensor
from tilev4._fastmath import FAST_SOURCE
from tilev4.kernels.moe import (
    _NO_WS,
    BLOCK_M,
    MoEPermutation,
    _check_limit,
    _check_tile_info,
    _dense_tile,
    _empty,
    _grouped_tile,
    _swiglu_store,
)
from tilev4.kernels.moe_tuning import (
    MOE_DOWN_FP8_HARNESS,
    MOE_DOWN_FP8_SPACE,
    MOE_UP_FP8_HARNESS,
    MOE_UP_FP8_SPACE,
    down_bucket,
    up_bucket,
)
from tilev4.kernels.moe_ws import (
    CONSUMER_REGS,
    HALF_M,
    PRODUCER_REGS,
    _grouped_record,
    cap_keep_nan,
    check_ws_schedule,
    clamp_keep_nan,
    load_route_weights,
    masked_rows,
    produce,
    shared_buffers,
    silu,
    store_part,
    zero_padding,
)
from tilev4.kernels.quant import FP8_AMAX_FLOOR, pow2_scale_bits
from tilev4.kernels.registry import compile_kernel, register

__all__ = ["FP8Weight", "build_moe_down_fp8", "build_moe_up_fp8", "moe_down_fp8", "moe_up_fp8",
           "quantize_fp8_weight"]

SCALE_BLOCK = 128
FP8_MAX = 448.0
_PASS_CONFIGS = _NO_WS  # cp.async software pipeline (see moe.py): its copies are disable_tma


class FP8Weight(NamedTuple):
    """Stacked FP8 expert weights: data [E, N, K] float8_e4m3fn, scale [E, ⌈N/128⌉, K/128] fp32."""

    data: torch.Tensor
    scale: torch.Tensor


def quantize_fp8_weight(w: torch.Tensor) -> FP8Weight:
    """Quantise [E, N, K] (or [N, K]) weights to FP8 e4m3 with 128×128 power-of-two scales (host-side prep).

    ``scale = 2^ceil(log2(max(amax, 1e-4) / 448))`` per block, ``data = rne(w / scale)``: the format of
    the released checkpoint (whose e8m0 scale bytes are the exponents of these scales).
    """
    check_tensor("w", w, dtype=(torch.float32, torch.bfloat16))
    if w.ndim not in (2, 3):
        raise ValueError(f"w must be [E, N, K] or [N, K], got shape {tuple(w.shape)}")
    squeeze = w.ndim == 2
    w3 = w.unsqueeze(0) if squeeze else w
    e, n, k = w3.shape
    if k % SCALE_BLOCK:
        raise ValueError(f"w: K={k} must be a multiple of {SCALE_BLOCK}")
    nb = -(-n // SCALE_BLOCK)
    pad = torch.zeros(e, nb * SCALE_BLOCK, k, dtype=torch.float32, device=w.device)
    pad[:, :n] = w3.float()
    blocks = pad.view(e, nb, SCALE_BLOCK, k // SCALE_BLOCK, SCALE_BLOCK)
    amax = blocks.abs().amax(dim=(2, 4)).clamp_min(1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    # exactness of the power of two: bump where the rounded log2 fell one short
    scale = torch.where(scale * FP8_MAX < amax, scale * 2, scale)
    q = (blocks / scale[:, :, None, :, None]).view(e, nb * SCALE_BLOCK, k)[:, :n].to(torch.float8_e4m3fn)
    if squeeze:
        return FP8Weight(q[0].contiguous(), scale[0].contiguous())
    return FP8Weight(q.contiguous(), scale.contiguous())


def _check_fp8_weight(name: str, w: object, e: int, n: int, k: int, device: torch.device) -> FP8Weight:
    if not isinstance(w, FP8Weight):
        raise TypeError(f"{name} must be an FP8Weight(data, scale), got {type(w).__name__}")
    check_tensor(f"{name}.data", w.data, dtype=torch.float8_e4m3fn, shape=(e, n, k), contiguous=True, device=device)
    check_tensor(f"{name}.scale", w.scale, dtype=torch.float32, shape=(e, -(-n // SCALE_BLOCK), k // SCALE_BLOCK),
                 contiguous=True, device=device)
    check_aligned(f"{name}.data", w.data)
    return w


SCHEDULES = ("ws", "pipelined")


FP8_DOWN_BLOCK_N = (2 * SCALE_BLOCK, SCALE_BLOCK, SCALE_BLOCK // 2)  # 256 only with the ws schedule


def _build_fp8_ws(kind: str, K: int, block_n: int, num_stages: int, quant_out: bool = False) -> Any:
    """Warp-specialised FP8 expert GEMM (``kind`` "up": SwiGLU epilogue, "down": bf16 out), grouped.

    ``quant_out`` (up, ``block_n`` = 128: a tile's columns are one quantisation block): h is quantised in the
    epilogue as :func:`tilev4.fp8_quantize` does it (bf16-rounded h, 1×128 blocks, ue8m0 scales) and stored as
    ``(h8, hs)``, the down-projection's operands, instead of bf16 h.

    The bf16 ``ws`` schedule (:mod:`tilev4.kernels.moe_ws`) with one K block of 128 (one scale block) a
    stage: the producer warpgroup TMA-loads the A halves and the weight tile(s); consumer warpgroup
    ``w`` (rows ``64·w ..``) runs the FP8 wgmma of each weight tile into a scratch accumulator, waits,
    and promotes it into its fp32 accumulator with the row's power-of-two scale product (exact), then
    releases the stage. The tile's wgmma sequence and promotions are those of the pipelined kernel, so
    both schedules give the same bits. A partly filled slab is loaded up to its rows only and its consumer
    zeroes the rest (:func:`tilev4.kernels.moe_ws.zero_padding`, as in the bf16 programs; H200 A/B on the
    benchmark's random gate: 0.989 of the routed FP8 path's time, against 1.001 on a routing without partial slabs).
    """
    # a down tile of 2·128 columns runs as the up-projection's two weight tiles: two 128-row TMA loads of W2 a
    # stage, two accumulators, one scratch (the 128 × 256 tile reads 3/4 of the bytes a FLOP of 128 × 128)
    wide = kind == "down" and block_n == 2 * SCALE_BLOCK
    BN, BK, S, KB = (SCALE_BLOCK if wide else block_n), SCALE_BLOCK, num_stages, K // SCALE_BLOCK
    NB = 2 if kind == "up" or wide else 1
    TN = NB * BN if wide else BN  # output columns of a tile
    SECOND_N = BN if wide else 0  # first row of the second weight tile, after the first's
    if quant_out and (kind != "up" or block_n != SCALE_BLOCK):
        raise ValueError(f"quant_out needs the up-projection with block_n={SCALE_BLOCK}, got {kind}, {block_n}")
    NR, N, NS, E, MT = (T.dynamic(n) for n in ("NR", "N", "NS", "E", "MT"))
    fp8 = T.float8_e4m3fn

    @T.macro
    def store_quantized(w, rw, r0, n0, out, limit, o_s, w_s, accs, t, amax, inv):
        """h of consumer ``w``'s 64 rows (SwiGLU, clamp, routing weight, rounded to bf16 as the bf16 store
        rounds it) quantised 1×128 like :func:`tilev4.fp8_quantize`: the row's amax over the tile's 128
        columns, a power-of-two scale, ``rne(h / scale)``; stored by TMA when all 64 rows are valid."""
        gate, up = accs
        for i, j in T.Parallel(HALF_M, BN):
            g = cap_keep_nan(gate[i, j], limit)
            u = clamp_keep_nan(up[i, j], limit)
            t[i, j] = T.cast(T.cast(silu(g) * u * w_s[i], T.bfloat16), T.float32)
        T.reduce_absmax(t, amax, dim=1)
        for i in T.Parallel(HALF_M):
            scale, inv_scale = pow2_scale_bits(T.max(amax[i], FP8_AMAX_FLOOR), FP8_MAX)
            inv[i] = inv_scale
            if i < rw:
                out[1][r0 + i, n0 // SCALE_BLOCK] = scale
        for i, j in T.Parallel(HALF_M, BN):
            o_s[i, j] = t[i, j] * inv[i]  # |h / scale| <= 448: no saturation needed
        if rw >= HALF_M:
            T.fence_proxy_async()  # generic-proxy writes of o_s before the TMA (async proxy) reads it
            T.sync_threads(barrier_id=1 + w, arrive_count=128)
            T.copy(o_s, out[0][r0, n0])
        else:
            T.sync_threads(barrier_id=1 + w, arrive_count=128)
            masked_rows(rw, r0, n0, out[0], o_s, N, BN)

    def _second_scale_block(nb):
        """The second weight tile's scale block: the first's (W3 beside W1), or for W2's two halves the next one,
        clamped into the scales (the last tile's second half may lie past N). A plain function, called where the
        index is used: the expression is substituted there (a name bound in the macro would add a let binding)."""
        return T.min(nb + 1, NS - 1) if wide else nb

    @T.macro
    def promote(acc, t, sc, cur, w_scale):
        for i in T.Parallel(HALF_M):
            sc[i] = cur[i] * w_scale
        T.wait_wgmma(0)
        for i, j in T.Parallel(HALF_M, BN):  # exact power-of-two rescale, fp32 sum
            acc[i, j] += t[i, j] * sc[i]

    @T.macro
    def consumer(w, a_scale, w_scales, wts, out, limit, a_s, bs, o_s, w_s, accs, t, sc, cur, nxt, full, empty, tx, e,
                 row0, rows, n0):
        T.set_max_nreg(CONSUMER_REGS, 1)
        rw = rows - w * HALF_M
        r0 = row0 + w * HALF_M
        nb = n0 // SCALE_BLOCK
        # the scales of K block ki + 1 are loaded while block ki runs (registers), so that no promotion waits on
        # a global load
        ws0 = T.alloc_var(T.float32)
        ws0_next = T.alloc_var(T.float32)
        ws1 = T.alloc_var(T.float32)
        ws1_next = T.alloc_var(T.float32)
        if rw > 0:
            T.clear(accs[0])
            if NB == 2:
                T.clear(accs[1])
            for i in T.Parallel(HALF_M):
                nxt[i] = T.if_then_else(i < rw, a_scale[r0 + i, 0], 0.0)
            ws0_next = w_scales[0][e, nb, 0]
            if NB == 2:
                ws1_next = w_scales[1][e, _second_scale_block(nb), 0]
        zero_padding(a_s, rw, S, tx, 1 + w)  # the producer loads a partly filled slab's rows only (part)
        for ki in T.serial(KB):
            slot = ki % S
            T.barrier_wait(full[slot], (ki // S) & 1)
            if rw > 0:
                T.wgmma_gemm(a_s[slot, :, :], bs[0][slot, :, :], t, transpose_B=True, clear_accum=True)
                for i in T.Parallel(HALF_M):
                    cur[i] = nxt[i]
                ws0 = ws0_next
                if NB == 2:
                    ws1 = ws1_next
                if ki + 1 < KB:
                    for i in T.Parallel(HALF_M):
                        nxt[i] = T.if_then_else(i < rw, a_scale[r0 + i, ki + 1], 0.0)
                    ws0_next = w_scales[0][e, nb, ki + 1]
                    if NB == 2:
                        ws1_next = w_scales[1][e, _second_scale_block(nb), ki + 1]
                promote(accs[0], t, sc, cur, ws0)
                if NB == 2:
                    T.wgmma_gemm(a_s[slot, :, :], bs[1][slot, :, :], t, transpose_B=True, clear_accum=True)
                    promote(accs[1], t, sc, cur, ws1)
            if tx % 32 == 0:
                T.barrier_arrive(empty[slot])
        if rw > 0:
            if kind == "up":
                T.sync_threads(barrier_id=1 + w, arrive_count=128)  # the smem reads of the K loop are done
                load_route_weights(rw, r0, wts, w_s)
            if quant_out:
                store_quantized(w, rw, r0, n0, out, limit, o_s, w_s, accs, t, sc, cur)
            elif wide:
                store_part(0, w, rw, r0, n0, out, limit, o_s, w_s, accs[0:1], N, BN, False)
                store_part(0, w, rw, r0, n0 + BN, out, limit, o_s, w_s, accs[1:2], N, BN, False)
            else:
                store_part(0, w, rw, r0, n0, out, limit, o_s, w_s, accs, N, BN, kind == "up")

    @T.macro
    def body(a, a_scale, ws, w_scales, wts, out, limit, offsets, tile_offsets, tile_info):
        with T.Kernel(MT * T.ceildiv(N, TN), threads=384) as bx:
            if kind == "up":
                T.import_source(FAST_SOURCE)  # silu's ex2 / rcp
            a0_s = T.alloc_shared((S, HALF_M, BK), fp8)
            a1_s = T.alloc_shared((S, HALF_M, BK), fp8)
            bs = shared_buffers("b_s", NB, (S, BN, BK), fp8)
            o0_s = T.alloc_shared((HALF_M, BN), fp8 if quant_out else T.bfloat16)
            o1_s = T.alloc_shared((HALF_M, BN), fp8 if quant_out else T.bfloat16)
            w0_s = T.alloc_shared((HALF_M,), T.float32) if kind == "up" else None
            w1_s = T.alloc_shared((HALF_M,), T.float32) if kind == "up" else None
            acc0 = [T.alloc_fragment((HALF_M, BN), T.float32) for _ in range(NB)]
            acc1 = [T.alloc_fragment((HALF_M, BN), T.float32) for _ in range(NB)]
            t0 = T.alloc_fragment((HALF_M, BN), T.float32)
            t1 = T.alloc_fragment((HALF_M, BN), T.float32)
            sc0 = T.alloc_fragment((HALF_M,), T.float32)
            sc1 = T.alloc_fragment((HALF_M,), T.float32)
            cur0 = T.alloc_fragment((HALF_M,), T.float32)
            cur1 = T.alloc_fragment((HALF_M,), T.float32)
            nxt0 = T.alloc_fragment((HALF_M,), T.float32)
            nxt1 = T.alloc_fragment((HALF_M,), T.float32)
            full = T.alloc_barrier([128] * S)
            empty = T.alloc_barrier([8] * S)
            T.annotate_layout({buf: make_swizzled_layout(buf) for buf in [a0_s, a1_s, o0_s, o1_s, *bs]})
            NNT = T.ceildiv(N, TN)
            tx = T.get_thread_binding()
            e = T.alloc_var(T.int32, init=0)
            row0 = T.alloc_var(T.int32, init=0)
            rows = T.alloc_var(T.int32, init=0)
            n0 = T.alloc_var(T.int32, init=0)
            live = T.alloc_var(T.bool)
            _grouped_record(bx, NNT, tile_info, e, row0, rows, n0, live, TN)
            if live:  # CTAs past the real tiles exit
                if tx >= 256:
                    produce(a, ws, [a0_s, a1_s], bs, full, empty, e, row0, rows, n0, KB, BK, BN, S, SECOND_N,
                            PRODUCER_REGS, True)  # part: a partly filled slab's rows only (zero_padding)
                elif tx < 128:
                    consumer(0, a_scale, w_scales, wts, out, limit, a0_s, bs, o0_s, w0_s, acc0, t0, sc0, cur0,
                             nxt0, full, empty, tx, e, row0, rows, n0)
                else:
                    consumer(1, a_scale, w_scales, wts, out, limit, a1_s, bs, o1_s, w1_s, acc1, t1, sc1, cur1,
                             nxt1, full, empty, tx, e, row0, rows, n0)

    if kind == "up" and not quant_out:

        @T.prim_func
        def moe_up_fp8_ws(
            x8: T.Tensor[(NR, K), fp8],
            xs: T.Tensor[(NR, KB), T.float32],
            w_sorted: T.Tensor[(NR,), T.float32],
            w1: T.Tensor[(E, N, K), fp8],
            w1s: T.Tensor[(E, NS, KB), T.float32],
            w3: T.Tensor[(E, N, K), fp8],
            w3s: T.Tensor[(E, NS, KB), T.float32],
            offsets: T.Tensor[(E + 1,), T.int32],
            tile_offsets: T.Tensor[(E + 1,), T.int32],
            tile_info: T.Tensor[(MT, 4), T.int32],
            h: T.Tensor[(NR, N), T.bfloat16],
            limit: T.float32,
        ):
            body(x8, xs, [w1, w3], [w1s, w3s], w_sorted, h, limit, offsets, tile_offsets, tile_info)

        return moe_up_fp8_ws

    if quant_out:

        @T.prim_func
        def moe_up_fp8_q_ws(
            x8: T.Tensor[(NR, K), fp8],
            xs: T.Tensor[(NR, KB), T.float32],
            w_sorted: T.Tensor[(NR,), T.float32],
            w1: T.Tensor[(E, N, K), fp8],
            w1s: T.Tensor[(E, NS, KB), T.float32],
            w3: T.Tensor[(E, N, K), fp8],
            w3s: T.Tensor[(E, NS, KB), T.float32],
            offsets: T.Tensor[(E + 1,), T.int32],
            tile_offsets: T.Tensor[(E + 1,), T.int32],
            tile_info: T.Tensor[(MT, 4), T.int32],
            h8: T.Tensor[(NR, N), fp8],
            hs: T.Tensor[(NR, NS), T.float32],
            limit: T.float32,
        ):
            body(x8, xs, [w1, w3], [w1s, w3s], w_sorted, [h8, hs], limit, offsets, tile_offsets, tile_info)

        return moe_up_fp8_q_ws

    @T.prim_func
    def moe_down_fp8_ws(
        h8: T.Tensor[(NR, K), fp8],
        hs: T.Tensor[(NR, KB), T.float32],
        w2: T.Tensor[(E, N, K), fp8],
        w2s: T.Tensor[(E, NS, KB), T.float32],
        offsets: T.Tensor[(E + 1,), T.int32],
        tile_offsets: T.Tensor[(E + 1,), T.int32],
        tile_info: T.Tensor[(MT, 4), T.int32],
        y: T.Tensor[(NR, N), T.bfloat16],
    ):
        body(h8, hs, [w2] * NB, [w2s] * NB, None, y, None, offsets, tile_offsets, tile_info)  # wide: W2 twice

    return moe_down_fp8_ws


@register("moe_up_fp8", configs=[{"dim": 4096}], tags=("moe", "fp8", "batch_invariant"), space=MOE_UP_FP8_SPACE,
          bucket=up_bucket, harness=MOE_UP_FP8_HARNESS)
def build_moe_up_fp8(dim: int, block_m: int = BLOCK_M, block_n: int = 128, num_stages: int = 4, threads: int = 256,
                     schedule: str = "ws"):
    """MoE grouped up-projection, FP8 weights and activations: SwiGLU with clamp and routing weight fused."""
    if dim % SCALE_BLOCK:
        raise ValueError(f"dim={dim} must be a multiple of {SCALE_BLOCK}")
    if SCALE_BLOCK % block_n:
        raise ValueError(f"block_n={block_n} must divide {SCALE_BLOCK} (one weight scale per tile)")
    check_ws_schedule(schedule, block_m, SCHEDULES)
    if schedule == "ws":
        return _build_fp8_ws("up", dim, block_n, num_stages)
    BM, BN, BK = block_m, block_n, SCALE_BLOCK
    D, KB = dim, dim // SCALE_BLOCK
    NR, I, IS, E, MT = (T.dynamic(n) for n in ("NR", "I", "IS", "E", "MT"))
    policy = T.GemmWarpPolicy.FullRow
    fp8 = T.float8_e4m3fn

    @T.prim_func
    def moe_up_fp8_kernel(
        x8: T.Tensor[(NR, D), fp8],
        xs: T.Tensor[(NR, KB), T.float32],
        w_sorted: T.Tensor[(NR,), T.float32],
        w1: T.Tensor[(E, I, D), fp8],
        w1s: T.Tensor[(E, IS, KB), T.float32],
        w3: T.Tensor[(E, I, D), fp8],
        w3s: T.Tensor[(E, IS, KB), T.float32],
        offsets: T.Tensor[(E + 1,), T.int32],
        tile_offsets: T.Tensor[(E + 1,), T.int32],
        tile_info: T.Tensor[(MT, 4), T.int32],
        h: T.Tensor[(NR, I), T.bfloat16],
        limit: T.float32,
    ):
        T.annotate_pass_configs(_PASS_CONFIGS)
        with T.Kernel(MT * T.ceildiv(I, BN), threads=threads) as bx:
            T.import_source(FAST_SOURCE)  # silu's ex2 / rcp
            a_shared = T.alloc_shared((BM, BK), fp8)
            b1_shared = T.alloc_shared((BN, BK), fp8)
            b3_shared = T.alloc_shared((BN, BK), fp8)
            h_shared = T.alloc_shared((BM, BN), T.bfloat16)
            w_shared = T.alloc_shared((BM,), T.float32)
            gate_frag = T.alloc_fragment((BM, BN), T.float32)
            up_frag = T.alloc_fragment((BM, BN), T.float32)
            t_frag = T.alloc_fragment((BM, BN), T.float32)
            sc1 = T.alloc_fragment((BM,), T.float32)
            sc3 = T.alloc_fragment((BM,), T.float32)
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
                T.clear(gate_frag)
                T.clear(up_frag)
                for k in T.Pipelined(KB, num_stages=num_stages):
                    T.copy(x8[row0, k * BK], a_shared, disable_tma=True)  # rows past NR read as 0 (cp.async zero-fill)
                    T.copy(w1[e, n0, k * BK], b1_shared, disable_tma=True)
                    T.copy(w3[e, n0, k * BK], b3_shared, disable_tma=True)
                    for i in T.Parallel(BM):  # the row's combined scales of this K block (powers of two)
                        sx = T.if_then_else(row0 + i < NR, xs[row0 + i, k], 0.0)
                        sc1[i] = sx * w1s[e, n0 // SCALE_BLOCK, k]
                        sc3[i] = sx * w3s[e, n0 // SCALE_BLOCK, k]
                    T.gemm(a_shared, b1_shared, t_frag, transpose_B=True, policy=policy, clear_accum=True)
                    for i, j in T.Parallel(BM, BN):  # promote: exact power-of-two rescale, fp32 sum
                        gate_frag[i, j] += t_frag[i, j] * sc1[i]
                    T.gemm(a_shared, b3_shared, t_frag, transpose_B=True, policy=policy, clear_accum=True)
                    for i, j in T.Parallel(BM, BN):
                        up_frag[i, j] += t_frag[i, j] * sc3[i]
                _swiglu_store(h, limit, row0, rows, n0, gate_frag, up_frag, h_shared, w_shared, True, BM, BN)

    return moe_up_fp8_kernel


@T.macro
def _fp8_gemm_store(a8, a_scale, w8, w_scale, y, e, row0, rows, n0, NR, KB, num_stages, a_shared, b_shared, acc,
                    t_frag, sc, BK, BN, BM, out_dtype):
    """``y[rows of the tile] = (a8·sa) (w8·sw)ᵀ`` over KB blocks of 128: FP8 wgmma per block, exact power-of-two
    promotion into the fp32 accumulator, one rounding to ``out_dtype`` at the store."""
    T.clear(acc)
    for k in T.Pipelined(KB, num_stages=num_stages):
        T.copy(a8[row0, k * BK], a_shared, disable_tma=True)  # rows past NR read as 0 (cp.async zero-fill)
        T.copy(w8[e, n0, k * BK], b_shared, disable_tma=True)
        for i in T.Parallel(BM):
            sc[i] = T.if_then_else(row0 + i < NR, a_scale[row0 + i, k], 0.0) * w_scale[e, n0 // SCALE_BLOCK, k]
        T.gemm(a_shared, b_shared, t_frag, transpose_B=True, policy=T.GemmWarpPolicy.FullRow, clear_accum=True)
        for i, j in T.Parallel(BM, BN):
            acc[i, j] += t_frag[i, j] * sc[i]
    for i, j in T.Parallel(BM, BN):
        if i < rows:
            y[row0 + i, n0 + j] = T.cast(acc[i, j], out_dtype)


def _build_fp8_gemm(K: int, dense: bool, block_m: int, block_n: int, num_stages: int, threads: int, group_m: int,
                    out_dtype: str):
    """The FP8 GEMM ``y = a·wᵀ`` (a quantised 1×128, w 128×128): grouped over the MoE tile table, or dense."""
    if K % SCALE_BLOCK:
        raise ValueError(f"K={K} must be a multiple of {SCALE_BLOCK}")
    if SCALE_BLOCK % block_n:
        raise ValueError(f"block_n={block_n} must divide {SCALE_BLOCK} (one weight scale per tile)")
    if out_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"out_dtype must be 'bfloat16' or 'float32', got {out_dtype!r}")
    BM, BN, BK, KB = block_m, block_n, SCALE_BLOCK, K // SCALE_BLOCK
    NR, D, DS, E, MT = (T.dynamic(n) for n in ("NR", "D", "DS", "E", "MT"))
    fp8, odt = T.float8_e4m3fn, getattr(T, out_dtype)

    if dense:

        @T.prim_func
        def fp8_linear_kernel(
            a8: T.Tensor[(NR, K), fp8],
            a_scale: T.Tensor[(NR, KB), T.float32],
            w8: T.Tensor[(1, D, K), fp8],
            w_scale: T.Tensor[(1, DS, KB), T.float32],
            y: T.Tensor[(NR, D), odt],
        ):
            T.annotate_pass_configs(_PASS_CONFIGS)
            with T.Kernel(T.ceildiv(NR, BM) * T.ceildiv(D, BN), threads=threads) as bx:
                a_shared = T.alloc_shared((BM, BK), fp8)
                b_shared = T.alloc_shared((BN, BK), fp8)
                acc = T.alloc_fragment((BM, BN), T.float32)
                t_frag = T.alloc_fragment((BM, BN), T.float32)
                sc = T.alloc_fragment((BM,), T.float32)
                a0 = T.alloc_var(T.int32)
                c = T.alloc_var(T.int32)
                row0 = T.alloc_var(T.int32)
                rows = T.alloc_var(T.int32)
                n0 = T.alloc_var(T.int32)
                _dense_tile(bx, T.ceildiv(D, BN), NR, group_m, a0, c, row0, rows, n0, BM, BN)
                _fp8_gemm_store(a8, a_scale, w8, w_scale, y, 0, row0, rows, n0, NR, KB, num_stages, a_shared,
                                b_shared, acc, t_frag, sc, BK, BN, BM, odt)

        return fp8_linear_kernel

    @T.prim_func
    def moe_down_fp8_kernel(
        h8: T.Tensor[(NR, K), fp8],
        hs: T.Tensor[(NR, KB), T.float32],
        w2: T.Tensor[(E, D, K), fp8],
        w2s: T.Tensor[(E, DS, KB), T.float32],
        offsets: T.Tensor[(E + 1,), T.int32],
        tile_offsets: T.Tensor[(E + 1,), T.int32],
        tile_info: T.Tensor[(MT, 4), T.int32],
        y: T.Tensor[(NR, D), odt],
    ):
        T.annotate_pass_configs(_PASS_CONFIGS)
        with T.Kernel(MT * T.ceildiv(D, BN), threads=threads) as bx:
            a_shared = T.alloc_shared((BM, BK), fp8)
            b_shared = T.alloc_shared((BN, BK), fp8)
            acc = T.alloc_fragment((BM, BN), T.float32)
            t_frag = T.alloc_fragment((BM, BN), T.float32)
            sc = T.alloc_fragment((BM,), T.float32)
            e = T.alloc_var(T.int32)
            a0 = T.alloc_var(T.int32)
            c = T.alloc_var(T.int32)
            row0 = T.alloc_var(T.int32)
            rows = T.alloc_var(T.int32)
            n0 = T.alloc_var(T.int32)
            if bx // T.ceildiv(D, BN) < tile_offsets[E]:
                _grouped_tile(bx, T.ceildiv(D, BN), tile_info, tile_offsets, offsets, e, a0, c, row0, rows, n0,
                              BM, BN)
                _fp8_gemm_store(h8, hs, w2, w2s, y, e, row0, rows, n0, NR, KB, num_stages, a_shared, b_shared, acc,
                                t_frag, sc, BK, BN, BM, odt)

    return moe_down_fp8_kernel


@register("moe_up_fp8_q", configs=[{"dim": 4096}], tags=("moe", "fp8", "batch_invariant"))
def build_moe_up_fp8_q(dim: int, num_stages: int = 4):
    """:func:`build_moe_up_fp8` (``ws`` schedule, 128-column tiles) with h quantised to FP8 1×128 in the epilogue:
    writes ``(h8, hs)`` as ``fp8_quantize(h)`` would. Not tuned (the up-projection's default tile)."""
    if dim % SCALE_BLOCK:
        raise ValueError(f"dim={dim} must be a multiple of {SCALE_BLOCK}")
    return _build_fp8_ws("up", dim, SCALE_BLOCK, num_stages, quant_out=True)


@register("moe_down_fp8", configs=[{"inter": 2048}], tags=("moe", "fp8", "batch_invariant"),
          space=MOE_DOWN_FP8_SPACE, bucket=down_bucket, harness=MOE_DOWN_FP8_HARNESS)
def build_moe_down_fp8(inter: int, block_m: int = BLOCK_M, block_n: int = 2 * SCALE_BLOCK, num_stages: int = 4,
                       threads: int = 256, schedule: str = "ws"):
    """MoE grouped down-projection, FP8 weights and activations: y = h·W2ᵀ per expert (bf16 out).

    ``block_n`` 64 / 128 (one weight scale per tile) or, with the ``ws`` schedule, 256: the tile runs as two
    128-column halves (two TMA loads of W2 a stage, two accumulators and one scratch, as the up-projection's
    gate and up tiles), so a stage carries 48 KB for twice the FLOPs of 128 × 128's 32 KB. Every output element
    is the same sequence of wgmma steps and promotions at any ``block_n``: the same bits (measured on the H200,
    8192 tokens at V4-Flash dims: 1.118 ms against 1.329 ms at 128)."""
    check_ws_schedule(schedule, block_m, SCHEDULES)
    if block_n not in FP8_DOWN_BLOCK_N or (block_n == 2 * SCALE_BLOCK and schedule != "ws"):
        raise ValueError(f"block_n={block_n} must be 64 or 128 (one weight scale per tile), or 256 with the 'ws' "
                         f"schedule (two halves), got schedule={schedule!r}")
    if schedule == "ws":
        if inter % SCALE_BLOCK:
            raise ValueError(f"inter={inter} must be a multiple of {SCALE_BLOCK}")
        return _build_fp8_ws("down", inter, block_n, num_stages)
    return _build_fp8_gemm(inter, False, block_m, block_n, num_stages, threads, 8, "bfloat16")


def _check_act(name: str, q: object, s: object, n: int, k: int, device: torch.device) -> None:
    check_tensor(name, q, dtype=torch.float8_e4m3fn, shape=(n, k), contiguous=True, device=device)
    check_aligned(name, q)
    check_tensor(f"{name} scale", s, dtype=torch.float32, shape=(n, k // SCALE_BLOCK), contiguous=True,
                 device=device)


@dataclass(frozen=True)
class QuantFormat:
    """What differs between the quantised expert-weight paths (FP8 here, FP4 in :mod:`tilev4.kernels.moe_fp4`);
    the checks and launches of :func:`grouped_up` / :func:`grouped_down` are shared."""

    name: str  # "FP8" / "FP4", for messages
    weight_cls: type
    check_weight: Callable[..., Any]  # (name, w, E, N, K, device) -> the weight as the kernel takes it
    check_act: Callable[..., None]  # (name, q, scale, N, K, device)
    up_kernel: str
    down_kernel: str
    inter_multiple: int = 1  # what inter must be a multiple of, checked before the weights
    # ("up" / "down", sorted rows, experts, the tile table's M tile) -> config keys the op adds for that many rows
    # (FP4: the swap schedule for decode-sized batches, a measured rule rather than a tuned choice), or None
    rows_config: Callable[[str, int, int, int], dict[str, Any]] | None = None
    # ({argument name: checked weight}) -> config keys the weights add (FP4: a prepared layout); raises ValueError
    # for weights of one call that do not go together
    weight_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def weight_keys(self, weights: dict[str, Any]) -> dict[str, Any]:
        """The config keys of one call's weights (:attr:`weight_config`), checked before anything is launched."""
        return {} if self.weight_config is None else self.weight_config(weights)

    def config(self, kind: str, problem: dict[str, Any], perm: MoEPermutation, num_rows: int,
               weight_keys: dict[str, Any]) -> dict[str, Any]:
        """The op's config of the ``kind`` GEMM: the problem, the tile table's M tile, the rows' and the weights'
        keys."""
        config = {**problem, "block_m": perm.block_m}
        if self.rows_config is not None:
            config.update(self.rows_config(kind, num_rows, perm.num_experts, perm.block_m))
        return {**config, **weight_keys}


def grouped_up(fmt: QuantFormat, perm: MoEPermutation, x8: torch.Tensor, x_scale: torch.Tensor, w1: Any, w3: Any,
               swiglu_limit: float | None, out: Any, quantize: bool = False) -> Any:
    """Validate and launch ``fmt``'s grouped up-projection (see :func:`moe_up_fp8`); ``quantize`` (FP8 only):
    the epilogue quantises h and returns ``(h8, hs)``."""
    limit = _check_limit(swiglu_limit)
    n, dim = perm.x_sorted.shape
    dev = perm.x_sorted.device
    if dim % SCALE_BLOCK:
        raise ValueError(f"x: dim={dim} must be a multiple of {SCALE_BLOCK} for {fmt.name} weights")
    fmt.check_act("x8", x8, x_scale, n, dim, dev)
    if not isinstance(w1, fmt.weight_cls):
        raise TypeError(f"w1 must be an {fmt.weight_cls.__name__}(data, scale), got {type(w1).__name__}")
    check_tensor("w1.data", w1.data, ndim=3)
    inter = w1.data.shape[1]
    if fmt.inter_multiple > 1 and (inter % fmt.inter_multiple or inter == 0):
        raise ValueError(f"w1: inter={inter} must be a positive multiple of {fmt.inter_multiple} "
                         f"for {fmt.name} weights")
    w1 = fmt.check_weight("w1", w1, perm.num_experts, inter, dim, dev)
    w3 = fmt.check_weight("w3", w3, perm.num_experts, inter, dim, dev)
    weight_keys = fmt.weight_keys({"w1": w1, "w3": w3})
    if quantize:
        if fmt.up_kernel != "moe_up_fp8":
            raise ValueError(f"quantize=True is for FP8 weights, got {fmt.name}")
        return _up_quantized(perm, x8, x_scale, w1, w3, limit, out, n, dim, inter, dev)
    if out is None:
        out = _empty((n, inter), torch.bfloat16, dev)
    else:
        check_tensor("out", out, dtype=torch.bfloat16, shape=(n, inter), contiguous=True, device=dev)
        check_aligned("out", out)
    if n:
        with torch.cuda.device(dev):
            tile_info = _check_tile_info(perm.tile_info)  # the 128-row table's records (not perm.up_tiles)
            compile_kernel(fmt.up_kernel, fmt.config("up", {"dim": dim}, perm, n, weight_keys))(
                x8, x_scale, perm.w_sorted, w1.data, w1.scale, w3.data, w3.scale, perm.offsets, perm.tile_offsets,
                tile_info, out, limit)
    return out


def _up_quantized(perm: MoEPermutation, x8: torch.Tensor, x_scale: torch.Tensor, w1: FP8Weight, w3: FP8Weight,
                  limit: float, out: Any, n: int, dim: int, inter: int,
                  dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 up-projection with h quantised in its epilogue (``moe_up_fp8_q``): ``(h8, hs)``."""
    if inter % SCALE_BLOCK:
        raise ValueError(f"w1: inter={inter} must be a multiple of {SCALE_BLOCK} to quantise h in the epilogue")
    if perm.block_m != BLOCK_M:
        raise ValueError(f"perm.block_m must be {BLOCK_M} to quantise h in the epilogue, got {perm.block_m}")
    if out is None:
        h8 = _empty((n, inter), torch.float8_e4m3fn, dev)
        hs = _empty((n, inter // SCALE_BLOCK), torch.float32, dev)
    else:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"out must be an (h8, hs) pair when quantize=True, got {type(out).__name__}")
        h8, hs = out
        check_tensor("out[0]", h8, dtype=torch.float8_e4m3fn, shape=(n, inter), contiguous=True, device=dev)
        check_aligned("out[0]", h8)
        check_tensor("out[1]", hs, dtype=torch.float32, shape=(n, inter // SCALE_BLOCK), contiguous=True,
                     device=dev)
    if n:
        with torch.cuda.device(dev):
            tile_info = _check_tile_info(perm.tile_info)
            compile_kernel("moe_up_fp8_q", {"dim": dim})(
                x8, x_scale, perm.w_sorted, w1.data, w1.scale, w3.data, w3.scale, perm.offsets, perm.tile_offsets,
                tile_info, h8, hs, limit)
    return h8, hs


def grouped_down(fmt: QuantFormat, perm: MoEPermutation, h8: torch.Tensor, h_scale: torch.Tensor, w2: Any,
                 out: torch.Tensor | None) -> torch.Tensor:
    """Validate and launch ``fmt``'s grouped down-projection (see :func:`moe_down_fp8`)."""
    n, dim = perm.x_sorted.shape
    dev = perm.x_sorted.device
    check_tensor("h8", h8, ndim=2)
    inter = h8.shape[1]
    if inter % SCALE_BLOCK:
        raise ValueError(f"h8: inter={inter} must be a multiple of {SCALE_BLOCK}")
    fmt.check_act("h8", h8, h_scale, n, inter, dev)
    w2 = fmt.check_weight("w2", w2, perm.num_experts, dim, inter, dev)
    weight_keys = fmt.weight_keys({"w2": w2})
    if out is None:
        out = _empty((n, dim), torch.bfloat16, dev)
    else:
        check_tensor("out", out, dtype=torch.bfloat16, shape=(n, dim), contiguous=True, device=dev)
        check_aligned("out", out)
    if n:
        with torch.cuda.device(dev):
            tile_info = _check_tile_info(perm.tile_info)  # the 128-row table's records (not perm.up_tiles)
            compile_kernel(fmt.down_kernel, fmt.config("down", {"inter": inter}, perm, n, weight_keys))(
                h8, h_scale, w2.data, w2.scale, perm.offsets, perm.tile_offsets, tile_info, out)
    return out


FP8_FORMAT = QuantFormat("FP8", FP8Weight, _check_fp8_weight, _check_act, "moe_up_fp8", "moe_down_fp8",
                         inter_multiple=8)  # h is stored by TMA: 16-byte rows


def moe_up_fp8(
    perm: MoEPermutation,
    x8: torch.Tensor,
    x_scale: torch.Tensor,
    w1: FP8Weight,
    w3: FP8Weight,
    swiglu_limit: float | None = 10.0,
    *,
    out: Any = None,
    quantize: bool = False,
) -> Any:
    """Grouped FP8 up-projection with the SwiGLU fused (the FP8 form of :func:`tilev4.kernels.moe.moe_up`).

    Args:
        perm: the permutation (:func:`tilev4.kernels.moe.moe_permute`); N = its sorted rows.
        x8, x_scale: the sorted rows quantised 1×128, [N, dim] float8_e4m3fn and [N, dim/128] fp32:
            ``fp8_quantize(perm.x_sorted)``, or for a permutation of FP8 rows (``moe_permute(payload=x8_tokens)``)
            ``perm.x_sorted`` and the token scales gathered by ``perm.sorted_tokens``.
        w1, w3: :class:`FP8Weight` of [E, inter, dim]; dim a multiple of 128.
        swiglu_limit: the routed-expert clamp, or None.
        out: optional preallocated [N, inter] bf16 (with ``quantize``: an ``(h8, hs)`` pair as returned).
        quantize: quantise h in the epilogue, exactly as ``fp8_quantize(h)`` would (inter a multiple of 128):
            returns ``(h8, hs)``, [N, inter] float8_e4m3fn and [N, inter/128] fp32, the operands of
            :func:`moe_down_fp8`; saves writing h in bf16 and the quantisation launch.

    Returns:
        h [N, inter] bf16, or ``(h8, hs)`` with ``quantize``.
    """
    return grouped_up(FP8_FORMAT, perm, x8, x_scale, w1, w3, swiglu_limit, out, quantize)


def moe_down_fp8(
    perm: MoEPermutation,
    h8: torch.Tensor,
    h_scale: torch.Tensor,
    w2: FP8Weight,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped FP8 down-projection ``y = h W2ᵀ`` per expert (the FP8 form of ``moe_down``).

    Args:
        perm: the permutation; N = its sorted rows.
        h8, h_scale: ``fp8_quantize(h)``: [N, inter] float8_e4m3fn and [N, inter/128] fp32.
        w2: :class:`FP8Weight` of [E, dim, inter]; inter a multiple of 128.
        out: optional preallocated [N, dim] bf16.
    """
    return grouped_down(FP8_FORMAT, perm, h8, h_scale, w2, out)
