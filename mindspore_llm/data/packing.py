"""Samples into fixed-length rows: input_ids, labels, attention_mask (document ids), position_ids.

- ``concatenate`` (pretraining): documents follow each other and are cut every seq_length tokens; a document
  continued on the next row starts that row.
- ``pack`` (packed SFT): greedy next-fit, a sample that does not fit in the current row's room starts a new row.
- ``one_per_row`` (SFT): one sample per row.
Samples longer than seq_length are truncated to their first seq_length tokens (SFT); rows are padded at the end.
"""
from __future__ import annotations

import numpy as np

from mindspore_llm.common import IGNORE_INDEX
from mindspore_llm.data.formats import Sample

FIELDS = ("input_ids", "labels", "attention_mask", "position_ids")


def concatenate(samples: list[Sample], seq_length: int) -> list[list[Sample]]:
    rows, row, room = [], [], seq_length
    for ids, labels in samples:
        start = 0
        while start < len(ids):
            take = min(room, len(ids) - start)
            row.append((ids[start:start + take], labels[start:start + take]))
            start, room = start + take, room - take
            if room == 0:
                rows.append(row)
                row, room = [], seq_length
    return rows + ([row] if row else [])


def pack(samples: list[Sample], seq_length: int) -> list[list[Sample]]:
    rows, row, room = [], [], seq_length
    for ids, labels in samples:
        ids, labels = ids[:seq_length], labels[:seq_length]
        if len(ids) > room:
            rows.append(row)
            row, room = [], seq_length
        row.append((ids, labels))
        room -= len(ids)
    return rows + ([row] if row else [])


def one_per_row(samples: list[Sample], seq_length: int) -> list[list[Sample]]:
    return [[(ids[:seq_length], labels[:seq_length])] for ids, labels in samples]


def to_arrays(rows: list[list[Sample]], seq_length: int, pad_id: int, reset_position_ids: bool,
              reset_attention: bool) -> dict[str, np.ndarray]:
    """int32 arrays (rows, seq_length). Document k of a row has attention_mask k (all 1 without reset_attention),
    padding 0. With reset_attention the first token of a document is no target: the model predicts labels[t]
    from position t - 1, which belongs to the previous document."""
    shape = (len(rows), seq_length)
    arrays = {"input_ids": np.full(shape, pad_id, np.int32), "labels": np.full(shape, IGNORE_INDEX, np.int32),
              "attention_mask": np.zeros(shape, np.int32),
              "position_ids": np.zeros(shape, np.int32) if reset_position_ids
              else np.broadcast_to(np.arange(seq_length, dtype=np.int32), shape).copy()}
    for r, row in enumerate(rows):
        t = 0
        for document, (ids, labels) in enumerate(row, 1):
            n = len(ids)
            arrays["input_ids"][r, t:t + n] = ids
            arrays["labels"][r, t:t + n] = labels
            arrays["attention_mask"][r, t:t + n] = document if reset_attention else 1
            if reset_position_ids:
                arrays["position_ids"][r, t:t + n] = np.arange(n)
            if reset_attention:
                arrays["labels"][r, t] = IGNORE_INDEX
            t += n
    return arrays
