"""DeepSeek-V3 Cells against transformers' DeepseekV3ForCausalLM (the reference), fp32, graph mode on CPU.

Tolerances, each within ~10x of the error measured here: logits max|Δ| <= 3e-6 * max|logit| on non-padding
positions (measured 3.4e-7); loss within 3e-6 relative (measured 3.9e-7, 2.8e-7 with the aux loss); each parameter's
gradient (in the checkpoint's per-expert layout) max|Δ| <= 2e-5 * max|reference| (measured 2.4e-6; 3.7e-7 for the
gradients through the aux loss, checked at 3e-6); routing weights rtol 1e-5 + atol 1e-6 (13% of it used).
"""
import dataclasses
import logging
import shutil

import mindspore as ms
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from ckpt_tools.cli import main as ckpt_cli
from mindspore_llm import AutoModelForCausalLM
from mindspore_llm.checkpoint import load_weights
from mindspore_llm.cli import main as cli
from mindspore_llm.common import ConfigError
from mindspore_llm.models.config import config_from_hf, config_from_yaml_section, load_config
from mindspore_llm.models.deepseek_v3 import checkpoint_names, softmax_scale
from mindspore_llm.models.layers import Precision
from mindspore_llm.models.moe import (DeepSeekMoE, GroupLimitedTopKRouter, expert_load_stats, moe_blocks,
                                     update_expert_bias)
from mindspore_llm.tokenizer import load_tokenizer
from tests import reference
from tests.test_qwen_parity import ms_logits_loss_grads

BATCH, SEQ = 3, 12
LEFT_PAD = (0, 4, 7)
TOKENIZER = "mindspore_llm/assets/tiny/tokenizer.json"

CASES = {
    # q_lora path, yarn (mscale_all_dim: the softmax scale grows by mscale^2), interleaved rope, 4 groups pick 2.
    "qlora_yarn": lambda d: reference.deepseek_v3(d),
    # plain q_proj, default rope, half-split rope, 2 groups pick 1, no top-k renormalisation, 2 shared experts,
    # attention biases.
    "qproj_plain_rope": lambda d: reference.deepseek_v3(
        d, q_lora_rank=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_interleave=False,
        n_group=2, topk_group=1, norm_topk_prob=False, n_shared_experts=2, attention_bias=True),
}


# deepseek-ai/DeepSeek-V3's config.json (remote-code era: rope_scaling with "type", FP8 quantization_config).
DEEPSEEK_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "aux_loss_alpha": 0.001, "bos_token_id": 0,
    "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 2.5,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4,
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_config_reads_the_published_deepseek_v3_config_and_names_bad_fields():
    config = config_from_hf(DEEPSEEK_V3_CONFIG)
    assert (config.q_lora_rank, config.n_group, config.topk_group, config.num_nextn_predict_layers) == (1536, 8, 4, 1)
    rope = config.rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 40, 4096)
    # 192^-0.5 * (0.1 ln 40 + 1)^2: the yarn mscale correction of the softmax scale
    assert softmax_scale(config) == pytest.approx(192 ** -0.5 * (0.1 * np.log(40) + 1) ** 2, rel=1e-12)
    assert config_from_yaml_section({**config.to_dict(), "seq_aux_loss_alpha": 1e-4}, "train.yaml: model") \
        .seq_aux_loss_alpha == 1e-4
    for bad, field in (({"n_routed_experts": 250}, "n_routed_experts"), ({"topk_group": 9}, "topk_group"),
                       ({"num_key_value_heads": 8}, "num_key_value_heads"),
                       ({"scoring_func": "softmax"}, "scoring_func"),
                       ({"qk_rope_head_dim": 63}, "qk_rope_head_dim")):
        with pytest.raises(ConfigError, match=field):
            config_from_hf({**DEEPSEEK_V3_CONFIG, **bad}, "config.json")


def saved_layout(grads: dict, num_experts: int) -> dict:
    """Gradients by checkpoint name: our stacked experts and the reference's in-memory experts (down_proj stacked
    the same way, gate_up_proj fused with the gate rows first) split into the per-expert tensors that
    save_pretrained writes."""
    out = {}
    for name, grad in grads.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, half = name[:-len("gate_up_proj")], grad.shape[1] // 2
            for e in range(num_experts):
                out[f"{prefix}{e}.gate_proj.weight"] = grad[e, :half]
                out[f"{prefix}{e}.up_proj.weight"] = grad[e, half:]
            continue
        names = checkpoint_names(name, num_experts)
        out.update(zip(names, [grad] if len(names) == 1 else list(grad)))
    return out


def hooked_routers(hf_model):
    """Record every reference router call: (input hidden states, router logits still in the autograd graph,
    selected expert indices)."""
    calls = []
    for module in hf_model.modules():
        if type(module).__name__ == "DeepseekV3TopkRouter":
            module.register_forward_hook(lambda m, args, out: calls.append(
                (args[0].detach().reshape(-1, args[0].shape[-1]).numpy(), out[0], out[2].detach().numpy())))
    return calls


@pytest.fixture(scope="module")
def checkpoint(module_dir):
    """case name -> the reference model, saved once per module under module_dir/<case>."""
    built = {}

    def get(case):
        if case not in built:
            built[case] = CASES[case](module_dir / case)
        return built[case]
    return get


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, module_dir, checkpoint):
    hf_model = checkpoint(request.param)
    model = AutoModelForCausalLM.from_pretrained(module_dir / request.param)
    batch = reference.random_batch(hf_model.config.vocab_size, BATCH, SEQ, seed=1, left_pad=LEFT_PAD)
    routed = hooked_routers(hf_model)
    ref = reference.torch_logits_loss_grads(hf_model, *batch)
    return ref, ms_logits_loss_grads(model, *batch), batch, (hf_model, model, routed)


def test_logits_match_reference(pair):
    (ref_logits, _, _), (logits, _, _), (_, mask, _), _ = pair
    valid = mask.astype(bool)
    error = np.abs(logits - ref_logits)[valid].max()
    assert error <= 3e-6 * np.abs(ref_logits[valid]).max(), error


def test_loss_matches_reference(pair):
    (_, ref_loss, _), (_, loss, _), _, _ = pair
    assert loss == pytest.approx(ref_loss, rel=3e-6)


def test_every_gradient_matches_autograd_in_saved_layout(pair):
    (_, _, ref_grads), (_, _, grads), _, (hf_model, _, _) = pair
    experts = hf_model.config.n_routed_experts
    ref_grads, grads = saved_layout(ref_grads, experts), saved_layout(grads, experts)
    assert sorted(grads) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        error = np.abs(grads[name] - ref).max()
        assert error <= 2e-5 * np.abs(ref).max(), (name, error, np.abs(ref).max())


def test_capacity_dispatch_that_drops_nothing_matches_the_reference(module_dir, checkpoint):
    """Training mode (the capacity dispatch) with moe_capacity_factor = E / k, so C = S and nothing is dropped:
    logits, loss and every gradient equal transformers' within 1e-5 (relative to the largest value), as the dense
    dispatch does above. Measured: logits 3.3e-7, loss 3.9e-7, worst gradient 1.7e-6."""
    hf_model = checkpoint("qlora_yarn")
    experts, top_k = hf_model.config.n_routed_experts, hf_model.config.num_experts_per_tok
    config = dataclasses.replace(load_config(module_dir / "qlora_yarn"), moe_capacity_factor=experts / top_k)
    model = AutoModelForCausalLM.from_config(config)
    load_weights(model, module_dir / "qlora_yarn")
    model.set_train(True)
    batch = reference.random_batch(hf_model.config.vocab_size, BATCH, SEQ, seed=1, left_pad=LEFT_PAD)
    ref_logits, ref_loss, ref_grads = reference.torch_logits_loss_grads(hf_model, *batch)
    logits, loss, grads = ms_logits_loss_grads(model, *batch)
    assert all(float(block.dropped_slots.asnumpy()) == 0 for _, block in moe_blocks(model))
    valid = batch[1].astype(bool)
    assert np.abs(logits - ref_logits)[valid].max() <= 1e-5 * np.abs(ref_logits[valid]).max()
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    ref_grads, grads = saved_layout(ref_grads, experts), saved_layout(grads, experts)
    assert sorted(grads) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        error = np.abs(grads[name] - ref).max()
        assert error <= 1e-5 * np.abs(ref).max(), (name, error, np.abs(ref).max())


def test_routing_picks_the_reference_experts(pair):
    """The same experts (as sets per token) and weights as the reference router, on the hidden states the model
    routed and on random inputs. The correction bias and the group limit must make the choice differ from a plain
top-k of the affinities for this test to mean much."""
    _, _, _, (hf_model, model, routed) = pair
    layer = hf_model.config.first_k_dense_replace
    hf_gate, gate = hf_model.model.layers[layer].mlp.gate, model.model.layers[layer].mlp.gate
    rng = np.random.default_rng(3)
    inputs = [routed[0][0], rng.standard_normal((256, hf_model.config.hidden_size)).astype(np.float32)]
    differs_from_plain_topk = 0
    for x in inputs:
        _, ref_weights, ref_indices = (t.detach().numpy() for t in hf_gate(torch.tensor(x)))
        weights, indices, _ = (t.asnumpy() for t in gate(ms.Tensor(x)))
        order, ref_order = np.argsort(indices, -1), np.argsort(ref_indices, -1)
        np.testing.assert_array_equal(np.take_along_axis(indices, order, -1),
                                      np.take_along_axis(ref_indices, ref_order, -1))
        np.testing.assert_allclose(np.take_along_axis(weights, order, -1),
                                   np.take_along_axis(ref_weights, ref_order, -1), rtol=1e-5, atol=1e-6)
        unbiased = np.argsort(-(x @ hf_gate.weight.detach().numpy().T), -1)[:, :indices.shape[1]]
        differs_from_plain_topk += (np.sort(unbiased, -1) != np.sort(indices, -1)).any(-1).sum()
    assert differs_from_plain_topk > 0


def add_mtp_block(directory, num_hidden_layers: int) -> int:
    """Append a `model.layers.{num_hidden_layers}.*` block (a copy of the last layer plus an MTP-only tensor), as
    DeepSeek-V3's multi-token-prediction module sits in the real checkpoints; returns the tensor count added."""
    tensors = load_file(directory / "model.safetensors")
    last = f"model.layers.{num_hidden_layers - 1}."
    extra = {name.replace(last, f"model.layers.{num_hidden_layers}."): value
             for name, value in tensors.items() if name.startswith(last)}
    extra[f"model.layers.{num_hidden_layers}.eh_proj.weight"] = np.zeros((64, 128), np.float32)
    save_file({**tensors, **extra}, directory / "model.safetensors", metadata={"format": "pt"})
    return len(extra)


def test_mtp_layer_tensors_are_skipped_with_a_notice(module_dir, checkpoint, caplog):
    """A checkpoint with an extra `model.layers.{num_hidden_layers}.*` block loads; the skip is logged in one
    line naming the layer."""
    checkpoint("qlora_yarn")
    directory = module_dir / "with_mtp"
    shutil.copytree(module_dir / "qlora_yarn", directory, dirs_exist_ok=True)
    layers = reference.DEEPSEEK_V3["num_hidden_layers"]
    added = add_mtp_block(directory, layers)
    with caplog.at_level(logging.WARNING, logger="mindspore_llm"):
        model = AutoModelForCausalLM.from_pretrained(directory)
    notices = [r.getMessage() for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert len(notices) == 1 and f"model.layers.{layers}.*" in notices[0] and str(added) in notices[0]
    stacked = model.parameters_dict()["model.layers.2.mlp.experts.down_proj"].asnumpy()
    expected = load_file(directory / "model.safetensors")["model.layers.2.mlp.experts.5.down_proj.weight"]
    np.testing.assert_array_equal(stacked[5], expected)


@pytest.fixture(scope="module")
def aux_model(module_dir, checkpoint):
    """The qlora_yarn checkpoint loaded with the sequence-wise balance loss on (alpha 0.1)."""
    checkpoint("qlora_yarn")
    config = dataclasses.replace(load_config(module_dir / "qlora_yarn"), seq_aux_loss_alpha=0.1)
    model = AutoModelForCausalLM.from_config(config)
    load_weights(model, module_dir / "qlora_yarn")
    return model


def test_sequence_aux_loss_joins_loss_and_gradient(checkpoint, aux_model):
    """loss = CE + alpha * sum over MoE layers of mean over sequences of sum_i f_i P_i (DeepSeek-V3 eqs. 17-20),
    value and gradient, against the same formula differentiated by torch on the reference's router logits."""
    hf_model = checkpoint("qlora_yarn")
    batch = reference.random_batch(hf_model.config.vocab_size, BATCH, SEQ, seed=1, left_pad=LEFT_PAD)
    alpha, experts, top_k = 0.1, hf_model.config.n_routed_experts, hf_model.config.num_experts_per_tok
    calls = hooked_routers(hf_model)
    hf_model.zero_grad()
    out = hf_model(torch.tensor(batch[0]), attention_mask=torch.tensor(batch[1]), labels=torch.tensor(batch[2]))
    aux = 0
    for _, logits, indices in calls[-(hf_model.config.num_hidden_layers - 1):]:
        scores = logits.sigmoid().reshape(BATCH, SEQ, experts)
        counts = torch.nn.functional.one_hot(torch.tensor(indices), experts).sum(1).reshape(BATCH, SEQ, experts)
        fraction = counts.sum(1).float() * experts / (top_k * SEQ)
        probability = (scores / scores.sum(-1, keepdim=True)).mean(1)
        aux = aux + alpha * (fraction * probability).sum(-1).mean()
    (out.loss + aux).backward()
    ref_grads = {n: p.grad.numpy() for n, p in hf_model.named_parameters() if p.grad is not None}
    _, loss, grads = ms_logits_loss_grads(aux_model, *batch)
    assert loss == pytest.approx(float(out.loss + aux), rel=3e-6)
    ref_grads, grads = saved_layout(ref_grads, experts), saved_layout(grads, experts)
    for name in ("model.layers.1.mlp.gate.weight", "model.layers.2.mlp.gate.weight", "model.embed_tokens.weight"):
        error = np.abs(grads[name] - ref_grads[name]).max()
        assert error <= 3e-6 * np.abs(ref_grads[name]).max(), (name, error)
    stats = expert_load_stats(aux_model)
    assert stats["moe/1/aux_loss"] > 0 and stats["moe/2/dropped_slots"] == 0  # evaluation mode: dropless


def test_training_steps_lower_the_loss(aux_model):
    """AdamW on one batch, with the bias update after every step as the trainer does: the loss falls."""
    input_ids, mask, labels = (ms.Tensor(a, ms.int32)
                               for a in reference.random_batch(128, BATCH, SEQ, seed=5, left_pad=LEFT_PAD))
    params = aux_model.trainable_params()
    optimizer = ms.nn.AdamWeightDecay(params, learning_rate=1e-2)

    def loss_fn(ids, lab, attn):
        return aux_model.loss(ids, lab, attn)

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)

    @ms.jit
    def step(ids, lab, attn):
        loss, grads = grad_fn(ids, lab, attn)
        optimizer(grads)
        return loss

    losses = []
    for _ in range(6):
        losses.append(float(step(input_ids, labels, mask).asnumpy()))
        update_expert_bias(aux_model)
    assert losses[-1] < 0.8 * losses[0], losses
    assert np.abs(aux_model.model.layers[1].mlp.gate.e_score_correction_bias.asnumpy()).sum() > 0


def test_bias_update_evens_a_skewed_expert_load():
    """Tokens with diverse affinities that all lean towards experts 0 and 1: aux-loss-free balancing
    (b_i += gamma * sign(mean load - load_i), gamma 0.002, 500 steps) brings max/mean expert load from > 2.5
    to < 1.2 (1.0 = even). The bias changes selection only, so the routing weights stay unbiased scores."""
    hidden, experts, tokens = 64, 8, 512
    precision = Precision()
    router = GroupLimitedTopKRouter(hidden, experts, 2, 4, 2, True, 2.5, precision, 0.02)
    block = DeepSeekMoE(hidden, 32, experts, 1, router, dispatch="dense", capacity_factor=1.25,
                        drop_policy="probability", aux_loss_alpha=0.0, bias_update_speed=0.002, precision=precision,
                        init_std=0.02)
    rng = np.random.default_rng(0)
    lean = rng.standard_normal(hidden).astype(np.float32)
    weight = rng.standard_normal((experts, hidden)).astype(np.float32) * 3 / np.sqrt(hidden)
    weight[:2] += lean / np.linalg.norm(lean)
    router.weight.set_data(ms.Tensor(weight))
    x = ms.Tensor((lean + rng.standard_normal((4, tokens // 4, hidden))).astype(np.float32))
    block(x)
    before = expert_load_stats(block)["moe/max_over_mean_load"]
    for _ in range(500):
        update_expert_bias(block)
        block(x)
    after = expert_load_stats(block)["moe/max_over_mean_load"]
    print(f"max/mean expert load: {before:.2f} before, {after:.2f} after 500 bias updates")
    assert before > 2.5 and after < 1.2, (before, after)


def test_msllm_generate_runs_a_converted_tiny_deepseek_v3(module_dir, caplog):
    """`msllm-ckpt hf2ms` converts a tiny DeepSeek-V3 sized to the shipped tokenizer (its MTP block skipped with a
    notice) and `msllm generate` on the converted directory prints the reference's greedy continuation."""
    source, converted = module_dir / "generate", module_dir / "generate_ms"
    tokenizer = load_tokenizer(TOKENIZER)
    hf_model = reference.deepseek_v3(source, vocab_size=512, num_hidden_layers=2,
                                     eos_token_id=tokenizer.eos_token_id)
    add_mtp_block(source, 2)
    with caplog.at_level(logging.WARNING, logger="mindspore_llm"):
        result = CliRunner().invoke(ckpt_cli, ["hf2ms", str(source), str(converted), "--quiet"])
    assert result.exit_code == 0, result.output
    assert any("multi-token-prediction" in r.getMessage() for r in caplog.records)
    prompt = "the cat sat on the"
    ids = tokenizer.encode(prompt)
    expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0]
    result = CliRunner().invoke(cli, ["generate", str(converted), "--prompt", prompt, "--max-new-tokens", "5",
                                      "--tokenizer", TOKENIZER])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == tokenizer.decode(expected.tolist()).strip()
