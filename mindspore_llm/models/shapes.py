"""Every parameter of a family from its config's dimensions, without building the model: what the memory planner
divides by its layout, what FLOPs are counted from, what the plan checks against every split.

Names are our Cells' and Hugging Face's (they are the same); buffers such as the router's correction bias are not
parameters here.
"""
from __future__ import annotations

import math


def is_moe(config) -> bool:
    return bool(getattr(config, "n_routed_experts", 0))


def moe_layer(config, index: int) -> bool:
    return is_moe(config) and index >= config.first_k_dense_replace


def expert_capacity(seq_length: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Token-slots each routed expert takes per sequence under the capacity dispatch: ceil(capacity_factor * S * k
    / E), at most S (an expert gets each token at most once, so S drops nothing)."""
    return min(seq_length, math.ceil(capacity_factor * seq_length * top_k / num_experts))


def routed_slots_per_token(config, seq_length: int) -> float:
    """Routed-expert evaluations a token costs in training under ``config.moe_dispatch``: k for the grouped
    (dropless, sorted) dispatch, E * C / S for the capacity dispatch (unused slots included), E for the dense one."""
    experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    if config.moe_dispatch == "grouped":
        return float(top_k)
    if config.moe_dispatch == "capacity":
        return experts * expert_capacity(seq_length, experts, top_k, config.moe_capacity_factor) / seq_length
    return float(experts)


def _swiglu(prefix: str, hidden: int, intermediate: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.gate_proj.weight", (intermediate, hidden)),
            (f"{prefix}.up_proj.weight", (intermediate, hidden)),
            (f"{prefix}.down_proj.weight", (hidden, intermediate))]


def _linear(prefix: str, out: int, inp: int, bias: bool) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (out, inp))] + ([(f"{prefix}.bias", (out,))] if bias else [])


def _attention(config, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    h, a = config.hidden_size, config.num_attention_heads
    if hasattr(config, "kv_lora_rank"):  # multi-head latent attention
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        bias = config.attention_bias
        if config.q_lora_rank is None:
            shapes = _linear(f"{prefix}.q_proj", a * qk, h, False)
        else:
            shapes = (_linear(f"{prefix}.q_a_proj", config.q_lora_rank, h, bias)
                      + [(f"{prefix}.q_a_layernorm.weight", (config.q_lora_rank,))]
                      + _linear(f"{prefix}.q_b_proj", a * qk, config.q_lora_rank, False))
        return (shapes
                + _linear(f"{prefix}.kv_a_proj_with_mqa", config.kv_lora_rank + config.qk_rope_head_dim, h, bias)
                + [(f"{prefix}.kv_a_layernorm.weight", (config.kv_lora_rank,))]
                + _linear(f"{prefix}.kv_b_proj", a * (config.qk_nope_head_dim + config.v_head_dim),
                          config.kv_lora_rank, False)
                + _linear(f"{prefix}.o_proj", h, a * config.v_head_dim, bias))
    d, kv = config.head_dim, config.num_key_value_heads
    shapes = (_linear(f"{prefix}.q_proj", a * d, h, config.qkv_bias) + _linear(f"{prefix}.k_proj", kv * d, h,
                                                                                config.qkv_bias)
              + _linear(f"{prefix}.v_proj", kv * d, h, config.qkv_bias) + _linear(f"{prefix}.o_proj", h, a * d,
                                                                                  config.o_bias))
    if config.qk_norm:
        shapes += [(f"{prefix}.q_norm.weight", (d,)), (f"{prefix}.k_norm.weight", (d,))]
    return shapes


def _mlp(config, prefix: str, index: int) -> list[tuple[str, tuple[int, ...]]]:
    h = config.hidden_size
    if not moe_layer(config, index):
        return _swiglu(prefix, h, config.intermediate_size)
    e, i = config.n_routed_experts, config.moe_intermediate_size
    shapes = [(f"{prefix}.gate.weight", (e, h)), (f"{prefix}.experts.gate_proj", (e, i, h)),
              (f"{prefix}.experts.up_proj", (e, i, h)), (f"{prefix}.experts.down_proj", (e, h, i))]
    if config.n_shared_experts:
        shapes += _swiglu(f"{prefix}.shared_experts", h, i * config.n_shared_experts)
    return shapes


def layer_parameter_shapes(config, index: int) -> list[tuple[str, tuple[int, ...]]]:
    """Trainable parameters of decoder layer `index` (names as our Cells and Hugging Face checkpoints)."""
    prefix = f"model.layers.{index}"
    h = config.hidden_size
    return ([(f"{prefix}.input_layernorm.weight", (h,))] + _attention(config, f"{prefix}.self_attn")
            + [(f"{prefix}.post_attention_layernorm.weight", (h,))] + _mlp(config, f"{prefix}.mlp", index))


def parameter_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Every trainable parameter of the model (buffers such as the router's correction bias excluded)."""
    h, v = config.hidden_size, config.vocab_size
    shapes = [("model.embed_tokens.weight", (v, h))]
    for index in range(config.num_hidden_layers):
        shapes += layer_parameter_shapes(config, index)
    shapes.append(("model.norm.weight", (h,)))
    if not config.tie_word_embeddings:
        shapes.append(("lm_head.weight", (v, h)))
    return shapes


def count_parameters(config) -> tuple[int, int]:
    """(total, active per token): active counts num_experts_per_tok of the routed experts."""
    total = active = 0
    for name, shape in parameter_shapes(config):
        n = math.prod(shape)
        total += n
        active += n * config.num_experts_per_tok // config.n_routed_experts if ".experts." in name else n
    return total, active
