"""Classes that FSDP2 generates around a module's own: how ``fastattn.patch`` sees through them and rebuilds them.

``torch.distributed.fsdp.fully_shard(module)`` sets ``module.__class__`` to ``FSDP<Class>``, made once per class as
``type("FSDP" + Class.__name__, (FSDPModule, Class), {"__deepcopy__": ...})`` and cached by FSDP. The module's
forward is still ``Class.forward``, run between FSDP's forward hooks (which unshard the parameters before it and
reshard them after), so a fused forward may take its place as long as the wrapping is kept:

- :func:`unwrap`: the class a rule is looked up by (``Class`` for ``FSDP<Class>``);
- :func:`rewrap`: the class a swapped or restored module gets: the fused (or original) class wrapped the way the
  module's current class is, through FSDP's own cache, so that sharding a patched module and patching a sharded one
  give the same class (``FSDP<FusedTimmBlock>``);
- :func:`sharded`: whether a module is wrapped. A fused forward that bypasses a submodule's ``forward`` would also
  bypass FSDP's hooks on it (its parameters would stay sharded): such a module is left alone with
  :data:`SHARDED`.

Nothing here imports torch.distributed.fsdp: a class can only be FSDP's if FSDP is already imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

SHARDED = "sharded by FSDP: patch before fully_shard"

_FSDP = "torch.distributed.fsdp"
_FSDP_CACHE = "torch.distributed.fsdp._fully_shard._fully_shard"  # cls_to_fsdp_cls: FSDP's class cache


def _marker() -> type | None:
    fsdp = sys.modules.get(_FSDP)
    marker = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    return marker if isinstance(marker, type) else None


def _wrapped(cls: type) -> tuple[type, type] | None:
    """``(FSDP's base class, the wrapped class)`` if ``cls`` is a class FSDP generated, else None."""
    marker = _marker()
    bases = cls.__bases__
    if marker is None or len(bases) != 2 or not issubclass(bases[0], marker) or issubclass(bases[1], marker):
        return None
    return bases[0], bases[1]


def sharded(module: object) -> bool:
    """``module`` runs as a class FSDP generated (``fully_shard`` was applied to it)."""
    return _wrapped(type(module)) is not None


def describe(cls: type, name: Callable[[type], str]) -> str:
    """``FSDP<name(Class)>`` for a class FSDP made from ``Class``, else ``name(cls)``."""
    pair = _wrapped(cls)
    if pair is None:
        return name(cls)
    inner = pair[1]
    prefix = cls.__name__[: len(cls.__name__) - len(inner.__name__)] if cls.__name__.endswith(inner.__name__) else \
        pair[0].__name__
    return f"{prefix}<{name(inner)}>"


def unwrap(cls: type) -> type:
    """The class FSDP wrapped to make ``cls`` (``cls`` itself when FSDP did not make it)."""
    pair = _wrapped(cls)
    return cls if pair is None else pair[1]


def rewrap(like: type, cls: type) -> type:
    """``cls`` wrapped the way ``like`` is: ``FSDP<cls>`` when ``like`` is an FSDP class and ``cls`` is not one,
    else ``cls``. Made the way FSDP makes its classes and kept in FSDP's cache (where FSDP finds it too)."""
    pair = _wrapped(like)
    if pair is None or _wrapped(cls) is not None:
        return cls
    base, inner = pair
    holder = sys.modules.get(_FSDP_CACHE)
    cache = getattr(holder, "cls_to_fsdp_cls", None) if base is _marker() else None
    made = cache.get(cls) if isinstance(cache, dict) else _OWN.get((base, cls))
    if made is None:
        prefix = like.__name__[: len(like.__name__) - len(inner.__name__)] if like.__name__.endswith(
            inner.__name__) else "FSDP"
        extra = {k: v for k, v in vars(like).items() if k in ("__deepcopy__", "__module__")}  # as FSDP's own
        made = type(f"{prefix}{cls.__name__}", (base, cls), extra)
        if isinstance(cache, dict):
            cache[cls] = made
        else:
            _OWN[(base, cls)] = made
    return made


_OWN: dict[tuple[type, type], type] = {}  # wrappers of FSDPModule subclasses whose cache fastattn does not know
