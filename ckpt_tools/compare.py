"""``verify`` and ``inspect``: read any checkpoint the converter reads, tensor by tensor."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ckpt_tools.convert import SCALE_SUFFIX, Source, open_files, read_config, source_chunks, to_float32
from ckpt_tools.naming import name_map
from ckpt_tools.writer import OutTensor
from mindspore_llm.checkpoint import SAFETENSORS_DTYPES, TensorFile

COMPARE_BYTES = 64 << 20  # per tensor and side, whatever the tensor's size
FP8 = "F8_E4M3"


def hf_named(path: Path, config: Path | None) -> dict[str, tuple[str, TensorFile]]:
    """HF name -> (stored name, file): names are translated through the family table when a config.json is
    found (next to the checkpoint or given), so checkpoints in different namings compare."""
    files = open_files(path, allow_pickle=False)
    config = config or (path if path.is_dir() else path.parent)
    if not (config.is_file() or (config / "config.json").is_file()):
        return {name: (name, file) for name, file in files.items()}
    names = name_map(read_config(config), str(config))
    naming = names.detect(list(files))
    out = {}
    for name, file in files.items():
        renamed = names.rename(name, naming, "hf")
        out[renamed[0] if renamed else name] = (name, file)
    return out


def float32_chunks(entry: tuple[str, TensorFile], scale: tuple[str, TensorFile] | None = None,
                   as_dtype: str | None = None) -> Iterator[np.ndarray]:
    """A tensor's values as flat float32 pieces; an FP8 weight with its block scales dequantized and stored as
    `as_dtype` exactly as ``hf2ms --dtype`` writes it."""
    name, file = entry
    if scale is None:
        for raw in file.chunks(name, COMPARE_BYTES):
            yield to_float32(raw, file.dtype(name))
        return
    source = Source(OutTensor(name, file.shape(name), as_dtype), file, name, (scale[1], scale[0]))
    for values in source_chunks(source):
        yield to_float32(values, as_dtype).reshape(-1)


def max_abs_difference(a: Iterator[np.ndarray], b: Iterator[np.ndarray]) -> float:
    """Largest |a - b| over two streams of the same values cut into pieces of any sizes (inf if NaNs differ)."""
    worst, x, y = 0.0, np.empty(0, np.float32), np.empty(0, np.float32)
    while True:
        x = x if len(x) else next(a, None)
        y = y if len(y) else next(b, None)
        if x is None or y is None:
            return worst
        n = min(len(x), len(y))
        nan_x, nan_y = np.isnan(x[:n]), np.isnan(y[:n])
        if (nan_x != nan_y).any():
            return float("inf")
        if n:
            worst = max(worst, float(np.abs(np.where(nan_x, 0, x[:n] - y[:n])).max()))
        x, y = x[n:], y[n:]


@dataclass
class Report:
    lines: list[str]
    mismatches: int


def verify(a: Path, b: Path, atol: float, ignore_dtype: bool, config: Path | None = None) -> Report:
    """Tensor by tensor: names, shapes, dtypes, max |Δ|. An FP8 weight (with its weight_scale_inv block scales)
    compared with a weight that is not FP8 is dequantized first, into the other's dtype, as `hf2ms` does; its scales
    are then part of it, not tensors of their own."""
    left, right = hf_named(a, config), hf_named(b, config)
    scales = {}  # HF name -> the block scales (stored name, file) of an FP8 weight compared dequantized
    for one, other in ((left, right), (right, left)):
        for name in [n for n in one if n in other and _is_fp8(one[n]) and not _is_fp8(other[n])]:
            if name + SCALE_SUFFIX in one:
                scales[name] = one.pop(name + SCALE_SUFFIX)
    lines, mismatches = [], 0
    for name in sorted(set(left) - set(right)):
        lines.append(f"only in {a}: {left[name][0]}")
    for name in sorted(set(right) - set(left)):
        lines.append(f"only in {b}: {right[name][0]}")
    mismatches += len(set(left) ^ set(right))
    worst = 0.0
    for name in sorted(set(left) & set(right)):
        (name_a, file_a), (name_b, file_b) = left[name], right[name]
        if file_a.shape(name_a) != file_b.shape(name_b):
            lines.append(f"{name}: shape {list(file_a.shape(name_a))} vs {list(file_b.shape(name_b))}")
            mismatches += 1
            continue
        dtype_a, dtype_b = file_a.dtype(name_a), file_b.dtype(name_b)
        if name in scales:
            chunks = [float32_chunks(left[name], scales[name] if dtype_a == FP8 else None, dtype_b),
                      float32_chunks(right[name], scales[name] if dtype_b == FP8 else None, dtype_a)]
        else:
            chunks = [float32_chunks(left[name]), float32_chunks(right[name])]
            if dtype_a != dtype_b and not ignore_dtype:
                lines.append(f"{name}: dtype {dtype_a} vs {dtype_b}")
                mismatches += 1
        difference = max_abs_difference(*chunks)
        worst = max(worst, difference)
        if difference > atol:
            lines.append(f"{name}: max |Δ| = {difference:.6g} > atol {atol:g}")
            mismatches += 1
    dequantized = f", {len(scales)} FP8 weight(s) dequantized" if scales else ""
    lines.append(f"{len(set(left) & set(right))} common tensor(s){dequantized}, max |Δ| = {worst:.6g}, "
                 f"{mismatches} mismatch(es)")
    return Report(lines, mismatches)


def _is_fp8(entry: tuple[str, TensorFile]) -> bool:
    return entry[1].dtype(entry[0]) == FP8


def inspect(path: Path, allow_pickle: bool = False) -> list[str]:
    files = open_files(path, allow_pickle)
    lines, parameters, total = [], 0, 0
    for name, file in files.items():
        shape = file.shape(name)
        lines.append(f"{name}\t{file.dtype(name)}\t{list(shape)}")
        parameters += int(np.prod(shape, dtype=np.int64))
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[file.dtype(name)]).itemsize
    count = len({id(f) for f in files.values()})
    lines.append(f"{len(files)} tensors, {parameters:,} parameters, {total:,} bytes in {count} file(s)")
    return lines
