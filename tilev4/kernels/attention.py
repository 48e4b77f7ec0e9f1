"""V4 attention: sparse (index list), CSA (window ∪ top-k) and HCA (window ∪ all compressed), built with the DSL.

Semantics (``shared/spec/deepseek-v4.md``, attention layer): MQA, one 512-dim vector per key is
both K and V; one online softmax over the union of the key sets; a per-head sink logit in the
denominator only, ``o = Σ e^{s_j−M} v_j / (Σ e^{s_j−M} + e^{sink−M})``; a query with no key
outputs 0. Scale defaults to ``512^-1/2``.

Dimension glossary: b batch, s queries per sequence, H heads, D = 512, n window/stream rows,
n_c compressed entries, k indices per query, W = 128 window.

Window layouts: **stream** (prefill) — ``kv_window`` [b, n, D] holds tokens at positions
``window_start[b] + i``; **ring** (decode, ``window_start=None``) — ``kv_window`` [b, R, D] holds
token ``p`` in slot ``p % R`` with ``R >= 128 + s − 1``.

Batch invariance: every CTA owns one (token, head block) and walks its keys in a fixed order, so a
row never depends on the others; the only batch-dependent choice is whether tiny batches are
split into 256- or 128-key pieces to fill the GPU. ``batch_invariant=True`` fixes the split SIZE at 2048
keys instead, and the split program runs the one-pass program's config; a row that fits in one
split gets identical bits from the one-pass kernel and from split + combine (the epilogues share
their arithmetic), so a row's output is the same for any batch size and position in the batch.
V4 CSA rows (640 or 1152 keys) and HCA rows (≤ 640 keys) always take the one-pass kernel.

Tuning: problem keys ``heads``, ``kind`` (main / split / combine), ``ring``, ``return_lse``,
``split_keys``; tunables ``block_kv``, ``threads``, ``schedule`` and ``pair_stages`` (main and split programs) and
``combine_threads``; ``query_tiles`` and ``persistent_ctas`` (main programs) are chosen per launch (see
:mod:`tilev4.dsl.tuning` for what each schedule uses and :mod:`tilev4.kernels.attention_tuning` for the buckets and
the harness). The ops resolve the config of every program they launch per GPU and size splits and workspaces from it.
"""

import dataclasses
import functools
from typing import Any

import torch

from tilev4._checks import check_tensor
from tilev4.dsl import AttentionConfig, AttentionKernel, AttentionSpec, CompressedDense, IndexList, Window
from tilev4.dsl.codegen import build_combine_program, build_main_program, head_block
from tilev4.dsl.runtime import BATCH_INVARIANT_SPLIT_KEYS, FINE_SPLIT_KEYS, OCCUPANCY_SPLIT_KEYS
from tilev4.dsl.tuning import config_from, why_invalid
from tilev4.kernels import attention_tuning as tuning
from tilev4.kernels.registry import compile_kernel, register, resolved_config

__all__ = ["csa_attention", "csa_spec", "hca_attention", "hca_spec", "sparse_attention", "sparse_spec",
           "variant_spec"]

WINDOW = 128
HCA_RATIO = 128
LONG_LAUNCH_QUERY_TILES = {"sparse": 4, "csa": 2, "hca": 8}
"""Queries a CTA of the one-pass program walks in a long launch, per variant (:meth:`_TunedAttention.tile_queries`).
Measured on the H200 against one query a CTA (A/B in one process, the benchmark's inputs), 2 / 4 queries: sparse
k = 512 0.94 / 0.91, V4-Flash CSA prefill 0.97 / 0.99, HCA prefill 0.95 / 0.93; V4-Pro CSA (two head blocks)
1.02 / 1.03, which is why it takes one head block. HCA prefill, 8 queries against 4: 0.99 (session 40; a query
there has ~3.5 block pairs, so its fixed costs weigh most)."""
LONG_LAUNCH_WAVES = 8  # ... and at least this many waves of such CTAs on the device's SMs
PERSISTENT_QUERIES_PER_SM = 2
"""From this many queries an SM in one sequence on, the one-pass program (one head block) runs one persistent CTA an
SM a sequence (``persistent_ctas`` = the device's SMs, each CTA walking every SM-count-th query of its sequence) for
every variant and key count, up to the long launches of :data:`LONG_LAUNCH_QUERY_TILES`; in those, only where
:data:`LONG_LAUNCH_PERSISTENT` says so. (A batch of short sequences keeps one query a CTA: the persistent grid holds
SM-count CTAs for each sequence.) H200, against one query a CTA (same bits;
``benchmarks/logs/h200-2026-12-01-session30.md`` and ``…-session31.md``), at 264 / 528 / 1024 / 2048 queries:

* sparse k = 512 0.95 / 0.91 / 0.90 / 0.91 (where 4 queries a CTA, which depends on how its CTAs fill the last wave,
  gave 1.58 / 0.90 / 0.91 / 0.93), k = 192 0.93 / 0.88 / 0.83 / 0.83, k = 128 0.91 / 0.82 / 0.80 / 0.83 (k = 64,
  1024 queries: 0.77);
* V4-Flash CSA (128 + 512 keys) 0.98 / 0.96 / 0.99 / 0.99 (128 + 128 keys, 2048 queries: 0.86);
* HCA at position 65 536 (128 + 512 keys) 0.98 / 0.96 / 0.95 / 0.96 (4096 queries: 0.96)."""
LONG_LAUNCH_PERSISTENT = {"sparse": 4}
"""Variants whose long launches (:data:`LONG_LAUNCH_QUERY_TILES`) also take persistent CTAs, where a query has at
least this many 64-key blocks. H200, against the long launches' ``query_tiles`` programs (4096 queries unless said):

* sparse k = 256 0.94, 384 0.95, 512 0.96 (16384 queries: 0.95), 1024 0.98, 2048 0.99, but k = 128 1.02 (16384:
  1.10), so those keep 4 queries a CTA;
* V4-Flash CSA 1.00 to 1.02 (8192 queries 1.02, 16384 1.04), HCA prefill from position 0 (65 536 queries) 0.99 to
  1.01, HCA at position 65 536 (8192 / 16384 queries) 0.97 / 0.99: within a few per cent either way, so they keep
  their ``query_tiles`` programs (CSA with 128 + 128 keys: 0.93 to 0.96, not a V4 shape);
* V4-Pro (two head blocks; 66 or 132 CTAs a head block) 1.06: persistent CTAs are for one head block only."""
SHIPPED_SMS = 132  # the SM count of the GPU the shipped persistent programs are built for (H100 / H200 SXM)
_KINDS = ("main", "split", "combine")


LONG_LAUNCH_OVERLAP = frozenset({"hca", "sparse"})
"""Variants whose long launches' :data:`LONG_LAUNCH_QUERY_TILES` program also runs a query's output path around the
next query's first QKᵀ (``overlap_epilogue``). H200, A/B in one process, same bits
(``benchmarks/logs/h200-2026-12-02-session45.md``): HCA prefill from position 0 (8 queries a CTA, the benchmark)
0.955 / 0.972 / 0.971, 8192 queries at position 65 536 0.994; sparse with 4 queries a CTA (its long launches of at
most 192 keys a query), k = 128 0.954, 192 0.995 (512: 0.998); V4-Flash CSA (2 queries a CTA) 1.02 / 1.02 / 1.02, with
4 queries a CTA 1.03, so CSA keeps the plain walk (with 128 + 128 keys, not a V4 shape: 0.983). The fewer key blocks
a query has, the more its output weighs."""


def _long_launch_walk(variant: str) -> dict[str, Any]:
    """The config items of ``variant``'s long launches' several-queries-a-CTA program."""
    return {"query_tiles": LONG_LAUNCH_QUERY_TILES[variant],
            **({"overlap_epilogue": True} if variant in LONG_LAUNCH_OVERLAP else {})}


def _walk(variant: str, sms: int, batch: int, queries: int, key_blocks: int) -> dict[str, Any] | None:
    """How the one-pass program of ``variant`` walks ``batch`` sequences of ``queries`` queries of ``key_blocks``
    64-key blocks (one head block) on ``sms`` SMs, as config items; None: one query a CTA."""
    qt = LONG_LAUNCH_QUERY_TILES[variant]
    long = batch * queries >= LONG_LAUNCH_WAVES * qt * sms
    if queries >= PERSISTENT_QUERIES_PER_SM * sms and (
            not long or key_blocks >= LONG_LAUNCH_PERSISTENT.get(variant, key_blocks + 1)):
        return {"persistent_ctas": sms}
    return _long_launch_walk(variant) if long else None


def sparse_spec(heads: int, scale: float | None = None, return_lse: bool = False) -> AttentionSpec:
    return AttentionSpec(heads=heads, sources=(IndexList("sel"),), scale=scale, return_lse=return_lse, name="sparse")


def csa_spec(heads: int, ring: bool = False, scale: float | None = None, return_lse: bool = False) -> AttentionSpec:
    return AttentionSpec(heads=heads, sources=(Window("window", WINDOW, ring=ring), IndexList("sel")), scale=scale,
                         return_lse=return_lse, name="csa")


def hca_spec(heads: int, ring: bool = False, scale: float | None = None, return_lse: bool = False) -> AttentionSpec:
    # the dense source goes last so that split boundaries depend on shapes only (batch invariance)
    return AttentionSpec(heads=heads, sources=(Window("window", WINDOW, ring=ring), CompressedDense("comp", HCA_RATIO)),
                         scale=scale, return_lse=return_lse, name="hca")


_SPECS = {"sparse": sparse_spec, "csa": csa_spec, "hca": hca_spec}


def variant_spec(variant: str, heads: int, ring: bool = False, return_lse: bool = False,
                 scale: float | None = None) -> AttentionSpec:
    """The spec of ``variant`` in {"sparse", "csa", "hca"} (sparse attention has no window: ``ring`` is ignored)."""
    return _SPECS[variant](heads, **({"ring": ring} if variant != "sparse" else {}), scale=scale,
                           return_lse=return_lse)


def _build(variant: str, heads: int, kind: str, ring: bool, return_lse: bool, split_keys: int,
           block_kv: int, threads: int, combine_threads: int, schedule: str, pair_stages: int,
           query_tiles: int, persistent_ctas: int, overlap_epilogue: bool) -> Any:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    spec = variant_spec(variant, heads, ring, return_lse)
    if kind == "split":
        # a split program walks one query a CTA (the batch-invariant split shares the main's config)
        query_tiles, persistent_ctas, overlap_epilogue = 1, 0, False
    cfg = AttentionConfig(block_kv=block_kv, threads=threads, split_keys=split_keys, combine_threads=combine_threads,
                          schedule=schedule, pair_stages=pair_stages, query_tiles=query_tiles,
                          persistent_ctas=persistent_ctas, overlap_epilogue=overlap_epilogue)
    if kind == "combine":
        return build_combine_program(spec, threads=cfg.combine_threads)
    return build_main_program(spec, cfg, split=(kind == "split"))


def _configs(variant: str) -> list[dict[str, Any]]:
    """Shipped configs: prefill (one pass; with 64 heads also the long launches' program of
    :data:`LONG_LAUNCH_QUERY_TILES` queries a CTA and the persistent program of :data:`SHIPPED_SMS` CTAs), splits of
    2048 keys (batch-invariant), 256 and 128 keys (small batches) for the stream layout and, for windowed variants, the
    decode ring; the combine."""
    windowed = variant != "sparse"
    out = []
    for h in (64, 128):
        for ring in (False, True) if windowed else (False,):
            extra = {"ring": True} if ring else {}
            out.append({"heads": h, "kind": "main", **extra})
            if h == 64 and not ring:
                out.append({"heads": h, "kind": "main", **_long_launch_walk(variant)})
                out.append({"heads": h, "kind": "main", "persistent_ctas": SHIPPED_SMS})
            out.append({"heads": h, "kind": "split", "split_keys": BATCH_INVARIANT_SPLIT_KEYS, **extra})
            out.append({"heads": h, "kind": "split", "split_keys": OCCUPANCY_SPLIT_KEYS, **extra})
            out.append({"heads": h, "kind": "split", "split_keys": FINE_SPLIT_KEYS, **extra})
        out.append({"heads": h, "kind": "combine"})
    return out


def _registration(variant: str) -> dict[str, Any]:
    return {"configs": _configs(variant), "tags": ("attention", "batch_invariant"),
            "space": tuning.space(variant), "bucket": tuning.bucket_fn(variant), "harness": tuning.harness(variant)}


@register("sparse_attention", **_registration("sparse"))
def build_sparse_attention(heads: int, kind: str = "main", ring: bool = False, return_lse: bool = False,
                           split_keys: int = BATCH_INVARIANT_SPLIT_KEYS, block_kv: int = 64, threads: int = 256,
                           combine_threads: int = 128, schedule: str = "seesaw", pair_stages: int = 1,
                           query_tiles: int = 1, persistent_ctas: int = 0, overlap_epilogue: bool = False):
    """Sparse MQA attention over an index list with a sink (DSL: IndexList)."""
    return _build("sparse", heads, kind, False, return_lse, split_keys, block_kv, threads, combine_threads, schedule,
                  pair_stages, query_tiles, persistent_ctas, overlap_epilogue)


@register("csa_attention", **_registration("csa"))
def build_csa_attention(heads: int, kind: str = "main", ring: bool = False, return_lse: bool = False,
                        split_keys: int = BATCH_INVARIANT_SPLIT_KEYS, block_kv: int = 64, threads: int = 256,
                        combine_threads: int = 128, schedule: str = "seesaw", pair_stages: int = 1,
                        query_tiles: int = 1, persistent_ctas: int = 0, overlap_epilogue: bool = False):
    """CSA attention: Window(128) ∪ IndexList(top-k) with a sink (DSL)."""
    return _build("csa", heads, kind, ring, return_lse, split_keys, block_kv, threads, combine_threads, schedule,
                  pair_stages, query_tiles, persistent_ctas, overlap_epilogue)


@register("hca_attention", **_registration("hca"))
def build_hca_attention(heads: int, kind: str = "main", ring: bool = False, return_lse: bool = False,
                        split_keys: int = BATCH_INVARIANT_SPLIT_KEYS, block_kv: int = 64, threads: int = 256,
                        combine_threads: int = 128, schedule: str = "seesaw", pair_stages: int = 1,
                        query_tiles: int = 1, persistent_ctas: int = 0, overlap_epilogue: bool = False):
    """HCA attention: Window(128) ∪ CompressedDense(128) with a sink (DSL)."""
    return _build("hca", heads, kind, ring, return_lse, split_keys, block_kv, threads, combine_threads, schedule,
                  pair_stages, query_tiles, persistent_ctas, overlap_epilogue)


class _TunedAttention(AttentionKernel):
    """An AttentionKernel whose program configs are those of registry entry ``{variant}_attention``:
    resolved per GPU (tuned result, else default) for each program it launches, so that splits and
    workspaces are sized with the ``block_kv`` of the kernel that runs. Programs compile directly
    (a spec the registry does not build, e.g. another scale)."""

    def __init__(self, variant: str, spec: AttentionSpec, ring: bool):
        super().__init__(spec)
        self.variant, self.ring = variant, ring
        self.name = f"{variant}_attention"

    def problem(self, kind: str, split_keys: int = BATCH_INVARIANT_SPLIT_KEYS) -> dict[str, Any]:
        """The registry problem of program ``kind`` (keys left at their defaults are left out)."""
        cfg: dict[str, Any] = {"heads": self.spec.heads, "kind": kind, "return_lse": self.spec.return_lse}
        if kind == "split":
            cfg["split_keys"] = split_keys
        if kind != "combine" and self.variant != "sparse":
            cfg["ring"] = self.ring
        return cfg

    def launch_config(self, kind: str, split_keys: int = BATCH_INVARIANT_SPLIT_KEYS) -> AttentionConfig:
        items = dict(resolved_config(self.name, self.problem(kind, split_keys), self.arch).items)
        return config_from({**items, "split_keys": split_keys})

    def tile_queries(self, config: AttentionConfig, b: int, s: int, source_keys: list[int],
                     device_sms: int | None) -> AttentionConfig:
        """With one head block, where the program can (the seesaw schedule): one persistent CTA an SM a sequence from
        :data:`PERSISTENT_QUERIES_PER_SM` queries an SM a sequence on, but in a long launch (at least
        :data:`LONG_LAUNCH_WAVES` waves of :data:`LONG_LAUNCH_QUERY_TILES` queries a CTA) only where
        :data:`LONG_LAUNCH_PERSISTENT` says so, else that many queries a CTA; else ``config``. Same bits either way."""
        # the cheap tests first: a decode step (a few queries) returns here on every call
        if (device_sms is None or config.query_tiles != 1 or config.persistent_ctas
                or b * s < PERSISTENT_QUERIES_PER_SM * device_sms or head_block(self.spec.heads) != self.spec.heads):
            return config
        walk = _walk(self.variant, device_sms, b, s, self.num_key_blocks(source_keys, 64))
        if walk is None:
            return config
        tiled = dataclasses.replace(config, **walk)
        return tiled if why_invalid(self.spec, tiled, "main") is None else config

    def registry_config(self, kind: str, config: AttentionConfig) -> dict[str, Any]:
        """The complete registry config of program ``kind`` built with ``config`` (tunables given)."""
        return {**self.problem(kind, config.split_keys), "block_kv": config.block_kv, "threads": config.threads,
                "combine_threads": config.combine_threads, "schedule": config.schedule,
                "pair_stages": config.pair_stages, "query_tiles": config.query_tiles,
                "persistent_ctas": config.persistent_ctas, "overlap_epilogue": config.overlap_epilogue}


class _RegistryAttention(_TunedAttention):
    """A :class:`_TunedAttention` whose programs are the registry's (so AOT builds and caches apply)."""

    def compiled(self, kind: str, config: AttentionConfig) -> Any:
        return compile_kernel(self.name, self.registry_config(kind, config), self.arch)


@functools.lru_cache(maxsize=64)
def _kernel(variant: str, heads: int, ring: bool, scale: float | None, return_lse: bool) -> AttentionKernel:
    spec = variant_spec(variant, heads, ring, return_lse, scale)
    if scale is None:
        return _RegistryAttention(variant, spec, ring)
    return _TunedAttention(variant, spec, ring)  # a non-default scale is a different program: compiled directly


def _scale_key(scale: float | None, d: int) -> float | None:
    if scale is None or scale == d**-0.5:
        return None
    if not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return float(scale)


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    sink: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
    *,
    return_lse: bool = False,
    batch_invariant: bool = False,
    validate: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse MQA attention with a sink.

    Args:
        q: [b, s, H, 512] bf16. kv: [b, n, 512] bf16 (K = V). sink: [H] fp32.
        indices: [b, s, k] int32 rows of ``kv``; −1 marks an unused slot; a duplicated index
            counts twice; an index ≥ n raises ``ValueError``.
        scale: softmax scale, default 512^-1/2.
        return_lse: also return lse [b, s, H] fp32 = log Σ_j e^{s_j} (sink excluded, −inf if empty).
        batch_invariant: fixed split size, see the module docstring.
        validate: check index ranges and positions on the device (two small reductions and a host
            sync); pass False on hot paths (CUDA graphs) once inputs are known to be well formed.
        out: optional preallocated [b, s, H, 512] bf16.

    Returns:
        o [b, s, H, 512] bf16 (and lse).
    """
    check_tensor("q", q, dtype=torch.bfloat16, ndim=4)
    kernel = _kernel("sparse", q.shape[2], False, _scale_key(scale, q.shape[3]), return_lse)
    positions = torch.zeros(q.shape[0], q.shape[1], dtype=torch.int32, device=q.device)
    return kernel(q, positions, sink, batch_invariant=batch_invariant, validate=validate, out=out,
                  sel_kv=kv, sel_idx=indices)


def _window_args(kv_window: torch.Tensor, window_start: torch.Tensor | None) -> tuple[bool, dict[str, torch.Tensor]]:
    if window_start is None:
        return True, {"window_kv": kv_window}
    return False, {"window_kv": kv_window, "window_start": window_start}


def csa_attention(
    q: torch.Tensor,
    kv_window: torch.Tensor,
    kv_compressed: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    positions: torch.Tensor,
    window_start: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    return_lse: bool = False,
    batch_invariant: bool = False,
    validate: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """CSA attention: the 128-token window of the raw KV stream ∪ the top-k compressed entries.

    Args:
        q: [b, s, H, 512] bf16 (roped, normalised queries).
        kv_window: the raw KV — a stream [b, n, 512] (prefill, with ``window_start``) or a ring
            [b, R, 512] (decode, ``window_start=None``), bf16.
        kv_compressed: [b, n_c, 512] bf16 compressed cache (entry c at row c).
        indices: [b, s, k] int32 rows of ``kv_compressed`` chosen by the indexer, −1 = unused.
        sink: [H] fp32. positions: [b, s] int32 absolute positions of the queries (ragged batches
            give each sequence its own).
        window_start: [b] int32 position of stream row 0, or None for a ring.
        scale, return_lse, batch_invariant, validate, out: as in :func:`sparse_attention`.

    Returns:
        o [b, s, H, 512] bf16 (and lse [b, s, H] fp32).
    """
    check_tensor("q", q, dtype=torch.bfloat16, ndim=4)
    ring, win = _window_args(kv_window, window_start)
    kernel = _kernel("csa", q.shape[2], ring, _scale_key(scale, q.shape[3]), return_lse)
    return kernel(q, positions, sink, batch_invariant=batch_invariant, validate=validate, out=out, sel_kv=kv_compressed,
                  sel_idx=indices, **win)


def hca_attention(
    q: torch.Tensor,
    kv_window: torch.Tensor,
    kv_compressed: torch.Tensor,
    sink: torch.Tensor,
    positions: torch.Tensor,
    window_start: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    return_lse: bool = False,
    batch_invariant: bool = False,
    validate: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HCA attention: the 128-token window ∪ every compressed entry visible to the query
    (``c < (t+1) // 128``), read straight from ``kv_compressed`` [b, n_c, 512] (no index gather).
    Arguments as in :func:`csa_attention`."""
    check_tensor("q", q, dtype=torch.bfloat16, ndim=4)
    ring, win = _window_args(kv_window, window_start)
    kernel = _kernel("hca", q.shape[2], ring, _scale_key(scale, q.shape[3]), return_lse)
    return kernel(q, positions, sink, batch_invariant=batch_invariant, validate=validate, out=out,
                  comp_kv=kv_compressed, **win)
