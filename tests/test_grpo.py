"""GRPO as a user runs it: the shipped configs/tiny_qwen_grpo.yaml from the tiny SFT model of the README's main job,
reward rising, resume, metrics and rollout samples, the LoRA reference policy, config errors, `msllm eval`.

The SFT model is trained once for the module (configs/tiny_qwen_sft.yaml as shipped); the GRPO run is the shipped
config with its output redirected and a checkpoint at step 26 (for the resume test)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mindspore_llm.cli import main as cli_main
from mindspore_llm.common import ConfigError
from mindspore_llm.generation import position_ids
from mindspore_llm.models.auto import AutoModelForCausalLM
from mindspore_llm.rl.grpo import CompletionLogProbs, adapters_disabled
from mindspore_llm.train import checkpointing
from mindspore_llm.train.config import load_train_config
from mindspore_llm.train.grpo import GRPOTrainer
from mindspore_llm.train.trainer import Trainer
from tests.test_data_parallel import free_port

REPO = Path(__file__).resolve().parents[1]
GRPO_CONFIG = REPO / "configs" / "tiny_qwen_grpo.yaml"
TASK = REPO / "mindspore_llm" / "assets" / "tiny" / "reverse_words.jsonl"
STEPS = 30  # the shipped config's


@pytest.fixture(scope="module")
def sft_model(module_dir):
    result = Trainer(load_train_config(REPO / "configs" / "tiny_qwen_sft.yaml",
                                       [f"output_dir={module_dir / 'sft'}", "logging.progress_bar=false",
                                        "logging.tensorboard=false"])).run()
    return result.final_model_dir


def grpo_config(sft_model, output_dir, *overrides):
    return load_train_config(GRPO_CONFIG, [f"model.path={sft_model}", f"output_dir={output_dir}",
                                           "checkpoint.every_n_steps=13", "logging.progress_bar=false", *overrides])


@pytest.fixture(scope="module")
def straight(sft_model, module_dir):
    trainer = GRPOTrainer(grpo_config(sft_model, module_dir / "grpo"))
    return trainer, trainer.run()


def records(result) -> list[dict]:
    lines = (result.metrics_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_reward_rises_from_the_sft_model(straight):
    _, result = straight
    rewards = [r["reward"] for r in records(result)]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    print(f"mean reward over steps 1-5: {first:.3f}, over steps {STEPS - 4}-{STEPS}: {last:.3f}")
    assert first < 0.5 and last > first + 0.12, rewards


def test_resume_continues_with_the_same_rewards(straight, sft_model, tmp_path):
    trainer, result = straight
    checkpoint = checkpointing.step_dir(trainer.config.checkpoint_dir, STEPS - 4)
    resumed = GRPOTrainer(grpo_config(sft_model, tmp_path, f"checkpoint.resume={checkpoint}"))
    assert resumed.start_step == STEPS - 4
    after = records(resumed.run())
    expected = {r["step"]: r for r in records(result)}
    assert [r["step"] for r in after] == list(range(STEPS - 3, STEPS + 1))
    for record in after:
        reference = expected[record["step"]]
        assert record["reward"] == reference["reward"]  # the same rollouts: sampled from the same seed and weights
        assert record["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-9)


def test_metrics_curve_and_rollout_samples(straight):
    trainer, result = straight
    last = records(result)[-1]
    for key in ("loss", "reward", "reward_std", "reward/exact_match/mean", "reward/exact_match/std", "accuracy",
                "kl", "clip_fraction", "entropy", "completion_length", "rollout_tokens_per_s", "tokens_per_s",
                "grad_norm", "lr"):
        assert np.isfinite(last[key]), key
    assert last["accuracy"] == last["reward/exact_match/mean"] == last["reward"]  # one 0/1 reward of weight 1
    assert last["kl"] > 0 and 0 <= last["clip_fraction"] < 1 and 1 <= last["completion_length"] <= 20
    assert (result.metrics_dir / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in (result.metrics_dir / "rollouts" / f"step_{STEPS:08d}.jsonl")
               .read_text().splitlines()]
    assert len(samples) == 8 and {"prompt", "completion", "answer", "reward", "advantage"} <= set(samples[0])
    assert len({s["prompt"] for s in samples}) == 2  # the first two groups of 4 rollouts
    assert abs(np.mean([s["advantage"] for s in samples])) < 1e-5


def test_two_msrun_processes_equal_one_process(sft_model, tmp_path):
    """DATA_PARALLEL: 2 msrun ranks with 1 prompt x 4 rollouts each per step equal 1 process with 2 prompts (4 rows
    per generate call, 2 accumulated micro-batches), prompts in file order: the same rollouts (seeded by their row in
    the global batch), so the same rewards; losses within 1e-5 relative, final weights within 1e-5 relative in norm
    (summation order differs)."""
    from safetensors.numpy import load_file

    raw = yaml.safe_load(GRPO_CONFIG.read_text())
    raw["model"]["path"] = str(sft_model)
    raw["grpo"].update(prompts=str(TASK), shuffle=False, generation_batch_size=4)
    raw["train"].update(steps=2, micro_batch_size=4, gradient_accumulation_steps=1)
    raw["logging"].update(tensorboard=False, progress_bar=False)
    raw["output_dir"] = str(tmp_path / "two")
    config = tmp_path / "dp.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}", "--join=True",
               f"--log_dir={tmp_path / 'msrun_logs'}", "python", "-m", "mindspore_llm.cli", "train", str(config)]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    launched = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    logs = {p.name: p.read_text() for p in (tmp_path / "msrun_logs").glob("worker_*.log")}
    assert launched.returncode == 0, launched.stdout[-3000:] + str({k: v[-2000:] for k, v in logs.items()})
    assert "DATA_PARALLEL over 2 CPU processes" in logs["worker_0.log"]

    one = GRPOTrainer(load_train_config(config, [f"output_dir={tmp_path / 'one'}",
                                                 "train.gradient_accumulation_steps=2"]))
    one_records = records(one.run())
    two_records = [json.loads(line) for line in (tmp_path / "two" / "logs" / "metrics.jsonl").read_text()
                   .splitlines()]
    assert [r["reward"] for r in two_records] == [r["reward"] for r in one_records]
    assert [r["completion_length"] for r in two_records] == [r["completion_length"] for r in one_records]
    np.testing.assert_allclose([r["loss"] for r in two_records], [r["loss"] for r in one_records], rtol=1e-5)
    two_weights = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    one_weights = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    for name, value in one_weights.items():
        assert np.linalg.norm(two_weights[name] - value) <= 1e-5 * np.linalg.norm(value), name


def test_lora_reference_is_the_base_model_without_a_copy(sft_model, tmp_path):
    """With LoRA the reference log-probabilities come from the policy's own Cells with the adapters off: equal to
    the SFT model's (within 1e-6, measured 0), while the policy with trained adapters differs."""
    trainer = GRPOTrainer(grpo_config(sft_model, tmp_path, "lora.rank=4", "lora.target_modules=[q_proj,v_proj]"))
    assert trainer.reference_log_probs.model is trainer.model  # no second model
    for param in trainer.model.trainable_params():
        if ".lora_B" in param.name:  # trained adapters: nonzero B
            param.set_data(ms.Tensor(np.full(param.shape, 0.05, np.float32)))
    prompts = [list(p.ids) for p in trainer.dataset.prompts[:2]]
    generation = trainer.generator.generate(prompts, seed=0)
    mask = np.concatenate([generation.prompt_mask, generation.completion_mask], 1)
    inputs = [ms.Tensor(a) for a in (np.concatenate([generation.prompt_ids, generation.tokens], 1), mask,
                                     position_ids(mask))]
    with adapters_disabled(trainer.model):
        reference = trainer.reference_log_probs(*inputs)[0].asnumpy()
    policy = CompletionLogProbs(trainer.model, trainer.prompt_length, 1.0)(*inputs)[0].asnumpy()
    base = AutoModelForCausalLM.from_pretrained(sft_model)
    expected = CompletionLogProbs(base, trainer.prompt_length, 1.0)(*inputs)[0].asnumpy()
    counted = generation.completion_mask.astype(bool)
    assert np.abs(reference - expected)[counted].max() <= 1e-6
    assert np.abs(policy - expected)[counted].max() > 1e-2
    again = trainer.reference_log_probs(*inputs)[0].asnumpy()  # outside the context: still the base (compiled so)
    np.testing.assert_array_equal(again, reference)


@pytest.mark.parametrize("overrides,message", [
    (["grpo=null"], "grpo: kind grpo needs the grpo section"),
    (["train.micro_batch_size=6", "train.gradient_accumulation_steps=1"],
     r"6 rollouts per rank and step must be a multiple of grpo.num_generations \(4\)"),
    (["grpo.max_prompt_length=16"], r"grpo.max_prompt_length: .*reverse_words.jsonl:1 renders to 46 tokens"),
    (["grpo.rewards=[{name: accurcy}]"], r"grpo.rewards\[0\]: name: 'accurcy' is neither a built-in reward"),
    (["grpo.loss_aggregation=mean"], r"grpo.loss_aggregation: 'mean' is not one of"),
    (["grpo.num_generations=1"], "num_generations: must be >= 2"),
])
def test_config_errors_name_the_field(sft_model, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        GRPOTrainer(grpo_config(sft_model, tmp_path, *overrides))


def test_a_data_section_is_refused(tmp_path):
    raw = yaml.safe_load(GRPO_CONFIG.read_text())
    raw["data"] = {"kind": "sft", "path": "x.jsonl", "tokenizer": "t", "seq_length": 8}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(cli_main, ["train", str(path)])
    assert result.exit_code == 2 and "kind grpo reads its prompts from grpo.prompts" in result.output


def test_eval_reports_pass_at_k_and_writes_every_sample(sft_model, tmp_path):
    output = tmp_path / "results.jsonl"
    result = CliRunner().invoke(cli_main, ["eval", str(sft_model), "--data", str(TASK), "--reward", "exact_match",
                                           "--num-samples", "4", "--max-new-tokens", "20", "--batch-size", "40",
                                           "--output", str(output), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 20 * 4 and [r["sample"] for r in rows[:4]] == [0, 1, 2, 3]
    passed = np.array([r["passed"]["exact_match"] for r in rows]).reshape(20, 4)
    assert f"exact_match/pass@1: {passed.mean():.4f}" in result.output
    assert f"exact_match/pass@4: {passed.any(1).mean():.4f}" in result.output
    assert 0 < passed.mean() < passed.any(1).mean() <= 1
