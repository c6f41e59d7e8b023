"""Checkpoints in the layouts mindformers users have, both ways: 1.x Qwen2/2.5 with and without qkv_concat,
mcore ("Megatron-style") Qwen3 and DeepSeek-V3, and mindformers training checkpoints with optimizer state.

The reference is mindformers itself, version r1.8.0 (tag v1.7.0 lays these tensors out the same way): each
layout below is re-implemented here in NumPy from the formulas of the mindformers file named beside it (no
mindformers code is used), and its forward functions were checked bit for bit against those converters run on
these tiny models outside the repository. Every comparison is exact: names, dtypes and bits.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mindspore_llm import AutoModelForCausalLM
from mindspore_llm.checkpoint import CkptFile, bf16_bits_to_float32
from mindspore_llm.train.config import load_train_config, train_config_from_dict
from mindspore_llm.train.trainer import Trainer
from tests import reference
from tests.ckpt_helpers import raw_tensors, run

# --------------------------------------------------------------------------------------------------------------
# mindformers' layouts, re-implemented from its converters (r1.8.0).


def per_group(parts: list[np.ndarray], groups: int) -> np.ndarray:
    """Rows of each part cut into `groups` blocks, stored group by group: mindformers/utils/convert_utils.py
    qkv_concat_hf2mg / ffn_concat_hf2mg and parallel_core/utils/model_mixin.py concat_qkv_weight_megatron /
    concat_ffn_weight_megatron (reshape to (groups, rows, -1), concatenate on axis 1, reshape back)."""
    rest = parts[0].shape[1:]
    return np.concatenate([p.reshape(groups, -1, *rest) for p in parts], axis=1).reshape(-1, *rest)


def split_per_group(fused: np.ndarray, groups: int, rows: list[int]) -> list[np.ndarray]:
    """The inverse, as toolkit/weight_convert/qwen3/reverse_mcore_qwen3_weight_to_hf.py split_qkv_weight does it."""
    rest = fused.shape[1:]
    blocks = fused.reshape(groups, -1, *rest)
    bounds = np.cumsum([0] + [r // groups for r in rows])
    return [blocks[:, a:b].reshape(-1, *rest) for a, b in zip(bounds[:-1], bounds[1:])]


def split_interleaved(fc1: np.ndarray) -> list[np.ndarray]:
    """reverse_mcore_*_weight_to_hf.py split_linear_fc1_weight: even rows are gate, odd rows up."""
    index = np.arange(fc1.shape[0])
    return np.split(fc1[np.concatenate((index[::2], index[1::2]))], 2)


def experts_weight1(gates: list[np.ndarray], ups: list[np.ndarray]) -> np.ndarray:
    """toolkit/weight_convert/deepseekv3/convert_deepseekv3_hf_weight.py: stack each expert's gate|up (2I, H),
    permute to (E, H, 2I), reshape to (E * H, 2I)."""
    stacked = np.stack([np.concatenate((g, u)) for g, u in zip(gates, ups)])
    return stacked.transpose(0, 2, 1).reshape(-1, stacked.shape[1])


def experts_weight2(downs: list[np.ndarray]) -> np.ndarray:
    return np.stack(downs).transpose(0, 2, 1).reshape(-1, downs[0].shape[0])


def split_experts(weight1: np.ndarray, weight2: np.ndarray, experts: int, hidden: int, inter: int):
    """reverse_mcore_deepseekv3_weight_to_hf.py: weight1 -> (E, 2I, H) split at I; weight2 -> (E, H, I)."""
    w1 = weight1.reshape(experts, hidden, 2 * inter).transpose(0, 2, 1)
    w2 = weight2.reshape(experts, inter, hidden).transpose(0, 2, 1)
    return [(w1[e, :inter], w1[e, inter:], w2[e]) for e in range(experts)]


def mf_1x(hf: dict, cfg: dict, qkv_concat: bool) -> dict:
    """research/qwen2_5/convert_weight.py (name_replace, then convert_qkv_concat_weight when qkv_concat)."""
    out = {"model.tok_embeddings.embedding_weight": hf["model.embed_tokens.weight"],
           "model.norm_out.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        out["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        h, m = f"model.layers.{i}", f"model.layers.{i}"
        att = {x: hf[f"{h}.self_attn.{x}_proj.weight"] for x in "qkvo"}
        bias = {x: hf[f"{h}.self_attn.{x}_proj.bias"] for x in "qkv"}
        gate, up, down = (hf[f"{h}.mlp.{x}_proj.weight"] for x in ("gate", "up", "down"))
        out[f"{m}.attention.wo.weight"] = att["o"]
        out[f"{m}.feed_forward.w2.weight"] = down
        out[f"{m}.attention_norm.weight"] = hf[f"{h}.input_layernorm.weight"]
        out[f"{m}.ffn_norm.weight"] = hf[f"{h}.post_attention_layernorm.weight"]
        if qkv_concat:
            groups = cfg["num_key_value_heads"]
            out[f"{m}.attention.w_qkv.weight"] = per_group([att["q"], att["k"], att["v"]], groups)
            out[f"{m}.attention.w_qkv.bias"] = per_group([bias["q"], bias["k"], bias["v"]], groups)
            out[f"{m}.feed_forward.w_gate_hidden.weight"] = per_group([gate, up], cfg["intermediate_size"])
        else:
            for x, mf in (("q", "wq"), ("k", "wk"), ("v", "wv")):
                out[f"{m}.attention.{mf}.weight"], out[f"{m}.attention.{mf}.bias"] = att[x], bias[x]
            out[f"{m}.feed_forward.w1.weight"], out[f"{m}.feed_forward.w3.weight"] = gate, up
    return out


def mf_1x_reverse(stored: dict, cfg: dict) -> dict:
    """research/qwen2_5/convert_reversed.py name_replace (plain 1.x; mindformers cannot reverse qkv_concat)."""
    pairs = [("tok_embeddings.embedding_weight", "embed_tokens.weight"), ("model.norm_out.", "model.norm."),
             (".attention.wq.", ".self_attn.q_proj."), (".attention.wk.", ".self_attn.k_proj."),
             (".attention.wv.", ".self_attn.v_proj."), (".attention.wo.", ".self_attn.o_proj."),
             (".attention_norm.", ".input_layernorm."), (".ffn_norm.", ".post_attention_layernorm."),
             ("feed_forward.w1.", "mlp.gate_proj."), ("feed_forward.w2.", "mlp.down_proj."),
             ("feed_forward.w3.", "mlp.up_proj.")]
    out = {}
    for name, value in stored.items():
        for old, new in pairs:
            name = name.replace(old, new)
        out[name] = value
    return out


def mf_qwen3(hf: dict, cfg: dict, contiguous_attention=False, interleaved_mlp=True) -> dict:
    """TrainingQwen3ForCausalLM.convert_weight_dict (mindformers/models/qwen3/modeling_qwen3_train.py): its
    weight_mapping (models/qwen3/utils.py), then linear_qkv per KV group (or contiguous) and linear_fc1
    interleaved (or gate | up)."""
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        h, d = f"model.layers.{i}", f"decoder.layers.{i}"
        q, k, v = (hf[f"{h}.self_attn.{x}_proj.weight"] for x in "qkv")
        gate, up = hf[f"{h}.mlp.gate_proj.weight"], hf[f"{h}.mlp.up_proj.weight"]
        out[f"{d}.self_attention.linear_qkv.weight"] = per_group(
            [q, k, v], 1 if contiguous_attention else cfg["num_key_value_heads"])
        out[f"{d}.mlp.linear_fc1.weight"] = per_group([gate, up], cfg["intermediate_size"] if interleaved_mlp else 1)
        for ours, theirs in (("self_attn.o_proj", "self_attention.linear_proj"),
                             ("self_attn.q_norm", "self_attention.q_layernorm"),
                             ("self_attn.k_norm", "self_attention.k_layernorm"), ("mlp.down_proj", "mlp.linear_fc2"),
                             ("input_layernorm", "input_layernorm"), ("post_attention_layernorm", "pre_mlp_layernorm")):
            out[f"{d}.{theirs}.weight"] = hf[f"{h}.{ours}.weight"]
    return out


def mf_qwen3_reverse(stored: dict, cfg: dict) -> dict:
    """toolkit/weight_convert/qwen3/reverse_mcore_qwen3_weight_to_hf.py (a tied head comes back as the
    embedding's copy)."""
    heads, groups, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    out = {"model.embed_tokens.weight": stored["embedding.word_embeddings.weight"],
           "model.norm.weight": stored["decoder.final_layernorm.weight"],
           "lm_head.weight": stored.get("output_layer.weight", stored["embedding.word_embeddings.weight"])}
    for i in range(cfg["num_hidden_layers"]):
        h, d = f"model.layers.{i}", f"decoder.layers.{i}"
        q, k, v = split_per_group(stored[f"{d}.self_attention.linear_qkv.weight"], groups,
                                  [heads * head_dim, groups * head_dim, groups * head_dim])
        gate, up = split_interleaved(stored[f"{d}.mlp.linear_fc1.weight"])
        out.update({f"{h}.self_attn.q_proj.weight": q, f"{h}.self_attn.k_proj.weight": k,
                    f"{h}.self_attn.v_proj.weight": v, f"{h}.mlp.gate_proj.weight": gate,
                    f"{h}.mlp.up_proj.weight": up,
                    f"{h}.self_attn.o_proj.weight": stored[f"{d}.self_attention.linear_proj.weight"],
                    f"{h}.self_attn.q_norm.weight": stored[f"{d}.self_attention.q_layernorm.weight"],
                    f"{h}.self_attn.k_norm.weight": stored[f"{d}.self_attention.k_layernorm.weight"],
                    f"{h}.mlp.down_proj.weight": stored[f"{d}.mlp.linear_fc2.weight"],
                    f"{h}.input_layernorm.weight": stored[f"{d}.input_layernorm.weight"],
                    f"{h}.post_attention_layernorm.weight": stored[f"{d}.pre_mlp_layernorm.weight"]})
    return out


DSV3_ATTENTION = (("q_a_proj", "linear_q_down_proj"), ("q_a_layernorm", "q_layernorm"),
                  ("q_b_proj", "linear_q_up_proj"), ("kv_a_proj_with_mqa", "linear_kv_down_proj"),
                  ("kv_a_layernorm", "kv_layernorm"), ("kv_b_proj", "linear_kv_up_proj"), ("o_proj", "linear_proj"))


def mf_dsv3(hf: dict, cfg: dict, mla_qkv_concat: bool = False) -> dict:
    """toolkit/weight_convert/deepseekv3/convert_deepseekv3_hf_weight.py with num_nextn_predict_layers 0 (it
    then also writes mtp.output_layer.weight: its has_mtp_layers test is inverted). With mla_qkv_concat, the
    names of mindformers' MLASelfAttentionConcatenated (parallel_core/training_graph/transformer/
    multi_latent_attention.py): linear_qkv = q down | kv down, linear_qb, linear_kvb, k_layernorm."""
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"], "output_layer.weight": hf["lm_head.weight"],
           "mtp.output_layer.weight": hf["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        h, d = f"model.layers.{i}", f"decoder.layers.{i}"
        out[f"{d}.input_layernorm.weight"] = hf[f"{h}.input_layernorm.weight"]
        out[f"{d}.pre_mlp_layernorm.weight"] = hf[f"{h}.post_attention_layernorm.weight"]
        for ours, theirs in DSV3_ATTENTION:
            out[f"{d}.self_attention.{theirs}.weight"] = hf[f"{h}.self_attn.{ours}.weight"]
        if mla_qkv_concat:
            att = f"{d}.self_attention"
            out[f"{att}.linear_qkv.weight"] = np.concatenate((out.pop(f"{att}.linear_q_down_proj.weight"),
                                                              out.pop(f"{att}.linear_kv_down_proj.weight")))
            out[f"{att}.linear_qb.weight"] = out.pop(f"{att}.linear_q_up_proj.weight")
            out[f"{att}.linear_kvb.weight"] = out.pop(f"{att}.linear_kv_up_proj.weight")
            out[f"{att}.k_layernorm.weight"] = out.pop(f"{att}.kv_layernorm.weight")
        if i < cfg["first_k_dense_replace"]:
            out[f"{d}.mlp.linear_fc1.weight"] = per_group(
                [hf[f"{h}.mlp.gate_proj.weight"], hf[f"{h}.mlp.up_proj.weight"]], cfg["intermediate_size"])
            out[f"{d}.mlp.linear_fc2.weight"] = hf[f"{h}.mlp.down_proj.weight"]
            continue
        shared = f"{h}.mlp.shared_experts"
        out[f"{d}.mlp.router.weight"] = hf[f"{h}.mlp.gate.weight"]
        out[f"{d}.mlp.router.expert_bias"] = hf[f"{h}.mlp.gate.e_score_correction_bias"].astype(np.float32)
        out[f"{d}.mlp.shared_experts.linear_fc1.weight"] = per_group(
            [hf[f"{shared}.gate_proj.weight"], hf[f"{shared}.up_proj.weight"]], cfg["moe_intermediate_size"])
        out[f"{d}.mlp.shared_experts.linear_fc2.weight"] = hf[f"{shared}.down_proj.weight"]
        experts = range(cfg["n_routed_experts"])
        expert = [{p: hf[f"{h}.mlp.experts.{e}.{p}_proj.weight"] for p in ("gate", "up", "down")} for e in experts]
        out[f"{d}.mlp.experts.weight1"] = experts_weight1([x["gate"] for x in expert], [x["up"] for x in expert])
        out[f"{d}.mlp.experts.weight2"] = experts_weight2([x["down"] for x in expert])
    return out


def mf_dsv3_reverse(stored: dict, cfg: dict) -> dict:
    """toolkit/weight_convert/deepseekv3/reverse_mcore_deepseekv3_weight_to_hf.py (routing bias in float32)."""
    out = {"model.embed_tokens.weight": stored["embedding.word_embeddings.weight"],
           "model.norm.weight": stored["decoder.final_layernorm.weight"],
           "lm_head.weight": stored["output_layer.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        h, d = f"model.layers.{i}", f"decoder.layers.{i}"
        out[f"{h}.input_layernorm.weight"] = stored[f"{d}.input_layernorm.weight"]
        out[f"{h}.post_attention_layernorm.weight"] = stored[f"{d}.pre_mlp_layernorm.weight"]
        for ours, theirs in DSV3_ATTENTION:
            out[f"{h}.self_attn.{ours}.weight"] = stored[f"{d}.self_attention.{theirs}.weight"]
        if i < cfg["first_k_dense_replace"]:
            out[f"{h}.mlp.gate_proj.weight"], out[f"{h}.mlp.up_proj.weight"] = split_interleaved(
                stored[f"{d}.mlp.linear_fc1.weight"])
            out[f"{h}.mlp.down_proj.weight"] = stored[f"{d}.mlp.linear_fc2.weight"]
            continue
        out[f"{h}.mlp.gate.weight"] = stored[f"{d}.mlp.router.weight"]
        out[f"{h}.mlp.gate.e_score_correction_bias"] = stored[f"{d}.mlp.router.expert_bias"].astype(np.float32)
        shared = f"{h}.mlp.shared_experts"
        out[f"{shared}.gate_proj.weight"], out[f"{shared}.up_proj.weight"] = split_interleaved(
            stored[f"{d}.mlp.shared_experts.linear_fc1.weight"])
        out[f"{shared}.down_proj.weight"] = stored[f"{d}.mlp.shared_experts.linear_fc2.weight"]
        for e, (gate, up, down) in enumerate(split_experts(stored[f"{d}.mlp.experts.weight1"],
                                                           stored[f"{d}.mlp.experts.weight2"], cfg["n_routed_experts"],
                                                           cfg["hidden_size"], cfg["moe_intermediate_size"])):
            out.update({f"{h}.mlp.experts.{e}.gate_proj.weight": gate, f"{h}.mlp.experts.{e}.up_proj.weight": up,
                        f"{h}.mlp.experts.{e}.down_proj.weight": down})
    return out


MCORE_NON_DEFAULT = ["--use-contiguous-weight-layout-attention", "--no-use-interleaved-weight-layout-mlp"]
# case -> (model, hf2ms arguments, ms2hf/verify arguments, mindformers' forward layout, its reverse or None)
CASES = {
    "qwen2-1.x": ("qwen2", ["--naming", "mindformers"], [], lambda hf, c: mf_1x(hf, c, False), mf_1x_reverse),
    "qwen2-bf16-1.x": ("qwen2_bf16", ["--naming", "mindformers"], [], lambda hf, c: mf_1x(hf, c, False),
                       mf_1x_reverse),
    "qwen2-1.x-qkv_concat": ("qwen2", ["--naming", "mindformers", "--qkv-concat"], [],
                             lambda hf, c: mf_1x(hf, c, True), None),
    "qwen2-bf16-1.x-qkv_concat": ("qwen2_bf16", ["--naming", "mindformers", "--qkv-concat"], [],
                                  lambda hf, c: mf_1x(hf, c, True), None),
    "qwen3-mcore": ("qwen3", ["--naming", "mindformers-mcore"], [], mf_qwen3, mf_qwen3_reverse),
    "qwen3-bf16-untied-mcore": ("qwen3_bf16", ["--naming", "mindformers-mcore"], [], mf_qwen3, mf_qwen3_reverse),
    "qwen3-mcore-contiguous-attention-plain-mlp": (
        "qwen3", ["--naming", "mindformers-mcore", *MCORE_NON_DEFAULT], MCORE_NON_DEFAULT,
        lambda hf, c: mf_qwen3(hf, c, contiguous_attention=True, interleaved_mlp=False), None),
    "dsv3-mcore": ("dsv3", ["--naming", "mindformers-mcore"], [], mf_dsv3, mf_dsv3_reverse),
    "dsv3-bf16-mcore": ("dsv3_bf16", ["--naming", "mindformers-mcore"], [], mf_dsv3, mf_dsv3_reverse),
    "dsv3-mcore-mla_qkv_concat": ("dsv3", ["--naming", "mindformers-mcore", "--mla-qkv-concat"], [],
                                  lambda hf, c: mf_dsv3(hf, c, mla_qkv_concat=True), None),
}


def stored(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's stored values (bf16 as its uint16 bit patterns: the layouts move bits, comparisons are exact)."""
    return tensor.view(torch.int16).numpy().view(np.uint16) if tensor.dtype == torch.bfloat16 else tensor.numpy()


def tagged(arrays: dict[str, np.ndarray]) -> dict[str, tuple[str, bytes]]:
    """As tests.ckpt_helpers.raw_tensors reports a checkpoint: name -> (dtype tag, bytes)."""
    return {name: ("BF16" if a.dtype == np.uint16 else "F32", np.ascontiguousarray(a).tobytes())
            for name, a in arrays.items()}


def from_checkpoint(path) -> dict[str, np.ndarray]:
    """name -> stored values of a checkpoint in any format (bf16 as bits), shaped."""
    from mindspore_llm.checkpoint import iter_tensors
    return {name: np.array(file.raw(name)) for name, file in iter_tensors(path)}


def save_like_mindformers(arrays: dict[str, np.ndarray], path, fmt: str) -> None:
    """mindspore.save_checkpoint, as mindformers' converters write their output (bf16 as bfloat16 Tensors)."""
    entries = [{"name": n, "data": ms.Tensor(bf16_bits_to_float32(a), ms.bfloat16) if a.dtype == np.uint16
                else ms.Tensor(a)} for n, a in arrays.items()]
    ms.save_checkpoint(entries, str(path), format=fmt)


@pytest.fixture(scope="module")
def models(module_dir):
    """name -> (HF directory, config dict, HF state) of fp32 and bf16 tiny Qwen2, Qwen3 and DeepSeek-V3."""
    builders = {"qwen2": reference.qwen2, "qwen2_bf16": lambda d: reference.qwen2(d, seed=1),
                "qwen3": reference.qwen3,  # tied embeddings, head_dim 24 != hidden / heads
                "qwen3_bf16": lambda d: reference.qwen3(d, seed=1, tie_word_embeddings=False),
                "dsv3": reference.deepseek_v3, "dsv3_bf16": lambda d: reference.deepseek_v3(d, seed=1)}
    out = {}
    for name, build in builders.items():
        directory = module_dir / name
        model = build(directory)
        if name.endswith("bf16"):
            model.to(torch.bfloat16)
            for key, buffer in model.named_buffers():  # DeepSeek's checkpoints keep the routing bias in float32
                if key.endswith("e_score_correction_bias"):
                    buffer.data = buffer.data.float()
            model.save_pretrained(directory)
        state = {k: stored(v) for k, v in load_file(directory / "model.safetensors").items()}
        out[name] = (directory, json.loads((directory / "config.json").read_text()), state)
    return out


@pytest.fixture(scope="module")
def written(models, module_dir):
    """case -> our hf2ms output directory (MindSpore safetensors, which mindformers' mcore tools read)."""
    out = {}
    for case, (model, args, _, _, _) in CASES.items():
        dst = module_dir / f"ours-{case}"
        result = run("hf2ms", models[model][0], dst, *args, "--format", "safetensors")
        assert result.exit_code == 0, result.output
        out[case] = dst
    return out


# --------------------------------------------------------------------------------------------------------------
# Conversions: for every family and layout.

@pytest.mark.parametrize("case", CASES)
def test_we_write_what_mindformers_converter_writes(case, models, written):
    """Our hf2ms output equals mindformers' forward layout tensor for tensor: names, dtypes, bits (the routing
    bias in float32, as its converter forces; its extra copy of the head, mtp.output_layer.weight, we do not
    write)."""
    model, _, _, forward, _ = CASES[case]
    expected = tagged(forward(models[model][2], models[model][1]))
    expected.pop("mtp.output_layer.weight", None)
    assert raw_tensors(written[case]) == expected


@pytest.mark.parametrize("case", CASES)
def test_mindformers_output_reads_back_as_the_original(case, models, module_dir):
    """What mindformers' converter writes (saved with mindspore.save_checkpoint as it does: .ckpt for 1.x, one
    MindSpore safetensors file for mcore), read by ms2hf (naming detected), equals the Hugging Face original."""
    model, _, read_args, forward, _ = CASES[case]
    directory, cfg, state = models[model]
    source = module_dir / f"theirs-{case}"
    source.mkdir()
    fmt = "ckpt" if "1.x" in case else "safetensors"
    save_like_mindformers(forward(state, cfg), source / f"model.{fmt}", fmt)
    back = module_dir / f"back-{case}"
    result = run("ms2hf", source, back, "--config", directory, *read_args)
    assert result.exit_code == 0, result.output
    assert raw_tensors(back) == tagged(state)
    result = run("verify", directory, source, "--config", directory, *read_args)  # fused tensors split to compare
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case", [c for c, (*_, reverse) in CASES.items() if reverse])
def test_mindformers_reverse_converter_gives_back_the_original(case, models, written):
    """Where mindformers has a reverse converter (1.x plain, mcore Qwen3, mcore DeepSeek-V3), it turns our output
    into the original; a tied Qwen3 head comes back as the embedding's copy, as its reverse writes it."""
    model, *_, reverse = CASES[case]
    _, cfg, state = models[model]
    back = reverse(from_checkpoint(written[case]), cfg)
    if cfg.get("tie_word_embeddings") and "lm_head.weight" not in state:
        np.testing.assert_array_equal(back.pop("lm_head.weight"), state["model.embed_tokens.weight"])
    assert tagged(back) == tagged(state)


@pytest.mark.parametrize("case", CASES)
def test_round_trip_through_the_layout_is_bit_identical(case, models, written, module_dir):
    model, _, read_args, _, _ = CASES[case]
    back = module_dir / f"round-{case}"
    assert run("ms2hf", written[case], back, *read_args).exit_code == 0
    assert raw_tensors(back) == tagged(models[model][2])


# --------------------------------------------------------------------------------------------------------------
# Refusals and errors.

@pytest.mark.parametrize("model, args, fragments", [
    ("qwen3", ["--naming", "mindformers"], ["Qwen3ForCausalLM has no mindformers layout", "mindformers-mcore"]),
    ("dsv3", ["--naming", "mindformers"], ["DeepseekV3ForCausalLM has no mindformers layout", "mindformers-mcore"]),
    ("qwen2", ["--naming", "mindformers-mcore"], ["Qwen2ForCausalLM has no mindformers-mcore layout",
                                                  "inference-only"]),
    ("qwen3", ["--naming", "mindformers-mcore", "--qkv-concat"], ["--qkv-concat", "--naming mindformers"]),
    ("qwen3", ["--naming", "mindformers-mcore", "--mla-qkv-concat"], ["mla_qkv_concat", "DeepSeek-V3"]),
])
def test_a_layout_mindformers_does_not_have_is_refused(model, args, fragments, models, tmp_path):
    result = run("hf2ms", models[model][0], tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_names_of_no_naming_are_listed_with_the_namings_tried(models, written, tmp_path):
    source = tmp_path / "odd"
    source.mkdir()
    arrays = from_checkpoint(written["qwen2-1.x-qkv_concat"])
    arrays["model.layers.0.attention.w_qkv_extra.weight"] = np.zeros(4, np.float32)
    arrays["model.layers.1.feed_forward.w4.weight"] = np.zeros(4, np.float32)
    save_like_mindformers(arrays, source / "model.ckpt", "ckpt")
    result = run("ms2hf", source, tmp_path / "out", "--config", models["qwen2"][0])
    assert result.exit_code == 2
    for fragment in ("model.ckpt: tensor model.layers.0.attention.w_qkv_extra.weight is unknown", "2 such tensors",
                     "model.layers.1.feed_forward.w4.weight", "closest naming: mindformers (1.x, qkv_concat)",
                     "tried mindspore_llm, mindformers (1.x), mindformers (1.x, qkv_concat)"):
        assert fragment in result.output, result.output


def test_safetensors_output_carries_mindformers_param_name_map(written):
    for case in ("qwen3-mcore", "dsv3-mcore"):
        index = json.loads((written[case] / "mindspore_model.index.json").read_text())["weight_map"]
        assert json.loads((written[case] / "param_name_map.json").read_text()) == index


def test_from_pretrained_reads_mindformers_checkpoints(models, written):
    """A fused 1.x .ckpt file and an mcore DeepSeek-V3 directory (stacked experts) give the Hugging Face model's
    parameters exactly."""
    for case, source in (("qwen2-1.x-qkv_concat", next(written["qwen2-1.x-qkv_concat"].glob("*.safetensors"))),
                         ("dsv3-mcore", written["dsv3-mcore"])):
        directory = models[CASES[case][0]][0]
        ours = AutoModelForCausalLM.from_pretrained(source, config=directory).parameters_dict()
        expected = AutoModelForCausalLM.from_pretrained(directory).parameters_dict()
        assert sorted(ours) == sorted(expected)
        for name in expected:
            np.testing.assert_array_equal(ours[name].asnumpy(), expected[name].asnumpy(), err_msg=name)


def test_a_rank_directory_with_several_steps_asks_for_one_file(written, tmp_path):
    rank = tmp_path / "rank_0"
    rank.mkdir()
    arrays = from_checkpoint(written["qwen3-mcore"])
    for step in (100, 200):
        save_like_mindformers(arrays, rank / f"qwen3_rank_0-{step}_1.ckpt", "ckpt")
    result = run("ms2hf", rank, tmp_path / "out", "--config", written["qwen3-mcore"])
    assert result.exit_code == 2 and "qwen3_rank_0-100_1.ckpt and qwen3_rank_0-200_1.ckpt" in result.output
    assert "pass the one checkpoint file" in result.output


# --------------------------------------------------------------------------------------------------------------
# mindformers training checkpoints (weights + AdamW moments + step and bookkeeping).

def mindformers_training_state(weights: dict[str, np.ndarray], seed: int = 0, step: int = 3) -> list[dict]:
    """save_checkpoint entries as a mindformers run saves them (core/optim/adamw.py: adam_m./adam_v. + each
    weight's name; nn.Optimizer's global_step, shape [1]; wrapper.py's scale_sense; callback.py's append_info),
    plus a string entry (save_checkpoint's append_dict takes strings)."""
    rng = np.random.default_rng(seed)
    entries = [{"name": n, "data": ms.Tensor(a)} for n, a in weights.items()]
    for prefix, scale in (("adam_m.", 1e-3), ("adam_v.", 1e-6)):
        entries += [{"name": prefix + n, "data": ms.Tensor(np.abs(rng.standard_normal(a.shape)).astype(np.float32)
                                                            * scale)} for n, a in weights.items()]
    entries += [{"name": "global_step", "data": ms.Tensor([step], ms.int32)},
                {"name": "scale_sense", "data": ms.Tensor(1.0, ms.float32)},
                {"name": "epoch_num", "data": ms.Tensor(1, ms.int64)},
                {"name": "step_num", "data": ms.Tensor(step, ms.int64)},
                {"name": "loss_scale", "data": ms.Tensor(1.0, ms.float32)},
                {"name": "global_batch_size", "data": ms.Tensor(8, ms.int64)}]
    return entries


def test_ms2hf_exports_a_mindformers_training_checkpoint_and_names_what_it_leaves_out(models, tmp_path, caplog):
    directory, cfg, state = models["qwen3"]
    rank = tmp_path / "rank_0"
    rank.mkdir()
    weights = mf_qwen3(state, cfg)
    ms.save_checkpoint(mindformers_training_state(weights), str(rank / "qwen3_rank_0-3_1.ckpt"),
                       append_dict={"run_note": "tiny"})
    assert CkptFile(rank / "qwen3_rank_0-3_1.ckpt").strings == {"run_note": "tiny"}
    with caplog.at_level(logging.WARNING, logger="mindspore_llm"):
        result = run("ms2hf", rank, tmp_path / "hf", "--config", directory)
    assert result.exit_code == 0, result.output
    assert raw_tensors(tmp_path / "hf") == tagged(state)
    [notice] = [r.getMessage() for r in caplog.records if "optimizer" in r.getMessage()]
    for kind in ("adam_m.*", "adam_v.*", "global_step", "scale_sense", "epoch_num", "step_num", "global_batch_size"):
        assert kind in notice, notice
    assert f"leaving out {2 * len(weights) + 6} optimizer" in notice


def write_strategy(path, layouts: dict[str, tuple[tuple[int, ...], list[int]]], model_parallel: int) -> None:
    """A MindSpore strategy file (node_strategy.proto) as a mindformers run saves it
    (strategy/ckpt_strategy_rank_0.ckpt): name -> (shape, tensor map: -1 whole, 0 split over the model-parallel
    axis)."""
    from mindspore.train import node_strategy_pb2

    strategy = node_strategy_pb2.ParallelStrategyMap()
    strategy.current_stage = 0
    for name, (_, tensor_map) in layouts.items():
        item = strategy.parallel_layout_item.add()
        item.param_name = name
        item.parallel_layouts.dev_matrix.add().dim.extend([1, model_parallel])
        item.parallel_layouts.tensor_map.add().dim.extend(tensor_map)
        item.parallel_layouts.param_split_shape.add()
        item.parallel_layouts.indices_offset.add()
        item.parallel_layouts.field = item.parallel_layouts.opt_weight_shard_step = 0
        item.parallel_layouts.opt_weight_shard_size = 0
    path.write_bytes(strategy.SerializeToString())


def test_per_rank_mindformers_training_checkpoints_merge_through_their_strategy_file(models, tmp_path):
    """Tensor-parallel 2, as mindformers splits mcore Qwen3 (column-parallel linear_qkv / linear_fc1 and the
    vocabulary rows, row-parallel linear_proj / linear_fc2); moments split like their weights."""
    directory, cfg, state = models["qwen3"]
    full = {e["name"]: e["data"].asnumpy() for e in mindformers_training_state(mf_qwen3(state, cfg))}

    def tensor_map(name: str, ndim: int) -> list[int]:
        if any(k in name for k in ("linear_qkv", "linear_fc1", "word_embeddings")):
            return [0, -1]
        if any(k in name for k in ("linear_proj", "linear_fc2")):
            return [-1, 0]
        return [-1] * ndim

    layouts = {n: (a.shape, tensor_map(n, a.ndim)) for n, a in full.items()}
    write_strategy(tmp_path / "ckpt_strategy_rank_0.ckpt", layouts, 2)
    for r in range(2):
        (tmp_path / "checkpoint" / f"rank_{r}").mkdir(parents=True)
        entries = []
        for name, array in full.items():
            for axis, split in enumerate(layouts[name][1]):
                if split == 0:
                    array = np.split(array, 2, axis=axis)[r]
            entries.append({"name": name, "data": ms.Tensor(array)})
        ms.save_checkpoint(entries, str(tmp_path / "checkpoint" / f"rank_{r}" / f"qwen3_rank_{r}-3_1.ckpt"))
    result = run("ms2hf", tmp_path / "checkpoint", tmp_path / "hf", "--strategy",
                 tmp_path / "ckpt_strategy_rank_0.ckpt", "--config", directory)
    assert result.exit_code == 0, result.output
    assert raw_tensors(tmp_path / "hf") == tagged(state)


# --------------------------------------------------------------------------------------------------------------
# The trainer: starting from a mindformers training checkpoint, and writing its own in mindformers' naming.

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "mindspore_llm" / "assets" / "tiny"


def train_config(output_dir, model: dict, steps: int, **checkpoint):
    """3 steps of a tiny model on the shipped tokenizer and SFT data, checkpoints every 2 steps."""
    return train_config_from_dict({
        "model": model,
        "data": dict(kind="sft", path=str(ASSETS / "sft.jsonl"), tokenizer=str(ASSETS), seq_length=128,
                     packing=True),
        "schedule": dict(lr=3e-3, min_lr=3e-4, warmup_steps=1, decay="cosine", total_steps=3),
        "train": dict(micro_batch_size=2, steps=steps, seed=7),
        "checkpoint": dict(every_n_steps=2, keep_last=5, **checkpoint),
        "logging": dict(progress_bar=False, tensorboard=False, plot=False),
        "output_dir": str(output_dir)}, "test")


def weights(model) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().copy() for p in model.get_parameters()}


@pytest.fixture(scope="module")
def qwen3_run(module_dir):
    """A tiny tied Qwen3 (vocabulary of the shipped tokenizer) trained 3 steps in our naming: (HF directory,
    config, the run's step-3 loss, its final weights, its step-2 train_state.ckpt)."""
    directory = module_dir / "qwen3_512"
    reference.qwen3(directory, vocab_size=512)
    trainer = Trainer(train_config(module_dir / "straight", {"path": str(directory)}, 3))
    result = trainer.run()
    state = trainer.config.checkpoint_dir / "step_00000002" / "rank_0" / "train_state.ckpt"
    return directory, json.loads((directory / "config.json").read_text()), dict(result.losses)[3], \
        weights(trainer.model), state


def mindformers_copy(train_state, cfg) -> dict[str, np.ndarray]:
    """Our train_state.ckpt as a mindformers mcore training checkpoint holds the same state: weights and
    adam_m./adam_v. moments in mf_qwen3's layout (core/optim/adamw.py), global_step [1], scale_sense."""
    ours = {name: p.asnumpy() for name, p in ms.load_checkpoint(str(train_state)).items()}
    weights = {n: a for n, a in ours.items() if not n.startswith(("optimizer.", "loss_scale."))}
    out = mf_qwen3(weights, cfg)
    for prefix, theirs in (("optimizer.exp_avg.", "adam_m."), ("optimizer.exp_avg_sq.", "adam_v.")):
        moments = {n[len(prefix):]: a for n, a in ours.items() if n.startswith(prefix)}
        out.update({theirs + n: a for n, a in mf_qwen3(moments, cfg).items()})
    out["global_step"] = np.array([ours["optimizer.step"]], np.int32)
    out["scale_sense"] = ours["loss_scale.scale"]
    return out


def test_a_run_started_from_a_mindformers_training_checkpoint_steps_as_one_continued_from_ours(qwen3_run, tmp_path):
    """model.path = a mindformers mcore training checkpoint (fused linear_qkv / linear_fc1 and their moments)
    holding the weights and moments of our step-2 checkpoint, with checkpoint.resume_optimizer: the next step's
    loss and the weights after it equal the uninterrupted run's bit for bit (without the moments and step they
    would not: Adam's first update from zero moments and step 0 differs)."""
    directory, cfg, loss_3, final, train_state = qwen3_run
    source = tmp_path / "qwen3_rank_0-2_1.ckpt"
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in mindformers_copy(train_state, cfg).items()],
                       str(source))
    trainer = Trainer(train_config(tmp_path / "run", {"path": str(source), "config": str(directory)}, 3,
                                   resume_optimizer=True))
    assert trainer.start_step == 2
    result = trainer.run()
    assert dict(result.losses) == {3: loss_3}
    after = weights(trainer.model)
    for name, array in final.items():
        np.testing.assert_array_equal(after[name], array, err_msg=name)


def test_checkpoints_written_in_mindformers_naming_hold_its_layout_and_resume(qwen3_run, tmp_path):
    """checkpoint.naming: mindformers-mcore writes train_state.ckpt as a mindformers training checkpoint (equal,
    tensor for tensor, to the layout above, plus its resume bookkeeping), and resuming from it restores the very
    state it was written from (so the run continues as the uninterrupted one; no step is compiled here)."""
    directory, cfg, _, _, train_state = qwen3_run
    config = train_config(tmp_path / "mf", {"path": str(directory)}, 3, naming="mindformers-mcore")
    trainer = Trainer(config)
    ms.load_param_into_net(trainer.step_cell, ms.load_checkpoint(str(train_state)), strict_load=True)
    written = trainer.save(2) / "rank_0" / "train_state.ckpt"
    saved = {name: p.asnumpy() for name, p in ms.load_checkpoint(str(written)).items()}
    expected = mindformers_copy(train_state, cfg)
    assert set(saved) - set(expected) == {"epoch_num", "step_num", "loss_scale", "global_batch_size",
                                          "current_iterator_step", "last_overflow_iterator_step"}
    assert int(saved["step_num"]) == 2 and int(saved["global_batch_size"]) == 2
    for name, array in expected.items():
        np.testing.assert_array_equal(saved[name], array, err_msg=name)
    resumed = Trainer(config, resume=True)
    assert resumed.start_step == 2
    back = {p.name: p.asnumpy() for p in resumed.step_cell.get_parameters()}
    for name, param in ms.load_checkpoint(str(train_state)).items():
        np.testing.assert_array_equal(back[name], param.asnumpy(), err_msg=name)


def test_deepseek_v3_training_state_in_mindformers_naming_stacks_expert_moments_like_weight1(tmp_path):
    """DeepSeek-V3's stacked expert moments (ours: (E, I, H) per projection) are written as mindformers'
    experts.weight1 / weight2 (convert_deepseekv3_hf_weight.py's layout, applied to the moments as its AdamW
    keeps them per weight), and read back into the same state; no step is compiled."""
    config = load_train_config(REPO / "configs" / "tiny_deepseek_v3.yaml",
                               [f"output_dir={tmp_path / 'run'}", "checkpoint.naming=mindformers-mcore"])
    trainer = Trainer(config)
    rng = np.random.default_rng(0)
    optimizer = trainer.step_cell.optimizer
    for moment in (*optimizer.exp_avg, *optimizer.exp_avg_sq):
        moment.set_data(ms.Tensor(rng.standard_normal(moment.shape).astype(np.float32)))
    optimizer.step.set_data(ms.Tensor(5, ms.int32))
    saved_dir = trainer.save(5)
    saved = {n: p.asnumpy() for n, p in ms.load_checkpoint(str(saved_dir / "rank_0" / "train_state.ckpt")).items()}
    hf_cfg = trainer.model_config.to_hf()
    experts = hf_cfg["n_routed_experts"]

    def hf_layout(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Our parameters -> per-expert Hugging Face names (stacked experts: expert dimension first)."""
        out = {}
        for name, array in arrays.items():
            stacked = name.rsplit(".", 1)
            if stacked[0].endswith("mlp.experts"):
                out.update({f"{stacked[0]}.{e}.{stacked[1]}.weight": array[e] for e in range(experts)})
            else:
                out[name] = array
        return out

    params = {p.name: p.asnumpy() for p in trainer.model.weights()}
    expected = mf_dsv3(hf_layout(params), hf_cfg)
    expected.pop("mtp.output_layer.weight")
    for prefix, moments in (("adam_m.", optimizer.exp_avg), ("adam_v.", optimizer.exp_avg_sq)):
        trained = hf_layout({p.name: m.asnumpy() for p, m in zip(optimizer.parameters, moments)})
        layout = mf_dsv3({**{n: np.zeros_like(a) for n, a in hf_layout(params).items()}, **trained}, hf_cfg)
        expected.update({prefix + n: a for n, a in layout.items() if "expert_bias" not in n and "mtp." not in n})
    assert "adam_m.decoder.layers.1.mlp.experts.weight1" in expected
    for name, array in expected.items():
        np.testing.assert_array_equal(saved[name], array, err_msg=name)
    assert int(saved["global_step"][0]) == 5
    resumed = Trainer(load_train_config(REPO / "configs" / "tiny_deepseek_v3.yaml",
                                        [f"output_dir={tmp_path / 'run'}", "checkpoint.naming=mindformers-mcore",
                                         f"checkpoint.resume={saved_dir}"]))
    back = {p.name: p.asnumpy() for p in resumed.step_cell.get_parameters()}
    for param in trainer.step_cell.get_parameters():
        np.testing.assert_array_equal(back[param.name], param.asnumpy(), err_msg=param.name)
