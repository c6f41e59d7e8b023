"""Training checkpoints that survive crashes, and the final model as a loadable model directory.

Layout under the checkpoint directory::

    step_00000100/rank_0/train_state.ckpt     weights, AdamW moments and step, loss scale (MindSpore .ckpt, CRC)
    step_00000100/rank_0/trainer_state.json   step, data position, seed and RNG state, the resolved config
    strategy/                                 (semi-auto parallel) each rank's parameter layout

Each rank directory is written under a temporary name and renamed when complete, so a crash while saving leaves
the previous checkpoint as the latest complete one. Stand-alone and data parallel, the ranks hold the same state
and rank 0 writes it; under semi-auto parallel every rank writes its slice (``shards`` in trainer_state.json).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mindspore_llm.common import CheckpointError
from mindspore_llm.fileio import atomic_directory
from mindspore_llm.tokenizer import tokenizer_files

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAIN_STATE = "train_state.ckpt"
TRAINER_STATE = "trainer_state.json"
# never checkpointed: frozen parameters loaded from their own directory at every start (a distillation teacher),
# and the pipeline's gradient accumulation buffers (PipelineGradReducer: zero between steps)
NOT_SAVED = ("teacher.", "accu_grads.")


def saved(name: str) -> bool:
    return not name.startswith(NOT_SAVED)


def step_dir(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def _is_complete(path: Path) -> bool:
    main = path / "rank_0" / TRAINER_STATE
    if not main.exists():
        return False
    shards = json.loads(main.read_text()).get("shards", 1)
    return all((path / f"rank_{r}" / TRAINER_STATE).exists() and (path / f"rank_{r}" / TRAIN_STATE).exists()
               for r in range(shards))


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and _is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(directory: str | Path, step: int, train_cell, state: dict[str, Any], rank: int = 0,
                    shards: int = 1, keep_last: int | None = None, entries: list[dict] | None = None) -> Path:
    """Write this rank's part of checkpoint `step` atomically; rank 0 then drops all but the last `keep_last`.
    `entries` ({"name", "data"} dicts): saved instead of `train_cell`'s parameters (the state in another naming,
    ``train.interop``)."""
    import mindspore as ms

    target = step_dir(directory, step)
    with atomic_directory(target / f"rank_{rank}", overwrite=True) as tmp:
        if entries is None:
            ms.save_checkpoint(train_cell, str(tmp / TRAIN_STATE), choice_func=saved, crc_check=True)
        else:
            ms.save_checkpoint(entries, str(tmp / TRAIN_STATE), crc_check=True)
        write_trainer_state(tmp / TRAINER_STATE, {**state, "step": step, "shards": shards})
    if rank == 0 and keep_last is not None:
        prune_checkpoints(directory, keep_last)
    return target


def write_trainer_state(path: Path, state: dict[str, Any]) -> None:
    path.write_text(json.dumps(state, indent=2) + "\n")


def prune_checkpoints(directory: str | Path, keep_last: int) -> None:
    """Remove checkpoints older than the last `keep_last` complete ones (and unfinished ones among them); newer
    unfinished ones are left alone, other ranks may still be writing them."""
    kept = list_checkpoints(directory)[-keep_last:]
    if not kept:
        return
    oldest_kept = kept[0].name
    for path in Path(directory).iterdir():
        if path.is_dir() and STEP_DIR.match(path.name) and path.name < oldest_kept:
            shutil.rmtree(path)


def load_checkpoint(path: str | Path, train_cell, rank: int = 0,
                    read: Callable[[Path], dict] | None = None) -> dict[str, Any]:
    """Restore every parameter of `train_cell` (weights, optimizer, loss scale) and return the trainer state.
    `read(file)`: the train state file as {our name: Parameter} (one written in another naming, ``train.interop``);
    default ``mindspore.load_checkpoint``."""
    import mindspore as ms

    path = Path(path)
    if not _is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (expected rank_0/{TRAINER_STATE} and "
                              f"rank_0/{TRAIN_STATE})")
    shards = json.loads((path / "rank_0" / TRAINER_STATE).read_text()).get("shards", 1)
    rank_dir = path / f"rank_{rank if shards > 1 else 0}"
    try:
        params = (read or (lambda file: ms.load_checkpoint(str(file), crc_check=True)))(rank_dir / TRAIN_STATE)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"{rank_dir / TRAIN_STATE}: cannot be read ({err})") from None
    expected = {p.name for p in train_cell.get_parameters() if saved(p.name)}
    missing = sorted(expected - set(params))
    unexpected = sorted(set(params) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{rank_dir / TRAIN_STATE}: does not match this model and optimizer "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, param in params.items():
        target = train_cell.parameters_dict()[name]
        if tuple(param.shape) != tuple(target.shape):
            raise CheckpointError(f"{rank_dir / TRAIN_STATE}: {name} has shape {tuple(param.shape)}, "
                                  f"this model expects {tuple(target.shape)}")
    ms.load_param_into_net(train_cell, params, strict_load=True)
    return json.loads((rank_dir / TRAINER_STATE).read_text())


def hf_config(model_config) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for a family config; checked to read back into the same config."""
    from mindspore_llm.models.auto import config_from_hf

    hf = model_config.to_hf()
    back = config_from_hf(hf, "config.json")
    if back != model_config:
        differ = [k for k in model_config.to_dict() if getattr(back, k) != getattr(model_config, k)]
        raise CheckpointError(f"model: {', '.join(differ)} cannot be expressed in a Hugging Face config.json "
                              f"for {model_config.architecture}")
    return hf


def save_model_directory(model, model_config, directory: str | Path, tokenizer: str | Path | None = None) -> Path:
    """config.json + model.safetensors (Hugging Face tensor names, fp32), loadable with
    ``AutoModelForCausalLM.from_pretrained`` and exportable with ``msllm-ckpt ms2hf``; with the files of the
    `tokenizer` directory (or file) beside them, so the directory also serves as a distillation teacher."""
    import shutil

    from safetensors.numpy import save_file

    config = hf_config(model_config)
    tensors = {name: np.ascontiguousarray(array) for name, array in model.checkpoint_arrays() if saved(name)}
    files = [] if tokenizer is None else tokenizer_files(tokenizer)  # with its chat template
    with atomic_directory(directory, overwrite=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for file in files:
            shutil.copyfile(file, tmp / file.name)
    return Path(directory)
