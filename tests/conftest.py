"""Test configuration. The first lines must run before any fastattn kernel is decorated with @triton.jit."""

import os

# On a CPU-only machine the real Triton kernels run through Triton's interpreter. Triton reads the variable when a
# kernel is decorated, i.e. when fastattn is first imported, so it is set here, before anything imports fastattn.
# FASTATTN_TEST_DEVICE=cuda runs the same tests on a GPU with the compiled kernels instead (tests/harness.py's DEVICE).
if os.environ.get("FASTATTN_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its current default

import pytest
import torch
from harness import DEVICE  # imports fastattn, which decorates the kernels now, under the setting above
from shims import interpreter_shim, torchvision_cpu_shim

from fastattn import _runtime

torchvision_cpu_shim()  # tests/shims.py: also called by the worker processes of tests/ranks.py
interpreter_shim()
if DEVICE.type == "cuda":
    # The floors of fastattn.testing assume IEEE fp32 products; on a GPU torch's convolutions, and fastattn's fp32 patch
    # embedding, which follows them, would run TF32 by default (tests of that policy set the flags themselves).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _ops_on_the_test_device(monkeypatch, record_property):
    """Off the CPU, every fused op a test calls must get its tensors on the test device: CPU tensors would take the
    eager fallback (no interpreter there) and test nothing. The device of every op's arguments (that passed the ops'
    one-device check), the device each op dispatched on and the devices of every kernel launch's tensors are recorded
    as the test's ``op_devices`` property (JUnit XML; tests/test_cli.py reads it); calls that Dynamo traces are not
    seen (their launches are)."""
    if DEVICE.type == "cpu":
        yield
        return
    seen: set[str] = set()
    same, dispatch, launch = _runtime.check_same_device, _runtime.triton_device_ok, _runtime.launch

    def watch_arguments(op: str, **tensors) -> torch.device:
        device = same(op, **tensors)  # raises where a test mixes devices on purpose: nothing to record
        if not torch.compiler.is_compiling():
            seen.add(device.type)
        return device

    def watch_dispatch(device: torch.device) -> bool:
        if not torch.compiler.is_compiling():
            seen.add(device.type)
        return dispatch(device)

    def watch_launch(kernel, grid, *args, **kwargs):
        seen.update(a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_runtime, "check_same_device", watch_arguments)
    monkeypatch.setattr(_runtime, "triton_device_ok", watch_dispatch)
    monkeypatch.setattr(_runtime, "launch", watch_launch)
    yield
    record_property("op_devices", ",".join(sorted(seen)))
    if seen - {DEVICE.type}:
        pytest.fail(f"fused ops ran on {sorted(seen - {DEVICE.type})} tensors, not on the test device {DEVICE}: "
                    "create the inputs with tests/harness.py's dev()", pytrace=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- hypothesis profiles (tests/test_properties.py) -------------------------------------------------------------------
# "ci", the default: derandomized (the same examples on every run until a test or hypothesis changes), after the
# fixed examples of tests/property_examples.json (hypothesis' explicit phase); each property draws the example count
# its decorator gives, sized for the one-core interpreter budget. "long", for local runs
# (`pytest tests/test_properties.py --hypothesis-profile=long`): random examples, 300 per property, failures kept in
# hypothesis' local database (.hypothesis/, not committed) and printed as a JSON line to add to the fixed examples.
# "fixed": only the fixed examples.

from hypothesis import HealthCheck, Phase, settings  # noqa: E402 (after the environment set-up above)

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
# No explain phase (minutes of interpreter time per failure); CI does not shrink either: it reports the failing
# example as drawn, at once.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=50, suppress_health_check=_SLOW,
                          print_blob=True, phases=(Phase.explicit, Phase.reuse, Phase.generate))
settings.register_profile("long", derandomize=False, deadline=None, max_examples=300, suppress_health_check=_SLOW,
                          print_blob=True, phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink))
settings.register_profile("fixed", settings.get_profile("ci"), phases=(Phase.explicit,))  # only the fixed examples
settings.load_profile("ci")  # --hypothesis-profile=<name> (hypothesis' pytest plugin) loads another after this
