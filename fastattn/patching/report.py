"""What ``fastattn.patch`` fused and what it left alone: :class:`PatchReport`, and the report of each patched model."""

from __future__ import annotations

import dataclasses
import weakref

from torch import nn

from fastattn.patching.wrappers import describe


@dataclasses.dataclass(frozen=True)
class PatchEntry:
    """One module in a :class:`PatchReport`: its qualified name (``""`` = the model itself), its class, the class
    it runs as now (``None`` when left alone) and what was fused, or why it was left alone."""

    name: str
    module: str
    fused_as: str | None
    detail: str


@dataclasses.dataclass
class PatchReport:
    """What ``fastattn.patch`` fused and what it left alone (``print(report)`` for a table)."""

    fused: list[PatchEntry] = dataclasses.field(default_factory=list)
    left_alone: list[PatchEntry] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastattn.patch: {len(self.fused)} module(s) fused, {len(self.left_alone)} left alone"]
        width = max([len(e.name or "(model)") for e in self.fused + self.left_alone] + [4])
        if self.fused:
            lines.append("fused:")
            lines += [f"  {e.name or '(model)':<{width}}  {e.module} -> {e.fused_as}: {e.detail}" for e in self.fused]
        if self.left_alone:
            lines.append("left alone:")
            lines += [f"  {e.name or '(model)':<{width}}  {e.module}: {e.detail}" for e in self.left_alone]
        return "\n".join(lines)


def type_name(cls: type) -> str:
    """fastattn's classes with their public module (``fastattn.nn.LayerNorm``, ``fastattn.models.ResNet``,
    ``fastattn.patching.timm.FusedTimmBlock``), others by their own name; a class FSDP made from one as
    ``FSDP<...>``."""
    return describe(cls, _plain_name)


def _plain_name(cls: type) -> str:
    if cls.__module__.startswith("fastattn."):
        module = cls.__module__.rsplit(".", 1)[0] if cls.__module__.startswith("fastattn.models.") else cls.__module__
        return f"{module}.{cls.__qualname__}"
    return cls.__qualname__


_REPORTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def keep(model: nn.Module, report: PatchReport | None) -> None:
    """Remember ``report`` as ``model``'s (``None``: forget it)."""
    if report is None:
        _REPORTS.pop(model, None)
    else:
        _REPORTS[model] = report


def patch_report(model: nn.Module) -> PatchReport | None:
    """The report of the last ``fastattn.patch(model)`` (None if it was not patched, or was unpatched since)."""
    return _REPORTS.get(model)
