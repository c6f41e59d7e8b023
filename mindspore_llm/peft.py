"""LoRA adapters in Hugging Face PEFT's format: what a training run writes at its end and what it can start from.

A PEFT adapter directory holds ``adapter_config.json`` (r, lora_alpha, target_modules, ...) and
``adapter_model.safetensors`` with ``base_model.model.<module path>.lora_A.weight`` (r, in) and ``...lora_B.weight``
(out, r); the module paths are Hugging Face's, which are ours, so names map by the prefix alone. PEFT computes
y = base(x) + lora_B(lora_A(dropout(x))) * lora_alpha / r, which is ``mindspore_llm.lora.LoraLinear``.

  export: an in-memory LoRA model -> adapter directory
  import: adapter -> LoRA layers of an in-memory model (to continue training, or to evaluate)
Merging an adapter into full weights, and adapters from checkpoints, are ``msllm-ckpt`` commands (ckpt_tools.peft).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from mindspore_llm.checkpoint import SafetensorsFile
from mindspore_llm.common import CheckpointError, ConfigError
from mindspore_llm.fileio import atomic_directory
from mindspore_llm.lora import ADAPTER_SUFFIXES, LoraConfig, adapter_weights, apply_lora, lora_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# adapter_config.json options that change the math beyond plain LoRA: refused rather than silently ignored.
UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False, "lora_bias": False,
               "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
               "target_parameters": None, "exclude_modules": None}


def adapter_module(name: str) -> str:
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

    adapted = {adapter_module(name) for name in tensors}
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
    in_file = {adapter_module(name) for name in tensors}
    if in_file != set(wrapped):
        missing, unexpected = sorted(set(wrapped) - in_file), sorted(in_file - set(wrapped))
        raise CheckpointError(f"{directory}: the adapter's layers differ from the model's LoRA layers; "
                              f"missing: {', '.join(missing[:4]) or '-'}; "
                              f"unexpected: {', '.join(unexpected[:4]) or '-'}")
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
