"""One conversion pipeline for every direction: read a checkpoint tensor by tensor in any format and naming,
check it against config.json, rename, cast (dequantizing FP8 block-scaled weights), and stream it to the writer.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ckpt_tools.naming import NameMap, name_map
from mindspore_llm.checkpoint import (FP8_BLOCK, MS_INDEX, NON_PARAMETER_SUFFIXES, SAFETENSORS_DTYPES,
                                      SCALE_SUFFIX, TRAINING_STATE_PREFIXES, TensorFile, cast, dequantize_fp8,
                                      open_tensor_file, weight_files)
from mindspore_llm.checkpoint_writer import HF_SAFETENSORS, Layout, OutTensor, write_checkpoint
from mindspore_llm.common import CheckpointError
from mindspore_llm.fileio import atomic_directory

log = logging.getLogger("mindspore_llm")
CHUNK_BYTES = 64 << 20  # per read/convert/write step; bounds memory independently of tensor and model size
DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
FLOAT_TAGS = ("F64", "F32", "F16", "BF16", "F8_E4M3")
# Files a model directory carries besides its weights, copied along so the output is usable as it is.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
              "merges.txt", "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
              "chat_template.json")

LAYOUTS = {
    ("ckpt", "ms"): Layout("mindspore_model", "ckpt", MS_INDEX, {}),
    # MindSpore's safetensors flavour: its save_checkpoint(format="safetensors") marks files {"format": "ms"}.
    ("safetensors", "ms"): Layout("mindspore_model", "safetensors", MS_INDEX, {"format": "ms"}),
    ("safetensors", "hf"): HF_SAFETENSORS,
}


@dataclass
class Source:
    """One tensor to write: where it is read and how it is turned into the output."""
    out: OutTensor
    file: TensorFile
    name: str
    scale: tuple[TensorFile, str] | None = None  # FP8 block scales


def source_chunks(source: Source) -> Iterator[np.ndarray]:
    file, name, target = source.file, source.name, source.out.dtype
    dtype = file.dtype(name)
    if source.scale is None:
        itemsize = np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        # Read as many elements as make CHUNK_BYTES of output, whichever of the two is wider.
        out_itemsize = np.dtype(SAFETENSORS_DTYPES[target]).itemsize
        for raw in file.chunks(name, CHUNK_BYTES * itemsize // max(itemsize, out_itemsize)):
            yield cast(raw, dtype, target)
        return
    scale_file, scale_name = source.scale
    scale = scale_file.float32(scale_name)
    rows, columns = file.shape(name)
    expected = (-(-rows // FP8_BLOCK), -(-columns // FP8_BLOCK))
    if scale.shape != expected:
        raise CheckpointError(f"{scale_file.path}: tensor {scale_name} has shape {scale.shape}, the {rows}x{columns} "
                              f"weight {name} needs {expected} ({FP8_BLOCK}x{FP8_BLOCK} blocks)")
    # Whole 128-row blocks per chunk, sized so the float32 values stay near CHUNK_BYTES.
    block_rows = max(CHUNK_BYTES // (4 * columns) // FP8_BLOCK, 1) * FP8_BLOCK
    first_row = 0
    for raw in file.chunks(name, block_rows * columns):
        values = dequantize_fp8(raw.reshape(-1, columns), scale[first_row // FP8_BLOCK:], first_row)
        first_row += len(values)
        yield values if target == "F32" else cast(values, "F32", target)


def read_config(path: Path) -> dict:
    from mindspore_llm.models.auto import read_hf_config

    return read_hf_config(path, hint="; pass --config with the model's config.json")[0]


def open_files(src: Path, allow_pickle: bool) -> dict[str, TensorFile]:
    """tensor name -> opened file, each file opened once."""
    pickle = src if src.suffix == ".bin" else src / "pytorch_model.bin"
    if pickle.is_file() and not any(src.glob("*.safetensors")) and not any(src.glob("*.ckpt")):
        if not allow_pickle:
            raise CheckpointError(f"{pickle}: a pickle can run code when loaded; pass --allow-pickle if you trust "
                                  f"its origin (it is then read with torch.load(weights_only=True))")
        from ckpt_tools.pickle_source import TorchPickleFile
        file = TorchPickleFile(pickle)
        return {name: file for name in file.names()}
    opened: dict[Path, TensorFile] = {}
    files = {}
    for name, path in weight_files(src).items():
        if path not in opened:
            opened[path] = open_tensor_file(path)
        if name not in opened[path].tensors:
            raise CheckpointError(f"{path}: tensor {name} is listed in the index but not in the file")
        files[name] = opened[path]
    return files


def plan(files: dict[str, TensorFile], names: NameMap, target_naming: str, dtype: str | None) -> list[Source]:
    """Every output tensor, in source order, after checking the source against the config (names, shapes,
    dtypes, completeness); errors name the file and tensor."""
    source_naming = names.detect([n for n in files
                                  if not n.endswith(SCALE_SUFFIX) and not n.startswith(TRAINING_STATE_PREFIXES)])
    expected = names.expected()
    sources, seen, skipped, training_state = [], set(), [], 0
    for name, file in files.items():
        if name.endswith(SCALE_SUFFIX) or name.endswith(NON_PARAMETER_SUFFIXES):
            continue  # block scales are consumed with their weight
        if name.startswith(TRAINING_STATE_PREFIXES):
            training_state += 1  # a training checkpoint: its optimizer state does not leave with the weights
            continue
        if names.skipped(name):
            skipped.append(name)
            continue
        renamed = names.rename(name, source_naming, "hf")
        if renamed is None or renamed[0] not in expected and renamed[1]:
            raise CheckpointError(f"{file.path}: tensor {name} is unknown: not a parameter of the model "
                                  f"{names.source} describes (read with {source_naming} names)")
        hf_name, exists = renamed
        if not exists:
            if names.is_tied(name, source_naming):
                continue  # a tied head some checkpoints still store: the embedding is the head
            raise CheckpointError(f"{file.path}: tensor {name} is not expected by {names.source}")
        if file.shape(name) != expected[hf_name]:
            raise CheckpointError(f"{file.path}: tensor {name} has shape {list(file.shape(name))}, {names.source} "
                                  f"implies {list(expected[hf_name])}")
        stored = file.dtype(name)
        if stored not in FLOAT_TAGS:
            raise CheckpointError(f"{file.path}: tensor {name} has unsupported dtype {stored} for a weight")
        scale = None
        if stored == "F8_E4M3":
            scale_name = name + SCALE_SUFFIX
            if scale_name not in files:
                raise CheckpointError(f"{file.path}: FP8 tensor {name} has no {scale_name} block scales")
            scale = (files[scale_name], scale_name)
        out_dtype = dtype or ("BF16" if stored == "F8_E4M3" else "F32" if stored == "F64" else stored)
        seen.add(hf_name)
        sources.append(Source(OutTensor(names.rename(name, source_naming, target_naming)[0], file.shape(name),
                                        out_dtype), file, name, scale))
    if training_state:
        log.warning("leaving out %d optimizer/loss-scale entries of the training checkpoint", training_state)
    if skipped:
        log.warning("skipping %d tensor(s) of layers >= %d (%s...): %s", len(skipped), names.ranges["layer"],
                    skipped[0], names.family.skip_extra_layers)
    missing = sorted(set(expected) - seen)
    if missing:
        where = sorted({str(f.path) for f in files.values()})
        raise CheckpointError(f"{', '.join(where[:3])}: missing {len(missing)} tensor(s) that {names.source} calls "
                              f"for: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    return sources


def write_side_files(hf_config: dict, directories: list[Path], out: Path, dequantized: bool) -> None:
    """config.json, plus the tokenizer and generation files found first in `directories`."""
    config = dict(hf_config)
    if dequantized:
        # The weights are no longer FP8: a kept quantization_config would make loaders expect FP8.
        config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for file_name in SIDE_FILES:
        for directory in directories:
            if (directory / file_name).is_file():
                shutil.copyfile(directory / file_name, out / file_name)
                break


def convert(src: Path, dst: Path, *, target_naming: str, layout: Layout, dtype: str | None, max_shard_bytes: int,
            config_path: Path | None = None, overwrite: bool = False, allow_pickle: bool = False,
            quiet: bool = False, description: str = "convert") -> dict:
    """Convert checkpoint `src` into directory `dst`; returns the manifest written."""
    from tqdm import tqdm

    config_path = config_path or (src if src.is_dir() else src.parent)
    hf_config = read_config(config_path)
    config_file = str(config_path / "config.json" if config_path.is_dir() else config_path)
    names = name_map(hf_config, config_file)
    files = open_files(src, allow_pickle)
    sources = plan(files, names, target_naming, DTYPES.get(dtype))
    by_name = {s.out.name: s for s in sources}
    total = sum(s.out.nbytes for s in sources)
    with atomic_directory(dst, overwrite=overwrite) as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, disable=quiet) as bar:
        manifest = write_checkpoint(
            tmp, [s.out for s in sources], layout, max_shard_bytes, lambda t: source_chunks(by_name[t.name]), bar,
            {"format": layout.extension, "naming": target_naming, "architecture": hf_config["architectures"][0],
             "source": str(src)})
        side = [config_path if config_path.is_dir() else config_path.parent, src if src.is_dir() else src.parent]
        write_side_files(hf_config, side, tmp, any(s.scale for s in sources))
    return manifest
