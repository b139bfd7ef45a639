"""Device policy, kernel launching and launch accounting shared by every fused op.

Device policy (README, "Device policy"):
- CUDA tensors run the compiled Triton kernels.
- CPU tensors run the same Triton kernels through Triton's interpreter when ``TRITON_INTERPRET=1`` was set
  before ``fastattn`` was imported; otherwise they run the eager reference in ``fastattn.reference`` and a
  one-time :class:`FallbackWarning` says so.

Every kernel launch goes through :func:`launch`, which counts it, so tests (and users) can check that the
Triton kernel ran and not the eager fallback: ``with fastattn.record_launches() as n: ...; n["_attn_fwd"]``.

Determinism (README, "Determinism"): no kernel uses atomics, so every forward and backward is bitwise repeatable
for one device and one kernel config. Under ``torch.use_deterministic_algorithms(True)`` :func:`launch` also
skips autotuning and runs the first config the autotuner's prune keeps, so the bits no longer depend on which
config a timing run happened to pick.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fastattn.kernels import _common


class FallbackWarning(UserWarning):
    """A fused op ran the eager PyTorch reference instead of its Triton kernel (the reason is in the message)."""


def interpreting() -> bool:
    """True when ``@triton.jit`` functions are built for Triton's CPU interpreter.

    Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so the answer is taken from one of our own
    kernels rather than from the environment now.
    """
    return _INTERPRETING


_INTERPRETING = _common.interpreting()  # fixed for the process, so torch.compile sees a constant


def jit_function(kernel: Any) -> Any:
    """The ``@triton.jit`` function under any ``autotune``/``heuristics`` wrappers."""
    while type(kernel).__name__ in ("Autotuner", "Heuristics"):
        kernel = kernel.fn
    return kernel


def kernel_name(kernel: Any) -> str:
    return jit_function(kernel).__name__


def triton_device_ok(device: torch.device) -> bool:
    """Whether tensors on ``device`` can be served by the Triton kernels under the current policy."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return interpreting()
    return False


# -- launch accounting ----------------------------------------------------------------------------------------

_lock = threading.Lock()
_recorders: list[collections.Counter] = []


def launch(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> Any:
    """Launch ``kernel[grid](*args, **kwargs)`` and count it under the kernel's function name.

    Under ``torch.use_deterministic_algorithms(True)`` an autotuned kernel runs its :func:`fixed_config` instead
    of the autotuner's timed choice.
    """
    name = kernel_name(kernel)
    with _lock:
        for counter in _recorders:
            counter[name] += 1
    if type(kernel).__name__ == "Autotuner" and torch.are_deterministic_algorithms_enabled():
        config = fixed_config(kernel, args, kwargs)
        return kernel.fn[grid](*args, **kwargs, **config.all_kwargs())
    return kernel[grid](*args, **kwargs)


def fixed_config(tuner: Any, args: Sequence[Any], kwargs: dict) -> Any:
    """The first of an autotuner's configs that its prune keeps for these arguments: a choice made from the
    arguments alone (shapes, dtypes, flags), never from timings, so it is the same in every process."""
    configs = tuner.configs
    if tuner.early_config_prune is not None:
        configs = tuner.early_config_prune(configs, dict(zip(tuner.arg_names, args)), **kwargs)
    return configs[0]


def deterministic_backward() -> bool:
    """Always True: every fastattn op's forward and backward is deterministic.

    No kernel uses atomics; every reduction across programs (attention's dK/dV and dQ, the dweight/dbias and
    batch-statistics partial sums) is a fixed number of partials added in a fixed order, so repeated passes on the
    same inputs are bitwise equal on one device and one kernel config. The number of partials may depend on the
    GPU's SM count (another GPU model may round differently) and, on a GPU, the config on the autotuner's timings;
    ``torch.use_deterministic_algorithms(True)`` fixes the config too (:func:`fixed_config`).
    """
    return True


@contextlib.contextmanager
def record_launches() -> Iterator[collections.Counter]:
    """Count the Triton kernel launches made inside the ``with`` block, by kernel function name."""
    counter: collections.Counter = collections.Counter()
    with _lock:
        _recorders.append(counter)
    try:
        yield counter
    finally:
        with _lock:  # by identity: list.remove compares Counters by value, and nested empty ones are equal
            _recorders[:] = [c for c in _recorders if c is not counter]


# -- visible fallback -----------------------------------------------------------------------------------------

_warned: set[tuple[str, str]] = set()


def warn_fallback(op: str, reason: str) -> None:
    """Warn once per (op, reason) that ``op`` runs the eager reference."""
    key = (op, reason)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"fastattn.{op}: running the eager PyTorch reference because {reason}.", FallbackWarning,
                  stacklevel=3)


def device_fallback_reason(device: torch.device) -> str:
    if device.type == "cpu":
        return ("the inputs are on the CPU and Triton's interpreter is off "
                "(set TRITON_INTERPRET=1 before importing fastattn to run the Triton kernels on the CPU)")
    return f"Triton kernels do not run on device type '{device.type}'"


# -- argument checks every op makes ---------------------------------------------------------------------------


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    items = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise RuntimeError(f"fastattn.{op}: all tensors must be on one device, but {first_name} is on "
                               f"{first.device} and {name} is on {t.device}")
    return first.device
