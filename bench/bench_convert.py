"""Checkpoint conversion against `cp` of the same files, as whole processes, through the page cache and on disk;
then the other directions once each, for their peak memory.

Makes a synthetic Qwen2-1.5B-shaped Hugging Face checkpoint (bf16, --size-gb 2.8 in 1 GB shards) in a temporary
directory, then runs each command as a whole process (`python -m ckpt_tools ...`, imports included) in --repeats
rounds, alternating the commands within a round, in two modes:
  page cache  the command alone: its output may still be dirty in the page cache when it returns, as cp's is
  on disk     the command followed by `sync`, both timed
Before every run its output is removed, the disk synced and given --settle seconds to
finish discarding the freed blocks (untimed), except for `hf2ms --overwrite`, which
replaces the output of the `hf2ms` run before it, as re-running a conversion does. A process that only imports
what a conversion imports is timed in the same rounds: what every conversion pays before its first byte. Peak RSS
is the process's largest resident set (wait4, started from a small launcher), also given above that import-only
process (MindSpore alone takes ~400 MB).

    python bench/bench_convert.py [--size-gb 2.8] [--repeats 3] [--dtype bf16|fp32] [--workdir DIR]
                                  [--settle 3] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GB = 10 ** 9
MiB = 2 ** 20
ROOT = Path(__file__).resolve().parents[1]
# the children run this checkout's code
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
CONVERTER = [sys.executable, "-m", "ckpt_tools"]
IMPORTS = "import ckpt_tools.cli, ckpt_tools.convert"  # what a conversion imports (not MindSpore)
# Starts each command from a small process and reports (seconds, peak RSS in KiB, exit code). A child's ru_maxrss
# starts at the RSS of the process it was forked from (Linux carries it over exec), so forking straight from this
# script would charge its own few hundred MB to every command, cp included.
LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def make_checkpoint(directory: Path, size_gb: float, dtype: str) -> dict:
    """Qwen2-1.5B-like shapes (hidden 1536, vocab 151936) in 1 GB shards; layers added until the size is reached."""
    from ckpt_tools.convert import LAYOUTS
    from mindspore_llm.checkpoint import float32_to_bf16_bits
    from mindspore_llm.checkpoint_writer import OutTensor, write_checkpoint
    from mindspore_llm.models.config import config_from_hf
    from mindspore_llm.models.naming import OURS, tensor_layout

    def shapes_of(config):
        return tensor_layout(config_from_hf(config, "bench"), OURS).hf_shapes

    itemsize, tag = {"bf16": (2, "BF16"), "fp32": (4, "F32")}[dtype]
    config = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 1536,
              "intermediate_size": 8960, "num_attention_heads": 12, "num_key_value_heads": 2,
              "tie_word_embeddings": False, "max_position_embeddings": 4096, "num_hidden_layers": 1}
    per_layer = itemsize * sum(int(np.prod(s)) for n, s in shapes_of(config).items() if ".layers." in n)
    fixed = itemsize * (2 * 151936 * 1536 + 1536)
    config["num_hidden_layers"] = max(1, round((size_gb * GB - fixed) / per_layer))
    tensors = [OutTensor(name, shape, tag) for name, shape in shapes_of(config).items()]
    # One random block, repeated: nothing here compresses or deduplicates, and this is fast to make.
    values = np.random.default_rng(0).standard_normal(16 << 20, np.float32) * 0.02
    block = float32_to_bf16_bits(values) if dtype == "bf16" else values

    def chunks(tensor):
        left = int(np.prod(tensor.shape))
        while left:
            n = min(left, len(block))
            yield block[:n]
            left -= n

    directory.mkdir(parents=True)
    write_checkpoint(directory, tensors, LAYOUTS[("safetensors", "hf")], GB, chunks, workers=2)
    (directory / "config.json").write_text(json.dumps(config))
    return {"bytes": sum(t.nbytes for t in tensors), "largest_tensor": max(t.nbytes for t in tensors),
            "layers": config["num_hidden_layers"], "tensors": len(tensors),
            "shards": len(list(directory.glob("*.safetensors")))}


def weights_bytes(directory: Path) -> int:
    if not directory.exists():
        return 0
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix in (".ckpt", ".safetensors"))


def run(command: list[str], sync: bool = False) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of `command` as a process, plus a `sync` after it when `sync`."""
    launched = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *command], env=ENV, capture_output=True,
                              text=True)
    start = time.perf_counter()
    if sync:
        os.sync()
    synced = time.perf_counter() - start
    seconds, peak_kib, code = launched.stdout.split()
    if int(code) or launched.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{launched.stderr[-3000:]}")
    return float(seconds) + synced, int(peak_kib) * 1024


def settle(output: Path, remove: bool = True, pause: float = 0.0) -> None:
    """`output` removed (if `remove`), a replaced output that is deleted in the background gone, the disk synced,
    then `pause` seconds: on a disk that discards freed blocks (ext4 mounted with `discard`, a thin-provisioned
    virtual disk) the device is still trimming what was deleted after `sync` returns, and the next command's writes
    would wait behind it by an amount that varies from run to run."""
    if remove:
        shutil.rmtree(output, ignore_errors=True)
    while any(output.parent.glob(f".{output.name}.*.old")):
        time.sleep(0.05)
    os.sync()
    time.sleep(pause)


def save_checkpoint_child(src: str, dst: str) -> None:
    """mindspore.save_checkpoint of the first shard's tensors; prints seconds and peak RSS above the tensors."""
    import mindspore as ms

    from mindspore_llm.checkpoint import iter_tensors, weight_files

    shard = sorted(set(weight_files(src).values()))[0]
    dtypes = {"BF16": ms.bfloat16, "F32": ms.float32}
    params = [{"name": n, "data": ms.Tensor(f.float32(n), dtypes[f.dtype(n)])} for n, f in iter_tensors(src)
              if f.path == shard]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: measure the save itself
    status = lambda field: next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text()
                                .splitlines() if line.startswith(field + ":"))
    before = status("VmRSS")
    start = time.perf_counter()
    ms.save_checkpoint(params, str(Path(dst) / "shard.ckpt"))
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_above": status("VmHWM") - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.8, help="checkpoint size in GB (default 2.8)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="the checkpoint's dtype")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the timed commands (default 3)")
    parser.add_argument("--workdir", type=Path, help="where to make the temporary files (default: system temp)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to wait after deleting the previous output and syncing, before each timed "
                             "command (default 3: lets the disk finish discarding the freed blocks)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary files")
    parser.add_argument("--save-checkpoint-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_checkpoint_child:
        save_checkpoint_child(*args.save_checkpoint_child)
        return
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        hf, ms_ckpt, out = work / "hf", work / "ms_ckpt", work / "out"
        start = time.perf_counter()
        info = make_checkpoint(hf, args.size_gb, args.dtype)
        print(f"synthetic checkpoint: {info['bytes'] / GB:.2f} GB {args.dtype}, {info['shards']} shards, "
              f"{info['layers']} layers, {info['tensors']} tensors, largest tensor "
              f"{info['largest_tensor'] / MiB:.0f} MiB (made in {time.perf_counter() - start:.0f} s)")
        run(CONVERTER + ["hf2ms", str(hf), str(ms_ckpt), "-q"])  # ms2hf's source
        _, baseline = run([sys.executable, "-c", IMPORTS])
        hf2ms = CONVERTER + ["hf2ms", str(hf), str(out), "-q"]
        timed = {  # name -> (command, removes the output before it runs)
            "cp -r": (["cp", "-r", str(hf), str(out)], True),
            "imports only (no conversion)": ([sys.executable, "-c", IMPORTS], True),
            "hf2ms": (hf2ms, True),
            "hf2ms --overwrite (replaces it)": (hf2ms + ["--overwrite"], False),
            "hf2ms --format safetensors": (hf2ms + ["--format", "safetensors"], True),
            "ms2hf": (CONVERTER + ["ms2hf", str(ms_ckpt), str(out), "-q"], True),
        }
        results = {(name, mode): [] for name in timed for mode in ("cache", "disk")}
        for round_ in range(args.repeats):
            for mode in ("cache", "disk"):
                for name, (command, fresh) in timed.items():
                    settle(out, remove=fresh, pause=args.settle)
                    seconds, peak = run(command, sync=mode == "disk")
                    results[name, mode].append((seconds, peak, weights_bytes(out)))
            print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr)

        def rate(samples):
            return samples[0][2] / statistics.median(s for s, _, _ in samples)

        print(f"\n{args.repeats} alternating rounds, whole processes; 'vs cp' = output bytes per median second over "
              f"cp's (higher is faster); peak RSS above the import-only process ({baseline / MiB:.0f} MiB):")
        print(f"{'command':32s} {'mode':10s} {'min s':>6s} {'median s':>8s} {'GB/s':>5s} {'vs cp':>6s} "
              f"{'peak RSS':>9s} {'above':>9s} {'/ largest':>9s}")
        for (name, mode), samples in results.items():
            peak = max(p for _, p, _ in samples)
            above = max(peak - baseline, 0) if name != "cp -r" else 0
            line = (f"{name:32s} {'page cache' if mode == 'cache' else 'on disk':10s} "
                    f"{min(s for s, _, _ in samples):6.2f} {statistics.median(s for s, _, _ in samples):8.2f} ")
            if samples[0][2]:
                line += (f"{rate(samples) / GB:5.2f} {rate(samples) / rate(results['cp -r', mode]):5.2f}x "
                         f"{peak / MiB:5.0f} MiB {above / MiB:5.0f} MiB {above / info['largest_tensor']:8.2f}x")
            else:  # what every conversion pays before its first byte
                line += f"{'':5s} {'':6s} {peak / MiB:5.0f} MiB"
            print(line)
        for mode, target in (("cache", 0.5), ("disk", 0.8)):
            ratio = rate(results["hf2ms", mode]) / rate(results["cp -r", mode])
            print(f"hf2ms vs cp, {'through the page cache' if mode == 'cache' else 'on disk (each + sync)'}: "
                  f"{ratio:.2f}x (target >= {target}x)")

        once = {
            # fused tensors: w_qkv per KV group, w_gate_hidden interleaved row by row, streamed in slabs
            "hf2ms --naming mindformers --qkv-concat": hf2ms + ["--naming", "mindformers", "--qkv-concat"],
            "ms2hf of that (splits them)": CONVERTER + ["ms2hf", str(work / "fused"), str(out), "-q"],
            "hf2ms --dtype fp32 (casts)" if args.dtype == "bf16" else "hf2ms --dtype bf16 (casts)":
                hf2ms + ["--dtype", "fp32" if args.dtype == "bf16" else "bf16"],
        }
        print("\nOnce each, page cache (disk synced before each):")
        print(f"{'command':40s} {'s':>6s} {'GB/s':>5s} {'vs cp':>6s} {'peak RSS':>9s} {'above':>9s} {'/ largest':>9s}")
        for name, command in once.items():
            settle(out, pause=args.settle)
            seconds, peak = run(command)
            rate_once = weights_bytes(out) / seconds
            if name.startswith("hf2ms --naming"):
                shutil.rmtree(work / "fused", ignore_errors=True)
                out.rename(work / "fused")
            above = max(peak - baseline, 0)
            vs_cp = rate_once / rate(results['cp -r', 'cache'])
            print(f"{name:40s} {seconds:6.2f} {rate_once / GB:5.2f} {vs_cp:5.2f}x "
                  f"{peak / MiB:5.0f} MiB {above / MiB:5.0f} MiB {above / info['largest_tensor']:8.2f}x")
        settle(out)
        out.mkdir()
        child = subprocess.run([sys.executable, __file__, "--save-checkpoint-child", str(hf), str(out)], env=ENV,
                               capture_output=True, text=True, check=True)
        saved = json.loads(child.stdout.strip().splitlines()[-1])
        rate_once = weights_bytes(out) / saved["seconds"]
        print(f"{'mindspore.save_checkpoint (1st shard)':40s} {saved['seconds']:6.2f} {rate_once / GB:5.2f} "
              f"{rate_once / rate(results['cp -r', 'cache']):5.2f}x {'':9s} {saved['peak_above'] / MiB:5.0f} MiB "
              f"{saved['peak_above'] / info['largest_tensor']:8.2f}x  (above its Tensors in memory)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
