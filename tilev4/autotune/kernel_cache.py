"""The compiled-kernel cache: one shared library per (kernel, config, arch, toolchain).

Layout under ``cache_dir()/kernels``::

    <arch>/<toolchain hash>/toolchain.json           the toolchain fields (for people and imports)
    <arch>/<toolchain hash>/<kernel>/<entry hash>/   one entry (immutable once published):
        executable.so     TileLang's tvm_ffi library: host launcher + embedded cubin
        device_kernel.cu  the CUDA source (``kernel.get_kernel_source()``)
        host_kernel.cc    the host wrapper source
        params.json       TileLang's kernel parameters (dtypes, symbolic shapes)
        prim_func.json    the TIR program (so a load runs no DSL code)
        manifest.json     ours: kernel, config, arch, toolchain, source hash, sha256 + size of each file
    <arch>/<toolchain hash>/<kernel>/<entry hash>.lock   the cross-process lock of that entry
    .staging/  .trash/                                    in-flight writes and entries being removed

``<entry hash>`` hashes the kernel name, its canonical config and the kernel's source hash, so an
edited kernel gets new entries (``tilev4 cache prune`` removes the stale ones).

Protocol (:func:`get`): verify and load without a lock (published entries never change); on a
miss take the entry's file lock, check again (another process may have published meanwhile),
else compile into a private staging directory, write the manifest, fsync, and publish with one
``rename``. A corrupt, truncated or foreign entry (manifest for another arch or toolchain, a file
whose size or sha256 differs, a file not in the manifest, a library that does not load) is moved
to the trash and rebuilt — never loaded — and this is logged once at INFO.

Reuse: an entry is found only under the current toolchain (see
:func:`tilev4.autotune.identity.toolchain`); Python and torch versions do not matter.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tilev4.autotune.identity import CACHE_FORMAT, stable_hash, toolchain, toolchain_hash
from tilev4.autotune.paths import cache_dir

__all__ = [
    "ENTRY_FILES",
    "EntryInfo",
    "EntryKey",
    "cache_stats",
    "clear",
    "current_toolchain",
    "entry_key",
    "export_cache",
    "get",
    "import_cache",
    "kernels_root",
    "list_entries",
    "prune",
    "remove_entries",
    "reset_stats",
    "verify_entry",
]

log = logging.getLogger("tilev4.autotune.kernel_cache")

LIB = "executable.so"
DEVICE_SRC = "device_kernel.cu"
HOST_SRC = "host_kernel.cc"
PARAMS = "params.json"
TIR = "prim_func.json"
MANIFEST = "manifest.json"
ENTRY_FILES = (LIB, DEVICE_SRC, HOST_SRC, PARAMS, TIR)
LOCK_TIMEOUT_S = 3600.0
EXPORT_PREFIX = "tilev4-cache"

_STATS: Counter[str] = Counter()
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()
_NOTED: set[str] = set()
_SCRATCH_CLEANED: set[str] = set()
_TOOLCHAIN_MEMO: dict[tuple[str, str], dict[str, Any]] = {}


def cache_stats() -> dict[str, int]:
    """Counts in this process: ``disk_hits``, ``compiles``, ``rebuilds`` (compiles that replaced a bad entry)."""
    return {k: int(_STATS.get(k, 0)) for k in ("disk_hits", "compiles", "rebuilds")}


def reset_stats() -> None:
    _STATS.clear()


def kernels_root(root: Path | None = None) -> Path:
    return Path(root or cache_dir()) / "kernels"


def current_toolchain(arch: str, root: Path | None = None) -> dict[str, Any]:
    """This machine's toolchain fields; without nvcc, the one toolchain of ``arch`` already cached that
    matches in every other field (an imported cache on a GPU machine without a CUDA toolkit)."""
    memo_key = (str(kernels_root(root)), arch)
    if memo_key in _TOOLCHAIN_MEMO:
        return _TOOLCHAIN_MEMO[memo_key]
    fields = toolchain()
    if fields["nvcc"] == "none":
        found = set()
        for tc_file in (kernels_root(root) / arch).glob("*/toolchain.json"):
            with contextlib.suppress(OSError, ValueError):
                other = json.loads(tc_file.read_text())
                if {k: v for k, v in other.items() if k != "nvcc"} == {k: v for k, v in fields.items() if k != "nvcc"}:
                    found.add(other["nvcc"])
        if len(found) == 1:
            fields = {**fields, "nvcc": found.pop()}
            log.info("tilev4: no nvcc here; using cached kernels built with nvcc %s", fields["nvcc"])
    _TOOLCHAIN_MEMO[memo_key] = fields
    return fields


# ---------------------------------------------------------------------------------------------
# keys and manifests


def _config_json(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), sort_keys=True, separators=(",", ":"), default=repr)


@dataclass(frozen=True)
class EntryKey:
    """What names one cache entry."""

    kernel: str
    config: tuple[tuple[str, Any], ...]
    arch: str
    toolchain: tuple[tuple[str, Any], ...]
    source_hash: str

    @property
    def toolchain_hash(self) -> str:
        return toolchain_hash(dict(self.toolchain))

    @property
    def entry_hash(self) -> str:
        return stable_hash({"kernel": self.kernel, "config": dict(self.config), "source_hash": self.source_hash})

    def path(self, root: Path | None = None) -> Path:
        return kernels_root(root) / self.arch / self.toolchain_hash / self.kernel / self.entry_hash

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "kernel": self.kernel,
            "config": dict(self.config),
            "arch": self.arch,
            "toolchain": dict(self.toolchain),
            "toolchain_hash": self.toolchain_hash,
            "source_hash": self.source_hash,
            "entry_hash": self.entry_hash,
        }

    @classmethod
    def from_manifest(cls, m: Mapping[str, Any]) -> EntryKey:
        return cls(
            kernel=str(m["kernel"]),
            config=tuple(sorted(dict(m["config"]).items())),
            arch=str(m["arch"]),
            toolchain=tuple(sorted(dict(m["toolchain"]).items())),
            source_hash=str(m["source_hash"]),
        )


def entry_key(kernel: str, config: Iterable[tuple[str, Any]], arch: str, source_hash: str,
              root: Path | None = None) -> EntryKey:
    """The key of ``kernel`` with canonical ``config`` for ``arch`` under the current toolchain."""
    return EntryKey(kernel, tuple(config), arch, tuple(sorted(current_toolchain(arch, root).items())), source_hash)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MISSING = "missing"


def _read_manifest(path: Path) -> dict[str, Any]:
    m = json.loads((path / MANIFEST).read_text())
    if not isinstance(m, dict):
        raise ValueError("manifest is not an object")
    return m


def verify_entry(path: Path, key: EntryKey | None = None) -> str | None:
    """Why the entry at ``path`` must not be loaded (as ``key``, if given), or None if it verifies.

    Checks the manifest's format and key fields (a manifest for another kernel, config, arch,
    toolchain or source is *foreign*), that the directory holds exactly the files it lists plus
    itself, and each file's size and sha256.
    """
    if not path.is_dir():
        return MISSING
    try:
        m = _read_manifest(path)
    except (OSError, ValueError) as e:
        return f"manifest unreadable ({type(e).__name__})"
    if m.get("format") != CACHE_FORMAT:
        return f"manifest format {m.get('format')!r}, expected {CACHE_FORMAT}"
    try:
        own = EntryKey.from_manifest(m)
    except (KeyError, TypeError, ValueError) as e:
        return f"manifest incomplete ({e})"
    want = key or own
    for name in ("kernel", "arch", "source_hash", "toolchain_hash", "entry_hash"):
        got, exp = m.get(name), getattr(want, name)
        if got != exp or getattr(own, name) != exp:
            return f"foreign entry: manifest {name} is {got!r}, expected {exp!r}"
    if _config_json(m["config"]) != _config_json(dict(want.config)):
        return f"foreign entry: manifest config {_config_json(m['config'])}, expected {_config_json(dict(want.config))}"
    files = m.get("files")
    if not isinstance(files, dict) or not set(ENTRY_FILES) <= set(files):
        return "manifest does not list every required file"
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    if present != set(files):
        extra, lost = sorted(present - set(files)), sorted(set(files) - present)
        return f"files differ from the manifest (extra {extra}, missing {lost})"
    for name, meta in sorted(files.items()):
        f = path / name
        try:
            if f.stat().st_size != meta["size"]:
                return f"{name}: size {f.stat().st_size}, manifest says {meta['size']} (truncated?)"
            if _sha256(f) != meta["sha256"]:
                return f"{name}: sha256 differs from the manifest (corrupt)"
        except (OSError, KeyError, TypeError) as e:
            return f"{name}: unreadable ({type(e).__name__})"
    return None


def _write_manifest(staging: Path, key: EntryKey, extra: Mapping[str, Any]) -> None:
    files = {name: {"size": (staging / name).stat().st_size, "sha256": _sha256(staging / name)}
             for name in sorted(p.name for p in staging.iterdir())}
    manifest = {**key.manifest_fields(), **extra, "files": files}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=repr) + "\n")


# ---------------------------------------------------------------------------------------------
# compile and load


def _target(arch: str) -> dict[str, str]:
    from tilev4.kernels.registry import check_arch

    return {"kind": "cuda", "arch": check_arch(arch)}


def _compile_args(prim: Any) -> tuple[list[int] | None, dict[str, Any] | None, list[str] | None]:
    """out_idx, pass configs and compile flags a program carries as attributes (as ``tilelang.compile`` reads them)."""
    attrs = getattr(prim, "attrs", None)
    if not attrs:
        return None, None, None
    out_idx = [int(i) for i in attrs["tilelang_out_idx"]] if "tilelang_out_idx" in attrs else None
    pass_configs = dict(attrs["tilelang_pass_configs"]) if "tilelang_pass_configs" in attrs else None
    flags = [str(f) for f in attrs["tilelang_compile_flags"]] if "tilelang_compile_flags" in attrs else None
    return out_idx, pass_configs, flags


def _compile_into(staging: Path, key: EntryKey, build: Callable[[], Any]) -> dict[str, Any]:
    """Build the program, compile it with TileLang (its own cache bypassed) and write the entry files."""
    import tilelang
    import tvm
    from tilelang.engine.param import dump_kernel_params
    from tilelang.jit import JITKernel

    if os.environ.get("TILEV4_TILELANG_LOG_LEVEL"):  # the CLI quiets TileLang's per-compile INFO lines
        tilelang.set_log_level(os.environ["TILEV4_TILELANG_LOG_LEVEL"])
    t0 = time.perf_counter()
    prim = build()
    out_idx, pass_configs, flags = _compile_args(prim)
    kernel = JITKernel(prim, out_idx=out_idx, execution_backend="tvm_ffi", target=_target(key.arch),
                       pass_configs=pass_configs, compile_flags=flags)
    kernel.adapter.get_exportable_executable().export_library(str(staging / LIB))
    (staging / DEVICE_SRC).write_text(kernel.kernel_source or "")
    (staging / HOST_SRC).write_text(kernel.adapter.get_host_source() or "")
    (staging / PARAMS).write_text(dump_kernel_params(kernel.params))
    (staging / TIR).write_text(tvm.ir.save_json(prim))
    return {
        "compile_seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tir_sha256": hashlib.sha256(prim.script(show_meta=True).encode()).hexdigest(),
        "nvcc_version": _full_nvcc(),
    }


def _full_nvcc() -> str:
    from tilev4.autotune.identity import nvcc_version

    v = nvcc_version()
    return v[1] if v else "none"


def _load_tir(text: str) -> Any:
    """The program of an entry. It was saved by this TVM (the toolchain key says so), so TVM's
    Python-side format upgrade (a JSON parse and re-dump, ~20 ms for an attention kernel) is skipped."""
    try:
        from tvm.runtime import _ffi_node_api

        return _ffi_node_api.LoadJSON(text)
    except (ImportError, AttributeError):
        import tvm

        return tvm.ir.load_json(text)


def _load(path: Path, key: EntryKey) -> Any:
    """A TileLang ``JITKernel`` over the entry's library (no compile, no DSL)."""
    from tilelang.engine.param import load_kernel_params
    from tilelang.jit import JITKernel
    from tilelang.jit.adapter.base import CachedTextSource

    prim = _load_tir((path / TIR).read_text())
    out_idx, pass_configs, flags = _compile_args(prim)
    kernel = JITKernel.from_database(
        func=prim,
        host_kernel_source=CachedTextSource(path=str(path / HOST_SRC)),
        device_kernel_source=CachedTextSource(path=str(path / DEVICE_SRC)),
        kernel_lib_path=str(path / LIB),
        params=load_kernel_params((path / PARAMS).read_text()),
        target=_target(key.arch),
        target_host=None,
        out_idx=out_idx,
        execution_backend="tvm_ffi",
        pass_configs=pass_configs,
        compile_flags=flags,
    )
    kernel.tilev4_cache_entry = str(path)
    return kernel


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _staging_dir(root: Path | None, tag: str) -> Path:
    base = kernels_root(root) / ".staging"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{tag}-{os.getpid()}-", dir=base))


def _discard(path: Path, root: Path | None = None) -> None:
    """Move ``path`` out of the way in one rename, then delete it (readers that opened it are unaffected)."""
    if not path.exists():
        return
    trash = kernels_root(root) / ".trash"
    trash.mkdir(parents=True, exist_ok=True)
    dest = trash / f"{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, dest)
    except OSError:
        dest = path
    shutil.rmtree(dest, ignore_errors=True)


def _publish(staging: Path, path: Path, key: EntryKey | None = None, root: Path | None = None) -> None:
    """Make ``staging`` visible as ``path`` in one rename.

    The lock holder has discarded any bad entry, so ``path`` normally does not exist; if it does
    (a lock that did not hold, e.g. on a file system without working locks) a valid entry there
    wins and ours is dropped, and an invalid one is replaced.
    """
    _fsync_tree(staging)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            os.rename(staging, path)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if key is not None and verify_entry(path, key) is None:
                shutil.rmtree(staging, ignore_errors=True)
                return
            _discard(path, root)
            continue
        _fsync_dir(path.parent)
        return
    raise RuntimeError(f"tilev4 kernel cache: could not publish {path}")


def _write_toolchain_file(key: EntryKey, root: Path | None) -> None:
    tc_file = kernels_root(root) / key.arch / key.toolchain_hash / "toolchain.json"
    if tc_file.exists():
        return
    tmp = tc_file.with_name(f".toolchain.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(dict(key.toolchain), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, tc_file)


def _thread_lock(path: Path) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(str(path), threading.Lock())


def _file_lock(path: Path) -> Any:
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)


def _note_bad(path: Path, reason: str) -> None:
    if str(path) not in _NOTED:
        _NOTED.add(str(path))
        log.info("tilev4 kernel cache: rebuilding %s: %s", path, reason)


def _try_load(path: Path, key: EntryKey) -> tuple[Any, str | None]:
    reason = verify_entry(path, key)
    if reason is not None:
        return None, reason
    try:
        return _load(path, key), None
    except Exception as e:  # a library that verifies but does not load: rebuild it
        return None, f"load failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def get(key: EntryKey, build: Callable[[], Any], root: Path | None = None) -> Any:
    """The kernel of ``key``: loaded from the cache, else compiled from ``build()`` and published.

    ``build`` returns the TileLang program (``T.prim_func``); it runs only on a miss.
    """
    path = key.path(root)
    with _thread_lock(path):
        kernel, reason = _try_load(path, key)
        if kernel is not None:
            _STATS["disk_hits"] += 1
            return kernel
        with _file_lock(path):
            kernel, reason = _try_load(path, key)
            if kernel is not None:
                _STATS["disk_hits"] += 1
                return kernel
            if reason != MISSING:
                _note_bad(path, reason or "unknown")
                _discard(path, root)
                _STATS["rebuilds"] += 1
            if str(kernels_root(root)) not in _SCRATCH_CLEANED:  # once per process: leftovers of crashed writers
                _SCRATCH_CLEANED.add(str(kernels_root(root)))
                _clean_scratch(root)
            staging = _staging_dir(root, key.entry_hash)
            try:
                extra = _compile_into(staging, key, build)
                _write_manifest(staging, key, extra)
                _publish(staging, path, key, root)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            _STATS["compiles"] += 1
            _write_toolchain_file(key, root)
        kernel, reason = _try_load(path, key)
        if kernel is None:
            raise RuntimeError(f"tilev4 kernel cache: the entry just built at {path} does not load: {reason}")
        return kernel


# ---------------------------------------------------------------------------------------------
# listing, clearing, pruning


@dataclass
class EntryInfo:
    """One entry on disk, as ``tilev4 cache ls`` shows it."""

    path: Path
    kernel: str
    arch: str
    toolchain_hash: str
    config: dict[str, Any] = field(default_factory=dict)
    source_hash: str = ""
    size_bytes: int = 0
    created: str = ""
    problem: str | None = None  # why it does not verify (only when asked to verify)
    current_toolchain: bool = False


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_entries(root: Path | None = None, verify: bool = False) -> list[EntryInfo]:
    """Every entry directory under the cache, with its manifest's fields (and verification if asked)."""
    base = kernels_root(root)
    out: list[EntryInfo] = []
    if not base.is_dir():
        return out
    for arch_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        current_tc = toolchain_hash(current_toolchain(arch_dir.name, root))
        for tc_dir in sorted(p for p in arch_dir.iterdir() if p.is_dir()):
            for kernel_dir in sorted(p for p in tc_dir.iterdir() if p.is_dir()):
                for entry in sorted(p for p in kernel_dir.iterdir() if p.is_dir()):
                    info = EntryInfo(entry, kernel_dir.name, arch_dir.name, tc_dir.name,
                                     size_bytes=_dir_size(entry), current_toolchain=tc_dir.name == current_tc)
                    try:
                        m = _read_manifest(entry)
                        info.config, info.source_hash = dict(m["config"]), str(m["source_hash"])
                        info.created = str(m.get("created", ""))
                    except (OSError, ValueError, KeyError, TypeError):
                        info.problem = "manifest unreadable"
                    if verify and info.problem is None:
                        try:
                            key = EntryKey.from_manifest(_read_manifest(entry))
                            info.problem = verify_entry(entry, key)
                            if info.problem is None and key.path(root) != entry:
                                info.problem = "entry is not at the path its manifest names"
                        except (OSError, ValueError, KeyError, TypeError) as e:
                            info.problem = f"manifest incomplete ({e})"
                    out.append(info)
    return out


def remove_entries(entries: Iterable[EntryInfo], root: Path | None = None) -> tuple[int, int]:
    """Remove entries (each under its lock); returns (count, bytes)."""
    n = freed = 0
    for e in entries:
        with _file_lock(e.path):
            if e.path.exists():
                _discard(e.path, root)
                n += 1
                freed += e.size_bytes
        with contextlib.suppress(OSError):
            os.remove(str(e.path) + ".lock")
    return n, freed


def _clean_scratch(root: Path | None, max_age_s: float = 3600.0) -> None:
    """Remove staging and trash directories older than ``max_age_s`` (left by a crashed writer)."""
    now = time.time()
    for sub in (".staging", ".trash"):
        d = kernels_root(root) / sub
        if d.is_dir():
            for p in d.iterdir():
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime >= max_age_s:
                        shutil.rmtree(p, ignore_errors=True)


def clear(root: Path | None = None, kernel: str | None = None, arch: str | None = None) -> tuple[int, int]:
    """Remove every entry (or those of ``kernel`` / ``arch``); returns (count, bytes)."""
    entries = [e for e in list_entries(root)
               if (kernel is None or e.kernel == kernel) and (arch is None or e.arch == arch)]
    result = remove_entries(entries, root)
    # the markers of failed tuning builds (tilev4.autotune.tuner.compile_jobs) go with them
    base = kernels_root(root)
    for marker in base.glob(f"{arch or '*'}/*/{kernel or '*'}/*.failed.json") if base.is_dir() else []:
        with contextlib.suppress(OSError):
            marker.unlink()
    _clean_scratch(root)
    return result


def prune(root: Path | None = None, max_bytes: int | None = None,
          current_sources: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Remove stale entries, then the oldest until the cache fits in ``max_bytes``; returns (count, bytes).

    Stale: built by another toolchain, a manifest that does not verify, or (with
    ``current_sources``: kernel → source hash) a kernel whose source changed or that is gone.
    """
    entries = list_entries(root, verify=True)
    stale = [e for e in entries if e.problem or not e.current_toolchain
             or (current_sources is not None and current_sources.get(e.kernel) != e.source_hash)]
    n, freed = remove_entries(stale, root)
    if max_bytes is not None:
        stale_ids = {id(e) for e in stale}
        keep = sorted((e for e in entries if id(e) not in stale_ids), key=lambda e: e.created)
        total = sum(e.size_bytes for e in keep)
        victims = []
        while keep and total > max_bytes:
            victim = keep.pop(0)
            victims.append(victim)
            total -= victim.size_bytes
        n2, freed2 = remove_entries(victims, root)
        n, freed = n + n2, freed + freed2
    _clean_scratch(root)
    return n, freed


# ---------------------------------------------------------------------------------------------
# export and import


def _results_dir(root: Path | None) -> Path:
    from tilev4.autotune.store import results_dir

    return Path(root) / "tuning" if root is not None else results_dir()


def export_cache(file: Path, root: Path | None = None, arch: str | None = None,
                 include_results: bool = True, kernels: Collection[str] | None = None,
                 current_toolchain_only: bool = False) -> dict[str, int]:
    """Write the verified entries (of ``arch``, of the ``kernels`` named, of this machine's toolchain —
    each filter if given) and the tuning results to a ``.tar.gz``, or an xz-compressed tar when ``file`` ends
    in ``.xz`` (about 4x smaller for compiled kernels: worth it when the export travels; import reads both).

    Entries that do not verify are left out. Returns counts: ``entries``, ``skipped``, ``results``.
    """
    base = kernels_root(root)
    entries = [e for e in list_entries(root, verify=True)
               if (arch is None or e.arch == arch) and (kernels is None or e.kernel in kernels)
               and (not current_toolchain_only or e.current_toolchain)]
    good = [e for e in entries if e.problem is None]
    rdir = _results_dir(root)
    results = sorted(rdir.rglob("*.json")) if include_results and rdir.is_dir() else []
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex[:8]}.tmp")
    summary = {"entries": len(good), "skipped": len(entries) - len(good), "results": len(results)}
    try:
        with tarfile.open(tmp, "w:xz" if Path(file).name.endswith(".xz") else "w:gz") as tar:
            index = {"format": CACHE_FORMAT, "entries": [str(e.path.relative_to(base)) for e in good], **summary}
            data = json.dumps(index, indent=2, sort_keys=True).encode()
            ti = tarfile.TarInfo(f"{EXPORT_PREFIX}/EXPORT.json")
            ti.size, ti.mtime = len(data), int(time.time())
            tar.addfile(ti, io.BytesIO(data))
            for tc in sorted({e.path.parent.parent for e in good}):
                tc_file = tc / "toolchain.json"
                if tc_file.exists():
                    tar.add(tc_file, f"{EXPORT_PREFIX}/kernels/{tc_file.relative_to(base)}")
            for e in good:
                for f in sorted(e.path.iterdir()):
                    tar.add(f, f"{EXPORT_PREFIX}/kernels/{f.relative_to(base)}", recursive=False)
            for f in results:
                tar.add(f, f"{EXPORT_PREFIX}/tuning/{f.relative_to(rdir)}", recursive=False)
        os.replace(tmp, file)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return summary


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        p = PurePosixPath(m.name)
        if p.is_absolute() or ".." in p.parts or not p.parts or p.parts[0] != EXPORT_PREFIX:
            raise ValueError(f"refusing archive member {m.name!r}: outside {EXPORT_PREFIX}/")
        if not (m.isfile() or m.isdir()):
            raise ValueError(f"refusing archive member {m.name!r}: not a regular file or directory")
    return members


def import_cache(file: Path, root: Path | None = None) -> dict[str, int]:
    """Add the entries and tuning results of an export to this cache.

    Every imported entry is verified against its manifest and its path before it is published
    (same lock and atomic rename as a compile); entries already present and valid are kept.
    Returns counts: ``imported``, ``present``, ``rejected``, ``results`` and ``usable_here``
    (entries whose toolchain is this machine's).
    """
    from tilev4.autotune.store import TuningRecord, save_record

    base = kernels_root(root)
    scratch = _staging_dir(root, "import")
    counts = {"imported": 0, "present": 0, "rejected": 0, "results": 0, "usable_here": 0}
    try:
        with tarfile.open(file, "r:*") as tar:
            for m in _safe_members(tar):
                dest = scratch / m.name
                if m.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                if src is None:
                    continue
                with src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        kroot = scratch / EXPORT_PREFIX / "kernels"
        for manifest in sorted(kroot.glob("*/*/*/*/" + MANIFEST)) if kroot.is_dir() else []:
            entry = manifest.parent
            try:
                key = EntryKey.from_manifest(json.loads(manifest.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                counts["rejected"] += 1
                continue
            rel = entry.relative_to(kroot)
            if (verify_entry(entry, key) is not None
                    or rel.parts != (key.arch, key.toolchain_hash, key.kernel, key.entry_hash)):
                counts["rejected"] += 1
                continue
            target = key.path(root)
            with _file_lock(target):
                if verify_entry(target, key) is None:
                    counts["present"] += 1
                else:
                    _discard(target, root)
                    _publish(entry, target, key, root)
                    counts["imported"] += 1
                tc_src = kroot / key.arch / key.toolchain_hash / "toolchain.json"
                tc_dst = base / key.arch / key.toolchain_hash / "toolchain.json"
                if tc_src.exists() and not tc_dst.exists():
                    shutil.copyfile(tc_src, tc_dst)
            if key.toolchain_hash == toolchain_hash(current_toolchain(key.arch, root)):
                counts["usable_here"] += 1
        troot = scratch / EXPORT_PREFIX / "tuning"
        rdir = _results_dir(root)
        for f in sorted(troot.rglob("*.json")) if troot.is_dir() else []:
            try:
                records = [TuningRecord.from_dict(r) for r in json.loads(f.read_text())["records"]]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            for r in records:
                save_record(r, rdir)
                counts["results"] += 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        _TOOLCHAIN_MEMO.clear()
    return counts
