"""The training step against a PyTorch + transformers training loop (the reference), graph mode on CPU.

Reference loop: transformers' Qwen2ForCausalLM, its loss with ``num_items_in_batch`` (sum of token losses over the
tokens of all micro-batches), torch.optim.AdamW with two parameter groups (matrices decay; norms and biases do not),
torch.nn.utils.clip_grad_norm_, and transformers' warmup + cosine-to-min_lr scheduler shifted so that update s uses
the multiplier at s (our schedule counts updates from 1).

Tolerances, each within ~10x of the error measured here: per-step loss 3e-6 relative (measured 4.2e-7); pre-clip
grad norm 2e-6 relative (measured 1.9e-7); final weights, per parameter, L2 of the difference <= 2e-4 of the
weight's (measured 3.2e-5) and max|Δ| <= 1e-3 * max|w| (measured 1.2e-4: single elements, where Adam amplified
a rounding difference; torch's own fp32 run is 2.7e-5 from its float64 run). One AdamW update, fused kernel and
decomposition, against torch's step in float64: weights 3e-7 * max (measured 8.8e-8), moments 1e-6 (2.7e-7).
Accumulation K=4 vs one batch of 4b: first moments 3e-6 * max (measured 5.2e-7), weights 1e-4 * the update's rate
(measured 1.2e-5). fp16 O2 loss curve within 5e-4 of fp32 per step (measured 7e-5). Data parallel over 2 CPU
processes (msrun) vs accumulation 2 in one process on the same rows: losses and weights equal to 1e-6 relative
(measured: bit-identical), and an overflow on one rank skips the update on both.
"""
import math
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers

from mindspore_llm import AutoModelForCausalLM
from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import from_dict
from mindspore_llm.train import (AdamW, LearningRate, OptimizerConfig, PrecisionConfig, ScheduleConfig, TrainStep,
                                 learning_rate, param_groups)
from tests import reference

STEPS, ACCUMULATION, MICRO_BATCH, SEQ = 20, 2, 2, 16
OPTIMIZER = OptimizerConfig(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, clip_grad_norm=2.2)
SCHEDULE = ScheduleConfig(lr=3e-3, min_lr=3e-4, warmup_steps=5, total_steps=STEPS, decay="cosine")


def sft_like_batch(rng, rows: int, seq_len: int, vocab_size: int):
    """Right-padded rows of random length with an unlabelled prompt prefix, so rows count different numbers of
    tokens: input_ids, 0/1 attention mask, labels (-100 on prompt and padding)."""
    # learnable: each row counts up by a row-specific stride from a random start
    starts, strides = rng.integers(0, vocab_size, (rows, 1)), rng.integers(1, 4, (rows, 1))
    input_ids = ((starts + strides * np.arange(seq_len)[None, :]) % vocab_size).astype(np.int64)
    positions = np.arange(seq_len)[None, :]
    lengths = rng.integers(seq_len // 2, seq_len + 1, (rows, 1))
    prompts = rng.integers(0, seq_len // 3, (rows, 1))
    mask = (positions < lengths).astype(np.int64)
    labels = np.where((positions < lengths) & (positions >= prompts), input_ids, -100)
    return input_ids, mask, labels


def counted_tokens(labels) -> int:
    return int((labels[:, 1:] != -100).sum())


def torch_training_run(directory, batches, accumulation: int, optimizer_cfg: OptimizerConfig,
                       schedule: ScheduleConfig):
    """The reference loop; returns per-step losses, pre-clip grad norms and the final weights by name."""
    model = transformers.Qwen2ForCausalLM.from_pretrained(directory, attn_implementation="eager").train()
    params = [p for p in model.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optimizer_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=schedule.lr, betas=(optimizer_cfg.beta1, optimizer_cfg.beta2), eps=optimizer_cfg.eps)
    scheduler = transformers.get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, schedule.warmup_steps, schedule.total_steps, min_lr=schedule.min_lr)
    with warnings.catch_warnings():  # one step ahead on purpose: update s uses the multiplier at s
        warnings.simplefilter("ignore")
        scheduler.step()
    losses, norms = [], []
    for input_ids, mask, labels in batches:
        total = torch.tensor(counted_tokens(labels))
        optimizer.zero_grad()
        step_loss = 0.0
        for k in range(accumulation):
            rows = slice(k * len(input_ids) // accumulation, (k + 1) * len(input_ids) // accumulation)
            out = model(torch.tensor(input_ids[rows]), attention_mask=torch.tensor(mask[rows]),
                        labels=torch.tensor(labels[rows]), num_items_in_batch=total)
            out.loss.backward()
            step_loss += float(out.loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, optimizer_cfg.clip_grad_norm)))
        optimizer.step()
        scheduler.step()
        losses.append(step_loss)
    return losses, norms, {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


def ms_train_step(directory, accumulation: int, precision: PrecisionConfig = PrecisionConfig(),
                  optimizer_cfg: OptimizerConfig = OPTIMIZER, schedule: ScheduleConfig = SCHEDULE):
    model = AutoModelForCausalLM.from_pretrained(directory, compute_dtype=precision.compute_dtype)
    optimizer = AdamW(model.trainable_params(), optimizer_cfg, schedule)
    return TrainStep(model, optimizer, precision, accumulation, optimizer_cfg.clip_grad_norm)


def run(step, batch):
    input_ids, mask, labels = (ms.Tensor(a, ms.int32) for a in batch)
    loss, norm, overflow, scale = step(input_ids, labels, mask, None)
    return float(loss.asnumpy()), float(norm.asnumpy()), bool(overflow.asnumpy()), float(scale.asnumpy())


def state(step, prefix=""):
    return {name: p.asnumpy().copy() for name, p in step.parameters_dict().items() if name.startswith(prefix)}


def weights(step):
    return {name: value for name, value in state(step).items() if not name.startswith(("optimizer.", "loss_scale."))}


@pytest.fixture(scope="module")
def model_dir(module_dir):
    reference.qwen2(module_dir / "qwen2")
    return module_dir / "qwen2"


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(7)
    return [sft_like_batch(rng, ACCUMULATION * MICRO_BATCH, SEQ, reference.QWEN2["vocab_size"])
            for _ in range(STEPS)]


@pytest.fixture(scope="module")
def torch_run(model_dir, batches):
    return torch_training_run(model_dir, batches, ACCUMULATION, OPTIMIZER, SCHEDULE)


@pytest.fixture(scope="module")
def fp32_run(model_dir, batches):
    step = ms_train_step(model_dir, ACCUMULATION)
    results = [run(step, batch) for batch in batches]
    return results, state(step)


def test_fp32_losses_match_reference_loop(torch_run, fp32_run):
    ref_losses, ref_norms, _ = torch_run
    results, _ = fp32_run
    losses = [r[0] for r in results]
    np.testing.assert_allclose(losses, ref_losses, rtol=3e-6)
    np.testing.assert_allclose([r[1] for r in results], ref_norms, rtol=2e-6)
    assert losses[-1] < losses[0] - 0.1  # it trains
    assert not any(r[2] for r in results)


def test_clipping_triggered_on_some_steps_only(torch_run):
    _, ref_norms, _ = torch_run
    clipped = [norm > OPTIMIZER.clip_grad_norm for norm in ref_norms]
    assert any(clipped) and not all(clipped), ref_norms


def test_fp32_final_weights_match_reference_loop(torch_run, fp32_run):
    _, _, ref_weights = torch_run
    _, weights = fp32_run
    for name, ref in ref_weights.items():
        difference = weights[name] - ref
        assert np.linalg.norm(difference) <= 2e-4 * np.linalg.norm(ref), name
        assert np.abs(difference).max() <= 1e-3 * np.abs(ref).max(), name


def test_accumulation_of_4_equals_one_step_on_the_concatenated_batch(model_dir):
    rng = np.random.default_rng(11)
    batch = sft_like_batch(rng, 4 * MICRO_BATCH, SEQ, reference.QWEN2["vocab_size"])
    per_micro = [counted_tokens(batch[2][k * MICRO_BATCH:(k + 1) * MICRO_BATCH]) for k in range(4)]
    assert len(set(per_micro)) > 1, per_micro  # unequal token counts: a mean of means would differ
    accumulated, whole = ms_train_step(model_dir, 4), ms_train_step(model_dir, 1)
    stacked = tuple(a.reshape(4, MICRO_BATCH, SEQ) for a in batch)  # the (K, b, S) form of the same rows
    loss_accumulated, loss_whole = run(accumulated, stacked)[0], run(whole, batch)[0]
    assert loss_accumulated == pytest.approx(loss_whole, rel=1e-6)
    moments_accumulated, moments_whole = state(accumulated, "optimizer.exp_avg."), state(whole, "optimizer.exp_avg.")
    weights_accumulated, weights_whole = weights(accumulated), weights(whole)
    for name, ref in moments_whole.items():  # first moment = (1 - beta1) * gradient after one update
        assert np.abs(moments_accumulated[name] - ref).max() <= 3e-6 * np.abs(ref).max(), name
    # Adam's first update moves every weight by up to the rate (m / sqrt(v) = g / (|g| + eps)): the bound is
    # relative to the rate. Where |g| is within 100 eps of 0 the step is rounding noise, not arithmetic (k_proj's
    # bias: softmax ignores a score shift shared by all keys, so its true gradient is 0), so those are left out.
    rate = learning_rate(1, SCHEDULE)
    for name, ref in weights_whole.items():
        meaningful = np.abs(moments_whole["optimizer.exp_avg." + name]) / (1 - OPTIMIZER.beta1) > 100 * OPTIMIZER.eps
        assert np.abs(weights_accumulated[name] - ref)[meaningful].max(initial=0) <= 1e-4 * rate, name


@pytest.fixture(scope="module")
def fp16_step(model_dir):
    precision = PrecisionConfig(level="O2", compute_dtype="fp16", loss_scale="dynamic", initial_scale=2.0 ** 12,
                                growth_interval=4)
    return ms_train_step(model_dir, ACCUMULATION, precision)


def test_fp16_o2_tracks_fp32_loss_curve(fp16_step, fp32_run, batches):
    results = [run(fp16_step, batch) for batch in batches]
    fp32_losses = np.array([r[0] for r in fp32_run[0]])
    np.testing.assert_allclose([r[0] for r in results], fp32_losses, rtol=5e-4)
    # the dynamic scale follows its rule: x2 after every 4 clean steps, /2 on an overflow
    scale, clean = 2.0 ** 12, 0
    for _, _, overflow, reported in results:
        clean = 0 if overflow else clean + 1
        scale = scale * 0.5 if overflow else scale
        if clean == 4:
            scale, clean = scale * 2, 0
        assert reported == scale


def test_fp16_overflow_step_is_skipped_and_scale_halved(fp16_step, batches):
    # 2^40 is far beyond fp16's range (65504): the scaled backward pass overflows to inf
    fp16_step.scale.set_data(ms.Tensor(2.0 ** 40, ms.float32))
    before = state(fp16_step)
    loss, _, overflow, scale = run(fp16_step, batches[0])
    after = state(fp16_step)
    assert overflow and math.isfinite(loss)
    assert scale == 2.0 ** 39 and int(after["loss_scale.clean_steps"]) == 0
    for name, value in before.items():
        if not name.startswith("loss_scale."):
            np.testing.assert_array_equal(after[name], value, err_msg=name)  # weights, moments, step count


@pytest.mark.parametrize("decay, hf_scheduler", [
    ("cosine", lambda opt, cfg: transformers.get_cosine_with_min_lr_schedule_with_warmup(
        opt, cfg.warmup_steps, cfg.total_steps, min_lr=cfg.min_lr)),
    ("linear", lambda opt, cfg: transformers.get_polynomial_decay_schedule_with_warmup(
        opt, cfg.warmup_steps, cfg.total_steps, lr_end=cfg.min_lr, power=1.0)),
    ("constant", lambda opt, cfg: transformers.get_constant_schedule_with_warmup(opt, cfg.warmup_steps)),
])
def test_schedule_equals_transformers_and_graph_version(decay, hf_scheduler):
    cfg = ScheduleConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=100, decay=decay)
    scheduler = hf_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr), cfg)
    steps = [1, 5, 10, 11, 37, 50, 99, 100]
    reference_rates = [cfg.lr * scheduler.lr_lambdas[0](s) for s in steps]
    rates = [learning_rate(s, cfg) for s in steps]
    np.testing.assert_allclose(rates, reference_rates, rtol=1e-15)  # float64 arithmetic: measured 1.7e-16
    graph = LearningRate(cfg)
    np.testing.assert_allclose([float(graph(ms.Tensor(s, ms.int32)).asnumpy()) for s in steps], rates, rtol=1e-6)


def test_schedule_closed_form():
    cfg = ScheduleConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110, decay="cosine")
    assert learning_rate(5, cfg) == pytest.approx(5e-4)
    assert learning_rate(10, cfg) == pytest.approx(1e-3)
    assert learning_rate(60, cfg) == pytest.approx(5.5e-4)  # half-way: the mean of lr and min_lr
    assert learning_rate(110, cfg) == pytest.approx(1e-4)
    assert learning_rate(500, cfg) == pytest.approx(1e-4)  # stays at min_lr after total_steps


def one_adamw_step(fused: bool, apply: bool, grads, state, steps_taken: int):
    """One AdamW update of a (6, 40) matrix (decays) and a (40,) vector (does not) from `state`; returns the
    parameters, first and second moments after it."""
    params = [ms.Parameter(ms.Tensor(state[0][k]), name=name) for k, name in enumerate(("matrix", "vector"))]
    optimizer = AdamW(params, OPTIMIZER, SCHEDULE, fused=fused)
    assert optimizer.fused == fused
    for moments, values in zip((optimizer.exp_avg, optimizer.exp_avg_sq), state[1:]):
        for moment, value in zip(moments, values):
            moment.set_data(ms.Tensor(value))
    optimizer.step.set_data(ms.Tensor(steps_taken, ms.int32))
    optimizer(tuple(ms.Tensor(g) for g in grads), ms.Tensor(apply))
    return [[p.asnumpy() for p in group] for group in (params, optimizer.exp_avg, optimizer.exp_avg_sq)]


def float64_adamw_step(t, wd, p, m, v, g):
    """torch.optim.AdamW's single-tensor step in float64: the parameter and moments after update `t`."""
    lr, beta1, beta2, eps = learning_rate(t, SCHEDULE), OPTIMIZER.beta1, OPTIMIZER.beta2, OPTIMIZER.eps
    m, v = m + (g - m) * (1 - beta1), v * beta2 + g * g * (1 - beta2)
    return p * (1 - lr * wd) - lr / (1 - beta1 ** t) * m / (np.sqrt(v) / math.sqrt(1 - beta2 ** t) + eps), m, v


def test_fused_and_decomposed_adamw_equal_float64_torch_arithmetic():
    rng = np.random.default_rng(5)
    shapes, decays = [(6, 40), (40,)], (OPTIMIZER.weight_decay, 0.0)
    # per-element gradient scales over 8 decades, from below eps (1e-8) to 1e-1, so eps matters for some
    scales = [10.0 ** rng.uniform(-9, -1, shape) for shape in shapes]
    state = [[rng.standard_normal(shape) for shape in shapes], [np.zeros(shape) for shape in shapes],
             [np.zeros(shape) for shape in shapes]]
    for t in (1, 2, 3):  # three updates of history, so the moments are an AdamW run's
        updated = [float64_adamw_step(t, wd, *values, rng.standard_normal(scale.shape) * scale)
                   for wd, *values, scale in zip(decays, *state, scales)]
        state = [[u[i].astype(np.float32) for u in updated] for i in range(3)]
    grads = [(rng.standard_normal(scale.shape) * scale).astype(np.float32) for scale in scales]
    updated = [float64_adamw_step(4, wd, *(np.float64(a) for a in values), np.float64(g))
               for wd, *values, g in zip(decays, *state, grads)]
    expected = [[u[i] for u in updated] for i in range(3)]
    bad = [np.where(rng.random(g.shape) < 0.5, np.inf, np.nan).astype(np.float32) for g in grads]
    for fused in (True, False):
        # measured, of the largest value: weights 3.9e-8 fused, 8.8e-8 decomposed (under an fp32 ulp); moments
        # 2.7e-7 for both (1 - beta rounded to fp32)
        bounds = (3e-7, 1e-6, 1e-6)
        for group, references, bound in zip(one_adamw_step(fused, True, grads, state, 3), expected, bounds):
            for value, reference_value in zip(group, references):
                assert np.abs(value - reference_value).max() <= bound * np.abs(reference_value).max(), fused
        # a skipped step (non-finite gradients) leaves every value as it was, bit for bit: mid-run, and as the
        # first step (zero moments, no bias correction yet)
        fresh = [state[0], [np.zeros_like(p) for p in state[0]], [np.zeros_like(p) for p in state[0]]]
        for start, steps_taken in ((state, 3), (fresh, 0)):
            for group, before in zip(one_adamw_step(fused, False, bad, start, steps_taken), start):
                for value, reference_value in zip(group, before):
                    np.testing.assert_array_equal(value, reference_value)


def test_fused_adamw_is_the_cpu_default_and_needs_fp32_parameters():
    vector = [ms.Parameter(ms.Tensor(np.zeros(4, np.float32)), name="vector")]
    assert AdamW(vector, OPTIMIZER, SCHEDULE).fused  # the tests run on CPU
    half = [ms.Parameter(ms.Tensor(np.zeros(4, np.float16)), name="half")]
    assert not AdamW(half, OPTIMIZER, SCHEDULE, fused=True).fused  # AdamWeightDecay updates fp32 weights only


def test_no_weight_decay_on_norms_and_biases(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    decay, no_decay = param_groups(model.trainable_params())
    assert all(p.name.endswith(".bias") or "norm" in p.name for p in no_decay)
    assert all(p.name.endswith(".weight") and "norm" not in p.name for p in decay)
    assert len(decay) + len(no_decay) == len(model.trainable_params())


def test_bad_config_values_name_the_field():
    with pytest.raises(ConfigError, match="warmup_steps"):
        from_dict(ScheduleConfig, {"warmup_steps": 200, "total_steps": 100}, "train.yaml: schedule")
    with pytest.raises(ConfigError, match="compute_dtype"):
        from_dict(PrecisionConfig, {"level": "O0", "compute_dtype": "fp16"}, "train.yaml: precision")


DP_WORKER = """
import sys
import numpy as np
import mindspore as ms
from mindspore import nn
from mindspore.communication import get_rank, init

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
init()
ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
from mindspore_llm import AutoModelForCausalLM
from mindspore_llm.train import AdamW, PrecisionConfig, TrainStep
from tests import test_train_step as t

model_dir, out_dir = sys.argv[1], sys.argv[2]
rank = get_rank()
model = AutoModelForCausalLM.from_pretrained(model_dir)
optimizer = AdamW(model.trainable_params(), t.OPTIMIZER, t.SCHEDULE)
step = TrainStep(model, optimizer, PrecisionConfig(), 1, t.OPTIMIZER.clip_grad_norm,
                 grad_reducer=nn.DistributedGradReducer(optimizer.parameters, mean=False), data_parallel=2)
rows = slice(rank * t.MICRO_BATCH, (rank + 1) * t.MICRO_BATCH)
results = [t.run(step, tuple(a[rows] for a in batch)) for batch in t.dp_batches()]
trained = t.weights(step)
# only rank 1's gradients overflow (its loss scale is fp32's largest): every rank must skip the update
if rank == 1:
    step.scale.set_data(ms.Tensor(3e38, ms.float32))
skipped = t.run(step, tuple(a[rows] for a in t.dp_batches()[0]))[2]
unchanged = all(np.array_equal(value, trained[name]) for name, value in t.weights(step).items())
np.savez(f"{out_dir}/rank{rank}.npz", losses=np.array([r[0] for r in results]),
         norms=np.array([r[1] for r in results]), skipped=skipped, unchanged=unchanged, **trained)
"""


def dp_batches():
    rng = np.random.default_rng(3)
    return [sft_like_batch(rng, 2 * MICRO_BATCH, SEQ, reference.QWEN2["vocab_size"]) for _ in range(3)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_data_parallel_over_2_processes_equals_accumulation_in_one(model_dir, module_dir):
    batches = dp_batches()
    counts = [[counted_tokens(labels[k * MICRO_BATCH:(k + 1) * MICRO_BATCH]) for k in range(2)]
              for _, _, labels in batches]
    assert all(a != b for a, b in counts), counts  # ranks count different tokens: per-rank means would differ
    out_dir = module_dir / "data_parallel"
    out_dir.mkdir()
    worker = out_dir / "worker.py"
    worker.write_text(textwrap.dedent(DP_WORKER))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    msrun = Path(sys.executable).with_name("msrun")
    result = subprocess.run([str(msrun), "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
                             "--join=True", f"--log_dir={out_dir / 'logs'}", str(worker), str(model_dir),
                             str(out_dir)], cwd=out_dir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    single = ms_train_step(model_dir, 2)
    results = [run(single, batch) for batch in batches]
    expected = weights(single)
    for rank in range(2):
        saved = np.load(out_dir / f"rank{rank}.npz")
        np.testing.assert_allclose(saved["losses"], [r[0] for r in results], rtol=1e-6)
        # the global gradient norm (so the clip factor and the finite check) is every rank's, and the 1-process one
        np.testing.assert_allclose(saved["norms"], [r[1] for r in results], rtol=1e-6)
        assert saved["skipped"] and saved["unchanged"], rank  # one rank's overflow skips the step on both
        for name, ref in expected.items():
            assert np.abs(saved[name] - ref).max() <= 1e-6 * np.abs(ref).max(), (rank, name)
