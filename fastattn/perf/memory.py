"""Measured (not estimated) memory and HBM traffic of a forward + backward, on FakeTensors at real shapes.

:func:`measure` runs a forward and a backward under ``FakeTensorMode``: every tensor has its real size, dtype and
strides but no data, so a ViT-B/16 block at batch 64 costs milliseconds on a CPU. fastattn's custom ops have fake
implementations, so the fused path traces with the sizes its kernels would allocate, without running a kernel.
Three numbers come out of one run:

- **saved for backward**: the storages that autograd keeps for the backward, from
  ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once (a view saved twice, or a view of a
  bigger buffer, counts that buffer once) and only if still alive when the forward returns (a graph branch that
  does not reach the outputs frees what it saved); parameters are listed but not counted (resident anyway).
- **peak live bytes**: a ``TorchDispatchMode`` sees every op's outputs; a storage is live from the op that
  creates it until its last reference dies (checked with a weak reference before each op). The peak includes the
  inputs, parameters, gradients and the kernel scratch of :data:`fastattn.perf.cases.SCRATCH` while its op runs.
- **traffic**: per aten op, bytes read (each tensor input's distinct elements: a stride-0 broadcast dim counts
  once) plus bytes written (its outputs). Views (an output sharing an input's storage, e.g. ``view``,
  ``transpose``, ``expand``, ``_unsafe_view``) move nothing; ``empty*`` allocations write nothing; in-place ops
  count their destination as read and written. A fused custom op is one op: its inputs read once, outputs
  written once, i.e. exactly the minimum a fused kernel must move.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastattn.ops._common import dtype_name
from fastattn.perf.cases import SCRATCH

_ALLOC_ONLY = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
               "aten::new_empty_strided"}


@dataclasses.dataclass
class SavedTensor:
    role: str  # "input <name>", "output", "parameter" or "intermediate"
    shape: tuple[int, ...]
    dtype: str
    nbytes: int  # bytes of the whole storage it keeps alive


@dataclasses.dataclass
class Measurement:
    saved: list[SavedTensor]  # one entry per distinct storage
    saved_bytes: int  # distinct storages saved for backward, parameters excluded
    peak_bytes: int  # peak live tensor bytes over forward + backward (inputs, parameters, grads, scratch included)
    scratch_bytes: int  # the largest kernel scratch added from SCRATCH (0 if none)
    traffic: dict[str, int]  # {"fwd": bytes, "bwd": bytes}
    traffic_by_op: dict[str, dict[str, int]]  # phase -> aten op -> bytes
    ops_run: dict[str, dict[str, int]]  # phase -> op -> number of calls


def _key(t: Tensor) -> int:
    return StorageWeakRef(t.untyped_storage()).cdata


def _tensors(tree: Any) -> list[Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, Tensor)]


def distinct_bytes(t: Tensor) -> int:
    """Bytes of the distinct elements a tensor (view) covers: a stride-0 (broadcast) dim counts once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n * t.element_size()


def moved_bytes(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """Bytes one aten op reads plus writes (see the module docstring for views and allocations)."""
    outs = _tensors(out)
    if not outs:
        return 0
    schema = func._schema
    if schema.name in _ALLOC_ONLY:
        return 0
    ins = _tensors((args, kwargs))
    in_keys = {_key(t) for t in ins}
    if not schema.is_mutable and any(_key(o) in in_keys for o in outs):
        return 0  # a view: no data moves
    seen, read = set(), 0
    for t in ins:
        ident = (_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ident not in seen:
            seen.add(ident)
            read += distinct_bytes(t)
    return read + sum(distinct_bytes(o) for o in outs)


class _Tracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.scratch = 0
        self.phase: str | None = None
        self.traffic = {"fwd": collections.Counter(), "bwd": collections.Counter()}
        self.calls = {"fwd": collections.Counter(), "bwd": collections.Counter()}

    def live_bytes(self) -> int:
        return sum(n for _, n in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[k]
        out = func(*args, **kwargs)
        for t in _tensors(out):
            s = t.untyped_storage()
            ref = StorageWeakRef(s)
            if ref.cdata not in self.live:
                self.live[ref.cdata] = (ref, s.nbytes())
        name = func._schema.name
        scratch = SCRATCH[name](args, kwargs) if name in SCRATCH else 0
        self.scratch = max(self.scratch, scratch)
        self.peak = max(self.peak, self.live_bytes() + scratch)
        if self.phase is not None:
            label = name.replace("::", ".")
            self.traffic[self.phase][label] += moved_bytes(func, args, kwargs, out)
            self.calls[self.phase][label] += 1
        return out


def measure(setup: Callable[[], tuple[Callable[[], Any], dict[str, Tensor], Sequence[Tensor]]]) -> Measurement:
    """Trace one forward + backward on FakeTensors.

    ``setup()`` runs inside the fake mode (so its allocations count towards the peak) and returns
    ``(forward, inputs, parameters)``: ``forward()`` computes the outputs, ``inputs`` names the input tensors
    (for the saved-tensor roles), ``parameters`` are listed but not counted among the saved bytes. The backward
    is seeded with ones for every floating output that requires grad and computes the gradients of the inputs and
    parameters that require grad with ``torch.autograd.grad`` (returned and kept to the end, as ``.grad`` would
    be, but without ``.grad``'s bookkeeping: a gradient two leaves share is not copied for the second one, a copy
    no model makes since there the gradient flows on into the layers before).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    # storage key -> (weak ref, shape, dtype, bytes). The weak reference also keeps the key from being reused by
    # a later storage (a saved tensor of a graph branch that does not reach the outputs dies during the forward).
    packed: dict[int, tuple[StorageWeakRef, tuple[int, ...], str, int]] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        ref = StorageWeakRef(s)
        packed.setdefault(ref.cdata, (ref, tuple(t.shape), dtype_name(t.dtype), s.nbytes()))
        return t  # keeps nothing of its own: holding the tensor here would keep it alive past the backward

    with FakeTensorMode(), _Tracker() as tracker:
        forward, inputs, params = setup()
        roles = {_key(p): "parameter" for p in params}
        roles.update({_key(t): f"input {n}" for n, t in inputs.items()})
        tracker.phase = "fwd"
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
        tracker.phase = None
        kept = {k for k, (ref, *_) in packed.items() if not ref.expired()}  # what the graph still holds
        outs = [t for t in _tensors(out) if t.requires_grad and t.is_floating_point()]
        roles.update({_key(t): "output" for t in outs})
        seeds = [torch.ones_like(t) for t in outs]
        leaves = [t for t in [*inputs.values(), *params] if t.requires_grad]
        tracker.phase = "bwd"
        grads = torch.autograd.grad(outs, leaves, seeds, allow_unused=True) if outs and leaves else ()
        tracker.phase = None  # an inference-only op (nothing requires grad) has no backward: 0 bytes
        del out, outs, seeds, grads
    saved = [SavedTensor(roles.get(k, "intermediate"), shape, dtype, n) for k, (_, shape, dtype, n) in packed.items()
             if k in kept]
    return Measurement(
        saved=saved,
        saved_bytes=sum(s.nbytes for s in saved if s.role != "parameter"),
        peak_bytes=tracker.peak,
        scratch_bytes=tracker.scratch,
        traffic={p: sum(c.values()) for p, c in tracker.traffic.items()},
        traffic_by_op={p: dict(c.most_common()) for p, c in tracker.traffic.items()},
        ops_run={p: dict(c) for p, c in tracker.calls.items()},
    )


def measure_call(make: Callable[[torch.device, torch.dtype], Any], fn: Callable, dtype: torch.dtype,
                 device: str = "cpu") -> Measurement:
    """:func:`measure` for an op: ``make(device, dtype)`` gives the :class:`~fastattn.perf.cases.Inputs`."""

    def setup():
        inputs = make(torch.device(device), dtype)
        named = {n: a for n, a in zip(inputs.names, inputs.args) if isinstance(a, Tensor)}
        return (lambda: inputs.call(fn)), named, []

    return measure(setup)


def summarize_saved(saved: Iterable[SavedTensor]) -> str:
    """``input q, input k, output, 2x (64, 12, 197, 197) float16`` -- what a graph keeps for its backward
    (parameters left out, equal intermediates grouped)."""
    parts: dict[str, int] = {}
    for s in saved:
        if s.role != "parameter":
            label = s.role if s.role != "intermediate" else f"{tuple(s.shape)} {s.dtype}"
            parts[label] = parts.get(label, 0) + 1
    return ", ".join(label if n == 1 else f"{n}x {label}" for label, n in parts.items())
