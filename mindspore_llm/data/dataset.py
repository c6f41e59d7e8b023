"""The training data stream: fixed-length sequences, sharded by data-parallel rank, reshuffled every epoch,
resumable from any sample index."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from mindspore_llm.common import TokenizerError
from mindspore_llm.data import packing
from mindspore_llm.data.config import DataConfig, DataError
from mindspore_llm.data.formats import load_samples
from mindspore_llm.data.mindrecord import is_mindrecord, read_mindrecord
from mindspore_llm.tokenizer import Tokenizer, load_tokenizer


class TokenDataset:
    """The sequences of one data-parallel rank (`shard_indices`), in a deterministic, resumable order.

    Order: epoch e visits this rank's sequences in a permutation drawn from (seed, e) (file order without
    shuffle). The stream of samples runs through epoch after epoch; sample k is the (k mod len)-th of epoch
    k // len, so ``batches(b, start=k)`` after a restart yields exactly what the uninterrupted run would have.
    """

    def __init__(self, arrays: dict[str, np.ndarray], shuffle: bool = True, seed: int = 0):
        self.arrays = arrays
        self.seq_length = arrays["input_ids"].shape[1]
        self.shuffle = shuffle
        self.seed = seed
        self._order = (None, None)  # (epoch, its order): the last epoch's permutation, reused batch after batch

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Positions (into this rank's sequences) in the order epoch `epoch` visits them."""
        if self._order[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(len(self)) if self.shuffle
                     else np.arange(len(self)))
            self._order = (epoch, order)
        return self._order[1]

    def sample_positions(self, start: int, count: int) -> np.ndarray:
        """This rank's positions of samples start .. start + count - 1 of the stream."""
        epochs, offsets = np.divmod(np.arange(start, start + count), len(self))
        return np.array([self.epoch_order(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def batches(self, batch_size: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless batches of `batch_size` sequences from sample index `start` (the caller stops); a batch can
        span the end of one epoch and the start of the next."""
        while True:
            positions = self.sample_positions(start, batch_size)
            yield {name: array[positions] for name, array in self.arrays.items()}
            start += batch_size


def shard_indices(total: int, rank: int, world_size: int) -> np.ndarray:
    """The global sequences of data-parallel rank `rank` of `world_size`: dealt round-robin, r, r + w, r + 2w, ...
    When w does not divide N the deal wraps around to the first sequences, so every rank holds ceil(N / w) and all
    ranks take the same number of steps; the union over ranks covers every sequence (once when w divides N)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return (np.arange(-(-total // world_size) * world_size) % total)[rank::world_size]


def build_dataset(cfg: DataConfig, rank: int = 0, world_size: int = 1) -> TokenDataset:
    """Rank `rank`'s share of `cfg.path`: tokenized and packed here, or read from a `msllm preprocess`
    MindRecord (only this rank's sequences are kept in memory)."""
    path = Path(cfg.path)
    if is_mindrecord(path):
        arrays = read_mindrecord(path, cfg, lambda total: shard_indices(total, rank, world_size))
    else:
        arrays = build_sequences(cfg)
        rows = shard_indices(len(arrays["input_ids"]), rank, world_size)
        arrays = {name: array[rows] for name, array in arrays.items()}
    return TokenDataset(arrays, cfg.shuffle, cfg.seed)


def build_sequences(cfg: DataConfig) -> dict[str, np.ndarray]:
    """All sequences of the data set as int32 arrays (N, seq_length), before sharding and shuffling."""
    path = Path(cfg.path)
    if is_mindrecord(path):
        return read_mindrecord(path, cfg, np.arange)
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    tokenizer = open_tokenizer(cfg.tokenizer)
    eod_id = document_end_id(tokenizer, cfg.eod_token) if cfg.kind == "pretrain" else None
    samples = load_samples(cfg, tokenizer, eod_id)
    layout = packing.concatenate if cfg.kind == "pretrain" else packing.pack if cfg.packing else packing.one_per_row
    rows = layout(samples, cfg.seq_length)
    return packing.to_arrays(rows, cfg.seq_length, padding_id(tokenizer), cfg.reset_position_ids,
                             cfg.reset_attention)


def open_tokenizer(path: str) -> Tokenizer:
    if not Path(path).exists():
        raise DataError(f"data.tokenizer: {path} does not exist")
    try:
        return load_tokenizer(path)
    except TokenizerError as err:
        raise DataError(f"data.tokenizer: {err}") from None


def document_end_id(tokenizer: Tokenizer, token: str | None) -> int:
    """`token`'s id, or the eos_token's when `token` is None."""
    if token is None:
        if tokenizer.eos_token_id is None:
            raise DataError(f"data.eod_token: {tokenizer.describe_special_token('eos_token')}; name the "
                            f"end-of-document token here")
        return tokenizer.eos_token_id
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise DataError(f"data.eod_token: {token!r} is not a token of {tokenizer.source}")
    return token_id


def padding_id(tokenizer: Tokenizer) -> int:
    """The pad token (padding is never attended to nor counted), else the eos token."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    pad, eos = (tokenizer.describe_special_token(key) for key in ("pad_token", "eos_token"))
    raise DataError(f"data.tokenizer: padding needs a pad_token or an eos_token in the vocabulary: {pad}, and {eos}")
