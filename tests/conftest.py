import mindspore as ms
import pytest

# Every test runs the Cells as they run in training: compiled graphs on the CPU target.
ms.set_context(mode=ms.GRAPH_MODE)
# Set once, before any kernel runs: MindSpore refuses a later set_device once the runtime is up, and the trainer's
# setup_parallel() calls set_device("CPU") itself (a repeat with the same target is accepted).
ms.set_device("CPU")


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory, request):
    """A directory shared by the tests of one module (models are saved and compiled once per module)."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


# No guard keeps Cells alive here. An earlier one held every Cell for the whole session because "a new Cell at a
# freed Cell's address picked up its graph". MindSpore 2.10 does not do that: a Cell's compiled graph is keyed by
# phase + its creation time (ns, set in Cell.__init__) + id + argument key (graph/api.py `_real_phase`), kept in the
# Cell's own compile_cache and released by Cell.__del__ (`del_net_res`), so a new Cell never meets a freed Cell's key.
# Checked: the suite passes without the guard (all but the tests that launch msrun or the shell launchers, in two
# runs of one process each: hundreds of models built and freed, trainers, LoRA, teacher + student, from_pretrained,
# generation, as in a notebook or an evaluation after training), and 300
# Cells built, called and freed in a loop reusing 13 addresses, with branches on their attributes, all gave their own
# results. What does reuse a graph is the same Cell changed after it compiled: its key is unchanged, so a model
# called before `apply_lora` ran its LoRA-less graph afterwards (reproduced; LoRA B != 0 and unchanged logits).
# `lora.apply_lora` renews the model's creation time for that reason, and nothing else in the package restructures
# a compiled Cell.
