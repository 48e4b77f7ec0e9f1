"""The ops the runtime calls, per device: the switch point between the reference and the TileLang kernels.

:class:`ReferenceOps` runs every op of the model on :mod:`tilev4.reference` (plain fp32 torch, any
device). :class:`KernelOps` is what CUDA tensors get: each op below calls the public TileLang op that
replaces it, casting at the boundary where a kernel wants bf16:

=========================  =============================================================================
op                         on CUDA (:class:`KernelOps`)
=========================  =============================================================================
rmsnorm                    ``tilev4.rmsnorm`` (bf16 in / out, fp32 math; no-weight norms get ones)
mhc_pre / mhc_post /       ``tilev4.mhc_pre`` / ``tilev4.mhc_post`` / ``tilev4.mhc_head_pre`` (fp32 streams)
mhc_head                   then the fp32 vocabulary projection (:meth:`KernelOps.linear`)
attention                  ``tilev4.csa_attention`` (window ∪ top-k), ``tilev4.hca_attention`` (window ∪
                           all compressed) or ``tilev4.sparse_attention`` (window only), on a bf16 cache
ffn (MoE)                  ``tilev4.moe`` (routing + grouped SwiGLU GEMMs, bf16 weights, fp32 out)
compressor                 ``tilev4.compress_prefill`` / ``tilev4.compress_decode`` (fused, into the cache)
indexer                    ``tilev4.indexer_topk`` (FP8 logits + radix top-k); the queries' Hadamard rotation
                           on ``tilev4.linear``, their RoPE and FP4 simulation elementwise torch
linear / grouped_linear    ``tilev4.linear`` / ``tilev4.grouped_linear``: fp32 activations split exactly into
                           three bf16 parts against the weight in bf16 (exact for the checkpoint's FP8 and bf16
                           weights), fp32 accumulation on the tensor cores
rope, FP8 simulation       reference math (elementwise)
=========================  =============================================================================

Batch invariance (``KernelOps(batch_invariant=True)``): every op then gives a sequence the same bits
whatever else is in the batch — attention with its fixed split size, the indexer's logits with one query per
CTA; the linears, rmsnorm, mHC, MoE, the compressor and the query preparation are invariant by construction
in both modes (a row is computed alone, with a config that never depends on the number of rows).
:meth:`KernelOps.non_invariant_ops` lists what is not invariant in the current mode.

Every op has the signature of the reference function it stands for (see that function's docstring for
shapes), except :meth:`ReferenceOps.linear` and :meth:`ReferenceOps.grouped_linear`, which take a
:class:`Linear` (the weight as stored in the checkpoint, plus its scale), and the layer-level ops
:meth:`~ReferenceOps.attention`, :meth:`~ReferenceOps.compressor`, :meth:`~ReferenceOps.indexer` and
:meth:`~ReferenceOps.ffn`, documented where they are defined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from tilev4.reference import attention as _attention
from tilev4.reference import compressor as _compressor
from tilev4.reference import indexer as _indexer
from tilev4.reference import mhc as _mhc
from tilev4.reference import moe as _moe
from tilev4.reference.norm import hadamard_matrix, rmsnorm
from tilev4.reference.quant import dequant_fp4_weight, dequant_fp8_weight, fp4_e2m1_simulate, kv_fp8_simulate
from tilev4.reference.rope import apply_rope

__all__ = ["LOGITS_REL_TOL", "KernelOps", "Linear", "ReferenceOps", "ops_for_device", "read_window", "write_window"]

#: Relative L2 error per row allowed between the kernel path's logits and the reference path's (random weights,
#: no discrete choice flipped). The kernels round activations to bf16 at their boundaries (rmsnorm in / out,
#: attention q / kv / o, the MoE input and hidden), ~2^-9 each, and a random-weight model amplifies them:
#: emulating exactly those roundings on the CPU (tests/test_model_backend.py) gave at most 3.2e-2 on
#: ``small`` (1e-2 typical, the worst on a 17-token prompt) and 2.9e-2 on ``tiny``; the attention kernels'
#: bf16 probabilities add a little. Wiring errors are far above: a CSA output of zeros gave 0.2-0.65, MoE
#: outputs of the wrong tokens ~1.1. Subtle key-set or coefficient errors are NOT visible at this level (a
#: window one key short or a transposed comb moved the logits by 1-3e-2, like the roundings): the kernel
#: tests catch those.
LOGITS_REL_TOL = 0.1


@dataclass
class Linear:
    """A linear layer's weight as the checkpoint stores it.

    Attributes:
        weight: [N, K] float8_e4m3fn (FP8, with ``scale`` [⌈N/128⌉, ⌈K/128⌉] e8m0), [N, K/2] int8/uint8
            (packed FP4, with ``scale`` [N, K/32] e8m0), or [N, K] bf16/fp32 (``scale`` None).
        scale: the e8m0 block scales, or None.
    """

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _dense64: torch.Tensor | None = field(default=None, repr=False)

    def dense(self) -> torch.Tensor:
        """The dequantised fp32 weight [N, K] (computed once, then cached)."""
        if self._dense is None:
            w = self.weight
            if self.scale is None:
                self._dense = w.float()
            elif w.dtype == torch.float8_e4m3fn:
                self._dense = dequant_fp8_weight(w, self.scale, 128)
            else:
                self._dense = dequant_fp4_weight(w, self.scale, 32)
        return self._dense

    def dense64(self) -> torch.Tensor:
        """:meth:`dense` in fp64 (exact: every stored value is an fp32 number), cached."""
        if self._dense64 is None:
            self._dense64 = self.dense().double()
        return self._dense64



# ---------------------------------------------------------------------------------------------- window ring


def read_window(
    ring: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, window: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The window key stream of ``s`` new tokens, read from the ring BEFORE the new tokens are written.

    Args:
        ring: [b, R, D] (token p of a sequence in slot p % R, R >= window − 1).
        kv: [b, s, D] the new tokens' kv; positions: int64 [b, s] consecutive per sequence.
        window: W; dtype: dtype of the stream.

    Returns:
        ``(stream, idx, start)``: stream [b, W − 1 + s, D] (row r ↔ position ``start + r``; rows before
        position 0 are never indexed), idx int32 [b, s, W] rows of the stream (−1 before position 0) and
        start int64 [b] = ``positions[:, 0] − (W − 1)``.
    """
    b, r = ring.shape[0], ring.shape[1]
    base = positions[:, :1] - (window - 1)  # [b, 1] position of stream row 0
    prior_pos = base + torch.arange(window - 1, device=kv.device)  # [b, W-1]
    rows = torch.arange(b, device=kv.device).unsqueeze(1)  # [b, 1]
    prior = ring[rows, prior_pos.remainder(r)].to(dtype)  # [b, W-1, D]
    stream = torch.cat([prior, kv.to(dtype)], dim=1)  # [b, W-1+s, D]
    # the window key set of query t, positions t-W+1 … t (as reference.window_indices, without its host-side
    # validation: the runtime's positions are valid by construction), as stream rows; -1 before position 0
    pos = positions.unsqueeze(-1) + torch.arange(-window + 1, 1, device=kv.device)  # [b, s, W]
    idx = torch.where(pos >= 0, pos - base.unsqueeze(-1), -1)  # [b, s, W] stream rows
    return stream, idx.to(torch.int32), base[:, 0]


def write_window(ring: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor) -> None:
    """ring[b, p % R] = kv of position p, for the last min(s, R) new tokens (earlier ones would be overwritten)."""
    r = ring.shape[1]
    keep = min(kv.shape[1], r)
    rows = torch.arange(ring.shape[0], device=kv.device).unsqueeze(1)  # [b, 1]
    ring[rows, positions[:, -keep:].remainder(r)] = kv[:, -keep:].to(ring.dtype)


# ---------------------------------------------------------------------------------------------- reference


class ReferenceOps:
    """Every op on :mod:`tilev4.reference` (fp32 math, any device)."""

    name = "reference"
    batch_invariant = False
    #: dtype of the window ring and the compressed entries in the KV cache.
    cache_dtype = torch.float32

    @staticmethod
    def linear(x: torch.Tensor, lin: Linear) -> torch.Tensor:
        """``x @ Wᵀ`` rounded to fp32: x [..., K], W [N, K] → fp32 [..., N].

        Accumulated in fp64 and rounded once: a CPU BLAS picks its blocking (and so its fp32 summation
        order) by the number of rows, which would make a token's activations depend on how many tokens
        share the call (prefill vs decode) by an ulp — enough to move an FP8/FP4-simulated value across a
        rounding boundary now and then. With fp64 accumulation the rounded result is the same for any M
        (up to a ~1e-16 relative chance).
        """
        return (x.double() @ lin.dense64().T).float()  # [..., K] @ [K, N] -> [..., N]

    def linears(self, x: torch.Tensor, lins: list[Linear]) -> list[torch.Tensor]:
        """``[linear(x, l) for l in lins]``: the projections of one input (a backend may run them as one GEMM)."""
        return [self.linear(x, lin) for lin in lins]

    @staticmethod
    def grouped_linear(x: torch.Tensor, lin: Linear) -> torch.Tensor:
        """Group g of ``x`` through rows ``g·R … g·R + R − 1`` of W: x [..., G, K], W [G·R, K] → fp32 [..., G, R]
        (fp64 accumulation, as :meth:`linear`)."""
        g, k = x.shape[-2], x.shape[-1]
        w = lin.dense64().view(g, -1, k)  # [G, R, K]
        return torch.einsum("...gk,grk->...gr", x.double(), w).float()  # [..., G, K] @ [G, K, R] -> [..., G, R]

    rmsnorm = staticmethod(rmsnorm)
    apply_rope = staticmethod(apply_rope)
    kv_fp8_simulate = staticmethod(kv_fp8_simulate)
    mhc_pre = staticmethod(_mhc.mhc_pre)
    mhc_post = staticmethod(_mhc.mhc_post)
    mhc_head = staticmethod(_mhc.mhc_head)

    def compressor(
        self,
        kv: torch.Tensor,
        gate: torch.Tensor,
        state: _compressor.CompressorState,
        ape: torch.Tensor,
        norm: torch.Tensor,
        ratio: int,
        rope: Any,
        quant: str,
    ) -> tuple[Any, ...]:
        """One compressor over ``s`` new tokens: kv / gate [b, s, coff·D] (projected), ``state`` of the b sequences.

        ``s == 1`` is a ragged decode step (:func:`~tilev4.reference.compressor.compressor_decode_step`,
        returns ``(entries [b, D], emitted [b], index [b], new_state)``); ``s > 1`` a prefill from a common
        position (:func:`~tilev4.reference.compressor.compressor_prefill`, returns ``(entries [b, E, D],
        new_state)``).
        """
        if kv.shape[1] == 1:
            return _compressor.compressor_decode_step(kv[:, 0], gate[:, 0], state, ape, norm, ratio, rope, quant)
        return _compressor.compressor_prefill(kv, gate, ape, norm, ratio, rope, quant, state)

    def compress_into(
        self,
        kv: torch.Tensor,
        gate: torch.Tensor,
        state: _compressor.CompressorState,
        ape: torch.Tensor,
        norm: torch.Tensor,
        ratio: int,
        rope: Any,
        quant: str,
        store: torch.Tensor,
    ) -> _compressor.CompressorState:
        """One compressor over ``s`` new tokens, completed entries written into ``store`` [b, n, D]; returns the
        new state. Entry ``i`` of sequence ``j`` goes to ``store[j, i]``; ``s == 1`` is a ragged decode step,
        ``s > 1`` a prefill (all sequences at ``state.num_tokens``, equal on this path)."""
        if kv.shape[1] == 1:
            entries, emitted, index, new_state = self.compressor(kv, gate, state, ape, norm, ratio, rope, quant)
            if store.shape[1]:  # a masked write (no host sync): rows that emitted nothing write their old value
                rows = torch.arange(store.shape[0], device=store.device)
                at = index.long().clamp(0, store.shape[1] - 1)  # [b]
                store[rows, at] = torch.where(emitted.unsqueeze(1), entries.to(store.dtype), store[rows, at])
            return new_state
        c0 = int(state.num_tokens[0]) // ratio
        entries, new_state = self.compressor(kv, gate, state, ape, norm, ratio, rope, quant)  # [b, E, D]
        store[:, c0 : c0 + entries.shape[1]] = entries.to(store.dtype)
        return new_state

    @staticmethod
    def index_keys_view(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The indexer keys [b, cap // 4, DI] the indexer scores: the rows visible to the last query of any
        sequence (a host sync; entries a query may not see are masked inside the indexer)."""
        n_c = int(((positions[:, -1] + 1) // 4).max())
        return keys[:, :n_c]

    def indexer(
        self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, rope: Any, top_k: int
    ) -> torch.Tensor:
        """The lightning indexer: q [b, s, HI, DI] (projected), w [b, s, HI] (scaled head weights),
        keys [b, n_c, DI] → the selected compressed entries int32 [b, s, top_k] (−1 padded)."""
        q = _indexer.indexer_prepare_queries(q, positions, rope)  # RoPE, Hadamard, FP4
        scores = _indexer.indexer_scores(q, w, keys, positions, 4)  # [b, s, n_c]
        return _indexer.indexer_topk(scores, top_k)

    def attention(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        positions: torch.Tensor,
        lc: Any,
        sink: torch.Tensor,
        comp_idx: torch.Tensor | None,
        window: int,
    ) -> torch.Tensor:
        """One sparse attention with the sink over the window ∪ the layer's compressed key set.

        Args:
            q: [b, s, H, D] roped, normalised queries; kv: [b, s, D] the new tokens' kv (as the cache stores
                it); positions: int64 [b, s].
            lc: the layer's :class:`~tilev4.model.cache.LayerCache`; the new kv is written into its ring.
            sink: fp32 [H]. comp_idx: int32 [b, s, k] entries chosen by the indexer (CSA layers), else None
                (HCA layers take every visible entry; window layers none).
            window: W.

        Returns:
            fp32 [b, s, H, D].
        """
        stream, win_idx, _ = read_window(lc.window, kv, positions, window)  # [b, W-1+s, D], [b, s, W]
        write_window(lc.window, kv, positions)
        if lc.ratio == 0:
            return _attention.sparse_attention(q, stream, sink, win_idx)
        n_c = int(((positions[:, -1] + 1) // lc.ratio).max())  # entries visible to the last query of any sequence
        compressed = lc.compressed[:, :n_c]  # [b, n_c, D]
        if comp_idx is None:
            comp_idx = _attention.compressed_indices(positions, lc.ratio, n_c)  # [b, s, n_c], all visible
        kv_all, idx = _attention.concat_key_sets(stream, compressed.float(), win_idx, comp_idx)
        return _attention.sparse_attention(q, kv_all, sink, idx)  # [b, s, H, D]

    def ffn(self, cfg: Any, w: Any, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The MoE on x [T, dim] with the layer's :class:`~tilev4.model.layers.FFNWeights`; token_ids int64 [T]
        (hash layers) → fp32 [T, dim]."""
        weights, experts = _moe.moe_gate(
            x, w.gate, w.bias, cfg.n_activated_experts, cfg.route_scale, w.tid2eid,
            token_ids if w.tid2eid is not None else None,
        )
        routed = [(w1.dense(), w2.dense(), w3.dense()) for w1, w2, w3 in w.experts]
        shared = (w.shared[0].dense(), w.shared[1].dense(), w.shared[2].dense())
        return _moe.moe(x, weights, experts, routed, shared, cfg.swiglu_limit or None)  # [T, dim]

    def non_invariant_ops(self) -> dict[str, str]:
        """Ops whose result for a sequence may depend on the other sequences of the batch: op → reason."""
        return {"all": "the reference path makes no batch-invariance promise (torch picks kernels by shape)"}


# ---------------------------------------------------------------------------------------------- kernels

class KernelOps(ReferenceOps):
    """The CUDA backend: the public TileLang ops (see the module docstring for the mapping).

    Args:
        batch_invariant: select the batch-invariant variants (bitwise the same result for a sequence
            whatever else shares the batch), at some cost in speed.
    """

    name = "tilelang"
    cache_dtype = torch.bfloat16

    def __init__(self, batch_invariant: bool = False) -> None:
        self.batch_invariant = bool(batch_invariant)
        self._converted: dict[tuple[int, str], tuple[torch.Tensor, Any]] = {}
        self._ones: dict[tuple[int, str], torch.Tensor] = {}
        self._hadamard: dict[tuple[int, str], torch.Tensor] = {}
        self._stacked: dict[tuple[int, ...], tuple[list[torch.Tensor], torch.Tensor, list[int]]] = {}

    def __repr__(self) -> str:
        return f"KernelOps(batch_invariant={self.batch_invariant})"

    def _cached(self, t: torch.Tensor, kind: str, make: Any) -> Any:
        """``make(t)`` computed once per (tensor, kind) (weights converted for a kernel)."""
        key = (id(t), kind)
        hit = self._converted.get(key)
        if hit is None or hit[0] is not t:
            hit = (t, make(t))
            self._converted[key] = hit
        return hit[1]

    def _f32(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.float32 and t.is_contiguous():
            return t
        return self._cached(t, "f32", lambda v: v.float().contiguous())

    # -- linears: the split-bf16 fp32 linear kernel (batch-invariant by construction) ---------------------

    @staticmethod
    def _exact_bf16(v: torch.Tensor, what: str) -> torch.Tensor:
        """``v`` (a dequantised weight) in bf16; it must be exact (FP8 weights times power-of-two block scales,
        bf16 projections): the kernel then computes with the checkpoint's own weight."""
        wb = v.to(torch.bfloat16).contiguous()
        if not torch.equal(wb.float(), v.float()):
            raise ValueError(f"{what}: the weight is not exactly representable in bf16 (dtype {v.dtype})")
        return wb

    def _bf16(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """:meth:`_exact_bf16` of ``t``, made once."""
        return self._cached(t, "bf16", lambda v: self._exact_bf16(v, what))

    def _linear_weight(self, lin: Linear) -> torch.Tensor:
        return self._cached(lin.weight, "linear_bf16", lambda _: self._exact_bf16(lin.dense(), "linear"))

    def linear(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:  # type: ignore[override]
        """``tilev4.linear``: fp32 x @ the weight in bf16 (exact), fp32 out — the reference's result up to
        the fp32 order of the K-sum, and the same bits for a row whatever the other rows (both modes)."""
        import tilev4

        return tilev4.linear(x, self._linear_weight(lin))

    def linears(self, x: torch.Tensor, lins: list[Linear]) -> list[torch.Tensor]:  # type: ignore[override]
        """One ``tilev4.linear`` over the stacked bf16 weights (made once per list), split along N: each output
        column is computed alone, with the config of K, so every result is bitwise the one :meth:`linear` gives
        — in one launch with ⌈ΣN / block_n⌉ CTAs instead of one small grid per weight."""
        import tilev4

        if len(lins) == 1:
            return [self.linear(x, lins[0])]
        key = tuple(id(lin.weight) for lin in lins)
        hit = self._stacked.get(key)
        if hit is None or any(a is not lin.weight for a, lin in zip(hit[0], lins)):
            w = torch.cat([self._exact_bf16(lin.dense(), "linear") for lin in lins])  # [ΣN, K]
            hit = self._stacked[key] = ([lin.weight for lin in lins], w, [lin.weight.shape[0] for lin in lins])
        y = tilev4.linear(x, hit[1])  # [..., ΣN]
        return list(y.split(hit[2], dim=-1))

    def grouped_linear(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:  # type: ignore[override]
        """``tilev4.grouped_linear`` (as :meth:`ReferenceOps.grouped_linear`)."""
        import tilev4

        return tilev4.grouped_linear(x, self._linear_weight(lin))

    # -- rmsnorm and mHC: kernels (batch-invariant by construction) -----------------------------------

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:  # type: ignore[override]
        """``tilev4.rmsnorm`` on bf16(x) (a no-weight norm uses ones); returns the bf16 result as fp32."""
        import tilev4

        d = x.shape[-1]
        if weight is None:
            w = self._ones.get((d, str(x.device)))
            if w is None:
                w = self._ones[(d, str(x.device))] = torch.ones(d, device=x.device)
        else:
            w = self._f32(weight)
        return tilev4.rmsnorm(x.to(torch.bfloat16).contiguous(), w, eps).float()

    def mhc_pre(self, h, fn, base, scale, norm_weight, iters=20, eps=1e-6, norm_eps=1e-6):  # type: ignore[override]
        """``tilev4.mhc_pre`` on the fp32 streams."""
        import tilev4

        return tilev4.mhc_pre(h.float().contiguous(), self._f32(fn), self._f32(base), self._f32(scale),
                              self._f32(norm_weight), iters, eps, norm_eps)

    def mhc_post(self, h, f_out, post, comb):  # type: ignore[override]
        """``tilev4.mhc_post`` (fp32 out)."""
        import tilev4

        return tilev4.mhc_post(h.float().contiguous(), f_out.float().contiguous(), post, comb)

    def mhc_head(self, h, fn, base, scale, norm_weight, head_weight, eps=1e-6, norm_eps=1e-6):  # type: ignore[override]
        """``tilev4.mhc_head_pre`` of the last position, then the vocabulary projection (``tilev4.linear``)."""
        import tilev4

        x = tilev4.mhc_head_pre(h[:, -1:].float().contiguous(), self._f32(fn), self._f32(base), self._f32(scale),
                                self._f32(norm_weight), eps, norm_eps)[:, 0]  # [b, dim]
        return tilev4.linear(x, self._bf16(head_weight, "head"))  # [b, dim] @ [dim, vocab] -> [b, vocab]

    # -- attention: kernels on the bf16 cache ----------------------------------------------------------

    def attention(self, q, kv, positions, lc, sink, comp_idx, window):  # type: ignore[override]
        """``tilev4.sparse_attention`` (window layers: the window stream with its index list),
        ``tilev4.csa_attention`` (window stream ∪ top-k) or ``tilev4.hca_attention`` (window stream ∪ every
        visible entry), on bf16 q / cache; returns fp32 [b, s, H, D]."""
        import tilev4

        b = q.shape[0]
        stream, win_idx, start = read_window(lc.window, kv, positions, window, torch.bfloat16)
        write_window(lc.window, kv, positions)
        qb = q.to(torch.bfloat16).contiguous()
        sink = self._f32(sink)
        bi = self.batch_invariant
        if lc.ratio == 0:
            o = tilev4.sparse_attention(qb, stream, sink, win_idx, batch_invariant=bi, validate=False)
            return o.float()
        comp = lc.compressed.to(torch.bfloat16).contiguous()  # [b, cap // m, D], rows past n_c never read
        if comp.shape[1] == 0:  # a cache shorter than one block: one zero row (never visible)
            comp = torch.zeros(b, 1, comp.shape[2], dtype=torch.bfloat16, device=q.device)
        pos32 = positions.to(torch.int32).contiguous()
        start32 = start.to(torch.int32).contiguous()
        if lc.ratio == 4:
            assert comp_idx is not None
            o = tilev4.csa_attention(qb, stream, comp, comp_idx.to(torch.int32).contiguous(), sink, pos32, start32,
                                     batch_invariant=bi, validate=False)
        else:
            o = tilev4.hca_attention(qb, stream, comp, sink, pos32, start32, batch_invariant=bi, validate=False)
        return o.float()

    # -- MoE: kernels ---------------------------------------------------------------------------------

    def _moe_weights(self, w: Any) -> tuple[torch.Tensor, ...]:
        def make(_: torch.Tensor) -> tuple[torch.Tensor, ...]:
            w1 = torch.stack([e[0].dense() for e in w.experts]).bfloat16()  # [E, inter, dim], exact: FP4·2^k
            w2 = torch.stack([e[1].dense() for e in w.experts]).bfloat16()  # [E, dim, inter]
            w3 = torch.stack([e[2].dense() for e in w.experts]).bfloat16()
            shared = tuple(lin.dense().bfloat16().contiguous() for lin in w.shared)  # FP8·2^k: exact in bf16
            tid = None if w.tid2eid is None else w.tid2eid.to(torch.int32).contiguous()
            bias = None if w.bias is None else w.bias.float().contiguous()
            return (w.gate.float().contiguous(), bias, w1, w2, w3, shared, tid)

        return self._cached(w.gate, "moe", make)

    def ffn(self, cfg, w, x, token_ids):  # type: ignore[override]
        """``tilev4.moe`` on bf16(x) with the expert weights dequantised to bf16 (exact), fp32 out."""
        import tilev4

        gate, bias, w1, w2, w3, shared, tid = self._moe_weights(w)
        return tilev4.moe(
            x.to(torch.bfloat16).contiguous(), gate, bias, w1, w2, w3, shared,
            top_k=cfg.n_activated_experts, route_scale=cfg.route_scale, swiglu_limit=cfg.swiglu_limit or None,
            tid2eid=tid, token_ids=None if tid is None else token_ids.to(torch.int32).contiguous(),
            out_dtype=torch.float32, validate=False,
        )

    # -- compressor and indexer -------------------------------------------------------------------------------

    def compress_into(self, kv, gate, state, ape, norm, ratio, rope, quant, store):  # type: ignore[override]
        """``tilev4.compress_prefill`` / ``tilev4.compress_decode``: pooling, rmsnorm, RoPE and the quantisation
        simulation fused, written straight into ``store``. The decode step updates ``state`` in place. Both are
        batch-invariant by construction (a sequence's entries never depend on the other sequences)."""
        import tilev4

        kv, gate = kv.float().contiguous(), gate.float().contiguous()
        ape, norm = ape.float().contiguous(), norm.float().contiguous()
        if kv.shape[1] == 1:
            # validate=False: no host sync (the runtime checked the room in the cache before the step)
            tilev4.compress_decode(kv[:, 0].contiguous(), gate[:, 0].contiguous(), ape, norm, store, state, ratio,
                                   quant=quant, rope=rope, validate=False)
            return state
        return tilev4.compress_prefill(kv, gate, ape, norm, store, ratio, quant=quant, rope=rope, state=state)

    @staticmethod
    def index_keys_view(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """All ``cap // 4`` rows: a shape that does not depend on the lengths, so a decode step has no host sync
        and can be replayed as a CUDA graph (the indexer masks the rows a query may not see)."""
        return keys

    def _prepare_queries(self, q: torch.Tensor, positions: torch.Tensor, rope: Any) -> torch.Tensor:
        """:func:`tilev4.reference.indexer_prepare_queries` with the Hadamard rotation on ``tilev4.linear`` (the
        ±1 matrix in bf16 is exact; the fp32 result is scaled by n^-1/2 as the reference does): RoPE and the FP4
        simulation are elementwise / per block, so a query's bits never depend on the other queries."""
        import tilev4

        d = q.shape[-1]
        x = apply_rope(q.float(), positions, rope)  # [b, s, HI, d]
        key = (d, str(q.device))
        hm = self._hadamard.get(key)
        if hm is None:
            hm = self._hadamard[key] = hadamard_matrix(d).to(device=q.device, dtype=torch.bfloat16)
        x = tilev4.linear(x, hm) * (1.0 / math.sqrt(d))  # x @ H (H symmetric), as reference.hadamard_rotate
        return fp4_e2m1_simulate(x, block=32)

    def indexer(self, q, w, keys, positions, rope, top_k):  # type: ignore[override]
        """The indexer kernels: FP8 logits on the tensor cores (exact for the FP4-simulated q / keys) and the
        radix top-k, after :meth:`_prepare_queries`; both are batch-invariant in every build. A head count the
        logits kernel does not take (``tiny``: 4) runs the reference math, one sequence at a time in
        batch-invariant mode."""
        import tilev4
        from tilev4.kernels.indexer import LOGITS_HEADS

        if q.shape[-2] not in LOGITS_HEADS or q.shape[-1] != 128:
            if not self.batch_invariant or q.shape[0] == 1:
                return ReferenceOps.indexer(self, q, w, keys, positions, rope, top_k)
            return torch.cat([ReferenceOps.indexer(self, q[i : i + 1], w[i : i + 1], keys[i : i + 1],
                                                   positions[i : i + 1], rope, top_k)
                              for i in range(q.shape[0])])  # one sequence at a time
        qp = self._prepare_queries(q, positions, rope)  # [b, s, HI, DI] FP4-simulated fp32
        # exact=False: no host-side exactness check; the FP4 values times their block scales are FP8 values
        # times the row's power-of-two scale unless a block is 2^16 below the row's largest
        q8, qs = tilev4.indexer_fp8_cast(qp.contiguous(), exact=False)
        k8, ks = tilev4.indexer_fp8_cast(keys.contiguous(), exact=False)
        return tilev4.indexer_topk(q8.contiguous(), qs.contiguous(), w.float().contiguous(), k8.contiguous(),
                                   ks.contiguous(), positions, top_k, batch_invariant=self.batch_invariant)

    def non_invariant_ops(self) -> dict[str, str]:
        """Ops whose result for a sequence may depend on the rest of the batch in the current mode."""
        if self.batch_invariant:
            return {}
        return {
            "attention": "split-KV count chosen from the batch size (small batches split to fill the SMs)",
        }


def ops_for_device(device: torch.device | str, batch_invariant: bool = False) -> ReferenceOps:
    """:class:`KernelOps` (with ``batch_invariant``) for a CUDA device, :class:`ReferenceOps` for everything else."""
    return KernelOps(batch_invariant) if torch.device(device).type == "cuda" else ReferenceOps()
