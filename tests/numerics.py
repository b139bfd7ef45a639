"""The tolerance rule of STYLE.md: our error against a float64 reference is at most twice the error of eager
PyTorch run in the same low precision, plus a floor of one rounding of the result (unit roundoff times the
reference's largest magnitude), which only matters where eager happens to be exact."""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
}


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return (x.detach().double() - ref.detach().double()).abs().max().item()


def assert_close_rule(name: str, ours: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                      factor: float = 2.0, atol: float = 0.0) -> None:
    """``err(ours) <= factor * err(eager) + u(dtype) * max|ref| + atol`` (all against the float64 ``ref``).

    ``atol``: a caller's floor for results that cancel to (near) zero while the terms they come from do not
    (e.g. attention's dS = P (dP - delta) with a single key per row), where max|ref| says nothing about the rounding.
    """
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ours.detach().double()).all() or not torch.isfinite(ref).all(), f"{name}: non-finite values"
    e_ours = max_err(ours, ref)
    e_eager = max_err(eager, ref)
    floor = UNIT_ROUNDOFF[dtype] * (ref.detach().abs().max().item() if ref.numel() else 0.0)
    bound = factor * e_eager + floor + atol
    assert e_ours <= bound, (f"{name}: max error {e_ours:.3e} > {factor} x eager {e_eager:.3e} + floor {floor:.3e} "
                             f"({dtype})")
