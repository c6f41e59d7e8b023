"""Checkpoint namings: where each parameter of a model family sits in the checkpoints of mindspore_llm (Hugging
Face's names), of mindformers 1.x (``research/qwen2_5``, with or without ``qkv_concat``) and of mindformers'
Megatron-style ("mcore") models, as data.

A family is one table: a row per Hugging Face parameter with its shape (expressions over the typed config's
fields, which are HF config names) and its one-to-one name in each naming, plus the fused tensors of each naming
(``Fused``): one stored tensor made of several Hugging Face tensors. Every fused layout mindformers uses is one rule,
*grouped rows*: each part is cut into ``groups`` equal row blocks, stored group by group (group 0 of every part,
then group 1, ...). One group concatenates the parts; ``num_key_value_heads`` groups lay q, k and v out per KV
group (Megatron's layout); as many groups as rows interleaves gate and up row by row. Megatron's grouped-GEMM
experts (``per_expert``) store each expert's parts, concatenated, transposed, one expert after the other.

Which mindformers file and version each layout was read from is in docs/checkpoints.md.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from mindspore_llm.checkpoint import (NON_PARAMETER_SUFFIXES, TRAINING_STATE_PREFIXES,
                                      bf16_bits_to_float32, iter_tensors, layer_index, open_tensor_file,
                                      weight_files)
from mindspore_llm.common import CheckpointError, ConfigError

log = logging.getLogger("mindspore_llm")

OURS = "mindspore_llm"  # Hugging Face's names: our Cells load them as they are
MINDFORMERS = "mindformers"  # mindformers 1.x (research/qwen2_5)
MCORE = "mindformers-mcore"  # mindformers' Megatron-style models (parallel_core), trainable from 1.7
NAMINGS = (OURS, MINDFORMERS, MCORE)
# Entries of a mindformers training checkpoint that are not weights: AdamW moments of each weight, the step and
# its loss-scale and resume bookkeeping (mindformers/core/optim/adamw.py, wrapper/wrapper.py, callback.py).
MINDFORMERS_MOMENTS = {"adam_m.": "optimizer.exp_avg.", "adam_v.": "optimizer.exp_avg_sq."}
MINDFORMERS_STATE_PREFIXES = (*MINDFORMERS_MOMENTS, "accu_grads.")
MINDFORMERS_STATE_NAMES = ("global_step", "scale_sense", "current_iterator_step", "last_overflow_iterator_step",
                           "epoch_num", "step_num", "loss_scale", "global_batch_size", "learning_rate",
                           # its adaptive loss scale (wrapper/adaptive_loss_scale.py)
                           "scale_window", "list_index", "scale_window_up_count", "scale_window_down_count")
FLOAT_TAGS = ("F64", "F32", "F16", "BF16", "F8_E4M3")
CHUNK_ELEMENTS = 16 << 20  # per slab produced (64 MB of float32): bounds memory whatever the tensor's size


def is_training_state(name: str) -> bool:
    """An optimizer, loss-scale or bookkeeping entry of a training checkpoint (ours or mindformers')."""
    return name.startswith(TRAINING_STATE_PREFIXES + MINDFORMERS_STATE_PREFIXES) or name in MINDFORMERS_STATE_NAMES


@dataclass(frozen=True)
class LayoutOptions:
    """How fused tensors are laid out where the names do not tell. ``qkv_concat`` and ``mla_qkv_concat`` show in
    the names (detected when reading; chosen when writing); the two mcore switches do not: mindformers' defaults
    (its mf_model_config.py) unless set, as in the mindformers YAML the checkpoint was trained with."""

    qkv_concat: bool = False  # 1.x: attention.w_qkv and feed_forward.w_gate_hidden
    mla_qkv_concat: bool = False  # mcore DeepSeek-V3: self_attention.linear_qkv = q down | kv down (its default: on)
    use_contiguous_weight_layout_attention: bool = False  # mcore linear_qkv: all q, all k, all v (off: per KV group)
    use_interleaved_weight_layout_mlp: bool = True  # mcore linear_fc1: gate and up rows interleaved (off: gate | up)

    VISIBLE = ("qkv_concat", "mla_qkv_concat")


@dataclass(frozen=True)
class Param:
    hf: str
    shape: tuple[str, ...]  # expressions over config fields and placeholders
    mindformers: str | None = None  # its name in mindformers 1.x (None: none, or only fused)
    mcore: str | None = None  # its name in mindformers mcore (None: none, or only fused)
    when: str = "True"  # expression over config fields and placeholders: does this parameter exist?
    tied: bool = False  # dropped (not an error) when `when` is false: a tied head some checkpoints still carry
    # kept in float32 whatever --dtype: DeepSeek's checkpoints and mindformers' converter store it so
    fp32: bool = False

    def name(self, naming: str) -> str | None:
        return {OURS: self.hf, MINDFORMERS: self.mindformers, MCORE: self.mcore}[naming]


@dataclass(frozen=True)
class Fused:
    """One stored tensor of `naming` made of the Hugging Face tensors `parts` (grouped rows, see the module
    docstring); with one part and one group it is a rename that takes precedence over the table's column."""
    naming: str
    name: str
    parts: tuple[str, ...]
    groups: str = "1"  # expression over config fields, options and placeholders
    per_expert: bool = False  # parts carry {expert}: Megatron's grouped-GEMM weight, (experts * columns, rows)
    when: str = "True"


@dataclass(frozen=True)
class Family:
    architectures: tuple[str, ...]
    params: tuple[Param, ...]
    fused: tuple[Fused, ...] = ()
    # naming -> the architectures mindformers has it for, and what to say to someone asking for another
    namings: Mapping[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)
    ranges: Mapping[str, str] = field(default_factory=lambda: {"layer": "num_hidden_layers"})
    # Why tensors past the model's layers (HF: model.layers.N, N >= the layer range; mcore: `mcore_skipped`) are
    # skipped with this notice instead of rejected: DeepSeek's multi-token-prediction modules, which the model does
    # not implement. None: they are rejected.
    skip_extra_layers: str | None = None
    mcore_skipped: str | None = None  # regex of mcore names skipped for the same reason


def _linear(hf: str, mf: str | None, mcore: str | None, out: str, inp: str, bias: str | None = None):
    rows = (Param(f"{hf}.weight", (out, inp), mf and f"{mf}.weight", mcore and f"{mcore}.weight"),)
    if bias:
        rows += (Param(f"{hf}.bias", (out,), mf and f"{mf}.bias", mcore and f"{mcore}.bias", when=bias),)
    return rows


_LAYER = "model.layers.{layer}"
_MF = f"{_LAYER}.attention"  # mindformers 1.x attention
_MC = "decoder.layers.{layer}"  # mindformers mcore layer
_Q = "num_attention_heads * head_dim"
_KV = "num_key_value_heads * head_dim"
# mcore linear_qkv: per KV group its query heads, then its key and value head (Megatron), or contiguous q | k | v
_QKV_GROUPS = "1 if use_contiguous_weight_layout_attention else num_key_value_heads"


def _qwen_fused(naming: str, prefix: str, qkv: str, fc1: str, when: str, ffn_groups: str) -> tuple[Fused, ...]:
    qkv_groups = "num_key_value_heads" if naming == MINDFORMERS else _QKV_GROUPS
    attention = tuple(f"{_LAYER}.self_attn.{p}_proj" for p in "qkv")
    return (Fused(naming, f"{prefix}.{qkv}.weight", tuple(f"{p}.weight" for p in attention), qkv_groups, when=when),
            Fused(naming, f"{prefix}.{qkv}.bias", tuple(f"{p}.bias" for p in attention), qkv_groups,
                  when=f"({when}) and qkv_bias"),
            Fused(naming, fc1, (f"{_LAYER}.mlp.gate_proj.weight", f"{_LAYER}.mlp.up_proj.weight"), ffn_groups,
                  when=when))


# Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen / Qwen3. mindformers 1.x has Qwen2/2.5 only (research/qwen2_5), mcore
# Qwen3 only (its mcore Qwen2 is inference-only and reads Hugging Face files).
QWEN = Family(
    architectures=("Qwen2ForCausalLM", "Qwen3ForCausalLM"),
    params=(
        Param("model.embed_tokens.weight", ("vocab_size", "hidden_size"), "model.tok_embeddings.embedding_weight",
              "embedding.word_embeddings.weight"),
        *_linear(f"{_LAYER}.self_attn.q_proj", f"{_MF}.wq", None, _Q, "hidden_size", "qkv_bias"),
        *_linear(f"{_LAYER}.self_attn.k_proj", f"{_MF}.wk", None, _KV, "hidden_size", "qkv_bias"),
        *_linear(f"{_LAYER}.self_attn.v_proj", f"{_MF}.wv", None, _KV, "hidden_size", "qkv_bias"),
        *_linear(f"{_LAYER}.self_attn.o_proj", f"{_MF}.wo", f"{_MC}.self_attention.linear_proj", "hidden_size", _Q,
                 "o_bias"),
        Param(f"{_LAYER}.self_attn.q_norm.weight", ("head_dim",), None, f"{_MC}.self_attention.q_layernorm.weight",
              when="qk_norm"),
        Param(f"{_LAYER}.self_attn.k_norm.weight", ("head_dim",), None, f"{_MC}.self_attention.k_layernorm.weight",
              when="qk_norm"),
        *_linear(f"{_LAYER}.mlp.gate_proj", f"{_LAYER}.feed_forward.w1", None, "intermediate_size", "hidden_size"),
        *_linear(f"{_LAYER}.mlp.up_proj", f"{_LAYER}.feed_forward.w3", None, "intermediate_size", "hidden_size"),
        *_linear(f"{_LAYER}.mlp.down_proj", f"{_LAYER}.feed_forward.w2", f"{_MC}.mlp.linear_fc2", "hidden_size",
                 "intermediate_size"),
        Param(f"{_LAYER}.input_layernorm.weight", ("hidden_size",), f"{_LAYER}.attention_norm.weight",
              f"{_MC}.input_layernorm.weight"),
        Param(f"{_LAYER}.post_attention_layernorm.weight", ("hidden_size",), f"{_LAYER}.ffn_norm.weight",
              f"{_MC}.pre_mlp_layernorm.weight"),
        Param("model.norm.weight", ("hidden_size",), "model.norm_out.weight", "decoder.final_layernorm.weight"),
        Param("lm_head.weight", ("vocab_size", "hidden_size"), "lm_head.weight", "output_layer.weight",
              when="not tie_word_embeddings", tied=True),
    ),
    fused=(
        # 1.x qkv_concat (research/qwen2_5/convert_weight.py via mindformers/utils/convert_utils.py):
        # w_qkv per KV group, w_gate_hidden interleaved; without it the 1.x names are one-to-one
        *_qwen_fused(MINDFORMERS, _MF, "w_qkv", f"{_LAYER}.feed_forward.w_gate_hidden.weight", "qkv_concat",
                     "intermediate_size"),
        # mcore Qwen3 (TrainingQwen3ForCausalLM.convert_weight_dict): linear_qkv and linear_fc1 always fused
        *_qwen_fused(MCORE, f"{_MC}.self_attention", "linear_qkv", f"{_MC}.mlp.linear_fc1.weight", "True",
                     "intermediate_size if use_interleaved_weight_layout_mlp else 1"),
    ),
    namings={
        MINDFORMERS: (("Qwen2ForCausalLM",), "mindformers has no 1.x Qwen3: use the mindformers-mcore naming"),
        MCORE: (("Qwen3ForCausalLM",), "mindformers has no mcore Qwen2/2.5 checkpoints (its mcore Qwen2 is "
                                       "inference-only and reads Hugging Face files): use the mindformers 1.x naming"),
    },
)

# DeepSeek-V3 / R1. Our Cells stack the routed experts but load the per-expert tensors below (the stacking is
# mindspore_llm.models.deepseek_v3's checkpoint layout), so our names are Hugging Face's. mcore names as
# toolkit/weight_convert/deepseekv3/convert_deepseekv3_hf_weight.py writes them (its MLA with mla_qkv_concat off,
# no rope permutation), and mindformers' own mla_qkv_concat layout (MLASelfAttentionConcatenated) when detected.
_QK = "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim)"
_MOE = "layer >= first_k_dense_replace"
_DENSE = "layer < first_k_dense_replace"
_SHARED = "moe_intermediate_size * n_shared_experts"
_ATT = f"{_MC}.self_attention"
_FC1_GROUPS = "{rows} if use_interleaved_weight_layout_mlp else 1"


def _ds(hf: str, shape: tuple[str, ...], mcore: str, when: str = "True", fp32: bool = False) -> Param:
    return Param(hf, shape, None, mcore, when=when, fp32=fp32)


def _mla_concat(suffix: str, when: str) -> tuple[Fused, ...]:
    """mla_qkv_concat: linear_qkv = (q_a_proj or q_proj) | kv_a_proj_with_mqa; linear_qb / linear_kvb /
    k_layernorm for the up projections and the kv norm."""
    kv = f"{_LAYER}.self_attn.kv_a_proj_with_mqa.{suffix}"
    return (Fused(MCORE, f"{_ATT}.linear_qkv.{suffix}", (f"{_LAYER}.self_attn.q_a_proj.{suffix}", kv),
                  when=f"mla_qkv_concat and q_lora_rank is not None and {when}"),
            Fused(MCORE, f"{_ATT}.linear_qkv.{suffix}", (f"{_LAYER}.self_attn.q_proj.{suffix}", kv),
                  when=f"mla_qkv_concat and q_lora_rank is None and {when}"))


DEEPSEEK_V3 = Family(
    architectures=("DeepseekV3ForCausalLM",),
    params=(
        _ds("model.embed_tokens.weight", ("vocab_size", "hidden_size"), "embedding.word_embeddings.weight"),
        _ds(f"{_LAYER}.self_attn.q_proj.weight", (_QK, "hidden_size"), f"{_ATT}.linear_q_proj.weight",
            "q_lora_rank is None"),
        _ds(f"{_LAYER}.self_attn.q_a_proj.weight", ("q_lora_rank", "hidden_size"), f"{_ATT}.linear_q_down_proj.weight",
            "q_lora_rank is not None"),
        _ds(f"{_LAYER}.self_attn.q_a_proj.bias", ("q_lora_rank",), f"{_ATT}.linear_q_down_proj.bias",
            "q_lora_rank is not None and attention_bias"),
        _ds(f"{_LAYER}.self_attn.q_a_layernorm.weight", ("q_lora_rank",), f"{_ATT}.q_layernorm.weight",
            "q_lora_rank is not None"),
        _ds(f"{_LAYER}.self_attn.q_b_proj.weight", (_QK, "q_lora_rank"), f"{_ATT}.linear_q_up_proj.weight",
            "q_lora_rank is not None"),
        _ds(f"{_LAYER}.self_attn.kv_a_proj_with_mqa.weight", ("kv_lora_rank + qk_rope_head_dim", "hidden_size"),
            f"{_ATT}.linear_kv_down_proj.weight"),
        _ds(f"{_LAYER}.self_attn.kv_a_proj_with_mqa.bias", ("kv_lora_rank + qk_rope_head_dim",),
            f"{_ATT}.linear_kv_down_proj.bias", "attention_bias"),
        _ds(f"{_LAYER}.self_attn.kv_a_layernorm.weight", ("kv_lora_rank",), f"{_ATT}.kv_layernorm.weight"),
        _ds(f"{_LAYER}.self_attn.kv_b_proj.weight",
            ("num_attention_heads * (qk_nope_head_dim + v_head_dim)", "kv_lora_rank"),
            f"{_ATT}.linear_kv_up_proj.weight"),
        _ds(f"{_LAYER}.self_attn.o_proj.weight", ("hidden_size", "num_attention_heads * v_head_dim"),
            f"{_ATT}.linear_proj.weight"),
        _ds(f"{_LAYER}.self_attn.o_proj.bias", ("hidden_size",), f"{_ATT}.linear_proj.bias", "attention_bias"),
        _ds(f"{_LAYER}.mlp.gate_proj.weight", ("intermediate_size", "hidden_size"), None, _DENSE),
        _ds(f"{_LAYER}.mlp.up_proj.weight", ("intermediate_size", "hidden_size"), None, _DENSE),
        _ds(f"{_LAYER}.mlp.down_proj.weight", ("hidden_size", "intermediate_size"), f"{_MC}.mlp.linear_fc2.weight",
            _DENSE),
        _ds(f"{_LAYER}.mlp.gate.weight", ("n_routed_experts", "hidden_size"), f"{_MC}.mlp.router.weight", _MOE),
        _ds(f"{_LAYER}.mlp.gate.e_score_correction_bias", ("n_routed_experts",), f"{_MC}.mlp.router.expert_bias",
            _MOE, fp32=True),
        *(_ds(f"{_LAYER}.mlp.experts.{{expert}}.{proj}.weight", shape, None, _MOE)
          for proj, shape in (("gate_proj", ("moe_intermediate_size", "hidden_size")),
                              ("up_proj", ("moe_intermediate_size", "hidden_size")),
                              ("down_proj", ("hidden_size", "moe_intermediate_size")))),
        *(_ds(f"{_LAYER}.mlp.shared_experts.{proj}.weight", shape, mcore, f"{_MOE} and n_shared_experts > 0")
          for proj, shape, mcore in (("gate_proj", (_SHARED, "hidden_size"), None),
                                     ("up_proj", (_SHARED, "hidden_size"), None),
                                     ("down_proj", ("hidden_size", _SHARED),
                                      f"{_MC}.mlp.shared_experts.linear_fc2.weight"))),
        _ds(f"{_LAYER}.input_layernorm.weight", ("hidden_size",), f"{_MC}.input_layernorm.weight"),
        _ds(f"{_LAYER}.post_attention_layernorm.weight", ("hidden_size",), f"{_MC}.pre_mlp_layernorm.weight"),
        _ds("model.norm.weight", ("hidden_size",), "decoder.final_layernorm.weight"),
        Param("lm_head.weight", ("vocab_size", "hidden_size"), None, "output_layer.weight",
              when="not tie_word_embeddings", tied=True),
    ),
    fused=(
        Fused(MCORE, f"{_MC}.mlp.linear_fc1.weight", (f"{_LAYER}.mlp.gate_proj.weight", f"{_LAYER}.mlp.up_proj.weight"),
              _FC1_GROUPS.format(rows="intermediate_size"), when=_DENSE),
        Fused(MCORE, f"{_MC}.mlp.shared_experts.linear_fc1.weight",
              (f"{_LAYER}.mlp.shared_experts.gate_proj.weight", f"{_LAYER}.mlp.shared_experts.up_proj.weight"),
              _FC1_GROUPS.format(rows=_SHARED), when=f"{_MOE} and n_shared_experts > 0"),
        # routed experts: weight1 row e*hidden+h = expert e's [gate; up] column h; weight2 = each down transposed
        Fused(MCORE, f"{_MC}.mlp.experts.weight1", (f"{_LAYER}.mlp.experts.{{expert}}.gate_proj.weight",
                                                    f"{_LAYER}.mlp.experts.{{expert}}.up_proj.weight"),
              per_expert=True, when=_MOE),
        Fused(MCORE, f"{_MC}.mlp.experts.weight2", (f"{_LAYER}.mlp.experts.{{expert}}.down_proj.weight",),
              per_expert=True, when=_MOE),
        *_mla_concat("weight", "True"),
        *_mla_concat("bias", "attention_bias"),
        Fused(MCORE, f"{_ATT}.linear_qb.weight", (f"{_LAYER}.self_attn.q_b_proj.weight",),
              when="mla_qkv_concat and q_lora_rank is not None"),
        Fused(MCORE, f"{_ATT}.linear_kvb.weight", (f"{_LAYER}.self_attn.kv_b_proj.weight",), when="mla_qkv_concat"),
        Fused(MCORE, f"{_ATT}.k_layernorm.weight", (f"{_LAYER}.self_attn.kv_a_layernorm.weight",),
              when="mla_qkv_concat"),
    ),
    namings={MINDFORMERS: ((), "mindformers 1.x has no DeepSeek-V3 checkpoints: use the mindformers-mcore naming"),
             MCORE: (("DeepseekV3ForCausalLM",), "")},
    ranges={"layer": "num_hidden_layers", "expert": "n_routed_experts"},
    skip_extra_layers="multi-token-prediction modules are not implemented; the main model is complete without them",
    # its converter also writes mtp.output_layer.weight when there are no MTP layers (its has_mtp_layers test is
    # inverted): a copy of the head, left out like the MTP layers
    mcore_skipped=r"mtp\.",
)

FAMILIES = (QWEN, DEEPSEEK_V3)
ARCHITECTURES = {architecture: family for family in FAMILIES for architecture in family.architectures}


def _evaluate(expression: str, env: Mapping[str, Any]):
    return eval(expression, {"__builtins__": {}}, dict(env))  # table expressions only, never user input


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>\\d+)" for i, part in enumerate(parts))
    return re.compile(regex + r"\Z")


def _placeholders(template: str) -> list[str]:
    return sorted(set(re.findall(r"\{(\w+)\}", template)))


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a checkpoint stores it: the Hugging Face tensors it holds (`parts`; per expert: expert-major)
    and how (see the module docstring)."""
    name: str
    parts: tuple[str, ...]
    part_shapes: tuple[tuple[int, ...], ...]
    groups: int = 1
    experts: int = 0  # > 0: Megatron grouped-GEMM weight of this many experts
    fp32: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        if self.experts:
            per = len(self.parts) // self.experts
            return (self.experts * self.part_shapes[0][1], sum(s[0] for s in self.part_shapes[:per]))
        return (sum(s[0] for s in self.part_shapes), *self.part_shapes[0][1:])

    def _rows_per_group(self) -> list[int]:
        return [s[0] // self.groups for s in self.part_shapes]

    def slabs(self, read: Callable[[str, int, int], tuple[np.ndarray, str]]) -> Iterator[tuple[np.ndarray, str]]:
        """This tensor's elements in stored order, as (array, dtype tag) slabs of about CHUNK_ELEMENTS, from
        ``read(hf_name, start_row, stop_row)`` of its parts."""
        if self.experts:
            per = len(self.parts) // self.experts
            for e in range(self.experts):
                pieces = [read(p, 0, s[0]) for p, s in zip(self.parts[e * per:(e + 1) * per],
                                                           self.part_shapes[e * per:(e + 1) * per])]
                array, tag = _concatenate(pieces, axis=0)
                yield np.ascontiguousarray(array.T), tag
            return
        rows = self._rows_per_group()
        row_elements = int(np.prod(self.part_shapes[0][1:], dtype=np.int64))
        group_elements = sum(rows) * row_elements
        if group_elements > CHUNK_ELEMENTS:  # one group at a time, each part's rows of it in chunks
            step = max(CHUNK_ELEMENTS // row_elements, 1)
            for g in range(self.groups):
                for part, r in zip(self.parts, rows):
                    for start in range(g * r, (g + 1) * r, step):
                        yield read(part, start, min(start + step, (g + 1) * r))
            return
        batch = max(CHUNK_ELEMENTS // group_elements, 1)
        rest = self.part_shapes[0][1:]
        for g0 in range(0, self.groups, batch):
            g1 = min(g0 + batch, self.groups)
            pieces = [(array.reshape(g1 - g0, r, *rest), tag)
                      for (array, tag), r in ((read(p, g0 * r, g1 * r), r) for p, r in zip(self.parts, rows))]
            array, tag = _concatenate(pieces, axis=1)
            yield array.reshape(-1, *rest), tag

    def part_rows(self, index: int, start: int, stop: int,
                  read: Callable[[int, int], np.ndarray]) -> np.ndarray:
        """Rows start..stop-1 of part `index`, from ``read(start_row, stop_row)`` of this stored tensor."""
        if self.experts:
            per = len(self.parts) // self.experts
            expert, slot = divmod(index, per)
            columns = self.part_shapes[index][1]
            offset = sum(s[0] for s in self.part_shapes[expert * per:expert * per + slot])
            block = read(expert * columns, (expert + 1) * columns)
            return np.ascontiguousarray(block[:, offset + start:offset + stop].T)
        rows = self._rows_per_group()
        if len(self.parts) == 1:
            return read(start, stop)
        r, group_rows = rows[index], sum(rows)
        offset = sum(rows[:index])
        g0, g1 = start // r, -(-stop // r)
        rest = self.part_shapes[index][1:]
        block = read(g0 * group_rows, g1 * group_rows).reshape(g1 - g0, group_rows, *rest)
        return np.ascontiguousarray(block[:, offset:offset + r].reshape(-1, *rest)[start - g0 * r:stop - g0 * r])


def _concatenate(pieces: list[tuple[np.ndarray, str]], axis: int) -> tuple[np.ndarray, str]:
    tags = {tag for _, tag in pieces}
    if len(tags) == 1:
        return np.concatenate([a for a, _ in pieces], axis=axis), tags.pop()
    return np.concatenate([to_float32(a, tag) for a, tag in pieces], axis=axis), "F32"


def to_float32(raw: np.ndarray, tag: str) -> np.ndarray:
    if tag == "BF16":
        return bf16_bits_to_float32(raw)
    if tag == "F8_E4M3":
        raise CheckpointError("FP8 weights need their block scales: convert them with `msllm-ckpt hf2ms` first")
    return np.asarray(raw, dtype=np.float32)


class TensorLayout:
    """A family's tensors for one config, in one naming with `options`: stored name -> StoredTensor."""

    def __init__(self, family: Family, config, naming: str, options: LayoutOptions, source: str):
        self.family, self.naming, self.options, self.source = family, naming, options, source
        env = {**vars(config), **{f.name: getattr(options, f.name) for f in fields(options)}}
        self.ranges = {key: int(_evaluate(expr, env)) for key, expr in family.ranges.items()}
        expected = {}  # HF name -> (shape, param, placeholder values)
        for param in family.params:
            keys = _placeholders(param.hf)
            for values in itertools.product(*(range(self.ranges[k]) for k in keys)):
                local = {**env, **dict(zip(keys, values))}
                if _evaluate(param.when, local):
                    shape = tuple(int(_evaluate(e, local)) for e in param.shape)
                    expected[param.hf.format(**dict(zip(keys, values)))] = (shape, param, dict(zip(keys, values)))
        self.hf_shapes = {name: shape for name, (shape, _, _) in expected.items()}
        order = {name: i for i, name in enumerate(expected)}
        stored: dict[str, StoredTensor] = {}
        claimed: set[str] = set()
        for fused in (f for f in family.fused if f.naming == naming):
            keys = [k for k in _placeholders(fused.name)]
            for values in itertools.product(*(range(self.ranges[k]) for k in keys)):
                local = {**env, **dict(zip(keys, values))}
                if not _evaluate(fused.when, local):
                    continue
                experts = self.ranges["expert"] if fused.per_expert else 0
                parts = tuple(p.format(**dict(zip(keys, values)), expert=e)
                              for e in range(max(experts, 1)) for p in fused.parts)
                missing = [p for p in parts if p not in expected]
                if missing:
                    raise ConfigError(f"{source}: {naming} tensor {fused.name} needs {missing[0]}, which this "
                                      f"config does not have")  # a table error, not a user's
                shapes = tuple(self.hf_shapes[p] for p in parts)
                groups = int(_evaluate(fused.groups, local))
                stored[fused.name.format(**dict(zip(keys, values)))] = StoredTensor(
                    fused.name.format(**dict(zip(keys, values))), parts, shapes, groups, experts,
                    any(expected[p][1].fp32 for p in parts))
                claimed.update(parts)
        self.unnamed = []  # HF tensors this naming has no place for (the family's table says so)
        for name, (shape, param, values) in expected.items():
            if name in claimed:
                continue
            template = param.name(naming)
            if template is None:
                self.unnamed.append(name)
                continue
            stored_name = template.format(**values)
            stored[stored_name] = StoredTensor(stored_name, (name,), (shape,), fp32=param.fp32)
        self.tensors = dict(sorted(stored.items(), key=lambda item: order[item[1].parts[0]]))
        self.where = {part: (t.name, i) for t in self.tensors.values() for i, part in enumerate(t.parts)}
        self.patterns = [(_pattern(p.name(naming)), p) for p in family.params if p.name(naming)]
        self.patterns += [(_pattern(f.name), None) for f in family.fused if f.naming == naming]

    def describe(self) -> str:
        if self.naming == MINDFORMERS:
            return f"{MINDFORMERS} (1.x{', qkv_concat' if self.options.qkv_concat else ''})"
        if self.naming == MCORE and self.family is DEEPSEEK_V3:
            return f"{MCORE}{' (mla_qkv_concat)' if self.options.mla_qkv_concat else ''}"
        return self.naming

    def tied(self, name: str) -> bool:
        """A tied head some checkpoints still carry (dropped: the embedding is the head)."""
        return any(param is not None and param.tied and pattern.match(name) for pattern, param in self.patterns)

    def skipped(self, name: str) -> bool:
        """A tensor of the modules the family skips (see Family): multi-token prediction."""
        if self.family.skip_extra_layers is None:
            return False
        if self.naming == MCORE:
            return re.match(self.family.mcore_skipped, name) is not None
        layer = layer_index(name)
        return layer is not None and layer >= self.ranges["layer"]

    def known(self, name: str) -> bool:
        """Whether `name` is a name of this family in this naming (for some config), for error messages."""
        return any(pattern.match(name) for pattern, _ in self.patterns)

    def explains(self, name: str) -> bool:
        return name in self.tensors or self.tied(name) or self.skipped(name)


def family_of(config, source: str) -> Family:
    if config.architecture not in ARCHITECTURES:
        raise ConfigError(f"{source}: architectures [{config.architecture!r}] has no checkpoint name table; "
                          f"supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[config.architecture]


def tensor_layout(config, naming: str, options: LayoutOptions = LayoutOptions(),
                  source: str = "config.json") -> TensorLayout:
    """How `config`'s model is stored in `naming` (for writing: refused where mindformers has no such layout)."""
    family = family_of(config, source)
    if naming != OURS:
        architectures, hint = family.namings.get(naming, ((), ""))
        if config.architecture not in architectures:
            raise ConfigError(f"{source}: {config.architecture} has no {naming} layout; {hint}")
    if options.qkv_concat and naming != MINDFORMERS:
        raise ConfigError(f"qkv_concat is a mindformers 1.x layout; {naming} does not have it")
    if options.mla_qkv_concat and not (naming == MCORE and family is DEEPSEEK_V3):
        raise ConfigError("mla_qkv_concat is a mindformers-mcore DeepSeek-V3 layout")
    result = TensorLayout(family, config, naming, options, source)
    if result.unnamed:
        raise ConfigError(f"{source}: {result.unnamed[0]} has no {naming} name")
    return result


def candidates(config, options: LayoutOptions, source: str) -> list[TensorLayout]:
    """Every layout a checkpoint of `config`'s model may be in: ours, then mindformers' with each combination of
    the options the names show."""
    out = [TensorLayout(family_of(config, source), config, OURS, LayoutOptions(), source)]
    for naming in (MINDFORMERS, MCORE):
        for visible in itertools.product((False, True), repeat=len(LayoutOptions.VISIBLE)):
            try:
                visible_options = dataclasses.replace(options, **dict(zip(LayoutOptions.VISIBLE, visible)))
                out.append(tensor_layout(config, naming, visible_options, source))
            except ConfigError:
                continue
    return out


# --------------------------------------------------------------------------------------------------------------
# Reading: a checkpoint in any naming, as Hugging Face tensors.

class StoredRows:
    """Rows of one stored tensor of a file (the default reader; ckpt_tools adds FP8 dequantization)."""

    def __init__(self, file, name: str):
        self.file, self.name = file, name

    @property
    def dtype(self) -> str:
        return self.file.dtype(self.name)

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.file.rows(self.name, start, stop)


class HFTensors:
    """The Hugging Face tensors of a `layout` whose stored tensors are read from `files` (stored name -> file),
    part by part, so memory stays at one slab."""

    def __init__(self, layout: TensorLayout, files: Mapping[str, Any], reader: Callable[[Any, str], Any] = StoredRows,
                 prefix: str = ""):
        self.layout, self.files = layout, files
        self.readers = {name: reader(files[name], prefix + name) for name in files}

    def names(self) -> list[str]:
        """Hugging Face names, in the stored order."""
        return [part for name, stored in self.layout.tensors.items() if name in self.files for part in stored.parts]

    def stored(self, name: str) -> StoredTensor:
        return self.layout.tensors[self.layout.where[name][0]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.layout.hf_shapes[name]

    def dtype(self, name: str) -> str:
        """The dtype of the stored tensor holding `name` as it is read (FP8 dequantized by ckpt_tools' reader)."""
        return self.readers[self.layout.where[name][0]].dtype

    def path(self, name: str) -> Path:
        return self.files[self.layout.where[name][0]].path

    def rows(self, name: str, start: int, stop: int) -> tuple[np.ndarray, str]:
        stored_name, index = self.layout.where[name]
        reader = self.readers[stored_name]
        return self.layout.tensors[stored_name].part_rows(index, start, stop, reader.rows), reader.dtype

    def raw(self, name: str) -> np.ndarray:
        """The values as read, in `dtype(name)`'s storage (bf16 as uint16 bits)."""
        return self.rows(name, 0, self.shape(name)[0])[0]

    def float32(self, name: str) -> np.ndarray:
        return to_float32(*self.rows(name, 0, self.shape(name)[0]))

    def tensors(self) -> Iterator[tuple[str, "ViewTensor"]]:
        """(HF name, reader) pairs, what ``checkpoint.load_weights`` takes."""
        for name in self.names():
            yield name, ViewTensor(self, name)


class CheckpointView(HFTensors):
    """The tensors of checkpoint `files` (name -> opened file) as the Hugging Face tensors of `config`'s model,
    whatever the naming: detected from the names and checked (unknown names, shapes, dtypes, completeness), with
    errors that name the file and tensor.

    Entries of a training checkpoint that are not weights are set aside (`training_state`); the AdamW moments of
    the weights are read through ``moments(prefix)``.
    """

    def __init__(self, files: Mapping[str, Any], config, options: LayoutOptions = LayoutOptions(),
                 source: str = "config.json", reader: Callable[[Any, str], Any] = StoredRows, strict: bool = True):
        """``strict=False`` (``msllm-ckpt verify``): no errors; what the chosen naming does not explain, or holds
        in another shape, stays in `unexplained` and is left out of the view."""
        self.all_files, self.source, self.reader = files, source, reader
        self.training_state = sorted(n for n in files if is_training_state(n))
        names = [n for n in files if not is_training_state(n) and not n.endswith(NON_PARAMETER_SUFFIXES)]
        tried = candidates(config, options, source)
        unexplained = [[n for n in names if not layout.explains(n)] for layout in tried]
        best = min(range(len(tried)), key=lambda i: len(unexplained[i]))
        chosen = tried[best]
        self.unexplained = unexplained[best]
        if strict and self.unexplained:
            self._unknown(files, chosen, self.unexplained, tried)
        self.skipped = [n for n in names if chosen.skipped(n)]
        if strict:
            self._check(files, chosen, set(names))
            present = list(chosen.tensors)
        else:
            present = [n for n, t in chosen.tensors.items() if n in files and files[n].shape(n) == t.shape]
            self.unexplained += [n for n in chosen.tensors if n in files and n not in present]
        super().__init__(chosen, {name: files[name] for name in present}, reader)

    def _unknown(self, files, best: TensorLayout, unknown: list[str], tried: list[TensorLayout]) -> None:
        first = unknown[0]
        reason = (f"is not expected by {self.source}" if best.known(first) and not best.skipped(first) else
                  f"is unknown: not a parameter of the model {self.source} describes")
        more = f"; {len(unknown)} such tensors: {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}"
        raise CheckpointError(f"{files[first].path}: tensor {first} {reason} (closest naming: {best.describe()}; "
                              f"tried {', '.join(t.describe() for t in tried)}){more if len(unknown) > 1 else ''}")

    def _check(self, files, chosen: TensorLayout, present: set[str]) -> None:
        for stored in (chosen.tensors[n] for n in files if n in chosen.tensors):  # in the files' order
            file = files[stored.name]
            if file.shape(stored.name) != stored.shape:
                raise CheckpointError(f"{file.path}: tensor {stored.name} has shape {list(file.shape(stored.name))}, "
                                      f"{self.source} implies {list(stored.shape)}")
            if file.dtype(stored.name) not in FLOAT_TAGS:
                raise CheckpointError(f"{file.path}: tensor {stored.name} has unsupported dtype "
                                      f"{file.dtype(stored.name)} for a weight")
        missing = [name for name in chosen.tensors if name not in present]
        if missing:
            where = sorted({str(f.path) for f in files.values()})
            raise CheckpointError(f"{', '.join(where[:3])}: missing {len(missing)} tensor(s) that {self.source} calls "
                                  f"for ({chosen.describe()} names): {', '.join(missing[:8])}"
                                  f"{' ...' if len(missing) > 8 else ''}")

    def moments(self, prefix: str) -> HFTensors:
        """The AdamW moments a training checkpoint stores as `prefix` + a weight's stored name, for the weights that
        have them (not the frozen ones, e.g. DeepSeek's routing bias)."""
        files = {}
        for name, stored in self.layout.tensors.items():
            file = self.all_files.get(prefix + name)
            if file is None:
                continue
            if file.shape(prefix + name) != stored.shape:
                raise CheckpointError(f"{file.path}: {prefix}{name} has shape {list(file.shape(prefix + name))}, its "
                                      f"weight {list(stored.shape)}")
            files[name] = file
        return HFTensors(self.layout, files, self.reader, prefix)

    def notice(self) -> None:
        """One line per kind of entry left out."""
        if self.training_state:
            log.warning("leaving out %d optimizer/loss-scale entries of the training checkpoint (%s)",
                        len(self.training_state), ", ".join(_kinds(self.training_state)))
        if self.skipped:
            log.warning("skipping %d tensor(s) (%s...): %s", len(self.skipped), self.skipped[0],
                        self.layout.family.skip_extra_layers)


def _kinds(names: list[str]) -> list[str]:
    """`adam_m.*`, `global_step`, ...: the prefixes and names of `names`, for a notice."""
    prefixes = TRAINING_STATE_PREFIXES + MINDFORMERS_STATE_PREFIXES
    kinds = []
    for name in names:
        kind = next((f"{p}*" for p in prefixes if name.startswith(p)), name)
        if kind not in kinds:
            kinds.append(kind)
    return kinds


class ViewTensor:
    """One Hugging Face tensor of a CheckpointView, read like a checkpoint file's tensor (``load_weights``)."""

    def __init__(self, view: HFTensors, name: str):
        self.view, self.name = view, name
        self.path = view.path(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.view.shape(self.name)

    def float32(self, name: str) -> np.ndarray:
        return self.view.float32(self.name)


def open_checkpoint(path: str | Path) -> dict[str, Any]:
    """tensor name -> opened file of a checkpoint file or directory, each file opened once."""
    opened, files = {}, {}
    for name, file in weight_files(path).items():
        if file not in opened:
            opened[file] = open_tensor_file(file)
        files[name] = opened[file]
    return files


def checkpoint_tensors(path: str | Path, config, options: LayoutOptions = LayoutOptions(),
                       source: str = "config.json") -> Iterator[tuple[str, Any]]:
    """(name, reader) pairs of a checkpoint file or directory for ``checkpoint.load_weights``: a model directory
    or training checkpoint in our names as stored (its optimizer entries left out), one in mindformers' namings
    as Hugging Face's (detected; checked against `config`)."""
    files = open_checkpoint(path)
    if CheckpointView(files, config, options, source, strict=False).layout.naming == OURS:
        state = [name for name in files if is_training_state(name)]
        if state:
            log.warning("leaving out %d optimizer/loss-scale entries of the training checkpoint %s (%s)",
                        len(state), path, ", ".join(_kinds(state)))
        return ((name, reader) for name, reader in iter_tensors(path) if not is_training_state(name))
    view = CheckpointView(files, config, options, source)
    log.info("%s: %s names", path, view.layout.describe())
    view.notice()
    return view.tensors()


# --------------------------------------------------------------------------------------------------------------
# Writing in memory (a training checkpoint in mindformers' naming): Hugging Face arrays -> stored arrays.

def stored_arrays(target: TensorLayout, arrays: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(stored name, float32 array) of the tensors of `target` whose parts `arrays` (float32, by Hugging Face
    name) holds: all of them for the weights; for AdamW moments, those of the trained weights."""
    def read(name: str, start: int, stop: int) -> tuple[np.ndarray, str]:
        return arrays[name][start:stop], "F32"

    for stored in target.tensors.values():
        if not all(part in arrays for part in stored.parts):
            continue
        slabs = [array for array, _ in stored.slabs(read)]
        yield stored.name, np.concatenate([s.reshape(-1) for s in slabs]).reshape(stored.shape)

