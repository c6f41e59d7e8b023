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


# MindSpore 2.10 caches parsed graphs partly by object address: a Cell freed by one test and a new Cell allocated
# at the same address by a later test can pick up the old Cell's graph (seen as "The parameters number of the
# function is 3, but the number of provided arguments is 1" for a branch the new Cell does not take). A training
# process builds its model once; the test session builds hundreds, so it keeps every Cell alive.
_every_cell = []
_cell_init = ms.nn.Cell.__init__


def _init_and_keep(self, *args, **kwargs):
    _cell_init(self, *args, **kwargs)
    _every_cell.append(self)


ms.nn.Cell.__init__ = _init_and_keep
