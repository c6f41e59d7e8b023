"""Conversion close to a copy: tensors stored as the output stores them are copied as bytes (checksummed through a
memory map, copied by the kernel), several tensors are written at once, the CRC32 is zlib's whichever library
computes it, and only `--fsync` (or a library caller that keeps the default) forces the files to disk."""
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from ckpt_tools import convert
from mindspore_llm import checkpoint_writer as writer
from mindspore_llm import fileio
from tests import reference
from tests.ckpt_helpers import raw_tensors, run


@pytest.fixture(scope="module")
def qwen2(module_dir):
    """An fp32 Qwen2 Hugging Face directory: 128 x 64 embeddings (32 KB, several copy windows when shrunk)."""
    reference.qwen2(module_dir / "qwen2")
    return module_dir / "qwen2"


def output_files(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())}


@pytest.fixture
def decoded(monkeypatch):
    """The names of the tensors whose values went through `source_chunks` (decoded, cast or fused as arrays)."""
    names = []
    original = convert.source_chunks

    def spy(source):
        names.append(source.name)
        return original(source)

    monkeypatch.setattr(convert, "source_chunks", spy)
    return names


@pytest.mark.parametrize("file_format", ["ckpt", "safetensors"])
def test_same_dtype_tensors_are_copied_as_bytes_not_decoded(qwen2, tmp_path, decoded, file_format):
    out = tmp_path / "out"
    assert run("hf2ms", qwen2, out, "--format", file_format).exit_code == 0
    assert decoded == []
    assert raw_tensors(out) == raw_tensors(qwen2)
    back = tmp_path / "back"
    assert run("ms2hf", out, back).exit_code == 0  # from .ckpt Values or MindSpore safetensors, copied again
    assert decoded == [] and raw_tensors(back) == raw_tensors(qwen2)


def test_a_cast_goes_through_the_arrays(qwen2, tmp_path, decoded):
    assert run("hf2ms", qwen2, tmp_path / "out", "--dtype", "bf16").exit_code == 0
    assert sorted(decoded) == sorted(raw_tensors(qwen2))


def test_copy_windows_and_slices_smaller_than_a_tensor(qwen2, tmp_path, monkeypatch):
    """Copy chunks of 1000 bytes and .ckpt Values of 1000 bytes: every tensor crosses both, at unaligned offsets;
    the bytes, the manifest's CRC32s and the file are the same as with one chunk and one Value per tensor."""
    whole = tmp_path / "whole"
    assert run("hf2ms", qwen2, whole).exit_code == 0
    monkeypatch.setattr(writer, "COPY_CHUNK", 1000)
    monkeypatch.setattr(writer, "CKPT_SLICE_BYTES", 1000)
    sliced = tmp_path / "sliced"
    assert run("hf2ms", qwen2, sliced).exit_code == 0
    back = tmp_path / "back"
    assert run("ms2hf", sliced, back).exit_code == 0  # the source's Values are copied a chunk at a time
    assert raw_tensors(back) == raw_tensors(qwen2)
    manifests = [json.loads((d / "manifest.json").read_text())["tensors"] for d in (whole, sliced, back)]
    assert manifests[0] == manifests[1]
    assert {n: e["crc32"] for n, e in manifests[2].items()} == {n: e["crc32"] for n, e in manifests[0].items()}
    for name, (_, data) in raw_tensors(qwen2).items():
        assert manifests[1][name]["crc32"] == f"{zlib.crc32(data):08x}", name


@pytest.mark.parametrize("file_format", ["ckpt", "safetensors"])
def test_tensors_written_at_once_give_the_same_files_as_one_at_a_time(qwen2, tmp_path, monkeypatch, file_format):
    """Several shards, tensors of different sizes finishing out of order: each lands at its planned offset."""
    monkeypatch.setattr(writer, "CKPT_SLICE_BYTES", 5000)  # .ckpt framing inside a tensor's planned size
    outputs = []
    for jobs in (1, 4):
        out = tmp_path / f"jobs{jobs}"
        args = ["--format", file_format, "--max-shard-size", "60KB", "--jobs", str(jobs), "--dtype", "bf16"]
        assert run("hf2ms", qwen2, out, *args).exit_code == 0  # casts: arrays, not copies
        assert run("hf2ms", qwen2, tmp_path / f"copied{jobs}", *args[:-2]).exit_code == 0  # copies
        outputs.append((output_files(out), output_files(tmp_path / f"copied{jobs}")))
    assert outputs[0] == outputs[1]
    assert raw_tensors(tmp_path / "copied4") == raw_tensors(qwen2)
    assert len([n for n in outputs[0][1] if n.endswith(file_format)]) > 3


def test_crc32_is_zlibs():
    """ISA-L's CRC32 (the writer's) gives zlib's values, whole or continued piece by piece."""
    from isal.isal_zlib import crc32 as isal_crc32

    data = np.random.default_rng(0).integers(0, 256, 3 << 20, np.uint8).tobytes()
    for end in (0, 1, 7, 4096, 1 << 20, len(data)):
        assert isal_crc32(data[:end]) == zlib.crc32(data[:end]), end
    crc = 0
    for start in range(0, len(data), 1_000_003):
        crc = writer.crc32(data[start:start + 1_000_003], crc)
    assert crc == zlib.crc32(data)


@pytest.fixture
def fsynced(monkeypatch):
    """Paths passed to os.fsync (files and directories), recorded and then synced for real."""
    paths = []
    real = os.fsync

    def record(fd):
        paths.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return paths


def test_conversion_fsyncs_only_when_asked(qwen2, tmp_path, fsynced):
    assert run("hf2ms", qwen2, tmp_path / "cached").exit_code == 0
    assert fsynced == []
    out = tmp_path / "durable"
    assert run("hf2ms", qwen2, out, "--fsync").exit_code == 0
    # every file (under its temporary directory's name), that directory, and the parent after the rename
    assert sorted(p.name for p in fsynced if p.parent.name.endswith(".partial")) == sorted(os.listdir(out))
    assert tmp_path in fsynced and len(fsynced) == len(os.listdir(out)) + 2


def test_library_outputs_are_fsynced_before_the_rename(tmp_path, fsynced):
    """What the trainer's checkpoints use: atomic_directory's default keeps the crash safety."""
    with fileio.atomic_directory(tmp_path / "checkpoint") as tmp:
        (tmp / "weights.ckpt").write_bytes(b"x" * 100)
    assert [p.name for p in fsynced] == ["weights.ckpt", tmp.name, tmp_path.name]


def test_a_conversion_does_not_start_mindspore(qwen2, tmp_path):
    """Its import alone costs ~1 s and ~400 MB quiet, 17 s here under load (docs/checkpoints.md): needless work."""
    import subprocess
    import sys

    script = ("import sys; from ckpt_tools.cli import main\n"
              "try:\n    main(['hf2ms', sys.argv[1], sys.argv[2], '-q'])\nexcept SystemExit as done:\n"
              "    assert not done.code, done.code\n"
              "assert 'mindspore' not in sys.modules, 'hf2ms imported mindspore'\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script, str(qwen2), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert raw_tensors(tmp_path / "out") == raw_tensors(qwen2)
