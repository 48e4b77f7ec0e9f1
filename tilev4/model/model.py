"""The DeepSeek-V4 model: embedding → mHC blocks → head, with prefill, decode, MTP drafts and generate.

Usage::

    model = Model.from_checkpoint(directory, device="cpu")      # or load_model(directory)
    cache = model.new_cache(batch=2, capacity=256)
    logits = model.prefill([[1, 2, 3], [4, 5]], cache)         # [2, vocab]: last position of each prompt
    logits = model.decode([7, 9], cache)                        # [2, vocab]: one token per sequence
    out = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=16)  # greedy; temperature= / seed= to sample

Backends: CPU tensors run :mod:`tilev4.reference`; CUDA tensors run :class:`~tilev4.model.backend.KernelOps`
(the public TileLang ops; ``batch_invariant=True`` selects their batch-invariant variants, so that a sequence's
logits are bitwise the same whatever shares its batch). ``ops=ReferenceOps()`` runs the reference on a GPU.
Same weights, same API.

Ragged batches. Each sequence of the cache has its own length. A prefill groups the sequences that start at
the same position with the same number of new tokens and runs each group as one batch (compressors need a
common position); a decode step runs the whole batch at once, each sequence at its own position. Every
sequence therefore gets the math of running it alone; only fp32 summation order may differ (CPU GEMMs pick
their blocking by batch size).

MTP (multi-token prediction), optional: with ``new_cache(..., mtp=True)`` the cache also keeps the MTP
layer's window ring and the last position's mHC streams. The MTP block at position ``t`` takes the main
model's streams at ``t`` and the token at ``t + 1``, so it runs one position behind the main model;
:meth:`Model.mtp_draft` feeds it the token about to be decoded and returns its logits for the token after
that (a speculative draft). A prefill of n tokens then decode steps keeps the same MTP state as one prefill.

CUDA graphs (kernel backend, ``cuda_graphs=True``, the default): a decode step is a few hundred small kernel
launches whose host-side cost is far larger than their GPU time. The first :meth:`Model.decode` on a cache runs
eagerly (it compiles or loads the kernels and checks the inputs); the second records the step into a CUDA
graph bound to that cache's tensors; every later step copies the tokens into the graph's input and replays it.
The step has no host sync and no length-dependent shape (the indexer scores all ``capacity // 4`` rows and
masks the ones a query may not see), so the replay does exactly what the eager step does, bit for bit. Caches
that keep MTP state decode eagerly.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tilev4._checks import check_int
from tilev4.model.backend import ReferenceOps, ops_for_device
from tilev4.model.cache import KVCache, LayerCache
from tilev4.model.config import Config
from tilev4.model.layers import BlockWeights, HeadWeights, MTPWeights, block_forward
from tilev4.model.weights import checkpoint_specs, load_checkpoint

__all__ = ["Model", "load_model"]

TokenInput = Sequence[Sequence[int]] | torch.Tensor

#: decode graphs kept per model (each holds its activations' memory); the least recently used goes first
MAX_DECODE_GRAPHS = 8


@dataclass
class _DecodeGraph:
    """One recorded decode step: bound to a cache's tensors (``signature``) and batch size."""

    cache: weakref.ref[KVCache]
    signature: tuple[tuple[int, tuple[int, ...]], ...]
    graph: torch.cuda.CUDAGraph | None = None
    tokens: torch.Tensor | None = None  # int64 [b, 1], the graph's input
    logits: torch.Tensor | None = None  # fp32 [b, vocab], the graph's output


def _cache_signature(cache: KVCache) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """Addresses and shapes of every tensor a decode step reads or writes: a graph replays on exactly these."""
    ts = [cache.lengths, cache.mtp_lengths]
    for lc in [*cache.layers, *cache.mtp_layers]:
        ts += lc.tensors()
    return tuple((t.data_ptr(), tuple(t.shape)) for t in ts)


def _token_id(name: str, value: object, vocab: int) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        if type(value).__name__.startswith(("int", "uint")) and hasattr(value, "__index__"):  # numpy ints
            value = int(value)  # type: ignore[call-overload]
        else:
            raise ValueError(f"{name} must be an int token id, got {type(value).__name__} {value!r}")
    if not 0 <= value < vocab:
        raise ValueError(f"{name} must be a token id in [0, vocab_size={vocab}), got {value}")
    return value


class Model:
    """DeepSeek-V4 for inference (see the module docstring).

    Args:
        config: the configuration.
        tensors: every tensor of :func:`~tilev4.model.weights.checkpoint_specs` (as stored in the checkpoint).
        device: where the weights and caches live; its type picks the backend (TileLang kernels on CUDA).
        batch_invariant: on CUDA, select the batch-invariant kernel variants: a sequence's logits and tokens
            are then bitwise the same whatever else shares its batch (see :mod:`tilev4.model.backend`).
        ops: use this backend instead of the device's default (e.g. ``ReferenceOps()`` on a GPU).
        cuda_graphs: replay decode steps as CUDA graphs (kernel backend on CUDA only; see the module docstring).
    """

    def __init__(
        self,
        config: Config,
        tensors: dict[str, torch.Tensor],
        device: torch.device | str = "cpu",
        batch_invariant: bool = False,
        ops: ReferenceOps | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        if not isinstance(config, Config):
            raise TypeError(f"config must be a tilev4.model.Config, got {type(config).__name__}")
        missing = [n for n in checkpoint_specs(config) if n not in tensors]
        if missing:
            raise ValueError(f"tensors lack {len(missing)} entries for this config, e.g. {missing[:4]}")
        self.config = config
        self.device = torch.device(device)
        self.ops = ops if ops is not None else ops_for_device(self.device, batch_invariant)
        t = {k: v.to(self.device) for k, v in tensors.items()}
        self.tensors = t
        e = config.n_routed_experts
        self.embed = t["embed.weight"]  # bf16 [vocab, dim]
        self.head_weight = t["head.weight"]  # bf16 [vocab, dim]
        self.head = HeadWeights.from_tensors(t, "")
        self.blocks = [BlockWeights.from_tensors(t, f"layers.{i}.", r, e) for i, r in enumerate(config.compress_ratios)]
        self.mtp = [MTPWeights.from_tensors(t, f"mtp.{j}.", e) for j in range(config.n_mtp_layers)]
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda" and self.ops.name != "reference"
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self._graph_pool = None  # one memory pool shared by this model's decode graphs
        self.graph_failure: str | None = None  # why recording a decode graph failed, if it did

    @classmethod
    def from_checkpoint(
        cls,
        directory: str | os.PathLike[str],
        device: torch.device | str = "cpu",
        config: Config | None = None,
        batch_invariant: bool = False,
        ops: ReferenceOps | None = None,
    ) -> Model:
        """Load a checkpoint in the released V4 format (:func:`~tilev4.model.weights.load_checkpoint`)."""
        cfg, tensors = load_checkpoint(directory, device="cpu", config=config)
        return cls(cfg, tensors, device, batch_invariant, ops)

    def __repr__(self) -> str:
        backend = self.ops.name + (", batch-invariant" if self.ops.batch_invariant else "")
        return f"Model({self.config.name}, layers={self.config.layer_kinds}, backend={backend}, {self.device})"

    def new_cache(self, batch: int, capacity: int, mtp: bool = False) -> KVCache:
        """An empty :class:`~tilev4.model.cache.KVCache` of ``batch`` sequences of up to ``capacity`` tokens;
        ``mtp=True`` also keeps the MTP layer's state (for :meth:`mtp_draft`)."""
        return KVCache(self.config, batch, capacity, self.device, mtp=mtp, dtype=self.ops.cache_dtype)

    # ------------------------------------------------------------------ forward

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 [b, s] → the 4 mHC streams fp32 [b, s, 4, dim] (the embedding copied into each)."""
        e = self.embed[tokens].float()  # [b, s, dim]
        return e.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()

    def _logits(self, h: torch.Tensor, head: HeadWeights, every: bool = False) -> torch.Tensor:
        """Logits fp32 [b, vocab] of the last position of h [b, s, 4, dim] (every position, [b, s, vocab],
        with ``every``: each position goes through the head as a one-token sequence)."""
        c, (b, s) = self.config, h.shape[:2]
        if every:
            h = h.reshape(b * s, 1, *h.shape[2:])  # [b·s, 1, 4, dim]
        out = self.ops.mhc_head(
            h, head.hc_fn, head.hc_base, head.hc_scale, head.norm, self.head_weight, c.hc_eps, c.norm_eps
        )
        return out.view(b, s, -1) if every else out

    def _mtp_forward(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        rows: torch.Tensor,
        need_logits: bool,
    ) -> torch.Tensor | None:
        """Run the MTP layer on rows ``rows`` of the cache: hidden fp32 [n, s, 4, dim] (main streams at
        ``positions``), tokens int64 [n, s] (the tokens one position later), positions int64 [n, s]."""
        c, ops, w = self.config, self.ops, self.mtp[0]
        e = ops.rmsnorm(self.embed[tokens], w.enorm, c.norm_eps)  # [n, s, dim]
        hh = ops.rmsnorm(hidden, w.hnorm, c.norm_eps)  # [n, s, 4, dim], per stream
        x = ops.linear(e, w.e_proj).unsqueeze(2) + ops.linear(hh, w.h_proj)  # [n, s, 4, dim]
        lc_full = cache.mtp_layers[0]
        lc = LayerCache(0, lc_full.window[rows])
        x = block_forward(ops, c, w.block, x, positions, tokens, lc)
        lc_full.window[rows] = lc.window
        cache.mtp_lengths[rows] = positions[:, -1] + 1
        return self._logits(x, w.head) if need_logits else None

    def _step(self, tokens: torch.Tensor, cache: KVCache, every: bool = False) -> torch.Tensor:
        """Append tokens int64 [b, s] to all b sequences of ``cache`` (equal lengths if s > 1); logits [b, vocab]
        of the last new position ([b, s, vocab] of every new position with ``every``). Keeps the MTP state
        current when the cache has one."""
        b, s = tokens.shape
        start = cache.lengths.clone()  # [b]
        positions = start.unsqueeze(1) + torch.arange(s, device=self.device)  # [b, s]
        if cache.mtp:  # the MTP pair (h[start - 1], tokens[:, 0]) if a draft did not already take it
            lag = ((cache.mtp_lengths == start - 1) & (start > 0)).nonzero().squeeze(1)
            if lag.numel():
                assert cache.last_hidden is not None
                self._mtp_forward(
                    cache.last_hidden[lag].unsqueeze(1),
                    tokens[lag, :1],
                    (start[lag] - 1).unsqueeze(1),
                    cache,
                    lag,
                    need_logits=False,
                )
        h = self._embed(tokens)  # [b, s, 4, dim]
        for w, lc in zip(self.blocks, cache.layers):
            h = block_forward(self.ops, self.config, w, h, positions, tokens, lc)
        logits = self._logits(h, self.head, every)  # [b, vocab] or [b, s, vocab]
        if cache.mtp:  # pairs (h[t], tokens[t + 1]) inside this chunk
            if s > 1:
                all_rows = torch.arange(b, device=self.device)
                self._mtp_forward(h[:, :-1], tokens[:, 1:], positions[:, :-1], cache, all_rows, need_logits=False)
            cache.last_hidden = h[:, -1].clone()
            cache.mtp_lengths = start + s - 1
        cache.lengths.copy_(start + s)  # in place: a recorded decode graph keeps writing this tensor
        return logits

    # ------------------------------------------------------------------ public API

    def _check_cache(self, cache: object) -> KVCache:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (from model.new_cache), got {type(cache).__name__}")
        if cache.config != self.config:
            raise ValueError(f"cache was made for config {cache.config.name!r}, not this model's {self.config.name!r}")
        if cache.device != self.device:
            raise ValueError(f"cache is on {cache.device}, the model on {self.device}")
        return cache

    def _token_lists(self, tokens: TokenInput, lengths: Sequence[int] | None, batch: int) -> list[list[int]]:
        vocab = self.config.vocab_size
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 2 or tokens.is_floating_point():
                raise ValueError(f"tokens must be an integer tensor [b, s], got {tokens.dtype} {list(tokens.shape)}")
            rows = tokens.tolist()
            if lengths is not None:
                if len(lengths) != len(rows):
                    raise ValueError(f"lengths must have one entry per row ({len(rows)}), got {len(lengths)}")
                for i, n in enumerate(lengths):
                    check_int(f"lengths[{i}]", n, min_value=0)
                    if n > len(rows[i]):
                        raise ValueError(f"lengths[{i}] must be <= the padded length {len(rows[i])}, got {n}")
                rows = [r[:n] for r, n in zip(rows, lengths)]
        else:
            if lengths is not None:
                raise ValueError("lengths is only for a padded tensor of tokens; pass lists of different lengths")
            if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
                raise ValueError(
                    f"tokens must be a list of token lists or a [b, s] tensor, got {type(tokens).__name__}"
                )
            rows = []
            for i, seq in enumerate(tokens):
                if isinstance(seq, (str, bytes)) or not isinstance(seq, (Sequence, torch.Tensor)):
                    raise ValueError(f"tokens[{i}] must be a list of token ids, got {type(seq).__name__}")
                rows.append(list(seq.tolist() if isinstance(seq, torch.Tensor) else seq))
        if len(rows) != batch:
            raise ValueError(f"tokens must hold one sequence per cache row ({batch}), got {len(rows)}")
        for i, seq in enumerate(rows):
            if len(seq) == 0:
                raise ValueError(f"tokens[{i}] is empty: every sequence needs at least one token")
            rows[i] = [_token_id(f"tokens[{i}][{j}]", v, vocab) for j, v in enumerate(seq)]
        return rows

    def _check_room(self, cache: KVCache, new: Sequence[int]) -> None:
        for i, (have, n) in enumerate(zip(cache.lengths.tolist(), new)):
            if have + n > cache.capacity:
                raise ValueError(
                    f"sequence {i} would hold {have + n} tokens ({have} cached + {n} new), more than the cache "
                    f"capacity {cache.capacity}"
                )

    @torch.no_grad()
    def prefill(
        self,
        tokens: TokenInput,
        cache: KVCache,
        lengths: Sequence[int] | None = None,
        chunk_size: int | None = 4096,
        all_logits: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Append prompts (or continuations) to every sequence of ``cache``; return their last logits.

        Args:
            tokens: one token list per cache row (any lengths >= 1), or an integer tensor [b, s] (with
                ``lengths`` giving each row's real length when the rows are right-padded).
            cache: from :meth:`new_cache`; sequences continue from their current lengths (0 for a fresh one).
            lengths: see ``tokens``.
            chunk_size: the most tokens one forward takes per sequence (bounds memory); ``None`` for no limit.
                Chunking does not change the result beyond fp32 summation order.
            all_logits: return the logits after EVERY new token instead (for scoring and tests).

        Returns:
            fp32 [b, vocab]: the logits after each sequence's last new token; with ``all_logits``, a list of
            b tensors fp32 [n_i, vocab], one row per new token of sequence i.

        Raises:
            ValueError: a token id outside [0, vocab), an empty sequence, a batch that does not match the
                cache, or more tokens than the cache capacity.
        """
        cache = self._check_cache(cache)
        rows = self._token_lists(tokens, lengths, cache.batch)
        self._check_room(cache, [len(r) for r in rows])
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, min_value=1)
        step = chunk_size or max(len(r) for r in rows)
        last: list[torch.Tensor] = [torch.empty(0)] * cache.batch  # [vocab] per sequence
        every: list[list[torch.Tensor]] = [[] for _ in rows]  # [n, vocab] chunks per sequence
        for c0 in range(0, max(len(r) for r in rows), step):
            groups: dict[tuple[int, int], list[int]] = {}
            for i, r in enumerate(rows):
                n = len(r[c0 : c0 + step])
                if n:
                    groups.setdefault((int(cache.lengths[i]), n), []).append(i)
            for (_, n), members in groups.items():
                chunk = torch.tensor([rows[i][c0 : c0 + n] for i in members], dtype=torch.int64, device=self.device)
                if len(members) == cache.batch:
                    out = self._step(chunk, cache, all_logits)
                else:
                    idx = torch.tensor(members, device=self.device)
                    sub = cache.select(idx)
                    out = self._step(chunk, sub, all_logits)
                    cache.assign(idx, sub)
                for j, i in enumerate(members):
                    if all_logits:
                        every[i].append(out[j])
                    else:
                        last[i] = out[j]
        if all_logits:
            return [torch.cat(parts) for parts in every]
        return torch.stack(last)

    def _next_tokens(self, next_tokens: Sequence[int] | torch.Tensor, batch: int) -> torch.Tensor:
        if isinstance(next_tokens, torch.Tensor):
            if next_tokens.dim() != 1 or next_tokens.is_floating_point():
                raise ValueError(
                    f"next_tokens must be an integer tensor [b], got {next_tokens.dtype} {list(next_tokens.shape)}"
                )
            values = next_tokens.tolist()
        elif isinstance(next_tokens, Sequence) and not isinstance(next_tokens, (str, bytes)):
            values = list(next_tokens)
        else:
            raise ValueError(
                f"next_tokens must be a list of token ids or a [b] tensor, got {type(next_tokens).__name__}"
            )
        if len(values) != batch:
            raise ValueError(f"next_tokens must hold one token per cache row ({batch}), got {len(values)}")
        ids = [_token_id(f"next_tokens[{i}]", v, self.config.vocab_size) for i, v in enumerate(values)]
        return torch.tensor(ids, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def decode(self, next_tokens: Sequence[int] | torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per sequence, each at its own position (a ragged batch).

        Args:
            next_tokens: b token ids (list or int tensor [b]), one per cache row.
            cache: the cache the sequences were prefilled into.

        Returns:
            fp32 [b, vocab]: the logits after each new token.
        """
        cache = self._check_cache(cache)
        tok = self._next_tokens(next_tokens, cache.batch)
        self._check_room(cache, [1] * cache.batch)
        if self.cuda_graphs and not cache.mtp:
            return self._graph_step(tok.unsqueeze(1), cache)
        return self._step(tok.unsqueeze(1), cache)

    def _graph_step(self, tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """A decode step through the cache's CUDA graph: eager the first time, recorded the second, replayed
        after that (see the module docstring). Returns fresh logits (the graph's output is copied)."""
        key = (id(cache), cache.batch)
        sig = _cache_signature(cache)
        g = self._graphs.pop(key, None)
        if g is None or g.cache() is not cache or g.signature != sig:
            g = _DecodeGraph(weakref.ref(cache), sig)  # new or re-bound cache: warm up eagerly first
            out = self._step(tok, cache)
        elif g.graph is None:
            g.tokens = tok.clone()
            g.graph = torch.cuda.CUDAGraph()
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            torch.cuda.synchronize(self.device)
            try:
                with torch.cuda.graph(g.graph, pool=self._graph_pool):
                    g.logits = self._step(g.tokens, cache)
            except RuntimeError as e:  # an op that cannot be recorded: say so once, decode eagerly from now on
                self.cuda_graphs = False
                self.graph_failure = f"{type(e).__name__}: {e}"
                warnings.warn(f"tilev4: decode runs without CUDA graphs ({self.graph_failure[:300]})", stacklevel=3)
                return self._step(tok, cache)  # recording ran nothing, so the cache is as it was
            g.graph.replay()  # recording ran nothing: this step runs now
            out = g.logits.clone()
        else:
            assert g.tokens is not None and g.logits is not None
            g.tokens.copy_(tok)
            g.graph.replay()
            out = g.logits.clone()
        self._graphs[key] = g  # most recently used last
        while len(self._graphs) > MAX_DECODE_GRAPHS:
            self._graphs.pop(next(iter(self._graphs)))
        return out

    @torch.no_grad()
    def mtp_draft(self, next_tokens: Sequence[int] | torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The MTP layer's logits for the token AFTER ``next_tokens`` (the tokens about to be decoded).

        Runs the MTP block at each sequence's last cached position ``t`` on the main streams at ``t`` and
        ``next_tokens`` (the token at ``t + 1``). A following :meth:`decode` of the same tokens reuses it.

        Args:
            next_tokens: b token ids, one per cache row.
            cache: a cache made with ``mtp=True``, every sequence non-empty and not drafted since its last step.

        Returns:
            fp32 [b, vocab].
        """
        cache = self._check_cache(cache)
        if not cache.mtp:
            raise ValueError("mtp_draft needs a cache made with new_cache(..., mtp=True)")
        tok = self._next_tokens(next_tokens, cache.batch)
        bad = ((cache.lengths == 0) | (cache.mtp_lengths != cache.lengths - 1)).nonzero().squeeze(1).tolist()
        if bad:
            raise ValueError(f"sequences {bad} are empty or already drafted since their last decode/prefill")
        assert cache.last_hidden is not None
        rows = torch.arange(cache.batch, device=self.device)
        pos = (cache.lengths - 1).unsqueeze(1)  # [b, 1]
        logits = self._mtp_forward(cache.last_hidden.unsqueeze(1), tok.unsqueeze(1), pos, cache, rows, True)
        assert logits is not None
        return logits

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        eos_token_id: int | None = None,
    ) -> list[list[int]]:
        """Generate continuations of a batch of prompts of different lengths.

        Args:
            prompts: b non-empty token lists.
            max_new_tokens: tokens to generate per prompt (>= 0).
            temperature: 0 for greedy (argmax, ties to the smaller id); > 0 samples from
                ``softmax(logits / temperature)``.
            seed: seeds the sampling generator (same seed, same prompts → same tokens); ``None`` draws from
                torch's global generator.
            eos_token_id: a sequence stops after producing this token (it is included).

        Returns:
            b lists of generated token ids (without the prompt).
        """
        check_int("max_new_tokens", max_new_tokens, min_value=0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if temperature == float("inf"):
            raise ValueError("temperature must be finite, got inf")
        if seed is not None:
            check_int("seed", seed)
        if eos_token_id is not None:
            _token_id("eos_token_id", eos_token_id, self.config.vocab_size)
        if isinstance(prompts, (str, bytes, torch.Tensor)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of token lists, got {prompts!r:.80}")
        b = len(prompts)
        out: list[list[int]] = [[] for _ in range(b)]
        if max_new_tokens == 0:
            self._token_lists(prompts, None, b)  # still validate
            return out
        capacity = max(len(p) for p in prompts) + max_new_tokens
        cache = self.new_cache(b, capacity)
        logits = self.prefill(prompts, cache)
        gen = None
        if temperature > 0 and seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        done = [False] * b
        for step in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)  # [b]; first maximum = smallest id
            else:
                probs = torch.softmax(logits / temperature, dim=-1)  # [b, vocab]
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # [b]
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    out[i].append(t)
                    done[i] = t == eos_token_id
            if all(done) or step == max_new_tokens - 1:
                break
            logits = self.decode(nxt, cache)
        return out


def load_model(
    directory: str | os.PathLike[str], device: torch.device | str = "cpu", batch_invariant: bool = False
) -> Model:
    """``Model.from_checkpoint(directory, device, batch_invariant=batch_invariant)``."""
    return Model.from_checkpoint(directory, device, batch_invariant=batch_invariant)
