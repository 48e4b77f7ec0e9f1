"""The V4 block: mHC around CSA / HCA / window attention (with its compressor and indexer) and the MoE.

Every function takes the ``ops`` of :mod:`tilev4.model.backend` and calls only those (the public
reference ops, or the kernels that replace them). Shapes use: ``b`` sequences, ``s`` new tokens per
sequence, ``H`` heads, ``D = 512``, ``G`` output groups, ``HI``/``DI`` indexer heads/dim, ``W = 128``.

One attention call handles ``s`` new tokens of ``b`` sequences whose first new token sits at
``positions[:, 0]`` (each sequence its own, i.e. a ragged batch, when ``s == 1``; equal across the batch
when ``s > 1``, which is how :class:`~tilev4.model.Model` groups its prefills):

1. queries ``q = rope(rmsnorm_noweight(rmsnorm(x Wq_aᵀ) Wq_bᵀ))``, window kv ``kv = fp8sim(rope(rmsnorm(x Wkvᵀ)))``;
2. the window keys are the ``W − 1`` tokens before the first new one, read from the ring, then the new
   tokens (a "stream"); the new kv is then written into the ring;
3. compressed layers run their compressor over the new tokens first (an entry completed by token ``t`` is
   visible to ``t``) and write the entries to the cache; CSA layers also run the indexer compressor and
   score / select ``top-k`` entries, HCA layers take every visible entry;
4. one sparse attention with the sink over window ∪ compressed, inverse RoPE on the output, then
   ``Wo_a[g]`` per group and ``Wo_b``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tilev4.model.backend import Linear, ReferenceOps
from tilev4.model.cache import LayerCache
from tilev4.model.config import Config

__all__ = [
    "AttentionWeights",
    "BlockWeights",
    "CompressorWeights",
    "FFNWeights",
    "HeadWeights",
    "MTPWeights",
    "attention_forward",
    "block_forward",
    "ffn_forward",
]

Tensors = dict[str, torch.Tensor]


def _linear(t: Tensors, name: str) -> Linear:
    return Linear(t[f"{name}.weight"], t.get(f"{name}.scale"))


@dataclass
class CompressorWeights:
    """wkv / wgate: bf16 [coff·D, dim]; ape: fp32 [m, coff·D]; norm: [D]."""

    wkv: Linear
    wgate: Linear
    ape: torch.Tensor
    norm: torch.Tensor

    @classmethod
    def from_tensors(cls, t: Tensors, p: str) -> CompressorWeights:
        return cls(_linear(t, f"{p}wkv"), _linear(t, f"{p}wgate"), t[f"{p}ape"], t[f"{p}norm.weight"])


@dataclass
class AttentionWeights:
    """One attention sub-layer (names as in :mod:`tilev4.model.weights`, prefix ``…attn.``)."""

    ratio: int
    wq_a: Linear
    q_norm: torch.Tensor
    wq_b: Linear
    wkv: Linear
    kv_norm: torch.Tensor
    wo_a: Linear
    wo_b: Linear
    sink: torch.Tensor
    compressor: CompressorWeights | None = None
    index_wq_b: Linear | None = None
    index_weights: Linear | None = None
    index_compressor: CompressorWeights | None = None

    @classmethod
    def from_tensors(cls, t: Tensors, p: str, ratio: int) -> AttentionWeights:
        a = f"{p}attn."
        w = cls(
            ratio,
            _linear(t, f"{a}wq_a"),
            t[f"{a}q_norm.weight"],
            _linear(t, f"{a}wq_b"),
            _linear(t, f"{a}wkv"),
            t[f"{a}kv_norm.weight"],
            _linear(t, f"{a}wo_a"),
            _linear(t, f"{a}wo_b"),
            t[f"{a}attn_sink"],
        )
        if ratio:
            w.compressor = CompressorWeights.from_tensors(t, f"{a}compressor.")
        if ratio == 4:
            w.index_wq_b = _linear(t, f"{a}indexer.wq_b")
            w.index_weights = _linear(t, f"{a}indexer.weights_proj")
            w.index_compressor = CompressorWeights.from_tensors(t, f"{a}indexer.compressor.")
        return w


@dataclass
class FFNWeights:
    """The MoE: gate bf16 [E, dim], bias fp32 [E] (score layers) or tid2eid [vocab, k] (hash layers),
    E routed experts (w1, w2, w3) in packed FP4 and the shared expert (w1, w2, w3) in FP8."""

    gate: torch.Tensor
    bias: torch.Tensor | None
    tid2eid: torch.Tensor | None
    experts: list[tuple[Linear, Linear, Linear]]
    shared: tuple[Linear, Linear, Linear]

    @classmethod
    def from_tensors(cls, t: Tensors, p: str, n_experts: int) -> FFNWeights:
        f = f"{p}ffn."

        def triple(q: str) -> tuple[Linear, Linear, Linear]:
            return _linear(t, f"{q}.w1"), _linear(t, f"{q}.w2"), _linear(t, f"{q}.w3")

        return cls(
            t[f"{f}gate.weight"],
            t.get(f"{f}gate.bias"),
            t.get(f"{f}gate.tid2eid"),
            [triple(f"{f}experts.{e}") for e in range(n_experts)],
            triple(f"{f}shared_experts"),
        )


@dataclass
class BlockWeights:
    """One V4 block: mHC parameters (fn [24, 4·dim], base [24], scale [3]) and norms around each sub-layer."""

    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    hc_attn: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    hc_ffn: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    attn: AttentionWeights
    ffn: FFNWeights

    @classmethod
    def from_tensors(cls, t: Tensors, p: str, ratio: int, n_experts: int) -> BlockWeights:
        def hc(sub: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return t[f"{p}hc_{sub}_fn"], t[f"{p}hc_{sub}_base"], t[f"{p}hc_{sub}_scale"]

        return cls(
            t[f"{p}attn_norm.weight"],
            t[f"{p}ffn_norm.weight"],
            hc("attn"),
            hc("ffn"),
            AttentionWeights.from_tensors(t, p, ratio),
            FFNWeights.from_tensors(t, p, n_experts),
        )


@dataclass
class HeadWeights:
    """The output head's mHC collapse (fn [4, 4·dim], base [4], scale [1]) and final norm [dim]."""

    norm: torch.Tensor
    hc_fn: torch.Tensor
    hc_base: torch.Tensor
    hc_scale: torch.Tensor

    @classmethod
    def from_tensors(cls, t: Tensors, p: str) -> HeadWeights:
        return cls(t[f"{p}norm.weight"], t[f"{p}hc_head_fn"], t[f"{p}hc_head_base"], t[f"{p}hc_head_scale"])


@dataclass
class MTPWeights:
    """An MTP layer: ``x = e_proj(enorm(embed(next)))[:, :, None] + h_proj(hnorm(h))`` → a window-only block
    → its own head collapse and norm (the vocabulary projection is the main ``head.weight``)."""

    e_proj: Linear
    h_proj: Linear
    enorm: torch.Tensor
    hnorm: torch.Tensor
    head: HeadWeights
    block: BlockWeights

    @classmethod
    def from_tensors(cls, t: Tensors, p: str, n_experts: int) -> MTPWeights:
        return cls(
            _linear(t, f"{p}e_proj"),
            _linear(t, f"{p}h_proj"),
            t[f"{p}enorm.weight"],
            t[f"{p}hnorm.weight"],
            HeadWeights.from_tensors(t, p),
            BlockWeights.from_tensors(t, p, 0, n_experts),
        )


# ---------------------------------------------------------------------------------------------- attention


def attention_forward(
    ops: ReferenceOps, cfg: Config, w: AttentionWeights, x: torch.Tensor, positions: torch.Tensor, lc: LayerCache
) -> torch.Tensor:
    """One attention sub-layer over new tokens, updating the layer cache in place.

    Args:
        x: fp32 [b, s, dim], the sub-layer input (after mHC pre and its rmsnorm).
        positions: int64 [b, s], consecutive absolute positions per sequence; ``positions[:, 0]`` equals the
            tokens already in ``lc`` (equal across the batch if ``s > 1``).
        lc: the layer's cache rows for these ``b`` sequences (window ring, compressed entries, states).

    Returns:
        fp32 [b, s, dim].
    """
    b, s, _ = x.shape
    h, d, ratio, eps = cfg.n_heads, cfg.head_dim, w.ratio, cfg.norm_eps
    rope = cfg.rope(ratio)
    # every projection of x in one call (the kernel backend runs them as one GEMM over the stacked weights)
    lins = [w.wq_a, w.wkv]
    if ratio:
        assert w.compressor is not None and lc.compressed is not None and lc.compressor is not None
        lins += [w.compressor.wkv, w.compressor.wgate]
    if ratio == 4:
        assert w.index_compressor is not None and lc.index_keys is not None and lc.index_compressor is not None
        assert w.index_wq_b is not None and w.index_weights is not None
        lins += [w.index_compressor.wkv, w.index_compressor.wgate, w.index_weights]
    xs = ops.linears(x, lins)
    qr = ops.rmsnorm(xs[0], w.q_norm, eps)  # [b, s, q_lora]
    qs = ops.linears(qr, [w.wq_b] if ratio != 4 else [w.wq_b, w.index_wq_b])
    q = qs[0].reshape(b, s, h, d)  # [b, s, H, D]
    q = ops.apply_rope(ops.rmsnorm(q, None, eps), positions, rope)  # per-head norm without weight, then RoPE
    kv = ops.rmsnorm(xs[1], w.kv_norm, eps)  # [b, s, D]
    kv = ops.kv_fp8_simulate(ops.apply_rope(kv, positions, rope))  # [b, s, D] as the cache stores it

    comp_idx = None
    if ratio:  # the compressors over the new tokens' projections, completed entries written into the cache
        cw = w.compressor
        lc.compressor = ops.compress_into(xs[2], xs[3], lc.compressor, cw.ape, cw.norm, ratio, rope, "attention",
                                          lc.compressed)
        if ratio == 4:
            iw = w.index_compressor
            lc.index_compressor = ops.compress_into(xs[4], xs[5], lc.index_compressor, iw.ape, iw.norm, 4, rope,
                                                    "indexer", lc.index_keys)
            hi, di = cfg.index_n_heads, cfg.index_head_dim
            q_idx = qs[1].reshape(b, s, hi, di)  # [b, s, HI, DI]
            w_idx = xs[6] * (di**-0.5 * hi**-0.5)  # [b, s, HI]
            keys = ops.index_keys_view(lc.index_keys, positions)  # [b, n, DI], rows past the visible ones masked
            comp_idx = ops.indexer(q_idx, w_idx, keys, positions, rope, cfg.index_topk)  # [b, s, k]
    # one sparse attention with the sink over window ∪ compressed (writes the new kv into the ring)
    o = ops.attention(q, kv, positions, lc, w.sink, comp_idx, cfg.window_size)  # [b, s, H, D]
    o = ops.apply_rope(o, positions, rope, inverse=True)  # undo the rotation of the value's rope dims
    o = o.reshape(b, s, cfg.o_groups, cfg.heads_per_group * d)  # [b, s, G, H/G·D]
    o = ops.grouped_linear(o, w.wo_a)  # [b, s, G, o_lora]
    return ops.linear(o.flatten(2), w.wo_b)  # [b, s, G·o_lora] @ [G·o_lora, dim] -> [b, s, dim]


# ---------------------------------------------------------------------------------------------- MoE and block


def ffn_forward(
    ops: ReferenceOps, cfg: Config, w: FFNWeights, x: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """The MoE sub-layer: x fp32 [b, s, dim], token_ids int64 [b, s] (hash routing) → fp32 [b, s, dim]."""
    b, s, dim = x.shape
    flat = x.reshape(b * s, dim)  # [T, dim]
    y = ops.ffn(cfg, w, flat, token_ids.reshape(-1))  # [T, dim]
    return y.view(b, s, dim)


def block_forward(
    ops: ReferenceOps,
    cfg: Config,
    w: BlockWeights,
    h: torch.Tensor,
    positions: torch.Tensor,
    token_ids: torch.Tensor,
    lc: LayerCache,
) -> torch.Tensor:
    """One block on the mHC streams h fp32 [b, s, 4, dim] → [b, s, 4, dim] (attention, then MoE)."""
    iters, hc_eps, eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps
    x, post, comb = ops.mhc_pre(h, *w.hc_attn, w.attn_norm, iters, hc_eps, eps)  # [b, s, dim], [b,s,4], [b,s,4,4]
    h = ops.mhc_post(h, attention_forward(ops, cfg, w.attn, x, positions, lc), post, comb)
    x, post, comb = ops.mhc_pre(h, *w.hc_ffn, w.ffn_norm, iters, hc_eps, eps)
    return ops.mhc_post(h, ffn_forward(ops, cfg, w.ffn, x, token_ids), post, comb)
