"""The contract between a kernel module and the tuner: make inputs, run, check against the reference.

A kernel registers ``harness=TuningHarness(...)``. For one problem (the non-tunable keys of its
config) and one run-time size ``n`` (tokens, rows — whatever ``size_name`` names), the harness
makes a :class:`TuningCase`: the positional arguments of the compiled kernel, which of them are
outputs, and (when asked) the reference outputs computed with :mod:`tilev4.reference`.

The tuner poisons every output before a checked launch (all bytes ``0xFF``: NaN for floating
types, -1 for integers), so an output the kernel forgets to write fails the check. For a kernel
tagged ``batch_invariant`` it also launches sub-batches made by ``batch_slice`` and requires the
same bits as the matching rows of the full batch. A kernel that updates an input in place (a
streaming state) lists its initial value in :attr:`TuningCase.initial`; the tuner copies it back
before every checked launch, so that each candidate starts from the state the expected outputs
were computed from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["TuningCase", "TuningHarness"]


@dataclass
class TuningCase:
    """One set of inputs for a kernel.

    Attributes:
        args: the positional arguments of the compiled kernel, outputs included.
        outputs: indices into ``args`` of the tensors the kernel writes.
        expected: reference outputs (same order as ``outputs``), or None for a timing-only case.
        rows: the run-time size (leading dimension of the batched tensors).
        initial: index into ``args`` → initial value, for the inputs the kernel updates in place
            (they may also be outputs); restored before every checked launch.
    """

    args: tuple[Any, ...]
    outputs: tuple[int, ...]
    expected: tuple[Any, ...] | None
    rows: int
    initial: dict[int, Any] | None = None

    def restore(self) -> None:
        """Copy the initial values back into the inputs updated in place."""
        for i, value in (self.initial or {}).items():
            self.args[i].copy_(value)

    def output_tensors(self) -> tuple[Any, ...]:
        return tuple(self.args[i] for i in self.outputs)


@dataclass(frozen=True)
class TuningHarness:
    """How the tuner exercises one kernel.

    Attributes:
        make_case: ``(problem, n, generator, device, reference) -> TuningCase``; random inputs
            from ``generator`` (a CPU ``torch.Generator``), expected outputs if ``reference``.
        check: ``(outputs, expected) -> None`` if acceptable, else why not (a short string).
            NaN must never pass.
        sizes: run-time sizes timed by default (a batch-invariant kernel has one config for all).
        size_name: the name of the run-time size in ``tilev4 tune --shapes`` (``N``).
        batch_slice: ``(case, start, stop) -> TuningCase`` with rows ``[start, stop)`` of the
            inputs (fresh outputs, no expected); needed for batch-invariant kernels.
    """

    make_case: Callable[[Mapping[str, Any], int, Any, str, bool], TuningCase]
    check: Callable[[tuple[Any, ...], tuple[Any, ...]], str | None]
    sizes: tuple[int, ...] = (64, 4096)
    size_name: str = "N"
    batch_slice: Callable[[TuningCase, int, int], TuningCase] | None = None
