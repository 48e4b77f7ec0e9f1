"""The ``tilev4`` command line: ``info`` and ``compile`` (ahead of time, no GPU needed)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

__all__ = ["main"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )
    if not nvcc or not os.path.exists(nvcc):
        return "not found"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "not runnable"
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return f"{m.group(2)} ({nvcc})" if m else out.strip().splitlines()[-1]


def _driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "unknown (no nvidia-smi)"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"


def info_rows() -> list[tuple[str, str]]:
    """The facts ``tilev4 info`` prints, as (label, value) rows."""
    import torch

    import tilev4
    from tilev4.autotune import cache_dir
    from tilev4.kernels import current_arch, registry_names

    rows: list[tuple[str, str]] = [("tilev4", tilev4.__version__)]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        rows += [
            ("GPU", p.name),
            ("compute capability", f"{p.major}.{p.minor}"),
            ("SM count", str(p.multi_processor_count)),
            ("GPU memory", f"{p.total_memory / 2**30:.1f} GiB"),
            ("driver", _driver_version()),
        ]
    else:
        rows.append(("GPU", "none: no CUDA device visible; kernels can still be compiled ahead of time"))
    rows += [
        ("kernel arch", current_arch()),
        ("CUDA (torch)", str(torch.version.cuda)),
        ("nvcc", _nvcc_version()),
        ("torch", torch.__version__),
        ("tilelang", _version("tilelang")),
        ("python", sys.version.split()[0]),
        ("cache directory", str(cache_dir())),
        ("TileLang cache", os.environ.get("TILELANG_CACHE_DIR", os.path.expanduser("~/.tilelang/cache"))),
        ("registered kernels", ", ".join(registry_names())),
    ]
    return rows


def _cmd_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for k, v in info_rows():
        table.add_row(f"[bold]{k}[/bold]", v)
    Console().print(table)
    return 0


def _compile_one(name: str, config: dict[str, Any], arch: str) -> float:
    from tilev4.kernels import compile_kernel

    t0 = time.perf_counter()
    compile_kernel(name, config, arch)
    return time.perf_counter() - t0


def _cmd_compile(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from tilev4.kernels import get_kernel_def, iter_registry

    console = Console()
    kdefs = [get_kernel_def(k) for k in args.kernel] if args.kernel else list(iter_registry())
    jobs = [(k.name, dict(c)) for k in kdefs for c in (k.configs if not args.default_only else k.configs[:1])]
    console.print(f"compiling {len(jobs)} kernel configs for [bold]{args.arch}[/bold] with {args.jobs} process(es)")
    results: list[tuple[str, dict[str, Any], float | None, str]] = []
    t_all = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("compile", total=len(jobs))
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futs = {pool.submit(_compile_one, n, c, args.arch): (n, c) for n, c in jobs}
            for fut in as_completed(futs):
                n, c = futs[fut]
                try:
                    results.append((n, c, fut.result(), ""))
                except Exception as e:
                    results.append((n, c, None, f"{type(e).__name__}: {e}".splitlines()[0][:200]))
                progress.advance(task)
    table = Table("kernel", "config", "seconds", "status")
    for n, c, t, err in sorted(results, key=lambda r: (r[0], str(r[1]))):
        table.add_row(n, ", ".join(f"{k}={v}" for k, v in c.items()), f"{t:.1f}" if t is not None else "-",
                      "ok" if not err else f"[red]{err}[/red]")
    console.print(table)
    failed = sum(1 for r in results if r[3])
    console.print(f"{len(results) - failed}/{len(results)} compiled for {args.arch} in "
                  f"{time.perf_counter() - t_all:.1f} s")
    return 1 if failed else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from tilev4.bench import render_table, run_benches

    try:
        report = run_benches(args.name or None)
    except (RuntimeError, ValueError) as e:
        print(f"tilev4 bench: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(render_table([report]))
    return 0


def _cmd_bench_table(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tilev4.bench import render_table, update_readme

    files = [Path(p) for p in args.files]
    if args.update_readme:
        update_readme(Path(args.update_readme), files)
    else:
        print(render_table([json.loads(p.read_text()) for p in sorted(files)]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilev4", description="TileLang kernels for DeepSeek-V4")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="GPU, toolchain, versions and cache locations")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("compile", help="compile registry kernels ahead of time (no GPU needed)")
    p.add_argument("--arch", default="sm_90a", help="CUDA arch to build for (default sm_90a)")
    p.add_argument("--kernel", action="append", help="only this registry kernel (repeatable)")
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="compile processes")
    p.add_argument("--default-only", action="store_true", help="only each kernel's default config")
    p.set_defaults(func=_cmd_compile)
    p = sub.add_parser("bench", help="benchmark kernels on the GPU against same-run peaks")
    p.add_argument("name", nargs="*", help="benchmarks to run (default: all)")
    p.add_argument("--json", help="write the report to this JSON file")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("bench-table", help="markdown table from benchmark JSON files")
    p.add_argument("files", nargs="+", help="benchmark JSON files")
    p.add_argument("--update-readme", metavar="README", help="rewrite the table between the README markers")
    p.set_defaults(func=_cmd_bench_table)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "jobs", 1) < 1:
        args.jobs = 1
    return int(args.func(args))
