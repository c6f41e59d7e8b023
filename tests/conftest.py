import mindspore as ms
import pytest

# Every test runs the Cells as they run in training: compiled graphs on the CPU target.
ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory, request):
    """A directory shared by the tests of one module (models are saved and compiled once per module)."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
