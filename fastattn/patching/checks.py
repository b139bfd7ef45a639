"""Helpers for writing a :class:`~fastattn.patching.rules.Rule`'s check: each raises
:class:`~fastattn.patching.rules.Skip` with the reason a module is left alone, or returns the swaps.

A fused forward reads a module's submodules directly (``self.bn1``, ``self.conv_proj.weight``), so a check proves
that each is the exact type the fused forward assumes (:func:`exact`, :func:`identity`, :func:`patchify`) and that
no forward hooks sit on the ones whose ``forward`` it bypasses (:func:`no_hooks`).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import sys
import textwrap
import weakref
from collections.abc import Callable

from torch import nn

from fastattn.nn import FUSED_NORMS, BatchNormAct2d, BatchNormAddReLU, _check_patchify, activation_of
from fastattn.patching.rules import REGISTRY, Options, Rule, Skip, Swap
from fastattn.patching.wrappers import SHARDED, sharded, unwrap

# attribute -> what is fused there, for the BatchNorms of a ResNet block and stem
BLOCK_BNS = {"bn1": "BN + ReLU", "bn2": "BN + add + ReLU"}
BOTTLENECK_BNS = {"bn1": "BN + ReLU", "bn2": "BN + ReLU", "bn3": "BN + add + ReLU"}
STEM_BNS = {"bn1": "stem BN + ReLU"}


def child(name: str, attr: str) -> str:
    """The qualified name of submodule ``attr`` of the module at ``name``."""
    return f"{name}.{attr}" if name else attr


def no_hooks(module: nn.Module, attrs: tuple[str, ...]) -> None:
    """The fused forward bypasses these submodules' ``forward``: refuse if hooks are registered on them (FSDP's,
    on a submodule ``fully_shard`` was applied to, among them)."""
    for attr in attrs:
        m = getattr(module, attr, None)
        if sharded(m):
            raise Skip(f"its {attr} is {SHARDED} (the fused forward bypasses its forward and FSDP's hooks)")
        if isinstance(m, nn.Module) and (m._forward_hooks or m._forward_pre_hooks):
            raise Skip(f"its {attr} has forward hooks, which the fused forward would bypass")


def no_instance_forward(module: nn.Module) -> None:
    """The fused class's forward would never run under an instance attribute ``forward`` (accelerate's device-map
    hooks install one), so such a module is left alone."""
    if "forward" in module.__dict__:
        raise Skip("an instance attribute replaces its forward (an accelerate hook?), so a fused class's forward "
                   "would never run")


def _code(fn) -> str | None:
    """A function's parameters (names, kinds, defaults) and body as parsed code, without docstring, comments,
    annotations or decorators; None where the source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(tree, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    args = tree.args
    for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
        if a is not None:
            a.annotation = None
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return ast.dump(args) + ast.dump(ast.Module(body=body, type_ignores=[]))


def same_code(path: str, method: str = "forward") -> Callable[[nn.Module], bool]:
    """A rule predicate: the module's class has the same ``method`` code (:func:`_code`) as the class at ``path``.

    Libraries copy a layer's code from model to model (transformers 5.23 has 73 Llama-style decoder layers, mostly
    generated from modular files), so one fused forward serves every class whose code is the reference's, whatever
    its name. The
    reference is looked up only once its top-level package is imported, and each class is compared once."""
    package = path.split(".", 1)[0]
    seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    reference: list[str | None] = []

    def matches(module: nn.Module) -> bool:
        cls = type(module)
        if package not in sys.modules or not hasattr(cls, method):
            return False
        hit = seen.get(cls)
        if hit is None:
            if not reference:
                mod, name = path.rsplit(".", 1)
                try:
                    reference.append(_code(getattr(getattr(importlib.import_module(mod), name), method)))
                except (ImportError, AttributeError):
                    reference.append(None)
            hit = reference[0] is not None and _code(getattr(cls, method)) == reference[0]
            seen[cls] = hit
        return hit

    matches.__qualname__ = f"same_code({path!r})"
    return matches


def exact(module: nn.Module, attr: str, cls: type | tuple[type, ...], what: str) -> None:
    """``module.<attr>`` is exactly ``cls`` (one of them), not a subclass."""
    m = getattr(module, attr, None)
    classes = cls if isinstance(cls, tuple) else (cls,)
    if sharded(m):
        raise Skip(f"{attr} is {SHARDED}")
    if type(m) not in classes:
        got = "None" if m is None else type(m).__qualname__
        raise Skip(f"{attr} is {got}, not {what}")


def identity(module: nn.Module, attr: str, why: str) -> None:
    """``module.<attr>`` is absent, None or ``nn.Identity``."""
    m = getattr(module, attr, None)
    if m is not None and not isinstance(m, nn.Identity):
        raise Skip(f"{attr} is {type(m).__qualname__} ({why})")


def patchify(conv: nn.Module, what: str) -> None:
    """``conv`` is a plain ``nn.Conv2d`` with kernel size = stride, no padding, dilation or groups."""
    if sharded(conv):
        raise Skip(f"{what} is {SHARDED}")
    if type(conv) is not nn.Conv2d:
        raise Skip(f"{what} is {type(conv).__qualname__}, not a plain patchify nn.Conv2d")
    try:
        _check_patchify(conv)
    except ValueError as err:
        raise Skip(f"{what} is not a patchify convolution ({str(err).split('; ', 1)[-1]})") from None


def norm_detail(*norms: nn.Module) -> str:
    """Whether a residual add fused into these norms runs fused: they are fastattn's norms, or the registry swaps
    them to one (for a norm recognised by what it computes, its own check says so)."""
    def fusable(norm: nn.Module) -> bool:
        if isinstance(norm, FUSED_NORMS):
            return True
        rule = REGISTRY.rule_for(norm)
        fused = None if rule is None else (rule.mixin or rule.fused)
        if not (isinstance(fused, type) and issubclass(fused, FUSED_NORMS)):
            return False
        if rule.matches is not None:
            try:
                rule.plan("", norm, Options())
            except Skip:
                return False
        return True

    if all(fusable(n) for n in norms):
        return "fused"
    return "eager (the norms are not ones fastattn fuses: nn.LayerNorm / nn.RMSNorm / timm's LayerNorm / an RMSNorm " \
           "fastattn recognises)"


def norm_kernel(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    """The check of a norm: swapped as it is (``"LayerNorm kernel"``)."""
    return [rule.swap(name, m, f"{unwrap(type(m)).__name__} kernel")]


def bn_swaps(name: str, module: nn.Module, tails: dict[str, str], fused: type = BatchNormAddReLU) -> list[Swap]:
    """BatchNorm2d -> ``fused`` (BatchNormAddReLU, or BatchNormAct2d) for the given attributes (attr -> detail)."""
    swaps = []
    for attr, detail in tails.items():
        bn = getattr(module, attr)
        if sharded(bn):
            raise Skip(f"{attr} is {SHARDED}")
        if type(bn) is nn.BatchNorm2d:
            swaps.append(Swap(child(name, attr), bn, fused, detail))
        elif not isinstance(bn, fused):
            raise Skip(f"{attr} is {type(bn).__qualname__}, not nn.BatchNorm2d")
    return swaps


def act_label(act: nn.Module | None) -> str:
    """``"SiLU"``, ``"LeakyReLU(0.2)"``: what a fused activation is called in the report."""
    spec = activation_of(act)
    if act is None or spec is None or spec[0] == "identity":
        return "identity" if act is None or spec is not None else type(act).__qualname__
    return f"{type(act).__name__}({spec[1]:g})" if spec[0] == "leaky_relu" else type(act).__name__


def bn_act_pairs(m: nn.Module) -> list[tuple[str, str]]:
    """(BN attribute, activation attribute) of each child ``nn.BatchNorm2d`` directly followed by an activation
    module fastattn fuses (:func:`fastattn.nn.activation_of`; not an ``nn.Identity``), in a Sequential's order."""
    items = [(k, v) for k, v in m._modules.items() if v is not None]
    return [(a, b) for (a, ma), (b, mb) in itertools.pairwise(items)
            if type(ma) is nn.BatchNorm2d and type(mb) is not nn.Identity and activation_of(mb) is not None]


def sequential(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    """The check of a Sequential (or a Sequential subclass with Sequential's forward, torchvision's
    Conv2dNormActivation): each BN + activation pair of its children runs as one fused op
    (``fastattn.nn.run_sequential``); nothing to report when it has no such pair."""
    pairs = bn_act_pairs(m)
    if not pairs:
        return []
    if not opts.batch_norm:
        raise Skip("batch_norm=False")
    no_hooks(m, tuple(act for _, act in pairs))
    what = {bn: f"BN + {act_label(m._modules[act])}" for bn, act in pairs}
    return [rule.swap(name, m, ", ".join(f"{bn}: {w}" for bn, w in what.items()) + " fused")] + \
        bn_swaps(name, m, what, BatchNormAct2d)


def relu_block(acts: tuple[str, ...], bns: dict[str, str], detail: str = "BN + ReLU and BN + add + ReLU fused",
               also: Callable[[nn.Module], None] | None = None):
    """The check of a ResNet block or stem whose fused forward runs ``bns`` as BatchNormAddReLU in place of each BN
    and its ReLU (attributes ``acts``, each an ``nn.ReLU``); ``also(module)`` raises :class:`Skip` for what else
    the fused forward cannot reproduce."""
    def check(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
        for act in acts:
            exact(m, act, nn.ReLU, "nn.ReLU")
        if also is not None:
            also(m)
        no_hooks(m, acts)
        return [rule.swap(name, m, detail)] + bn_swaps(name, m, bns)
    return check
