"""Reading checkpoints tensor by tensor: Hugging Face safetensors (single or sharded, incl. bf16 and fp8 which
NumPy cannot name) and MindSpore .ckpt directories written by ``ckpt_tools``; loading them into a model.

Safetensors are read through ``np.memmap`` views, so a tensor costs memory only when it is converted.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

# safetensors dtype tag -> (NumPy storage dtype, bytes per element). bf16/fp8 are kept as raw bit patterns.
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "F8_E4M3": np.uint8, "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
MS_INDEX = "mindspore_model.ckpt.index.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or inconsistent; the message names the file and tensor."""


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


class SafetensorsFile:
    """One .safetensors file: its header, and each tensor as a memory-mapped NumPy view of its stored bytes."""

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
        self.tensors = header
        self.data_offset = 8 + header_len
        for name, info in header.items():
            end = info["data_offsets"][1]
            if self.data_offset + end > size:
                raise CheckpointError(f"{self.path}: tensor {name} ends at byte {self.data_offset + end} "
                                      f"but the file has {size} bytes (truncated?)")
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")

    def names(self) -> list[str]:
        return list(self.tensors)

    def dtype(self, name: str) -> str:
        return self.tensors[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes as an array (bf16 as uint16 bits, fp8 as uint8 bits), memory-mapped."""
        info = self.tensors[name]
        start, end = info["data_offsets"]
        storage = SAFETENSORS_DTYPES[info["dtype"]]
        count = (end - start) // np.dtype(storage).itemsize
        if count == 0:
            return np.zeros(info["shape"], storage)
        array = np.memmap(self.path, dtype=storage, mode="r", offset=self.data_offset + start, shape=(count,))
        return array.reshape(info["shape"])

    def float32(self, name: str) -> np.ndarray:
        dtype = self.dtype(name)
        raw = self.raw(name)
        if dtype == "BF16":
            return bf16_bits_to_float32(raw)
        if dtype == "F8_E4M3":
            raise CheckpointError(f"{self.path}: tensor {name} is FP8; convert it with `msllm-ckpt hf2ms` first")
        return np.asarray(raw, dtype=np.float32)


def hf_weight_files(directory: str | os.PathLike) -> dict[str, Path]:
    """tensor name -> safetensors file for a Hugging Face model directory (single file or sharded with index)."""
    directory = Path(directory)
    index = directory / HF_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        files = {name: directory / file for name, file in weight_map.items()}
        for name, file in files.items():
            if not file.exists():
                raise CheckpointError(f"{index}: tensor {name} is listed in {file.name}, which is missing")
        return files
    single = directory / HF_SINGLE
    if single.exists():
        return {name: single for name in SafetensorsFile(single).names()}
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return {name: shard for shard in shards for name in SafetensorsFile(shard).names()}
    if (directory / "pytorch_model.bin").exists():
        raise CheckpointError(f"{directory}: only pytorch_model.bin (a pickle) is present; convert it with "
                              f"`msllm-ckpt hf2ms --allow-pickle` if you trust its origin")
    raise CheckpointError(f"{directory}: no *.safetensors or *.ckpt weights found")


def iter_hf_tensors(directory: str | os.PathLike) -> Iterator[tuple[str, SafetensorsFile]]:
    """(name, file) for every tensor of a Hugging Face directory, one file opened at a time."""
    by_file: dict[Path, list[str]] = {}
    for name, file in hf_weight_files(directory).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        reader = SafetensorsFile(file)
        for name in names:
            if name not in reader.tensors:
                raise CheckpointError(f"{file}: tensor {name} is listed in the index but not in the file")
            yield name, reader


def is_mindspore_dir(directory: str | os.PathLike) -> bool:
    return any(Path(directory).glob("*.ckpt"))


def _mindspore_tensors(directory: Path) -> dict[str, np.ndarray]:
    import mindspore as ms

    tensors = {}
    for file in sorted(directory.glob("*.ckpt")):
        for name, param in ms.load_checkpoint(str(file)).items():
            tensors[name] = param
    return tensors


# Tensors a Hugging Face checkpoint may carry that are not model parameters.
NON_PARAMETER_SUFFIXES = (".rotary_emb.inv_freq",)


def load_weights(model, directory: str | os.PathLike) -> None:
    """Fill every parameter of `model` from a checkpoint directory; names must match exactly.

    Missing or unexpected tensors and shape mismatches are errors naming the tensor and file.
    """
    import mindspore as ms

    directory = Path(directory)
    params = model.parameters_dict()
    loaded = set()
    unexpected = []

    def assign(name: str, array_or_param, source) -> None:
        param = params[name]
        shape = tuple(array_or_param.shape)
        if shape != tuple(param.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {shape}, the model expects {tuple(param.shape)}")
        if isinstance(array_or_param, np.ndarray):
            value = ms.Tensor(array_or_param, dtype=param.dtype)
        else:
            value = array_or_param.astype(param.dtype)
        param.set_data(value)
        loaded.add(name)

    if is_mindspore_dir(directory):
        for name, tensor in _mindspore_tensors(directory).items():
            if name in params:
                assign(name, tensor, directory)
            elif not name.endswith(NON_PARAMETER_SUFFIXES):
                unexpected.append(name)
    else:
        for name, reader in iter_hf_tensors(directory):
            if name in params:
                assign(name, reader.float32(name), reader.path)
            elif not name.endswith(NON_PARAMETER_SUFFIXES):
                unexpected.append(name)
    missing = sorted(set(params) - loaded)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(sorted(unexpected)[:8])}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(f"{directory}: " + "; ".join(parts))
