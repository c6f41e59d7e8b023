"""Conversations through a model's own chat template: generation prompts, and the reasoning / answer split of an
assistant turn (``<think>…</think>`` then the answer), shared by SFT rendering, generation and evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field

from mindspore_llm.data.config import DataError
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


# Probe texts for reading a template's thinking format off its renderings (no template writes these itself).
_PROBE_QUESTION, _PROBE_REASONING, _PROBE_ANSWER = "probe-question-1729", "probe-reasoning-1729", "probe-answer-1729"
# The switch of a template's no-thinking generation prompt (Qwen3; transformers passes it as a template kwarg).
NO_THINKING_KWARGS = {"enable_thinking": False}


@dataclass(frozen=True)
class ThinkingFormat:
    """How a chat template treats reasoning, read off its renderings of a probe conversation (not off a model name).

    - ``prompt_opens_think``: the generation prompt ends inside an opened think block (R1:
      ``<｜Assistant｜><think>\\n``), so the model's turn starts with its reasoning, trained as that continuation.
    - ``shows_reasoning``: the template renders a final assistant turn's reasoning itself (Qwen3), so the trained
      turn is the template's own text.
    - ``no_thinking_kwargs``: template kwargs of a no-thinking generation prompt ({} when it has none).
    """
    prompt_opens_think: bool
    shows_reasoning: bool
    no_thinking_kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "ThinkingFormat":
        question = [{"role": "user", "content": _PROBE_QUESTION}]
        # reasoning in reasoning_content: ChatML, which renders content as written, does not show it
        turn = {"role": "assistant", "content": _PROBE_ANSWER, "reasoning_content": _PROBE_REASONING}
        prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True)
        no_thinking = tokenizer.apply_chat_template(question, add_generation_prompt=True, **NO_THINKING_KWARGS)
        return cls(prompt_opens_think=_open_think_suffix(prompt) > 0,
                   shows_reasoning=_PROBE_REASONING in tokenizer.apply_chat_template(question + [turn]),
                   no_thinking_kwargs=dict(NO_THINKING_KWARGS) if no_thinking != prompt else {})

    @property
    def has_thinking(self) -> bool:
        return self.prompt_opens_think or self.shows_reasoning

    def describe(self) -> str:
        if self.prompt_opens_think:
            return (f"the generation prompt opens {THINK_OPEN} and history drops reasoning (R1 style): a turn trains "
                    f"reasoning + '\\n{THINK_CLOSE}\\n\\n' + answer + end of turn")
        if self.shows_reasoning:
            extra = f", no-thinking prompt with {self.no_thinking_kwargs}" if self.no_thinking_kwargs else ""
            return f"the template writes a final turn's reasoning itself (Qwen3 style{extra})"
        return (f"none (content trained as the template renders it; reasoning_content is put inline as "
                f"{THINK_OPEN}...{THINK_CLOSE})")


def describe_rendering(tokenizer: Tokenizer, fmt: ThinkingFormat, reasoning: str, multi_turn: str) -> str:
    """One line for the run log: which template, which thinking format, which reasoning and multi-turn rules."""
    if reasoning == "keep":
        reasoning_rule = "keep (trained as the model writes it)"
    elif fmt.no_thinking_kwargs:
        reasoning_rule = f"drop (answers only, prompts rendered with {fmt.no_thinking_kwargs})"
    elif fmt.prompt_opens_think:
        reasoning_rule = f"drop (answers only, after an empty think block: '\\n{THINK_CLOSE}\\n\\n' + answer)"
    else:
        reasoning_rule = "drop (answers only)"
    multi_turn_rule = ("expand (one sequence per assistant turn when training a turn with its reasoning would change "
                       "what a later turn sees, else one per conversation)" if multi_turn == "expand"
                       else "last (only the final assistant turn is trained)")
    return (f"{tokenizer.template_description}; thinking format: {fmt.describe()}; reasoning: {reasoning_rule}; "
            f"multi-turn: {multi_turn_rule}")


@dataclass
class TrainingText:
    """One training sequence as text: `text` with the character spans `spans` counted in the loss."""
    text: str
    spans: list[tuple[int, int]]


def render_for_training(tokenizer: Tokenizer, messages: list[dict], fmt: ThinkingFormat, reasoning: str = "keep",
                        multi_turn: str = "expand", where: str = "") -> list[TrainingText]:
    """The training sequence(s) of a conversation, every assistant turn trained as the model generates it.

    Turn i's prompt is ``messages[:i]`` rendered with the generation prompt (the inference prompt, token for token);
    its label is the rest of the turn as the model writes it: the template's own rendering of the turn as the last
    message where that continues the prompt (ChatML, Qwen3, which show the reasoning there), else, when the prompt
    opens a think block the turn's rendering does not continue (R1), the reasoning in the form the prompt opens,
    ``\\n</think>\\n\\n``, the answer and the template's end of turn. With `reasoning` "drop" every assistant turn is
    its answer only, under the no-thinking prompt where the template has one.

    One sequence holds all turns when each turn's prompt + label is how the whole conversation renders (history as
    trained). Otherwise (a template that drops the reasoning of earlier turns) a later turn would see an earlier
    one other than at inference, so `multi_turn` "expand" gives one sequence per assistant turn and "last" trains
    only the final turn.
    """
    kwargs = fmt.no_thinking_kwargs if reasoning == "drop" else {}
    if reasoning == "drop":
        messages = [_answer_only(m) if m["role"] == "assistant" else m for m in messages]
    turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    if multi_turn == "last":
        turns = turns[-1:]
    pieces = {i: _prompt_and_turn(tokenizer, messages, i, fmt, kwargs, f"{where}: messages[{i}]") for i in turns}
    full = tokenizer.apply_chat_template(messages, **kwargs)
    if all(full.startswith(prompt + turn) for prompt, turn in pieces.values()):
        return [TrainingText(full, [(len(prompt), len(prompt) + len(turn)) for prompt, turn in pieces.values()])]
    return [TrainingText(prompt + turn, [(len(prompt), len(prompt) + len(turn))]) for prompt, turn in pieces.values()]


def _answer_only(message: dict) -> dict:
    _, answer = turn_reasoning(message)
    return {key: value for key, value in message.items() if key != "reasoning_content"} | {"content": answer}


def turn_reasoning(message: dict) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant message: `reasoning_content` and the content, or the content split."""
    if message.get("reasoning_content") is not None:
        return message["reasoning_content"].strip("\n"), message["content"]
    return split_reasoning(message["content"])


def _prompt_and_turn(tokenizer: Tokenizer, messages: list[dict], index: int, fmt: ThinkingFormat, kwargs: dict,
                     where: str) -> tuple[str, str]:
    """(prompt, trained text) of assistant turn `index`."""
    history, message = messages[:index], messages[index]
    prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True, **kwargs)
    reasoning, answer = turn_reasoning(message)
    if not fmt.has_thinking and message.get("reasoning_content") is not None:
        # a template that ignores reasoning_content would drop it: write it inline as the R1 format does
        message = {key: value for key, value in message.items() if key != "reasoning_content"}
        message["content"] = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}"
    rendered = tokenizer.apply_chat_template(history + [message], **kwargs).rstrip()  # trailing layout untrained
    if rendered.startswith(prompt) and (not reasoning or reasoning in rendered[len(prompt):]):
        return prompt, rendered[len(prompt):]
    opened = _open_think_suffix(prompt)
    if not opened and rendered.startswith(prompt):
        raise DataError(f"{where}: the chat template drops this turn's reasoning and its generation prompt opens no "
                        f"{THINK_OPEN} block, so the reasoning cannot be trained as the model would write it; set "
                        f"data.reasoning: drop to train the answer only")
    if not opened:
        raise DataError(f"{where}: cannot train this assistant turn: the chat template's rendering of it does not "
                        f"continue its generation prompt {prompt[-40:]!r} (rendered: {rendered[-60:]!r})")
    answer = answer.lstrip("\n")
    block = f"{THINK_OPEN}\n{reasoning or ''}\n{THINK_CLOSE}\n\n{answer}{_end_of_turn(tokenizer, history, kwargs)}"
    return prompt, block[opened:]


def _open_think_suffix(prompt: str) -> int:
    """How many characters of ``<think>\\n`` end `prompt` when it opens a think block (0: it does not)."""
    for opening in (f"{THINK_OPEN}\n", THINK_OPEN):
        if prompt.endswith(opening):
            return len(opening)
    return 0


def _end_of_turn(tokenizer: Tokenizer, history: list[dict], kwargs: dict) -> str:
    """The text the template writes after an assistant answer (R1: ``<｜end▁of▁sentence｜>``), without layout."""
    rendered = tokenizer.apply_chat_template(history + [{"role": "assistant", "content": _PROBE_ANSWER}], **kwargs)
    return rendered[rendered.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER):].rstrip()
