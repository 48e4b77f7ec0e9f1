"""How the one-pass attention program walks its queries, A/B on the GPU: bits and time, in one process.

    python3 tools/attention_walks.py --variant csa --queries 264,1024 --walks qt1,pc132 --json $OUT/walks.json
    python3 tools/attention_walks.py --variant hca --position 65536 --batch 3 --queries 300 --walks qt1,pc132
    python3 tools/attention_walks.py --variant sparse --keys 128 --queries 4096 --walks qt4,pc132 --build-only

A walk is ``qtN`` (``query_tiles`` = N consecutive queries a CTA; ``qt1``: one query a CTA; ``qtNo``: the same with
``overlap_epilogue``, each query's output path run around the next query's first QKᵀ) or ``pcN``
(``persistent_ctas`` = N CTAs a head block and sequence, each walking every N-th query; ``pcsms``: the device's SM
count). For each query count the tool builds the main program of each walk (default tunables, 64 heads; the ops
choose among these per launch, :func:`tilev4.kernels.attention._walk`), runs them on the same random inputs with the
output poisoned (NaN) first, compares every output bit for bit with the first walk's, then times them in turn
(CUDA-graph replays, L2 flushed, the order reversed every other round) and reports each median and its ratio to the
first walk. Inputs: ``sparse`` — ``--keys`` random distinct rows of a 16384-row cache a query; ``csa`` — a window
stream and ``--keys`` random compressed entries, queries from ``--position``; ``hca`` — a window stream and every
compressed entry visible at the query's position (``--position`` 0: the benchmark's prefill from the start).
``--build-only`` compiles the programs (into TileLang's cache; no GPU needed), so that a GPU round only loads them.
"""

import argparse
import concurrent.futures as cf
import json
import sys
from collections.abc import Callable
from typing import Any

D = 512
HEADS = 64
N_ROWS = 16384  # index-list cache rows (sparse, csa)


def parse_walks(text: str, sms: int | None) -> list[tuple[str, dict[str, Any]]]:
    """``"qt1,qt4,qt4o,pc132,pcsms"`` as (label, AttentionConfig items); ``sms`` resolves ``pcsms`` (None: not
    allowed)."""
    from tilev4.dsl.codegen import AttentionConfig

    out = []
    for label in (w.strip() for w in text.split(",")):
        kind, n = label[:2], label[2:]
        overlap = kind == "qt" and n.endswith("o")
        n = n[:-1] if overlap else n
        if kind == "pc" and n == "sms":
            if sms is None:
                raise ValueError(f"--walks: {label!r} needs the device's SM count (not with --build-only; give pcN)")
            n = str(sms)
        if kind not in ("qt", "pc") or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--walks: {label!r} is not qtN, qtNo or pcN (N >= 1) or pcsms")
        walk: dict[str, Any] = {"query_tiles": int(n)} if kind == "qt" else {"persistent_ctas": int(n)}
        if overlap:
            walk["overlap_epilogue"] = True
        try:
            AttentionConfig(**walk)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--walks: {label!r}: {e}") from None
        out.append((label, walk))
    if not out or len({lbl for lbl, _ in out}) != len(out):
        raise ValueError(f"--walks: give distinct walks, got {text!r}")
    return out


def parse_walk(text: str) -> dict[str, Any]:
    """One walk (``"qt4"``, ``"qt8o"`` or ``"pc132"``) as AttentionConfig items, for a tool's ``--walk`` option
    (errors name it)."""
    try:
        walks = parse_walks(text, None)
    except ValueError as e:
        raise ValueError(str(e).replace("--walks", "--walk")) from None
    if len(walks) != 1:
        raise ValueError(f"--walk: give one walk, got {text!r}")
    return walks[0][1]


def kernel(variant: str, walk: dict[str, Any], arch: str | None) -> Any:
    from tilev4.dsl import AttentionKernel
    from tilev4.dsl.codegen import AttentionConfig
    from tilev4.kernels.attention import variant_spec

    return AttentionKernel(variant_spec(variant, HEADS), AttentionConfig(**walk), arch=arch)


def _build(job: tuple[str, dict[str, Any], str]) -> str:
    variant, walk, arch = job
    k = kernel(variant, walk, arch)
    k.compiled("main", k.launch_config("main"))
    return f"{variant} {walk}"


def inputs(variant: str, b: int, s: int, keys: int, position: int, seed: int = 7) -> tuple:
    """(q, positions, sink, source tensors) on the GPU, as described in the module docstring."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").bfloat16()

    q, sink = randn(b, s, HEADS, D), torch.randn(HEADS, generator=g, device="cuda")
    pos = (position + torch.arange(s, device="cuda", dtype=torch.int32)).view(1, s).repeat(b, 1).contiguous()
    idx = None
    if variant != "hca":
        idx = torch.argsort(torch.rand(b, s, N_ROWS, generator=g, device="cuda"), dim=-1)[..., :keys]
        idx = idx.int().contiguous()
    if variant == "sparse":
        return q, torch.zeros_like(pos), sink, {"sel_kv": randn(b, N_ROWS, D), "sel_idx": idx}
    start = torch.full((b,), max(position - 127, 0), dtype=torch.int32, device="cuda")
    window = {"window_kv": randn(b, s + 127, D), "window_start": start}
    if variant == "csa":
        return q, pos, sink, {**window, "sel_kv": randn(b, N_ROWS, D), "sel_idx": idx}
    return q, pos, sink, {**window, "comp_kv": randn(b, max((position + s) // 128, 1), D)}


def run(args: argparse.Namespace, walks: list[tuple[str, dict[str, int]]]) -> list[dict[str, Any]]:
    import torch

    from tilev4.bench import time_in_turn

    rows = []
    for s in args.queries:
        q, pos, sink, tensors = inputs(args.variant, args.batch, s, args.keys, args.position)
        kerns = {label: kernel(args.variant, walk, None) for label, walk in walks}
        outs = {}
        for label, k in kerns.items():
            outs[label] = torch.full_like(q, float("nan"))
            k(q, pos, sink, validate=False, num_splits=1, out=outs[label], **tensors)  # one pass, whatever b·s
        torch.cuda.synchronize()
        base = walks[0][0]
        args_ = (q, pos, sink)
        fns = [lambda k=k, o=outs[label], a=args_, t=tensors: k(*a, validate=False, num_splits=1, out=o, **t)
               for label, k in kerns.items()]
        ms = dict(zip(kerns, time_in_turn(fns, rounds=args.rounds, graph=True, warmup=3, reps=10)))
        row = {"variant": args.variant, "batch": args.batch, "queries": s, "keys": args.keys,
               "position": args.position, "ms": ms, "ratio": {lbl: t / ms[base] for lbl, t in ms.items()},
               "bits_equal": {lbl: bool(torch.equal(o.view(torch.int16), outs[base].view(torch.int16)))
                              for lbl, o in outs.items()},
               "nan": {lbl: bool(torch.isnan(o).any()) for lbl, o in outs.items()}}
        print(f"{args.variant} b={args.batch} s={s} keys={args.keys} pos={args.position}: "
              + ", ".join(f"{lbl} {ms[lbl]:.4f} ms ({row['ratio'][lbl]:.3f})" for lbl in ms)
              + ("" if all(row["bits_equal"].values()) else "  BITS DIFFER"), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=("sparse", "csa", "hca"), default="csa")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--queries", default="264,1024", help="queries a sequence, comma-separated")
    ap.add_argument("--keys", type=int, default=512, help="index-list entries a query (sparse, csa)")
    ap.add_argument("--position", type=int, default=65536, help="the first query's position (csa, hca)")
    ap.add_argument("--walks", default="qt1,pcsms", help="qtN / pcN / pcsms, comma-separated; the first is the base")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--build-only", action="store_true", help="compile the programs (TileLang's cache), no GPU")
    ap.add_argument("--arch", default="sm_90a", help="CUDA arch for --build-only")
    ap.add_argument("--jobs", type=int, default=4, help="parallel compiles")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    try:
        args.queries = [int(x) for x in args.queries.split(",")]
        if min(args.queries) < 1 or args.batch < 1 or args.keys < 1 or args.position < 0:
            raise ValueError
    except ValueError:
        ap.error(f"--queries, --batch and --keys must be positive integers and --position >= 0, got "
                 f"--queries {args.queries!r} --batch {args.batch} --keys {args.keys} --position {args.position}")
    import torch

    gpu = not args.build_only and torch.cuda.is_available()
    if gpu:
        from tilev4.dsl.runtime import _num_sms

        sms = _num_sms(torch.cuda.current_device())
    else:  # --build-only cannot resolve pcsms; without a GPU the walks are still checked first
        sms = None if args.build_only else 1
    try:
        walks = parse_walks(args.walks, sms)
    except ValueError as e:
        ap.error(str(e))
    if args.build_only:
        with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for done in pool.map(_build, [(args.variant, w, args.arch) for _, w in walks]):
                print("built", done, flush=True)
        return 0
    return run_on_gpu("attention_walks.py", gpu, lambda: run(args, walks), args.json)


def run_on_gpu(tool: str, gpu: bool, measure: Callable[[], list[dict[str, Any]]], json_path: str | None) -> int:
    """A GPU tool's last step (shared with ``tools/decode_splits.py``, ``tools/decode_cold_code.py``): ``measure()``'s
    rows written to ``json_path`` (if given), exit status 0; without a GPU, a message saying so and 2."""
    if not gpu:
        print(f"{tool} needs a CUDA GPU (or --build-only)", file=sys.stderr)
        return 2
    rows = measure()
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
