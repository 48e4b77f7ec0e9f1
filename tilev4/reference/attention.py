"""Sparse MQA attention with an attention sink, and the key sets of the three layer kinds.

Semantics (spec, "Attention layer"): every query head attends to a LIST of keys given by
indices into one kv tensor; the same 512-vector is the key and the value (MQA, one KV head).
With ``s_j = scale · q·kv[idx_j]`` over the listed keys and a learned per-head sink logit::

    M = max(max_j s_j, sink[h])
    o = Σ_j e^{s_j − M} kv[idx_j] / (Σ_j e^{s_j − M} + e^{sink[h] − M})

Without a sink the ``e^{sink − M}`` term is absent. A ``-1`` index is an unused slot; a query
whose key list holds no valid index outputs exactly 0 (never NaN), with or without a sink.
A valid index that appears several times in one list is counted that many times (the list is a
multiset, exactly as a kernel that loops over the slots would see it).

Key sets for a query at absolute position ``t`` (the spec's "Key sets"):

* window: tokens ``max(0, t−W+1) … t`` of the raw kv stream (:func:`window_indices`);
* HCA (m = 128): all compressed entries ``0 … (t+1)//m − 1`` (:func:`compressed_indices`);
* CSA (m = 4): the indexer's top-k among the visible entries (:mod:`tilev4.reference.indexer`).

One softmax runs over the union of the window set and the compressed set; :func:`concat_key_sets`
builds that union as one kv tensor plus one index list, so a CSA/HCA layer is
``sparse_attention(q, *concat_key_sets(kv, compressed, window_idx, compressed_idx), sink)``.

Dimension glossary:

* ``b`` batch, ``s`` new tokens (queries) per sequence, ``t`` absolute token position;
* ``H`` query heads, ``D`` head dim (512 in V4; any size is accepted here);
* ``n`` rows of the kv tensor the indices point into, ``n_c`` compressed entries;
* ``k`` index slots per query, ``W`` window (128), ``m`` compression ratio (4 or 128).
"""

from __future__ import annotations

import math

import torch

from tilev4._checks import capturing, check_int, check_same_device, check_shape, check_tensor

__all__ = [
    "WINDOW",
    "compressed_indices",
    "compressed_visible_count",
    "concat_key_sets",
    "sparse_attention",
    "window_indices",
]

WINDOW = 128
_RATIOS = (4, 128)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTS = (torch.int32, torch.int64)
# Queries per gathered block in sparse_attention: bounds the [b, chunk, k, D] gather buffer.
_QUERY_CHUNK = 64


def _check_positions(positions: object) -> torch.Tensor:
    check_tensor("positions", positions, dtype=_INTS, ndim=2)
    assert isinstance(positions, torch.Tensor)
    if positions.numel() and not capturing() and int(positions.min()) < 0:
        raise ValueError(f"positions must be >= 0, got {int(positions.min())}")
    return positions


def _check_indices(name: str, idx: torch.Tensor, n: int) -> None:
    """Every entry of ``idx`` must be -1 (unused) or in ``[0, n)``."""
    if idx.numel() == 0 or capturing():
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < -1:
        raise ValueError(f"{name} must be >= -1 (-1 = unused slot), got {lo}")
    if hi >= n:
        raise ValueError(f"{name} must be < n={n} (rows of the kv it indexes), got {hi}")


def window_indices(positions: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """The window key set: token positions ``t−window+1 … t`` in ascending order.

    Args:
        positions: int32/int64 [b, s], absolute position ``t >= 0`` of each query.
        window: int >= 1, the window length W (128 in V4).

    Returns:
        int32 [b, s, window]: slot ``j`` holds ``t − window + 1 + j``, or -1 where that position
        is < 0 (the first ``window − 1`` tokens of a sequence). The values are positions in the
        raw kv stream, so they index a kv tensor laid out by absolute position.
    """
    _check_positions(positions)
    check_int("window", window, min_value=1)
    offs = torch.arange(-window + 1, 1, device=positions.device, dtype=torch.int64)  # [W]
    pos = positions.long().unsqueeze(-1) + offs  # [b, s, W]
    return torch.where(pos >= 0, pos, -1).to(torch.int32)


def compressed_visible_count(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed entries visible to each query: ``(t + 1) // ratio``.

    Entry ``c`` covers tokens ``c·m … c·m+m−1`` and is visible to ``t`` iff ``c < (t+1)//m``.

    Args:
        positions: int32/int64 [b, s], absolute positions ``t >= 0``.
        ratio: int, the compression ratio m, 4 or 128.

    Returns:
        int64 [b, s].
    """
    _check_positions(positions)
    check_int("ratio", ratio, choices=_RATIOS)
    return (positions.long() + 1) // ratio


def compressed_indices(positions: torch.Tensor, ratio: int, max_entries: int | None = None) -> torch.Tensor:
    """The HCA key set: ALL visible compressed entries ``0 … (t+1)//ratio − 1``, ascending.

    Args:
        positions: int32/int64 [b, s], absolute positions ``t >= 0``.
        ratio: int, 4 or 128.
        max_entries: the number of slots K; ``None`` uses the largest visible count in the batch.
            Must be >= that largest count (a smaller K would silently drop visible keys).

    Returns:
        int32 [b, s, K]: slot ``j`` holds ``j`` if ``j < (t+1)//ratio``, else -1.
    """
    count = compressed_visible_count(positions, ratio)  # [b, s]
    largest = int(count.max()) if count.numel() else 0
    if max_entries is None:
        max_entries = largest
    check_int("max_entries", max_entries, min_value=0)
    if max_entries < largest:
        raise ValueError(f"max_entries must be >= the largest visible count {largest}, got {max_entries}")
    slots = torch.arange(max_entries, device=positions.device, dtype=torch.int64)  # [K]
    idx = torch.where(slots < count.unsqueeze(-1), slots, -1)  # [b, s, K]
    return idx.to(torch.int32)


def concat_key_sets(
    kv: torch.Tensor,
    compressed: torch.Tensor,
    window_idx: torch.Tensor,
    compressed_idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of the window and the compressed key sets as one kv tensor plus one index list.

    Args:
        kv: [b, n, D] any float dtype, the raw kv stream that ``window_idx`` indexes.
        compressed: [b, n_c, D] any float dtype, the compressed entries ``compressed_idx`` indexes.
        window_idx: int32 [b, s, W], rows of ``kv`` or -1.
        compressed_idx: int32 [b, s, k], rows of ``compressed`` or -1.

    Returns:
        ``(kv_cat, idx_cat)``: kv_cat fp32 [b, n + n_c, D] (kv rows, then the compressed rows);
        idx_cat int32 [b, s, W + k] (the window indices, then the compressed indices offset by
        ``n``; -1 stays -1).
    """
    check_tensor("kv", kv, dtype=_FLOATS, ndim=3)
    b, n, d = kv.shape
    check_tensor("compressed", compressed, dtype=_FLOATS, shape=(b, None, d))
    check_tensor("window_idx", window_idx, dtype=torch.int32, shape=(b, None, None))
    s = window_idx.shape[1]
    check_tensor("compressed_idx", compressed_idx, dtype=torch.int32, shape=(b, s, None))
    check_same_device(kv=kv, compressed=compressed, window_idx=window_idx, compressed_idx=compressed_idx)
    _check_indices("window_idx", window_idx, n)
    _check_indices("compressed_idx", compressed_idx, compressed.shape[1])
    kv_cat = torch.cat([kv.float(), compressed.float()], dim=1)  # [b, n + n_c, D]
    shifted = torch.where(compressed_idx >= 0, compressed_idx + n, -1)  # [b, s, k]
    return kv_cat, torch.cat([window_idx, shifted.to(torch.int32)], dim=-1)


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    sink: torch.Tensor | None,
    indices: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse MQA attention over listed keys with an optional attention sink, in fp32.

    Args:
        q: [b, s, H, D] any float dtype, the (rms-normalised, rotated) queries.
        kv: [b, n, D] any float dtype; row ``kv[b, i]`` is both the key and the value.
        sink: fp32 [H], per-head sink logit (NaN and +inf rejected; -inf acts as no sink), or
            ``None`` for no sink.
        indices: int32 [b, s, k], rows of ``kv`` attended by each query; -1 = unused slot. A row
            listed twice counts twice. Every entry must be -1 or in ``[0, n)``.
        scale: softmax scale applied to ``q·k``; ``None`` means ``D ** -0.5``.
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        ``o`` fp32 [b, s, H, D] (see the module docstring for the formula; 0 for a query with no
        valid index). With ``return_lse``, ``(o, lse)`` where lse fp32 [b, s, H] is
        ``log Σ_j e^{s_j}`` over the listed keys only (the sink is NOT included), ``s_j`` being the
        scaled score, and ``-inf`` for an empty key list.
    """
    check_tensor("q", q, dtype=_FLOATS, ndim=4)
    b, s, h, d = q.shape
    check_tensor("kv", kv, dtype=_FLOATS, ndim=3)
    check_shape("kv", kv, (b, None, d))
    n = kv.shape[1]
    check_tensor("indices", indices, dtype=torch.int32, ndim=3)
    check_shape("indices", indices, (b, s, None))
    k = indices.shape[2]
    if sink is not None:
        check_tensor("sink", sink, dtype=torch.float32, shape=(h,))
        if not capturing() and (torch.isnan(sink).any() or (sink == math.inf).any()):
            raise ValueError(f"sink must not hold NaN or +inf, got {sink.tolist()}")
    check_same_device(q=q, kv=kv, indices=indices, sink=sink)
    _check_indices("indices", indices, n)
    if scale is None:
        scale = d**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")

    o = torch.zeros(b, s, h, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, s, h), -math.inf, dtype=torch.float32, device=q.device)
    if n == 0 or k == 0:  # nothing can be attended: every query has an empty key set
        return (o, lse) if return_lse else o
    for s0 in range(0, s, _QUERY_CHUNK):
        s1 = min(s, s0 + _QUERY_CHUNK)
        o[:, s0:s1], lse[:, s0:s1] = _attend_chunk(q[:, s0:s1].float(), kv, sink, indices[:, s0:s1], scale)
    return (o, lse) if return_lse else o


def _attend_chunk(
    q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor | None, idx: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse_attention on c queries: q fp32 [b, c, H, D], idx [b, c, k] → o [b, c, H, D], lse [b, c, H]."""
    b = idx.shape[0]
    valid = idx >= 0  # [b, c, k]
    rows = torch.arange(b, device=idx.device).view(b, 1, 1)
    kv_g = kv.float()[rows, idx.long().clamp_min(0)]  # [b, c, k, D]
    scores = torch.einsum("bchd,bckd->bchk", q, kv_g) * scale  # [b, c, H, D] @ [b, c, k, D] -> [b, c, H, k]
    scores = scores.masked_fill(~valid.unsqueeze(2), -math.inf)
    m_keys = scores.amax(-1)  # [b, c, H], -inf for an empty key set
    m = m_keys if sink is None else torch.maximum(m_keys, sink.view(1, 1, -1))  # [b, c, H]
    m = torch.where(torch.isfinite(m), m, 0.0)  # empty set without a sink: any finite shift will do
    p = torch.exp(scores - m.unsqueeze(-1))  # [b, c, H, k], exactly 0 on unused slots
    den = p.sum(-1)  # [b, c, H]
    if sink is not None:
        den = den + torch.exp(sink.view(1, 1, -1) - m)
    num = torch.einsum("bchk,bckd->bchd", p, kv_g)  # [b, c, H, k] @ [b, c, k, D] -> [b, c, H, D]
    o = num / torch.where(den > 0, den, 1.0).unsqueeze(-1)  # den == 0 only for an empty set, where num == 0
    # lse over the listed keys only: m_keys + log Σ_j e^{s_j − m_keys}
    m_safe = torch.where(torch.isfinite(m_keys), m_keys, 0.0)
    lse = m_safe + torch.log(torch.exp(scores - m_safe.unsqueeze(-1)).sum(-1))  # [b, c, H]
    lse = torch.where(torch.isfinite(m_keys), lse, -math.inf)
    return o, lse
