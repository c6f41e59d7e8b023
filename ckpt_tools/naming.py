"""Parameter names and shapes per model family, as data.

Each family is one table: a row per parameter with its Hugging Face name pattern, its name in each other naming,
its shape as expressions over the config fields (`mindspore_llm`'s typed config, whose fields are HF config names),
and when it exists. ``{layer}`` (and any other placeholder listed in ``Family.ranges``) stands for an index.

Adding a family = adding one table and listing it in ``FAMILIES``; the converter has no per-family code.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from mindspore_llm.checkpoint import layer_index
from mindspore_llm.common import ConfigError

NAMINGS = ("hf", "mindspore_llm", "mindformers")


@dataclass(frozen=True)
class Param:
    hf: str
    shape: tuple[str, ...]  # expressions over config fields and placeholders
    mindformers: str | None  # None: the family has no one-to-one mindformers name for it
    mindspore_llm: str | None = None  # None: same as the Hugging Face name (our Cells use HF names)
    when: str = "True"  # expression over config fields and placeholders: does this parameter exist?
    tied: bool = False  # dropped (not an error) when `when` is false: a tied head some checkpoints still carry

    def name(self, naming: str) -> str:
        return {"hf": self.hf, "mindspore_llm": self.mindspore_llm or self.hf, "mindformers": self.mindformers}[naming]


@dataclass(frozen=True)
class Family:
    architectures: tuple[str, ...]
    params: tuple[Param, ...]
    ranges: Mapping[str, str] = field(default_factory=lambda: {"layer": "num_hidden_layers"})
    # Why tensors of `model.layers.N` with N >= the layer range are skipped (with this notice) instead of rejected:
    # DeepSeek's multi-token-prediction modules, which the model does not implement. None: they are rejected.
    skip_extra_layers: str | None = None


def _linear(hf: str, mf: str, out: str, inp: str, bias: str | None = None) -> tuple[Param, ...]:
    rows = (Param(f"{hf}.weight", (out, inp), f"{mf}.weight"),)
    if bias:
        rows += (Param(f"{hf}.bias", (out,), f"{mf}.bias", when=bias),)
    return rows


_LAYER = "model.layers.{layer}"
_Q = "num_attention_heads * head_dim"
_KV = "num_key_value_heads * head_dim"

# Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen / Qwen3. mindformers names: the 1.x (research/qwen2_5) naming with
# qkv_concat=False. Its Megatron-style successor (mindformers 1.6+: `decoder.layers.N.self_attention.linear_qkv`,
# `mlp.linear_fc1` = gate|up fused, `embedding.word_embeddings`, `output_layer`) fuses tensors and is not mapped.
# mindformers 1.x has no Qwen3; the q/k norm names below follow its attention naming and are our choice.
QWEN = Family(
    architectures=("Qwen2ForCausalLM", "Qwen3ForCausalLM"),
    params=(
        Param("model.embed_tokens.weight", ("vocab_size", "hidden_size"), "model.tok_embeddings.embedding_weight"),
        *_linear(f"{_LAYER}.self_attn.q_proj", f"{_LAYER}.attention.wq", _Q, "hidden_size", "qkv_bias"),
        *_linear(f"{_LAYER}.self_attn.k_proj", f"{_LAYER}.attention.wk", _KV, "hidden_size", "qkv_bias"),
        *_linear(f"{_LAYER}.self_attn.v_proj", f"{_LAYER}.attention.wv", _KV, "hidden_size", "qkv_bias"),
        *_linear(f"{_LAYER}.self_attn.o_proj", f"{_LAYER}.attention.wo", "hidden_size", _Q, "o_bias"),
        Param(f"{_LAYER}.self_attn.q_norm.weight", ("head_dim",), f"{_LAYER}.attention.q_norm.weight", when="qk_norm"),
        Param(f"{_LAYER}.self_attn.k_norm.weight", ("head_dim",), f"{_LAYER}.attention.k_norm.weight", when="qk_norm"),
        *_linear(f"{_LAYER}.mlp.gate_proj", f"{_LAYER}.feed_forward.w1", "intermediate_size", "hidden_size"),
        *_linear(f"{_LAYER}.mlp.up_proj", f"{_LAYER}.feed_forward.w3", "intermediate_size", "hidden_size"),
        *_linear(f"{_LAYER}.mlp.down_proj", f"{_LAYER}.feed_forward.w2", "hidden_size", "intermediate_size"),
        Param(f"{_LAYER}.input_layernorm.weight", ("hidden_size",), f"{_LAYER}.attention_norm.weight"),
        Param(f"{_LAYER}.post_attention_layernorm.weight", ("hidden_size",), f"{_LAYER}.ffn_norm.weight"),
        Param("model.norm.weight", ("hidden_size",), "model.norm_out.weight"),
        Param("lm_head.weight", ("vocab_size", "hidden_size"), "lm_head.weight", when="not tie_word_embeddings",
              tied=True),
    ),
)

# DeepSeek-V3 / R1. Our Cells stack the routed experts but load the per-expert tensors below (the stacking is
# mindspore_llm.models.deepseek_v3's checkpoint layout), so our names are Hugging Face's. mindformers' DeepSeek
# checkpoints fuse gate|up, stack experts and permute the rope rows of q_b/kv_a: not one-to-one, not mapped.
_QK = "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim)"
_MOE = "layer >= first_k_dense_replace"
_DENSE = "layer < first_k_dense_replace"


def _ds(hf: str, shape: tuple[str, ...], when: str = "True") -> Param:
    return Param(hf, shape, None, when=when)


DEEPSEEK_V3 = Family(
    architectures=("DeepseekV3ForCausalLM",),
    params=(
        _ds("model.embed_tokens.weight", ("vocab_size", "hidden_size")),
        _ds(f"{_LAYER}.self_attn.q_proj.weight", (_QK, "hidden_size"), "q_lora_rank is None"),
        _ds(f"{_LAYER}.self_attn.q_a_proj.weight", ("q_lora_rank", "hidden_size"), "q_lora_rank is not None"),
        _ds(f"{_LAYER}.self_attn.q_a_proj.bias", ("q_lora_rank",), "q_lora_rank is not None and attention_bias"),
        _ds(f"{_LAYER}.self_attn.q_a_layernorm.weight", ("q_lora_rank",), "q_lora_rank is not None"),
        _ds(f"{_LAYER}.self_attn.q_b_proj.weight", (_QK, "q_lora_rank"), "q_lora_rank is not None"),
        _ds(f"{_LAYER}.self_attn.kv_a_proj_with_mqa.weight", ("kv_lora_rank + qk_rope_head_dim", "hidden_size")),
        _ds(f"{_LAYER}.self_attn.kv_a_proj_with_mqa.bias", ("kv_lora_rank + qk_rope_head_dim",), "attention_bias"),
        _ds(f"{_LAYER}.self_attn.kv_a_layernorm.weight", ("kv_lora_rank",)),
        _ds(f"{_LAYER}.self_attn.kv_b_proj.weight",
            ("num_attention_heads * (qk_nope_head_dim + v_head_dim)", "kv_lora_rank")),
        _ds(f"{_LAYER}.self_attn.o_proj.weight", ("hidden_size", "num_attention_heads * v_head_dim")),
        _ds(f"{_LAYER}.self_attn.o_proj.bias", ("hidden_size",), "attention_bias"),
        _ds(f"{_LAYER}.mlp.gate_proj.weight", ("intermediate_size", "hidden_size"), _DENSE),
        _ds(f"{_LAYER}.mlp.up_proj.weight", ("intermediate_size", "hidden_size"), _DENSE),
        _ds(f"{_LAYER}.mlp.down_proj.weight", ("hidden_size", "intermediate_size"), _DENSE),
        _ds(f"{_LAYER}.mlp.gate.weight", ("n_routed_experts", "hidden_size"), _MOE),
        _ds(f"{_LAYER}.mlp.gate.e_score_correction_bias", ("n_routed_experts",), _MOE),
        _ds(f"{_LAYER}.mlp.experts.{{expert}}.gate_proj.weight", ("moe_intermediate_size", "hidden_size"), _MOE),
        _ds(f"{_LAYER}.mlp.experts.{{expert}}.up_proj.weight", ("moe_intermediate_size", "hidden_size"), _MOE),
        _ds(f"{_LAYER}.mlp.experts.{{expert}}.down_proj.weight", ("hidden_size", "moe_intermediate_size"), _MOE),
        *(_ds(f"{_LAYER}.mlp.shared_experts.{proj}.weight", shape, f"{_MOE} and n_shared_experts > 0")
          for proj, shape in (("gate_proj", ("moe_intermediate_size * n_shared_experts", "hidden_size")),
                              ("up_proj", ("moe_intermediate_size * n_shared_experts", "hidden_size")),
                              ("down_proj", ("hidden_size", "moe_intermediate_size * n_shared_experts")))),
        _ds(f"{_LAYER}.input_layernorm.weight", ("hidden_size",)),
        _ds(f"{_LAYER}.post_attention_layernorm.weight", ("hidden_size",)),
        _ds("model.norm.weight", ("hidden_size",)),
        Param("lm_head.weight", ("vocab_size", "hidden_size"), None, when="not tie_word_embeddings", tied=True),
    ),
    ranges={"layer": "num_hidden_layers", "expert": "n_routed_experts"},
    skip_extra_layers="multi-token-prediction modules are not implemented; the main model is complete without them",
)

FAMILIES = (QWEN, DEEPSEEK_V3)
ARCHITECTURES = {architecture: family for family in FAMILIES for architecture in family.architectures}


def _evaluate(expression: str, env: Mapping[str, Any]):
    return eval(expression, {"__builtins__": {}}, dict(env))  # table expressions only, never user input


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>\\d+)" for i, part in enumerate(parts))
    return re.compile(regex + r"\Z")


class NameMap:
    """A family's table resolved against one config: every concrete parameter, its shape and its names."""

    def __init__(self, family: Family, config, source: str):
        self.family = family
        self.source = source
        self.env = {**vars(config)}
        self.ranges = {key: int(_evaluate(expr, self.env)) for key, expr in family.ranges.items()}
        self.patterns = {naming: [(_pattern(p.name(naming)), p) for p in family.params if p.name(naming)]
                         for naming in NAMINGS}

    def expected(self) -> dict[str, tuple[int, ...]]:
        """HF name -> shape of every parameter the config calls for."""
        out = {}
        for param in self.family.params:
            keys = sorted(set(re.findall(r"\{(\w+)\}", param.hf)))
            for values in itertools.product(*(range(self.ranges[k]) for k in keys)):
                env = {**self.env, **dict(zip(keys, values))}
                if _evaluate(param.when, env):
                    out[param.hf.format(**dict(zip(keys, values)))] = tuple(int(_evaluate(e, env)) for e in param.shape)
        return out

    def match(self, name: str, naming: str) -> tuple[Param, dict[str, str]] | None:
        for pattern, param in self.patterns[naming]:
            found = pattern.match(name)
            if found:
                return param, found.groupdict()
        return None

    def detect(self, names) -> str:
        """The naming that covers the most of `names` (Hugging Face on a tie, as our Cells use its names)."""
        return max(NAMINGS, key=lambda naming: sum(self.match(n, naming) is not None for n in names))

    def rename(self, name: str, source: str, target: str) -> tuple[str, bool] | None:
        """(`name` in naming `target`, whether the config calls for it), or None if the family has no such name."""
        found = self.match(name, source)
        if found is None:
            return None
        param, values = found
        if param.name(target) is None:
            raise ConfigError(f"{self.source}: {name} has no {target} name ({'/'.join(self.family.architectures)} "
                              f"checkpoints in that naming fuse or permute it)")
        env = {**self.env, **{k: int(v) for k, v in values.items()}}
        return param.name(target).format(**values), bool(_evaluate(param.when, env))

    def skipped(self, name: str) -> bool:
        """Whether `name` belongs to a layer past the model's layers that the family skips (see Family)."""
        layer = layer_index(name)
        return self.family.skip_extra_layers is not None and layer is not None and layer >= self.ranges["layer"]

    def is_tied(self, name: str, naming: str) -> bool:
        found = self.match(name, naming)
        return found is not None and found[0].tied


def name_map(hf_config: Mapping[str, Any], source: str) -> NameMap:
    """The NameMap for a Hugging Face config dict; the family comes from its ``architectures``."""
    from mindspore_llm.models.auto import config_from_hf

    architecture = (hf_config.get("architectures") or [None])[0]
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"{source}: architectures {hf_config.get('architectures')!r} has no checkpoint name table; "
                          f"supported: {', '.join(sorted(ARCHITECTURES))}")
    return NameMap(ARCHITECTURES[architecture], config_from_hf(hf_config, source), source)
