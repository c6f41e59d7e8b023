"""Reading checkpoints tensor by tensor: Hugging Face safetensors (single or sharded, incl. bf16 and fp8 which
NumPy cannot name), MindSpore .ckpt files and MindSpore's safetensors flavour; loading them into a model.

Every format is parsed down to where each tensor's bytes sit in which file, so a tensor costs memory only when it
is read, and can be read in bounded pieces (``TensorFile.rows``). MindSpore's own ``load_checkpoint`` reads a
whole .ckpt into memory (twice, while parsing), which is why .ckpt files are parsed here.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from mindspore_llm.common import CheckpointError

# safetensors dtype tag -> NumPy storage dtype. bf16/fp8 are kept as raw bit patterns.
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "F8_E4M3": np.uint8, "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
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
        expected = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).itemsize
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
        first, count = start * row_bytes, (stop - start) * row_bytes
        out = np.empty(count, np.uint8)
        done = position = 0
        with open(self.path, "rb", buffering=0) as f:
            for offset, n in info["segments"]:
                low, high = max(first, position), min(first + count, position + n)
                if low < high:
                    f.seek(offset + low - position)
                    self._read_into(f, memoryview(out)[done:done + high - low], name)
                    done += high - low
                position += n
        return out.view(storage).reshape((stop - start, *info["shape"][1:]))

    def float32(self, name: str) -> np.ndarray:
        dtype = self.dtype(name)
        raw = self.raw(name)
        if dtype == "BF16":
            return bf16_bits_to_float32(raw)
        if dtype == "F8_E4M3":
            raise CheckpointError(f"{self.path}: tensor {name} is FP8; convert it with `msllm-ckpt hf2ms` first")
        return np.asarray(raw, dtype=np.float32)


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


def weight_files(path: str | os.PathLike) -> dict[str, Path]:
    """tensor name -> file for a checkpoint: one file, or a directory (Hugging Face or `msllm-ckpt hf2ms` output,
    with an index or without: then every *.safetensors or *.ckpt file in it)."""
    path = Path(path)
    if path.is_file():
        return {name: path for name in open_tensor_file(path).names()}
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
        return weight_files(path / HF_SINGLE)
    shards = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.ckpt"))
    if shards:
        files: dict[str, Path] = {}
        for shard in shards:
            for name in open_tensor_file(shard).names():
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


class ArrayTensor:
    """An array computed while loading (stacked experts, a zeroed statistics buffer, a weight's quantized codes),
    read like a checkpoint file's tensor so ``load_weights`` treats it like any other; its dtype is kept."""

    def __init__(self, array: np.ndarray, path):
        self.path = path
        self.array = array

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def float32(self, name: str) -> np.ndarray:
        return self.array


# Tensors a Hugging Face checkpoint may carry that are not model parameters.
NON_PARAMETER_SUFFIXES = (".rotary_emb.inv_freq",)
_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """N for a tensor of ``model.layers.N``; None for any other tensor."""
    found = _LAYER_TENSOR.match(name)
    return None if found is None else int(found.group(1))


# Entries of a training checkpoint that are not model weights (optimizer moments and step, the loss scale).
TRAINING_STATE_PREFIXES = ("optimizer.", "loss_scale.", "accu_grads.")


def load_weights(model, directory: str | os.PathLike, tensors: Iterable[tuple[str, Any]] | None = None) -> None:
    """Fill every parameter of `model` from a checkpoint directory (Hugging Face, or `msllm-ckpt hf2ms` output in
    either format), or from `tensors` ((name, reader) pairs read from `directory`, e.g. another naming's tensors
    as Hugging Face's: ``models.naming.CheckpointView.tensors``); names must match exactly.

    Missing or unexpected tensors and shape mismatches are errors naming the tensor and file.
    """
    import mindspore as ms

    params = model.parameters_dict()
    loaded = set()
    unexpected = []
    tensors = iter_tensors(directory) if tensors is None else tensors
    # A family whose Cells lay tensors out differently from checkpoints (DeepSeek's stacked experts) maps them.
    if hasattr(model, "checkpoint_tensors"):
        tensors = model.checkpoint_tensors(tensors)
    for name, reader in tensors:
        if name not in params:
            if not name.endswith(NON_PARAMETER_SUFFIXES):
                unexpected.append(name)
            continue
        param = params[name]
        if reader.shape(name) != tuple(param.shape):
            raise CheckpointError(f"{reader.path}: tensor {name} has shape {reader.shape(name)}, "
                                  f"the model expects {tuple(param.shape)}")
        param.set_data(ms.Tensor(reader.float32(name), dtype=param.dtype))
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(sorted(unexpected)[:8])}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(f"{directory}: " + "; ".join(parts))
