"""Per-rank slices: `shard` (a full checkpoint -> every rank's slices, for slow shared storage), `merge-slices` (the
slices of a parallel run or of `shard` -> a Hugging Face directory) and `reshard` (slices -> another layout).

`shard` and `merge-slices` stream a window of rows per tensor (``mindspore_llm.checkpoint_slices``): memory stays
flat in the model's size. `reshard` uses MindSpore's ``mindspore.parallel.transform_checkpoints``, which holds the
whole model in memory.

Layout on disk: SRC/rank_0/*.ckpt, SRC/rank_1/*.ckpt, ... and the strategy files the run saved (one per rank or
per stage; `merge_pipeline_strategys` joins the stages) or, for `shard` output, SRC/strategy.ckpt.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

from ckpt_tools.convert import DTYPES, convert, read_config, write_side_files
from mindspore_llm.checkpoint import WeightReader, block_shape
from mindspore_llm.checkpoint_slices import (MERGED_STRATEGY, SlicedTensors, itemsize, merge_slices,
                                             rank_directories, read_strategy, stored_dtype, write_rank_slices)
from mindspore_llm.checkpoint_writer import HF_SAFETENSORS
from mindspore_llm.common import CheckpointError, ConfigError
from mindspore_llm.fileio import atomic_directory
from mindspore_llm.models.naming import OURS, CheckpointView, LayoutOptions

PREFIX = "checkpoint_"


def _progress(total: int, description: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, disable=quiet)


def _weights(model_config) -> tuple[object, dict[str, tuple[int, ...]]]:
    """The model built without allocating anything, and the full shape of each of its weights."""
    from mindspore_llm.models.auto import build_model

    model = build_model(model_config, materialize=False)
    return model, {p.name: tuple(p.shape) for p in model.weights()}


def shard(src: Path, dst: Path, train_config: Path, dtype: str | None = None, overwrite: bool = False,
          quiet: bool = False) -> Path:
    """Full checkpoint SRC -> DST/rank_N/ holding exactly rank N's slices under the training YAML's plan."""
    from mindspore_llm.models.config import load_config
    from mindspore_llm.parallel.plan import parameter_layouts, validate_plan
    from mindspore_llm.train.config import load_train_config

    config = load_train_config(train_config)
    model_config, parallel = config.model_config(), config.parallel
    source_config = load_config(src)
    if source_config != model_config:
        differ = [k for k in model_config.to_dict() if getattr(source_config, k, None) != getattr(model_config, k)]
        raise ConfigError(f"{src}: its config.json differs from {train_config}'s model in {', '.join(differ)}")
    validate_plan(model_config, parallel, parallel.device_num)
    model, shapes = _weights(model_config)
    layouts = parameter_layouts(shapes.items(), parallel, model_config.num_hidden_layers,
                                model_config.tie_word_embeddings)
    reader = WeightReader(src)
    sources = {name: (shape, model.checkpoint_sources(name)) for name, shape in shapes.items()}
    target = DTYPES.get(dtype)
    total = sum(math.prod(block_shape(layouts[name].block(shape, rank)))
                * itemsize(stored_dtype(reader, names[0], target))
                for rank in range(parallel.device_num) for name, (shape, names) in sources.items()
                if layouts[name].on_rank(rank))
    hf = read_config(src)
    fp8 = any(reader.file(names[0]).dtype(names[0]) == "F8_E4M3" for _, names in sources.values())
    with _progress(total, "shard", quiet) as bar:
        return write_rank_slices(reader, sources, layouts, parallel.device_num, dst, overwrite, target, bar,
                                 side_files=lambda tmp: write_side_files(hf, [src], tmp, fp8))


def merge(src: Path, dst: Path, strategy: Path | None = None, config: Path | None = None, dtype: str | None = None,
          max_shard_bytes: int = 4 * 10 ** 9, overwrite: bool = False, quiet: bool = False,
          options: LayoutOptions = LayoutOptions(), workers: int = 2, fsync: bool = False) -> Path:
    """Per-rank slices SRC (a parallel run's checkpoint step, or `shard` output) -> Hugging Face directory DST.
    Slices in our names are joined parameter by parameter (stacked experts written per expert); in mindformers'
    namings (a mindformers run's per-rank checkpoints) they are joined tensor by tensor and converted from the
    naming as `ms2hf` converts a file (`options`: its mcore layout)."""
    from mindspore_llm.models.config import config_from_hf

    strategy = strategy or src / MERGED_STRATEGY
    if not strategy.exists():
        raise CheckpointError(f"{src}: no {MERGED_STRATEGY}; give --strategy (the run's strategy directory, or "
                              f"one merged strategy file)")
    config_path = config or src
    hf = read_config(config_path)
    model_config = config_from_hf(hf, str(config_path))
    layouts = read_strategy(strategy)
    stored = SlicedTensors.stored(src, layouts)
    files = {name: stored for name in stored.names()}
    if CheckpointView(files, model_config, options, str(config_path), strict=False).layout.naming != OURS:
        convert(src, dst, target_naming=OURS, layout=HF_SAFETENSORS, dtype=dtype,
                max_shard_bytes=max_shard_bytes, config_path=config_path, overwrite=overwrite, quiet=quiet,
                description="merge-slices", options=options, files=files, workers=workers, fsync=fsync)
        return dst
    model, shapes = _weights(model_config)
    tensors = SlicedTensors(src, layouts, shapes)
    outputs = [(source, name, index if len(sources) > 1 else None)
               for name in shapes for sources in [model.checkpoint_sources(name)]
               for index, source in enumerate(sources)]
    side = [config_path if config_path.is_dir() else config_path.parent, src]
    total = sum(math.prod(shape) * itemsize(DTYPES.get(dtype) or tensors.dtype(name))
                for name, shape in shapes.items())
    with _progress(total, "merge-slices", quiet) as bar:
        merge_slices(tensors, outputs, dst, HF_SAFETENSORS, DTYPES.get(dtype), max_shard_bytes, overwrite, bar,
                     side_files=lambda tmp: write_side_files(hf, side, tmp, False),
                     manifest_extra={"format": "safetensors", "naming": "hf", "source": str(src)},
                     workers=workers, fsync=fsync)
    return dst


def _transform(src: Path, out: Path, src_strategy: Path, dst_strategy: Path | None) -> None:
    from mindspore.parallel import transform_checkpoints

    for rank in rank_directories(src).values():
        if len(list(rank.glob("*.ckpt"))) != 1:
            raise CheckpointError(f"{rank}: expected exactly one .ckpt slice")
    for strategy in (src_strategy, dst_strategy):
        if strategy is not None and not Path(strategy).is_file():
            raise CheckpointError(f"{strategy}: strategy file not found")
    try:
        transform_checkpoints(str(src), str(out), PREFIX, str(src_strategy),
                              None if dst_strategy is None else str(dst_strategy))
    except (ValueError, RuntimeError, TypeError, KeyError) as err:
        raise CheckpointError(f"{src}: mindspore.parallel.transform_checkpoints failed with strategy "
                              f"{src_strategy}: {err}") from None


def reshard(src: Path, dst: Path, src_strategy: Path, dst_strategy: Path, overwrite: bool = False) -> Path:
    """Slices in one layout -> DST/rank_N/ slices in the layout of `dst_strategy` (e.g. another device count)."""
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        _transform(src, tmp / "out", src_strategy, dst_strategy)
        for rank in (tmp / "out").iterdir():
            shutil.move(str(rank), tmp / rank.name)
        (tmp / "out").rmdir()
    return dst

