"""Qwen2 / Qwen2.5 (incl. DeepSeek-R1-Distill-Qwen) and Qwen3: dense decoders with grouped-query attention.

One config covers both generations; they differ by fields:
  Qwen2: bias on q/k/v (not o), head_dim = hidden_size / num_attention_heads.
  Qwen3: optional bias on q/k/v/o (``attention_bias``), RMSNorm on every q and k head before rope, explicit head_dim.
"""
from __future__ import annotations

from mindspore_llm.models.config import QwenConfig
from mindspore_llm.models.layers import (CausalLM, DecoderLayer, DecoderModel, GroupedQueryAttention, Precision,
                                         RotaryEmbedding, SwiGLU)


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
    model = DecoderModel(config.vocab_size, config.hidden_size, config.rms_norm_eps, layers, rotary, precision, std,
                         config.num_attention_heads)
    return CausalLM(config, model, precision)
