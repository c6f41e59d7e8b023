"""Tiny random Hugging Face models (the reference implementation), built offline on the CPU.

Each builder saves the model with ``save_pretrained`` so tests load it the way users do.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers

# Every tiny model: 2 layers, a vocabulary of 128, small enough to compile in seconds.
QWEN2 = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, rope_theta=10000.0)
# head_dim 24 != hidden/heads = 16; tied embeddings; q/k RMSNorm.
QWEN3 = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=24, max_position_embeddings=256, tie_word_embeddings=True,
             rope_theta=1000000.0)


def make_hf_model(config_cls, model_cls, directory, seed: int = 0, perturb_norms: bool = True, **fields):
    """Build, randomise and save a tiny model; returns the torch model in eval mode (fp32)."""
    torch.manual_seed(seed)
    # eager attention: on fully padded query rows (left padding) sdpa returns different garbage than eager's
    # softmax over equal scores, and that row's logit predicts the first real token, so it reaches the loss.
    config = config_cls(attn_implementation="eager", **fields)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Norm weights start at 1 and biases at 0: randomise them so a mis-mapped one cannot hide.
            if perturb_norms and ("norm" in name or name.endswith(".bias")):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    return model
# DeepSeek-V3: 3 layers (1 dense, 2 MoE), 8 routed experts in 4 groups, top-2 of the best 2 groups, q_lora, yarn
# with DeepSeek's mscale fields. num_key_value_heads must equal the heads (the config default, 128, would not).
DEEPSEEK_V3 = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                   num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                   max_position_embeddings=256, tie_word_embeddings=False,
                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                                    "mscale_all_dim": 1.0, "original_max_position_embeddings": 64})


def qwen2(directory, **overrides):
    return make_hf_model(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, directory, **{**QWEN2, **overrides})


def qwen3(directory, **overrides):
    return make_hf_model(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, directory, **{**QWEN3, **overrides})


def deepseek_v3(directory, correction_bias_std: float = 0.1, **overrides):
    """A tiny DeepseekV3ForCausalLM whose routers carry a random nonzero e_score_correction_bias (a saved buffer,
    used for expert selection only), so a loader that ignores it picks different experts."""
    model = make_hf_model(transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, directory,
                          **{**DEEPSEEK_V3, **overrides})
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * correction_bias_std)
    model.save_pretrained(directory)
    return model


def random_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0, left_pad: tuple[int, ...] = ()):
    """input_ids, a 0/1 attention mask with `left_pad[b]` padding tokens on row b, and labels (-100 on padding)."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, vocab_size, (batch, seq_len)).astype(np.int64)
    mask = np.ones((batch, seq_len), np.int64)
    for row, pad in enumerate(left_pad):
        mask[row, :pad] = 0
    labels = np.where(mask == 1, input_ids, -100)
    return input_ids, mask, labels


def torch_logits_loss_grads(model, input_ids, mask, labels):
    """The reference's logits, mean loss and every parameter's gradient (by Hugging Face name)."""
    model.zero_grad()
    out = model(torch.tensor(input_ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out.loss.backward()
    grads = {name: p.grad.detach().numpy().copy() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().numpy(), float(out.loss.detach()), grads
