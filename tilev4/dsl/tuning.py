"""The DSL's config space: which :class:`~tilev4.dsl.codegen.AttentionConfig` knobs the autotuner
may vary for a spec, which values build, and the shared memory they take.

What each schedule really uses (checked by lowering and compiling for sm_90a and comparing the
CUDA sources):

* ``block_kv`` (keys per block): every schedule. Candidates 64 (default), 32, 16 — each divides 64,
  so every split size of whole 64-key blocks is whole blocks of it. The warp-specialised producer moves 16 rows per pass
  (a multiple of 16); in the simple schedule the QKᵀ GEMM ``[HB, D] @ [D, BI]`` must split over
  the CTA's warps in tiles of 16 rows × 8 columns (e.g. 16 heads × 32 keys cannot feed 8 warps).
* ``threads``: the simple schedule's CTA size, 256 (default) or 128 — 128 only while the
  ``[HB, D]`` fp32 output accumulator stays within 128 registers per thread. The warp-specialised
  schedule always runs 384 threads (two consumer warpgroups and a producer): ignored there.
* ``num_stages``: not tuned. The warp-specialised schedule has a fixed 2-stage buffer; in the
  simple schedule the gather is a predicated element-wise copy, which TileLang's pipeliner does
  not multi-buffer (1 and 2 stages give the same CUDA source up to buffer names).
* ``schedule``: for 64-head CTAs with D = 512, ``seesaw`` (default) or ``ws`` (see
  :class:`~tilev4.dsl.codegen.AttentionConfig`); measured on the H200, ``seesaw`` is ahead on CSA and HCA
  prefill (7-12 %) and level with ``ws`` on CSA decode. Pinned to the default where the simple schedule runs
  and for the combine.
* ``pair_stages``: block pairs in the ``seesaw`` schedule's key buffer, 1 (default) or 2 (a ring: the producer
  gathers pair ``it + 1`` while the consumers work on pair ``it``; fits in shared memory with ``block_kv`` <= 32).
  Measured on the H200 against one pair of 64-key blocks: CSA decode (b = 64) 0.0324 vs 0.0345 ms, but CSA
  and HCA prefill 8-13 % slower (32-key blocks halve the GEMM sizes); one pair of 32-key blocks: 0.0396 ms.
  Pinned to 1 for the other schedules and the combine.
* ``query_tiles`` (not tuned: a builder parameter that :func:`why_invalid` checks): consecutive queries a ``seesaw``
  main-program CTA walks (the next query's Q and first key blocks load while the consumers finish a query: same
  bits). It pays only when a launch has many CTAs a SM, which the tuning harness's bucket shapes do not have, so
  the ops choose it per launch (:mod:`tilev4.kernels.attention`). Measured on the H200 against 1 (A/B, one
  process, the benchmark's inputs), 2 / 4: HCA prefill 0.95 / 0.93, sparse k = 512 0.94 / 0.91, V4-Flash CSA
  prefill 0.97 / 0.99, V4-Pro CSA prefill (two head blocks) 1.02 / 1.03. Main programs with a window or an index
  list only (every query walks a key block); the batch-invariant split of a main program's config ignores it.
* ``persistent_ctas`` (not tuned either, same rules): a fixed number of seesaw main-program CTAs a head block that
  walk every query, strided (:class:`~tilev4.dsl.codegen.AttentionConfig`); the ops use the device's SM count from
  :data:`tilev4.kernels.attention.PERSISTENT_QUERIES_PER_SM` queries an SM a sequence on.
* ``combine_threads``: the combine program's CTA size, 128 (default), 256 or 64 (the combine is
  element-wise over 4 heads × D, the splits merged in a serial loop; any size dividing 4·D builds).

A knob that a program does not use is pinned to its default (``threads`` under the
warp-specialised schedule, ``block_kv``/``threads`` for the combine, ``combine_threads`` for the
main and split programs), so that the tuner never builds and times one program twice.

``block_kv`` must divide the split size: a split program's own ``split_keys``, and for the main
program the batch-invariant split size, because the split of a long row runs the main kernel's
config in that mode (so that a row that fits in one split gets the same bits from either program).

:func:`config_space` turns this into the :class:`~tilev4.autotune.space.Space` of a registry kernel
built with the DSL; its problem keys name the program ``kind`` and, for a split, ``split_keys``.
"""

from collections.abc import Callable, Mapping
from typing import Any

from tilev4.dsl.codegen import AttentionConfig, head_block, ws_supported
from tilev4.dsl.runtime import BATCH_INVARIANT_SPLIT_KEYS
from tilev4.dsl.spec import AttentionSpec, IndexList, Window

__all__ = [
    "CANDIDATES",
    "KINDS",
    "MAX_ACC_REGISTERS",
    "config_from",
    "config_space",
    "schedule_of",
    "smem_bytes",
    "why_invalid",
]

KINDS = ("main", "split", "combine")
CANDIDATES: dict[str, tuple[int, ...]] = {
    "block_kv": (64, 32, 16),
    "threads": (256, 128),
    "combine_threads": (128, 256, 64),
    "schedule": ("seesaw", "ws"),
    "pair_stages": (1, 2),
}
"""Tunable knob → candidate values, the default first (canonical order of the tuner)."""

MAX_ACC_REGISTERS = 128  # fp32 registers per thread for the [HB, D] output accumulator (simple schedule)
_DEFAULT = AttentionConfig()


def schedule_of(spec: AttentionSpec, config: AttentionConfig) -> str:
    """The schedule ``build_main_program`` uses: ``seesaw`` or ``ws`` when asked for and supported, else ``simple``."""
    return config.schedule if config.schedule in ("ws", "seesaw") and ws_supported(spec) else "simple"


def _gemm_partition(m: int, n: int, warps: int) -> bool:
    """Whether ``warps`` warps can each own a multiple of 16 rows × 8 columns of an ``m × n`` tile."""
    return any(warps % mw == 0 and m % (16 * mw) == 0 and n % (8 * (warps // mw)) == 0
               for mw in range(1, warps + 1))


def why_invalid(spec: AttentionSpec, config: AttentionConfig, kind: str) -> str | None:
    """Why ``config`` must not be built (or tuned) for program ``kind`` of ``spec``, or None."""
    if kind not in KINDS:
        return f"kind must be one of {KINDS}, got {kind!r}"
    if config.schedule != _DEFAULT.schedule and (kind == "combine" or not ws_supported(spec)):
        return ("schedule is not used by the combine program" if kind == "combine" else
                f"schedule={config.schedule!r} needs 64-head CTAs and D = 512 (this spec runs the simple schedule)")
    if config.pair_stages != 1 and (kind == "combine" or schedule_of(spec, config) != "seesaw"):
        return (f"pair_stages={config.pair_stages} is not used by the combine program" if kind == "combine" else
                f"pair_stages={config.pair_stages} needs the seesaw schedule "
                f"(this config runs {schedule_of(spec, config)!r})")
    if config.query_tiles != 1 or config.persistent_ctas:
        # the batch-invariant split shares the main program's config (its bucket) and ignores the knobs: it walks one
        # query a CTA (see AttentionKernel.plan)
        walk = config.walk_name()
        shared = kind == "split" and config.split_keys == BATCH_INVARIANT_SPLIT_KEYS
        if not (kind == "main" or shared) or schedule_of(spec, config) != "seesaw":
            return f"{walk} needs the seesaw main program (kind={kind!r}, schedule {schedule_of(spec, config)!r})"
        if not any(isinstance(s, (Window, IndexList)) for s in spec.sources):
            return f"{walk} needs a window or an index-list source"
    if kind == "combine":
        if (config.block_kv, config.threads) != (_DEFAULT.block_kv, _DEFAULT.threads):
            return "block_kv and threads are not used by the combine program"
        if (4 * spec.head_dim) % config.combine_threads:
            return f"combine_threads={config.combine_threads} does not divide 4 heads x D={spec.head_dim}"
        return None
    if config.combine_threads != _DEFAULT.combine_threads:
        return "combine_threads is used by the combine program only"
    bi = config.block_kv
    keys = config.split_keys if kind == "split" else BATCH_INVARIANT_SPLIT_KEYS
    if keys % bi:
        return f"block_kv={bi} does not divide the split size of {keys} keys"
    if schedule_of(spec, config) != "simple":
        if config.threads != _DEFAULT.threads:
            return "threads is not used by the warp-specialised schedule (384 threads)"
        return None if bi % 16 == 0 else f"block_kv={bi}: the producer moves 16 rows per pass"
    hb, warps = head_block(spec.heads), config.threads // 32
    if not _gemm_partition(hb, bi, warps):
        return f"QK^T [{hb}, {bi}] cannot be split over {warps} warps in 16x8 tiles"
    regs = hb * spec.head_dim // config.threads
    if regs > MAX_ACC_REGISTERS:
        return f"the [{hb}, {spec.head_dim}] accumulator needs {regs} fp32 registers per thread > {MAX_ACC_REGISTERS}"
    return None


def smem_bytes(spec: AttentionSpec, config: AttentionConfig, kind: str) -> int:
    """Shared memory of one CTA as the program allocates it (TileLang may overlap buffers: an upper bound)."""
    if kind == "combine":
        return 0  # fragments only
    hb, d, bi = head_block(spec.heads), spec.head_dim, config.block_kv
    if schedule_of(spec, config) == "seesaw":
        # Q, the 2-stage KV buffer, P of both stages, per-key flags/positions, row max and row sum exchange
        # (several queries a CTA: also the output's two staging slots, and the row sums of two queries)
        several = config.query_tiles > 1 or config.persistent_ctas > 0
        slots, sums = (4, 4) if several else (2, 2)
        return (hb * d * 2 + 2 * config.pair_stages * (bi * d * 2 + 2 * bi * 4) + slots * hb * bi * 2 + 2 * hb * 4
                + sums * hb * 4)
    if schedule_of(spec, config) == "ws":
        # Q, the 2-stage KV buffer, P, per-key flags/positions of both stages, rescale factors
        return hb * d * 2 + 2 * bi * d * 2 + hb * bi * 2 + 2 * 2 * bi * 4 + 4 * hb * 4
    # Q, one KV tile, P, the bf16 output tile, per-key row/flag/position
    return hb * d * 2 + bi * d * 2 + hb * bi * 2 + hb * d * 2 + 3 * bi * 4


def config_from(values: Mapping[str, Any]) -> AttentionConfig:
    """The AttentionConfig of a registry config (the tunable knobs and ``split_keys`` present in ``values``)."""
    keys = ("block_kv", "threads", "combine_threads", "split_keys", "schedule", "pair_stages", "query_tiles",
            "persistent_ctas", "overlap_epilogue")
    return AttentionConfig(**{k: values[k] for k in keys if k in values})


def config_space(spec_of: Callable[[Mapping[str, Any]], AttentionSpec]) -> Any:
    """The autotuner's :class:`~tilev4.autotune.space.Space` for a registry kernel built with the DSL.

    ``spec_of`` maps a full config (problem + tunables) to the spec; the config also holds
    ``kind`` and, for a split, ``split_keys``. Constraints and shared memory are :func:`why_invalid`
    and :func:`smem_bytes`.
    """
    from tilev4.autotune.space import Space

    def constraint(c: Mapping[str, Any]) -> str | None:
        return why_invalid(spec_of(c), config_from(c), c["kind"])

    def smem(c: Mapping[str, Any]) -> int:
        return smem_bytes(spec_of(c), config_from(c), c["kind"])

    return Space(params=CANDIDATES, constraints=(constraint,), smem_bytes=smem)
