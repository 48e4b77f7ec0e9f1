"""The V4 KV cache of a ragged batch, and its byte accounting in the production layout.

Per layer and sequence (dimension glossary: ``b`` sequences, ``R`` ring slots, ``cap`` capacity in tokens,
``m`` the layer's compress ratio, ``D = 512``, ``DI = 128`` the indexer key dim):

* ``window`` fp32 (bf16 on the kernel path) [b, R, D]: the sliding-window ring; token ``p`` of a sequence
  sits in slot ``p % R``, as the kv after RoPE and the FP8 storage simulation (``kv_fp8_simulate``).
  ``R = 128`` plus one slot per MTP layer when the cache keeps MTP state (a speculative step
  writes ``1 + n_mtp`` tokens before reading).
* ``compressed`` fp32 (bf16 on the kernel path) [b, cap // m, D] (CSA and HCA layers): compressed entry ``c``
  in row ``c``.
* ``index_keys`` fp32 [b, cap // 4, DI] (CSA layers): the indexer compressor's keys (FP4-simulated).
* ``compressor`` / ``index_compressor``: the streaming :class:`~tilev4.reference.compressor.CompressorState`
  of each compressor (rows of the incomplete block, and of the previous block for m = 4).
* per sequence: ``lengths`` int64 [b], tokens in the cache; with MTP also ``mtp_lengths`` and
  ``last_hidden`` fp32 [b, 4, dim] (the final mHC streams of the last position, the MTP block's input).

The reference path stores the simulated-quantised values in fp32. The production layout, which the byte
accounting below reports, stores one 512-dim entry in 584 bytes (448 FP8 e4m3 + 64 bf16 rope dims + 8
scale bytes: 7 e8m0 scales of 64 and a pad byte) and one 128-dim indexer key in 68 bytes (64 bytes of
packed FP4 + 4 e8m0 scales of 32). V3.2's MLA cache is 656 bytes per token per layer (512 FP8 + 16 scale
bytes + 64 bf16 rope dims) over 61 layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tilev4._checks import check_int
from tilev4.model.config import Config
from tilev4.reference.compressor import CompressorState, compressor_coff
from tilev4.reference.quant import fp4_e2m1_simulate, kv_fp8_simulate

__all__ = [
    "ENTRY_BYTES",
    "V32_BYTES_PER_TOKEN_PER_LAYER",
    "V32_LAYERS",
    "KVCache",
    "KVFootprint",
    "LayerCache",
    "index_key_bytes",
    "kv_bytes_per_token",
    "kv_footprint",
    "kv_table_markdown",
    "kv_table_rows",
]

ENTRY_BYTES = 584  # 448 FP8 + 64 × 2 bf16 rope + 8 scale bytes
V32_BYTES_PER_TOKEN_PER_LAYER = 656
V32_LAYERS = 61
_FP32 = 4


def index_key_bytes(config: Config) -> int:
    """Bytes of one indexer key in the production layout: ``DI/2`` packed FP4 + ``DI/32`` e8m0 scales (68)."""
    return config.index_head_dim // 2 + config.index_head_dim // 32


def _state_bytes(ratio: int, d: int) -> int:
    """fp32 bytes of one sequence's compressor state (kv + score, and prev_kv + prev_score for m = 4)."""
    arrays = 4 if ratio == 4 else 2
    return arrays * ratio * compressor_coff(ratio) * d * _FP32


@dataclass(frozen=True)
class KVFootprint:
    """KV-cache bytes of ONE sequence of ``context_len`` tokens, production layout, summed over layers.

    Attributes:
        context_len: tokens in the sequence.
        n_layers: layers counted (main layers, plus MTP layers if they were included).
        window_bytes: ``ring_size`` entries × 584 per layer (allocated, so constant in ``context_len``).
        compressed_bytes: ``context_len // m`` entries × 584 per CSA / HCA layer.
        indexer_bytes: ``context_len // 4`` keys × 68 per CSA layer.
        state_bytes: the compressor states (fp32 as the reference keeps them); reported, but not part of
            :attr:`total_bytes`, which counts what the spec's footprint counts.
    """

    context_len: int
    n_layers: int
    window_bytes: int
    compressed_bytes: int
    indexer_bytes: int
    state_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.window_bytes + self.compressed_bytes + self.indexer_bytes

    @property
    def bytes_per_token(self) -> float:
        """:attr:`total_bytes` / ``context_len`` (all layers)."""
        return self.total_bytes / self.context_len

    @property
    def bytes_per_token_per_layer(self) -> float:
        return self.bytes_per_token / self.n_layers

    @property
    def v32_bytes_per_token(self) -> int:
        """V3.2 at the same context: 656 B per token per layer × 61 layers."""
        return V32_BYTES_PER_TOKEN_PER_LAYER * V32_LAYERS

    @property
    def fraction_of_v32(self) -> float:
        """:attr:`bytes_per_token` / :attr:`v32_bytes_per_token` (whole model against whole model)."""
        return self.bytes_per_token / self.v32_bytes_per_token

    @property
    def fraction_of_v32_per_layer(self) -> float:
        """:attr:`bytes_per_token_per_layer` / 656 (average layer against a V3.2 layer)."""
        return self.bytes_per_token_per_layer / V32_BYTES_PER_TOKEN_PER_LAYER


def kv_footprint(
    config: Config, context_len: int, ring_size: int | None = None, include_mtp: bool = False
) -> KVFootprint:
    """The production-layout KV bytes of one sequence of ``context_len`` tokens for ``config``'s layer mix.

    Args:
        config: the model.
        context_len: tokens in the sequence, >= 1.
        ring_size: window ring slots per layer; default ``config.window_size`` (128).
        include_mtp: also count the (window-only) MTP layers.

    Returns:
        A :class:`KVFootprint`.
    """
    check_int("context_len", context_len, min_value=1)
    ring = config.window_size if ring_size is None else check_int("ring_size", ring_size, min_value=1)
    ratios = list(config.compress_ratios) + ([0] * config.n_mtp_layers if include_mtp else [])
    window = compressed = indexer = state = 0
    for r in ratios:
        window += ring * ENTRY_BYTES
        if r:
            compressed += (context_len // r) * ENTRY_BYTES
            state += _state_bytes(r, config.head_dim)
        if r == 4:
            indexer += (context_len // 4) * index_key_bytes(config)
            state += _state_bytes(4, config.index_head_dim)
    return KVFootprint(context_len, len(ratios), window, compressed, indexer, state)


def kv_bytes_per_token(config: Config, context_len: int, **kwargs: object) -> float:
    """``kv_footprint(config, context_len, **kwargs).bytes_per_token``: KV bytes per token, all layers."""
    return kv_footprint(config, context_len, **kwargs).bytes_per_token  # type: ignore[arg-type]


@dataclass
class LayerCache:
    """One layer's cache rows (see the module docstring for the shapes)."""

    ratio: int
    window: torch.Tensor
    compressed: torch.Tensor | None = None
    index_keys: torch.Tensor | None = None
    compressor: CompressorState | None = None
    index_compressor: CompressorState | None = None

    def tensors(self) -> list[torch.Tensor]:
        out = [self.window]
        for t in (self.compressed, self.index_keys):
            if t is not None:
                out.append(t)
        for st in (self.compressor, self.index_compressor):
            if st is not None:
                out += [t for t in (st.kv, st.score, st.prev_kv, st.prev_score, st.num_tokens) if t is not None]
        return out


def _state_rows(st: CompressorState | None, rows: torch.Tensor) -> CompressorState | None:
    if st is None:
        return None
    pick = lambda t: None if t is None else t[rows].clone()  # noqa: E731
    return CompressorState(pick(st.kv), pick(st.score), pick(st.prev_kv), pick(st.prev_score), pick(st.num_tokens))


def _state_assign(dst: CompressorState | None, rows: torch.Tensor, src: CompressorState | None) -> None:
    if dst is None or src is None:
        return
    for f in ("kv", "score", "prev_kv", "prev_score", "num_tokens"):
        d, s = getattr(dst, f), getattr(src, f)
        if d is not None:
            d[rows] = s


class KVCache:
    """The KV cache of ``batch`` sequences of up to ``capacity`` tokens each (ragged: own lengths).

    Create it with :meth:`tilev4.model.Model.new_cache` (or directly). Prefill and decode advance
    :attr:`lengths`; the layer tensors are described in the module docstring.

    Args:
        config: the model configuration.
        batch: number of sequences, >= 1.
        capacity: the most tokens a sequence may hold, >= 1 (sizes the compressed and indexer rows).
        device: where the tensors live.
        mtp: also keep the state of the MTP layers (their window rings, ``mtp_lengths``, ``last_hidden``);
            needs ``config.n_mtp_layers >= 1``.
        dtype: dtype of the window rings and compressed entries: fp32 (reference path) or bf16 (the
            kernels' layout; the stored values are FP8-simulated, so bf16 holds their non-rope dims exactly).
    """

    def __init__(
        self,
        config: Config,
        batch: int,
        capacity: int,
        device: torch.device | str = "cpu",
        mtp: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(config, Config):
            raise TypeError(f"config must be a tilev4.model.Config, got {type(config).__name__}")
        check_int("batch", batch, min_value=1)
        check_int("capacity", capacity, min_value=1)
        if capacity > config.max_seq_len:
            raise ValueError(f"capacity must be <= config.max_seq_len={config.max_seq_len}, got {capacity}")
        if mtp and config.n_mtp_layers == 0:
            raise ValueError("mtp=True needs a config with n_mtp_layers >= 1, got n_mtp_layers=0")
        self.config = config
        self.batch = batch
        self.capacity = capacity
        self.device = torch.device(device)
        self.mtp = bool(mtp)
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.dtype = dtype
        self.ring_size = config.window_size + (config.n_mtp_layers if mtp else 0)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.layers = [self._layer(r) for r in config.compress_ratios]
        self.mtp_layers = [self._layer(0) for _ in range(config.n_mtp_layers)] if mtp else []
        self.mtp_lengths = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.last_hidden: torch.Tensor | None = (
            torch.zeros(batch, config.hc_mult, config.dim, device=self.device) if mtp else None
        )

    def _layer(self, ratio: int) -> LayerCache:
        b, d, dev = self.batch, self.config.head_dim, self.device
        lc = LayerCache(ratio, torch.zeros(b, self.ring_size, d, device=dev, dtype=self.dtype))
        if ratio:
            lc.compressed = torch.zeros(b, self.capacity // ratio, d, device=dev, dtype=self.dtype)
            lc.compressor = CompressorState.empty(b, ratio, d, dev)
        if ratio == 4:
            lc.index_keys = torch.zeros(b, self.capacity // 4, self.config.index_head_dim, device=dev)
            lc.index_compressor = CompressorState.empty(b, 4, self.config.index_head_dim, dev)
        return lc

    # ------------------------------------------------------------------ rows

    def _rows(self, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(rows, dtype=torch.int64, device=self.device).reshape(-1)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= self.batch:
            raise ValueError(f"rows must be non-empty indices in [0, {self.batch}), got {idx.tolist()}")
        return idx

    def select(self, rows: Sequence[int] | torch.Tensor) -> KVCache:
        """A new cache holding copies of the sequences ``rows`` (in that order)."""
        idx = self._rows(rows)
        sub = object.__new__(KVCache)
        sub.__dict__.update(self.__dict__)
        sub.batch = idx.numel()
        sub.lengths = self.lengths[idx].clone()
        sub.mtp_lengths = self.mtp_lengths[idx].clone()
        sub.last_hidden = None if self.last_hidden is None else self.last_hidden[idx].clone()

        def pick(lc: LayerCache) -> LayerCache:
            return LayerCache(
                lc.ratio,
                lc.window[idx].clone(),
                None if lc.compressed is None else lc.compressed[idx].clone(),
                None if lc.index_keys is None else lc.index_keys[idx].clone(),
                _state_rows(lc.compressor, idx),
                _state_rows(lc.index_compressor, idx),
            )

        sub.layers = [pick(lc) for lc in self.layers]
        sub.mtp_layers = [pick(lc) for lc in self.mtp_layers]
        return sub

    def assign(self, rows: Sequence[int] | torch.Tensor, sub: KVCache) -> None:
        """Write the sequences of ``sub`` (from :meth:`select`) back into rows ``rows``."""
        idx = self._rows(rows)
        if sub.batch != idx.numel() or len(sub.layers) != len(self.layers):
            raise ValueError(f"sub must hold {idx.numel()} sequences of this cache, got {sub.batch}")
        self.lengths[idx] = sub.lengths
        self.mtp_lengths[idx] = sub.mtp_lengths
        if self.last_hidden is not None and sub.last_hidden is not None:
            self.last_hidden[idx] = sub.last_hidden
        for dst, src in zip([*self.layers, *self.mtp_layers], [*sub.layers, *sub.mtp_layers]):
            dst.window[idx] = src.window
            for f in ("compressed", "index_keys"):
                d = getattr(dst, f)
                if d is not None:
                    d[idx] = getattr(src, f)
            _state_assign(dst.compressor, idx, src.compressor)
            _state_assign(dst.index_compressor, idx, src.index_compressor)

    def reset(self, rows: Sequence[int] | torch.Tensor | None = None) -> None:
        """Empty the sequences ``rows`` (all by default) so they can take new prompts."""
        idx = torch.arange(self.batch, device=self.device) if rows is None else self._rows(rows)
        fresh = KVCache(self.config, idx.numel(), self.capacity, self.device, self.mtp, self.dtype)
        self.assign(idx, fresh)

    def fill_random(self, length: int, seed: int = 0) -> None:
        """Make every sequence hold ``length`` tokens of random but valid cache contents (for benchmarks).

        What a prefill of ``length`` tokens would leave, with random values in place of the model's: the
        window rings hold FP8-simulated N(0, 1) kv, the compressed rows ``< length // m`` FP8-simulated
        entries, the indexer keys FP4-simulated ones, and each compressor state the projected rows and
        finite scores of its incomplete block (and, for m = 4, of the previous complete block). Decode
        speed does not depend on the values, so a long context can be measured without its prefill.
        Not for MTP caches (their last hidden states are left as they are).
        """
        check_int("length", length, min_value=0)
        if length > self.capacity:
            raise ValueError(f"length must be <= the capacity {self.capacity}, got {length}")
        g = torch.Generator(device=self.device).manual_seed(seed)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, device=self.device)

        b, d = self.batch, self.config.head_dim
        for lc in [*self.layers, *self.mtp_layers]:
            lc.window.copy_(kv_fp8_simulate(randn(b, self.ring_size, d)))
            if lc.compressed is not None:
                n = length // lc.ratio
                lc.compressed.zero_()
                for c0 in range(0, n, 4096):  # in pieces: the fp32 temporaries of a 1M context are large
                    c1 = min(n, c0 + 4096)
                    lc.compressed[:, c0:c1] = kv_fp8_simulate(randn(b, c1 - c0, d)).to(self.dtype)
            if lc.index_keys is not None:
                n = length // 4
                lc.index_keys.zero_()
                for c0 in range(0, n, 4096):
                    c1 = min(n, c0 + 4096)
                    lc.index_keys[:, c0:c1] = fp4_e2m1_simulate(randn(b, c1 - c0, lc.index_keys.shape[-1]), 32)
            for st in (lc.compressor, lc.index_compressor):
                if st is None:
                    continue
                m, width = st.kv.shape[1], st.kv.shape[2]
                have = length % m  # rows of the incomplete block
                st.kv.zero_()
                st.score.fill_(-math.inf)
                st.kv[:, :have] = randn(b, have, width)
                st.score[:, :have] = randn(b, have, width)
                if st.prev_kv is not None and st.prev_score is not None:
                    done = length >= m
                    st.prev_kv.copy_(randn(b, m, width) if done else torch.zeros_like(st.prev_kv))
                    st.prev_score.copy_(randn(b, m, width) if done else torch.full_like(st.prev_score, -math.inf))
                st.num_tokens.fill_(length)
        self.lengths.fill_(length)
        self.mtp_lengths.fill_(max(length - 1, 0))

    # ------------------------------------------------------------------ bytes

    def nbytes(self) -> int:
        """Bytes this cache's tensors hold now (the fp32 reference layout, all sequences)."""
        ts = [self.lengths, self.mtp_lengths] + ([self.last_hidden] if self.last_hidden is not None else [])
        for lc in [*self.layers, *self.mtp_layers]:
            ts += lc.tensors()
        return sum(t.numel() * t.element_size() for t in ts)

    def bytes_per_token(self, context_len: int) -> float:
        """Production-layout KV bytes per token of one sequence of ``context_len`` tokens in a cache like this
        one (its layer mix, ring size and MTP layers): ``kv_footprint(...).bytes_per_token``."""
        return kv_footprint(self.config, context_len, ring_size=self.ring_size, include_mtp=self.mtp).bytes_per_token

    def footprint(self) -> list[KVFootprint]:
        """The production-layout footprint of each sequence at its current length (empty ones count 1 token)."""
        return [
            kv_footprint(self.config, max(int(n), 1), ring_size=self.ring_size, include_mtp=self.mtp)
            for n in self.lengths.tolist()
        ]

    def __repr__(self) -> str:
        return (
            f"KVCache(batch={self.batch}, capacity={self.capacity}, lengths={self.lengths.tolist()}, "
            f"ring={self.ring_size}, mtp={self.mtp}, device={self.device})"
        )


KV_README_BEGIN = "<!-- kv-table:begin -->"
KV_README_END = "<!-- kv-table:end -->"


def kv_table_markdown(config: Config | None = None, contexts: tuple[int, ...] = (4096, 32768, 131072, 2**20)) -> str:
    """The "KV cache vs V3.2" table: production-layout bytes per token of ``config`` (V4-Flash by default) per
    context length, per layer, and against V3.2's 656 B per token per layer (and its 61-layer total)."""
    config = config or Config.flash()
    lines = [
        f"| context | {config.name} KV B/token | B/token/layer | vs V3.2 per layer (656 B) | vs V3.2 model "
        f"({V32_LAYERS} layers) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in kv_table_rows(config, contexts)]
    return "\n".join(lines) + "\n"


def kv_table_rows(config: Config, contexts: Sequence[int]) -> list[tuple[str, str, str, str, str]]:
    """Per context: (context, B/token, B/token/layer, vs a V3.2 layer, vs the V3.2 model), formatted."""
    rows = []
    for ctx in contexts:
        fp = kv_footprint(config, ctx)
        rows.append((f"{ctx:,}", f"{fp.bytes_per_token:.0f}", f"{fp.bytes_per_token_per_layer:.1f}",
                     f"{fp.fraction_of_v32_per_layer:.1%}", f"{fp.fraction_of_v32:.1%}"))
    return rows
