"""A model trained from inline YAML dimensions leaves as a directory that `msllm-ckpt ms2hf` exports and that
transformers loads with no missing or unexpected keys and the same logits (fp32). Every tensor is moved away from
the value transformers would initialise it to (norms 1, biases and the DeepSeek correction bias 0), so a tensor
that failed to load would change the logits instead of hiding behind its init."""
import mindspore as ms
import numpy as np
import pytest
import torch
import transformers

from mindspore_llm.models.auto import build_model, config_from_yaml_section
from mindspore_llm.train.checkpointing import save_model_directory
from tests.ckpt_helpers import run

SECTIONS = {
    # Qwen3 with its attention_bias switch on: the one field whose HF name differs from ours.
    "qwen3": {"architecture": "Qwen3ForCausalLM", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "qkv_bias": True, "o_bias": True, "qk_norm": True, "tie_word_embeddings": True,
              "rope": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}},
    "deepseek_v3": {"architecture": "DeepseekV3ForCausalLM", "vocab_size": 96, "hidden_size": 32,
                    "intermediate_size": 48, "moe_intermediate_size": 16, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                    "qk_rope_head_dim": 8, "v_head_dim": 8, "first_k_dense_replace": 1, "n_routed_experts": 4,
                    "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1},
}


def perturbed_model(config, seed=0):
    """`build_model(config)` with every parameter (buffers included) set to random values unlike any init."""
    model = build_model(config)
    rng = np.random.default_rng(seed)
    for param in model.get_parameters():
        value = rng.standard_normal(param.shape).astype(np.float32)
        if param.name.endswith(("norm.weight", "layernorm.weight")):
            value = 1.0 + 0.3 * value  # q_norm, k_norm, input/post-attention, kv_a/q_a and final norms
        else:
            value = 0.2 * value  # weights, biases, e_score_correction_bias (it decides the routing)
        param.set_data(ms.Tensor(value, param.dtype))
    return model


# max|Δ| / max|logit| measured against transformers 5.24 (fp32, eager attention): qwen3 1.0e-6, deepseek_v3 1.5e-6
RELATIVE_TOLERANCE = 1e-5


@pytest.mark.parametrize("family", sorted(SECTIONS))
def test_trained_model_directory_exports_to_transformers(family, tmp_path):
    config = config_from_yaml_section(SECTIONS[family], "train.yaml: model")
    model = perturbed_model(config)
    save_model_directory(model, config, tmp_path / "final")
    result = run("ms2hf", tmp_path / "final", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    reference, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager", output_loading_info=True)
    assert {key: list(value) for key, value in info.items() if value} == {}  # missing, unexpected, mismatched
    input_ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 10))
    ours = model(ms.Tensor(input_ids, ms.int32)).asnumpy()
    with torch.no_grad():
        expected = reference(torch.tensor(input_ids)).logits.numpy()
    print(f"{family}: max|Δ| / max|logit| = {np.abs(ours - expected).max() / np.abs(expected).max():.2g}")
    assert np.abs(ours - expected).max() <= RELATIVE_TOLERANCE * np.abs(expected).max()


def test_training_checkpoint_exports_without_its_optimizer_state(tmp_path):
    config = config_from_yaml_section(SECTIONS["qwen3"], "train.yaml: model")
    model = build_model(config)
    save_model_directory(model, config, tmp_path / "final")
    entries = [{"name": p.name, "data": p} for p in model.get_parameters()]
    entries += [{"name": "optimizer.exp_avg." + p.name, "data": p} for p in model.get_parameters()]
    entries.append({"name": "loss_scale.scale", "data": ms.Tensor(1.0, ms.float32)})
    (tmp_path / "rank_0").mkdir()
    ms.save_checkpoint(entries, str(tmp_path / "rank_0" / "train_state.ckpt"))
    result = run("ms2hf", tmp_path / "rank_0", tmp_path / "hf", "--config", tmp_path / "final")
    assert result.exit_code == 0, result.output
    assert run("verify", tmp_path / "hf", tmp_path / "final").exit_code == 0
