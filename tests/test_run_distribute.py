"""scripts/run_distribute.sh: rank placement from the table, rejection before start, and a failing rank stopping
the job. Processes are real; the training command is replaced by a tiny Python script (MSLLM_TRAIN_CMD).

The servers' OS images ship bash 5.0 (openEuler 20.03, Kylin V10, Ubuntu 20.04); the failure path also runs with
`wait` behaving as bash 5.0's (no -p: "invalid option", status 2), and a static check keeps the script to bash 4.4."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mindspore_llm.parallel import rank_table as rt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_distribute.sh"


def run(*args, env=None, cwd=ROOT, timeout=120):
    # the launcher's own defaults are under test: drop what the surrounding environment (mindspore's import) set
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("HCCL_") and k != "SERVER_ID"}
    full_env = {**inherited, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def dry_run_ranks(stdout: str) -> list[tuple[int, int, int]]:
    """(RANK_ID, DEVICE_ID, RANK_SIZE) of each printed rank line."""
    return [tuple(int(re.search(rf"\b{key}=(\d+)", line).group(1)) for key in ("RANK_ID", "DEVICE_ID", "RANK_SIZE"))
            for line in stdout.splitlines() if line.startswith("rank ")]


@pytest.mark.parametrize("server", [0, 1])
def test_dry_run_places_ranks_of_each_server(server):
    result = run("rank_table_16p.json", "--dry-run", env={"SERVER_ID": str(server)})
    assert result.returncode == 0, result.stderr
    assert dry_run_ranks(result.stdout) == [(8 * server + d, d, 16) for d in range(8)]
    table = str(ROOT / "rank_tables" / "rank_table_16p.json")
    config = str(ROOT / "configs" / "qwen2_5_32b_sft_8k_16p.yaml")
    for line in result.stdout.splitlines():
        if line.startswith("rank "):
            assert f"RANK_TABLE_FILE={table}" in line and line.split(" > ")[0].endswith(f"cli train {config}")
            assert "HCCL_CONNECT_TIMEOUT=1200" in line and "HCCL_EXEC_TIMEOUT=1800" in line
    assert "device check skipped" in result.stdout


def test_server_index_option_and_hccl_override(tmp_path):
    result = run("rank_tables/rank_table_16p.json", "--dry-run", "--server-index", "1",
                 env={"HCCL_EXEC_TIMEOUT": "7200", "CPU_CORES": "16"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("rank ")]
    assert dry_run_ranks(result.stdout)[0] == (8, 0, 16)
    assert "HCCL_EXEC_TIMEOUT=7200" in lines[0]
    assert [re.search(r"taskset -c (\S+)", line).group(1) for line in lines] == [
        f"{2 * d}-{2 * d + 1}" for d in range(8)]


def _table_file(tmp_path, mutate=None) -> Path:
    table = rt.generate(["10.0.0.1", "10.0.0.2"], list(range(8)))
    if mutate:
        mutate(table)
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    return path


@pytest.mark.parametrize("case", ["duplicate rank", "invalid json"])
def test_malformed_table_is_rejected_before_start(tmp_path, case):
    marker = tmp_path / "started"
    if case == "invalid json":
        table = tmp_path / "table.json"
        table.write_text("{not json")
    else:
        table = _table_file(tmp_path, lambda t: t["server_list"][1]["device"][0].update(rank_id="0"))
    result = run(str(table), env={"SERVER_ID": "0", "MSLLM_TRAIN_CMD": f"touch {marker}",
                                  "LOG_DIR": str(tmp_path / "logs")})
    assert result.returncode == 2
    assert "rank table rejected or this server not found in it; nothing started" in result.stderr
    assert not marker.exists() and not (tmp_path / "logs").exists()


FAKE_TRAIN = """
import os, sys, time
rank = int(os.environ["RANK_ID"])
open(os.path.join(os.environ["FAKE_PID_DIR"], f"pid_{rank}"), "w").write(str(os.getpid()))
assert sys.argv[1].endswith("job.yaml") and sys.argv[2:] == ["--set", "train.steps=1"], sys.argv
print(f"rank {rank} on device {os.environ['DEVICE_ID']} of {os.environ['RANK_SIZE']}", flush=True)
if os.environ.get("FAKE_FAIL_RANK") == "none":
    sys.exit(0)
if rank == 2:
    time.sleep(3)  # the other ranks are up by then
    print("Traceback: simulated failure on rank 2", flush=True)
    sys.exit(1)
time.sleep(120)
"""


def _fake_launch(tmp_path, **env):
    """4 local ranks of FAKE_TRAIN on 4 fake NPUs; returns (result, pid directory)."""
    (tmp_path / "dev").mkdir()
    for d in range(4):
        (tmp_path / "dev" / f"davinci{d}").touch()
    table = tmp_path / "table_4p.json"
    rt.write(rt.generate(["10.0.0.1"], [0, 1, 2, 3]), table)
    config = tmp_path / "job.yaml"
    config.write_text("parallel:\n  data_parallel: 4\n")
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    pids = tmp_path / "pids"
    pids.mkdir()
    result = run(str(table), str(config), "--server-index", "0", "--", "--set", "train.steps=1",
                 env={"MSLLM_TRAIN_CMD": f"{sys.executable} {fake}", "DEVICE_DIR": str(tmp_path / "dev"),
                      "LOG_DIR": str(tmp_path / "logs"), "FAKE_PID_DIR": str(pids), **env})
    return result, pids


# bash 5.0's `wait` (BASH_ENV is sourced by every non-interactive bash before the script): -p arrived in 5.1
BASH_5_0_WAIT = r"""
wait() {
  local arg
  for arg in "$@"; do
    if [[ $arg == -*p* && $arg != --* ]]; then
      echo "bash: wait: ${arg}: invalid option" >&2
      echo "wait: usage: wait [-fn] [id ...]" >&2
      return 2
    fi
  done
  builtin wait "$@"
}
"""


@pytest.mark.parametrize("bash", ["installed", "5.0 wait"])
def test_failing_rank_stops_the_others(tmp_path, bash):
    env = {}
    if bash == "5.0 wait":
        (tmp_path / "bash50.sh").write_text(BASH_5_0_WAIT)
        env["BASH_ENV"] = str(tmp_path / "bash50.sh")
    start = time.time()
    result, pids = _fake_launch(tmp_path, **env)
    assert result.returncode == 1
    assert time.time() - start < 60  # the sleeping ranks were stopped, not waited for
    assert "rank 2 exited with status 1" in result.stderr
    assert "Traceback: simulated failure on rank 2" in result.stderr  # the failing rank's log tail
    assert sorted(p.name for p in pids.iterdir()) == [f"pid_{r}" for r in range(4)]
    for rank in (0, 1, 3):
        pid = int((pids / f"pid_{rank}").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert f"rank {rank} on device {rank} of 4" in (tmp_path / "logs" / f"rank_{rank}" / "train.log").read_text()


def test_device_count_must_match_visible_npus(tmp_path):
    (tmp_path / "dev").mkdir()
    for d in range(2):
        (tmp_path / "dev" / f"davinci{d}").touch()
    result = run("rank_table_16p.json", "--server-index", "0",
                 env={"DEVICE_DIR": str(tmp_path / "dev"), "MSLLM_TRAIN_CMD": "false",
                      "LOG_DIR": str(tmp_path / "logs")})
    assert result.returncode == 2
    assert "the table gives server 0 8 devices but 2 NPUs are visible" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_msrun_launcher_dry_run():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "msrun_launcher.sh"), "configs/tiny_qwen_sft.yaml",
                             "--worker-num", "16", "--local-worker-num", "8", "--node-rank", "1", "--master-addr",
                             "10.0.0.1", "--dry-run", "--", "--set", "train.steps=5"],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHON": "python"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "msrun", "--worker_num=16", "--local_worker_num=8", "--master_addr=10.0.0.1", "--master_port=8118",
        "--node_rank=1", "--log_dir=runs/msrun_logs", "--join=True", "python", "-m", "mindspore_llm.cli", "train",
        "configs/tiny_qwen_sft.yaml", "--set", "train.steps=5"]


@pytest.mark.parametrize("bash", ["installed", "5.0 wait"])
def test_all_ranks_succeeding_exit_zero(tmp_path, bash):
    env = {"FAKE_FAIL_RANK": "none"}
    if bash == "5.0 wait":
        (tmp_path / "bash50.sh").write_text(BASH_5_0_WAIT)
        env["BASH_ENV"] = str(tmp_path / "bash50.sh")
    result, pids = _fake_launch(tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert "all 4 ranks of server 0 finished" in result.stdout
    assert len(list(pids.iterdir())) == 4


# Builtins, options and variables newer than bash 4.4 (bash's NEWS, 5.0 to 5.2)
NEWER_THAN_BASH_4_4 = [r"\bwait\s+(-\w*\s+)*-\w*[pf]", r"\$\{?EPOCH(SECONDS|REALTIME)", r"\$\{?SRANDOM",
                       r"\$\{?BASH_ARGV0", r"\$\{\w+@[UuLK]\}", r"\bshopt\s+-s\s+(localvar_|assoc_expand|"
                       r"noexpand_translation|patsub_replacement|varredir_close)", r"\bread\s+.*-\w*E"]


def test_launcher_uses_nothing_newer_than_bash_4_4():
    source = "\n".join(line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#"))
    for pattern in NEWER_THAN_BASH_4_4:
        assert not re.search(pattern, source), pattern

