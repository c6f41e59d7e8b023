"""Training-step throughput: mindspore_llm (graph mode) vs a PyTorch + transformers loop, same CPU, same threads.

Both start from the same weights (a random Qwen2 saved with ``save_pretrained``), train fp32 with AdamW (weight decay
on matrices), global-norm clipping at 1.0 and the same batch; MindSpore's first call compiles the graph (reported as
compile time = first call - one step); then both run untimed warm-up steps and the timed steps alternately.

    python bench/bench_train_step.py                       # 4 layers, hidden 512, seq 512, batch 4, 2 threads
    python bench/bench_train_step.py --threads 2 --steps 5 --profile
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np


def parse_args():
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
    return parser.parse_args()


def interleaved(fn_a, fn_b, warmup: int, repeats: int):
    """Per-call (wall, process CPU) seconds of a and b, timed alternately so that load from other processes on a
    shared machine falls on both alike."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    totals = {fn_a: [0.0, 0.0], fn_b: [0.0, 0.0]}
    for _ in range(repeats):
        for fn in (fn_a, fn_b):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            totals[fn][0] += time.perf_counter() - wall
            totals[fn][1] += time.process_time() - cpu
    return tuple((wall / repeats, cpu / repeats) for wall, cpu in (totals[fn_a], totals[fn_b]))


def main():
    args = parse_args()
    import torch
    import transformers
    import mindspore as ms
    from mindspore import ops

    from mindspore_llm import AutoModelForCausalLM
    from mindspore_llm.models.layers import CausalLMLoss
    from mindspore_llm.train import AdamW, OptimizerConfig, PrecisionConfig, ScheduleConfig, TrainStep

    torch.set_num_threads(args.threads)
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    tokens = args.batch * args.seq
    optimizer_cfg = OptimizerConfig(beta1=0.9, beta2=0.95, weight_decay=0.1, clip_grad_norm=1.0)
    schedule = ScheduleConfig(lr=1e-4, warmup_steps=0, total_steps=1000, decay="constant")

    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, args.vocab, (args.batch, args.seq)).astype(np.int64)
    mask = np.ones_like(input_ids)

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden,
                                      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                      max_position_embeddings=args.seq, tie_word_embeddings=False,
                                      attn_implementation="sdpa")
    hf_model = transformers.Qwen2ForCausalLM(config).train()
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory)
    print(f"model: {sum(p.numel() for p in hf_model.parameters()) / 1e6:.1f}M parameters, {args.layers} layers, "
          f"hidden {args.hidden}, vocab {args.vocab}; batch {args.batch} x seq {args.seq} = {tokens} tokens/step; "
          f"{args.threads} threads")

    # MindSpore
    step = TrainStep(model, AdamW(model.trainable_params(), optimizer_cfg, schedule), PrecisionConfig(),
                     accumulation_steps=1, clip_grad_norm=optimizer_cfg.clip_grad_norm)
    ids, attn = ms.Tensor(input_ids, ms.int32), ms.Tensor(mask, ms.int32)

    def ms_step():
        step(ids, ids, attn, None)[0].asnumpy()

    start = time.perf_counter()
    ms_step()
    first_call = time.perf_counter() - start
    ms_peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20

    # PyTorch + transformers
    params = list(hf_model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": optimizer_cfg.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=schedule.lr, betas=(optimizer_cfg.beta1, optimizer_cfg.beta2), eps=optimizer_cfg.eps)
    t_ids, t_mask = torch.tensor(input_ids), torch.tensor(mask)

    def torch_step():
        optimizer.zero_grad()
        hf_model(t_ids, attention_mask=t_mask, labels=t_ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optimizer_cfg.clip_grad_norm)
        optimizer.step()

    torch_step()
    (ms_time, ms_cpu), (torch_time, torch_cpu) = interleaved(ms_step, torch_step, args.warmup, args.steps)
    compile_time = first_call - ms_time

    print(f"mindspore_llm graph mode: {tokens / ms_time:8.0f} tokens/s ({ms_time:.2f} s/step, "
          f"{ms_cpu:.2f} CPU-s/step); compile {compile_time:.1f} s; peak RSS after compile {ms_peak_rss:.1f} GB")
    print(f"pytorch + transformers:   {tokens / torch_time:8.0f} tokens/s ({torch_time:.2f} s/step, "
          f"{torch_cpu:.2f} CPU-s/step)")
    print(f"ratio mindspore_llm / pytorch: {torch_time / ms_time:.2f}x tokens/s by wall clock, "
          f"{torch_cpu / ms_cpu:.2f}x by process CPU time")

    if args.profile:
        # The two suspects NOTES.md names, alone (whole-model graphs each hold GBs of CPU memory: not run here).
        loss_fn = CausalLMLoss()

        def ms_loss(logits, labels):
            total, count = loss_fn(logits, labels)
            return total / count

        def ms_head(hidden, weight):
            return ops.matmul(hidden, weight.T).sum()

        logits = ops.standard_normal((args.batch, args.seq, args.vocab)).astype(ms.float32)
        hidden = ops.standard_normal((tokens, args.hidden)).astype(ms.float32)
        loss_grad = ms.jit(ms.grad(ms_loss, 0))
        head_grad = ms.jit(ms.grad(ms_head, (0, 1)))
        t_logits = torch.randn(args.batch, args.seq, args.vocab, requires_grad=True)
        t_hidden = torch.randn(tokens, args.hidden, requires_grad=True)
        t_weight = hf_model.lm_head.weight

        def torch_loss():
            torch.nn.functional.cross_entropy(t_logits[:, :-1].reshape(-1, args.vocab),
                                              t_ids[:, 1:].reshape(-1)).backward()

        rows = [("loss fwd+bwd", lambda: loss_grad(logits, ids).asnumpy(), torch_loss),
                ("LM-head matmul fwd+bwd", lambda: head_grad(hidden, model.lm_head.weight)[0].asnumpy(),
                 lambda: (t_hidden @ t_weight.T).sum().backward())]
        print("profile (seconds per call, interleaved):")
        for name, ms_fn, torch_fn in rows:
            (ms_seconds, _), (torch_seconds, _) = interleaved(ms_fn, torch_fn, 1, args.steps)
            print(f"  {name:24s} mindspore {ms_seconds:6.2f}  torch {torch_seconds:6.2f}")

if __name__ == "__main__":
    main()
