"""``fastattn.patch(model)``: swap fastattn's fused ops into a model you already have, in place.

``patch`` walks ``model.named_modules()`` and recognises modules by their *exact* type (a subclass may have a
different ``forward``, so it is reported and left alone). A recognised module whose configuration the fused path
reproduces exactly gets its ``__class__`` set, on that one instance, to a subclass whose ``forward`` calls the
fused ops on the module's own submodules, parameters and buffers. Nothing is copied, re-created or cast: the
``state_dict`` (keys, values, dtypes), the optimizer's parameter references and registered hooks are untouched,
and other instances of the same class, the class itself and every library global stay as they were. Configurations
it does not support are left alone and reported with the reason. ``unpatch`` restores every swapped instance's
class; ``patch`` twice does nothing more.

Recognised (each under its option):

- ``attention``: ``nn.MultiheadAttention`` (the forward rebuilt around ``fastattn.scaled_dot_product_attention``),
  timm's ``Attention``, fastattn's ``models.MultiHeadAttention``.
- ``layer_norm``: ``nn.LayerNorm`` / ``nn.RMSNorm`` (-> ``fastattn.nn.LayerNorm`` / ``RMSNorm``) and the blocks
  whose residual add is fused into the following norm: ``nn.TransformerEncoderLayer`` / ``DecoderLayer``
  (post-norm and pre-norm), torchvision's ViT ``EncoderBlock``, timm's ``Block``. ``nn.TransformerEncoderLayer``
  and ``nn.TransformerEncoder`` are also swapped whenever their attention is, so that torch's eval fast path
  (``torch._transformer_encoder_layer_fwd``, nested tensors), which never calls ``self_attn.forward``, cannot
  bypass the fused kernels.
- ``patch_embed``: torchvision's and timm's ``VisionTransformer`` (projection, class token and position
  embedding in one kernel) and fastattn's own.
- ``batch_norm``: torchvision's and timm's ``BasicBlock`` / ``Bottleneck`` and the ResNet stems (BN + ReLU and
  BN + add + ReLU; those BatchNorms become ``fastattn.nn.BatchNormAddReLU``), fastattn's own ResNet.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastattn
from fastattn import _runtime
from fastattn.models import layers as L
from fastattn.models import resnet as own_resnet
from fastattn.models import vit as own_vit
from fastattn.nn import FUSED_NORMS, BatchNormAddReLU, PatchEmbed, _check_patchify, add_norm, add_then_norm, bn_relu

_ORIG = "_fastattn_unpatched_class"  # instance attribute: the class to restore

__all__ = ["PatchEntry", "PatchReport", "patch", "patch_report", "unpatch"]


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PatchEntry:
    """One module in a :class:`PatchReport`: its qualified name (``""`` = the model itself), its class, the class
    it runs as now (``None`` when left alone) and what was fused, or why it was left alone."""

    name: str
    module: str
    fused_as: str | None
    detail: str


@dataclasses.dataclass
class PatchReport:
    """What ``fastattn.patch`` fused and what it left alone (``print(report)`` for a table)."""

    fused: list[PatchEntry] = dataclasses.field(default_factory=list)
    left_alone: list[PatchEntry] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastattn.patch: {len(self.fused)} module(s) fused, {len(self.left_alone)} left alone"]
        width = max([len(e.name or "(model)") for e in self.fused + self.left_alone] + [4])
        if self.fused:
            lines.append("fused:")
            lines += [f"  {e.name or '(model)':<{width}}  {e.module} -> {e.fused_as}: {e.detail}" for e in self.fused]
        if self.left_alone:
            lines.append("left alone:")
            lines += [f"  {e.name or '(model)':<{width}}  {e.module}: {e.detail}" for e in self.left_alone]
        return "\n".join(lines)


_REPORTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------------------------
# torch.nn: MultiheadAttention, TransformerEncoderLayer, TransformerEncoder, TransformerDecoderLayer
# ---------------------------------------------------------------------------------------------------------------


def _mha_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool, N: int, H: int, Lq: int,
              S: int, dtype: torch.dtype) -> tuple[Tensor | None, bool]:
    """MultiheadAttention's masks as one SDPA mask broadcastable to ``(N, H, Lq, S)``, and the causal flag.

    torch's bool masks mean True = masked *out* (SDPA's mean True = attends); float masks are added to the scores.
    As in ``F.multi_head_attention_forward``, ``is_causal`` is a hint that ``attn_mask`` is the causal mask: without
    a key padding mask the kernel applies causality from indices and the mask is not read.
    """
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None:
        return None, True
    masks = []
    if attn_mask is not None:  # (L, S) or (N * H, L, S)
        masks.append(attn_mask[None, None] if attn_mask.dim() == 2 else attn_mask.unflatten(0, (N, H)))
    if key_padding_mask is not None:  # (N, S)
        masks.append(key_padding_mask[:, None, None, :])
    if not masks:
        return None, False
    if all(m.dtype == torch.bool for m in masks):
        keep = ~masks[0]
        for m in masks[1:]:
            keep = keep & ~m
        return keep, False
    add = [m.to(dtype) if m.is_floating_point() else
           torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf")) for m in masks]
    return (add[0] if len(add) == 1 else add[0] + add[1]), False


def _mha_project(m: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, self_attn: bool,
                 kv_same: bool) -> tuple[Tensor, Tensor, Tensor]:
    E = m.embed_dim
    b = m.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
    if not m._qkv_same_embed_dim:
        return F.linear(query, m.q_proj_weight, bq), F.linear(key, m.k_proj_weight, bk), \
            F.linear(value, m.v_proj_weight, bv)
    w = m.in_proj_weight
    if self_attn:  # one GEMM for q, k and v
        q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
        return q, k, v
    wq, wk, wv = w.chunk(3)
    if kv_same:
        k, v = F.linear(key, w[E:], None if b is None else b[E:]).chunk(2, dim=-1)
        return F.linear(query, wq, bq), k, v
    return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)


class FusedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose forward runs ``fastattn.scaled_dot_product_attention`` (set per instance by
    ``fastattn.patch``; ``bias_k`` / ``add_zero_attn`` modules are not patched).

    Same arguments and results as torch's forward. ``need_weights=True`` (torch's default) asks for the attention
    weights, which a fused kernel never forms: such calls, and nested-tensor inputs, run torch's own forward with a
    one-time ``FallbackWarning``. Pass ``need_weights=False`` (as ``nn.Transformer*`` layers and torchvision do).
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if need_weights or query.is_nested or key.is_nested or value.is_nested:
            _runtime.warn_fallback("patch(nn.MultiheadAttention)",
                                   "it was called with need_weights=True (its default), and the fused kernel never "
                                   "forms the attention weights; pass need_weights=False" if need_weights else
                                   "it got nested tensors, which only torch's own fast path takes")
            return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                                 average_attn_weights, is_causal)
        F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        self_attn, kv_same = query is key and key is value, key is value
        batched = query.dim() == 3
        seq_first = batched and not self.batch_first
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        H, E = self.num_heads, self.embed_dim
        D = E // H
        N = query.size(1) if seq_first else query.size(0)
        Lq, S = query.shape[0 if seq_first else 1], key.shape[0 if seq_first else 1]

        def heads(t: Tensor) -> Tensor:  # (N, L, E) or (L, N, E) -> (N, H, L, D), a view
            t = t.unflatten(-1, (H, D))
            return t.permute(1, 2, 0, 3) if seq_first else t.transpose(1, 2)

        q, k, v = (heads(t) for t in _mha_project(self, query, key, value, self_attn, kv_same))
        mask, causal = _mha_mask(attn_mask, key_padding_mask, is_causal, N, H, Lq, S, q.dtype)
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                    dropout_p=self.dropout if self.training else 0.0)
        out = out.permute(2, 0, 1, 3).reshape(Lq, N, E) if seq_first else out.transpose(1, 2).reshape(N, Lq, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return (out if batched else out.squeeze(0)), None


class FusedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that always takes the regular path (never
    ``torch._transformer_encoder_layer_fwd``, which would bypass its attention module) and fuses dropout + residual
    add + LayerNorm when its norms are ``fastattn.nn.LayerNorm``. Nested-tensor inputs
    run torch's own forward (one-time ``FallbackWarning``)."""

    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        if src.is_nested:
            _runtime.warn_fallback("patch(nn.TransformerEncoderLayer)",
                                   "it got a nested tensor, which only torch's own fast path takes")
            return nn.TransformerEncoderLayer.forward(self, src, src_mask, src_key_padding_mask, is_causal)

        def sa(h: Tensor) -> Tensor:
            return self.self_attn(h, h, h, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                                  need_weights=False, is_causal=is_causal)[0]

        x = src
        if self.norm_first:
            h, x = add_then_norm(self.norm2, sa(self.norm1(x)), x, self.dropout1)
            return x + self.dropout2(self._ff(h))
        x = add_norm(self.norm1, sa(x), x, self.dropout1)
        return add_norm(self.norm2, self._ff(x), x, self.dropout2)

    def _ff(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class FusedTransformerDecoderLayer(nn.TransformerDecoderLayer):
    """``nn.TransformerDecoderLayer`` fusing dropout + residual add + LayerNorm when its norms are
    ``fastattn.nn.LayerNorm`` (post-norm: into each norm; pre-norm: into the next sub-layer's norm)."""

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None, memory_key_padding_mask: Tensor | None = None,
                tgt_is_causal: bool = False, memory_is_causal: bool = False) -> Tensor:
        def sa(h: Tensor) -> Tensor:
            return self.self_attn(h, h, h, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                                  is_causal=tgt_is_causal, need_weights=False)[0]

        def ca(h: Tensor) -> Tensor:
            return self.multihead_attn(h, memory, memory, attn_mask=memory_mask,
                                       key_padding_mask=memory_key_padding_mask, is_causal=memory_is_causal,
                                       need_weights=False)[0]

        x = tgt
        if self.norm_first:
            h, x = add_then_norm(self.norm2, sa(self.norm1(x)), x, self.dropout1)
            h, x = add_then_norm(self.norm3, ca(h), x, self.dropout2)
            return x + self.dropout3(self._ff(h))
        x = add_norm(self.norm1, sa(x), x, self.dropout1)
        x = add_norm(self.norm2, ca(x), x, self.dropout2)
        return add_norm(self.norm3, self._ff(x), x, self.dropout3)

    def _ff(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


def _torch_would_nest(enc: nn.TransformerEncoder, src: Tensor, mask: Tensor | None, kpm: Tensor | None) -> bool:
    """Whether ``nn.TransformerEncoder.forward`` (torch 2.x) would run ``src`` as a nested tensor, dropping the
    padded positions (its eval "sparsity fast path"); the conditions are torch's, in torch's order."""
    first = enc.layers[0]
    if not torch.backends.mha.get_fastpath_enabled() or not getattr(enc, "use_nested_tensor", False):
        return False
    if first.training or src.dim() != 3 or kpm is None:
        return False
    mask_check = getattr(enc, "mask_check", True)
    if mask_check and torch.compiler.is_compiling():
        return False
    if mask_check and not torch._nested_tensor_from_mask_left_aligned(src, kpm.logical_not()):
        return False
    if src.is_nested or mask is not None or torch.is_autocast_enabled():
        return False
    sa = first.self_attn
    args = (src, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias, first.norm1.weight,
            first.norm1.bias, first.norm2.weight, first.norm2.bias, first.linear1.weight, first.linear1.bias,
            first.linear2.weight, first.linear2.bias)
    if torch.overrides.has_torch_function(args):
        return False
    if src.device.type not in ("cpu", "cuda", "xpu", torch.utils.backend_registration._privateuse1_backend_name):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in args))


class FusedTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` that never converts its input to a nested tensor, so its patched layers run the
    fused kernels. Where torch would have taken its nested-tensor path (eval, no grad, a key padding mask, ...),
    the padded positions of the output are zeroed before the final norm, exactly as torch's path returns them."""

    def forward(self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

        kpm = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                other_type=F._none_or_dtype(mask), other_name="mask", target_type=src.dtype)
        mask = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="", target_type=src.dtype,
                                 check_other=False)
        zero_padding = _torch_would_nest(self, src, mask, kpm)
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, self.layers[0].self_attn.batch_first))
        out = src
        for mod in self.layers:
            out = mod(out, src_mask=mask, is_causal=is_causal, src_key_padding_mask=kpm)
        if zero_padding:  # (N, S, E), kpm (N, S): nonzero = padding
            out = out.masked_fill(~kpm.logical_not().unsqueeze(-1), 0.0)
        return self.norm(out) if self.norm is not None else out


# ---------------------------------------------------------------------------------------------------------------
# torchvision and timm: mixins put in front of the library class, one fused subclass per library class
# ---------------------------------------------------------------------------------------------------------------


class _TVEncoderBlock:
    """torchvision ViT ``EncoderBlock``: attention-branch dropout + residual add fused into ``ln_2``."""

    def forward(self, input: Tensor) -> Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        h = self.ln_1(input)
        a, _ = self.self_attention(h, h, h, need_weights=False)
        h, x = add_then_norm(self.ln_2, a, input, self.dropout)
        return x + self.mlp(h)


class _TVVisionTransformer:
    """torchvision ``VisionTransformer``: ``conv_proj`` + flatten + class token + ``encoder.pos_embedding`` in one
    ``fastattn.patch_embed``; then ``encoder.dropout``, ``encoder.layers``, ``encoder.ln`` and ``heads`` as torch."""

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        enc = self.encoder
        x = fastattn.patch_embed(x, self.conv_proj.weight, self.conv_proj.bias, enc.pos_embedding, self.class_token)
        x = enc.ln(enc.layers(enc.dropout(x)))
        return self.heads(x[:, 0])


class _TVBasicBlock:
    def forward(self, x: Tensor) -> Tensor:
        out = bn_relu(self.bn1, self.conv1(x))
        out = self.conv2(out)
        identity = x if self.downsample is None else self.downsample(x)
        return bn_relu(self.bn2, out, identity)


class _TVBottleneck:
    def forward(self, x: Tensor) -> Tensor:
        out = bn_relu(self.bn1, self.conv1(x))
        out = bn_relu(self.bn2, self.conv2(out))
        out = self.conv3(out)
        identity = x if self.downsample is None else self.downsample(x)
        return bn_relu(self.bn3, out, identity)


class _TVResNet:
    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.maxpool(bn_relu(self.bn1, self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _TimmAttention:
    """timm ``Attention``: its forward with ``fastattn.scaled_dot_product_attention``. ``is_causal`` takes precedence
    over ``attn_mask``, as timm documents."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                                   # (B, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        x = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=None if is_causal else attn_mask,
                                                  is_causal=is_causal,
                                                  dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, getattr(self, "attn_dim", C)))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class _TimmBlock:
    """timm ``Block``: the attention branch (after ``ls1``, ``drop_path1``) added to the residual inside ``norm2``."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        a = self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        h, x = add_then_norm(self.norm2, a, x)
        return x + self.drop_path2(self.ls2(self.mlp(h)))


class _TimmVisionTransformer:
    """timm ``VisionTransformer.forward_features`` with ``patch_embed`` + ``_pos_embed`` in one ``fastattn.patch_embed``
    (class token, ``no_embed_class``, no register tokens, fixed image size)."""

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        pe = self.patch_embed
        _, _, H, W = x.shape
        if pe.img_size is not None and pe.strict_img_size:
            torch._assert(H == pe.img_size[0], f"Input height ({H}) doesn't match model ({pe.img_size[0]}).")
            torch._assert(W == pe.img_size[1], f"Input width ({W}) doesn't match model ({pe.img_size[1]}).")
        x = fastattn.patch_embed(x, pe.proj.weight, pe.proj.bias, self.pos_embed, self.cls_token)
        x = self.norm_pre(self.patch_drop(self.pos_drop(x)))
        if attn_mask is not None or is_causal:
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
        elif self.grad_checkpointing and not torch.jit.is_scripting():
            x = sys.modules["timm.models.vision_transformer"].checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)


class _TimmBasicBlock:
    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.aa(bn_relu(self.bn1, self.conv1(x)))
        return bn_relu(self.bn2, self.conv2(x), shortcut)


class _TimmBottleneck:
    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = bn_relu(self.bn1, self.conv1(x))
        x = self.aa(bn_relu(self.bn2, self.conv2(x)))
        return bn_relu(self.bn3, self.conv3(x), shortcut)


class _TimmResNet:
    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(bn_relu(self.bn1, self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            layers = [self.layer1, self.layer2, self.layer3, self.layer4]
            return sys.modules["timm.models.resnet"].checkpoint_seq(layers, x, flatten=True)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# name -> (library module, class name, mixin, the method the mixin replaces and its parameters in that library)
_LIBRARY = {
    "FusedTorchvisionEncoderBlock": ("torchvision.models.vision_transformer", "EncoderBlock", _TVEncoderBlock,
                                     "forward", ("input",)),
    "FusedTorchvisionVisionTransformer": ("torchvision.models.vision_transformer", "VisionTransformer",
                                          _TVVisionTransformer, "forward", ("x",)),
    "FusedTorchvisionBasicBlock": ("torchvision.models.resnet", "BasicBlock", _TVBasicBlock, "forward", ("x",)),
    "FusedTorchvisionBottleneck": ("torchvision.models.resnet", "Bottleneck", _TVBottleneck, "forward", ("x",)),
    "FusedTorchvisionResNet": ("torchvision.models.resnet", "ResNet", _TVResNet, "_forward_impl", ("x",)),
    "FusedTimmLayerNorm": ("timm.layers.norm", "LayerNorm", fastattn.nn.LayerNorm, "forward", ("x",)),
    "FusedTimmAttention": ("timm.layers.attention", "Attention", _TimmAttention, "forward",
                           ("x", "attn_mask", "is_causal")),
    "FusedTimmBlock": ("timm.models.vision_transformer", "Block", _TimmBlock, "forward",
                       ("x", "attn_mask", "is_causal")),
    "FusedTimmVisionTransformer": ("timm.models.vision_transformer", "VisionTransformer", _TimmVisionTransformer,
                                   "forward_features", ("x", "attn_mask", "is_causal")),
    "FusedTimmBasicBlock": ("timm.models.resnet", "BasicBlock", _TimmBasicBlock, "forward", ("x",)),
    "FusedTimmBottleneck": ("timm.models.resnet", "Bottleneck", _TimmBottleneck, "forward", ("x",)),
    "FusedTimmResNet": ("timm.models.resnet", "ResNet", _TimmResNet, "forward_features", ("x",)),
}


def _library_class(name: str, import_it: bool = False) -> type | None:
    """The library class behind ``_LIBRARY[name]``: only when its module is already imported (a model holding one
    has imported it), unless ``import_it``."""
    module_name, cls_name = _LIBRARY[name][:2]
    module = sys.modules.get(module_name)
    if module is None and import_it:
        import importlib

        module = importlib.import_module(module_name)
    return getattr(module, cls_name, None) if module is not None else None


def _fused_library_class(name: str) -> type:
    """``class <name>(mixin, library class)``, built once and kept as a global of this module so that pickling a
    patched model finds it (``__getattr__`` below rebuilds it on unpickling)."""
    cls = globals().get(name)
    if cls is None:
        base = _library_class(name, import_it=True)
        mixin = _LIBRARY[name][2]
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name,
                                          "__doc__": f"{base.__module__}.{base.__qualname__} running fastattn's "
                                                     f"fused ops (set per instance by fastattn.patch). "
                                                     f"{mixin.__doc__ or ''}"})
        globals()[name] = cls
    return cls


def __getattr__(name: str):
    if name in _LIBRARY:
        return _fused_library_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------------
# recognising modules
# ---------------------------------------------------------------------------------------------------------------


class _Skip(Exception):
    """A recognised module that is left alone; the message says why."""


@dataclasses.dataclass(frozen=True)
class _Options:
    attention: bool
    layer_norm: bool
    patch_embed: bool
    batch_norm: bool


Swap = tuple  # (qualified name, module, fused class, detail)


def _child(name: str, attr: str) -> str:
    return f"{name}.{attr}" if name else attr


def _need(opts: _Options, option: str) -> None:
    if not getattr(opts, option):
        raise _Skip(f"{option}=False")


def _no_hooks(module: nn.Module, attrs: tuple[str, ...]) -> None:
    """The fused forward bypasses these submodules' ``forward``: refuse if hooks are registered on them."""
    for attr in attrs:
        m = getattr(module, attr, None)
        if isinstance(m, nn.Module) and (m._forward_hooks or m._forward_pre_hooks):
            raise _Skip(f"its {attr} has forward hooks, which the fused forward would bypass")


def _exact(module: nn.Module, attr: str, cls: type | tuple[type, ...], what: str) -> None:
    m = getattr(module, attr, None)
    classes = cls if isinstance(cls, tuple) else (cls,)
    if type(m) not in classes:
        got = "None" if m is None else type(m).__qualname__
        raise _Skip(f"{attr} is {got}, not {what}")


def _identity(module: nn.Module, attr: str, why: str) -> None:
    m = getattr(module, attr, None)
    if m is not None and not isinstance(m, nn.Identity):
        raise _Skip(f"{attr} is {type(m).__qualname__} ({why})")


def _check_signature(name: str) -> None:
    base = _library_class(name)
    _, cls_name, _, method, params = _LIBRARY[name]
    got = tuple(list(inspect.signature(getattr(base, method)).parameters)[1:])
    if got != params:
        raise _Skip(f"this library version's {cls_name}.{method}{got} is not the {params} fastattn knows")


def _patchify(conv: nn.Module, what: str) -> None:
    if type(conv) is not nn.Conv2d:
        raise _Skip(f"{what} is {type(conv).__qualname__}, not a plain patchify nn.Conv2d")
    try:
        _check_patchify(conv)
    except ValueError as err:
        raise _Skip(f"{what} is not a patchify convolution ({str(err).split('; ', 1)[-1]})") from None


def _norm_detail(*norms: nn.Module) -> str:
    timm_ln = _library_class("FusedTimmLayerNorm")
    fusable = all(type(n) in (nn.LayerNorm, nn.RMSNorm, timm_ln) or isinstance(n, FUSED_NORMS) for n in norms)
    return "fused" if fusable else "eager (the norms are not nn.LayerNorm / nn.RMSNorm / timm's LayerNorm)"


def _bn_swaps(name: str, module: nn.Module, tails: dict[str, str]) -> list[Swap]:
    """BatchNorm2d -> BatchNormAddReLU for the given attributes (attr -> detail)."""
    swaps = []
    for attr, detail in tails.items():
        bn = getattr(module, attr)
        if type(bn) is nn.BatchNorm2d:
            swaps.append((_child(name, attr), bn, BatchNormAddReLU, detail))
        elif not isinstance(bn, BatchNormAddReLU):
            raise _Skip(f"{attr} is {type(bn).__qualname__}, not nn.BatchNorm2d")
    return swaps


def _rule_norm(name, m, opts):
    _need(opts, "layer_norm")
    cls = fastattn.nn.LayerNorm if type(m) is nn.LayerNorm else fastattn.nn.RMSNorm
    return [(name, m, cls, f"{type(m).__name__} kernel")]


def _rule_mha(name, m, opts):
    _need(opts, "attention")
    if m.bias_k is not None or m.add_zero_attn:
        raise _Skip("add_bias_kv / add_zero_attn are not supported by the fused path")
    return [(name, m, FusedMultiheadAttention, "attention kernel (calls with need_weights=True run torch's forward)")]


def _rule_encoder_layer(name, m, opts):
    if not (opts.attention or opts.layer_norm):
        raise _Skip("attention=False and layer_norm=False")
    order = "pre-norm" if m.norm_first else "post-norm"
    add = _norm_detail(m.norm1, m.norm2) if opts.layer_norm else "eager (layer_norm=False)"
    return [(name, m, FusedTransformerEncoderLayer,
             f"dropout + residual add + LayerNorm {add} ({order}); never torch's eval fast path")]


def _rule_decoder_layer(name, m, opts):
    _need(opts, "layer_norm")
    order = "pre-norm" if m.norm_first else "post-norm"
    return [(name, m, FusedTransformerDecoderLayer,
             f"dropout + residual add + LayerNorm {_norm_detail(m.norm1, m.norm2, m.norm3)} ({order})")]


def _rule_encoder(name, m, opts):
    layers_fused = any((type(layer) is nn.TransformerEncoderLayer and (opts.attention or opts.layer_norm))
                       or isinstance(layer, FusedTransformerEncoderLayer) for layer in m.layers)
    if not layers_fused or not getattr(m, "use_nested_tensor", False):  # torch's forward never nests: keep it
        return []
    return [(name, m, FusedTransformerEncoder, "no nested-tensor fast path (its layers run the fused kernels)")]


def _rule_tv_encoder_block(name, m, opts):
    _need(opts, "layer_norm")
    _check_signature("FusedTorchvisionEncoderBlock")
    return [(name, m, _fused_library_class("FusedTorchvisionEncoderBlock"),
             f"dropout + residual add + ln_2 {_norm_detail(m.ln_2)}")]


def _rule_tv_vit(name, m, opts):
    _need(opts, "patch_embed")
    _check_signature("FusedTorchvisionVisionTransformer")
    _patchify(m.conv_proj, "conv_proj (conv_stem_configs)")
    _exact(m, "encoder", sys.modules["torchvision.models.vision_transformer"].Encoder, "torchvision's Encoder")
    _no_hooks(m, ("conv_proj", "encoder"))
    return [(name, m, _fused_library_class("FusedTorchvisionVisionTransformer"),
             "conv_proj + class token + pos_embedding in one patch_embed kernel")]


def _rule_tv_block(fused_name: str, bns: dict[str, str]):
    def rule(name, m, opts):
        _need(opts, "batch_norm")
        _check_signature(fused_name)
        _exact(m, "relu", nn.ReLU, "nn.ReLU")
        _no_hooks(m, ("relu",))
        swaps = _bn_swaps(name, m, bns)
        return [(name, m, _fused_library_class(fused_name), "BN + ReLU and BN + add + ReLU fused")] + swaps
    return rule


def _rule_resnet_stem(fused_name: str, act: str):
    """torchvision's and timm's ResNet: the stem's bn1 + ReLU (``act``, the ReLU's attribute name) fused."""
    def rule(name, m, opts):
        _need(opts, "batch_norm")
        _check_signature(fused_name)
        _exact(m, act, nn.ReLU, "nn.ReLU")
        _no_hooks(m, (act,))
        return [(name, m, _fused_library_class(fused_name), "stem BN + ReLU fused")] + \
            _bn_swaps(name, m, {"bn1": "stem BN + ReLU"})
    return rule


def _rule_timm_norm(name, m, opts):
    _need(opts, "layer_norm")
    _check_signature("FusedTimmLayerNorm")
    return [(name, m, _fused_library_class("FusedTimmLayerNorm"), "LayerNorm kernel")]


def _rule_timm_attention(name, m, opts):
    _need(opts, "attention")
    _check_signature("FusedTimmAttention")
    _exact(m, "attn_drop", nn.Dropout, "nn.Dropout")
    return [(name, m, _fused_library_class("FusedTimmAttention"), "attention kernel")]


def _rule_timm_block(name, m, opts):
    _need(opts, "layer_norm")
    _check_signature("FusedTimmBlock")
    return [(name, m, _fused_library_class("FusedTimmBlock"),
             f"attention-branch residual add + norm2 {_norm_detail(m.norm2)}")]


def _rule_timm_vit(name, m, opts):
    _need(opts, "patch_embed")
    _check_signature("FusedTimmVisionTransformer")
    pe = m.patch_embed
    timm_pe = sys.modules.get("timm.layers.patch_embed")
    if timm_pe is None or type(pe) is not timm_pe.PatchEmbed:
        raise _Skip(f"patch_embed is {type(pe).__qualname__}, not timm's PatchEmbed")
    _patchify(pe.proj, "patch_embed.proj")
    _identity(pe, "norm", "a norm after the patch projection is not fused")
    if not getattr(pe, "flatten", False) or getattr(pe, "dynamic_img_pad", False):
        raise _Skip("patch_embed does not flatten to tokens, or pads images dynamically")
    if m.dynamic_img_size:
        raise _Skip("dynamic_img_size=True (position embeddings resampled per image size)")
    if m.reg_token is not None:
        raise _Skip("register tokens are not fused")
    if m.pos_embed is not None:
        n = pe.num_patches
        rows = n + (1 if m.cls_token is not None and not m.no_embed_class else 0)
        if m.pos_embed.shape[-2] != rows:
            raise _Skip(f"pos_embed has {m.pos_embed.shape[-2]} rows, not the {rows} of a fixed {pe.grid_size} grid")
    _no_hooks(m, ("patch_embed",))
    _no_hooks(pe, ("proj",))
    return [(name, m, _fused_library_class("FusedTimmVisionTransformer"),
             "patch_embed + class token + pos_embed in one patch_embed kernel")]


def _rule_timm_block_bn(fused_name: str, acts: tuple[str, ...], bns: dict[str, str]):
    def rule(name, m, opts):
        _need(opts, "batch_norm")
        _check_signature(fused_name)
        for act in acts:
            _exact(m, act, nn.ReLU, "nn.ReLU")
        _identity(m, "drop_block", "it runs between the BN and its ReLU")
        if getattr(m, "se", None) is not None:
            raise _Skip(f"an attention module ({type(m.se).__qualname__}) sits between the last BN and the add")
        if getattr(m, "drop_path", None) is not None:
            raise _Skip("drop_path sits between the last BN and the add")
        _no_hooks(m, acts)
        swaps = _bn_swaps(name, m, bns)
        return [(name, m, _fused_library_class(fused_name), "BN + ReLU and BN + add + ReLU fused")] + swaps
    return rule


def _rule_own_attention(name, m, opts):
    _need(opts, "attention")
    return [(name, m, L.FusedMultiHeadAttention, "attention kernel")]


def _rule_own_vit(name, m, opts):
    _need(opts, "patch_embed")
    if isinstance(m.patch_embed, PatchEmbed):
        return []
    _patchify(m.patch_embed, "patch_embed")
    return [(_child(name, "patch_embed"), m.patch_embed, PatchEmbed,
             "projection + class token + pos_embed in one patch_embed kernel")]


def _rule_own_bn(bns: dict[str, str]):
    def rule(name, m, opts):
        _need(opts, "batch_norm")
        return _bn_swaps(name, m, bns)
    return rule


_BLOCK_BNS = {"bn1": "BN + ReLU", "bn2": "BN + add + ReLU"}
_BOTTLENECK_BNS = {"bn1": "BN + ReLU", "bn2": "BN + ReLU", "bn3": "BN + add + ReLU"}


def _rules() -> dict[type, Callable]:
    """Exact type -> rule(name, module, options) returning the swaps, or raising ``_Skip``."""
    rules: dict[type, Callable] = {
        nn.LayerNorm: _rule_norm,
        nn.RMSNorm: _rule_norm,
        nn.MultiheadAttention: _rule_mha,
        nn.TransformerEncoderLayer: _rule_encoder_layer,
        nn.TransformerDecoderLayer: _rule_decoder_layer,
        nn.TransformerEncoder: _rule_encoder,
        L.MultiHeadAttention: _rule_own_attention,
        own_vit.VisionTransformer: _rule_own_vit,
        own_resnet.BasicBlock: _rule_own_bn(_BLOCK_BNS),
        own_resnet.Bottleneck: _rule_own_bn(_BOTTLENECK_BNS),
        own_resnet.ResNet: _rule_own_bn({"bn1": "stem BN + ReLU"}),
    }
    library_rules = {
        "FusedTorchvisionEncoderBlock": _rule_tv_encoder_block,
        "FusedTorchvisionVisionTransformer": _rule_tv_vit,
        "FusedTorchvisionBasicBlock": _rule_tv_block("FusedTorchvisionBasicBlock", _BLOCK_BNS),
        "FusedTorchvisionBottleneck": _rule_tv_block("FusedTorchvisionBottleneck", _BOTTLENECK_BNS),
        "FusedTorchvisionResNet": _rule_resnet_stem("FusedTorchvisionResNet", "relu"),
        "FusedTimmLayerNorm": _rule_timm_norm,
        "FusedTimmAttention": _rule_timm_attention,
        "FusedTimmBlock": _rule_timm_block,
        "FusedTimmVisionTransformer": _rule_timm_vit,
        "FusedTimmBasicBlock": _rule_timm_block_bn("FusedTimmBasicBlock", ("act1", "act2"), _BLOCK_BNS),
        "FusedTimmBottleneck": _rule_timm_block_bn("FusedTimmBottleneck", ("act1", "act2", "act3"),
                                                   _BOTTLENECK_BNS),
        "FusedTimmResNet": _rule_resnet_stem("FusedTimmResNet", "act1"),
    }
    for fused_name, rule in library_rules.items():
        cls = _library_class(fused_name)
        if cls is not None:
            rules[cls] = rule
    return rules


# Modules that run fused as built (fastattn's own layers): reported as fused, never swapped.
_BUILT_FUSED = (fastattn.nn.LayerNorm, fastattn.nn.RMSNorm, PatchEmbed, BatchNormAddReLU, L.FusedMultiHeadAttention)

# Module classes whose names suggest something fusable; the ones without a rule are reported as not recognised.
_LOOKS_FUSABLE = re.compile(r"Attention|Attn|Norm|Block|Transformer|Encoder|Decoder|PatchEmbed|Bottleneck")


def _silent(m: nn.Module) -> bool:
    """Containers whose own forward has nothing to fuse (their children are patched on their own)."""
    known = [nn.Transformer, nn.TransformerDecoder, nn.TransformerEncoder, own_vit.Block]
    from fastattn.models import transformer as own_transformer

    known += [own_transformer.Transformer, own_transformer.EncoderLayer, own_transformer.DecoderLayer]
    for module_name, names in (("torchvision.models.vision_transformer", ("Encoder", "MLPBlock")),
                               ("timm.layers.patch_embed", ("PatchEmbed",)), ("timm.layers.mlp", ("Mlp",))):
        lib = sys.modules.get(module_name)
        known += [getattr(lib, n) for n in names if lib is not None and hasattr(lib, n)]
    return type(m) in known


def _left_alone_reason(m: nn.Module) -> str | None:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return ("no ReLU follows it inside a block fastattn recognises (e.g. a shortcut's BatchNorm), so there is "
                "nothing to fuse; it stays torch's")
    for base in (nn.LayerNorm, nn.RMSNorm, nn.MultiheadAttention, nn.TransformerEncoderLayer,
                 nn.TransformerDecoderLayer):
        if isinstance(m, base):
            return (f"a subclass of torch.nn.{base.__name__}; its forward may differ from torch's, so it is left "
                    f"alone")
    if _LOOKS_FUSABLE.search(type(m).__name__) and not _silent(m):
        return "not recognised by fastattn.patch"
    return None


def _type_name(cls: type) -> str:
    """fastattn's classes with their public module (``fastattn.nn.LayerNorm``), others by their own name."""
    if cls.__module__.startswith("fastattn."):
        module = cls.__module__.rsplit(".", 1)[0] if cls.__module__.startswith("fastattn.models.") else cls.__module__
        return f"{module}.{cls.__qualname__}"
    return cls.__qualname__


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


def patch(model: nn.Module, *, attention: bool = True, layer_norm: bool = True, patch_embed: bool = True,
          batch_norm: bool = True, verbose: bool = False) -> nn.Module:
    """Swap fastattn's fused ops into ``model`` in place and return it; ``fastattn.unpatch(model)`` undoes it.

    Each option enables one family (see the module docstring). Parameters, buffers, dtypes and ``state_dict`` keys
    are unchanged, so checkpoints load either way and optimizers keep working. ``fastattn.patch_report(model)``
    returns what was fused and what was left alone, and why; ``verbose=True`` prints it. Patching twice does nothing
    more. Fused dropout (before a fused add + norm, in attention) draws from fastattn's own random stream, so a
    patched model in training with dropout > 0 matches the original in distribution, not bit for bit.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastattn.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    opts = _Options(bool(attention), bool(layer_norm), bool(patch_embed), bool(batch_norm))
    rules = _rules()
    report = PatchReport()
    swaps: list[Swap] = []
    handled: set[int] = set()
    modules = list(model.named_modules())
    for name, m in modules:  # plan everything against the original classes first
        if id(m) in handled:
            continue
        if _ORIG in m.__dict__ or isinstance(m, _BUILT_FUSED) or type(m).__module__ == __name__:
            was = m.__dict__.get(_ORIG, type(m))
            report.fused.append(PatchEntry(name, _type_name(was), _type_name(type(m)),
                                           "already fused" if _ORIG in m.__dict__ else "built fused"))
            handled.add(id(m))
            continue
        rule = rules.get(type(m))
        if rule is None:
            continue
        try:
            planned = rule(name, m, opts)
        except _Skip as skip:
            report.left_alone.append(PatchEntry(name, _type_name(type(m)), None, str(skip)))
            handled.add(id(m))
            continue
        for swap in planned:
            if id(swap[1]) not in handled:
                swaps.append(swap)
                handled.add(id(swap[1]))
        handled.add(id(m))
    for swap_name, m, cls, detail in swaps:
        report.fused.append(PatchEntry(swap_name, _type_name(type(m)), _type_name(cls), detail))
        m.__dict__[_ORIG] = type(m)
        m.__class__ = cls
    for name, m in modules:
        if id(m) not in handled:
            reason = _left_alone_reason(m)
            if reason is not None:
                report.left_alone.append(PatchEntry(name, _type_name(type(m)), None, reason))
    order = {name: i for i, (name, _) in enumerate(modules)}
    report.fused.sort(key=lambda e: order.get(e.name, -1))
    _REPORTS[model] = report
    if verbose:
        print(report)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``fastattn.patch`` on ``model`` (every swapped module gets its original class back) and return it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastattn.unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    for _, m in model.named_modules():
        orig = m.__dict__.pop(_ORIG, None)
        if orig is not None:
            m.__class__ = orig
    _REPORTS.pop(model, None)
    return model


def patch_report(model: nn.Module) -> PatchReport | None:
    """The report of the last ``fastattn.patch(model)`` (None if it was not patched, or was unpatched since)."""
    return _REPORTS.get(model)
