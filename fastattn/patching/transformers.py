"""Hugging Face transformers: the attention implementation of a ``PreTrainedModel``, its RMSNorms, the residual
add + norm of its layers, ViT's patch embedding.

Nothing here imports transformers until a model holding its classes is patched. Modules are recognised by what
they compute, not by a list of class names (transformers 5.23 has 524 model families, mostly generated copies):

- a ``PreTrainedModel`` whose attention goes through ``AttentionInterface``: ``"fastattn"`` is registered there
  (:mod:`~fastattn.patching.transformers_attention`) and set with ``model.set_attn_implementation``; ``unpatch``
  writes back exactly the implementation every config of the model had (submodels share configs).
- an RMSNorm: one 1-D ``weight``, an ``eps`` / ``variance_epsilon``, no children or buffers, whose own forward,
  probed once at patch time on inputs fastattn draws, computes ``x * rsqrt(mean(x^2) + eps)`` times ``w`` (Llama,
  Mistral, Qwen, Phi, T5, ...) or ``1 + w`` (Gemma); the probe in half precision also finds the rounding order
  (Llama rounds ``xhat`` to the input dtype before the weight multiply; Gemma and T5 do not) and the output dtype
  (Llama's promotes with the weight's). The kernel reproduces all three: ``round_xhat`` is a kernel constexpr,
  Gemma's ``1 + w`` is formed in fp32 outside the kernel (an ``N``-vector, exactly as Gemma's forward forms it) and
  passed as the weight, the output dtype is the launcher's.
- layers whose forward is the same code (:func:`~fastattn.patching.checks.same_code`) as one of transformers':
  Llama's decoder layer (the attention residual added inside ``post_attention_layernorm``), CLIP's encoder layer
  and ViT's layer (inside ``layer_norm2`` / ``layernorm_after``), GPT-2's block (inside ``ln_cross_attn`` and
  ``ln_2``), BERT's ``BertSelfOutput`` / ``BertOutput`` (``LayerNorm(dropout(dense(h)) + input)`` in one kernel),
  and ViT's embeddings (projection + class token + position embedding in one ``patch_embed``).

The fused classes are generated per matched class (``FusedTransformersLlamaDecoderLayer``) and pickle by value
(:func:`~fastattn.patching.rules.generated_class`). They replace the class ``forward``, so transformers' gradient
checkpointing, which wraps the class forward of every ``GradientCheckpointingLayer`` subclass, keeps working.
"""

from __future__ import annotations

import copy
import inspect
import math
import sys
import weakref
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastattn
from fastattn import _runtime
from fastattn.nn import FusedNorm, add_norm, add_then_norm
from fastattn.ops.layer_norm import _add_norm, residual_dtype
from fastattn.patching import transformers_attention as hf_attention
from fastattn.patching.checks import child, no_hooks, no_instance_forward, norm_detail, patchify, same_code
from fastattn.patching.rules import Options, Rule, Setting, Skip, Swap, register

_HF = "transformers.models"
_HALF = (torch.float16, torch.bfloat16)


def _hf_class(m: nn.Module) -> bool:
    """A class of transformers or of a model's remote code (``trust_remote_code``)."""
    return type(m).__module__.split(".", 1)[0] in ("transformers", "transformers_modules")


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------------------------


class RMSForm(NamedTuple):
    """What a recognised RMSNorm computes (found by :func:`_probe_rms_norm`): ``out = (xhat * w')`` with
    ``xhat = x * rsqrt(mean(x^2) + eps)`` in fp32, ``w' = w`` or ``1 + w`` (``plus_one``), ``xhat`` rounded to the
    input dtype first (``round_xhat``), and the output in the input dtype or promoted with the weight's
    (``promote``). ``eps_attr`` names the module's eps."""

    eps_attr: str
    plus_one: bool
    round_xhat: bool
    promote: bool


def _eps_attr(m: nn.Module) -> str | None:
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(m, attr, None)
        if isinstance(eps, float) and not isinstance(eps, bool) and 0.0 < eps < math.inf:
            return attr
    return None


def _rms_norm_shaped(m: nn.Module) -> bool:
    """The structure of an RMSNorm: one 1-D ``weight``, an eps, no children or buffers, ``forward(x)``."""
    if not _hf_class(m) or isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or m._modules or m._buffers:
        return False
    weight = m._parameters.get("weight")
    if list(m._parameters) != ["weight"] or weight is None or weight.dim() != 1 or _eps_attr(m) is None:
        return False
    try:
        return len(inspect.signature(type(m).forward).parameters) == 2
    except (TypeError, ValueError):
        return False


def _probe_rms_norm(m: nn.Module) -> RMSForm:
    """Run the module's own forward on fastattn's inputs (CPU, a fixed generator, a copy of the module holding a
    random weight) and say which :class:`RMSForm` it computes, or raise :class:`Skip`."""
    eps_attr = _eps_attr(m)
    eps, n = float(getattr(m, eps_attr)), m.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, n, generator=g, dtype=torch.float64)
    x[1] *= math.sqrt(eps)  # a row whose mean square is about eps: a misplaced or different eps shows
    w = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)

    def run(inp: Tensor, weight: Tensor) -> Tensor:
        probe = copy.copy(m)
        probe._parameters = {"weight": nn.Parameter(weight, requires_grad=False)}
        with torch.no_grad():
            return type(m).forward(probe, inp)

    def xhat(inp: Tensor) -> Tensor:
        inp = inp.double()
        return inp * torch.rsqrt(inp.square().mean(-1, keepdim=True) + eps)

    try:
        x32 = x.float()
        y = run(x32, w.float())
        wh = m.weight.dtype if m.weight.dtype in (*_HALF, torch.float32) else torch.float32
        half = wh if wh in _HALF else torch.bfloat16
        xh = x.to(half)
        yh = run(xh, w.to(wh))
    except Exception as err:  # noqa: BLE001  (any failure of a foreign forward means: not recognised)
        raise Skip(f"its forward failed on a probe input ({type(err).__name__}: {err})") from None
    if not isinstance(y, Tensor) or y.shape != x.shape or y.dtype != torch.float32:
        raise Skip("its forward does not return a float32 tensor of its input's shape for a float32 input")
    # float32's roundings of the module's own computation, relative: its mean of n squares (a tree or a sequence of
    # at most 32 adds per partial, as in fastattn.testing.tree_sum_terms), rsqrt and the products; a wrong eps or
    # weight offset misses by orders of magnitude more
    tol = (math.ceil(math.log2(max(n, 2))) + 40) * 2.0**-24
    forms = [plus_one for plus_one in (False, True)
             if ((y.double() - xhat(x32) * (w + plus_one)).abs() <= tol * (w + plus_one) * xhat(x32).abs()).all()]
    if not forms:
        raise Skip(f"its forward is not x * rsqrt(mean(x^2) + {eps_attr}) * w (or * (1 + w)) in float32: a "
                   f"numerical check on a probe input disagrees")
    plus_one = forms[0]
    weff = w.to(wh).double() + plus_one
    if yh.dtype not in (half, torch.promote_types(half, wh)) or yh.shape != x.shape:
        raise Skip(f"for a {half} input with a {wh} weight its forward returns {yh.dtype}, neither dtype")
    rounded = (weff * xhat(xh).to(half).double()).to(yh.dtype).double()
    single = (weff * xhat(xh)).to(yh.dtype).double()
    err_rounded, err_single = ((yh.double() - c).abs().mean().item() for c in (rounded, single))
    return RMSForm(eps_attr, plus_one, err_rounded < err_single, yh.dtype != half)


class _RMSNorm(FusedNorm):
    """An RMSNorm recognised by structure and a numerical probe, on fastattn's norm kernel with its own rounding
    order and output dtype (:class:`RMSForm`, a class attribute); ``forward(x, residual=None, ...)`` fuses a
    residual add as ``fastattn.nn.RMSNorm``'s. Dtype mixes the kernel does not take (a half-precision weight beside
    float32 activations) run the module's own forward with a one-time ``FallbackWarning``."""

    _fastattn_rms: RMSForm

    def forward(self, hidden_states: Tensor, residual: Tensor | None = None, *, dropout_p: float = 0.0,
                residual_in_fp32: bool = False, return_residual: bool | None = None):
        form, x = self._fastattn_rms, hidden_states
        if return_residual is None:
            return_residual = residual is not None
        p = dropout_p if self.training else 0.0
        weight = 1.0 + self.weight.float() if form.plus_one else self.weight
        if not x.is_floating_point() or weight.dtype not in (x.dtype, torch.float32):
            _runtime.warn_fallback("patch(transformers RMSNorm)", f"the kernel takes no {weight.dtype} weight "
                                                                  f"beside {x.dtype} activations")
            z = F.dropout(x, p) if p > 0.0 else x
            z = z if residual is None else residual + z
            out = super().forward(z)
            return (out, z) if return_residual else out
        z_dtype = residual_dtype(x.dtype, residual_in_fp32) if residual is not None else x.dtype
        out_dtype = torch.promote_types(z_dtype, weight.dtype) if form.promote else z_dtype
        return _add_norm("patch(transformers RMSNorm)", x, residual, weight, None, getattr(self, form.eps_attr), p,
                         residual_in_fp32, return_residual, True, (x.shape[-1],), round_xhat=form.round_xhat,
                         out_dtype=out_dtype)


def _rms_norm(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    no_instance_forward(m)
    form = _probe_rms_norm(m)
    what = "x_norm * (1 + w) in float32" if form.plus_one else (
        "w * x_norm rounded to the input dtype" if form.round_xhat else "w * x_norm in float32")
    return [rule.swap(name, m, f"RMSNorm kernel ({what}; out {'promoted with w' if form.promote else 'input dtype'})",
                      attrs=(("_fastattn_rms", form),))]


# ---------------------------------------------------------------------------------------------------------------
# layers: the residual add inside the following norm
# ---------------------------------------------------------------------------------------------------------------


class _LlamaDecoderLayer:
    """transformers' Llama-family pre-norm decoder layer: the attention residual added inside
    ``post_attention_layernorm`` (one kernel), the rest as transformers computes it."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: Any = None, use_cache: bool | None = False,
                position_embeddings: tuple[Tensor, Tensor] | None = None, **kwargs) -> Tensor:
        residual = hidden_states
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
        h, residual = add_then_norm(self.post_attention_layernorm, attn, residual)
        return residual + self.mlp(h)


class _CLIPEncoderLayer:
    """transformers' CLIP encoder layer: the attention residual added inside ``layer_norm2``."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor, **kwargs) -> Tensor:
        residual = hidden_states
        attn, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), attention_mask=attention_mask,
                                 **kwargs)
        h, residual = add_then_norm(self.layer_norm2, attn, residual)
        return residual + self.mlp(h)


class _ViTLayer:
    """transformers' ViT layer: dropout + the attention residual added inside ``layernorm_after``."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        residual = hidden_states
        attn, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        h, residual = add_then_norm(self.layernorm_after, attn, residual, self.dropout)
        return self.dropout(self.mlp(h)) + residual


class _GPT2Block:
    """transformers' GPT-2 block: the attention residual added inside ``ln_cross_attn`` (with cross-attention) or
    ``ln_2``, the cross-attention residual inside ``ln_2``."""

    def forward(self, hidden_states: Tensor, past_key_values: Any = None, attention_mask: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                use_cache: bool | None = False, **kwargs) -> Tensor:
        residual = hidden_states
        attn, _ = self.attn(self.ln_1(hidden_states), past_key_values=past_key_values, attention_mask=attention_mask,
                            use_cache=use_cache, **kwargs)
        if encoder_hidden_states is not None:
            if not hasattr(self, "crossattention"):
                raise ValueError(f"If `encoder_hidden_states` are passed, {self} has to be instantiated with "
                                 "cross-attention layers by setting `config.add_cross_attention=True`")
            h, residual = add_then_norm(self.ln_cross_attn, attn, residual)
            attn, _ = self.crossattention(h, past_key_values=past_key_values, attention_mask=attention_mask,
                                          encoder_hidden_states=encoder_hidden_states,
                                          encoder_attention_mask=encoder_attention_mask)
        h, residual = add_then_norm(self.ln_2, attn, residual)
        return residual + self.mlp(h)


class _BertOutput:
    """transformers' ``BertSelfOutput`` / ``BertOutput``: ``LayerNorm(dropout(dense(h)) + input)``, the dropout,
    the add and the norm in one kernel."""

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return add_norm(self.LayerNorm, self.dense(hidden_states), input_tensor, self.dropout)


class _ViTEmbeddings:
    """transformers' ViT embeddings: patch projection + class token + position embedding in one
    ``fastattn.patch_embed``; masked patches (``bool_masked_pos``) and interpolated position embeddings run
    transformers' forward (one-time ``FallbackWarning``)."""

    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None,
                interpolate_pos_encoding: bool = False) -> Tensor:
        if bool_masked_pos is not None or interpolate_pos_encoding:
            _runtime.warn_fallback("patch(transformers ViTEmbeddings)", "bool_masked_pos / interpolate_pos_encoding "
                                                                        "run transformers' own embeddings")
            return super().forward(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        _, channels, height, width = pixel_values.shape
        pe = self.patch_embeddings
        if channels != pe.num_channels:
            raise ValueError("Make sure that the channel dimension of the pixel values match with the one set in the "
                             f"configuration. Expected {pe.num_channels} but got {channels}.")
        if height != self.image_size[0] or width != self.image_size[1]:
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model "
                             f"({self.image_size[0]}*{self.image_size[1]}).")
        tokens = fastattn.patch_embed(pixel_values, pe.projection.weight, pe.projection.bias,
                                      self.position_embeddings, self.cls_token)
        return self.dropout(tokens)


def _layer(norms: tuple[str, ...], what: str, attrs: tuple[str, ...] = (), optional: tuple[str, ...] = ()):
    """The check of a layer whose fused forward adds a residual inside the norms ``norms`` (and ``optional`` ones,
    where the layer has them): no instance forward, the attributes it reads present, no hooks on the norms it calls
    with a residual, and the report says whether the norms run fused."""
    def check(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
        no_instance_forward(m)
        missing = [a for a in (*norms, *attrs) if not hasattr(m, a)]
        if missing:
            raise Skip(f"it has no {', '.join(missing)}")
        present = tuple(a for a in (*norms, *optional) if isinstance(getattr(m, a, None), nn.Module))
        no_hooks(m, present)
        return [rule.swap(name, m, f"{what} {norm_detail(*(getattr(m, a) for a in present))}")]
    return check


def _vit_embeddings(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    no_instance_forward(m)
    pe = getattr(m, "patch_embeddings", None)
    if pe is None or not same_code(f"{_HF}.vit.modeling_vit.ViTPatchEmbeddings")(pe):
        raise Skip("its patch_embeddings is not ViT's ViTPatchEmbeddings")
    patchify(pe.projection, "patch_embeddings.projection")
    if m.cls_token is None or m.position_embeddings.shape[-2] != pe.num_patches + 1:
        raise Skip("no class token, or position embeddings not of num_patches + 1 rows")
    no_hooks(m, ("patch_embeddings",))
    no_hooks(pe, ("projection",))
    return [rule.swap(name, m, "projection + class token + position embeddings in one patch_embed kernel"),
            Setting(child(name, "patch_embeddings"), pe, _nothing, _nothing_undo, "its projection runs in its "
                    "parent's patch_embed kernel", f"(inside {name or 'the model'})")]


# ---------------------------------------------------------------------------------------------------------------
# the model: attention implementation "fastattn"
# ---------------------------------------------------------------------------------------------------------------


def _pretrained_model(m: nn.Module) -> bool:
    mu = sys.modules.get("transformers.modeling_utils")
    return mu is not None and isinstance(m, mu.PreTrainedModel)


class SavedImplementations:
    """The attention implementation every config of a patched model had (``_attn_implementation_internal``, by
    object: submodels share configs). Kept in the model's ``__dict__``; unpickling one (a patched model saved whole)
    registers ``"fastattn"`` with transformers again, so the loaded model runs."""

    def __init__(self, configs: list) -> None:
        self.saved = [(c, "_attn_implementation_internal" in c.__dict__,
                       c.__dict__.get("_attn_implementation_internal")) for c in configs]

    def restore(self) -> None:
        for config, present, value in self.saved:
            if present:
                config._attn_implementation_internal = value
            else:
                config.__dict__.pop("_attn_implementation_internal", None)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        hf_attention.register()


def _configs(model: nn.Module) -> list:
    """Every config ``set_attn_implementation`` may write: the model's and its submodels', with their sub-configs."""
    configs: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if _pretrained_model(m)]
    while stack:
        config = stack.pop()
        if id(config) in configs:
            continue
        configs[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                stack.append(sub)
    return list(configs.values())


def _set_fastattn(model: nn.Module) -> SavedImplementations:
    hf_attention.register()
    saved = SavedImplementations(_configs(model))
    model.set_attn_implementation(hf_attention.NAME)
    return saved


def _restore(model: nn.Module, saved: SavedImplementations) -> None:
    saved.restore()


def _nothing(model: nn.Module) -> None:
    return None


def _nothing_undo(model: nn.Module, state: None) -> None:
    return None


_CALLS_INTERFACE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _calls_interface(m: nn.Module) -> bool:
    """Whether the module's forward looks its attention function up in transformers' AttentionInterface (as
    transformers' own ``_can_set_attn_implementation`` reads the source)."""
    cls = type(m)
    hit = _CALLS_INTERFACE.get(cls)
    if hit is None:
        try:
            hit = "ALL_ATTENTION_FUNCTIONS.get_interface(" in inspect.getsource(inspect.unwrap(cls.forward))
        except (OSError, TypeError):
            hit = False
        _CALLS_INTERFACE[cls] = hit
    return hit


def _model(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Setting]:
    subs = [(n, s) for n, s in m.named_modules() if _pretrained_model(s)]
    for n, s in subs:
        if not type(s)._can_set_attn_implementation():
            raise Skip(f"{type(s).__name__} does not route attention through transformers' AttentionInterface")
        if not (s._supports_sdpa or s._supports_flash_attn or s._supports_flex_attn):
            raise Skip(f"{type(s).__name__} supports neither sdpa nor flash / flex attention, so its attention may "
                       f"depend on its eager function")
    was = m.config._attn_implementation
    fused_as = f'attn_implementation "{hf_attention.NAME}"'
    settings = [Setting(name, m, _set_fastattn, _restore, f"attention kernel through transformers' "
                                                          f"AttentionInterface (was {was!r})", fused_as)]
    settings += [Setting(child(name, n), s, _nothing, _nothing_undo, "attention set with its parent model", fused_as)
                 for n, s in subs if s is not m]
    settings += [Setting(child(name, n), s, _nothing, _nothing_undo, "attention kernel (the model's attention "
                                                                     "implementation)", fused_as)
                 for n, s in m.named_modules() if _hf_class(s) and _calls_interface(s)]
    return settings


def _unknown(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    if _calls_interface(m):
        raise Skip("its attention function is the model's attention implementation, which was not set (the model "
                   "is not patched, or attention=False)")
    raise Skip("not a layer fastattn fuses (its submodules are patched on their own)")


_LLAMA = f"{_HF}.llama.modeling_llama.LlamaDecoderLayer"
register(
    Rule("transformers", None, _model, option="attention", matches=_pretrained_model),
    Rule("transformers", None, _rms_norm, option="layer_norm", mixin=_RMSNorm, matches=_rms_norm_shaped),
    Rule("transformers", None, _layer(("post_attention_layernorm",), "attention residual add + post_attention_"
                                      "layernorm", ("input_layernorm", "self_attn", "mlp")),
         option="layer_norm", mixin=_LlamaDecoderLayer, matches=same_code(_LLAMA)),
    Rule("transformers", None, _layer(("layer_norm2",), "attention residual add + layer_norm2",
                                      ("layer_norm1", "self_attn", "mlp")),
         option="layer_norm", mixin=_CLIPEncoderLayer, matches=same_code(f"{_HF}.clip.modeling_clip.CLIPEncoderLayer")),
    Rule("transformers", None, _layer(("layernorm_after",), "dropout + attention residual add + layernorm_after",
                                      ("layernorm_before", "attention", "mlp", "dropout")),
         option="layer_norm", mixin=_ViTLayer, matches=same_code(f"{_HF}.vit.modeling_vit.ViTLayer")),
    Rule("transformers", None, _layer(("ln_2",), "attention residual adds + ln_cross_attn / ln_2",
                                      ("ln_1", "attn", "mlp"), ("ln_cross_attn",)),
         option="layer_norm", mixin=_GPT2Block, matches=same_code(f"{_HF}.gpt2.modeling_gpt2.GPT2Block")),
    Rule("transformers", None, _layer(("LayerNorm",), "dropout + residual add + LayerNorm", ("dense", "dropout")),
         option="layer_norm", mixin=_BertOutput, matches=same_code(f"{_HF}.bert.modeling_bert.BertSelfOutput")),
    Rule("transformers", None, _vit_embeddings, option="patch_embed", mixin=_ViTEmbeddings,
         matches=same_code(f"{_HF}.vit.modeling_vit.ViTEmbeddings")),
    Rule("transformers", None, _unknown, matches=_hf_class),  # last: every other module of transformers, reported
)
