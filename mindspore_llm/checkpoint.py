"""Reading checkpoints tensor by tensor: Hugging Face safetensors (single or sharded, incl. bf16 and fp8 which
NumPy cannot name), MindSpore .ckpt files and MindSpore's safetensors flavour; loading them into a model, whole or
as the slices one rank of a parallel job holds.

Every format is parsed down to where each tensor's bytes sit in which file, so a tensor costs memory only when it
is read, and can be read in bounded pieces (``TensorFile.rows``) or as a block of it (``TensorFile.read_block``:
only the rows the block spans are mapped, at most ``WINDOW_BYTES`` at a time). MindSpore's own ``load_checkpoint``
reads a whole .ckpt into memory (twice, while parsing), which is why .ckpt files are parsed here.

A rank's slice of a parameter is given by a ``TensorLayout`` in MindSpore's own terms (device matrix, tensor map,
optimizer-parallel split, pipeline stages): the layout of the compiled strategy on Ascend, or the plan's
(``mindspore_llm.parallel.plan.parameter_layouts``). Under a layout, ``load_weights`` reads per rank only the
bytes of its slices, straight from Hugging Face safetensors (fp32, bf16, FP8 with 128x128 block scales), and
per-expert tensors straight into this rank's slice of a stacked expert parameter.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from mindspore_llm.common import CheckpointError

log = logging.getLogger("mindspore_llm")

# safetensors dtype tag -> NumPy storage dtype. bf16/fp8 are kept as raw bit patterns.
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "F8_E4M3": np.uint8, "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
FLOAT_TAGS = ("F64", "F32", "F16", "BF16", "F8_E4M3")
# safetensors dtype tag <-> the tensor_type string of a MindSpore .ckpt (mindspore.train.serialization).
MINDSPORE_DTYPES = {
    "F64": "Float64", "F32": "Float32", "F16": "Float16", "BF16": "BFloat16", "I64": "Int64", "I32": "Int32",
    "I16": "Int16", "I8": "Int8", "U8": "UInt8", "BOOL": "Bool",
}
SAFETENSORS_FROM_MINDSPORE = {ms: st for st, ms in MINDSPORE_DTYPES.items()}
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
# Written by `msllm-ckpt hf2ms` for both of its formats (.ckpt and MindSpore safetensors).
MS_INDEX = "mindspore_model.index.json"


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even, as torch's and MindSpore's float32 -> bfloat16 casts do (NaN stays NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def e4m3fn_table() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn bit patterns (1 sign, 4 exponent bits with bias 7, 3 mantissa
    bits; no infinities, S.1111.111 is NaN)."""
    bits = np.arange(256)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
    value = np.where(exponent == 0, mantissa / 8 * 2.0 ** -6, (1 + mantissa / 8) * 2.0 ** (exponent - 7.0))
    value = np.where((exponent == 15) & (mantissa == 7), np.nan, value)
    return (sign * value).astype(np.float32)


E4M3FN = e4m3fn_table()
FP8_BLOCK = 128  # DeepSeek-V3's weight_scale_inv covers 128 x 128 blocks (config quantization_config.weight_block_size)
SCALE_SUFFIX = "_scale_inv"


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_bits_to_float32(raw)
    if dtype == "F8_E4M3":
        return E4M3FN[raw]
    return raw.astype(np.float32, copy=False)


def cast(raw: np.ndarray, source: str, target: str) -> np.ndarray:
    """Stored elements of dtype `source` as stored elements of dtype `target` (safetensors tags), through float32
    with round-to-nearest-even, as torch's casts do."""
    if source == target:
        return raw
    values = to_float32(raw, source)
    if target == "BF16":
        return float32_to_bf16_bits(values)
    return values.astype(SAFETENSORS_DTYPES[target], copy=False)


def dequantize_fp8(bits: np.ndarray, scale: np.ndarray, first_row: int = 0, first_column: int = 0) -> np.ndarray:
    """float32 of the e4m3fn block `bits` (rows and columns from `first_row`, `first_column` of the weight) times
    their 128 x 128 block scales: DeepSeek's reference ``weight_dequant`` (fp32 multiply; edge blocks are partial).
    `scale` holds the scales of the blocks the rows and columns touch, from block (first_row // 128,
    first_column // 128) on."""
    rows = np.arange(first_row, first_row + bits.shape[0]) // FP8_BLOCK - first_row // FP8_BLOCK
    columns = np.arange(first_column, first_column + bits.shape[1]) // FP8_BLOCK - first_column // FP8_BLOCK
    return E4M3FN[bits] * scale[rows[:, None], columns[None, :]]


WINDOW_BYTES = 64 << 20  # the most of a file mapped at once while reading a block of a tensor
PREAD_BYTES = 1 << 20  # windows smaller than this are read with one pread instead of being mapped


def whole(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def block_shape(block: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in block)


class TensorFile:
    """One checkpoint file: name -> dtype tag, shape and the byte ranges ("segments") holding its data."""

    path: Path
    tensors: dict[str, dict]  # name -> {"dtype": safetensors tag, "shape": [...], "segments": [(offset, n)]}

    def names(self) -> list[str]:
        return list(self.tensors)

    def dtype(self, name: str) -> str:
        return self.tensors[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def nbytes(self, name: str) -> int:
        return sum(n for _, n in self.tensors[name]["segments"])

    def _check(self, name: str, size: int) -> None:
        info = self.tensors[name]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        end = max((offset + n for offset, n in info["segments"]), default=0)
        if end > size:
            raise CheckpointError(f"{self.path}: tensor {name} ends at byte {end} but the file has {size} bytes "
                                  f"(truncated?)")
        expected = math.prod(info["shape"]) * np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).itemsize
        if self.nbytes(name) != expected:
            raise CheckpointError(f"{self.path}: tensor {name} holds {self.nbytes(name)} bytes, its shape "
                                  f"{list(info['shape'])} and dtype {info['dtype']} need {expected} (truncated?)")

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes as an array (bf16 as uint16 bits, fp8 as uint8 bits); memory-mapped when contiguous."""
        info = self.tensors[name]
        storage = SAFETENSORS_DTYPES[info["dtype"]]
        segments = info["segments"]
        if len(segments) == 1 and segments[0][1] > 0:
            offset, n = segments[0]
            return np.memmap(self.path, dtype=storage, mode="r", offset=offset,
                             shape=(n // np.dtype(storage).itemsize,)).reshape(info["shape"])
        out = np.empty(self.nbytes(name), np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            start = 0
            for offset, n in segments:
                f.seek(offset)
                self._read_into(f, memoryview(out)[start:start + n], name)
                start += n
        return out.view(storage).reshape(info["shape"])

    def _read_into(self, f, view: memoryview, name: str) -> None:
        got = 0
        while got < len(view):
            read = f.readinto(view[got:])
            if not read:
                raise CheckpointError(f"{self.path}: tensor {name} is cut short (truncated file)")
            got += read

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 (first dimension) as stored, read from their bytes only (across .ckpt slices)."""
        info = self.tensors[name]
        storage = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        row_bytes = int(np.prod(info["shape"][1:], dtype=np.int64)) * storage.itemsize
        with open(self.path, "rb", buffering=0) as f:
            out = self._read_span(f, name, start * row_bytes, (stop - start) * row_bytes)
        return out.view(storage).reshape((stop - start, *info["shape"][1:]))

    def _read_span(self, f, name: str, first: int, count: int) -> np.ndarray:
        """Bytes first..first+count-1 of tensor `name` (across the .ckpt Values a large tensor is split into)."""
        out = np.empty(count, np.uint8)
        done = position = 0
        for offset, n in self.tensors[name]["segments"]:
            low, high = max(first, position), min(first + count, position + n)
            if low < high:
                f.seek(offset + low - position)
                self._read_into(f, memoryview(out)[done:done + high - low], name)
                done += high - low
            position += n
        return out

    def float32(self, name: str) -> np.ndarray:
        dtype = self.dtype(name)
        raw = self.raw(name)
        if dtype == "BF16":
            return bf16_bits_to_float32(raw)
        if dtype == "F8_E4M3":
            raise CheckpointError(f"{self.path}: tensor {name} is FP8; read it with its block scales "
                                  f"(read_values) or convert it with `msllm-ckpt hf2ms` first")
        return np.asarray(raw, dtype=np.float32)

    def read_block(self, name: str, block: tuple[slice, ...] | None = None) -> np.ndarray:
        """The stored elements of `block` (one ``slice(start, stop)`` per dimension; None: all) as a new array.

        Only the rows of the first dimension that the block spans are touched, through a memory map of at most
        ``WINDOW_BYTES`` at a time that is closed before the next: the pages of a column slice's rows are read,
        the rest of the file is not, and the process holds the block plus one window at most. (Windows under
        ``PREAD_BYTES`` are read with one ``pread``: cheaper than mapping them.)
        """
        shape = self.shape(name)
        block = whole(shape) if block is None else block
        storage = np.dtype(SAFETENSORS_DTYPES[self.dtype(name)])
        out = np.empty(block_shape(block), storage)
        if out.size == 0:
            return out
        if not shape:  # a scalar
            out[...] = self.raw(name)
            return out
        row_bytes = math.prod(shape[1:]) * storage.itemsize
        step = max(1, WINDOW_BYTES // max(row_bytes, 1))
        first, last = block[0].start, block[0].stop
        with open(self.path, "rb", buffering=0) as f:
            for start in range(first, last, step):
                stop = min(start + step, last)
                self._rows(f, name, start, stop, block[1:], out[start - first:stop - first])
        return out

    def _rows(self, f, name: str, start: int, stop: int, inner: tuple[slice, ...], out: np.ndarray) -> None:
        """Rows start..stop of the first dimension, cut to `inner` in the other dimensions, into `out`."""
        info = self.tensors[name]
        storage = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        rows_shape = (stop - start,) + tuple(info["shape"][1:])
        length = math.prod(rows_shape) * storage.itemsize
        begin = start * (length // (stop - start))
        segment_start = 0
        for offset, n in info["segments"]:
            if segment_start <= begin and begin + length <= segment_start + n:
                position = offset + begin - segment_start
                if length < PREAD_BYTES:
                    data = np.frombuffer(os.pread(f.fileno(), length, position), storage)
                    if data.nbytes != length:
                        raise CheckpointError(f"{self.path}: tensor {name} is cut short (truncated file)")
                    out[...] = data.reshape(rows_shape)[(slice(None),) + inner]
                    return
                aligned = position - position % mmap.ALLOCATIONGRANULARITY
                mapped = mmap.mmap(f.fileno(), position - aligned + length, offset=aligned, access=mmap.ACCESS_READ)
                try:
                    rows = np.frombuffer(mapped, storage, length // storage.itemsize, position - aligned)
                    out[...] = rows.reshape(rows_shape)[(slice(None),) + inner]
                    del rows  # releases the map's buffer so that it can close
                finally:
                    mapped.close()
                return
            segment_start += n
        # the rows straddle two .ckpt Values (a tensor over 512 MB is split into several): read them
        data = self._read_span(f, name, begin, length)
        out[...] = data.view(storage).reshape(rows_shape)[(slice(None),) + inner]


class SafetensorsFile(TensorFile):
    """One .safetensors file (Hugging Face's, or MindSpore's flavour with ``{"format": "ms"}`` metadata)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise CheckpointError(f"{self.path}: truncated header (claims {header_len} bytes)")
                header = json.loads(f.read(header_len))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({err})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_offset = 8 + header_len
        self.tensors = {}
        for name, info in header.items():
            start, end = info["data_offsets"]
            self.tensors[name] = {"dtype": info["dtype"], "shape": info["shape"],
                                  "segments": [(self.data_offset + start, end - start)]}
            self._check(name, size)


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


class CkptFile(TensorFile):
    """One MindSpore .ckpt: a protobuf ``Checkpoint`` (mindspore/train/checkpoint.proto) whose repeated ``Value``
    entries each hold a tag (the parameter name) and a TensorProto (dims, tensor_type, tensor_content). MindSpore
    splits big tensors into several consecutive Values of the same tag; only the headers are parsed here."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors = {}
        self.strings: dict[str, str] = {}  # string entries (save_checkpoint's append_dict), not tensors
        try:
            size = self.path.stat().st_size
            if size:
                with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    self._parse(buf, size)
        except (OSError, IndexError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{self.path}: not a readable MindSpore checkpoint ({err or 'truncated'})") from None
        for name in self.tensors:
            self._check(name, size)

    def _parse(self, buf, size: int) -> None:
        end = size
        if size >= 17 and buf[size - 17:size - 10] == b"crc_num":  # MindSpore's optional CRC trailer
            end = size - 17
        pos = 0
        while pos < end:
            key, pos = _varint(buf, pos)
            length, pos = _varint(buf, pos)
            if key != 0x0A or pos + length > end:
                raise CheckpointError(f"{self.path}: tensor {self._tag(buf, pos, end)} is cut short at byte {end} "
                                      f"(truncated or corrupt file)")
            name, dtype, dims, content = self._value(buf, pos, pos + length)
            pos += length
            if dtype == "str":  # UTF-32 text, as mindspore.load_checkpoint decodes it
                self.strings[name] = bytes(buf[content[0]:content[0] + content[1]]).decode("utf-32-le")
                continue
            info = self.tensors.get(name)
            if info is None:
                self.tensors[name] = {"dtype": dtype, "shape": dims, "segments": [content]}
            elif info["dtype"] != dtype or info["shape"] != dims:
                raise CheckpointError(f"{self.path}: tensor {name} appears twice with different shapes or dtypes")
            else:
                info["segments"].append(content)

    def _tag(self, buf, pos: int, end: int) -> str:
        """The name at the start of a Value, for error messages ('?' if it is not readable)."""
        try:
            key, pos = _varint(buf, pos)
            n, pos = _varint(buf, pos)
            return bytes(buf[pos:min(pos + n, end)]).decode() if key == 0x0A else "?"
        except (IndexError, UnicodeDecodeError):
            return "?"

    def _value(self, buf, pos: int, end: int):
        name = dtype = content = None
        dims: list[int] = []
        while pos < end:
            key, pos = _varint(buf, pos)
            if key == 0x0A:  # Value.tag
                n, pos = _varint(buf, pos)
                name = bytes(buf[pos:pos + n]).decode()
                pos += n
            elif key == 0x12:  # Value.tensor
                n, pos = _varint(buf, pos)
                tensor_end = pos + n
                while pos < tensor_end:
                    key, pos = _varint(buf, pos)
                    if key == 0x08:  # dims, unpacked
                        dim, pos = _varint(buf, pos)
                        dims.append(dim)
                        continue
                    n, pos = _varint(buf, pos)
                    if key == 0x0A:  # dims, packed
                        stop = pos + n
                        while pos < stop:
                            dim, pos = _varint(buf, pos)
                            dims.append(dim)
                        continue
                    if key == 0x12:
                        dtype = bytes(buf[pos:pos + n]).decode()
                    elif key == 0x1A:
                        content = (pos, n)
                    pos += n
            else:
                raise CheckpointError(f"{self.path}: entry {name or '?'} is not a plain tensor (map parameter?)")
        if name is None or dtype is None or content is None:
            raise CheckpointError(f"{self.path}: corrupt or truncated MindSpore checkpoint entry {name or '?'}")
        if dtype == "str":
            return name, dtype, dims, content
        if dtype not in SAFETENSORS_FROM_MINDSPORE:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {dtype}")
        return name, SAFETENSORS_FROM_MINDSPORE[dtype], dims, content


def open_tensor_file(path: str | os.PathLike) -> TensorFile:
    path = Path(path)
    if path.suffix == ".ckpt":
        return CkptFile(path)
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix == ".bin":
        raise CheckpointError(f"{path}: a pickle (PyTorch .bin); convert it with `msllm-ckpt hf2ms --allow-pickle` "
                              f"if you trust its origin")
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors or .ckpt)")


def weight_files(path: str | os.PathLike, opened: dict[Path, TensorFile] | None = None) -> dict[str, Path]:
    """tensor name -> file for a checkpoint: one file, or a directory (Hugging Face or `msllm-ckpt hf2ms` output,
    with an index or without: then every *.safetensors or *.ckpt file in it). Files opened to list their tensors
    are kept in `opened` (by path) when given."""
    path = Path(path)
    opened = {} if opened is None else opened

    def names(file: Path) -> list[str]:
        opened[file] = open_tensor_file(file)
        return opened[file].names()

    if path.is_file():
        return {name: path for name in names(path)}
    for index in (path / HF_INDEX, path / MS_INDEX):
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid checkpoint index ({err})") from None
            files = {name: path / file for name, file in weight_map.items()}
            for name, file in files.items():
                if not file.exists():
                    raise CheckpointError(f"{index}: tensor {name} is listed in {file.name}, which is missing")
            return files
    if (path / HF_SINGLE).exists():
        return weight_files(path / HF_SINGLE, opened)
    shards = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.ckpt"))
    if shards:
        files: dict[str, Path] = {}
        for shard in shards:
            for name in names(shard):
                if name in files:  # e.g. a mindformers rank directory keeping the checkpoints of several steps
                    raise CheckpointError(f"{path}: tensor {name} is in both {files[name].name} and {shard.name}; "
                                          f"pass the one checkpoint file to read")
                files[name] = shard
        return files
    if (path / "pytorch_model.bin").exists():
        open_tensor_file(path / "pytorch_model.bin")
    raise CheckpointError(f"{path}: no *.safetensors or *.ckpt weights found")


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, TensorFile]]:
    """(name, file) for every tensor of a checkpoint, in file order, one file opened at a time."""
    by_file: dict[Path, list[str]] = {}
    for name, file in weight_files(path).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        reader = open_tensor_file(file)
        for name in names:
            if name not in reader.tensors:
                raise CheckpointError(f"{file}: tensor {name} is listed in the index but not in the file")
            yield name, reader


# Tensors a Hugging Face checkpoint may carry that are not model parameters.
NON_PARAMETER_SUFFIXES = (".rotary_emb.inv_freq",)
_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """N for a tensor of ``model.layers.N``; None for any other tensor."""
    found = _LAYER_TENSOR.match(name)
    return None if found is None else int(found.group(1))


# Entries of a training checkpoint that are not model weights (optimizer moments and step, the loss scale).
TRAINING_STATE_PREFIXES = ("optimizer.", "loss_scale.", "accu_grads.")


@dataclass(frozen=True)
class TensorLayout:
    """How one parameter is cut over the devices of a pipeline stage, in the terms of MindSpore's strategy files
    (node_strategy.proto ``ParallelLayouts``) and of ``Cell.parameter_layout_dict``.

    ``dev_matrix``: the stage's devices as a row-major grid (a rank's position in its stage, last axis fastest);
    ``tensor_map``: per tensor dimension, the grid axis splitting it counted from the right, or -1 (whole);
    ``opt_shard_size``: the parallel optimizer splits the first dimension of that slice again over this many of the
    devices holding the same slice (0: not split, -1: over all of them), taking the grid axes that do not split the
    tensor innermost first, as MindSpore does (``mindspore.parallel._tensor._construct_tensor_layout_helper``);
    ``stages``: the pipeline stages holding the parameter (rank r is on stage r // devices per stage).
    """
    dev_matrix: tuple[int, ...]
    tensor_map: tuple[int, ...]
    stages: tuple[int, ...] = (0,)
    opt_shard_size: int = 0

    @functools.cached_property
    def stage_devices(self) -> int:
        return math.prod(self.dev_matrix)

    def on_rank(self, rank: int) -> bool:
        return rank // self.stage_devices in self.stages

    def block(self, shape: tuple[int, ...], rank: int) -> tuple[slice, ...]:
        """The block of a tensor of `shape` that `rank` holds (one slice per dimension)."""
        if len(self.tensor_map) != len(shape):
            raise CheckpointError(f"layout {self.tensor_map} has {len(self.tensor_map)} dimensions, the tensor "
                                  f"{len(shape)} ({list(shape)})")
        axes = len(self.dev_matrix)
        coordinate = np.unravel_index(rank % self.stage_devices, self.dev_matrix)
        block = []
        for size, axis in zip(shape, self.tensor_map):
            parts, index = (1, 0) if axis == -1 else (self.dev_matrix[axes - 1 - axis], coordinate[axes - 1 - axis])
            block.append(_piece(slice(0, size), parts, int(index), shape))
        if self.opt_shard_size and shape:
            parts, index = self._optimizer_shard(coordinate)
            block[0] = _piece(block[0], parts, index, shape)
        return tuple(block)

    def full_shape(self, block: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the tensor whose slices under this layout have shape `block` (the inverse of ``block``)."""
        axes = len(self.dev_matrix)
        shape = [n * (1 if axis == -1 else self.dev_matrix[axes - 1 - axis]) for n, axis in zip(block, self.tensor_map)]
        if self.opt_shard_size and shape:
            shape[0] *= self._optimizer_shard(np.unravel_index(0, self.dev_matrix))[0]
        return tuple(shape)

    def _optimizer_shard(self, coordinate) -> tuple[int, int]:
        used = {len(self.dev_matrix) - 1 - axis for axis in self.tensor_map if axis != -1}
        repeated = [i for i, n in enumerate(self.dev_matrix) if i not in used and n > 1]
        remaining = (self.opt_shard_size if self.opt_shard_size > 0
                     else math.prod(self.dev_matrix[i] for i in repeated))
        parts, index = 1, 0
        for axis in reversed(repeated):
            if remaining == 1:
                break
            take = min(self.dev_matrix[axis], remaining)
            index += int(coordinate[axis] % take) * parts
            parts *= take
            remaining //= take
        return parts, index


def _piece(span: slice, parts: int, index: int, shape) -> slice:
    size = span.stop - span.start
    if size % parts:
        raise CheckpointError(f"a dimension of {size} (tensor shape {list(shape)}) does not split into {parts} parts")
    piece = size // parts
    return slice(span.start + index * piece, span.start + (index + 1) * piece)


class WeightReader:
    """The tensors of a checkpoint by name, read as blocks (only the bytes of the block); FP8 weights are
    dequantized with their ``*_scale_inv`` block scales, which are consumed, never loaded.

    `path`: a checkpoint directory or file, its files opened when first read; or `tensors`, name -> what reads it
    like a ``TensorFile`` (``shape``, ``dtype``, ``read_block``, ``path``): the files of `path` already opened, or
    another naming's tensors as Hugging Face's (``models.naming.checkpoint_reader``, the one way a model is read in
    any naming)."""

    def __init__(self, path: str | os.PathLike, tensors: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self._files: dict[Path, TensorFile] = {}
        self.where: dict[str, Any] = (weight_files(path, self._files) if tensors is None else dict(tensors))

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def leave_out(self, names) -> None:
        """Read as if the checkpoint did not hold `names` (a training checkpoint's optimizer entries)."""
        for name in names:
            del self.where[name]

    def file(self, name: str):
        source = self.where[name]
        if not isinstance(source, Path):
            return source
        if source not in self._files:
            self._files[source] = open_tensor_file(source)
        reader = self._files[source]
        if name not in reader.tensors:
            raise CheckpointError(f"{source}: tensor {name} is listed in the index but not in the file")
        return reader

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file(name).shape(name)

    def scale_of(self, name: str) -> str | None:
        return name + SCALE_SUFFIX if self.file(name).dtype(name) == "F8_E4M3" else None

    def read(self, name: str, block: tuple[slice, ...] | None = None, dtype: str = "F32") -> np.ndarray:
        """`block` of tensor `name` (None: all of it) as stored elements of `dtype` (a safetensors tag)."""
        reader = self.file(name)
        block = whole(reader.shape(name)) if block is None else block
        stored = reader.dtype(name)
        if stored not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{reader.path}: tensor {name} has unsupported dtype {stored}")
        raw = reader.read_block(name, block)
        if stored not in FLOAT_TAGS:  # integers as stored (quantized codes)
            return raw
        if stored != "F8_E4M3":
            return cast(raw, stored, dtype)
        scale = self.scale_of(name)
        if scale not in self:
            raise CheckpointError(f"{reader.path}: FP8 tensor {name} has no {scale} (its block scales)")
        rows, columns = reader.shape(name)
        expected = (-(-rows // FP8_BLOCK), -(-columns // FP8_BLOCK))
        if self.shape(scale) != expected:
            raise CheckpointError(f"{self.file(scale).path}: tensor {scale} has shape {self.shape(scale)}, the "
                                  f"{rows}x{columns} weight {name} needs {expected} ({FP8_BLOCK}x{FP8_BLOCK} blocks)")
        r, c = block
        scale_block = (slice(r.start // FP8_BLOCK, -(-r.stop // FP8_BLOCK)),
                       slice(c.start // FP8_BLOCK, -(-c.stop // FP8_BLOCK)))
        values = dequantize_fp8(raw, self.read(scale, scale_block), r.start, c.start)
        return values if dtype == "F32" else cast(values, "F32", dtype)


# A directory written by `msllm-ckpt shard`: rank_N/ holds exactly rank N's slices under the model's parameter
# names, SLICES_MANIFEST each parameter's full shape and layout (what the slices were cut by).
SLICES_MANIFEST = "slices.json"


def layout_to_dict(layout: TensorLayout) -> dict:
    return {"dev_matrix": list(layout.dev_matrix), "tensor_map": list(layout.tensor_map),
            "stages": list(layout.stages), "opt_shard_size": layout.opt_shard_size}


def layout_from_dict(entry: Mapping) -> TensorLayout:
    return TensorLayout(tuple(entry["dev_matrix"]), tuple(entry["tensor_map"]), tuple(entry["stages"]),
                        int(entry.get("opt_shard_size", 0)))


def read_slices_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of a pre-sliced directory (None for any other checkpoint)."""
    file = Path(directory) / SLICES_MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
        manifest["layouts"] = {name: layout_from_dict(entry) for name, entry in manifest["layouts"].items()}
        manifest["shapes"] = {name: tuple(shape) for name, shape in manifest["shapes"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: not a valid slices manifest ({err})") from None
    return manifest


def read_parameter(reader: WeightReader, name: str, shape: tuple[int, ...], sources: list[str],
                   block: tuple[slice, ...]) -> np.ndarray:
    """float32 `block` of parameter `name` of `shape`, read from its checkpoint `sources`."""
    if len(sources) == 1:
        if reader.shape(sources[0]) != shape:
            raise CheckpointError(f"{reader.file(sources[0]).path}: tensor {sources[0]} has shape "
                                  f"{reader.shape(sources[0])}, the model expects {shape}")
        return reader.read(sources[0], block)
    out = np.empty(block_shape(block), np.float32)  # this rank's experts only, each read into its row
    for row, expert in enumerate(range(block[0].start, block[0].stop)):
        source = sources[expert]
        if reader.shape(source) != shape[1:]:
            raise CheckpointError(f"{reader.file(source).path}: tensor {source} has shape {reader.shape(source)}, "
                                  f"the model expects {shape[1:]} (one expert of {name})")
        out[row] = reader.read(source, block[1:])
    return out


def _listing(kind: str, names) -> str:
    names = sorted(names)
    return f"{kind} {len(names)} tensor(s): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"


def rank_weights(model, directory: str | os.PathLike | WeightReader, layouts: Mapping[str, TensorLayout] | None = None,
                 rank: int = 0, shapes: Mapping[str, tuple[int, ...]] | None = None, check_names: bool = True
                 ) -> Iterator[tuple[str, tuple[slice, ...], np.ndarray]]:
    """(parameter name, its block on rank `rank`, the values of the block) for every parameter of `model`
    that rank holds, read from a checkpoint directory: what ``load_weights`` puts into the model.

    `shapes`: the full shapes of the parameters to read (default: every parameter, as it is now). With `layouts`
    (parameter name -> ``TensorLayout``; parameters absent from it are not on this rank) only each parameter's
    slice is read, as byte ranges of the source: a Hugging Face checkpoint (fp32, bf16, FP8 with its block
    scales; per-expert tensors straight into this rank's rows of a stacked parameter) or `msllm-ckpt shard`
    output (``rank_N/`` holds the slices, checked against the layout); or a ``WeightReader`` (a checkpoint in
    any naming: ``models.naming.checkpoint_reader``; a caller reading it for several ranks checks its names once
    and passes ``check_names=False``). Integer tensors (quantized codes) come as stored, the others as float32;
    statistics buffers are zeros. Missing or unexpected tensors and shape mismatches are errors naming the tensor
    and file, raised before anything is read.
    """
    if shapes is None:
        shapes = {p.name: tuple(p.shape) for p in model.get_parameters()}
    statistics = {name for name in shapes if name.endswith(model.STATISTICS_SUFFIXES)}
    presliced = None
    if isinstance(directory, WeightReader):
        reader, directory = directory, directory.path
        if check_names:
            check_tensor_names(model, reader, shapes)
    else:
        directory = Path(directory)
        presliced = read_slices_manifest(directory)
        reader = WeightReader(directory / f"rank_{rank}" if presliced else directory)
        if presliced:
            expected = set(shapes) - statistics
            if set(presliced["shapes"]) != expected:
                raise CheckpointError(f"{directory}: sliced for other parameters than this model's ("
                                      f"{_listing('missing', expected - set(presliced['shapes']))}; "
                                      f"{_listing('unexpected', set(presliced['shapes']) - expected)})")
        else:
            check_tensor_names(model, reader, shapes)
    wanted = sorted(name for name in shapes
                    if layouts is None or (name in layouts and layouts[name].on_rank(rank)))
    sources = {name: [name] if presliced else model.checkpoint_sources(name)
               for name in wanted if name not in statistics}
    missing = {src for names in sources.values() for src in names if src not in reader}
    if missing:
        raise CheckpointError(f"{reader.path}: {_listing('missing', missing)}")
    for name in wanted:
        shape = tuple(shapes[name])
        block = whole(shape) if layouts is None else layouts[name].block(shape, rank)
        if name in statistics:  # per-step statistics: zero at the start
            yield name, block, np.zeros(block_shape(block), np.float32)
        elif presliced:
            stored = presliced["layouts"][name].block(presliced["shapes"][name], rank)
            if stored != block or presliced["shapes"][name] != shape:
                raise CheckpointError(f"{directory}: {name} was sliced as {_ranges(stored)} of "
                                      f"{list(presliced['shapes'][name])} for rank {rank}; this job's layout needs "
                                      f"{_ranges(block)} of {list(shape)}: shard the model again for this job")
            yield name, block, reader.read(name)
        else:
            yield name, block, read_parameter(reader, name, shape, sources[name], block)


def check_tensor_names(model, reader: WeightReader, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every tensor of the checkpoint is read by some parameter of `shapes` (or its FP8 scale), or is one the model
    skips on purpose; the missing ones are named when a rank reads them."""
    used = {src for name in shapes if not name.endswith(model.STATISTICS_SUFFIXES)
            for src in model.checkpoint_sources(name)}
    used |= {src + SCALE_SUFFIX for src in used}  # FP8 block scales
    unexpected = model.ignored_checkpoint_tensors(set(reader.names()) - used)
    if unexpected:
        raise CheckpointError(f"{reader.path}: {_listing('unexpected', unexpected)}")


def load_weights(model, directory: str | os.PathLike | WeightReader, layouts: Mapping[str, TensorLayout] | None = None,
                 rank: int = 0, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Fill the parameters of `model` from a checkpoint directory (Hugging Face, `msllm-ckpt hf2ms` output in
    either format, or `msllm-ckpt shard` output; names must match the model's) or a ``WeightReader`` (any naming:
    ``models.naming.checkpoint_reader``; quantizing: ``models.quantized.QuantizingReader``). Arguments as
    ``rank_weights``: with
    `layouts`, every parameter on rank `rank`'s stage gets only its slice (``Parameter.sliced``) and the others
    stay unallocated (build the model with ``models.auto.build_model(..., materialize=False)``); without, every
    parameter gets its full tensor."""
    import mindspore as ms

    params = model.parameters_dict()
    loaded = 0
    for name, block, values in rank_weights(model, directory, layouts, rank, shapes):
        param = params[name]
        full = tuple(shapes[name]) if shapes is not None else tuple(param.shape)
        # float32 arrays become the parameter's memory as they are (no copy)
        tensor = ms.Tensor.from_numpy(values) if param.dtype == ms.float32 else ms.Tensor(values, dtype=param.dtype)
        param.set_data(tensor, slice_shape=block_shape(block) != full)
        loaded += values.nbytes
    log.debug("rank %d: loaded %.1f MB from %s", rank, loaded / 2 ** 20, directory)


def _ranges(block: tuple[slice, ...]) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in block) + "]"
