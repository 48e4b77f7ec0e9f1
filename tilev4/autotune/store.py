"""Tuning results: one human-readable JSON file per GPU and kernel, and the tuned defaults we ship.

Layout: ``<dir>/<gpu slug>/<kernel>.json`` where ``<dir>`` is ``cache_dir()/tuning`` for results
measured on this machine and ``tilev4/autotune/tuned`` for the defaults shipped in the package.
A file holds ``records``; each record is one bucket's outcome under one :class:`ResultKey`, with
every candidate's samples kept (so the winner can be re-derived, see
:func:`tilev4.autotune.select.select_winner`).

Lookup (:func:`lookup`) for the kernel, source hash and bucket on the current GPU:

1. a record in this machine's results whose key equals the full current key → ``tuned``;
2. a shipped record with the full current key → ``shipped``;
3. a shipped record for the same GPU model (name, compute capability, SMs, memory), kernel
   source hash and bucket, tuned under another driver/CUDA/nvcc/TileLang → ``shipped``, labelled
   with what it was tuned under. Shipped defaults are a curated starting point for that GPU model;
   results measured here always need the exact key.
4. nothing → the caller uses the heuristic and prints a one-line notice (never an error).

Writes merge under a file lock and replace the file atomically.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tilev4.autotune.identity import GpuIdentity, current_gpu, driver_version, toolchain
from tilev4.autotune.paths import cache_dir

__all__ = [
    "RESULTS_FORMAT",
    "SHIPPED_DIR",
    "Lookup",
    "ResultKey",
    "TuningRecord",
    "current_key",
    "load_records",
    "lookup",
    "notice_once",
    "records_for_arch",
    "results_dir",
    "save_record",
    "tuned_kernels",
]

log = logging.getLogger("tilev4.autotune")

RESULTS_FORMAT = 1
SHIPPED_DIR = Path(__file__).with_name("tuned")


def results_dir() -> Path:
    """Where this machine's tuning results live: ``cache_dir()/tuning``."""
    return cache_dir() / "tuning"


@dataclass(frozen=True)
class ResultKey:
    """Everything a tuning result depends on; a result is reused only under an equal key."""

    gpu_name: str
    compute_capability: str
    sm_count: int
    memory_mib: int
    driver: str
    cuda: str
    nvcc: str
    tilelang: str
    kernel: str
    source_hash: str
    bucket: str

    GPU_FIELDS = ("gpu_name", "compute_capability", "sm_count", "memory_mib")

    @property
    def gpu(self) -> GpuIdentity:
        return GpuIdentity(self.gpu_name, self.compute_capability, self.sm_count, self.memory_mib)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ResultKey:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"result key lacks {missing}")
        return cls(**{n: d[n] for n in names})

    def same_model(self, other: ResultKey) -> bool:
        """Same GPU model, kernel source and bucket (the toolchain may differ)."""
        names = (*self.GPU_FIELDS, "kernel", "source_hash", "bucket")
        return all(getattr(self, n) == getattr(other, n) for n in names)


def current_key(kernel: str, source_hash: str, bucket: str, gpu: GpuIdentity | None = None) -> ResultKey | None:
    """The result key for ``kernel`` on the current GPU (or ``gpu``); None without a GPU."""
    gpu = gpu or current_gpu()
    if gpu is None:
        return None
    import torch

    return ResultKey(
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        sm_count=gpu.sm_count,
        memory_mib=gpu.memory_mib,
        driver=driver_version(),
        cuda=str(torch.version.cuda),
        nvcc=toolchain()["nvcc"],
        tilelang=toolchain()["tilelang"],
        kernel=kernel,
        source_hash=source_hash,
        bucket=bucket,
    )


@dataclass
class TuningRecord:
    """One bucket's tuning outcome. ``config`` holds the winning tunables only."""

    key: ResultKey
    config: dict[str, Any]
    default: dict[str, Any]
    problems: list[dict[str, Any]]
    sizes: list[int]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    pruned: list[dict[str, Any]] = field(default_factory=list)
    tied: list[dict[str, Any]] = field(default_factory=list)
    winner_median_ms: float | None = None
    default_median_ms: float | None = None
    speedup_vs_default: float | None = None
    created: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["key"] = self.key.as_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TuningRecord:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["key"] = ResultKey.from_dict(d["key"])
        if not isinstance(kw.get("config"), dict):
            raise ValueError("record lacks a config")
        return cls(**kw)


@dataclass(frozen=True)
class Lookup:
    """A tuned config found for a kernel: its tunables, where it came from, the record."""

    config: dict[str, Any]
    source: str
    record: TuningRecord


# ---------------------------------------------------------------------------------------------
# files

_FILE_MEMO: dict[str, tuple[tuple[int, int], list[TuningRecord]]] = {}


def _file(directory: Path, slug: str, kernel: str) -> Path:
    return directory / slug / f"{kernel}.json"


def _read_file(path: Path) -> list[TuningRecord]:
    try:
        st = path.stat()
    except OSError:
        return []
    stamp = (st.st_mtime_ns, st.st_size)
    memo = _FILE_MEMO.get(str(path))
    if memo and memo[0] == stamp:
        return memo[1]
    try:
        data = json.loads(path.read_text())
        if data.get("format") != RESULTS_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {RESULTS_FORMAT}")
        records = [TuningRecord.from_dict(r) for r in data["records"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("tilev4: ignoring unreadable tuning results %s (%s)", path, e)
        records = []
    _FILE_MEMO[str(path)] = (stamp, records)
    return records


def load_records(kernel: str, slug: str, directory: Path | None = None) -> list[TuningRecord]:
    """The records for ``kernel`` on the GPU ``slug`` in ``directory`` (default: this machine's results)."""
    return list(_read_file(_file(directory or results_dir(), slug, kernel)))


def _atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def save_record(record: TuningRecord, directory: Path | None = None) -> Path:
    """Merge ``record`` into its GPU/kernel file (replacing a record with the same key); returns the path."""
    from filelock import FileLock

    path = _file(directory or results_dir(), record.key.gpu.slug, record.key.kernel)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=120):
        _FILE_MEMO.pop(str(path), None)
        records = [r for r in _read_file(path) if r.key != record.key] + [record]
        records.sort(key=lambda r: (r.key.bucket, r.created))
        _atomic_write_json(path, {
            "format": RESULTS_FORMAT,
            "kernel": record.key.kernel,
            "gpu": record.key.gpu.as_dict(),
            "records": [r.to_dict() for r in records],
        })
        _FILE_MEMO.pop(str(path), None)
    return path


def _all_records(directory: Path, kernel: str) -> Iterable[TuningRecord]:
    if not directory.is_dir():
        return
    for gpu_dir in sorted(directory.iterdir()):
        if gpu_dir.is_dir():
            yield from _read_file(gpu_dir / f"{kernel}.json")


# ---------------------------------------------------------------------------------------------
# lookup


def lookup(key: ResultKey, shipped_dir: Path | None = None) -> Lookup | None:
    """The tuned tunables for ``key`` (see the module docstring for the order), or None."""
    slug = key.gpu.slug
    for r in _read_file(_file(results_dir(), slug, key.kernel)):
        if r.key == key:
            return Lookup(dict(r.config), "tuned", r)
    shipped = _read_file(_file(shipped_dir or SHIPPED_DIR, slug, key.kernel))
    for r in shipped:
        if r.key == key:
            return Lookup(dict(r.config), "shipped", r)
    near = [r for r in shipped if r.key.same_model(key)]
    if near:
        r = max(near, key=lambda r: r.created)
        how = f"shipped (tuned with driver {r.key.driver}, nvcc {r.key.nvcc}, TileLang {r.key.tilelang})"
        return Lookup(dict(r.config), how, r)
    return None


def records_for_arch(kernel: str, arch: str, shipped_dir: Path | None = None) -> list[TuningRecord]:
    """Every record for ``kernel`` (this machine's and shipped) from a GPU of ``arch`` — what AOT builds."""
    out = []
    for directory in (results_dir(), shipped_dir or SHIPPED_DIR):
        out += [r for r in _all_records(directory, kernel) if r.key.gpu.arch == arch]
    return out


def tuned_kernels(kernels: Iterable[tuple[str, str]], gpu: GpuIdentity | None = None,
                  shipped_dir: Path | None = None) -> dict[str, list[str]]:
    """For ``(kernel, source hash)`` pairs: the buckets with a usable tuned config on ``gpu``, per kernel.

    Usable means :func:`lookup` would return it for that bucket (any toolchain tier).
    """
    gpu = gpu or current_gpu()
    out: dict[str, list[str]] = {}
    if gpu is None:
        return out
    for kernel, source_hash in kernels:
        buckets = set()
        for directory in (results_dir(), shipped_dir or SHIPPED_DIR):
            for r in _read_file(_file(directory, gpu.slug, kernel)):
                key = current_key(kernel, source_hash, r.key.bucket, gpu)
                if key is not None and r.key.source_hash == source_hash and (
                    r.key == key or (directory != results_dir() and r.key.same_model(key))
                ):
                    buckets.add(r.key.bucket)
        if buckets:
            out[kernel] = sorted(buckets)
    return out


_NOTICED: set[str] = set()


def notice_once(topic: str, message: str) -> None:
    """Log ``message`` at WARNING once per process per ``topic`` (one line on stderr by default)."""
    if topic in _NOTICED:
        return
    _NOTICED.add(topic)
    log.warning("%s", message)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
