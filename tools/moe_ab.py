"""A/B of versions of the warp-specialised bf16 expert GEMMs (``tilev4/kernels/moe_ws.py``) on the GPU: bits and time.

    git show main:tilev4/kernels/moe_ws.py > /tmp/moe_ws_base.py                     # here (the device has no .git)
    python3 tools/moe_ab.py --base /tmp/moe_ws_base.py --build-only --arch sm_90a    # no GPU: fill the kernel cache
    python3 tools/moe_ab.py --base /tmp/moe_ws_base.py --json $OUT/moe_ab.json       # on a GPU
    python3 tools/moe_ab.py --base /tmp/base.py --new /tmp/vA.py --new /tmp/vB.py --case skewed8192

Each version (``--base``, and each ``--new``, default the working tree's module; labelled by the file's stem) is
loaded as a module of its own and builds the ``moe_up`` and ``moe_down`` ws programs of the table the op runs (192
rows, ``UP_192_CONFIG`` / ``DOWN_192_CONFIG``, or ``--table 128``: the registry's default 128-row configs). Cases:
``skewed<T>`` — the routing of ``tilev4 bench moe`` (random gate and bias, T tokens: experts of a few to ~1100 rows)
— and ``balanced<R>`` (exactly R rows an expert, :func:`tilev4.bench.moe.balanced_routing`). All versions run on the
same permutation with their outputs NaN-poisoned first; each variant's h and y are compared bit for bit with the
base's; then the up-projection alone (CUDA-graph replays) and up + down are timed in turn, the order reversed every
other round, L2 flushed (:func:`tilev4.bench.time_cuda`). Rows report medians and the median of per-round ratios
variant / base.
"""

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import re
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from attention_timeline import module_from_source  # noqa: E402  (the tool directory is not a package)

CASE_RE = re.compile(r"(skewed|balanced)(\d+)$")


def parse_case(case: str) -> tuple[str, int]:
    """``"skewed8192"`` → ("skewed", 8192) (tokens); ``"balanced192"`` → ("balanced", 192) (rows an expert, a
    multiple of 3 so that 256 experts × R / 6 slots is whole)."""
    m = CASE_RE.match(case)
    if not m or int(m.group(2)) <= 0 or (m.group(1) == "balanced" and int(m.group(2)) % 3):
        raise ValueError(f"case {case!r}: expected skewed<tokens> or balanced<rows an expert, a multiple of 3>")
    return m.group(1), int(m.group(2))


def programs(path: str | None, table: int) -> tuple[Any, Any]:
    """The (up, down) ws programs of the module at ``path`` (None: the working tree's) for the ``table``-row tiles."""
    import tilev4.kernels.moe_ws as current
    from tilev4.bench.moe import DIM, INTER
    from tilev4.kernels.moe import DOWN_192_CONFIG, UP_192_CONFIG

    mod = current if path is None else module_from_source(Path(path).read_text(), "tilev4_moe_ws_ab", Path(path))
    if table == 192:
        up, down = UP_192_CONFIG, DOWN_192_CONFIG
    else:  # the registry's defaults (build_moe_up / build_moe_down)
        up = {"block_m": 128, "block_n": 128, "block_k": 64, "num_stages": 4}
        down = {"block_m": 128, "block_n": 256, "block_k": 64, "num_stages": 4}
    return tuple(mod.build_ws_gemm(kind, k, False, c["block_n"], c["block_k"], c["num_stages"], 8, c["block_m"])
                 for kind, k, c in (("up", DIM, up), ("down", INTER, down)))


def build(path: str | None, table: int, arch: str) -> tuple[Any, Any]:
    import tilelang

    return tuple(tilelang.compile(p, target={"kind": "cuda", "arch": arch}, execution_backend="tvm_ffi")
                 for p in programs(path, table))


def _build_in_worker(job: tuple[str | None, int, str]) -> bool:
    build(*job)  # fills TileLang's kernel cache, so that the parent's build is a cache hit
    return True


def labels_of(news: list[str | None]) -> list[str]:
    out: list[str] = []
    for f in news:
        stem = "new" if f is None else Path(f).stem
        out.append(stem if stem not in out and stem != "base" else f"{stem}_{len(out)}")
    return out


def routing(case: str, gen: Any, layer: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(x, weights, experts)`` of a case."""
    import importlib

    import torch

    from tilev4.bench.moe import DIM, NUM_EXPERTS, ROUTE_SCALE, TOP_K, balanced_routing

    kind, n = parse_case(case)
    K = importlib.import_module("tilev4.kernels.moe")
    tokens = n if kind == "skewed" else NUM_EXPERTS * n // TOP_K
    x = torch.randn(tokens, DIM, generator=gen, device="cuda").bfloat16()
    if kind == "skewed":
        return (x, *K.moe_route(x, layer["gate"], layer["bias"], TOP_K, ROUTE_SCALE))
    return (x, *balanced_routing(tokens, NUM_EXPERTS, TOP_K, gen))


def run_case(case: str, kernels: dict[str, tuple[Any, Any]], table: int, rounds: int, gen: Any,
             layer: dict[str, Any]) -> dict[str, Any]:
    import importlib

    import torch

    from tilev4.bench import time_cuda
    from tilev4.bench.moe import DIM, INTER, LIMIT, NUM_EXPERTS

    K = importlib.import_module("tilev4.kernels.moe")
    x, weights, experts = routing(case, gen, layer)
    perm = K.moe_permute(x, weights, experts, NUM_EXPERTS, up_block_m=table)
    bm, tile_offsets, tile_info = K._bf16_tiles(perm)
    n = perm.x_sorted.shape[0]
    w1, w2, w3 = layer["w1"], layer["w2"], layer["w3"]
    bufs, ups, routeds = {}, {}, {}
    for label, (up_k, down_k) in kernels.items():
        h = torch.full((n, INTER), float("nan"), device="cuda", dtype=torch.bfloat16)
        y = torch.full((n, DIM), float("nan"), device="cuda", dtype=torch.bfloat16)

        def up(up_k=up_k, h=h):
            up_k(perm.x_sorted, perm.w_sorted, w1, w3, perm.offsets, tile_offsets, tile_info, h, LIMIT)

        def routed(up=up, down_k=down_k, h=h, y=y):
            up()
            down_k(h, w2, perm.offsets, tile_offsets, tile_info, y)

        routed()
        bufs[label], ups[label], routeds[label] = (h, y), up, routed
    torch.cuda.synchronize()
    names = list(kernels)
    times: dict[str, dict[str, list[float]]] = {k: {"up": [], "routed": []} for k in names}
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            times[k]["up"].append(time_cuda(ups[k], graph=True))
            times[k]["routed"].append(time_cuda(routeds[k]))
    counts = perm.counts
    row: dict[str, Any] = {"case": case, "table": bm, "rows": n, "partial_slabs": int((counts % 64 > 0).sum()),
                           "base_up_ms": statistics.median(times["base"]["up"]),
                           "base_routed_ms": statistics.median(times["base"]["routed"]), "variants": {}}
    hb, yb = bufs["base"]
    for k in names:
        if k == "base":
            continue
        h, y = bufs[k]
        row["variants"][k] = {
            "bits_equal": bool(torch.equal(h.view(torch.int16), hb.view(torch.int16))
                               and torch.equal(y.view(torch.int16), yb.view(torch.int16))),
            "nan": bool(torch.isnan(h).any() or torch.isnan(y).any()),
            "up_ms": statistics.median(times[k]["up"]),
            "routed_ms": statistics.median(times[k]["routed"]),
            "up_ratio": statistics.median(a / b for a, b in zip(times[k]["up"], times["base"]["up"])),
            "routed_ratio": statistics.median(a / b for a, b in zip(times[k]["routed"], times["base"]["routed"])),
        }
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the other version of tilev4/kernels/moe_ws.py (a file)")
    ap.add_argument("--new", action="append", help="a version to measure (a file; repeatable; default: the working "
                    "tree's)")
    ap.add_argument("--case", action="append", help="skewed<T> or balanced<R> (repeatable; default: skewed8192, "
                    "balanced192)")
    ap.add_argument("--table", type=int, choices=(128, 192), default=192)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--jobs", type=int, default=4, help="parallel compiles before the GPU runs")
    ap.add_argument("--build-only", action="store_true", help="lower and compile every program, no GPU")
    ap.add_argument("--arch", help="CUDA arch (default: the current GPU's; sm_90a with --build-only)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    news: list[str | None] = args.new or [None]
    for opt, files in (("base", [args.base]), ("new", news)):
        for f in files:
            if f is not None and not Path(f).is_file():
                ap.error(f"--{opt}: no such file: {f}")
    cases = args.case or ["skewed8192", "balanced192"]
    for c in cases:
        try:
            parse_case(c)
        except ValueError as e:
            ap.error(str(e))
    arch = args.arch
    if arch is None:
        if args.build_only:
            arch = "sm_90a"
        else:
            import torch

            major, minor = torch.cuda.get_device_capability()
            arch = f"sm_{major}{minor}{'a' if major >= 9 else ''}"
    jobs = [(f, args.table, arch) for f in [args.base, *news]]
    with cf.ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(jobs))),
                                mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_build_in_worker, jobs))
    if args.build_only:
        print(f"built {len(jobs)} versions × 2 programs for {arch}")
        return 0
    import torch

    from tilev4.bench.moe import _layer

    kernels = {"base": build(args.base, args.table, arch)}
    for label, f in zip(labels_of(news), news):
        kernels[label] = build(f, args.table, arch)
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = _layer(gen)
    rows = []
    for c in cases:
        rows.append(run_case(c, kernels, args.table, args.rounds, gen, layer))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
