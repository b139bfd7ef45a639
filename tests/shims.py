"""Import-time work-arounds for this CPU test machine, callable from tests/conftest.py and from the worker processes
that tests/ranks.py spawns (which start fresh and never read conftest.py)."""

from __future__ import annotations

import sys

import torch

_TORCHVISION_LIB = None


def torchvision_cpu_shim() -> None:
    """PyPI's torchvision wheels are CUDA builds. Beside the CPU torch their import fails on registering fake
    kernels for ``torchvision::nms``/``qnms``, whose schemas live in the (missing) CUDA extension; defining the two
    schemas first lets torchvision (and timm, which imports it) import. Tests only: the ops stay unimplemented."""
    global _TORCHVISION_LIB
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # not installed: the tests that need it skip
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _TORCHVISION_LIB = torch.library.Library("torchvision", "FRAGMENT")
    _TORCHVISION_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
