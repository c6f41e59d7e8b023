"""Knowledge distillation loss against a float64 NumPy reference, and a toy student pulled toward its teacher.

Tolerances, within ~10x of the errors measured here: the loss within 3e-6 relative of the float64 reference
(measured 6.2e-7; 1.1e-6 for the offline top-k loss, checked at 1e-5); the train step's loss 1e-6 relative (measured
1.2e-7); stored top-k logits within 1e-6 of the teacher's (measured: identical).
"""
import mindspore as ms
import numpy as np
import pytest
from click.testing import CliRunner
from mindspore import nn
from tokenizers import Tokenizer, models, pre_tokenizers

from mindspore_llm import AutoModelForCausalLM, cli
from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import from_dict
from mindspore_llm.data import TINY_ASSETS, build_sequences, load_data_config
from mindspore_llm.distill import (DistillationLoss, DistillationModel, DistillConfig, TeacherTopK,
                                   check_same_tokenizer, load_teacher, write_teacher_topk)
from mindspore_llm.models.auto import build_model, config_from_yaml_section
from mindspore_llm.models.layers import CausalLMLoss
from mindspore_llm.train.optim import AdamW, OptimizerConfig
from mindspore_llm.train.schedule import ScheduleConfig
from mindspore_llm.train.step import PrecisionConfig, TrainStep
from tests import reference

VOCAB = 40


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_loss(student, teacher, labels, temperature, kd_lambda, indices=None):
    """Mean over counted tokens of (1 - λ) CE + λ T² KL(softmax(teacher / T) || softmax(student / T)), float64."""
    student, teacher = student.astype(np.float64), teacher.astype(np.float64)
    targets = np.concatenate([labels[:, 1:], np.full((len(labels), 1), -100)], axis=1)
    counted = targets != -100
    ce = -np.take_along_axis(log_softmax(student), np.where(counted, targets, 0)[..., None], -1)[..., 0]
    log_q = log_softmax(student / temperature)
    if indices is not None:
        log_q = np.take_along_axis(log_q, indices, -1)
    log_p = log_softmax(teacher / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    per_token = (1 - kd_lambda) * ce + kd_lambda * temperature ** 2 * kl
    return per_token[counted].sum() / counted.sum()


@pytest.fixture(scope="module")
def random_logits():
    rng = np.random.default_rng(0)
    student = (rng.normal(size=(3, 7, VOCAB)) * 3).astype(np.float32)
    teacher = (rng.normal(size=(3, 7, VOCAB)) * 3).astype(np.float32)
    labels = rng.integers(0, VOCAB, (3, 7))
    labels[0, :3] = -100  # a prompt
    labels[2, 5] = -100
    labels[1, :] = -100  # a row with nothing to learn
    labels[1, 2] = 5
    return student, teacher, labels


def run_loss(cell, student, labels, teacher, indices=None):
    args = [ms.Tensor(student), ms.Tensor(labels, ms.int32), ms.Tensor(teacher)]
    if indices is not None:
        args.append(ms.Tensor(indices, ms.int32))
    total, count = cell(*args)
    return float(total.asnumpy()) / float(count.asnumpy()), float(total.asnumpy()), float(count.asnumpy())


@pytest.mark.parametrize("temperature, kd_lambda", [(2.0, 0.7), (0.5, 1.0)])
def test_loss_matches_numpy_reference(random_logits, temperature, kd_lambda):
    student, teacher, labels = random_logits
    mean, _, _ = run_loss(DistillationLoss(temperature, kd_lambda), student, labels, teacher)
    assert mean == pytest.approx(reference_loss(student, teacher, labels, temperature, kd_lambda), rel=3e-6)


def test_topk_loss_matches_numpy_reference(random_logits):
    """Offline: the softmax over the k stored teacher logits, KL against the student's log-probs at those ids."""
    student, teacher, labels = random_logits
    indices = np.argsort(-teacher, -1)[..., :7]
    values = np.take_along_axis(teacher, indices, -1)
    mean, _, _ = run_loss(DistillationLoss(2.0, 0.6), student, labels, values, indices)
    assert mean == pytest.approx(reference_loss(student, values, labels, 2.0, 0.6, indices), rel=3e-6)


def test_lambda_zero_is_the_sft_cross_entropy(random_logits):
    student, teacher, labels = random_logits
    _, total, count = run_loss(DistillationLoss(3.0, 0.0), student, labels, teacher)
    ce_total, ce_count = CausalLMLoss()(ms.Tensor(student), ms.Tensor(labels, ms.int32))
    assert count == float(ce_count.asnumpy()) == 10  # 4 + 1 + 5 shifted labels
    assert total == pytest.approx(float(ce_total.asnumpy()), rel=1e-6)


TINY = dict(vocab_size=VOCAB, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)


def mean_loss(model, *inputs):
    total, count = model.loss_sum(*inputs)  # compiled cells; the division in NumPy
    return float(total.asnumpy()) / float(count.asnumpy())


@pytest.fixture(scope="module")
def toy():
    """A 1-layer student and a frozen 2-layer teacher of another width (sharpened head); the student is trained
    on the pure distillation loss (λ = 1, T = 1: the loss is the mean KL) for 40 Adam steps on one batch."""
    ms.set_seed(0)
    student = build_model(config_from_yaml_section(
        dict(architecture="Qwen2ForCausalLM", hidden_size=32, num_hidden_layers=1, **TINY), "student"))
    teacher = build_model(config_from_yaml_section(
        dict(architecture="Qwen3ForCausalLM", hidden_size=48, head_dim=16, num_hidden_layers=2, **TINY), "teacher"))
    head = teacher.lm_head.weight
    head.set_data(ms.Tensor(head.asnumpy() * 100.0))  # logits of a few units: a distribution worth imitating
    input_ids, mask, labels = reference.random_batch(VOCAB, 4, 12, seed=3, left_pad=(0, 2, 0, 5))
    ids, attn, lab = (ms.Tensor(a, ms.int32) for a in (input_ids, mask, labels))
    cfg = DistillConfig(teacher="unused", temperature=1.0, kd_lambda=1.0)
    online = DistillationModel(student, cfg, teacher)
    teacher_before = {p.name: p.asnumpy().copy() for p in teacher.get_parameters()}
    initial = mean_loss(online, ids, lab, attn)

    def loss_fn(ids, labels, mask):
        return online.loss(ids, labels, mask)

    optimizer = nn.Adam(online.trainable_params(), learning_rate=1e-2)
    step = ms.value_and_grad(loss_fn, None, optimizer.parameters)
    kl_before = float(step(ids, lab, attn)[0].asnumpy())
    for _ in range(40):
        _, grads = step(ids, lab, attn)
        optimizer(grads)
    kl_after = mean_loss(online, ids, lab, attn)
    return dict(online=online, teacher=teacher, teacher_before=teacher_before, batch=(input_ids, mask, labels),
                initial=initial, kl_before=kl_before, kl_after=kl_after)


def test_distillation_pulls_the_student_toward_the_teacher(toy):
    print(f"KL(teacher || student): {toy['kl_before']:.4f} -> {toy['kl_after']:.4f}")
    assert toy["kl_before"] == pytest.approx(toy["initial"], rel=3e-7)  # measured 2.7e-8
    assert toy["kl_before"] > 0.5
    assert toy["kl_after"] < 0.2 * toy["kl_before"]


def test_teacher_is_frozen_and_apart(toy):
    names = [p.name for p in toy["online"].trainable_params()]
    assert names and not any(n.startswith("teacher.") for n in names)
    assert "model.embed_tokens.weight" in names  # the student's names are unchanged
    for param in toy["teacher"].get_parameters():
        assert param.name.startswith("teacher.") and not param.requires_grad
        np.testing.assert_array_equal(param.asnumpy(), toy["teacher_before"][param.name])


def test_offline_topk_with_full_vocabulary_equals_online(toy, tmp_path):
    online, (input_ids, mask, labels) = toy["online"], toy["batch"]
    batches = [dict(input_ids=input_ids[rows], attention_mask=mask[rows]) for rows in (slice(0, 2), slice(2, 4))]
    path = write_teacher_topk(online.teacher, batches, tmp_path / "topk.safetensors", top_k=VOCAB, num_rows=4,
                              seq_length=12, quiet=True)
    cfg = DistillConfig(mode="offline", teacher_logits=str(path), top_k=VOCAB, temperature=1.0, kd_lambda=1.0)
    stored = TeacherTopK(path, cfg, vocab_size=VOCAB)
    values, indices = stored.rows(np.arange(4))
    assert values.shape == indices.shape == (4, 12, VOCAB)
    offline = DistillationModel(online.student, cfg)
    ids, attn, lab = (ms.Tensor(a, ms.int32) for a in (input_ids, mask, labels))
    expected = mean_loss(online, ids, lab, attn)
    got = mean_loss(offline, ids, lab, attn, None, ms.Tensor(values), ms.Tensor(indices))
    assert got == pytest.approx(expected, rel=1e-5)


def write_tokenizer(directory, tokens):
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def test_same_tokenizer_is_accepted_and_a_different_one_is_refused(tmp_path):
    tokens = ["<unk>"] + [f"w{i}" for i in range(VOCAB - 1)]
    student = write_tokenizer(tmp_path / "student", tokens)
    check_same_tokenizer(student, write_tokenizer(tmp_path / "same", tokens))
    swapped = tokens[:1] + tokens[2:3] + tokens[1:2] + tokens[3:]
    with pytest.raises(ConfigError, match="tokenizers of .*student.* and .*swapped.* differ"):
        check_same_tokenizer(student, write_tokenizer(tmp_path / "swapped", swapped))
    (tmp_path / "none").mkdir()
    with pytest.raises(ConfigError, match="none has no tokenizer"):
        check_same_tokenizer(student, tmp_path / "none")


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    reference.qwen2(tmp_path / "teacher", vocab_size=96)
    student_config = config_from_yaml_section(
        dict(architecture="Qwen2ForCausalLM", hidden_size=32, num_hidden_layers=1, **TINY), "student")
    with pytest.raises(ConfigError, match="vocab_size 96 .* differs from the student's 40"):
        load_teacher(DistillConfig(teacher=str(tmp_path / "teacher")), student_config, tmp_path)


@pytest.mark.parametrize("fields, message", [
    (dict(teacher="t", kd_lambda=1.5), "kd_lambda"), (dict(teacher="t", temperature=0), "temperature"),
    (dict(mode="offline", top_k=8), "teacher_logits"), (dict(), "teacher"),
    (dict(mode="offline", teacher_logits="x", top_k=0), "top_k"),
])
def test_bad_config_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(DistillConfig, fields, "train.yaml: distill")


def test_distill_topk_cli_stores_the_teachers_top_logits(tmp_path):
    """`msllm distill-topk` over the shipped tiny SFT set: 260 packed rows; rows 0..51 checked against the teacher."""
    teacher_dir = tmp_path / "teacher"
    reference.qwen2(teacher_dir, vocab_size=512)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (teacher_dir / name).write_bytes((TINY_ASSETS / name).read_bytes())
    config = tmp_path / "kd.yaml"
    config.write_text(f"data: {{kind: sft, path: {TINY_ASSETS / 'sft.jsonl'}, tokenizer: {TINY_ASSETS}, "
                      f"seq_length: 128, packing: true}}\n"
                      f"distill: {{teacher: {teacher_dir}, mode: offline, top_k: 8, teacher_logits: out}}\n")
    output = tmp_path / "top8.safetensors"
    result = CliRunner().invoke(cli.main, ["distill-topk", str(config), str(output), "--batch-size", "52", "-q"])
    assert result.exit_code == 0, result.output
    stored = TeacherTopK(output)
    assert (len(stored), stored.top_k, stored.vocab_size) == (260, 8, 512)
    arrays = build_sequences(load_data_config(config))
    rows = slice(0, 52)
    logits = AutoModelForCausalLM.from_pretrained(teacher_dir)(
        *(ms.Tensor(arrays[key][rows]) for key in ("input_ids", "attention_mask", "position_ids"))).asnumpy()
    values, indices = stored.rows(np.arange(52))
    np.testing.assert_allclose(values, -np.sort(-logits, -1)[..., :8], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(logits, indices.astype(np.int64), -1), values, rtol=0, atol=1e-6)


def test_train_step_differentiates_the_distillation_model(toy):
    """The project's TrainStep takes DistillationModel for a CausalLM: 2 micro-batches, only the student moves."""
    online = toy["online"]
    optimizer = AdamW(online.trainable_params(), OptimizerConfig(),
                      ScheduleConfig(lr=1e-3, total_steps=10, decay="constant"))
    step = TrainStep(online, optimizer, PrecisionConfig(), accumulation_steps=2)
    ids, attn, lab = (ms.Tensor(a, ms.int32) for a in toy["batch"])
    expected = mean_loss(online, ids, lab, attn)
    loss, _, overflow, _ = step(ids, lab, attn)
    assert float(loss.asnumpy()) == pytest.approx(expected, rel=1e-6) and not overflow.asnumpy()
    for param in toy["teacher"].get_parameters():
        np.testing.assert_array_equal(param.asnumpy(), toy["teacher_before"][param.name])
