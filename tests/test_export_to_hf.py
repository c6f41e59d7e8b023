"""A model trained from inline YAML dimensions leaves as a directory that `msllm-ckpt ms2hf` exports and that
transformers loads with the same logits (fp32, max|Δ| <= 1e-4 x max|logit|)."""
import mindspore as ms
import numpy as np
import pytest
import torch
import transformers

from mindspore_llm.models.auto import build_model
from mindspore_llm.models.config import config_from_yaml_section
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


@pytest.mark.parametrize("family", sorted(SECTIONS))
def test_trained_model_directory_exports_to_transformers(family, tmp_path):
    config = config_from_yaml_section(SECTIONS[family], "train.yaml: model")
    model = build_model(config)
    save_model_directory(model, config, tmp_path / "final")
    result = run("ms2hf", tmp_path / "final", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    input_ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 10))
    ours = model(ms.Tensor(input_ids, ms.int32)).asnumpy()
    with torch.no_grad():
        expected = reference(torch.tensor(input_ids)).logits.numpy()
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()


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
