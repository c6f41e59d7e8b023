"""The training YAML's ``data:`` section."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import from_dict, load_yaml, require

# The tokenizer and data sets the project ships (scripts/make_tiny_assets.py).
TINY_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny"


class DataError(ConfigError):
    """Bad data input (file, line, record, tokenizer); the message names where, so a user can fix it."""


@dataclass
class DataConfig:
    kind: Literal["sft", "pretrain"]
    # .jsonl or .txt to tokenize, or a MindRecord written by `msllm preprocess` (its directory or a *.mindrecord file)
    path: str
    # tokenizer directory (tokenizer.json + tokenizer_config.json) or file
    tokenizer: str
    seq_length: int
    # SFT: pack several conversations per sequence (each its own document: no attention across them)
    packing: bool = False
    # SFT: train assistant reasoning (<think>...</think> or reasoning_content) as the model writes it, or answers only
    reasoning: Literal["keep", "drop"] = "keep"
    # SFT, templates that render earlier turns without their reasoning: one sequence per assistant turn (expand) or
    # only the final turn trained (last)
    multi_turn: Literal["expand", "last"] = "expand"
    # positions restart at 0 at each document of a sequence (pretraining, packed SFT)
    reset_position_ids: bool = True
    # no attention across documents; the first token of a document is then not a target either
    reset_attention: bool = True
    # reshuffle the sequences every epoch (seed + epoch); off: file order
    shuffle: bool = True
    seed: int = 1234
    # pretraining document separator; default: the tokenizer's eos_token
    eod_token: str | None = None

    def validate(self) -> None:
        require(bool(self.path), "path: must name a file")
        require(bool(self.tokenizer), "tokenizer: must name a tokenizer directory or file")
        require(self.seq_length >= 2, f"seq_length: must be at least 2, got {self.seq_length}")
        require(not (self.packing and self.kind == "pretrain"),
                "packing: applies to kind sft; pretraining always concatenates documents into full sequences")
        require(not (self.packing and not self.reset_attention),
                "reset_attention: must be true with packing, packed conversations must not attend to each other")

    def resolve_paths(self, base_dir: str | Path) -> "DataConfig":
        """Relative `path` and `tokenizer` taken relative to `base_dir` (the directory of the YAML file)."""
        base = Path(base_dir)
        return dataclasses.replace(self, path=str(base / self.path), tokenizer=str(base / self.tokenizer))


def load_data_config(path: str | Path) -> DataConfig:
    """From a training YAML (its ``data:`` section) or a YAML holding only the data section; paths resolved."""
    raw = load_yaml(path)
    section, where = (raw["data"], f"{path}: data") if isinstance(raw.get("data"), dict) else (raw, str(path))
    return from_dict(DataConfig, section, where).resolve_paths(Path(path).parent)
