"""Records from files, and records to (token ids, labels) samples.

Pretraining: a ``.txt`` file (documents separated by blank lines) or jsonl of ``{"text": ...}``; every document is
followed by the EOD token and all its tokens are targets.

SFT: jsonl of ``{"messages": [{"role", "content", "reasoning_content"?}, ...]}`` or of ``{"instruction", "input",
"output"}`` (plus an optional ``"system"``), rendered with the tokenizer's chat template (``chat.py``). Only assistant
turns count in the loss: each turn as the model generates it after its inference prompt, reasoning, answer and end of
turn included (``encode_conversation``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from mindspore_llm.common import IGNORE_INDEX, TokenizerError
from mindspore_llm.data.chat import ThinkingFormat, describe_rendering, render_for_training
from mindspore_llm.data.config import DataConfig, DataError
from mindspore_llm.tokenizer import Tokenizer

log = logging.getLogger("mindspore_llm")
ROLES = ("system", "user", "assistant", "tool")

Sample = tuple[list[int], list[int]]  # token ids, labels (IGNORE_INDEX where not counted)


def read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield ("file:line", record) for every non-blank line; a bad line is an error naming file:line."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def read_documents(path: Path) -> Iterator[str]:
    """Pretraining documents: paragraphs of a text file (blank-line separated) or the "text" of jsonl records."""
    if path.suffix == ".jsonl":
        for where, record in read_jsonl(path):
            text = record.get("text")
            if not isinstance(text, str):
                raise DataError(f'{where}: expected a string "text" field, got keys {sorted(record)}')
            yield text
        return
    paragraph = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).strip()
                paragraph = []
    if paragraph:
        yield "".join(paragraph).strip()


def check_messages(messages, where: str) -> list[dict]:
    """`messages` if it is a non-empty list of {"role": one of ROLES, "content": str, "reasoning_content"?: str};
    else a DataError."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list')
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f'{where}: messages[{index}] must be an object with a string "content"')
        if not isinstance(message.get("reasoning_content", ""), (str, type(None))):
            raise DataError(f'{where}: messages[{index}]: "reasoning_content" must be a string')
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{index}]: unknown role {message.get('role')!r}; "
                            f"expected one of {', '.join(ROLES)}")
    return messages


def to_messages(record: dict, where: str) -> list[dict]:
    """A conversation as a list of {"role", "content"}; instruction records become system?/user/assistant."""
    if "messages" in record:
        messages = check_messages(record["messages"], where)
    elif "instruction" in record and "output" in record:
        fields = {key: record.get(key) or "" for key in ("system", "instruction", "input", "output")}
        for key, value in fields.items():
            if not isinstance(value, str):
                raise DataError(f'{where}: "{key}" must be a string')
        user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
        messages = ([{"role": "system", "content": fields["system"]}] if fields["system"] else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]
    else:
        raise DataError(f'{where}: expected "messages" or "instruction" and "output", got keys {sorted(record)}')
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant message, nothing to train on")
    return messages


def encode_conversation(tokenizer: Tokenizer, messages: list[dict], where: str, fmt: ThinkingFormat | None = None,
                        reasoning: str = "keep", multi_turn: str = "expand") -> list[Sample]:
    """The training samples of a conversation (``chat.render_for_training``: one, or one per assistant turn), each
    tokenized once as a whole; a token is a target when its characters overlap a trained span (as transformers'
    assistant mask), so the ids are the tokenizer's encoding of the whole text."""
    fmt = fmt or ThinkingFormat.of(tokenizer)
    samples = []
    for rendered in render_for_training(tokenizer, messages, fmt, reasoning, multi_turn, where):
        ids, offsets = tokenizer.encode_with_offsets(rendered.text)
        labels = [token if any(end > a and start < b for a, b in rendered.spans) else IGNORE_INDEX
                  for token, (start, end) in zip(ids, offsets)]
        samples.append((ids, labels))
    return samples


def load_samples(cfg: DataConfig, tokenizer: Tokenizer, eod_id: int | None) -> list[Sample]:
    """Every record of `cfg.path` as sample(s), in file order."""
    path = Path(cfg.path)
    try:
        samples = _load_pretraining(path, tokenizer, eod_id) if cfg.kind == "pretrain" else \
            _load_conversations(cfg, path, tokenizer)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
    if not samples:
        raise DataError(f"{path}: no samples (the file is empty)")
    return samples


def _load_pretraining(path: Path, tokenizer: Tokenizer, eod_id: int) -> list[Sample]:
    samples = []
    for text in tqdm(read_documents(path), desc=f"tokenizing {path.name}", unit=" docs", disable=None):
        ids = tokenizer.encode(text) + [eod_id]
        samples.append((ids, list(ids)))
    return samples


def _load_conversations(cfg: DataConfig, path: Path, tokenizer: Tokenizer) -> list[Sample]:
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: SFT data must be a .jsonl file of conversations")
    try:
        fmt = ThinkingFormat.of(tokenizer)
    except TokenizerError as err:
        raise DataError(f"data.tokenizer: {err}") from None
    log.info("SFT data %s: %s", path, describe_rendering(tokenizer, fmt, cfg.reasoning, cfg.multi_turn))
    samples, conversations = [], 0
    for where, record in tqdm(read_jsonl(path), desc=f"tokenizing {path.name}", unit=" samples", disable=None):
        try:
            samples += encode_conversation(tokenizer, to_messages(record, where), where, fmt, cfg.reasoning,
                                           cfg.multi_turn)
        except TokenizerError as err:  # the template's raise_exception, e.g. a role order it refuses
            raise DataError(f"{where}: {err}") from None
        conversations += 1
    if len(samples) > conversations:
        log.info("SFT data %s: %d conversations -> %d sequences (multi-turn: expand)", path, conversations,
                 len(samples))
    return samples

