"""Decode attention by split size, on the GPU: the whole call with the one-pass program and with each forced split size.

    python3 tools/decode_splits.py --variant csa --heads 64 --batches 1,8,16,32 --json $OUT/decode_splits.json
    python3 tools/decode_splits.py --variant hca --split-keys 256,128 --build-only      # no GPU: prebuild
    python3 tools/decode_splits.py --batches 64 --queries 2 --shared-keys --split-keys 128   # MTP-style, two CTAs a row

The inputs are the attention benchmark's decode at 128K context: one query a sequence at position 131071, a 128-row
window ring, and either ``--topk`` random compressed entries of 32768 (``csa``) or every compressed entry visible
there (``hca``: 1024). For each batch the tool times the op's kernel (``AttentionKernel`` with the default config)
with ``num_splits`` forced to one pass and to the split counts that give ``--split-keys`` keys a piece (CUDA-graph
replays, L2 flushed, in turn with the order reversed every other round), and checks that no output is NaN and how far
each is from the one-pass output. ``tilev4.dsl.runtime.AttentionKernel.plan`` is the rule these numbers feed.
``--queries 2`` gives each sequence two queries (positions 131070, 131071: MTP's decode, a 129-row ring), one CTA each
in one pass; with ``--shared-keys`` both select the same compressed entries, so that two CTAs read each row's keys,
the second mostly from L2 — what a row split over two SMs by columns of the output would read (session 53).
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tool directory is not a package

from attention_walks import run_on_gpu

D = 512
POSITION = 4 * 32768 - 1  # 128K context


def parse_ints(name: str, text: str, lo: int = 1) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        vals = []
    if not vals or min(vals) < lo:
        raise ValueError(f"{name} must be comma-separated integers >= {lo}, got {text!r}")
    return vals


def kernel(variant: str, heads: int, arch: str | None) -> Any:
    from tilev4.dsl import AttentionKernel
    from tilev4.dsl.codegen import AttentionConfig
    from tilev4.kernels.attention import variant_spec

    return AttentionKernel(variant_spec(variant, heads, ring=True), AttentionConfig(), arch=arch)


def key_blocks(variant: str, topk: int) -> int:
    """64-key blocks of a row: the window's 2 and the compressed source's."""
    return 2 + -(-(topk if variant == "csa" else (POSITION + 1) // 128) // 64)


def decode_inputs(variant: str, b: int, heads: int, topk: int, queries: int = 1, shared_keys: bool = False,
                  seed: int = 1) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The decode benchmark's inputs at 128K context for ``b`` sequences of ``queries`` queries: ``(q, pos, sink)``
    and the sources' tensors (a ring of each query's window; csa: ``topk`` random entries of 32768, the same for a
    sequence's queries with ``shared_keys``; hca: every compressed entry visible there)."""
    import torch

    n_c = 32768 if variant == "csa" else (POSITION + 1) // 128
    ring = 128 + queries - 1  # a ring holds the window of each of a sequence's queries
    g = torch.Generator(device="cuda").manual_seed(seed)
    pos = torch.arange(POSITION - queries + 1, POSITION + 1, dtype=torch.int32, device="cuda").repeat(b, 1)
    q = torch.randn(b, queries, heads, D, generator=g, device="cuda").bfloat16()
    sink = torch.randn(heads, generator=g, device="cuda")
    t = {"window_kv": torch.randn(b, ring, D, generator=g, device="cuda").bfloat16()}
    kv_c = torch.randn(b, n_c, D, generator=g, device="cuda").bfloat16()
    if variant == "csa":
        t["sel_kv"] = kv_c
        n_sel = 1 if shared_keys else queries
        idx = torch.argsort(torch.rand(b, n_sel, n_c, generator=g, device="cuda"), dim=-1)[..., :topk]
        t["sel_idx"] = idx.expand(b, queries, topk).int().contiguous()
    else:
        t["comp_kv"] = kv_c
    return (q, pos, sink), t


def launcher(k: Any, head: tuple[Any, ...], t: dict[str, Any], out: Any, num_splits: int = 1) -> Callable[[], None]:
    """One call of the decode program ``k`` on ``decode_inputs``'s ``(head, t)``, writing ``out``."""
    return lambda: k(*head, validate=False, out=out, num_splits=num_splits, **t)


def add_common_args(ap: argparse.ArgumentParser, batches: str, rounds: int) -> None:
    """The options shared by the decode probes (``tools/decode_cold_code.py`` too)."""
    ap.add_argument("--heads", type=int, choices=(64, 128), default=64)
    ap.add_argument("--topk", type=int, default=512, help="compressed entries a query selects (csa)")
    ap.add_argument("--batches", default=batches)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--build-only", action="store_true", help="compile the programs (TileLang's cache), no GPU")
    ap.add_argument("--arch", default="sm_90a", help="CUDA arch for --build-only")
    ap.add_argument("--json", help="write the rows here")


def check_common_args(args: argparse.Namespace) -> None:
    """``--batches`` parsed in place; a bad ``--batches`` / ``--topk`` / ``--rounds`` raises ValueError naming it."""
    args.batches = parse_ints("--batches", args.batches)
    if args.topk < 1 or args.topk % 64:
        raise ValueError(f"--topk must be a positive multiple of 64, got {args.topk}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from tilev4.bench import time_in_turn

    k = kernel(args.variant, args.heads, None)
    nb = key_blocks(args.variant, args.topk)
    labels = ["one pass"] + [f"{sk}-key pieces" for sk in args.split_keys]
    splits = [1] + [-(-nb // (sk // 64)) for sk in args.split_keys]
    nq = args.queries
    rows = []
    for b in args.batches:
        head, t = decode_inputs(args.variant, b, args.heads, args.topk, nq, args.shared_keys)
        q = head[0]
        outs = []
        for ns in splits:
            outs.append(torch.full_like(q, float("nan")))
            launcher(k, head, t, outs[-1], ns)()
        o = torch.empty_like(q)
        fns = [launcher(k, head, t, o, ns) for ns in splits]
        ms = time_in_turn(fns, rounds=args.rounds, graph=True, warmup=3, reps=20)
        row = {"variant": args.variant, "heads": args.heads, "batch": b, "queries": nq,
               "shared_keys": args.shared_keys, "key_blocks": nb,
               "splits": dict(zip(labels, splits)), "us": {lbl: m * 1000 for lbl, m in zip(labels, ms)},
               "nan": any(bool(torch.isnan(x).any()) for x in outs),
               "max_abs_diff_to_one_pass": max(float((x.float() - outs[0].float()).abs().max()) for x in outs)}
        print(f"{args.variant} H={args.heads} b={b} s={nq}{' shared keys' if args.shared_keys else ''}: "
              + ", ".join(f"{lbl} {us:.1f} us" for lbl, us in row["us"].items())
              + (" NaN" if row["nan"] else ""), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=("csa", "hca"), default="csa")
    add_common_args(ap, batches="1,4,8,16,32", rounds=4)
    ap.add_argument("--split-keys", default="256,128,64", help="keys a piece, multiples of 64")
    ap.add_argument("--queries", type=int, choices=(1, 2), default=1, help="queries a sequence (2: MTP's decode)")
    ap.add_argument("--shared-keys", action="store_true",
                    help="csa: a sequence's queries select the same compressed entries")
    args = ap.parse_args(argv)
    try:
        check_common_args(args)
        args.split_keys = parse_ints("--split-keys", args.split_keys, lo=64)
        if any(sk % 64 for sk in args.split_keys):
            raise ValueError(f"--split-keys must be multiples of 64, got {args.split_keys}")
        if args.shared_keys and (args.variant != "csa" or args.queries < 2):
            raise ValueError(f"--shared-keys needs --variant csa and --queries 2, got --variant {args.variant} "
                             f"--queries {args.queries}")
    except ValueError as e:
        ap.error(str(e))
    if args.build_only:
        k = kernel(args.variant, args.heads, args.arch)
        for kind, sk in [("main", None), ("combine", None)] + [("split", sk) for sk in args.split_keys]:
            k.compiled(kind, k.launch_config(kind, sk) if sk else k.launch_config(kind))
            print("built", kind, sk or "", flush=True)
        return 0
    import torch

    return run_on_gpu("decode_splits.py", torch.cuda.is_available(), lambda: run(args), args.json)


if __name__ == "__main__":
    sys.exit(main())
