"""The one registry of ``fastattn.patch``: a :class:`Rule` per module class (or structure) it recognises.

A rule names its library and the class it recognises by path (``"timm.models.vision_transformer.Block"``), which is
resolved only when that module is already imported: a model holding one has imported it, and fastattn imports no
library for you. A module that ``fully_shard`` made an ``FSDP<Class>`` is matched as a ``Class``
(:mod:`~fastattn.patching.wrappers`). A rule may instead match by a predicate on the module (``matches=``), for
classes recognised by their structure rather than their name; exact-class rules are tried first.

What the walker does with the rule of a module:

1. the ``option`` it belongs to (``attention``, ``layer_norm``, ``patch_embed``, ``batch_norm``) must be on, else
   the module is left alone with ``"<option>=False"``;
2. where the fused class is a ``mixin`` put in front of a library class, the method it replaces must still have
   the parameters fastattn knows (``method``, ``params``), else the module is left alone with both signatures;
3. ``check(rule, name, module, options)`` returns the swaps to make (:class:`Swap`: the module itself, usually
   ``rule.swap(name, module, detail)``, and submodules such as the BatchNorms of a block) or raises :class:`Skip`
   with the reason the module is left alone.

A rule without a ``check`` swaps nothing: it recognises a container with nothing of its own to fuse (its children
are patched on their own), or a base class whose instances only the block around them fuses. ``left_alone`` is
what the report says of a module of the rule's class, or of a subclass, that no rule swapped (subclasses are never
patched: their ``forward`` may differ).

The fused subclass of a library class, ``class Fused<Library><Class>(mixin, library class)``, is built once, on
first use, and kept as a global of the mixin's module (``fastattn.patching.timm.FusedTimmBlock``), where pickling a
patched model finds it; that module's ``__getattr__`` (:func:`fused_class_getattr`) rebuilds it when unpickling.
A predicate rule with a mixin recognises classes it cannot name in advance (the 73 copies of Llama's decoder
layer in transformers), so its fused classes are generated per matched class (:func:`generated_class`, optionally
with class attributes the check computed, such as a norm's rounding order) and pickle by value: their metaclass
reduces them to (mixin, library class, attributes), and unpickling rebuilds the same class in a fresh process.

A check may also plan a :class:`Setting`, a change that is not a class swap (a Hugging Face model's attention
implementation in its config): ``apply(module)`` makes it and returns what ``undo(module, state)`` needs to revert
it exactly; ``unpatch`` calls the undos.

Each library's module (``torch_nn``, ``torchvision``, ``timm``, ``fastattn_models``) registers its rules when
``fastattn.patching`` imports it; another library is another module calling :func:`register`.
"""

from __future__ import annotations

import copyreg
import dataclasses
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from fastattn.patching.wrappers import unwrap

OPTIONS = ("attention", "layer_norm", "patch_embed", "batch_norm")


class Skip(Exception):
    """Raised by a rule's check: the module is recognised but left alone; the message says why."""


@dataclasses.dataclass(frozen=True)
class Options:
    """The families ``fastattn.patch`` was asked to fuse."""

    attention: bool = True
    layer_norm: bool = True
    patch_embed: bool = True
    batch_norm: bool = True


class Swap(NamedTuple):
    """One planned class swap: the module at qualified ``name`` is to run as ``fused``; ``detail`` says what fuses."""

    name: str
    module: nn.Module
    fused: type
    detail: str


class Setting(NamedTuple):
    """One planned change that is not a class swap, to the module at qualified ``name``: ``apply(module)`` makes it
    and returns a (picklable) state; ``undo(module, state)`` reverts it. Both are module-level functions, so a
    patched model keeps pickling. ``fused_as`` is what the report shows instead of a class."""

    name: str
    module: nn.Module
    apply: Callable[[nn.Module], Any]
    undo: Callable[[nn.Module, Any], None]
    detail: str
    fused_as: str


Check = Callable[["Rule", str, nn.Module, Options], "list[Swap | Setting]"]


@dataclasses.dataclass(frozen=True, eq=False)
class Rule:
    """How ``fastattn.patch`` recognises and swaps one class (see the module docstring).

    ``library``: the library's import name (``"torch.nn"``, ``"timm"``), also in the generated class's name.
    ``target``: the class's path; or ``None`` with ``matches``, a predicate on the module.
    ``option``: the option(s) that enable the rule; with several, any one of them; ``()`` when the check decides.
    ``fused``: the class an instance is swapped to; or ``mixin``: the class put in front of the library class to
    make it (called ``fused_name``, by default ``Fused<Library><Class>``), with ``method`` and ``params``: the
    library method the mixin replaces and that method's parameters after ``self``, checked before the rule runs.
    A predicate rule's mixin goes in front of each matched module's own class (:func:`generated_class`).
    ``check``: returns the swaps or raises :class:`Skip`; ``None`` when there is nothing to swap (a container).
    ``left_alone``: the report's reason for an unswapped module of this class or a subclass.
    """

    library: str
    target: str | None
    check: Check | None = None
    option: str | tuple[str, ...] = ()
    fused: type | None = None
    mixin: type | None = None
    method: str = "forward"
    params: tuple[str, ...] | None = None
    fused_name: str = ""
    matches: Callable[[nn.Module], bool] | None = None
    left_alone: str | None = None

    def __post_init__(self) -> None:
        if (self.target is None) == (self.matches is None):
            raise ValueError(f"fastattn.patching.Rule: give exactly one of target (a class path) and matches (a "
                             f"predicate); got target={self.target!r}, matches={self.matches!r}")
        if self.fused is not None and self.mixin is not None:
            raise ValueError(f"fastattn.patching.Rule({self.target!r}): give fused or mixin, not both")
        if self.mixin is not None and self.target is not None and not self.fused_name:
            object.__setattr__(self, "fused_name", f"Fused{self.library.capitalize()}{self.class_name}")
        unknown = [o for o in self.options if o not in OPTIONS]
        if unknown:
            raise ValueError(f"fastattn.patching.Rule({self.target!r}): option {unknown[0]!r} is not one of {OPTIONS}")

    @property
    def options(self) -> tuple[str, ...]:
        return (self.option,) if isinstance(self.option, str) else self.option

    @property
    def class_name(self) -> str:
        return self.target.rsplit(".", 1)[-1] if self.target else ""

    def resolve(self, import_it: bool = False) -> type | None:
        """The target class, only if its module is already imported (unless ``import_it``)."""
        if self.target is None:
            return None
        module_name, cls_name = self.target.rsplit(".", 1)
        module = sys.modules.get(module_name)
        if module is None and import_it:
            module = importlib.import_module(module_name)
        cls = getattr(module, cls_name, None) if module is not None else None
        return cls if isinstance(cls, type) else None

    def fused_class(self, base: type | None = None, attrs: tuple[tuple[str, Any], ...] = ()) -> type | None:
        """``fused``, or the mixin's subclass of the library class: built once, kept in the mixin's module. A
        predicate rule's (or one given ``attrs``) is generated for ``base``, the matched module's class."""
        if self.mixin is None:
            return self.fused
        if self.target is None or attrs:
            if base is None:
                raise TypeError(f"fastattn.patching.Rule({self.library!r}): a predicate rule's fused class needs the "
                                f"matched module's class")
            return generated_class(self.library, self.mixin, base, attrs)
        home = sys.modules[self.mixin.__module__]
        cls = home.__dict__.get(self.fused_name)
        if cls is None:
            base = self.resolve(import_it=True)
            if base is None:
                raise AttributeError(f"fastattn.patching: {self.target} does not exist in this {self.library}")
            cls = type(self.fused_name, (self.mixin, base), {
                "__module__": home.__name__, "__qualname__": self.fused_name,
                "__doc__": f"{base.__module__}.{base.__qualname__} running fastattn's fused ops (set per instance by "
                           f"fastattn.patch). {self.mixin.__doc__ or ''}"})
            setattr(home, self.fused_name, cls)
        return cls

    def swap(self, name: str, module: nn.Module, detail: str, attrs: tuple[tuple[str, Any], ...] = ()) -> Swap:
        """The swap of ``module`` itself to this rule's fused class (``attrs``: class attributes of a generated
        one)."""
        cls = self.fused_class(type(module), attrs)
        if cls is None:
            raise TypeError(f"fastattn.patching.Rule({self.target!r}): swap() needs a fused class or a mixin")
        return Swap(name, module, cls, detail)

    def plan(self, name: str, module: nn.Module, opts: Options) -> list[Swap | Setting]:
        """The swaps for ``module`` (the option, the signature, then the check), or :class:`Skip`."""
        if self.check is None:
            return []
        if self.options and not any(getattr(opts, o) for o in self.options):
            raise Skip(" and ".join(f"{o}=False" for o in self.options))
        if self.mixin is not None and self.params is not None:
            base = self.resolve(import_it=True) if self.target is not None else type(module)
            got = tuple(list(inspect.signature(getattr(base, self.method)).parameters)[1:])
            if got != self.params:
                raise Skip(f"this library version's {self.class_name}.{self.method}{got} is not the {self.params} "
                           f"fastattn knows")
        return list(self.check(self, name, module, opts))


class Resolved(NamedTuple):
    """The registry against the libraries imported now."""

    exact: dict[type, Rule]                  # class -> its rule
    predicates: list[Rule]                   # rules matching by structure, in registration order
    reasons: list[tuple[type, str]]          # (class, why an unswapped instance of it or a subclass is left alone)
    built_fused: tuple[type, ...]            # classes that run fused as built (fastattn's own layers)


class Registry:
    """The rules of every library, and fastattn's own classes that are fused as built."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.built_fused: list[type] = []

    def add(self, *rules: Rule) -> None:
        for rule in rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"fastattn.patching.register: expected Rule objects, got {type(rule).__name__}")
            if rule.target is not None and any(r.target == rule.target for r in self.rules):
                raise ValueError(f"fastattn.patching.register: {rule.target} already has a rule")
            self.rules.append(rule)

    def add_built_fused(self, *classes: type) -> None:
        """Classes (and their subclasses) that run fused as built: reported as fused, never swapped."""
        self.built_fused.extend(classes)

    def resolve(self) -> Resolved:
        exact: dict[type, Rule] = {}
        reasons = []
        for rule in self.rules:
            cls = rule.resolve()
            if cls is None:
                continue
            if cls in exact:
                raise RuntimeError(f"fastattn.patching: {rule.target} and {exact[cls].target} name the same class "
                                   f"{cls.__module__}.{cls.__qualname__}; one rule per class")
            exact[cls] = rule
            if rule.left_alone is not None:
                reasons.append((cls, rule.left_alone))
        return Resolved(exact, [r for r in self.rules if r.matches is not None], reasons, tuple(self.built_fused))

    def rule_for(self, module: nn.Module, resolved: Resolved | None = None) -> Rule | None:
        """The rule of ``module``: its exact class's (seen through the class FSDP's ``fully_shard`` generates around
        it, :mod:`~fastattn.patching.wrappers`), else the first predicate rule that matches it."""
        resolved = resolved or self.resolve()
        rule = resolved.exact.get(unwrap(type(module)))
        if rule is None:
            rule = next((r for r in resolved.predicates if r.matches(module)), None)
        return rule

    def fused_class_named(self, name: str, home: str | None = None) -> type | None:
        """The generated fused class called ``name`` (kept in module ``home``, or any), built if needed."""
        for rule in self.rules:
            if rule.mixin is not None and rule.fused_name == name and home in (None, rule.mixin.__module__):
                return rule.fused_class()
        return None


REGISTRY = Registry()


def register(*rules: Rule) -> None:
    """Add rules to the registry (a library's module does this when it is imported)."""
    REGISTRY.add(*rules)


# ---------------------------------------------------------------------------------------------------------------
# fused classes generated per matched class (predicate rules)
# ---------------------------------------------------------------------------------------------------------------


class GeneratedMeta(type):
    """The metaclass of generated fused classes: pickling reduces a class to how it was made (:func:`_rebuild`),
    so a patched model unpickles in a process that has never generated it."""


_GENERATED: dict[tuple, type] = {}
_METAS: dict[type, type] = {type: GeneratedMeta}


def _meta_for(base: type) -> type:
    """GeneratedMeta, or a subclass of it and of ``base``'s own metaclass where that is not ``type``."""
    meta = _METAS.get(type(base))
    if meta is None:
        meta = _METAS[type(base)] = type(f"Generated{type(base).__name__}", (GeneratedMeta, type(base)), {})
        copyreg.pickle(meta, _reduce_generated)
    return meta


def generated_class(library: str, mixin: type, base: type, attrs: tuple[tuple[str, Any], ...] = ()) -> type:
    """``class Fused<Library><Base>(mixin, base)`` with class attributes ``attrs`` (hashable, picklable values),
    built once per (mixin, base, attrs) and cached here (not a module global: two libraries' classes may share a
    name); ``__module__`` is the mixin's, so the walker and the report know it as fastattn's."""
    key = (library, mixin, base, attrs)
    cls = _GENERATED.get(key)
    if cls is None:
        name = f"Fused{library.capitalize()}{base.__name__}"
        doc = (f"{base.__module__}.{base.__qualname__} running fastattn's fused ops (set per instance by "
               f"fastattn.patch). {mixin.__doc__ or ''}")
        cls = _meta_for(base)(name, (mixin, base), {"__module__": mixin.__module__, "__qualname__": name,
                                                    "__doc__": doc, "_fastattn_made_of": key, **dict(attrs)})
        _GENERATED[key] = cls
    return cls


def _rebuild(library: str, mixin: tuple[str, str], base: tuple[str, str], attrs: tuple) -> type:
    def find(path: tuple[str, str]) -> type:
        obj: Any = importlib.import_module(path[0])
        for part in path[1].split("."):
            obj = getattr(obj, part)
        return obj

    return generated_class(library, find(mixin), find(base), attrs)


def _reduce_generated(cls: type):
    library, mixin, base, attrs = cls.__dict__["_fastattn_made_of"]
    return _rebuild, (library, (mixin.__module__, mixin.__qualname__), (base.__module__, base.__qualname__), attrs)


copyreg.pickle(GeneratedMeta, _reduce_generated)


def fused_class_getattr(module_name: str) -> Callable[[str], type]:
    """A module ``__getattr__`` for ``module_name`` that builds its fused library classes on first access, as
    unpickling a patched model does in a fresh process."""
    def __getattr__(name: str) -> type:
        cls = REGISTRY.fused_class_named(name, module_name)
        if cls is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        return cls
    return __getattr__
