"""Knowledge distillation (Hinton et al., https://arxiv.org/abs/1503.02531) of a frozen teacher into a student.

Per counted token (the SFT tokens: label at t+1 is not -100, CausalLMLoss's shift), with p = softmax(teacher/T) and
q = softmax(student/T):

    loss_t = (1 - kd_lambda) * CE(student_t, label_{t+1}) + kd_lambda * T^2 * KL(p || q)

averaged over the counted tokens (T^2 keeps the soft-target gradients' scale independent of T).

Online: the teacher (any supported family and size, same tokenizer) runs beside the student. Offline: the teacher's
top-k logits per token are written to disk once (``write_teacher_topk``) and the loss reads them; p is then the
softmax over the k stored logits (renormalised: the teacher mass outside its top k is dropped), KL runs over
those k tokens with the student's full-vocabulary log-probabilities. k = vocab size gives the online loss exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.ops import operations as P

from mindspore_llm.common import IGNORE_INDEX, ConfigError
from mindspore_llm.config_utils import require
from mindspore_llm.fileio import atomic_path
from mindspore_llm.models.layers import CausalLMLoss

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass(kw_only=True)
class DistillConfig:
    """The training YAML's ``distill:`` section."""

    teacher: str | None = None  # teacher model directory; required online (offline: checked against the top-k file)
    mode: Literal["online", "offline"] = "online"
    temperature: float = 1.0
    kd_lambda: float = 0.5  # weight of the distillation term; 1 - kd_lambda weighs the label cross-entropy
    top_k: int | None = None  # offline: logits kept per token (the file written by write_teacher_topk)
    teacher_logits: str | None = None  # offline: that file

    def validate(self) -> None:
        require(self.temperature > 0, f"temperature: must be positive, got {self.temperature!r}")
        require(0.0 <= self.kd_lambda <= 1.0, f"kd_lambda: must be in [0, 1], got {self.kd_lambda!r}")
        if self.mode == "online":
            require(self.teacher is not None, "teacher: required in online mode (the teacher model's directory)")
        else:
            require(self.teacher_logits is not None,
                    "teacher_logits: required in offline mode (the file written by write_teacher_topk)")
            require(self.top_k is not None and self.top_k >= 1, f"top_k: offline mode needs k >= 1, got {self.top_k!r}")


class DistillationLoss(nn.Cell):
    """``loss(student_logits, labels, teacher_logits, teacher_indices=None) -> (sum of token losses, counted)``.

    Logits are (B, S, V); offline, ``teacher_logits`` are the (B, S, k) top-k values and ``teacher_indices`` their
    vocabulary ids. The sum/count pair averages exactly over micro-batches, like ``CausalLMLoss``.
    """

    def __init__(self, temperature: float, kd_lambda: float):
        super().__init__()
        self.inverse_temperature = 1.0 / temperature
        self.ce_weight = 1.0 - kd_lambda
        self.kd_weight = kd_lambda * temperature * temperature
        self.cross_entropy = CausalLMLoss()
        self.scale_student = P.Mul()
        self.scale_teacher = P.Mul()
        self.student_log_softmax = P.LogSoftmax(-1)
        self.teacher_log_softmax = P.LogSoftmax(-1)
        self.gather = P.GatherD()
        self.exp = P.Exp()
        self.sub = P.Sub()
        self.mul = P.Mul()
        self.reduce_sum = P.ReduceSum()
        self.concat = P.Concat(1)

    def construct(self, student_logits, labels, teacher_logits, teacher_indices=None):
        ce_sum, count = self.cross_entropy(student_logits, labels)
        batch, seq_len, vocab = student_logits.shape
        k = teacher_logits.shape[-1]
        log_q = self.student_log_softmax(self.scale_student(student_logits.reshape(-1, vocab),
                                                            self.inverse_temperature))
        if teacher_indices is not None:
            log_q = self.gather(log_q, 1, teacher_indices.reshape(-1, k).astype(ms.int32))
        teacher = ops.stop_gradient(teacher_logits.astype(ms.float32).reshape(-1, k))
        log_p = self.teacher_log_softmax(self.scale_teacher(teacher, self.inverse_temperature))
        kl = self.reduce_sum(self.mul(self.exp(log_p), self.sub(log_p, log_q)), -1)
        # the tokens CausalLMLoss counts: position t when label t + 1 is not ignored
        ignore = ops.full((batch, 1), IGNORE_INDEX, dtype=labels.dtype)
        counted = (self.concat((labels[:, 1:], ignore)).reshape(-1) != IGNORE_INDEX).astype(ms.float32)
        return self.ce_weight * ce_sum + self.kd_weight * (kl * counted).sum(), count


class DistillationModel(nn.Cell):
    """A student with a frozen teacher (online) or with stored teacher top-k logits (offline), offering the
    student's ``construct`` / ``loss_sum`` / ``loss`` so a trainer differentiates it like a CausalLM.

    Parameter names: the student's are unchanged; the teacher's get the prefix ``teacher.`` (and requires_grad
    False: no gradients, no optimizer state). Offline, ``loss_sum`` takes the top-k arrays of the batch's rows.
    """

    def __init__(self, student: nn.Cell, cfg: DistillConfig, teacher: nn.Cell | None = None):
        super().__init__(auto_prefix=False)
        if (teacher is None) != (cfg.mode == "offline"):
            raise ConfigError(f"distill.mode: {cfg.mode} mode {'takes no' if teacher is not None else 'needs a'} "
                              f"teacher model")
        self.student = student
        self.config = student.config
        self.teacher = teacher
        if teacher is not None:
            freeze(teacher)
            teacher.update_parameters_name("teacher.")
        self.loss_fn = DistillationLoss(cfg.temperature, cfg.kd_lambda)

    def construct(self, input_ids, attention_mask=None, position_ids=None):
        return self.student(input_ids, attention_mask, position_ids)

    def loss_sum(self, input_ids, labels, attention_mask=None, position_ids=None, teacher_values=None,
                 teacher_indices=None):
        logits = self.student(input_ids, attention_mask, position_ids)
        if self.teacher is not None:
            teacher_values = self.teacher(input_ids, attention_mask, position_ids)
        return self.loss_fn(logits, labels, teacher_values, teacher_indices)

    def loss(self, input_ids, labels, attention_mask=None, position_ids=None, teacher_values=None,
             teacher_indices=None):
        total, count = self.loss_sum(input_ids, labels, attention_mask, position_ids, teacher_values, teacher_indices)
        return total / ops.maximum(count, 1.0)


def freeze(model: nn.Cell) -> nn.Cell:
    for param in model.get_parameters():
        param.requires_grad = False
    model.set_train(False)
    return model


def _vocabulary(directory: Path) -> dict[str, int] | None:
    """token -> id of the tokenizer in `directory` (tokenizer.json or sentencepiece *.model), None if none."""
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab(with_added_tokens=True)
    models = sorted(directory.glob("*.model"))
    if models:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(models[0]))
        return {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    return None


def check_same_tokenizer(student: str | Path, teacher: str | Path) -> None:
    """The teacher's logits index the student's vocabulary only if both use one tokenizer: its files are
    identical, or else its vocabularies (token -> id, added tokens included) are. Raises ConfigError otherwise."""
    student, teacher = Path(student), Path(teacher)
    student, teacher = (p if p.is_dir() else p.parent for p in (student, teacher))
    files = [name for name in TOKENIZER_FILES if (student / name).is_file() or (teacher / name).is_file()]
    if files and all((student / n).is_file() and (teacher / n).is_file()
                     and (student / n).read_bytes() == (teacher / n).read_bytes() for n in files):
        return
    vocabularies = {path: _vocabulary(path) for path in (student, teacher)}
    for path, vocabulary in vocabularies.items():
        if vocabulary is None:
            raise ConfigError(f"distill.teacher: {path} has no tokenizer (tokenizer.json or *.model), so the "
                              f"student's and teacher's tokenizers cannot be checked to be the same")
    a, b = vocabularies[student], vocabularies[teacher]
    if a != b:
        differ = sorted(set(a.items()) ^ set(b.items()), key=lambda item: item[1])[:3]
        raise ConfigError(f"distill.teacher: the tokenizers of {student} ({len(a)} tokens) and {teacher} "
                          f"({len(b)} tokens) differ (e.g. {differ}); distillation on logits needs one tokenizer")


def load_teacher(cfg: DistillConfig, student_config, student_tokenizer: str | Path, param_dtype: str = "fp32",
                 compute_dtype: str = "fp32") -> nn.Cell:
    """The frozen teacher of an online run, after checking it shares the student's tokenizer and vocabulary."""
    from mindspore_llm.models.auto import AutoModelForCausalLM
    from mindspore_llm.models.config import load_config

    teacher_config = load_config(cfg.teacher)
    if teacher_config.vocab_size != student_config.vocab_size:
        raise ConfigError(f"distill.teacher: vocab_size {teacher_config.vocab_size} of {cfg.teacher} differs from "
                          f"the student's {student_config.vocab_size}; the logits must cover the same vocabulary")
    check_same_tokenizer(student_tokenizer, cfg.teacher)
    return freeze(AutoModelForCausalLM.from_pretrained(cfg.teacher, param_dtype, compute_dtype))


class _TopKLogits(nn.Cell):
    def __init__(self, model: nn.Cell, k: int):
        super().__init__(auto_prefix=False)
        self.model = model
        self.k = k
        self.top_k = P.TopK(sorted=True)

    def construct(self, input_ids, attention_mask, position_ids=None):
        return self.top_k(self.model(input_ids, attention_mask, position_ids), self.k)


def write_teacher_topk(teacher: nn.Cell, batches: Iterable[dict[str, np.ndarray]], path: str | Path,
                       top_k: int, num_rows: int, seq_length: int, source: str = "", quiet: bool = False) -> Path:
    """Run `teacher` over `batches` ({"input_ids", "attention_mask", optional "position_ids"}: (B, seq_length),
    the data pipeline's arrays) and store, for each of the `num_rows` rows in order, the top-k logits (float32) and
    their token ids (int32) of every position.

    One safetensors file: ``values`` and ``indices`` of shape (num_rows, seq_length, top_k), written batch by batch
    (memory: one batch); metadata records top_k, vocab_size and `source`. Row r must be row r of the data set the
    student trains on (same data, seq_length and packing).
    """
    from tqdm import tqdm

    vocab_size = teacher.config.vocab_size
    if not 1 <= top_k <= vocab_size:
        raise ConfigError(f"distill.top_k: must be in [1, {vocab_size}] (the vocabulary), got {top_k}")
    shape = [num_rows, seq_length, top_k]
    size = num_rows * seq_length * top_k * 4
    header = {"__metadata__": {"format": "pt", "top_k": str(top_k), "vocab_size": str(vocab_size), "source": source},
              "values": {"dtype": "F32", "shape": shape, "data_offsets": [0, size]},
              "indices": {"dtype": "I32", "shape": shape, "data_offsets": [size, 2 * size]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data_start = 8 + len(text)
    topk = _TopKLogits(freeze(teacher), top_k)
    row = 0
    with (atomic_path(path) as tmp, open(tmp, "wb") as f,
          tqdm(total=num_rows, desc="teacher top-k", disable=quiet) as bar):
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(data_start + 2 * size)
        for batch in batches:
            rows = len(batch["input_ids"])
            if row + rows > num_rows or np.shape(batch["input_ids"])[1] != seq_length:
                raise ConfigError(f"{path}: batches hold more than {num_rows} rows or rows other than {seq_length} "
                                  f"tokens")
            inputs = [ms.Tensor(batch[key], ms.int32) for key in ("input_ids", "attention_mask", "position_ids")
                      if key in batch]
            values, indices = topk(*inputs)
            for tensor, offset, dtype in ((values, 0, np.float32), (indices, size, np.int32)):
                f.seek(data_start + offset + row * seq_length * top_k * 4)
                f.write(np.ascontiguousarray(tensor.asnumpy(), dtype).tobytes())
            row += rows
            bar.update(rows)
        if row != num_rows:
            raise ConfigError(f"{path}: the batches held {row} rows, {num_rows} were announced")
    return Path(path)


class TeacherTopK:
    """The file ``write_teacher_topk`` wrote: ``rows(indices) -> (values, token ids)`` of those data-set rows."""

    def __init__(self, path: str | Path, cfg: DistillConfig | None = None, vocab_size: int | None = None):
        from mindspore_llm.checkpoint import SafetensorsFile

        file = SafetensorsFile(path)
        self.path = Path(path)
        self.top_k = int(file.metadata.get("top_k", file.shape("values")[-1]))
        self.vocab_size = int(file.metadata["vocab_size"])
        self.values, self.indices = file.raw("values"), file.raw("indices")
        if cfg is not None and cfg.top_k != self.top_k:
            raise ConfigError(f"distill.top_k: {cfg.top_k}, but {path} stores the top {self.top_k} logits")
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ConfigError(f"distill.teacher_logits: {path} was written by a teacher with vocab_size "
                              f"{self.vocab_size}, the student has {vocab_size}")

    def __len__(self) -> int:
        return len(self.values)

    def rows(self, indices) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices)
        return np.asarray(self.values[indices]), np.asarray(self.indices[indices])
