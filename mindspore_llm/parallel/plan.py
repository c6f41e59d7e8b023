"""The one place that decides how every op is split (Megatron-style tensor parallel + data parallel).

``apply_plan(model, parallel)`` walks a built model and gives each shardable primitive its strategy. The model
files never mention parallelism; stand-alone (and on CPU) the strategies are inert, but the same code runs.
Layouts: data parallel splits the batch dimension by ``dp``; tensor parallel (``mp``) splits attention heads and
FFN columns (column-parallel in-projections, row-parallel out-projections) and, with ``vocab_parallel``, the
vocabulary of the embedding, LM head and loss.
"""
from __future__ import annotations

from dataclasses import dataclass

from mindspore import nn

from mindspore_llm.models import layers
from mindspore_llm.parallel.config import ParallelConfig

# Linear layers by their attribute name: how the weight (out, in) is split across model_parallel.
COLUMN_PARALLEL = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "q_b_proj", "kv_b_proj"}
ROW_PARALLEL = {"o_proj", "down_proj"}
# Low-rank down-projections (MLA) are small and feed a norm over their whole width: replicate them.
REPLICATED = {"q_a_proj", "kv_a_proj_with_mqa"}
HEAD_NORMS = {"q_norm", "k_norm"}  # RMSNorm over (B, S, heads, head_dim)


@dataclass(frozen=True)
class OpStrategy:
    path: str  # e.g. "model.layers.0.self_attn.q_proj.matmul"
    strategy: tuple[tuple[int, ...], ...]


def _linear(cell: layers.Linear, kind: str, dp: int, mp: int) -> dict:
    if kind == "column":
        return {"matmul": ((dp, 1), (mp, 1)), "bias_add": ((dp, mp), (mp,))}
    if kind == "row":
        return {"matmul": ((dp, mp), (1, mp)), "bias_add": ((dp, 1), (1,))}
    return {"matmul": ((dp, 1), (1, 1)), "bias_add": ((dp, 1), (1,))}


def _rms_norm(rank_mp: tuple[int, ...], dp: int) -> dict:
    x = (dp,) + rank_mp
    return {"square": (x,), "mean": (x,), "rsqrt": (x[:-1] + (1,),), "add_eps": (x[:-1] + (1,), ()),
            "mul": (x, x[:-1] + (1,)), "mul_weight": (x, (1,))}


def strategies_for(name: str, cell: nn.Cell, parallel: ParallelConfig) -> dict:
    """The strategies of one cell's primitives, keyed by the primitive's attribute name."""
    dp, mp = parallel.data_parallel, parallel.model_parallel
    vp = mp if parallel.vocab_parallel else 1
    leaf = name.rsplit(".", 1)[-1]
    heads = (dp, mp, 1, 1)  # (B, heads, S, head_dim)
    if isinstance(cell, layers.Linear):
        kind = "column" if leaf in COLUMN_PARALLEL else "row" if leaf in ROW_PARALLEL else "replicated"
        return _linear(cell, kind, dp, mp)
    if isinstance(cell, layers.RMSNorm):
        return _rms_norm((1, mp, 1) if leaf in HEAD_NORMS else (1, 1), dp)
    if isinstance(cell, layers.Embedding):
        return {"gather": ((vp, 1), (dp, 1))}
    if isinstance(cell, layers.LMHead):
        return {"matmul": ((dp, 1), (vp, 1))}
    if isinstance(cell, layers.DotProductAttention):
        return {"qk_matmul": (heads, heads), "scale": (heads, ()), "add_bias": (heads, (dp, 1, 1, 1)),
                "softmax": (heads,), "pv_matmul": (heads, heads)}
    if isinstance(cell, layers.ApplyRotary):
        return {"mul_cos": (heads, (dp, 1, 1, 1)), "mul_sin": (heads, (dp, 1, 1, 1)), "add": (heads, heads),
                "neg": (heads,), "concat": (heads, heads)}
    if isinstance(cell, layers.GroupedQueryAttention):
        return {"transpose": ((dp, 1, mp, 1),), "merge_transpose": (heads,), "repeat_kv": ((dp, mp, 1, 1, 1),)}
    if isinstance(cell, layers.SwiGLU):
        return {"silu": ((dp, 1, mp),), "mul": ((dp, 1, mp), (dp, 1, mp))}
    if isinstance(cell, layers.DecoderLayer):
        return {"attn_residual": ((dp, 1, 1), (dp, 1, 1)), "mlp_residual": ((dp, 1, 1), (dp, 1, 1))}
    if isinstance(cell, layers.CausalLMLoss):
        return {"reduce_max": ((dp, vp),), "sub": ((dp, vp), (dp, 1)), "exp": ((dp, vp),),
                "reduce_sum": ((dp, vp),), "log": ((dp, 1),), "gather": ((dp, vp), (dp, 1))}
    return {}


def apply_plan(model: nn.Cell, parallel: ParallelConfig) -> list[OpStrategy]:
    """Give every shardable primitive of `model` its strategy; return them in model order."""
    applied = []
    for name, cell in model.cells_and_names():
        for op_name, strategy in strategies_for(name, cell, parallel).items():
            op = getattr(cell, op_name)
            op.shard(strategy)
            applied.append(OpStrategy(f"{name}.{op_name}" if name else op_name, strategy))
    return applied
