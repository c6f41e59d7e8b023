"""Host memory of loading weights: every full tensor, against one rank's slices; and `msllm-ckpt shard` at two
model sizes.

Makes synthetic fp32 Qwen2-shaped Hugging Face checkpoints (~2 GB and half that by default) in a temporary
directory, then runs, each in a fresh child process whose peak RSS (VmHWM, above its baseline after imports) is
read from /proc:
  full, built initialised    build_model + load_weights: random weights first, then every checkpoint tensor
                             (what the trainer and from_pretrained did before per-rank loading)
  full, built lazily         build_model(materialize=False) + load_weights: every tensor, the model in memory once
  rank R of tp T             load_weights with the tensor-parallel layouts: rank R's slices only, read as byte
                             ranges (the claim: peak <= model bytes / T + 0.7 GB)
  rank R of tp T, shard      the same from `msllm-ckpt shard` output (rank_R/ read whole)
  shard (half / full size)   msllm-ckpt shard into T rank directories: peak flat in the model's size

    python bench/bench_load.py [--size-gb 2] [--tp 8] [--rank 3] [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GB = 10 ** 9
BOUND_MARGIN = 0.7 * GB


def qwen_config(size_gb: float, tp: int):
    """Qwen2-0.5B-like widths, a 32000-token vocabulary (every split divides by `tp`); layers added until the fp32
    size is reached, so that half the size is half the layers."""
    from mindspore_llm.models.qwen import QwenConfig
    from mindspore_llm.models.shapes import count_parameters

    base = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                num_key_value_heads=tp, qkv_bias=True, tie_word_embeddings=False, max_position_embeddings=4096)
    fixed = 4 * count_parameters(QwenConfig(**base, num_hidden_layers=1))[0]
    per_layer = 4 * count_parameters(QwenConfig(**base, num_hidden_layers=2))[0] - fixed
    layers = max(1, round((size_gb * GB - fixed) / per_layer) + 1)
    return QwenConfig(**base, num_hidden_layers=layers)


def make_checkpoint(directory: Path, config) -> int:
    """config.json + fp32 safetensors shards of `config`'s shapes, streamed from one repeated random block."""
    from mindspore_llm.checkpoint_writer import HF_SAFETENSORS, OutTensor, write_checkpoint
    from mindspore_llm.models.shapes import parameter_shapes

    tensors = [OutTensor(name, shape, "F32") for name, shape in parameter_shapes(config)]
    block = np.random.default_rng(0).standard_normal(16 << 20, np.float32) * 0.02

    def chunks(tensor):
        left = int(np.prod(tensor.shape))
        while left:
            n = min(left, len(block))
            yield block[:n]
            left -= n

    directory.mkdir(parents=True)
    write_checkpoint(directory, tensors, HF_SAFETENSORS, GB, chunks)
    (directory / "config.json").write_text(json.dumps(config.to_hf()))
    return sum(t.nbytes for t in tensors)


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmHWM: peak resident, VmRSS: resident now), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def vm_hwm() -> int:
    return status_bytes("VmHWM")


def vm_rss() -> int:
    return status_bytes("VmRSS")


def run_child(job: dict) -> dict:
    """This script with ``--child JOB`` in a fresh process (this checkout's package first on its path); its last
    stdout line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                         env=env)
    if out.returncode:
        raise RuntimeError(f"{job['kind']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(job: dict) -> dict:
    """Runs in a fresh process: imports first (their memory is the baseline), then the job."""
    import mindspore as ms

    from ckpt_tools.slices import shard
    from mindspore_llm.checkpoint import load_weights
    from mindspore_llm.models.auto import build_model
    from mindspore_llm.models.config import load_config
    from mindspore_llm.parallel.config import ParallelConfig
    from mindspore_llm.parallel.plan import parameter_layouts

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    config = load_config(job["src"])
    baseline = vm_hwm()
    start = time.perf_counter()
    if job["kind"] == "shard":
        shard(Path(job["src"]), Path(job["dst"]), Path(job["train_config"]), quiet=True)
        held = 0
    else:
        model = build_model(config, materialize=job["kind"] == "full_initialised")
        layouts = None
        if job["kind"] in ("rank", "rank_shard"):
            shapes = ((p.name, tuple(p.shape)) for p in model.get_parameters())
            layouts = parameter_layouts(shapes, ParallelConfig(model_parallel=job["tp"]), config.num_hidden_layers,
                                        config.tie_word_embeddings)
        load_weights(model, job["dst"] if job["kind"] == "rank_shard" else job["src"], layouts, job.get("rank", 0))
        # what the parameters hold afterwards (a sliced parameter's shape is its slice's)
        held = sum(4 * int(np.prod(p.shape)) for p in model.get_parameters())
    return {"seconds": time.perf_counter() - start, "peak_above_baseline": vm_hwm() - baseline, "held": held}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size in GB, fp32 (default 2)")
    parser.add_argument("--tp", type=int, default=8, help="tensor-parallel ranks (default 8)")
    parser.add_argument("--rank", type=int, default=3, help="the rank whose slices are loaded (default 3)")
    parser.add_argument("--workdir", type=Path, help="where to make the temporary files (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary files")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import yaml

    work = Path(tempfile.mkdtemp(prefix="bench_load_", dir=args.workdir))
    try:
        sizes = {}
        for label, size in (("full", args.size_gb), ("half", args.size_gb / 2)):
            config = qwen_config(size, args.tp)
            started = time.perf_counter()
            sizes[label] = make_checkpoint(work / label, config)
            print(f"synthetic checkpoint '{label}': {sizes[label] / GB:.2f} GB fp32, {config.num_hidden_layers} "
                  f"layers, hidden {config.hidden_size}, vocab {config.vocab_size} (made in "
                  f"{time.perf_counter() - started:.0f} s)")
            plan = {"model": {"path": str(work / label)}, "parallel": {"model_parallel": args.tp},
                    "data": {"kind": "pretrain", "path": str(work / "unused.txt"), "tokenizer": str(work),
                             "seq_length": 16}, "output_dir": str(work / "run")}
            (work / f"{label}.yaml").write_text(yaml.safe_dump(plan))
        src, model_bytes = str(work / "full"), sizes["full"]
        rank = f"rank {args.rank} of tp {args.tp}"
        jobs = {
            "full, built initialised": {"kind": "full_initialised", "src": src},
            "full, built lazily": {"kind": "full_lazy", "src": src},
            rank: {"kind": "rank", "src": src, "tp": args.tp, "rank": args.rank},
            "shard (half size)": {"kind": "shard", "src": str(work / "half"), "dst": str(work / "sliced_half"),
                                  "train_config": str(work / "half.yaml")},
            "shard (full size)": {"kind": "shard", "src": src, "dst": str(work / "sliced"),
                                  "train_config": str(work / "full.yaml")},
            f"{rank}, from shard output": {"kind": "rank_shard", "src": src, "dst": str(work / "sliced"),
                                           "tp": args.tp, "rank": args.rank},
        }
        results = {}
        for name, job in jobs.items():
            os.sync()
            results[name] = run_child(job)
        bound = model_bytes / args.tp + BOUND_MARGIN
        print(f"\nmodel {model_bytes / GB:.2f} GB; claim for one rank: peak <= model / {args.tp} + 0.7 GB = "
              f"{bound / GB:.2f} GB")
        print(f"{'job':34s} {'seconds':>8s} {'peak RSS':>10s} {'vs full':>8s} {'params held':>12s}")
        full = results["full, built lazily"]["peak_above_baseline"]
        for name, r in results.items():
            peak = r["peak_above_baseline"]
            note = ""
            if name.startswith("rank"):
                note = "  within the claim" if peak <= bound else "  ABOVE THE CLAIM"
            print(f"{name:34s} {r['seconds']:8.2f} {peak / GB:7.2f} GB {peak / full:7.2f}x "
                  f"{r['held'] / GB:9.2f} GB{note}")
        print("\npeak RSS is above each child's baseline after imports; 'vs full' divides it by the lazily built "
              "full load's; 'params held' is what the model's parameters hold when loading is done.")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
