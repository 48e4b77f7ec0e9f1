"""The ``tilev4`` command line.

``info`` (GPU, toolchain, caches, which kernels are tuned here), ``compile`` (ahead of time, no GPU
needed), ``tune`` (per-GPU autotuning), ``cache ls|verify|clear|prune|export|import`` (the
compiled-kernel cache), ``bench`` and ``bench-table``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
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
    from tilev4.autotune.identity import driver_version

    return driver_version()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ValueError(f"size must look like 500M or 2G, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def _tuned_row() -> str:
    from tilev4.autotune.identity import current_gpu
    from tilev4.autotune.store import tuned_kernels
    from tilev4.kernels import iter_registry

    gpu = current_gpu()
    if gpu is None:
        return "none (untuned: heuristics; no GPU visible)"
    tuned = tuned_kernels([(k.name, k.source_hash) for k in iter_registry() if k.space is not None], gpu)
    if not tuned:
        return "none (untuned: heuristics)"
    return ", ".join(f"{k} ({len(b)} bucket{'s' * (len(b) != 1)})" for k, b in sorted(tuned.items()))


def _cache_row() -> str:
    from tilev4.autotune.kernel_cache import list_entries

    entries = list_entries()
    here = sum(1 for e in entries if e.current_toolchain)
    return (f"{len(entries)} entries, {_human_bytes(sum(e.size_bytes for e in entries))} "
            f"({here} for this toolchain)")


def info_rows() -> list[tuple[str, str]]:
    """The facts ``tilev4 info`` prints, as (label, value) rows."""
    import torch

    import tilev4
    from tilev4.autotune import cache_dir, toolchain, toolchain_hash
    from tilev4.kernels import DEFAULT_AOT_ARCH, current_arch, registry_names

    arch = current_arch()
    if arch != DEFAULT_AOT_ARCH:
        arch += f" (the kernels are written for and tested on {DEFAULT_AOT_ARCH}; most need its TMA and wgmma)"
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
        ("kernel arch", arch),
        ("CUDA (torch)", str(torch.version.cuda)),
        ("nvcc", _nvcc_version()),
        ("torch", torch.__version__),
        ("tilelang", _version("tilelang")),
        ("python", sys.version.split()[0]),
        ("cache directory", str(cache_dir())),
        ("kernel cache", _cache_row()),
        ("toolchain", f"{toolchain_hash()} {toolchain()}"),
        ("TileLang cache", os.environ.get("TILELANG_CACHE_DIR", os.path.expanduser("~/.tilelang/cache"))),
        ("registered kernels", ", ".join(registry_names())),
        ("tuned for this GPU", _tuned_row()),
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


def _progress(console: Any) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, transient=False)


def _cmd_compile(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tilev4.autotune.tuner import compile_jobs
    from tilev4.kernels import get_kernel_def, iter_registry
    from tilev4.kernels.registry import DEFAULT_AOT_ARCH, aot_configs

    console = Console()
    if args.configs:
        from tilev4.kernels.registry import recorded_jobs

        try:
            from tilev4.kernels.registry import aot_configs_for

            jobs = [(n, full, f"recorded, {src}") for n, c in recorded_jobs(args.configs)
                    if not args.kernel or n in args.kernel
                    for full, src in aot_configs_for(get_kernel_def(n), [c], args.arch, tuned=not args.default_only)]
        except (OSError, ValueError) as e:
            console.print(f"[red]--configs: {e}[/red]")
            return 2
    else:
        kdefs = [get_kernel_def(k) for k in args.kernel] if args.kernel else list(iter_registry())
        jobs = [(k.name, cfg, src) for k in kdefs for cfg, src in aot_configs(k, args.arch, args.default_only)]
    if args.arch != DEFAULT_AOT_ARCH:
        console.print(f"note: tilev4's kernels are written for and tested on {DEFAULT_AOT_ARCH}; for {args.arch} "
                      "only those that TileLang can lower for it build (untested there)")
    console.print(f"compiling {len(jobs)} kernel configs for [bold]{args.arch}[/bold] with {args.jobs} process(es)")
    t_all = time.perf_counter()
    with _progress(console) as progress:
        task = progress.add_task("compile", total=len(jobs))
        outcomes = compile_jobs([(n, c) for n, c, _ in jobs], args.arch, args.jobs,
                                on_done=lambda oc: progress.advance(task))
    source = {(n, repr(sorted(c.items()))): src for n, c, src in jobs}
    table = Table("kernel", "config", "for", "seconds", "status")
    for oc in sorted(outcomes, key=lambda o: (o.kernel, str(o.config))):
        status = f"[red]{oc.error}[/red]" if oc.status == "error" else oc.status
        table.add_row(oc.kernel, ", ".join(f"{k}={v}" for k, v in oc.config.items()),
                      source.get((oc.kernel, repr(sorted(oc.config.items()))), ""), f"{oc.seconds:.1f}", status)
    console.print(table)
    failed = sum(1 for o in outcomes if o.status == "error")
    built = sum(1 for o in outcomes if o.status == "compiled")
    console.print(f"{len(outcomes) - failed}/{len(outcomes)} ready for {args.arch} ({built} compiled, "
                  f"{len(outcomes) - failed - built} already cached) in {time.perf_counter() - t_all:.1f} s")
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """The main job: facts, the kernels built ahead of time, and a model generating end to end."""
    import tempfile

    import torch
    from rich.console import Console
    from rich.table import Table

    from tilev4.kernels import current_arch, iter_registry
    from tilev4.model import Config, Model, write_random_checkpoint
    from tilev4.model.backend import LOGITS_REL_TOL, ReferenceOps
    from tilev4.model.cache import kv_table_rows

    console = Console()
    _cmd_info(args)
    gpu = torch.cuda.is_available()
    arch = current_arch() if gpu else "sm_90a"
    if not args.skip_compile:
        console.rule(f"kernels, built ahead of time for {arch}")
        rc = _cmd_compile(argparse.Namespace(arch=arch, kernel=None, jobs=args.jobs, default_only=False, configs=None))
        if rc:
            return rc
    table = Table("kernel", "configs", "batch-invariant", "summary")
    for k in iter_registry():
        table.add_row(k.name, str(len(k.configs)), "yes" if "batch_invariant" in k.tags else "no", k.summary)
    console.print(table)

    device = "cuda" if gpu else "cpu"
    config = Config.preset(args.model)
    console.rule(f"{args.model} model on {device}: " + ("TileLang kernels" if gpu else "the fp32 reference"))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        write_random_checkpoint(config, directory, seed=0)
        model = Model.from_checkpoint(directory, device=device)
        reference = Model(model.config, model.tensors, device, ops=ReferenceOps()) if gpu else None
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (48, 17, 5)]
    model.generate([[1]], max_new_tokens=1)  # warm-up (compiles or loads the kernels on a GPU)
    t0 = time.perf_counter()
    out = model.generate(prompts, args.new_tokens)
    dt = time.perf_counter() - t0
    for p, o in zip(prompts, out):
        console.print(f"prompt of {len(p):3d} tokens -> {o}")
    n_new = sum(map(len, out))
    console.print(f"{n_new} tokens generated for {len(prompts)} ragged prompts in {dt:.2f} s "
                  f"({n_new / dt:.1f} tokens/s, prefill included) on {model.ops.name}")
    if reference is not None:  # the kernels against the reference ops on the same GPU and weights
        t0 = time.perf_counter()
        ref_out = reference.generate(prompts, args.new_tokens)
        dt_ref = time.perf_counter() - t0
        console.print(f"reference ops on the GPU: {dt_ref:.2f} s ({n_new / dt_ref:.1f} tokens/s); kernels "
                      f"{dt_ref / dt:.1f}× faster; same tokens for {sum(a == b for a, b in zip(out, ref_out))}"
                      f"/{len(prompts)} prompts")
        cache_k, cache_r = model.new_cache(len(prompts), 64), reference.new_cache(len(prompts), 64)
        lk, lr = model.prefill(prompts, cache_k), reference.prefill(prompts, cache_r)
        err = ((lk - lr).norm(dim=-1) / lr.norm(dim=-1)).max().item()
        console.print(f"prefill logits, kernels vs reference: max relative L2 error {err:.2e} "
                      f"(bf16 activations; the GPU tests allow {LOGITS_REL_TOL:g} on a model with no discrete choice)")
    kv = Table("context", "V4-Flash KV B/token", "per layer", "vs V3.2 (656 B/token/layer)")
    for row in kv_table_rows(Config.flash(), (4096, 32768, 131072, 2**20)):
        kv.add_row(*row[:4])
    console.print(kv)
    return 0


def _random_model(name: str, device: str, batch_invariant: bool = False, seed: int = 0) -> Any:
    """The ``name`` preset with random weights (the tensors a random checkpoint holds) on ``device``."""
    from tilev4.model import Config, Model, random_checkpoint_tensors

    config = Config.preset(name)
    return Model(config, random_checkpoint_tensors(config, seed), device, batch_invariant=batch_invariant)


def _cmd_check_determinism(args: argparse.Namespace) -> int:
    """Batch invariance and run-to-run determinism of the kernel path (GPU only).

    The same prompt alone and inside random batches must give bitwise-identical logits and tokens at every
    step (batch-invariant mode), and a second process must produce the same digest. On a machine without a
    GPU it says so and exits 2: the reference path makes no batch-invariance promise to check.
    """
    import json
    import subprocess
    import sys

    import torch
    from rich.console import Console

    from tilev4.model.backend import KernelOps
    from tilev4.model.determinism import check_batch_invariance, digest, run_target

    console = Console()
    if not torch.cuda.is_available():
        console.print("check-determinism needs a CUDA GPU (it checks the TileLang kernel path); none is visible")
        return 2
    g = torch.Generator().manual_seed(args.seed)
    model = _random_model(args.model, "cuda", batch_invariant=not args.default_mode)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
    if args.digest_only:  # the child process of the two-process check
        run = run_target(model, prompt, args.steps, args.capacity)
        print(json.dumps({"digest": digest(run)}))
        return 0
    mode = "default" if args.default_mode else "batch-invariant"
    console.rule(f"{args.model} model, {mode} mode: prompt of {args.prompt_len} tokens, {args.steps} decode steps")
    not_inv = KernelOps(batch_invariant=False).non_invariant_ops()
    console.print("ops NOT batch-invariant in the default mode (batch_invariant=False):")
    for op, why in not_inv.items():
        console.print(f"  {op}: {why}")
    left = model.ops.non_invariant_ops()
    console.print(f"ops not batch-invariant in this run's mode: {', '.join(left) if left else 'none'}")
    alone, trials = check_batch_invariance(model, prompt, args.steps, args.trials, args.max_others,
                                           capacity=args.capacity, seed=args.seed)
    ok = True
    for t in trials:
        same = t.identical_logits and t.identical_tokens
        ok &= same
        console.print(f"  batch of {len(t.other_lengths) + 1} (others {t.other_lengths}), target at row {t.row}: "
                      f"{'bitwise identical' if same else f'DIFFERENT (max |Δlogit| {t.max_abs_diff:.3g})'}")
    mine = digest(alone)
    cmd = [sys.executable, "-m", "tilev4", "check-determinism", "--digest-only", "--model", args.model,
           "--prompt-len", str(args.prompt_len), "--steps", str(args.steps), "--capacity", str(args.capacity),
           "--seed", str(args.seed)] + (["--default-mode"] if args.default_mode else [])
    child = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in child.stdout.splitlines() if ln.startswith("{")]
    theirs = json.loads(lines[-1])["digest"] if child.returncode == 0 and lines else None
    same_proc = theirs == mine
    ok &= same_proc
    console.print(f"second process: {'identical digest' if same_proc else 'DIFFERENT'} ({mine[:16]}…"
                  + ("" if same_proc else f" vs {theirs and theirs[:16]}; {child.stderr[-300:]}") + ")")
    console.print(f"tokens of the lone run: {alone.tokens}")
    console.print("[bold green]deterministic[/]" if ok else "[bold red]NOT deterministic[/]")
    return 0 if ok else 1


def _cmd_tune(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from tilev4.autotune.tuner import parse_shapes, tune

    console = Console()
    if args.import_report:
        return _import_report(args, console)
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else None
        space = None
        if args.quick:
            space = _quick_space(args.kernel)
        with _progress(console) as progress:
            report = tune(args.kernel or None, shapes, workers=args.jobs, rounds=args.rounds, reps=args.reps,
                          space=space, progress=progress, log=console.print, compile_only=args.compile_only,
                          arch=args.arch, remember_failures=not args.retry_failed)
    except (RuntimeError, ValueError) as e:
        print(f"tilev4 tune: {e}", file=sys.stderr)
        return 2
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2, sort_keys=True, default=repr) + "\n")
    if args.compile_only:
        c = report["compile"]
        console.print(f"{c['configs']} candidate configs for {report['arch']}: {c['compiled']} compiled, "
                      f"{c['cached']} already cached, {c['errors']} failed, in {report['seconds']['total']:.0f} s")
        return 0 if not c["errors"] else 1
    if args.ship:
        _ship(report["records"], console)
    from rich.table import Table

    table = Table("kernel", "bucket", "winner", "ms", "default ms", "speed-up", "cands", "pruned", "rejected")
    for name, rows in sorted(report["kernels"].items()):
        for r in rows:
            table.add_row(name, r["bucket"], str(r["winner"]), f"{r['winner_ms']:.4f}",
                          f"{r['default_ms']:.4f}" if r["default_ms"] else "-",
                          f"{r['speedup_vs_default']:.3f}" if r["speedup_vs_default"] else "-",
                          str(r["candidates"]), str(r["pruned"]), str(r["rejected"]))
    console.print(table)
    console.print(f"tuned in {report['seconds']['total']:.0f} s (compile {report['seconds']['compile']:.0f} s, "
                  f"measure {report['seconds']['measure']:.0f} s)")
    return 0


def _quick_space(kernels: list[str] | None) -> Any:
    from tilev4.autotune.space import Space
    from tilev4.kernels import get_kernel_def

    if not kernels or len(kernels) != 1:
        raise ValueError("--quick needs exactly one --kernel")
    space = get_kernel_def(kernels[0]).space
    if space is None:
        raise ValueError(f"kernel {kernels[0]!r} has no tuning space")
    return Space({k: tuple(v)[:2] for k, v in space.params.items()}, space.constraints, space.smem_bytes,
                 space.heuristic)


def _ship(records: list[dict[str, Any]], console: Any) -> None:
    from tilev4.autotune.store import SHIPPED_DIR, TuningRecord, save_record

    paths = {save_record(TuningRecord.from_dict(r), SHIPPED_DIR) for r in records}
    for p in sorted(paths):
        console.print(f"shipped defaults: {p}")


def _import_report(args: argparse.Namespace, console: Any) -> int:
    import json

    from tilev4.autotune.store import TuningRecord, save_record

    report = json.loads(Path(args.import_report).read_text())
    records = report["records"]
    if args.update_readme:
        from tilev4.autotune.report import update_readme

        update_readme(Path(args.update_readme), Path(args.import_report))
        console.print(f"wrote the tuning table of {args.import_report} into {args.update_readme}")
    if args.ship:
        _ship(records, console)
    else:
        for r in records:
            save_record(TuningRecord.from_dict(r))
        console.print(f"imported {len(records)} tuning records into this machine's results")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tilev4.autotune import kernel_cache as kc

    console = Console()
    if args.cache_cmd in ("ls", "verify"):
        from rich.table import Table

        entries = kc.list_entries(verify=args.cache_cmd == "verify" or args.verify)
        table = Table("kernel", "arch", "toolchain", "config", "size", "created", "status")
        for e in entries:
            status = "ok" if e.problem is None else f"[red]{e.problem}[/red]"
            table.add_row(e.kernel, e.arch, e.toolchain_hash[:8] + ("" if e.current_toolchain else " (other)"),
                          ", ".join(f"{k}={v}" for k, v in e.config.items()), _human_bytes(e.size_bytes),
                          e.created, status)
        console.print(table)
        console.print(f"{len(entries)} entries, {_human_bytes(sum(e.size_bytes for e in entries))} in "
                      f"{kc.kernels_root()}")
        return 1 if args.cache_cmd == "verify" and any(e.problem for e in entries) else 0
    if args.cache_cmd == "clear":
        n, freed = kc.clear(kernel=args.kernel, arch=args.arch)
        if args.results:
            from tilev4.autotune.store import results_dir

            shutil.rmtree(results_dir(), ignore_errors=True)
        also = " and the tuning results" if args.results else ""
        console.print(f"removed {n} entries ({_human_bytes(freed)}){also}")
        return 0
    if args.cache_cmd == "prune":
        from tilev4.kernels import iter_registry

        sources = {k.name: k.source_hash for k in iter_registry()}
        n, freed = kc.prune(max_bytes=_parse_size(args.max_size) if args.max_size else None, current_sources=sources)
        console.print(f"pruned {n} entries ({_human_bytes(freed)})")
        return 0
    if args.cache_cmd == "export":
        summary = kc.export_cache(Path(args.file), arch=args.arch, include_results=not args.no_results,
                                  kernels=args.kernel, current_toolchain_only=args.current_toolchain)
        console.print(f"exported {summary['entries']} entries and {summary['results']} tuning files to {args.file}"
                      + (f" ({summary['skipped']} entries that do not verify left out)" if summary["skipped"] else ""))
        return 0
    if args.cache_cmd == "import":
        counts = kc.import_cache(Path(args.file))
        console.print(f"imported {counts['imported']} entries ({counts['present']} already present, "
                      f"{counts['rejected']} rejected), {counts['results']} tuning records; "
                      f"{counts['usable_here']} entries match this machine's toolchain")
        return 1 if counts["rejected"] else 0
    raise AssertionError(args.cache_cmd)


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from tilev4.bench import render_table, run_benches

    try:
        report = run_benches(args.name or None, args.sustained_seconds)
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


def _arch_arg(value: str) -> str:
    """``--arch``: a CUDA SM arch (``sm_90a``), else argparse's usage error naming it."""
    from tilev4.kernels.registry import check_arch

    try:
        return check_arch(value, "--arch")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilev4", description="TileLang kernels for DeepSeek-V4")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="GPU, toolchain, versions and cache locations")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("compile", help="compile registry kernels ahead of time into the kernel cache (no GPU needed)")
    p.add_argument("--arch", default="sm_90a", type=_arch_arg, help="CUDA arch to build for (default sm_90a)")
    p.add_argument("--kernel", action="append", help="only this registry kernel (repeatable)")
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="compile processes")
    p.add_argument("--default-only", action="store_true", help="only each kernel's default config (no tuned ones)")
    p.add_argument("--configs", metavar="FILE",
                   help="build the (kernel, config) pairs a run recorded with TILEV4_RECORD_KERNELS=FILE instead")
    p.set_defaults(func=_cmd_compile)
    p = sub.add_parser("demo", help="the main job: info, AOT kernels, a random model generating end to end")
    p.add_argument("--model", default="tiny", choices=["tiny", "small"], help="model preset (random weights)")
    p.add_argument("--new-tokens", type=int, default=12, help="tokens to generate per prompt")
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="compile processes")
    p.add_argument("--skip-compile", action="store_true", help="do not build the registry first")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("check-determinism",
                       help="GPU: same prompt alone and in random batches -> bitwise-identical logits; two processes")
    p.add_argument("--model", default="small", choices=["tiny", "small"], help="model preset (random weights)")
    p.add_argument("--prompt-len", type=int, default=200, help="tokens in the target prompt")
    p.add_argument("--steps", type=int, default=4, help="greedy decode steps after the prefill")
    p.add_argument("--trials", type=int, default=4, help="random batches to compare")
    p.add_argument("--max-others", type=int, default=5, help="most other prompts in a batch")
    p.add_argument("--capacity", type=int, default=1024, help="cache capacity (the same for every run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--default-mode", action="store_true",
                   help="check the default (not batch-invariant) kernels instead, to see what differs")
    p.add_argument("--digest-only", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_check_determinism)
    p = sub.add_parser("tune", help="tune registry kernels on this GPU and store the results")
    p.add_argument("--kernel", action="append", help="only this registry kernel (repeatable)")
    p.add_argument("--shapes", nargs="+", metavar="K=V,...",
                   help="problems to tune for every --kernel, e.g. D=4096,N=16384 D=7168 "
                        "(default: the registry's configs)")
    p.add_argument("--jobs", type=int, default=max(1, min(16, os.cpu_count() or 1)), help="compile processes")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (candidates reshuffled each round)")
    p.add_argument("--reps", type=int, default=10, help="samples per candidate, shape and round")
    p.add_argument("--quick", action="store_true", help="the first two values of each tunable (one --kernel)")
    p.add_argument("--compile-only", action="store_true",
                   help="only build every candidate into the kernel cache (no GPU needed); export the cache to the "
                        "GPU machine, where `tilev4 tune` then only measures")
    p.add_argument("--arch", type=_arch_arg,
                   help="with --compile-only: the CUDA arch to build for (default: this GPU's, else sm_90a)")
    p.add_argument("--retry-failed", action="store_true",
                   help="build again the candidates whose build failed in an earlier run (by default they are "
                        "skipped, except a timeout when TILEV4_COMPILE_TIMEOUT is now longer)")
    p.add_argument("--report", metavar="FILE", help="write the JSON report (records, speed-ups, times)")
    p.add_argument("--ship", action="store_true", help="also write the records as the package's shipped defaults")
    p.add_argument("--import-report", metavar="FILE", help="store the records of a report instead of tuning")
    p.add_argument("--update-readme", metavar="README",
                   help="with --import-report: write the report's tuned-vs-default table between the README's "
                        "tune-table markers")
    p.set_defaults(func=_cmd_tune)
    p = sub.add_parser("cache", help="the compiled-kernel cache: ls, verify, clear, prune, export, import")
    csub = p.add_subparsers(dest="cache_cmd", required=True)
    c = csub.add_parser("ls", help="list entries with size")
    c.add_argument("--verify", action="store_true", help="check every file's sha256 against its manifest")
    c = csub.add_parser("verify", help="verify every entry; exit 1 if one does not")
    c = csub.add_parser("clear", help="remove entries")
    c.add_argument("--kernel", help="only this kernel's entries")
    c.add_argument("--arch", type=_arch_arg, help="only this arch's entries")
    c.add_argument("--results", action="store_true", help="also remove this machine's tuning results")
    c = csub.add_parser("prune", help="remove stale entries (other toolchain, old source, bad), then the oldest")
    c.add_argument("--max-size", help="then remove the oldest entries until the cache fits, e.g. 2G")
    c = csub.add_parser("export", help="write the verified entries and tuning results to a .tar.gz")
    c.add_argument("file")
    c.add_argument("--arch", type=_arch_arg, help="only this arch's entries")
    c.add_argument("--no-results", action="store_true", help="leave the tuning results out")
    c.add_argument("--kernel", action="append", help="only this registry kernel's entries (repeatable)")
    c.add_argument("--current-toolchain", action="store_true", help="only entries built by this machine's toolchain")
    c = csub.add_parser("import", help="add the entries and tuning results of an export")
    c.add_argument("file")
    p.set_defaults(func=_cmd_cache)
    p = sub.add_parser("bench", help="benchmark kernels on the GPU against same-run peaks")
    p.add_argument("name", nargs="*", help="benchmarks to run (default: all)")
    p.add_argument("--json", help="write the report to this JSON file")
    p.add_argument("--sustained-seconds", type=float, default=None,
                   help="length of each back-to-back run at the power cap (default 2; 0: none)")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("bench-table", help="markdown table from benchmark JSON files")
    p.add_argument("files", nargs="+", help="benchmark JSON files")
    p.add_argument("--update-readme", metavar="README", help="rewrite the table between the README markers")
    p.set_defaults(func=_cmd_bench_table)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TileLang logs two INFO lines per kernel it compiles; the CLI shows its own progress instead
    os.environ.setdefault("TILEV4_TILELANG_LOG_LEVEL", "WARNING")
    dump_after = os.environ.get("TILEV4_DUMP_STACKS_AFTER")
    if dump_after:  # debugging a stall: every thread's stack to stderr every N seconds
        import faulthandler

        faulthandler.dump_traceback_later(float(dump_after), repeat=True)
    args = build_parser().parse_args(argv)
    if getattr(args, "jobs", 1) < 1:
        args.jobs = 1
    try:
        return int(args.func(args))
    except ValueError as e:  # bad input (a kernel name, $TILEV4_ARCH, a config): its message, no traceback
        print(f"tilev4 {args.command}: {e}", file=sys.stderr)
        return 2
