"""The trainer as a user runs it: config errors, resume, crash-safe checkpoints, SIGTERM, metrics, falling loss.

Reference for resume: the same job run without interruption; losses after resuming must equal it within 1e-6
relative (the same compiled step on the same restored state and batches: in practice bit-identical).
"""
import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mindspore_llm.cli import main as cli_main
from mindspore_llm.common import ConfigError
from mindspore_llm.models.auto import AutoModelForCausalLM
from mindspore_llm.train import checkpointing
from mindspore_llm.train.config import load_train_config, train_config_from_dict
from mindspore_llm.train.metrics import LossScaleWatch
from mindspore_llm.train.trainer import Trainer

ASSETS = Path(__file__).resolve().parents[1] / "mindspore_llm" / "assets" / "tiny"
REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def tiny_raw_config(output_dir, **sections) -> dict:
    """A 2-layer, hidden-64 Qwen2 on the shipped tokenizer (vocab 512) and SFT data, 128-token rows."""
    raw = {
        "model": dict(architecture="Qwen2ForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True),
        "data": dict(kind="sft", path=str(ASSETS / "sft.jsonl"), tokenizer=str(ASSETS), seq_length=128,
                     packing=True),
        "schedule": dict(lr=3e-3, min_lr=3e-4, warmup_steps=2, decay="cosine"),
        "train": dict(micro_batch_size=2, gradient_accumulation_steps=2, steps=STEPS, seed=7),
        "checkpoint": dict(every_n_steps=4, keep_last=5),
        "logging": dict(progress_bar=False),
        "output_dir": str(output_dir),
    }
    for name, values in sections.items():
        raw[name] = {**raw[name], **values} if isinstance(raw.get(name), dict) else values
    return raw


def tiny_config(output_dir, **sections):
    return train_config_from_dict(tiny_raw_config(output_dir, **sections), "test")


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def straight(module_dir):
    """The uninterrupted reference run: 8 steps, checkpoints at 4 and 8."""
    trainer = Trainer(tiny_config(module_dir / "straight"))
    return trainer, trainer.run()


def weights(model) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().copy() for p in model.get_parameters()}


# -- config -------------------------------------------------------------------------------------------------------

def test_unknown_key_is_an_error_naming_it(tmp_path):
    raw = tiny_raw_config(tmp_path, optimizer={"betaa1": 0.9})
    with pytest.raises(ConfigError, match=r"optimizer: unknown key\(s\) betaa1"):
        train_config_from_dict(raw, "train.yaml")


def test_bad_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.yaml.train.micro_batch_size: expected an integer"):
        train_config_from_dict(tiny_raw_config(tmp_path, train={"micro_batch_size": "four"}), "train.yaml")
    with pytest.raises(ConfigError, match=r"model.*hidden_size"):
        train_config_from_dict(tiny_raw_config(tmp_path, model={"hidden_size": -1}), "train.yaml")


def test_set_overrides_parse_yaml_scalars(tmp_path):
    path = write_yaml(tmp_path / "train.yaml", tiny_raw_config(tmp_path))
    config = load_train_config(path, ["schedule.lr=1e-3", "train.steps=3", "logging.tensorboard=false",
                                      "optimizer.clip_grad_norm=null"])
    assert (config.schedule.lr, config.train.steps, config.logging.tensorboard) == (1e-3, 3, False)
    assert config.optimizer.clip_grad_norm is None


def test_cli_reports_config_errors_with_exit_2(tmp_path):
    path = write_yaml(tmp_path / "train.yaml", tiny_raw_config(tmp_path))
    result = CliRunner().invoke(cli_main, ["train", str(path), "--set", "train.stepz=3"])
    assert result.exit_code == 2
    assert "unknown key(s) stepz" in result.output
    result = CliRunner().invoke(cli_main, ["train", str(path), "--set", "precision.compute_dtype=fp8"])
    assert result.exit_code == 2 and "precision.compute_dtype" in result.output


def test_global_batch_must_match_micro_accumulation_and_ranks(tmp_path):
    config = tiny_config(tmp_path, train={"global_batch_size": 8})
    assert config.train.check_global_batch(2) == 8
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 8 != micro_batch_size 2 x "
                                          r"gradient_accumulation_steps 2 x data-parallel ranks 1 = 4"):
        config.train.check_global_batch(1)


# -- training -----------------------------------------------------------------------------------------------------

def test_short_run_lowers_the_loss(straight):
    _, result = straight
    assert result.status == "completed" and result.steps == STEPS
    losses = [loss for _, loss in result.losses]
    assert losses[0] > 6.0  # ~ln(512): an untrained model
    assert np.mean(losses[-2:]) < losses[0] - 0.5  # 8 steps: ~6.25 -> ~5.55


def test_resume_equals_the_uninterrupted_run(straight, tmp_path):
    trainer, result = straight
    checkpoint = checkpointing.step_dir(trainer.config.checkpoint_dir, 4)
    resumed = Trainer(tiny_config(tmp_path, checkpoint={"resume": str(checkpoint)}))
    assert resumed.start_step == 4
    after = resumed.run()
    expected = dict(result.losses)
    assert [s for s, _ in after.losses] == [5, 6, 7, 8]
    for step, loss in after.losses:
        assert loss == pytest.approx(expected[step], rel=1e-6)
    final, reference = weights(resumed.model), weights(trainer.model)
    for name in reference:
        np.testing.assert_allclose(final[name], reference[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_crash_while_saving_leaves_the_previous_checkpoint(straight, tmp_path, monkeypatch):
    trainer, _ = straight
    calls = []
    write = checkpointing.write_trainer_state

    def fail_on_second_save(path, state):
        calls.append(state["step"])
        if len(calls) == 2:  # weights of step 8 already written, then the "disk" fails
            raise OSError("injected failure while saving")
        write(path, state)

    monkeypatch.setattr(checkpointing, "write_trainer_state", fail_on_second_save)
    crashed = Trainer(tiny_config(tmp_path))
    with pytest.raises(OSError, match="injected"):
        crashed.run()
    directory = crashed.config.checkpoint_dir
    assert [p.name for p in checkpointing.list_checkpoints(directory)] == ["step_00000004"]
    assert not any(p.name.endswith(".partial") for p in (directory / "step_00000008").iterdir())
    # the survivor restores the state the uninterrupted run had at step 4
    state = checkpointing.load_checkpoint(checkpointing.latest_checkpoint(directory), crashed.step_cell)
    assert state["step"] == 4 and state["sample_index"] == 4 * 4
    reference = ms.load_checkpoint(str(checkpointing.step_dir(trainer.config.checkpoint_dir, 4) / "rank_0" /
                                       checkpointing.TRAIN_STATE))
    for name, value in weights(crashed.step_cell).items():
        np.testing.assert_array_equal(value, reference[name].asnumpy(), err_msg=name)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    for step in (2, 4, 6):
        (checkpointing.step_dir(tmp_path, step) / "rank_0").mkdir(parents=True)
        for name in (checkpointing.TRAIN_STATE, checkpointing.TRAINER_STATE):
            (checkpointing.step_dir(tmp_path, step) / "rank_0" / name).write_text("{}")
    checkpointing.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]


def test_fresh_run_refuses_a_directory_with_checkpoints(straight):
    trainer, _ = straight
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        Trainer(tiny_config(trainer.config.output_dir))


def test_final_model_directory_loads_with_from_pretrained(straight):
    trainer, result = straight
    loaded = AutoModelForCausalLM.from_pretrained(result.final_model_dir)
    for name, value in weights(trainer.model).items():
        np.testing.assert_array_equal(weights(loaded)[name], value, err_msg=name)
    assert json.loads((result.final_model_dir / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]


def test_lora_from_a_model_directory_trains_only_the_adapters(straight, tmp_path):
    _, result = straight
    raw = tiny_raw_config(tmp_path, train={"steps": 2},
                          lora={"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]})
    raw["model"] = {"path": str(result.final_model_dir)}
    trainer = Trainer(train_config_from_dict(raw, "lora.yaml"))
    before = weights(trainer.model)
    lora_result = trainer.run()
    after = weights(trainer.model)
    adapters = [name for name in after if ".lora_" in name]
    assert len(adapters) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for name, value in before.items():
        if ".lora_B" in name:
            assert not np.array_equal(after[name], value), name  # B starts at zero and moves
        elif ".lora_" not in name:
            np.testing.assert_array_equal(after[name], value, err_msg=name)  # the base stays frozen
    assert lora_result.adapter
    assert {p.name for p in lora_result.final_model_dir.iterdir()} >= {"adapter_config.json",
                                                                       "adapter_model.safetensors"}


# -- metrics ------------------------------------------------------------------------------------------------------

def read_tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """Parse TFRecord event files (length, masked CRC32C, Event proto, CRC) the way TensorBoard reads them."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto import event_pb2

    def masked(data):
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    scalars: dict[str, dict[int, float]] = {}
    for file in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = file.read_bytes(), 0
        while offset < len(data):
            header = data[offset:offset + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[offset + 8:offset + 12])[0] == masked(header)
            payload = data[offset + 12:offset + 12 + length]
            assert struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])[0] == masked(payload)
            offset += 16 + length
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_metrics_jsonl_tensorboard_and_plot(straight):
    trainer, result = straight
    logs = trainer.config.logging_dir
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "loss_scale", "overflow", "tokens_per_s", "tokens_per_s_per_device"):
        assert all(key in r for r in records), key
    assert [r["loss"] for r in records] == [loss for _, loss in result.losses]
    scalars = read_tensorboard_scalars(logs / "tensorboard")
    assert sorted(scalars["train/loss"]) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([scalars["train/loss"][s] for s in range(1, STEPS + 1)],
                               [r["loss"] for r in records], rtol=1e-6)
    assert "train/grad_norm" in scalars and "train/lr" in scalars
    png = (logs / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_loss_scale_collapse_warns_once_and_suggests_bf16():
    watch = LossScaleWatch(window=10)
    messages = [watch.update(overflow=step % 2 == 0, loss_scale=2.0 ** 10) for step in range(30)]
    warnings = [m for m in messages if m]
    assert len(warnings) == 1 and "bf16" in warnings[0] and messages.index(warnings[0]) == 9
    healthy = LossScaleWatch(window=10)
    assert not any(healthy.update(overflow=step % 10 == 0, loss_scale=2.0 ** 16) for step in range(50))


def test_fp16_overflows_are_skipped_logged_and_warned_about(tmp_path):
    """A loss scale of 1e30 overflows fp16 on every step: each update is skipped and the scale halves; after 20
    such steps the collapse warning (suggesting bf16) is logged."""
    config = tiny_config(tmp_path, train={"steps": 20}, checkpoint={"every_n_steps": 20},
                         precision={"level": "O2", "compute_dtype": "fp16", "loss_scale": "dynamic",
                                    "initial_scale": 1e30})
    trainer = Trainer(config)
    before = weights(trainer.model)
    trainer.run()
    records = [json.loads(line) for line in (config.logging_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(r["overflow"] for r in steps)
    np.testing.assert_allclose([r["loss_scale"] for r in steps], [1e30 / 2 ** k for k in range(1, 21)], rtol=1e-6)
    for name, value in weights(trainer.model).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    warnings = [r["warning"] for r in records if "warning" in r]
    assert len(warnings) == 1 and "bf16" in warnings[0]


def test_stand_alone_run_refuses_a_multi_device_layout(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel: data_parallel x model_parallel x pipeline_stages = 2 devices"):
        Trainer(tiny_config(tmp_path, parallel={"data_parallel": 2}))


# -- signals ------------------------------------------------------------------------------------------------------

def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path):
    config = write_yaml(tmp_path / "train.yaml", tiny_raw_config(tmp_path / "run", train={"steps": 100000},
                                                                 checkpoint={"every_n_steps": 100000}))
    metrics = tmp_path / "run" / "logs" / "metrics.jsonl"
    log = tmp_path / "train.log"  # a file, not a pipe: nothing blocks the trainer while the test waits
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "mindspore_llm.cli", "train", str(config)], cwd=REPO,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert process.returncode == 0, output[-3000:]
    assert "training interrupted" in output
    assert "[WARNING]" not in output and "[INFO]" not in output, output  # MindSpore's own log: only with -v
    last_step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    saved = checkpointing.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert saved is not None and saved.name == f"step_{last_step:08d}"
    assert json.loads((saved / "rank_0" / checkpointing.TRAINER_STATE).read_text())["sample_index"] == last_step * 4
