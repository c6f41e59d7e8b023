"""One conversion pipeline for every direction: read a checkpoint tensor by tensor in any format and naming,
check it against config.json, rename, cast (dequantizing FP8 block-scaled weights), and stream it to the writer.
A tensor stored as the output stores it (same dtype, not fused or split) is handed over as its byte ranges, which
the writer copies unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from mindspore_llm.checkpoint import (FP8_BLOCK, MS_INDEX, SCALE_SUFFIX, TensorFile, cast,
                                      dequantize_fp8, open_tensor_file, weight_files)
from mindspore_llm.checkpoint_writer import HF_SAFETENSORS, FileBytes, Layout, OutTensor, write_checkpoint
from mindspore_llm.common import CheckpointError
from mindspore_llm.fileio import atomic_directory, remove_in_background
from mindspore_llm.models.naming import (CheckpointView, HFTensors, LayoutOptions, StoredRows, StoredTensor,
                                         TensorLayout, tensor_layout)
from mindspore_llm.tokenizer import tokenizer_files

DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
PARAM_NAME_MAP = "param_name_map.json"  # mindformers' reverse converters find MindSpore safetensors shards by it

LAYOUTS = {
    ("ckpt", "ms"): Layout("mindspore_model", "ckpt", MS_INDEX, {}),
    # MindSpore's safetensors flavour: its save_checkpoint(format="safetensors") marks files {"format": "ms"}.
    ("safetensors", "ms"): Layout("mindspore_model", "safetensors", MS_INDEX, {"format": "ms"}, PARAM_NAME_MAP),
    ("safetensors", "hf"): HF_SAFETENSORS,
}


class DequantizedRows:
    """Rows of an FP8 weight as float32, times their 128 x 128 block scales (`name` + ``_scale_inv``)."""
    dtype = "F32"

    def __init__(self, file: TensorFile, name: str, scale_file: TensorFile, scale_name: str):
        self.file, self.name = file, name
        rows, columns = file.shape(name)
        self.scale = scale_file.float32(scale_name)
        expected = (-(-rows // FP8_BLOCK), -(-columns // FP8_BLOCK))
        if self.scale.shape != expected:
            raise CheckpointError(f"{scale_file.path}: tensor {scale_name} has shape {self.scale.shape}, the "
                                  f"{rows}x{columns} weight {name} needs {expected} ({FP8_BLOCK}x{FP8_BLOCK} blocks)")

    def rows(self, start: int, stop: int) -> np.ndarray:
        columns = self.file.shape(self.name)[1]
        return dequantize_fp8(self.file.rows(self.name, start, stop).reshape(-1, columns),
                              self.scale[start // FP8_BLOCK:], start)


def row_reader(files: dict[str, TensorFile]):
    """The CheckpointView reader: FP8 weights are dequantized with their block scales from `files`."""
    def reader(file: TensorFile, name: str):
        if file.dtype(name) != "F8_E4M3":
            return StoredRows(file, name)
        scale_name = name + SCALE_SUFFIX
        if scale_name not in files:
            raise CheckpointError(f"{file.path}: FP8 tensor {name} has no {scale_name} block scales")
        return DequantizedRows(file, name, files[scale_name], scale_name)
    return reader


@dataclass
class Source:
    """One tensor to write: its name, shape and dtype, and the Hugging Face tensors of `view` it is made of."""
    out: OutTensor
    stored: StoredTensor
    view: HFTensors

    @property
    def name(self) -> str:
        return self.out.name

    @property
    def dequantized(self) -> bool:
        return any(self.view.dtype(part) == "F32" and self.view.files[self.view.layout.where[part][0]].dtype(
            self.view.layout.where[part][0]) == "F8_E4M3" for part in self.stored.parts)


def source_chunks(source: Source) -> Iterator[np.ndarray]:
    for array, tag in source.stored.slabs(source.view.rows):
        yield cast(array.reshape(-1), tag, source.out.dtype)


def read_float32(source: Source) -> np.ndarray:
    """The whole tensor of `source` as float32 (FP8 dequantized), read chunk by chunk into one array."""
    values = np.empty(source.out.shape, np.float32).reshape(-1)
    start = 0
    as_float32 = dataclasses.replace(source, out=dataclasses.replace(source.out, dtype="F32"))
    for chunk in source_chunks(as_float32):  # each chunk is only valid until the next: copy it out
        values[start:start + chunk.size] = chunk
        start += chunk.size
    return values.reshape(source.out.shape)


def stored_bytes(source: Source) -> list[FileBytes] | None:
    """Where `source`'s output bytes already lie, when a source file stores the tensor exactly so: one stored
    tensor, neither fused nor split on either side, read as stored (not dequantized) in the output dtype."""
    stored, view = source.stored, source.view
    if len(stored.parts) != 1 or stored.experts:
        return None
    stored_name = view.layout.where[stored.parts[0]][0]
    reader = view.readers[stored_name]
    if len(view.layout.tensors[stored_name].parts) != 1 or view.layout.tensors[stored_name].experts \
            or type(reader) is not StoredRows or reader.dtype != source.out.dtype:
        return None
    stored_tensors = getattr(reader.file, "tensors", None)  # per-rank slices joined in memory lie in no one file
    if stored_tensors is None:
        return None
    segments = stored_tensors[reader.name]["segments"]
    if not segments:  # a pickle: its tensors are torch's to read
        return None
    return [FileBytes(reader.file.path, offset, n) for offset, n in segments if n]


def tensor_data(source: Source) -> Iterable[np.ndarray | FileBytes]:
    """What the writer takes for `source`: the byte ranges holding it when they are copied as they are, otherwise
    its slabs as arrays."""
    copied = stored_bytes(source)
    return source_chunks(source) if copied is None else copied


def read_config(path: Path) -> dict:
    from mindspore_llm.models.config import read_hf_config
    from mindspore_llm.quant import read_hf_quantization

    hf, file = read_hf_config(path, hint="; pass --config with the model's config.json")
    if read_hf_quantization(hf, str(file)) is not None:
        raise CheckpointError(f"{file}: the model is saved quantized (bitsandbytes quantization_config); these tools "
                              f"read float checkpoints: use the original-precision model (a LoRA adapter trained on "
                              f"a quantized base merges into it), or load this one with from_pretrained")
    return hf


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


def view_of(files: dict[str, TensorFile], config, options: LayoutOptions, source: str,
            strict: bool = True) -> CheckpointView:
    """`files` (any naming; FP8 block scales consumed with their weights) as the Hugging Face tensors of `config`."""
    weights = {name: file for name, file in files.items() if not name.endswith(SCALE_SUFFIX)}
    return CheckpointView(weights, config, options, source, row_reader(files), strict)


def out_dtype(stored: StoredTensor, view: HFTensors, dtype: str | None) -> str:
    """The requested dtype, or the source's (FP8 -> bf16, float64 -> float32); float32 for the rows kept so."""
    if stored.fp32:
        return "F32"
    if dtype:
        return dtype
    first = view.layout.where[stored.parts[0]][0]
    stored_dtype = view.files[first].dtype(first)
    return {"F8_E4M3": "BF16", "F64": "F32"}.get(stored_dtype, stored_dtype)


def plan(view: CheckpointView, target: TensorLayout, dtype: str | None) -> list[Source]:
    """Every output tensor of `target`, in the source's order."""
    position = {name: i for i, name in enumerate(view.names())}
    tensors = sorted(target.tensors.values(), key=lambda t: min(position[p] for p in t.parts))
    return [Source(OutTensor(t.name, t.shape, out_dtype(t, view, dtype)), t, view) for t in tensors]


def write_side_files(hf_config: dict, directories: list[Path], out: Path, dequantized: bool) -> None:
    """config.json, plus generation_config.json and the tokenizer (its files and chat template together) of the
    first of `directories` that has them, so the output is usable as it is."""
    config = dict(hf_config)
    if dequantized:
        # The weights are no longer FP8: a kept quantization_config would make loaders expect FP8.
        config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = [d / "generation_config.json" for d in directories if (d / "generation_config.json").is_file()]
    tokenizers = [files for files in map(tokenizer_files, directories) if files]
    for file in generation[:1] + (tokenizers[0] if tokenizers else []):
        shutil.copyfile(file, out / file.name)


def convert(src: Path, dst: Path, *, target_naming: str, layout: Layout, dtype: str | None, max_shard_bytes: int,
            config_path: Path | None = None, overwrite: bool = False, allow_pickle: bool = False,
            quiet: bool = False, description: str = "convert", options: LayoutOptions = LayoutOptions(),
            workers: int = 2, fsync: bool = False, files: dict | None = None) -> dict:
    """Convert checkpoint `src` (any naming, detected) into directory `dst` in `target_naming` with `options`
    (the mcore switches also tell how `src` is laid out when it is mcore), `workers` tensors at a time; `fsync`:
    every file on disk before `dst` appears (otherwise left to the kernel's write-back, as after ``cp``); returns
    the manifest written. `files`: src's tensors already opened (name -> what reads them, e.g. per-rank slices
    joined)."""
    from tqdm import tqdm

    from mindspore_llm.models.config import config_from_hf

    config_path = config_path or (src if src.is_dir() else src.parent)
    hf_config = read_config(config_path)
    config_file = str(config_path / "config.json" if config_path.is_dir() else config_path)
    config = config_from_hf(hf_config, config_file)
    target = tensor_layout(config, target_naming, options, config_file)
    view = view_of(files or open_files(src, allow_pickle), config, options, config_file)
    view.notice()
    sources = plan(view, target, DTYPES.get(dtype))
    by_name = {s.out.name: s for s in sources}
    total = sum(s.out.nbytes for s in sources)
    with atomic_directory(dst, overwrite=overwrite, fsync=fsync, remove=remove_in_background) as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, disable=quiet) as bar:
        manifest = write_checkpoint(
            tmp, [s.out for s in sources], layout, max_shard_bytes, lambda t: tensor_data(by_name[t.name]), bar,
            {"format": layout.extension, "naming": target.describe(), "source_naming": view.layout.describe(),
             "architecture": hf_config["architectures"][0], "source": str(src)}, workers)
        side = [config_path if config_path.is_dir() else config_path.parent, src if src.is_dir() else src.parent]
        write_side_files(hf_config, side, tmp, any(s.dequantized for s in sources))
    return manifest
