"""Generation throughput: the KV-cache generator vs the same model without a cache vs transformers' ``generate``.

One model (a random Qwen2 saved with ``save_pretrained``, loaded by both frameworks), one batch of left-padded
prompts, greedy decoding of a fixed number of new tokens (no stop token), the same thread count for MindSpore and
torch. "No cache" recomputes the whole fixed-length buffer for every new token (one compiled graph, the argmax taken
in the graph), which is what generation cost before the cache. The three run alternately after a warm-up call each
(MindSpore's first calls compile), and must produce the same tokens.

    python bench/bench_generate.py                                  # 4 layers, hidden 512, batch 8, 64 new tokens
    python bench/bench_generate.py --batch 16 --new-tokens 128 --repeats 3
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64, help="longest prompt; the others are 16-64 tokens shorter")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls of each")
    return parser.parse_args()


def main():
    args = parse_args()
    import mindspore as ms
    import torch
    import transformers
    from mindspore import nn, ops

    from mindspore_llm import AutoModelForCausalLM
    from mindspore_llm.generation import GenerationConfig, Generator, left_pad, position_ids

    torch.set_num_threads(args.threads)
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden,
                                      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                      max_position_embeddings=args.prompt + args.new_tokens,
                                      tie_word_embeddings=False, attn_implementation="sdpa")
    hf_model = transformers.Qwen2ForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory)
    rng = np.random.default_rng(0)
    lengths = [args.prompt] + list(rng.integers(max(1, args.prompt - 16), args.prompt, args.batch - 1))
    prompts = [rng.integers(3, args.vocab, n).tolist() for n in lengths]
    ids, mask = left_pad(prompts, args.prompt, 0)
    new = args.new_tokens
    print(f"model: {sum(p.numel() for p in hf_model.parameters()) / 1e6:.1f}M parameters, {args.layers} layers, "
          f"hidden {args.hidden}, kv heads {args.kv_heads}/{args.heads}, vocab {args.vocab}; batch {args.batch}, "
          f"prompts {min(lengths)}-{args.prompt} tokens, {new} new tokens greedy; {args.threads} threads")

    generator = Generator(model, GenerationConfig(max_new_tokens=new), args.batch, args.prompt)

    def with_cache():
        return generator.generate(prompts).tokens

    class NextToken(nn.Cell):
        """The whole buffer through the model, the argmax of the logits at `index` (no cache)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def construct(self, input_ids, attention_mask, positions, index):
            logits = self.model(input_ids, attention_mask, positions)
            return ops.argmax(ops.gather(logits, index, 1), -1).astype(ms.int32)

    next_token = NextToken(model)
    next_token.set_train(False)

    def without_cache():
        buffer = np.concatenate([ids, np.zeros((args.batch, new), np.int32)], 1)
        full_mask = np.concatenate([mask, np.zeros((args.batch, new), np.int32)], 1)
        for step in range(new):
            full_mask[:, args.prompt + step] = 1  # the slot being predicted: its position; causality hides it
            index = ms.Tensor(args.prompt + step - 1, ms.int32)
            buffer[:, args.prompt + step] = next_token(ms.Tensor(buffer), ms.Tensor(full_mask),
                                                       ms.Tensor(position_ids(full_mask)), index).asnumpy()
        return buffer[:, args.prompt:]

    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def transformers_generate():
        with torch.no_grad():
            out = hf_model.generate(t_ids, attention_mask=t_mask, max_new_tokens=new, min_new_tokens=new,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, args.prompt:].numpy()

    contestants = {"mindspore_llm, KV cache": with_cache, "mindspore_llm, no cache": without_cache,
                   "transformers generate": transformers_generate}
    first = {}
    for name, fn in contestants.items():  # warm-up: MindSpore compiles here
        start = time.perf_counter()
        first[name] = (fn(), time.perf_counter() - start)
    seconds = dict.fromkeys(contestants, 0.0)
    for _ in range(args.repeats):
        for name, fn in contestants.items():
            start = time.perf_counter()
            fn()
            seconds[name] += (time.perf_counter() - start) / args.repeats
    tokens = {name: out for name, (out, _) in first.items()}
    same = all(np.array_equal(out, tokens["transformers generate"]) for out in tokens.values())
    print(f"identical greedy tokens in all three: {'yes' if same else 'NO'}")
    for name in contestants:
        compile_note = f", first call {first[name][1]:.1f} s" if name.startswith("mindspore") else ""
        print(f"  {name:26s} {args.batch * new / seconds[name]:8.1f} new tokens/s ({seconds[name]:.2f} s/call"
              f"{compile_note})")
    cache = seconds["mindspore_llm, KV cache"]
    print(f"ratio KV cache / no cache: {seconds['mindspore_llm, no cache'] / cache:.2f}x; "
          f"KV cache / transformers: {seconds['transformers generate'] / cache:.2f}x (tokens/s)")


if __name__ == "__main__":
    main()
