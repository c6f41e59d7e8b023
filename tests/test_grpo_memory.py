"""The planner's GRPO terms against a hand calculation: the reference policy (a frozen copy, or nothing with LoRA),
the rollout buffers, and the KV cache that generation holds in place of the training step's activations."""
import dataclasses

import pytest

from mindspore_llm.lora import LoraConfig
from mindspore_llm.models.qwen import QwenConfig
from mindspore_llm.parallel.config import ParallelConfig
from mindspore_llm.parallel.memory import GB, TRAINING_TRANSIENT, PlanInputs, Workload, estimate_memory, plan_report
from mindspore_llm.rl.grpo import GRPOConfig

TINY_QWEN = QwenConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, qkv_bias=True)  # head_dim 16
GRPO = GRPOConfig(prompts="p.jsonl", max_prompt_length=24, max_new_tokens=9, beta=0.04)
PARALLEL = ParallelConfig(model_parallel=2)
WORK = Workload(seq_length=33, micro_batch_size=4, compute_bytes=2)  # O2: 16-bit activations
ROLLOUTS = 16


def test_grpo_terms_equal_a_hand_calculation():
    plain = estimate_memory(TINY_QWEN, PARALLEL, WORK)[0]
    stage = estimate_memory(TINY_QWEN, PARALLEL, WORK, grpo=GRPO, rollouts=ROLLOUTS)[0]
    # the reference: every parameter again, fp32 plus its 16-bit compute copy, split like the policy
    assert stage.terms["reference model"] == plain.terms["fp32 weights"] + plain.terms["compute weights"]
    # ids, mask, positions (int32, 33 slots); old and reference log-probabilities and weights (fp32, 9 slots)
    assert stage.terms["rollout buffers"] == ROLLOUTS * (3 * 4 * 33 + 3 * 4 * 9)
    # 16 rows x 32 slots (24 + 9 - 1) x keys and values of 2 kv heads x 16 over tp 2 x 2 bytes x 4 layers
    assert stage.rollout["kv cache (rollout)"] == 16 * 32 * (2 * 2 * 16 / 2) * 2 * 4
    assert stage.rollout["sampler"] == 3 * 4 * 16 * 256
    transient = sum(stage.terms[t] for t in TRAINING_TRANSIENT)
    persistent = sum(stage.terms.values()) - transient
    assert stage.total == persistent + max(transient, sum(stage.rollout.values()))


def test_lora_reference_costs_nothing_and_beta_zero_needs_no_reference():
    lora = LoraConfig(rank=4, target_modules=["q_proj", "v_proj"])
    with_lora = estimate_memory(TINY_QWEN, PARALLEL, WORK, lora, grpo=GRPO, rollouts=ROLLOUTS)[0]
    no_kl = estimate_memory(TINY_QWEN, PARALLEL, WORK, grpo=dataclasses.replace(GRPO, beta=0.0),
                            rollouts=ROLLOUTS)[0]
    assert with_lora.terms["reference model"] == no_kl.terms["reference model"] == 0


def test_generation_batch_size_bounds_the_cache():
    whole = estimate_memory(TINY_QWEN, PARALLEL, WORK, grpo=GRPO, rollouts=ROLLOUTS)[0]
    quarter = estimate_memory(TINY_QWEN, PARALLEL, WORK, grpo=dataclasses.replace(GRPO, generation_batch_size=4),
                              rollouts=ROLLOUTS)[0]
    assert quarter.rollout["kv cache (rollout)"] == whole.rollout["kv cache (rollout)"] / 4


def test_32b_grpo_lora_plan():
    """DeepSeek-R1-Distill-Qwen-32B, GRPO-LoRA on 16 devices (tp 8 x dp 2), 1K prompts + 7K new tokens, 64
    rollouts per replica and step generated 16 at a time: the printed plan names the GRPO terms and fits 58 GB."""
    qwen = QwenConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                      num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=131072)
    grpo = GRPOConfig(prompts="p.jsonl", max_prompt_length=1024, max_new_tokens=7168, generation_batch_size=16)
    parallel = ParallelConfig(data_parallel=2, model_parallel=8, sequence_parallel=True, vocab_parallel=True,
                              recompute="full")
    lora = LoraConfig(rank=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    inputs = PlanInputs("32b grpo lora", qwen, parallel, Workload(8192, 1, 2), None, 1, 64, lora, grpo=grpo)
    text, fits = plan_report(inputs, 16, 58)
    print(text)
    assert "reference: the base with adapters off (no copy)" in text and "kv cache (rollout)" in text
    stage = estimate_memory(qwen, parallel, Workload(8192, 1, 2), lora, grpo=grpo, rollouts=64)[0]
    # 16 rows x 8191 slots x 2 x 8 kv heads x 128 / tp 8 x 2 bytes x 64 layers
    assert stage.rollout["kv cache (rollout)"] == pytest.approx(16 * 8191 * 2 * 8 * 128 / 8 * 2 * 64)
    assert fits and stage.total < 58 * GB
