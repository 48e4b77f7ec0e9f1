"""Config spaces: canonical order, static pruning, shape buckets, and the tuner's plan (CPU only)."""

import dataclasses

import pytest

from tilev4.autotune.space import SMEM_LIMIT_BYTES, Space, config_label, exact_bucket
from tilev4.autotune.tuner import NotTunable, parse_shapes, plan_kernel
from tilev4.kernels import get_kernel_def, iter_registry
from tilev4.kernels.registry import canonical_config, resolve_config


def test_product_is_in_declaration_order_and_heuristic_goes_first():
    s = Space({"a": (1, 2), "b": ("x", "y")})
    assert s.product() == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    kept, pruned = s.candidates([{}], heuristic={"a": 2, "b": "y"})
    assert kept[0] == {"a": 2, "b": "y"} and len(kept) == 4 and not pruned  # no duplicate of the heuristic


def test_pruning_by_constraint_and_shared_memory():
    s = Space(
        {"tile": (16, 32, 64), "stages": (1, 2)},
        constraints=(lambda c: "tile must divide N" if c["N"] % c["tile"] else None,),
        smem_bytes=lambda c: c["tile"] * 1024 * c["stages"],
    )
    kept, pruned = s.candidates([{"N": 96}], smem_limit=64 * 1024)
    assert kept == [{"tile": 16, "stages": 1}, {"tile": 16, "stages": 2}, {"tile": 32, "stages": 1},
                    {"tile": 32, "stages": 2}]
    reasons = {config_label(c): r for c, r in pruned}
    assert reasons[config_label({"tile": 64, "stages": 1})] == "tile must divide N"
    # a bucket keeps only what is valid for every problem in it, and says which problem pruned it
    kept, pruned = s.candidates([{"N": 96}, {"N": 32}], smem_limit=48 * 1024)
    assert {"tile": 32, "stages": 2} not in kept and {"tile": 16, "stages": 2} in kept
    assert any("N=96" in r or "N=32" in r for _, r in pruned)


def test_space_rejects_empty_values_and_unknown_keys():
    with pytest.raises(ValueError, match="no candidate values"):
        Space({"a": ()})
    from tilev4.kernels.registry import register

    with pytest.raises(ValueError, match="not parameters"):
        register("__bad_space", configs=[{}], space=Space({"nope": (1,)}))(lambda x=1: None)


def test_registry_spaces_keep_their_defaults_valid():
    for kdef in iter_registry():
        if kdef.space is None:
            continue
        for cfg in kdef.configs:
            full = dict(resolve_config(kdef, cfg, "sm_90a", gpu=None).items)
            assert kdef.space.why_invalid(full, SMEM_LIMIT_BYTES["sm_90a"]) is None, (kdef.name, full)


def test_buckets_group_problems_and_ignore_run_time_sizes():
    rms = get_kernel_def("rmsnorm")
    assert rms.bucket({"D": 512, "eps": 1e-6}) == rms.bucket({"D": 1536, "eps": 1e-5}) == "D<=1536"
    assert rms.bucket({"D": 7168, "eps": 1e-6}) == "D>4096"
    plans = {p.bucket: p for p in plan_kernel("rmsnorm", parse_shapes(["D=512,N=64", "D=1024,N=64", "D=512,N=4096",
                                                                         "D=7168"]), arch="sm_90a")}
    assert set(plans) == {"D<=1536", "D>4096"}
    small = plans["D<=1536"]
    assert small.problems == [{"D": 512, "eps": 1e-6}, {"D": 1024, "eps": 1e-6}]
    assert small.sizes == [[64, 4096], [64]]
    assert plans["D>4096"].sizes == [list(rms.harness.sizes)]  # no N given: the harness's sizes
    assert exact_bucket({"b": 2, "a": 1}) == "a=1,b=2"


def test_plan_candidates_and_jobs():
    (plan,) = plan_kernel("fp8_quantize", [{"K": 7168}], arch="sm_90a")
    kdef = get_kernel_def("fp8_quantize")
    assert plan.candidates[0] == kdef.heuristic(plan.problems[0]) == {"block_rows": 8, "threads": 128}
    assert plan.default_is_candidate0
    assert len(plan.candidates) + len(plan.pruned) == kdef.space.size()
    for cand, reason in plan.pruned:
        assert reason and kdef.space.why_invalid({**plan.problems[0], **cand}) == reason
    jobs = plan.jobs()
    assert len(jobs) == len(plan.candidates)  # the default is candidate 0: not compiled twice
    for name, cfg in jobs:
        assert name == "fp8_quantize" and canonical_config(kdef, cfg) == tuple(sorted(cfg.items()))


def test_replacement_space_and_not_tunable_kernels():
    small = Space({"block_rows": (1, 2), "threads": (128,)})
    (plan,) = plan_kernel("rmsnorm", [{"D": 4096}], arch="sm_90a", space=small)
    assert plan.candidates == [{"block_rows": 1, "threads": 128}, {"block_rows": 2, "threads": 128}]
    untunable = [k.name for k in iter_registry() if k.space is None]
    for name in untunable[:1]:
        with pytest.raises(NotTunable):
            plan_kernel(name, arch="sm_90a")


def test_parse_shapes():
    assert parse_shapes(["D=4096,N=16384", "K=7168, BK=128", "kind=main,ring=true,eps=1e-5"]) == [
        {"D": 4096, "N": 16384}, {"K": 7168, "BK": 128}, {"kind": "main", "ring": True, "eps": 1e-5}]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_shapes(["D4096"])


def test_batch_invariant_kernel_needs_a_slicing_harness(monkeypatch):
    from tilev4.autotune.harness import TuningHarness
    from tilev4.kernels import registry

    def build_fake(D: int, tile: int = 1):
        """A stand-in factory."""

    harness = TuningHarness(make_case=lambda *a: None, check=lambda *a: None)
    kdef = registry.KernelDef("__fake", build_fake, ({"D": 8},), "fake", ("batch_invariant",),
                              Space({"tile": (1, 2)}), None, harness)
    monkeypatch.setitem(registry._REGISTRY, "__fake", kdef)
    with pytest.raises(NotTunable, match="batch_slice"):
        plan_kernel("__fake", arch="sm_90a")
    monkeypatch.setitem(registry._REGISTRY, "__fake", dataclasses.replace(kdef, tags=()))
    (plan,) = plan_kernel("__fake", arch="sm_90a")
    assert plan.candidates == [{"tile": 1}, {"tile": 2}] and plan.bucket == "D=8"
