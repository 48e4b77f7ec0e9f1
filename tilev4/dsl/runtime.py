"""Validate tensors for a spec, pick the split, compile (cached) and launch.

``AttentionKernel(spec)(q, positions, sink=..., **source_tensors)`` runs the fused kernel. The
tensor names of each source are listed by ``source.tensor_names()`` (e.g. ``window_kv``,
``window_start``, ``sel_kv``, ``sel_idx``, ``comp_kv``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from tilev4._checks import check_aligned, check_tensor
from tilev4.dsl.codegen import (
    AttentionConfig,
    build_combine_program,
    build_main_program,
    head_block,
)
from tilev4.dsl.spec import AttentionSpec, CompressedDense, IndexList, Window

__all__ = ["BATCH_INVARIANT_SPLIT_KEYS", "FINE_SPLIT_KEYS", "OCCUPANCY_SPLIT_KEYS", "AttentionKernel", "LaunchPlan"]

BATCH_INVARIANT_SPLIT_KEYS = 2048  # V4 CSA rows (640 / 1152 keys) and HCA rows fit in one split
OCCUPANCY_SPLIT_KEYS = 256  # tiny batches: split into 256-key pieces so that more SMs work
FINE_SPLIT_KEYS = 128
"""Tiny batches split into 128-key pieces instead where all of those CTAs (every row's, head block's and piece's) fit
in one wave on the device's SMs. H200, whole decode calls at 128K context (CUDA graphs, L2 flushed; µs for 256- /
128-key pieces; ``benchmarks/logs/h200-2026-12-01-session31.md``):

* V4-Flash CSA (64 heads, 128 + 512 keys): b = 1 19.0 / 15.7, b = 8 19.7 / 17.2, b = 16 20.6 / 19.8, but b = 32
  (160 CTAs) 23.7 / 31.6;
* V4-Pro CSA (128 heads, 128 + 1024 keys): b = 1 19.6 / 17.0, b = 4 20.5 / 18.7, but b = 8 (144 CTAs) 21.9 / 29.4;
* HCA (128 + 1024 keys): b = 1 18.6 / 16.5, b = 8 20.1 / 18.9, but b = 16 (144 CTAs) 22.0 / 29.3.

64-key pieces were slower than 128-key ones in every case."""


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _whole_blocks(config: AttentionConfig) -> AttentionConfig:
    """``config`` with ``split_keys`` rounded up to whole blocks of ``block_kv`` (a no-op for the usual sizes)."""
    keys = -(-config.split_keys // config.block_kv) * config.block_kv
    return config if keys == config.split_keys else dataclasses.replace(config, split_keys=keys)


@dataclass(frozen=True)
class LaunchPlan:
    """What one call launches: the ``main`` program alone (``num_splits == 1``), or the ``split``
    program into an fp32 workspace of ``num_splits`` partials per (token, head) and the combine.

    ``config`` is the config of the main or split program launched (the workspace is sized with
    its ``block_kv``); ``combine`` the combine program's, or None.
    """

    kind: str
    config: AttentionConfig
    num_splits: int
    combine: AttentionConfig | None = None


class AttentionKernel:
    """A compiled attention variant. Programs are built and compiled on first use.

    Args:
        spec: the variant.
        config: block sizes and CTA sizes (default: :class:`AttentionConfig()`).
        arch: CUDA arch to compile for (default: the current GPU's).
    """

    def __init__(self, spec: AttentionSpec, config: AttentionConfig | None = None, arch: str | None = None):
        self.spec = spec
        self.config = config or AttentionConfig()
        self.arch = arch
        self._kernels: dict[tuple[str, AttentionConfig], Any] = {}

    # -- configs and programs ---------------------------------------------------------------
    def launch_config(self, kind: str, split_keys: int = BATCH_INVARIANT_SPLIT_KEYS) -> AttentionConfig:
        """The config program ``kind`` in {"main", "split", "combine"} is built with (here the
        kernel's own, with one query a CTA but for the main program; registry kernels resolve theirs per GPU)."""
        main = kind == "main"
        config = dataclasses.replace(self.config, split_keys=split_keys)
        return config if main else config.one_query()

    def program(self, kind: str, config: AttentionConfig | None = None) -> Any:
        """The TileLang program ``kind`` in {"main", "split", "combine"} (default config: :meth:`launch_config`)."""
        config = config or self.launch_config(kind)
        if kind == "combine":
            return build_combine_program(self.spec, threads=config.combine_threads)
        return build_main_program(self.spec, config, split=(kind == "split"))

    def compiled(self, kind: str, config: AttentionConfig) -> Any:
        if kind == "combine":  # only its CTA size shapes the combine program
            config = AttentionConfig(combine_threads=config.combine_threads)
        key = (kind, config)
        if key not in self._kernels:
            import tilelang

            from tilev4.kernels.registry import current_arch

            arch = self.arch or current_arch()
            self._kernels[key] = tilelang.compile(self.program(kind, config), target={"kind": "cuda", "arch": arch})
        return self._kernels[key]

    # -- launch -----------------------------------------------------------------------------
    def source_keys(self, tensors: dict[str, torch.Tensor]) -> list[int]:
        """Per source, an upper bound of the keys of any query (shape-only), as the kernel computes it."""
        out = []
        for src in self.spec.sources:
            if isinstance(src, Window):
                out.append(src.size)
            elif isinstance(src, IndexList):
                out.append(tensors[f"{src.name}_idx"].shape[-1] * src.block)
            else:
                out.append(tensors[f"{src.name}_kv"].shape[1])
        return out

    @staticmethod
    def num_key_blocks(source_keys: list[int], block_kv: int) -> int:
        """Key blocks of the global sequence (each source padded to whole blocks of ``block_kv``)."""
        return sum(-(-n // block_kv) for n in source_keys)

    def plan(self, b: int, s: int, source_keys: list[int], *, batch_invariant: bool = False,
             num_splits: int | None = None, num_sms: int | None = None, device_sms: int | None = None
             ) -> LaunchPlan:
        """Which programs a call launches, with which configs and how many splits (no GPU needed).

        Args:
            b, s: batch and queries per sequence. source_keys: :meth:`source_keys`.
            batch_invariant: fixed split size (:data:`BATCH_INVARIANT_SPLIT_KEYS`, in whole blocks);
                the split of a long row runs the MAIN program's config, so that a row that fits in one
                split gets the same bits from the one-pass program as from split + combine.
            num_splits: force this many splits (rounded to whole blocks).
            num_sms: SMs of the device; the one-pass program is used when a quarter of them work, else
                :data:`FINE_SPLIT_KEYS`-key splits where their CTAs fit in one wave, else
                :data:`OCCUPANCY_SPLIT_KEYS`-key ones (None: always one pass, unless ``batch_invariant`` or
                ``num_splits`` say otherwise).
            device_sms: SMs of the device, for :meth:`tile_queries` (the one-pass program's queries a CTA).
        """
        if batch_invariant:
            main_cfg = self.launch_config("main")
            split_cfg = _whole_blocks(dataclasses.replace(main_cfg.one_query(),  # one query a CTA
                                                          split_keys=BATCH_INVARIANT_SPLIT_KEYS))
            ns = -(-self.num_key_blocks(source_keys, split_cfg.block_kv) // split_cfg.blocks_per_split())
        else:
            split_cfg = _whole_blocks(self.launch_config("split", OCCUPANCY_SPLIT_KEYS))
            total = self.num_key_blocks(source_keys, split_cfg.block_kv)
            if num_splits is not None:
                per = max(1, -(-total // max(1, int(num_splits))))
                split_cfg = dataclasses.replace(split_cfg, split_keys=per * split_cfg.block_kv)
                ns = -(-total // per)
            else:
                ctas = b * s * -(-self.spec.heads // head_block(self.spec.heads))
                # measured on the H200: one pass beats split + combine down to ~1/4 of the SMs busy
                if num_sms is None or 4 * ctas >= num_sms:
                    ns = 1
                else:
                    fine = _whole_blocks(self.launch_config("split", FINE_SPLIT_KEYS))
                    ns = -(-self.num_key_blocks(source_keys, fine.block_kv) // fine.blocks_per_split())
                    if ctas * ns <= num_sms:  # the finer pieces' CTAs fit in one wave
                        split_cfg = fine
                    else:
                        ns = -(-total // split_cfg.blocks_per_split())
            main_cfg = None
        if ns <= 1:
            main = self.tile_queries(main_cfg or self.launch_config("main"), b, s, source_keys, device_sms)
            return LaunchPlan("main", main, 1)
        return LaunchPlan("split", split_cfg, ns, self.launch_config("combine"))

    def tile_queries(self, config: AttentionConfig, b: int, s: int, source_keys: list[int],
                     device_sms: int | None) -> AttentionConfig:
        """The one-pass program's config for a launch of ``b × s`` queries (``source_keys``: :meth:`source_keys`)
        on ``device_sms`` SMs: here ``config`` itself; the ops' kernels choose ``query_tiles`` or ``persistent_ctas``
        per launch. Every choice gives the same bits."""
        return config

    def __call__(
        self,
        q: torch.Tensor,
        positions: torch.Tensor,
        sink: torch.Tensor | None = None,
        *,
        batch_invariant: bool = False,
        num_splits: int | None = None,
        validate: bool = True,
        out: torch.Tensor | None = None,
        **tensors: torch.Tensor,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        self._check(q, positions, sink, tensors, validate)
        b, s, h, d = q.shape
        if out is None:
            out = torch.empty_like(q)
        else:
            check_tensor("out", out, dtype=torch.bfloat16, shape=tuple(q.shape), contiguous=True, device=q.device)
            check_aligned("out", out)  # q and the output move by TMA
        lse = torch.empty(b, s, h, dtype=torch.float32, device=q.device) if spec.return_lse else None
        if b * s == 0:
            return (out, lse) if spec.return_lse else out

        dev_sms = _num_sms(q.device.index or 0)
        sms = None if batch_invariant or num_splits is not None else dev_sms
        plan = self.plan(b, s, self.source_keys(tensors), batch_invariant=batch_invariant, num_splits=num_splits,
                         num_sms=sms, device_sms=dev_sms)
        src_args = [tensors[n] for src in spec.sources for n in src.tensor_names()]
        head = [q, positions] + ([sink] if spec.sink else [])
        if plan.kind == "main":
            args = head + src_args + [out] + ([lse] if spec.return_lse else [])
            self.compiled("main", plan.config)(*args)
        else:
            assert plan.combine is not None
            o_part = torch.empty(b, s, plan.num_splits, h, d, dtype=torch.float32, device=q.device)
            lse_part = torch.empty(b, s, plan.num_splits, h, dtype=torch.float32, device=q.device)
            self.compiled("split", plan.config)(*(head + src_args + [o_part, lse_part]))
            comb = ([sink] if spec.sink else []) + [o_part, lse_part, out] + ([lse] if spec.return_lse else [])
            self.compiled("combine", plan.combine)(*comb)
        return (out, lse) if spec.return_lse else out

    def _check(
        self,
        q: torch.Tensor,
        positions: torch.Tensor,
        sink: torch.Tensor | None,
        tensors: dict[str, torch.Tensor],
        validate: bool,
    ) -> None:
        spec = self.spec
        check_tensor("q", q, dtype=torch.bfloat16, ndim=4, contiguous=True)
        if q.device.type != "cuda":
            raise ValueError(f"q must be a CUDA tensor, got device {q.device}")
        b, s, h, d = q.shape
        if h != spec.heads or d != spec.head_dim:
            raise ValueError(f"q must have shape [b, s, {spec.heads}, {spec.head_dim}], got {list(q.shape)}")
        check_aligned("q", q)
        dev = q.device
        check_tensor("positions", positions, dtype=torch.int32, shape=(b, s), contiguous=True, device=dev)
        if spec.sink:
            if sink is None:
                raise ValueError(f"{spec.name} has a sink: pass sink [H] fp32")
            check_tensor("sink", sink, dtype=torch.float32, shape=(h,), contiguous=True, device=dev)
        elif sink is not None:
            raise ValueError(f"{spec.name} has no sink, but sink was given")
        expected = {n for src in spec.sources for n in src.tensor_names()}
        extra = set(tensors) - expected
        missing = expected - set(tensors)
        if extra or missing:
            raise ValueError(
                f"{spec.name} takes source tensors {sorted(expected)}; "
                f"missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        for src in spec.sources:
            kv = check_tensor(f"{src.name}_kv", tensors[f"{src.name}_kv"], dtype=torch.bfloat16, ndim=3,
                              contiguous=True, device=dev)
            if kv.shape[0] != b or kv.shape[2] != d:
                raise ValueError(f"{src.name}_kv must have shape [{b}, n, {d}], got {list(kv.shape)}")
            if isinstance(src, Window) and src.ring and kv.shape[1] < src.size + s - 1:
                raise ValueError(
                    f"{src.name}_kv: a ring of {kv.shape[1]} rows cannot hold a window of {src.size} for {s} "
                    f"queries; it needs >= {src.size + s - 1} rows"
                )
            if isinstance(src, Window) and not src.ring:
                check_tensor(f"{src.name}_start", tensors[f"{src.name}_start"], dtype=torch.int32, shape=(b,),
                             contiguous=True, device=dev)
            if isinstance(src, IndexList):
                idx = check_tensor(f"{src.name}_idx", tensors[f"{src.name}_idx"], dtype=torch.int32, ndim=3,
                                   contiguous=True, device=dev)
                if idx.shape[:2] != (b, s) or idx.shape[2] < 1:
                    raise ValueError(f"{src.name}_idx must have shape [{b}, {s}, k>=1], got {list(idx.shape)}")
                if validate and idx.numel():
                    lo, hi = int(idx.min()), int(idx.max())
                    n_sel = kv.shape[1] // src.block
                    if lo < -1:
                        raise ValueError(f"{src.name}_idx: indices must be >= -1, got {lo}")
                    if hi >= n_sel:
                        raise ValueError(
                            f"{src.name}_idx: index {hi} is out of range for {src.name}_kv with {n_sel} "
                            f"{'blocks' if src.block > 1 else 'rows'}"
                        )
            if isinstance(src, CompressedDense) and kv.shape[1] == 0:
                raise ValueError(f"{src.name}_kv must have at least one row (pass a zero row for an empty cache)")
        if validate and positions.numel() and int(positions.min()) < 0:
            raise ValueError(f"positions must be >= 0, got {int(positions.min())}")
