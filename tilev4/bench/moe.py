"""Benchmarks of the MoE layer at V4-Flash dims (dim 4096, inter 2048, 256 experts, top-6, bf16 weights).

* Prefill, 8192 tokens: the routed grouped GEMMs (up with the fused SwiGLU, down) on a given
  permutation, against ``torch._grouped_mm`` with the same SwiGLU (clamp, routing weight, fp32 math,
  bf16 h) in the same run; FLOPs count the routed (token, expert) pairs only, ``6·T·k·dim·inter``
  (the padding rows of the M tiles are not counted). The whole layer (routing, permutation, routed
  and shared experts, combine) counts the shared expert's ``6·T·dim·inter`` too.
* Decode, 64 tokens: bytes are the expert weights actually touched, ``3·dim·inter·2`` per expert
  with at least one token (plus the shared expert and the gate for the whole layer); CUDA-graph
  timing, so that only GPU time is measured.

* FP8 weights (128×128 power-of-two scales), same shapes: the routed path as it runs in
  ``moe_experts(weight_format="fp8")`` — quantise x 1×128 (each token once; the permutation gathers the FP8
  rows, untimed as the bf16 gather is for the bf16 path, and the row scales are gathered in the timed region),
  FP8 up with h quantised in its epilogue, FP8 down — with ``speedup_vs_bf16`` against the bf16 routed path of
  the same run (prefill target 1.5: ``target_speedup_vs_bf16``); decode bytes count the FP8 weights touched
  (``3·dim·inter`` per expert, plus their fp32 scales).
* FP4 weights (packed e2m1, e8m0 scales per 32 along K, expanded to FP8 in shared memory), same shapes and
  the same routed path with the FP4 GEMMs, with ``speedup_vs_bf16`` and ``speedup_vs_fp8`` against the
  other two routed paths of the same run; decode bytes count the FP4 weights touched (``3·dim·inter/2`` per
  expert plus one e8m0 byte per 32 weights). The weights are in the prepared layout, as a caller gives them once
  at load time (:func:`tilev4.kernels.moe_fp4.prepare_fp4_weight`); a second row runs the checkpoint layout, timed
  in turn with the first (it must give the same bits: ``bits_equal_to_prepared``).

* Two more routings of the same 8192 tokens, the routed bf16 path again:

  - balanced: every expert gets exactly ``T·k/E`` = 192 rows (each token's k experts distinct, the assignment
    shuffled), as a trained gate's load-balancing bias aims for;
  - the random gate with a zero bias: the router's own load on random tokens, without the random bias that skews
    the first routing (an expert's rows then vary by the norm of its gate row and by chance: ~130-260 rows).

  The random gate and bias above are heavily skewed (an expert gets 4 to ~1100 rows). Rows: the default (which
  takes the 192-row table at this size: ``choose_up_block_m``), the 128-row table forced
  (``moe_permute(up_block_m=128)``; it must give the same bits: ``bits_equal_to_default``) and
  ``torch._grouped_mm`` on the same permutation. Where the default chose the 192-row table for the random gate's
  routing too, a "128-row tiles" row follows its routed row. ``up_block_m`` names each row's table; the two
  tables are timed in alternating order (:func:`tilev4.bench.time_in_turn`), as back-to-back timings drift.

Every prefill row of the bf16 routed path also describes its routing (:func:`routing_stats`): the least, median and
most rows an expert gets, and how many of the 64-row slabs' rows are padding (an expert's last slab is partly
filled, and the m64 wgmma computes it whole).

Each record also carries the largest difference of the routed output from the torch path on the same
inputs (``max_abs_diff_vs_torch``; the torch path rounds gate and up to bf16, so it is not zero), as a
sanity check of the timed kernels.
"""

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from tilev4.bench import benchmark, record, time_cuda, time_in_turn
from tilev4.bench.sustained import add_sustained

__all__ = ["RoutedPath", "balanced_routing", "bench_moe", "fp8_routed_path", "routed_path", "routing_stats"]

DIM, INTER, NUM_EXPERTS, TOP_K, ROUTE_SCALE, LIMIT = 4096, 2048, 256, 6, 1.5, 10.0


def _layer(gen: torch.Generator) -> dict[str, Any]:
    def randn(*shape, scale, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    return {
        "gate": randn(NUM_EXPERTS, DIM, scale=DIM**-0.5, dtype=torch.float32),
        "bias": randn(NUM_EXPERTS, scale=0.1, dtype=torch.float32),
        "w1": randn(NUM_EXPERTS, INTER, DIM, scale=DIM**-0.5),
        "w3": randn(NUM_EXPERTS, INTER, DIM, scale=DIM**-0.5),
        "w2": randn(NUM_EXPERTS, DIM, INTER, scale=INTER**-0.5),
        "shared": (randn(INTER, DIM, scale=DIM**-0.5), randn(DIM, INTER, scale=INTER**-0.5),
                   randn(INTER, DIM, scale=DIM**-0.5)),
    }


def _torch_routed(perm: Any, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The same routed computation with torch._grouped_mm: two up GEMMs (bf16 out: the only dtype it offers),
    the SwiGLU in fp32, the down GEMM."""
    offs = perm.offsets[1:]  # [E] int32 end row of each expert
    gate = torch._grouped_mm(perm.x_sorted, w1.transpose(1, 2), offs=offs).float()  # [N, dim] @ [dim, inter]
    up = torch._grouped_mm(perm.x_sorted, w3.transpose(1, 2), offs=offs).float()  # [N, dim] @ [dim, inter]
    h = (torch.nn.functional.silu(gate.clamp(max=LIMIT)) * up.clamp(-LIMIT, LIMIT)
         * perm.w_sorted[:, None]).bfloat16()  # [N, inter]
    return torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)  # [N, inter] @ [inter, dim] -> [N, dim]


@benchmark("moe")
def bench_moe(peaks: dict[str, float]) -> list[dict[str, Any]]:
    K = importlib.import_module("tilev4.kernels.moe")  # tilev4.kernels also exports the function `moe`

    from tilev4.kernels import fp8_quantize
    from tilev4.kernels.moe_fp4 import prepare_fp4_weight, quantize_fp4_weight
    from tilev4.kernels.moe_fp8 import quantize_fp8_weight

    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = _layer(gen)
    w1, w2, w3, shared = layer["w1"], layer["w2"], layer["w3"], layer["shared"]
    fp8 = tuple(quantize_fp8_weight(w) for w in (w1, w2, w3))
    fp4 = tuple(quantize_fp4_weight(w) for w in (w1, w2, w3))
    fp4_layouts = (tuple(prepare_fp4_weight(q) for q in fp4), fp4)  # (prepared, checkpoint)
    expert_bytes = 3 * DIM * INTER * 2
    out = []
    for num_tokens in (8192, 64):
        x = torch.randn(num_tokens, DIM, generator=gen, device="cuda").bfloat16()
        weights, experts = K.moe_route(x, layer["gate"], layer["bias"], TOP_K, ROUTE_SCALE)
        perm, _, y, _, routed = routed_path(K, x, weights, experts, w1, w2, w3)
        n = num_tokens * TOP_K
        shape = f"T={num_tokens} dim={DIM} inter={INTER} E={NUM_EXPERTS} k={TOP_K}"

        def full(x=x):
            K.moe(x, layer["gate"], layer["bias"], w1, w2, w3, shared, top_k=TOP_K, route_scale=ROUTE_SCALE,
                  swiglu_limit=LIMIT, validate=False)

        routed()
        touched = int((perm.counts > 0).sum().item())
        stats = routing_stats(perm.counts) if num_tokens > 256 else {}
        if stats:
            shape += f" random gate and bias ({_routing_label(stats)})"
        graph = num_tokens <= 256
        path_128 = routed_path(K, x, weights, experts, w1, w2, w3, K.BLOCK_M) if perm.up_tiles else None
        if path_128 is None:
            ms_routed = time_cuda(routed, graph=graph)
        else:  # the default chose the 192-row table: time the 128-row one too, in alternating order
            path_128.routed()
            ms_routed, ms_128 = time_in_turn([routed, path_128.routed])
        ms_full = time_cuda(full, graph=graph)
        try:  # the baseline must not take the tilev4 records down with it
            diff = (y.float() - _torch_routed(perm, w1, w2, w3).float()).abs().max().item()
            ms_torch = time_cuda(lambda perm=perm: _torch_routed(perm, w1, w2, w3), graph=graph)
        except RuntimeError as exc:
            diff, ms_torch, torch_error = None, None, str(exc).splitlines()[0]
        else:
            torch_error = None
        routed_flops = 6.0 * n * DIM * INTER
        shared_flops = 6.0 * num_tokens * DIM * INTER
        routed_bytes = touched * expert_bytes
        layer_bytes = routed_bytes + expert_bytes + NUM_EXPERTS * DIM * 4  # + shared expert + gate
        if num_tokens > 256:  # prefill: compute-bound, FLOPs over the routed pairs
            routed_work, layer_work = {"flops": routed_flops}, {"flops": routed_flops + shared_flops}
        else:  # decode: weight-bandwidth-bound, bytes of the experts touched
            routed_work, layer_work = {"nbytes": routed_bytes}, {"nbytes": layer_bytes}
        target = 0.7 if num_tokens > 256 else 0.6  # the targets: prefill of the bf16 peak, decode of copy BW
        recs = [record("moe routed (up+SwiGLU, down)", shape, ms_routed, peaks=peaks, target=target, **routed_work)]
        if num_tokens > 256:  # the row, back to back at the power cap as well
            add_sustained(recs[0], routed, routed_flops)
        recs[0]["up_block_m"] = perm.up_tiles[0] if perm.up_tiles else K.BLOCK_M
        if path_128 is not None:
            recs.append(record("moe routed, 128-row tiles", shape, ms_128, peaks=peaks, **routed_work))
            recs[-1]["up_block_m"] = K.BLOCK_M
            recs[-1]["bits_equal_to_default"] = bool(torch.equal(path_128.y, y))
        if ms_torch is not None:
            recs.append(record("torch._grouped_mm routed", shape, ms_torch, peaks=peaks, **routed_work))
        recs.append(record("moe layer", shape, ms_full, peaks=peaks, **layer_work))
        for r in recs:
            r["experts_touched"] = touched
            r["max_abs_diff_vs_torch"] = diff
            if torch_error:
                r["torch_error"] = torch_error
            if r["kernel"] != "moe layer":
                r.update(stats)
        out += recs
        # the quantised paths gather FP8 rows (x quantised once a token), as moe_experts does
        perm8 = K.moe_permute(x, weights, experts, NUM_EXPERTS, payload=fp8_quantize(x)[0])
        quant_x = _quantize_tokens(x, perm8)
        fp8_recs = _bench_fp8(perm8, quant_x, fp8, graph, ms_routed, routed_flops, touched, shape, peaks,
                              recs[0].get("ms_sustained"))
        out += fp8_recs
        out += _bench_fp4(perm8, quant_x, fp4_layouts, graph, ms_routed, fp8_recs[0]["ms"], routed_flops, touched,
                          shape, peaks)
        if num_tokens > 256:
            weights_b, experts_b = balanced_routing(num_tokens, NUM_EXPERTS, TOP_K, gen)
            out += _bench_routing(K, x, weights_b, experts_b, "balanced routing", w1, w2, w3, peaks)
            weights_z, experts_z = K.moe_route(x, layer["gate"], torch.zeros_like(layer["bias"]), TOP_K, ROUTE_SCALE)
            out += _bench_routing(K, x, weights_z, experts_z, "random gate, zero bias", w1, w2, w3, peaks)
    return out


class RoutedPath(NamedTuple):
    """The bf16 routed path on one permutation: ``up()`` runs the up-projection into ``h``, ``routed()`` up and down
    into ``y`` (NaN before the first launch)."""

    perm: Any
    h: torch.Tensor
    y: torch.Tensor
    up: Callable[[], None]
    routed: Callable[[], None]


def routed_path(K: Any, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w1: torch.Tensor,
                w2: torch.Tensor, w3: torch.Tensor, up_block_m: int | None = None) -> RoutedPath:
    """The permutation of ``(weights, experts)`` with the given bf16 tile table (None: the default's choice), its output
    buffers and launch functions (``K``: :mod:`tilev4.kernels.moe`). Nothing is launched but the permutation."""
    perm = K.moe_permute(x, weights, experts, NUM_EXPERTS, up_block_m=up_block_m)
    n = perm.x_sorted.shape[0]
    h = torch.full((n, INTER), float("nan"), device=x.device, dtype=torch.bfloat16)
    y = torch.full((n, DIM), float("nan"), device=x.device, dtype=torch.bfloat16)

    def up() -> None:
        K.moe_up(perm, w1, w3, LIMIT, out=h)

    def routed() -> None:
        up()
        K.moe_down(perm, h, w2, out=y)

    return RoutedPath(perm, h, y, up, routed)


def routing_stats(counts: torch.Tensor, slab: int = 64) -> dict[str, Any]:
    """How a routing loads the experts: the least, median and most rows an expert gets (``counts`` [E]: rows per
    expert), the experts whose last ``slab``-row slab is partly filled, and the padding rows of those slabs as a
    fraction of the routed rows (the m64 wgmma computes a slab whole)."""
    c = counts.detach().to("cpu", torch.int64)
    if c.dim() != 1 or c.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D tensor of rows per expert, got shape {tuple(c.shape)}")
    if bool((c < 0).any()):
        raise ValueError(f"counts must be >= 0, got {int(c.min())}")
    if slab < 1:
        raise ValueError(f"slab must be >= 1, got {slab}")
    rem = c % slab
    padding = int(torch.where(rem > 0, slab - rem, torch.zeros_like(rem)).sum())
    rows = int(c.sum())
    return {
        "rows_per_expert_min": int(c.min()),
        "rows_per_expert_median": int(c.median()),
        "rows_per_expert_max": int(c.max()),
        "experts_with_partial_slab": int((rem > 0).sum()),
        "padding_rows_fraction": padding / rows if rows else 0.0,
    }


def _routing_label(stats: dict[str, Any]) -> str:
    """The shape string's note of a routing's rows per expert."""
    lo, hi = stats["rows_per_expert_min"], stats["rows_per_expert_max"]
    return f"{lo} rows/expert" if lo == hi else f"{lo}-{hi} rows/expert"


def balanced_routing(num_tokens: int, num_experts: int, top_k: int, gen: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A routing in which every expert gets exactly ``num_tokens·top_k/num_experts`` rows (that must be a whole
    number, and ``top_k <= num_experts``): the (token, slot) pairs in a random token order take the experts of
    a random expert order cyclically, so a token's ``top_k`` experts are distinct. Weights: random positive,
    normalised and times ``ROUTE_SCALE``. Returns ``(weights [T, k] fp32, experts [T, k] int32)``."""
    if (num_tokens * top_k) % num_experts or top_k > num_experts:
        raise ValueError(f"num_tokens*top_k={num_tokens * top_k} must be a multiple of num_experts={num_experts} "
                         f"and top_k={top_k} at most num_experts")
    dev = gen.device
    order = torch.randperm(num_experts, generator=gen, device=dev)
    slots = torch.arange(num_tokens * top_k, device=dev).view(num_tokens, top_k) % num_experts
    experts = order[slots][torch.randperm(num_tokens, generator=gen, device=dev)].to(torch.int32)
    weights = torch.rand(num_tokens, top_k, generator=gen, device=dev) + 0.1
    return weights / weights.sum(-1, keepdim=True) * ROUTE_SCALE, experts


def _bench_routing(K: Any, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, label: str,
                   w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, peaks: dict[str, float]
                   ) -> list[dict[str, Any]]:
    """The bf16 routed path on another routing of the same tokens (``label`` names it in the rows): the default
    table and the 128-row one forced, timed in turn, and ``torch._grouped_mm`` on the same permutation."""
    num_tokens = x.shape[0]
    n = num_tokens * TOP_K
    flops = 6.0 * n * DIM * INTER
    # the default (192-row table at this size) and the 128-row table forced, timed in alternating order
    paths = [routed_path(K, x, weights, experts, w1, w2, w3, up_block_m) for up_block_m in (None, K.BLOCK_M)]
    for p in paths:
        p.routed()
    stats = routing_stats(paths[0].perm.counts)
    shape = f"T={num_tokens} dim={DIM} inter={INTER} E={NUM_EXPERTS} k={TOP_K} {label} ({_routing_label(stats)})"
    names = (f"moe routed, {label}", f"moe routed, {label}, 128-row tiles")
    recs = [record(name, shape, ms, peaks=peaks, target=None if i else 0.7, flops=flops)
            for i, (name, ms) in enumerate(zip(names, time_in_turn([p.routed for p in paths])))]
    for r, p in zip(recs, paths):
        r["up_block_m"] = p.perm.up_tiles[0] if p.perm.up_tiles else K.BLOCK_M
    add_sustained(recs[0], paths[0].routed, flops)
    ys, perm = [p.y for p in paths], paths[-1].perm
    recs[1]["bits_equal_to_default"] = bool(torch.equal(ys[0], ys[1]))
    try:
        diff = (ys[0].float() - _torch_routed(perm, w1, w2, w3).float()).abs().max().item()
        ms_torch = time_cuda(lambda perm=perm: _torch_routed(perm, w1, w2, w3))
    except RuntimeError:
        diff = ms_torch = None
    if ms_torch is not None:
        recs.append(record(f"torch._grouped_mm routed, {label}", shape, ms_torch, peaks=peaks, flops=flops))
    touched = int((paths[0].perm.counts > 0).sum().item())
    for r in recs:
        r["experts_touched"] = touched
        r["max_abs_diff_vs_torch"] = diff
        r["has_nan"] = bool(torch.isnan(ys[0]).any())
        r.update(stats)
    return recs


def _quantize_tokens(x: torch.Tensor, perm8: Any) -> Any:
    """What the quantised paths run before their GEMMs: each token's row quantised 1×128 once and the row scales
    gathered in sorted order (the FP8 rows themselves are gathered by the permutation, as the bf16 rows are for
    the bf16 path: outside the timed region in both)."""
    from tilev4.kernels import fp8_quantize

    def run() -> torch.Tensor:
        _, xs_tokens = fp8_quantize(x)
        return xs_tokens.index_select(0, perm8.sorted_tokens)

    return run


def fp8_routed_path(perm: Any, quant_x: Any, fp8: tuple[Any, Any, Any]) -> tuple[Callable[[], None], torch.Tensor]:
    """The FP8 routed path as the benchmark times it, on an FP8 permutation ``perm`` (``moe_permute(payload=...)``):
    x's row scales gathered (``quant_x``, :func:`_quantize_tokens`), the up-projection quantising h in its epilogue,
    the down-projection into ``y``. Returns the call and ``y``; nothing is launched."""
    from tilev4.kernels.moe_fp8 import moe_down_fp8, moe_up_fp8

    q1, q2, q3 = fp8
    y = torch.empty(perm.x_sorted.shape[0], DIM, device="cuda", dtype=torch.bfloat16)

    def routed_fp8() -> None:
        h8, hs = moe_up_fp8(perm, perm.x_sorted, quant_x(), q1, q3, LIMIT, quantize=True)
        moe_down_fp8(perm, h8, hs, q2, out=y)

    return routed_fp8, y


def _bench_fp8(perm: Any, quant_x: Any, fp8: tuple[Any, Any, Any], graph: bool, ms_bf16: float, flops: float,
               touched: int, shape: str, peaks: dict[str, float], ms_bf16_sustained: float | None = None
               ) -> list[dict[str, Any]]:
    routed_fp8, y = fp8_routed_path(perm, quant_x, fp8)
    routed_fp8()
    ms = time_cuda(routed_fp8, graph=graph)
    scale_bytes = sum(q.scale[0].numel() * 4 for q in fp8)
    work = {"flops": flops} if not graph else {"nbytes": touched * (3 * DIM * INTER + scale_bytes)}
    rec = record("moe routed FP8 (quantise x, up quantising h, down)", shape, ms, peaks=peaks, **work)
    rec["speedup_vs_bf16"] = ms_bf16 / ms
    if not graph:  # the prefill shape: #5 asks for 1.5x the bf16 path
        rec["target_speedup_vs_bf16"] = 1.5
        add_sustained(rec, routed_fp8, flops)
        if ms_bf16_sustained and "ms_sustained" in rec:  # both back to back at the power cap
            rec["speedup_vs_bf16_sustained"] = ms_bf16_sustained / rec["ms_sustained"]
    rec["experts_touched"] = touched
    rec["has_nan"] = bool(torch.isnan(y).any())
    return [rec]


def _bench_fp4(perm: Any, quant_x: Any, fp4_layouts: tuple[tuple[Any, ...], tuple[Any, ...]], graph: bool,
               ms_bf16: float, ms_fp8: float, flops: float, touched: int, shape: str, peaks: dict[str, float],
               rounds: int = 3) -> list[dict[str, Any]]:
    """The routed FP4 path with the (prepared, checkpoint) weights (w1, w2, w3) of ``fp4_layouts``, timed in turn
    over ``rounds`` rounds: a row each, the second's bits compared with the first's."""
    from tilev4.kernels import fp8_quantize
    from tilev4.kernels.moe_fp4 import moe_down_fp4, moe_up_fp4

    n = perm.x_sorted.shape[0]
    ys = [torch.full((n, DIM), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(2)]

    def routed_fp4(weights: tuple[Any, Any, Any], y: torch.Tensor) -> Callable[[], None]:
        q1, q2, q3 = weights

        def run() -> None:
            xs = quant_x()
            h = moe_up_fp4(perm, perm.x_sorted, xs, q1, q3, LIMIT)
            h8, hs = fp8_quantize(h)
            moe_down_fp4(perm, h8, hs, q2, out=y)

        return run

    runs = [routed_fp4(weights, y) for weights, y in zip(fp4_layouts, ys, strict=True)]
    for run in runs:
        run()
    ms_prepared, ms_checkpoint = time_in_turn(runs, rounds=rounds, graph=graph)
    expert_bytes = sum(q.data[0].numel() + q.scale[0].numel() for q in fp4_layouts[1])  # packed + e8m0 bytes
    work = {"flops": flops} if not graph else {"nbytes": touched * expert_bytes}
    recs = [record("moe routed FP4 (quantise x, up, quantise h, down)", shape, ms_prepared, peaks=peaks, **work),
            record("moe routed FP4, checkpoint layout", shape, ms_checkpoint, peaks=peaks, **work)]
    for rec, y in zip(recs, ys, strict=True):
        rec["speedup_vs_bf16"] = ms_bf16 / rec["ms"]
        rec["speedup_vs_fp8"] = ms_fp8 / rec["ms"]
        rec["experts_touched"] = touched
        rec["has_nan"] = bool(torch.isnan(y).any())
    recs[0]["fp4_layout"], recs[1]["fp4_layout"] = "prepared", "checkpoint"
    recs[1]["bits_equal_to_prepared"] = bool(torch.equal(ys[0], ys[1]))
    return recs
