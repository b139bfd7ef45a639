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


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
