"""Checkpoints that a crash, a truncated copy or a corrupt file cannot turn into a wrong resume; LoRA checkpoints
that hold the adapters only; resume that is exact with dropout active.

Reference for every resume: the same job run without interruption (the losses after resuming equal it within
1e-6 relative; in practice bit-identical: the same compiled step on the same restored state, batches and masks).
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import mint

from mindspore_llm.checkpoint import CkptFile
from mindspore_llm.common import CheckpointError, ConfigError
from mindspore_llm.lora import set_dropout_key
from mindspore_llm.train import checkpointing
from mindspore_llm.train.config import train_config_from_dict
from mindspore_llm.train.trainer import Trainer
from tests.test_trainer import REPO, STEPS, tiny_config, tiny_raw_config

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.2, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def straight(module_dir):
    """The uninterrupted reference: 8 steps, checkpoints at 4 and 8."""
    trainer = Trainer(tiny_config(module_dir / "straight"))
    return trainer, trainer.run()


def copy_run(trainer, destination):
    shutil.copytree(trainer.config.checkpoint_dir, destination / "checkpoints")
    return destination


def assert_continues(resumed, reference_losses, first_step):
    after = resumed.run()
    expected = dict(reference_losses)
    assert [s for s, _ in after.losses] == list(range(first_step + 1, STEPS + 1))
    for step, loss in after.losses:
        assert loss == pytest.approx(expected[step], rel=1e-6), step


def test_truncated_newest_checkpoint_resumes_from_the_previous_and_says_so(straight, tmp_path, caplog):
    trainer, result = straight
    copy_run(trainer, tmp_path)
    newest = tmp_path / "checkpoints" / "step_00000008" / "rank_0" / checkpointing.TRAIN_STATE
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="mindspore_llm"):
        resumed = Trainer(tiny_config(tmp_path), resume=True)
    assert resumed.start_step == 4
    assert any("step_00000008 is not complete" in r.getMessage() and "bytes" in r.getMessage()
               for r in caplog.records)
    assert_continues(resumed, result.losses, 4)


def test_a_flipped_byte_is_caught_by_the_crc(straight, tmp_path):
    trainer, _ = straight
    copy_run(trainer, tmp_path)
    newest = tmp_path / "checkpoints" / "step_00000008" / "rank_0" / checkpointing.TRAIN_STATE
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x40  # same size: only the CRC32 in the manifest tells
    newest.write_bytes(bytes(data))
    assert checkpointing.latest_checkpoint(tmp_path / "checkpoints").name == "step_00000004"
    assert "corrupt (CRC32" in checkpointing.checkpoint_problem(newest.parents[1], crc_ranks=[0])


def test_corrupt_trainer_state_marks_the_checkpoint_incomplete(straight, tmp_path):
    """Issue 17.7: a trainer_state.json cut short used to crash listing (json.loads) instead of being skipped."""
    trainer, _ = straight
    copy_run(trainer, tmp_path)
    state = tmp_path / "checkpoints" / "step_00000008" / "rank_0" / checkpointing.TRAINER_STATE
    state.write_text(state.read_text()[:40])
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000004"]
    assert "not valid JSON" in checkpointing.checkpoint_problem(state.parents[1])


def test_loading_builds_the_parameter_dictionary_once(straight, monkeypatch):
    """Issue 17.7: building parameters_dict() once per parameter is quadratic in the parameter count (tens of
    thousands for DeepSeek-V3)."""
    trainer, _ = straight
    calls = []
    original = ms.nn.Cell.parameters_dict

    def counted(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ms.nn.Cell, "parameters_dict", counted)
    checkpointing.load_checkpoint(checkpointing.step_dir(trainer.config.checkpoint_dir, 4), trainer.step_cell)
    assert len(calls) == 1


KILLED_SAVE = """
import os, signal, sys
import mindspore as ms, numpy as np
from mindspore import nn, Parameter, Tensor
from mindspore_llm.train import checkpointing

class Net(nn.Cell):
    def __init__(self, value):
        super().__init__()
        self.w = Parameter(Tensor(np.full((256, 256), value, np.float32)), name="w")

directory = sys.argv[1]
checkpointing.save_checkpoint(directory, 1, Net(1.0), {"note": "first"})
def die(path):  # the weights of step 2 are on disk, its manifest is not: the process dies here
    os.kill(os.getpid(), signal.SIGKILL)
checkpointing.write_manifest = die
checkpointing.save_checkpoint(directory, 2, Net(2.0), {"note": "second"})
"""


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(KILLED_SAVE)
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "ckpt")] == ["step_00000001"]
    assert not (tmp_path / "ckpt" / "step_00000002" / "rank_0").exists()  # only the temporary directory
    net = ms.nn.Cell()
    net.w = ms.Parameter(ms.Tensor(np.zeros((256, 256), np.float32)), name="w")
    state = checkpointing.load_checkpoint(checkpointing.latest_checkpoint(tmp_path / "ckpt"), net)
    assert state["note"] == "first" and (net.w.asnumpy() == 1.0).all()


def test_the_old_directory_of_an_overwrite_has_a_unique_name(tmp_path):
    from mindspore_llm.fileio import atomic_directory

    (tmp_path / "out").mkdir()
    (tmp_path / ".out.old").mkdir()  # a leftover of another writer: not reused, not removed
    with atomic_directory(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new").write_text("x")
    assert (tmp_path / "out" / "new").exists() and (tmp_path / ".out.old").is_dir()


# -- LoRA --------------------------------------------------------------------------------------------------------

def lora_trainer(output_dir, base, resume=False):
    raw = tiny_raw_config(output_dir, lora=LORA, checkpoint={"every_n_steps": 4})
    raw["model"] = {"path": str(base)}
    trainer = Trainer(train_config_from_dict(raw, "lora.yaml"), resume=resume)
    trainer.step_cell.set_train(True)  # dropout acts in training mode only (before the first compile)
    return trainer


@pytest.fixture(scope="module")
def lora_straight(module_dir, straight):
    _, result = straight
    trainer = lora_trainer(module_dir / "lora_straight", result.final_model_dir)
    return trainer, trainer.run()


def test_lora_checkpoint_holds_the_adapters_and_their_optimizer_state_only(lora_straight):
    trainer, _ = lora_straight
    file = checkpointing.step_dir(trainer.config.checkpoint_dir, 4) / "rank_0" / checkpointing.TRAIN_STATE
    names = set(CkptFile(file).names())
    adapters = {p.name for p in trainer.model.trainable_params()}
    assert adapters and all(".lora_" in name for name in adapters)
    moments = {f"optimizer.{kind}.{name}" for name in adapters for kind in ("exp_avg", "exp_avg_sq")}
    assert names == adapters | moments | {"optimizer.step", "loss_scale.scale", "loss_scale.clean_steps"}
    adapter_bytes = sum(4 * int(np.prod(p.shape)) for p in trainer.model.trainable_params())
    base_bytes = sum(4 * int(np.prod(p.shape)) for p in trainer.model.get_parameters() if ".lora_" not in p.name)
    assert file.stat().st_size < 3 * adapter_bytes + 4096 < base_bytes  # adapters x (weight + 2 moments) + framing
    state = json.loads((file.parent / checkpointing.TRAINER_STATE).read_text())
    assert state["base"] == trainer.config.model["path"]


def test_lora_resume_with_dropout_equals_the_uninterrupted_run(lora_straight, straight, tmp_path):
    """Issue 17.1: MindSpore's Dropout kernels restart their state with the process, so a resumed run drew other
    masks than the uninterrupted one; the masks are now a function of (seed, step)."""
    trainer, result = lora_straight
    _, base = straight
    shutil.copytree(trainer.config.checkpoint_dir, tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000008")
    resumed = lora_trainer(tmp_path, base.final_model_dir, resume=True)
    assert resumed.start_step == 4
    assert_continues(resumed, result.losses, 4)
    final, reference = adapters(resumed), adapters(trainer)
    for name in reference:
        np.testing.assert_allclose(final[name], reference[name], rtol=1e-6, atol=1e-7, err_msg=name)
    # the masks are active in training mode and change with the step's key (run without them, the same job's
    # adapters end 0.04-0.48 relative away from these: measured once, a whole extra run)
    layer = resumed.model.model.layers[0].self_attn.q_proj
    layer.set_train(True)  # run() ends in evaluation mode
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 8, 64)).astype(np.float32))
    outputs = []
    for step in (3, 4, 4):
        set_dropout_key(resumed.model, 7, step)
        outputs.append(layer(x).asnumpy())
    assert not np.array_equal(outputs[0], outputs[1]) and np.array_equal(outputs[1], outputs[2])


def adapters(trainer) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().copy() for p in trainer.model.trainable_params()}


def test_lora_resume_refuses_another_base(lora_straight, tmp_path):
    trainer, _ = lora_straight
    shutil.copytree(trainer.config.checkpoint_dir, tmp_path / "checkpoints")
    state = tmp_path / "checkpoints" / "step_00000008" / "rank_0" / checkpointing.TRAINER_STATE
    data = json.loads(state.read_text())
    data["base"] = "/elsewhere"
    state.write_text(json.dumps(data))
    checkpointing.write_manifest(state.parent)
    with pytest.raises(CheckpointError, match="trained on the base '/elsewhere'"):
        lora_trainer(tmp_path, trainer.config.model["path"], resume=True)


# -- shared storage ----------------------------------------------------------------------------------------------

def test_output_dir_that_another_rank_cannot_see_is_refused(tmp_path, monkeypatch):
    """Rank 1 of 2 whose output_dir is a local disk: rank 0's marker (token 12345) never appears there."""
    contributions = iter([12345.0, 0.0])  # what the all-reduce adds from rank 0: its token, then "I see it"

    def all_reduce(tensor):
        tensor.assign_value(ms.Tensor(tensor.asnumpy() + next(contributions)))  # in place, as the collective

    monkeypatch.setattr(mint.distributed, "all_reduce", all_reduce)
    with pytest.raises(ConfigError, match=r"not one filesystem shared by all ranks \(1 of 2 .*this one included"):
        checkpointing.check_shared_storage(tmp_path, rank=1, world_size=2)
