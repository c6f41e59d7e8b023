"""Per-rank checkpoint slices of a parallel run -> full tensors, or another device layout, with MindSpore's own
``mindspore.parallel.transform_checkpoints`` and the run's strategy file.

Layout on disk (what every rank of a semi-auto parallel run saves): SRC/rank_0/*.ckpt, SRC/rank_1/*.ckpt, ...;
the strategy file is the one the run saved beside its checkpoints (``msllm plan`` can also write one for a plan).
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mindspore_llm.common import CheckpointError
from mindspore_llm.fileio import atomic_directory
from mindspore_llm.tokenizer import tokenizer_files

PREFIX = "checkpoint_"


def _rank_dirs(src: Path) -> list[Path]:
    ranks = sorted(src.glob("rank_*"), key=lambda p: int(p.name.split("_")[1]) if p.name[5:].isdigit() else -1)
    if not ranks or not all(p.name[5:].isdigit() for p in ranks):
        raise CheckpointError(f"{src}: expected per-rank slices in rank_0/, rank_1/, ... subdirectories")
    numbers = [int(p.name[5:]) for p in ranks]
    if numbers != list(range(len(numbers))):
        raise CheckpointError(f"{src}: rank directories {numbers} are not 0..{len(numbers) - 1}")
    for rank in ranks:
        if len(list(rank.glob("*.ckpt"))) != 1:
            raise CheckpointError(f"{rank}: expected exactly one .ckpt slice")
    return ranks


def _transform(src: Path, out: Path, src_strategy: Path, dst_strategy: Path | None) -> None:
    from mindspore.parallel import transform_checkpoints

    _rank_dirs(src)
    for strategy in (src_strategy, dst_strategy):
        if strategy is not None and not Path(strategy).is_file():
            raise CheckpointError(f"{strategy}: strategy file not found")
    try:
        transform_checkpoints(str(src), str(out), PREFIX, str(src_strategy),
                              None if dst_strategy is None else str(dst_strategy))
    except (ValueError, RuntimeError, TypeError, KeyError) as err:
        raise CheckpointError(f"{src}: mindspore.parallel.transform_checkpoints failed with strategy "
                              f"{src_strategy}: {err}") from None


@contextmanager
def merged_slices(src: Path, strategy: Path) -> Iterator[Path]:
    """A temporary directory holding the full checkpoint of `src`'s slices (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix=".merge.", dir=src.parent) as tmp:
        _transform(src, Path(tmp) / "out", strategy, None)
        yield Path(tmp) / "out" / "rank_0"


def merge(src: Path, dst: Path, strategy: Path, config: Path | None = None, overwrite: bool = False) -> Path:
    """Slices -> DST with one full .ckpt (plus config.json and the tokenizer files beside it when given): what
    ``ms2hf`` and from_pretrained read."""
    with atomic_directory(dst, overwrite=overwrite) as tmp, merged_slices(src, strategy) as full:
        for file in full.glob("*.ckpt"):
            shutil.move(str(file), tmp / "mindspore_model.ckpt")
        if config is not None:
            config_dir = config if config.is_dir() else config.parent
            shutil.copyfile(config_dir / "config.json" if config.is_dir() else config, tmp / "config.json")
            for file in tokenizer_files(config_dir):  # with its chat template
                shutil.copyfile(file, tmp / file.name)
    return dst


def reshard(src: Path, dst: Path, src_strategy: Path, dst_strategy: Path, overwrite: bool = False) -> Path:
    """Slices in one layout -> DST/rank_N/ slices in the layout of `dst_strategy` (e.g. another device count)."""
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        _transform(src, tmp / "out", src_strategy, dst_strategy)
        for rank in (tmp / "out").iterdir():
            shutil.move(str(rank), tmp / rank.name)
        (tmp / "out").rmdir()
    return dst
