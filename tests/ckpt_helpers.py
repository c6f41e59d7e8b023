"""Shared by the checkpoint-conversion tests: run `msllm-ckpt` in-process, read safetensors as raw bits."""
from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from ckpt_tools.cli import main
from mindspore_llm.checkpoint import iter_tensors


def run(*args: str | Path):
    """`msllm-ckpt ARGS` in-process; returns the click Result (exit_code, output incl. stderr)."""
    return CliRunner().invoke(main, [str(a) for a in args] + (["--quiet"] if args[0] in ("hf2ms", "ms2hf") else []))


def raw_tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (dtype tag, stored bytes) of every tensor of a checkpoint, in any format."""
    return {name: (file.dtype(name), file.raw(name).tobytes()) for name, file in iter_tensors(path)}
