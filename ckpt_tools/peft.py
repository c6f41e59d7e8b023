"""LoRA adapters as checkpoint tools: a PEFT adapter from a checkpoint's LoRA tensors, and an adapter merged into its
base as a Hugging Face model directory (streamed, tensor by tensor). The PEFT format itself is
``mindspore_llm.peft``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ckpt_tools.convert import (DTYPES, LAYOUTS, open_files, plan, read_config, read_float32, tensor_data, view_of,
                                write_side_files)
from mindspore_llm.checkpoint import cast, iter_tensors
from mindspore_llm.checkpoint_writer import write_checkpoint
from mindspore_llm.common import CheckpointError
from mindspore_llm.fileio import atomic_directory, remove_in_background
from mindspore_llm.lora import ADAPTER_SUFFIXES, LoraConfig
from mindspore_llm.models.config import config_from_hf
from mindspore_llm.models.naming import OURS, LayoutOptions, tensor_layout
from mindspore_llm.peft import adapter_module, read_adapter, write_adapter


def export_peft_from_checkpoint(src: str | Path, dst: str | Path, alpha: float, dropout: float = 0.0,
                                base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """The ``model.*.lora_A.weight`` / ``lora_B.weight`` tensors of a checkpoint (a training checkpoint's
    train_state.ckpt, a saved model directory, ...) -> PEFT adapter directory; the rank is read from the tensors.
    Optimizer moments are skipped (their names carry a prefix)."""
    tensors, modules = {}, set()
    for name, reader in iter_tensors(src):
        if name.startswith("model.") and name.endswith(ADAPTER_SUFFIXES):
            tensors[name] = reader.float32(name)
        elif name.startswith("model.") and name.endswith(".weight"):
            modules.add(name[:-len(".weight")])
    ranks = {value.shape[0] for name, value in tensors.items() if name.endswith(".lora_A.weight")}
    if len(ranks) != 1:
        raise CheckpointError(f"{src}: expected LoRA adapters of one rank (model.*.lora_A.weight), found ranks "
                              f"{sorted(ranks) or 'none'}")
    cfg = LoraConfig(rank=ranks.pop(), alpha=alpha, dropout=dropout)
    cfg.validate()
    return write_adapter(dst, cfg, tensors, modules | {adapter_module(n) for n in tensors}, base_model_name_or_path,
                         overwrite)


def merge_adapter(base: str | Path, adapter: str | Path, dst: str | Path, *, dtype: str | None = None,
                  max_shard_bytes: int = 4 << 30, overwrite: bool = False, quiet: bool = False, workers: int = 2,
                  fsync: bool = False) -> dict:
    """Base checkpoint (Hugging Face or `msllm-ckpt hf2ms` output, any naming) + PEFT adapter -> Hugging Face
    model directory whose adapted weights are W + (B @ A) * alpha / r, computed in float32 and stored in the
    base's dtype (or `dtype`); `workers` and `fsync` as for ``convert``. Returns the manifest written."""
    from tqdm import tqdm

    base, adapter = Path(base), Path(adapter)
    cfg, tensors = read_adapter(adapter)
    hf_config = read_config(base)
    config = config_from_hf(hf_config, str(base / "config.json"))
    view = view_of(open_files(base, allow_pickle=False), config, LayoutOptions(), str(base / "config.json"))
    sources = plan(view, tensor_layout(config, OURS), DTYPES.get(dtype))
    by_name = {s.out.name: s for s in sources}
    adapted = sorted({adapter_module(name) for name in tensors})
    for path in adapted:
        weight = by_name.get(f"{path}.weight")
        expected = (tensors[f"{path}.lora_B.weight"].shape[0], tensors[f"{path}.lora_A.weight"].shape[1])
        if weight is None:
            raise CheckpointError(f"{adapter}: adapts {path}, which has no weight in {base}")
        if weight.out.shape != expected:
            raise CheckpointError(f"{adapter}: {path}'s adapter implies a weight of shape {list(expected)}, {base} "
                                  f"has {list(weight.out.shape)}")

    def chunks(tensor):
        source = by_name[tensor.name]
        if not tensor.name.endswith(".weight") or tensor.name[:-len(".weight")] not in adapted:
            yield from tensor_data(source)
            return
        path = tensor.name[:-len(".weight")]
        merged = read_float32(source)
        merged += (tensors[f"{path}.lora_B.weight"] @ tensors[f"{path}.lora_A.weight"]) * np.float32(cfg.scaling)
        yield cast(merged, "F32", tensor.dtype)

    total = sum(s.out.nbytes for s in sources)
    with atomic_directory(dst, overwrite=overwrite, fsync=fsync, remove=remove_in_background) as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge-lora", disable=quiet) as bar:
        manifest = write_checkpoint(tmp, [s.out for s in sources], LAYOUTS[("safetensors", "hf")], max_shard_bytes,
                                    chunks, bar, {"format": "safetensors", "naming": OURS, "source": str(base),
                                                  "adapter": str(adapter), "merged_modules": len(adapted)},
                                    workers)
        write_side_files(hf_config, [base], tmp, any(s.dequantized for s in sources))
    return manifest
