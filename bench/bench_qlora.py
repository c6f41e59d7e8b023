"""QLoRA: resident bytes of a quantized base against the fp32 and bf16 base, and a QLoRA step against a LoRA step.

Memory. A synthetic bf16 Qwen2-shaped checkpoint (hidden 2560, FFN 13824, vocab 8192, 6 layers: 0.77B parameters,
3.1 GB in fp32; its embeddings and head are 5.4% of the parameters, Qwen2.5-32B's are 4.8%) is written to a
temporary directory; each base is then loaded by ``AutoModelForCausalLM.from_pretrained`` in a fresh child process
(embeddings, norms and head in bf16, as QLoRA runs keep them), which reports its parameters' bytes, its RSS growth
and its peak RSS above the baseline after imports. The float bases are built without allocating (their bytes are
their shapes times their dtypes) unless ``--load-float`` loads them for real (3.1 GB of RSS for fp32).

Step time. A smaller model (2 layers, hidden 1024, seq 256, batch 2, fp32 on the CPU), LoRA rank 16 on every
projection, once over the fp32 base and once over its NF4 (double-quantized) copy, the same AdamW step on the same
batch, timed alternately in one process so that load from other processes falls on both alike.

    python bench/bench_qlora.py [--load-float] [--threads 2] [--steps 5] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_load import vm_hwm, vm_rss
from bench_train_step import interleaved

GB = 2 ** 30
MEMORY_MODEL = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 8192, "hidden_size": 2560,
                "intermediate_size": 13824, "num_hidden_layers": 6, "num_attention_heads": 20,
                "num_key_value_heads": 4, "max_position_embeddings": 4096, "tie_word_embeddings": False}
BASES = {"fp32": None, "bf16": None, "int8": "int8", "nf4": "nf4", "nf4 + double quant": "nf4-dq"}


def make_checkpoint(directory: Path) -> int:
    """The synthetic bf16 checkpoint, streamed to disk (one random block repeated); returns its bytes."""
    from ckpt_tools.convert import LAYOUTS
    from mindspore_llm.checkpoint_writer import OutTensor, write_checkpoint
    from mindspore_llm.checkpoint import float32_to_bf16_bits
    from mindspore_llm.models.config import config_from_hf
    from mindspore_llm.models.naming import OURS, tensor_layout

    shapes = tensor_layout(config_from_hf(MEMORY_MODEL, "bench"), OURS).hf_shapes
    tensors = [OutTensor(name, shape, "BF16") for name, shape in shapes.items()]
    block = float32_to_bf16_bits(np.random.default_rng(0).standard_normal(16 << 20, np.float32) * 0.02)

    def chunks(tensor):
        left = int(np.prod(tensor.shape))
        while left:
            yield block[:min(left, len(block))]
            left -= min(left, len(block))

    directory.mkdir(parents=True)
    write_checkpoint(directory, tensors, LAYOUTS[("safetensors", "hf")], 1 << 30, chunks)
    (directory / "config.json").write_text(json.dumps(MEMORY_MODEL))
    return sum(t.nbytes for t in tensors)


def quantization(name: str | None):
    from mindspore_llm.quant import QuantizationConfig

    if name is None:
        return None
    return QuantizationConfig(method=name.split("-")[0], double_quant=name.endswith("-dq"))


def memory_child(job: dict) -> dict:
    """In a fresh process: the base `job` describes, loaded (or, float without --load-float, built unallocated)."""
    import mindspore as ms
    from mindspore.nn.utils import no_init_parameters

    from mindspore_llm import AutoModelForCausalLM
    from mindspore_llm.models.auto import build_model
    from mindspore_llm.models.config import load_config
    from mindspore_llm.models.layers import Precision

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    baseline_rss, baseline_peak = vm_rss(), vm_hwm()
    dtype, method, path = job["dtype"], quantization(job["quantization"]), job["path"]
    start = time.perf_counter()
    if method is None and not job["load"]:
        with no_init_parameters():
            model = build_model(load_config(path), Precision.from_names(dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, param_dtype=dtype, quantization=method)
    seconds = time.perf_counter() - start
    nbytes = sum(p.nbytes for p in model.get_parameters())
    loaded = method is not None or job["load"]
    return {"bytes": nbytes, "seconds": seconds if loaded else None,
            "rss_growth": vm_rss() - baseline_rss if loaded else None,
            "peak_above_baseline": vm_hwm() - baseline_peak if loaded else None}


def run_child(job: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{job} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(args, work: Path) -> None:
    start = time.perf_counter()
    size = make_checkpoint(work / "memory_model")
    print(f"synthetic checkpoint: {size / GB:.2f} GiB bf16 on disk, made in {time.perf_counter() - start:.0f} s")
    results = {}
    for name, method in BASES.items():
        job = {"path": str(work / "memory_model"), "dtype": "fp32" if name == "fp32" else "bf16",
               "quantization": method, "load": args.load_float}
        results[name] = run_child(job)
    fp32, bf16 = results["fp32"]["bytes"], results["bf16"]["bytes"]
    print(f"\n{'base':20s} {'params GiB':>10s} {'/ fp32':>7s} {'/ bf16':>7s} {'RSS growth':>11s} {'peak RSS':>9s} "
          f"{'load s':>7s}")
    for name, r in results.items():
        measured = [f"{r['rss_growth'] / GB:9.2f} G", f"{r['peak_above_baseline'] / GB:7.2f} G",
                    f"{r['seconds']:7.1f}"] if r["seconds"] is not None else [f"{'(built)':>11s}", "", ""]
        print(f"{name:20s} {r['bytes'] / GB:10.3f} {r['bytes'] / fp32:7.3f} {r['bytes'] / bf16:7.3f} "
              + " ".join(measured))
    print("params = the bytes of every parameter the loaded model holds (the quantized bases: linear layers as codes "
          "and scales, the rest bf16); RSS growth and peak are the child's, above its baseline after imports.")


class InProcessStep:
    """A step run in this process, with the worker interface ``bench_train_step.interleaved`` alternates: ``ask``
    runs it and answers its wall and process-CPU seconds."""

    def __init__(self, run):
        self.run = run

    def ask(self, command: str) -> dict:
        wall, cpu = time.perf_counter(), time.process_time()
        self.run()
        return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def step_time(args, work: Path) -> None:
    import mindspore as ms
    import torch
    import transformers

    from mindspore_llm import AutoModelForCausalLM
    from mindspore_llm.lora import LoraConfig, apply_lora
    from mindspore_llm.quant import QuantizationConfig
    from mindspore_llm.train import AdamW, OptimizerConfig, PrecisionConfig, ScheduleConfig, TrainStep

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    transformers.Qwen2ForCausalLM(config).save_pretrained(work / "step_model")
    lora = LoraConfig(rank=16, alpha=32.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"])
    ids = ms.Tensor(np.random.default_rng(0).integers(0, 8192, (2, 256)), ms.int32)
    mask = ms.Tensor(np.ones((2, 256)), ms.int32)
    steps, losses = {}, {}
    for name, method in (("LoRA (fp32 base)", None), ("QLoRA (NF4 + double quant)",
                                                      QuantizationConfig(method="nf4", double_quant=True))):
        model = AutoModelForCausalLM.from_pretrained(work / "step_model", quantization=method)
        ms.set_seed(0)
        apply_lora(model, lora)
        optimizer = AdamW(model.trainable_params(), OptimizerConfig(),
                          ScheduleConfig(lr=1e-3, warmup_steps=0, total_steps=1000, decay="constant"))
        step = TrainStep(model, optimizer, PrecisionConfig(), accumulation_steps=1)
        losses[name] = float(step(ids, ids, mask, None)[0].asnumpy())  # compiles

        steps[name] = InProcessStep(lambda step=step: step(ids, ids, mask, None)[0].asnumpy())
    (lora_time, lora_cpu), (qlora_time, qlora_cpu) = interleaved(list(steps.values()), "step", args.warmup,
                                                                 args.steps)
    print(f"\nstep time, 2 x 256 tokens, {args.threads} threads (first-step losses: "
          + ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items()) + ")")
    print(f"  LoRA  {lora_time:6.2f} s/step ({lora_cpu:.2f} CPU-s)")
    print(f"  QLoRA {qlora_time:6.2f} s/step ({qlora_cpu:.2f} CPU-s)")
    print(f"  QLoRA / LoRA step time: {qlora_time / lora_time:.2f}x by wall clock, {qlora_cpu / lora_cpu:.2f}x by "
          f"process CPU time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-float", action="store_true", help="load the fp32 and bf16 bases too (3.1 GB RSS)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each after the compiling one")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--workdir", type=Path, help="where to make the temporary files (default: system temp)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(memory_child(json.loads(args.child))))
        return
    work = Path(tempfile.mkdtemp(prefix="bench_qlora_", dir=args.workdir))
    try:
        if not args.skip_memory:
            memory(args, work)
        if not args.skip_steps:
            step_time(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
