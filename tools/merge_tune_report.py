"""Merge the report of a partial re-tune (``tilev4 tune --kernel K … --report NEW``) into the committed
whole-registry report, which the README's tuning table is generated from.

    python3 tools/merge_tune_report.py benchmarks/tuning/h200.json NEW.json --commit 1f4ae8b \\
        --reason "attention kernels changed (...)"
    python3 -m tilev4 tune --import-report benchmarks/tuning/h200.json --update-readme README.md

The kernels of NEW replace theirs in the base report: every record of those kernels (whatever its source hash)
and their rows of the per-kernel table. A ``retuned`` entry records the commit, date, compile and timing
summary and the reason. The two reports must come from the same GPU model; the base keeps its other kernels,
toolchain and top-level summary as they are. Written with the base's layout (2-space indent, sorted keys).
"""

import argparse
import json
from pathlib import Path
from typing import Any


def merge(base: dict[str, Any], new: dict[str, Any], commit: str, reason: str) -> list[str]:
    """Merge ``new`` into ``base`` in place; returns the kernels replaced."""
    if base["gpu"] != new["gpu"]:
        raise ValueError(f"the reports are from different GPUs: {base['gpu']} and {new['gpu']}")
    kernels = sorted(new["kernels"])
    if not kernels:
        raise ValueError("the new report has no kernel")
    base["records"] = [r for r in base["records"] if r["key"]["kernel"] not in kernels] + new["records"]
    for k in kernels:
        base["kernels"][k] = new["kernels"][k]
    base.setdefault("retuned", []).append({"commit": commit, "compile": new["compile"], "date": new["date"],
                                           "kernels": kernels, "reason": reason, "seconds": new["seconds"]})
    return kernels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path, help="the committed whole-registry report (rewritten)")
    ap.add_argument("new", type=Path, help="the partial re-tune's report")
    ap.add_argument("--commit", required=True, help="the commit the candidates were built from")
    ap.add_argument("--reason", required=True, help="why these kernels were re-tuned")
    args = ap.parse_args(argv)
    base = json.loads(args.base.read_text())
    kernels = merge(base, json.loads(args.new.read_text()), args.commit, args.reason)
    args.base.write_text(json.dumps(base, indent=2, sort_keys=True) + "\n")
    print(f"{args.base}: records and table rows of {', '.join(kernels)} replaced")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
