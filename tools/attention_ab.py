"""A/B of versions of the attention code generator on the GPU: bits and time, in one process.

    git show main:tilev4/dsl/codegen.py > /tmp/codegen_base.py                 # here (the device has no .git)
    python3 tools/attention_ab.py --base /tmp/codegen_base.py --json $OUT/attention_ab.json       # on a GPU
    python3 tools/attention_ab.py --base /tmp/codegen_base.py --case hca64 --build-only --arch sm_90a   # no GPU
    python3 tools/attention_ab.py --base /tmp/codegen_base.py --case hca64 --walk qt8    # the benchmark's HCA walk
    python3 tools/attention_ab.py --base /tmp/base.py --new /tmp/vA.py --new /tmp/vB.py --walk csa64=qt2,hca64=qt8
    python3 tools/attention_ab.py --base tilev4/dsl/codegen.py --case decode64 --new-config block_kv=32,pair_stages=2
    python3 tools/attention_ab.py --base /tmp/codegen_base.py --case decode64 --spread-positions

For each case (those of ``tools/attention_timeline.py``: the benchmark's inputs) the tool builds the main program
with the default config from the file ``--base`` ("base", loaded as a separate module) and from each ``--new`` file
(repeatable; labelled by the file's stem; default: the working tree's :mod:`tilev4.dsl.codegen`, labelled "new"),
launches them on the same inputs with the output poisoned (NaN) first, compares each variant's output with the base's
bit for bit, then times them in turn (CUDA-graph replays, L2 flushed) for ``--rounds`` rounds and reports each one's
median and, for each variant, the median of the per-round ratios variant / base. Differences of a few percent
between two separate benchmark runs are common on the H200; alternating in one process is what makes them
measurable. Every program is built (in ``--jobs`` processes) before the first launch, so a kernel cache built here
with ``--build-only --arch sm_90a`` and carried makes the GPU run compile nothing.

``--walk``: the main program's walk of queries, ``qtN`` (N queries a CTA) or ``pcN`` (N persistent CTAs) for every
case, or per case, ``csa64=qt2,hca64=qt8`` (the cases not named walk one query a CTA); the ops' own walks for the
benchmark's inputs are those of ``tilev4.kernels.attention._walk`` (V4-Flash CSA 2 queries a CTA, HCA 8, the others
one). ``--new-config K=V,...`` builds the variants with those :class:`~tilev4.dsl.codegen.AttentionConfig` items
(over the walk's), so that a config is measured against the default without an edited copy of the generator
(``--base`` may then be the working tree's own file). ``--spread-positions`` moves the decode case's sequences off the
benchmark's single position (131 071, where both 64-key blocks of the 128-row window ring start at a ring row that is
a multiple of 64) to ``131 071 − (37·i mod 128)`` for sequence ``i``: a change whose cost depends on where the window
falls in its ring is then measured over every phase.
"""

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from attention_timeline import CASES, _inputs, input_names, module_from_source  # noqa: E402  (the tool directory is not a package)


def load_codegen(path: Path) -> Any:
    """``path`` (a version of ``tilev4/dsl/codegen.py``) as its own module, next to :mod:`tilev4.dsl.codegen`."""
    return module_from_source(path.read_text(), "tilev4_dsl_codegen_ab", path)


def main_program(case: str, base: str | None, walk: dict[str, Any] | None = None) -> Any:
    """The main program of ``case`` from the working tree (``base`` None) or from the file ``base`` (not compiled);
    ``walk``: :class:`AttentionConfig` items (the walk, ``query_tiles`` / ``persistent_ctas``, and any others),
    default one query a CTA."""
    import tilev4.dsl.codegen as current
    from tilev4.kernels.attention import variant_spec

    variant, heads, ring = CASES[case]
    cg = current if base is None else load_codegen(Path(base))
    return cg.build_main_program(variant_spec(variant, heads, ring=ring), cg.AttentionConfig(**(walk or {})),
                                 split=False)


def build(case: str, base: str | None, arch: str, walk: dict[str, Any] | None = None) -> Any:
    """:func:`main_program`, compiled for ``arch``."""
    import tilelang

    return tilelang.compile(main_program(case, base, walk), target={"kind": "cuda", "arch": arch},
                            execution_backend="tvm_ffi")


def _build_in_worker(job: tuple[str, str | None, str, dict[str, Any] | None]) -> bool:
    build(*job)  # fills TileLang's kernel cache, so that the parent's build is a cache hit
    return True


def parse_config(text: str) -> dict[str, Any]:
    """``"block_kv=32,pair_stages=2"`` as AttentionConfig items (ints where they parse, ``true`` / ``false`` as
    bools), checked by the config."""
    from tilev4.dsl.codegen import AttentionConfig

    out: dict[str, Any] = {}
    for item in (i.strip() for i in text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise ValueError(f"--new-config: {item!r} is not KEY=VALUE")
        if key not in AttentionConfig.__dataclass_fields__:
            raise ValueError(f"--new-config: {key!r} is not an AttentionConfig field "
                             f"({', '.join(sorted(AttentionConfig.__dataclass_fields__))})")
        bools = {"true": True, "false": False}
        out[key] = (int(value) if value.lstrip("-").isdigit() else bools[value.lower()] if value.lower() in bools
                    else value)
    try:
        AttentionConfig(**out)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--new-config: {e}") from None
    return out


def spread_positions(positions: Any) -> Any:
    """``positions`` [B, S] with sequence ``i`` moved back by ``37·i mod 128`` tokens (in place; returned)."""
    import torch

    off = (torch.arange(positions.shape[0], device=positions.device, dtype=positions.dtype) * 37) % 128
    positions -= off[:, None]
    return positions


def variant_labels(news: list[str | None]) -> list[str]:
    """A label a variant: "new" for the working tree (None) alone, else each file's stem (made unique)."""
    if news == [None]:
        return ["new"]
    labels: list[str] = []
    for f in news:
        stem = "new" if f is None else Path(f).stem
        labels.append(stem if stem not in labels and stem != "base" else f"{stem}_{len(labels)}")
    return labels


def check_versions(ap: argparse.ArgumentParser, base: str, news: list[str] | None) -> list[str | None]:
    """``--base`` and ``--new`` files exist (else the parser's error naming the option); returns the variants, the
    working tree's module (None) when no ``--new`` is given."""
    out: list[str | None] = list(news or [None])
    for opt, files in (("base", [base]), ("new", out)):
        for f in files:
            if f is not None and not Path(f).is_file():
                ap.error(f"--{opt}: no such file: {f}")
    return out


def parse_case_walks(text: str, cases: list[str]) -> dict[str, dict[str, int]]:
    """``--walk``: one walk for every case (``"qt2"``), or ``"csa64=qt2,hca64=qt8"`` (the others: one query a
    CTA); returns each case's AttentionConfig items."""
    from attention_walks import parse_walk

    if "=" not in text:
        walk = parse_walk(text)
        return {c: walk for c in cases}
    out: dict[str, dict[str, int]] = {c: {} for c in cases}
    for item in (i.strip() for i in text.split(",")):
        case, eq, w = item.partition("=")
        if not eq or case not in CASES:
            raise ValueError(f"--walk: {item!r} is not CASE=WALK with CASE one of {', '.join(sorted(CASES))}")
        if case in out:
            out[case] = parse_walk(w)
    return out


def run_case(case: str, base: str, arch: str, rounds: int, news: list[str | None],
             walk: dict[str, Any] | None = None, new_config: dict[str, Any] | None = None,
             spread: bool = False) -> dict[str, Any]:
    import torch

    from tilev4.bench import time_cuda

    labels = variant_labels(news)
    kernels = {label: build(case, f, arch, {**(walk or {}), **(new_config or {})}) for label, f in zip(labels, news)}
    kernels["base"] = build(case, base, arch, walk)
    args = _inputs(case)
    if spread:
        spread_positions(args[input_names(case).index("positions")])
    q = args[0]
    outs = {}
    for which, k in kernels.items():
        o = torch.full_like(q, float("nan"))
        k(*args, o)
        torch.cuda.synchronize()
        outs[which] = o
    times: dict[str, list[float]] = {which: [] for which in kernels}
    reps = 3 if case == "hca64" else 10
    for _ in range(rounds):
        for which, k in kernels.items():
            o = outs[which]
            times[which].append(time_cuda(lambda k=k, o=o: k(*args, o), warmup=2, reps=reps, graph=True))
    row: dict[str, Any] = {"case": case, "walk": walk or {}, "new_config": new_config or {},
                           "spread_positions": spread, "base_ms": statistics.median(times["base"]), "variants": {}}
    for label, f in zip(labels, news):
        o = outs[label]
        row["variants"][label] = {
            "file": f or "working tree",
            "bits_equal": bool(torch.equal(o.view(torch.int16), outs["base"].view(torch.int16))),
            "max_abs_diff": float((o.float() - outs["base"].float()).abs().max()),
            "nan": bool(torch.isnan(o).any()),
            "ms": statistics.median(times[label]),
            "ratio_over_base": statistics.median(a / b for a, b in zip(times[label], times["base"])),
        }
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the other version of tilev4/dsl/codegen.py (a file)")
    ap.add_argument("--new", action="append",
                    help="a version to measure against it (a file; repeatable; default: the working tree's)")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="repeatable (default: all)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--jobs", type=int, default=8, help="parallel compiles before the GPU runs")
    ap.add_argument("--build-only", action="store_true", help="lower and compile every program, no GPU")
    ap.add_argument("--arch", help="CUDA arch (default: the current GPU's; sm_90a with --build-only)")
    ap.add_argument("--walk", help="qtN or pcN for every case, or CASE=WALK,... (default: one query a CTA)")
    ap.add_argument("--new-config", help="K=V,...: AttentionConfig items of the variants only")
    ap.add_argument("--spread-positions", action="store_true",
                    help="decode: sequence i at the benchmark's position minus 37·i mod 128 (every ring phase)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    news = check_versions(ap, args.base, args.new)
    cases = args.case or sorted(CASES)
    walks: dict[str, dict[str, int]] = {c: {} for c in cases}
    if args.walk is not None:
        try:
            walks = parse_case_walks(args.walk, cases)
        except ValueError as e:
            ap.error(str(e))
    new_config = None
    if args.new_config is not None:
        try:
            new_config = parse_config(args.new_config)
        except ValueError as e:
            ap.error(str(e))
    if args.spread_positions and (bad := [c for c in cases if not CASES[c][2]]):
        ap.error(f"--spread-positions: only the decode case (a window ring) has one position a sequence, got {bad}")
    if args.build_only:
        arch = args.arch or "sm_90a"
    else:
        from tilev4.kernels.registry import current_arch

        arch = args.arch or current_arch()
    jobs = [(c, f, arch, {**walks[c], **(new_config or {})}) for c in cases for f in news]
    jobs += [(c, args.base, arch, walks[c]) for c in cases]
    if args.jobs > 1 and len(jobs) > 1:
        with cf.ProcessPoolExecutor(min(args.jobs, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            list(ex.map(_build_in_worker, jobs))
    if args.build_only:
        for job in jobs:
            build(*job)
        print(f"built {len(jobs)} programs for {arch}")
        return 0
    rows = []
    for c in cases:
        rows.append(run_case(c, args.base, arch, args.rounds, news, walks[c] or None, new_config,
                             args.spread_positions))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:  # after each case, so that a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
