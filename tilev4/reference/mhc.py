"""Manifold-constrained hyper-connections (mHC) with n = 4 residual streams, in fp32.

Semantics (spec section "mHC"). The residual state is ``h`` [b, s, 4, dim]; the embedding is
copied into all 4 streams. Around every sub-layer F (attention, then MoE):

* ``mix = (flat(h) @ fnᵀ) · rsqrt(mean(flat(h)²) + eps)`` [b, s, 24], ``flat(h)`` [b, s, 4·dim].
* ``pre_i = sigmoid(mix_i·scale0 + base_i) + eps`` (i < 4);
  ``post_i = 2·sigmoid(mix_{4+i}·scale1 + base_{4+i})``;
  ``comb = sinkhorn(mix_{8+4j+k}·scale2 + base_{8+4j+k})`` [4, 4], row j, column k.
* Sinkhorn: softmax over k, ``+ eps``; each column ÷ (its sum + eps); then ``iters − 1`` more
  rounds of (each row ÷ (row sum + eps), each column ÷ (column sum + eps)).
* Sub-layer input ``x = rmsnorm(Σ_i pre_i·h_i)``; update ``h'_k = post_k·F(x) + Σ_j comb[j,k]·h_j``.
* Head: ``pre = sigmoid(mix·scale + base) + eps`` from ``fn`` [4, 4·dim], then the final rmsnorm of
  ``Σ_i pre_i·h_i`` and the fp32 vocabulary projection, for the last position of each sequence.

Dimension glossary:

* ``b`` — batch; ``s`` — tokens per sequence in this call.
* ``n = 4`` — residual streams (:data:`NUM_STREAMS`); stream index ``i``, ``j`` (source), ``k`` (target).
* ``dim`` — hidden size; ``4·dim`` the flattened stream width.
* ``M`` — mix width: ``24 = 4 (pre) + 4 (post) + 16 (comb)`` per sub-layer, ``4`` for the head.
* ``vocab`` — rows of the output projection.
"""

from __future__ import annotations

import torch

from tilev4._checks import check_int, check_same_device, check_tensor
from tilev4.reference.norm import rmsnorm

__all__ = [
    "NUM_STREAMS",
    "mhc_coefficients",
    "mhc_head",
    "mhc_mix",
    "mhc_post",
    "mhc_pre",
    "sinkhorn",
]

NUM_STREAMS = 4
MIX_WIDTH = 2 * NUM_STREAMS + NUM_STREAMS * NUM_STREAMS  # 24: pre, post, comb
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HC_EPS = 1e-6
RMS_EPS = 1e-6


def _check_streams(h: object) -> torch.Tensor:
    """``h`` must be a float [b, s, 4, dim] tensor."""
    check_tensor("h", h, dtype=FLOAT_DTYPES, ndim=4)
    check_tensor("h", h, shape=(None, None, NUM_STREAMS, None))
    return h


def mhc_mix(h: torch.Tensor, fn: torch.Tensor, eps: float = HC_EPS) -> torch.Tensor:
    """The RMS-scaled projection of the flattened streams.

    Args:
        h: [b, s, 4, dim] fp32 / bf16 / fp16 residual streams.
        fn: fp32 [M, 4·dim] projection (M = 24 for a sub-layer, 4 for the head).
        eps: added to the mean square before the rsqrt.

    Returns:
        fp32 [b, s, M] ``(flat(h) @ fnᵀ) · rsqrt(mean(flat(h)²) + eps)``.
    """
    _check_streams(h)
    b, s, n, dim = h.shape
    check_tensor("fn", fn, dtype=torch.float32, ndim=2)
    check_tensor("fn", fn, shape=(fn.shape[0], n * dim))
    check_same_device(h=h, fn=fn)
    flat = h.float().reshape(b, s, n * dim)  # [b, s, 4·dim]
    rms_inv = torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)  # mean over 4·dim -> [b, s, 1]
    return (flat @ fn.T) * rms_inv  # [b, s, 4·dim] @ [4·dim, M] -> [b, s, M]


def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = HC_EPS) -> torch.Tensor:
    """Sinkhorn normalisation of ``logits`` towards a doubly stochastic matrix.

    ``comb = softmax(logits, k) + eps``; each column ÷ (column sum + eps); then ``iters − 1``
    rounds of (each row ÷ (row sum + eps), each column ÷ (column sum + eps)). The last step is a
    column normalisation, so columns sum to ``1 − O(eps)``; rows only converge.

    Args:
        logits: [..., n, n] fp32 / bf16 / fp16, ``logits[..., j, k]`` (row j, column k); n = 4 in V4.
        iters: number of column normalisations, ``>= 1`` (20 in V4).
        eps: the additive epsilon of the softmax and of every divisor.

    Returns:
        fp32 [..., n, n].
    """
    check_tensor("logits", logits, dtype=FLOAT_DTYPES)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must have shape [..., n, n], got {list(logits.shape)}")
    check_int("iters", iters, min_value=1)
    comb = torch.softmax(logits.float(), dim=-1) + eps  # softmax over k -> [..., n, n]
    comb = comb / (comb.sum(-2, keepdim=True) + eps)  # column sums, over j -> [..., 1, n]
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)  # row sums, over k -> [..., n, 1]
        comb = comb / (comb.sum(-2, keepdim=True) + eps)  # column sums, over j -> [..., 1, n]
    return comb


def mhc_coefficients(
    mix: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    iters: int = 20,
    eps: float = HC_EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a sub-layer's ``mix`` into the pre, post and comb coefficients.

    Args:
        mix: [b, s, 24] fp32 / bf16 / fp16 (from :func:`mhc_mix`).
        base: fp32 [24] bias.
        scale: fp32 [3] multipliers of the pre, post and comb parts.
        iters: Sinkhorn iterations (``>= 1``).
        eps: added to ``pre`` and used by :func:`sinkhorn`.

    Returns:
        ``(pre, post, comb)``: fp32 [b, s, 4], fp32 [b, s, 4] and fp32 [b, s, 4, 4], where
        ``comb[..., j, k]`` comes from ``mix[..., 8 + 4j + k]``.
    """
    n = NUM_STREAMS
    check_tensor("mix", mix, dtype=FLOAT_DTYPES, ndim=3)
    check_tensor("mix", mix, shape=(None, None, MIX_WIDTH))
    check_tensor("base", base, dtype=torch.float32, shape=(MIX_WIDTH,))
    check_tensor("scale", scale, dtype=torch.float32, shape=(3,))
    check_int("iters", iters, min_value=1)
    check_same_device(mix=mix, base=base, scale=scale)
    mixf = mix.float()
    pre = torch.sigmoid(mixf[..., :n] * scale[0] + base[:n]) + eps  # [b, s, 4]
    post = 2 * torch.sigmoid(mixf[..., n : 2 * n] * scale[1] + base[n : 2 * n])  # [b, s, 4]
    comb_logits = mixf[..., 2 * n :] * scale[2] + base[2 * n :]  # [b, s, 16]
    comb = sinkhorn(comb_logits.unflatten(-1, (n, n)), iters, eps)  # [b, s, 4 (j), 4 (k)]
    return pre, post, comb


def _check_norm_weight(name: str, w: object, dim: int) -> None:
    check_tensor(name, w, dtype=FLOAT_DTYPES, shape=(dim,))


def mhc_pre(
    h: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    norm_weight: torch.Tensor,
    iters: int = 20,
    eps: float = HC_EPS,
    norm_eps: float = RMS_EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse the 4 streams into a sub-layer's input and compute its post / comb coefficients.

    Args:
        h: [b, s, 4, dim] fp32 / bf16 / fp16 residual streams.
        fn: fp32 [24, 4·dim]; base: fp32 [24]; scale: fp32 [3] — the sub-layer's mHC parameters.
        norm_weight: [dim] weight of the sub-layer's input rmsnorm (any float dtype).
        iters: Sinkhorn iterations; eps: the mHC epsilon; norm_eps: the rmsnorm epsilon.

    Returns:
        ``(x, post, comb)``: fp32 [b, s, dim] ``rmsnorm(Σ_i pre_i·h_i, norm_weight)``,
        fp32 [b, s, 4] and fp32 [b, s, 4, 4] for :func:`mhc_post`.
    """
    _check_streams(h)
    check_tensor("fn", fn, dtype=torch.float32, shape=(MIX_WIDTH, NUM_STREAMS * h.shape[-1]))
    _check_norm_weight("norm_weight", norm_weight, h.shape[-1])
    check_same_device(h=h, norm_weight=norm_weight)
    mix = mhc_mix(h, fn, eps)  # [b, s, 24]
    pre, post, comb = mhc_coefficients(mix, base, scale, iters, eps)
    collapsed = (pre.unsqueeze(-1) * h.float()).sum(-2)  # Σ over the 4 streams -> [b, s, dim]
    return rmsnorm(collapsed, norm_weight, norm_eps), post, comb


def mhc_post(h: torch.Tensor, f_out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Expand a sub-layer's output back into the 4 streams and mix the residual.

    Args:
        h: [b, s, 4, dim] fp32 / bf16 / fp16 residual streams (the sub-layer's input state).
        f_out: [b, s, dim] fp32 / bf16 / fp16 sub-layer output ``F(x)``.
        post: fp32 [b, s, 4]; comb: fp32 [b, s, 4, 4] (from :func:`mhc_pre`).

    Returns:
        fp32 [b, s, 4, dim] ``h'_k = post_k·f_out + Σ_j comb[j, k]·h_j``.
    """
    _check_streams(h)
    b, s, n, dim = h.shape
    check_tensor("f_out", f_out, dtype=FLOAT_DTYPES, shape=(b, s, dim))
    check_tensor("post", post, dtype=torch.float32, shape=(b, s, n))
    check_tensor("comb", comb, dtype=torch.float32, shape=(b, s, n, n))
    check_same_device(h=h, f_out=f_out, post=post, comb=comb)
    residual = torch.einsum("bsjk,bsjd->bskd", comb, h.float())  # Σ over j -> [b, s, 4, dim]
    return post.unsqueeze(-1) * f_out.float().unsqueeze(-2) + residual  # [b, s, 4, dim]


def mhc_head(
    h: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    norm_weight: torch.Tensor,
    head_weight: torch.Tensor,
    eps: float = HC_EPS,
    norm_eps: float = RMS_EPS,
) -> torch.Tensor:
    """The output head: collapse the streams of the LAST position, final rmsnorm, vocab projection.

    Args:
        h: [b, s, 4, dim] fp32 / bf16 / fp16 residual streams, ``s >= 1``.
        fn: fp32 [4, 4·dim]; base: fp32 [4]; scale: fp32 [1] — the head's mHC parameters.
        norm_weight: [dim] final rmsnorm weight (any float dtype).
        head_weight: [vocab, dim] fp32 / bf16 / fp16 vocabulary projection (upcast to fp32).
        eps: the mHC epsilon; norm_eps: the rmsnorm epsilon.

    Returns:
        fp32 [b, vocab] logits of position ``s − 1`` of each sequence.
    """
    _check_streams(h)
    _, s, n, dim = h.shape
    if s == 0:
        raise ValueError(f"h must hold at least one position (s >= 1), got shape {list(h.shape)}")
    check_tensor("fn", fn, dtype=torch.float32, shape=(n, n * dim))
    check_tensor("base", base, dtype=torch.float32, shape=(n,))
    check_tensor("scale", scale, dtype=torch.float32, shape=(1,))
    _check_norm_weight("norm_weight", norm_weight, dim)
    check_tensor("head_weight", head_weight, dtype=FLOAT_DTYPES, ndim=2)
    check_tensor("head_weight", head_weight, shape=(head_weight.shape[0], dim))
    check_same_device(h=h, fn=fn, base=base, scale=scale, norm_weight=norm_weight, head_weight=head_weight)
    h_last = h[:, -1:]  # [b, 1, 4, dim]
    mix = mhc_mix(h_last, fn, eps)  # [b, 1, 4]
    pre = torch.sigmoid(mix * scale[0] + base) + eps  # [b, 1, 4]
    collapsed = (pre.unsqueeze(-1) * h_last.float()).sum(-2)  # Σ over the 4 streams -> [b, 1, dim]
    x = rmsnorm(collapsed[:, 0], norm_weight, norm_eps)  # [b, dim]
    return x @ head_weight.float().T  # [b, dim] @ [dim, vocab] -> [b, vocab]
