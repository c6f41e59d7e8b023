"""``msllm eval``: k samples per prompt with the KV-cache generator, scored by the reward functions, as pass@1
and pass@k (the unbiased estimator of Chen et al. 2021, https://arxiv.org/abs/2107.03374)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mindspore_llm.generation import Generator, decode_completions, generate_all
from mindspore_llm.rl.prompts import Prompt
from mindspore_llm.rl.rewards import RewardConfig, Rewards


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from `samples` (of which
    `correct` pass) passes: 1 - C(n - c, k) / C(n, k)."""
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


@dataclass
class Evaluation:
    rows: list[dict]  # one per (prompt, sample): prompt, answer, sample, completion, rewards, passed
    summary: dict[str, float]  # <reward>/pass@1, <reward>/pass@k (k = samples per prompt when > 1), <reward>/mean

    def report(self) -> str:
        return "\n".join(f"{key}: {value:.4f}" for key, value in self.summary.items())


def evaluate(generator: Generator, tokenizer, prompts: Sequence[Prompt], rewards: Sequence[RewardConfig],
             num_samples: int = 1, seed: int = 0, progress: bool = False) -> Evaluation:
    """A sample passes a reward when it scores >= 1 (the built-in rewards score 0 or 1)."""
    generation = generate_all(generator, [p.ids for p in prompts], seed, num_samples, progress)
    completions = decode_completions(tokenizer, generation, generator.config.eos_token_id)
    repeated = [p for p in prompts for _ in range(num_samples)]
    scorer = Rewards(rewards)
    scores = scorer.score([p.text for p in repeated], completions, [p.answer for p in repeated])
    rows = [{"prompt": p.text, "answer": p.answer, "sample": i % num_samples, "completion": c,
             "rewards": {name: float(s[i]) for name, s in scores.items()}}
            for i, (p, c) in enumerate(zip(repeated, completions))]
    summary = {}
    for name, values in scores.items():
        passed = (values >= 1.0).reshape(len(prompts), num_samples)
        for row, ok in zip(rows, passed.reshape(-1)):
            row.setdefault("passed", {})[name] = bool(ok)
        counts = passed.sum(1)
        summary[f"{name}/pass@1"] = float(np.mean([pass_at_k(num_samples, c, 1) for c in counts]))
        if num_samples > 1:
            summary[f"{name}/pass@{num_samples}"] = float(np.mean([pass_at_k(num_samples, c, num_samples)
                                                                   for c in counts]))
        summary[f"{name}/mean"] = float(values.mean())
    return Evaluation(rows, summary)
