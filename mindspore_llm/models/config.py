"""The families' configs, and the pieces they share (rotary embedding parameters, the dense decoder dimensions);
kept apart from the Cells so that reading a config (the converter, the planners) does not start MindSpore."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import from_dict, read_text, require

RopeType = Literal["default", "linear", "dynamic", "yarn"]


@dataclass(kw_only=True)
class RopeConfig:
    """Rotary embedding parameters, as Hugging Face's ``rope_parameters`` (5.x) / ``rope_scaling`` (4.x)."""

    rope_type: RopeType = "default"
    rope_theta: float = 10000.0
    factor: float = 1.0
    # yarn only; defaults follow transformers' _compute_yarn_parameters
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def validate(self) -> None:
        require(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        require(self.factor >= 1.0 or self.rope_type == "default",
                f"rope factor must be >= 1 for {self.rope_type} scaling, got {self.factor}")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str) -> "RopeConfig":
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if "type" in params:  # transformers 4.x spelling
            params.setdefault("rope_type", params.pop("type"))
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        if params.get("rope_type") == "yarn":
            params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(set(params) - known)
        if ignored:
            raise ConfigError(f"{source}: rope parameter(s) {', '.join(ignored)} are not supported")
        return from_dict(cls, params, f"{source}: rope_parameters")


@dataclass(kw_only=True)
class DecoderConfig:
    """Dimensions every decoder-only family has; a family's config adds its own fields."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            value = getattr(self, name)
            require(value > 0, f"{name} must be positive, got {value}")
        require(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        self.rope.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Hugging Face ``model_type`` per architecture; a family sets it.
    HF_MODEL_TYPES: ClassVar[dict[str, str]] = {}

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict that ``from_hf`` reads back into this config (and transformers
        loads). Families drop or rename their own fields in ``_hf_overrides``."""
        fields = self.to_dict()
        rope = fields.pop("rope")
        architecture = fields.pop("architecture")
        # the keys each rope type reads in transformers' ROPE_INIT_FUNCTIONS
        keep = {"default": (), "linear": ("factor",), "dynamic": ("factor",)}.get(rope["rope_type"])
        rope_parameters = {k: v for k, v in rope.items()
                           if v is not None and (keep is None or k in ("rope_type", "rope_theta") + keep)}
        hf = {"architectures": [architecture], "model_type": self.HF_MODEL_TYPES[architecture], **fields,
              "rope_theta": rope["rope_theta"], "rope_parameters": rope_parameters}
        hf.update(self._hf_overrides())
        return {k: v for k, v in hf.items() if v is not DROP}

    def _hf_overrides(self) -> dict[str, Any]:
        return {}


DROP = object()  # an _hf_overrides value: leave this key out of config.json


def hf_fields(hf: Mapping[str, Any], config_cls, renames: Mapping[str, str] = {}) -> dict[str, Any]:
    """The entries of a Hugging Face config dict that `config_cls` declares (after `renames` hf -> ours).

    Hugging Face configs carry many keys that do not change the math (use_cache, dtype, ...): they are skipped.
    """
    names = {f.name for f in dataclasses.fields(config_cls)}
    picked = {}
    for key, value in hf.items():
        key = renames.get(key, key)
        if key in names and key != "rope":
            picked[key] = value
    return picked


# -- the families' configs (their models in qwen.py, deepseek_v3.py); read without MindSpore, e.g. by the converter

QWEN_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(kw_only=True)
class QwenConfig(DecoderConfig):
    architecture: str = "Qwen2ForCausalLM"
    intermediate_size: int
    num_key_value_heads: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    qkv_bias: bool = True
    o_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"

    HF_MODEL_TYPES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}

    def __post_init__(self):
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        super().validate()
        require(self.architecture in QWEN_ARCHITECTURES,
                f"architecture {self.architecture!r} is not a Qwen architecture ({', '.join(QWEN_ARCHITECTURES)})")
        require(self.intermediate_size > 0, f"intermediate_size must be positive, got {self.intermediate_size}")
        require(self.num_key_value_heads > 0, f"num_key_value_heads must be positive, got {self.num_key_value_heads}")
        require(self.num_attention_heads % self.num_key_value_heads == 0,
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})")
        require(self.head_dim > 0 and self.head_dim % 2 == 0,
                f"head_dim must be a positive even number (rotary pairs), got {self.head_dim}")
        require(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    def _hf_overrides(self) -> dict[str, Any]:
        # our variant switches are implied by the architecture; Qwen3 names its q/k/v/o bias switch attention_bias
        overrides = {"qkv_bias": DROP, "o_bias": DROP, "qk_norm": DROP}
        if self.architecture == "Qwen3ForCausalLM":
            overrides["attention_bias"] = self.qkv_bias
        return overrides

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> "QwenConfig":
        architecture = (hf.get("architectures") or [""])[0]
        if architecture not in QWEN_ARCHITECTURES:
            raise ConfigError(f"{source}: architectures {hf.get('architectures')!r} is not one of {QWEN_ARCHITECTURES}")
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported (full attention only)")
        fields = hf_fields(hf, cls)
        fields["architecture"] = architecture
        if architecture == "Qwen2ForCausalLM":
            fields.update(qkv_bias=True, o_bias=False, qk_norm=False)
        else:
            bias = bool(hf.get("attention_bias", False))
            fields.update(qkv_bias=bias, o_bias=bias, qk_norm=True)
            fields.setdefault("head_dim", hf.get("head_dim") or 128)  # transformers' Qwen3Config default
        if fields.get("num_key_value_heads") is None:
            fields["num_key_value_heads"] = fields.get("num_attention_heads")
        fields["rope"] = RopeConfig.from_hf(hf, source)
        return from_dict(cls, fields, source)


# DeepSeek-V3's MoE dispatch (models/moe.py) and what a full expert buffer drops
DISPATCHES = ("capacity", "dense", "grouped")
DROP_POLICIES = ("probability", "position")
DEEPSEEK_V3_ARCHITECTURES = ("DeepseekV3ForCausalLM",)


@dataclass(kw_only=True)
class DeepseekV3Config(DecoderConfig):
    architecture: str = "DeepseekV3ForCausalLM"
    HF_MODEL_TYPES = {"DeepseekV3ForCausalLM": "deepseek_v3"}
    intermediate_size: int  # dense layers
    # multi-head latent attention
    q_lora_rank: int | None = 1536  # None: plain q_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    rope_interleave: bool = True  # checkpoints store rotary pairs interleaved
    # DeepSeekMoE
    first_k_dense_replace: int = 3
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # fields of the original (remote-code) config.json; only the V3 choices are implemented
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    moe_layer_freq: int = 1
    hidden_act: str = "silu"
    num_nextn_predict_layers: int = 0  # MTP modules in the checkpoint (skipped when loading)
    # training-time balancing (ours; not in Hugging Face configs): γ of the bias update, α of the sequence-wise loss
    bias_update_speed: float = 0.001
    seq_aux_loss_alpha: float = 0.0
    # how training sends tokens to the routed experts (ours; models/moe.py): "capacity" keeps at most
    # C = ceil(moe_capacity_factor * S * k / E) token-slots per expert and sequence, dropping the rest by
    # moe_drop_policy; "dense" runs every expert on every token; "grouped" is Ascend's dropless sorted path.
    # Evaluation and generation are dropless whatever this says ("grouped" stays grouped, the others run dense).
    moe_dispatch: Literal["capacity", "dense", "grouped"] = "capacity"
    moe_capacity_factor: float = 1.25  # Switch Transformer's training value; >= E / k drops nothing
    moe_drop_policy: Literal["probability", "position"] = "probability"

    def _hf_overrides(self) -> dict[str, Any]:
        # MLA has no separate kv heads; transformers' config defaults them to 128, which would break a small model
        return {"num_key_value_heads": self.num_attention_heads}

    def validate(self) -> None:
        super().validate()
        require(self.architecture in DEEPSEEK_V3_ARCHITECTURES, f"architecture {self.architecture!r} is not a "
                f"DeepSeek-V3 architecture ({', '.join(DEEPSEEK_V3_ARCHITECTURES)})")
        for name in ("intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
            value = getattr(self, name)
            require(value > 0, f"{name} must be positive, got {value}")
        require(self.q_lora_rank is None or self.q_lora_rank > 0,
                f"q_lora_rank must be positive or null, got {self.q_lora_rank}")
        require(self.qk_rope_head_dim % 2 == 0,
                f"qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        require(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
                f"first_k_dense_replace must be in [0, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.first_k_dense_replace}")
        require(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        require(self.n_routed_experts % self.n_group == 0,
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        require(self.n_group == 1 or per_group >= 2,
                f"each of the n_group={self.n_group} groups needs >= 2 experts (groups are ranked by their top-2)")
        require(self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        require(self.num_experts_per_tok <= self.topk_group * per_group,
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= topk_group * experts per group "
                f"({self.topk_group * per_group})")
        require(self.scoring_func == "sigmoid", f"scoring_func {self.scoring_func!r} is not supported (only 'sigmoid')")
        require(self.topk_method == "noaux_tc",
                f"topk_method {self.topk_method!r} is not supported (only 'noaux_tc', DeepSeek-V3's)")
        require(self.moe_layer_freq == 1, f"moe_layer_freq {self.moe_layer_freq} is not supported (only 1)")
        require(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        require(self.bias_update_speed >= 0, f"bias_update_speed must be >= 0, got {self.bias_update_speed}")
        require(self.seq_aux_loss_alpha >= 0, f"seq_aux_loss_alpha must be >= 0, got {self.seq_aux_loss_alpha}")
        require(self.moe_dispatch in DISPATCHES,
                f"moe_dispatch must be one of {', '.join(DISPATCHES)}, got {self.moe_dispatch!r}")
        require(self.moe_capacity_factor > 0, f"moe_capacity_factor must be positive, got {self.moe_capacity_factor}")
        require(self.moe_drop_policy in DROP_POLICIES,
                f"moe_drop_policy must be one of {', '.join(DROP_POLICIES)}, got {self.moe_drop_policy!r}")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> "DeepseekV3Config":
        architecture = (hf.get("architectures") or [""])[0]
        if architecture not in DEEPSEEK_V3_ARCHITECTURES:
            raise ConfigError(f"{source}: architectures {hf.get('architectures')!r} is not one of "
                              f"{DEEPSEEK_V3_ARCHITECTURES}")
        heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
        if kv_heads is not None and kv_heads != heads:
            raise ConfigError(f"{source}: num_key_value_heads ({kv_heads}) must equal num_attention_heads ({heads}): "
                              f"MLA expands every head from the latent")
        fields = hf_fields(hf, cls)
        fields["architecture"] = architecture
        fields = {key: value for key, value in fields.items() if value is not None or key == "q_lora_rank"}
        fields["rope"] = RopeConfig.from_hf(hf, source)
        return from_dict(cls, fields, source)


# Hugging Face architecture name -> config class (its builder: auto.BUILDERS)
CONFIGS: dict[str, type[DecoderConfig]] = {name: cls for cls in (QwenConfig, DeepseekV3Config)
                                           for name in cls.HF_MODEL_TYPES}


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json"):
    architecture = (hf.get("architectures") or [None])[0]
    if architecture not in CONFIGS:
        raise ConfigError(f"{source}: architectures {hf.get('architectures')!r} is not supported; "
                          f"supported: {', '.join(sorted(CONFIGS))}")
    return CONFIGS[architecture].from_hf(hf, source)


def config_from_yaml_section(section: Mapping[str, Any], source: str):
    """A YAML ``model:`` section with inline dimensions; ``architecture`` picks the family."""
    architecture = section.get("architecture")
    if architecture not in CONFIGS:
        raise ConfigError(f"{source}.architecture: {architecture!r} is not one of {', '.join(sorted(CONFIGS))}")
    return from_dict(CONFIGS[architecture], section, source)


def read_hf_config(path: str | os.PathLike, hint: str = "") -> tuple[dict[str, Any], Path]:
    """(the ``config.json`` dict, its file) of a model directory or a ``config.json`` path."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    text = read_text(file, hint=hint)
    try:
        return json.loads(text), file
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: invalid JSON ({err})") from None


def load_config(path: str | os.PathLike):
    """Config from a model directory or a ``config.json`` path."""
    hf, file = read_hf_config(path)
    return config_from_hf(hf, str(file))
