"""Attention-authoring DSL: a variant in a few lines, compiled into one fused TileLang kernel.

Layer map::

    spec.py     AttentionSpec + KV sources (Window, IndexList, CompressedDense, Causal)   pure data
    codegen.py  spec + AttentionConfig -> TileLang programs (main / split / combine)     compile-time
    runtime.py  AttentionKernel: validate tensors, plan splits, compile once, launch     run-time
    tuning.py   the config space the autotuner explores, per schedule; shared memory     tuning
    tilev4.kernels.attention   CSA / HCA / sparse attention written with this DSL + registry entries

A spec names the query layout (``heads``, ``head_dim``; MQA with K = V), one or more KV sources
whose union is the key set under ONE online softmax, optional ``score_mod``/``mask_mod``, an
optional per-head ``sink``, the ``scale``, and whether to return the log-sum-exp. The same spec
gives the prefill kernel (one CTA per token and head block) and the decode path (split-KV with a
fixed-order combine); :class:`AttentionConfig` holds the compile-time knobs (block size, CTA sizes,
split size) and :mod:`tilev4.dsl.tuning` says which of them the autotuner varies for a spec.

Contract of a user's modifiers — both are traced once at compile time with TileLang expressions:

* ``score_mod(score, b, h, q_idx, kv_idx) -> score``: ``score`` is the fp32 scaled logit
  ``scale · q·k``; ``b`` batch index, ``h`` absolute head index, ``q_idx`` the query's absolute
  position, ``kv_idx`` the key's index in its source (token position for ``Window``, row for
  ``IndexList``, entry for ``CompressedDense``). Use ``tilelang.language`` math (``T.exp2``,
  ``T.tanh``, ``T.max``, casts); return an fp32 expression. It runs on valid keys only.
* ``mask_mod(b, h, q_idx, kv_idx) -> bool``: False removes the key (as if it were absent).

Both must be pure functions of their arguments and compile-time constants (no tensors captured).

Example — ALiBi over a sliding window::

    spec = AttentionSpec(heads=16, head_dim=128, sources=(Window("window", 256),), sink=False,
                         score_mod=lambda s, b, h, q, k: s - T.exp2(-0.5 * (h + 1)) * T.cast(q - k, "float32"))
    o = AttentionKernel(spec)(q, positions, window_kv=kv, window_start=start)
"""

from tilev4.dsl.codegen import AttentionConfig
from tilev4.dsl.runtime import AttentionKernel, LaunchPlan
from tilev4.dsl.spec import AttentionSpec, Causal, CompressedDense, IndexList, KVSource, Window

__all__ = [
    "AttentionConfig",
    "AttentionKernel",
    "AttentionSpec",
    "Causal",
    "CompressedDense",
    "IndexList",
    "KVSource",
    "LaunchPlan",
    "Window",
]
