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
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Mapping

import mindspore as ms
import numpy as np
from mindspore import ops

from mindspore_llm.checkpoint import ArrayTensor, layer_index
from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import from_dict, require
from mindspore_llm.models.config import DecoderConfig, RopeConfig, hf_fields
from mindspore_llm.models.layers import CausalLM, DecoderLayer, DecoderModel, Precision, RotaryEmbedding, SwiGLU
from mindspore_llm.models.mla import MultiHeadLatentAttention
from mindspore_llm.models.moe import (DISPATCHES, DROP_POLICIES, DeepSeekMoE, GroupLimitedTopKRouter,
                                     aux_loss_multipliers, moe_blocks, set_aux_loss_multiplier)

ARCHITECTURES = ("DeepseekV3ForCausalLM",)
log = logging.getLogger("mindspore_llm")


@dataclass(kw_only=True)
class DeepseekV3Config(DecoderConfig):
    architecture: str = "DeepseekV3ForCausalLM"
    HF_MODEL_TYPES = {"DeepseekV3ForCausalLM": "deepseek_v3"}
    intermediate_size: int  # dense layers
    # multi-head latent attention
    q_lora_rank: int | None = 1536  # None: plain q_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    rope_interleave: bool = True  # checkpoints store rotary pairs interleaved
    # DeepSeekMoE
    first_k_dense_replace: int = 3
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # fields of the original (remote-code) config.json; only the V3 choices are implemented
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    moe_layer_freq: int = 1
    hidden_act: str = "silu"
    num_nextn_predict_layers: int = 0  # MTP modules in the checkpoint (skipped when loading)
    # training-time balancing (ours; not in Hugging Face configs): γ of the bias update, α of the sequence-wise loss
    bias_update_speed: float = 0.001
    seq_aux_loss_alpha: float = 0.0
    # how training sends tokens to the routed experts (ours; models/moe.py): "capacity" keeps at most
    # C = ceil(moe_capacity_factor * S * k / E) token-slots per expert and sequence, dropping the rest by
    # moe_drop_policy; "dense" runs every expert on every token; "grouped" is Ascend's dropless sorted path.
    # Evaluation and generation are dropless whatever this says ("grouped" stays grouped, the others run dense).
    moe_dispatch: Literal["capacity", "dense", "grouped"] = "capacity"
    moe_capacity_factor: float = 1.25  # Switch Transformer's training value; >= E / k drops nothing
    moe_drop_policy: Literal["probability", "position"] = "probability"

    def _hf_overrides(self) -> dict[str, Any]:
        # MLA has no separate kv heads; transformers' config defaults them to 128, which would break a small model
        return {"num_key_value_heads": self.num_attention_heads}

    def validate(self) -> None:
        super().validate()
        require(self.architecture in ARCHITECTURES,
                f"architecture {self.architecture!r} is not a DeepSeek-V3 architecture ({', '.join(ARCHITECTURES)})")
        for name in ("intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
            value = getattr(self, name)
            require(value > 0, f"{name} must be positive, got {value}")
        require(self.q_lora_rank is None or self.q_lora_rank > 0,
                f"q_lora_rank must be positive or null, got {self.q_lora_rank}")
        require(self.qk_rope_head_dim % 2 == 0,
                f"qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        require(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
                f"first_k_dense_replace must be in [0, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.first_k_dense_replace}")
        require(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        require(self.n_routed_experts % self.n_group == 0,
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        require(self.n_group == 1 or per_group >= 2,
                f"each of the n_group={self.n_group} groups needs >= 2 experts (groups are ranked by their top-2)")
        require(self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        require(self.num_experts_per_tok <= self.topk_group * per_group,
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= topk_group * experts per group "
                f"({self.topk_group * per_group})")
        require(self.scoring_func == "sigmoid", f"scoring_func {self.scoring_func!r} is not supported (only 'sigmoid')")
        require(self.topk_method == "noaux_tc",
                f"topk_method {self.topk_method!r} is not supported (only 'noaux_tc', DeepSeek-V3's)")
        require(self.moe_layer_freq == 1, f"moe_layer_freq {self.moe_layer_freq} is not supported (only 1)")
        require(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        require(self.bias_update_speed >= 0, f"bias_update_speed must be >= 0, got {self.bias_update_speed}")
        require(self.seq_aux_loss_alpha >= 0, f"seq_aux_loss_alpha must be >= 0, got {self.seq_aux_loss_alpha}")
        require(self.moe_dispatch in DISPATCHES,
                f"moe_dispatch must be one of {', '.join(DISPATCHES)}, got {self.moe_dispatch!r}")
        require(self.moe_capacity_factor > 0, f"moe_capacity_factor must be positive, got {self.moe_capacity_factor}")
        require(self.moe_drop_policy in DROP_POLICIES,
                f"moe_drop_policy must be one of {', '.join(DROP_POLICIES)}, got {self.moe_drop_policy!r}")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> "DeepseekV3Config":
        architecture = (hf.get("architectures") or [""])[0]
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"{source}: architectures {hf.get('architectures')!r} is not one of {ARCHITECTURES}")
        heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
        if kv_heads is not None and kv_heads != heads:
            raise ConfigError(f"{source}: num_key_value_heads ({kv_heads}) must equal num_attention_heads ({heads}): "
                              f"MLA expands every head from the latent")
        fields = hf_fields(hf, cls)
        fields["architecture"] = architecture
        fields = {key: value for key, value in fields.items() if value is not None or key == "q_lora_rank"}
        fields["rope"] = RopeConfig.from_hf(hf, source)
        return from_dict(cls, fields, source)


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

    def checkpoint_tensors(self, tensors):
        """The hook ``checkpoint.load_weights`` calls: checkpoint tensors -> our parameters."""
        buffers = {block_name + suffix: tuple(getattr(block, suffix[1:]).shape)
                   for block_name, block in moe_blocks(self) for suffix in self.STATISTICS_SUFFIXES}
        return stack_checkpoint_tensors(tensors, self.config, buffers)


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
    model = DecoderModel(config.vocab_size, config.hidden_size, config.rms_norm_eps, layers, rotary, precision, std)
    return DeepseekV3ForCausalLM(config, model, precision)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint layout. Checkpoints (Hugging Face's saved layout, real and `save_pretrained`) store one tensor per
# expert; our Cells hold each projection of all experts stacked, expert dimension first. This is the one place
# that maps between the two; it also skips the multi-token-prediction layers.

EXPERT_TENSOR = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
def checkpoint_target(name: str, num_hidden_layers: int) -> tuple[str, int | None] | None:
    """(our parameter name, expert index or None) for a checkpoint tensor; None for an MTP-layer tensor."""
    layer = layer_index(name)
    if layer is not None and layer >= num_hidden_layers:
        return None
    expert = EXPERT_TENSOR.match(name)
    if expert:
        return f"{expert.group(1)}.{expert.group(3)}", int(expert.group(2))
    return name, None


def checkpoint_names(param_name: str, num_experts: int) -> list[str]:
    """The checkpoint tensor names one of our parameters is made of (in expert order for stacked experts)."""
    stacked = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", param_name)
    if stacked is None:
        return [param_name]
    return [f"{stacked.group(1)}.{e}.{stacked.group(2)}.weight" for e in range(num_experts)]


def stack_checkpoint_tensors(tensors: Iterable[tuple[str, Any]], config: DeepseekV3Config,
                             buffers: Mapping[str, tuple[int, ...]]) -> Iterator[tuple[str, Any]]:
    """(name, reader) pairs of a checkpoint -> the same with per-expert tensors stacked into our parameters
    (yielded once all experts of a projection are read), the MTP layers dropped with a one-line notice, and
    zeros for the statistics `buffers` (name -> shape) that checkpoints do not hold."""
    pending: dict[str, dict[int, np.ndarray]] = {}
    skipped: set[str] = set()
    path = None
    for name, reader in tensors:
        path = reader.path
        target = checkpoint_target(name, config.num_hidden_layers)
        if target is None:
            skipped.add(name)
            continue
        param, expert = target
        if expert is None:
            yield name, reader
            continue
        parts = pending.setdefault(param, {})
        parts[expert] = reader.float32(name)
        if sorted(parts) == list(range(config.n_routed_experts)):
            yield param, ArrayTensor(np.stack([parts[e] for e in range(config.n_routed_experts)]), path)
            pending.pop(param)
    for param, parts in pending.items():  # the parameter stays missing, and load_weights names it
        log.warning("%s: the checkpoint holds experts %s of 0..%d", param, sorted(parts), config.n_routed_experts - 1)
    for name, shape in buffers.items():
        yield name, ArrayTensor(np.zeros(shape, np.float32), path)
    if skipped:
        layers = sorted({layer_index(n) for n in skipped})
        log.warning("skipping %d tensor(s) of multi-token-prediction layer(s) %s (model.layers.%s.*): "
                    "MTP is not implemented; the main model is complete without them",
                    len(skipped), ", ".join(map(str, layers)), layers[0])
