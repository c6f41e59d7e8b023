"""Training checkpoints that survive crashes, and the final model as a loadable model directory.

Layout under the checkpoint directory::

    step_00000100/rank_0/train_state.ckpt     weights, AdamW moments and step, loss scale (MindSpore .ckpt)
    step_00000100/rank_0/trainer_state.json   step, data position, seed, the resolved config
    step_00000100/rank_0/manifest.json        size and CRC32 of the two files above, written last
    strategy/strategy_rank_N.ckpt             (semi-auto parallel) each rank's compiled parameter layouts

Each rank directory is written under a temporary name, fsynced and renamed when complete; a checkpoint counts as
complete only when every rank's manifest is there and matches its files' sizes (and, for the files a rank reads,
their CRC32), so a crash or a truncated copy leaves the previous checkpoint as the one resumed from, with a
warning naming what is wrong with the newer one. Stand-alone and data parallel, the ranks hold the same state and
rank 0 writes it; under semi-auto parallel every rank writes its own slices (``shards`` in trainer_state.json,
``integrated_save=False``: nothing is gathered). A LoRA run whose base comes from ``model.path`` saves the
adapters, their optimizer state and the loss scale only: the frozen base is reloaded from ``model.path``.

Randomness is a function of (seed, step): LoRA dropout masks are keyed by it (``lora.set_dropout_key``) and the
data order by (data seed, epoch), so nothing random needs saving beyond the step and the data position.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from mindspore_llm.checkpoint import WeightReader
from mindspore_llm.common import CheckpointError, ConfigError
from mindspore_llm.fileio import atomic_directory, atomic_write_text
from mindspore_llm.lora import DROPOUT_KEY
from mindspore_llm.tokenizer import tokenizer_files

log = logging.getLogger("mindspore_llm")

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAIN_STATE = "train_state.ckpt"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
# never checkpointed: frozen parameters loaded from their own directory at every start (a distillation teacher),
# the pipeline's gradient accumulation buffers (PipelineGradReducer: zero between steps), the dropout key (set
# from the step before every step)
NOT_SAVED = ("teacher.", "accu_grads.", DROPOUT_KEY)
SHARED_MARKER = ".msllm_shared_storage"
CRC_CHUNK = 64 << 20


def saved(name: str) -> bool:
    return not name.startswith(NOT_SAVED)


def step_dir(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_manifest(rank_dir: Path) -> None:
    """Size and CRC32 of every file of a rank's part of a checkpoint: what makes it count as complete."""
    files = {f.name: {"bytes": f.stat().st_size, "crc32": _crc32(f)}
             for f in sorted(rank_dir.iterdir()) if f.name != MANIFEST}
    (rank_dir / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def checkpoint_problem(path: Path, crc_ranks: Iterable[int] = ()) -> str | None:
    """Why checkpoint `path` is not complete (None if it is): a rank's manifest missing or unreadable, a file
    missing or of another size than the manifest says, a corrupt trainer_state.json, and for `crc_ranks` a file
    whose CRC32 differs."""
    main = _read_json(path / "rank_0" / TRAINER_STATE)
    if main is None:
        return f"rank_0/{TRAINER_STATE} is missing or not valid JSON"
    shards = main.get("shards", 1)
    if not isinstance(shards, int) or shards < 1:
        return f"rank_0/{TRAINER_STATE} has no valid 'shards'"
    crc_ranks = set(crc_ranks)
    for rank in range(shards):
        rank_dir = path / f"rank_{rank}"
        manifest = _read_json(rank_dir / MANIFEST)
        if manifest is None or not isinstance(manifest.get("files"), dict):
            return f"rank_{rank}/{MANIFEST} is missing or not valid JSON (the save did not finish)"
        files = manifest["files"]
        for name in (TRAIN_STATE, TRAINER_STATE):
            if name not in files:
                return f"rank_{rank}/{MANIFEST} does not list {name}"
        for name, entry in files.items():
            file = rank_dir / name
            if not file.is_file():
                return f"rank_{rank}/{name} is missing"
            if file.stat().st_size != entry.get("bytes"):
                return f"rank_{rank}/{name} has {file.stat().st_size} bytes, its manifest says {entry.get('bytes')}"
            # trainer_state.json is small: always checked; the weights only on the ranks that read them
            if (name == TRAINER_STATE or rank in crc_ranks) and _crc32(file) != entry.get("crc32"):
                return f"rank_{rank}/{name} is corrupt (CRC32 {_crc32(file)}, its manifest says {entry.get('crc32')})"
        if rank > 0 and _read_json(rank_dir / TRAINER_STATE) is None:
            return f"rank_{rank}/{TRAINER_STATE} is not valid JSON"
    return None


def _step_dirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints (manifests and sizes), oldest first."""
    return [p for p in _step_dirs(Path(directory)) if checkpoint_problem(p) is None]


def latest_checkpoint(directory: str | Path, rank: int = 0) -> Path | None:
    """The newest complete checkpoint; newer ones that are not (truncated, corrupt, unfinished) are named in a
    warning. The CRC32 of every file is checked when rank 0 holds the whole state (stand-alone, data parallel:
    every rank reads the same files and reaches the same verdict); with per-rank slices, this rank's own."""
    for path in reversed(_step_dirs(Path(directory))):
        shards = (_read_json(path / "rank_0" / TRAINER_STATE) or {}).get("shards", 1)
        problem = checkpoint_problem(path, crc_ranks=range(1) if shards == 1 else [rank])
        if problem is None:
            return path
        log.warning("checkpoint %s is not complete (%s): skipping it", path, problem)
    return None


def save_checkpoint(directory: str | Path, step: int, train_cell, state: dict[str, Any], rank: int = 0,
                    shards: int = 1, keep_last: int | None = None, skip: frozenset[str] = frozenset(),
                    entries: list[dict] | None = None) -> Path:
    """Write this rank's part of checkpoint `step` (every parameter of `train_cell` but `skip` and NOT_SAVED)
    atomically, its manifest last; rank 0 then drops all but the last `keep_last` complete checkpoints.
    `entries` ({"name", "data"} dicts): saved instead of `train_cell`'s parameters (the state in another naming,
    ``train.interop``)."""
    import mindspore as ms

    target = step_dir(directory, step)
    with atomic_directory(target / f"rank_{rank}", overwrite=True) as tmp:
        if entries is None:
            # integrated_save=False: each rank writes the slices it holds (semi-auto), never a gathered copy
            ms.save_checkpoint(train_cell, str(tmp / TRAIN_STATE), integrated_save=False,
                               choice_func=lambda name: saved(name) and name not in skip)
        else:
            ms.save_checkpoint(entries, str(tmp / TRAIN_STATE))
        write_trainer_state(tmp / TRAINER_STATE, {**state, "step": step, "shards": shards})
        write_manifest(tmp)
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
    for path in _step_dirs(Path(directory)):
        if path.name < oldest_kept:
            shutil.rmtree(path)


def load_checkpoint(path: str | Path, train_cell, rank: int = 0, skip: frozenset[str] = frozenset(),
                    read: Callable[[Path], StoredState | ArrayState] | None = None) -> dict:
    """Restore every saved parameter of `train_cell` (weights, optimizer, loss scale; not `skip`) from this rank's
    part of checkpoint `path`, a tensor at a time, and return the trainer state. `read(file)`: the train state
    file as {our name: array} (one written in another naming, ``train.interop.read_state``); by default it is
    read as stored."""
    import mindspore as ms

    path = Path(path)
    shards = (_read_json(path / "rank_0" / TRAINER_STATE) or {}).get("shards", 1)
    own = rank if shards > 1 else 0
    problem = checkpoint_problem(path, crc_ranks=[own])
    if problem is not None:
        raise CheckpointError(f"{path}: not a complete checkpoint: {problem}")
    rank_dir = path / f"rank_{own}"
    stored = StoredState(WeightReader(rank_dir / TRAIN_STATE)) if read is None else read(rank_dir / TRAIN_STATE)
    params = train_cell.parameters_dict()  # once: building it walks every cell
    expected = {name for name in params if saved(name) and name not in skip}
    held = set(stored) - skip  # a checkpoint in another naming holds the frozen base too
    missing, unexpected = sorted(expected - held), sorted(held - expected)
    if missing or unexpected:
        raise CheckpointError(f"{rank_dir / TRAIN_STATE}: does not match this model and optimizer "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name in sorted(expected):
        param = params[name]
        if stored.shape(name) != tuple(param.shape):
            raise CheckpointError(f"{rank_dir / TRAIN_STATE}: {name} has shape {stored.shape(name)}, "
                                  f"this model expects {tuple(param.shape)}")
    for name in sorted(expected):
        param = params[name]
        param.set_data(ms.Tensor(np.asarray(stored[name]), dtype=param.dtype), slice_shape=param.sliced)
    return json.loads((rank_dir / TRAINER_STATE).read_text())


class StoredState(Mapping):
    """The tensors of a train state by name (a ``checkpoint.WeightReader``), each read when asked for: float32,
    integers as stored."""

    def __init__(self, reader):
        self.reader = reader

    def __getitem__(self, name: str) -> np.ndarray:
        return self.reader.read(name)

    def __iter__(self):
        return iter(self.reader.names())

    def __len__(self) -> int:
        return len(self.reader.names())

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(name)


class ArrayState(dict):
    """A train state computed in memory (another naming's, ``train.interop``), read like ``StoredState``."""

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self[name].shape)


def wait_for_checkpoint(path: Path, timeout_s: float = 1800.0, poll_s: float = 2.0) -> None:
    """Block until every rank's part of checkpoint `path` is complete (the other ranks of a sliced job write
    theirs at the same time; the final export reads them all)."""
    import time

    deadline = time.monotonic() + timeout_s
    while (problem := checkpoint_problem(path)) is not None:
        if time.monotonic() > deadline:
            raise CheckpointError(f"{path}: still not complete after {timeout_s:.0f} s ({problem})")
        time.sleep(poll_s)


def check_shared_storage(directory: Path, rank: int, world_size: int) -> None:
    """Every rank must see what rank 0 writes under `directory` (checkpoints are complete only when all ranks' parts
    are there, and resume and pruning read them all): rank 0 writes a random token, the ranks compare."""
    from mindspore import Tensor, mint

    marker = directory / SHARED_MARKER
    token = float(secrets.randbelow(2 ** 24 - 1) + 1) if rank == 0 else 0.0  # exact in float32
    if rank == 0:
        atomic_write_text(marker, f"{int(token)}\n")
    shared = Tensor(np.array([token], np.float32))
    mint.distributed.all_reduce(shared)  # also the barrier: rank 0 wrote the marker before it
    expected = int(shared.asnumpy()[0])
    try:
        seen = int(marker.read_text().strip())
    except (OSError, ValueError):
        seen = None
    blind = Tensor(np.array([0.0 if seen == expected else 1.0], np.float32))
    mint.distributed.all_reduce(blind)
    if rank == 0:
        marker.unlink()
    count = int(blind.asnumpy()[0])
    if count:
        this_one = "" if seen == expected else ", this one included"
        raise ConfigError(f"output_dir: {directory} is not one filesystem shared by all ranks ({count} of "
                          f"{world_size} do not see the file rank 0 wrote there{this_one}); checkpoints need every "
                          f"rank's part in one place: put output_dir (or checkpoint.dir) on storage every server "
                          f"mounts")


def hf_config(model_config) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for a family config; checked to read back into the same config."""
    from mindspore_llm.models.config import config_from_hf

    hf = model_config.to_hf()
    back = config_from_hf(hf, "config.json")
    if back != model_config:
        differ = [k for k in model_config.to_dict() if getattr(back, k) != getattr(model_config, k)]
        raise CheckpointError(f"model: {', '.join(differ)} cannot be expressed in a Hugging Face config.json "
                              f"for {model_config.architecture}")
    return hf


def _write_side_files(directory: Path, config: dict, tokenizer: str | Path | None) -> None:
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for file in [] if tokenizer is None else tokenizer_files(tokenizer):  # with its chat template
        shutil.copyfile(file, directory / file.name)


def save_model_directory(model, model_config, directory: str | Path, tokenizer: str | Path | None = None) -> Path:
    """config.json + model.safetensors (Hugging Face tensor names, fp32), loadable with
    ``AutoModelForCausalLM.from_pretrained`` and exportable with ``msllm-ckpt ms2hf``; with the files of the
    `tokenizer` directory (or file) beside them, so the directory also serves as a distillation teacher. For a
    model holding whole tensors (stand-alone, data parallel); sliced runs export with ``export_from_slices``."""
    from safetensors.numpy import save_file

    config = hf_config(model_config)
    tensors = {name: np.ascontiguousarray(array) for name, array in model.checkpoint_arrays() if saved(name)}
    with atomic_directory(directory, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_side_files(tmp, config, tokenizer)
    return Path(directory)


def export_from_slices(checkpoint: Path, strategy: Path, model, model_config, full_shapes: dict[str, tuple],
                       directory: Path, tokenizer: str | Path | None = None, quiet: bool = True) -> Path:
    """The final model of a sliced run: the per-rank slices of `checkpoint` joined into a Hugging Face directory
    (fp32, per-expert tensors), streaming a window at a time; never one rank's slice."""
    from mindspore_llm.checkpoint_slices import SlicedTensors, merge_slices, read_strategy
    from mindspore_llm.checkpoint_writer import HF_SAFETENSORS

    config = hf_config(model_config)
    weights = [name for name in full_shapes if saved(name)]
    tensors = SlicedTensors(checkpoint, read_strategy(strategy), {n: full_shapes[n] for n in weights})
    outputs = [(source, name, index if len(sources) > 1 else None)
               for name in weights for sources in [model.checkpoint_sources(name)]
               for index, source in enumerate(sources)]
    merge_slices(tensors, outputs, directory, HF_SAFETENSORS, dtype="F32", overwrite=True,
                 side_files=lambda tmp: _write_side_files(tmp, config, tokenizer))
    return directory


def adapters_from_slices(checkpoint: Path, strategy: Path, full_shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The full LoRA adapters (float32) of the per-rank slices of a sliced LoRA run's checkpoint."""
    from mindspore_llm.checkpoint_slices import SlicedTensors, read_strategy

    tensors = SlicedTensors(checkpoint, read_strategy(strategy), full_shapes)
    return {name: np.concatenate(list(tensors.chunks(name, None, "F32"))).reshape(shape)
            for name, shape in full_shapes.items()}
