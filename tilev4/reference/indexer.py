"""The lightning indexer of CSA layers (spec, "Lightning indexer"): score and select compressed entries.

Semantics: each query token ``t`` has ``HI`` indexer heads ``q_I[t, h]`` (RoPE on the last 64 dims,
Hadamard rotation, FP4 simulation: :func:`indexer_prepare_queries`) and head weights ``w[t, h]``
(already scaled by ``128^-1/2 · 64^-1/2`` by the caller). Against the compressed indexer key
``K_I[c]`` (the indexer compressor's output, already FP4-simulated) it scores::

    I[t, c] = Σ_h w[t, h] · ReLU(q_I[t, h] · K_I[c])      (−inf where c >= (t+1) // m)

and selects the ``min(top_k, (t+1)//m)`` visible entries with the largest scores, ordered by
score descending, ties broken by the smaller index, the unused slots being −1.

Dimension glossary:

* ``b`` batch, ``s`` query tokens per sequence, ``t`` absolute position of a query;
* ``HI`` indexer heads (64 in V4), ``d`` indexer head dim (128 in V4);
* ``n_c`` compressed entries, ``m`` compression ratio (4 for CSA), ``top_k`` selected entries.
"""

from __future__ import annotations

import math

import torch

from tilev4._checks import capturing, check_int, check_same_device, check_shape, check_tensor
from tilev4.reference.attention import compressed_visible_count
from tilev4.reference.norm import hadamard_rotate
from tilev4.reference.quant import fp4_e2m1_simulate
from tilev4.reference.rope import RopeConfig, apply_rope

__all__ = ["indexer_prepare_queries", "indexer_scores", "indexer_topk"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_COMPRESSED_ROPE = RopeConfig.compressed()
_FP4_BLOCK = 32


def indexer_prepare_queries(
    q: torch.Tensor, positions: torch.Tensor, rope: RopeConfig = _COMPRESSED_ROPE
) -> torch.Tensor:
    """RoPE at each query's position → Hadamard rotation → FP4 e2m1 simulation (block 32).

    Args:
        q: [b, s, HI, d] any float dtype, the projected indexer queries ``qr @ Wq_idx``;
            d must be a power of two, a multiple of 32 and >= ``rope.rope_dim``.
        positions: int32/int64 [b, s], absolute position of each query (>= 0).
        rope: RoPE of the last ``rope.rope_dim`` dims (default ``RopeConfig.compressed()``).

    Returns:
        fp32 [b, s, HI, d].
    """
    check_tensor("q", q, dtype=_FLOATS, ndim=4)
    b, s, _, d = q.shape
    check_tensor("positions", positions, dtype=(torch.int32, torch.int64), shape=(b, s))
    if positions.numel() and not capturing() and int(positions.min()) < 0:
        raise ValueError(f"positions must be >= 0, got {int(positions.min())}")
    if not isinstance(rope, RopeConfig):
        raise TypeError(f"rope must be a RopeConfig, got {type(rope).__name__}")
    if d & (d - 1) or d % _FP4_BLOCK or d < rope.rope_dim:
        raise ValueError(
            f"q: head dim must be a power of two, a multiple of 32 and >= rope_dim={rope.rope_dim}, got {d}"
        )
    check_same_device(q=q, positions=positions)
    x = apply_rope(q, positions, rope)  # [b, s, HI, d]
    x = hadamard_rotate(x)  # [b, s, HI, d] @ [d, d] -> [b, s, HI, d]
    return fp4_e2m1_simulate(x, block=_FP4_BLOCK)


def indexer_scores(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, ratio: int = 4
) -> torch.Tensor:
    """Index scores ``I[t, c] = Σ_h w[t, h] · ReLU(q[t, h] · k[c])``, −inf where not visible.

    Args:
        q: [b, s, HI, d] any float dtype, prepared queries (:func:`indexer_prepare_queries`).
        w: [b, s, HI] any float dtype, head weights (scaled by the caller).
        k: [b, n_c, d] any float dtype, compressed indexer keys.
        positions: int32/int64 [b, s], absolute position ``t`` of each query (>= 0).
        ratio: int, compression ratio m (4 for CSA; 128 is accepted for the visibility rule).

    Returns:
        fp32 [b, s, n_c]; entries with ``c >= (t+1) // ratio`` are −inf.
    """
    check_tensor("q", q, dtype=_FLOATS, ndim=4)
    b, s, hi, d = q.shape
    check_tensor("w", w, dtype=_FLOATS, shape=(b, s, hi))
    check_tensor("k", k, dtype=_FLOATS, ndim=3)
    check_shape("k", k, (b, None, d))
    check_tensor("positions", positions, dtype=(torch.int32, torch.int64), shape=(b, s))
    check_same_device(q=q, w=w, k=k, positions=positions)
    visible = compressed_visible_count(positions, ratio)  # [b, s]
    n_c = k.shape[1]
    # [b, s, HI, d] @ [b, n_c, d] -> [b, s, HI, n_c]
    logits = torch.einsum("bshd,bcd->bshc", q.float(), k.float())
    # Σ_h w · ReLU(logits): [b, s, HI, n_c] x [b, s, HI] -> [b, s, n_c]
    scores = torch.einsum("bshc,bsh->bsc", logits.relu(), w.float())
    entry = torch.arange(n_c, device=k.device)  # [n_c]
    return scores.masked_fill(entry >= visible.unsqueeze(-1), -math.inf)


def indexer_topk(scores: torch.Tensor, top_k: int, offset: int = 0) -> torch.Tensor:
    """Select the ``min(top_k, #visible)`` largest scores per query, ties to the smaller index.

    Args:
        scores: [b, s, n_c] any float dtype; −inf marks an entry that is not visible (never
            selected). NaN is rejected.
        top_k: int >= 1, the number of slots.
        offset: int >= 0 added to every selected index (e.g. the row where the compressed entries
            start in a concatenated kv); -1 slots stay -1.

    Returns:
        int32 [b, s, top_k]: the selected entry indices (+ offset) ordered by score descending,
        equal scores by ascending index (a stable sort of ``-scores``), then -1 padding.
    """
    check_tensor("scores", scores, dtype=_FLOATS, ndim=3)
    check_int("top_k", top_k, min_value=1)
    check_int("offset", offset, min_value=0)
    nan = None if capturing() else torch.isnan(scores)
    if nan is not None and nan.any():
        where = nan.nonzero()[0].tolist()
        raise ValueError(f"scores must not contain NaN, got NaN at [b, s, c] = {where}")
    b, s = scores.shape[:2]
    neg = -scores.float()  # [b, s, n_c]; ascending -score is descending score, -inf (hidden) last
    order = torch.sort(neg, dim=-1, stable=True).indices[..., :top_k]  # [b, s, min(top_k, n_c)]
    chosen = torch.gather(scores.float(), -1, order)  # [b, s, min(top_k, n_c)]
    idx = torch.where(chosen > -math.inf, order + offset, -1)
    pad = idx.new_full((b, s, top_k - idx.shape[-1]), -1)
    return torch.cat([idx, pad], dim=-1).to(torch.int32)
