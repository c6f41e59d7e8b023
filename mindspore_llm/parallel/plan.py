"""The one place that decides how every op and every parameter is split (Megatron-style tensor parallel, data
parallel, expert parallel, pipeline stages, sequence parallel, recompute).

``apply_plan(model, parallel)`` walks a built model and gives each shardable primitive its strategy, each decoder
layer its pipeline stage and recompute mode. The model files never mention parallelism; stand-alone (and on CPU)
the strategies are inert, but the same code runs.
Layouts: data parallel splits the batch dimension by ``dp``; tensor parallel (``mp``) splits attention heads and
FFN columns (column-parallel in-projections, row-parallel out-projections) and, with ``vocab_parallel``, the
vocabulary of the embedding, LM head and loss; sequence parallel splits the norms and residual adds along the
sequence by ``mp`` (row-parallel outputs reduce-scatter into that layout); expert parallel splits the stacked
routed experts and their (E, tokens, H) inputs over ``ep`` of the data-parallel replicas, so the MoE dispatch's
change of layout between sequences and experts becomes the compiler's all-to-all.

``validate_plan`` checks a parallel config against the model and the device count before anything starts;
``parameter_layout`` is the split of every parameter (what the memory planner divides by, and what
``write_strategy_file`` gives MindSpore to merge or reshard per-rank checkpoint slices).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from mindspore import nn

from mindspore_llm.checkpoint import TensorLayout, layer_index
from mindspore_llm.common import ConfigError
from mindspore_llm.lora import LoraLinear
from mindspore_llm.models import layers, mla, moe
from mindspore_llm.models.quantized import Int8Weight, NF4Weight, quantized_weight_shapes
from mindspore_llm.models.shapes import parameter_shapes
from mindspore_llm.parallel.config import RECOMPUTE_MODES, ParallelConfig
from mindspore_llm.quant import BLOCKSIZE, QuantizationConfig

# Linear layers by their attribute name: how the weight (out, in) is split across model_parallel.
COLUMN_PARALLEL = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "q_b_proj", "kv_b_proj"}
ROW_PARALLEL = {"o_proj", "down_proj"}
# Low-rank down-projections (MLA) are small and feed a norm over their whole width: replicate them.
REPLICATED = {"q_a_proj", "kv_a_proj_with_mqa"}
HEAD_NORMS = {"q_norm", "k_norm"}  # RMSNorm over (B, S, heads, head_dim)
VOCAB = {"embed_tokens", "lm_head"}
QUANTIZED_ARRAYS = {"codes", "absmax", "nested_absmax", "nested_offset"}  # of X.weight (models/quantized.py)


@dataclass(frozen=True)
class Shard:
    """A primitive's input strategy and, where the output layout differs from the default, its output strategy."""
    in_strategy: tuple[tuple[int, ...], ...]
    out_strategy: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True)
class OpStrategy:
    path: str  # e.g. "model.layers.0.self_attn.q_proj.matmul"
    strategy: tuple[tuple[int, ...], ...]
    out_strategy: tuple[tuple[int, ...], ...] | None = None
    primitive: object = field(default=None, compare=False, repr=False)  # the Primitive the strategy was set on


def linear_kind(leaf: str) -> str:
    return "column" if leaf in COLUMN_PARALLEL else "row" if leaf in ROW_PARALLEL else "replicated"


def _linear(kind: str, dp: int, mp: int, sequence_parallel: bool, bias: bool = True) -> dict:
    if kind == "column":
        strategies = {"matmul": ((dp, 1), (mp, 1)), "bias_add": ((dp, mp), (mp,))}
    elif kind == "row" and sequence_parallel:  # reduce-scatter the partial sums along the (flattened) sequence
        strategies = {"matmul": Shard(((dp, mp), (1, mp)), ((dp * mp, 1),)), "bias_add": ((dp * mp, 1), (1,))}
    elif kind == "row":
        strategies = {"matmul": ((dp, mp), (1, mp)), "bias_add": ((dp, 1), (1,))}
    else:
        strategies = {"matmul": ((dp, 1), (1, 1)), "bias_add": ((dp, 1), (1,))}
    if not bias:
        strategies.pop("bias_add")
    return strategies


def _lora_adapter(adapter: str, base_kind: str, dp: int, mp: int, sequence_parallel: bool) -> dict:
    """LoRA's A (rank, in) and B (out, rank) follow their base layer and never split the rank: column base -> A
    whole, B split on out; row base -> A split on in (partial sums reduced as the base's are), B whole."""
    if base_kind == "column":
        return _linear("replicated" if adapter == "lora_A" else "column", dp, mp, False)
    if base_kind == "row" and adapter == "lora_A":
        return _linear("row", dp, mp, sequence_parallel)
    tokens = dp * mp if base_kind == "row" and sequence_parallel else dp
    return {"matmul": ((tokens, 1), (1, 1)), "bias_add": ((tokens, 1), (1,))}


def _lora_update(kind: str, dp: int, mp: int, sequence_parallel: bool) -> dict:
    """LoraLinear's own ops: scale and add on the (N, out) update (the base's layout)."""
    y = {"column": (dp, mp), "row": (dp * mp, 1) if sequence_parallel else (dp, 1)}.get(kind, (dp, 1))
    return {"scale": (y, ()), "add": (y, y)}


def _keyed_dropout(kind: str, dp: int, mp: int) -> dict:
    """The LoRA dropout mask's ops on the (N, in) input, split like it: by features under a row-parallel base."""
    features = mp if kind == "row" else 1
    x, rows, scalar = (dp, features), (dp, 1), ((), ())
    elementwise = {f"{op}_{i}": (x, ()) for i in (1, 2, 3) for op in ("shift", "low")}
    elementwise.update({f"xor_{i}": (x, x) for i in (1, 2, 3)})
    elementwise.update({"mul_1": (x, ()), "mul_2": (x, ())})
    return {"mul_key": scalar, "add_salt": scalar, "add_features": (rows, (1, features)), "xor_seed": (x, ()),
            **elementwise, "draw": (x, ()), "less": (x, ()), "cast": (x,), "apply_mask": (x, x), "scale": (x, ())}


def _quantized_weight(cell, kind: str, mp: int) -> dict:
    """A quantized weight's dequantization, split like the (out, in) weight it yields: by rows (column-parallel
    layer) or by columns (row-parallel: whole blocks of 64 per device, which ``validate_plan`` checks). The code
    tables and the nested scales (a few per 256 blocks) are replicated."""
    rows, columns = {"column": (mp, 1), "row": (1, mp)}.get(kind, (1, 1))
    if isinstance(cell, Int8Weight):
        return {"cast": ((rows, columns),), "scale": ((rows, columns), (rows, 1)), "scale_127": ((rows, columns), ())}
    strategies = {"cast": ((rows, columns),), "gather": ((1, 1), (rows, columns)),
                  "scale": ((rows, columns, 1), (rows, columns, 1))}
    if cell.double_quant:
        strategies.update({"cast_absmax": ((rows, columns),), "gather_absmax": ((1,), (rows, columns)),
                           "scale_absmax": ((rows, columns), (rows, columns)), "add_offset": ((rows, columns), ())})
    return strategies


def _rms_norm(rank_mp: tuple[int, ...], dp: int, fused: bool) -> dict:
    x = (dp,) + rank_mp
    if fused:  # RmsNorm(x, gamma): the normalised (last) axis whole
        return {"rms_norm": (x, (1,))}
    return {"square": (x,), "mean": (x,), "rsqrt": (x[:-1] + (1,),), "add_eps": (x[:-1] + (1,), ()),
            "mul": (x, x[:-1] + (1,)), "mul_weight": (x, (1,))}


def _attention_core(dp: int, mp: int, flash: bool, latent: bool) -> dict:
    """Heads split by mp. Flash (TND): the flattened tokens by dp (whole rows, as the batch), heads by mp; the
    compressed causal mask whole; the documents' cumulative ends by dp (each row's K entries with its tokens);
    MLA (`latent`) pads V to the q/k head_dim."""
    heads = (dp, mp, 1, 1)  # (B, heads, S, head_dim)
    if flash:
        tokens = (dp, mp, 1)
        strategies = {"q_transpose": (heads,), "k_transpose": (heads,), "v_transpose": (heads,),
                      "flash_attention": (tokens, tokens, tokens, (1, 1), (dp,), (dp,))}
        return {**strategies, "pad_value": (heads, heads)} if latent else strategies
    return {"repeat_kv": ((dp, mp, 1, 1, 1),), "qk_matmul": (heads, heads), "scale": (heads, ()),
            "add_bias": (heads, (dp, 1, 1, 1)), "softmax": (heads,), "pv_matmul": (heads, heads),
            "merge_transpose": (heads,)}


def _stacked_experts(dp: int, ep: int, mp: int) -> dict:
    """(E, N, H) expert inputs: experts split by ep, their rows by the remaining dp / ep, the expert FFN by mp."""
    x, hidden = (ep, dp // ep, 1), (ep, dp // ep, mp)
    return {"gate_matmul": (x, (ep, mp, 1)), "up_matmul": (x, (ep, mp, 1)), "silu": (hidden,),
            "mul": (hidden, hidden), "down_matmul": (hidden, (ep, 1, mp))}


def _dense_dispatch(dp: int, ep: int) -> dict:
    """(E, T, H): every expert's copy of the tokens, laid out as the experts' inputs."""
    x = (ep, dp // ep, 1)
    return {"broadcast_tokens": ((1, dp, 1),), "transpose": ((dp, 1),), "weigh": (x, x), "combine_sum": (x,)}


def _capacity_dispatch(dp: int, ep: int) -> dict:
    """Routing and gathers per sequence, split by dp on the batch (every sequence is dispatched on its own
    device); ``to_experts`` takes (B, E, C, H) in that layout, the experts want (E, B*C, H) as (ep, dp / ep),
    and ``from_experts`` takes the experts' layout back: between them the compiler inserts the all-to-alls."""
    batch = (dp, 1, 1)
    return {"key_select": ((dp, 1), (dp, 1), (dp, 1)), "key_transpose": (batch,), "sort": (batch,),
            "invert": (batch,), "rank_transpose": (batch,), "slot_gather": ((dp, 1), (dp, 1)),
            "dispatch_gather": (batch, (dp, 1)), "to_experts": ((dp, 1, 1, 1),),
            "from_experts": ((ep, dp // ep, 1, 1),), "combine_gather": (batch, (dp, 1)),
            "weigh": (batch, batch), "combine_sum": ((dp, 1, 1, 1),)}


# The ops whose smaller operand a cell built for the CPU expands to the other's shape first
# (``layers.broadcast_explicitly``: MindSpore's CPU kernels keep index maps for broadcasts); the two operands then
# have one layout. Cells built for Ascend broadcast in the op, and the strategies below stand.
EXPLICITLY_BROADCAST = ("bias_add", "mul", "mul_weight", "mul_cos", "mul_sin", "add_bias", "sub")


def strategies_for(name: str, cell: nn.Cell, parallel: ParallelConfig, parent: nn.Cell | None = None) -> dict:
    """The strategies of one cell's primitives, keyed by the primitive's attribute name (a tuple: the input
    strategy; a ``Shard``: input and output strategies). Dispatches on the cell's type (and its parent's)."""
    strategies = _strategies_for(name, cell, parallel, parent)
    if getattr(cell, "explicit_broadcast", False):
        strategies = {op: (strategy[0], strategy[0]) if op in EXPLICITLY_BROADCAST else strategy
                      for op, strategy in strategies.items()}
    return strategies


def _strategies_for(name: str, cell: nn.Cell, parallel: ParallelConfig, parent: nn.Cell | None = None) -> dict:
    dp, mp, ep = parallel.data_parallel, parallel.model_parallel, parallel.expert_parallel
    sp = mp if parallel.sequence_parallel else 1
    vp = mp if parallel.vocab_parallel else 1
    leaf = name.rsplit(".", 1)[-1]
    heads = (dp, mp, 1, 1)  # (B, heads, S, head_dim)
    hidden = (dp, sp, 1)  # (B, S, H) outside the tensor-parallel regions
    if isinstance(cell, layers.Linear):
        if isinstance(parent, LoraLinear) and leaf in ("lora_A", "lora_B"):
            return _lora_adapter(leaf, linear_kind(name.rsplit(".", 2)[-2]), dp, mp, parallel.sequence_parallel)
        strategies = _linear(linear_kind(leaf), dp, mp, parallel.sequence_parallel, cell.bias is not None)
        if isinstance(cell, LoraLinear):
            strategies.update(_lora_update(linear_kind(leaf), dp, mp, parallel.sequence_parallel))
        return strategies
    if isinstance(cell, layers.KeyedDropout) and isinstance(parent, LoraLinear):
        return _keyed_dropout(linear_kind(name.rsplit(".", 2)[-2]), dp, mp)
    if isinstance(cell, (NF4Weight, Int8Weight)):  # the weight of the linear layer `name` without ".weight"
        return _quantized_weight(cell, linear_kind(name.rsplit(".", 2)[-2]), mp)
    if isinstance(cell, layers.RMSNorm):
        if leaf in HEAD_NORMS:
            return _rms_norm((1, mp, 1), dp, cell.fused)
        # the model's hidden-size norms follow sequence parallel; MLA's latent norms see replicated latents
        return _rms_norm((1, 1) if leaf.endswith("a_layernorm") else (sp, 1), dp, cell.fused)
    if isinstance(cell, layers.Embedding):
        return {"gather": ((vp, 1), (dp, 1))}
    if isinstance(cell, layers.LMHead):
        return {"matmul": ((dp, 1), (vp, 1))}
    if isinstance(cell, layers.DotProductAttention):
        return _attention_core(dp, mp, cell.flash, isinstance(parent, mla.MultiHeadLatentAttention))
    if isinstance(cell, layers.ApplyRotary):
        if isinstance(parent, mla.MultiHeadLatentAttention):
            heads = (dp, 1, 1, 1)  # the same rotary serves the queries and the one shared rotary key head
        if cell.fused:  # RotaryPositionEmbedding(x BNSD, cos B1SD, sin B1SD)
            return {"rope": (heads, (dp, 1, 1, 1), (dp, 1, 1, 1))}
        return {"mul_cos": (heads, (dp, 1, 1, 1)), "mul_sin": (heads, (dp, 1, 1, 1)), "add": (heads, heads),
                "neg": (heads,), "concat": (heads, heads)}
    if isinstance(cell, layers.GroupedQueryAttention):
        return {"transpose": ((dp, 1, mp, 1),)}
    if isinstance(cell, mla.MultiHeadLatentAttention):
        return {"q_transpose": ((dp, 1, mp, 1),), "kv_transpose": ((dp, 1, mp, 1),), "q_concat": (heads, heads),
                "k_concat": (heads, heads), "broadcast_k_rope": ((dp, 1, 1, 1),)}
    if isinstance(cell, moe.StackedExperts):
        return _stacked_experts(dp, ep, mp)
    if isinstance(cell, moe.DenseDispatch):
        return _dense_dispatch(dp, ep)
    if isinstance(cell, moe.CapacityDispatch):
        return _capacity_dispatch(dp, ep)
    if isinstance(cell, moe.GroupLimitedTopKRouter):
        return {"matmul": ((dp, 1), (1, 1)), "sigmoid": ((dp, 1),), "add_bias": ((dp, 1), (1,))}
    if isinstance(cell, moe.DeepSeekMoE):
        return {"add_shared": (hidden, hidden)}
    if isinstance(cell, layers.SwiGLU):
        if cell.fused:  # Swiglu over (B, S, 2, I): the stacked axis whole, the intermediate split like gate and up
            return {"stack": ((dp, 1, mp), (dp, 1, mp)), "swiglu": ((dp, 1, 1, mp),)}
        return {"silu": ((dp, 1, mp),), "mul": ((dp, 1, mp), (dp, 1, mp))}
    if isinstance(cell, layers.DecoderLayer):
        return {"attn_residual": (hidden, hidden), "mlp_residual": (hidden, hidden)}
    if isinstance(cell, layers.CausalLMLoss):
        return {"reduce_max": ((dp, vp),), "sub": ((dp, vp), (dp, 1)), "exp": ((dp, vp),),
                "reduce_sum": ((dp, vp),), "log": ((dp, 1),), "gather": ((dp, vp), (dp, 1))}
    return {}


def parameter_layout(name: str, ndim: int, parallel: ParallelConfig) -> tuple[str | None, ...]:
    """Which mesh axis ("mp", "ep") splits each dimension of parameter `name` (Hugging Face / our names)."""
    parts = name.split(".")
    if len(parts) > 3 and parts[-2] == "weight" and parts[-1] in QUANTIZED_ARRAYS:  # X.weight.codes, ...
        # codes and absmax (per block; int8's per row) split like the weight, the nested scales are replicated
        kind = linear_kind(parts[-3]) if parts[-1] in ("codes", "absmax") else "replicated"
        if kind == "column":
            return ("mp",) + (None,) * (ndim - 1)
        return (None, "mp") if kind == "row" and ndim == 2 else (None,) * ndim
    if parts[-2] in ("lora_A", "lora_B"):  # adapters follow the split of the layer they adapt
        kind = linear_kind(parts[-3])
        if (kind, parts[-2]) == ("column", "lora_B"):
            return ("mp", None)
        return (None, "mp") if (kind, parts[-2]) == ("row", "lora_A") else (None,) * ndim
    owner = parts[-2] if len(parts) > 1 else ""
    if parts[-1] in ("gate_proj", "up_proj") and owner == "experts":  # stacked (E, I, H)
        return ("ep", "mp", None)
    if parts[-1] == "down_proj" and owner == "experts":  # stacked (E, H, I)
        return ("ep", None, "mp")
    if owner in VOCAB:
        return ("mp" if parallel.vocab_parallel else None, None)
    kind = linear_kind(owner)
    if kind == "column":
        return ("mp",) + (None,) * (ndim - 1)
    if kind == "row" and parts[-1] == "weight":
        return (None, "mp")
    return (None,) * ndim


def parameter_split(name: str, ndim: int, parallel: ParallelConfig) -> tuple[int, ...]:
    """How many pieces each dimension of parameter `name` is cut into."""
    size = {"mp": parallel.model_parallel, "ep": parallel.expert_parallel, None: 1}
    return tuple(size[axis] for axis in parameter_layout(name, ndim, parallel))


def apply_plan(model: nn.Cell, parallel: ParallelConfig) -> list[OpStrategy]:
    """Give every shardable primitive of `model` its strategy, every decoder layer its pipeline stage and
    recompute mode; return the op strategies in model order."""
    applied = []
    cells = dict(model.cells_and_names())
    for name, cell in cells.items():
        parent = cells.get(name.rsplit(".", 1)[0]) if "." in name else None
        for op_name, strategy in strategies_for(name, cell, parallel, parent).items():
            shard = strategy if isinstance(strategy, Shard) else Shard(strategy)
            primitive = getattr(cell, op_name)
            primitive.shard(shard.in_strategy, out_strategy=shard.out_strategy)
            applied.append(OpStrategy(f"{name}.{op_name}" if name else op_name, shard.in_strategy,
                                      shard.out_strategy, primitive))
    decoder = getattr(model, "model", None)
    if isinstance(decoder, layers.DecoderModel):
        # flash attention's document ends are split with the rows: its per-call limit counts one device's rows
        decoder.attention_mask.batch_split = parallel.data_parallel
        _assign_stages_and_recompute(model, decoder, parallel)
    return applied


def _assign_stages_and_recompute(model: nn.Cell, decoder: layers.DecoderModel, parallel: ParallelConfig) -> None:
    num_layers = len(decoder.layers)
    per_stage = parallel.layers_per_stage(num_layers)
    if sum(per_stage) != num_layers:
        raise ConfigError(f"parallel: stages of {per_stage} layers do not cover the model's {num_layers} layers")
    if isinstance(parallel.recompute, list) and len(parallel.recompute) not in (parallel.pipeline_stages, num_layers):
        raise ConfigError(f"parallel.recompute: {len(parallel.recompute)} entries for {parallel.pipeline_stages} "
                          f"stages and {num_layers} layers")
    for layer, mode in zip(decoder.layers, parallel.recompute_of_layers(num_layers)):
        if mode == "full":
            layer.recompute()
        elif mode == "selective":  # the core attention: scores and softmax, the s^2 activations
            for _, cell in layer.cells_and_names():
                # flash attention stores no S x S tensor (its backward recomputes the scores by design)
                if isinstance(cell, layers.DotProductAttention) and not cell.flash:
                    cell.recompute()
        elif mode == "swap":  # activations to host memory in forward, back before backward (Ascend; unproven)
            layer.offload()
    if parallel.pipeline_stages == 1:
        return
    last = parallel.pipeline_stages - 1
    for layer, stage in zip(decoder.layers, parallel.stage_of_layers(num_layers)):
        layer.pipeline_stage = stage
    decoder.embed_tokens.pipeline_stage = 0
    decoder.rotary_emb.pipeline_stage = 0
    decoder.norm.pipeline_stage = last
    for cell in (getattr(model, "lm_head", None), getattr(model, "loss_fn", None)):
        if cell is not None:
            cell.pipeline_stage = last


# Which input dimensions a matmul contracts: (dim of input 0, dim of input 1), counted from the end.
def _contracted_dims(primitive) -> tuple[int, int] | None:
    name = getattr(primitive, "name", "")
    if name not in ("MatMul", "BatchMatMul"):
        return None
    attrs = primitive.attrs
    return (-2 if attrs.get("transpose_a", False) else -1, -1 if attrs.get("transpose_b", False) else -2)


def check_strategies(applied: list[OpStrategy], parallel: ParallelConfig,
                     input_shapes: dict[str, list[list[tuple[int, ...]]]] | None = None) -> None:
    """Check the op strategies before anything is compiled; raise ConfigError listing every problem.

    Always: every input's device matrix divides the devices of one pipeline stage (dp x mp), and every output
    strategy's product equals its input device matrix. With `input_shapes` (path -> the input shapes of each call of
    that op, as ``trace_input_shapes`` records them): each strategy has one entry per dimension of its input, every
    split dimension is divisible by its split (a (1, 1, S, S) attention bias cannot be split by dp > 1), and a
    matmul splits the two dimensions it contracts alike. These are the checks MindSpore's compiler makes on the
    cluster, after the cluster has been waited for."""
    devices = parallel.stage_devices
    errors: list[str] = []
    for op in applied:
        for i, strategy in enumerate(op.strategy):
            used = math.prod(strategy)
            if devices % used:
                errors.append(f"{op.path}: input {i} strategy {strategy} uses {used} devices, which does not "
                              f"divide the {devices} devices of a stage (dp x mp)")
        if op.out_strategy is not None:
            used = max(math.prod(s) for s in op.strategy)
            for strategy in op.out_strategy:
                if math.prod(strategy) != used:
                    errors.append(f"{op.path}: output strategy {strategy} does not match the input device "
                                  f"matrix of {used} devices")
        for shapes in (input_shapes or {}).get(op.path, []):
            errors += _shape_errors(op, shapes)
    if errors:
        unique = list(dict.fromkeys(errors))  # an op called several times reports once
        raise ConfigError("invalid op strategies:\n  - " + "\n  - ".join(unique))


def _shape_errors(op: OpStrategy, shapes: list[tuple[int, ...]]) -> list[str]:
    if len(shapes) != len(op.strategy):
        return [f"{op.path}: {len(op.strategy)} input strategies {op.strategy} for {len(shapes)} inputs {shapes}"]
    errors = []
    for i, (shape, strategy) in enumerate(zip(shapes, op.strategy)):
        if len(shape) != len(strategy):
            errors.append(f"{op.path}: input {i} has shape {shape} (rank {len(shape)}) but strategy {strategy} "
                          f"(rank {len(strategy)})")
            continue
        for dim, (size, parts) in enumerate(zip(shape, strategy)):
            if size % parts:
                errors.append(f"{op.path}: input {i} dimension {dim} of shape {shape} (size {size}) cannot be split "
                              f"{parts} ways (strategy {strategy})")
    contracted = _contracted_dims(op.primitive)
    if contracted is not None and not errors:
        a, b = op.strategy[0][contracted[0]], op.strategy[1][contracted[1]]
        if a != b:
            errors.append(f"{op.path}: the contracted dimensions are split {a} and {b} ways (strategy "
                          f"{op.strategy}); they must be split alike")
    return errors


def trace_input_shapes(model: nn.Cell, applied: list[OpStrategy], run) -> dict[str, list[list[tuple[int, ...]]]]:
    """The input shapes every planned op of `model` sees while ``run()`` calls the model (once, in PyNative mode:
    the ops run eagerly, so each planned primitive is briefly wrapped to record what it is called with).

    Tensor arguments count as inputs, and Python numbers too where the strategy has an entry for them (the scalar of
    ``Mul(x, 0.5)``, not the axis of ``Gather(x, ids, 0)``); tuples of tensors (``Concat``) are flattened."""
    import mindspore as ms

    cells = dict(model.cells_and_names())
    recorded: dict[str, list[list[tuple[int, ...]]]] = {}
    wrapped = []
    for op in applied:
        owner, _, attr = op.path.rpartition(".")
        cell = cells[owner]
        primitive = getattr(cell, attr)
        wrapped.append((cell, attr, primitive))
        object.__setattr__(cell, attr, _Recorder(primitive, len(op.strategy), recorded.setdefault(op.path, [])))
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        run()
    finally:
        ms.set_context(mode=mode)
        for cell, attr, primitive in wrapped:
            object.__setattr__(cell, attr, primitive)
    return recorded


class _Recorder:
    def __init__(self, primitive, inputs: int, calls: list):
        self.primitive, self.inputs, self.calls = primitive, inputs, calls

    def __call__(self, *args):
        from mindspore import Tensor

        flat = [x for arg in args for x in (arg if isinstance(arg, (tuple, list)) else (arg,))]
        tensors = [tuple(x.shape) for x in flat if isinstance(x, Tensor)]
        numbers = [() for x in flat if isinstance(x, (int, float)) and not isinstance(x, bool)]
        self.calls.append(tensors + numbers[:max(0, self.inputs - len(tensors))])
        return self.primitive(*args)


def _divides(errors: list[str], field: str, size: int, by_field: str, by: int) -> None:
    if by > 1 and size % by:
        errors.append(f"{field} ({size}) is not divisible by {by_field} ({by})")


def validate_plan(model_config, parallel: ParallelConfig, device_num: int, global_batch_size: int | None = None,
                  micro_batch_size: int = 1, gradient_accumulation_steps: int = 1,
                  seq_length: int | None = None, quantization: QuantizationConfig | None = None) -> None:
    """Check `parallel` against the model and the device count; raise ConfigError listing every problem.

    The global batch is data_parallel x micro_batch_size x micro_batch_num x gradient_accumulation_steps.
    With `quantization` (a quantized frozen base), every device's slice of a linear weight must hold whole
    blocks of 64 along its rows.
    """
    errors: list[str] = []
    dp, mp, ep, pp = (parallel.data_parallel, parallel.model_parallel, parallel.expert_parallel,
                      parallel.pipeline_stages)
    if parallel.device_num != device_num:
        errors.append(f"parallel: data_parallel ({dp}) x model_parallel ({mp}) x pipeline_stages ({pp}) = "
                      f"{parallel.device_num} devices, but the job has {device_num}")
    c = model_config
    _divides(errors, "num_attention_heads", c.num_attention_heads, "model_parallel", mp)
    kv_heads = getattr(c, "num_key_value_heads", None)
    if kv_heads is not None and getattr(c, "kv_lora_rank", None) is None:
        _divides(errors, "num_key_value_heads", kv_heads, "model_parallel", mp)
    _divides(errors, "intermediate_size", c.intermediate_size, "model_parallel", mp)
    if parallel.vocab_parallel:
        _divides(errors, "vocab_size", c.vocab_size, "model_parallel", mp)
    experts = getattr(c, "n_routed_experts", None)
    if experts:
        _divides(errors, "moe_intermediate_size", c.moe_intermediate_size, "model_parallel", mp)
        _divides(errors, "n_routed_experts", experts, "expert_parallel", ep)
        if c.moe_dispatch == "grouped" and (ep > 1 or mp > 1):
            errors.append(f"moe_dispatch 'grouped' runs whole experts on each device's own tokens (its sorted "
                          f"rows have no layout to split); use expert_parallel 1 and model_parallel 1 (got "
                          f"{ep} and {mp}) or moe_dispatch 'capacity'")
    elif ep > 1:
        errors.append(f"expert_parallel ({ep}) needs a mixture-of-experts model; {c.architecture} has no experts")
    layers_num = c.num_hidden_layers
    if parallel.stage_layers is not None:
        if sum(parallel.stage_layers) != layers_num:
            errors.append(f"stage_layers {parallel.stage_layers} sum to {sum(parallel.stage_layers)}, the model has "
                          f"num_hidden_layers {layers_num}")
    elif pp > layers_num:
        errors.append(f"pipeline_stages ({pp}) exceeds num_hidden_layers ({layers_num})")
    elif layers_num % pp:
        errors.append(f"num_hidden_layers ({layers_num}) is not divisible by pipeline_stages ({pp}); "
                      f"give stage_layers for an uneven split")
    if isinstance(parallel.recompute, list) and len(parallel.recompute) not in (pp, layers_num):
        errors.append(f"recompute has {len(parallel.recompute)} entries; give one per pipeline stage ({pp}) or "
                      f"one per layer ({layers_num})")
    for mode in ([parallel.recompute] if isinstance(parallel.recompute, str) else parallel.recompute):
        if mode not in RECOMPUTE_MODES:
            errors.append(f"recompute: {mode!r} is not one of {', '.join(RECOMPUTE_MODES)}")
    if parallel.sequence_parallel and seq_length is not None:
        _divides(errors, "seq_length", seq_length, "model_parallel (sequence_parallel)", mp)
    if global_batch_size is not None:
        per_step = dp * micro_batch_size * parallel.micro_batch_num * gradient_accumulation_steps
        if global_batch_size != per_step:
            errors.append(f"global_batch_size ({global_batch_size}) != data_parallel ({dp}) x micro_batch_size "
                          f"({micro_batch_size}) x micro_batch_num ({parallel.micro_batch_num}) x "
                          f"gradient_accumulation_steps ({gradient_accumulation_steps}) = {per_step}")
    if not errors:  # every parameter's split must divide its dimensions (catches what the fields above miss)
        errors += _parameter_split_errors(model_config, parallel)
    if quantization is not None:
        errors += _quantized_block_errors(model_config, parallel)
    if errors:
        raise ConfigError("invalid parallel plan:\n  - " + "\n  - ".join(errors))


def _parameter_split_errors(model_config, parallel: ParallelConfig) -> list[str]:

    errors = {}
    for name, shape in parameter_shapes(model_config):
        split = parameter_split(name, len(shape), parallel)
        if any(size % parts for size, parts in zip(shape, split)):
            pattern = ".".join("N" if part.isdigit() else part for part in name.split("."))
            errors.setdefault(pattern, f"parameter {pattern} of shape {shape} cannot be split {split}")
    return list(errors.values())


def parameter_stages(name: str, layer_stages: list[int], tied: bool) -> list[int]:
    """Pipeline stages holding parameter `name`: its layer's; the embedding on the first stage (and, tied, the
    last); the final norm and LM head on the last."""
    index = layer_index(name)
    last = max(layer_stages)
    if index is not None:
        return [layer_stages[index]]
    if name.startswith("model.embed_tokens"):
        return sorted({0, last}) if tied else [0]
    return [last]


def parameter_layouts(shapes: Iterable[tuple[str, tuple[int, ...]]], parallel: ParallelConfig, num_layers: int,
                      tied: bool) -> dict[str, TensorLayout]:
    """The layout of every parameter of `shapes` (name, shape) under this plan, in MindSpore's terms: a stage's
    devices as the grid [dp / ep, ep, mp] (ranks run mp fastest, then ep, then the rest of dp; stage k holds
    ranks k * dp * mp onwards), each dimension split by its axis in ``parameter_layout``, the stages holding it.
    What each rank's slice is (``TensorLayout.block``), what the strategy files say, what the compiled strategy
    is checked against. Parameters of other kinds (optimizer moments) take the layout of their weight."""
    axes = {"mp": 0, "ep": 1, None: -1}  # tensor-map values count the grid's axes from the right
    grid = (parallel.data_parallel // parallel.expert_parallel, parallel.expert_parallel, parallel.model_parallel)
    layer_stages = parallel.stage_of_layers(num_layers)
    return {name: TensorLayout(grid, tuple(axes[a] for a in parameter_layout(name, len(shape), parallel)),
                               tuple(parameter_stages(name, layer_stages, tied)))
            for name, shape in shapes}


def model_layouts(model_config, parallel: ParallelConfig) -> dict[str, TensorLayout]:
    """``parameter_layouts`` of every weight of the model of a family config (buffers such as the router's
    correction bias included), from the model built without allocating its parameters."""
    from mindspore_llm.models.auto import build_model

    model = build_model(model_config, materialize=False)
    return parameter_layouts(((p.name, tuple(p.shape)) for p in model.weights()), parallel,
                             model_config.num_hidden_layers, model_config.tie_word_embeddings)


def _quantized_block_errors(model_config, parallel: ParallelConfig) -> list[str]:
    errors = {}
    for name, (rows, columns) in quantized_weight_shapes(model_config):
        columns_per_device = columns // parameter_split(name, 2, parallel)[1]
        if columns_per_device % BLOCKSIZE:
            pattern = ".".join("N" if part.isdigit() else part for part in name.split("."))
            split = f" over model_parallel {parallel.model_parallel}" if columns_per_device != columns else ""
            errors.setdefault(pattern, f"quantized weight {pattern} ({rows} x {columns}): each device holds "
                                       f"{columns_per_device} columns{split}, not whole blocks of {BLOCKSIZE}")
    return list(errors.values())


def write_strategy_file(model_config, parallel: ParallelConfig, path) -> None:
    """MindSpore's strategy checkpoint (node_strategy.proto) of every weight's layout under this plan, all
    pipeline stages in one file (``merge_pipeline_strategys``' format when there are several): what
    ``mindspore.parallel.transform_checkpoints`` and ``msllm-ckpt merge-slices`` need to merge or reshard per-rank
    slices, written without compiling the network. No optimizer-sharded slices (the compiled strategy has them)."""
    import shutil
    import tempfile

    from mindspore_llm.checkpoint_slices import merge_strategy_files, write_strategy_files

    with tempfile.TemporaryDirectory() as tmp:
        files = write_strategy_files(model_layouts(model_config, parallel), tmp)
        if len(files) == 1:
            shutil.copyfile(files[0], path)
        else:
            merge_strategy_files(tmp, path)
