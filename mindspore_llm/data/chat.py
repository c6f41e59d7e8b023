"""Chat prompts for generation, and reasoning models' answers (provisional: the data owners' version replaces it)."""
from __future__ import annotations

from mindspore_llm.tokenizer import Tokenizer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def render_generation_prompt(tokenizer: Tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
    """The token ids a model sees before it answers `messages`: the chat template rendered with the generation
    prompt and tokenized without added special tokens, as transformers'
    ``apply_chat_template(messages, add_generation_prompt=True)`` returns them."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs))


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(the reasoning, the answer) of a completion: the text before the last ``</think>`` (without its
    ``<think>``; R1-style templates open the block in the prompt) and the text after it, both stripped; without
    ``</think>``, (None, the whole text stripped)."""
    head, closed, answer = text.rpartition(THINK_CLOSE)
    if not closed:
        return None, text.strip()
    _, _, reasoning = head.partition(THINK_OPEN) if THINK_OPEN in head else ("", "", head)
    return reasoning.strip(), answer.strip()
