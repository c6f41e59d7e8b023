"""Per-rank checkpoint slices: the strategy files that say how they are cut, writing every rank's slices of a
full checkpoint (``msllm-ckpt shard``), and joining slices back into full tensors (``msllm-ckpt merge-slices``,
the trainer's final export), streaming: memory stays at a window of rows per tensor whatever the model's size.

Strategy files are MindSpore's own (``node_strategy.proto``, read and written with its protobuf classes): what
``AutoParallel.save_param_strategy_file`` writes per rank at compile time, one per pipeline stage, joined by
``mindspore.parallel.merge_pipeline_strategys`` (whose merged file names each parameter ``"<stage>-<name>"``);
``parallel.plan.write_strategy_files`` writes the same for a plan without compiling. Slices are MindSpore .ckpt
files, so MindSpore's ``transform_checkpoints`` reads them too (the tests compare both ways against it).
MindSpore's ``transform_checkpoints`` holds every slice of the model in memory at once, which at 32B (131 GB in
fp32) and 671B is not an option on one host; the merge here reads each output window from the rank holding it.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from mindspore_llm.checkpoint import (SAFETENSORS_DTYPES, SLICES_MANIFEST, WINDOW_BYTES, TensorLayout, WeightReader,
                                      block_shape, layout_to_dict, whole)
from mindspore_llm.checkpoint_writer import Layout, OutTensor, write_checkpoint
from mindspore_llm.common import CheckpointError
from mindspore_llm.fileio import atomic_directory, atomic_path

MERGED_STRATEGY = "strategy.ckpt"  # the strategy of a directory of slices, all pipeline stages merged
RANK_SLICES = "slices"  # the file stem of `shard`'s rank_N/slices-00001-of-00001.ckpt


# ----------------------------------------------------------------------------------------------------------------
# Strategy files

def write_strategy_files(layouts: Mapping[str, TensorLayout], directory: str | os.PathLike) -> list[Path]:
    """One strategy file per pipeline stage (``strategy_stage_K.ckpt``: the layouts of the parameters that stage
    holds), as the first rank of each stage writes at compile time; returns their paths."""
    from mindspore.train import node_strategy_pb2

    stages = sorted({stage for layout in layouts.values() for stage in layout.stages})
    paths = []
    for stage in stages:
        strategy = node_strategy_pb2.ParallelStrategyMap()
        strategy.current_stage = stage
        # merge_pipeline_strategys reads a file's stage from its first operator strategy
        item = strategy.parallel_strategy_item.add()
        item.node_name = f"mindspore_llm.plan.stage_{stage}"
        item.parallel_strategys.stage = stage
        for name, layout in layouts.items():
            if stage not in layout.stages:
                continue
            entry = strategy.parallel_layout_item.add()
            entry.param_name = name
            parallel = entry.parallel_layouts
            parallel.dev_matrix.add().dim.extend(layout.dev_matrix)
            parallel.tensor_map.add().dim.extend(layout.tensor_map)
            parallel.param_split_shape.add()
            parallel.indices_offset.add()
            parallel.field = 0
            parallel.opt_weight_shard_size = layout.opt_shard_size
            parallel.opt_weight_shard_step = _optimizer_shard_step(layout)
        path = Path(directory) / f"strategy_stage_{stage}.ckpt"
        with atomic_path(path) as tmp:
            tmp.write_bytes(strategy.SerializeToString())
        paths.append(path)
    return paths


def _optimizer_shard_step(layout: TensorLayout) -> int:
    """The rank distance between two devices of one optimizer-parallel group (MindSpore records it; with the
    split over the outermost repeated axis it is the device count of the axes inside it)."""
    if not layout.opt_shard_size:
        return 0
    used = {len(layout.dev_matrix) - 1 - a for a in layout.tensor_map if a != -1}
    repeated = [i for i, n in enumerate(layout.dev_matrix) if i not in used and n > 1]
    return math.prod(layout.dev_matrix[repeated[-1] + 1:]) if repeated else 0


def merge_strategy_files(source: str | os.PathLike, merged: str | os.PathLike) -> Path:
    """The strategy files of a directory (per rank or per stage, every stage present) -> one merged file, with
    ``mindspore.parallel.merge_pipeline_strategys``."""
    from mindspore.parallel import merge_pipeline_strategys

    source = Path(source)
    if not any(source.glob("*.ckpt")):
        raise CheckpointError(f"{source}: no strategy files (*.ckpt)")
    merge_pipeline_strategys(str(source), str(merged))
    return Path(merged)


def read_strategy(path: str | os.PathLike) -> dict[str, TensorLayout]:
    """Parameter name -> layout, from a strategy file (one stage's, or merged) or a directory of them."""
    from google.protobuf.message import DecodeError
    from mindspore.train import node_strategy_pb2

    path = Path(path)
    if path.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            return read_strategy(merge_strategy_files(path, Path(tmp) / MERGED_STRATEGY))
    if not path.is_file():
        raise CheckpointError(f"{path}: strategy file not found")
    strategy = node_strategy_pb2.ParallelStrategyMap()
    try:
        strategy.ParseFromString(path.read_bytes())
    except DecodeError as err:
        raise CheckpointError(f"{path}: not a MindSpore strategy file ({err})") from None
    items = strategy.parallel_strategy_item
    own_stage = items[0].parallel_strategys.stage if items else 0
    layouts: dict[str, TensorLayout] = {}
    for entry in strategy.parallel_layout_item:
        name, stage = entry.param_name, own_stage
        prefix, _, rest = name.partition("-")
        if rest and prefix.isdigit():  # merged by merge_pipeline_strategys: "<stage>-<name>"
            name, stage = rest, int(prefix)
        parallel = entry.parallel_layouts
        if len(parallel.tensor_map) != 1 or any(list(s.dim) for s in parallel.param_split_shape):
            raise CheckpointError(f"{path}: parameter {name} has a layout this reader does not support (several "
                                  f"device axes on one dimension, or an uneven split)")
        layout = TensorLayout(tuple(parallel.dev_matrix[0].dim), tuple(parallel.tensor_map[0].dim), (stage,),
                              int(parallel.opt_weight_shard_size))
        if name in layouts:  # a parameter two stages share (a tied embedding)
            held = layouts[name]
            layout = TensorLayout(layout.dev_matrix, layout.tensor_map, tuple(sorted({*held.stages, stage})),
                                  layout.opt_shard_size)
        layouts[name] = layout
    if not layouts:
        raise CheckpointError(f"{path}: the strategy file holds no parameter layouts")
    return layouts


def differing_layouts(compiled: Mapping[str, TensorLayout], planned: Mapping[str, TensorLayout],
                      shapes: Mapping[str, tuple[int, ...]], rank: int) -> list[str]:
    """Parameters whose slice on `rank` differs between two layouts (e.g. the compiled strategy and the plan), or
    that only one of them places on `rank`; one line each."""
    lines = []
    for name, shape in shapes.items():
        a, b = compiled.get(name), planned.get(name)
        on_a, on_b = a is not None and a.on_rank(rank), b is not None and b.on_rank(rank)
        if on_a != on_b:
            lines.append(f"{name}: {'only the compiled strategy' if on_a else 'only the plan'} puts it on rank {rank}")
        elif on_a and a.block(shape, rank) != b.block(shape, rank):
            lines.append(f"{name} {list(shape)}: compiled {_ranges(a.block(shape, rank))}, planned "
                         f"{_ranges(b.block(shape, rank))}")
    return lines


def _ranges(block) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in block) + "]"


# ----------------------------------------------------------------------------------------------------------------
# Writing each rank's slices of a full checkpoint

def stored_dtype(reader: WeightReader, name: str, dtype: str | None = None) -> str:
    """The dtype a copy of tensor `name` is written in: `dtype`, or as stored (FP8 becomes bf16 once its block
    scales are applied, as `msllm-ckpt hf2ms` writes it)."""
    source = reader.file(name).dtype(name)
    return dtype or ("BF16" if source == "F8_E4M3" else source)


def itemsize(dtype: str) -> int:
    return np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize


def block_chunks(reader: WeightReader, shape: tuple[int, ...], sources: list[str], block: tuple[slice, ...],
                 dtype: str) -> Iterator[np.ndarray]:
    """The elements of a parameter's `block` in C order as dtype `dtype` (a safetensors tag), a window of rows at
    a time; a stacked parameter is read expert by expert from its `sources`."""
    if len(sources) > 1:
        for expert in range(block[0].start, block[0].stop):
            yield from block_chunks(reader, shape[1:], [sources[expert]], block[1:], dtype)
        return
    if not block:
        yield reader.read(sources[0], block, dtype)
        return
    row_bytes = math.prod(block_shape(block)[1:]) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
    step = max(1, WINDOW_BYTES // max(row_bytes, 1))
    for start in range(block[0].start, block[0].stop, step):
        rows = (slice(start, min(start + step, block[0].stop)),) + block[1:]
        yield reader.read(sources[0], rows, dtype)


def write_rank_slices(reader: WeightReader, sources: Mapping[str, tuple[tuple[int, ...], list[str]]],
                      layouts: Mapping[str, TensorLayout], world_size: int, dst: Path, overwrite: bool = False,
                      dtype: str | None = None, progress=None,
                      side_files: Callable[[Path], None] | None = None) -> Path:
    """DST/rank_N/ holding exactly rank N's slices of every parameter (``sources``: name -> (full shape, its
    checkpoint tensors)), DST/slices.json (each parameter's shape and layout) and DST/strategy.ckpt (the layouts,
    all stages merged), read from `reader` a window at a time. `dtype`: the stored one (FP8: bf16) if None."""
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        for rank in range(world_size):
            held = {name: layouts[name].block(shape, rank) for name, (shape, _) in sources.items()
                    if layouts[name].on_rank(rank)}
            tensors = [OutTensor(name, block_shape(block), stored_dtype(reader, sources[name][1][0], dtype))
                       for name, block in held.items()]
            (tmp / f"rank_{rank}").mkdir()
            write_checkpoint(tmp / f"rank_{rank}", tensors, Layout(RANK_SLICES, "ckpt", "slices.index.json", {}),
                             2 ** 62, lambda t: block_chunks(reader, sources[t.name][0], sources[t.name][1],
                                                             held[t.name], t.dtype), progress,
                             {"rank": rank, "world_size": world_size})
        manifest = {"format": "mindspore_llm.slices", "version": 1, "world_size": world_size,
                    "source": str(reader.path),
                    "shapes": {name: list(shape) for name, (shape, _) in sources.items()},
                    "layouts": {name: layout_to_dict(layouts[name]) for name in sources}}
        (tmp / SLICES_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        with tempfile.TemporaryDirectory(dir=tmp) as stages:
            write_strategy_files({name: layouts[name] for name in sources}, stages)
            merge_strategy_files(stages, tmp / MERGED_STRATEGY)
        if side_files is not None:
            side_files(tmp)
    return dst


# ----------------------------------------------------------------------------------------------------------------
# Joining slices into full tensors

def rank_directories(src: Path) -> dict[int, Path]:
    """rank -> SRC/rank_N for a directory of per-rank slices (ranks must run 0..N-1)."""
    found = {}
    for path in src.glob("rank_*"):
        if path.is_dir() and path.name[5:].isdigit():
            found[int(path.name[5:])] = path
    if not found:
        raise CheckpointError(f"{src}: expected per-rank slices in rank_0/, rank_1/, ... subdirectories")
    if sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{src}: rank directories {sorted(found)} are not 0..{len(found) - 1}")
    return dict(sorted(found.items()))


class SlicedTensors:
    """Full tensors of per-rank slices: for each parameter, the distinct blocks the ranks hold (replicas are read
    from the first rank holding them), checked to tile the tensor exactly. Read like a checkpoint file
    (``shape``, ``dtype``, ``rows``, ``read_block``, ``raw``), so a naming view (``models.naming``) reads slices in
    any naming as it reads a file."""

    def __init__(self, src: Path, layouts: Mapping[str, TensorLayout], shapes: Mapping[str, tuple[int, ...]]):
        self.src = self.path = src
        self.ranks = rank_directories(src)
        self.readers: dict[int, WeightReader] = {}
        self.shapes = dict(shapes)
        self.blocks: dict[str, dict[tuple[slice, ...], int]] = {}
        for name, shape in shapes.items():
            if name not in layouts:
                raise CheckpointError(f"{src}: the strategy has no layout for {name}")
            layout, blocks = layouts[name], {}
            for rank in self.ranks:
                if layout.on_rank(rank):
                    blocks.setdefault(_key(layout.block(shape, rank)), rank)
            covered = sum(math.prod(block_shape(_slices(b))) for b in blocks)
            if covered != math.prod(shape):
                raise CheckpointError(f"{src}: the {len(self.ranks)} rank directories hold {covered} of the "
                                      f"{math.prod(shape)} elements of {name}: are all ranks' slices here, and is "
                                      f"this the strategy they were saved with?")
            self.blocks[name] = blocks

    @classmethod
    def stored(cls, src: Path, layouts: Mapping[str, TensorLayout]) -> "SlicedTensors":
        """Every tensor the rank files hold (whatever their names), its full shape from a rank's slice and its
        layout; one the strategy does not name is replicated (each rank holds it whole)."""
        readers = {rank: WeightReader(directory) for rank, directory in rank_directories(src).items()}
        shapes, held = {}, {}
        for rank, reader in readers.items():
            for name in reader.names():
                if name not in shapes:
                    held[name] = layouts.get(name) or TensorLayout((len(readers),), (-1,) * len(reader.shape(name)))
                    shapes[name] = held[name].full_shape(reader.shape(name))
        tensors = cls(src, held, shapes)
        tensors.readers.update(readers)
        return tensors

    def names(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def read_block(self, name: str, block: tuple[slice, ...] | None = None) -> np.ndarray:
        return self._assemble(name, whole(self.shapes[name]) if block is None else block, self.dtype(name))

    def raw(self, name: str) -> np.ndarray:
        return self.read_block(name)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.read_block(name, (slice(start, stop),) + whole(self.shapes[name][1:]))

    def reader(self, rank: int) -> WeightReader:
        if rank not in self.readers:
            self.readers[rank] = WeightReader(self.ranks[rank])
        return self.readers[rank]

    def dtype(self, name: str) -> str:
        rank = next(iter(self.blocks[name].values()))
        return self.reader(rank).file(name).dtype(name)

    def check(self) -> None:
        """Every rank file holds each of its blocks with the layout's shape."""
        for name, blocks in self.blocks.items():
            for key, rank in blocks.items():
                reader = self.reader(rank)
                if name not in reader:
                    raise CheckpointError(f"{self.ranks[rank]}: has no slice of {name}")
                if reader.shape(name) != block_shape(_slices(key)):
                    raise CheckpointError(f"{self.ranks[rank]}: {name} has shape {list(reader.shape(name))}, its "
                                          f"layout gives rank {rank} {list(block_shape(_slices(key)))}")

    def chunks(self, name: str, index: int | None, dtype: str) -> Iterator[np.ndarray]:
        """The full tensor `name` (or its row `index` along the first dimension: one expert of a stacked
        parameter) in C order, a window of its first dimension's rows at a time."""
        shape = self.shapes[name]
        base = () if index is None else (slice(index, index + 1),)
        out_shape = shape if index is None else shape[1:]
        if not out_shape:
            yield self._assemble(name, base, dtype).reshape(())
            return
        row_bytes = math.prod(out_shape[1:]) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        step = max(1, WINDOW_BYTES // max(row_bytes, 1))
        for start in range(0, out_shape[0], step):
            window = base + (slice(start, min(start + step, out_shape[0])),) + whole(out_shape[1:])
            yield self._assemble(name, window, dtype).reshape((-1,) + out_shape[1:])

    def _assemble(self, name: str, window: tuple[slice, ...], dtype: str) -> np.ndarray:
        out = np.empty(block_shape(window), SAFETENSORS_DTYPES[dtype])
        for key, rank in self.blocks[name].items():
            block = _slices(key)
            overlap = tuple(slice(max(w.start, b.start), min(w.stop, b.stop)) for w, b in zip(window, block))
            if any(s.start >= s.stop for s in overlap):
                continue
            inside = tuple(slice(o.start - b.start, o.stop - b.start) for o, b in zip(overlap, block))
            target = tuple(slice(o.start - w.start, o.stop - w.start) for o, w in zip(overlap, window))
            out[target] = self.reader(rank).read(name, inside, dtype)
        return out


def _key(block: tuple[slice, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.start, s.stop) for s in block)


def _slices(key) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in key)


def merge_slices(tensors: SlicedTensors, outputs: list[tuple[str, str, int | None]], dst: Path, layout: Layout,
                 dtype: str | None = None, max_shard_bytes: int = 4 * 10 ** 9, overwrite: bool = False,
                 progress=None, side_files: Callable[[Path], None] | None = None,
                 manifest_extra: dict | None = None, workers: int = 1, fsync: bool = True) -> dict:
    """Write the full tensors of `tensors` into the checkpoint directory DST: `outputs` lists (output name,
    parameter, row of its first dimension or None) in order; `dtype` is the stored one if None; `workers` tensors
    at a time; `fsync`: on disk before DST appears."""
    tensors.check()
    out = [OutTensor(out_name, tensors.shapes[name] if index is None else tensors.shapes[name][1:],
                     dtype or tensors.dtype(name)) for out_name, name, index in outputs]
    where = {t.name: (name, index) for t, (_, name, index) in zip(out, outputs)}
    with atomic_directory(dst, overwrite=overwrite, fsync=fsync) as tmp:
        manifest = write_checkpoint(tmp, out, layout, max_shard_bytes,
                                    lambda t: tensors.chunks(*where[t.name], t.dtype), progress, manifest_extra,
                                    workers)
        if side_files is not None:
            side_files(tmp)
    return manifest

