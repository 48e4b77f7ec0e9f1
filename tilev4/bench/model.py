"""Decode tokens/s of the whole model: the TileLang kernel path against the reference ops on the same GPU.

The ``small`` preset (7 layers: window, window, CSA, HCA, CSA, HCA, CSA; dim 1024, 16 heads, 16 experts
top-4; random weights) decodes one token per sequence for batches of 1 and 4 at contexts of 4K, 32K and
128K tokens. A prefill of 128K tokens on the reference path would take far longer than the decode being
measured, so the cache is filled with random but valid contents of the right length instead
(:meth:`~tilev4.model.cache.KVCache.fill_random`: FP8-simulated window and compressed entries, FP4
indexer keys, compressor states with their incomplete block): decode speed depends on the context length
and the cache shapes, not on the values.

Each measurement times ``steps`` consecutive :meth:`~tilev4.model.Model.decode` calls (host included: what a
user gets) after two warm-up steps (the first loads the kernels, the second records the decode CUDA graph),
median of 3 repetitions; tokens/s = batch · steps / time. Records, per (context, batch):

* ``model decode (kernels)`` (CUDA graphs), ``model decode (kernels, no CUDA graph)`` (the same ops launched
  eagerly from Python) and ``model decode (kernels, batch-invariant)`` (CUDA graphs);
* ``model decode (reference ops)`` on the same GPU (fewer steps: it is slow), with ``speedup_vs_reference``
  on the kernel records (the target is >= 10×) and ``batch_invariant_slowdown`` on the batch-invariant one.

``nbytes`` counts the KV cache bytes the step reads in the kernel layout (bf16 window and compressed rows
visible to the query, fp32 indexer keys) plus the weights: a lower bound of the traffic, for the fraction
of the copy bandwidth.
"""

import time
from typing import Any

import torch

from tilev4.bench import benchmark, record

__all__ = ["bench_model"]

CONTEXTS = (4096, 32768, 131072)
BATCHES = (1, 4)
STEPS = 8
REF_STEPS = 2


def _decode_seconds(model: Any, cache: Any, context: int, steps: int) -> float:
    """Median seconds of ``steps`` decode calls from a cache holding ``context`` tokens per sequence."""
    b = cache.batch
    times = []
    for rep in range(3):
        cache.fill_random(context, seed=rep)
        tok = torch.randint(0, model.config.vocab_size, (b,), device="cuda")
        for _ in range(2):  # warm-up: kernels compiled / loaded, then the decode graph recorded
            tok = model.decode(tok, cache).argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = model.decode(tok, cache)
            tok = logits.argmax(-1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[1]


def _step_bytes(model: Any, context: int, batch: int) -> float:
    cfg = model.config
    kv = 0
    for r in cfg.compress_ratios:
        kv += cfg.window_size * cfg.head_dim * 2  # the window
        if r == 128:
            kv += (context // 128) * cfg.head_dim * 2  # every visible HCA entry
        elif r == 4:
            kv += min(cfg.index_topk, context // 4) * cfg.head_dim * 2  # the top-k CSA entries
            kv += (context // 4) * cfg.index_head_dim * 4  # the indexer keys it scores
    weights = sum(t.numel() * t.element_size() for t in model.tensors.values())
    return batch * kv + weights


MODEL_L2_FLUSH = "none (host wall time of consecutive decode steps)"


@benchmark("model", l2_flush=MODEL_L2_FLUSH)
def bench_model(peaks: dict[str, float]) -> list[dict[str, Any]]:
    from tilev4.model import Config, Model, random_checkpoint_tensors
    from tilev4.model.backend import ReferenceOps

    cfg = Config.small()
    tensors = random_checkpoint_tensors(cfg, seed=0)
    kern = Model(cfg, tensors, "cuda")
    eager = Model(cfg, tensors, "cuda", cuda_graphs=False)
    bi = Model(cfg, tensors, "cuda", batch_invariant=True)
    ref = Model(cfg, tensors, "cuda", ops=ReferenceOps())
    models = {"kernels": kern, "kernels, no CUDA graph": eager, "kernels, batch-invariant": bi, "reference ops": ref}
    out = []
    for context in CONTEXTS:
        for batch in BATCHES:
            capacity = context + STEPS + 4
            shape = f"small ctx={context} b={batch}"
            nbytes = _step_bytes(kern, context, batch)
            res = {}
            for name, model in models.items():
                steps = REF_STEPS if name == "reference ops" else STEPS
                cache = model.new_cache(batch, capacity)
                sec = _decode_seconds(model, cache, context, steps)
                del cache
                torch.cuda.empty_cache()
                res[name] = sec / steps  # seconds per decode step
            for name, sec in res.items():
                rec = record(f"model decode ({name})", shape, sec * 1e3, peaks=peaks, nbytes=nbytes)
                rec["tokens_per_s"] = batch / sec
                if name != "reference ops":
                    rec["speedup_vs_reference"] = res["reference ops"] / sec
                    rec["target_speedup"] = 10.0
                if name == "kernels, batch-invariant":
                    rec["batch_invariant_slowdown"] = sec / res["kernels"]
                if name != "reference ops":  # cuda_graphs: False if recording failed (graph_failure says why)
                    rec["cuda_graphs"] = models[name].cuda_graphs
                    rec["graph_failure"] = models[name].graph_failure
                out.append(rec)
    return out
