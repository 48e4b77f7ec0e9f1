"""What ptxas makes of a seesaw attention program: registers, spills and wgmma warnings, without a GPU.

    python3 tools/attention_ptxas.py --case csa64 --walk qt2                       # the working tree's generator
    python3 tools/attention_ptxas.py --codegen /tmp/codegen_v.py --case hca64 --walk qt8 --cuda /tmp/hca.cu
    python3 tools/attention_ptxas.py --case csa128 --json /tmp/report.json

The tool builds the main program of a case (those of ``tools/attention_timeline.py``: the benchmark's shapes) from
the working tree's :mod:`tilev4.dsl.codegen` or from a version of it (``--codegen``, loaded as its own module, as
``tools/attention_ab.py`` does), lowers it for ``sm_90a`` and compiles the CUDA with ``nvcc -Xptxas -v``. It reports
the registers a thread, the stack frame, the spill bytes and every ``C75xx`` advisory, which ptxas prints when it
serialises the program's wgmma (an accumulator touched by a non-wgmma instruction while in flight, and the like);
TileLang's own build drops these lines. Where a ``cuobjdump`` is found (``PATH``, ``$CUDA_HOME/bin`` or the
``nvidia-cuda-cuobjdump`` wheel), it also counts the SASS's ``HGMMA`` and ``WARPGROUP.DEPBAR`` (wgmma waits, by the
number of groups left in flight). Exit status 1 when the program spills or a wgmma advisory was printed.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from attention_timeline import CASES  # noqa: E402  (the tool directory is not a package)


def lower(case: str, codegen: str | None, walk: dict[str, Any]) -> str:
    """The CUDA source of ``case``'s main program with config items ``walk``, lowered for sm_90a."""
    import tilelang
    from attention_ab import main_program
    from tilelang import tvm

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    with target:
        return tilelang.lower(main_program(case, codegen, walk), target=target).kernel_source


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    cands = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"]
    try:
        import nvidia

        cands += [Path(p) / "cu13" / "bin" / "cuobjdump" for p in nvidia.__path__]
    except ImportError:
        pass
    return next((str(c) for c in cands if c.is_file()), None)


def parse_ptxas(text: str) -> dict[str, Any]:
    """Registers, stack frame, spills and wgmma advisories from ``nvcc -Xptxas -v`` output (one kernel)."""
    regs = re.findall(r"Used (\d+) registers", text)
    frame = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs or not frame:
        raise ValueError(f"no ptxas resource line in the compiler output:\n{text[-2000:]}")
    stack, stores, loads = (int(x) for x in frame[-1])
    return {"registers": int(regs[-1]), "stack_frame": stack, "spill_stores": stores, "spill_loads": loads,
            "advisories": sorted({line.strip() for line in text.splitlines() if re.search(r"\bC75\d\d\b", line)})}


def sass_counts(sass: str) -> dict[str, int]:
    """``HGMMA`` instructions by shape and ``WARPGROUP.DEPBAR.LE gsb0, N`` waits by N, in a SASS listing."""
    out: Counter[str] = Counter()
    for m in re.finditer(r"\bHGMMA\.(\w+)\.", sass):
        out[f"hgmma_{m.group(1)}"] += 1
    for m in re.finditer(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+|\d+)", sass):
        out[f"wgmma_wait_{int(m.group(1), 0)}"] += 1
    return dict(sorted(out.items()))


def report(cuda: str, keep: Path | None = None) -> dict[str, Any]:
    """Compile ``cuda`` for sm_90a with ``-Xptxas -v``: :func:`parse_ptxas` (+ :func:`sass_counts` where a
    cuobjdump is found)."""
    import tilelang

    tl = Path(tilelang.__file__).parent
    with tempfile.TemporaryDirectory() as tmp:
        src = keep or Path(tmp) / "kernel.cu"
        src.write_text(cuda)
        cubin = Path(tmp) / "kernel.cubin"
        cmd = ["nvcc", "--cubin", "-O3", "-arch=sm_90a", "-std=c++20", f"-I{tl / 'src'}",
               f"-I{tl / '3rdparty' / 'cutlass' / 'include'}", "-Xptxas", "-v", "-o", str(cubin), str(src)]
        if Path("/usr/bin/g++").is_file():
            cmd.insert(1, "-ccbin=/usr/bin/g++")
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"nvcc failed ({run.returncode}):\n{(run.stdout + run.stderr)[-4000:]}")
        out = parse_ptxas(run.stdout + run.stderr)
        dump = _cuobjdump()
        if dump:
            sass = subprocess.run([dump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
            out["sass"] = sass_counts(sass)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), required=True)
    ap.add_argument("--codegen", help="a version of tilev4/dsl/codegen.py (default: the working tree's)")
    ap.add_argument("--walk", help="qtN or pcN: the main program's walk of queries (default: one query a CTA)")
    ap.add_argument("--cuda", help="also write the lowered CUDA here")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    if args.codegen is not None and not Path(args.codegen).is_file():
        ap.error(f"--codegen: no such file: {args.codegen}")
    walk: dict[str, Any] = {}
    if args.walk is not None:
        from attention_walks import parse_walk

        try:
            walk = parse_walk(args.walk)
        except ValueError as e:
            ap.error(str(e))
    rep = {"case": args.case, "walk": walk, "codegen": args.codegen or "working tree",
           **report(lower(args.case, args.codegen, walk), Path(args.cuda) if args.cuda else None)}
    print(json.dumps(rep, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1) + "\n")
    return 1 if rep["spill_stores"] or rep["spill_loads"] or rep["advisories"] else 0


if __name__ == "__main__":
    sys.exit(main())
