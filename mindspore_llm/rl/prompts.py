"""Prompts with reference answers, and the stream of rollout slots a GRPO run consumes.

jsonl, one record per line: ``{"prompt": "What is 7 + 5?", "answer": "12"}`` (the prompt becomes one user message)
or ``{"messages": [{"role": "system", ...}, {"role": "user", ...}], "answer": "12"}``; the conversation is rendered
with the tokenizer's chat template and the generation prompt, as the model sees it at inference.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from mindspore_llm.common import TokenizerError
from mindspore_llm.data.chat import render_generation_prompt
from mindspore_llm.data.config import DataError
from mindspore_llm.data.formats import check_messages, read_jsonl
from mindspore_llm.tokenizer import Tokenizer


@dataclass(frozen=True)
class Prompt:
    where: str  # file:line
    ids: tuple[int, ...]  # the rendered prompt's token ids
    text: str  # the same as text: what reward functions receive as `prompt`
    answer: str | None  # the reference answer (None when the record has none and none is required)


def _messages(record: dict, where: str) -> list[dict]:
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    if "messages" not in record:
        raise DataError(f'{where}: expected a string "prompt" or a "messages" list, got keys {sorted(record)}')
    messages = check_messages(record["messages"], where)
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: the last message is the assistant's; a prompt ends with the turn to answer")
    return messages


def _answer(record: dict, where: str, required: bool) -> str | None:
    answer = record.get("answer")
    if answer is None and not required:
        return None
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f'{where}: expected an "answer" (a string or a number), got {answer!r}')
    return str(answer)


def load_prompts(path: str | Path, tokenizer: Tokenizer, template_kwargs: dict | None = None,
                 answers: bool = True) -> list[Prompt]:
    """Every record of the jsonl file `path`, rendered and tokenized; with `answers`, each must have one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such prompts file")
    prompts = []
    for where, record in read_jsonl(path):
        try:
            ids = render_generation_prompt(tokenizer, _messages(record, where), **(template_kwargs or {}))
        except TokenizerError as err:
            raise DataError(f"{where}: {err}") from None
        prompts.append(Prompt(where, tuple(ids), tokenizer.decode(ids), _answer(record, where, answers)))
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts


class PromptDataset:
    """The rollout slots of one data-parallel rank: its prompts, each repeated `group_size` times in a row (one
    group of rollouts), epoch after epoch, the prompts of epoch e in a permutation drawn from (seed, e).

    Slot k belongs to prompt k // group_size of that stream, so ``batches(b, start=k)`` after a restart yields what
    the uninterrupted run would have (b and k multiples of group_size: whole groups)."""

    def __init__(self, prompts: Sequence[Prompt], group_size: int, shuffle: bool = True, seed: int = 0):
        self.prompts = list(prompts)
        self.group_size = group_size
        self.shuffle = shuffle
        self.seed = seed
        self._epoch_order = functools.lru_cache(maxsize=2)(self._permutation)  # batches span at most two epochs

    def __len__(self) -> int:
        return len(self.prompts) * self.group_size

    def _permutation(self, epoch: int) -> np.ndarray:
        count = len(self.prompts)
        return np.random.default_rng([self.seed, epoch]).permutation(count) if self.shuffle else np.arange(count)

    def batches(self, batch_size: int, start: int = 0) -> Iterator[list[Prompt]]:
        if batch_size % self.group_size or start % self.group_size:
            raise ValueError(f"batches of whole groups: {batch_size} and {start} must be multiples of "
                             f"{self.group_size}")
        prompt_index = start // self.group_size
        while True:
            batch = []
            for index in range(prompt_index, prompt_index + batch_size // self.group_size):
                epoch, offset = divmod(index, len(self.prompts))
                batch += [self.prompts[self._epoch_order(epoch)[offset]]] * self.group_size
            prompt_index += batch_size // self.group_size
            yield batch
