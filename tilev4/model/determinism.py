"""Batch-invariance and run-to-run determinism checks of the model (``tilev4 check-determinism``).

:func:`run_target` runs one prompt, alone or at some row of a batch of other prompts, through a prefill
and greedy decode steps, and returns that prompt's logits after each step and its tokens. With a
batch-invariant model (``Model(..., batch_invariant=True)`` on CUDA) the result must be bitwise the same
whatever the other prompts are and wherever the prompt sits; :func:`check_batch_invariance` draws such
batches and compares. :func:`digest` hashes a run so that two processes can compare theirs.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tilev4.model.model import Model

__all__ = ["BatchTrial", "TargetRun", "check_batch_invariance", "digest", "run_target"]


@dataclass
class TargetRun:
    """logits: fp32 [steps + 1, vocab] of the target after its prefill and after each decode step;
    tokens: the ``steps + 1`` greedy tokens (argmax of each row)."""

    logits: torch.Tensor
    tokens: list[int]


@dataclass
class BatchTrial:
    """One batched run of the target: the other prompts' lengths, the target's row, and the result."""

    other_lengths: list[int]
    row: int
    identical_logits: bool
    identical_tokens: bool
    max_abs_diff: float


def run_target(
    model: Model,
    prompt: Sequence[int],
    steps: int,
    capacity: int,
    others: Sequence[Sequence[int]] = (),
    row: int = 0,
) -> TargetRun:
    """Prefill ``prompt`` at row ``row`` of a batch with ``others`` (in order around it), then ``steps``
    greedy decode steps of every sequence (a ragged batch); the target's logits and tokens.

    ``capacity`` sizes the cache (keep it equal between runs that are compared: it sets the compressed
    cache's shape, which the attention kernels' split choice reads)."""
    prompts = [list(p) for p in others]
    prompts.insert(row, list(prompt))
    cache = model.new_cache(len(prompts), capacity)
    logits = model.prefill(prompts, cache)  # [b, vocab]
    rows = [logits[row].clone()]
    for _ in range(steps):
        nxt = logits.argmax(-1)  # [b]
        logits = model.decode(nxt, cache)
        rows.append(logits[row].clone())
    out = torch.stack(rows)  # [steps + 1, vocab]
    return TargetRun(out, out.argmax(-1).tolist())


def digest(run: TargetRun) -> str:
    """sha256 of the logits' bytes and the tokens (for comparing processes)."""
    h = hashlib.sha256(run.logits.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr(run.tokens).encode())
    return h.hexdigest()


def check_batch_invariance(
    model: Model,
    prompt: Sequence[int],
    steps: int = 4,
    trials: int = 4,
    max_others: int = 5,
    max_len: int = 300,
    capacity: int = 1024,
    seed: int = 0,
) -> tuple[TargetRun, list[BatchTrial]]:
    """The target alone, then ``trials`` batches of 1 … ``max_others`` random other prompts (lengths 1 …
    ``max_len``, sometimes the target's own length so that they share its prefill call) with the target
    at a random row; each batched result compared bit for bit with the lone one."""
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    alone = run_target(model, prompt, steps, capacity)
    trials_out = []
    for _ in range(trials):
        n = rng.randint(1, max_others)
        lengths = [len(prompt) if rng.random() < 0.3 else rng.randint(1, max_len) for _ in range(n)]
        others = [[rng.randrange(vocab) for _ in range(k)] for k in lengths]
        row = rng.randint(0, n)
        run = run_target(model, prompt, steps, capacity, others, row)
        trials_out.append(BatchTrial(
            lengths, row, torch.equal(run.logits, alone.logits), run.tokens == alone.tokens,
            float((run.logits - alone.logits).abs().max()),
        ))
    return alone, trials_out
