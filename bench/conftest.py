"""GPU benchmarks (pytest-benchmark). Without a CUDA device every benchmark is still collected, so a broken bench
file fails here too, and then skipped with the reason; pytest exits 0 reporting them as skipped."""

import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its current default

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device: the GPU benchmarks need one (`fastattn bench` prints the CPU "
                                   "report instead)")
    for item in items:
        if str(item.path).startswith(HERE + os.sep):
            item.add_marker(skip)
