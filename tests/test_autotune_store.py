"""Tuning results: key completeness, round trip, lookup tiers, resolution in compile_kernel, notices."""

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from tilev4.autotune import identity, store
from tilev4.autotune.identity import GpuIdentity
from tilev4.autotune.store import ResultKey, TuningRecord, current_key, load_records, lookup, save_record
from tilev4.kernels import get_kernel_def
from tilev4.kernels.registry import aot_configs, clear_kernel_memo, resolve_config

H200 = GpuIdentity("NVIDIA H200", "9.0", 132, 143771)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory, an empty shipped-defaults directory, no notices given yet."""
    monkeypatch.setenv("TILEV4_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setattr(store, "_NOTICED", set())
    clear_kernel_memo()
    yield tmp_path
    clear_kernel_memo()


def _record(key: ResultKey, config: dict, created: str = "2026-11-28T00:00:00Z") -> TuningRecord:
    return TuningRecord(
        key=key, config=config, default={"block_rows": 1, "threads": 128}, problems=[{"D": 4096, "eps": 1e-6}],
        sizes=[67, 16384],
        candidates=[{"config": config, "status": "ok", "median_ms": 0.08, "samples_ms": [0.08, 0.081]},
                    {"config": {"block_rows": 1, "threads": 128}, "status": "ok", "median_ms": 0.09,
                     "samples_ms": [0.09, 0.091]}],
        winner_median_ms=0.08, default_median_ms=0.09, speedup_vs_default=0.09 / 0.08, created=created,
        meta={"rounds": 5},
    )


def _rms_key(bucket: str = "D<=4096", gpu: GpuIdentity = H200) -> ResultKey:
    kdef = get_kernel_def("rmsnorm")
    key = current_key("rmsnorm", kdef.source_hash, bucket, gpu)
    assert key is not None
    return key


def _other(value):
    return value + 1 if isinstance(value, int) else f"{value}-other"


def test_key_completeness_every_field_misses(cache):
    key = _rms_key()
    save_record(_record(key, {"block_rows": 2, "threads": 256}))
    assert lookup(key).config == {"block_rows": 2, "threads": 256}
    assert lookup(key).source == "tuned"
    for f in dataclasses.fields(ResultKey):
        changed = dataclasses.replace(key, **{f.name: _other(getattr(key, f.name))})
        assert lookup(changed) is None, f"changing {f.name} must miss"


def test_key_holds_gpu_toolchain_and_source():
    key = _rms_key()
    assert (key.gpu_name, key.compute_capability, key.sm_count, key.memory_mib) == ("NVIDIA H200", "9.0", 132, 143771)
    assert key.nvcc == identity.toolchain()["nvcc"] and key.tilelang == identity.toolchain()["tilelang"]
    assert key.driver == identity.driver_version() and key.source_hash == get_kernel_def("rmsnorm").source_hash
    assert current_key("rmsnorm", "x", "b", gpu=None) is None or identity.current_gpu() is not None


def test_round_trip_is_human_readable_json(cache):
    key = _rms_key()
    rec = _record(key, {"block_rows": 4, "threads": 512})
    path = save_record(rec)
    assert path.parent.name == H200.slug == "nvidia-h200-cc9.0-132sm-143771mib"
    assert path.name == "rmsnorm.json"
    text = path.read_text()
    assert text.startswith("{\n  ") and '"speedup_vs_default"' in text
    data = json.loads(text)
    assert data["gpu"] == H200.as_dict() and len(data["records"]) == 1
    (back,) = load_records("rmsnorm", H200.slug)
    assert back == rec
    # saving the same key replaces; another bucket adds
    save_record(_record(key, {"block_rows": 1, "threads": 64}, created="2026-11-29T00:00:00Z"))
    save_record(_record(_rms_key("D>4096"), {"block_rows": 1, "threads": 256}))
    recs = load_records("rmsnorm", H200.slug)
    assert [(r.key.bucket, r.config["threads"]) for r in recs] == [("D<=4096", 64), ("D>4096", 256)]


def test_unreadable_results_are_ignored_with_a_warning(cache, caplog):
    path = store.results_dir() / H200.slug / "rmsnorm.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="tilev4.autotune"):
        assert lookup(_rms_key()) is None
    assert "ignoring unreadable tuning results" in caplog.text


def test_shipped_defaults_tiers(cache):
    key = _rms_key()
    save_record(_record(key, {"block_rows": 2, "threads": 128}), store.SHIPPED_DIR)
    assert lookup(key).source == "shipped"
    # same GPU model, kernel source and bucket under another driver/toolchain: still the shipped default
    moved = dataclasses.replace(key, driver="999.1", nvcc="13.9", tilelang="0.2.0", cuda="13.9")
    hit = lookup(moved)
    assert hit.config == {"block_rows": 2, "threads": 128} and hit.source.startswith("shipped (tuned with driver")
    # another GPU model, source or bucket: never
    for f in ("gpu_name", "compute_capability", "sm_count", "memory_mib", "source_hash", "bucket", "kernel"):
        assert lookup(dataclasses.replace(key, **{f: _other(getattr(key, f))})) is None, f
    # this machine's exact result wins over the shipped one
    save_record(_record(key, {"block_rows": 4, "threads": 256}))
    assert lookup(key).source == "tuned" and lookup(key).config["block_rows"] == 4


def test_resolution_uses_tuned_configs_only_on_that_gpu(cache, caplog):
    kdef = get_kernel_def("rmsnorm")
    save_record(_record(_rms_key(), {"block_rows": 2, "threads": 256}))
    res = resolve_config(kdef, {"D": 2048}, "sm_90a", gpu=H200)  # D=2048 shares the D<=4096 bucket
    assert res.source == "tuned" and res.bucket == "D<=4096"
    assert dict(res.items) == {"D": 2048, "eps": 1e-6, "block_rows": 2, "threads": 256}
    # explicit tunables win; another arch or no GPU: heuristic, silently
    assert resolve_config(kdef, {"D": 2048, "threads": 64, "block_rows": 1}, "sm_90a", gpu=H200).source == "given"
    assert resolve_config(kdef, {"D": 2048}, "sm_100a", gpu=H200).source == "heuristic"
    with caplog.at_level(logging.WARNING, logger="tilev4.autotune"):
        assert resolve_config(kdef, {"D": 2048}, "sm_90a", gpu=None).source == "heuristic"
    assert not caplog.records
    # a tuned config that the space rejects for this problem falls back (D=7168 with 2 rows x 64 threads)
    save_record(_record(_rms_key("D>4096"), {"block_rows": 2, "threads": 64}))
    res = resolve_config(kdef, {"D": 7168}, "sm_90a", gpu=H200)
    assert res.source == "heuristic" and dict(res.items)["threads"] == 128


def test_untuned_gpu_gets_one_notice_never_an_error(cache, caplog):
    other = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0", 132, 81559)
    kdef = get_kernel_def("fp8_quantize")
    with caplog.at_level(logging.WARNING, logger="tilev4.autotune"):
        for k in (4096, 7168, 1024, 4096):
            res = resolve_config(kdef, {"K": k}, "sm_90a", gpu=other)
            assert res.source == "heuristic" and dict(res.items)["block_rows"] == 8
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "fp8_quantize is not tuned for NVIDIA H100" in notices[0]
    assert "\n" not in notices[0]


def test_compile_kernel_builds_the_tuned_config(cache, monkeypatch):
    from tilev4.autotune.kernel_cache import cache_stats
    from tilev4.kernels import compile_kernel

    save_record(_record(_rms_key("D<=1536"), {"block_rows": 2, "threads": 128}))
    monkeypatch.setattr(identity, "current_gpu", lambda: H200)
    kernel = compile_kernel("rmsnorm", {"D": 512}, "sm_90a")
    manifest = json.loads((Path(kernel.tilev4_cache_entry) / "manifest.json").read_text())
    assert manifest["config"] == {"D": 512, "eps": 1e-6, "block_rows": 2, "threads": 128}
    assert cache_stats()["compiles"] >= 1


def test_aot_builds_defaults_and_the_tuned_configs_of_that_arch(cache):
    kdef = get_kernel_def("rmsnorm")
    base = aot_configs(kdef, "sm_90a")
    assert [src for _, src in base] == ["default"] * len(kdef.configs)
    save_record(_record(_rms_key("D<=4096"), {"block_rows": 2, "threads": 256}))
    stale = dataclasses.replace(_rms_key("D>4096"), source_hash="0000000000000000")
    save_record(_record(stale, {"block_rows": 1, "threads": 512}))
    cfgs = aot_configs(kdef, "sm_90a")
    tuned = [c for c, src in cfgs if src.startswith("tuned")]
    assert tuned == [{"D": 4096, "block_rows": 2, "eps": 1e-6, "threads": 256}]
    assert all(src == "default" for _, src in aot_configs(kdef, "sm_80"))
    assert len(aot_configs(kdef, "sm_90a", default_only=True)) == 1


def test_info_row_lists_tuned_kernels(cache, monkeypatch):
    from tilev4.cli import _tuned_row

    monkeypatch.setattr(identity, "current_gpu", lambda: H200)
    assert _tuned_row() == "none (untuned: heuristics)"
    save_record(_record(_rms_key(), {"block_rows": 2, "threads": 256}))
    assert _tuned_row() == "rmsnorm (1 bucket)"
    monkeypatch.setattr(identity, "current_gpu", lambda: None)
    assert _tuned_row().startswith("none (untuned: heuristics")


def test_shipped_records_match_the_shipped_kernels():
    """Every shipped tuned record is keyed by the current source hash of its kernel: a kernel edited without
    re-tuning (or re-validating that its builds are unchanged) would silently lose its tuned defaults."""
    from tilev4.kernels import get_kernel_def

    files = sorted(store.SHIPPED_DIR.glob("*/*.json"))
    assert files
    for f in files:
        for r in load_records(f.stem, f.parent.name, store.SHIPPED_DIR):
            kdef = get_kernel_def(r.key.kernel)
            assert r.key.source_hash == kdef.source_hash, f"{f.name}: {r.key.bucket} tuned for an older source"
