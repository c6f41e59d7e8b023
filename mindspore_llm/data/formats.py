"""Records from files, and records to (token ids, labels) samples.

Pretraining: a ``.txt`` file (documents separated by blank lines) or jsonl of ``{"text": ...}``; every document is
followed by the EOD token and all its tokens are targets.

SFT: jsonl of ``{"messages": [{"role", "content"}, ...]}`` or of ``{"instruction", "input", "output"}`` (plus an
optional ``"system"``), rendered with the tokenizer's chat template. Only assistant turns count in the loss: each
assistant message's text and its end-of-turn token (``encode_conversation``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from mindspore_llm.common import IGNORE_INDEX, TokenizerError
from mindspore_llm.data.config import DataError
from mindspore_llm.tokenizer import Tokenizer

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
    """`messages` if it is a non-empty list of {"role": one of ROLES, "content": str}; else a DataError."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list')
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f'{where}: messages[{index}] must be an object with a string "content"')
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


def encode_conversation(tokenizer: Tokenizer, messages: list[dict], where: str) -> Sample:
    """Token ids of the rendered conversation, labels only on assistant turns and their end-of-turn token.

    Assistant message i starts where the rendering of messages[:i] with the generation prompt ends, and ends where
    that of messages[:i + 1] ends (its trailing whitespace is template layout). Templates that render a turn
    differently once later turns follow (Qwen3 drops the thinking of earlier turns) fail that prefix test; then the
    turn is its content where it appears in the whole rendering, followed by the end-of-turn text the template puts
    after it. Text pieces are tokenized separately, so the prompt tokens are exactly those a model sees at
    inference before it answers."""
    full = tokenizer.apply_chat_template(messages)
    pieces, cursor = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index])
        prompt = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:index + 1]).rstrip()
        if full.startswith(through) and through.startswith(prompt) and cursor <= len(prompt):
            start, end = len(prompt), len(through)
        else:
            start, end = _find_turn(full, message["content"], through, max(cursor, len(before)))
            if not full.startswith(before) or start < 0:
                raise DataError(f"{where}: messages[{index}]: cannot locate the assistant turn in the rendered "
                                f"conversation (the chat template renders it differently from its prefixes)")
        pieces += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    pieces.append((full[cursor:], False))
    ids, labels = [], []
    for text, counted in pieces:
        piece = tokenizer.encode(text) if text else []
        ids += piece
        labels += piece if counted else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _find_turn(full: str, content: str, through: str, begin: int) -> tuple[int, int]:
    """The first occurrence of `content` in `full` after `begin` that the end-of-turn text follows, as in
    `through` (the turn rendered last); (-1, -1) if none."""
    at = through.rfind(content)
    if at < 0:
        return -1, -1
    tail = through[at + len(content):]
    start = full.find(content, begin)
    while start >= 0 and not full.startswith(tail, start + len(content)):
        start = full.find(content, start + 1)
    return (start, start + len(content) + len(tail)) if start >= 0 else (-1, -1)


def load_samples(kind: str, path: Path, tokenizer: Tokenizer, eod_id: int | None) -> list[Sample]:
    """Every record of `path` as a sample, in file order."""
    try:
        samples = _load_samples(kind, path, tokenizer, eod_id)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
    if not samples:
        raise DataError(f"{path}: no samples (the file is empty)")
    return samples


def _load_samples(kind: str, path: Path, tokenizer: Tokenizer, eod_id: int | None) -> list[Sample]:
    samples = []
    if kind == "pretrain":
        for text in tqdm(read_documents(path), desc=f"tokenizing {path.name}", unit=" docs", disable=None):
            ids = tokenizer.encode(text) + [eod_id]
            samples.append((ids, list(ids)))
    else:
        if path.suffix != ".jsonl":
            raise DataError(f"{path}: SFT data must be a .jsonl file of conversations")
        for where, record in tqdm(read_jsonl(path), desc=f"tokenizing {path.name}", unit=" samples", disable=None):
            try:
                samples.append(encode_conversation(tokenizer, to_messages(record, where), where))
            except TokenizerError as err:  # the template's raise_exception, e.g. a role order it refuses
                raise DataError(f"{where}: {err}") from None
    return samples
