"""DATA_PARALLEL on 2 CPU processes under msrun equals 1 process with the same global batch; a 2-process job killed
after it saved resumes and ends with the losses and weights of the uninterrupted 2-process job.

Reference: the same trainer in one process, micro-batch 2 x accumulation 2 x 2 ranks = global batch 8 in both.
Data: pretraining rows (every position a target) in file order, so the 2 ranks' shards (rows r, r+2, ...) make up
exactly the 1-process batch, and every rank counts the same number of tokens (each rank averages over its own
tokens; the all-reduce then averages the ranks). Tolerance: 1e-5 relative on every step's loss, 1e-4 on every
weight tensor (the norm of the difference over the norm of the tensor; measured up to 1.1e-5, layer 0's down_proj,
on 2026-12-02). The resumed job against the uninterrupted
one: 1e-6 relative on every loss and every weight (the same processes, state and batches: in practice exact).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from mindspore_llm.train import checkpointing
from mindspore_llm.train.config import train_config_from_dict
from mindspore_llm.train.trainer import Trainer
from tests.test_trainer import ASSETS, REPO, tiny_raw_config

STEPS = 16
EVERY = 2  # checkpoint interval: the killed job has saved long before it would end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_config(output_dir, micro_batch_size: int, gradient_accumulation_steps: int) -> dict:
    # Qwen3 (no k bias): a k_proj bias has zero true gradient (softmax ignores a per-query shift), so AdamW would
    # turn its rounding noise into full-size, order-dependent updates
    return tiny_raw_config(
        output_dir,
        model={"architecture": "Qwen3ForCausalLM", "head_dim": 16, "qkv_bias": False, "o_bias": False,
               "qk_norm": True},
        data={"kind": "pretrain", "path": str(ASSETS / "pretrain.txt"), "seq_length": 32, "packing": False,
              "reset_attention": False, "shuffle": False},
        train={"micro_batch_size": micro_batch_size, "gradient_accumulation_steps": gradient_accumulation_steps,
               "global_batch_size": 8, "steps": STEPS},
        checkpoint={"every_n_steps": EVERY})


def logged_losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def msrun(config: Path, log_dir: Path, *args: str) -> subprocess.Popen:
    """`msllm train CONFIG ARGS` as a 2-process msrun job, in a process group of its own."""
    command = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}", "--join=True",
               f"--log_dir={log_dir}", "python", "-m", "mindspore_llm.cli", "train", str(config), *args]
    # msrun starts `python` from PATH: make it the interpreter running this test
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finished(job: subprocess.Popen, log_dir: Path) -> str:
    output = job.communicate(timeout=300)[0]
    worker_logs = {p.name: p.read_text() for p in log_dir.glob("worker_*.log")}
    assert job.returncode == 0, output[-3000:] + str({k: v[-2000:] for k, v in worker_logs.items()})
    return worker_logs["worker_0.log"]


@pytest.fixture(scope="module")
def two_processes(module_dir):
    """The uninterrupted 2-process job: STEPS steps, a checkpoint every EVERY."""
    output = module_dir / "two"
    config = module_dir / "dp.yaml"
    config.write_text(yaml.safe_dump(raw_config(output, micro_batch_size=2, gradient_accumulation_steps=2)))
    log = finished(msrun(config, module_dir / "msrun_logs"), module_dir / "msrun_logs")
    assert "DATA_PARALLEL over 2 CPU processes" in log
    return config, output


def test_two_msrun_processes_equal_one_process(two_processes, tmp_path):
    _, two = two_processes
    one = Trainer(train_config_from_dict(raw_config(tmp_path / "one", micro_batch_size=4,
                                                    gradient_accumulation_steps=2), "one-process"))
    assert one.context.mode == "stand-alone"
    one.run()

    np.testing.assert_allclose(logged_losses(two), logged_losses(tmp_path / "one"), rtol=1e-5)
    two_weights = load_file(str(two / "final" / "model.safetensors"))
    one_weights = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    assert sorted(two_weights) == sorted(one_weights)
    for name in one_weights:
        # per tensor, relative in norm: Adam's m / sqrt(v) turns the last-bit differences of summing the same
        # gradients in another order into larger element-wise differences on near-zero gradients (seen: 2e-6 abs)
        difference = np.linalg.norm(two_weights[name] - one_weights[name])
        assert difference <= 1e-4 * np.linalg.norm(one_weights[name]), name


def test_killed_job_resumes_to_the_losses_of_the_uninterrupted_job(two_processes, tmp_path):
    config, two = two_processes
    killed = tmp_path / "killed"
    config = tmp_path / "dp.yaml"
    config.write_text(yaml.safe_dump(raw_config(killed, micro_batch_size=2, gradient_accumulation_steps=2)))
    job = msrun(config, tmp_path / "logs_killed")
    deadline = time.monotonic() + 300
    while checkpointing.latest_checkpoint(killed / "checkpoints") is None:  # the first checkpoint is complete
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # msrun, its scheduler and both workers, mid-run
    job.communicate(timeout=60)
    done = len(logged_losses(killed))
    assert done < STEPS and not (killed / "final").exists(), "the job ended before it could be killed"

    log = finished(msrun(config, tmp_path / "logs_resumed", "--resume"), tmp_path / "logs_resumed")
    assert "resumed from" in log
    np.testing.assert_allclose(logged_losses(killed), logged_losses(two), rtol=1e-6)
    final, reference = (load_file(str(d / "final" / "model.safetensors")) for d in (killed, two))
    for name in reference:
        np.testing.assert_allclose(final[name], reference[name], rtol=1e-6, atol=1e-7, err_msg=name)
