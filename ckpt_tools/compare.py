"""``verify`` and ``inspect``: read any checkpoint the converter reads, tensor by tensor."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_tools.convert import open_files, read_config
from ckpt_tools.naming import name_map
from mindspore_llm.checkpoint import SAFETENSORS_DTYPES, TensorFile, to_float32

COMPARE_ELEMENTS = 16 << 20


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


def max_abs_difference(a: tuple[str, TensorFile], b: tuple[str, TensorFile]) -> float:
    (name_a, file_a), (name_b, file_b) = a, b
    flat_a, flat_b = file_a.raw(name_a).reshape(-1), file_b.raw(name_b).reshape(-1)
    worst = 0.0
    for start in range(0, len(flat_a), COMPARE_ELEMENTS):
        x = to_float32(np.asarray(flat_a[start:start + COMPARE_ELEMENTS]), file_a.dtype(name_a))
        y = to_float32(np.asarray(flat_b[start:start + COMPARE_ELEMENTS]), file_b.dtype(name_b))
        nan_x, nan_y = np.isnan(x), np.isnan(y)
        if (nan_x != nan_y).any():
            return float("inf")
        difference = np.abs(np.where(nan_x, 0, x - y))
        if difference.size:
            worst = max(worst, float(difference.max()))
    return worst


@dataclass
class Report:
    lines: list[str]
    mismatches: int


def verify(a: Path, b: Path, atol: float, ignore_dtype: bool, config: Path | None = None) -> Report:
    left, right = hf_named(a, config), hf_named(b, config)
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
        if file_a.dtype(name_a) != file_b.dtype(name_b) and not ignore_dtype:
            lines.append(f"{name}: dtype {file_a.dtype(name_a)} vs {file_b.dtype(name_b)}")
            mismatches += 1
        difference = max_abs_difference(left[name], right[name])
        worst = max(worst, difference)
        if difference > atol:
            lines.append(f"{name}: max |Δ| = {difference:.6g} > atol {atol:g}")
            mismatches += 1
    lines.append(f"{len(set(left) & set(right))} common tensor(s), max |Δ| = {worst:.6g}, {mismatches} mismatch(es)")
    return Report(lines, mismatches)


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
