"""Training-step throughput and peak memory: mindspore_llm (graph mode) vs a PyTorch + transformers loop, same CPU,
same threads.

Both start from the same weights (a random Qwen2 saved with ``save_pretrained``), train fp32 with AdamW (weight decay
on matrices), global-norm clipping at 1.0 and the same batch. Each framework runs in its own worker process, so each
peak RSS (VmHWM) is that framework's alone; the parent alternates the workers step by step, so load from other
processes on a shared machine falls on both alike. MindSpore's first call compiles the graph (reported as compile
time = first call - one step); then both run untimed warm-up steps and the timed steps.

    python bench/bench_train_step.py                       # 4 layers, hidden 512, seq 512, batch 4, 2 threads
    python bench/bench_train_step.py --threads 2 --steps 5 --profile
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import numpy as np

LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per framework")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each after the first (compiling) call")
    parser.add_argument("--profile", action="store_true",
                        help="also time the loss and the LM-head matmul (forward + backward) alone in each framework")
    parser.add_argument("--worker", choices=("mindspore", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM), in GB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    raise RuntimeError("no VmHWM in /proc/self/status")


def batch(args):
    input_ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int64)
    return input_ids, np.ones_like(input_ids)


def mindspore_worker(args):
    """(step, profile rows) of mindspore_llm's compiled training step."""
    import mindspore as ms
    from mindspore import ops

    from mindspore_llm import AutoModelForCausalLM
    from mindspore_llm.models.layers import CausalLMLoss
    from mindspore_llm.train import AdamW, OptimizerConfig, PrecisionConfig, ScheduleConfig, TrainStep

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    optimizer_cfg = OptimizerConfig(beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY,
                                    clip_grad_norm=CLIP)
    schedule = ScheduleConfig(lr=LR, warmup_steps=0, total_steps=1000, decay="constant")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    step = TrainStep(model, AdamW(model.trainable_params(), optimizer_cfg, schedule), PrecisionConfig(),
                     accumulation_steps=1, clip_grad_norm=optimizer_cfg.clip_grad_norm)
    input_ids, mask = batch(args)
    ids, attn = ms.Tensor(input_ids, ms.int32), ms.Tensor(mask, ms.int32)

    def ms_step():
        step(ids, ids, attn, None)[0].asnumpy()

    def profile_rows():
        loss_fn = CausalLMLoss()

        def ms_loss(logits, labels):
            total, count = loss_fn(logits, labels)
            return total / count

        def ms_head(hidden, weight):
            return ops.matmul(hidden, weight.T).sum()

        logits = ops.standard_normal((args.batch, args.seq, args.vocab)).astype(ms.float32)
        hidden = ops.standard_normal((args.batch * args.seq, args.hidden)).astype(ms.float32)
        loss_grad = ms.jit(ms.grad(ms_loss, 0))
        head_grad = ms.jit(ms.grad(ms_head, (0, 1)))
        return [("loss fwd+bwd", lambda: loss_grad(logits, ids).asnumpy()),
                ("LM-head matmul fwd+bwd", lambda: head_grad(hidden, model.lm_head.weight)[0].asnumpy())]

    return ms_step, profile_rows


def torch_worker(args):
    """(step, profile rows) of the PyTorch + transformers loop."""
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model = transformers.Qwen2ForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32,
                                                          attn_implementation="sdpa").train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS)
    input_ids, mask = batch(args)
    t_ids, t_mask = torch.tensor(input_ids), torch.tensor(mask)

    def torch_step():
        optimizer.zero_grad()
        model(t_ids, attention_mask=t_mask, labels=t_ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()

    def profile_rows():
        t_logits = torch.randn(args.batch, args.seq, args.vocab, requires_grad=True)
        t_hidden = torch.randn(args.batch * args.seq, args.hidden, requires_grad=True)

        def torch_loss():
            torch.nn.functional.cross_entropy(t_logits[:, :-1].reshape(-1, args.vocab),
                                              t_ids[:, 1:].reshape(-1)).backward()

        return [("loss fwd+bwd", torch_loss),
                ("LM-head matmul fwd+bwd", lambda: (t_hidden @ model.lm_head.weight.T).sum().backward())]

    return torch_step, profile_rows


def serve(args):
    """Worker loop on stdin/stdout, one JSON line per command: "step" runs one training step and answers its wall and
    process-CPU seconds; "profile i" does the same for profile row i; "peak" answers the peak RSS."""
    step, profile_rows = (mindspore_worker if args.worker == "mindspore" else torch_worker)(args)
    rows = None
    print(json.dumps({"ready": True}), flush=True)
    for command in iter(sys.stdin.readline, ""):
        command = command.split()
        if command[0] == "quit":
            break
        if command[0] == "peak":
            reply = {"peak_rss_gb": peak_rss_gb()}
        else:
            if command[0] == "profile" and rows is None:
                rows = profile_rows()
            fn = step if command[0] == "step" else rows[int(command[1])][1]
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            reply = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
        print(json.dumps(reply), flush=True)


class Worker:
    def __init__(self, framework, argv, model_dir):
        self.process = subprocess.Popen([sys.executable, __file__, *argv, "--worker", framework, "--model-dir",
                                         model_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.framework = framework

    def ask(self, command: str | None) -> dict:
        """The reply to `command`; with None, the next line (the "ready" that follows loading the model)."""
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.framework} worker exited (code {self.process.wait()})")
        return json.loads(line)

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        self.process.wait()


def interleaved(workers, command: str, warmup: int, repeats: int):
    """Per-call (wall, process CPU) seconds of each worker, the workers taking turns."""
    for _ in range(warmup):
        for worker in workers:
            worker.ask(command)
    totals = [[0.0, 0.0] for _ in workers]
    for _ in range(repeats):
        for worker, total in zip(workers, totals):
            reply = worker.ask(command)
            total[0] += reply["wall"]
            total[1] += reply["cpu"]
    return [(wall / repeats, cpu / repeats) for wall, cpu in totals]


def main():
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.worker:
        return serve(args)
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden,
                                      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                      max_position_embeddings=args.seq, tie_word_embeddings=False)
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as directory:
        hf_model = transformers.Qwen2ForCausalLM(config)
        hf_model.save_pretrained(directory)
        print(f"model: {sum(p.numel() for p in hf_model.parameters()) / 1e6:.1f}M parameters, {args.layers} layers, "
              f"hidden {args.hidden}, vocab {args.vocab}; batch {args.batch} x seq {args.seq} = {tokens} tokens/step; "
              f"{args.threads} threads; each framework in its own process", flush=True)
        del hf_model
        workers = [Worker("mindspore", argv, directory), Worker("torch", argv, directory)]
        try:
            for worker in workers:
                worker.ask(None)
            first = workers[0].ask("step")  # compiles
            workers[1].ask("step")
            (ms_time, ms_cpu), (torch_time, torch_cpu) = interleaved(workers, "step", args.warmup, args.steps)
            ms_rss, torch_rss = (worker.ask("peak")["peak_rss_gb"] for worker in workers)
            compile_time = first["wall"] - ms_time
            print(f"mindspore_llm graph mode: {tokens / ms_time:8.0f} tokens/s ({ms_time:.2f} s/step, "
                  f"{ms_cpu:.2f} CPU-s/step); compile {compile_time:.1f} s; peak RSS {ms_rss:.2f} GB")
            print(f"pytorch + transformers:   {tokens / torch_time:8.0f} tokens/s ({torch_time:.2f} s/step, "
                  f"{torch_cpu:.2f} CPU-s/step); peak RSS {torch_rss:.2f} GB")
            print(f"ratio mindspore_llm / pytorch: {torch_time / ms_time:.2f}x tokens/s by wall clock, "
                  f"{torch_cpu / ms_cpu:.2f}x by process CPU time; {ms_rss / torch_rss:.2f}x peak RSS")
            if args.profile:
                print("profile (seconds per call, interleaved):")
                for index, name in enumerate(("loss fwd+bwd", "LM-head matmul fwd+bwd")):
                    (ms_seconds, _), (torch_seconds, _) = interleaved(workers, f"profile {index}", 1, args.steps)
                    print(f"  {name:24s} mindspore {ms_seconds:6.2f}  torch {torch_seconds:6.2f}")
        finally:
            for worker in workers:
                worker.close()


if __name__ == "__main__":
    main()
