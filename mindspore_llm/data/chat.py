"""Conversations through a model's own chat template: generation prompts, and the reasoning / answer split of an
assistant turn (``<think>…</think>`` then the answer), shared by SFT rendering, generation and evaluation."""
from __future__ import annotations

from mindspore_llm.tokenizer import Tokenizer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant text: the answer is what follows the last ``</think>`` (leading newlines
    dropped); the reasoning is what precedes it, without an opening ``<think>`` and surrounding newlines ("" for an
    empty think block). Without ``</think>`` the text is all answer (reasoning None), unless it opens a
    ``<think>`` block it never closes: then it is all reasoning and the answer is "".

    Generated text after a prompt that already opened the think block (R1's ``<｜Assistant｜><think>\\n``) is
    reasoning up to ``</think>``: pass it as generated; an unterminated one reads as an answer there, so a grader
    that needs to tell should check for ``</think>`` itself.
    """
    head, close, answer = text.rpartition(THINK_CLOSE)
    if not close:
        opened = text.lstrip()
        if opened.startswith(THINK_OPEN):
            return opened[len(THINK_OPEN):].strip("\n"), ""
        return None, text
    stripped = head.lstrip()
    if stripped.startswith(THINK_OPEN):
        head = stripped[len(THINK_OPEN):]
    return head.strip("\n"), answer.lstrip("\n")


def render_generation_prompt(tokenizer: Tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
    """Prompt token ids for the model's answer to `messages`: exactly transformers'
    ``apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **template_kwargs)`` (the template
    rendered with its generation prompt, tokenized without extra special tokens), e.g. ``enable_thinking=False``."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs))
