"""The one checkpoint writer (every `msllm-ckpt` command, and the trainer's export from per-rank slices): tensors
streamed piece by piece into shards of Hugging Face safetensors, MindSpore safetensors or MindSpore .ckpt, with an
index and a manifest (shape, dtype, CRC32 of each tensor's bytes).

Shards are planned up front from the tensors' shapes and dtypes, down to the byte where each tensor goes, so a few
tensors are written at once (one thread each, in any shard) while each tensor's bytes are written as produced.

A tensor's bytes come as arrays (cast, fused or dequantized values, produced in slabs) or, for a tensor written
exactly as a source file stores it, as that file's byte ranges (`FileBytes`). Those are read a 1 MB chunk at a
time into one buffer per thread (``preadv``), checksummed while the chunk is in the CPU's cache and written from
it: nothing is decoded. Memory stays at one slab or one chunk per thread, whatever the shard size.

Nothing here forces the data to disk: the caller's ``fileio.atomic_directory`` does (or not, with ``fsync=False``)
before the directory is renamed into place.
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from mindspore_llm.checkpoint import HF_INDEX, MINDSPORE_DTYPES, SAFETENSORS_DTYPES
from mindspore_llm.common import CheckpointError

# MindSpore's save_checkpoint splits a tensor's bytes into Values of at most SLICE_SIZE KB (512 MB);
# mindspore.load_checkpoint joins consecutive Values of one tag. Done the same way here.
CKPT_SLICE_BYTES = 512 * 1024 * 1024
# Bytes of a source file read at once by a tensor copied as stored: small enough to stay in the CPU's cache between
# the read, the checksum and the write. Measured on a 2.8 GB copy: 1.11-1.27 s with 1 MB chunks, against 1.65-1.72 s
# for checksumming through 16 MB memory maps and copying with sendfile; one run with 4 MB chunks took 4.1 s
# (docs/checkpoints.md, "Benchmark").
COPY_CHUNK = 1 << 20
MANIFEST = "manifest.json"

try:  # ISA-L's CRC-32 is zlib's (same polynomial, same values), several times faster: docs/checkpoints.md
    from isal.isal_zlib import crc32
except ImportError:  # isal is in install_requires; a build without it still writes the same manifests
    from zlib import crc32


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors tag

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[self.dtype]).itemsize


@dataclass(frozen=True)
class FileBytes:
    """Bytes `offset` .. `offset + nbytes` of file `path`: a piece of a tensor written exactly as stored there."""
    path: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Layout:
    """Where and how a checkpoint is written: file name stem, extension, index name, safetensors metadata."""
    stem: str
    extension: str  # "safetensors" or "ckpt"
    index: str
    metadata: dict
    # a flat tensor name -> file map written beside the index, as mindformers' tools expect (param_name_map.json)
    name_map: str | None = None


# A Hugging Face model directory's weights (transformers' file names; safetensors metadata {"format": "pt"}).
HF_SAFETENSORS = Layout("model", "safetensors", HF_INDEX, {"format": "pt"})


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


def _write(fd: int, data) -> None:
    view = memoryview(data)
    while view:  # write(2) may write less than asked (at most ~2 GB at once)
        view = view[os.write(fd, view):]


class _Cancelled(Exception):
    """Another tensor failed: this one stops at its next piece or window."""


_thread_state = threading.local()


def _copy_buffer() -> memoryview:
    """The calling thread's copy buffer of COPY_CHUNK bytes, made at its first use."""
    buffer = getattr(_thread_state, "copy_buffer", None)
    if buffer is None or len(buffer) != COPY_CHUNK:
        buffer = _thread_state.copy_buffer = memoryview(bytearray(COPY_CHUNK))
    return buffer


class _TensorSink:
    """Writes one tensor's pieces to file descriptor `fd`, adding .ckpt slice headers at slice boundaries, and
    checksums its bytes."""

    def __init__(self, fd: int, tensor: OutTensor, ckpt: bool, cancelled: threading.Event):
        self.fd, self.tensor, self.ckpt, self.cancelled = fd, tensor, ckpt, cancelled
        self.left = tensor.nbytes
        self.slice_left = 0
        self.crc = 0
        if ckpt and self.left == 0:
            _write(fd, _ckpt_value_header(tensor, 0))

    def write(self, piece: np.ndarray | FileBytes) -> None:
        if self.cancelled.is_set():
            raise _Cancelled
        if piece.nbytes > self.left:
            raise ValueError(f"tensor {self.tensor.name}: more bytes produced than its shape holds")
        if isinstance(piece, FileBytes):
            with open(piece.path, "rb") as source:
                for start, n in self._spans(piece.nbytes):
                    self._copy(source.fileno(), piece.offset + start, n)
            return
        data = memoryview(np.ascontiguousarray(piece)).cast("B")
        self.crc = crc32(data, self.crc)
        for start, n in self._spans(len(data)):
            _write(self.fd, data[start:start + n])

    def _spans(self, nbytes: int) -> Iterator[tuple[int, int]]:
        """(start, length) of the next `nbytes` bytes split at .ckpt slice boundaries, each slice's header written
        before its first span."""
        start = 0
        while start < nbytes:
            if self.ckpt and self.slice_left == 0:
                self.slice_left = min(CKPT_SLICE_BYTES, self.left)
                _write(self.fd, _ckpt_value_header(self.tensor, self.slice_left))
            n = min(nbytes - start, self.slice_left) if self.ckpt else nbytes - start
            yield start, n
            start += n
            self.left -= n
            self.slice_left -= n if self.ckpt else 0

    def _copy(self, source: int, offset: int, nbytes: int) -> None:
        """Bytes `offset`.. of file `source` appended to the output, a chunk at a time through this sink's buffer,
        checksummed on the way."""
        buffer = _copy_buffer()
        end = offset + nbytes
        while offset < end:
            if self.cancelled.is_set():
                raise _Cancelled
            read = os.preadv(source, [buffer[:min(len(buffer), end - offset)]], offset)
            if not read:
                raise CheckpointError(f"tensor {self.tensor.name}: its source file ended at byte {offset} "
                                      f"(truncated while being read?)")
            chunk = buffer[:read]
            self.crc = crc32(chunk, self.crc)
            _write(self.fd, chunk)
            offset += read


def _stored_size(tensor: OutTensor, ckpt: bool) -> int:
    """Bytes `tensor` takes in its shard: its data, in a .ckpt with the framing of each slice."""
    if not ckpt:
        return tensor.nbytes
    full, rest = divmod(tensor.nbytes, CKPT_SLICE_BYTES)
    framing = full * len(_ckpt_value_header(tensor, CKPT_SLICE_BYTES))
    if rest or not full:  # an empty tensor is one empty Value
        framing += len(_ckpt_value_header(tensor, rest))
    return tensor.nbytes + framing


def _write_tensor(path: Path, offset: int, tensor: OutTensor, ckpt: bool,
                  chunks: Callable[[OutTensor], Iterable[np.ndarray | FileBytes]], advance: Callable[[int], None],
                  cancelled: threading.Event) -> int:
    """`tensor` written from byte `offset` of shard `path`; returns the CRC32 of its bytes."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        sink = _TensorSink(fd, tensor, ckpt, cancelled)
        for piece in chunks(tensor):
            sink.write(piece)
            advance(piece.nbytes)
    finally:
        os.close(fd)
    if sink.left:
        raise ValueError(f"tensor {tensor.name}: {sink.left} bytes were never produced")
    return sink.crc


def write_checkpoint(directory: Path, tensors: list[OutTensor], layout: Layout, max_shard_bytes: int,
                     chunks: Callable[[OutTensor], Iterable[np.ndarray | FileBytes]], progress=None,
                     manifest_extra: dict | None = None, workers: int = 1) -> dict:
    """Write `tensors` (the bytes of each produced in order by `chunks(tensor)`: arrays or `FileBytes`) into
    `directory`, `workers` tensors at a time, each at its planned place in its shard; returns the manifest.

    `directory` is expected to be a temporary directory (``fileio.atomic_directory``) renamed when complete.
    """
    ckpt = layout.extension == "ckpt"
    shards = plan_shards(tensors, max_shard_bytes)
    files = [f"{layout.stem}-{number:05d}-of-{len(shards):05d}.{layout.extension}"
             for number in range(1, len(shards) + 1)]
    places = []  # (file, offset, tensor) for every tensor, in file order
    for file, shard in zip(files, shards):
        header = b"" if ckpt else _safetensors_header(shard, layout.metadata)
        (directory / file).write_bytes(header)
        offset = len(header)
        for tensor in shard:
            places.append((file, offset, tensor))
            offset += _stored_size(tensor, ckpt)
    lock, cancelled = threading.Lock(), threading.Event()

    def advance(nbytes: int) -> None:
        if progress is not None:
            with lock:
                progress.update(nbytes)

    with ThreadPoolExecutor(max(1, min(workers, len(places)))) as pool:
        futures = [pool.submit(_write_tensor, directory / file, offset, tensor, ckpt, chunks, advance, cancelled)
                   for file, offset, tensor in places]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:  # after a failure (or Ctrl-C) the tensors not started are dropped, the others stop soon
            cancelled.set()
            for future in futures:
                future.cancel()
    for future in futures:
        if not future.cancelled() and not isinstance(future.exception(), (_Cancelled, type(None))):
            raise future.exception()
    weight_map = {tensor.name: file for file, _, tensor in places}
    entries = {tensor.name: {"file": file, "shape": list(tensor.shape), "dtype": tensor.dtype,
                             "crc32": f"{future.result():08x}"} for (file, _, tensor), future in zip(places, futures)}
    total = sum(t.nbytes for t in tensors)
    (directory / layout.index).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    if layout.name_map:
        (directory / layout.name_map).write_text(json.dumps(weight_map, indent=2) + "\n")
    manifest = {**(manifest_extra or {}), "total_size": total, "tensors": entries}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
