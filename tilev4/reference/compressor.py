"""The m-to-1 gated-pooling compressor (spec, "Compressor"), for attention and for the indexer.

Semantics: the projected rows ``kv' = x @ Wkv_c`` and ``g = x @ Wgate_c`` (width ``coff·D``) come in
one row per token. A token at position ``t`` gets the score ``g + ape[t % m]``. Entry ``i`` pools,
per channel, a softmax over token positions of the score, weighting ``kv'``:

* m = 128 (coff = 1): the 128 tokens ``128i … 128i+127`` of block i, all ``D`` channels;
* m = 4 (coff = 2, overlapping): 8 positions — the previous block ``4(i−1) … 4i−1`` through channels
  ``[:D]`` and the current block ``4i … 4i+3`` through channels ``[D:]``; one softmax over the 8.
  For i = 0 the previous half has score −inf (contributes nothing).

then ``rmsnorm(weight)`` → RoPE on the last 64 dims at position ``i·m`` → the quantisation
simulation of the cache the entry goes to (``quant``):

* ``None``: nothing (the fp32 entry);
* ``"attention"``: FP8 e4m3 on ``[:D−64]`` (``[:448]`` for D = 512), block 64, power-of-two scales;
* ``"indexer"``: Hadamard rotation of all D dims (scale ``D^-1/2``), then FP4 e2m1, block 32.

Entry ``i`` exists once token ``i·m + m − 1`` has been seen, i.e. it is emitted by the token ``t`` with
``(t+1) % m == 0`` and has index ``t // m``.

Streaming: :class:`CompressorState` holds, per sequence, the projected rows and scores of the
current (incomplete) block and, for m = 4, of the previous (complete) block, plus the number of
tokens seen. :func:`compressor_prefill` continues a batch whose sequences are all at the same
position; :func:`compressor_decode_step` appends one token to each sequence of a ragged batch.
Any split of a token stream into prefill chunks and decode steps gives the same entries as one
prefill of the whole stream (up to fp32 summation order). Neither function mutates its input state.

Dimension glossary:

* ``b`` batch, ``n`` new tokens per sequence, ``t`` absolute token position;
* ``m`` ratio (4 or 128), ``coff`` = 2 for m = 4 and 1 for m = 128;
* ``D`` entry dim: 512 for the attention compressor, 128 for the indexer compressor;
* ``C = coff·D`` width of a projected row, ``E`` entries completed by a call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from tilev4._checks import check_int, check_same_device, check_tensor
from tilev4.reference.norm import hadamard_rotate, rmsnorm
from tilev4.reference.quant import fp4_e2m1_simulate, kv_fp8_simulate
from tilev4.reference.rope import RopeConfig, apply_rope

__all__ = [
    "CompressorQuant",
    "CompressorState",
    "compressor_coff",
    "compressor_decode_step",
    "compressor_prefill",
]

CompressorQuant = Literal["attention", "indexer"]
_RATIOS = (4, 128)
_QUANTS = (None, "attention", "indexer")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_COMPRESSED_ROPE = RopeConfig.compressed()
_FP8_BLOCK = 64
_FP4_BLOCK = 32


def compressor_coff(ratio: int) -> int:
    """Projected-row width factor: 2 for the overlapping m = 4 compressor, 1 for m = 128."""
    check_int("ratio", ratio, choices=_RATIOS)
    return 2 if ratio == 4 else 1


@dataclass(frozen=True)
class CompressorState:
    """Per-sequence streaming state of one compressor.

    Attributes:
        kv: fp32 [b, m, C], projected rows of the current block, row ``r`` = the token at offset
            ``r`` inside the block; rows not seen yet are 0.
        score: fp32 [b, m, C], ``gate + ape[r]`` of those rows; rows not seen yet are -inf.
        prev_kv: fp32 [b, m, C] (m = 4 only, else ``None``): rows of the previous, complete block
            (only channels ``[:D]`` are used); 0 before the first block completes.
        prev_score: fp32 [b, m, C] (m = 4 only, else ``None``): its scores; -inf before the first
            block completes, which is what makes entry 0's previous half contribute nothing.
        num_tokens: int64 [b], tokens seen per sequence; the next token has position num_tokens.
    """

    kv: torch.Tensor
    score: torch.Tensor
    prev_kv: torch.Tensor | None
    prev_score: torch.Tensor | None
    num_tokens: torch.Tensor

    @property
    def ratio(self) -> int:
        return self.kv.shape[1]

    @classmethod
    def empty(cls, b: int, ratio: int, D: int, device: torch.device | str = "cpu") -> CompressorState:
        """The state of ``b`` sequences with no tokens, for ratio ``ratio`` and entry dim ``D``."""
        check_int("b", b, min_value=0)
        check_int("D", D, min_value=1)
        coff = compressor_coff(ratio)

        def rows(fill: float) -> torch.Tensor:
            return torch.full((b, ratio, coff * D), fill, dtype=torch.float32, device=device)

        overlap = ratio == 4
        return cls(
            kv=rows(0.0),
            score=rows(-math.inf),
            prev_kv=rows(0.0) if overlap else None,
            prev_score=rows(-math.inf) if overlap else None,
            num_tokens=torch.zeros(b, dtype=torch.int64, device=device),
        )


def _check_state(state: object, b: int, ratio: int, width: int) -> CompressorState:
    if not isinstance(state, CompressorState):
        raise TypeError(f"state must be a CompressorState, got {type(state).__name__}")
    check_tensor("state.kv", state.kv, dtype=torch.float32, shape=(b, ratio, width))
    check_tensor("state.score", state.score, dtype=torch.float32, shape=(b, ratio, width))
    if ratio == 4:
        check_tensor("state.prev_kv", state.prev_kv, dtype=torch.float32, shape=(b, ratio, width))
        check_tensor("state.prev_score", state.prev_score, dtype=torch.float32, shape=(b, ratio, width))
    elif state.prev_kv is not None or state.prev_score is not None:
        raise ValueError("state.prev_kv and state.prev_score must be None for ratio 128 (no overlap)")
    check_tensor("state.num_tokens", state.num_tokens, dtype=torch.int64, shape=(b,))
    if b and int(state.num_tokens.min()) < 0:
        raise ValueError(f"state.num_tokens must be >= 0, got {state.num_tokens.tolist()}")
    return state


def _check_common(
    ape: torch.Tensor, norm_weight: torch.Tensor, ratio: int, rope: RopeConfig, quant: object
) -> tuple[int, int]:
    """Validate the parameters shared by prefill and decode; returns ``(D, coff)``."""
    coff = compressor_coff(ratio)
    check_tensor("norm_weight", norm_weight, dtype=_FLOATS, ndim=1)
    d = norm_weight.shape[0]
    check_tensor("ape", ape, dtype=_FLOATS, shape=(ratio, coff * d))
    if not isinstance(rope, RopeConfig):
        raise TypeError(f"rope must be a RopeConfig, got {type(rope).__name__}")
    if d < rope.rope_dim:
        raise ValueError(f"norm_weight: entry dim D={d} is smaller than rope_dim={rope.rope_dim}")
    if quant not in _QUANTS:
        raise ValueError(f"quant must be None, 'attention' or 'indexer', got {quant!r}")
    nope = d - rope.rope_dim
    if quant == "attention" and (nope <= 0 or nope % _FP8_BLOCK):
        raise ValueError(f"quant='attention' needs D - rope_dim to be a positive multiple of 64, got D={d}")
    if quant == "indexer" and (d & (d - 1) or d % _FP4_BLOCK):
        raise ValueError(f"quant='indexer' needs D to be a power of two and a multiple of 32, got D={d}")
    return d, coff


def _pool(
    prev_kv: torch.Tensor | None,
    prev_score: torch.Tensor | None,
    kv: torch.Tensor,
    score: torch.Tensor,
    d: int,
) -> torch.Tensor:
    """Gated pooling of complete blocks: rows fp32 [N, m, C] each → pooled fp32 [N, D]."""
    if prev_kv is not None and prev_score is not None:  # m = 4: previous block via [:D], current via [D:]
        kv = torch.cat([prev_kv[..., :d], kv[..., d:]], dim=1)  # [N, 8, D]
        score = torch.cat([prev_score[..., :d], score[..., d:]], dim=1)  # [N, 8, D]
    weight = torch.softmax(score, dim=1)  # [N, P, D], softmax over the P positions per channel
    return (weight * kv).sum(1)  # [N, P, D] -> [N, D]


def _finish(
    pooled: torch.Tensor,
    entry_index: torch.Tensor,
    norm_weight: torch.Tensor,
    ratio: int,
    rope: RopeConfig,
    quant: CompressorQuant | None,
) -> torch.Tensor:
    """rmsnorm → RoPE at position ``i·m`` → quantisation; pooled fp32 [N, D], entry_index [N] → [N, D]."""
    x = rmsnorm(pooled, norm_weight)  # [N, D]
    x = apply_rope(x, entry_index * ratio, rope)  # [N, D]
    if quant == "attention":
        x = kv_fp8_simulate(x, nope_dim=x.shape[-1] - rope.rope_dim, block=_FP8_BLOCK)
    elif quant == "indexer":
        x = fp4_e2m1_simulate(hadamard_rotate(x), block=_FP4_BLOCK)  # [N, D] @ [D, D] -> [N, D]
    return x


def compressor_prefill(
    kv: torch.Tensor,
    gate: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    ratio: int,
    rope: RopeConfig = _COMPRESSED_ROPE,
    quant: CompressorQuant | None = None,
    state: CompressorState | None = None,
) -> tuple[torch.Tensor, CompressorState]:
    """Compress ``n`` new tokens of every sequence; all sequences start at the same position.

    Args:
        kv: [b, n, coff·D] any float dtype, projected rows ``x @ Wkv_c`` of the new tokens.
        gate: [b, n, coff·D] any float dtype, projected gate rows ``x @ Wgate_c``.
        ape: [m, coff·D] any float dtype, positional bias added to the gate by offset in the block.
        norm_weight: [D] any float dtype, the rmsnorm weight (D is read from its length).
        ratio: int, m = 4 (overlapping, coff 2) or 128 (coff 1).
        rope: RoPE applied to the last ``rope.rope_dim`` dims at position ``i·m``
            (default ``RopeConfig.compressed()``).
        quant: ``None``, ``"attention"`` or ``"indexer"`` (see the module docstring).
        state: where the earlier tokens left off, or ``None`` for fresh sequences. The new tokens
            have positions ``state.num_tokens … + n − 1``, which must be equal across the batch.

    Returns:
        ``(entries, new_state)``: entries fp32 [b, E, D] are the entries completed by the new
        tokens, indices ``t0 // m … (t0 + n) // m − 1`` with ``t0 = state.num_tokens``; new_state
        is a new :class:`CompressorState` (the input state is not modified).
    """
    d, coff = _check_common(ape, norm_weight, ratio, rope, quant)
    check_tensor("kv", kv, dtype=_FLOATS, ndim=3)
    b, n, width = kv.shape
    if width != coff * d:
        raise ValueError(f"kv must have last dimension coff*D={coff * d} for ratio {ratio}, got {width}")
    check_tensor("gate", gate, dtype=_FLOATS, shape=(b, n, width))
    check_same_device(kv=kv, gate=gate, ape=ape, norm_weight=norm_weight)
    if state is None:
        state = CompressorState.empty(b, ratio, d, kv.device)
    _check_state(state, b, ratio, width)
    t0 = int(state.num_tokens[0]) if b else 0
    if b and bool((state.num_tokens != t0).any()):
        raise ValueError(
            "state.num_tokens must be equal across the batch for a prefill (use compressor_decode_step "
            f"for a ragged batch), got {state.num_tokens.tolist()}"
        )

    # The stream of rows from the start of the block before the current one (m = 4) or of the
    # current block (m = 128) to the last new token; it starts on a block boundary.
    overlap = ratio == 4
    r0 = t0 % ratio  # rows of the current block already buffered
    offsets = (t0 + torch.arange(n, device=kv.device)) % ratio  # [n]
    new_score = gate.float() + ape.float()[offsets]  # [b, n, C]
    kv_parts = [state.kv[:, :r0], kv.float()]
    score_parts = [state.score[:, :r0], new_score]
    if overlap:
        kv_parts.insert(0, state.prev_kv)
        score_parts.insert(0, state.prev_score)
    stream_kv = torch.cat(kv_parts, dim=1)  # [b, L, C]
    stream_score = torch.cat(score_parts, dim=1)  # [b, L, C]
    length = stream_kv.shape[1]
    num_full = length // ratio  # complete blocks in the stream (for m = 4 including the previous one)
    pad = -length % ratio
    stream_kv = torch.cat([stream_kv, stream_kv.new_zeros(b, pad, width)], dim=1)
    stream_score = torch.cat([stream_score, stream_score.new_full((b, pad, width), -math.inf)], dim=1)
    num_blocks = stream_kv.shape[1] // ratio
    blocks_kv = stream_kv.view(b, num_blocks, ratio, width)  # [b, nb, m, C]
    blocks_score = stream_score.view(b, num_blocks, ratio, width)  # [b, nb, m, C]

    first = 1 if overlap else 0  # stream block of the first entry that can complete
    num_entries = num_full - first  # == (t0 + n) // m - t0 // m
    entry_index = t0 // ratio + torch.arange(num_entries, device=kv.device)  # [E]
    if num_entries > 0:
        cur = slice(first, num_full)
        prv = slice(first - 1, num_full - 1)
        pooled = _pool(
            blocks_kv[:, prv].reshape(-1, ratio, width) if overlap else None,
            blocks_score[:, prv].reshape(-1, ratio, width) if overlap else None,
            blocks_kv[:, cur].reshape(-1, ratio, width),
            blocks_score[:, cur].reshape(-1, ratio, width),
            d,
        )  # [b·E, D]
        entries = _finish(pooled, entry_index.repeat(b), norm_weight, ratio, rope, quant)
        entries = entries.view(b, num_entries, d)  # [b, E, D]
    else:
        entries = torch.zeros(b, 0, d, dtype=torch.float32, device=kv.device)

    empty = CompressorState.empty(b, ratio, d, kv.device)
    has_partial = num_full < num_blocks
    new_state = CompressorState(
        kv=blocks_kv[:, num_full].clone() if has_partial else empty.kv,
        score=blocks_score[:, num_full].clone() if has_partial else empty.score,
        prev_kv=blocks_kv[:, num_full - 1].clone() if overlap else None,
        prev_score=blocks_score[:, num_full - 1].clone() if overlap else None,
        num_tokens=state.num_tokens + n,
    )
    return entries, new_state


def compressor_decode_step(
    kv: torch.Tensor,
    gate: torch.Tensor,
    state: CompressorState,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    ratio: int,
    rope: RopeConfig = _COMPRESSED_ROPE,
    quant: CompressorQuant | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, CompressorState]:
    """Append one token to each sequence of a ragged batch; emit the entries that complete.

    Args:
        kv: [b, coff·D] any float dtype, the projected row of each sequence's new token, which has
            position ``t = state.num_tokens[i]`` (may differ between sequences).
        gate: [b, coff·D] any float dtype, its projected gate row.
        state: the :class:`CompressorState` of the ``b`` sequences (not modified).
        ape, norm_weight, ratio, rope, quant: as in :func:`compressor_prefill`.

    Returns:
        ``(entries, emitted, entry_index, new_state)``: entries fp32 [b, D], the entry completed by
        the token (rows where nothing was emitted are 0); emitted bool [b], true where
        ``(t+1) % m == 0``; entry_index int64 [b], ``t // m`` where emitted, else -1; new_state.
    """
    d, coff = _check_common(ape, norm_weight, ratio, rope, quant)
    check_tensor("kv", kv, dtype=_FLOATS, ndim=2)
    b, width = kv.shape
    if width != coff * d:
        raise ValueError(f"kv must have last dimension coff*D={coff * d} for ratio {ratio}, got {width}")
    check_tensor("gate", gate, dtype=_FLOATS, shape=(b, width))
    check_same_device(kv=kv, gate=gate, ape=ape, norm_weight=norm_weight)
    _check_state(state, b, ratio, width)
    overlap = ratio == 4

    t = state.num_tokens  # [b]
    rows = torch.arange(b, device=kv.device)
    offset = t % ratio  # [b]
    cur_kv = state.kv.clone()  # [b, m, C]
    cur_score = state.score.clone()  # [b, m, C]
    cur_kv[rows, offset] = kv.float()
    cur_score[rows, offset] = gate.float() + ape.float()[offset]  # [b, C]

    emitted = (t + 1) % ratio == 0  # [b]
    entry_index = torch.where(emitted, t // ratio, -1)  # [b]
    entries = torch.zeros(b, d, dtype=torch.float32, device=kv.device)
    sel = emitted.nonzero().squeeze(1)  # [N]
    if sel.numel():
        pooled = _pool(
            state.prev_kv[sel] if overlap else None,
            state.prev_score[sel] if overlap else None,
            cur_kv[sel],
            cur_score[sel],
            d,
        )  # [N, D]
        entries[sel] = _finish(pooled, entry_index[sel], norm_weight, ratio, rope, quant)

    # An emitted block becomes the previous half (m = 4) and the current block starts empty.
    prev_kv, prev_score = None, None
    if overlap:
        prev_kv, prev_score = state.prev_kv.clone(), state.prev_score.clone()
        prev_kv[sel], prev_score[sel] = cur_kv[sel], cur_score[sel]
    cur_kv[sel], cur_score[sel] = 0.0, -math.inf
    new_state = CompressorState(cur_kv, cur_score, prev_kv, prev_score, num_tokens=t + 1)
    return entries, emitted, entry_index, new_state
