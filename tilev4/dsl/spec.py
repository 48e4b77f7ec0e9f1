"""What an attention variant is: query layout, KV sources, modifiers, sink, scale, outputs.

A spec is pure data; :mod:`tilev4.dsl.codegen` turns it into TileLang programs and
:mod:`tilev4.dsl.runtime` validates tensors and launches them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AttentionSpec",
    "Causal",
    "CompressedDense",
    "IndexList",
    "KVSource",
    "MaskMod",
    "ScoreMod",
    "Window",
]

ScoreMod = Callable[[Any, Any, Any, Any, Any], Any]  # (score, b, h, q_idx, kv_idx) -> score
MaskMod = Callable[[Any, Any, Any, Any], Any]  # (b, h, q_idx, kv_idx) -> bool (True = keep)


@dataclass(frozen=True)
class KVSource:
    """Base of the key sources. ``name`` prefixes the source's tensor arguments."""

    name: str

    def tensor_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Window(KVSource):
    """Tokens ``t−W+1 … t`` of a raw KV stream for a query at position ``t``.

    ``ring=False`` (prefill): tensor ``{name}_kv`` [b, n, D] holds tokens at positions
    ``{name}_start[b] + i``; keys before the start or past the end are absent.
    ``ring=True`` (decode): ``{name}_kv`` [b, R, D] is a ring, token ``p`` in slot ``p % R``
    (R ≥ W + s − 1 so that every query of a step still finds its whole window).
    ``kv_idx`` handed to a modifier is the key's absolute token position.
    """

    name: str = "window"
    size: int = 128
    ring: bool = False

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"Window size must be >= 1, got {self.size}")

    def tensor_names(self) -> tuple[str, ...]:
        return (f"{self.name}_kv",) if self.ring else (f"{self.name}_kv", f"{self.name}_start")

    def describe(self) -> str:
        return f"Window({self.size}{', ring' if self.ring else ''})"


@dataclass(frozen=True)
class IndexList(KVSource):
    """Per-query int32 indices ``{name}_idx`` [b, s, k] into ``{name}_kv`` [b, n, D]; −1 = unused.

    With ``block > 1`` each index selects a block of ``block`` consecutive rows
    (``idx·block … idx·block+block−1``, NSA-style selected blocks). Duplicated indices count as
    many times as they appear. ``kv_idx`` handed to a modifier is the row.
    """

    name: str = "sel"
    block: int = 1

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"IndexList block must be >= 1, got {self.block}")

    def tensor_names(self) -> tuple[str, ...]:
        return (f"{self.name}_kv", f"{self.name}_idx")

    def describe(self) -> str:
        return f"IndexList(block={self.block})" if self.block > 1 else "IndexList()"


@dataclass(frozen=True)
class CompressedDense(KVSource):
    """Every compressed entry visible to the query: rows ``c < (t+1) // ratio`` of ``{name}_kv``.

    ``kv_idx`` handed to a modifier is the entry index ``c``. ``CompressedDense(1)`` over a
    stream that starts at position 0 is plain causal attention (see :func:`Causal`).
    """

    name: str = "comp"
    ratio: int = 128

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ValueError(f"CompressedDense ratio must be >= 1, got {self.ratio}")

    def tensor_names(self) -> tuple[str, ...]:
        return (f"{self.name}_kv",)

    def describe(self) -> str:
        return f"CompressedDense({self.ratio})"


def Causal(name: str = "kv") -> CompressedDense:
    """Causal attention over a stream ``{name}_kv`` whose row ``i`` is token ``i``."""
    return CompressedDense(name=name, ratio=1)


@dataclass(frozen=True)
class AttentionSpec:
    """One attention variant. MQA: the same ``head_dim`` vector is the key and the value.

    Attributes:
        heads: query heads H (any H ≥ 1; blocks of 64, 32 or 16 heads per CTA).
        head_dim: D (multiple of 64).
        sources: key sources; their union is the key set, under one online softmax.
        sink: a learned fp32 logit per head that enters the softmax denominator only.
        scale: softmax scale (default ``head_dim ** -0.5``).
        score_mod: ``f(score, b, h, q_idx, kv_idx) -> score`` on the scaled score.
        mask_mod: ``f(b, h, q_idx, kv_idx) -> bool``; False drops the key.
        return_lse: also return ``log Σ_j e^{s_j}`` over the key set (sink excluded).
        name: used in kernel names and the registry.
    """

    heads: int
    sources: tuple[KVSource, ...]
    head_dim: int = 512
    sink: bool = True
    scale: float | None = None
    score_mod: ScoreMod | None = field(default=None, compare=False)
    mask_mod: MaskMod | None = field(default=None, compare=False)
    return_lse: bool = False
    name: str = "attention"

    def __post_init__(self) -> None:
        if self.heads < 1:
            raise ValueError(f"heads must be >= 1, got {self.heads}")
        if self.head_dim < 64 or self.head_dim % 64:
            raise ValueError(f"head_dim must be a positive multiple of 64, got {self.head_dim}")
        if not self.sources:
            raise ValueError("sources must name at least one KV source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if not self.name.isidentifier():
            raise ValueError(f"name must be an identifier, got {self.name!r}")

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    def describe(self) -> str:
        parts = " ∪ ".join(s.describe() for s in self.sources)
        extras = [x for x, on in (("sink", self.sink), ("score_mod", self.score_mod), ("mask_mod", self.mask_mod),
                                  ("lse", self.return_lse)) if on]
        return f"{self.name}: H={self.heads} D={self.head_dim} keys = {parts}" + (
            f" [{', '.join(extras)}]" if extras else "")
