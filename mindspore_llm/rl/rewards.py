"""Reward functions ``reward(prompt, completion, answer) -> float`` and their weighted sum.

Built in:
  math_accuracy  1 when the completion's final answer equals the reference answer as mathematics, else 0. The
                 final answer is read from the text after the last ``</think>``: the last ``\\boxed{...}``, else
                 what follows the last ``####``, else the text itself (its last expression); math-verify (Hugging
                 Face's grader, as open-r1 and TRL use it) compares it with the reference, so 1/2, 0.5 and
                 \\dfrac{1}{2}, 1,000 and 1000, 72% and 72\\% agree.
  format         1 when the completion is one ``<think>reasoning</think>`` block followed by a non-empty answer
                 (R1's format; the ``<think>`` may end the prompt, as R1-style chat templates put it there).
  exact_match    1 when the answer (after ``</think>``) equals the reference answer, whitespace stripped.
Any other name is ``module:function``, imported and called with the same three strings.
"""
from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import require
from mindspore_llm.data.chat import split_reasoning

RewardFunction = Callable[[str, str, str], float]
BOXED = "\\boxed{"


@dataclass(kw_only=True)
class RewardConfig:
    """One entry of ``grpo.rewards``: a built-in name or ``module:function``, and its weight in the sum."""

    name: str
    weight: float = 1.0

    def validate(self) -> None:
        require(self.name in BUILT_IN or re.fullmatch(r"[\w.]+:\w+", self.name) is not None,
                f"name: {self.name!r} is neither a built-in reward ({', '.join(BUILT_IN)}) nor module:function")


def final_answer(text: str) -> str:
    """Where the answer of a (reasoning) completion is read from: the last ``\\boxed{...}`` (its braces
    balanced), else the text after the last ``####``, else the answer text itself."""
    _, answer = split_reasoning(text)
    start = answer.rfind(BOXED)
    if start >= 0:
        depth = 0
        for end in range(start + len(BOXED) - 1, len(answer)):
            depth += {"{": 1, "}": -1}.get(answer[end], 0)
            if depth == 0:
                return answer[start:end + 1]
        return ""  # an unclosed box is no answer
    marker = answer.rfind("####")
    return answer[marker + 4:].strip() if marker >= 0 else answer


@functools.lru_cache(maxsize=4096)
def _parse(text: str):
    from math_verify import parse

    return parse(text)


def math_accuracy(prompt: str, completion: str, answer: str) -> float:
    from math_verify import verify

    reference = _parse(f"{BOXED}{answer.strip().strip('$')}}}")  # boxed: read as LaTeX, tuples and roots included
    candidate = final_answer(completion)
    return float(bool(candidate) and verify(reference, _parse(candidate)))


THINK_THEN_ANSWER = re.compile(r"\s*<think>((?:(?!</?think>).)*\S(?:(?!</?think>).)*)</think>"
                               r"((?:(?!</?think>).)*\S(?:(?!</?think>).)*)", re.DOTALL)


def format_reward(prompt: str, completion: str, answer: str) -> float:
    # R1-style templates end the generation prompt with the opening <think>: the completion starts inside it
    opened = "<think>" if prompt.rstrip().endswith("<think>") else ""
    return float(THINK_THEN_ANSWER.fullmatch(opened + completion) is not None)


def exact_match(prompt: str, completion: str, answer: str) -> float:
    return float(split_reasoning(completion)[1].strip() == answer.strip())


BUILT_IN: dict[str, RewardFunction] = {"math_accuracy": math_accuracy, "format": format_reward,
                                       "exact_match": exact_match}


def load_reward(name: str) -> RewardFunction:
    """A built-in reward by name, or the function `module:function` names (imported now, so a typo fails at
    start-up)."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    module_name, _, function_name = name.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"reward {name!r}: cannot be imported ({err})") from None
    if not callable(function):
        raise ConfigError(f"reward {name!r}: is not a function")
    return function


class Rewards:
    """The configured rewards: ``score(prompts, completions, answers) -> {name: (N,) values}`` and the weighted
    total ``total(scores)``."""

    def __init__(self, configs: Sequence[RewardConfig]):
        self.configs = list(configs)
        self.functions = {cfg.name: load_reward(cfg.name) for cfg in self.configs}

    def score(self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]
              ) -> dict[str, np.ndarray]:
        scores = {}
        for name, function in self.functions.items():
            values = []
            for prompt, completion, answer in zip(prompts, completions, answers):
                value = float(function(prompt, completion, answer))
                if not np.isfinite(value):
                    raise ValueError(f"reward {name!r} returned {value} for the completion {completion[:80]!r}")
                values.append(value)
            scores[name] = np.array(values, np.float64)
        return scores

    def total(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        return sum(cfg.weight * scores[cfg.name] for cfg in self.configs)
