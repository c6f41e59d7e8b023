"""The trainer with the pieces built beside it: online distillation and DeepSeek-V3 MoE balancing.

Distillation: a tiny Qwen2 student learns from a frozen teacher whose logits are peaked (embedding std 1: the
KL to the student's near-uniform start is large), with kd_lambda 1 (the loss is the KD term alone); checkpoints and
the final directory hold the student only. DeepSeek-V3: the shipped configs/tiny_deepseek_v3.yaml, shortened; every
step logs each MoE layer's expert load, the selection biases move, and one update counts the tokens of all the
step's micro-batches (rows x seq_length x top_k per layer).
"""
import json

import numpy as np
import mindspore as ms
import pytest

from mindspore_llm.config_utils import ConfigError
from mindspore_llm.models.auto import AutoModelForCausalLM, build_model, config_from_yaml_section
from mindspore_llm.models.deepseek_v3 import moe_blocks
from mindspore_llm.train import checkpointing
from mindspore_llm.train.config import load_train_config, train_config_from_dict
from mindspore_llm.train.trainer import Trainer
from tests.test_trainer import ASSETS, REPO, tiny_raw_config, weights

TEACHER = dict(architecture="Qwen2ForCausalLM", vocab_size=512, hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
               tie_word_embeddings=True)


@pytest.fixture(scope="module")
def teacher_dir(module_dir):
    config = config_from_yaml_section(TEACHER, "teacher")
    teacher = build_model(config)
    embedding = teacher.parameters_dict()["model.embed_tokens.weight"]
    rng = np.random.default_rng(3)
    embedding.set_data(ms.Tensor(0.25 * rng.standard_normal(embedding.shape).astype(np.float32)))
    return checkpointing.save_model_directory(teacher, config, module_dir / "teacher", tokenizer=ASSETS)


@pytest.fixture(scope="module")
def distilled(module_dir, teacher_dir):
    raw = tiny_raw_config(module_dir / "distill", train={"steps": 24, "gradient_accumulation_steps": 1},
                          checkpoint={"every_n_steps": 12},
                          distill={"teacher": str(teacher_dir), "temperature": 1.0, "kd_lambda": 1.0})
    trainer = Trainer(train_config_from_dict(raw, "distill.yaml"))
    return trainer, trainer.run()


def test_distillation_lowers_the_kd_loss(distilled):
    _, result = distilled
    losses = [loss for _, loss in result.losses]
    print("KD loss per step:", [round(x, 3) for x in losses])
    assert losses[0] > 2.0  # KL(peaked teacher || near-uniform student)
    assert np.mean(losses[-4:]) < 0.75 * losses[0], losses  # 24 steps: 2.80 -> ~1.9


def test_distillation_checkpoints_and_final_directory_hold_the_student_only(distilled):
    trainer, result = distilled
    assert any(p.name.startswith("teacher.") for p in trainer.step_cell.get_parameters())
    checkpoint = checkpointing.latest_checkpoint(trainer.config.checkpoint_dir)
    stored = ms.load_checkpoint(str(checkpoint / "rank_0" / checkpointing.TRAIN_STATE))
    assert not [name for name in stored if "teacher" in name]
    assert "model.embed_tokens.weight" in stored and "optimizer.exp_avg.model.embed_tokens.weight" in stored
    state = checkpointing.load_checkpoint(checkpoint, trainer.step_cell)  # the student + optimizer restore
    assert state["step"] == 24
    loaded = AutoModelForCausalLM.from_pretrained(result.final_model_dir)
    assert loaded.config.hidden_size == 64  # the student's, not the teacher's 32
    final, student = weights(loaded), weights(trainer.model)
    assert set(final) == set(student)
    for name, value in student.items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)
    assert (result.final_model_dir / "tokenizer.json").is_file()  # usable as the next run's teacher


def test_offline_distillation_is_refused_naming_the_field(tmp_path):
    raw = tiny_raw_config(tmp_path, distill={"mode": "offline", "teacher_logits": "topk.safetensors", "top_k": 8})
    with pytest.raises(ConfigError, match="distill.mode: the trainer runs online distillation only"):
        train_config_from_dict(raw, "distill.yaml")


# -- DeepSeek-V3 --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deepseek(module_dir):
    config = load_train_config(REPO / "configs" / "tiny_deepseek_v3.yaml",
                               ["train.steps=8", "checkpoint.every_n_steps=8", "logging.tensorboard=false",
                                "logging.plot=false", "logging.progress_bar=false",
                                f"output_dir={module_dir / 'deepseek'}"])
    trainer = Trainer(config)
    return trainer, trainer.run()


def test_tiny_deepseek_v3_config_trains_and_logs_expert_load(deepseek):
    trainer, result = deepseek
    losses = [loss for _, loss in result.losses]
    assert losses[0] > 6.0 and np.mean(losses[-2:]) < losses[0] - 0.3, losses
    rows = [json.loads(line) for line in (result.metrics_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))
    for row in rows:  # layer 0 is dense (first_k_dense_replace 1)
        assert row["moe/1/max_over_mean_load"] >= 1.0 and row["moe/2/max_over_mean_load"] >= 1.0
        assert "moe/0/max_over_mean_load" not in row
    for _, block in moe_blocks(trainer.model):
        bias = block.gate.e_score_correction_bias.asnumpy()
        # 8 updates of ±γ each (γ = 0.01): every bias moved, by at most 8 γ
        assert np.abs(bias).max() <= 8 * 0.01 + 1e-6 and np.abs(bias).sum() > 0
        assert not block.tokens_per_expert.asnumpy().any()  # reset by the last update
    loaded = AutoModelForCausalLM.from_pretrained(result.final_model_dir)
    for name, value in weights(trainer.model).items():
        if name.endswith("e_score_correction_bias"):
            np.testing.assert_array_equal(weights(loaded)[name], value, err_msg=name)


def test_bias_update_counts_every_micro_batch(deepseek):
    trainer, _ = deepseek
    config = trainer.config
    assert config.train.gradient_accumulation_steps == 2
    batch = next(trainer.dataset.batches(trainer.rank_batch))
    trainer.compiled(*(ms.Tensor(batch[key]) for key in ("input_ids", "labels", "attention_mask", "position_ids")))
    expected = trainer.rank_batch * config.data.seq_length * trainer.model_config.num_experts_per_tok
    for _, block in moe_blocks(trainer.model):
        assert block.tokens_per_expert.asnumpy().sum() == expected
