"""Drop-in modules running fastattn's fused kernels.

Each subclasses the torch module it replaces, so the constructor, the parameters and the ``state_dict`` keys are
identical (load an eager model's weights as they are); fused extras are optional ``forward`` arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.ops.layer_norm import _add_norm


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with a fused residual add: ``forward(x, residual=None)``.

    ``forward(x)`` behaves exactly like torch's LayerNorm and returns a tensor. With a ``residual`` it returns
    ``(out, residual_out)``, ``residual_out = dropout(x) + residual`` and ``out = LayerNorm(residual_out)``:
    post-norm blocks (``LN(x + sublayer(x))``) use ``out``, pre-norm blocks carry ``residual_out`` on as the next
    residual. ``return_residual`` overrides which of the two is returned (``False``: only ``out``, and the sum is
    not written unless the backward needs it). ``dropout_p`` applies to ``x`` in training mode only.
    ``residual_in_fp32=True`` keeps ``residual_out`` in float32 for fp16/bf16 activations. A ``normalized_shape``
    of several dims normalises them as one flattened dim.
    """

    def forward(self, x: Tensor, residual: Tensor | None = None, *, dropout_p: float = 0.0,
                residual_in_fp32: bool = False, return_residual: bool | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if return_residual is None:
            return_residual = residual is not None
        return _add_norm("nn.LayerNorm", x, residual, self.weight, self.bias, self.eps,
                         dropout_p if self.training else 0.0, residual_in_fp32, return_residual, False,
                         tuple(self.normalized_shape))


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with a fused residual add; ``forward`` as :class:`LayerNorm`'s.

    ``eps=None`` (torch's default) means ``torch.finfo(x.dtype).eps``, as in torch.
    """

    def forward(self, x: Tensor, residual: Tensor | None = None, *, dropout_p: float = 0.0,
                residual_in_fp32: bool = False, return_residual: bool | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if return_residual is None:
            return_residual = residual is not None
        eps = self.eps
        if eps is None and isinstance(x, Tensor) and x.is_floating_point():
            eps = torch.finfo(x.dtype).eps
        return _add_norm("nn.RMSNorm", x, residual, self.weight, None, eps, dropout_p if self.training else 0.0,
                         residual_in_fp32, return_residual, True, tuple(self.normalized_shape))
