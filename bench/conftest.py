"""GPU benchmarks (pytest-benchmark). Without a CUDA device every benchmark is still collected, so a broken bench
file fails here too, and then skipped with the reason; pytest exits 0 reporting them as skipped.

``--bench-dtypes fp16,bf16`` runs every benchmark in each listed dtype (default fp16, as ``fastattn bench``).
"""

import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its current default

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def pytest_addoption(parser):
    parser.addoption("--bench-dtypes", default="fp16",
                     help=f"comma list of {', '.join(DTYPES)}: the dtypes of every benchmark (default fp16)")


def pytest_generate_tests(metafunc):
    if "dtype" not in metafunc.fixturenames:
        return
    names = [n.strip() for n in metafunc.config.getoption("--bench-dtypes").split(",") if n.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise pytest.UsageError(f"--bench-dtypes takes a comma list of {', '.join(DTYPES)}; got {bad or names}")
    metafunc.parametrize("dtype", [DTYPES[n] for n in names], ids=names)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device: the GPU benchmarks need one (`fastattn bench` prints the CPU "
                                   "report instead)")
    for item in items:
        if str(item.path).startswith(HERE + os.sep):
            item.add_marker(skip)
