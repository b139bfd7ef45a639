"""The three-way run every op test uses, the check that the Triton kernels (not the eager fallback) ran, a spy on
the launches' arguments, and the test device the inputs go to.

``three_way(run, dtype, kernels=..., floors=...)`` calls ``run(label, lowp)`` three times: the float64 reference
(``"ref"``), eager PyTorch in the low precision (``"eager"``) and fastattn in the low precision (``"ours"``, with
its kernel launches recorded), each returning ``{name: tensor}`` for the outputs and gradients. Every name the
reference returns is then held to the rule of :mod:`fastattn.testing` (twice eager's error, one rounding of the
result in its own dtype, and the floor of the fused computation's rounding analysis for that name).

**The test device** ``DEVICE`` is ``FASTATTN_TEST_DEVICE`` (``cuda`` under ``fastattn gpu-check``: the compiled
kernels), else the CPU, where tests/conftest.py has turned Triton's interpreter on. Tests draw their inputs on the
CPU (float64 masters: the same numbers on every device) and move what the three runs and the direct calls use with
:func:`dev`; the floors of :mod:`fastattn.testing` are computed from the CPU masters. The ``ref`` run is then eager
PyTorch in float64 on the device too (fastattn's ops serve float64 off the interpreter with that reference), ``ours``
the device's kernels in fp16/bf16/fp32. Tests that check the CPU itself (the interpreter, the fallback without it)
call :func:`cpu_only`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastattn import _runtime
from fastattn.testing import assert_close_to_reference

Results = dict[str, Tensor | None]

DEVICE = torch.device(os.environ.get("FASTATTN_TEST_DEVICE", "cpu"))


def dev(t, dtype: torch.dtype | None = None, *, copy: bool = False):
    """``t`` on the test device (``DEVICE``, read at each call), in ``dtype`` when given: a tensor (``copy`` as
    ``Tensor.to``'s), a module (moved in place and returned) or None. A tensor that requires grad is refused: moved
    to another device it would be a non-leaf whose ``.grad`` stays None, so move first, then ``requires_grad_()``."""
    if t is None or isinstance(t, torch.nn.Module):
        return t if t is None else t.to(DEVICE)
    if t.requires_grad:
        raise ValueError("harness.dev: move the tensor before requires_grad_() (a leaf moved to another device is "
                         "no leaf and gets no .grad)")
    return t.to(device=DEVICE, dtype=dtype, copy=copy)


def cpu_only(reason: str) -> None:
    """Skip unless the test device is the CPU: for tests of the CPU itself (Triton's interpreter, the eager fallback
    without it, the interpreter's schedules)."""
    if DEVICE.type != "cpu":
        pytest.skip(f"CPU only: {reason} (the test device is {DEVICE})")


def assert_launched(launches: Mapping[str, int], kernels: Iterable[str] | Mapping[str, int]) -> None:
    """Each kernel launched at least once, or exactly as often as a mapping says."""
    expected = kernels.items() if isinstance(kernels, Mapping) else ((name, None) for name in kernels)
    for name, count in expected:
        ran = launches.get(name, 0)
        ok = ran >= 1 if count is None else ran == count
        want = "at least once" if count is None else f"{count} time(s)"
        assert ok, f"Triton kernel {name} should have run {want}, ran {ran}: {dict(launches)}"


def spy_launches(monkeypatch, kernel: str | None = None) -> list[tuple[str, tuple, dict]]:
    """From now until the test ends, record ``(kernel name, args, kwargs)`` of every launch (of ``kernel`` only,
    when given) in the returned list; the kernels still run."""
    calls: list[tuple[str, tuple, dict]] = []
    real = _runtime.launch

    def spy(fn, grid, *args, **kwargs):
        name = _runtime.kernel_name(fn)
        if kernel is None or name == kernel:
            calls.append((name, args, kwargs))
        return real(fn, grid, *args, **kwargs)

    monkeypatch.setattr(_runtime, "launch", spy)
    return calls


def eager_sdpa(*args, **kwargs) -> Tensor:
    """``F.scaled_dot_product_attention``: eager PyTorch's attention, the yardstick of the attention tests.

    torch 2.13's CPU flash kernel asks the *hardware* whether to pack bf16 operands for AVX-512 but runs the code of
    the *selected* capability: on an AVX-512 (AMX) CPU under ``ATEN_CPU_CAPABILITY=default`` (the scalar paths CI
    runs) some bf16 shapes raise ``pack_vnni2 is only supported when avx512 is supported``. On a CPU that really lacks
    AVX-512 that path is never taken. There, and only for that error, the yardstick is torch's math backend, the
    SDPA such a CPU serves; any other error propagates."""
    try:
        return F.scaled_dot_product_attention(*args, **kwargs)
    except RuntimeError as err:
        if "pack_vnni2" not in str(err):
            raise
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(*args, **kwargs)


def three_way(run: Callable[[str, torch.dtype], Results], dtype: torch.dtype, *,
              kernels: Iterable[str] | Mapping[str, int] = (),
              floors: Mapping[str, float] | Callable[[dict[str, Results]], Mapping[str, float]] | None = None,
              factor: float = 2.0) -> dict[str, Results]:
    """Run ``ref``, ``eager`` and ``ours``; check the kernels ran in ``ours`` and every result under the rule.

    ``floors`` maps result names to the fused computation's rounding floor (``fastattn.testing.*_floors``), or is a
    function of the three runs' results returning that mapping. Results are compared in their own dtype (one
    rounding of a float32 ``dweight`` is float32's). Returns the three runs' results by label, and ``"launches"``:
    the kernel launches of ``ours``."""
    results: dict = {}
    for label in ("ref", "eager", "ours"):
        lowp = torch.float64 if label == "ref" else dtype
        with _runtime.record_launches() as launches:
            results[label] = run(label, lowp)
        if label == "ours":
            assert_launched(launches, kernels)
            results["launches"] = launches
    floor = floors(results) if callable(floors) else (floors or {})
    for name, ref in results["ref"].items():  # every result the reference has
        if ref is None:
            continue
        ours, eager = results["ours"][name], results["eager"][name]
        assert ours is not None and eager is not None, f"{name}: missing from ours or eager"
        rule_dtype = ours.dtype if ours.dtype != torch.float64 else dtype
        assert_close_to_reference(ours, eager, ref, rule_dtype, name=name, floor=floor.get(name, 0.0),
                                  factor=factor)
    return results
