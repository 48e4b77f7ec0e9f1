"""Checkpoint format of DeepSeek-V4 (safetensors shards), random checkpoints, and loading.

Where the names come from: no released V4 checkpoint is reachable from this machine. The names, shapes
and dtypes below were inferred from the spec (``shared/spec/deepseek-v4.md``) and cross-checked against
public third-party listings of the released V4-Flash index (``model.safetensors.index.json`` dumps and
weight-name mappings in open-source ports); treat them as the best inference available, not as a
verified byte-for-byte copy. Where those listings disagree with a guess, the listing won: norms, the
gate weight and the compressor projections are bf16 (not fp32), packed FP4 experts are ``int8``, and
e8m0 scales are ``float8_e8m0fnu``. ``checkpoint_specs(Config.flash())`` reproduces the listed totals
exactly: 69,187 tensors holding 158,069,433,298 values (148.65 GiB).

Layout on disk (what :func:`write_random_checkpoint` writes and :func:`load_checkpoint` reads)::

    config.json                              Config.to_hf_dict(): Hugging Face keys as released
    model-00001-of-0000N.safetensors …       the tensors, split into shards of at most max_shard_bytes
    model.safetensors.index.json             {"metadata": {"total_size": …}, "weight_map": {name: shard}}

Formats. ``fp8``: ``X.weight`` float8_e4m3fn [N, K] + ``X.scale`` float8_e8m0fnu [⌈N/128⌉, ⌈K/128⌉]
(one power-of-two scale per 128×128 tile, ``2^ceil(log2(amax/448))``). ``fp4``: ``X.weight`` int8
[N, K/2], two e2m1 codes per byte, low nibble = even element + ``X.scale`` float8_e8m0fnu [N, K/32].
Loading also accepts uint8 for both the packed FP4 bytes and the e8m0 scales, and int32 for ``tid2eid``.

Naming table (``L`` = ``layers.{i}.`` for main layer i, or ``mtp.{j}.`` for MTP layer j; ``H`` heads,
``G`` o_groups, ``q`` q_lora_rank, ``o`` o_lora_rank, ``HI``/``DI`` indexer heads/dim, ``E`` experts,
``I`` moe_inter_dim, ``m`` the layer's compress ratio, ``c`` = 2 if m = 4 else 1, ``k`` top-k experts):

====================================================  ==========  =========================  ====================
name                                                  format      shape                      present
====================================================  ==========  =========================  ====================
embed.weight                                          bf16        [vocab, dim]               always
head.weight                                           bf16        [vocab, dim]               always
norm.weight                                           bf16        [dim]                      always
hc_head_fn / hc_head_base / hc_head_scale             fp32        [4, 4·dim] / [4] / [1]     always
L attn_norm.weight, L ffn_norm.weight                 bf16        [dim]                      every layer
L hc_attn_fn / hc_attn_base / hc_attn_scale           fp32        [24, 4·dim] / [24] / [3]   every layer
L hc_ffn_fn / hc_ffn_base / hc_ffn_scale              fp32        [24, 4·dim] / [24] / [3]   every layer
L attn.wq_a                                           fp8         [q, dim]                   every layer
L attn.q_norm.weight                                  bf16        [q]                        every layer
L attn.wq_b                                           fp8         [H·512, q]                 every layer
L attn.wkv                                            fp8         [512, dim]                 every layer
L attn.kv_norm.weight                                 bf16        [512]                      every layer
L attn.wo_a                                           fp8         [G·o, H·512/G]             every layer
L attn.wo_b                                           fp8         [dim, G·o]                 every layer
L attn.attn_sink                                      fp32        [H]                        every layer
L attn.compressor.wkv.weight / .wgate.weight          bf16        [c·512, dim]               m = 4, 128
L attn.compressor.ape                                 fp32        [m, c·512]                 m = 4, 128
L attn.compressor.norm.weight                         bf16        [512]                      m = 4, 128
L attn.indexer.wq_b                                   fp8         [HI·DI, q]                 m = 4
L attn.indexer.weights_proj.weight                    bf16        [HI, dim]                  m = 4
L attn.indexer.compressor.wkv.weight / .wgate.weight  bf16        [2·DI, dim]                m = 4
L attn.indexer.compressor.ape                         fp32        [4, 2·DI]                  m = 4
L attn.indexer.compressor.norm.weight                 bf16        [DI]                       m = 4
L ffn.gate.weight                                     bf16        [E, dim]                   every layer
L ffn.gate.bias                                       fp32        [E]                        score layers
L ffn.gate.tid2eid                                    int64       [vocab, k]                 hash layers
L ffn.experts.{e}.w1 / .w3                            fp4         [I, dim]                   e < E
L ffn.experts.{e}.w2                                  fp4         [dim, I]                   e < E
L ffn.shared_experts.w1 / .w3                         fp8         [I·n_shared, dim]          every layer
L ffn.shared_experts.w2                               fp8         [dim, I·n_shared]          every layer
mtp.{j}.e_proj, mtp.{j}.h_proj                        fp8         [dim, dim]                 MTP
mtp.{j}.enorm.weight / hnorm.weight / norm.weight     bf16        [dim]                      MTP
mtp.{j}.hc_head_fn / hc_head_base / hc_head_scale     fp32        [4, 4·dim] / [4] / [1]     MTP
====================================================  ==========  =========================  ====================

MTP layers are window-only (m = 0) and score-routed; their ``ffn.gate.bias`` is present.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tilev4._checks import check_tensor
from tilev4.model.config import Config
from tilev4.reference.quant import (
    FP8_E4M3_MAX,
    dequant_fp4_weight,
    dequant_fp8_weight,
    e8m0_encode,
    fp4_e2m1_quantize,
    pack_fp4,
)

__all__ = [
    "FP4_BLOCK",
    "FP8_BLOCK",
    "TensorSpec",
    "checkpoint_specs",
    "dequantize",
    "load_checkpoint",
    "quantize_fp4_weight",
    "quantize_fp8_weight",
    "random_checkpoint_tensors",
    "write_random_checkpoint",
]

FP8_BLOCK = 128  # weight scale tile, 128 × 128
FP4_BLOCK = 32  # expert scale block along K
E8M0 = torch.float8_e8m0fnu
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_FP8_AMAX_FLOOR = 1e-4

# accepted on load, per format
_LOAD_DTYPES = {
    "fp8": (torch.float8_e4m3fn,),
    "fp8_scale": (E8M0, torch.uint8),
    "fp4": (torch.int8, torch.uint8),
    "fp4_scale": (E8M0, torch.uint8),
    "bf16": (torch.bfloat16,),
    "fp32": (torch.float32,),
    "int64": (torch.int64, torch.int32),
}
# written
_WRITE_DTYPES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_scale": E8M0,
    "fp4": torch.int8,
    "fp4_scale": E8M0,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "int64": torch.int64,
}


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its ``shape``, storage ``fmt`` (a key of the format table) and, for a
    ``.weight`` of an fp8/fp4 linear, ``in_features`` K (the logical width before packing)."""

    shape: tuple[int, ...]
    fmt: str
    in_features: int = 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype :func:`write_random_checkpoint` writes."""
        return _WRITE_DTYPES[self.fmt]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _fp8(specs: dict[str, TensorSpec], name: str, n: int, k: int) -> None:
    specs[f"{name}.weight"] = TensorSpec((n, k), "fp8", k)
    specs[f"{name}.scale"] = TensorSpec((math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK)), "fp8_scale")


def _fp4(specs: dict[str, TensorSpec], name: str, n: int, k: int) -> None:
    specs[f"{name}.weight"] = TensorSpec((n, k // 2), "fp4", k)
    specs[f"{name}.scale"] = TensorSpec((n, k // FP4_BLOCK), "fp4_scale")


def _compressor(specs: dict[str, TensorSpec], p: str, cfg: Config, ratio: int, d: int) -> None:
    coff = 2 if ratio == 4 else 1
    specs[f"{p}wkv.weight"] = TensorSpec((coff * d, cfg.dim), "bf16")
    specs[f"{p}wgate.weight"] = TensorSpec((coff * d, cfg.dim), "bf16")
    specs[f"{p}ape"] = TensorSpec((ratio, coff * d), "fp32")
    specs[f"{p}norm.weight"] = TensorSpec((d,), "bf16")


def _block(specs: dict[str, TensorSpec], p: str, cfg: Config, ratio: int, hash_layer: bool) -> None:
    dim, hd = cfg.dim, cfg.head_dim
    for sub in ("attn", "ffn"):
        specs[f"{p}{sub}_norm.weight"] = TensorSpec((dim,), "bf16")
        specs[f"{p}hc_{sub}_fn"] = TensorSpec((24, cfg.hc_mult * dim), "fp32")
        specs[f"{p}hc_{sub}_base"] = TensorSpec((24,), "fp32")
        specs[f"{p}hc_{sub}_scale"] = TensorSpec((3,), "fp32")
    a = f"{p}attn."
    _fp8(specs, f"{a}wq_a", cfg.q_lora_rank, dim)
    specs[f"{a}q_norm.weight"] = TensorSpec((cfg.q_lora_rank,), "bf16")
    _fp8(specs, f"{a}wq_b", cfg.n_heads * hd, cfg.q_lora_rank)
    _fp8(specs, f"{a}wkv", hd, dim)
    specs[f"{a}kv_norm.weight"] = TensorSpec((hd,), "bf16")
    _fp8(specs, f"{a}wo_a", cfg.o_groups * cfg.o_lora_rank, cfg.n_heads * hd // cfg.o_groups)
    _fp8(specs, f"{a}wo_b", dim, cfg.o_groups * cfg.o_lora_rank)
    specs[f"{a}attn_sink"] = TensorSpec((cfg.n_heads,), "fp32")
    if ratio:
        _compressor(specs, f"{a}compressor.", cfg, ratio, hd)
    if ratio == 4:
        _fp8(specs, f"{a}indexer.wq_b", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)
        specs[f"{a}indexer.weights_proj.weight"] = TensorSpec((cfg.index_n_heads, dim), "bf16")
        _compressor(specs, f"{a}indexer.compressor.", cfg, 4, cfg.index_head_dim)
    f = f"{p}ffn."
    specs[f"{f}gate.weight"] = TensorSpec((cfg.n_routed_experts, dim), "bf16")
    if hash_layer:
        specs[f"{f}gate.tid2eid"] = TensorSpec((cfg.vocab_size, cfg.n_activated_experts), "int64")
    else:
        specs[f"{f}gate.bias"] = TensorSpec((cfg.n_routed_experts,), "fp32")
    for e in range(cfg.n_routed_experts):
        _fp4(specs, f"{f}experts.{e}.w1", cfg.moe_inter_dim, dim)
        _fp4(specs, f"{f}experts.{e}.w2", dim, cfg.moe_inter_dim)
        _fp4(specs, f"{f}experts.{e}.w3", cfg.moe_inter_dim, dim)
    _fp8(specs, f"{f}shared_experts.w1", cfg.shared_inter_dim, dim)
    _fp8(specs, f"{f}shared_experts.w2", dim, cfg.shared_inter_dim)
    _fp8(specs, f"{f}shared_experts.w3", cfg.shared_inter_dim, dim)


def _head(specs: dict[str, TensorSpec], p: str, cfg: Config) -> None:
    specs[f"{p}hc_head_fn"] = TensorSpec((cfg.hc_mult, cfg.hc_mult * cfg.dim), "fp32")
    specs[f"{p}hc_head_base"] = TensorSpec((cfg.hc_mult,), "fp32")
    specs[f"{p}hc_head_scale"] = TensorSpec((1,), "fp32")


def checkpoint_specs(config: Config) -> dict[str, TensorSpec]:
    """Every tensor of a checkpoint for ``config``: name → :class:`TensorSpec`, in writing order."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be a tilev4.model.Config, got {type(config).__name__}")
    specs: dict[str, TensorSpec] = {}
    specs["embed.weight"] = TensorSpec((config.vocab_size, config.dim), "bf16")
    for i, ratio in enumerate(config.compress_ratios):
        _block(specs, f"layers.{i}.", config, ratio, config.is_hash_layer(i))
    specs["norm.weight"] = TensorSpec((config.dim,), "bf16")
    _head(specs, "", config)
    specs["head.weight"] = TensorSpec((config.vocab_size, config.dim), "bf16")
    for j in range(config.n_mtp_layers):
        p = f"mtp.{j}."
        _fp8(specs, f"{p}e_proj", config.dim, config.dim)
        _fp8(specs, f"{p}h_proj", config.dim, config.dim)
        for norm in ("enorm", "hnorm", "norm"):
            specs[f"{p}{norm}.weight"] = TensorSpec((config.dim,), "bf16")
        _head(specs, p, config)
        _block(specs, p, config, 0, False)
    return specs


# ---------------------------------------------------------------------------------------------- quantisation


def quantize_fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 weight with one power-of-two scale per 128×128 tile (the released linear format).

    w: [N, K] float. Returns ``(q, scale)``: q float8_e4m3fn [N, K], scale float8_e8m0fnu [⌈N/128⌉, ⌈K/128⌉],
    with ``dequant_fp8_weight(q, scale) ≈ w``; scale = ``2^ceil(log2(amax/448))``, amax floored at 1e-4.
    """
    check_tensor("w", w, dtype=(torch.float32, torch.bfloat16, torch.float16), ndim=2)
    n, k = w.shape
    sn, sk = math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK)
    padded = w.new_zeros(sn * FP8_BLOCK, sk * FP8_BLOCK, dtype=torch.float32)
    padded[:n, :k] = w.float()
    tiles = padded.view(sn, FP8_BLOCK, sk, FP8_BLOCK)  # [sn, 128, sk, 128]
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(_FP8_AMAX_FLOOR)  # [sn, sk]
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_E4M3_MAX)))  # [sn, sk]
    full = scale.repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]  # [N, K]
    q = (w.float() / full).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, e8m0_encode(scale).view(E8M0)


def quantize_fp4_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 e2m1 expert weight, packed two per byte, with a power-of-two scale per 32 along K.

    w: [N, K] float, K a multiple of 32. Returns ``(packed, scale)``: packed int8 [N, K/2] (low nibble =
    even element), scale float8_e8m0fnu [N, K/32], with ``dequant_fp4_weight(packed, scale) ≈ w``.
    """
    check_tensor("w", w, dtype=(torch.float32, torch.bfloat16, torch.float16), ndim=2)
    v, scale = fp4_e2m1_quantize(w, FP4_BLOCK)  # [N, K], [N, K/32]
    return pack_fp4(v).view(torch.int8), e8m0_encode(scale).view(E8M0)


def dequantize(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The fp32 value of checkpoint tensor ``name`` (a ``.weight`` with a ``.scale`` companion is dequantised:
    FP8 128×128 tiles or packed FP4 with per-32 scales, told apart by its dtype)."""
    if name not in tensors:
        raise KeyError(f"checkpoint has no tensor {name!r}")
    w = tensors[name]
    scale_name = name[: -len(".weight")] + ".scale" if name.endswith(".weight") else None
    if scale_name is None or scale_name not in tensors:
        return w.float()
    scale = tensors[scale_name]
    if w.dtype == torch.float8_e4m3fn:
        return dequant_fp8_weight(w, scale, FP8_BLOCK)
    return dequant_fp4_weight(w, scale, FP4_BLOCK)


# ---------------------------------------------------------------------------------------------- random weights


def _random_tensor(name: str, spec: TensorSpec, cfg: Config, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random values of sensible scale for one tensor (or a .weight/.scale pair); keeps activations O(1)."""

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    if spec.fmt in ("fp8", "fp4"):
        n, k = spec.shape[0], spec.in_features
        w = randn(n, k, std=k**-0.5)  # unit-variance inputs → unit-variance outputs
        q, s = quantize_fp8_weight(w) if spec.fmt == "fp8" else quantize_fp4_weight(w)
        base = name[: -len(".weight")]
        return {name: q, f"{base}.scale": s}
    shape = spec.shape
    leaf = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else name.rsplit(".", 2)[-2]
    if name.endswith("tid2eid"):  # distinct experts per token, in random order
        keys = torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=gen)
        t = keys.argsort(-1)[:, : cfg.n_activated_experts].to(torch.int64)
    elif name == "embed.weight":
        t = randn(*shape)
    elif leaf.endswith("norm"):  # rmsnorm weights near 1
        t = 1.0 + randn(*shape, std=0.1)
    elif name.endswith("_fn"):  # mHC projections: mix entries ~ N(0, 0.25)
        t = randn(*shape, std=0.5 * shape[1] ** -0.5)
    elif name.endswith("_base"):
        t = randn(*shape, std=0.5)
    elif name.endswith("_scale"):
        t = 0.5 + 0.5 * torch.rand(*shape, generator=gen)
    elif name.endswith("attn_sink"):
        t = randn(*shape)
    elif name.endswith("ape"):
        t = randn(*shape, std=0.5)
    elif name.endswith("gate.bias"):
        t = randn(*shape, std=0.1)
    else:  # bf16 projections [N, K]: head, gate, compressors, indexer weights
        t = randn(*shape, std=shape[-1] ** -0.5)
    return {name: t.to(spec.dtype)}


def _shard_plan(specs: dict[str, TensorSpec], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names into shards (a .weight stays with its .scale) of at most max_shard_bytes each."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        if name.endswith(".scale"):  # follows its .weight
            shards[-1].append(name)
            size += spec.nbytes
            continue
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += spec.nbytes
    return shards


def random_checkpoint_tensors(config: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors :func:`write_random_checkpoint` writes for ``(config, seed)``, in memory (same bytes)."""
    specs = checkpoint_specs(config)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        if name not in tensors:
            tensors.update(_random_tensor(name, spec, config, gen))
    return tensors


def write_random_checkpoint(
    config: Config, directory: str | os.PathLike[str], seed: int = 0, max_shard_bytes: int = 2**31
) -> Path:
    """Write a checkpoint of random weights for ``config`` in the released V4 format (see the module docstring).

    Args:
        config: the model configuration (any preset; the released sizes take hundreds of GB).
        directory: created if missing; gets ``config.json``, ``model-0000i-of-0000N.safetensors`` and
            ``model.safetensors.index.json``.
        seed: seeds the CPU generator; the same seed gives the same bytes.
        max_shard_bytes: upper bound on one shard's tensor bytes (a single larger tensor gets its own shard).

    Returns:
        The directory as a :class:`~pathlib.Path`.
    """
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    specs = checkpoint_specs(config)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    plan = _shard_plan(specs, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for s, names in enumerate(plan):
        shard_name = f"model-{s + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            if name not in tensors:
                tensors.update(_random_tensor(name, specs[name], config, gen))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / shard_name), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = shard_name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config.save(out / CONFIG_FILE)
    return out


# ---------------------------------------------------------------------------------------------- loading


def _shard_files(directory: Path) -> Iterator[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        for shard in sorted(set(weight_map.values())):
            path = directory / shard
            if not path.exists():
                raise ValueError(f"{index} names the shard {shard!r}, which is missing from {directory}")
            yield path
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{directory} holds no *.safetensors shard")
        yield from files


def load_checkpoint(
    directory: str | os.PathLike[str], device: torch.device | str = "cpu", config: Config | None = None
) -> tuple[Config, dict[str, torch.Tensor]]:
    """Load and validate a checkpoint in the released V4 format.

    Args:
        directory: holds ``config.json`` (unless ``config`` is given) and the safetensors shards (listed by
            ``model.safetensors.index.json`` when present, else every ``*.safetensors`` file).
        device: where the tensors go (they keep their stored dtypes).
        config: overrides ``config.json``.

    Returns:
        ``(config, tensors)``: tensors maps every name of :func:`checkpoint_specs` to its stored tensor.

    Raises:
        ValueError: a missing directory, config, shard or tensor; an unexpected tensor; a wrong shape or dtype
        (the message names the tensor and what was seen).
    """
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {str(path)!r} does not exist")
    if config is None:
        if not (path / CONFIG_FILE).exists():
            raise ValueError(f"{path} has no {CONFIG_FILE}; pass config= to load_checkpoint")
        config = Config.load(path / CONFIG_FILE)
    specs = checkpoint_specs(config)
    tensors: dict[str, torch.Tensor] = {}
    for shard in _shard_files(path):
        for name, t in load_file(str(shard), device=str(device)).items():
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears in more than one shard (again in {shard.name})")
            tensors[name] = t
    missing = [n for n in specs if n not in tensors]
    unexpected = [n for n in tensors if n not in specs]
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors for this config: {missing[:8]}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 8} more)" if len(unexpected) > 8 else ""
        raise ValueError(
            f"checkpoint {path} has {len(unexpected)} tensors this config does not use: {unexpected[:8]}{more}"
        )
    for name, spec in specs.items():
        t = tensors[name]
        if tuple(t.shape) != spec.shape:
            raise ValueError(f"checkpoint tensor {name!r} must have shape {list(spec.shape)}, got {list(t.shape)}")
        if t.dtype not in _LOAD_DTYPES[spec.fmt]:
            want = " or ".join(str(d).replace("torch.", "") for d in _LOAD_DTYPES[spec.fmt])
            raise ValueError(f"checkpoint tensor {name!r} must be {want}, got {str(t.dtype).replace('torch.', '')}")
    return config, tensors
