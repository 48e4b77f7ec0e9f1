"""A/B of versions of the warp-specialised expert GEMMs (``moe_ws.py``, or ``moe_fp8.py``) on the GPU: bits and time.

    git show main:tilev4/kernels/moe_ws.py > /tmp/moe_ws_base.py                     # here (the device has no .git)
    python3 tools/moe_ab.py --base /tmp/moe_ws_base.py --build-only --arch sm_90a    # no GPU: fill the kernel cache
    python3 tools/moe_ab.py --base /tmp/moe_ws_base.py --json $OUT/moe_ab.json       # on a GPU
    python3 tools/moe_ab.py --base /tmp/base.py --new /tmp/vA.py --new /tmp/vB.py --case skewed8192
    git show main:tilev4/kernels/moe_fp8.py > /tmp/moe_fp8_base.py
    python3 tools/moe_ab.py --format fp8 --base /tmp/moe_fp8_base.py --case skewed8192

Each version (``--base``, and each ``--new``, default the working tree's module; labelled by the file's stem) is
loaded as a module of its own and builds the ``moe_up`` and ``moe_down`` ws programs of the table the op runs (192
rows, ``UP_192_CONFIG`` / ``DOWN_192_CONFIG``, or ``--table 128``: the registry's default 128-row configs). With
``--format fp8`` the versions are of ``tilev4/kernels/moe_fp8.py`` (its registrations skipped), and the programs those
of the routed FP8 path of ``tilev4 bench moe``: the up-projection quantising h in its epilogue (``moe_up_fp8_q``) and
the default ``moe_down_fp8``, on the 128-row table of a permutation of x quantised 1×128. Cases:
``skewed<T>`` — the routing of ``tilev4 bench moe`` (random gate and bias, T tokens: experts of a few to ~1100 rows)
—, ``natural<T>`` (the same gate with a zero bias: the router's own load on random tokens) and ``balanced<R>``
(exactly R rows an expert, :func:`tilev4.bench.moe.balanced_routing`). All versions run on the
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from attention_ab import check_versions, variant_labels  # noqa: E402  (the tool directory is not a package)
from attention_timeline import module_from_source  # noqa: E402

CASE_RE = re.compile(r"(skewed|natural|balanced)(\d+)$")


def parse_case(case: str) -> tuple[str, int]:
    """``"skewed8192"`` → ("skewed", 8192) (tokens; ``natural<T>`` alike); ``"balanced192"`` → ("balanced", 192)
    (rows an expert, a multiple of 3 so that 256 experts × R / 6 slots is whole)."""
    m = CASE_RE.match(case)
    if not m or int(m.group(2)) <= 0 or (m.group(1) == "balanced" and int(m.group(2)) % 3):
        raise ValueError(f"case {case!r}: expected skewed<tokens>, natural<tokens> or balanced<rows an expert, a "
                         "multiple of 3>")
    return m.group(1), int(m.group(2))


def load_version(path: str | None, fmt: str) -> Any:
    """The module of a version: ``tilev4/kernels/moe_ws.py`` (bf16) or ``moe_fp8.py`` (fp8) from ``path`` (None: the
    working tree's). An FP8 copy runs with its ``@register`` decorators made no-ops (the registry has the package's
    kernels under those names)."""
    import tilev4.kernels.moe_fp8 as current_fp8
    import tilev4.kernels.moe_ws as current_ws

    if path is None:
        return current_ws if fmt == "bf16" else current_fp8
    text = Path(path).read_text()
    if fmt == "fp8":
        stub = "def _ab_no_register(*a, **k):\n    return lambda f: f\n\n\n"
        text = stub + text.replace("@register(", "@_ab_no_register(")
    return module_from_source(text, f"tilev4_moe_{fmt}_ab", Path(path))


def programs(path: str | None, table: int, fmt: str = "bf16") -> tuple[Any, Any]:
    """The (up, down) programs of the version at ``path`` (None: the working tree's): bf16 ws programs of the
    ``table``-row tiles, or the FP8 path's (``moe_up_fp8_q``, ``moe_down_fp8``; 128-row tiles)."""
    import inspect

    from tilev4.bench.moe import DIM, INTER
    from tilev4.kernels.moe import DOWN_192_CONFIG, UP_192_CONFIG, build_moe_down, build_moe_up

    mod = load_version(path, fmt)
    if fmt == "fp8":
        return mod.build_moe_up_fp8_q(DIM), mod.build_moe_down_fp8(INTER)
    if table == 192:
        up, down = UP_192_CONFIG, DOWN_192_CONFIG
    else:  # the defaults of build_moe_up / build_moe_down (block_m 128)
        up, down = ({k: p.default for k, p in inspect.signature(f).parameters.items()
                     if p.default is not inspect.Parameter.empty} for f in (build_moe_up, build_moe_down))
    return tuple(mod.build_ws_gemm(kind, k, False, c["block_n"], c["block_k"], c["num_stages"], 8, c["block_m"])
                 for kind, k, c in (("up", DIM, up), ("down", INTER, down)))


def build(path: str | None, table: int, arch: str, fmt: str = "bf16") -> tuple[Any, Any]:
    import tilelang

    return tuple(tilelang.compile(p, target={"kind": "cuda", "arch": arch}, execution_backend="tvm_ffi")
                 for p in programs(path, table, fmt))


def _build_in_worker(job: tuple[str | None, int, str, str]) -> bool:
    build(*job)  # fills TileLang's kernel cache, so that the parent's build is a cache hit
    return True


def routing(case: str, gen: Any, layer: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(x, weights, experts)`` of a case."""
    import importlib

    import torch

    from tilev4.bench.moe import DIM, NUM_EXPERTS, ROUTE_SCALE, TOP_K, balanced_routing

    kind, n = parse_case(case)
    K = importlib.import_module("tilev4.kernels.moe")
    tokens = NUM_EXPERTS * n // TOP_K if kind == "balanced" else n
    x = torch.randn(tokens, DIM, generator=gen, device="cuda").bfloat16()
    if kind == "balanced":
        return (x, *balanced_routing(tokens, NUM_EXPERTS, TOP_K, gen))
    bias = layer["bias"] if kind == "skewed" else torch.zeros_like(layer["bias"])
    return (x, *K.moe_route(x, layer["gate"], bias, TOP_K, ROUTE_SCALE))


def launches(fmt: str, perm: Any, tile_offsets: Any, tile_info: Any, layer: dict[str, Any], x_scale: Any,
             up_k: Any, down_k: Any) -> tuple[Any, Any, Callable[[], None], Callable[[], None]]:
    """``(h, y, up, routed)``: NaN-poisoned outputs (h: the FP8 path's ``(h8, hs)``) and the launch functions
    (``x_scale``: the FP8 rows' scales, in sorted order)."""
    import torch

    from tilev4.bench.moe import DIM, INTER, LIMIT

    n = perm.x_sorted.shape[0]
    y = torch.full((n, DIM), float("nan"), device="cuda", dtype=torch.bfloat16)
    if fmt == "bf16":
        w1, w2, w3 = layer["w1"], layer["w2"], layer["w3"]
        h = torch.full((n, INTER), float("nan"), device="cuda", dtype=torch.bfloat16)

        def up() -> None:
            up_k(perm.x_sorted, perm.w_sorted, w1, w3, perm.offsets, tile_offsets, tile_info, h, LIMIT)

        def down() -> None:
            down_k(h, w2, perm.offsets, tile_offsets, tile_info, y)
    else:
        q1, q2, q3 = layer["fp8"]
        h8 = torch.full((n, INTER), float("nan"), device="cuda").to(torch.float8_e4m3fn)
        hs = torch.full((n, INTER // 128), float("nan"), device="cuda")
        h = (h8, hs)

        def up() -> None:
            up_k(perm.x_sorted, x_scale, perm.w_sorted, q1.data, q1.scale, q3.data, q3.scale, perm.offsets,
                 tile_offsets, tile_info, h8, hs, LIMIT)

        def down() -> None:
            down_k(h8, hs, q2.data, q2.scale, perm.offsets, tile_offsets, tile_info, y)

    def routed() -> None:
        up()
        down()

    return h, y, up, routed


def _bits(a: Any) -> Any:
    """``a``'s bits as integers of its element size (so that NaN equals NaN and -0 differs from 0)."""
    import torch

    return a.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[a.element_size()])


def run_case(case: str, kernels: dict[str, tuple[Any, Any]], table: int, rounds: int, gen: Any,
             layer: dict[str, Any], fmt: str = "bf16") -> dict[str, Any]:
    import importlib

    import torch

    from tilev4.bench import time_cuda
    from tilev4.bench.moe import NUM_EXPERTS

    K = importlib.import_module("tilev4.kernels.moe")
    x, weights, experts = routing(case, gen, layer)
    x_scale = None
    if fmt == "bf16":
        perm = K.moe_permute(x, weights, experts, NUM_EXPERTS, up_block_m=table)
        bm, tile_offsets, tile_info = K._bf16_tiles(perm)
    else:  # the FP8 path: x quantised once a token, the FP8 rows gathered (128-row table), the row scales too
        from tilev4.kernels import fp8_quantize

        x8, xs_tokens = fp8_quantize(x)
        perm = K.moe_permute(x, weights, experts, NUM_EXPERTS, payload=x8)
        bm, tile_offsets, tile_info = perm.block_m, perm.tile_offsets, perm.tile_info
        x_scale = xs_tokens.index_select(0, perm.sorted_tokens)
    n = perm.x_sorted.shape[0]
    bufs, ups, routeds = {}, {}, {}
    for label, (up_k, down_k) in kernels.items():
        h, y, up, routed = launches(fmt, perm, tile_offsets, tile_info, layer, x_scale, up_k, down_k)
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
    def flat(out):  # every output tensor of a version: h (or h8, hs) and y
        h, y = out
        return [*(h if isinstance(h, tuple) else (h,)), y]

    base = flat(bufs["base"])
    for k in names:
        if k == "base":
            continue
        outs = flat(bufs[k])
        row["variants"][k] = {
            "bits_equal": all(torch.equal(_bits(a), _bits(b)) for a, b in zip(outs, base)),
            "nan": any(bool(torch.isnan(a.float()).any()) for a in outs),
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
    ap.add_argument("--case", action="append", help="skewed<T>, natural<T> or balanced<R> (repeatable; default: "
                    "skewed8192, balanced192)")
    ap.add_argument("--table", type=int, choices=(128, 192), default=192, help="bf16: the tile table")
    ap.add_argument("--format", choices=("bf16", "fp8"), default="bf16",
                    help="fp8: versions of tilev4/kernels/moe_fp8.py, the FP8 path's programs")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--jobs", type=int, default=4, help="parallel compiles before the GPU runs")
    ap.add_argument("--build-only", action="store_true", help="lower and compile every program, no GPU")
    ap.add_argument("--arch", help="CUDA arch (default: the current GPU's; sm_90a with --build-only)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    news = check_versions(ap, args.base, args.new)
    cases = args.case or ["skewed8192", "balanced192"]
    for c in cases:
        try:
            parse_case(c)
        except ValueError as e:
            ap.error(str(e))
    arch = args.arch
    if arch is None:
        from tilev4.kernels.registry import current_arch

        arch = "sm_90a" if args.build_only else current_arch()
    jobs = [(f, args.table, arch, args.format) for f in [args.base, *news]]
    with cf.ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(jobs))),
                                mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_build_in_worker, jobs))
    if args.build_only:
        print(f"built {len(jobs)} versions × 2 programs for {arch}")
        return 0
    import torch

    from tilev4.bench.moe import _layer

    kernels = {"base": build(args.base, args.table, arch, args.format)}
    for label, f in zip(variant_labels(news), news):
        kernels[label] = build(f, args.table, arch, args.format)
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = _layer(gen)
    if args.format == "fp8":
        from tilev4.kernels.moe_fp8 import quantize_fp8_weight

        layer["fp8"] = tuple(quantize_fp8_weight(layer[w]) for w in ("w1", "w2", "w3"))
    rows = []
    for c in cases:
        rows.append(run_case(c, kernels, args.table, args.rounds, gen, layer, args.format))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
