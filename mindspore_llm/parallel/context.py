"""Starting the process group and choosing the parallel mode; the one place that talks to HCCL / msrun.

Three modes, always logged, never chosen silently:
  - stand-alone: one process;
  - DATA_PARALLEL over N CPU processes: started by msrun (MS_ROLE / MS_WORKER_NUM set); every rank holds the whole
    model, reads its own shard of the data and sums gradients with ``nn.DistributedGradReducer``;
  - SEMI_AUTO_PARALLEL on N Ascend devices: HCCL, the plan's op strategies, every rank fed the full global batch
    (the dataset strategy slices it), optimizer sharding and pipeline stages from the parallel config. A dry run
    (``MS_SIMULATION_LEVEL``, ``RANK_SIZE``, ``RANK_ID``: ``simulation_environment``) compiles one rank of such a
    job on a single NPU without HCCL.
MindSpore refuses SEMI_AUTO_PARALLEL on the CPU backend, so a CPU job with model_parallel > 1 is an error.

Pipeline (pipeline_stages > 1, Ascend): the stages are the ``pipeline_stage`` attributes ``apply_plan`` set; the
step's loss cell is wrapped in ``mindspore.parallel.nn.Pipeline(cell, micro_batch_num)`` (which slices every input
into micro-batches along dim 0; micro_size >= stages), the gradients pass ``PipelineGradReducer`` (MindSpore's,
with its construct fixed; the per-stage accumulated gradients, ``opt_shard`` as the optimizer sharding) and the
compiled step is ``AutoParallel(...).pipeline(stages=...)``
(https://www.mindspore.cn/docs/en/r2.10.0/api_python/parallel/mindspore.parallel.nn.Pipeline.html,
https://www.mindspore.cn/docs/en/r2.11.0/api_python/parallel/mindspore.parallel.nn.PipelineGradReducer.html,
https://www.mindspore.cn/tutorials/en/r2.9.0/parallel/pipeline_parallel.html).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from mindspore.ops import functional as F
from mindspore.parallel.nn import parallel_grad_reducer

from mindspore_llm.common import ConfigError
from mindspore_llm.parallel.config import ParallelConfig

log = logging.getLogger("mindspore_llm")

STANDALONE = "stand-alone"
DATA_PARALLEL = "data_parallel"
SEMI_AUTO = "semi_auto_parallel"


@dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    mode: str
    description: str
    # which shard of the dataset this rank reads, out of how many (semi-auto: every rank reads the full batch)
    data_rank: int
    data_world_size: int
    # data-parallel degree: the global batch is micro x accumulation x data_parallel
    data_parallel: int
    pipeline_stages: int = 1
    micro_batch_num: int = 1  # pipeline micro-batches per step (1 without a pipeline)
    optimizer_shard: bool = False
    _all_reduce: object = field(default=None, compare=False, repr=False)

    @property
    def main_rank(self) -> int:
        """The rank that logs and writes the final model: rank 0, or under a pipeline the first rank of the last
        stage (MindSpore's stage of a rank is rank // devices per stage), the only stage that computes the loss."""
        return self.world_size - self.world_size // self.pipeline_stages

    @property
    def is_main(self) -> bool:
        return self.rank == self.main_rank

    def grad_reducer(self, parameters):
        """DATA_PARALLEL: sums the gradients over the ranks inside the compiled step (the step's multiplier already
        divides by the tokens of the whole global batch, so the sum is the exact gradient). Pipeline: the per-stage
        gradient accumulation buffers of the micro-batches (``PipelineGradReducer``). None otherwise, since
        stand-alone has nothing to reduce and semi-auto parallel inserts its own collectives."""
        if self.mode == DATA_PARALLEL:
            from mindspore import nn

            return nn.DistributedGradReducer(parameters, mean=False)
        if self.pipeline_stages > 1:
            return pipeline_grad_reducer(parameters, self.optimizer_shard)
        return None

    def wrap_loss(self, loss_cell):
        """The pipeline around the step's loss cell: ``Pipeline(loss_cell, micro_batch_num)`` runs the micro-batches
        through the stages (1F1B) and sums their outputs."""
        from mindspore.parallel.nn import Pipeline

        return Pipeline(loss_cell, self.micro_batch_num)

    def step_parallelism(self, parameters) -> dict:
        """``TrainStep``'s keyword arguments for this mode: the gradient reducer, the data-parallel ranks whose token
        counts and losses the step sums, and the pipeline wrapper (None without stages)."""
        return {"grad_reducer": self.grad_reducer(parameters),
                "data_parallel": self.world_size if self.mode == DATA_PARALLEL else 1,
                "wrap_loss": self.wrap_loss if self.pipeline_stages > 1 else None}

    def sum_over_ranks(self, values):
        """Element-wise sum of a float32 NumPy vector over the data-parallel ranks (itself when there is one)."""
        if self.mode != DATA_PARALLEL:
            return values
        return self._sum_over_world(values)

    def step_report(self, loss: float, stop_requested: bool) -> tuple[float, bool]:
        """(the step's loss as the main rank computed it, whether any rank asked to stop), the same on every rank.

        One all-reduce over all ranks in every distributed mode: a SIGTERM that reaches only some ranks (one server
        of two, say) stops them all after the same step, so every rank takes part in the same checkpoint save
        instead of some entering it while the rest run on into a collective that never completes. Only the main
        rank's loss is summed in (under a pipeline only the last stage computes it)."""
        if self.mode == STANDALONE:
            return loss, stop_requested
        summed = self._sum_over_world([loss if self.is_main else 0.0, float(stop_requested)])
        return float(summed[0]), bool(summed[1] > 0)

    def _sum_over_world(self, values):
        import numpy as np
        from mindspore import Tensor

        if self._all_reduce is None:
            object.__setattr__(self, "_all_reduce", _all_reduce_sum_cell())
        return self._all_reduce(Tensor(np.asarray(values, np.float32))).asnumpy()

    def wrap_step(self, step_cell, strategy_dir: str | os.PathLike, parallel: ParallelConfig):
        """The cell to compile: under semi-auto parallel the step wrapped with ``AutoParallel`` (its strategy
        file saved beside the checkpoints, needed to merge or reshard the per-rank slices)."""
        if self.mode != SEMI_AUTO:
            return step_cell
        from mindspore.parallel.auto_parallel import AutoParallel

        net = AutoParallel(step_cell, parallel_mode="semi_auto")
        net.dataset_strategy("full_batch")
        if parallel.optimizer_shard:
            net.hsdp()
        if parallel.pipeline_stages > 1:
            net.pipeline(stages=parallel.pipeline_stages, scheduler="1f1b")
        Path(strategy_dir).mkdir(parents=True, exist_ok=True)
        net.save_param_strategy_file(str(Path(strategy_dir) / f"strategy_rank_{self.rank}.ckpt"))
        return net


class PipelineGradReducer(parallel_grad_reducer.PipelineGradReducer):
    """``mindspore.parallel.nn.PipelineGradReducer`` with a working ``construct``: MindSpore 2.10's reads an
    undefined ``grads`` when ``opt_shard`` is False (a NameError inside parallel_grad_reducer.py), so every pipeline
    run with ``optimizer_shard: false`` died. Same arithmetic as MindSpore's (and as its deprecated
    ``nn.PipelineGradReducer``): with the parallel optimizer the gradients themselves (reduce-scattered micro-batch
    by micro-batch), otherwise the ``accu_grads`` buffers that MindSpore's pipeline pass fills micro-batch by
    micro-batch; either way divided by ``scale_sense``, and the buffers zeroed for the next step."""

    def construct(self, grads):
        scale = self.scale_sense * self.degree
        if self.opt_shard:
            return self.hyper_map(F.partial(parallel_grad_reducer.shard_grad_scale, scale), self.grad_reducer(grads),
                                  self.accu_grads)
        return self.hyper_map(F.partial(parallel_grad_reducer.grad_scale, scale), grads,
                              self.grad_reducer(self.accu_grads))


def pipeline_grad_reducer(parameters, opt_shard: bool) -> PipelineGradReducer:
    return PipelineGradReducer(parameters, scale_sense=1.0, opt_shard=opt_shard)


def _all_reduce_sum_cell():
    from mindspore import nn
    from mindspore.ops import operations as P

    class AllReduceSum(nn.Cell):
        def __init__(self):
            super().__init__()
            self.all_reduce = P.AllReduce()

        def construct(self, x):
            return self.all_reduce(x)

    return AllReduceSum()


def launched_by_msrun() -> bool:
    return bool(os.environ.get("MS_ROLE")) and bool(os.environ.get("MS_WORKER_NUM"))


def launched_with_rank_table() -> bool:
    return bool(os.environ.get("RANK_TABLE_FILE") or os.environ.get("MINDSPORE_HCCL_CONFIG_PATH"))


def simulated() -> bool:
    """A dry run: MindSpore mocks the devices and the collectives (https://www.mindspore.cn/tutorials/en/r2.9.0/
    debug/dryrun.html)."""
    return bool(os.environ.get("MS_SIMULATION_LEVEL"))


def simulation_environment(parallel: ParallelConfig, rank: int) -> dict[str, str]:
    """The environment that makes one process compile rank `rank` of the job `parallel` describes, on one NPU
    without HCCL: MindSpore's simulation level 1 (compile, and count every operator's device memory)."""
    if not 0 <= rank < parallel.device_num:
        raise ConfigError(f"--rank {rank}: the job has ranks 0..{parallel.device_num - 1}")
    return {"MS_SIMULATION_LEVEL": "1", "RANK_SIZE": str(parallel.device_num), "RANK_ID": str(rank)}


def setup_parallel(parallel: ParallelConfig, device_target: str) -> ParallelContext:
    """Set GRAPH_MODE and the device, start communication when launched as a job, and pick the mode.

    Must run before any Tensor or Parameter is created (HCCL requires it). Under msrun, the scheduler process
    runs this too: ``init()`` serves the cluster there and the process ends when the job does.
    """
    import mindspore as ms

    distributed = launched_by_msrun() or (device_target == "Ascend" and (launched_with_rank_table() or simulated()))
    ms.set_context(mode=ms.GRAPH_MODE)
    if device_target == "Ascend" and "DEVICE_ID" in os.environ:
        ms.set_device("Ascend", int(os.environ["DEVICE_ID"]))
    else:
        ms.set_device(device_target)
    if not distributed:
        if parallel.device_num != 1 or parallel.micro_batch_num != 1:
            raise ConfigError(f"parallel: data_parallel x model_parallel x pipeline_stages = {parallel.device_num} "
                              f"devices (micro_batch_num {parallel.micro_batch_num}), but this is a single process; "
                              f"start the job with msrun or scripts/run_distribute.sh, or set them to 1")
        context = ParallelContext(0, 1, STANDALONE, f"stand-alone (1 {device_target} process)", 0, 1, 1)
        log.info("parallel mode: %s", context.description)
        return context

    from mindspore.communication import get_group_size, get_rank, init

    init()
    rank, world_size = get_rank(), get_group_size()
    if device_target == "CPU":
        if parallel.model_parallel != 1 or parallel.pipeline_stages != 1 or parallel.micro_batch_num != 1:
            raise ConfigError("parallel.model_parallel / pipeline_stages / micro_batch_num: only data parallelism "
                              "runs on CPU (MindSpore supports SEMI_AUTO_PARALLEL on Ascend/GPU only); set them to 1 "
                              "and accumulate with train.gradient_accumulation_steps")
        if parallel.data_parallel not in (1, world_size):
            raise ConfigError(f"parallel.data_parallel: {parallel.data_parallel}, but msrun started {world_size} "
                              f"processes; set it to {world_size} (or 1: one data-parallel rank per process)")
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                     device_num=world_size)
        context = ParallelContext(rank, world_size, DATA_PARALLEL,
                                  f"DATA_PARALLEL over {world_size} CPU processes", rank, world_size, world_size)
    else:
        if parallel.pipeline_stages == 1 and parallel.micro_batch_num != 1:
            # without stages, micro-batches are plain gradient accumulation: the training step's own loop
            raise ConfigError(f"parallel.micro_batch_num: {parallel.micro_batch_num} without pipeline stages; "
                              f"set it to 1 and accumulate with train.gradient_accumulation_steps")
        if parallel.device_num != world_size:
            raise ConfigError(f"parallel: the config needs {parallel.device_num} devices (data_parallel "
                              f"{parallel.data_parallel} x model_parallel {parallel.model_parallel} ...), "
                              f"the job has {world_size}")
        context = ParallelContext(rank, world_size, SEMI_AUTO,
                                  f"SEMI_AUTO_PARALLEL dp={parallel.data_parallel} mp={parallel.model_parallel} "
                                  f"pp={parallel.pipeline_stages} (micro-batches {parallel.micro_batch_num}) "
                                  f"on {world_size} Ascend devices",
                                  0, 1, parallel.data_parallel, parallel.pipeline_stages, parallel.micro_batch_num,
                                  parallel.optimizer_shard)
    log.info("parallel mode: %s (rank %d of %d)", context.description, rank, world_size)
    return context
