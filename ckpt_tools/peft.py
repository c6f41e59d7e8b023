"""LoRA adapters in Hugging Face PEFT's format, and merged full weights in Hugging Face's.

A PEFT adapter directory holds ``adapter_config.json`` (r, lora_alpha, target_modules, ...) and
``adapter_model.safetensors`` with ``base_model.model.<module path>.lora_A.weight`` (r, in) and ``...lora_B.weight``
(out, r); the module paths are Hugging Face's, which are ours, so names map by the prefix alone. PEFT computes
y = base(x) + lora_B(lora_A(dropout(x))) * lora_alpha / r, which is ``mindspore_llm.lora.LoraLinear``.

  export: an in-memory LoRA model, or a checkpoint holding its ``*.lora_A.weight`` / ``*.lora_B.weight`` -> adapter
  import: adapter -> LoRA layers of an in-memory model (to continue training, or to evaluate)
  merge:  base checkpoint + adapter -> Hugging Face model directory with W + (B @ A) * alpha / r, streamed
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from ckpt_tools.convert import DTYPES, LAYOUTS, cast, open_files, plan, read_config, source_chunks, write_side_files
from ckpt_tools.naming import name_map
from ckpt_tools.writer import write_checkpoint
from mindspore_llm.checkpoint import CheckpointError, SafetensorsFile, iter_tensors
from mindspore_llm.config_utils import ConfigError
from mindspore_llm.fileio import atomic_directory
from mindspore_llm.lora import ADAPTER_SUFFIXES, LoraConfig, adapter_weights, apply_lora, lora_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# adapter_config.json options that change the math beyond plain LoRA: refused rather than silently ignored.
UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False, "lora_bias": False,
               "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
               "target_parameters": None, "exclude_modules": None}


def _module(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.lora_A.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    return name.rsplit(".", 2)[0]


def peft_target_modules(adapted: set[str], modules: set[str]) -> list[str] | str:
    """PEFT's ``target_modules`` selecting exactly the `adapted` module paths among all `modules`: the list of
    their last names when that selects no other module, else a regex of the paths."""
    leaves = {path.rsplit(".", 1)[-1] for path in adapted}
    if {path for path in modules if path.rsplit(".", 1)[-1] in leaves} == adapted:
        return sorted(leaves)
    return "^(?:" + "|".join(re.escape(path) for path in sorted(adapted)) + ")$"


def write_adapter(directory: str | Path, cfg: LoraConfig, tensors: dict[str, np.ndarray], modules: set[str],
                  base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write the adapter `tensors` (our names -> arrays) as a PEFT adapter directory; `modules` are all the
    model's module paths (to express which ones carry an adapter)."""
    from safetensors.numpy import save_file

    adapted = {_module(name) for name in tensors}
    for path in sorted(adapted):
        rank = tensors[f"{path}.lora_A.weight"].shape[0]
        if rank != cfg.rank:
            raise ConfigError(f"lora.rank: {cfg.rank}, but {path}.lora_A.weight has rank {rank}")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": peft_target_modules(adapted, modules), "init_lora_weights": True,
        "inference_mode": True, **UNSUPPORTED,
    }
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        save_file({PEFT_PREFIX + name: np.ascontiguousarray(value, np.float32) for name, value in tensors.items()},
                  str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def export_peft(model, cfg: LoraConfig, directory: str | Path, base_model_name_or_path: str | None = None,
                overwrite: bool = False) -> Path:
    """The adapters of an in-memory LoRA model (``apply_lora``) -> PEFT adapter directory."""
    tensors = adapter_weights(model)
    if not tensors:
        raise ConfigError("the model has no LoRA layers (apply_lora was not called)")
    modules = {name for name, _ in model.cells_and_names()}
    return write_adapter(directory, cfg, tensors, modules,
                         base_model_name_or_path or getattr(model, "name_or_path", None), overwrite)


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
    return write_adapter(dst, cfg, tensors, modules | {_module(n) for n in tensors}, base_model_name_or_path,
                         overwrite)


def read_adapter(directory: str | Path) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """A PEFT LoRA adapter directory -> (its LoraConfig, our parameter name -> float32 array)."""
    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for file in (config_file, weights_file):
        if not file.is_file():
            raise CheckpointError(f"{file}: missing; a PEFT adapter directory holds {ADAPTER_CONFIG} and "
                                  f"{ADAPTER_WEIGHTS}")
    try:
        peft = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_file}: invalid JSON ({err})") from None
    if peft.get("peft_type") != "LORA":
        raise ConfigError(f"{config_file}: peft_type {peft.get('peft_type')!r} is not supported (only 'LORA')")
    for key, plain in UNSUPPORTED.items():
        if peft.get(key) and peft[key] != plain:  # absent, false or empty: plain LoRA
            raise ConfigError(f"{config_file}: {key}={peft[key]!r} is not supported (plain LoRA only: {plain!r})")
    targets = peft.get("target_modules")
    if targets == "all-linear":  # PEFT: every linear layer but the output head, which is no layers.Linear here
        patterns = ["re:.*"]
    elif isinstance(targets, str):
        patterns = ["re:" + targets]
    elif isinstance(targets, list):  # PEFT: the module path equals an entry or ends with "." + entry
        patterns = [t if "." not in t else "re:(?:.*\\.)?" + re.escape(t) for t in targets]
    else:
        raise ConfigError(f"{config_file}: target_modules {targets!r} is not a list or a regex string")
    try:
        cfg = LoraConfig(rank=peft["r"], alpha=float(peft["lora_alpha"]), dropout=float(peft.get("lora_dropout", 0.0)),
                         target_modules=patterns)
        cfg.validate()
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{config_file}: {err}") from None
    reader = SafetensorsFile(weights_file)
    tensors = {}
    for name in reader.names():
        ours = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        if not ours.endswith(ADAPTER_SUFFIXES):
            raise CheckpointError(f"{weights_file}: tensor {name} is not a LoRA A/B weight (plain LoRA only)")
        tensors[ours] = reader.float32(name)
    return cfg, tensors


def load_peft_adapter(model, directory: str | Path) -> LoraConfig:
    """Import a PEFT adapter into `model`: LoRA layers are added as its adapter_config.json says (unless the model
    has them already, which must then be the same layers with the same rank and scaling) and take its weights."""
    import mindspore as ms

    cfg, tensors = read_adapter(directory)
    if not lora_layers(model):
        apply_lora(model, cfg)
    wrapped = lora_layers(model)
    in_file = {_module(name) for name in tensors}
    if in_file != set(wrapped):
        missing, unexpected = sorted(set(wrapped) - in_file), sorted(in_file - set(wrapped))
        raise CheckpointError(f"{directory}: the adapter's layers differ from the model's LoRA layers; "
                              f"missing: {', '.join(missing[:4]) or '-'}; unexpected: {', '.join(unexpected[:4]) or '-'}")
    for path, layer in wrapped.items():
        if layer.lora_A.weight.shape[0] != cfg.rank or layer.scaling != cfg.scaling:
            raise ConfigError(f"{directory}: r={cfg.rank}, lora_alpha={cfg.alpha} differ from the model's LoRA layer "
                              f"{path} (rank {layer.lora_A.weight.shape[0]}, scaling {layer.scaling})")
    params = model.parameters_dict()
    for name, value in tensors.items():
        param = params[name]
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"{directory}: tensor {name} has shape {value.shape}, the model expects "
                                  f"{tuple(param.shape)}")
        param.set_data(ms.Tensor(value, dtype=param.dtype))
    return cfg


def merge_adapter(base: str | Path, adapter: str | Path, dst: str | Path, *, dtype: str | None = None,
                  max_shard_bytes: int = 4 << 30, overwrite: bool = False, quiet: bool = False) -> dict:
    """Base checkpoint (Hugging Face or `msllm-ckpt hf2ms` output, any naming) + PEFT adapter -> Hugging Face
    model directory whose adapted weights are W + (B @ A) * alpha / r, computed in float32 and stored in the
    base's dtype (or `dtype`). Returns the manifest written."""
    from tqdm import tqdm

    base, adapter = Path(base), Path(adapter)
    cfg, tensors = read_adapter(adapter)
    hf_config = read_config(base)
    files = open_files(base, allow_pickle=False)
    sources = plan(files, name_map(hf_config, str(base / "config.json")), "hf", DTYPES.get(dtype))
    by_name = {s.out.name: s for s in sources}
    adapted = sorted({_module(name) for name in tensors})
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
            yield from source_chunks(source)
            return
        path = tensor.name[:-len(".weight")]
        merged = np.empty(tensor.shape, np.float32).reshape(-1)
        start = 0
        as_float32 = dataclasses.replace(source, out=dataclasses.replace(source.out, dtype="F32"))
        for chunk in source_chunks(as_float32):  # each chunk is only valid until the next: copy it out
            merged[start:start + chunk.size] = chunk
            start += chunk.size
        merged = merged.reshape(tensor.shape)
        merged += (tensors[f"{path}.lora_B.weight"] @ tensors[f"{path}.lora_A.weight"]) * np.float32(cfg.scaling)
        yield cast(merged, "F32", tensor.dtype)

    total = sum(s.out.nbytes for s in sources)
    with atomic_directory(dst, overwrite=overwrite) as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge-lora", disable=quiet) as bar:
        manifest = write_checkpoint(tmp, [s.out for s in sources], LAYOUTS[("safetensors", "hf")], max_shard_bytes,
                                    chunks, bar, {"format": "safetensors", "naming": "hf", "source": str(base),
                                                  "adapter": str(adapter), "merged_modules": len(adapted)})
        write_side_files(hf_config, [base], tmp, any(s.scale for s in sources))
    return manifest
