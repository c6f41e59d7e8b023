"""Conversion throughput against a plain copy of the same bytes, and peak memory against the largest tensor.

Makes a synthetic bf16 Qwen2-shaped Hugging Face checkpoint (~2 GB by default) in a temporary directory, then
runs, each in a fresh child process whose peak RSS (VmHWM) is read from /proc:
  copy            shutil.copyfile of the checkpoint's shard files (the disk's pace for the same bytes)
  hf2ms ckpt      msllm-ckpt hf2ms (MindSpore .ckpt)
  hf2ms st        msllm-ckpt hf2ms --format safetensors
  ms2hf           msllm-ckpt ms2hf of the .ckpt output
  hf2ms fp32      msllm-ckpt hf2ms --dtype fp32 (a cast on every element; writes twice the bytes)
  save_checkpoint mindspore.save_checkpoint of one shard's tensors (how MindSpore's own writer uses memory)
Peak RSS is reported above each child's baseline after its imports (MindSpore alone takes ~400 MB).

    python bench/bench_convert.py [--size-gb 2] [--workdir DIR] [--keep]
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


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def vm_hwm() -> int:
    return _status("VmHWM")


def vm_rss() -> int:
    return _status("VmRSS")


def make_checkpoint(directory: Path, size_gb: float) -> dict:
    """Qwen2-1.5B-like shapes (hidden 1536, vocab 151936); layers added until the size is reached."""
    from ckpt_tools.writer import OutTensor, write_checkpoint
    from ckpt_tools.convert import LAYOUTS
    from mindspore_llm.checkpoint import float32_to_bf16_bits
    from mindspore_llm.models.auto import config_from_hf
    from mindspore_llm.models.naming import OURS, tensor_layout

    def shapes_of(config):
        return tensor_layout(config_from_hf(config, "bench"), OURS).hf_shapes

    config = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 1536,
              "intermediate_size": 8960, "num_attention_heads": 12, "num_key_value_heads": 2,
              "tie_word_embeddings": False, "max_position_embeddings": 4096, "num_hidden_layers": 1}
    per_layer = 2 * sum(int(np.prod(s)) for n, s in shapes_of(config).items() if ".layers." in n)
    fixed = 2 * 2 * 151936 * 1536 + 2 * 1536
    config["num_hidden_layers"] = max(1, round((size_gb * GB - fixed) / per_layer))
    shapes = shapes_of(config)
    tensors = [OutTensor(name, shape, "BF16") for name, shape in shapes.items()]
    # One random block, repeated: random bytes defeat nothing here (no compression), and this is fast to make.
    block = float32_to_bf16_bits(np.random.default_rng(0).standard_normal(16 << 20, np.float32) * 0.02)

    def chunks(tensor):
        left = int(np.prod(tensor.shape))
        while left:
            n = min(left, len(block))
            yield block[:n]
            left -= n

    directory.mkdir(parents=True)
    write_checkpoint(directory, tensors, LAYOUTS[("safetensors", "hf")], GB, chunks)
    (directory / "config.json").write_text(json.dumps(config))
    return {"bytes": sum(t.nbytes for t in tensors), "largest_tensor": max(t.nbytes for t in tensors),
            "layers": config["num_hidden_layers"], "tensors": len(tensors)}


def child(job: dict) -> dict:
    """Runs in a fresh process: imports first (their memory is the baseline), then the job."""
    import mindspore as ms
    from ckpt_tools.convert import LAYOUTS, convert
    from mindspore_llm.checkpoint import iter_tensors, weight_files

    baseline = vm_hwm()
    src, dst = Path(job["src"]), Path(job["dst"])
    start = time.perf_counter()
    if job["kind"] == "copy":
        dst.mkdir()
        for file in sorted(set(weight_files(src).values())):
            shutil.copyfile(file, dst / file.name)
            with open(dst / file.name, "rb+") as f:
                os.fsync(f.fileno())  # as the converter does before renaming its output into place
    elif job["kind"] == "save_checkpoint":
        shard = sorted(set(weight_files(src).values()))[0]
        params = [{"name": n, "data": ms.Tensor(f.float32(n), ms.bfloat16)} for n, f in iter_tensors(src)
                  if f.path == shard]
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: measure the save itself
        before = vm_rss()
        start = time.perf_counter()
        dst.mkdir()
        ms.save_checkpoint(params, str(dst / "shard.ckpt"))
        return {"seconds": time.perf_counter() - start, "peak_above_baseline": vm_hwm() - before,
                "bytes_written": (dst / "shard.ckpt").stat().st_size}
    else:
        from mindspore_llm.models.naming import LayoutOptions

        convert(src, dst, target_naming=job["naming"], layout=LAYOUTS[tuple(job["layout"])], dtype=job.get("dtype"),
                max_shard_bytes=job["max_shard"], quiet=True, options=LayoutOptions(**job.get("options", {})))
    seconds = time.perf_counter() - start
    written = sum(f.stat().st_size for f in dst.iterdir() if f.suffix in (".ckpt", ".safetensors"))
    return {"seconds": seconds, "peak_above_baseline": vm_hwm() - baseline, "bytes_written": written}


def run_child(job: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{job['kind']} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size in GB (default 2)")
    parser.add_argument("--max-shard-size-gb", type=float, default=1.0, help="output shard size (default 1 GB)")
    parser.add_argument("--workdir", type=Path, help="where to make the temporary files (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary files")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        hf = work / "hf"
        start = time.perf_counter()
        info = make_checkpoint(hf, args.size_gb)
        print(f"synthetic checkpoint: {info['bytes'] / GB:.2f} GB bf16, {info['layers']} layers, {info['tensors']} "
              f"tensors, largest tensor {info['largest_tensor'] / 2 ** 20:.0f} MiB (made in "
              f"{time.perf_counter() - start:.0f} s)")
        shard = int(args.max_shard_size_gb * GB)
        jobs = {
            "copy": {"kind": "copy", "src": str(hf), "dst": str(work / "copy")},
            "hf2ms ckpt": {"kind": "convert", "src": str(hf), "dst": str(work / "ms"), "naming": "mindspore_llm",
                           "layout": ["ckpt", "ms"], "max_shard": shard},
            "hf2ms safetensors": {"kind": "convert", "src": str(hf), "dst": str(work / "ms_st"),
                                  "naming": "mindspore_llm", "layout": ["safetensors", "ms"], "max_shard": shard},
            "ms2hf": {"kind": "convert", "src": str(work / "ms"), "dst": str(work / "back"),
                      "naming": "mindspore_llm", "layout": ["safetensors", "hf"], "max_shard": shard},
            # fused tensors: w_qkv per KV group, w_gate_hidden interleaved row by row, streamed in slabs
            "hf2ms --naming mindformers --qkv-concat": {"kind": "convert", "src": str(hf), "dst": str(work / "mf"),
                                                        "naming": "mindformers", "layout": ["ckpt", "ms"],
                                                        "max_shard": shard, "options": {"qkv_concat": True}},
            "ms2hf (of the qkv_concat output)": {"kind": "convert", "src": str(work / "mf"),
                                                 "dst": str(work / "mf_back"), "naming": "mindspore_llm",
                                                 "layout": ["safetensors", "hf"], "max_shard": shard},
            "hf2ms ckpt --dtype fp32": {"kind": "convert", "src": str(hf), "dst": str(work / "ms32"),
                                        "naming": "mindspore_llm", "layout": ["ckpt", "ms"], "max_shard": shard,
                                        "dtype": "fp32"},
            "mindspore.save_checkpoint (1 shard)": {"kind": "save_checkpoint", "src": str(hf),
                                                    "dst": str(work / "ms_save")},
        }
        results = {}
        for name, job in jobs.items():
            os.sync()  # start each job with no dirty pages left by the previous one
            results[name] = run_child(job)
            if name not in ("hf2ms ckpt", "hf2ms --naming mindformers --qkv-concat"):  # the next job's input
                shutil.rmtree(job["dst"], ignore_errors=True)
            if name == "ms2hf":
                shutil.rmtree(work / "ms", ignore_errors=True)
            if name == "ms2hf (of the qkv_concat output)":
                shutil.rmtree(work / "mf", ignore_errors=True)
        copy = results["copy"]
        print(f"\n{'job':38s} {'seconds':>8s} {'GB/s':>6s} {'vs copy':>8s} {'peak RSS':>10s} {'/ largest':>10s}")
        for name, r in results.items():
            rate = r["bytes_written"] / r["seconds"] / GB
            ratio = rate / (copy["bytes_written"] / copy["seconds"] / GB)
            peak = r["peak_above_baseline"]
            print(f"{name:38s} {r['seconds']:8.2f} {rate:6.2f} {ratio:7.2f}x {peak / 2 ** 20:7.0f} MiB "
                  f"{peak / info['largest_tensor']:9.2f}x")
        print("\nGB/s = output bytes written per second; 'vs copy' = that rate over shutil.copyfile's; peak RSS is "
              "above each child's baseline after imports; '/ largest' divides it by the largest tensor's size.")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
