"""The walk of ``fastattn.patch``: plan every swap against the original classes, apply them, explain the rest.

1. Plan: for each module of ``model.named_modules()`` (parents before children), one already patched or fused as
   built is reported as fused; otherwise the registry's rule for its exact class (or the first predicate rule that
   matches it) returns the swaps or the reason it is left alone. A module a rule has planned (a block's BatchNorm)
   is not planned again on its own.
2. Apply: each planned module keeps its original class in its ``__dict__`` and gets the fused class (wrapped as
   FSDP wrapped the original, for a module ``fully_shard`` was applied to: :mod:`~fastattn.patching.wrappers`); a
   planned :class:`~fastattn.patching.rules.Setting` (not a class swap) is applied and its undo kept in the
   ``__dict__``.
3. Explain: the modules no rule handled are reported with a reason where one is known (a subclass of a recognised
   class, a BatchNorm with no ReLU after it) or where their class name looks fusable.
"""

from __future__ import annotations

import re

from torch import nn

from fastattn.patching import report as _report
from fastattn.patching.report import PatchEntry, PatchReport, type_name
from fastattn.patching.rules import REGISTRY, Options, Resolved, Setting, Skip, Swap
from fastattn.patching.wrappers import rewrap, unwrap

ORIGINAL = "_fastattn_unpatched_class"  # instance attribute: the class to restore
UNDO = "_fastattn_undo"  # instance attribute: [(undo, state)] of the settings applied to the module

# Module classes whose names suggest something fusable; the ones without a rule are reported as not recognised.
_LOOKS_FUSABLE = re.compile(r"Attention|Attn|Norm|Block|Transformer|Encoder|Decoder|PatchEmbed|Bottleneck")


def _fused_already(m: nn.Module, resolved: Resolved) -> bool:
    return (ORIGINAL in m.__dict__ or UNDO in m.__dict__ or isinstance(m, resolved.built_fused)
            or unwrap(type(m)).__module__.startswith("fastattn.patching."))


def _plan(modules: list[tuple[str, nn.Module]], opts: Options, resolved: Resolved,
          report: PatchReport) -> tuple[list[Swap | Setting], set[int]]:
    swaps: list[Swap | Setting] = []
    handled: set[int] = set()
    for name, m in modules:
        if id(m) in handled:
            continue
        if _fused_already(m, resolved):
            was = m.__dict__.get(ORIGINAL, type(m))
            already = ORIGINAL in m.__dict__ or UNDO in m.__dict__
            report.fused.append(PatchEntry(name, type_name(was), type_name(type(m)),
                                           "already fused" if already else "built fused"))
            handled.add(id(m))
            continue
        rule = REGISTRY.rule_for(m, resolved)
        if rule is None:
            continue
        try:
            planned = rule.plan(name, m, opts)
        except Skip as skip:
            report.left_alone.append(PatchEntry(name, type_name(type(m)), None, str(skip)))
            handled.add(id(m))
            continue
        for swap in planned:
            if id(swap.module) not in handled:
                swaps.append(swap)
                handled.add(id(swap.module))
        handled.add(id(m))
    return swaps, handled


def _apply(swaps: list[Swap | Setting], report: PatchReport) -> None:
    for swap in swaps:
        if isinstance(swap, Setting):
            state = swap.apply(swap.module)
            swap.module.__dict__.setdefault(UNDO, []).append((swap.undo, state))
            report.fused.append(PatchEntry(swap.name, type_name(type(swap.module)), swap.fused_as, swap.detail))
            continue
        fused = rewrap(type(swap.module), swap.fused)  # FSDP<Class> -> FSDP<Fused...>
        report.fused.append(PatchEntry(swap.name, type_name(type(swap.module)), type_name(fused), swap.detail))
        swap.module.__dict__[ORIGINAL] = type(swap.module)
        swap.module.__class__ = fused


def _left_alone_reason(m: nn.Module, reasons: list[tuple[type, str]]) -> str | None:
    for cls, reason in reasons:
        if isinstance(m, cls):
            return reason
    if _LOOKS_FUSABLE.search(type(m).__name__):
        return "not recognised by fastattn.patch"
    return None


def patch(model: nn.Module, *, attention: bool = True, layer_norm: bool = True, patch_embed: bool = True,
          batch_norm: bool = True, verbose: bool = False) -> nn.Module:
    """Swap fastattn's fused ops into ``model`` in place and return it; ``fastattn.unpatch(model)`` undoes it.

    Each option enables one family (see :mod:`fastattn.patching`). Parameters, buffers, dtypes and ``state_dict``
    keys are unchanged, so checkpoints load either way and optimizers keep working. ``fastattn.patch_report(model)``
    returns what was fused and what was left alone, and why; ``verbose=True`` prints it. Patching twice does nothing
    more. Fused dropout (before a fused add + norm, in attention) draws from fastattn's own random stream, so a
    patched model in training with dropout > 0 matches the original in distribution, not bit for bit.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastattn.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    opts = Options(bool(attention), bool(layer_norm), bool(patch_embed), bool(batch_norm))
    report = PatchReport()
    modules = list(model.named_modules())
    resolved = REGISTRY.resolve()
    swaps, handled = _plan(modules, opts, resolved, report)  # against the original classes, before any swap
    _apply(swaps, report)
    for name, m in modules:
        if id(m) not in handled:
            reason = _left_alone_reason(m, resolved.reasons)
            if reason is not None:
                report.left_alone.append(PatchEntry(name, type_name(type(m)), None, reason))
    order = {name: i for i, (name, _) in enumerate(modules)}
    report.fused.sort(key=lambda e: order.get(e.name, -1))
    _report.keep(model, report)
    if verbose:
        print(report)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``fastattn.patch`` on ``model`` (every swapped module gets its original class back) and return it.

    A module sharded by ``fully_shard`` after it was patched gets FSDP's class of its original class, so that it
    stays sharded (``FSDP<FusedTimmBlock>`` -> ``FSDP<Block>``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastattn.unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    for _, m in model.named_modules():
        for undo, state in reversed(m.__dict__.pop(UNDO, [])):
            undo(m, state)
        orig = m.__dict__.pop(ORIGINAL, None)
        if orig is not None:
            m.__class__ = rewrap(type(m), orig)
    _report.keep(model, None)
    return model
