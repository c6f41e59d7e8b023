"""Compile time of the training step against layer count and pipeline micro-batches, graph mode on this machine.

    python bench/bench_compile.py [--layers 2 4 8] [--micro-batches 2 4 8]

Each point compiles in a fresh process (tiny Qwen2: hidden 64, 16 tokens x 2 rows per micro-batch) and times the
first call of the step (compile + one run; the run is milliseconds) against the second. Printed side by side with
the ratio to the first point, since absolute times on a shared machine are noise. The pipeline points build the
step as an Ascend job does (``Pipeline`` + ``PipelineGradReducer``, stand-alone): MindSpore unrolls every
micro-batch into the graph; on Ascend ``lazy_inline`` on the loss cell compiles it once instead (not measurable
here: the CPU backend refuses reused subgraphs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

POINT = r"""
import json, sys, time
import numpy as np
import mindspore as ms
ms.set_context(mode=ms.GRAPH_MODE); ms.set_device("CPU")
from mindspore_llm.models.auto import build_model, config_from_yaml_section
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.context import SEMI_AUTO, ParallelContext
from mindspore_llm.parallel.plan import apply_plan
from mindspore_llm.train.optim import AdamW, OptimizerConfig
from mindspore_llm.train.schedule import ScheduleConfig
from mindspore_llm.train.step import PrecisionConfig, TrainStep

layers, micro = int(sys.argv[1]), int(sys.argv[2])
model = build_model(config_from_yaml_section(dict(
    architecture="Qwen2ForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64), "model"))
optimizer = AdamW(model.trainable_params(), OptimizerConfig(), ScheduleConfig(total_steps=10))
kwargs = {}
if micro > 1:
    parallel = ParallelConfig(pipeline_stages=2, micro_batch_num=micro, optimizer_shard=True)
    apply_plan(model, parallel)
    context = ParallelContext(1, 2, SEMI_AUTO, "bench", 0, 1, 1, 2, micro, True)
    kwargs = context.step_parallelism(optimizer.parameters)
step = TrainStep(model, optimizer, PrecisionConfig(), 1, 1.0, **kwargs)
rows = 2 * max(micro, 1)
rng = np.random.default_rng(0)
ids = ms.Tensor(rng.integers(0, 256, (rows, 16)), ms.int32)
mask = ms.Tensor(np.ones((rows, 16)), ms.int32)
positions = ms.Tensor(np.tile(np.arange(16), (rows, 1)), ms.int32)
times = []
for _ in range(2):
    tick = time.perf_counter()
    step(ids, ids, mask, positions)[0].asnumpy()
    times.append(time.perf_counter() - tick)
print(json.dumps({"first": times[0], "second": times[1]}))
"""


def measure(layers: int, micro: int) -> dict:
    env = {**os.environ, "GLOG_v": "3"}
    out = subprocess.run([sys.executable, "-c", POINT, str(layers), str(micro)], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    rows = [("layers", n, 1) for n in args.layers] + [("pipeline micro-batches (2 layers)", m, m)
                                                      for m in args.micro_batches]
    base = {}
    print(f"{'varied':36s} {'value':>6s} {'first call s':>13s} {'second s':>9s} {'ratio':>6s}")
    for label, value, micro in rows:
        point = measure(2 if micro > 1 else value, micro)
        base.setdefault(label, point["first"])
        print(f"{label:36s} {value:6d} {point['first']:13.1f} {point['second']:9.3f} "
              f"{point['first'] / base[label]:6.2f}", flush=True)


if __name__ == "__main__":
    main()
