"""TileLang programs from an :class:`~tilev4.dsl.spec.AttentionSpec`.

Two programs per spec:

* the **main** program — grid ``(S, head_blocks · splits, B)`` (tokens on x: no 65535 limit);
  a CTA owns one query token and ``block_heads`` heads, loads Q once, then walks the key blocks of every source in order
  (``BI`` keys per block), gathering K=V rows into shared memory (invalid keys read as zero rows
  so garbage never reaches the PV product), and runs one online softmax over all of them:

      acc_s = Q @ KVᵀ                       # [HB, D] @ [D, BI] -> [HB, BI]
      acc_s = mods(acc_s · scale) · log2(e)  # score_mod, mask_mod, invalid -> -inf
      m' = max(m, rowmax(acc_s)); p = 2^(acc_s - m'); l = l·2^(m-m') + rowsum(p)
      acc_o = acc_o·2^(m-m') + P @ KV        # [HB, BI] @ [BI, D] -> [HB, D]

  With ``split=True`` the global sequence of key blocks is cut into splits of ``split_keys`` keys
  (``split_keys / BI`` blocks; a compile-time constant, so that a row's split boundaries never
  depend on the batch), and each CTA writes its normalised partial output and base-2 log-sum-exp.
* the **combine** program — merges the partials of each (token, head) in split order, adds
  the sink, and writes the bf16 output (and the natural-log LSE).

Epilogue arithmetic is shared: the unsplit epilogue computes exactly what the combine computes
for a single non-empty split, ``(acc · 1/l) · (w · 1/(w + sink))`` with the per-row weight formed first, so a
row that fits in one split gets the same bits either way —
provided the main and the split program are built from the same config (block size, threads).

Schedules of the main program (``AttentionConfig.schedule``). With 64 heads a CTA and D = 512 (the V4
kernels) it is warp-specialised: a producer warpgroup fills a two-stage buffer with the key rows of each block
pair — by TMA where a block is consecutive rows (a stream window, a fully visible block of a compressed stream),
else gathered with cp.async (the index-list entries of the next pair already in registers) — and two consumer
warpgroups run the tensor-core work — ``seesaw`` (default: each consumer takes one block of a pair and one
half of D of the output, the running max goes from one to the other and moves only when new scores pass it
by more than :data:`RESCALE_SLACK`, so that most pairs skip the accumulator's rescale, a block whose keys the
producer's warps all voted valid skips its mask outside decode's window ring (:func:`mask_votes`), a free/ready
barrier per half of D lets the producer refill a half as soon as its last reader is done) or ``ws`` (consumer 0 runs
QKᵀ and the softmax, both run P·V on their half of D). Other specs run the ``simple`` schedule (all warps gather,
then compute). All of them are the same online softmax; their outputs agree to the bf16 rounding of P. A seesaw main
program may walk ``AttentionConfig.query_tiles`` consecutive queries a CTA: the next query's Q and first key blocks
load while the consumers finish the previous one (same bits as one query a CTA; the output then leaves through two
8 KB staging slots a consumer, one chunk's store reading shared memory while the next is staged; with
``AttentionConfig.overlap_epilogue`` a query's output path runs in the next query's first block pair, around the issue
of its first QKᵀ); with ``AttentionConfig.persistent_ctas`` a fixed number of CTAs walks every query that way, strided.
"""

import dataclasses
import functools
import linecache
from dataclasses import dataclass
from typing import Any

import tilelang.language as T

from tilev4._fastmath import FAST_SOURCE, LN2, LOG2E, ex2, lg2, rcp
from tilev4.dsl.spec import AttentionSpec, CompressedDense, IndexList, KVSource, Window


def mask_votes(spec: AttentionSpec) -> bool:
    """Whether the seesaw producer publishes, per stage, its warps' votes that all their keys are valid, and the
    consumers skip the mask of a block where all are (same bits): every layout but decode's window ring. On the H200
    (session 33, A/B, bits equal) HCA prefill took 0.968 of the time, V4-Flash / V4-Pro CSA prefill 0.993 / 0.994,
    but the b = 64 decode 1.032, its producer's vote being on the path of keys that come from DRAM."""
    return not any(isinstance(s, Window) and s.ring for s in spec.sources)


def _all_of(conds: list[Any]) -> Any:
    """``T.And`` of a non-empty list of conditions."""
    out = conds[0]
    for c in conds[1:]:
        out = T.And(out, c)
    return out


def _any_of(conds: list[Any]) -> Any:
    """``conds[0] or conds[1] …`` as one TIR condition, False for none. (A plain function: in a macro body the
    conditional expression ``a if conds else b`` would be staged, and its Python list test logged as a warning.)"""
    return functools.reduce(T.Or, conds) if conds else False


__all__ = [
    "AttentionConfig",
    "build_combine_program",
    "build_main_program",
    "head_block",
    "tensor_layout",
    "ws_supported",
]

MAX_PERSISTENT_CTAS = 1 << 16
NEG_BIG = -1.0e30  # running-max start: finite, so that 2^(m_prev - m) never sees inf - inf
# Seesaw schedule: a row's running max (base 2) moves only when a block's scores pass it by more than this, so
# that the 128-register output accumulator is rescaled only then; P = 2^(S - m) stays <= 2^8, O and l carry the
# same stale max, and the normalised output is the same sum (other roundings, no other math).
RESCALE_SLACK = 8.0
# tilev4_any_ne1(a): whether either of a thread's two entries of a [64]-row fragment (the rows it holds of an m64
# accumulator) differs from 1 -- the warp skips the accumulator's rescale when no lane needs it
ANY_NE1_SOURCE = """
__device__ __forceinline__ int tilev4_any_ne1(const float* a) { return (a[0] != 1.0f) | (a[1] != 1.0f); }
"""
# tilev4_warp_all(v): whether v is nonzero on every lane of the (converged) warp -- the seesaw producer's
# per-warp "every key of my rows is valid" flag, which lets the consumers skip the mask of a fully valid block
WARP_ALL_SOURCE = """
__device__ __forceinline__ int tilev4_warp_all(int v) { return __all_sync(0xffffffffu, v); }
"""


# AttentionConfig.overlap_epilogue: the columns of a consumer's half of query j's output staged after it has issued
# query j + 1's first Q·Kᵀ (the rest of the output path runs before; the wait for the stores' shared-memory reads
# always after). They are converted to bf16 registers before the issue (ptxas waits for in-flight products before any
# read of a register a wgmma wrote), so each 64 columns hold 16 more registers a thread across the issue: 128 spill.
EPILOGUE_COLUMNS_AFTER_ISSUE = 64


def _lazy_max(m: Any, rowmax: Any) -> Any:
    """The running max after a block whose row max is ``rowmax``: unchanged unless passed by more than the slack."""
    return T.if_then_else(rowmax > m + RESCALE_SLACK, rowmax, m)



@dataclass(frozen=True)
class AttentionConfig:
    """Compile-time knobs of the programs (the autotuner's space: see :mod:`tilev4.dsl.tuning`).

    block_kv: keys per block (BI).
    threads: CTA size of the simple schedule (the warp-specialised one always runs 384 threads).
    num_stages: software pipeline depth of the simple schedule's key loop. It has no effect with the
        current gathers (TileLang's pipeliner does not multi-buffer predicated element-wise copies;
        the CUDA source is the same for 1 and 2 up to buffer names), so it is not tuned.
    split_keys: keys per split (split programs only; a multiple of ``block_kv``), counted along the
        global key sequence (each source padded to whole blocks). A compile-time constant, so that a
        row's split boundaries never depend on the batch; with source sizes that are multiples of 64
        they do not depend on a ``block_kv`` dividing 64 either.
    schedule: "seesaw" (default; warp-specialised: one producer warpgroup loads rows by TMA or cp.async
        into a double buffer, the two consumer warpgroups take alternate key blocks, hand the running
        max from one to the other and swap their P, and each accumulates one half of D over both
        blocks), "ws" (the same producer; consumer 0 runs QKᵀ, the softmax and P·V on the first half of
        D, consumer 1 P·V on the second half) or "simple" (all warps gather, then compute). The two
        warp-specialised schedules need 64 heads per CTA and D = 512; other specs run "simple". Their
        softmax exponentials use ``ex2.approx.ftz`` (:func:`tilev4._fastmath.ex2`).
    combine_threads: CTA size of the combine program (element-wise over 4 heads × D; the splits are
        merged in a serial loop).
    pair_stages: block pairs the seesaw schedule's key buffer holds (1 or 2): with 2 (``block_kv`` <= 32 to fit
        in shared memory) the producer gathers pair ``it + 1`` while the consumers work on pair ``it``.
    query_tiles: consecutive queries a seesaw main-program CTA walks in turn (1: one CTA a query and head
        block). With more, a query's prologue overlaps the previous query's end: the producer loads the next Q
        as soon as both consumers are past their last QKᵀ and gathers its first key blocks while they finish
        the softmax, P·V and the output (staged through the P buffer, since Q's buffer holds the next Q). Each
        query runs the same arithmetic either way (same bits).
    persistent_ctas: 0 (default), or the number of seesaw main-program CTAs a head block (and sequence) that walk
        all the queries in turn, CTA ``i`` the queries ``i, i + P, i + 2P, …`` (strided, as a query's cost may
        grow with its position), each with the overlap ``query_tiles`` gives; with ``P`` = the device's SMs the
        launch is one wave, with no per-CTA prologue past the first query and no partly empty last wave. Excludes
        ``query_tiles`` > 1. Same bits as one query a CTA.
    overlap_epilogue: with ``query_tiles`` > 1, each consumer runs a query's output path (the row-sum exchange, the
        normalisation, the staging and stores of its half of O) at the start of the next query's first block pair:
        all but its last :data:`EPILOGUE_COLUMNS_AFTER_ISSUE` columns before it issues that pair's QKᵀ, the rest
        and the wait for the stores while the QKᵀ runs on the tensor cores. Same bits. It pays where a query's output
        weighs most against its key blocks (HCA: 3-4 % on the H200) and costs ~2 % on V4-Flash CSA
        (``benchmarks/logs/h200-2026-12-02-session45.md``).
    """

    block_kv: int = 64
    threads: int = 256
    num_stages: int = 1
    split_keys: int = 2048
    schedule: str = "seesaw"
    combine_threads: int = 128
    pair_stages: int = 1
    query_tiles: int = 1
    persistent_ctas: int = 0
    overlap_epilogue: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in ("simple", "ws", "seesaw"):
            raise ValueError(f"schedule must be 'simple', 'ws' or 'seesaw', got {self.schedule!r}")
        if self.split_keys < 1:
            raise ValueError(f"split_keys must be >= 1, got {self.split_keys}")
        if self.pair_stages not in (1, 2):
            raise ValueError(f"pair_stages must be 1 or 2, got {self.pair_stages}")
        if not 1 <= self.query_tiles <= 8:
            raise ValueError(f"query_tiles must be in [1, 8], got {self.query_tiles}")
        if not 0 <= self.persistent_ctas <= MAX_PERSISTENT_CTAS:
            raise ValueError(f"persistent_ctas must be in [0, {MAX_PERSISTENT_CTAS}], got {self.persistent_ctas}")
        if not isinstance(self.overlap_epilogue, bool):
            raise TypeError(f"overlap_epilogue must be a bool, got {self.overlap_epilogue!r}")
        if self.overlap_epilogue and self.query_tiles == 1:
            raise ValueError(f"overlap_epilogue=True needs query_tiles > 1 (a CTA that walks several queries; with "
                             f"persistent_ctas it would spill), got query_tiles={self.query_tiles}, "
                             f"persistent_ctas={self.persistent_ctas}")
        if self.persistent_ctas and self.query_tiles != 1:
            raise ValueError(f"persistent_ctas={self.persistent_ctas} needs query_tiles=1 (the CTAs walk their "
                             f"queries in turn already), got query_tiles={self.query_tiles}")
        if self.block_kv % 16 or self.block_kv < 16:
            raise ValueError(f"block_kv must be a positive multiple of 16, got {self.block_kv}")
        for name in ("threads", "combine_threads"):
            v = getattr(self, name)
            if v < 32 or v % 32 or v > 1024:
                raise ValueError(f"{name} must be a multiple of 32 in [32, 1024], got {v}")

    def one_query(self) -> "AttentionConfig":
        """This config walking one query a CTA (what a split program runs)."""
        return dataclasses.replace(self, query_tiles=1, persistent_ctas=0, overlap_epilogue=False)

    def walk_name(self) -> str:
        """How a CTA walks several queries (``query_tiles`` or ``persistent_ctas``), as the errors name it."""
        return (f"persistent_ctas={self.persistent_ctas}" if self.persistent_ctas
                else f"query_tiles={self.query_tiles}")

    def blocks_per_split(self) -> int:
        """Key blocks per split; ``split_keys`` must be a multiple of ``block_kv``."""
        if self.split_keys % self.block_kv:
            raise ValueError(f"split_keys={self.split_keys} must be a multiple of block_kv={self.block_kv}")
        return self.split_keys // self.block_kv


def ws_supported(spec: AttentionSpec) -> bool:
    """The warp-specialised schedule needs 64-head CTAs and D = 512."""
    return head_block(spec.heads) == 64 and spec.head_dim == 512


def head_block(heads: int) -> int:
    """Heads per CTA: 64 when it divides H, else the largest of 32/16 dividing H, else H rounded to 16."""
    for hb in (64, 32, 16):
        if heads % hb == 0:
            return hb
    return min(64, -(-heads // 16) * 16)


def tensor_layout(spec: AttentionSpec, split: bool) -> list[tuple[str, str]]:
    """Argument names of the main program in order, with a short role each."""
    args = [("q", "query"), ("positions", "query positions")]
    if spec.sink:
        args.append(("sink", "sink"))
    for src in spec.sources:
        args += [(n, "source") for n in src.tensor_names()]
    if split:
        args += [("o_part", "partial output"), ("lse_part", "partial lse")]
    else:
        args.append(("o", "output"))
        if spec.return_lse:
            args.append(("lse", "lse"))
    return args


def _generated_prim_func(name: str, arg_names: list[str], annotations: dict[str, Any], body: Any) -> Any:
    """A ``T.prim_func`` with named parameters ``arg_names`` whose body is the macro ``body(dict)``.

    TileLang parses a prim_func's source, so the thin wrapper is generated as source text and
    registered with ``linecache``; the real body is an ordinary ``T.macro`` taking the tensors.
    """
    src = f"def {name}({', '.join(arg_names)}):\n    body(dict({', '.join(f'{a}={a}' for a in arg_names)}))\n"
    fname = f"<tilev4.dsl:{name}({','.join(arg_names)})>"
    linecache.cache[fname] = (len(src), None, src.splitlines(True), fname)
    scope: dict[str, Any] = {"body": body}
    exec(compile(src, fname, "exec"), scope)
    fn = scope[name]
    fn.__annotations__ = dict(annotations)
    return T.prim_func(fn)


class _SourceGen:
    """Per-source expressions: how many key blocks, and (row, valid, kv_idx) of key ``j``."""

    def __init__(self, src: KVSource, BI: int, D: int):
        self.src, self.BI, self.D = src, BI, D
        self.rows = T.dynamic(f"{src.name}_rows")
        self.topk = T.dynamic(f"{src.name}_k") if isinstance(src, IndexList) else None

    def annotations(self, B: Any, S: Any) -> dict[str, Any]:
        src, D = self.src, self.D
        ann = {f"{src.name}_kv": T.Tensor[(B, self.rows, D), T.bfloat16]}
        if isinstance(src, Window) and not src.ring:
            ann[f"{src.name}_start"] = T.Tensor[(B,), T.int32]
        if isinstance(src, IndexList):
            ann[f"{src.name}_idx"] = T.Tensor[(B, S, self.topk), T.int32]
        return ann

    def num_keys_max(self) -> Any:
        """An upper bound on the keys of any query (shape-only: same for every row of a batch)."""
        src = self.src
        if isinstance(src, Window):
            return src.size
        if isinstance(src, IndexList):
            return self.topk * src.block
        return self.rows

    def num_blocks(self, t: dict, b: Any, tq: Any) -> Any:
        """Key blocks this query walks (may depend on its position for dense sources)."""
        src, BI = self.src, self.BI
        if isinstance(src, CompressedDense):
            visible = T.min(T.max((tq + 1) // src.ratio, 0), self.rows)
            return T.ceildiv(visible, BI)
        return T.ceildiv(self.num_keys_max(), BI)

    def index(self, t: dict, b: Any, s: Any, j: Any) -> Any:
        """The index-list entry key ``j`` of this IndexList source reads; the slot is clamped into the list, so
        the load is in bounds for any ``j`` (the warp-specialised producer issues it before it knows the
        key's source)."""
        src = self.src
        return t[f"{src.name}_idx"][b, s, T.max(T.min(j // src.block, self.topk - 1), 0)]

    def key(self, t: dict, b: Any, s: Any, tq: Any, j: Any, idx: Any = None, start: Any = None
            ) -> tuple[Any, Any, Any]:
        """(row in ``{name}_kv``, valid, kv_idx) of key ``j`` of this source for query (b, s) at ``tq``;
        ``idx``: an IndexList entry already loaded (:meth:`index`); ``start``: a stream window's
        ``{name}_start[b]``, already loaded."""
        src = self.src
        if isinstance(src, Window):
            p = tq - src.size + 1 + j  # absolute token position
            if src.ring:
                valid = T.And(T.And(p >= 0, j < src.size), p <= tq)
                row = T.truncmod(T.max(p, 0), self.rows)
            else:
                if start is None:
                    start = t[f"{src.name}_start"][b]
                valid = T.And(T.And(p >= T.max(start, 0), p - start < self.rows), j < src.size)
                row = p - start
            return row, valid, p
        if isinstance(src, IndexList):
            slot = j // src.block
            if idx is None:
                idx = t[f"{src.name}_idx"][b, s, T.min(slot, self.topk - 1)]
            row = idx * src.block + T.truncmod(j, src.block)
            valid = T.And(T.And(slot < self.topk, idx >= 0), row < self.rows)
            return row, valid, row
        if isinstance(src, CompressedDense):
            valid = T.And(j < (tq + 1) // src.ratio, j < self.rows)
            return j, valid, j
        raise TypeError(f"unsupported KV source {type(src).__name__}")

    def tma_block(self, tq: Any, jb: Any, start: Any) -> tuple[Any, Any] | None:
        """``(cond, row0)``: when ``cond`` holds, key block ``jb`` of this source is the ``BI`` rows ``row0 …``
        of ``{name}_kv`` and every one of them that lies inside the tensor is a valid key, so one TMA load
        (which zero-fills rows outside the tensor) brings the bytes the gather would (it zero-fills invalid
        keys). A stream window's block qualifies when the window is a whole number of blocks and ``start >= 0``
        (its invalid keys are then exactly the rows before the stream or past it); a compressed stream's block when
        all its entries are visible. None: the source has no such blocks (index lists; a ring, whose blocks may
        wrap; a window of a partial block, whose last rows are keys past the query)."""
        src, BI = self.src, self.BI
        if isinstance(src, Window) and not src.ring:
            if src.size % BI:
                return None
            return T.And(T.And(jb >= 0, jb < src.size // BI), start >= 0), tq - src.size + 1 + jb * BI - start
        if isinstance(src, CompressedDense):
            visible = T.min(T.max((tq + 1) // src.ratio, 0), self.rows)
            return T.And(jb >= 0, (jb + 1) * BI <= visible), jb * BI
        return None


def build_main_program(spec: AttentionSpec, config: AttentionConfig, split: bool) -> Any:
    """The fused attention program for ``spec`` (see the module docstring)."""
    if config.pair_stages != 1 and not (config.schedule == "seesaw" and ws_supported(spec)):
        raise ValueError(f"pair_stages={config.pair_stages} needs the 'seesaw' schedule with 64-head CTAs and D = 512 "
                         f"(schedule={config.schedule!r}, heads={spec.heads}, head_dim={spec.head_dim})")
    if (config.query_tiles != 1 or config.persistent_ctas) and (
            split or not (config.schedule == "seesaw" and ws_supported(spec))
            or not any(isinstance(s, (Window, IndexList)) for s in spec.sources)):
        raise ValueError(f"{config.walk_name()} needs the seesaw main program with 64-head CTAs, "
                         f"D = 512 and a window or index-list source (every query then walks a key block; "
                         f"schedule={config.schedule!r}, split={split}, heads={spec.heads})")
    if config.schedule == "seesaw" and ws_supported(spec):
        return _build_seesaw_program(spec, config, split)
    if config.schedule == "ws" and ws_supported(spec):
        return _build_ws_program(spec, config, split)
    H, D, BI = spec.heads, spec.head_dim, config.block_kv
    HB = head_block(H)
    NHB = -(-H // HB)
    threads, stages = config.threads, config.num_stages
    fixed_sb = config.blocks_per_split() if split else 1
    scale = spec.softmax_scale
    score_mod, mask_mod = spec.score_mod, spec.mask_mod
    B, S = T.dynamic("B"), T.dynamic("S")
    NS = T.dynamic("NS") if split else 1
    gens = [_SourceGen(src, BI, D) for src in spec.sources]
    ann = _annotations(spec, gens, split, B, S, NS)
    arg_names = [n for n, _ in tensor_layout(spec, split)]

    @T.macro
    def body(t):
        with T.Kernel(S, NHB * NS, B, threads=threads) as (s_i, bx, b_i):
            T.import_source(FAST_SOURCE)  # rcp / lg2 / ex2 approx (the epilogue)
            q_shared = T.alloc_shared((HB, D), T.bfloat16)
            kv_shared = T.alloc_shared((BI, D), T.bfloat16)
            p_shared = T.alloc_shared((HB, BI), T.bfloat16)
            o_shared = T.alloc_shared((HB, D), T.bfloat16)
            row_shared = T.alloc_shared((BI,), T.int32)
            ok_shared = T.alloc_shared((BI,), T.int32)
            kvpos_shared = T.alloc_shared((BI,), T.int32)
            acc_s = T.alloc_fragment((HB, BI), T.float32)
            acc_o = T.alloc_fragment((HB, D), T.float32)
            m = T.alloc_fragment((HB,), T.float32)
            m_prev = T.alloc_fragment((HB,), T.float32)
            alpha = T.alloc_fragment((HB,), T.float32)
            l_sum = T.alloc_fragment((HB,), T.float32)
            row_sum = T.alloc_fragment((HB,), T.float32)
            lse2 = T.alloc_fragment((HB,), T.float32)

            h0 = (bx % NHB) * HB
            sp = bx // NHB
            tq = t["positions"][b_i, s_i]
            if split:
                sb = fixed_sb

            T.copy(t["q"][b_i, s_i, h0 : h0 + HB, :], q_shared)
            T.fill(acc_o, 0)
            T.fill(l_sum, 0)
            T.fill(m, NEG_BIG)

            base = 0
            for g in gens:
                kv_name = f"{g.src.name}_kv"  # no local alias: it renames the buffer
                nblk = g.num_blocks(t, b_i, tq)
                if split:
                    lo = T.min(T.max(sp * sb - base, 0), nblk)
                    hi = T.min(T.max((sp + 1) * sb - base, 0), nblk)
                else:
                    lo = 0
                    hi = nblk
                for jb in T.Pipelined(hi - lo, num_stages=stages):
                    for jj in T.Parallel(BI):
                        row, valid, kvpos = g.key(t, b_i, s_i, tq, (lo + jb) * BI + jj)
                        ok_shared[jj] = T.if_then_else(valid, 1, 0)
                        row_shared[jj] = T.if_then_else(valid, row, 0)
                        kvpos_shared[jj] = kvpos
                    for jj, d in T.Parallel(BI, D):
                        kv_shared[jj, d] = T.if_then_else(
                            ok_shared[jj] != 0, t[kv_name][b_i, row_shared[jj], d], T.cast(0, T.bfloat16)
                        )
                    T.fill(acc_s, 0)
                    T.gemm(q_shared, kv_shared, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    # [HB, D] @ [D, BI] -> [HB, BI]
                    for h, jj in T.Parallel(HB, BI):
                        score = acc_s[h, jj] * scale
                        if score_mod is not None:
                            score = score_mod(score, b_i, h0 + h, tq, kvpos_shared[jj])
                        keep = ok_shared[jj] != 0
                        if mask_mod is not None:
                            keep = T.And(keep, mask_mod(b_i, h0 + h, tq, kvpos_shared[jj]))
                        acc_s[h, jj] = T.if_then_else(keep, score * LOG2E, -T.infinity(T.float32))
                    T.copy(m, m_prev)
                    T.reduce_max(acc_s, m, dim=1, clear=False)  # m = max(m, rowmax(acc_s))  [HB]
                    for h in T.Parallel(HB):
                        alpha[h] = T.exp2(m_prev[h] - m[h])
                    for h, jj in T.Parallel(HB, BI):
                        acc_s[h, jj] = T.exp2(acc_s[h, jj] - m[h])
                    T.reduce_sum(acc_s, row_sum, dim=1)  # row_sum = p.sum(-1)  [HB]
                    for h in T.Parallel(HB):
                        l_sum[h] = l_sum[h] * alpha[h] + row_sum[h]
                    for h, d in T.Parallel(HB, D):
                        acc_o[h, d] = acc_o[h, d] * alpha[h]
                    T.copy(acc_s, p_shared)
                    T.gemm(p_shared, kv_shared, acc_o, policy=T.GemmWarpPolicy.FullRow)
                    # [HB, BI] @ [BI, D] -> [HB, D]
                base = base + nblk if not isinstance(g.src, CompressedDense) else base + T.ceildiv(g.rows, BI)

            # normalised partial: o = acc_o / l, lse2 = log2(l) + m (base 2, sink excluded)
            for h in T.Parallel(HB):
                lse2[h] = T.if_then_else(l_sum[h] > 0, lg2(l_sum[h]) + m[h], -T.infinity(T.float32))
                alpha[h] = T.if_then_else(l_sum[h] > 0, rcp(l_sum[h]), 0.0)
            for h, d in T.Parallel(HB, D):
                acc_o[h, d] = acc_o[h, d] * alpha[h]
            if split:
                for h, d in T.Parallel(HB, D):
                    if h0 + h < H:
                        t["o_part"][b_i, s_i, sp, h0 + h, d] = acc_o[h, d]
                for h in T.Parallel(HB):
                    if h0 + h < H:
                        t["lse_part"][b_i, s_i, sp, h0 + h] = lse2[h]
            else:
                # the combine of one split: M = max(lse2, sink2); w = 2^(lse2-M); o = w·o / (w + 2^(sink2-M))
                for h in T.Parallel(HB):
                    if spec.sink:
                        sink2 = t["sink"][T.min(h0 + h, H - 1)] * LOG2E
                        mx = T.max(lse2[h], sink2)
                        w = T.if_then_else(l_sum[h] > 0, ex2(lse2[h] - mx), 0.0)
                        den = w + ex2(sink2 - mx)
                    else:
                        w = T.if_then_else(l_sum[h] > 0, 1.0, 0.0)
                        den = w
                    m_prev[h] = w * T.if_then_else(w > 0, rcp(den), 0.0)  # the combine's weight of a lone split
                for h, d in T.Parallel(HB, D):
                    o_shared[h, d] = T.cast(acc_o[h, d] * m_prev[h], T.bfloat16)
                T.copy(o_shared, t["o"][b_i, s_i, h0 : h0 + HB, :])
                if spec.return_lse:
                    for h in T.Parallel(HB):
                        if h0 + h < H:
                            t["lse"][b_i, s_i, h0 + h] = lse2[h] * LN2

    return _generated_prim_func(f"{spec.name}_{'split' if split else 'main'}", arg_names, ann, body)


def _annotations(spec: AttentionSpec, gens: list, split: bool, B: Any, S: Any, NS: Any) -> dict[str, Any]:
    H, D = spec.heads, spec.head_dim
    ann: dict[str, Any] = {"q": T.Tensor[(B, S, H, D), T.bfloat16], "positions": T.Tensor[(B, S), T.int32]}
    if spec.sink:
        ann["sink"] = T.Tensor[(H,), T.float32]
    for g in gens:
        ann.update(g.annotations(B, S))
    if split:
        ann["o_part"] = T.Tensor[(B, S, NS, H, D), T.float32]
        ann["lse_part"] = T.Tensor[(B, S, NS, H), T.float32]
    else:
        ann["o"] = T.Tensor[(B, S, H, D), T.bfloat16]
        if spec.return_lse:
            ann["lse"] = T.Tensor[(B, S, H), T.float32]
    return ann


def _block_range(t: dict, gens: list, b_i: Any, tq: Any, sp: Any, split_blocks: int | None) -> tuple[Any, Any]:
    """The query's global block range ``[lo, hi)`` (warp-specialised schedules): source ``i`` owns blocks
    ``[base_i, base_i + count_i)`` with ``base_i`` shape-only; a split program takes its ``split_blocks``
    blocks ``sp``-th piece of that sequence."""
    end = 0
    base = 0
    for g in gens:
        end = base + g.num_blocks(t, b_i, tq)
        base = base + T.ceildiv(g.num_keys_max(), g.BI)
    if split_blocks is None:
        return 0, end
    return T.min(sp * split_blocks, end), T.min((sp + 1) * split_blocks, end)


@T.macro
def _query_tile(t, gens, b_i, s_i, bx, q_shared, q_bar, NHB, HB, split_blocks):
    """A warp-specialised CTA's heads, split, query position and key-block range; issues the TMA load of Q
    (the producer starts gathering at once, the consumers wait on ``q_bar`` before their first GEMM).
    Returns ``(h0, sp, tq, lo, hi, n_iter)``, ``n_iter`` block pairs."""
    h0 = (bx % NHB) * HB
    sp = bx // NHB
    tq = t["positions"][b_i, s_i]
    lo, hi = _block_range(t, gens, b_i, tq, sp, split_blocks)
    n_iter = T.ceildiv(hi - lo, 2)
    T.tma_copy(t["q"][b_i, s_i, h0 : h0 + HB, :], q_shared, barrier=q_bar)
    T.barrier_arrive(q_bar)
    return h0, sp, tq, lo, hi, n_iter


_ROWS_PER_PASS = 16  # producer warpgroup: 128 threads, 8 per row (16 B each over 64 dims)
_PRODUCER_WARPS = 4  # its warps, each voting on its keys of a stage (publish_stage)


def _first_query(s0: Any, S: Any, bound: Any) -> Any:
    """A CTA's first query, clamped into the launch where the CTA may have none (``bound``: persistent CTAs)."""
    return s0 if bound is None else T.min(s0, S - 1)


def _position_ahead(t: dict, b_i: Any, sq: Any, S: Any, bound: Any) -> Any:
    """Persistent CTAs (``bound`` given): a register holding query ``sq``'s position (clamped into the launch), else
    None."""
    if bound is None:
        return None
    return T.alloc_var(T.int32, init=t["positions"][b_i, T.min(sq, S - 1)])


def _live(cond: Any, bound: Any) -> Any:
    """``cond`` where a persistent CTA's walk needs it (``bound`` given), else True: a test the program leaves out."""
    return True if bound is None else cond


def _cta_pair(it: Any, g0: Any) -> Any:
    """Block pair ``it`` of a query counted along the CTA's queries (``g0`` pairs before it; None: one query a CTA)."""
    return it if g0 is None else g0 + it


def _ring_slot(it: Any, ring: int) -> tuple[Any, Any]:
    """Block pair ``it``'s first stage in a key buffer of ``ring`` pairs, and the parity of its ready/free barriers
    (with one pair: stage 0 and ``it & 1``, written so that the program is the one without a ring)."""
    if ring == 1:
        return 0, it & 1
    return (it % ring) * 2, (it // ring) & 1


def _producer(spec: AttentionSpec, gens: list, BI: int, halves: bool, ring: int = 1) -> Any:
    """The producer warpgroup of the warp-specialised schedules, as a macro.

    For each block pair ``it`` it resolves the (source, row, kv_idx) of its ``BI / 16`` rows of global blocks
    ``lo + 2·it`` (stage 0) and ``lo + 2·it + 1`` (stage 1), and gathers them with 16-byte cp.async
    (predicated off, i.e. zero-filled, for invalid keys) once the consumers freed the stage, publishes the
    validity and kv_idx of each key and arrives on the stage's ready barrier when the copies land. The
    index-list entries of pair ``it + 1`` are loaded (all at once, slots clamped into the list) while pair
    ``it`` is gathered, so the resolution never waits on a dependent global load.

    ``halves=False``: one free/ready barrier per stage (``k_free[st]``, ``k_ready[st]``). ``halves=True``:
    one per half of D (``k_free[2·st + h]``, h = 0 for dims ``[0, D/2)``), filled in the order the seesaw
    consumers free them — (0, 0), (1, 1), (0, 1), (1, 0) — so that a half is refilled as soon as its last
    reader is done; the validity of a stage is published with its first half. ``ring`` (``halves`` only): block
    pairs in the buffer; pair ``it`` fills stages ``2·(it % ring)`` and ``2·(it % ring) + 1``.

    With ``halves``, a block of a contiguous source (a stream window; a compressed stream's fully visible block,
    :meth:`_SourceGen.tma_block`) is one TMA load per half instead of the gather (one elected thread issues it, no
    per-row address work, same bytes in shared memory). A stream window's ``start`` is loaded once, up front.
    """
    D = spec.head_dim
    NR = BI // _ROWS_PER_PASS
    NU = D // 64  # 16-byte pieces a thread copies per row
    has_mods = spec.score_mod is not None or spec.mask_mod is not None
    max_blocks = [T.ceildiv(g.num_keys_max(), BI) for g in gens]
    bases = [sum(max_blocks[:i]) for i in range(len(gens))]  # shape-only first global block of each source
    listed = [i for i, g in enumerate(gens) if isinstance(g.src, IndexList)]  # sources whose keys need a load
    has_list = len(listed) > 0
    tma_srcs = list(enumerate(gens)) if halves else []  # sources whose blocks TMA may load (see fill)
    streams = [g for g in gens if isinstance(g.src, Window) and not g.src.ring]  # their start is loaded up front
    # (stage, first 16-byte piece, end piece, publishes the stage's validity) in gather order
    steps = ([(0, 0, NU // 2, True), (1, NU // 2, NU, True), (0, NU // 2, NU, False), (1, 0, NU // 2, False)]
             if halves else [(0, 0, NU, True), (1, 0, NU, True)])
    votes = halves and mask_votes(spec)

    @T.macro
    def load_indices(t, ptx, b_i, s_i, lo, it, pre):
        for st in T.unroll(2):
            for r in T.unroll(NR):
                for p, i in enumerate(listed):
                    pre[(p * 2 + st) * NR + r] = gens[i].index(
                        t, b_i, s_i, (lo + it * 2 + st - bases[i]) * BI + r * _ROWS_PER_PASS + ptx // 8)

    @T.macro
    def resolve(t, ptx, b_i, s_i, tq, gblk, hi, st, slot, src_local, row_local, pos_local, idx_cur, start):
        for r in T.unroll(NR):
            jj = r * _ROWS_PER_PASS + ptx // 8
            src_local[slot * NR + r] = -1
            row_local[slot * NR + r] = 0
            pos_local[slot * NR + r] = 0
            for i, g in enumerate(gens):
                if T.And(T.And(gblk >= bases[i], gblk < bases[i] + g.num_blocks(t, b_i, tq)), gblk < hi):
                    pre = idx_cur[(listed.index(i) * 2 + st) * NR + r] if i in listed else None
                    row, valid, kvpos = g.key(t, b_i, s_i, tq, (gblk - bases[i]) * BI + jj, pre, start)
                    src_local[slot * NR + r] = T.if_then_else(valid, i, -1)
                    row_local[slot * NR + r] = T.if_then_else(valid, row, 0)
                    pos_local[slot * NR + r] = kvpos

    @T.macro
    def publish_stage(ptx, st, slot, ok_shared, kvpos_shared, src_local, pos_local):
        """The validity (and kv_idx) of each key of stage ``st``, for the consumers' mask. ``votes``: also, in
        columns ``BI …`` of ``ok_shared``, whether each producer warp's keys are all valid (a warp vote; every lane
        writes the same value), so that the consumers skip the mask of a fully valid block."""
        for r in T.unroll(NR):
            jj = r * _ROWS_PER_PASS + ptx // 8
            ok_shared[st, jj] = T.if_then_else(src_local[slot * NR + r] >= 0, 1, 0)
            if has_mods:
                kvpos_shared[st, jj] = pos_local[slot * NR + r]
        if votes:
            mine = _all_of([src_local[slot * NR + r] >= 0 for r in range(NR)])  # this thread's keys are all valid
            ok_shared[st, BI + ptx // 32] = T.call_extern("int32", "tilev4_warp_all", T.Cast("int32", mine))

    @T.macro
    def gather(t, ptx, b_i, st, slot, u0, u1, kv_shared, ok_shared, kvpos_shared, publish, src_local, row_local,
               pos_local):
        col = (ptx % 8) * 8
        for r in T.unroll(NR):
            jj = r * _ROWS_PER_PASS + ptx // 8
            for i, g in enumerate(gens):
                # source 0 also zero-fills invalid rows (predicated-off cp.async)
                if (src_local[slot * NR + r] <= 0) if i == 0 else (src_local[slot * NR + r] == i):
                    for u in T.unroll(u0, u1):
                        T.ptx_cp_async(
                            T.access_ptr(kv_shared[st, jj, u * 64 + col], "w", 8),
                            T.access_ptr(t[f"{g.src.name}_kv"][b_i, row_local[slot * NR + r], u * 64 + col], "r", 8),
                            8,
                            predicate=src_local[slot * NR + r] == i,
                        )
        if publish:
            publish_stage(ptx, st, slot, ok_shared, kvpos_shared, src_local, pos_local)

    @T.macro
    def fill(t, ptx, b_i, tq, gblk, hi, stage, slot, u0, u1, bar, publish, start, kv_shared, ok_shared, kvpos_shared,
             k_ready, src_local, row_local, pos_local):
        """Half ``u0 … u1`` (16-byte pieces) of block ``gblk`` into ``stage``: one TMA load where the block is
        contiguous (:meth:`_SourceGen.tma_block`), else the gather; then the arrival on ``k_ready[bar]``."""
        blocks = [(g, g.tma_block(tq, gblk - bases[i], start)) for i, g in tma_srcs]
        blocks = [(g, blk) for g, blk in blocks if blk is not None]
        conds = [T.And(c, gblk < hi) for _, (c, _) in blocks]
        if _any_of(conds):  # a Python False (no source with such blocks) keeps only the gather in the program
            if publish:
                publish_stage(ptx, stage, slot, ok_shared, kvpos_shared, src_local, pos_local)
            for (g, (_, row0)), cond in zip(blocks, conds):
                if cond:
                    T.tma_copy(t[f"{g.src.name}_kv"][b_i, row0 : row0 + BI, u0 * 64 : u1 * 64],
                               kv_shared[stage, :, u0 * 64 : u1 * 64], barrier=k_ready[bar])
            T.barrier_arrive(k_ready[bar])
        else:
            gather(t, ptx, b_i, stage, slot, u0, u1, kv_shared, ok_shared, kvpos_shared, publish, src_local,
                   row_local, pos_local)
            T.cp_async_barrier_noinc(k_ready[bar])

    @T.macro
    def produce(t, ptx, b_i, s_i, tq, lo, hi, n_iter, kv_shared, ok_shared, kvpos_shared, k_ready, k_free,
                src_local, row_local, pos_local, idx_cur, idx_nxt, g0=None):
        # g0: block pairs the CTA walked for its earlier queries (several a CTA), None for one query a CTA
        start = None
        if len(streams) > 0:  # one load up front instead of one a resolved block
            start_local = T.alloc_local((1,), T.int32)
            start_local[0] = t[f"{streams[0].src.name}_start"][b_i]
            start = start_local[0]
        if has_list:
            load_indices(t, ptx, b_i, s_i, lo, 0, idx_cur)
        for it in T.serial(n_iter):
            if has_list:
                load_indices(t, ptx, b_i, s_i, lo, it + 1, idx_nxt)  # in flight during this pair
            if halves:
                for st in T.unroll(2):
                    resolve(t, ptx, b_i, s_i, tq, lo + it * 2 + st, hi, st, st, src_local, row_local, pos_local,
                            idx_cur, start)
            r0, ph = _ring_slot(_cta_pair(it, g0), ring)
            for st, u0, u1, publish in steps:
                stage = r0 + st
                bar = stage * 2 + u0 // (NU // 2) if halves else st
                if not halves:
                    resolve(t, ptx, b_i, s_i, tq, lo + it * 2 + st, hi, st, 0, src_local, row_local, pos_local,
                            idx_cur, start)
                T.barrier_wait(k_free[bar], ph ^ 1)
                fill(t, ptx, b_i, tq, lo + it * 2 + st, hi, stage, st if halves else 0, u0, u1, bar, publish, start,
                     kv_shared, ok_shared, kvpos_shared, k_ready, src_local, row_local, pos_local)
            if has_list:
                for k in T.unroll(len(listed) * 2 * NR):
                    idx_cur[k] = idx_nxt[k]

    @T.macro
    def produce_tiles(t, ptx, b_i, s0, n_q, S, gens_end, kv_shared, ok_shared, kvpos_shared, k_ready, k_free,
                      src_local, row_local, pos_local, idx_cur, idx_nxt, bound=None, stride=1):
        """``produce`` for the ``n_q`` queries ``s0 + j·stride`` of a CTA (query_tiles > 1 or persistent CTAs, halves
        only): their block pairs walked as one sequence, so that the ring's stages and barrier phases run on across
        queries and the next query's first pairs are gathered while the consumers finish a query. One loop, not a
        loop over the queries: TileLang would order the queries' shared writes with a named barrier of its own
        numbering (the consumers' mbarriers already order them). ``gens_end(tq)``: a query's block count. Every query
        walks at least one pair (the build asks for a window or an index list). ``bound`` (persistent CTAs, whose
        query count is dynamic): the loop runs that many pairs and idles past the CTA's last query instead of
        counting them."""
        start = None
        if len(streams) > 0:
            start_local = T.alloc_local((1,), T.int32)
            start_local[0] = t[f"{streams[0].src.name}_start"][b_i]
            start = start_local[0]
        total = T.alloc_var(T.int32, init=0)
        if bound is None:
            for jq in T.serial(n_q):
                total = total + T.ceildiv(gens_end(t["positions"][b_i, s0 + jq]), 2)
        else:  # many queries a CTA: walk up to ``bound`` pairs, idle past the last query's last pair
            total = bound
        sq = T.alloc_var(T.int32)
        tq = T.alloc_var(T.int32)
        hi = T.alloc_var(T.int32)
        it = T.alloc_var(T.int32, init=0)
        sq = s0
        tq = t["positions"][b_i, _first_query(s0, S, bound)]
        hi = gens_end(tq)
        # persistent CTAs: the next query's position is loaded a query ahead (a strided query's is in another cache
        # line, whose latency the producer would otherwise wait out at every query)
        tq_nxt = _position_ahead(t, b_i, sq + stride, S, bound)
        if has_list:
            load_indices(t, ptx, b_i, sq, 0, 0, idx_cur)
        for gp in T.serial(total):
            if _live(sq < S, bound):  # (persistent CTAs) past the CTA's last query: idle
                if has_list:  # the next pair's entries, in flight during this pair (past the query: the next query's)
                    if it * 2 + 2 < hi:
                        load_indices(t, ptx, b_i, sq, 0, it + 1, idx_nxt)
                    else:
                        load_indices(t, ptx, b_i, T.min(sq + stride, S - 1), 0, 0, idx_nxt)
                for st in T.unroll(2):
                    resolve(t, ptx, b_i, sq, tq, it * 2 + st, hi, st, st, src_local, row_local, pos_local, idx_cur,
                            start)
                r0, ph = _ring_slot(gp, ring)
                for st, u0, u1, publish in steps:
                    stage = r0 + st
                    bar = stage * 2 + u0 // (NU // 2)
                    T.barrier_wait(k_free[bar], ph ^ 1)
                    fill(t, ptx, b_i, tq, it * 2 + st, hi, stage, st, u0, u1, bar, publish, start, kv_shared,
                         ok_shared, kvpos_shared, k_ready, src_local, row_local, pos_local)
                if has_list:
                    for k in T.unroll(len(listed) * 2 * NR):
                        idx_cur[k] = idx_nxt[k]
                it = it + 1
                if it * 2 >= hi:  # the query's last pair: on to the next query
                    it = 0
                    sq = sq + stride
                    if bound is None:
                        tq = t["positions"][b_i, T.min(sq, S - 1)]
                    else:
                        tq = tq_nxt
                        tq_nxt = t["positions"][b_i, T.min(sq + stride, S - 1)]
                    hi = gens_end(tq)

    produce.tiles = produce_tiles  # (a macro object takes attributes: the two share the steps above)
    return produce


def _softmax_steps(spec: AttentionSpec, HB: int, BI: int, DH: int) -> tuple:
    """The softmax steps the warp-specialised consumers share, as macros: ``mask`` (scale, the user's
    score/mask modifiers, the key validity of stage ``st``; base-2 scores, −inf for dropped keys),
    ``exponentiate`` (``P = 2^(S − m)`` in place, its row sums into ``l``, the accumulator × ``alpha``),
    ``rescale`` (``l`` and the accumulator × ``alpha`` alone) and ``epilogue_factors`` (a row's ``lse2``, ``1/l``,
    split weight and ``1/(w + sink)``)."""
    scale, score_mod, mask_mod = spec.softmax_scale, spec.score_mod, spec.mask_mod

    @T.macro
    def drop(acc_s, ok_shared, kvpos_shared, st, b_i, h0, tq, raw):
        """The mask itself (see ``mask``)."""
        for h, jj in T.Parallel(HB, BI):
            if not raw:
                score = acc_s[h, jj] * scale
                if score_mod is not None:
                    score = score_mod(score, b_i, h0 + h, tq, kvpos_shared[st, jj])
            keep = ok_shared[st, jj] != 0
            if mask_mod is not None:
                keep = T.And(keep, mask_mod(b_i, h0 + h, tq, kvpos_shared[st, jj]))
            if raw:
                acc_s[h, jj] = T.if_then_else(keep, acc_s[h, jj], -T.infinity(T.float32))
            else:
                acc_s[h, jj] = T.if_then_else(keep, score * LOG2E, -T.infinity(T.float32))

    @T.macro
    def mask(acc_s, ok_shared, kvpos_shared, st, b_i, h0, tq, raw=False, votes=False):
        """``raw`` (no ``score_mod``, a positive scale): dropped keys to −inf, the others left as ``Q·K``, scaled
        later inside the exponent (``exponentiate(..., c=scale·log2 e)``: one FFMA a score). ``votes`` (the seesaw
        producer's per-warp flags in ``ok_shared[st, BI:]``): with ``raw`` and no ``mask_mod``, a block whose keys
        are all valid is left as it is (what the mask would do to it)."""
        if raw and votes and mask_mod is None:
            if _any_of([ok_shared[st, BI + v] == 0 for v in range(_PRODUCER_WARPS)]):
                drop(acc_s, ok_shared, kvpos_shared, st, b_i, h0, tq, raw)
        else:
            drop(acc_s, ok_shared, kvpos_shared, st, b_i, h0, tq, raw)

    @T.macro
    def scale_rows(alpha, acc, cols, lazy):
        """``acc[:, :cols]`` (row ``h``) × ``alpha[h]``; ``lazy`` (64-row fragments, :data:`ANY_NE1_SOURCE`
        imported): skipped by a warp none of whose rows has ``alpha`` ≠ 1 (the same bits: a product with 1 is
        exact)."""
        if lazy:
            if T.call_extern("int32", "tilev4_any_ne1", alpha.data) != 0:
                for h, d in T.Parallel(HB, cols):
                    acc[h, d] = acc[h, d] * alpha[h]
        else:
            for h, d in T.Parallel(HB, cols):
                acc[h, d] = acc[h, d] * alpha[h]

    @T.macro
    def exponentiate(acc_s, m, alpha, row_sum, l_sum, acc_o, lazy=False, c=None):
        """``c``: the scores are raw (``mask(..., raw=True)``), ``P = 2^(S·c − m)``."""
        for h, jj in T.Parallel(HB, BI):
            if c is None:
                acc_s[h, jj] = ex2(acc_s[h, jj] - m[h])
            else:
                acc_s[h, jj] = ex2(acc_s[h, jj] * c - m[h])
        T.reduce_sum(acc_s, row_sum, dim=1)  # row_sum = P.sum(-1)  [HB]
        for h in T.Parallel(HB):
            l_sum[h] = l_sum[h] * alpha[h] + row_sum[h]
        scale_rows(alpha, acc_o, DH, lazy)

    @T.macro
    def rescale(alpha, l_sum, acc_o, lazy=False):
        """The row sum and the accumulator × ``alpha`` (moved to a new running max, no new keys)."""
        for h in T.Parallel(HB):
            l_sum[h] = l_sum[h] * alpha[h]
        scale_rows(alpha, acc_o, DH, lazy)

    rescale.rows = scale_rows  # (a macro object takes attributes) the seesaw leader's lazy rescale of P_0

    @T.macro
    def epilogue_factors(t, h0, h, l_sum, m, lse2, alpha, weight, inv_den):
        """Row ``h``'s epilogue factors: ``lse2 = log2(l) + m``, ``alpha = 1/l`` and, as the combine forms them for
        a lone split, the split weight ``w`` (``2^(lse2 − M)`` against the sink, else 1; 0 for an empty row) and
        ``1/(w + sink)``."""
        lse2[h] = T.if_then_else(l_sum[h] > 0, lg2(l_sum[h]) + m[h], -T.infinity(T.float32))
        alpha[h] = T.if_then_else(l_sum[h] > 0, rcp(l_sum[h]), 0.0)
        if spec.sink:
            sink2 = t["sink"][h0 + h] * LOG2E
            mx = T.max(lse2[h], sink2)
            w = T.if_then_else(l_sum[h] > 0, ex2(lse2[h] - mx), 0.0)
            den = w + ex2(sink2 - mx)
        else:
            w = T.if_then_else(l_sum[h] > 0, 1.0, 0.0)
            den = w
        weight[h] = w
        inv_den[h] = T.if_then_else(w > 0, rcp(den), 0.0)

    return mask, exponentiate, rescale, epilogue_factors


def _ws_setup(spec: AttentionSpec, config: AttentionConfig, split: bool) -> tuple:
    """What both warp-specialised builders derive from the spec and config: sizes (``HB`` heads a CTA, ``DH``
    half of D, ``NR`` producer rows a thread, ``NP`` prefetched index-list entries a producer thread), the
    split's fixed block count, the dynamic extents, the key sources, the argument annotations and names, the
    producer macro and the shared softmax steps."""
    D, BI = spec.head_dim, config.block_kv
    HB = 64
    B, S = T.dynamic("B"), T.dynamic("S")
    NS = T.dynamic("NS") if split else 1
    gens = [_SourceGen(src, BI, D) for src in spec.sources]
    NR = BI // _ROWS_PER_PASS
    NP = max(1, 2 * NR * sum(isinstance(g.src, IndexList) for g in gens))
    return (D, BI, HB, D // 2, spec.heads // HB, config.blocks_per_split() if split else 1, B, S, NS, gens,
            _annotations(spec, gens, split, B, S, NS), [n for n, _ in tensor_layout(spec, split)], NR, NP,
            _producer(spec, gens, BI, halves=config.schedule == "seesaw",
                      ring=config.pair_stages if config.schedule == "seesaw" else 1),
            *_softmax_steps(spec, HB, BI, D // 2))


def _build_ws_program(spec: AttentionSpec, config: AttentionConfig, split: bool) -> Any:
    """Warp-specialised main program: 3 warpgroups (consumer 0, consumer 1, producer).

    The key blocks of all sources form one sequence: source i owns global blocks
    ``[base_i, base_i + cnt_i)`` where ``base_i`` is shape-only and ``cnt_i`` the query's own
    count (dense sources); blocks outside every range, and the padding block that makes the
    count even, are zero-filled and fully masked. The producer fills stage ``st`` of a 2-stage
    buffer with cp.async (zero-fill for invalid keys) and arrives on ``k_ready[st]``; consumer 0
    computes ``S = Q Kᵀ`` over all of D, the softmax and ``P V[:, :256]``; consumer 1 rescales and
    computes ``P V[:, 256:]``; ``p_ready``/``p_free`` hand P and the rescale factors over.
    """
    (D, BI, HB, DH, NHB, fixed_sb, B, S, NS, gens, ann, arg_names, NR, NP, produce, mask, exponentiate,
     _rescale, epilogue_factors) = _ws_setup(spec, config, split)

    @T.macro
    def body(t):
        with T.Kernel(S, NHB * NS, B, threads=384) as (s_i, bx, b_i):
            T.import_source(FAST_SOURCE)  # ex2.approx.ftz (the softmax), rcp / lg2 approx (the epilogue)
            q_shared = T.alloc_shared((HB, D), T.bfloat16)
            kv_shared = T.alloc_shared((2, BI, D), T.bfloat16)
            p_shared = T.alloc_shared((HB, BI), T.bfloat16)
            ok_shared = T.alloc_shared((2, BI), T.int32, scope="shared")
            kvpos_shared = T.alloc_shared((2, BI), T.int32, scope="shared")
            alpha_shared = T.alloc_shared((HB,), T.float32)
            fac_shared = T.alloc_shared((2, HB), T.float32)
            acc_s = T.alloc_fragment((HB, BI), T.float32)
            acc_o_l = T.alloc_fragment((HB, DH), T.float32)
            acc_o_r = T.alloc_fragment((HB, DH), T.float32)
            m = T.alloc_fragment((HB,), T.float32)
            m_prev = T.alloc_fragment((HB,), T.float32)
            alpha = T.alloc_fragment((HB,), T.float32)
            l_sum = T.alloc_fragment((HB,), T.float32)
            row_sum = T.alloc_fragment((HB,), T.float32)
            lse2 = T.alloc_fragment((HB,), T.float32)
            k_ready = T.alloc_barrier(arrive_count=[128, 128])
            k_free = T.alloc_barrier(arrive_count=[256, 256])
            p_ready = T.alloc_barrier(arrive_count=256)
            p_free = T.alloc_barrier(arrive_count=256)
            fin = T.alloc_barrier(arrive_count=128)
            q_bar = T.alloc_barrier(arrive_count=384)
            src_local = T.alloc_local((NR,), T.int32)
            row_local = T.alloc_local((NR,), T.int32)
            pos_local = T.alloc_local((NR,), T.int32)
            idx_cur = T.alloc_local((NP,), T.int32)
            idx_nxt = T.alloc_local((NP,), T.int32)

            h0, sp, tq, lo, hi, n_iter = _query_tile(t, gens, b_i, s_i, bx, q_shared, q_bar, NHB, HB,
                                                     fixed_sb if split else None)
            tx = T.get_thread_binding()

            if tx < 128:
                T.set_max_nreg(240, 1)
                T.barrier_wait(q_bar, 0)
                T.fill(acc_o_l, 0)
                T.fill(l_sum, 0)
                T.fill(m, NEG_BIG)
                for it in T.serial(n_iter):
                    for st in T.unroll(2):
                        T.barrier_wait(k_ready[st], it & 1)
                        T.fill(acc_s, 0)
                        T.gemm(q_shared, kv_shared[st, :, :], acc_s, transpose_B=True)
                        # [HB, D] @ [D, BI] -> [HB, BI]
                        mask(acc_s, ok_shared, kvpos_shared, st, b_i, h0, tq)
                        if it * 2 + st > 0:
                            T.barrier_arrive(p_free)
                            T.barrier_wait(p_free, ((it * 2 + st) & 1) ^ 1)
                        T.copy(m, m_prev)
                        T.reduce_max(acc_s, m, dim=1, clear=False)  # m = max(m, rowmax(acc_s))  [HB]
                        for h in T.Parallel(HB):
                            alpha[h] = ex2(m_prev[h] - m[h])
                        exponentiate(acc_s, m, alpha, row_sum, l_sum, acc_o_l)
                        T.copy(alpha, alpha_shared)
                        T.copy(acc_s, p_shared)
                        T.gemm(p_shared, kv_shared[st, :, 0:DH], acc_o_l)  # [HB, BI] @ [BI, D/2] -> [HB, D/2]
                        T.barrier_arrive(p_ready)
                        T.barrier_arrive(k_free[st])
                # epilogue factors: inv_l, then (split) done or (direct) w and 1/den as in the combine
                for h in T.Parallel(HB):
                    epilogue_factors(t, h0, h, l_sum, m, lse2, alpha, m_prev, row_sum)
                for h in T.Parallel(HB):
                    row_sum[h] = m_prev[h] * row_sum[h]  # w / (w + sink): the combine's weight of a lone split
                    fac_shared[0, h] = alpha[h]
                    fac_shared[1, h] = row_sum[h]
                T.barrier_arrive(fin)
                if split:
                    for h, d in T.Parallel(HB, DH):
                        t["o_part"][b_i, s_i, sp, h0 + h, d] = acc_o_l[h, d] * alpha[h]
                    for h in T.Parallel(HB):
                        t["lse_part"][b_i, s_i, sp, h0 + h] = lse2[h]
                else:
                    for h, d in T.Parallel(HB, DH):
                        q_shared[h, d] = T.cast(acc_o_l[h, d] * alpha[h] * row_sum[h], T.bfloat16)
                    T.copy(q_shared[:, 0:DH], t["o"][b_i, s_i, h0 : h0 + HB, 0:DH])
                    if spec.return_lse:
                        for h in T.Parallel(HB):
                            t["lse"][b_i, s_i, h0 + h] = lse2[h] * LN2
            elif tx >= 128 and tx < 256:
                T.set_max_nreg(168, 1)
                T.fill(acc_o_r, 0)
                for it in T.serial(n_iter):
                    for st in T.unroll(2):
                        T.barrier_arrive(p_ready)
                        T.barrier_wait(p_ready, (it * 2 + st) & 1)
                        for h, d in T.Parallel(HB, DH):
                            acc_o_r[h, d] = acc_o_r[h, d] * alpha_shared[h]
                        T.gemm(p_shared, kv_shared[st, :, DH:D], acc_o_r)  # [HB, BI] @ [BI, D/2] -> [HB, D/2]
                        T.barrier_arrive(k_free[st])
                        if it * 2 + st < n_iter * 2 - 1:
                            T.barrier_arrive(p_free)
                T.barrier_wait(fin, 0)
                if split:
                    for h, d in T.Parallel(HB, DH):
                        t["o_part"][b_i, s_i, sp, h0 + h, DH + d] = acc_o_r[h, d] * fac_shared[0, h]
                else:
                    for h, d in T.Parallel(HB, DH):
                        q_shared[h, DH + d] = T.cast(acc_o_r[h, d] * fac_shared[0, h] * fac_shared[1, h],
                                                     T.bfloat16)
                    T.copy(q_shared[:, DH:D], t["o"][b_i, s_i, h0 : h0 + HB, DH:D])
            elif tx >= 256:
                T.set_max_nreg(80, 0)
                produce(t, tx - 256, b_i, s_i, tq, lo, hi, n_iter, kv_shared, ok_shared, kvpos_shared, k_ready,
                        k_free, src_local, row_local, pos_local, idx_cur, idx_nxt)

    return _generated_prim_func(f"{spec.name}_{'split' if split else 'main'}_ws", arg_names, ann, body)


def _build_seesaw_program(spec: AttentionSpec, config: AttentionConfig, split: bool) -> Any:
    """Seesaw main program: 3 warpgroups, two consumers that do the same tensor-core work.

    Global key blocks come in pairs (stage 0: even block, stage 1: odd block; the producer is the
    one of the ``ws`` schedule, with a free/ready barrier per half of D). Consumer ``w`` owns half ``w``
    of D in the output and block ``2·it + w`` of each pair: it computes ``S_w = Q K_wᵀ`` over all of D
    (its own half of D first: that half was refilled first; both halves in one wgmma batch, the second half's barrier
    waited on while the first half's products run) and masks it. The running max is handed
    from consumer 0 (the leader) to consumer 1 (the follower): the leader takes ``m0`` (``m``, or ``rowmax S_0``
    where that passes ``m`` by more than :data:`RESCALE_SLACK`), runs its softmax, publishes ``m0`` and starts
    ``P_0 V_0[:, half 0]`` (P from registers); the follower takes ``m1`` from ``m0`` and ``rowmax S_1`` the same
    way, publishes it, runs its softmax, hands ``P_1`` over through shared
    memory and accumulates ``P_1 V_1[:, half 1]``; the leader then moves ``P_0``, its row sum and its
    accumulator to ``m1`` (one factor ``2^(m0 − m1)``), hands ``P_0`` over, and each consumer adds the
    peer's block, ``P_{1−w} V_{1−w}[:, half w]``. The two softmaxes are staggered, so one consumer's
    exponentials run while the other's GEMMs do. Half ``w`` of a stage is free once consumer ``w`` is done
    with it, so the producer refills ``K_w[:, half w]`` while consumer ``w`` still runs its second product.
    Each consumer keeps the row sum of its own blocks; the two are added at the end. When the block count is odd,
    the follower's block of the last pair is padding: both skip its GEMMs (the follower only rescales to the
    shared max), which gives the same bits as running them on its zero rows, all masked.
    With the slack, a row's max rarely moves after the first blocks, so its factors are 1 and a warp whose rows
    all have 1 skips the rescale of its accumulator (128 registers a thread) and of ``P_0``. Likewise, outside
    decode's window ring (:func:`mask_votes`), a block whose keys the producer's four warps all voted valid skips
    its mask, which would leave it as it is.
    Without a ``score_mod`` (and with a positive scale) the mask leaves the scores as raw ``Q·K``: row maxima are
    scaled once a row, and ``P = 2^(S·c − m)`` is one FFMA a score (``c`` = scale · log2 e).
    TileLang's automatic shared-memory syncs are off in this program: every buffer one warpgroup hands to another
    goes through an mbarrier, and the staged output, the one buffer a warpgroup's threads share among themselves,
    has explicit warpgroup syncs (named barriers 8 and 9).
    """
    (D, BI, HB, DH, NHB, fixed_sb, B, S, NS, gens, ann, arg_names, NR, NP, produce, mask, exponentiate,
     rescale, epilogue_factors) = _ws_setup(spec, config, split)
    assert HB == 64, "the seesaw schedule's lazy rescale reads a thread's two rows of a 64-row fragment"
    RING = config.pair_stages
    QT = config.query_tiles
    VOTES = mask_votes(spec)  # a fully valid block skips its mask
    PC = config.persistent_ctas  # > 0: that many CTAs (a head block each) share the queries, strided
    # a query's output path when a CTA walks several: step 0 the row-sum exchange, steps 1 … DH / BI the output's
    # chunks; EPI_PRE of them run before the next query's first QKᵀ is issued
    EPI_STEPS = 1 + DH // BI
    OVERLAP = config.overlap_epilogue
    EPI_POST_COLS = min(EPILOGUE_COLUMNS_AFTER_ISSUE // BI, DH // BI) * BI
    EPI_PRE = EPI_STEPS - EPI_POST_COLS // BI
    # a query's most block pairs (shape-only), the producer's loop bound a query with persistent CTAs
    max_pairs = T.ceildiv(sum(T.ceildiv(g.num_keys_max(), g.BI) for g in gens), 2)

    def walk(s_i):
        """CTA ``s_i``'s queries ``s0 + j·stride``: ``(s0, the consumers' count, the producer's count, stride, the
        producer's pair bound)``. ``query_tiles``: QT consecutive queries (the consumers skip those past S; no bound:
        the producer counts the pairs). Persistent CTAs: queries ``s_i, s_i + PC, …`` (strided, as a query's cost
        may grow with its position: HCA's compressed keys), a dynamic count, the producer's loop bounded by the
        count × a query's most pairs."""
        if PC:
            n_q = T.ceildiv(T.max(S - s_i, 0), PC)
            return s_i, n_q, n_q, PC, n_q * max_pairs
        return s_i * QT, QT, T.min(QT, S - s_i * QT), 1, None

    # no score_mod and a positive scale: the mask leaves Q·K raw and the exponent scales it (P = 2^(S·C − m))
    RAW = spec.score_mod is None and spec.softmax_scale > 0
    C = spec.softmax_scale * LOG2E if RAW else None

    def rowmax2(x):  # a raw row max in base-2 units
        return x if C is None else x * C

    @T.macro
    def load_q(t, b_i, s_q, h0, q_shared, q_bar):
        """query_tiles > 1: the follower's TMA load of query ``s_q``'s Q (its 128 threads arrive on ``q_bar``)."""
        T.tma_copy(t["q"][b_i, s_q, h0 : h0 + HB, :], q_shared, barrier=q_bar)
        T.barrier_arrive(q_bar)

    @T.macro
    def qk_issue(w, r0, ph, q_shared, kv_shared, k_ready, acc_s):
        """Consumer ``w``'s ``S_w = Q K_wᵀ`` of the pair at stage ``r0``, issued (not waited on): the two halves of D
        in one wgmma batch, the second half's barrier waited on while the first half's products run."""
        T.barrier_wait(k_ready[(r0 + w) * 2 + w], ph)
        T.wgmma_gemm(q_shared[:, w * DH : (w + 1) * DH], kv_shared[r0 + w, :, w * DH : (w + 1) * DH], acc_s,
                     transpose_B=True, clear_accum=True)
        T.barrier_wait(k_ready[(r0 + w) * 2 + 1 - w], ph)
        T.wgmma_gemm(q_shared[:, (1 - w) * DH : (2 - w) * DH],
                     kv_shared[r0 + w, :, (1 - w) * DH : (2 - w) * DH], acc_s, transpose_B=True)

    @T.macro
    def qk_mask(w, r0, b_i, h0, tq, ok_shared, kvpos_shared, acc_s):
        """The wait for :func:`qk_issue`'s products, then the mask of ``S_w`` ([HB, D] @ [D, BI] -> [HB, BI])."""
        T.wait_wgmma(0)
        T.warpgroup_fence_operand(acc_s, num_regs=HB * BI // 128)  # the fragment: a thread's registers
        mask(acc_s, ok_shared, kvpos_shared, r0 + w, b_i, h0, tq, raw=RAW, votes=VOTES)

    @T.macro
    def finish(t, w, b_i, s_q, h0, j, lo, hi, p_shared, sum_shared, fin, acc_o, m, m_prev, alpha, l_sum, row_sum,
               lse2, o_bf, deferred):
        """Several queries a CTA: steps ``lo … hi`` (Python ints) of consumer ``w``'s output path of query ``s_q``
        (turn ``j``). Step 0: the two row sums, added in the same order by both (in the slots of the turn's parity,
        so that the next query's never overwrite ones still being read), and the epilogue factors; steps 1 …
        DH / BI: the output's BI-column chunks. Q's buffer holds the next query's Q, so each chunk is staged in turn
        in this consumer's P slot (free: both consumers are past their last P·V, which step 0's barrier orders) and
        its staging slot, and one chunk's store reads shared memory while the next is staged; the last step also
        waits for the stores' reads (the P slot is written again in the next query's first pair). ``deferred``: the
        path is run in two calls around the next query's first QKᵀ issue (steps ``0 … EPI_PRE`` and
        ``EPI_PRE …``); the first converts the second's columns into ``o_bf``, which the second stages."""
        if lo == 0:
            sb = (j & 1) * 2
            T.copy(l_sum, sum_shared[sb + w, :])
            T.barrier_arrive(fin)
            T.barrier_wait(fin, j & 1)
            for h in T.Parallel(HB):
                l_sum[h] = sum_shared[sb, h] + sum_shared[sb + 1, h]
                epilogue_factors(t, h0, h, l_sum, m, lse2, alpha, m_prev, row_sum)
            for h in T.Parallel(HB):
                row_sum[h] = m_prev[h] * row_sum[h]  # w / (w + sink): the combine's weight of a lone split
            if deferred and EPI_POST_COLS > 0:
                for h, d in T.Parallel(HB, EPI_POST_COLS):
                    o_bf[h, d] = T.cast(acc_o[h, DH - EPI_POST_COLS + d] * alpha[h] * row_sum[h], T.bfloat16)
        for i in list(range(max(lo, 1) - 1, hi - 1)):  # (a Python list: unrolled as the program is written)
            c = i * BI
            slot = w + 2 * (i % 2)
            if i >= 2:
                if T.shuffle_elect(128):
                    T.tma_store_wait(1)  # the store of chunk i - 2 has read this slot
                T.sync_threads(8 + w, 128)
            if deferred and c >= DH - EPI_POST_COLS:
                for h, d in T.Parallel(HB, BI):
                    p_shared[slot, h, d] = o_bf[h, c - (DH - EPI_POST_COLS) + d]
            else:
                for h, d in T.Parallel(HB, BI):
                    p_shared[slot, h, d] = T.cast(acc_o[h, c + d] * alpha[h] * row_sum[h], T.bfloat16)
            T.sync_threads(8 + w, 128)  # the chunk is staged
            if T.shuffle_elect(128):  # the thread that waits on the stores is the one that issued them
                T.fence_proxy_async()
                T.tma_copy(p_shared[slot, :, :], t["o"][b_i, s_q, h0 : h0 + HB, w * DH + c : w * DH + c + BI])
        if hi == EPI_STEPS:
            if T.shuffle_elect(128):
                T.tma_store_wait(0)
            T.sync_threads(8 + w, 128)
            if spec.return_lse and w == 0:
                for h in T.Parallel(HB):
                    t["lse"][b_i, s_q, h0 + h] = lse2[h] * LN2

    @T.macro
    def consume(t, w, b_i, s_i, sp, h0, tq, n_iter, n_blocks, q_shared, kv_shared, p_shared, ok_shared,
                kvpos_shared, max_shared, sum_shared, q_bar, k_ready, k_free, s_ready, p_ready, fin, acc_s, p_local,
                acc_o, m, m_prev, alpha, l_sum, row_sum, lse2, g0=None, j=None, next_q=None, s_prev=None, o_bf=None):
        # query_tiles > 1 / persistent CTAs: g0 block pairs walked for the CTA's earlier queries, j this query's turn
        # (the parity of the once-a-query barriers), next_q (exists, its query index) the query whose Q the follower
        # loads once both consumers are past this query's last QKᵀ. With overlap_epilogue (``late``), s_prev is the
        # previous query's index: its output path runs in this query's first pair, around the issue of the first QKᵀ
        # (``finish``; the walk runs the last query's)
        late = j is not None and OVERLAP
        if not late:
            T.barrier_wait(q_bar, 0 if j is None else j & 1)
            T.fill(acc_o, 0)
            T.fill(l_sum, 0)
            T.fill(m, NEG_BIG)
        for it in T.serial(n_iter):
            # the follower's block of an odd block count's last pair is padding: its GEMMs are skipped
            second = it * 2 + 1 < n_blocks  # the pair's second (the follower's) block is a real one
            real = w == 0 or second
            # the pair's first stage in the ring, the parity of its barriers
            r0, ph = _ring_slot(_cta_pair(it, g0), RING)
            # late: a query's first P·V into acc_o starts it afresh (the previous query's output path has read it in
            # this pair; a reset of its 128 registers in the loop would cost as many instructions every pair). Its
            # lazy rescales before that product only scale what the product then discards.
            fresh = it == 0 if late else False
            if not late:
                if real:
                    qk_issue(w, r0, ph, q_shared, kv_shared, k_ready, acc_s)
                    qk_mask(w, r0, b_i, h0, tq, ok_shared, kvpos_shared, acc_s)
                else:  # padding: no key (what the mask makes of its zero rows)
                    T.barrier_wait(k_ready[(r0 + w) * 2 + w], ph)
                    T.barrier_wait(k_ready[(r0 + w) * 2 + 1 - w], ph)
                    T.fill(acc_s, -T.infinity(T.float32))
            else:
                if it == 0:
                    if j > 0:  # the previous query's output path, its first steps
                        finish(t, w, b_i, s_prev, h0, j - 1, 0, EPI_PRE, p_shared, sum_shared, fin, acc_o, m,
                               m_prev, alpha, l_sum, row_sum, lse2, o_bf, True)
                    T.barrier_wait(q_bar, j & 1)
                # the rest while this query's first QKᵀ is on the tensor cores (written in both branches: a join
                # between the issue and the wait would move acc_s, and ptxas would wait for the products there)
                if real:
                    qk_issue(w, r0, ph, q_shared, kv_shared, k_ready, acc_s)
                    if it == 0:
                        if j > 0:
                            finish(t, w, b_i, s_prev, h0, j - 1, EPI_PRE, EPI_STEPS, p_shared, sum_shared, fin, acc_o,
                                   m, m_prev, alpha, l_sum, row_sum, lse2, o_bf, True)
                    qk_mask(w, r0, b_i, h0, tq, ok_shared, kvpos_shared, acc_s)
                else:
                    T.barrier_wait(k_ready[(r0 + w) * 2 + w], ph)
                    T.barrier_wait(k_ready[(r0 + w) * 2 + 1 - w], ph)
                    if it == 0:
                        if j > 0:
                            finish(t, w, b_i, s_prev, h0, j - 1, EPI_PRE, EPI_STEPS, p_shared, sum_shared, fin, acc_o,
                                   m, m_prev, alpha, l_sum, row_sum, lse2, o_bf, True)
                    T.fill(acc_s, -T.infinity(T.float32))
                if it == 0:
                    T.fill(l_sum, 0)
                    T.fill(m, NEG_BIG)
            if w == 0:
                # leader: its own running max first (m0); the follower's max arrives later
                T.reduce_max(acc_s, row_sum, dim=1)  # row_sum = rowmax(S_0)  [HB]
                for h in T.Parallel(HB):
                    m_prev[h] = m[h]
                    m[h] = _lazy_max(m_prev[h], rowmax2(row_sum[h]))  # m0
                    alpha[h] = ex2(m_prev[h] - m[h])
                exponentiate(acc_s, m, alpha, row_sum, l_sum, acc_o, lazy=True, c=C)
                T.copy(m, max_shared[0, :])
                T.barrier_arrive(s_ready[0])
                T.copy(acc_s, p_local)
                T.gemm(p_local, kv_shared[r0, :, 0:DH], acc_o, clear_accum=fresh)  # [HB, BI] @ [BI, D/2] -> [HB, D/2]
                T.barrier_arrive(k_free[r0 * 2])
                # the follower's max m1 >= m0: P_0 for the peer and everything accumulated move to m1
                T.barrier_wait(s_ready[1], _cta_pair(it, g0) & 1)
                for h in T.Parallel(HB):
                    alpha[h] = ex2(m[h] - max_shared[1, h])
                    m[h] = max_shared[1, h]
                rescale.rows(alpha, acc_s, BI, True)
                T.copy(acc_s, p_shared[0, :, :])
                T.fence_proxy_async()  # P_0 is read by the peer's tensor-core GEMM
                T.barrier_arrive(p_ready[0])
                rescale(alpha, l_sum, acc_o, lazy=True)
            else:
                # follower: m1 (from m0 and rowmax S_1), the max both use from here on
                T.reduce_max(acc_s, row_sum, dim=1)  # row_sum = rowmax(S_1)  [HB]
                T.barrier_wait(s_ready[0], _cta_pair(it, g0) & 1)
                if next_q is not None:
                    # the leader's QKᵀ of this pair is done (it published m0 after it), and so is this one's: after the
                    # query's last pair, Q's buffer takes the next query's Q
                    if T.And(it == n_iter - 1, next_q[0]):
                        load_q(t, b_i, next_q[1], h0, q_shared, q_bar)
                for h in T.Parallel(HB):
                    m_prev[h] = m[h]
                    m[h] = _lazy_max(max_shared[0, h], rowmax2(row_sum[h]))
                    alpha[h] = ex2(m_prev[h] - m[h])
                T.copy(m, max_shared[1, :])
                T.barrier_arrive(s_ready[1])
                if second:
                    exponentiate(acc_s, m, alpha, row_sum, l_sum, acc_o, lazy=True, c=C)
                    T.copy(acc_s, p_local)
                    T.copy(p_local, p_shared[1, :, :])
                    T.fence_proxy_async()  # P_1 is read by the peer's tensor-core GEMM
                    T.barrier_arrive(p_ready[1])
                    T.gemm(p_local, kv_shared[r0 + 1, :, DH:D], acc_o, clear_accum=fresh)  # [HB, BI] @ [BI, D/2]
                else:  # padding: P_1 = 0, only the rescale to the shared max
                    T.barrier_arrive(p_ready[1])
                    rescale(alpha, l_sum, acc_o, lazy=True)
                T.barrier_arrive(k_free[(r0 + 1) * 2 + 1])
            T.barrier_wait(p_ready[1 - w], _cta_pair(it, g0) & 1)
            if w == 1 or second:  # the leader adds P_1 V_1 of a real block only
                # (the follower's peer product is its first of a query whose first pair has a padding block)
                T.gemm(p_shared[1 - w, :, :], kv_shared[r0 + 1 - w, :, w * DH : (w + 1) * DH], acc_o,
                       clear_accum=T.And(fresh, T.Not(second)) if late and w == 1 else False)
            T.barrier_arrive(k_free[(r0 + 1 - w) * 2 + w])
        if j is None:
            # the two row sums, added in the same order by both; then the epilogue factors
            T.copy(l_sum, sum_shared[w, :])
            T.barrier_arrive(fin)
            T.barrier_wait(fin, 0)
            for h in T.Parallel(HB):
                l_sum[h] = sum_shared[0, h] + sum_shared[1, h]
                epilogue_factors(t, h0, h, l_sum, m, lse2, alpha, m_prev, row_sum)
            if split:
                for h, d in T.Parallel(HB, DH):
                    t["o_part"][b_i, s_i, sp, h0 + h, w * DH + d] = acc_o[h, d] * alpha[h]
                if w == 0:
                    for h in T.Parallel(HB):
                        t["lse_part"][b_i, s_i, sp, h0 + h] = lse2[h]
            else:
                for h in T.Parallel(HB):
                    row_sum[h] = m_prev[h] * row_sum[h]  # w / (w + sink): the combine's weight of a lone split
                for h, d in T.Parallel(HB, DH):
                    q_shared[h, w * DH + d] = T.cast(acc_o[h, d] * alpha[h] * row_sum[h], T.bfloat16)
                T.sync_threads(8 + w, 128)  # the warpgroup's staged output is complete (no automatic syncs)
                T.copy(q_shared[:, w * DH : (w + 1) * DH], t["o"][b_i, s_i, h0 : h0 + HB, w * DH : (w + 1) * DH])
                if spec.return_lse and w == 0:
                    for h in T.Parallel(HB):
                        t["lse"][b_i, s_i, h0 + h] = lse2[h] * LN2
        elif not late:
            finish(t, w, b_i, s_i, h0, j, 0, EPI_STEPS, p_shared, sum_shared, fin, acc_o, m, m_prev, alpha, l_sum,
                   row_sum, lse2, None, False)

    @T.macro
    def consumer_walk(t, w, s0, n_q, stride, bound, bx, b_i, q_shared, kv_shared, p_shared, ok_shared, kvpos_shared,
                      max_shared, sum_shared, q_bar, k_ready, k_free, s_ready, p_ready, fin, acc_s, p_local, acc_o, m,
                      m_prev, alpha, l_sum, row_sum, lse2, o_bf):
        """query_tiles > 1 or persistent CTAs: consumer ``w`` runs the CTA's queries ``s0 + j·stride``, ``j < n_q``,
        in turn (``bound`` given: persistent CTAs, ``n_q`` a dynamic count that may be 0). The next query's position
        is loaded a query ahead, so that its key-block count is known when its turn comes. The follower loads every
        Q: the first before its first query, each next one once both consumers are past the last QKᵀ."""
        h0 = (bx % NHB) * HB
        g0 = T.alloc_var(T.int32, init=0)  # block pairs walked so far
        tq = T.alloc_var(T.int32)
        tq_next = T.alloc_var(T.int32)
        tq_next = t["positions"][b_i, _first_query(s0, S, bound)]
        if w == 1:
            if _live(n_q > 0, bound):
                load_q(t, b_i, s0, h0, q_shared, q_bar)
        if OVERLAP:  # (a query's state is reset in its first pair, after the previous query's output path read it)
            T.fill(acc_o, 0)
            T.fill(l_sum, 0)
            T.fill(m, NEG_BIG)
        for j in T.serial(n_q):
            sq = s0 + j * stride
            if sq < S:
                tq = tq_next
                has_next = T.And(j + 1 < n_q, sq + stride < S)
                if has_next:
                    tq_next = t["positions"][b_i, sq + stride]
                lo, hi = _block_range(t, gens, b_i, tq, 0, None)
                n_iter = T.ceildiv(hi - lo, 2)
                # (every query walks at least one pair: the build asks for a window or an index list, so the
                # previous query's output path always has a first pair to run in)
                consume(t, w, b_i, sq, 0, h0, tq, n_iter, hi - lo, q_shared, kv_shared, p_shared, ok_shared,
                        kvpos_shared, max_shared, sum_shared, q_bar, k_ready, k_free, s_ready, p_ready, fin, acc_s,
                        p_local, acc_o, m, m_prev, alpha, l_sum, row_sum, lse2, g0, j,
                        (has_next, sq + stride) if w == 1 else None, sq - stride, o_bf)
                if w == 1:
                    if T.And(n_iter == 0, has_next):  # no pair walked, no QKᵀ: the next Q now
                        load_q(t, b_i, sq + stride, h0, q_shared, q_bar)
                g0 = g0 + n_iter
        if OVERLAP:  # the last query's output path
            n_valid = T.min(n_q, T.ceildiv(T.max(S - s0, 0), stride))
            if n_valid > 0:
                finish(t, w, b_i, s0 + (n_valid - 1) * stride, h0, n_valid - 1, 0, EPI_STEPS, p_shared, sum_shared,
                       fin, acc_o, m, m_prev, alpha, l_sum, row_sum, lse2, o_bf, False)

    @T.macro
    def one_query(t, s_i, bx, b_i, q_shared, kv_shared, p_shared, ok_shared, kvpos_shared, max_shared, sum_shared,
                  q_bar, k_ready, k_free, s_ready, p_ready, fin, acc_s_0, acc_s_1, p_local_0, p_local_1, acc_o_0,
                  acc_o_1, m_0, m_1, m_prev_0, m_prev_1, alpha_0, alpha_1, l_sum_0, l_sum_1, row_sum_0, row_sum_1,
                  lse2_0, lse2_1, src_local, row_local, pos_local, idx_cur, idx_nxt):
        h0, sp, tq, lo, hi, n_iter = _query_tile(t, gens, b_i, s_i, bx, q_shared, q_bar, NHB, HB,
                                                 fixed_sb if split else None)
        tx = T.get_thread_binding()

        if tx < 128:
            T.set_max_nreg(216, 1)
            consume(t, 0, b_i, s_i, sp, h0, tq, n_iter, hi - lo, q_shared, kv_shared, p_shared, ok_shared,
                    kvpos_shared, max_shared, sum_shared, q_bar, k_ready, k_free, s_ready, p_ready, fin, acc_s_0,
                    p_local_0, acc_o_0, m_0, m_prev_0, alpha_0, l_sum_0, row_sum_0, lse2_0)
        elif tx >= 128 and tx < 256:
            T.set_max_nreg(216, 1)
            consume(t, 1, b_i, s_i, sp, h0, tq, n_iter, hi - lo, q_shared, kv_shared, p_shared, ok_shared,
                    kvpos_shared, max_shared, sum_shared, q_bar, k_ready, k_free, s_ready, p_ready, fin, acc_s_1,
                    p_local_1, acc_o_1, m_1, m_prev_1, alpha_1, l_sum_1, row_sum_1, lse2_1)
        elif tx >= 256:
            T.set_max_nreg(72, 0)  # 2 x 216 + 72 = 504 = 3 x 168: the launch allocation, redistributed
            produce(t, tx - 256, b_i, s_i, tq, lo, hi, n_iter, kv_shared, ok_shared, kvpos_shared, k_ready,
                    k_free, src_local, row_local, pos_local, idx_cur, idx_nxt)

    @T.macro
    def body(t):
        # (the grid's first extent written inline: a named local would rename S in the program's signature)
        with T.Kernel(PC if PC else (S if QT == 1 else T.ceildiv(S, QT)), NHB * NS, B, threads=384) as (s_i, bx, b_i):
            # ex2 / rcp / lg2 approx; the lazy rescale's test; the producer warps' votes
            T.import_source(FAST_SOURCE + ANY_NE1_SOURCE + (WARP_ALL_SOURCE if VOTES else ""))
            # mbarriers order every hand-over between warpgroups; the only shared buffer a warpgroup's own threads
            # hand to each other is its staged output (explicit syncs above)
            T.annotate_pass_configs({"tl.disable_thread_storage_sync": True})
            q_shared = T.alloc_shared((HB, D), T.bfloat16)
            kv_shared = T.alloc_shared((2 * RING, BI, D), T.bfloat16)
            # [2, HB, BI] P hand-over slots; with several queries a CTA also two staging slots of the output
            p_shared = T.alloc_shared((2 if QT == 1 and not PC else 4, HB, BI), T.bfloat16)
            # a stage's key validity (then, with mask_votes, the producer warps' votes that all their keys are valid)
            ok_shared = T.alloc_shared((2 * RING, BI + (_PRODUCER_WARPS if VOTES else 0)), T.int32, scope="shared")
            kvpos_shared = T.alloc_shared((2 * RING, BI), T.int32, scope="shared")
            max_shared = T.alloc_shared((2, HB), T.float32)
            sum_shared = T.alloc_shared((2 if QT == 1 and not PC else 4, HB), T.float32)
            acc_s_0 = T.alloc_fragment((HB, BI), T.float32)
            acc_s_1 = T.alloc_fragment((HB, BI), T.float32)
            p_local_0 = T.alloc_fragment((HB, BI), T.bfloat16)
            p_local_1 = T.alloc_fragment((HB, BI), T.bfloat16)
            acc_o_0 = T.alloc_fragment((HB, DH), T.float32)
            acc_o_1 = T.alloc_fragment((HB, DH), T.float32)
            m_0 = T.alloc_fragment((HB,), T.float32)
            m_1 = T.alloc_fragment((HB,), T.float32)
            m_prev_0 = T.alloc_fragment((HB,), T.float32)
            m_prev_1 = T.alloc_fragment((HB,), T.float32)
            alpha_0 = T.alloc_fragment((HB,), T.float32)
            alpha_1 = T.alloc_fragment((HB,), T.float32)
            l_sum_0 = T.alloc_fragment((HB,), T.float32)
            l_sum_1 = T.alloc_fragment((HB,), T.float32)
            row_sum_0 = T.alloc_fragment((HB,), T.float32)
            row_sum_1 = T.alloc_fragment((HB,), T.float32)
            lse2_0 = T.alloc_fragment((HB,), T.float32)
            lse2_1 = T.alloc_fragment((HB,), T.float32)
            k_ready = T.alloc_barrier(arrive_count=[128] * (4 * RING))  # [2·stage + half of D]
            k_free = T.alloc_barrier(arrive_count=[128] * (4 * RING))
            s_ready = T.alloc_barrier(arrive_count=[128, 128])
            p_ready = T.alloc_barrier(arrive_count=[128, 128])
            fin = T.alloc_barrier(arrive_count=256)
            q_bar = T.alloc_barrier(arrive_count=384 if QT == 1 and not PC else 128)
            src_local = T.alloc_local((2 * NR,), T.int32)
            row_local = T.alloc_local((2 * NR,), T.int32)
            pos_local = T.alloc_local((2 * NR,), T.int32)
            idx_cur = T.alloc_local((NP,), T.int32)
            idx_nxt = T.alloc_local((NP,), T.int32)

            if PC or QT > 1:
                # overlap_epilogue: a consumer's last output columns in bf16 (see finish)
                o_bf_0 = T.alloc_fragment((HB, max(EPI_POST_COLS, BI)), T.bfloat16) if OVERLAP else None
                o_bf_1 = T.alloc_fragment((HB, max(EPI_POST_COLS, BI)), T.bfloat16) if OVERLAP else None
                tx = T.get_thread_binding()
                s0, n_c, n_p, stride, bound = walk(s_i)
                if tx < 128:
                    T.set_max_nreg(216, 1)
                    consumer_walk(t, 0, s0, n_c, stride, bound, bx, b_i, q_shared, kv_shared, p_shared, ok_shared,
                                  kvpos_shared, max_shared, sum_shared, q_bar, k_ready, k_free, s_ready, p_ready, fin,
                                  acc_s_0, p_local_0, acc_o_0, m_0, m_prev_0, alpha_0, l_sum_0, row_sum_0, lse2_0,
                                  o_bf_0)
                elif tx >= 128 and tx < 256:
                    T.set_max_nreg(216, 1)
                    consumer_walk(t, 1, s0, n_c, stride, bound, bx, b_i, q_shared, kv_shared, p_shared, ok_shared,
                                  kvpos_shared, max_shared, sum_shared, q_bar, k_ready, k_free, s_ready, p_ready, fin,
                                  acc_s_1, p_local_1, acc_o_1, m_1, m_prev_1, alpha_1, l_sum_1, row_sum_1, lse2_1,
                                  o_bf_1)
                elif tx >= 256:
                    T.set_max_nreg(72, 0)
                    # the key blocks of the CTA's queries, gathered into the ring as one sequence of pairs
                    produce.tiles(t, tx - 256, b_i, s0, n_p, S, lambda tq: _block_range(t, gens, b_i, tq, 0, None)[1],
                                  kv_shared, ok_shared, kvpos_shared, k_ready, k_free, src_local, row_local, pos_local,
                                  idx_cur, idx_nxt, bound, stride)
            else:
                one_query(t, s_i, bx, b_i, q_shared, kv_shared, p_shared, ok_shared, kvpos_shared, max_shared,
                          sum_shared, q_bar, k_ready, k_free, s_ready, p_ready, fin, acc_s_0, acc_s_1, p_local_0,
                          p_local_1, acc_o_0, acc_o_1, m_0, m_1, m_prev_0, m_prev_1, alpha_0, alpha_1, l_sum_0,
                          l_sum_1, row_sum_0, row_sum_1, lse2_0, lse2_1, src_local, row_local, pos_local, idx_cur,
                          idx_nxt)

    return _generated_prim_func(f"{spec.name}_{'split' if split else 'main'}_seesaw", arg_names, ann, body)


def build_combine_program(spec: AttentionSpec, threads: int = 128) -> Any:
    """Merge ``o_part``/``lse_part`` over splits (fixed order), add the sink, write bf16 ``o`` (+ lse)."""
    H, D = spec.heads, spec.head_dim
    HC = 4  # heads per CTA
    B, S, NS = T.dynamic("B"), T.dynamic("S"), T.dynamic("NS")
    ann: dict[str, Any] = {}
    names = []
    if spec.sink:
        ann["sink"] = T.Tensor[(H,), T.float32]
        names.append("sink")
    ann["o_part"] = T.Tensor[(B, S, NS, H, D), T.float32]
    ann["lse_part"] = T.Tensor[(B, S, NS, H), T.float32]
    ann["o"] = T.Tensor[(B, S, H, D), T.bfloat16]
    names += ["o_part", "lse_part", "o"]
    if spec.return_lse:
        ann["lse"] = T.Tensor[(B, S, H), T.float32]
        names.append("lse")

    def split_weight(t, b_i, s_i, k, h0, h, mx):
        """2^(lse_k − max) of split k (0 for a split with no key)."""
        lse_k = t["lse_part"][b_i, s_i, k, T.min(h0 + h, H - 1)]
        return T.if_then_else(lse_k == -T.infinity(T.float32), 0.0, ex2(lse_k - mx[h]))

    @T.macro
    def body(t):
        with T.Kernel(S, T.ceildiv(H, HC), B, threads=threads) as (s_i, hb, b_i):
            T.import_source(FAST_SOURCE)  # the epilogue's rcp / lg2 / ex2, as in the main programs
            acc = T.alloc_fragment((HC, D), T.float32)
            mx = T.alloc_fragment((HC,), T.float32)
            w = T.alloc_fragment((HC,), T.float32)
            lsum = T.alloc_fragment((HC,), T.float32)
            inv = T.alloc_fragment((HC,), T.float32)
            o_local = T.alloc_fragment((HC, D), T.bfloat16)
            h0 = hb * HC
            for h in T.Parallel(HC):
                if spec.sink:
                    mx[h] = t["sink"][T.min(h0 + h, H - 1)] * LOG2E
                else:
                    mx[h] = -T.infinity(T.float32)
            for k in T.serial(NS):
                for h in T.Parallel(HC):
                    mx[h] = T.max(mx[h], t["lse_part"][b_i, s_i, k, T.min(h0 + h, H - 1)])
            T.fill(lsum, 0)
            for k in T.serial(NS):
                for h in T.Parallel(HC):
                    lsum[h] = lsum[h] + split_weight(t, b_i, s_i, k, h0, h, mx)
            for h in T.Parallel(HC):
                if spec.sink:
                    den = lsum[h] + ex2(t["sink"][T.min(h0 + h, H - 1)] * LOG2E - mx[h])
                else:
                    den = lsum[h]
                inv[h] = T.if_then_else(lsum[h] > 0, rcp(den), 0.0)
            # the weights normalised first, so that a lone split gives the one-pass epilogue's bits:
            # (o·(1/l)) · (w · 1/(w + sink))
            T.fill(acc, 0)
            for k in T.serial(NS):
                for h in T.Parallel(HC):
                    w[h] = split_weight(t, b_i, s_i, k, h0, h, mx) * inv[h]
                for h, d in T.Parallel(HC, D):
                    acc[h, d] = acc[h, d] + w[h] * t["o_part"][b_i, s_i, k, T.min(h0 + h, H - 1), d]
            for h, d in T.Parallel(HC, D):
                o_local[h, d] = T.cast(acc[h, d], T.bfloat16)
            T.copy(o_local, t["o"][b_i, s_i, h0 : h0 + HC, :])
            if spec.return_lse:
                for h in T.Parallel(HC):
                    if h0 + h < H:
                        t["lse"][b_i, s_i, h0 + h] = T.if_then_else(
                            lsum[h] > 0, (mx[h] + lg2(lsum[h])) * LN2, -T.infinity(T.float32)
                        )

    return _generated_prim_func(f"{spec.name}_combine", names, ann, body)

