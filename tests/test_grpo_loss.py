"""The GRPO loss on fixed rollouts against an independent PyTorch implementation written here from the formulas
(DeepSeekMath's GRPO objective, DAPO's clip-higher, the k3 KL estimator, the three aggregations), on
transformers' Qwen2 with the same weights; and one GRPOStep update against torch.optim.AdamW.

Formulas (token t of completion i, completion mask m, N completions, C completion slots):
    ratio = exp(logp - old);  pg = -min(ratio A_i, clamp(ratio, 1 - low, 1 + high) A_i)
    kl = exp(ref - logp) - (ref - logp) - 1;  l = pg + beta kl
    token_mean = sum(l m) / sum(m);  seq_mean_token_mean = mean_i(sum_t l m / sum_t m);  dr_grpo = sum(l m) / (N C)
    A = (r - mean_group) / (std_group + 1e-6) with Bessel's correction; Dr. GRPO: r - mean_group

Tolerances (absolute): loss 1e-6 (measured <= 2.6e-7, losses ~0.03-0.1); every gradient element 1e-5 (measured
<= 1.2e-6, gradients up to ~5e-2); after one AdamW update (eps 1e-3), weights 1e-6 (measured <= 6e-8).
"""
import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from mindspore import ops

from mindspore_llm import AutoModelForCausalLM
from mindspore_llm.generation import position_ids
from mindspore_llm.rl.grpo import GRPOConfig, GRPOLoss, group_advantages, token_weights
from mindspore_llm.train import AdamW, OptimizerConfig, PrecisionConfig, ScheduleConfig
from mindspore_llm.train.step import GRPOStep
from tests import reference

PROMPT, COMPLETION, TEMPERATURE = 5, 6, 0.8
PROMPT_LENGTHS = [5, 3, 4, 2]
COMPLETION_LENGTHS = [6, 3, 1, 4]
ADVANTAGES = np.array([1.2, -0.7, 0.5, -1.1], np.float32)
CLIP_LOW, CLIP_HIGH = 0.2, 0.28


@pytest.fixture(scope="module")
def models(module_dir):
    hf_model = reference.qwen2(module_dir / "qwen2")
    return hf_model, AutoModelForCausalLM.from_pretrained(module_dir / "qwen2")


@pytest.fixture(scope="module")
def rollouts(models):
    """Left-padded prompts + completions; old and reference log-probabilities perturbed from the model's own, so
    that the ratio leaves the clip range on some tokens in both directions."""
    hf_model, _ = models
    rng = np.random.default_rng(0)
    rows = len(PROMPT_LENGTHS)
    ids = rng.integers(1, hf_model.config.vocab_size, (rows, PROMPT + COMPLETION)).astype(np.int32)
    prompt_mask = (np.arange(PROMPT)[None] >= PROMPT - np.array(PROMPT_LENGTHS)[:, None]).astype(np.int32)
    completion_mask = (np.arange(COMPLETION)[None] < np.array(COMPLETION_LENGTHS)[:, None]).astype(np.int32)
    ids[:, :PROMPT][prompt_mask == 0] = 0
    ids[:, PROMPT:][completion_mask == 0] = 0
    mask = np.concatenate([prompt_mask, completion_mask], 1)
    true = torch_log_probs(hf_model, ids, mask).detach().numpy()
    old = ((true + rng.normal(0, 0.3, true.shape)) * completion_mask).astype(np.float32)
    ref = ((true + rng.normal(0, 0.3, true.shape)) * completion_mask).astype(np.float32)
    return dict(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), old_log_probs=old,
                ref_log_probs=ref, advantages=ADVANTAGES, completion_mask=completion_mask)


def torch_log_probs(hf_model, ids, mask):
    positions = torch.tensor(position_ids(mask), dtype=torch.long)
    logits = hf_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                      position_ids=positions).logits
    log_probs = torch.log_softmax(logits[:, PROMPT - 1:-1] / TEMPERATURE, -1)
    return log_probs.gather(-1, torch.tensor(ids[:, PROMPT:], dtype=torch.long)[..., None]).squeeze(-1)


def torch_grpo_loss(hf_model, batch, aggregation, beta):
    logp = torch_log_probs(hf_model, batch["input_ids"], batch["attention_mask"])
    old, ref = torch.tensor(batch["old_log_probs"]), torch.tensor(batch["ref_log_probs"])
    advantages = torch.tensor(batch["advantages"])[:, None]
    m = torch.tensor(batch["completion_mask"], dtype=torch.float32)
    ratio = torch.exp(logp - old)
    pg = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH) * advantages)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token = pg + beta * kl
    if aggregation == "token_mean":
        loss = (per_token * m).sum() / m.sum()
    elif aggregation == "seq_mean_token_mean":
        loss = ((per_token * m).sum(1) / m.sum(1)).mean()
    else:
        loss = (per_token * m).sum() / (m.shape[0] * COMPLETION)
    clipped = ((ratio < 1 - CLIP_LOW) & (advantages < 0)) | ((ratio > 1 + CLIP_HIGH) & (advantages > 0))
    return loss, float((clipped.float() * m).sum() / m.sum())


def grpo_config(aggregation, beta):
    return GRPOConfig(prompts="unused.jsonl", temperature=TEMPERATURE, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                      beta=beta, loss_aggregation=aggregation)


def ms_inputs(batch, aggregation):
    mask = batch["completion_mask"]
    weights = token_weights(mask, aggregation, COMPLETION, len(mask), float(mask.sum()))
    names = ("input_ids", "attention_mask", "position_ids", "old_log_probs", "ref_log_probs", "advantages")
    return [ms.Tensor(batch[n]) for n in names] + [ms.Tensor(weights)]


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "dr_grpo"])
def test_loss_and_gradients_equal_the_pytorch_formulas(models, rollouts, aggregation, beta):
    hf_model, model = models
    hf_model.zero_grad()
    reference_loss, clip_fraction = torch_grpo_loss(hf_model, rollouts, aggregation, beta)
    reference_loss.backward()
    assert 0.1 < clip_fraction < 0.9  # the clipped branch is taken on some tokens, not all
    params = model.trainable_params()
    loss_fn = GRPOLoss(model, grpo_config(aggregation, beta), PROMPT)
    multiplier = ms.Tensor(np.ones(len(ADVANTAGES), np.float32))
    (loss, statistics), grads = ops.value_and_grad(loss_fn, None, params, has_aux=True)(
        *ms_inputs(rollouts, aggregation), multiplier)
    assert float(loss.asnumpy()) == pytest.approx(float(reference_loss), abs=1e-6)
    counted = rollouts["completion_mask"].sum()
    assert float(statistics.asnumpy()[1]) / counted == pytest.approx(clip_fraction, abs=1e-6)
    reference_grads = {name: p.grad.numpy() for name, p in hf_model.named_parameters()}
    for param, grad in zip(params, grads):
        expected = reference_grads[param.name]
        error = np.abs(grad.asnumpy() - expected).max()
        assert error <= 1e-5, (param.name, error)


def test_advantages_follow_the_group_formulas():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5])
    grouped = torch.tensor(rewards).reshape(2, 4)
    scaled = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)
    np.testing.assert_allclose(group_advantages(rewards, 4), scaled.reshape(-1).numpy(), rtol=1e-6)
    centred = grouped - grouped.mean(1, keepdim=True)
    np.testing.assert_allclose(group_advantages(rewards, 4, "none"), centred.reshape(-1).numpy(), rtol=1e-6)
    assert (group_advantages(np.ones(4), 4) == 0).all()  # a group in full agreement teaches nothing


def test_one_update_with_accumulation_equals_torch_adamw(rollouts, module_dir):
    """GRPOStep on 2 micro-batches of 2, seq_mean_token_mean with the KL term, clipping at 0.5: the loss and the
    weights after one AdamW update equal one torch step on the whole batch of 4."""
    hf_model = transformers.Qwen2ForCausalLM.from_pretrained(module_dir / "qwen2", attn_implementation="eager")
    model = AutoModelForCausalLM.from_pretrained(module_dir / "qwen2")
    # eps 1e-3: the first Adam update is lr g / (|g| + eps), so near-zero gradients do not amplify rounding
    optimizer_cfg = OptimizerConfig(beta1=0.9, beta2=0.99, eps=1e-3, weight_decay=0.1, clip_grad_norm=0.5)
    schedule = ScheduleConfig(lr=1e-3, min_lr=1e-3, warmup_steps=0, total_steps=10, decay="constant")
    step = GRPOStep(model, AdamW(model.trainable_params(), optimizer_cfg, schedule), PrecisionConfig(), 2,
                    optimizer_cfg.clip_grad_norm, grpo=grpo_config("seq_mean_token_mean", 0.04), prompt_length=PROMPT)
    loss, grad_norm, overflow, _, _ = step(*ms_inputs(rollouts, "seq_mean_token_mean"))

    reference_loss, _ = torch_grpo_loss(hf_model, rollouts, "seq_mean_token_mean", 0.04)
    params = list(hf_model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.99), eps=1e-3)
    reference_loss.backward()
    reference_norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
    optimizer.step()
    assert not bool(overflow.asnumpy()) and float(reference_norm) > 0.5  # clipping acts
    assert float(loss.asnumpy()) == pytest.approx(float(reference_loss), rel=1e-5)
    assert float(grad_norm.asnumpy()) == pytest.approx(float(reference_norm), rel=1e-5)
    expected = dict(hf_model.named_parameters())
    for param in model.trainable_params():
        error = np.abs(param.asnumpy() - expected[param.name].detach().numpy()).max()
        assert error <= 1e-6, (param.name, error)
