"""Mixture-of-experts routing and SwiGLU experts, in fp32.

Semantics (spec section "MoE"):

* Gate. ``s = sqrt(softplus(x_fp32 @ Wg_fp32ᵀ))`` [T, E]. A score layer selects the ``top_k``
  experts with the largest ``s + bias`` (the bias steers selection only and never enters the
  weights), ordered by ``s + bias`` descending; equal keys are ordered by the smaller expert id.
  A hash layer (the first 3 layers of V4) takes its experts from a fixed table,
  ``experts = tid2eid[token_ids]``, in table order, and has no bias. Either way the weights are
  ``w = s[selected] / Σ s[selected] · route_scale``.
* Expert (SwiGLU, fp32 math): ``gate = x W1ᵀ``, ``up = x W3ᵀ``; routed experts clamp ``up`` to
  ``[-limit, limit]`` and ``gate`` to ``<= limit`` (the shared expert does not clamp);
  ``h = silu(gate) · up · w`` — the routing weight is applied BEFORE the down projection —
  and ``y = h W2ᵀ``.
* Layer output: ``Σ_{selected e} expert_e(x) + shared(x)``, accumulated in fp32.

Expert weights are given in a float dtype; the caller dequantises the checkpoint's FP4 / FP8
weights first with :mod:`tilev4.reference.quant`.

Dimension glossary:

* ``T``     — tokens (batch and sequence flattened); ``T = 0`` is allowed everywhere.
* ``dim``   — hidden size (4096 V4-Flash, 7168 V4-Pro).
* ``E``     — routed experts (256 / 384).
* ``top_k`` — experts per token (6).
* ``inter`` — expert intermediate size (2048 / 3072).
* ``vocab`` — rows of the hash table ``tid2eid`` (129280).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tilev4._checks import check_int, check_same_device, check_tensor

__all__ = ["moe", "moe_gate", "swiglu_expert"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _check_index_range(name: str, t: torch.Tensor, upper: int, what: str) -> None:
    """Every entry of the integer tensor ``t`` must lie in ``[0, upper)``."""
    bad = (t < 0) | (t >= upper)
    if bad.any():
        value = t[bad][0].item()
        raise ValueError(f"{name} must lie in [0, {upper}) ({what}), got {value}")


def moe_gate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    top_k: int = 6,
    route_scale: float = 1.5,
    tid2eid: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to ``top_k`` experts.

    Args:
        x: [T, dim] fp32 / bf16 / fp16 hidden states (upcast to fp32 before the gate GEMM).
        weight: [E, dim] fp32 / bf16 / fp16 gate weight (upcast to fp32).
        bias: fp32 [E] selection bias of a score layer, or ``None``. Must be ``None`` for a
            hash layer.
        top_k: experts per token, ``1 <= top_k <= E``.
        route_scale: positive factor the normalised weights are multiplied by.
        tid2eid: int32 / int64 [vocab, top_k] hash table with entries in ``[0, E)``; given
            together with ``token_ids`` it makes this a hash layer.
        token_ids: int32 / int64 [T] token ids in ``[0, vocab)``; required iff ``tid2eid`` is given.

    Returns:
        ``(weights, experts)``: ``weights`` fp32 [T, top_k] summing to ``route_scale`` per
        token, and ``experts`` int32 [T, top_k]. Score layers: ordered by ``s + bias``
        descending, equal keys by the smaller expert id. Hash layers: in table order.
    """
    check_tensor("x", x, dtype=FLOAT_DTYPES, ndim=2)
    num_tokens, dim = x.shape
    check_tensor("weight", weight, dtype=FLOAT_DTYPES, ndim=2)
    num_experts = weight.shape[0]
    check_tensor("weight", weight, shape=(num_experts, dim))
    if num_experts == 0:
        raise ValueError(f"weight must have at least one expert row, got shape {list(weight.shape)}")
    check_int("top_k", top_k, min_value=1)
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= the number of experts E={num_experts}, got {top_k}")
    route_scale = _check_positive("route_scale", route_scale)
    if bias is not None:
        check_tensor("bias", bias, dtype=torch.float32, shape=(num_experts,))
    if (tid2eid is None) != (token_ids is None):
        missing = "token_ids" if token_ids is None else "tid2eid"
        raise ValueError(f"a hash layer needs both tid2eid and token_ids; {missing} is None")
    is_hash = tid2eid is not None
    if is_hash:
        if bias is not None:
            raise ValueError("bias must be None for a hash layer (tid2eid given), got a tensor")
        check_tensor("tid2eid", tid2eid, dtype=INDEX_DTYPES, ndim=2)
        check_tensor("tid2eid", tid2eid, shape=(tid2eid.shape[0], top_k))
        check_tensor("token_ids", token_ids, dtype=INDEX_DTYPES, shape=(num_tokens,))
        _check_index_range("tid2eid", tid2eid, num_experts, f"expert ids, E={num_experts}")
        _check_index_range("token_ids", token_ids, tid2eid.shape[0], f"token ids, vocab={tid2eid.shape[0]}")
    check_same_device(x=x, weight=weight, bias=bias, tid2eid=tid2eid, token_ids=token_ids)

    logits = x.float() @ weight.float().T  # [T, dim] @ [dim, E] -> [T, E]
    scores = torch.sqrt(F.softplus(logits))  # [T, E]

    if is_hash:
        experts = tid2eid[token_ids.long()].long()  # [T, top_k], table order
    else:
        key = scores if bias is None else scores + bias  # [T, E], selection only
        # A stable descending sort keeps equal keys in ascending expert-id order.
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # [T, E]
        experts = order[:, :top_k]  # [T, top_k]

    selected = scores.gather(1, experts)  # [T, top_k]
    weights = selected / selected.sum(-1, keepdim=True) * route_scale  # sum over top_k -> [T, 1]
    return weights, experts.to(torch.int32)


def _check_expert(prefix: str, w1: object, w2: object, w3: object, dim: int) -> int:
    """Validate one (w1, w2, w3) triple for hidden size ``dim``; return ``inter``."""
    check_tensor(f"{prefix}w1", w1, dtype=FLOAT_DTYPES, ndim=2)
    inter = w1.shape[0]
    check_tensor(f"{prefix}w1", w1, shape=(inter, dim))
    check_tensor(f"{prefix}w3", w3, dtype=FLOAT_DTYPES, shape=(inter, dim))
    check_tensor(f"{prefix}w2", w2, dtype=FLOAT_DTYPES, shape=(dim, inter))
    return inter


def _swiglu(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    route_weight: torch.Tensor | None,
    swiglu_limit: float | None,
) -> torch.Tensor:
    """The expert math on validated inputs; see :func:`swiglu_expert`."""
    xf = x.float()
    gate = xf @ w1.float().T  # [T, dim] @ [dim, inter] -> [T, inter]
    up = xf @ w3.float().T  # [T, dim] @ [dim, inter] -> [T, inter]
    if swiglu_limit is not None:
        up = up.clamp(-swiglu_limit, swiglu_limit)
        gate = gate.clamp(max=swiglu_limit)
    h = F.silu(gate) * up  # [T, inter]
    if route_weight is not None:
        h = h * route_weight.float()[:, None]  # [T, inter] * [T, 1]
    return h @ w2.float().T  # [T, inter] @ [inter, dim] -> [T, dim]


def swiglu_expert(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    route_weight: torch.Tensor | None = None,
    swiglu_limit: float | None = None,
) -> torch.Tensor:
    """One SwiGLU expert: ``(silu(gate) · up · route_weight) @ W2ᵀ`` with optional clamping.

    Args:
        x: [T, dim] fp32 / bf16 / fp16 tokens.
        w1: [inter, dim] fp32 / bf16 / fp16 gate projection.
        w2: [dim, inter] fp32 / bf16 / fp16 down projection.
        w3: [inter, dim] fp32 / bf16 / fp16 up projection.
        route_weight: fp32 [T] routing weight per token, applied before the down projection,
            or ``None`` (weight 1, as for the shared expert).
        swiglu_limit: positive clamp for routed experts (``up`` to ``[-limit, limit]``,
            ``gate`` to ``<= limit``), or ``None`` for no clamp.

    Returns:
        fp32 [T, dim].
    """
    check_tensor("x", x, dtype=FLOAT_DTYPES, ndim=2)
    _check_expert("", w1, w2, w3, x.shape[1])
    if route_weight is not None:
        check_tensor("route_weight", route_weight, dtype=torch.float32, shape=(x.shape[0],))
    if swiglu_limit is not None:
        swiglu_limit = _check_positive("swiglu_limit", swiglu_limit)
    check_same_device(x=x, w1=w1, w2=w2, w3=w3, route_weight=route_weight)
    return _swiglu(x, w1, w2, w3, route_weight, swiglu_limit)


def moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    routed: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    swiglu_limit: float | None = 10.0,
) -> torch.Tensor:
    """The MoE layer: the routed experts each token selected, weighted, plus the shared expert.

    Args:
        x: [T, dim] fp32 / bf16 / fp16 tokens.
        weights: fp32 [T, top_k] routing weights (from :func:`moe_gate`).
        experts: int32 / int64 [T, top_k] expert ids in ``[0, E)`` (from :func:`moe_gate`).
        routed: ``E`` triples ``(w1, w2, w3)``: w1 / w3 [inter, dim], w2 [dim, inter], each
            fp32 / bf16 / fp16 (dequantised by the caller). Experts no token selected are skipped.
        shared: one ``(w1, w2, w3)`` triple (its own ``inter`` allowed), run on every token
            with weight 1 and no clamp; or ``None``.
        swiglu_limit: clamp of the routed experts (see :func:`swiglu_expert`); ``None`` for none.

    Returns:
        fp32 [T, dim] ``Σ_{k} weights[t, k] · expert_{experts[t, k]}(x[t]) + shared(x[t])``.
    """
    check_tensor("x", x, dtype=FLOAT_DTYPES, ndim=2)
    num_tokens, dim = x.shape
    check_tensor("weights", weights, dtype=torch.float32, ndim=2)
    check_tensor("weights", weights, shape=(num_tokens, weights.shape[1]))
    check_tensor("experts", experts, dtype=INDEX_DTYPES, shape=tuple(weights.shape))
    if isinstance(routed, torch.Tensor) or not isinstance(routed, Sequence) or len(routed) == 0:
        raise TypeError(f"routed must be a non-empty sequence of (w1, w2, w3) triples, got {type(routed).__name__}")
    for e, triple in enumerate(routed):
        if not isinstance(triple, Sequence) or len(triple) != 3:
            raise TypeError(f"routed[{e}] must be a (w1, w2, w3) triple, got {type(triple).__name__}")
        _check_expert(f"routed[{e}].", *triple, dim)
    if shared is not None:
        if not isinstance(shared, Sequence) or len(shared) != 3:
            raise TypeError(f"shared must be a (w1, w2, w3) triple or None, got {type(shared).__name__}")
        _check_expert("shared.", *shared, dim)
    _check_index_range("experts", experts, len(routed), f"expert ids, E={len(routed)}")
    if swiglu_limit is not None:
        swiglu_limit = _check_positive("swiglu_limit", swiglu_limit)
    check_same_device(x=x, weights=weights, experts=experts)

    y = torch.zeros(num_tokens, dim, dtype=torch.float32, device=x.device)  # [T, dim]
    for e, (w1, w2, w3) in enumerate(routed):
        token_idx, slot_idx = torch.nonzero(experts == e, as_tuple=True)  # [n_e], [n_e]
        if token_idx.numel() == 0:
            continue
        route_weight = weights[token_idx, slot_idx]  # [n_e]
        y_e = _swiglu(x[token_idx], w1, w2, w3, route_weight, swiglu_limit)  # [n_e, dim]
        y.index_add_(0, token_idx, y_e)  # scatter-add [n_e, dim] into [T, dim]
    if shared is not None:
        y = y + _swiglu(x, *shared, None, None)  # [T, dim]
    return y
