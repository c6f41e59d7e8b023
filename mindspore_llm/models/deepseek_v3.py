"""DeepSeek-V3 / R1 (https://arxiv.org/abs/2412.19437): multi-head latent attention and DeepSeekMoE.

The decoder reads like the paper:
  - every layer: MLA — low-rank queries (or a plain q_proj when ``q_lora_rank`` is null), one compressed KV latent
    per token, rope on the ``qk_rope_head_dim`` slice only, one rotary key shared by all heads; with yarn rope
    the softmax scale is multiplied by mscale(factor, mscale_all_dim)^2 (§2.1.1 and the reference).
  - layers < ``first_k_dense_replace``: a dense SwiGLU MLP; the rest: DeepSeekMoE — ``n_shared_experts`` always-on
    experts plus ``n_routed_experts`` routed ones, top-``num_experts_per_tok`` by sigmoid affinity within the
    ``topk_group`` best of ``n_group`` groups (§2.1.2).
  - aux-loss-free balancing (§2.1.2): after each optimizer step, ``moe.update_expert_bias`` moves every expert's
    selection bias by γ·sign(mean load − its load); an optional sequence-wise balance loss (α) joins the loss.
  - training dispatches tokens to experts with a capacity (``moe_dispatch``, ``moe_capacity_factor``,
    ``moe_drop_policy``; GShard-style, not in the report, which dispatches dropless with custom all-to-all kernels);
    evaluation and generation are dropless (models/moe.py).
Multi-token-prediction modules (checkpoint layer index = num_hidden_layers) are not implemented: loading skips
their tensors with a notice.

This file: the config, the builder and the checkpoint mapping; the blocks are models/mla.py and models/moe.py.
"""
from __future__ import annotations

import logging
import math
import re

import mindspore as ms
from mindspore import ops

from mindspore_llm.checkpoint import layer_index
from mindspore_llm.models.config import DeepseekV3Config
from mindspore_llm.models.layers import CausalLM, DecoderLayer, DecoderModel, Precision, RotaryEmbedding, SwiGLU
from mindspore_llm.models.mla import MultiHeadLatentAttention
from mindspore_llm.models.moe import DeepSeekMoE, GroupLimitedTopKRouter, aux_loss_multipliers, set_aux_loss_multiplier

log = logging.getLogger("mindspore_llm")


def softmax_scale(config: DeepseekV3Config) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under rope scaling, as the reference's
    yarn_apply_mscale (yarn stretches positions; this keeps attention entropy where pretraining left it)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rope = config.rope
    if rope.rope_type != "default" and rope.mscale_all_dim and rope.factor > 1:
        mscale = 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0
        scale *= mscale * mscale
    return scale


class DeepseekV3ForCausalLM(CausalLM):
    """CausalLM whose ``loss`` adds the MoE layers' sequence-wise balance loss when ``seq_aux_loss_alpha`` > 0:
    mean token loss + each MoE layer's balance loss averaged over the batch's sequences. Its gradient enters inside
    each MoE layer (``moe.AuxLossGradient``) with the weight ``loss`` sets here; ``TrainStep`` sets its own (the
    same objective over all micro-batches and ranks of a step)."""

    STATISTICS_SUFFIXES = (".tokens_per_expert", ".dropped_slots", ".aux_loss", ".aux_loss_multiplier")

    def __init__(self, config: DeepseekV3Config, model: DecoderModel, precision: Precision):
        super().__init__(config, model, precision)
        self.moe_layer_ids = tuple(range(config.first_k_dense_replace, config.num_hidden_layers))
        self.with_aux_loss = config.seq_aux_loss_alpha > 0
        self.aux_loss_multipliers = aux_loss_multipliers(self)

    def loss(self, input_ids, labels, attention_mask=None, position_ids=None):
        if self.with_aux_loss:
            set_aux_loss_multiplier(self.aux_loss_multipliers,
                                    ops.full((), 1.0 / input_ids.shape[0], dtype=ms.float32))
        total, count = self.loss_sum(input_ids, labels, attention_mask, position_ids)
        loss = total / ops.maximum(count, 1.0)
        if self.with_aux_loss:
            for i in self.moe_layer_ids:
                loss = loss + self.model.layers[i].mlp.aux_loss
        return loss

    def checkpoint_arrays(self, arrays=None):
        """Stacked experts leave as the per-expert tensors real checkpoints hold."""
        for name, array in super().checkpoint_arrays(arrays):
            names = checkpoint_names(name, self.config.n_routed_experts)
            if len(names) == 1:
                yield name, array
            else:
                yield from zip(names, array)

    def checkpoint_sources(self, name: str) -> list[str]:
        """A stacked expert parameter is read from the per-expert tensors of checkpoints, in expert order."""
        return checkpoint_names(name, self.config.n_routed_experts)

    def ignored_checkpoint_tensors(self, names: set[str]) -> set[str]:
        """The multi-token-prediction layers (``model.layers.{num_hidden_layers}.*``) are skipped with a notice."""
        mtp = {name for name in names if (layer_index(name) or 0) >= self.config.num_hidden_layers}
        if mtp:
            layers = sorted({layer_index(n) for n in mtp})
            log.warning("skipping %d tensor(s) of multi-token-prediction layer(s) %s (model.layers.%s.*): "
                        "MTP is not implemented; the main model is complete without them",
                        len(mtp), ", ".join(map(str, layers)), layers[0])
        return super().ignored_checkpoint_tensors(names - mtp)


def build_deepseek_v3(config: DeepseekV3Config, precision: Precision) -> DeepseekV3ForCausalLM:
    std = config.initializer_range
    scaling = softmax_scale(config)

    def attention():
        return MultiHeadLatentAttention(
            config.hidden_size, config.num_attention_heads, config.q_lora_rank, config.kv_lora_rank,
            config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.attention_bias,
            config.rope_interleave, scaling, precision, std)

    def mlp(layer: int):
        if layer < config.first_k_dense_replace:
            return SwiGLU(config.hidden_size, config.intermediate_size, precision, std)
        router = GroupLimitedTopKRouter(
            config.hidden_size, config.n_routed_experts, config.num_experts_per_tok, config.n_group,
            config.topk_group, config.norm_topk_prob, config.routed_scaling_factor, precision, std)
        return DeepSeekMoE(config.hidden_size, config.moe_intermediate_size, config.n_routed_experts,
                           config.n_shared_experts, router, dispatch=config.moe_dispatch,
                           capacity_factor=config.moe_capacity_factor, drop_policy=config.moe_drop_policy,
                           aux_loss_alpha=config.seq_aux_loss_alpha, bias_update_speed=config.bias_update_speed,
                           precision=precision, init_std=std)

    layers = [DecoderLayer(config.hidden_size, config.rms_norm_eps, attention(), mlp(i), precision)
              for i in range(config.num_hidden_layers)]
    rotary = RotaryEmbedding(config.rope, config.qk_rope_head_dim, config.max_position_embeddings)
    model = DecoderModel(config.vocab_size, config.hidden_size, config.rms_norm_eps, layers, rotary, precision, std,
                         config.num_attention_heads)
    return DeepseekV3ForCausalLM(config, model, precision)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint layout. Checkpoints (Hugging Face's saved layout, real and `save_pretrained`) store one tensor per
# expert; our Cells hold each projection of all experts stacked, expert dimension first. This is the one place
# that maps between the two (the loader reads each expert's tensor into its row of this rank's slice).

def checkpoint_names(param_name: str, num_experts: int) -> list[str]:
    """The checkpoint tensor names one of our parameters is made of (in expert order for stacked experts)."""
    stacked = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", param_name)
    if stacked is None:
        return [param_name]
    return [f"{stacked.group(1)}.{e}.{stacked.group(2)}.weight" for e in range(num_experts)]
