"""Tokenized, packed sequences stored as MindRecord (`msllm preprocess`), so that every rank of a multi-node job
reads the same sequences without tokenizing: ``DIR/data.mindrecord{0..N-1}`` (+ ``.db`` indexes) and
``DIR/meta.json`` (what was tokenized, how). Any one shard file names the whole set."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from mindspore_llm.common import IGNORE_INDEX
from mindspore_llm.data.config import DataConfig, DataError
from mindspore_llm.data.packing import FIELDS
from mindspore_llm.fileio import atomic_directory

META = "meta.json"
SHARD_PREFIX = "data.mindrecord"
WRITE_CHUNK = 1024


def is_mindrecord(path: Path) -> bool:
    return (path.is_dir() and (path / META).exists()) or re.search(r"\.mindrecord\d*$", path.name) is not None


def write_mindrecord(arrays: dict[str, np.ndarray], cfg: DataConfig, output: Path, shards: int,
                     overwrite: bool = False) -> None:
    from mindspore.mindrecord import FileWriter

    count = len(arrays["input_ids"])
    with atomic_directory(output, overwrite=overwrite) as tmp:
        writer = FileWriter(str(tmp / SHARD_PREFIX), shard_num=shards, overwrite=True)
        # the row index restores the order on reading, whatever the shard layout
        writer.add_schema({"index": {"type": "int64"},
                           **{name: {"type": "int32", "shape": [-1]} for name in FIELDS}}, "token_sequences")
        for begin in tqdm(range(0, count, WRITE_CHUNK), desc="writing MindRecord", unit=" chunks", disable=None):
            writer.write_raw_data([{"index": i, **{name: arrays[name][i] for name in FIELDS}}
                                   for i in range(begin, min(begin + WRITE_CHUNK, count))])
        writer.commit()
        meta = {"kind": cfg.kind, "seq_length": cfg.seq_length, "num_sequences": count, "shards": shards,
                "source": str(Path(cfg.path).resolve()), "tokenizer": str(Path(cfg.tokenizer).resolve()),
                "packing": cfg.packing, "reasoning": cfg.reasoning, "multi_turn": cfg.multi_turn,
                "reset_position_ids": cfg.reset_position_ids,
                "reset_attention": cfg.reset_attention,
                "counted_tokens": int((arrays["labels"] != IGNORE_INDEX).sum())}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")


def read_mindrecord(path: Path, cfg: DataConfig, select: Callable[[int], np.ndarray]) -> dict[str, np.ndarray]:
    """Sequences `select(number of sequences)` (global indices, repeats allowed) in that order; the meta data
    must agree with `cfg`. Only the selected sequences are held in memory."""
    from mindspore.mindrecord import FileReader

    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    directory = path if path.is_dir() else path.parent
    meta_file = directory / META
    if not meta_file.exists():
        raise DataError(f"{path}: no {META} beside it; write MindRecord data with `msllm preprocess`")
    meta = json.loads(meta_file.read_text())
    for key in ("kind", "seq_length", "packing", "reasoning", "multi_turn", "reset_position_ids", "reset_attention"):
        if meta.get(key) != getattr(cfg, key):
            raise DataError(f"data.{key}: {getattr(cfg, key)!r} differs from {meta.get(key)!r} used to write {path} "
                            f"(see {meta_file}); preprocess again or change the config")
    # one shard is written as data.mindrecord, several as data.mindrecord0, 1, ...
    shards = [p for p in directory.iterdir() if re.fullmatch(rf"{re.escape(SHARD_PREFIX)}\d*", p.name)]
    shard = min(shards, default=None)
    if shard is None:
        raise DataError(f"{directory}: no {SHARD_PREFIX} file; write MindRecord data with `msllm preprocess`")
    reader = FileReader(str(shard), num_consumer=1, columns=["index", *FIELDS])
    count = meta["num_sequences"]
    wanted = select(count)
    slots: dict[int, list[int]] = {}  # global index -> its positions in the result
    for position, index in enumerate(wanted.tolist()):
        slots.setdefault(index, []).append(position)
    arrays = {name: np.empty((len(wanted), cfg.seq_length), np.int32) for name in FIELDS}
    seen = 0
    try:
        for row in tqdm(reader.get_next(), total=count, desc=f"reading {directory.name}", disable=None):
            for name in FIELDS:
                arrays[name][slots.get(int(row["index"]), [])] = row[name]
            seen += 1
    finally:
        reader.close()
    if seen != count:
        raise DataError(f"{directory}: {seen} sequences found, {META} says {count}; the shards are incomplete")
    return arrays
