"""Validate tensors for a spec, pick the split, compile (cached) and launch.

``AttentionKernel(spec)(q, positions, sink=..., **source_tensors)`` runs the fused kernel. The
tensor names of each source are listed by ``source.tensor_names()`` (e.g. ``window_kv``,
``window_start``, ``sel_kv``, ``sel_idx``, ``comp_kv``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tilev4._checks import check_tensor
from tilev4.dsl.codegen import (
    AttentionConfig,
    build_combine_program,
    build_main_program,
    head_block,
)
from tilev4.dsl.spec import AttentionSpec, CompressedDense, IndexList, Window

__all__ = ["BATCH_INVARIANT_SPLIT_BLOCKS", "OCCUPANCY_SPLIT_BLOCKS", "AttentionKernel"]

BATCH_INVARIANT_SPLIT_BLOCKS = 32  # 2048 keys at BI = 64: V4 CSA rows (640 / 1152 keys) and HCA rows fit in one
OCCUPANCY_SPLIT_BLOCKS = 4  # tiny batches: split into 256-key pieces so that more SMs work


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class AttentionKernel:
    """A compiled attention variant. Programs are built and compiled on first use.

    Args:
        spec: the variant.
        config: block sizes and pipeline depth (default: :class:`AttentionConfig()`).
        arch: CUDA arch to compile for (default: the current GPU's).
    """

    def __init__(self, spec: AttentionSpec, config: AttentionConfig | None = None, arch: str | None = None):
        self.spec = spec
        self.config = config or AttentionConfig()
        self.arch = arch
        self._kernels: dict[tuple[str, int], Any] = {}

    # -- programs ---------------------------------------------------------------------------
    def program(self, kind: str, split_blocks: int = BATCH_INVARIANT_SPLIT_BLOCKS) -> Any:
        """The TileLang program ``kind`` in {"main", "split", "combine"}."""
        if kind == "combine":
            return build_combine_program(self.spec)
        cfg = AttentionConfig(**{**self.config.__dict__, "split_blocks": split_blocks})
        return build_main_program(self.spec, cfg, split=(kind == "split"))

    def compiled(self, kind: str, split_blocks: int = BATCH_INVARIANT_SPLIT_BLOCKS) -> Any:
        key = (kind, split_blocks)
        if key not in self._kernels:
            import tilelang

            from tilev4.kernels.registry import current_arch

            arch = self.arch or current_arch()
            self._kernels[key] = tilelang.compile(
                self.program(kind, split_blocks), target={"kind": "cuda", "arch": arch}
            )
        return self._kernels[key]

    # -- launch -----------------------------------------------------------------------------
    def num_key_blocks_max(self, tensors: dict[str, torch.Tensor]) -> int:
        """Upper bound of key blocks of any query (shape-only), as the kernel computes it."""
        bi = self.config.block_kv
        total = 0
        for src in self.spec.sources:
            if isinstance(src, Window):
                n = src.size
            elif isinstance(src, IndexList):
                n = tensors[f"{src.name}_idx"].shape[-1] * src.block
            else:
                n = tensors[f"{src.name}_kv"].shape[1]
            total += -(-n // bi)
        return total

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
        lse = torch.empty(b, s, h, dtype=torch.float32, device=q.device) if spec.return_lse else None
        if b * s == 0:
            return (out, lse) if spec.return_lse else out

        total = self.num_key_blocks_max(tensors)
        nhb = -(-h // head_block(h))
        if batch_invariant:
            # fixed split SIZE: a row's splits depend on its own keys only, and a row that fits in
            # one split gets the same bits from the one-pass kernel as from split + combine
            split_blocks = BATCH_INVARIANT_SPLIT_BLOCKS
            ns = -(-total // split_blocks)
        elif num_splits is not None:
            split_blocks = max(1, -(-total // max(1, int(num_splits))))
            ns = -(-total // split_blocks)
        else:
            split_blocks = OCCUPANCY_SPLIT_BLOCKS
            ctas = b * s * nhb
            # measured on the H200: one pass beats split + combine down to ~1/4 of the SMs busy
            ns = 1 if 4 * ctas >= _num_sms(q.device.index or 0) else -(-total // split_blocks)
        ns = max(1, ns)
        src_args = [tensors[n] for src in spec.sources for n in src.tensor_names()]
        head = [q, positions] + ([sink] if spec.sink else [])
        if ns == 1:
            args = head + src_args + [out] + ([lse] if spec.return_lse else [])
            self.compiled("main", BATCH_INVARIANT_SPLIT_BLOCKS)(*args)
        else:
            o_part = torch.empty(b, s, ns, h, d, dtype=torch.float32, device=q.device)
            lse_part = torch.empty(b, s, ns, h, dtype=torch.float32, device=q.device)
            self.compiled("split", split_blocks)(*(head + src_args + [o_part, lse_part]))
            comb = ([sink] if spec.sink else []) + [o_part, lse_part, out] + ([lse] if spec.return_lse else [])
            self.compiled("combine")(*comb)
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
