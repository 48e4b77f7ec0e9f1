"""Config spaces: the tunable keys of a kernel, their candidates in canonical order, static pruning.

A kernel's canonical config (see :func:`tilev4.kernels.registry.canonical_config`) splits into

* the **problem** — every key that is not tunable (``D``, ``eps``; ``K``, ``BK``): it changes what
  is computed and comes from the caller;
* the **tunables** — the keys of :attr:`Space.params` (tiles, stages, threads, warp policy…): they
  change only how fast it is computed.

A **shape bucket** (the registry's ``bucket=`` function, default :func:`exact_bucket`) maps a
problem to a label; the problems of one bucket share one tuned config. The bucket only sees
compile-time keys, never a run-time size such as the number of tokens, so a batch-invariant
kernel keeps one config for every batch size.

Canonical order: the heuristic (default) tunables first, then the product of the candidate values
in the order the space declares them. Ties between measured configs go to the earlier one, so a
tuned config differs from the default only when it is measurably faster.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SMEM_LIMIT_BYTES",
    "Space",
    "config_label",
    "exact_bucket",
    "smem_limit_bytes",
]

Constraint = Callable[[Mapping[str, Any]], "str | None"]

# Shared memory a block may opt in to, per compute capability (CUDA programming guide, tables of
# technical specifications). Used without a GPU; on a GPU the device's own value is read.
SMEM_LIMIT_BYTES: dict[str, int] = {
    "sm_80": 163 * 1024,
    "sm_86": 99 * 1024,
    "sm_87": 163 * 1024,
    "sm_89": 99 * 1024,
    "sm_90": 227 * 1024,
    "sm_90a": 227 * 1024,
    "sm_100": 227 * 1024,
    "sm_100a": 227 * 1024,
    "sm_120": 99 * 1024,
}


def smem_limit_bytes(arch: str) -> int:
    """Opt-in shared memory per block for ``arch``: the current GPU's if it is that arch, else the table's."""
    from tilev4.autotune.identity import current_gpu

    gpu = current_gpu()
    if gpu is not None and gpu.arch == arch:
        import torch

        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        optin = getattr(p, "shared_memory_per_block_optin", 0)
        if optin:
            return int(optin)
    return SMEM_LIMIT_BYTES.get(arch, 48 * 1024)


def config_label(config: Mapping[str, Any]) -> str:
    """The compact, sorted JSON of a config: the key timings and records are filed under."""
    return json.dumps(dict(config), sort_keys=True, separators=(",", ":"), default=repr)


def exact_bucket(problem: Mapping[str, Any]) -> str:
    """Default bucket: every problem is its own bucket (``D=4096,eps=1e-06``)."""
    return ",".join(f"{k}={problem[k]}" for k in sorted(problem))


@dataclass(frozen=True)
class Space:
    """The tunable keys of one kernel and how to prune them.

    Attributes:
        params: tunable key → candidate values, in canonical order (keys in declaration order).
        constraints: each takes the full config (problem + tunables) and returns why it is
            invalid (a short string) or None; e.g. divisibility, registers per thread.
        smem_bytes: shared memory one block of the full config needs (bytes), checked against
            the arch's limit; None if the kernel's shared memory is negligible.
        heuristic: problem → tunables used when nothing is tuned for this GPU (default: the
            factory's defaults).
    """

    params: Mapping[str, Sequence[Any]]
    constraints: tuple[Constraint, ...] = ()
    smem_bytes: Callable[[Mapping[str, Any]], int] | None = None
    heuristic: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    _frozen_params: tuple[tuple[str, tuple[Any, ...]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        frozen = tuple((k, tuple(v)) for k, v in self.params.items())
        for k, vals in frozen:
            if not vals:
                raise ValueError(f"space: key {k!r} has no candidate values")
        object.__setattr__(self, "_frozen_params", frozen)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self._frozen_params)

    def size(self) -> int:
        n = 1
        for _, vals in self._frozen_params:
            n *= len(vals)
        return n

    def product(self) -> list[dict[str, Any]]:
        """Every combination of candidate values, in canonical (declaration) order."""
        keys = self.keys
        return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in self._frozen_params))]

    def why_invalid(self, config: Mapping[str, Any], smem_limit: int | None = None) -> str | None:
        """Why the full ``config`` must not be built (a constraint or shared memory), or None."""
        for check in self.constraints:
            reason = check(config)
            if reason:
                return reason
        if self.smem_bytes is not None and smem_limit is not None:
            need = int(self.smem_bytes(config))
            if need > smem_limit:
                return f"shared memory {need} B > limit {smem_limit} B"
        return None

    def candidates(
        self,
        problems: Sequence[Mapping[str, Any]],
        heuristic: Mapping[str, Any] | None = None,
        smem_limit: int | None = None,
    ) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
        """Tunables valid for every problem of a bucket, in canonical order, and the pruned ones with why.

        ``heuristic`` (the tunables used untuned) goes first when it is valid, so ties keep it.
        """
        ordered: list[dict[str, Any]] = []
        seen: set[str] = set()
        for cand in ([dict(heuristic)] if heuristic is not None else []) + self.product():
            label = config_label(cand)
            if label not in seen:
                seen.add(label)
                ordered.append(cand)
        kept: list[dict[str, Any]] = []
        pruned: list[tuple[dict[str, Any], str]] = []
        for cand in ordered:
            reason = None
            for problem in problems:
                reason = self.why_invalid({**problem, **cand}, smem_limit)
                if reason:
                    if len(problems) > 1:
                        reason = f"{exact_bucket(problem)}: {reason}"
                    break
            if reason:
                pruned.append((cand, reason))
            else:
                kept.append(cand)
        return kept, pruned
