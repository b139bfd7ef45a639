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


def interpreter_shim() -> None:
    """Triton's interpreter (3.x) re-patches ``triton.language`` at every call of a nested ``@triton.jit`` function:
    ``inspect.getmembers`` scans that find nothing left to patch when the launch around the call has patched those
    very modules (its scope restores them when the launch ends). A third of an interpreted BatchNorm step is spent
    there. While a launch has them patched, a nested call whose language modules are among them skips it; anything
    else runs as Triton wrote it, and an interpreter without these internals is left alone."""
    import inspect
    import threading

    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return
    patch_lang = getattr(interp, "_patch_lang", None)
    scope_cls = getattr(interp, "_LangPatchScope", None)
    if patch_lang is None or scope_cls is None or getattr(patch_lang, "_fastattn_shim", False):
        return
    state = threading.local()

    def langs(fn) -> set[int]:  # the modules Triton's _patch_lang patches for fn
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_once(fn):
        patched = getattr(state, "patched", None)
        if patched is not None and langs(fn) <= patched:
            return scope_cls()  # nested call inside a launch: nothing left to patch, nothing to restore
        scope = patch_lang(fn)
        if patched is not None:  # nested, other modules: patched until the launch ends, as Triton leaves them
            patched |= langs(fn)
            return scope
        state.patched = langs(fn)
        restore = scope.restore

        def restore_and_clear() -> None:
            state.patched = None
            restore()

        scope.restore = restore_and_clear
        return scope

    patch_once._fastattn_shim = True
    interp._patch_lang = patch_once
