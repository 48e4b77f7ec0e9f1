"""Tuning spaces, shape buckets and harnesses of the MoE kernels and ``fp8_linear``.

Every space lists the factory defaults first (they are the heuristic), so an untuned GPU runs what ran
before and a tuned config differs only where it measured faster. Candidates kept per bucket (sm_90a):

================  =====================================================  ==============================  ====
kernel            tunables                                               bucket                          kept
================  =====================================================  ==============================  ====
moe_up            schedule ws/pipelined · block_n 128/64 · stages 4/3    grouped|dense, dim range        8
moe_down          schedule ws/pipelined · block_n 256/128 · stages 4/3   grouped|dense, inter range      8
moe_up_fp8        block_n 128/64 · stages 3/2/4                          dim range                       6
moe_down_fp8      block_n 256/128 · stages 4/3/2                         inter range                     6
moe_up_fp4        schedule ws/pipelined · block_n 64/32 · stages 4/3 ·   dim range                       6
                  packed stages 4/6 (ws)
moe_down_fp4      schedule ws/pipelined · block_n 128/64 · stages 4/3 ·  inter range                     8
                  packed stages 4/6 (ws, block_n 128)
fp8_linear        block_m 64/128 · block_n 128/64 · stages 4/3           K range                         8
moe_gate          block_k 32/64 · block_e 256/128 · stages 2/3           E range                         4-5
moe_combine       threads 128/256/64/512                                 dim range                       3-4
================  =====================================================  ==============================  ====

``threads`` of the GEMMs is listed as 256/128 but follows ``block_m`` (one warpgroup per 64-row wgmma slab,
the FullRow layout of every GEMM here), so it adds no candidate; the ``ws`` schedule (the default of the bf16
and FP8 expert GEMMs, :mod:`tilev4.kernels.moe_ws`) always runs 384 threads — a TMA producer warpgroup and one
consumer warpgroup per 64 rows — and ignores it. ``moe_count`` / ``moe_scan`` /
``moe_scatter`` are not tuned (see their factories in :mod:`tilev4.kernels.moe`).

**block_m of the grouped GEMMs is a problem key.** The permutation's tile table (``tile_offsets`` /
``tile_info``, made by ``moe_scan``) is built for one M tile, and a harness sees only the problem, never
the candidate's tunables; so ``block_m`` is not tuned: the ops compile each grouped GEMM for the permutation's
``perm.block_m`` (``BLOCK_M``) and the harness builds its tables for the problem's ``block_m``. The dense
variants share the factory and keep it too.

**Static pruning.** Shared memory: the sum of every buffer (the pipelined copies × ``num_stages``), each padded
to 1 KiB — TileLang may overlap buffers whose lifetimes are disjoint, so this is an upper bound, exact for
the grouped bf16 up-projection (the largest: 230,400 B at its default). Registers: at most
:data:`MAX_ACC_PER_THREAD` fp32 accumulator elements a thread. Pipeline depth: at most
:data:`MAX_PREFETCH_BYTES` of K per row in flight (a 128-wide bf16 K tile runs 2 stages, a 64-wide one up to
4). K tiles: no ``block_k`` that leaves a partial last K tile where the default leaves none. FP8 weight
scales: ``block_n`` divides 128 (one scale per tile), or is 256 for the ``ws`` FP8 down-projection (two halves of
one scale each).

**Harnesses.** Random inputs on the tuner's device from its CPU generator, scaled as in
``tests/test_moe_gpu.py``. The grouped GEMMs get rows already sorted by expert (:data:`HARNESS_EXPERTS`
experts, skewed counts, one expert empty, so that tiles are partial) with the offsets and tile tables the op
builds; ``batch_slice`` takes rows ``[start, stop)`` of that order and rebuilds the offsets and tables for
them, so a sub-batch must give those rows of the full output bit for bit. The run-time N extent (inter for
an up-projection, dim for a down-projection, the out features of ``fp8_linear``) is the V4 partner of the
static K (:data:`V4_MOE_SHAPES`). References are float64 math on the inputs as the kernel reads them
(dequantised FP8 / expanded FP4 weights, dequantised FP8 activations).

**Tolerances** (derived as in ``tests/test_moe_gpu.py``; NaN never passes): a GEMM output may differ from
the reference by its accumulation bound plus one bf16 rounding (none for fp32 outputs),
``acc · Σ|a_k·b_k| + 2⁻⁸·|ref| + 1e-6`` —
``acc = 2⁻¹⁰`` for the FP8 tensor cores' block sums (``FP8_ACC``), ``acc = ⌈K/16⌉·2⁻²³`` for bf16 wgmma
with fp32 accumulation (one truncation per 16-term step, the derivation of the gate's ``SCORE_TOL``, with the
partial sums bounded by Σ|products|) — carried through the SwiGLU for the up-projections
(``|∂h/∂gate| <= 1.1·|up|·w``, ``|∂h/∂up| = |silu(gate)|·w``). The gate's scores get the same step bound
(three split GEMMs, ``ds/dlogit <= 0.5``) plus the test's relative 1e-4 and mean-error limit; its expert
ids must be the exact top-k of the kernel's own scores and differ from the reference only at near-ties,
its weights follow from its own scores. The combine is checked bit for bit (fp32 adds in slot order).
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from tilev4.autotune.harness import TuningCase, TuningHarness
from tilev4.autotune.space import Space
from tilev4.kernels.moe_ws import HALF_M, ws_buffer_bytes

__all__ = [
    "FP8_LINEAR_HARNESS",
    "FP8_LINEAR_SPACE",
    "HARNESS_EXPERTS",
    "MOE_COMBINE_HARNESS",
    "MOE_COMBINE_SPACE",
    "MOE_DOWN_FP4_HARNESS",
    "MOE_DOWN_FP4_SPACE",
    "MOE_DOWN_FP8_HARNESS",
    "MOE_DOWN_FP8_SPACE",
    "MOE_DOWN_HARNESS",
    "MOE_DOWN_SPACE",
    "MOE_GATE_HARNESS",
    "MOE_GATE_SPACE",
    "MOE_UP_FP4_HARNESS",
    "MOE_UP_FP4_SPACE",
    "MOE_UP_FP8_HARNESS",
    "MOE_UP_FP8_SPACE",
    "MOE_UP_HARNESS",
    "MOE_UP_SPACE",
    "V4_MOE_SHAPES",
    "Bounded",
    "RowCase",
    "Selection",
    "bf16_acc",
    "check_bounded",
    "combine_bucket",
    "down_bucket",
    "fp8_linear_bucket",
    "gate_bucket",
    "slice_rows",
    "tile_tables",
    "up_bucket",
]

# ---------------------------------------------------------------------------------------------------- shapes

V4_MOE_SHAPES = ((4096, 2048), (7168, 3072), (1024, 256), (256, 128))  # (dim, inter): Config flash, pro, small, tiny
HARNESS_EXPERTS = 32  # routed experts of a grouped-GEMM case: 512 rows give ~16 a expert, 8192 give ~256
GEMM_ROWS = (512, 8192)  # sorted (or dense) rows timed per problem
TOKENS = (64, 8192)  # tokens timed for the gate, the combine and fp8_linear (rows)
GATE_VOCAB = 1000  # rows of a hash layer's table in a case
ROUTED_LIMIT = 10.0  # V4's swiglu_limit (routed experts); the shared expert does not clamp
SCALE_BLOCK = 128  # FP8 / FP4 K block (one activation and one weight scale per 128 along K)

# -------------------------------------------------------------------------------------------- static pruning

SMEM_ALIGN = 1024  # TileLang places shared buffers at 1 KiB boundaries (upper bound)
MAX_ACC_PER_THREAD = 192  # fp32 accumulator elements a thread (of 255 registers; the FP8 up default: 3 × 64)
MAX_PREFETCH_BYTES = 512  # K bytes per row in flight (num_stages × block_k × element size)

# ---------------------------------------------------------------------------------- tolerances (test_moe_gpu)

OUT_ROUNDING = 2.0**-8  # one bf16 rounding (2^-9) with a factor 2 for the fp32 summation order
ABS_FLOOR = 1e-6
FP8_ACC = 2.0**-10  # FP8 tensor-core block sum, relative to Σ|products|
TC_STEP, F32_TRUNC = 16, 2.0**-23  # bf16 wgmma: one fp32 truncation per 16-term step
SILU_SLOPE = 1.1  # max |silu'|
SCORE_RTOL = 1e-4  # fp32 softplus / sqrt
SCORE_MEAN_ERR = 5e-5  # tells an exact 3×bf16 split from a gate weight rounded to bf16
NEAR_TIE = 2 * 3e-4  # two keys this close may come out in either order
WEIGHT_RTOL = 2e-6  # the same fp32 ops on the same scores, sum of k values reordered
WEIGHT_REF_TOL = (1e-5, 1e-4)  # (atol, rtol) against the reference weights where the ids agree


def bf16_acc(k: int) -> float:
    """Accumulation bound of a bf16 wgmma GEMM with fp32 accumulation over K = k, relative to Σ|products|."""
    return math.ceil(k / TC_STEP) * F32_TRUNC


def _pad(nbytes: int) -> int:
    return -(-nbytes // SMEM_ALIGN) * SMEM_ALIGN


def _smem(*buffers: int) -> int:
    return sum(_pad(b) for b in buffers)


def _warpgroup_rows(c: Mapping[str, Any]) -> str | None:
    if c.get("schedule") == "ws" and c["block_m"] == 192:
        return None  # the three-consumer ws program sets its own 512 threads (``threads`` is not read)
    if c["threads"] != 2 * c["block_m"]:
        return f"threads={c['threads']} != 2·block_m={2 * c['block_m']} (one warpgroup per 64 rows)"
    return None


def _accumulators(tiles: float) -> Callable[[Mapping[str, Any]], str | None]:
    """At most MAX_ACC_PER_THREAD fp32 accumulator elements a thread for ``tiles`` [block_m, block_n] tiles."""

    def check(c: Mapping[str, Any]) -> str | None:
        # the ws programs run one consumer warpgroup per 64 rows whatever ``threads`` says
        threads = 2 * c["block_m"] if c.get("schedule") == "ws" else c["threads"]
        per_thread = int(tiles * c["block_m"] * c["block_n"]) // threads
        if per_thread > MAX_ACC_PER_THREAD:
            return f"{per_thread} fp32 accumulators a thread > {MAX_ACC_PER_THREAD}"
        return None

    return check


def _prefetch(elem_bytes: int, block_k: int | None = None) -> Callable[[Mapping[str, Any]], str | None]:
    """At most MAX_PREFETCH_BYTES of K per row in flight (``block_k`` None: the config's)."""

    def check(c: Mapping[str, Any]) -> str | None:
        depth = c["num_stages"] * (block_k or c["block_k"]) * elem_bytes
        if depth > MAX_PREFETCH_BYTES:
            return f"{depth} B of K a row in flight > {MAX_PREFETCH_BYTES}"
        return None

    return check


def _k_tiles(k_key: str, default_block_k: int) -> Callable[[Mapping[str, Any]], str | None]:
    """No partial last K tile where the default block_k has none."""

    def check(c: Mapping[str, Any]) -> str | None:
        k = c[k_key]
        if k % c["block_k"] and not k % default_block_k:
            return f"block_k={c['block_k']} leaves a partial K tile of {k_key}={k}"
        return None

    return check


def _scale_block_n(c: Mapping[str, Any]) -> str | None:
    if SCALE_BLOCK % c["block_n"]:
        return f"block_n={c['block_n']} does not divide {SCALE_BLOCK} (one weight scale per tile)"
    return None


def _fp8_down_tile(c: Mapping[str, Any]) -> str | None:
    """FP8 down-projection: one weight scale per tile, or (``ws`` schedule) two 128-column halves of one each, whose
    two accumulators and one scratch are the up-projection's three [block_m, 128] tiles."""
    if c["block_n"] == 2 * SCALE_BLOCK:
        if c.get("schedule", "ws") != "ws":
            return f"block_n={c['block_n']} (two halves) needs the ws schedule, got {c['schedule']!r}"
        return _accumulators(1.5)(c)
    return _scale_block_n(c) or _accumulators(2)(c)  # acc, t


def _k_range(name: str, k: int, bounds: Sequence[int]) -> str:
    for b in bounds:
        if k <= b:
            return f"{name}<={b}"
    return f"{name}>{bounds[-1]}"


def _gemm_bucket(problem: Mapping[str, Any], k_name: str, bounds: Sequence[int]) -> str:
    from tilev4.kernels.moe import BLOCK_M

    parts = []
    if "dense" in problem:
        parts.append("dense" if problem["dense"] else "grouped")
    parts.append(_k_range(k_name, problem[k_name], bounds))
    if problem.get("block_m", BLOCK_M) != BLOCK_M:
        parts.append(f"block_m={problem['block_m']}")
    return ",".join(parts)


def up_bucket(problem: Mapping[str, Any]) -> str:
    """Up-projections (K = dim): grouped or dense, ``dim<=1024`` / ``dim<=4096`` / ``dim>4096``."""
    return _gemm_bucket(problem, "dim", (1024, 4096))


def down_bucket(problem: Mapping[str, Any]) -> str:
    """Down-projections (K = inter): grouped or dense, ``inter<=512`` / ``inter<=2048`` / ``inter>2048``."""
    return _gemm_bucket(problem, "inter", (512, 2048))


def fp8_linear_bucket(problem: Mapping[str, Any]) -> str:
    """``K<=1024`` / ``K<=4096`` / ``K>4096`` (the output dtype only changes the store)."""
    return _k_range("K", problem["K"], (1024, 4096))


def gate_bucket(problem: Mapping[str, Any]) -> str:
    """``E<=128`` (one GEMM pass whatever block_e) / ``E>128``; score and hash layers share a config."""
    return _k_range("E", problem["num_experts"], (128,))


def combine_bucket(problem: Mapping[str, Any]) -> str:
    """``dim<=1024`` / ``dim>1024``."""
    return _k_range("dim", problem["dim"], (1024,))


# ------------------------------------------------------------------------------------------------- spaces


def _ws_smem(c: Mapping[str, Any], weight_tiles: int, weighted: bool) -> int:
    """The ``ws`` schedule (tilev4.kernels.moe_ws): A slabs, weight tiles, staging tiles, routing weights."""
    return _smem(*ws_buffer_bytes(weight_tiles, weighted, c["block_n"], c["block_k"], c["num_stages"],
                                  c["block_m"]))


def _ws_192_chunks(columns_per_k: int) -> Callable[[Mapping[str, Any]], str | None]:
    """A 192-row ``ws`` tile stages its output in its A slabs, two ``block_k``-column chunks a weight tile (one slot
    each): ``block_n = columns_per_k · block_k`` and enough stages for the chunks (tilev4.kernels.moe_ws)."""

    def check(c: Mapping[str, Any]) -> str | None:
        if c["block_m"] != 192:
            return None
        if c.get("schedule") != "ws":
            return "192-row tiles need the ws schedule"
        if c["block_n"] != columns_per_k * c["block_k"] or c["num_stages"] < columns_per_k:
            return (f"a 192-row tile stages its output in its A slabs: block_n must be {columns_per_k}·block_k "
                    f"and num_stages >= {columns_per_k}")
        return None

    return check


def _moe_up_smem(c: Mapping[str, Any]) -> int:
    if c.get("schedule") == "ws":
        return _ws_smem(c, 2, not c.get("dense", False))
    bm, bn, bk, s = c["block_m"], c["block_n"], c["block_k"], c["num_stages"]
    return _smem(4 * bm, s * bm * bk * 2, s * bn * bk * 2, s * bn * bk * 2, bm * bn * 2)  # w, a, b1, b3, h


def _moe_down_smem(c: Mapping[str, Any]) -> int:
    if c.get("schedule") == "ws":
        return _ws_smem(c, 1, False)
    bm, bn, bk, s = c["block_m"], c["block_n"], c["block_k"], c["num_stages"]
    return _smem(s * bm * bk * 2, s * bn * bk * 2)  # a, b


def _fp8_up_smem(c: Mapping[str, Any]) -> int:
    bm, bn, s = c["block_m"], c["block_n"], c["num_stages"]
    # w, a, b1, b3, h
    return _smem(4 * bm, s * bm * SCALE_BLOCK, s * bn * SCALE_BLOCK, s * bn * SCALE_BLOCK, bm * bn * 2)


def _fp8_gemm_smem(c: Mapping[str, Any]) -> int:
    bm, bn, s = c["block_m"], c["block_n"], c["num_stages"]
    return _smem(s * bm * SCALE_BLOCK, s * bn * SCALE_BLOCK)  # a, b


def _fp4_ws_smem(c: Mapping[str, Any], sources: int, k: int) -> int:
    """The FP4 ``ws`` schedule (tilev4.kernels.moe_fp4): A slabs, expanded weight tiles, packed ring, the tile's scales,
    the rows' block scales, staging tiles, routing weights."""
    bn, s, ps = c["block_n"], c["num_stages"], c["packed_stages"]
    per_source = [s * bn * SCALE_BLOCK, ps * bn * SCALE_BLOCK // 2, bn * k // 32, s * bn * 4]
    return _smem(*[s * HALF_M * SCALE_BLOCK] * 2, *per_source * sources, *[HALF_M * bn * 2] * 2,
                 *([HALF_M * 4] * 2 if sources == 2 else []))


def _fp4_up_smem(c: Mapping[str, Any]) -> int:
    if c.get("schedule") == "ws":
        return _fp4_ws_smem(c, 2, c["dim"])
    bm, bn, s, ks = c["block_m"], c["block_n"], c["num_stages"], c["dim"] // 32
    # w, c (fp32 [bm, 2bn]), s1 + s3 (e8m0 [bn, K/32]), smax + sw, a, q1 + q3 (packed), b (expanded [2bn, 128])
    return _smem(4 * bm, bm * 2 * bn * 4, bn * ks, bn * ks, 2 * bn * 4, 2 * bn * 4, s * bm * SCALE_BLOCK,
                 s * bn * SCALE_BLOCK // 2, s * bn * SCALE_BLOCK // 2, 2 * bn * SCALE_BLOCK)


def _fp4_down_smem(c: Mapping[str, Any]) -> int:
    if c.get("schedule") == "ws":
        return _fp4_ws_smem(c, 1, c["inter"])
    bm, bn, s, ks = c["block_m"], c["block_n"], c["num_stages"], c["inter"] // 32
    # s (e8m0), smax + sw, a, q (packed), b (expanded)
    return _smem(bn * ks, bn * 4, bn * 4, s * bm * SCALE_BLOCK, s * bn * SCALE_BLOCK // 2, bn * SCALE_BLOCK)


_GEMM_THREADS = (256, 128)  # the one matching block_m is kept (_warpgroup_rows)
_FP4_PACKED = (4, 6)  # packed K blocks in flight (the FP4 ws schedule)
_FP4_WS_STEPS = 256  # threads of the FP4 ws kernels' two producer warpgroups (their default)


def _fp4_schedule(deep_block_n: int) -> Callable[[Mapping[str, Any]], str | None]:
    """FP4: the ``ws`` kernels' producer threads (two warpgroups) take ``4·block_n`` expansion steps a weight and K
    block in equal shares, and a packed ring deeper than the default is a candidate at ``deep_block_n`` only; the
    pipelined schedule reads no ``packed_stages`` and is a candidate at its default stages (a fallback: ~1.2x slower
    on the H200), so that a space keeps at most 8 candidates."""

    def check(c: Mapping[str, Any]) -> str | None:
        if c["schedule"] == "ws":
            if 4 * c["block_n"] % _FP4_WS_STEPS:
                return (f"block_n={c['block_n']}: the FP4 ws producers split 4·block_n expansion steps into shares of "
                        f"{_FP4_WS_STEPS}")
            if c["packed_stages"] != _FP4_PACKED[0] and c["block_n"] != deep_block_n:
                return f"packed_stages={c['packed_stages']} is a candidate with block_n={deep_block_n} only"
            return None
        if c["packed_stages"] != _FP4_PACKED[0] or c["num_stages"] != 4:
            return "the pipelined FP4 schedule is a candidate at packed_stages=4 (not read) and num_stages=4 only"
        return None

    return check
# bf16 expert GEMMs: tilev4.kernels.moe.GEMM_SCHEDULES (repeated: that module imports this one)
_GEMM_SCHEDULES = ("ws", "pipelined")

MOE_UP_SPACE = Space(
    params={"schedule": _GEMM_SCHEDULES, "block_n": (128, 64), "block_k": (64,), "num_stages": (4, 3),
            "threads": _GEMM_THREADS},
    constraints=(_warpgroup_rows, _accumulators(2), _prefetch(2), _k_tiles("dim", 64), _ws_192_chunks(2)),
    smem_bytes=_moe_up_smem,
)
MOE_DOWN_SPACE = Space(
    params={"schedule": _GEMM_SCHEDULES, "block_n": (256, 128), "block_k": (64,), "num_stages": (4, 3),
            "threads": _GEMM_THREADS},
    constraints=(_warpgroup_rows, _accumulators(1), _prefetch(2), _k_tiles("inter", 64), _ws_192_chunks(4)),
    smem_bytes=_moe_down_smem,
)
MOE_UP_FP8_SPACE = Space(
    params={"block_n": (128, 64), "num_stages": (3, 2, 4), "threads": _GEMM_THREADS},
    constraints=(_warpgroup_rows, _accumulators(3), _scale_block_n, _prefetch(1, SCALE_BLOCK)),  # gate, up, t
    smem_bytes=_fp8_up_smem,
)
MOE_DOWN_FP8_SPACE = Space(
    # block_n 64 (1.5x slower than 128 on the H200: benchmarks/logs/h200-2026-11-29-session6.md) is left out: a space
    # keeps at most 8 candidates
    params={"block_n": (256, 128), "num_stages": (4, 3, 2), "threads": _GEMM_THREADS},
    constraints=(_warpgroup_rows, _fp8_down_tile, _prefetch(1, SCALE_BLOCK)),
    smem_bytes=_fp8_gemm_smem,
)
MOE_UP_FP4_SPACE = Space(
    params={"schedule": _GEMM_SCHEDULES, "block_n": (64, 32), "num_stages": (4, 3), "packed_stages": _FP4_PACKED,
            "threads": _GEMM_THREADS},
    constraints=(_warpgroup_rows, _accumulators(4), _prefetch(1, SCALE_BLOCK), _fp4_schedule(64)),  # acc, t: 2·bn
    smem_bytes=_fp4_up_smem,
)
MOE_DOWN_FP4_SPACE = Space(
    params={"schedule": _GEMM_SCHEDULES, "block_n": (128, 64), "num_stages": (4, 3), "packed_stages": _FP4_PACKED,
            "threads": _GEMM_THREADS},
    constraints=(_warpgroup_rows, _accumulators(2), _prefetch(1, SCALE_BLOCK), _fp4_schedule(128)),
    smem_bytes=_fp4_down_smem,
)
FP8_LINEAR_SPACE = Space(
    params={"block_m": (64, 128), "block_n": (128, 64), "num_stages": (4, 3), "threads": (128, 256)},
    constraints=(_warpgroup_rows, _accumulators(2), _scale_block_n, _prefetch(1, SCALE_BLOCK)),
    smem_bytes=_fp8_gemm_smem,
)

GATE_BLOCK_E = 256  # the gate factory's default


def _gate_block_e(num_experts: int, block_e: int) -> int:
    return min(block_e, -(-num_experts // 16) * 16)


def _gate_same_kernel(c: Mapping[str, Any]) -> str | None:
    if c["block_e"] != GATE_BLOCK_E and _gate_block_e(c["num_experts"], c["block_e"]) == _gate_block_e(
            c["num_experts"], GATE_BLOCK_E):
        return f"block_e={c['block_e']} covers all {c['num_experts']} experts: the kernel of block_e={GATE_BLOCK_E}"
    return None


def _gate_smem(c: Mapping[str, Any]) -> int:
    e, bk, s, bt = c["num_experts"], c["block_k"], c["num_stages"], c["block_tokens"]
    be = _gate_block_e(e, c["block_e"])
    sp = e + 1 if e % 2 == 0 else e
    # x, w (fp32), hi, mid, lo, scores [bt, sp], bias
    return _smem(s * bt * bk * 2, s * be * bk * 4, be * bk * 2, be * bk * 2, be * bk * 2, bt * sp * 4, 4 * e)


MOE_GATE_SPACE = Space(
    params={"block_k": (32, 64), "block_e": (GATE_BLOCK_E, 128), "num_stages": (2, 3)},
    constraints=(_k_tiles("dim", 32), _gate_same_kernel),
    smem_bytes=_gate_smem,
)


def _combine_columns(dim: int) -> int:
    return min(1024, 1 << (dim - 1).bit_length())  # the combine factory's columns per pass


def _combine_threads(c: Mapping[str, Any]) -> str | None:
    bd = _combine_columns(c["dim"])
    if c["threads"] > bd or bd % c["threads"]:
        return f"threads={c['threads']} does not divide the {bd} columns of a pass"
    return None


MOE_COMBINE_SPACE = Space(params={"threads": (128, 256, 64, 512)}, constraints=(_combine_threads,))

# --------------------------------------------------------------------------------------------- cases


@dataclass
class RowCase(TuningCase):
    """A case whose run-time rows can be sliced: ``row_args`` are the indices of the row-batched inputs;
    grouped GEMMs also hold ``offsets, tile_offsets, tile_info`` from ``tables_at``, built for ``block_m``."""

    row_args: tuple[int, ...] = ()
    tables_at: int | None = None
    block_m: int = 0
    records: bool = False  # the tables hold tile_info (what every expert GEMM reads), not tile_expert


class Bounded(NamedTuple):
    """A reference output and the per-element bound on ``|out - ref|`` (float64, same shape)."""

    ref: torch.Tensor
    tol: torch.Tensor


class Selection(NamedTuple):
    """The gate's expected expert ids and what judging them needs: the reference keys ``s + bias`` [T, E] and
    the bias (None for a hash layer, whose ids are exact), and the route scale of the weights."""

    ref: torch.Tensor
    key: torch.Tensor | None
    bias: torch.Tensor | None
    route_scale: float


def tile_tables(counts: torch.Tensor, block_m: int, num_rows: int, records: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(offsets, tile_offsets, tile_expert)`` of rows sorted by expert with ``counts`` [E] rows each, as
    ``moe_scan`` builds them for ``block_m`` (``tile_expert`` sized as the op sizes it; unused entries -1); with
    ``records``, ``tile_info`` (each M tile's expert, the expert's first M tile, first row and rows; zeros past the
    last tile: what the expert GEMMs read, bf16, FP8 and FP4) in place of ``tile_expert``."""
    from tilev4.kernels.moe import _max_tiles
    from tilev4.kernels.moe_ws import tiles_of

    counts = counts.long()
    zero = torch.zeros(1, dtype=torch.long, device=counts.device)
    tiles = torch.tensor([tiles_of(c, block_m) for c in counts.tolist()], dtype=torch.long, device=counts.device)
    size = max(_max_tiles(num_rows, counts.numel(), block_m), 1)
    used = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), tiles)
    offsets, tile_offsets = torch.cat([zero, counts.cumsum(0)]), torch.cat([zero, tiles.cumsum(0)])
    if records:
        table = torch.zeros((size, 4), dtype=torch.int32, device=counts.device)
        table[: used.numel()] = torch.stack([used, tile_offsets[used], offsets[used], counts[used]], 1).int()
    else:
        table = torch.full((size,), -1, dtype=torch.int32, device=counts.device)
        table[: used.numel()] = used.int()
    return offsets.int(), tile_offsets.int(), table


def slice_rows(case: RowCase, start: int, stop: int) -> RowCase:
    """Rows ``[start, stop)`` of ``case``: its row-batched inputs, tables rebuilt for them, fresh outputs."""
    args = list(case.args)
    for i in case.row_args:
        args[i] = args[i][start:stop].clone()  # fresh, aligned storage
    for i in case.outputs:
        args[i] = torch.empty_like(args[i][start:stop])
    if case.tables_at is not None:
        j = case.tables_at
        sub = (args[j].long() - start).clamp(0, stop - start)
        args[j : j + 3] = tile_tables(sub.diff(), case.block_m, stop - start, case.records)
    return RowCase(tuple(args), case.outputs, None, stop - start, row_args=case.row_args, tables_at=case.tables_at,
                   block_m=case.block_m, records=case.records)


def _device_gen(gen: torch.Generator, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))


def _randn(shape: Sequence[int], g: torch.Generator, device: str, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, device=device) * scale


def _expert_counts(n: int, num_experts: int, g: torch.Generator, device: str) -> torch.Tensor:
    """Rows per expert for ``n`` rows: skewed (squared uniform weights), the last expert empty."""
    p = torch.rand(num_experts, generator=g, device=device) ** 2 + 1e-3
    p[-1] = 0.0
    return torch.bincount(torch.multinomial(p, n, replacement=True, generator=g), minlength=num_experts)


def _inter_of(dim: int) -> int:
    return dict(V4_MOE_SHAPES).get(dim, max(SCALE_BLOCK, dim // 2 // SCALE_BLOCK * SCALE_BLOCK))


def _dim_of(inter: int) -> int:
    return {i: d for d, i in V4_MOE_SHAPES}.get(inter, 2 * inter)


def _activations(kind: str, n: int, k: int, g: torch.Generator, device: str, scale: float
                 ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The kernel's activation inputs (bf16, or FP8 1×128 as ``fp8_quantize`` makes them) and their float64 values."""
    x = _randn((n, k), g, device, scale).bfloat16()
    if kind == "bf16":
        return (x,), x.double()
    from tilev4.reference.quant import fp8_e4m3_quantize

    q, s = fp8_e4m3_quantize(x, SCALE_BLOCK)
    return (q, s), q.double() * s.double().repeat_interleave(SCALE_BLOCK, -1)


def _weights(kind: str, e: int, n: int, k: int, g: torch.Generator, device: str
             ) -> tuple[tuple[torch.Tensor, ...], Callable[[int], torch.Tensor]]:
    """Stacked [e, n, k] weights as the kernel takes them (bf16, FP8 data + scale, FP4 data + scale) and
    expert → its float64 [n, k] values as the kernel uses them."""
    w = _randn((e, n, k), g, device, k**-0.5)
    if kind == "bf16":
        wb = w.bfloat16()
        return (wb,), lambda i: wb[i].double()
    if kind == "fp8":
        from tilev4.kernels.moe_fp8 import quantize_fp8_weight

        q = quantize_fp8_weight(w)
        return (q.data, q.scale), lambda i: q.data[i].double() * q.scale[i].double().repeat_interleave(
            SCALE_BLOCK, 0)[:n].repeat_interleave(SCALE_BLOCK, 1)[:, :k]
    from tilev4.kernels.moe_fp4 import FP4Weight, expand_fp4_weight, quantize_fp4_weight

    q4 = quantize_fp4_weight(w)
    return (q4.data, q4.scale), lambda i: expand_fp4_weight(FP4Weight(q4.data[i : i + 1],
                                                                      q4.scale[i : i + 1]))[0].double()


def _swiglu_ref(a: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, wts: torch.Tensor, limit: float, acc: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """h = silu(min(a·w1ᵀ, l)) · clamp(a·w3ᵀ, ±l) · w and its bound (float64)."""
    gate, up = a @ w1.T, a @ w3.T
    g, u = gate.clamp(max=limit), up.clamp(-limit, limit)
    h = torch.nn.functional.silu(g) * u * wts[:, None]
    dg, du = acc * (a.abs() @ w1.abs().T), acc * (a.abs() @ w3.abs().T)
    tol = (SILU_SLOPE * u.abs() * dg + torch.nn.functional.silu(g).abs() * du) * wts[:, None]
    return h, tol + OUT_ROUNDING * h.abs() + ABS_FLOOR


def _gemm_ref(a: torch.Tensor, w: torch.Tensor, acc: float, rounding: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y = a·wᵀ and its bound (float64)."""
    y = a @ w.T
    return y, acc * (a.abs() @ w.abs().T) + rounding * y.abs() + ABS_FLOOR


def _per_expert(offsets: Sequence[int], n: int, width: int, device: str,
                fn: Callable[[int, slice], tuple[torch.Tensor, torch.Tensor]]) -> Bounded:
    ref = torch.zeros(n, width, dtype=torch.float64, device=device)
    tol = torch.zeros(n, width, dtype=torch.float64, device=device)
    for e in range(len(offsets) - 1):
        if offsets[e + 1] > offsets[e]:
            rows = slice(offsets[e], offsets[e + 1])
            ref[rows], tol[rows] = fn(e, rows)
    return Bounded(ref, tol)


def _acc(kind: str, k: int) -> float:
    return bf16_acc(k) if kind == "bf16" else FP8_ACC


def _up_case(kind: str) -> Callable[..., RowCase]:
    """make_case of an up-projection (``kind``: bf16, fp8, fp4): problem ``dim`` (K), ``dense`` (bf16 only)."""

    def make(problem: Mapping[str, Any], n: int, gen: torch.Generator, device: str, reference: bool) -> RowCase:
        from tilev4.kernels.moe import NO_CLAMP

        dim, dense = problem["dim"], bool(problem.get("dense", False))
        inter, e = _inter_of(dim), 1 if dense else HARNESS_EXPERTS
        g = _device_gen(gen, device)
        act, a = _activations(kind, n, dim, g, device, 4.0)  # some gate / up logits pass the clamp at 10
        w1, deq1 = _weights(kind, e, inter, dim, g, device)
        w3, deq3 = _weights(kind, e, inter, dim, g, device)
        h = torch.empty(n, inter, dtype=torch.bfloat16, device=device)
        if dense:
            limit, offsets, wts = NO_CLAMP, [0, n], torch.ones(n, dtype=torch.float64, device=device)
            args, rows, tables_at = (*act, *w1, *w3, h, limit), (0,), None
        else:
            limit, counts = ROUTED_LIMIT, _expert_counts(n, e, g, device)
            w_sorted = torch.rand(n, generator=g, device=device) + 0.1
            tables = tile_tables(counts, problem["block_m"], n, records=True)
            offsets, wts = tables[0].tolist(), w_sorted.double()
            args = (*act, w_sorted, *w1, *w3, *tables, h, limit)
            rows, tables_at = tuple(range(len(act) + 1)), len(act) + 1 + len(w1) + len(w3)
        expected = None
        if reference:
            acc = _acc(kind, dim)
            expected = (_per_expert(offsets, n, inter, device,
                                    lambda i, r: _swiglu_ref(a[r], deq1(i), deq3(i), wts[r], limit, acc)),)
        return RowCase(args, (len(args) - 2,), expected, n, row_args=rows, tables_at=tables_at,
                       block_m=problem.get("block_m", 0), records=True)

    return make


def _down_case(kind: str) -> Callable[..., RowCase]:
    """make_case of a down-projection (``kind``: bf16, fp8, fp4): problem ``inter`` (K), ``dense`` (bf16 only)."""

    def make(problem: Mapping[str, Any], n: int, gen: torch.Generator, device: str, reference: bool) -> RowCase:
        inter, dense = problem["inter"], bool(problem.get("dense", False))
        dim, e = _dim_of(inter), 1 if dense else HARNESS_EXPERTS
        g = _device_gen(gen, device)
        act, a = _activations(kind, n, inter, g, device, 1.0)
        w2, deq2 = _weights(kind, e, dim, inter, g, device)
        y = torch.empty(n, dim, dtype=torch.bfloat16, device=device)
        if dense:
            offsets, args, tables_at = [0, n], (*act, *w2, y), None
        else:
            tables = tile_tables(_expert_counts(n, e, g, device), problem["block_m"], n, records=True)
            offsets, args, tables_at = tables[0].tolist(), (*act, *w2, *tables, y), len(act) + len(w2)
        expected = None
        if reference:
            acc = _acc(kind, inter)
            expected = (_per_expert(offsets, n, dim, device, lambda i, r: _gemm_ref(a[r], deq2(i), acc, OUT_ROUNDING)),)
        return RowCase(args, (len(args) - 1,), expected, n, row_args=tuple(range(len(act))), tables_at=tables_at,
                       block_m=problem.get("block_m", 0), records=True)

    return make


def _linear_case(problem: Mapping[str, Any], n: int, gen: torch.Generator, device: str, reference: bool) -> RowCase:
    """fp8_linear: x quantised 1×128, a square [K, K] FP8 weight."""
    k, out_dtype = problem["K"], getattr(torch, problem["out_dtype"])
    g = _device_gen(gen, device)
    act, a = _activations("fp8", n, k, g, device, 2.0)
    w, deq = _weights("fp8", 1, k, k, g, device)
    y = torch.empty(n, k, dtype=out_dtype, device=device)
    expected = None
    if reference:
        rounding = OUT_ROUNDING if out_dtype == torch.bfloat16 else 0.0
        expected = (Bounded(*_gemm_ref(a, deq(0), FP8_ACC, rounding)),)
    return RowCase((*act, *w, y), (4,), expected, n, row_args=(0, 1))


def check_bounded(outputs: tuple[torch.Tensor, ...], expected: tuple[Bounded, ...]) -> str | None:
    """Every output within its bound (NaN fails)."""
    for i, (out, exp) in enumerate(zip(outputs, expected)):
        o = out.double()
        if torch.isnan(o).any():
            return f"NaN in output {i}"
        excess = ((o - exp.ref).abs() - exp.tol).max().item()
        if excess > 0 or math.isnan(excess):
            return f"output {i} exceeds its accumulation + rounding bound by {excess:.3g}"
    return None


def _gemm_harness(make: Callable[..., RowCase], sizes: tuple[int, ...] = GEMM_ROWS, size_name: str = "rows"
                  ) -> TuningHarness:
    return TuningHarness(make, check_bounded, sizes=sizes, size_name=size_name, batch_slice=slice_rows)


MOE_UP_HARNESS = _gemm_harness(_up_case("bf16"))
MOE_DOWN_HARNESS = _gemm_harness(_down_case("bf16"))
MOE_UP_FP8_HARNESS = _gemm_harness(_up_case("fp8"))
MOE_DOWN_FP8_HARNESS = _gemm_harness(_down_case("fp8"))
MOE_UP_FP4_HARNESS = _gemm_harness(_up_case("fp4"))
MOE_DOWN_FP4_HARNESS = _gemm_harness(_down_case("fp4"))
FP8_LINEAR_HARNESS = _gemm_harness(_linear_case, TOKENS, "M")

# ---------------------------------------------------------------------------------------------- gate


def _gate_case(problem: Mapping[str, Any], n: int, gen: torch.Generator, device: str, reference: bool) -> RowCase:
    dim, e, k = problem["dim"], problem["num_experts"], problem["top_k"]
    g = _device_gen(gen, device)
    x = _randn((n, dim), g, device).bfloat16()
    weight = _randn((e, dim), g, device, dim**-0.5)  # logits ~ N(0, 1), as the GPU tests
    outs = (torch.empty(n, e, device=device), torch.empty(n, k, device=device),
            torch.empty(n, k, dtype=torch.int32, device=device))
    if problem["hash"]:
        tid2eid = torch.randint(0, e, (GATE_VOCAB, k), generator=g, device=device, dtype=torch.int32)
        token_ids = torch.randint(0, GATE_VOCAB, (n,), generator=g, device=device, dtype=torch.int32)
        args, rows, bias = (x, weight, tid2eid, token_ids, *outs), (0, 3), None
    else:
        bias = _randn((e,), g, device, 0.1)
        args, rows = (x, weight, bias, *outs), (0,)
    expected = None
    if reference:
        xd, wd = x.double(), weight.double()
        s_ref = torch.sqrt(torch.nn.functional.softplus(xd @ wd.T)).float()
        steps = 3 * math.ceil(dim / TC_STEP)  # three split GEMMs
        tol = 0.5 * steps * F32_TRUNC * (xd.abs() @ wd.abs().T) + SCORE_RTOL * s_ref.double().abs() + ABS_FLOOR
        key = None if bias is None else s_ref + bias
        ids = (tid2eid[token_ids.long()] if key is None
               else torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k].int())
        sel = s_ref.gather(1, ids.long())
        w_ref = sel / sel.sum(-1, keepdim=True) * problem["route_scale"]
        expected = (Bounded(s_ref, tol), w_ref, Selection(ids, key, bias, problem["route_scale"]))
    return RowCase(args, tuple(range(len(args) - 3, len(args))), expected, n, row_args=rows)


def _gate_check(outputs: tuple[torch.Tensor, ...], expected: tuple[Any, ...]) -> str | None:
    scores, weights, ids = outputs
    s_exp, w_ref, sel = expected
    if torch.isnan(weights).any():
        return "NaN in the weights"
    why = check_bounded((scores,), (s_exp,))
    if why:
        return f"scores: {why}"
    mean_err = (scores.double() - s_exp.ref.double()).abs().mean().item()
    if mean_err > SCORE_MEAN_ERR:
        return f"scores: mean error {mean_err:.3g} > {SCORE_MEAN_ERR} (a gate weight not split exactly?)"
    num_experts = scores.shape[1]
    if ((ids < 0) | (ids >= num_experts)).any():
        return "expert ids out of range"
    if sel.key is None:
        if not torch.equal(ids, sel.ref):
            return "expert ids differ from the hash table's"
        differ = torch.zeros_like(ids, dtype=torch.bool)
    else:
        own = torch.sort(scores + sel.bias, dim=-1, descending=True, stable=True).indices[:, : ids.shape[1]]
        if not torch.equal(ids.long(), own):
            return "expert ids are not the top-k of the kernel's own scores + bias (ties to the smaller id)"
        differ = ids != sel.ref
        if differ.any():
            gap = (sel.key.gather(1, ids.long()) - sel.key.gather(1, sel.ref.long())).abs()
            if (gap[differ] >= NEAR_TIE).any():
                return "an expert id differs from the reference away from a near-tie"
    picked = scores.gather(1, ids.long())
    own_w = picked / picked.sum(-1, keepdim=True) * sel.route_scale
    if ((weights - own_w).abs() > WEIGHT_RTOL * own_w.abs()).any():
        return "weights are not s_sel / Σ s_sel · route_scale of the kernel's own scores"
    same = ~differ.any(-1)
    atol, rtol = WEIGHT_REF_TOL
    if ((weights[same] - w_ref[same]).abs() > atol + rtol * w_ref[same].abs()).any():
        return "weights differ from the reference"
    return None


MOE_GATE_HARNESS = TuningHarness(_gate_case, _gate_check, sizes=TOKENS, size_name="T", batch_slice=slice_rows)

# ---------------------------------------------------------------------------------------------- combine


def _combine_case(problem: Mapping[str, Any], n: int, gen: torch.Generator, device: str, reference: bool
                  ) -> RowCase:
    dim, k, shared = problem["dim"], problem["top_k"], problem["has_shared"]
    out_dtype = getattr(torch, problem["out_dtype"])
    g = _device_gen(gen, device)
    y_sorted = _randn((n * k, dim), g, device).bfloat16()
    pair_pos = torch.randperm(n * k, generator=g, device=device).view(n, k).int()
    y_shared = _randn((n, dim), g, device).bfloat16() if shared else None
    out = torch.empty(n, dim, dtype=out_dtype, device=device)
    expected = None
    if reference:
        acc = torch.zeros(n, dim, device=device)
        for s in range(k):  # ((y_0 + y_1) + …) + y_shared in fp32, as the kernel
            acc = acc + y_sorted[pair_pos[:, s].long()].float()
        if y_shared is not None:
            acc = acc + y_shared.float()
        expected = (acc.to(out_dtype),)
    args = (y_sorted, pair_pos, out) if y_shared is None else (y_sorted, pair_pos, y_shared, out)
    return RowCase(args, (len(args) - 1,), expected, n, row_args=tuple(range(1, len(args) - 1)))


def _same_bits(outputs: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> str | None:
    for i, (out, ref) in enumerate(zip(outputs, expected)):
        bits = {2: torch.int16, 4: torch.int32}[out.element_size()]
        if out.dtype != ref.dtype or out.shape != ref.shape or not torch.equal(out.view(bits), ref.view(bits)):
            return f"output {i} differs from the fp32 slot-order sum (must be bit-exact)"
    return None


MOE_COMBINE_HARNESS = TuningHarness(_combine_case, _same_bits, sizes=TOKENS, size_name="T", batch_slice=slice_rows)
