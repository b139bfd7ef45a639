"""Test configuration. The first lines must run before any fastattn kernel is decorated with @triton.jit."""

import os

# On a CPU-only machine the real Triton kernels run through Triton's interpreter. Triton reads the variable when a
# kernel is decorated, i.e. when fastattn is first imported, so it is set here, before anything imports fastattn.
# FASTATTN_TEST_DEVICE=cuda runs the same tests on a GPU with the compiled kernels instead.
DEVICE = os.environ.get("FASTATTN_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its current default

import pytest  # noqa: E402
import torch  # noqa: E402

import fastattn  # noqa: E402,F401  (decorates the kernels now, under the setting above)


def _torchvision_cpu_shim() -> None:
    """PyPI's torchvision wheels are CUDA builds. Beside the CPU torch their import fails on registering fake
    kernels for ``torchvision::nms``/``qnms``, whose schemas live in the (missing) CUDA extension; defining the two
    schemas first lets torchvision (and timm, which imports it) import. Tests only: the ops stay unimplemented."""
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # not installed: the tests that need it skip
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    global _TORCHVISION_LIB
    _TORCHVISION_LIB = torch.library.Library("torchvision", "FRAGMENT")
    _TORCHVISION_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")


_TORCHVISION_LIB = None
_torchvision_cpu_shim()


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
