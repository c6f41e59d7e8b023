"""Training FLOPs per token and model FLOPs utilisation (MFU), comparable with published throughput tables.

FLOPs per token ~ 6 * N_active + 12 * L * h * s (Kaplan et al. 2020; PaLM appendix B): forward + backward of
every matmul weight a token passes through, plus the attention scores and weighted sum, counted once (no
discount for the causal mask, none for recompute: this is *model* FLOPs, not hardware FLOPs).
N_active: the matmul weights a token uses — the input embedding excluded (a lookup), norms and biases
excluded, the LM head included; for MoE only ``num_experts_per_tok`` of the routed experts.

What a MoE dispatch actually computes differs: ``executed_flops_per_token`` counts the routed experts as many times
per token as the training dispatch runs them (E x C / S with a capacity, E dense, k grouped): the cost of
padding and of the dense path, kept apart from the model FLOPs that MFU is defined on.
"""
from __future__ import annotations

import math

from mindspore_llm.models.shapes import is_moe, parameter_shapes, routed_slots_per_token

# Dense 16-bit peak TFLOPS per device. 910B variants are quoted between 313 and 414; 313 is the conservative
# figure (a bf16 matmul measured 328). Pass the variant's own figure when you know it.
PEAK_TFLOPS = {"910B": 313.0, "A100": 312.0, "H100": 989.0}


def active_matmul_parameters(config, routed_experts: float | None = None) -> float:
    """Matmul weights a token passes through, with `routed_experts` of the routed experts (default: k)."""
    total = 0
    for name, shape in parameter_shapes(config):
        if name.startswith("model.embed_tokens") or len(shape) == 1:  # a lookup; norms and biases are not matmuls
            continue
        n = math.prod(shape)
        if ".experts." in name:  # stacked routed experts (E, ., .): the share of the experts a token runs on
            n = n * (config.num_experts_per_tok if routed_experts is None else routed_experts) / config.n_routed_experts
        total += n
    if config.tie_word_embeddings:  # the LM head multiplies by the embedding matrix
        total += config.vocab_size * config.hidden_size
    return total


def flops_per_token(config, seq_length: int) -> float:
    return 6.0 * active_matmul_parameters(config) + 12.0 * config.num_hidden_layers * config.hidden_size * seq_length


def executed_flops_per_token(config, seq_length: int) -> float:
    """Training FLOPs per token as the MoE dispatch computes them (unused capacity slots, dense dispatch); equal
    to ``flops_per_token`` for a dense model."""
    if not is_moe(config):
        return flops_per_token(config, seq_length)
    slots = routed_slots_per_token(config, seq_length)
    return (6.0 * active_matmul_parameters(config, slots)
            + 12.0 * config.num_hidden_layers * config.hidden_size * seq_length)


def peak_tflops(device: str | float) -> float:
    """A device type from PEAK_TFLOPS, or a number (TFLOPS) given directly."""
    if isinstance(device, (int, float)):
        return float(device)
    if device not in PEAK_TFLOPS:
        raise ValueError(f"unknown device type {device!r}; known: {', '.join(PEAK_TFLOPS)} (or give TFLOPS)")
    return PEAK_TFLOPS[device]


def throughput(config, seq_length: int, tokens_per_second_per_device: float,
               peak: str | float | None = None) -> dict[str, float]:
    """tokens/s per device -> model TFLOPS per device and, given a peak, MFU (fraction of peak)."""
    tflops = tokens_per_second_per_device * flops_per_token(config, seq_length) / 1e12
    result = {"tokens_per_s_per_device": tokens_per_second_per_device, "model_tflops_per_device": tflops}
    if peak is not None:
        result["mfu"] = tflops / peak_tflops(peak)
    return result
