"""Warp-specialised bf16 expert GEMMs: a TMA producer warpgroup feeding two (or three) wgmma consumer warpgroups.

The ``ws`` schedule of :func:`tilev4.kernels.moe.build_moe_up` / :func:`~tilev4.kernels.moe.build_moe_down`
(the default). Same arguments, tile → expert map, launch order and results as the ``pipelined`` schedule
(cp.async, every thread loading and computing): the per-element reduction is the same sequence of
m64nNk16 wgmma steps over K in ascending order, so both schedules give bitwise the same output.

One CTA computes one ``128 × block_n`` output tile (grid: one CTA per tile, CTAs past the real tiles exit):

* **producer** (warpgroup 2, 40 registers): for each K step waits until both consumers released the
  stage, then issues TMA loads into it — the A rows in two 64-row halves (the second only when the tile
  has more than 64 valid rows) and the weight tile(s) — and arrives on the stage's ``full`` barrier,
  whose transaction count completes when the bytes land. Rows past the tensor read as zero (TMA bounds).
  In grouped mode a partly filled slab (an expert's last, 1-63 valid rows) is loaded as 8-row boxes up to its
  valid rows; its consumer zeroes the rest of the slab in every stage once, before its K loop
  (:func:`zero_padding`). Those rows' products are never stored, but zeros there instead of the next expert's rows
  draw less power, and these GEMMs run at the H200's power cap: 1.3-1.8 % off the routed path (up + down) on the
  benchmark's random gate, where 252 of 256 experts end in a partial slab, and the same bits
  (``benchmarks/logs/h200-2026-12-02-session42.md``).
* **consumers** (warpgroups 0 and 1, 232 registers): warpgroup ``w`` owns rows ``64·w .. 64·w + 63``
  of the tile. Per K step it waits for the stage, issues its wgmma (skipped when it has no valid row:
  the tile's last 64 rows of an expert segment are often empty), keeps one step in flight and releases
  the previous step's stage. Then the epilogue: fp32 → bf16 (the up-projection's SwiGLU with clamp and
  routing weight first) into a shared staging tile, stored by TMA when all 64 rows are valid and otherwise with
  row-masked 16-byte stores (:func:`masked_rows`; rows past the segment belong to the next expert).

Shared memory (bf16, ``S`` stages, ``BK = 64``): ``S · (128 + NB·block_n) · BK · 2`` for the stages
(``NB`` = 2 weight tiles for the up-projection, 1 for the down-projection) plus the staging tiles
``2 · 64 · store_n · 2`` — 224 KiB for the up-projection at ``block_n = 128``, 4 stages.

**192-row tiles** (``block_m = 192``; the bf16 routed expert GEMMs' own tile table, ``perm.up_tiles``): three
consumer warpgroups (160 registers; the producer, warpgroup 3, 24), for an expert of 129-192 rows, which 128-row tiles
would serve with two CTAs each streaming the whole weight tile. The table gives such an expert one tile and every
other expert 128-row tiles, except that a last tile of 1-64 rows joins the one before it (:func:`tiles_of`). There
is no room for staging tiles beside 4 stages of three A slabs and
two weight tiles (224 KiB), so each consumer stages its output in its own A-slab buffers, 64 columns a slot: they
are free once its K loop is done (one tile a CTA; only this warpgroup reads them). Same wgmma sequence per row, so the
same bits as 128-row tiles. H200 (``benchmarks/logs/h200-2026-11-30-session27.md``): 0.81-0.83 of the 128-row time
with 160 or 192 rows an expert, but 0.97-1.12 on the benchmark's random-gate routing (experts of 4 to ~1000 rows; two
runs), so ``moe_permute`` takes it by default only where a balanced routing gives an expert 129-192 rows on average
(:func:`tilev4.kernels.moe.choose_up_block_m`). The down-projection runs the same table, each 256-column tile as two
128-column weight tiles (three consumers hold 64 × 256 accumulators as two halves): 0.86 of the 128-row time at 144
or 192 rows an expert and 0.97 on the random gate at 8192 tokens (``benchmarks/logs/h200-2026-12-01-session38.md``;
where the rule takes 128: 0.97-1.00 on the random gate, 1.00-1.02 balanced). Served with 192-row tiles throughout
(``⌈count / 192⌉``) it was no faster than this table (down 0.97-0.98, up 0.97-0.99 of the 128-row time). Session 27
had measured its own 192-row down-projection (a branch since removed) 1.08-1.28× slower on the random gate; today's
program does not repeat that.

Measured alternatives (H200, V4-Flash prefill, 8192 tokens; ``benchmarks/logs/h200-2026-11-29-session6.md``):

* a persistent grid (132 CTAs looping over the tiles) was ~10 % slower: the CTAs drift apart, so the two
  M tiles of one expert no longer read a weight tile at the same time and ncu counted ~1.8× the weight
  bytes from HBM. One CTA per tile keeps the launch order, which the block scheduler follows.
* 2-CTA clusters multicasting the weight tile to two M tiles (or the A rows to two N tiles) were 1.3-2×
  slower: the pair moves in lockstep and the second M tile of an expert is usually half empty.
* a 256-row tile (four m64 slabs, half the N width) read each weight tile once but was ~10 % slower.

Later (``benchmarks/logs/h200-2026-11-30-session22.md``; code on the ``wip/moe-*`` branches, all bit-identical):

* with the warp-specialised kernels, weight multicast in 2-CTA clusters was still 5-16 % slower;
* with exactly R rows an expert, a tile costs about the time to stream its weight tile whatever its rows
  (R = 128: W1 + W3 at 0.88 of the copy bandwidth; a 64-row tile 0.91 of a full one);
* 192-row tiles (three consumer warpgroups, 3 stages, 160 registers) were 11-15 % faster where every expert
  fits one tile but slower per tile otherwise, and slower on the benchmark's routing (~half its experts have
  more than 192 rows);
* an L2 read-ahead of the weights by the producer was slower: 25-50 % by rows (``cp.async.bulk.prefetch.L2``),
  3-22 % a whole tile at a time through its tensor map, 2 to 12 K steps ahead.

And (``benchmarks/logs/h200-2026-11-30-session27.md``): multicasting the A rows instead, to a cluster of two N tiles
of the same M tile (equal partners, so no lockstep between a full and a half-empty tile), was still up to 3 % slower
on the up-projection and 5-15 % on the down-projection. The stage count explains much of the 192-row result above:
the tuner measures 3 stages 7-10 % slower than 4 on the 128-row tiles (V4-Flash routing), and a 192-row tile with
staging tiles leaves shared memory for 3 — hence the staging in the A slabs above.
"""

from typing import Any

import tilelang.language as T
from tilelang import tvm
from tilelang.layout import make_swizzled_layout
from tvm.script.ir_builder import IRBuilder

from tilev4._fastmath import FAST_SOURCE, LOG2E, ex2, rcp

__all__ = ["build_ws_gemm", "cap_keep_nan", "check_ws_schedule", "clamp_keep_nan", "load_route_weights",
           "masked_rows", "produce", "silu", "store_part", "store_width", "ws_buffer_bytes"]

HALF_M = 64  # rows of one consumer warpgroup (one m64 wgmma slab)
BLOCK_M = 2 * HALF_M
WS_BLOCK_MS = (BLOCK_M, 3 * HALF_M)  # M tiles of the ws schedule: two or three consumer warpgroups
PRODUCER_REGS, CONSUMER_REGS = 40, 232  # setmaxnreg: 40 + 2 x 232 = 504 = 3 x 168, the launch allocation
# three consumers: 24 + 3 x 160 = 504 = 4 x 126, rounded to the multiples of 8 setmaxnreg takes (the launch has 128)
REGS_BY_SLABS = {2: (PRODUCER_REGS, CONSUMER_REGS), 3: (24, 160)}
STORE_N = 128  # columns of one staged TMA store in the epilogue
PART_ROWS = 8  # the TMA box of a partly filled slab's rows (a multiple of the 128-byte swizzle's 8-row period)


def silu(g):
    """``g · sigmoid(g)`` as every expert kernel's SwiGLU epilogue computes it: ``g · rcp(1 + 2^(-g·log2 e))`` on
    the special-function unit (:mod:`tilev4._fastmath`; the program imports ``FAST_SOURCE``), a few ulp of fp32 from
    the exact value and far below the bf16 (or FP8) rounding of h that follows. The IEEE ``expf`` and division it
    replaces took ~30 instructions an element, with a slow-path branch each, and made the epilogue ~1/3 of a
    consumer warp's time in the FP8 up-projection. Large negative ``g`` gives ``2^(+big) = inf``, ``rcp(inf) = 0``:
    ``-0``, as the exact form; NaN propagates. A plain function: the expression is substituted where it is used."""
    return g * rcp(1.0 + ex2(g * -LOG2E))


def cap_keep_nan(x, limit):
    """``min(x, limit)`` that keeps NaN as ``torch.clamp(max=limit)`` does (``fminf`` would drop it): one select. The
    SwiGLU's gate cap."""
    return T.if_then_else(x > limit, limit, x)


def clamp_keep_nan(x, limit):
    """``clamp(x, -limit, limit)`` that keeps NaN as ``torch.clamp`` does (``fminf`` / ``fmaxf`` alone would drop it):
    two min/max and one select, where nested selects compiled to a branch an element."""
    return T.if_then_else(T.isnan(x), x, T.max(T.min(x, limit), -limit))


def ws_buffer_bytes(weight_tiles: int, weighted: bool, block_n: int, block_k: int, num_stages: int,
                    block_m: int = BLOCK_M) -> list[int]:
    """Bytes of each shared buffer of a ``ws`` CTA with 2-byte operands (the A slabs, the weight tiles, the
    staging tiles, the routing weights), without the barriers: for the tuner's static pruning. Three consumers
    (192-row tiles) stage their output in their A slabs: no staging tiles."""
    slabs = block_m // HALF_M
    halves = [num_stages * HALF_M * block_k * 2] * slabs
    weights = [num_stages * block_n * block_k * 2] * weight_tiles
    staging = [HALF_M * store_width(block_n) * 2] * slabs if slabs == 2 else []
    return halves + weights + staging + ([HALF_M * 4] * slabs if weighted else [])


def store_barrier(w: int) -> int:
    """Named barrier of consumer ``w``'s epilogue: 1 and 2 for the first two. TileLang numbers the barriers it adds
    itself (a consumer's shared routing weights) from 3 up, one a consumer, so a third consumer takes 8."""
    return 1 + w if w < 2 else 8


def store_width(block_n: int) -> int:
    """Columns a consumer stages and stores at a time."""
    return min(block_n, STORE_N)


def tiles_of(count, block_m: int):
    """M tiles of an expert with ``count`` rows in the tile table built for ``block_m``: ``⌈count / block_m⌉`` up
    to 128; for 192 (the three-consumer ``ws`` tiles) one tile of up to 192 rows, or past that 128-row tiles whose
    last one takes the remainder too when it is at most 64 rows: ``⌈(count − 64) / 128⌉`` tiles (300 rows:
    128 + 172; a 193-row expert is better served by 128 + 65 rows than by 192 + 1: each tile reads the whole
    weight tile).
    A TileLang expression for the scan kernel, or an int for the host."""
    if isinstance(count, int):
        if block_m <= BLOCK_M:
            return -(-count // block_m)
        return min(count, 1) if count <= block_m else -(-(count - HALF_M) // BLOCK_M)
    if block_m <= BLOCK_M:
        return T.ceildiv(count, block_m)
    return T.if_then_else(count <= block_m, T.min(count, 1), T.ceildiv(count - HALF_M, BLOCK_M))


def shared_buffers(name: str, count: int, shape: tuple, dtype: Any) -> list:
    """``count`` shared buffers named ``{name}0``, ``{name}1``, … (in a kernel body, where a list of them is wanted).

    Buffers allocated in a comprehension would all get the same name, and TileLang 0.1.15 keys the shared-memory
    alignment that an op's lowering records (a TMA load's, for instance) by buffer name: that record then stands for
    every buffer of the name, also for a wgmma operand that needs 1024 bytes (128-byte swizzle), and the merged
    allocation may place that operand off a 1024-byte boundary. The result is not an error but wrong data (the FP4
    swap programs once their tile resolution changed, session 39; ``tests/test_kernels_compile.py`` checks every
    wgmma operand's offset)."""
    return [IRBuilder.name(f"{name}{i}", T.alloc_shared(shape, dtype)) for i in range(count)]


def _staged(slot, i, j):
    """Index of element (i, j) of a consumer's staged output: its own tile, or slot ``slot`` of its A slabs."""
    return (i, j) if slot is None else (slot, i, j)


@T.macro
def _grouped_record(b, num_n_tiles, tile_info, e: T.Ref, row0: T.Ref, rows: T.Ref, n0: T.Ref, live: T.Ref, BN,
                    BM=BLOCK_M):
    """Expert, first row, valid rows and first column of tile ``b`` (the tiles of one expert are consecutive,
    M fastest, so the CTAs that read one weight tile run together), and ``live``: false past the real tiles. From
    the record of one of the expert's M tiles (``moe_scan``'s ``tile_info``: expert, its first M tile, its first
    row, its rows; zeros past the last tile): one load, where the expert, then its tile offsets and row offsets were
    three dependent ones (H200, session 38: 0.98-0.99 of the time of every bf16 ws GEMM). The ``ws`` programs of
    every weight format (bf16 here, FP8 and FP4) and the FP4 ``swap`` programs resolve their tiles with it.

    The arithmetic of ``tilev4.kernels.moe._grouped_tile``, kept apart on purpose: the cp.async kernels hold
    the expert's first tile and tile count in variables (they are out-parameters there), this one in let
    bindings, and merging the two changes the generated code of one side."""
    e = tile_info[b // num_n_tiles, 0]  # noqa: F841 (T.Ref)
    a0 = tile_info[b // num_n_tiles, 1]
    first = tile_info[b // num_n_tiles, 2]
    count = tile_info[b // num_n_tiles, 3]
    live = count > 0  # noqa: F841 (T.Ref)
    c = T.max(tiles_of(count, BM), 1)
    n0 = ((b - a0 * num_n_tiles) // c) * BN  # noqa: F841 (T.Ref: stores into the caller's variable)
    if BM == BLOCK_M:
        row0 = first + ((b - a0 * num_n_tiles) % c) * BM
        rows = T.min(BM, first + count - row0)
    else:  # see tiles_of: 128-row tiles, the last one of up to BM rows
        row0 = first + ((b - a0 * num_n_tiles) % c) * BLOCK_M
        last = (b - a0 * num_n_tiles) % c == c - 1
        rows = T.min(T.if_then_else(last, BM, BLOCK_M), first + count - row0)  # noqa: F841


@T.macro
def _dense_unit(b, num_n_tiles, num_rows, group_m, row0: T.Ref, rows: T.Ref, n0: T.Ref, BN, BM=BLOCK_M):
    """First row, valid rows and first column of tile ``b`` in dense mode (groups of ``group_m`` M tiles)."""
    a0 = (b // (group_m * num_n_tiles)) * group_m
    c = T.min(group_m, T.ceildiv(num_rows, BM) - a0)
    n0 = ((b - a0 * num_n_tiles) // c) * BN  # noqa: F841
    row0 = (a0 + (b - a0 * num_n_tiles) % c) * BM
    rows = T.min(BM, num_rows - row0)  # noqa: F841


def check_ws_schedule(schedule: str, block_m: int, schedules: tuple[str, ...],
                      block_ms: tuple[int, ...] = (BLOCK_M,)) -> None:
    """``schedule`` is one of ``schedules``; the ``ws`` one runs tiles of ``block_ms`` rows (64-row consumers)."""
    if schedule not in schedules:
        raise ValueError(f"schedule must be one of {schedules}, got {schedule!r}")
    if schedule == "ws" and block_m not in block_ms:
        raise ValueError(f"block_m must be one of {block_ms} for the 'ws' schedule (64-row consumer warpgroups), "
                         f"got {block_m}")


def partial_rows(rw):
    """Rows of a partly filled slab (``0 < rw < 64`` valid rows) that its producer loads: the valid ones rounded up
    to whole :data:`PART_ROWS`-row boxes. The rest hold zeros (:func:`zero_padding`)."""
    return T.ceildiv(rw, PART_ROWS) * PART_ROWS


@T.macro
def load_slab(a, buf, slot, full, r0, rw, k0, BK):
    """TMA-load slab rows ``r0 ..`` of K columns ``k0 .. k0 + BK`` into ``buf[slot]``: the whole 64-row slab (always
    with ``rw = HALF_M``, a Python int), or with ``rw < 64`` valid rows only their :func:`partial_rows`, as
    ``PART_ROWS``-row boxes (each lands at a multiple of 1 KiB in the slab, the 128-byte swizzle's period, so the
    swizzle is the slab's)."""
    if rw >= HALF_M:
        T.tma_copy(a[r0:r0 + HALF_M, k0:k0 + BK], buf[slot, :, :], barrier=full[slot])
    else:
        for pb in T.serial(T.ceildiv(rw, PART_ROWS)):
            T.tma_copy(a[r0 + pb * PART_ROWS:r0 + pb * PART_ROWS + PART_ROWS, k0:k0 + BK],
                       buf[slot, pb * PART_ROWS:pb * PART_ROWS + PART_ROWS, :], barrier=full[slot])


@T.macro
def zero_padding(a_s, rw, S, tx, barrier_id):
    """A consumer with a partly filled slab (``0 < rw < 64`` valid rows) zeroes the rows its producer never loads
    (past :func:`partial_rows`) in every stage, once before its K loop: the wgmma then multiply zeros there instead of
    stale shared memory or the next expert's rows. The products of those rows are never stored either way; zeros
    draw less power, and these GEMMs run at the H200's power cap. 16 bytes a store, whole rows (a row keeps its
    bytes under the swizzle)."""
    VEC = 128 // tvm.DataType(a_s.dtype).bits  # elements in 16 bytes
    CH = a_s.shape[2] // VEC  # 16-byte chunks a row
    if rw > 0:
        if rw < HALF_M:
            for c in T.serial(S * HALF_M * CH // 128):
                q = c * 128 + tx % 128
                if (q // CH) % HALF_M >= partial_rows(rw):
                    for v in T.vectorized(VEC):
                        a_s[q // (HALF_M * CH), (q // CH) % HALF_M, (q % CH) * VEC + v] = T.cast(0, a_s.dtype)
            T.fence_proxy_async()  # generic-proxy zeros before the wgmma (async proxy) read them
            T.sync_threads(barrier_id=barrier_id, arrive_count=128)


@T.macro
def produce(a, ws, a_bufs, bs, full, empty, e, row0, rows, n0, KT, BK, BN, S, second_n=0, regs=PRODUCER_REGS,
            part=False):
    """The producer warpgroup: per K step, wait until the consumers released the stage, then TMA-load the A
    slabs ``a_bufs`` (64 rows each; a later one only when the tile has rows in it) and the weight tile(s) ``ws``;
    the second weight tile starts ``second_n`` rows after the first (a Python int: 0 for W1 / W3, ``BN`` for the
    two halves of one weight's wider tile). ``part``: a partly filled slab loads only its :func:`partial_rows`
    (its consumer zeroes the others once: :func:`zero_padding`)."""
    T.set_max_nreg(regs, 0)
    for ki in T.serial(KT):
        slot = ki % S
        T.barrier_wait(empty[slot], ((ki // S) & 1) ^ 1)  # the consumers are done with the stage
        # a slab's valid rows, or (without part) HALF_M: the whole slab
        load_slab(a, a_bufs[0], slot, full, row0, rows if part else HALF_M, ki * BK, BK)
        if rows > HALF_M:
            load_slab(a, a_bufs[1], slot, full, row0 + HALF_M, rows - HALF_M if part else HALF_M, ki * BK, BK)
        if len(a_bufs) == 3:
            if rows > BLOCK_M:
                load_slab(a, a_bufs[2], slot, full, row0 + BLOCK_M, rows - BLOCK_M if part else HALF_M, ki * BK, BK)
        T.tma_copy(ws[0][e, n0:n0 + BN, ki * BK:(ki + 1) * BK], bs[0][slot, :, :], barrier=full[slot])
        if len(ws) == 2:
            T.tma_copy(ws[1][e, n0 + second_n:n0 + second_n + BN, ki * BK:(ki + 1) * BK], bs[1][slot, :, :],
                       barrier=full[slot])
        T.barrier_arrive(full[slot])


@T.macro
def load_route_weights(rw, r0, wts, w_s):
    """This warpgroup's routing weights (0 past its valid rows), for the up-projection epilogue."""
    for i in T.Parallel(HALF_M):
        w_s[i] = T.if_then_else(i < rw, wts[r0 + i], 0.0)


@T.macro
def store_part(p, w, rw, r0, n0, out, limit, o_s, w_s, accs, N, SN, weighted, slot=None):
    """Columns ``p·SN .. (p+1)·SN`` of consumer ``w``'s 64 rows: fp32 → bf16 in ``o_s`` (the up-projection's
    SwiGLU first when ``accs`` is (gate, up)), then stored: by TMA when all 64 rows are valid, with row-masked
    stores otherwise (:func:`masked_rows`)."""
    T.sync_threads(barrier_id=store_barrier(w), arrive_count=128)  # the previous store has read o_s
    if len(accs) == 2:
        gate, up = accs
        for i, j in T.Parallel(HALF_M, SN):
            g = cap_keep_nan(gate[i, p * SN + j], limit)
            u = clamp_keep_nan(up[i, p * SN + j], limit)
            if weighted:
                o_s[_staged(slot, i, j)] = T.cast(silu(g) * u * w_s[i], T.bfloat16)
            else:
                o_s[_staged(slot, i, j)] = T.cast(silu(g) * u, T.bfloat16)
    else:
        for i, j in T.Parallel(HALF_M, SN):
            o_s[_staged(slot, i, j)] = T.cast(accs[0][i, p * SN + j], T.bfloat16)
    if rw >= HALF_M:
        T.fence_proxy_async()  # generic-proxy writes of o_s before the TMA (async proxy) reads it
        T.sync_threads(barrier_id=store_barrier(w), arrive_count=128)
        if slot is None:
            T.copy(o_s, out[r0, n0 + p * SN])  # TMA store; columns past N are clipped
        else:
            T.copy(o_s[slot, :, :], out[r0:r0 + HALF_M, n0 + p * SN:n0 + p * SN + SN])
    else:
        T.sync_threads(barrier_id=store_barrier(w), arrive_count=128)
        masked_rows(rw, r0, n0 + p * SN, out, o_s, N, SN, slot)


@T.macro
def masked_rows(rw, r0, c0, out, o_s, N, SN, slot=None):
    """The first ``rw`` of a consumer's 64 staged rows (``SN`` columns from column ``c0``) stored 16 bytes a thread
    (8 bf16 or 16 FP8 values), columns up to ``N``: the tile's rows past ``rw`` belong to the next expert, so the
    whole-slab TMA store cannot be used. ``N`` and ``c0`` are multiples of a vector (the ops check ``N``), which the
    assumptions tell the vectoriser; element by element, these stores took ~5 % of the down-projection's time on a
    skewed routing (H200, session 37)."""
    VEC = 128 // tvm.DataType(o_s.dtype).bits  # elements in 16 bytes
    T.assume(N % VEC == 0)
    T.assume(c0 % VEC == 0)
    for i, jv in T.Parallel(HALF_M, SN // VEC):
        if i < rw and c0 + jv * VEC < N:
            for v in T.vectorized(VEC):
                out[r0 + i, c0 + jv * VEC + v] = o_s[_staged(slot, i, jv * VEC + v)]


def build_ws_gemm(kind: str, K: int, dense: bool, block_n: int, block_k: int, num_stages: int, group_m: int,
                  block_m: int = BLOCK_M) -> Any:
    """The ``ws`` program of ``moe_up`` (``kind="up"``) or ``moe_down`` (``kind="down"``); see the module.
    ``block_m // 64`` consumer warpgroups (two or three) share each stage."""
    BM, SLABS = block_m, block_m // HALF_M
    P_REGS, C_REGS = REGS_BY_SLABS[SLABS]
    # three consumers have 128 registers at launch, below what one m64n256 wgmma (128 accumulators) needs:
    # a wider down-projection tile is two weight tiles of half the width (W2 rows n0.. and n0 + block_n / 2..)
    halves = kind == "down" and SLABS == 3 and block_n > STORE_N
    TN = block_n  # columns of a CTA
    BN, BK, S = (block_n // 2 if halves else block_n), block_k, num_stages  # BN: columns of one weight tile
    # three consumers: each stages its output in its own A slab buffers, free once its K loop is done, BK columns a
    # slot (no separate staging tiles: that leaves shared memory for 4 stages)
    in_a = SLABS == 3
    SN = BK if in_a else store_width(BN)
    NB = 2 if kind == "up" or halves else 1
    if in_a and not (BN == 2 * BK and (2 if halves else 1) * 2 <= num_stages):
        raise ValueError(f"192-row ws tiles stage their output in the A slabs, two {BK}-column chunks a weight tile: "
                         f"they need block_n = {2 * BK if kind == 'up' else 4 * BK} and num_stages >= "
                         f"{4 if halves else 2}, got block_n={block_n}, num_stages={num_stages}")
    NR, N, E, MT = (T.dynamic(n) for n in ("NR", "N", "E", "MT"))
    KT = (K + BK - 1) // BK
    weighted = kind == "up" and not dense
    part = not dense  # a grouped tile's last slab is often partly filled: zeros past its rows (zero_padding)

    @T.macro
    def resolve(b, NNT, tile_info, e: T.Ref, row0: T.Ref, rows: T.Ref, n0: T.Ref, live: T.Ref):
        """Tile ``b``: expert, first row, valid rows, first column; ``live`` is false past the real tiles."""
        if dense:
            live = True
            _dense_unit(b, NNT, NR, group_m, row0, rows, n0, TN, BM)
        else:
            _grouped_record(b, NNT, tile_info, e, row0, rows, n0, live, TN, BM)

    @T.macro
    def consumer(w, wts, out, limit, a_s, bs, o_s, w_s, accs, full, empty, tx, row0, rows, n0):
        T.set_max_nreg(C_REGS, 1)
        lane = tx % 32
        prev = T.alloc_var(T.int32, init=0)
        rw = rows - w * HALF_M  # this warpgroup's valid rows (<= 0: none)
        if part:
            zero_padding(a_s, rw, S, tx, store_barrier(w))
        for ki in T.serial(KT):
            slot = ki % S
            T.barrier_wait(full[slot], (ki // S) & 1)
            if rw > 0:
                T.wgmma_gemm(a_s[slot, :, :], bs[0][slot, :, :], accs[0], transpose_B=True, clear_accum=ki == 0)
                if NB == 2:
                    T.wgmma_gemm(a_s[slot, :, :], bs[1][slot, :, :], accs[1], transpose_B=True,
                                 clear_accum=ki == 0)
            if ki > 0:
                T.wait_wgmma(NB)  # the previous step's wgmma are done: release its stage
                if lane == 0:
                    T.barrier_arrive(empty[prev])
            prev = slot
        T.wait_wgmma(0)
        if rw > 0:
            r0 = row0 + w * HALF_M
            if weighted:
                load_route_weights(rw, r0, wts, w_s)
            if in_a and halves:  # (asserted) BN = 2 * SN: four chunks, one a slot
                store_part(0, w, rw, r0, n0, out, limit, a_s, w_s, accs[0:1], N, SN, weighted, 0)
                store_part(1, w, rw, r0, n0, out, limit, a_s, w_s, accs[0:1], N, SN, weighted, 1)
                store_part(0, w, rw, r0, n0 + BN, out, limit, a_s, w_s, accs[1:2], N, SN, weighted, 2)
                store_part(1, w, rw, r0, n0 + BN, out, limit, a_s, w_s, accs[1:2], N, SN, weighted, 3)
            elif in_a:
                store_part(0, w, rw, r0, n0, out, limit, a_s, w_s, accs, N, SN, weighted, 0)
                store_part(1, w, rw, r0, n0, out, limit, a_s, w_s, accs, N, SN, weighted, 1)
            elif halves:  # two weight tiles side by side: columns n0.. and n0 + BN..
                store_part(0, w, rw, r0, n0, out, limit, o_s, w_s, accs[0:1], N, SN, weighted)
                store_part(0, w, rw, r0, n0 + BN, out, limit, o_s, w_s, accs[1:2], N, SN, weighted)
            else:
                store_part(0, w, rw, r0, n0, out, limit, o_s, w_s, accs, N, SN, weighted)
                if BN // SN > 1:
                    store_part(1, w, rw, r0, n0, out, limit, o_s, w_s, accs, N, SN, weighted)

    @T.macro
    def body(a, wts, ws, out, limit, offsets, tile_offsets, tile_info):
        num_m = T.ceildiv(NR, BM) if dense else MT
        with T.Kernel(num_m * T.ceildiv(N, TN), threads=128 * (SLABS + 1)) as bx:
            if kind == "up":
                T.import_source(FAST_SOURCE)  # silu's ex2 / rcp
            third = SLABS == 3
            a0_s = T.alloc_shared((S, HALF_M, BK), T.bfloat16)
            a1_s = T.alloc_shared((S, HALF_M, BK), T.bfloat16)
            a2_s = T.alloc_shared((S, HALF_M, BK), T.bfloat16) if third else None
            bs = shared_buffers("b_s", NB, (S, BN, BK), T.bfloat16)
            o0_s = None if in_a else T.alloc_shared((HALF_M, SN), T.bfloat16)
            o1_s = None if in_a else T.alloc_shared((HALF_M, SN), T.bfloat16)
            o2_s = None
            w0_s = T.alloc_shared((HALF_M,), T.float32) if weighted else None
            w1_s = T.alloc_shared((HALF_M,), T.float32) if weighted else None
            w2_s = T.alloc_shared((HALF_M,), T.float32) if weighted and third else None
            acc0 = [T.alloc_fragment((HALF_M, BN), T.float32) for _ in range(NB)]
            acc1 = [T.alloc_fragment((HALF_M, BN), T.float32) for _ in range(NB)]
            acc2 = [T.alloc_fragment((HALF_M, BN), T.float32) for _ in range(NB)] if third else None
            full = T.alloc_barrier([128] * S)  # the producer's 128 threads (+ the TMA bytes)
            empty = T.alloc_barrier([4 * SLABS] * S)  # lane 0 of each consumer warp
            a_s, o_s = [a0_s, a1_s, a2_s][:SLABS], [o0_s, o1_s, o2_s][:SLABS]
            w_s, acc = [w0_s, w1_s, w2_s], [acc0, acc1, acc2]
            T.annotate_layout({buf: make_swizzled_layout(buf) for buf in [*a_s, *bs, *([] if in_a else o_s)]})
            NNT = T.ceildiv(N, TN)
            tx = T.get_thread_binding()
            e = T.alloc_var(T.int32, init=0)
            row0 = T.alloc_var(T.int32, init=0)
            rows = T.alloc_var(T.int32, init=0)
            n0 = T.alloc_var(T.int32, init=0)
            live = T.alloc_var(T.bool)
            resolve(bx, NNT, tile_info, e, row0, rows, n0, live)
            if live:  # CTAs past the real tiles exit
                if tx >= 128 * SLABS:
                    produce(a, ws, a_s, bs, full, empty, e, row0, rows, n0, KT, BK, BN, S, BN if halves else 0,
                            P_REGS, part)
                elif tx < 128:
                    consumer(0, wts, out, limit, a_s[0], bs, o_s[0], w_s[0], acc[0], full, empty, tx, row0, rows, n0)
                else:
                    if SLABS == 3:
                        if tx < 256:
                            consumer(1, wts, out, limit, a_s[1], bs, o_s[1], w_s[1], acc[1], full, empty, tx, row0,
                                     rows, n0)
                        else:
                            consumer(2, wts, out, limit, a_s[2], bs, o_s[2], w_s[2], acc[2], full, empty, tx, row0,
                                     rows, n0)
                    else:
                        consumer(1, wts, out, limit, a_s[1], bs, o_s[1], w_s[1], acc[1], full, empty, tx, row0, rows,
                                 n0)

    if kind == "up" and dense:

        @T.prim_func
        def moe_up_dense_ws(
            x: T.Tensor[(NR, K), T.bfloat16],
            w1: T.Tensor[(1, N, K), T.bfloat16],
            w3: T.Tensor[(1, N, K), T.bfloat16],
            h: T.Tensor[(NR, N), T.bfloat16],
            limit: T.float32,
        ):
            body(x, None, [w1, w3], h, limit, None, None, None)

        return moe_up_dense_ws

    if kind == "up":

        @T.prim_func
        def moe_up_ws(
            x_sorted: T.Tensor[(NR, K), T.bfloat16],
            w_sorted: T.Tensor[(NR,), T.float32],
            w1: T.Tensor[(E, N, K), T.bfloat16],
            w3: T.Tensor[(E, N, K), T.bfloat16],
            offsets: T.Tensor[(E + 1,), T.int32],
            tile_offsets: T.Tensor[(E + 1,), T.int32],
            tile_info: T.Tensor[(MT, 4), T.int32],
            h: T.Tensor[(NR, N), T.bfloat16],
            limit: T.float32,
        ):
            body(x_sorted, w_sorted, [w1, w3], h, limit, offsets, tile_offsets, tile_info)

        return moe_up_ws

    if dense:

        @T.prim_func
        def moe_down_dense_ws(
            h: T.Tensor[(NR, K), T.bfloat16],
            w2: T.Tensor[(1, N, K), T.bfloat16],
            y: T.Tensor[(NR, N), T.bfloat16],
        ):
            body(h, None, [w2, w2] if halves else [w2], y, None, None, None, None)

        return moe_down_dense_ws

    @T.prim_func
    def moe_down_ws(
        h: T.Tensor[(NR, K), T.bfloat16],
        w2: T.Tensor[(E, N, K), T.bfloat16],
        offsets: T.Tensor[(E + 1,), T.int32],
        tile_offsets: T.Tensor[(E + 1,), T.int32],
        tile_info: T.Tensor[(MT, 4), T.int32],
        y: T.Tensor[(NR, N), T.bfloat16],
    ):
        body(h, None, [w2, w2] if halves else [w2], y, None, offsets, tile_offsets, tile_info)

    return moe_down_ws
