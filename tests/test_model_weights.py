"""Checkpoint format: names / shapes / dtypes as documented, write → load round trip, quantisers, bad checkpoints."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tilev4 import reference as R
from tilev4.model import (
    Config,
    checkpoint_specs,
    load_checkpoint,
    quantize_fp4_weight,
    quantize_fp8_weight,
    random_checkpoint_tensors,
    write_random_checkpoint,
)

E8M0 = torch.float8_e8m0fnu


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tensors are small and the CI machine's two cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a tensor (float8 types have no torch.equal on every build)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def test_flash_specs_match_the_released_index():
    # A public dump of the released V4-Flash index lists 69,187 tensors holding 158,069,433,298 values in
    # 148.65 GiB; these shapes and dtypes are from that dump.
    specs = checkpoint_specs(Config.flash())
    assert len(specs) == 69187
    assert sum(math.prod(s.shape) for s in specs.values()) == 158_069_433_298
    assert round(sum(s.nbytes for s in specs.values()) / 2**30, 2) == 148.65
    expect = {
        "embed.weight": ((129280, 4096), torch.bfloat16),
        "hc_head_fn": ((4, 16384), torch.float32),
        "layers.0.ffn.gate.tid2eid": ((129280, 6), torch.int64),
        "layers.0.attn.wq_a.weight": ((1024, 4096), torch.float8_e4m3fn),
        "layers.0.attn.wq_a.scale": ((8, 32), E8M0),
        "layers.0.attn.wq_b.scale": ((256, 8), E8M0),
        "layers.0.attn.wo_a.weight": ((8192, 4096), torch.float8_e4m3fn),
        "layers.0.attn.wo_b.scale": ((32, 64), E8M0),
        "layers.0.attn.attn_sink": ((64,), torch.float32),
        "layers.0.attn.q_norm.weight": ((1024,), torch.bfloat16),
        "layers.0.hc_attn_fn": ((24, 16384), torch.float32),
        "layers.2.attn.compressor.ape": ((4, 1024), torch.float32),
        "layers.2.attn.compressor.wkv.weight": ((1024, 4096), torch.bfloat16),
        "layers.2.attn.indexer.wq_b.scale": ((64, 8), E8M0),
        "layers.2.attn.indexer.weights_proj.weight": ((64, 4096), torch.bfloat16),
        "layers.2.attn.indexer.compressor.ape": ((4, 256), torch.float32),
        "layers.3.attn.compressor.ape": ((128, 512), torch.float32),
        "layers.3.ffn.gate.bias": ((256,), torch.float32),
        "layers.5.ffn.experts.255.w1.weight": ((2048, 2048), torch.int8),
        "layers.5.ffn.experts.255.w1.scale": ((2048, 128), E8M0),
        "layers.5.ffn.experts.0.w2.scale": ((4096, 64), E8M0),
        "layers.5.ffn.shared_experts.w2.scale": ((32, 16), E8M0),
        "mtp.0.e_proj.scale": ((32, 32), E8M0),
        "mtp.0.hc_head_scale": ((1,), torch.float32),
        "mtp.0.ffn.gate.bias": ((256,), torch.float32),
    }
    for name, (shape, dtype) in expect.items():
        assert (specs[name].shape, specs[name].dtype) == (shape, dtype), name
    assert "layers.3.ffn.gate.tid2eid" not in specs and "layers.2.ffn.gate.bias" not in specs
    absent = ("layers.0.attn.compressor", "layers.3.attn.indexer", "mtp.0.attn.compressor")
    assert not any(n.startswith(absent) for n in specs)


def test_write_load_round_trip(tmp_path):
    cfg = Config.tiny()
    out = write_random_checkpoint(cfg, tmp_path / "ckpt", seed=3, max_shard_bytes=2**22)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for name, shard in index["weight_map"].items():  # a .scale travels with its .weight
        if name.endswith(".scale"):
            assert index["weight_map"][name[: -len(".scale")] + ".weight"] == shard

    loaded_cfg, tensors = load_checkpoint(out)
    assert loaded_cfg == cfg
    specs = checkpoint_specs(cfg)
    expected = random_checkpoint_tensors(cfg, seed=3)
    assert list(tensors) == list(specs) or set(tensors) == set(specs)
    for name, spec in specs.items():
        t = tensors[name]
        assert (tuple(t.shape), t.dtype) == (spec.shape, spec.dtype), name
        assert torch.equal(_bits(t), _bits(expected[name])), name
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # a different seed gives different weights
    other = random_checkpoint_tensors(cfg, seed=4)
    assert not torch.equal(_bits(other["layers.1.attn.wq_b.weight"]), _bits(expected["layers.1.attn.wq_b.weight"]))


def test_random_weights_have_sensible_scale():
    cfg = Config.tiny()
    t = random_checkpoint_tensors(cfg, seed=0)
    assert set(t["layers.0.ffn.gate.tid2eid"].unique().tolist()) <= set(range(cfg.n_routed_experts))
    rows = t["layers.0.ffn.gate.tid2eid"]
    assert all(len(set(r)) == cfg.n_activated_experts for r in rows[:64].tolist())  # distinct experts per token
    for name in ("layers.1.attn.wq_b", "layers.1.ffn.experts.3.w2", "layers.2.ffn.shared_experts.w1"):
        w = R.dequant_fp8_weight if t[f"{name}.weight"].dtype == torch.float8_e4m3fn else R.dequant_fp4_weight
        dense = w(t[f"{name}.weight"], t[f"{name}.scale"])
        k = dense.shape[1]
        assert 0.7 < dense.std().item() * k**0.5 < 1.3, name  # ~ N(0, 1/K): unit-variance outputs


def test_quantize_fp8_weight_tiles(gen):
    w = torch.randn(300, 200, generator=gen) * torch.logspace(-3, 1, 200)  # columns of very different scale
    q, s = quantize_fp8_weight(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == E8M0 and tuple(s.shape) == (3, 2)
    scale = R.e8m0_decode(s)
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))  # powers of two
    back = R.dequant_fp8_weight(q, s)
    tile = w[:128, :128].abs().max()
    assert scale[0, 0] == 2 ** math.ceil(math.log2(tile / 448))
    err = (back - w).abs() / scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert err.max() <= 16  # at most half an e4m3 step (≤ 2^4 units of the scale at the top binade)
    assert (back - w).abs().max() < 0.08 * w.abs().max()


def test_quantize_fp4_weight_packing(gen):
    w = torch.randn(8, 64, generator=gen)
    packed, s = quantize_fp4_weight(w)
    assert packed.dtype == torch.int8 and tuple(packed.shape) == (8, 32) and tuple(s.shape) == (8, 2)
    v, _ = R.fp4_e2m1_quantize(w, 32)
    assert torch.equal(R.dequant_fp4_weight(packed, s), R.fp4_e2m1_simulate(w, 32))
    low = packed.view(torch.uint8)[0, 0] & 0xF  # the low nibble holds the even element
    assert torch.equal(R.unpack_fp4(low.view(1).to(torch.uint8))[0], v[0, 0])


def test_load_rejects_bad_checkpoints(tmp_path):
    cfg = Config.tiny()
    out = write_random_checkpoint(cfg, tmp_path / "ok", seed=0)
    shard = next(out.glob("model-*.safetensors"))
    tensors = load_file(str(shard))

    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (out / "model.safetensors.index.json").unlink()  # without an index every shard is read

    bad = dict(tensors)
    bad["layers.0.attn.attn_sink"] = bad["layers.0.attn.attn_sink"].bfloat16()
    save_file(bad, str(shard))
    with pytest.raises(ValueError, match=r"'layers\.0\.attn\.attn_sink' must be float32, got bfloat16"):
        load_checkpoint(out)

    bad = dict(tensors)
    bad["layers.0.attn.wkv.scale"] = torch.zeros(3, 2, dtype=E8M0)
    save_file(bad, str(shard))
    with pytest.raises(ValueError, match=r"'layers\.0\.attn\.wkv\.scale' must have shape \[4, 2\], got \[3, 2\]"):
        load_checkpoint(out)

    bad = {k: v for k, v in tensors.items() if k != "head.weight"}
    bad["layers.0.ffn.gate.bias"] = torch.zeros(8)  # layer 0 is a hash layer: no bias
    save_file(bad, str(shard))
    with pytest.raises(ValueError, match=r"lacks 1 tensors .*'head\.weight'"):
        load_checkpoint(out)
    bad["head.weight"] = tensors["head.weight"]
    save_file(bad, str(shard))
    with pytest.raises(ValueError, match=r"does not use: \['layers\.0\.ffn\.gate\.bias'\]"):
        load_checkpoint(out)

    # uint8 e8m0 scales and uint8 packed FP4 (other exporters) load too
    ok = dict(tensors)
    ok["layers.0.attn.wkv.scale"] = ok["layers.0.attn.wkv.scale"].view(torch.uint8)
    ok["layers.0.ffn.experts.0.w1.weight"] = ok["layers.0.ffn.experts.0.w1.weight"].view(torch.uint8)
    save_file(ok, str(shard))
    assert load_checkpoint(out)[1]["layers.0.attn.wkv.scale"].dtype == torch.uint8
