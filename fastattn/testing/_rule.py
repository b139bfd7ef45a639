"""The rule of :mod:`fastattn.testing` and the rounding arithmetic its floor functions share."""

from __future__ import annotations

import math

import torch
from torch import Tensor

UNIT_ROUNDOFF = {
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
}


def max_err(x: Tensor, ref: Tensor) -> float:
    """``max |x - ref|`` in float64 (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    return (x.detach().double() - ref.detach().double()).abs().max().item()


def rule_bound(eager: Tensor, ref: Tensor, dtype: torch.dtype, floor: float = 0.0, factor: float = 2.0) -> float:
    """The largest error the rule allows: ``factor * err(eager) + u(dtype) * max|ref| + floor``."""
    top = ref.detach().abs().max().item() if ref.numel() else 0.0
    return factor * max_err(eager, ref) + UNIT_ROUNDOFF[dtype] * top + floor


def assert_close_to_reference(ours: Tensor, eager: Tensor, ref: Tensor, dtype: torch.dtype, *, name: str = "output",
                              floor: float = 0.0, factor: float = 2.0) -> None:
    """Raise ``AssertionError`` unless ``err(ours) <= factor * err(eager) + u(dtype) * max|ref| + floor``.

    ``ref`` is the float64 reference, ``eager`` eager PyTorch in ``dtype``, ``floor`` the fused computation's own
    rounding bound (the ``*_floors`` functions here give it per output). ``ours`` must have ``ref``'s shape and be
    finite wherever ``ref`` is."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ours.detach().double()).all() or not torch.isfinite(ref).all(), f"{name}: non-finite values"
    e_ours, bound = max_err(ours, ref), rule_bound(eager, ref, dtype, floor, factor)
    assert e_ours <= bound, (f"{name}: max error {e_ours:.3e} > {bound:.3e} = {factor} x eager "
                             f"{max_err(eager, ref):.3e} + one rounding + floor {floor:.3e} ({dtype})")


def _roundoffs(dtype: torch.dtype) -> tuple[float, float, float]:
    """(u of the kernels' arithmetic, u of results stored in ``dtype``, u of tensor-core operands cast to ``dtype``:
    0 where the cast is exact, i.e. for fp32 and fp64)."""
    compute = UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    return compute, UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[dtype] if dtype in (torch.float16, torch.bfloat16) else 0.0


def tree_sum_terms(n: int) -> int:
    """The ``k`` of ``k u sum|x|``, the error bound of a kernel's ``tl.sum`` over ``n`` values of a row (see the
    module docstring): ``ceil(log2 n) + 32``, plus one per 2048-column chunk beyond the first (the looped paths)."""
    return math.ceil(math.log2(max(n, 2))) + 32 + max(0, math.ceil(n / 2048) - 1)


def blocked_terms(n: int) -> int:
    """The ``k`` of ``k u sum|a b|`` for a kernel's GEMM reduction over ``n`` terms: ``tl.dot`` tiles of at most 64
    summed in any order, at least 16 per tile, the tiles accumulated in sequence (at most ``n - 1`` in all)."""
    return min(max(n - 1, 0), 64 + math.ceil(n / 16))


def _top(t: Tensor) -> float:
    return t.max().item() if t.numel() else 0.0


def _sum_to(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Sum a broadcast result back to ``shape`` (the gradient of an expanded input)."""
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead else t
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.size(i) != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------
