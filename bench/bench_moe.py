"""One DeepSeekMoE layer, forward + backward: the capacity (sparse) dispatch against the dense one, same weights,
same tokens, same CPU threads, graph mode.

Timing: both compiled first, then run alternately (so load from other processes on a shared machine falls on both
alike); per-call wall and process CPU time. A third timed call runs the stacked experts alone on the capacity
dispatch's (E, B*C, H) buffer: the difference to the whole capacity layer is what the dispatch itself costs
(router, the per-sequence sorts, gathers and transposes), which FLOP counts miss. Peak memory: each dispatch also
runs alone in a child process, whose peak resident set size (VmHWM, MindSpore's ~0.5 GB import included) is
reported beside that of a child that only imports and builds the layer. Expected speed-up of the routed experts:
E / (k * capacity_factor) (E x T rows against E x C x B rows); the printed FLOP ratio includes the router.

    python bench/bench_moe.py                    # E 64, k 6, 1024 tokens (one sequence), hidden 512, I 256
    python bench/bench_moe.py --tokens 4096      # the issue's 4096 tokens (4 x 1024): the dense child alone
                                                 # then needs ~8.5 GB, the timing process ~9 GB

The default is 1024 tokens because the dense dispatch's activations grow as E x tokens x hidden: at 1024 tokens its
child process peaks at 2.7 GB, and the timing process (both graphs) stays under 4 GB on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--groups", type=int, default=8, help="n_group (topk_group is half of it)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per call (sequences x seq-len)")
    parser.add_argument("--seq-len", type=int, default=1024, help="the capacity is per sequence of this length")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=256, help="moe_intermediate_size")
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed calls of each dispatch")
    parser.add_argument("--no-memory", action="store_true", help="skip the child processes that measure peak RSS")
    parser.add_argument("--child", choices=["capacity", "dense", "none"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build(args, dispatch: str):
    """(forward + backward callable, its input) for one layer; every build has the same weights and tokens."""
    import mindspore as ms
    from mindspore import Tensor

    from mindspore_llm.models.layers import Precision
    from mindspore_llm.models.moe import DeepSeekMoE, GroupLimitedTopKRouter

    precision = Precision()
    router = GroupLimitedTopKRouter(args.hidden, args.experts, args.top_k, args.groups, args.groups // 2, True, 2.5,
                                    precision, 0.02)
    block = DeepSeekMoE(args.hidden, args.intermediate, args.experts, 0, router, dispatch=dispatch,
                        capacity_factor=args.capacity_factor, drop_policy="probability", aux_loss_alpha=0.0,
                        bias_update_speed=0.0, precision=precision, init_std=0.02)
    rng = np.random.default_rng(0)
    for param in block.trainable_params():
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.05))
    block.set_train(True)
    batch = args.tokens // args.seq_len
    x = Tensor(rng.standard_normal((batch, args.seq_len, args.hidden)).astype(np.float32))
    probe = Tensor(rng.standard_normal((batch, args.seq_len, args.hidden)).astype(np.float32))

    def objective(inputs):
        return (block(inputs) * probe).sum()

    grad_fn = ms.value_and_grad(objective, 0, block.trainable_params())

    def step():
        loss, grads = grad_fn(x)
        return float(loss.asnumpy()), grads

    return step, block


def experts_alone(args, block, rows: int):
    """Forward + backward of `block`'s stacked experts on a random (E, rows, H) input."""
    import mindspore as ms
    from mindspore import Tensor

    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((args.experts, rows, args.hidden)).astype(np.float32))
    probe = Tensor(rng.standard_normal((args.experts, rows, args.hidden)).astype(np.float32))

    def objective(inputs):
        return (block.experts(inputs) * probe).sum()

    grad_fn = ms.value_and_grad(objective, 0, block.experts.trainable_params())
    return lambda: grad_fn(x)[0].asnumpy()


def setup(args):
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)


def child(args) -> None:
    """Build (and unless 'none', compile and run twice) one dispatch; print its peak RSS in GB as JSON."""
    setup(args)
    if args.child != "none":
        step, _ = build(args, args.child)
        step()
        step()
    else:
        build(args, "dense")
    # VmHWM is this process's own peak (ru_maxrss would carry the parent's over fork + exec)
    status = Path("/proc/self/status").read_text()
    print(json.dumps({"peak_rss_gb": int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 2 ** 20}))


def peak_rss(args, dispatch: str) -> float:
    command = [sys.executable, __file__, "--child", dispatch] + [
        f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
        if key not in ("child", "no_memory", "steps")]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_gb"]


def interleaved(fns, repeats: int):
    """Per-call (wall, process CPU) seconds of each callable, timed alternately."""
    totals = [[0.0, 0.0] for _ in fns]
    for _ in range(repeats):
        for total, fn in zip(totals, fns):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            total[0] += time.perf_counter() - wall
            total[1] += time.process_time() - cpu
    return [(wall / repeats, cpu / repeats) for wall, cpu in totals]


def main():
    args = parse_args()
    if args.child:
        return child(args)
    if args.tokens % args.seq_len:
        raise SystemExit(f"--tokens ({args.tokens}) must be a multiple of --seq-len ({args.seq_len})")
    from mindspore_llm.models.shapes import expert_capacity

    setup(args)
    e, k, t, h, i = args.experts, args.top_k, args.tokens, args.hidden, args.intermediate
    capacity = expert_capacity(args.seq_len, e, k, args.capacity_factor)
    batch = t // args.seq_len
    print(f"one MoE layer: E {e}, top-{k}, {t} tokens ({batch} x {args.seq_len}), hidden {h}, intermediate {i}, "
          f"capacity factor {args.capacity_factor:g} -> C = {capacity} tokens per expert and sequence; fp32, "
          f"{args.threads} threads")
    if not args.no_memory:  # first, while this process is small
        base = peak_rss(args, "none")
        peaks = {d: peak_rss(args, d) for d in ("capacity", "dense")}
    steps, blocks = {}, {}
    for dispatch in ("capacity", "dense"):
        step, block = build(args, dispatch)
        tick = time.perf_counter()
        loss, _ = step()
        steps[dispatch], blocks[dispatch] = step, block
        dropped = float(block.dropped_slots.asnumpy())
        print(f"  {dispatch:8s} first call (compile + run) {time.perf_counter() - tick:6.1f} s, objective "
              f"{loss:.4f}, dropped token-slots {dropped:.0f} of {t * k} ({dropped / (t * k):.1%})")
    experts = experts_alone(args, blocks["capacity"], capacity * batch)
    experts()
    timed = interleaved([steps["capacity"], steps["dense"], experts], args.steps)
    (sparse_wall, sparse_cpu), (dense_wall, dense_cpu), (experts_wall, experts_cpu) = timed
    expert_rows = {"dense": e * t, "capacity": e * capacity * batch}
    router_flops = 6 * t * h * e
    flops = {d: 6 * rows * 3 * h * i + router_flops for d, rows in expert_rows.items()}
    print(f"forward + backward, mean of {args.steps} alternating calls (wall / process CPU):")
    print(f"  capacity        {sparse_wall:8.3f} s / {sparse_cpu:8.3f} s")
    print(f"  dense           {dense_wall:8.3f} s / {dense_cpu:8.3f} s")
    print(f"  experts alone on the capacity buffer ({e} x {capacity * batch} rows) "
          f"{experts_wall:8.3f} s / {experts_cpu:8.3f} s: the dispatch costs the other "
          f"{1 - experts_wall / sparse_wall:.0%} of the capacity layer")
    print(f"  speed-up (dense / capacity): {dense_wall / sparse_wall:.2f}x wall, {dense_cpu / sparse_cpu:.2f}x CPU; "
          f"expected from the expert rows E / (k x capacity_factor) = {e * t / expert_rows['capacity']:.2f}x, "
          f"from matmul FLOPs incl. the router {flops['dense'] / flops['capacity']:.2f}x")
    print(f"  matmul rate: capacity layer {flops['capacity'] / sparse_wall / 1e9:.0f} GFLOP/s, its experts alone "
          f"{(flops['capacity'] - router_flops) / experts_wall / 1e9:.0f} GFLOP/s, dense "
          f"{flops['dense'] / dense_wall / 1e9:.0f} GFLOP/s")
    if not args.no_memory:
        print(f"peak RSS of a child process running one dispatch (import + build alone: {base:.2f} GB):")
        for d, peak in peaks.items():
            print(f"  {d:8s} {peak:6.2f} GB ({peak - base:+.2f} GB over import + build)")
        print(f"  ratio of the increments (dense / capacity): "
              f"{(peaks['dense'] - base) / max(peaks['capacity'] - base, 1e-3):.1f}x")


if __name__ == "__main__":
    main()
