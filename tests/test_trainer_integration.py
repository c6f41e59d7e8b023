"""The trainer with the pieces built beside it: online distillation, DeepSeek-V3 MoE balancing, pipeline parallel.

Distillation: a tiny Qwen3 student learns from a frozen 1-layer Qwen2 teacher whose logits are peaked (embedding
std 0.25: the KL to the student's near-uniform start is 2.8), with kd_lambda 1 (the loss is the KD term alone);
checkpoints and the final directory hold the student only; offline with every logit stored equals online.
DeepSeek-V3: the shipped configs/tiny_deepseek_v3.yaml, shortened; every
step logs each MoE layer's expert load, the selection biases move, and one update counts the tokens of all the
step's micro-batches (rows x seq_length x top_k per layer). Pipeline parallel needs Ascend and HCCL: the tests build
everything the Ascend path builds that constructs without them (MindSpore's Pipeline, PipelineGradReducer and
AutoParallel around a tiny model) and check the trainer's refusals.
"""
import json

import mindspore as ms
import numpy as np
import pytest
from click.testing import CliRunner

from mindspore_llm.cli import main as cli_main
from mindspore_llm.common import ConfigError
from mindspore_llm.models.auto import AutoModelForCausalLM, build_model
from mindspore_llm.models.config import config_from_yaml_section
from mindspore_llm.models.moe import moe_blocks
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.context import SEMI_AUTO, ParallelContext
from mindspore_llm.parallel.plan import apply_plan
from mindspore_llm.train import checkpointing
from mindspore_llm.train.config import load_train_config, train_config_from_dict
from mindspore_llm.train.trainer import Trainer
from tests.test_trainer import ASSETS, REPO, tiny_raw_config, weights, write_yaml

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


# the student: Qwen3 without biases, as in test_data_parallel.py (a k_proj bias has zero true gradient, so AdamW would
# turn rounding noise into full-size updates, and offline vs online is compared step by step)
STUDENT = {"architecture": "Qwen3ForCausalLM", "head_dim": 16, "qkv_bias": False, "o_bias": False, "qk_norm": True}


@pytest.fixture(scope="module")
def distilled(module_dir, teacher_dir):
    raw = tiny_raw_config(module_dir / "distill", model=STUDENT, train={"steps": 24, "gradient_accumulation_steps": 1},
                          checkpoint={"every_n_steps": 12},
                          distill={"teacher": str(teacher_dir), "temperature": 1.0, "kd_lambda": 1.0})
    trainer = Trainer(train_config_from_dict(raw, "distill.yaml"))
    return trainer, trainer.run()


def test_distillation_lowers_the_kd_loss(distilled):
    _, result = distilled
    losses = [loss for _, loss in result.losses]
    print("KD loss per step:", [round(x, 3) for x in losses])
    # KL(peaked teacher || near-uniform student) = 2.80; the label cross-entropy alone would start at ~ln 512 = 6.2
    assert 2.0 < losses[0] < 4.0
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


def test_offline_distillation_with_every_logit_stored_equals_online(distilled, module_dir, teacher_dir):
    """`msllm distill-topk` with k = the vocabulary stores every teacher logit, so the offline loss is the online
    one: the first 4 steps of the online run again, as micro-batch 1 x accumulation 2 (the stored rows are split
    into micro-batches with their sequences). Tolerance 1e-5 relative (the KL sums run in another order)."""
    _, online = distilled
    logits = module_dir / "teacher_top512.safetensors"
    raw = tiny_raw_config(module_dir / "offline", model=STUDENT, train={"steps": 4, "micro_batch_size": 1},
                          checkpoint={"every_n_steps": 4}, schedule={"total_steps": 24},  # the online run's rates
                          distill={"mode": "offline", "teacher": str(teacher_dir), "teacher_logits": str(logits),
                                   "top_k": 512, "temperature": 1.0, "kd_lambda": 1.0})
    path = write_yaml(module_dir / "offline.yaml", raw)
    written = CliRunner().invoke(cli_main, ["distill-topk", str(path), str(logits), "--quiet"])
    assert written.exit_code == 0, written.output
    result = Trainer(load_train_config(path)).run()
    assert [step for step, _ in result.losses] == [1, 2, 3, 4]
    expected = dict(online.losses)
    for step, loss in result.losses:
        assert loss == pytest.approx(expected[step], rel=1e-5), (step, loss, expected[step])
    print("offline - online, relative:", [abs(loss / expected[step] - 1) for step, loss in result.losses])


def test_offline_logits_of_other_data_are_refused(distilled, module_dir):
    raw = tiny_raw_config(module_dir / "offline_bad", model=STUDENT, data={"seq_length": 64},
                          distill={"mode": "offline", "teacher_logits": str(module_dir / "teacher_top512.safetensors"),
                                   "top_k": 512})
    with pytest.raises(ConfigError, match="distill.teacher_logits: .* sequences of 128 tokens, which does not match"):
        Trainer(train_config_from_dict(raw, "offline.yaml"))


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


def test_overflowed_step_leaves_the_expert_biases(deepseek):
    """The trainer's balancing after a step the optimizer skipped: load statistics logged, biases unchanged,
    the step's counts discarded."""
    trainer, _ = deepseek
    batch = next(trainer.dataset.batches(trainer.rank_batch))
    trainer.compiled(*(ms.Tensor(batch[key]) for key in ("input_ids", "labels", "attention_mask", "position_ids")))
    biases = {name: block.gate.e_score_correction_bias.asnumpy().copy() for name, block in moe_blocks(trainer.model)}
    stats = trainer._balance_experts(overflowed=True)
    assert stats["moe/1/max_over_mean_load"] >= 1.0 and "moe/1/dropped_slots" in stats
    for name, block in moe_blocks(trainer.model):
        np.testing.assert_array_equal(block.gate.e_score_correction_bias.asnumpy(), biases[name])
        assert not block.tokens_per_expert.asnumpy().any()


# -- pipeline parallel (Ascend): what constructs without HCCL ------------------------------------------------------

PIPELINE = ParallelConfig(data_parallel=1, model_parallel=2, pipeline_stages=2, micro_batch_num=4,
                          optimizer_shard=True)


def pipeline_context(rank=2, world_size=4):
    """What setup_parallel returns on rank `rank` of a dp 1 x mp 2 x pp 2 Ascend job (not startable here)."""
    return ParallelContext(rank, world_size, SEMI_AUTO, "test", 0, 1, PIPELINE.data_parallel,
                           PIPELINE.pipeline_stages, PIPELINE.micro_batch_num, PIPELINE.optimizer_shard)


def test_pipeline_step_is_assembled_from_mindspore_pipeline_pieces(tmp_path):
    from mindspore.parallel.auto_parallel import AutoParallel
    from mindspore.parallel.nn import Pipeline

    from mindspore_llm.parallel.context import PipelineGradReducer
    from mindspore_llm.train.optim import AdamW, OptimizerConfig
    from mindspore_llm.train.schedule import ScheduleConfig
    from mindspore_llm.train.step import PrecisionConfig, TrainStep

    context = pipeline_context()
    assert context.main_rank == 2 and context.is_main  # the first rank of the last stage logs (it has the loss)
    assert not pipeline_context(rank=0).is_main
    model = build_model(config_from_yaml_section({**TEACHER, "num_hidden_layers": 2, "num_key_value_heads": 2},
                                                 "model"))
    apply_plan(model, PIPELINE)
    assert [layer.pipeline_stage for layer in model.model.layers] == [0, 1]
    assert (model.model.embed_tokens.pipeline_stage, model.lm_head.pipeline_stage) == (0, 1)
    optimizer = AdamW(model.trainable_params(), OptimizerConfig(), ScheduleConfig(total_steps=10))
    wrappers = context.step_parallelism(optimizer.parameters)
    assert isinstance(wrappers["grad_reducer"], PipelineGradReducer) and wrappers["grad_reducer"].opt_shard
    step = TrainStep(model, optimizer, PrecisionConfig(), 1, 1.0, **wrappers)
    assert isinstance(step.differentiated.loss, Pipeline) and step.differentiated.loss.micro_size == 4
    assert step.all_reduce is None  # semi-auto: every rank holds the full batch's token count
    # the accumulation buffers are parameters of the step, but never checkpointed
    buffers = [p.name for p in step.get_parameters() if p.name.startswith("accu_grads.")]
    assert len(buffers) == len(optimizer.parameters) and not any(checkpointing.saved(n) for n in buffers)
    net = context.wrap_step(step, tmp_path / "strategy", PIPELINE)
    assert isinstance(net, AutoParallel) and net._pipeline_stages == 2


def test_trainer_pipeline_settings_are_checked_before_anything_is_built(tmp_path, monkeypatch):
    from mindspore_llm.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "setup_parallel", lambda parallel, device: pipeline_context())
    with pytest.raises(ConfigError, match="train.gradient_accumulation_steps: 2 with pipeline stages"):
        Trainer(train_config_from_dict(tiny_raw_config(tmp_path), "pp.yaml"))
    raw = tiny_raw_config(tmp_path, train={"gradient_accumulation_steps": 1, "global_batch_size": 2})
    with pytest.raises(ConfigError, match=r"global_batch_size: 2 != micro_batch_size 2 x gradient_accumulation_steps "
                                          r"1 x parallel.micro_batch_num 4 x data-parallel ranks 1 = 8"):
        Trainer(train_config_from_dict(raw, "pp.yaml"))
    # offline distillation's teacher top-k would pass the pipeline as tensors, but the distillation loss (and an
    # online teacher) have no pipeline stage
    raw = tiny_raw_config(tmp_path, train={"gradient_accumulation_steps": 1},
                          distill={"mode": "offline", "teacher_logits": "top.safetensors", "top_k": 4})
    with pytest.raises(ConfigError, match=r"distill: distillation \(online or offline\) does not run with pipeline"):
        Trainer(train_config_from_dict(raw, "pp.yaml"))


def test_cpu_stand_alone_refuses_model_and_pipeline_parallel():
    from mindspore_llm.parallel.context import setup_parallel

    with pytest.raises(ConfigError, match="start the job with msrun"):
        setup_parallel(PIPELINE, "CPU")
