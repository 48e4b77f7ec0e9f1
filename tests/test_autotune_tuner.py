"""The tuner's CPU-testable parts: checks and rotation with stand-in kernels, records, parallel compile, CLI."""

import json
import time

import pytest
import torch

from tilev4 import reference as R
from tilev4.autotune import store
from tilev4.autotune.harness import TuningCase, TuningHarness
from tilev4.autotune.identity import GpuIdentity
from tilev4.autotune.kernel_cache import cache_stats, verify_entry
from tilev4.autotune.space import config_label
from tilev4.autotune.tuner import (
    DEFAULT_LABEL,
    BucketPlan,
    WallTimer,
    compile_jobs,
    finalize_bucket,
    measure_bucket,
    plan_kernel,
)
from tilev4.cli import main
from tilev4.kernels.registry import clear_kernel_memo, compile_kernel, get_kernel_def

H200 = GpuIdentity("NVIDIA H200", "9.0", 132, 143771)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEV4_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "SHIPPED_DIR", tmp_path / "shipped")
    clear_kernel_memo()
    yield tmp_path
    clear_kernel_memo()


# --- stand-ins: an rmsnorm harness on the CPU and kernels that are right, wrong, lazy or batch-variant ---

def _case(problem, n, gen, device, reference):
    x = torch.randn(n, problem["D"], generator=gen).bfloat16()
    w = torch.randn(problem["D"], generator=gen)
    exp = (R.rmsnorm(x, w),) if reference else None
    return TuningCase((x, w, torch.empty(n, problem["D"])), outputs=(2,), expected=exp, rows=n)


def _check(outputs, expected):
    y = outputs[0]
    if torch.isnan(y).any():
        return "NaN"
    return None if torch.allclose(y, expected[0], rtol=1e-5, atol=1e-6) else "mismatch"


def _slice(case, a, b):
    x, w, _ = case.args
    return TuningCase((x[a:b].contiguous(), w, torch.empty(b - a, x.shape[1])), (2,), None, b - a)


HARNESS = TuningHarness(_case, _check, sizes=(5,), batch_slice=_slice)
SEEN_INPUTS: set[int] = set()


def good(x, w, y):
    SEEN_INPUTS.add(x.data_ptr())
    y.copy_(R.rmsnorm(x, w))


def slow(x, w, y):
    time.sleep(0.003)
    good(x, w, y)


def wrong(x, w, y):
    y.copy_(R.rmsnorm(x, w) * 1.01)


def lazy(x, w, y):
    pass  # never writes y: the poisoned NaNs stay


def batch_variant(x, w, y):
    y.copy_(R.rmsnorm(x, w) * (1 + 1e-7 * (x.shape[0] % 3)))  # within tolerance, different bits per batch


def boom(x, w, y):
    raise RuntimeError("illegal memory access")


def _plan(defaults=None):
    cands = [{"v": v} for v in ("good", "slow", "wrong", "lazy", "variant", "boom", "missing", "good2")]
    return BucketPlan("fake", "b", "sm_90a", [{"D": 64}], [[5, 33]], cands, [({"v": "huge"}, "too big")],
                      defaults or [{"v": "good"}])


def _kernels(plan, extra=None):
    fns = {"good": good, "slow": slow, "wrong": wrong, "lazy": lazy, "variant": batch_variant, "boom": boom,
           "good2": good}
    ks = {(0, config_label(c)): fns[c["v"]] for c in plan.candidates if c["v"] in fns}
    ks.update(extra or {})
    return ks


def test_measure_checks_rejects_and_rotates_inputs():
    plan = _plan()
    SEEN_INPUTS.clear()
    m = measure_bucket(plan, _kernels(plan), HARNESS, batch_invariant=True, device="cpu", timer=WallTimer(),
                       rounds=2, reps=3, num_inputs=3)
    status = {json.loads(k)["v"]: v for k, v in m.status.items()}
    assert status == {"good": "ok", "slow": "ok", "good2": "ok", "wrong": "wrong_output", "lazy": "wrong_output",
                      "variant": "not_batch_invariant", "boom": "error", "missing": "not_compiled"}
    assert "NaN" in m.detail[config_label({"v": "lazy"})]
    assert "illegal memory access" in m.detail[config_label({"v": "boom"})]
    for label in (config_label({"v": v}) for v in ("good", "slow", "good2")):
        assert len(m.samples[label]) == 2 * 3  # rounds × reps, summed over the two sizes
        assert set(m.per_shape_ms[label]) == {"D=64,N=5", "D=64,N=33"}
    assert len(SEEN_INPUTS) >= 2 * 3  # three input sets per size were launched on, not one
    # without the invariance tag the batch-variant kernel passes
    m2 = measure_bucket(plan, _kernels(plan), HARNESS, batch_invariant=False, device="cpu", timer=WallTimer(),
                        rounds=1, reps=2)
    assert m2.status[config_label({"v": "variant"})] == "ok"


def test_finalize_picks_a_passing_fast_config_and_keeps_every_timing():
    plan = _plan(defaults=[{"v": "slow"}])  # default is not candidate 0: timed as its own pseudo-candidate
    assert not plan.default_is_candidate0
    ks = _kernels(plan, {(0, DEFAULT_LABEL): slow})
    m = measure_bucket(plan, ks, HARNESS, batch_invariant=True, device="cpu", timer=WallTimer(), rounds=2, reps=5)
    key = store.ResultKey(H200.name, "9.0", 132, 143771, "580", "13.0", "13.0", "0.1.15", "fake", "abc", "b")
    rec = finalize_bucket(plan, m, key, meta={"rounds": 2})
    assert rec.config in ({"v": "good"}, {"v": "good2"})  # never a rejected or the sleeping one
    assert rec.default_median_ms > rec.winner_median_ms and rec.speedup_vs_default > 1.5
    rows = {json.dumps(r["config"], sort_keys=True): r for r in rec.candidates}
    assert rows['{"v": "wrong"}']["status"] == "wrong_output" and "samples_ms" not in rows['{"v": "wrong"}']
    assert len(rows['{"v": "good"}']["samples_ms"]) == 10
    assert rows['"heuristic per problem"']["status"] == "ok"
    assert rec.pruned == [{"config": {"v": "huge"}, "reason": "too big"}]
    assert rec.meta["rounds"] == 2 and rec.sizes == [5, 33]
    # nothing passes: a clear error, never a silent pick
    bad = BucketPlan("fake", "b", "sm_90a", [{"D": 64}], [[5]], [{"v": "wrong"}], [], [{"v": "wrong"}])
    m = measure_bucket(bad, {(0, config_label({"v": "wrong"})): wrong}, HARNESS, device="cpu", timer=WallTimer(),
                       rounds=1, reps=1)
    with pytest.raises(ValueError, match="no candidate passed"):
        finalize_bucket(bad, m, key)


def test_compile_candidates_in_parallel_then_load_without_compiling(cache):
    from tilev4.autotune.space import Space

    small = Space({"block_rows": (1, 2), "threads": (128,)})
    (plan,) = plan_kernel("rmsnorm", [{"D": 512}], arch="sm_90a", space=small)
    jobs = plan.jobs()
    assert len(jobs) == 2
    done = []
    outcomes = compile_jobs(jobs, "sm_90a", workers=2, on_done=done.append)
    assert sorted(o.status for o in outcomes) == ["compiled", "compiled"] and len(done) == 2
    before = cache_stats()["compiles"]
    for _, cfg in jobs:  # the parent finds what the workers published
        k = compile_kernel("rmsnorm", cfg, "sm_90a")
        assert "__global__" in k.get_kernel_source()
    assert cache_stats()["compiles"] == before
    again = compile_jobs(jobs, "sm_90a", workers=1)
    assert [o.status for o in again] == ["cached", "cached"]
    err = compile_jobs([("rmsnorm", {"D": 512, "bogus": 1})], "sm_90a", workers=1)
    assert err[0].status == "error" and "unknown config keys" in err[0].error


def test_harnesses_of_registry_kernels_make_checkable_cases():
    """The real harnesses on the CPU: reference outputs, a passing check for the reference, a failing one for NaN."""
    for name in ("rmsnorm", "fp8_quantize", "mhc_post"):
        kdef = get_kernel_def(name)
        problem = kdef.problem(kdef.configs[-1])
        case = kdef.harness.make_case(problem, 7, torch.Generator().manual_seed(0), "cpu", True)
        assert case.rows == 7 and len(case.expected) == len(case.outputs)
        outs = tuple(t.clone() for t in case.expected)
        outs = tuple(o.bfloat16() if name == "rmsnorm" else o for o in outs)
        assert kdef.harness.check(outs, case.expected) is None
        poisoned = tuple(o.clone() for o in outs)
        for t in poisoned:
            t.view(-1).view(torch.uint8).fill_(255)
        assert kdef.harness.check(poisoned, case.expected)
        sub = kdef.harness.batch_slice(case, 2, 5)
        assert sub.rows == 3 and sub.args[0].shape[0] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_tune_without_a_gpu_says_so(capsys):
    assert main(["tune", "--kernel", "rmsnorm"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_import_report_into_results_and_shipped_defaults(cache):
    key = store.current_key("rmsnorm", get_kernel_def("rmsnorm").source_hash, "D<=4096", H200)
    rec = store.TuningRecord(key, {"block_rows": 2, "threads": 256}, {"block_rows": 1, "threads": 128},
                             [{"D": 4096, "eps": 1e-6}], [67])
    report = cache / "tune.json"
    report.write_text(json.dumps({"records": [rec.to_dict()]}))
    assert main(["tune", "--import-report", str(report)]) == 0
    assert store.lookup(key).source == "tuned"
    assert main(["tune", "--import-report", str(report), "--ship"]) == 0
    shipped = store.SHIPPED_DIR / H200.slug / "rmsnorm.json"
    assert json.loads(shipped.read_text())["records"][0]["config"] == {"block_rows": 2, "threads": 256}
    assert verify_entry(cache / "nothing") == "missing"


def test_a_build_past_the_compile_timeout_is_killed_and_reported(tmp_path, monkeypatch):
    """A candidate whose compiler runs on (a stand-in ``cicc`` that sleeps) is killed after the timeout and
    reported as an error, instead of stalling the tuning run."""
    import shutil
    import subprocess
    import time

    import tilev4.kernels.registry as registry
    from tilev4.autotune import tuner

    cicc = tmp_path / "cicc"
    shutil.copy(shutil.which("sleep"), cicc)
    monkeypatch.setattr(registry, "compile_kernel", lambda *a: subprocess.run([str(cicc), "60"], check=True))
    t0 = time.perf_counter()
    status, seconds, error = tuner._compile_worker("rmsnorm", {"D": 512}, "sm_90a", timeout=1.0)
    assert (status, error) == ("error", "compile timeout: killed after 1 s")
    assert 1.0 <= seconds < 30 and time.perf_counter() - t0 < 30
    monkeypatch.setattr(registry, "compile_kernel", lambda *a: subprocess.run([str(cicc), "0.1"], check=True))
    assert tuner._compile_worker("rmsnorm", {"D": 512}, "sm_90a", timeout=5.0)[0] == "cached"  # in time: no error


def test_a_failed_tuning_build_is_remembered_not_rebuilt(cache, monkeypatch):
    """A candidate whose build failed (in a ``--compile-only`` run, say) is not built again by the next tuning
    run under the same toolchain: a marker beside its cache entry says why. ``--retry-failed`` builds it,
    a timeout is retried under a longer limit, and ``cache clear`` removes the markers."""
    import tilev4.kernels.registry as registry
    from tilev4.autotune import kernel_cache, tuner

    calls = []

    def failing(name, config, arch):
        calls.append(dict(config))
        raise RuntimeError("ptxas fatal: out of registers")

    monkeypatch.setattr(registry, "compile_kernel", failing)
    job = [("rmsnorm", {"D": 512, "block_rows": 2, "threads": 128})]
    first = compile_jobs(job, "sm_90a", workers=1, remember_failures=True)
    assert first[0].status == "error" and "out of registers" in first[0].error and len(calls) == 1
    marker = tuner.failure_marker(tuner._entry_key(*job[0], "sm_90a"))
    assert marker.is_file() and json.loads(marker.read_text())["error"].startswith("RuntimeError")
    again = compile_jobs(job, "sm_90a", workers=1, remember_failures=True)
    assert again[0].status == "error" and again[0].error.startswith("failed before: RuntimeError")
    assert len(calls) == 1  # not built again
    assert compile_jobs(job, "sm_90a", workers=1)[0].status == "error" and len(calls) == 2  # retry asked for
    # a timeout is remembered with its limit: a longer limit tries again
    marker.write_text(json.dumps({"error": "compile timeout: killed after 1 s", "timeout": True, "timeout_s": 1}))
    assert compile_jobs(job, "sm_90a", workers=1, timeout=1.0, remember_failures=True)[0].seconds == 0.0
    assert len(calls) == 2
    compile_jobs(job, "sm_90a", workers=1, timeout=5.0, remember_failures=True)
    assert len(calls) == 3
    kernel_cache.clear()
    assert not marker.exists()
    # a retry that builds removes the marker
    compile_jobs(job, "sm_90a", workers=1, remember_failures=True)
    assert marker.is_file()
    monkeypatch.setattr(registry, "compile_kernel", lambda name, config, arch: calls.append(dict(config)))
    assert compile_jobs(job, "sm_90a", workers=1)[0].status != "error" and not marker.exists()


def test_tune_report_table_goes_into_the_readme(tmp_path):
    from tilev4.autotune.report import README_BEGIN, README_END, render_tune_table, update_readme

    report = {
        "gpu": {"name": "NVIDIA H200", "sm_count": 132}, "date": "2026-11-29", "skipped": {"moe_scan": "no space"},
        "seconds": {"total": 90.5, "compile": 60.0, "measure": 30.5}, "compile": {"configs": 10, "compiled": 4},
        "kernels": {"rmsnorm": [
            {"bucket": "D<=4096", "winner": {"block_rows": 2, "threads": 256},
             "default": {"block_rows": 1, "threads": 128},
             "winner_ms": 0.01, "default_ms": 0.012, "speedup_vs_default": 1.2, "candidates": 9, "pruned": 7,
             "rejected": 1},
            {"bucket": "D>4096", "winner": {"block_rows": 1, "threads": 128},
             "default": {"block_rows": 1, "threads": 128},
             "winner_ms": 0.02, "default_ms": 0.02, "speedup_vs_default": 1.0, "candidates": 5, "pruned": 11,
             "rejected": 0}]},
    }
    table = render_tune_table(report)
    assert "| rmsnorm | D<=4096 | 9 (7, 1) | block_rows=1, threads=128 | block_rows=2, threads=256 |" in table
    assert "| rmsnorm | D>4096 | 5 (11, 0) | block_rows=1, threads=128 | = default |" in table
    assert "1.200×" in table and "compile 60.0 s (4 of 10 configs" in table and "Skipped: moe_scan" in table
    (tmp_path / "r.json").write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold\n{README_END}\nrest\n")
    update_readme(readme, tmp_path / "r.json")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text and "1.200×" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        update_readme(readme, tmp_path / "r.json")


def test_compile_only_builds_every_candidate_without_a_gpu(cache, capsys):
    """`tilev4 tune --compile-only` on a machine without a GPU: every candidate (and default) of the plan is in
    the kernel cache afterwards, so the tune on the GPU would build nothing."""
    from tilev4.autotune.tuner import _is_built

    jobs = [j for p in plan_kernel("moe_combine", arch="sm_90a") for j in p.jobs()]
    assert len(jobs) >= 5
    assert main(["tune", "--compile-only", "--arch", "sm_90a", "--kernel", "moe_combine", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{len(jobs)} candidate configs for sm_90a: {len(jobs)} compiled, 0 already cached, 0 failed" in out
    assert all(_is_built(n, c, "sm_90a") for n, c in jobs)
    assert main(["tune", "--compile-only", "--kernel", "moe_combine", "--jobs", "1"]) == 0
    assert f"0 compiled, {len(jobs)} already cached" in capsys.readouterr().out
