"""Compatibility alias: the patcher lives in :mod:`fastattn.patching` now.

Kept so that old import paths keep working (``import fastattn.patch``, ``from fastattn.patch import PatchReport``)
and so do models pickled before the package existed, whose fused classes were globals of this module
(``fastattn.patch.FusedTimmBlock``, ``fastattn.patch.FusedMultiheadAttention``): unpickling finds them here and
gets the classes of :mod:`fastattn.patching` (the library ones are built on first access). ``fastattn.patch`` itself
is the function :func:`fastattn.patching.patch`, as it always was (so ``import fastattn.patch as p`` binds the
function too); this module is ``sys.modules["fastattn.patch"]`` (``importlib.import_module("fastattn.patch")``).
"""

from fastattn.patching import PatchEntry, PatchReport, patch, patch_report, unpatch
from fastattn.patching.rules import REGISTRY
from fastattn.patching.torch_nn import (
    FusedMultiheadAttention,
    FusedTransformerDecoderLayer,
    FusedTransformerEncoder,
    FusedTransformerEncoderLayer,
)

__all__ = [
    "FusedMultiheadAttention",
    "FusedTransformerDecoderLayer",
    "FusedTransformerEncoder",
    "FusedTransformerEncoderLayer",
    "PatchEntry",
    "PatchReport",
    "patch",
    "patch_report",
    "unpatch",
]


def __getattr__(name: str) -> type:
    cls = REGISTRY.fused_class_named(name)  # FusedTorchvision* / FusedTimm*, from their module in fastattn.patching
    if cls is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return cls
