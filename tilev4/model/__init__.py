"""The DeepSeek-V4 runtime: config, checkpoint format, KV cache, blocks, prefill / decode / generate.

* :class:`Config` — validated hyper-parameters with the ``flash`` / ``pro`` / ``tiny`` / ``small`` presets.
* :func:`write_random_checkpoint`, :func:`load_checkpoint` — the released safetensors format
  (:mod:`tilev4.model.weights` documents every tensor name, shape and dtype).
* :class:`Model` (:func:`load_model`) — ``prefill``, ``decode``, ``mtp_draft``, ``generate``; CPU tensors run
  :mod:`tilev4.reference`, CUDA tensors the kernel backend (:mod:`tilev4.model.backend`).
* :class:`KVCache` — window rings, compressed entries, indexer keys and compressor states of a ragged
  batch; :func:`kv_footprint` / :func:`kv_bytes_per_token` — bytes in the production layout, vs V3.2.
"""

from tilev4.model.cache import (
    ENTRY_BYTES,
    V32_BYTES_PER_TOKEN_PER_LAYER,
    V32_LAYERS,
    KVCache,
    KVFootprint,
    kv_bytes_per_token,
    kv_footprint,
)
from tilev4.model.config import Config
from tilev4.model.model import Model, load_model
from tilev4.model.weights import (
    checkpoint_specs,
    load_checkpoint,
    quantize_fp4_weight,
    quantize_fp8_weight,
    random_checkpoint_tensors,
    write_random_checkpoint,
)

__all__ = [
    "ENTRY_BYTES",
    "V32_BYTES_PER_TOKEN_PER_LAYER",
    "V32_LAYERS",
    "Config",
    "KVCache",
    "KVFootprint",
    "Model",
    "checkpoint_specs",
    "kv_bytes_per_token",
    "kv_footprint",
    "load_checkpoint",
    "load_model",
    "quantize_fp4_weight",
    "quantize_fp8_weight",
    "random_checkpoint_tensors",
    "write_random_checkpoint",
]
