"""tilev4.model.Config: presets keep the spec's rules, bad configs name the field, config.json round trip."""

import json
import re

import pytest

from tilev4.model import Config


@pytest.mark.parametrize("name", ["flash", "pro", "tiny", "small"])
def test_presets_validate_and_keep_the_rules(name):
    cfg = Config.preset(name)
    assert cfg.name == name
    assert (cfg.head_dim, cfg.rope_head_dim, cfg.window_size, cfg.hc_mult, cfg.index_head_dim) == (512, 64, 128, 4, 128)
    assert cfg.n_heads % cfg.o_groups == 0
    assert len(cfg.compress_ratios) == cfg.n_layers
    assert cfg.n_hash_layers >= 1 and cfg.n_mtp_layers == 1
    if name in ("tiny", "small"):  # the scaled-down presets exercise every layer kind
        assert set(cfg.layer_kinds) == {"window", "csa", "hca"}
    assert Config.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_flash_and_pro_match_the_spec_table():
    f, p = Config.flash(), Config.pro()
    assert (f.n_layers, f.dim, f.n_heads, f.q_lora_rank, f.o_groups, f.o_lora_rank) == (43, 4096, 64, 1024, 8, 1024)
    assert (p.n_layers, p.dim, p.n_heads, p.q_lora_rank, p.o_groups, p.o_lora_rank) == (61, 7168, 128, 1536, 16, 1024)
    assert (f.index_n_heads, f.index_topk, p.index_topk) == (64, 512, 1024)
    assert (f.n_routed_experts, f.n_shared_experts, f.n_activated_experts, f.moe_inter_dim) == (256, 1, 6, 2048)
    assert (p.n_routed_experts, p.moe_inter_dim, f.route_scale, p.route_scale) == (384, 3072, 1.5, 2.5)
    assert f.compress_ratios == (0, 0, *(4, 128) * 20, 4)
    assert p.compress_ratios == (128, 128, *(4, 128) * 29, 4)
    assert f.layer_kinds.count("csa") == 21 and f.layer_kinds.count("hca") == 20
    assert (f.n_hash_layers, f.hc_sinkhorn_iters, f.vocab_size, f.swiglu_limit) == (3, 20, 129280, 10.0)


def test_rope_per_layer_kind():
    cfg = Config.tiny()
    window, compressed = cfg.rope(0), cfg.rope(4)
    assert (window.theta, window.yarn_factor) == (10000.0, 1.0)
    assert (compressed.theta, compressed.yarn_factor, compressed.original_seq_len) == (160000.0, 16.0, 65536)
    assert cfg.rope(128) == compressed


def test_released_config_json_with_mtp_ratio_reads():
    # The released config.json lists one extra ratio (0) for the MTP layer after the main layers.
    d = Config.flash().to_hf_dict()
    assert d["compress_ratios"][-2:] == [4, 0] and len(d["compress_ratios"]) == 44
    assert Config.from_hf_dict(json.loads(json.dumps(d))) == Config.flash()
    d43 = dict(d, compress_ratios=d["compress_ratios"][:43])
    assert Config.from_hf_dict(d43) == Config.flash()


@pytest.mark.parametrize(
    ("changes", "field", "value"),
    [
        ({"n_heads": 7}, "n_heads", "7"),  # not divisible by o_groups=2
        ({"o_groups": 3}, "n_heads", "8"),
        ({"compress_ratios": (0, 4, 64, 4)}, "compress_ratios[2]", "64"),
        ({"compress_ratios": (0, 4, 128)}, "compress_ratios", "[0, 4, 128]"),
        ({"head_dim": 256}, "head_dim", "256"),
        ({"rope_head_dim": 32}, "rope_head_dim", "32"),
        ({"window_size": 64}, "window_size", "64"),
        ({"n_activated_experts": 9}, "n_activated_experts", "9"),
        ({"dim": 250}, "dim", "250"),
        ({"n_mtp_layers": 2}, "n_mtp_layers", "2"),
        ({"n_hash_layers": 5}, "n_hash_layers", "5"),
        ({"n_layers": 0}, "n_layers", "0"),
        ({"dim": 256.0}, "dim", "256.0"),
        ({"vocab_size": True}, "vocab_size", "True"),
        ({"route_scale": -1.0}, "route_scale", "-1.0"),
        ({"index_head_dim": 96}, "index_head_dim", "96"),
        ({"rope_factor": 0.5}, "rope_factor", "0.5"),
    ],
)
def test_bad_configs_name_the_field_and_value(changes, field, value):
    with pytest.raises(ValueError, match=rf"Config\.{re.escape(field)} .*{re.escape(value)}"):
        Config.tiny().replace(**changes)


def test_unknown_preset_and_bad_config_json():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        Config.preset("huge")
    d = Config.tiny().to_hf_dict()
    del d["o_groups"]
    with pytest.raises(ValueError, match="o_groups"):
        Config.from_hf_dict(d)
    d = dict(Config.tiny().to_hf_dict(), compress_ratios=[0, 4, 128, 4, 4])
    with pytest.raises(ValueError, match="MTP layers must be 0"):
        Config.from_hf_dict(d)
    with pytest.raises(ValueError, match="scoring_func"):
        Config.from_hf_dict(dict(Config.tiny().to_hf_dict(), scoring_func="softmax"))
