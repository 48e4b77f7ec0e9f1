"""KV-cache byte accounting (production layout) against hand calculations, and the cache's own tensors."""

import pytest
import torch

from tilev4.model import (
    ENTRY_BYTES,
    V32_BYTES_PER_TOKEN_PER_LAYER,
    Config,
    KVCache,
    kv_bytes_per_token,
    kv_footprint,
)


def test_entry_and_key_sizes():
    assert ENTRY_BYTES == 448 + 64 * 2 + 8  # FP8 nope + bf16 rope + 7 e8m0 scales of 64 and a pad byte
    assert V32_BYTES_PER_TOKEN_PER_LAYER == 512 + 16 + 64 * 2  # V3.2 MLA: FP8 + fp32 scales + bf16 rope


def test_flash_at_1m_context_by_hand():
    cfg = Config.flash()
    n = 2**20
    # By hand: a CSA layer holds n/4 entries of 584 B and n/4 indexer keys of 64 + 4 B, an HCA layer n/128
    # entries; every layer a 128-entry ring. Flash has 21 CSA, 20 HCA and 2 window-only layers.
    csa_per_token = 584 / 4 + (64 + 4) / 4  # 163
    hca_per_token = 584 / 128  # 4.5625
    ring_per_token = 128 * 584 / n  # 0.0713
    hand = 21 * csa_per_token + 20 * hca_per_token + 43 * ring_per_token
    assert hand == pytest.approx(3517.3154296875, abs=1e-9)

    fp = kv_footprint(cfg, n)
    assert fp.bytes_per_token == pytest.approx(hand, abs=1e-9)
    assert kv_bytes_per_token(cfg, n) == fp.bytes_per_token
    assert fp.compressed_bytes == (21 * n // 4 + 20 * n // 128) * 584
    assert fp.indexer_bytes == 21 * (n // 4) * 68
    assert fp.window_bytes == 43 * 128 * 584
    assert fp.total_bytes == 3_688_172_544  # 3.43 GiB for one 1M-token sequence
    assert fp.bytes_per_token_per_layer == pytest.approx(hand / 43)  # 81.8 B vs V3.2's 656
    assert fp.fraction_of_v32_per_layer == pytest.approx(hand / 43 / 656)  # 12.5 %
    assert fp.fraction_of_v32 == pytest.approx(hand / (61 * 656))  # 8.8 % of V3.2's whole-model cache
    # compressor states (fp32): 21 × (64 KiB + 16 KiB) + 20 × 512 KiB, reported apart from the total
    assert fp.state_bytes == 21 * (65536 + 16384) + 20 * 524288


def test_footprint_options():
    cfg = Config.tiny()  # [window, CSA, HCA, CSA] + 1 MTP (window)
    fp = kv_footprint(cfg, 256)
    assert fp.total_bytes == 4 * 128 * 584 + (2 * 64 + 2) * 584 + 2 * 64 * 68
    with_mtp = kv_footprint(cfg, 256, ring_size=129, include_mtp=True)
    assert with_mtp.n_layers == 5 and with_mtp.window_bytes == 5 * 129 * 584
    with pytest.raises(ValueError, match="context_len must be >= 1, got 0"):
        kv_footprint(cfg, 0)


def test_cache_layout_and_nbytes():
    cfg = Config.tiny()
    cache = KVCache(cfg, batch=3, capacity=300, mtp=True)
    assert cache.ring_size == 129  # 128 + one slot for the MTP token of a speculative step
    kinds = [(lc.ratio, lc.compressed is not None, lc.index_keys is not None) for lc in cache.layers]
    assert kinds == [(0, False, False), (4, True, True), (128, True, False), (4, True, True)]
    assert tuple(cache.layers[1].compressed.shape) == (3, 75, 512)
    assert tuple(cache.layers[1].index_keys.shape) == (3, 75, 128)
    assert tuple(cache.layers[2].compressed.shape) == (3, 2, 512)
    assert tuple(cache.layers[0].window.shape) == (3, 129, 512)
    ring = 5 * 3 * 129 * 512 * 4
    entries = 3 * (75 + 2 + 75) * 512 * 4 + 3 * 2 * 75 * 128 * 4
    # per CSA layer: 4 fp32 arrays [3, 4, 2·512] + 4 arrays [3, 4, 2·128] + two int64 [3] token counts;
    # the HCA layer: 2 arrays [3, 128, 512] + one count
    csa_states = 2 * (4 * 3 * 4 * 1024 * 4 + 4 * 3 * 4 * 256 * 4 + 2 * 3 * 8)
    hca_states = 2 * 3 * 128 * 512 * 4 + 3 * 8
    states = csa_states + hca_states
    lengths = 2 * 3 * 8 + 3 * 4 * 256 * 4  # lengths, mtp_lengths, last_hidden [3, 4, dim]
    assert cache.nbytes() == ring + entries + states + lengths
    assert [f.context_len for f in cache.footprint()] == [1, 1, 1]
    assert cache.bytes_per_token(256) == kv_footprint(cfg, 256, ring_size=129, include_mtp=True).bytes_per_token


def test_cache_select_assign_reset():
    cfg = Config.tiny()
    cache = KVCache(cfg, batch=3, capacity=64)
    cache.layers[1].compressed[2, 5, 7] = 3.0
    cache.layers[1].compressor.kv[1, 2, 3] = 4.0
    cache.lengths[:] = torch.tensor([1, 2, 3])
    sub = cache.select([2, 1])
    assert sub.batch == 2 and sub.lengths.tolist() == [3, 2]
    assert sub.layers[1].compressed[0, 5, 7] == 3.0 and sub.layers[1].compressor.kv[1, 2, 3] == 4.0
    sub.layers[1].compressed[0, 5, 7] = 5.0
    assert cache.layers[1].compressed[2, 5, 7] == 3.0  # a copy
    sub.lengths += 1
    cache.assign([2, 1], sub)
    assert cache.layers[1].compressed[2, 5, 7] == 5.0 and cache.lengths.tolist() == [1, 3, 4]
    cache.reset([2])
    assert cache.lengths.tolist() == [1, 3, 0] and cache.layers[1].compressed[2].abs().sum() == 0
    assert cache.layers[1].compressor.score[2].isneginf().all()
    with pytest.raises(ValueError, match=r"rows must be non-empty indices in \[0, 3\), got \[3\]"):
        cache.select([3])
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        KVCache(cfg, 1, 0)
    with pytest.raises(ValueError, match="n_mtp_layers >= 1"):
        KVCache(cfg.replace(n_mtp_layers=0), 1, 8, mtp=True)


def test_readme_kv_table_is_the_code_s():
    """The README's "KV cache vs V3.2" table is what kv_table_markdown gives (no hand-edited figure)."""
    from pathlib import Path

    from tilev4.model.cache import KV_README_BEGIN, KV_README_END, kv_table_markdown

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(KV_README_BEGIN, 1)[1].split(KV_README_END, 1)[0]
    assert section.strip() == kv_table_markdown().strip()
    assert "| 1,048,576 |" in section
