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
from shims import interpreter_shim, torchvision_cpu_shim  # noqa: E402

import fastattn  # noqa: E402,F401  (decorates the kernels now, under the setting above)

torchvision_cpu_shim()  # tests/shims.py: also called by the worker processes of tests/ranks.py
interpreter_shim()


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE)


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
