"""Training checkpoints in mindformers' naming, both ways: ours written so that a mindformers job can take the run
over (``checkpoint.naming``), and a run started from a training checkpoint in any naming with its AdamW moments
and step (``model.path`` + ``checkpoint.resume_optimizer``).

mindformers' training checkpoint (r1.8.0: core/optim/adamw.py, wrapper/wrapper.py, core/callback/callback.py):
the weights in its naming; ``adam_m.<weight>`` / ``adam_v.<weight>``, the AdamW moments, with the same arithmetic
as ours (torch's: bias-corrected, decoupled decay), so they carry over as they are, fused tensors split like their
weights; ``global_step`` (updates taken, shape [1]); the loss scale ``scale_sense`` and its dynamic update's
``current_iterator_step`` / ``last_overflow_iterator_step``; resume bookkeeping ``epoch_num``, ``step_num``,
``loss_scale``, ``global_batch_size``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from mindspore_llm.checkpoint import weight_files
from mindspore_llm.common import CheckpointError
from mindspore_llm.models.naming import (MINDFORMERS_MOMENTS, OURS, CheckpointView, TensorLayout, open_checkpoint,
                                         stored_arrays)

log = logging.getLogger("mindspore_llm")

STEP = "optimizer.step"
SCALE = "loss_scale.scale"
CLEAN_STEPS = "loss_scale.clean_steps"


def _model_names(model, pairs):
    """(HF name, reader) pairs -> (our parameter name, reader): the family's own checkpoint mapping (DeepSeek's
    stacked experts)."""
    return model.checkpoint_tensors(pairs) if hasattr(model, "checkpoint_tensors") else pairs


def read_state(path: str | Path, train_cell, model, options, source: str) -> dict[str, Any]:
    """A training checkpoint file or directory in any naming as {our name: Parameter} for `train_cell`: weights,
    AdamW moments, step and loss scale (what it holds of them)."""
    import mindspore as ms

    files = open_checkpoint(path)
    view = CheckpointView(files, model.config, options, source, strict=False)
    if view.layout.naming == OURS:
        return {name: param for file in sorted(set(weight_files(path).values()))
                for name, param in ms.load_checkpoint(str(file), crc_check=True).items()}
    view = CheckpointView(files, model.config, options, source)
    targets = train_cell.parameters_dict()
    out = {}

    def put(name: str, array: np.ndarray) -> None:
        if name in targets:  # what the family's mapping adds beyond the cell (e.g. statistics) is not asked for
            out[name] = ms.Parameter(ms.Tensor(array, dtype=targets[name].dtype), name=name)

    for name, reader in _model_names(model, view.tensors()):
        put(name, reader.float32(name))
    trained = {p.name for p in train_cell.optimizer.parameters}
    for theirs, ours in MINDFORMERS_MOMENTS.items():
        for name, reader in _model_names(model, view.moments(theirs).tensors()):
            if name in trained:
                put(ours + name, reader.float32(name))
    scalars = {name: files[name].raw(name).reshape(-1)[0] for name in
               ("global_step", "scale_sense", "current_iterator_step", "last_overflow_iterator_step") if name in files}
    if "global_step" in scalars:
        put(STEP, np.array(scalars["global_step"], np.int32))
    if "scale_sense" in scalars:
        put(SCALE, np.array(scalars["scale_sense"], np.float32))
    if "current_iterator_step" in scalars and "last_overflow_iterator_step" in scalars:
        # MindSpore's dynamic loss scale counts clean steps as current - last overflow, the current one included
        clean = int(scalars["current_iterator_step"]) - int(scalars["last_overflow_iterator_step"]) - 1
        put(CLEAN_STEPS, np.array(max(clean, 0), np.int32))
    return out


def optimizer_state(path: str | Path, train_cell, model, options, source: str) -> int:
    """Load the AdamW moments, step and loss scale of training checkpoint `path` (any naming) into `train_cell`;
    returns the step. Every trained parameter needs its moments there."""
    import mindspore as ms

    state = read_state(path, train_cell, model, options, source)
    optimizer = train_cell.optimizer
    wanted = [p.name for p in (*optimizer.exp_avg, *optimizer.exp_avg_sq)] + [STEP]
    missing = [name for name in wanted if name not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint.resume_optimizer needs the optimizer state of every trained "
                              f"parameter; missing {len(missing)}, e.g. {', '.join(missing[:4])} (is it a training "
                              f"checkpoint of this model?)")
    kept = {name: param for name, param in state.items() if name.startswith(("optimizer.", "loss_scale."))}
    ms.load_param_into_net(train_cell, kept, strict_load=True)
    step = int(state[STEP].asnumpy())
    log.info("optimizer state from %s: step %d, %d moments%s", path, step, len(wanted) - 1,
             ", loss scale" if SCALE in kept else "")
    return step


def mindformers_entries(train_cell, model, target: TensorLayout, *, step: int, epoch: int,
                        global_batch_size: int) -> list[dict]:
    """The run's state as ``mindspore.save_checkpoint`` entries in `target`'s (mindformers') naming: weights in the
    parameters' dtype, moments, step, loss scale and resume bookkeeping, as a mindformers training checkpoint."""
    import mindspore as ms

    weights = dict(model.checkpoint_arrays())
    dtype = model.weights()[0].dtype
    entries = [{"name": name, "data": ms.Tensor(array, ms.float32 if target.tensors[name].fp32 else dtype)}
               for name, array in stored_arrays(target, weights)]
    optimizer = train_cell.optimizer
    for moments, prefix in ((optimizer.exp_avg, "adam_m."), (optimizer.exp_avg_sq, "adam_v.")):
        pairs = ((param.name, moment.asnumpy()) for param, moment in zip(optimizer.parameters, moments))
        hf = dict(model.checkpoint_arrays(pairs))
        entries += [{"name": prefix + name, "data": ms.Tensor(array, ms.float32)}
                    for name, array in stored_arrays(target, hf)]
    updates = int(optimizer.step.asnumpy())
    scale = float(train_cell.scale.asnumpy())
    clean = int(train_cell.clean_steps.asnumpy())
    entries += [
        {"name": "global_step", "data": ms.Tensor([updates], ms.int32)},
        {"name": "scale_sense", "data": ms.Tensor(scale, ms.float32)},
        {"name": "current_iterator_step", "data": ms.Tensor(step + 1, ms.int32)},
        {"name": "last_overflow_iterator_step", "data": ms.Tensor(step - clean, ms.int32)},
        {"name": "epoch_num", "data": ms.Tensor(epoch, ms.int64)},
        {"name": "step_num", "data": ms.Tensor(step, ms.int64)},
        {"name": "loss_scale", "data": ms.Tensor(scale, ms.float32)},
        {"name": "global_batch_size", "data": ms.Tensor(global_batch_size, ms.int64)},
    ]
    return entries


def epochs_begun(step: int, steps_per_epoch: int) -> int:
    """mindformers' ``epoch_num`` after `step` steps: the (1-based) epoch the last step was in."""
    return math.ceil(step / max(steps_per_epoch, 1))
