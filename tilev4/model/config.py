"""The DeepSeek-V4 model configuration: a frozen dataclass that validates itself, with presets.

Field names follow the released inference code's ``ModelArgs`` (``dim``, ``n_layers``, ``n_heads``,
``moe_inter_dim``, ``n_activated_experts``, ``route_scale``, ``compress_ratios``, ``hc_mult`` …);
:meth:`Config.to_hf_dict` / :meth:`Config.from_hf_dict` translate to and from the Hugging Face style
``config.json`` that sits next to the released shards (``hidden_size``, ``num_hidden_layers``,
``num_experts_per_tok``, ``routed_scaling_factor``, ``num_nextn_predict_layers``, ``rope_scaling`` …).

Rules every config keeps (spec, "Configs" and "Attention layer"):

* ``head_dim`` 512 with the LAST ``rope_head_dim`` 64 dims rotated; one KV head (MQA); ``window_size`` 128;
  ``hc_mult`` 4 residual streams; ``index_head_dim`` 128 (a power of two, for the Hadamard rotation);
* ``compress_ratios[i]`` ∈ {0 (sliding window only), 4 (CSA), 128 (HCA)}, one per main layer; the MTP
  layers are window-only (the released config lists a 0 for them after the main layers);
* the first ``n_hash_layers`` layers route by the ``tid2eid`` table, the others by score + bias;
* ``n_heads`` splits into ``o_groups`` output groups; ratio-0 layers use RoPE theta ``rope_theta``
  without YaRN, compressed layers ``compress_rope_theta`` with YaRN (``rope_factor``,
  ``original_seq_len``, ``beta_fast``, ``beta_slow``);
* ``dim`` and ``moe_inter_dim`` are multiples of 32 (the FP4 expert scale block along K).

Presets (:meth:`Config.flash`, :meth:`Config.pro` are the released sizes; the scaled-down ones keep
every rule above and exercise every layer kind):

=======  ======  ====  =====  ======  ============  ==========================  =========  ======
preset   layers  dim   heads  groups  experts/top   compress_ratios             hash lyrs  vocab
=======  ======  ====  =====  ======  ============  ==========================  =========  ======
flash    43+1    4096  64     8       256 / 6       [0,0]+[4,128]*20+[4]        3          129280
pro      61+1    7168  128    16      384 / 6       [128,128]+[4,128]*29+[4]    3          129280
tiny     4+1     256   8      2       8 / 2         [0,4,128,4]                 1          512
small    7+1     1024  16     4       16 / 4        [0,0,4,128,4,128,4]         2          4096
=======  ======  ====  =====  ======  ============  ==========================  =========  ======
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilev4.reference.rope import RopeConfig

__all__ = ["LAYER_KINDS", "Config"]

#: compress ratio → layer kind.
LAYER_KINDS = {0: "window", 4: "csa", 128: "hca"}

_INT_FIELDS = (
    "vocab_size",
    "dim",
    "n_layers",
    "n_mtp_layers",
    "n_heads",
    "head_dim",
    "rope_head_dim",
    "q_lora_rank",
    "o_groups",
    "o_lora_rank",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "n_routed_experts",
    "n_shared_experts",
    "n_activated_experts",
    "moe_inter_dim",
    "n_hash_layers",
    "hc_mult",
    "hc_sinkhorn_iters",
    "window_size",
    "original_seq_len",
    "max_seq_len",
)
_FLOAT_FIELDS = (
    "route_scale",
    "swiglu_limit",
    "hc_eps",
    "norm_eps",
    "rope_theta",
    "compress_rope_theta",
    "rope_factor",
    "beta_fast",
    "beta_slow",
)


def _bad(name: str, value: object, why: str) -> ValueError:
    return ValueError(f"Config.{name} {why}, got {value!r}")


@dataclass(frozen=True)
class Config:
    """DeepSeek-V4 hyper-parameters (see the module docstring for the rules and presets).

    Attributes (released V4-Flash value in brackets):
        name: a label for the preset ("flash", "pro", "tiny", "small", or anything).
        vocab_size: vocabulary rows of ``embed`` and ``head`` [129280].
        dim: hidden size [4096].
        n_layers: main transformer blocks [43]; n_mtp_layers: multi-token-prediction blocks, 0 or 1 [1].
        n_heads: query heads H [64]; head_dim: 512; rope_head_dim: 64 (the last 64 of the 512).
        q_lora_rank: width of the query low-rank bottleneck [1024].
        o_groups: output-projection groups G [8]; o_lora_rank: per-group rank of ``wo_a`` [1024].
        index_n_heads / index_head_dim / index_topk: lightning indexer heads [64], dim [128], top-k [512].
        n_routed_experts / n_shared_experts / n_activated_experts / moe_inter_dim: [256 / 1 / 6 / 2048].
        route_scale: routing-weight multiplier [1.5]; swiglu_limit: routed-expert clamp, 0 = none [10].
        n_hash_layers: leading layers routed by ``tid2eid`` [3].
        hc_mult: mHC streams [4]; hc_sinkhorn_iters: [20]; hc_eps: [1e-6]; norm_eps: rmsnorm eps [1e-6].
        compress_ratios: one of 0 / 4 / 128 per main layer.
        window_size: sliding window W [128].
        rope_theta: ratio-0 layers [10000]; compress_rope_theta: compressed layers [160000];
        rope_factor / original_seq_len / beta_fast / beta_slow: YaRN of compressed layers [16 / 65536 / 32 / 1].
        max_seq_len: the longest context the model supports (``max_position_embeddings``) [1048576].
    """

    name: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    index_n_heads: int
    index_topk: int
    n_routed_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    route_scale: float
    n_hash_layers: int
    compress_ratios: tuple[int, ...]
    n_mtp_layers: int = 1
    head_dim: int = 512
    rope_head_dim: int = 64
    index_head_dim: int = 128
    n_shared_experts: int = 1
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    window_size: int = 128
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_seq_len: int = 1048576

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise _bad("name", self.name, "must be a str")
        ratios = self.compress_ratios
        if not isinstance(ratios, (list, tuple)):
            raise _bad("compress_ratios", ratios, "must be a list of ratios (0, 4 or 128), one per layer")
        object.__setattr__(self, "compress_ratios", tuple(ratios))
        for f in _INT_FIELDS:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int):
                raise _bad(f, v, "must be an int")
            if v < (0 if f in ("n_mtp_layers", "n_hash_layers") else 1):
                raise _bad(f, v, "must be >= 1" if f not in ("n_mtp_layers", "n_hash_layers") else "must be >= 0")
        for f in _FLOAT_FIELDS:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _bad(f, v, "must be a finite number")
            object.__setattr__(self, f, float(v))
        self._check_rules()

    def _check_rules(self) -> None:
        if self.head_dim != 512:
            raise _bad("head_dim", self.head_dim, "must be 512 (the V4 cache layout and attention kernels assume it)")
        if self.rope_head_dim != 64:
            raise _bad("rope_head_dim", self.rope_head_dim, "must be 64 (the last 64 of the 512 dims are rotated)")
        if self.window_size != 128:
            raise _bad("window_size", self.window_size, "must be 128 (the V4 sliding window)")
        if self.hc_mult != 4:
            raise _bad("hc_mult", self.hc_mult, "must be 4 (mHC streams)")
        d = self.index_head_dim
        if d & (d - 1) or d % 32 or d < self.rope_head_dim:
            raise _bad("index_head_dim", d, "must be a power of two, a multiple of 32 and >= rope_head_dim=64")
        if self.n_heads % self.o_groups:
            raise _bad("n_heads", self.n_heads, f"must be divisible by o_groups={self.o_groups}")
        if self.n_mtp_layers > 1:
            raise _bad("n_mtp_layers", self.n_mtp_layers, "must be 0 or 1")
        if len(self.compress_ratios) != self.n_layers:
            raise _bad("compress_ratios", list(self.compress_ratios), f"must have n_layers={self.n_layers} entries")
        for i, r in enumerate(self.compress_ratios):
            if isinstance(r, bool) or r not in LAYER_KINDS:
                raise _bad(f"compress_ratios[{i}]", r, "must be 0 (window), 4 (CSA) or 128 (HCA)")
        if self.n_hash_layers > self.n_layers:
            raise _bad("n_hash_layers", self.n_hash_layers, f"must be <= n_layers={self.n_layers}")
        if self.n_activated_experts > self.n_routed_experts:
            raise _bad(
                "n_activated_experts", self.n_activated_experts, f"must be <= n_routed_experts={self.n_routed_experts}"
            )
        for f in ("dim", "moe_inter_dim"):
            if getattr(self, f) % 32:
                raise _bad(f, getattr(self, f), "must be a multiple of 32 (FP4 expert scale block)")
        for f in ("route_scale", "hc_eps", "norm_eps"):
            if getattr(self, f) <= 0:
                raise _bad(f, getattr(self, f), "must be > 0")
        if self.swiglu_limit < 0:
            raise _bad("swiglu_limit", self.swiglu_limit, "must be >= 0 (0 = no clamp)")
        for f in ("rope_theta", "compress_rope_theta"):
            if getattr(self, f) <= 1:
                raise _bad(f, getattr(self, f), "must be > 1")
        if self.rope_factor < 1:
            raise _bad("rope_factor", self.rope_factor, "must be >= 1 (1 disables YaRN)")
        if self.vocab_size < 2:
            raise _bad("vocab_size", self.vocab_size, "must be >= 2")

    # ------------------------------------------------------------------ derived quantities

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """``"window"`` / ``"csa"`` / ``"hca"`` per main layer."""
        return tuple(LAYER_KINDS[r] for r in self.compress_ratios)

    @property
    def heads_per_group(self) -> int:
        return self.n_heads // self.o_groups

    @property
    def shared_inter_dim(self) -> int:
        """Intermediate size of the shared expert(s): ``moe_inter_dim * n_shared_experts``."""
        return self.moe_inter_dim * self.n_shared_experts

    def is_hash_layer(self, layer: int) -> bool:
        """Whether main layer ``layer`` routes by ``tid2eid`` (MTP layers never do)."""
        return layer < self.n_hash_layers

    def rope(self, ratio: int) -> RopeConfig:
        """RoPE of a layer of compress ratio ``ratio`` (and of its compressors and indexer)."""
        if ratio == 0:
            return RopeConfig(rope_dim=self.rope_head_dim, theta=self.rope_theta)
        return RopeConfig(
            rope_dim=self.rope_head_dim,
            theta=self.compress_rope_theta,
            yarn_factor=self.rope_factor,
            original_seq_len=self.original_seq_len,
            beta_fast=self.beta_fast,
            beta_slow=self.beta_slow,
        )

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets

    @classmethod
    def flash(cls) -> Config:
        """DeepSeek-V4-Flash: 43 layers + 1 MTP, dim 4096, 64 heads, 256 experts (top-6)."""
        return cls(
            name="flash",
            vocab_size=129280,
            dim=4096,
            n_layers=43,
            n_heads=64,
            q_lora_rank=1024,
            o_groups=8,
            o_lora_rank=1024,
            index_n_heads=64,
            index_topk=512,
            n_routed_experts=256,
            n_activated_experts=6,
            moe_inter_dim=2048,
            route_scale=1.5,
            n_hash_layers=3,
            compress_ratios=(0, 0, *(4, 128) * 20, 4),
        )

    @classmethod
    def pro(cls) -> Config:
        """DeepSeek-V4-Pro: 61 layers + 1 MTP, dim 7168, 128 heads, 384 experts (top-6)."""
        return cls(
            name="pro",
            vocab_size=129280,
            dim=7168,
            n_layers=61,
            n_heads=128,
            q_lora_rank=1536,
            o_groups=16,
            o_lora_rank=1024,
            index_n_heads=64,
            index_topk=1024,
            n_routed_experts=384,
            n_activated_experts=6,
            moe_inter_dim=3072,
            route_scale=2.5,
            n_hash_layers=3,
            compress_ratios=(128, 128, *(4, 128) * 29, 4),
        )

    @classmethod
    def tiny(cls) -> Config:
        """Tests and the demo: 4 layers (window, CSA, HCA, CSA) + 1 MTP, dim 256, 8 heads in 2 groups,
        q/o ranks 128, 4 indexer heads with top-8, 8 experts (top-2, inter 128), 1 hash layer, vocab 512.
        A 64-token prefill plus 16 decode steps takes about a second on one CPU core."""
        return cls(
            name="tiny",
            vocab_size=512,
            dim=256,
            n_layers=4,
            n_heads=8,
            q_lora_rank=128,
            o_groups=2,
            o_lora_rank=128,
            index_n_heads=4,
            index_topk=8,
            n_routed_experts=8,
            n_activated_experts=2,
            moe_inter_dim=128,
            route_scale=1.5,
            n_hash_layers=1,
            compress_ratios=(0, 4, 128, 4),
        )

    @classmethod
    def small(cls) -> Config:
        """A larger smoke-test model: Flash's layer pattern ``[0,0] + [4,128]*2 + [4]`` (7 layers) + 1 MTP,
        dim 1024, 16 heads in 4 groups, q/o ranks 256, 8 indexer heads with top-32, 16 experts (top-4,
        inter 256), 2 hash layers, vocab 4096."""
        return cls(
            name="small",
            vocab_size=4096,
            dim=1024,
            n_layers=7,
            n_heads=16,
            q_lora_rank=256,
            o_groups=4,
            o_lora_rank=256,
            index_n_heads=8,
            index_topk=32,
            n_routed_experts=16,
            n_activated_experts=4,
            moe_inter_dim=256,
            route_scale=1.5,
            n_hash_layers=2,
            compress_ratios=(0, 0, 4, 128, 4, 128, 4),
        )

    @classmethod
    def preset(cls, name: str) -> Config:
        """The preset called ``name`` ("flash", "pro", "tiny" or "small")."""
        presets = {"flash": cls.flash, "pro": cls.pro, "tiny": cls.tiny, "small": cls.small}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]()

    # ------------------------------------------------------------------ config.json

    def to_hf_dict(self) -> dict[str, Any]:
        """The released-style ``config.json`` (Hugging Face keys; ``compress_ratios`` lists the main layers
        then a 0 per MTP layer, as the release does), plus ``tilev4_name`` for the preset label."""
        return {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "tilev4_name": self.name,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_nextn_predict_layers": self.n_mtp_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "qk_rope_head_dim": self.rope_head_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.n_activated_experts,
            "moe_intermediate_size": self.moe_inter_dim,
            "routed_scaling_factor": self.route_scale,
            "scoring_func": "sqrtsoftplus",
            "topk_method": "noaux_tc",
            "norm_topk_prob": True,
            "swiglu_limit": self.swiglu_limit,
            "num_hash_layers": self.n_hash_layers,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "rms_norm_eps": self.norm_eps,
            "compress_ratios": [*self.compress_ratios, *([0] * self.n_mtp_layers)],
            "sliding_window": self.window_size,
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "rope_scaling": {
                "type": "yarn",
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_seq_len,
                "beta_fast": self.beta_fast,
                "beta_slow": self.beta_slow,
            },
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "quantization_config": {
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "quant_method": "fp8",
                "scale_fmt": "ue8m0",
                "weight_block_size": [128, 128],
            },
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Config:
        """Inverse of :meth:`to_hf_dict`; reads a released ``config.json`` too. ``compress_ratios`` may list
        the main layers only or the main layers then one 0 per MTP layer."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, got {type(d).__name__}")
        required = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "q_lora_rank",
            "o_groups",
            "o_lora_rank",
            "index_n_heads",
            "index_topk",
            "n_routed_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "routed_scaling_factor",
            "num_hash_layers",
            "compress_ratios",
        )
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"config.json lacks the keys {missing}")
        n_layers = d["num_hidden_layers"]
        n_mtp = d.get("num_nextn_predict_layers", 0)
        ratios = list(d["compress_ratios"])
        if isinstance(n_layers, int) and isinstance(n_mtp, int) and len(ratios) == n_layers + n_mtp and n_mtp:
            if any(r != 0 for r in ratios[n_layers:]):
                raise ValueError(f"config.json compress_ratios: MTP layers must be 0 (window), got {ratios[n_layers:]}")
            ratios = ratios[:n_layers]
        yarn = d.get("rope_scaling") or {}
        kwargs: dict[str, Any] = {
            "name": d.get("tilev4_name", "custom"),
            "vocab_size": d["vocab_size"],
            "dim": d["hidden_size"],
            "n_layers": n_layers,
            "n_mtp_layers": n_mtp,
            "n_heads": d["num_attention_heads"],
            "q_lora_rank": d["q_lora_rank"],
            "o_groups": d["o_groups"],
            "o_lora_rank": d["o_lora_rank"],
            "index_n_heads": d["index_n_heads"],
            "index_topk": d["index_topk"],
            "n_routed_experts": d["n_routed_experts"],
            "n_activated_experts": d["num_experts_per_tok"],
            "moe_inter_dim": d["moe_intermediate_size"],
            "route_scale": d["routed_scaling_factor"],
            "n_hash_layers": d["num_hash_layers"],
            "compress_ratios": tuple(ratios),
        }
        optional = {
            "head_dim": "head_dim",
            "rope_head_dim": "qk_rope_head_dim",
            "index_head_dim": "index_head_dim",
            "n_shared_experts": "n_shared_experts",
            "swiglu_limit": "swiglu_limit",
            "hc_mult": "hc_mult",
            "hc_sinkhorn_iters": "hc_sinkhorn_iters",
            "hc_eps": "hc_eps",
            "norm_eps": "rms_norm_eps",
            "window_size": "sliding_window",
            "rope_theta": "rope_theta",
            "compress_rope_theta": "compress_rope_theta",
            "max_seq_len": "max_position_embeddings",
        }
        for field, key in optional.items():
            if key in d:
                kwargs[field] = d[key]
        for field, key in (
            ("rope_factor", "factor"),
            ("original_seq_len", "original_max_position_embeddings"),
            ("beta_fast", "beta_fast"),
            ("beta_slow", "beta_slow"),
        ):
            if key in yarn:
                kwargs[field] = yarn[key]
        for key in ("scoring_func",):
            if key in d and d[key] != "sqrtsoftplus":
                raise ValueError(f"config.json {key} must be 'sqrtsoftplus' (the V4 gate), got {d[key]!r}")
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_hf_dict` as JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a ``config.json`` written by :meth:`save` or shipped with the released checkpoint."""
        return cls.from_hf_dict(json.loads(Path(path).read_text()))
