"""Qwen2 / Qwen2.5 (incl. DeepSeek-R1-Distill-Qwen) and Qwen3: dense decoders with grouped-query attention.

One config covers both generations; they differ by fields:
  Qwen2: bias on q/k/v (not o), head_dim = hidden_size / num_attention_heads.
  Qwen3: optional bias on q/k/v/o (``attention_bias``), RMSNorm on every q and k head before rope, explicit head_dim.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import from_dict, require
from mindspore_llm.models.config import DROP, DecoderConfig, RopeConfig, hf_fields
from mindspore_llm.models.layers import (CausalLM, DecoderLayer, DecoderModel, GroupedQueryAttention, Precision,
                                         RotaryEmbedding, SwiGLU)

ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")


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
        require(self.architecture in ARCHITECTURES,
                f"architecture {self.architecture!r} is not a Qwen architecture ({', '.join(ARCHITECTURES)})")
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
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"{source}: architectures {hf.get('architectures')!r} is not one of {ARCHITECTURES}")
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


def build_qwen(config: QwenConfig, precision: Precision) -> CausalLM:
    std = config.initializer_range
    layers = [
        DecoderLayer(
            config.hidden_size, config.rms_norm_eps,
            GroupedQueryAttention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                  config.head_dim, config.qkv_bias, config.o_bias, config.qk_norm,
                                  config.rms_norm_eps, precision, std),
            SwiGLU(config.hidden_size, config.intermediate_size, precision, std),
            precision)
        for _ in range(config.num_hidden_layers)
    ]
    rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
    model = DecoderModel(config.vocab_size, config.hidden_size, config.rms_norm_eps, layers, rotary, precision, std)
    return CausalLM(config, model, precision)
