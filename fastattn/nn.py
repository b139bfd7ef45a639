"""Drop-in modules running fastattn's fused kernels, and the helpers blocks are written against.

Each module subclasses the torch module it replaces, so the constructor, the parameters and the ``state_dict`` keys
are identical (load an eager model's weights as they are); fused extras are optional ``forward`` arguments.

The helpers let a block be written once and run the fused kernels when its layers are fastattn's and torch's ops
when they are torch's (the reference models and the patched library blocks use them):

- ``add_norm(norm, x, residual, dropout)``: post-norm Add & Norm, ``norm(residual + dropout(x))``; fused when
  ``norm`` is a :class:`FusedNorm` (:class:`LayerNorm`, :class:`RMSNorm`, a patched library norm: one kernel for the
  dropout, the add and the norm).
- ``add_then_norm(norm, x, residual, dropout)``: the pre-norm residual step, returns ``norm(residual + dropout(x))``
  and the new residual ``residual + dropout(x)``; fused likewise.
- ``bn_relu(bn, x, identity=None)``: ``relu(bn(x) + identity)``; fused when ``bn`` is a :class:`BatchNormAddReLU`.
- ``bn_act(bn, x, act=None, identity=None)``: ``act(bn(x) + identity)`` for an activation module ``act``; fused when
  ``bn`` is a :class:`BatchNormAct2d` without an activation of its own and ``act`` one fastattn fuses
  (:func:`activation_of`).

Fused dropout draws its mask inside the kernel from its own random stream, so a fused and an eager block with
dropout > 0 are equal in distribution, not bit for bit; compare them with dropout 0 or in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.ops.batch_norm import ACTIVATIONS, batch_norm_act
from fastattn.ops.layer_norm import _add_norm, layer_norm2d
from fastattn.ops.patch_embed import patch_embed


class FusedNorm:
    """What :func:`add_norm` and :func:`add_then_norm` fuse into: a norm module whose ``forward(x, residual=None, *,
    dropout_p=0.0, residual_in_fp32=False, return_residual=None)`` adds ``dropout(x) + residual`` in its kernel.
    :class:`LayerNorm`, :class:`RMSNorm` and the patched library norms (``fastattn.patching``) are such norms."""


class LayerNorm(torch.nn.LayerNorm, FusedNorm):
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


class RMSNorm(torch.nn.RMSNorm, FusedNorm):
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


def bn_forward(bn: torch.nn.BatchNorm2d, x: Tensor, identity: Tensor | None, activation: str,
                negative_slope: float) -> Tensor:
    """``nn.BatchNorm2d.forward``'s semantics (num_batches_tracked, momentum or the cumulative average, batch
    statistics without running ones) around ``fastattn.batch_norm_act``."""
    bn._check_input_dim(x)
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    # Batch statistics in training, and in eval when there are no running statistics (as _BatchNorm.forward).
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_buffers = not bn.training or bn.track_running_stats
    return batch_norm_act(
        x, identity, bn.running_mean if use_buffers else None, bn.running_var if use_buffers else None, bn.weight,
        bn.bias, bn_training, bn.momentum, bn.eps, activation=activation, negative_slope=negative_slope,
        num_batches_tracked=bn.num_batches_tracked if bn.momentum is None else None,
    )


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
        return bn_forward(self, x, identity, "relu", 0.0)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fused=batch_norm+add+relu"


class FusedBatchNorm:
    """A BatchNorm module whose ``forward(x, identity=None)`` adds ``identity`` before its activation in the fused
    kernel (:class:`BatchNormAct2d`, timm's ``BatchNormAct2d`` once patched)."""


class BatchNormAct2d(torch.nn.BatchNorm2d, FusedBatchNorm):
    """``act(bn(x) + identity)`` in one fused op (``fastattn.batch_norm_act``): a ``BatchNorm2d`` followed by an
    optional residual add and ``activation`` (any of ``fastattn.ops.batch_norm.ACTIVATIONS``: ``"identity"``,
    ``"relu"``, ``"relu6"``, ``"leaky_relu"`` with ``negative_slope``, ``"hardsigmoid"``, ``"hardswish"``,
    ``"silu"``, ``"gelu"``, ``"gelu_tanh"``).

    Constructor (with the keyword-only ``activation``, ``negative_slope``), parameters, buffers, ``state_dict`` and
    BatchNorm semantics are ``nn.BatchNorm2d``'s, as :class:`BatchNormAddReLU`'s. ``forward(x, identity=None, *,
    activation=None, negative_slope=None)``: the keywords override the module's own for one call (the blocks
    ``fastattn.patch`` fuses pass the activation module that follows). An ``nn.BatchNorm2d`` that
    ``fastattn.patch`` swapped to this class has no activation of its own (``"identity"``): alone it is that plain
    BatchNorm, and the block around it passes the activation it fuses.
    """

    activation = "identity"  # the class defaults: what an nn.BatchNorm2d swapped in by fastattn.patch computes
    negative_slope = 0.01

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, activation: str = "silu",
                 negative_slope: float = 0.01) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if activation not in ACTIVATIONS:
            raise ValueError(f"fastattn.nn.BatchNormAct2d: activation must be one of {', '.join(ACTIVATIONS)}; got "
                             f"{activation!r}")
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def forward(self, x: Tensor, identity: Tensor | None = None, *, activation: str | None = None,
                negative_slope: float | None = None) -> Tensor:
        return bn_forward(self, x, identity, activation or self.activation,
                           self.negative_slope if negative_slope is None else negative_slope)

    def extra_repr(self) -> str:
        own = "activation" in self.__dict__
        act = self.activation if own else "identity (the enclosing block passes its own)"
        slope = f", negative_slope={self.negative_slope}" if own and self.activation == "leaky_relu" else ""
        return super().extra_repr() + f", activation={act}{slope}, fused=batch_norm+add+act"


class LayerNorm2d(torch.nn.LayerNorm):
    """``nn.LayerNorm`` over the channels of an (N, C, H, W) tensor (ConvNeXt's ``LayerNorm2d``, torchvision's and
    timm's) in fastattn's layer-norm kernels: ``fastattn.layer_norm2d``, no permuted copy, the result in channels_last
    memory as theirs. Constructor and ``state_dict``: ``nn.LayerNorm``'s with ``normalized_shape = C``."""

    def forward(self, x: Tensor) -> Tensor:
        if len(self.normalized_shape) != 1:
            raise ValueError(f"fastattn.nn.LayerNorm2d: normalized_shape must be (C,); got {self.normalized_shape}")
        return layer_norm2d(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", channels-first (N, C, H, W)"


# -------------------------------------------------------------------------------------------------------------------
# the helpers blocks are written against
# -------------------------------------------------------------------------------------------------------------------


FUSED_NORMS = (FusedNorm,)  # LayerNorm, RMSNorm and the patched library norms


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


# activation module class -> the activation batch_norm_act fuses for an instance (exact types only: a subclass may
# compute something else), as (name, negative_slope); libraries add their own classes by "module.QualName"
ACTIVATION_MODULES: dict[type | str, Callable[[nn.Module], tuple[str, float] | None]] = {
    nn.Identity: lambda m: ("identity", 0.0),
    nn.ReLU: lambda m: ("relu", 0.0),
    nn.ReLU6: lambda m: ("relu6", 0.0),
    nn.LeakyReLU: lambda m: ("leaky_relu", float(m.negative_slope)),
    nn.Hardsigmoid: lambda m: ("hardsigmoid", 0.0),
    nn.Hardswish: lambda m: ("hardswish", 0.0),
    nn.SiLU: lambda m: ("silu", 0.0),
    nn.GELU: lambda m: {"none": ("gelu", 0.0), "tanh": ("gelu_tanh", 0.0)}.get(m.approximate),
}


def activation_of(module: nn.Module | None) -> tuple[str, float] | None:
    """``(activation, negative_slope)`` of ``fastattn.batch_norm_act`` that ``module`` computes (None:
    ``"identity"``), or None when fastattn has no fused form of it (an unknown class, or a subclass)."""
    if module is None:
        return ("identity", 0.0)
    cls = type(module)
    spec = ACTIVATION_MODULES.get(cls) or ACTIVATION_MODULES.get(f"{cls.__module__}.{cls.__qualname__}")
    return spec(module) if spec is not None else None


def bn_act(bn: nn.Module, x: Tensor, act: nn.Module | None = None, identity: Tensor | None = None) -> Tensor:
    """``act(bn(x) + identity)`` (``act`` None: no activation): a norm + activation pair, or a block's tail."""
    spec = activation_of(act)
    ident = None if identity is None else identity.to(x.dtype)  # the sum keeps x's dtype under autocast, as `+=`
    if isinstance(bn, BatchNormAct2d) and bn.activation == "identity" and spec is not None:
        return bn(x, ident, activation=spec[0], negative_slope=spec[1])
    y = bn(x)
    if ident is not None:
        y = y + ident
    return act(y) if act is not None else y


def fusable_pair(bn: nn.Module, act: nn.Module | None) -> bool:
    """Whether ``bn`` followed by ``act`` runs as one fused op: a BatchNorm2d fastattn.patch swapped (a
    :class:`BatchNormAct2d` without an activation of its own) and an activation module fastattn fuses."""
    return isinstance(bn, BatchNormAct2d) and bn.activation == "identity" and act is not None and \
        activation_of(act) is not None


def run_sequential(modules: Iterable[nn.Module], x: Tensor) -> Tensor:
    """``nn.Sequential``'s forward over ``modules``, each :func:`fusable_pair` (BN, activation) as one fused op."""
    mods = list(modules)
    i = 0
    while i < len(mods):
        if i + 1 < len(mods) and fusable_pair(mods[i], mods[i + 1]):
            x = bn_act(mods[i], x, mods[i + 1])
            i += 2
        else:
            x = mods[i](x)
            i += 1
    return x


def bn_add(bn: nn.Module, x: Tensor, identity: Tensor) -> Tensor:
    """``bn(x) + identity`` for a BatchNorm whose own activation (if any) is the identity: fused into its kernel when
    ``bn`` is a :class:`FusedBatchNorm`."""
    if isinstance(bn, FusedBatchNorm):
        return bn(x, identity.to(x.dtype))
    return bn(x) + identity


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
