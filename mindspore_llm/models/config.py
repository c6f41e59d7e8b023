"""Config pieces every family shares: rotary embedding parameters and the dense decoder dimensions."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import from_dict, require

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
