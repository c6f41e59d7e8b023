"""Stopping a distributed job: a stop request on any rank stops every rank after the same step, with one complete
checkpoint, in every distributed mode (the request is all-reduced with the step's loss).

Under msrun on 2 CPU processes (DATA_PARALLEL) the real thing: SIGTERM to rank 1 only (rank 0 is the one that
saves). SEMI_AUTO_PARALLEL cannot start on CPU: the context's reduction is checked with a stand-in collective.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from mindspore_llm.parallel.context import DATA_PARALLEL, SEMI_AUTO, ParallelContext
from mindspore_llm.train import checkpointing
from tests.test_data_parallel import free_port, raw_config
from tests.test_trainer import REPO


def _worker_pid(msrun: subprocess.Popen, rank: int) -> int | None:
    """The msrun worker process of `rank` (a child of msrun whose environment says RANK_ID=rank)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().split(") ")[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == msrun.pid and f"RANK_ID={rank}".encode() in environ and b"MS_ROLE=MS_WORKER" in environ:
            return int(entry.name)
    return None


def test_sigterm_to_one_rank_stops_both_after_the_same_step(tmp_path):
    run_dir = tmp_path / "run"
    raw = raw_config(run_dir, micro_batch_size=2, gradient_accumulation_steps=2)
    raw["train"].update(steps=100000, global_batch_size=None)
    raw["checkpoint"]["every_n_steps"] = 100000
    config = tmp_path / "dp.yaml"
    config.write_text(yaml.safe_dump(raw))
    logs = tmp_path / "msrun_logs"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    msrun = subprocess.Popen(["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
                              "--join=True", f"--log_dir={logs}", "python", "-m", "mindspore_llm.cli", "train",
                              str(config)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "logs" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert msrun.poll() is None and time.time() < deadline, "the job ended or hung before step 3"
            time.sleep(0.2)
        pid = _worker_pid(msrun, 1)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        assert msrun.wait(timeout=180) == 0
    finally:
        if msrun.poll() is None:
            msrun.kill()
    stopped = {}
    for rank in range(2):
        text = (logs / f"worker_{rank}.log").read_text()
        lines = [line for line in text.splitlines() if f"rank {rank}: stopping after step" in line]
        assert len(lines) == 1, text[-3000:]
        stopped[rank] = int(lines[0].split("stopping after step ")[1].split()[0])
    assert stopped[0] == stopped[1]
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert last == stopped[0]
    saved = checkpointing.latest_checkpoint(run_dir / "checkpoints")
    assert [p.name for p in checkpointing.list_checkpoints(run_dir / "checkpoints")] == [f"step_{last:08d}"]
    assert json.loads((saved / "rank_0" / checkpointing.TRAINER_STATE).read_text())["step"] == last
    assert "training interrupted" in (logs / "worker_0.log").read_text()


class _StandInSum:
    """The all-reduce of a 2-rank job whose other rank reports `other` (loss contribution, stop flag)."""

    def __init__(self, other):
        self.other = np.asarray(other, np.float32)

    def __call__(self, tensor):
        return type("Reduced", (), {"asnumpy": lambda _: tensor.asnumpy() + self.other})()


def test_stop_request_of_another_rank_reaches_every_rank_in_every_distributed_mode():
    """A rank that received no signal learns of the other's request, and the loss is the main rank's (the last
    pipeline stage's first rank under semi-auto: stage 0 has no loss)."""
    pipeline = ParallelContext(0, 16, SEMI_AUTO, "t", 0, 1, 1, pipeline_stages=2, micro_batch_num=4)
    object.__setattr__(pipeline, "_all_reduce", _StandInSum([5.25, 1.0]))  # rank 8 (main) has the loss
    assert pipeline.step_report(0.0, False) == (5.25, True)
    data_parallel = ParallelContext(0, 2, DATA_PARALLEL, "t", 0, 2, 2)
    object.__setattr__(data_parallel, "_all_reduce", _StandInSum([0.0, 0.0]))
    assert data_parallel.step_report(4.5, False) == (4.5, False)
    standalone = ParallelContext(0, 1, "stand-alone", "t", 0, 1, 1)
    assert standalone.step_report(4.5, True) == (4.5, True)
