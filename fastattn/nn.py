"""Drop-in modules running fastattn's fused kernels, and the helpers blocks are written against.

Each module subclasses the torch module it replaces, so the constructor, the parameters and the ``state_dict`` keys
are identical (load an eager model's weights as they are); fused extras are optional ``forward`` arguments.

The helpers let a block be written once and run the fused kernels when its layers are fastattn's and torch's ops
when they are torch's (the reference models and the patched library blocks use them):

- ``add_norm(norm, x, residual, dropout)``: post-norm Add & Norm, ``norm(residual + dropout(x))``; fused when
  ``norm`` is a :class:`LayerNorm` / :class:`RMSNorm` (``FUSED_NORMS``: one kernel for the dropout, the add and the
  norm).
- ``add_then_norm(norm, x, residual, dropout)``: the pre-norm residual step, returns ``norm(residual + dropout(x))``
  and the new residual ``residual + dropout(x)``; fused likewise.
- ``bn_relu(bn, x, identity=None)``: ``relu(bn(x) + identity)``; fused when ``bn`` is a :class:`BatchNormAddReLU`.

Fused dropout draws its mask inside the kernel from its own random stream, so a fused and an eager block with
dropout > 0 are equal in distribution, not bit for bit; compare them with dropout 0 or in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.ops.batch_norm import batch_norm_add_relu
from fastattn.ops.layer_norm import _add_norm
from fastattn.ops.patch_embed import patch_embed


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


class PatchEmbed(torch.nn.Conv2d):
    """ViT patch embedding as a ``Conv2d`` (kernel = stride = patch size) that returns tokens ``(B, N[+1], D)``.

    Its parameters are the conv's ``weight`` ``(D, C, P, P)`` and ``bias`` ``(D,)``, so it takes the place of
    torchvision's ``VisionTransformer.conv_proj`` or timm's ``PatchEmbed.proj`` keeping their ``state_dict`` keys;
    ``from_conv`` wraps an existing conv sharing its parameters. ``forward(images, pos_embed, cls_token)`` fuses
    the projection, flatten/transpose, the prepended class token and the added position embedding
    (``fastattn.patch_embed``); unlike ``Conv2d.forward`` it returns tokens, not a ``(B, D, H/P, W/P)`` map.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=None, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=kernel_size if stride is None else stride,
                         padding=padding, dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        _check_patchify(self)

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d) -> PatchEmbed:
        """A PatchEmbed that shares ``conv``'s ``weight`` and ``bias`` Parameters (no copy, same state_dict)."""
        if not isinstance(conv, torch.nn.Conv2d):
            raise TypeError(f"fastattn.nn.PatchEmbed.from_conv: conv must be a torch.nn.Conv2d, got "
                            f"{type(conv).__name__}")
        _check_patchify(conv)
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        module.weight = conv.weight
        module.bias = conv.bias
        module.train(conv.training)
        return module

    def forward(self, images: Tensor, pos_embed: Tensor | None = None,  # type: ignore[override]
                cls_token: Tensor | None = None) -> Tensor:
        return patch_embed(images, self.weight, self.bias, pos_embed, cls_token)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, patch_size={self.kernel_size[0]}, "
                f"bias={self.bias is not None}")


def _check_patchify(conv: torch.nn.Conv2d) -> None:
    k = conv.kernel_size
    ok = (k[0] == k[1] and tuple(conv.stride) == tuple(k) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
          and (conv.padding == "valid" or tuple(conv.padding) == (0, 0)))
    if not ok:
        raise ValueError(f"fastattn.nn.PatchEmbed: needs a patchify convolution (square kernel_size == stride, "
                         f"padding 0, dilation 1, groups 1); got kernel_size={k}, stride={conv.stride}, "
                         f"padding={conv.padding}, dilation={conv.dilation}, groups={conv.groups}")


class BatchNormAddReLU(torch.nn.BatchNorm2d):
    """``relu(bn(x) + identity)`` in one fused op: a ``BatchNorm2d`` **followed by the residual add and a ReLU**.

    Not a plain BatchNorm: ``forward(x)`` alone returns ``relu(bn(x))`` (the ResNet stem and the inner convs of a
    block), ``forward(x, identity)`` returns ``relu(bn(x) + identity)`` (the block's tail). Constructor, parameters,
    buffers and ``state_dict`` are ``nn.BatchNorm2d``'s, and so are its semantics: in training the batch
    statistics are used and the running ones updated (``momentum``, or the cumulative average when ``momentum`` is
    None) while ``num_batches_tracked`` is incremented here; ``track_running_stats=False`` always uses batch
    statistics; eval mode uses the running statistics in a single fused pass.
    """

    def forward(self, x: Tensor, identity: Tensor | None = None) -> Tensor:
        self._check_input_dim(x)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        # Batch statistics in training, and in eval when there are no running statistics (as _BatchNorm.forward).
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return batch_norm_add_relu(
            x, identity,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight, self.bias, bn_training, self.momentum, self.eps,
            num_batches_tracked=self.num_batches_tracked if self.momentum is None else None,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fused=batch_norm+add+relu"


# -------------------------------------------------------------------------------------------------------------------
# the helpers blocks are written against
# -------------------------------------------------------------------------------------------------------------------


FUSED_NORMS = (LayerNorm, RMSNorm)


def _split_dropout(dropout: nn.Module | None, x: Tensor) -> tuple[Tensor, float]:
    """``(x, p)`` where a plain ``nn.Dropout`` becomes the fused kernel's ``dropout_p``; any other module (DropPath,
    a custom one) is applied here, before the fused add, and ``p`` is 0."""
    if dropout is None or isinstance(dropout, nn.Identity):
        return x, 0.0
    if type(dropout) is nn.Dropout:
        return x, (float(dropout.p) if dropout.training else 0.0)
    return dropout(x), 0.0


def _residual_dtypes(x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Mixed precision (autocast): a float32 residual stream beside half-precision sublayer outputs is kept in
    float32 (``residual_in_fp32``); other mixes are brought to their common dtype, as ``x + residual`` would be."""
    if x.dtype == residual.dtype:
        return x, residual, False
    if residual.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16):
        return x, residual, True
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.to(dtype), residual.to(dtype), False


def add_norm(norm: nn.Module, x: Tensor, residual: Tensor, dropout: nn.Module | None = None) -> Tensor:
    """Post-norm Add & Norm: ``norm(residual + dropout(x))`` ("LayerNorm(x + Sublayer(x))")."""
    if isinstance(norm, FUSED_NORMS):
        x, p = _split_dropout(dropout, x)
        x, residual, fp32 = _residual_dtypes(x, residual)
        return norm(x, residual, dropout_p=p, residual_in_fp32=fp32, return_residual=False)
    return norm(residual + (dropout(x) if dropout is not None else x))


def add_then_norm(norm: nn.Module, x: Tensor, residual: Tensor,
                  dropout: nn.Module | None = None) -> tuple[Tensor, Tensor]:
    """Pre-norm residual step: ``residual = residual + dropout(x)``; returns ``(norm(residual), residual)``."""
    if isinstance(norm, FUSED_NORMS):
        x, p = _split_dropout(dropout, x)
        x, residual, fp32 = _residual_dtypes(x, residual)
        return norm(x, residual, dropout_p=p, residual_in_fp32=fp32)
    residual = residual + (dropout(x) if dropout is not None else x)
    return norm(residual), residual


def bn_relu(bn: nn.Module, x: Tensor, identity: Tensor | None = None) -> Tensor:
    """``relu(bn(x) + identity)``, or ``relu(bn(x))`` without an identity (a ResNet block's tail / inner convs)."""
    # Under autocast the identity may be float32 beside a half-precision x: the sum keeps x's dtype, as the
    # in-place ``out += identity`` of torchvision's and timm's blocks does.
    if isinstance(bn, BatchNormAddReLU):
        return bn(x, None if identity is None else identity.to(x.dtype))
    y = bn(x)
    if identity is not None:
        y = y + identity.to(y.dtype)
    return F.relu(y)
