"""torch.nn: ``MultiheadAttention``, ``TransformerEncoderLayer``, ``TransformerEncoder``, ``TransformerDecoderLayer``,
``LayerNorm``, ``RMSNorm`` and ``Sequential`` (its BatchNorm2d + activation pairs, e.g. timm's ResNet-D deep stem).

The fused forwards are torch's own, rebuilt around fastattn's ops: ``MultiheadAttention``'s in-projection, masks and
out-projection around ``fastattn.scaled_dot_product_attention``; the layers' dropout + residual add + LayerNorm in
one kernel (``fastattn.nn.add_norm`` / ``add_then_norm``). ``TransformerEncoderLayer`` and ``TransformerEncoder``
are also swapped whenever their attention is, so that torch's eval fast path (``torch._transformer_encoder_layer_fwd``,
nested tensors), which never calls ``self_attn.forward``, cannot bypass the fused kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastattn
from fastattn import _runtime
from fastattn.nn import (
    BatchNormAct2d,
    BatchNormAddReLU,
    LayerNorm,
    LayerNorm2d,
    PatchEmbed,
    RMSNorm,
    add_norm,
    add_then_norm,
    run_sequential,
)
from fastattn.patching.checks import norm_detail, norm_kernel, sequential
from fastattn.patching.rules import REGISTRY, Options, Rule, Skip, Swap, register


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


class FusedSequential(nn.Sequential):
    """``nn.Sequential`` running each BatchNorm2d + activation pair of its children as one fused op
    (``fastattn.nn.run_sequential``; the BatchNorms are swapped to ``fastattn.nn.BatchNormAct2d``)."""

    def forward(self, input: Tensor) -> Tensor:
        return run_sequential(self, input)


# ---------------------------------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------------------------------


def _mha(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    if m.bias_k is not None or m.add_zero_attn:
        raise Skip("add_bias_kv / add_zero_attn are not supported by the fused path")
    return [rule.swap(name, m, "attention kernel (calls with need_weights=True run torch's forward)")]


def _encoder_layer(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    order = "pre-norm" if m.norm_first else "post-norm"
    add = norm_detail(m.norm1, m.norm2) if opts.layer_norm else "eager (layer_norm=False)"
    return [rule.swap(name, m, f"dropout + residual add + LayerNorm {add} ({order}); never torch's eval fast path")]


def _decoder_layer(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    order = "pre-norm" if m.norm_first else "post-norm"
    return [rule.swap(name, m, f"dropout + residual add + LayerNorm {norm_detail(m.norm1, m.norm2, m.norm3)} "
                               f"({order})")]


def _encoder(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    layers_fused = any((type(layer) is nn.TransformerEncoderLayer and (opts.attention or opts.layer_norm))
                       or isinstance(layer, FusedTransformerEncoderLayer) for layer in m.layers)
    if not layers_fused or not getattr(m, "use_nested_tensor", False):  # torch's forward never nests: keep it
        return []
    return [rule.swap(name, m, "no nested-tensor fast path (its layers run the fused kernels)")]


_SYNC_BN = ("SyncBatchNorm reduces its statistics across ranks, which fastattn's BatchNorm kernels do not: it stays "
            "torch's (convert_sync_batchnorm after fastattn.patch gives the same; a patched block calls it unfused)")


def _sync_bn(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    raise Skip(_SYNC_BN)


def _subclass(cls: str) -> str:
    return f"a subclass of torch.nn.{cls}; its forward may differ from torch's, so it is left alone"


register(
    Rule("torch.nn", "torch.nn.modules.batchnorm.SyncBatchNorm", _sync_bn, option="batch_norm", left_alone=_SYNC_BN),
    Rule("torch.nn", "torch.nn.modules.batchnorm._BatchNorm",
         left_alone="no activation or residual add follows it inside a block fastattn recognises (e.g. a shortcut's "
                    "BatchNorm), so there is nothing to fuse; it stays torch's"),  # fused by the block around them
    # option () : a Sequential without a BN + activation pair is not reported; one with a pair says batch_norm=False
    Rule("torch.nn", "torch.nn.Sequential", sequential, fused=FusedSequential),
    Rule("torch.nn", "torch.nn.LayerNorm", norm_kernel, option="layer_norm", fused=LayerNorm,
         left_alone=_subclass("LayerNorm")),
    Rule("torch.nn", "torch.nn.RMSNorm", norm_kernel, option="layer_norm", fused=RMSNorm,
         left_alone=_subclass("RMSNorm")),
    Rule("torch.nn", "torch.nn.MultiheadAttention", _mha, option="attention", fused=FusedMultiheadAttention,
         left_alone=_subclass("MultiheadAttention")),
    Rule("torch.nn", "torch.nn.TransformerEncoderLayer", _encoder_layer, option=("attention", "layer_norm"),
         fused=FusedTransformerEncoderLayer, left_alone=_subclass("TransformerEncoderLayer")),
    Rule("torch.nn", "torch.nn.TransformerDecoderLayer", _decoder_layer, option="layer_norm",
         fused=FusedTransformerDecoderLayer, left_alone=_subclass("TransformerDecoderLayer")),
    Rule("torch.nn", "torch.nn.TransformerEncoder", _encoder, fused=FusedTransformerEncoder),
    Rule("torch.nn", "torch.nn.Transformer"),  # containers: their children are patched on their own
    Rule("torch.nn", "torch.nn.TransformerDecoder"),
)
# fastattn's own layers run fused as built: reported as fused, never swapped
REGISTRY.add_built_fused(LayerNorm, RMSNorm, PatchEmbed, BatchNormAddReLU, BatchNormAct2d, LayerNorm2d)
