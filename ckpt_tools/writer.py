"""The one checkpoint writer: tensors streamed chunk by chunk into shards of Hugging Face safetensors, MindSpore
safetensors or MindSpore .ckpt, with an index and a manifest (shape, dtype, CRC32 of each tensor's bytes).

Shards are planned up front from the tensors' shapes and dtypes, so a safetensors header is written first and
each tensor's bytes follow as they are produced: memory stays at one chunk, whatever the shard size.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from mindspore_llm.checkpoint import MINDSPORE_DTYPES, SAFETENSORS_DTYPES

# MindSpore's save_checkpoint splits a tensor's bytes into Values of at most SLICE_SIZE KB (512 MB);
# mindspore.load_checkpoint joins consecutive Values of one tag. Done the same way here.
CKPT_SLICE_BYTES = 512 * 1024 * 1024
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors tag

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[self.dtype]).itemsize


@dataclass(frozen=True)
class Layout:
    """Where and how a checkpoint is written: file name stem, extension, index name, safetensors metadata."""
    stem: str
    extension: str  # "safetensors" or "ckpt"
    index: str
    metadata: dict
    # a flat tensor name -> file map written beside the index, as mindformers' tools expect (param_name_map.json)
    name_map: str | None = None


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Consecutive tensors grouped into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[OutTensor]] = []
    size = 0
    for tensor in tensors:
        if not shards or (size + tensor.nbytes > max_shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _ckpt_value_header(tensor: OutTensor, content_bytes: int) -> bytes:
    """Protobuf framing of one ``Checkpoint.value`` entry up to its tensor_content, as MindSpore serialises it
    (proto2: unpacked dims, fields in number order); `content_bytes` of raw data follow."""
    tag = tensor.name.encode()
    dtype = MINDSPORE_DTYPES[tensor.dtype].encode()
    proto = b"".join(b"\x08" + _varint(d) for d in tensor.shape)
    proto += b"\x12" + _varint(len(dtype)) + dtype + b"\x1a" + _varint(content_bytes)
    value = b"\x0a" + _varint(len(tag)) + tag + b"\x12" + _varint(len(proto) + content_bytes) + proto
    return b"\x0a" + _varint(len(value) + content_bytes) + value


def _safetensors_header(tensors: list[OutTensor], metadata: dict) -> bytes:
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for tensor in tensors:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text


class _TensorSink:
    """Writes one tensor's chunks, adding .ckpt slice headers at slice boundaries, and checksums the data."""

    def __init__(self, f, tensor: OutTensor, ckpt: bool):
        self.f, self.tensor, self.ckpt = f, tensor, ckpt
        self.left = tensor.nbytes
        self.slice_left = 0
        self.crc = 0
        if ckpt and self.left == 0:
            f.write(_ckpt_value_header(tensor, 0))

    def write(self, chunk: np.ndarray) -> int:
        data = memoryview(np.ascontiguousarray(chunk)).cast("B")
        if len(data) > self.left:
            raise ValueError(f"tensor {self.tensor.name}: more bytes produced than its shape holds")
        self.crc = zlib.crc32(data, self.crc)
        self.left -= len(data)
        while len(data):
            if self.ckpt and self.slice_left == 0:
                self.slice_left = min(CKPT_SLICE_BYTES, self.left + len(data))
                self.f.write(_ckpt_value_header(self.tensor, self.slice_left))
            part = len(data) if not self.ckpt else min(len(data), self.slice_left)
            self.f.write(data[:part])
            data = data[part:]
            self.slice_left -= part if self.ckpt else 0
        return self.left


def write_checkpoint(directory: Path, tensors: list[OutTensor], layout: Layout, max_shard_bytes: int,
                     chunks: Callable[[OutTensor], Iterable[np.ndarray]], progress=None,
                     manifest_extra: dict | None = None) -> dict:
    """Write `tensors` (their bytes produced by `chunks(tensor)`, in order) into `directory`; returns the manifest.

    `directory` is expected to be a temporary directory (``fileio.atomic_directory``) renamed when complete.
    """
    shards = plan_shards(tensors, max_shard_bytes)
    weight_map, entries = {}, {}
    for number, shard in enumerate(shards, 1):
        file_name = f"{layout.stem}-{number:05d}-of-{len(shards):05d}.{layout.extension}"
        ckpt = layout.extension == "ckpt"
        with open(directory / file_name, "wb") as f:
            if not ckpt:
                f.write(_safetensors_header(shard, layout.metadata))
            for tensor in shard:
                sink = _TensorSink(f, tensor, ckpt)
                for chunk in chunks(tensor):
                    sink.write(chunk)
                    if progress is not None:
                        progress.update(chunk.nbytes)
                if sink.left:
                    raise ValueError(f"tensor {tensor.name}: {sink.left} bytes were never produced")
                weight_map[tensor.name] = file_name
                entries[tensor.name] = {"file": file_name, "shape": list(tensor.shape), "dtype": tensor.dtype,
                                        "crc32": f"{sink.crc:08x}"}
            f.flush()
            os.fsync(f.fileno())  # on disk before the directory is renamed into place
    total = sum(t.nbytes for t in tensors)
    (directory / layout.index).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    if layout.name_map:
        (directory / layout.name_map).write_text(json.dumps(weight_map, indent=2) + "\n")
    manifest = {**(manifest_extra or {}), "total_size": total, "tensors": entries}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
