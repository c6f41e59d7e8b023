"""DATA_PARALLEL on 2 CPU processes under msrun equals 1 process with the same global batch.

Reference: the same trainer in one process, micro-batch 2 x accumulation 2 x 2 ranks = global batch 8 in both.
Data: pretraining rows (every position a target) in file order, so the 2 ranks' shards (rows r, r+2, ...) make up
exactly the 1-process batch, and every rank counts the same number of tokens (each rank averages over its own
tokens; the all-reduce then averages the ranks). Tolerance: 1e-5 relative on every step's loss and on every
weight tensor (the norm of the difference over the norm of the tensor).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import load_file

from mindspore_llm.train.config import train_config_from_dict
from mindspore_llm.train.trainer import Trainer
from tests.test_trainer import ASSETS, REPO, tiny_raw_config

STEPS = 4


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
        checkpoint={"every_n_steps": STEPS})


def logged_losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_two_msrun_processes_equal_one_process(tmp_path):
    two = tmp_path / "two"
    config = tmp_path / "dp.yaml"
    config.write_text(yaml.safe_dump(raw_config(two, micro_batch_size=2, gradient_accumulation_steps=2)))
    command = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}", "--join=True",
               f"--log_dir={tmp_path / 'msrun_logs'}", "python", "-m", "mindspore_llm.cli", "train", str(config)]
    # msrun starts `python` from PATH: make it the interpreter running this test
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    launched = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    worker_logs = {p.name: p.read_text() for p in (tmp_path / "msrun_logs").glob("worker_*.log")}
    assert launched.returncode == 0, launched.stdout[-3000:] + str({k: v[-2000:] for k, v in worker_logs.items()})
    assert "DATA_PARALLEL over 2 CPU processes" in worker_logs["worker_0.log"]

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
        assert difference <= 1e-5 * np.linalg.norm(one_weights[name]), name
