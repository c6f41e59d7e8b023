"""``verify`` and ``inspect``: read any checkpoint the converter reads, tensor by tensor."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ckpt_tools.convert import cast, open_files, read_config, to_float32, view_of
from mindspore_llm.models.auto import config_from_hf
from mindspore_llm.models.naming import HFTensors, LayoutOptions
from mindspore_llm.checkpoint import SAFETENSORS_DTYPES, TensorFile

COMPARE_BYTES = 64 << 20  # per tensor and side, whatever the tensor's size
FP8 = "F8_E4M3"


def hf_named(path: Path, config: Path | None, options: LayoutOptions = LayoutOptions()
             ) -> dict[str, tuple[str, TensorFile]]:
    """HF name -> (stored name, reader): with a config.json (next to the checkpoint or given), tensors of any naming
    are read as Hugging Face's (fused ones split), so checkpoints in different namings compare; what the naming
    does not explain is compared by its stored name."""
    files = open_files(path, allow_pickle=False)
    config = config or (path if path.is_dir() else path.parent)
    if not (config.is_file() or (config / "config.json").is_file()):
        return {name: (name, file) for name, file in files.items()}
    view = view_of(files, config_from_hf(read_config(config), str(config)), options, str(config), strict=False)
    out = {name: (name, view) for name in view.names()}
    out.update({name: (name, files[name]) for name in view.unexplained + view.training_state})
    return out


def float32_chunks(entry: tuple[str, TensorFile | HFTensors], as_dtype: str | None = None) -> Iterator[np.ndarray]:
    """A tensor's values as flat float32 pieces of about COMPARE_BYTES (whole rows), first stored as `as_dtype`
    if given (as ``hf2ms --dtype`` writes a dequantized FP8 weight)."""
    name, file = entry
    shape = file.shape(name)
    if not shape:  # a scalar
        yield to_float32(np.asarray(file.raw(name)).reshape(-1), file.dtype(name))
        return
    itemsize = np.dtype(SAFETENSORS_DTYPES[file.dtype(name)]).itemsize
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    step = max(1, COMPARE_BYTES // row_bytes)
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        if isinstance(file, HFTensors):
            raw, tag = file.rows(name, start, stop)
        else:
            raw, tag = file.rows(name, start, stop), file.dtype(name)
        raw = raw.reshape(-1)
        if as_dtype is not None:
            raw, tag = cast(raw, tag, as_dtype), as_dtype
        yield to_float32(raw, tag)


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


def verify(a: Path, b: Path, atol: float, ignore_dtype: bool, config: Path | None = None,
           options: LayoutOptions = LayoutOptions()) -> Report:
    """Tensor by tensor: names, shapes, dtypes, max |Δ|. An FP8 weight (read with its weight_scale_inv block
    scales) compared with a weight that is not FP8 is dequantized into the other's dtype first, as `hf2ms` writes
    it."""
    left, right = hf_named(a, config, options), hf_named(b, config, options)
    dequantized = 0
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
        if _dequantized_fp8(left[name]) != _dequantized_fp8(right[name]):
            dequantized += 1  # the FP8 side is rounded to the other's dtype, as hf2ms writes it
            chunks = [float32_chunks(left[name], dtype_b if _dequantized_fp8(left[name]) else None),
                      float32_chunks(right[name], dtype_a if _dequantized_fp8(right[name]) else None)]
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
    fp8 = f", {dequantized} FP8 weight(s) dequantized" if dequantized else ""
    lines.append(f"{len(set(left) & set(right))} common tensor(s){fp8}, max |Δ| = {worst:.6g}, "
                 f"{mismatches} mismatch(es)")
    return Report(lines, mismatches)


def _dequantized_fp8(entry: tuple[str, TensorFile | HFTensors]) -> bool:
    """A weight stored as FP8 and read dequantized (with its block scales) through a checkpoint view."""
    name, file = entry
    if not isinstance(file, HFTensors):
        return False
    stored = file.layout.where[name][0]
    return file.files[stored].dtype(stored) == FP8


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
