"""fastattn as a Hugging Face transformers attention implementation: the function registered as ``"fastattn"`` with
``AttentionInterface`` (and, with it, ``sdpa_mask`` with ``AttentionMaskInterface``: transformers builds no mask at
all for a name without a mask function).

The function keeps the contract of ``transformers.integrations.sdpa_attention.sdpa_attention_forward``, so a model
gives what it gives under ``"sdpa"``: ``f(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
is_causal=None, **kwargs) -> (out.transpose(1, 2).contiguous(), None)`` with

- query ``(B, H, Lq, D)`` and key/value ``(B, H_kv, Lk, D)``, usually strided views, read through their strides;
- grouped-query attention where ``module.num_key_value_groups > 1`` (absent: 1), through the kernel's own GQA
  (no ``repeat_kv`` copy);
- ``attention_mask`` bool (True = attends, batch-broadcast) or additive float; rows with every key masked (left
  padding) give zeros, and no NaN in any gradient;
- causal from the ``is_causal`` kwarg, else ``module.is_causal`` (default True), and only where ``Lq > 1`` and
  there is no mask; a causal prefill into a longer (static) cache attends to the first ``Lq`` keys, as sdpa does;
- ``scaling=None``: ``D ** -0.5``; ``dropout`` as given (the model passes 0 in eval);
- T5-style ``position_bias`` folded into one additive mask as sdpa folds it (the kernel's mask gradient is the
  bias's gradient);
- ``sliding_window``: the mask transformers builds with ``sdpa_mask`` already holds the window, exactly as under
  sdpa (whose function never reads the kwarg); a kernel with ``window_size`` also gets a causal model's window
  itself (key j visible from query i iff ``i - j < W``: ``window_size=(W - 1, -1)``, bottom-right aligned).

A decode step runs ``fastattn.attention_with_kvcache`` (GQA row packing, split-KV for long caches) over the keys the
model's cache hands over, viewed as a dense cache ``(B, Lk, H_kv, D)`` through their strides (no copy) with
``cache_seqlens`` all ``Lk`` and no new keys: at most :data:`DECODE_MAX_QUERIES` query rows against more keys
(``Lk > Lq``), no mask (transformers passes None when every key is visible), sdpa's causal flag off (sdpa's causal is
top-left, which is the kernel's bottom-right band only where ``Lq == Lk``: a prefill, never a decode step), no
dropout, nothing that needs a gradient (grad mode off, or no input requires grad), and no modifier the KV-cache kernel
lacks (sinks, ``position_bias``); softcap and a causal model's window run in it. Everything else keeps the path
above.

``softcap`` (Gemma 2/3) and ``s_aux`` sinks (gpt-oss) run in the kernel where ``fastattn.attention`` has ``softcap=``
/ ``sinks=`` (:data:`KERNEL_MODIFIERS`, detected from its signature); until then they run transformers' own eager
attention of the model (sdpa cannot take them) with a one-time ``FallbackWarning``. So do ``output_attentions=True``
(the kernels never form the weights), a paged cache, a ``position_bias`` that is not a float tensor the kernel takes
as a mask, and any other keyword transformers' sdpa function does not know that is set: those go to sdpa's own
function (or the model's eager one where it can serve them and sdpa cannot), never to a different answer.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fastattn import _runtime
from fastattn.ops import kvcache as kv_ops
from fastattn.ops.attention import attention
from fastattn.ops.kvcache import attention_with_kvcache

NAME = "fastattn"  # no "flash", "sdpa" or "/": transformers routes such names to its own loaders
_OP = "patch(transformers attention)"

# fastattn.attention's score modifiers (softcap=, window_size=, sinks=), if this fastattn has them
KERNEL_MODIFIERS = {"softcap", "window_size", "sinks"} <= set(inspect.signature(attention).parameters)

# The most query rows a decode step (Lk > Lq, no mask) sends to attention_with_kvcache. Its tiles hold (position, head
# of the GQA group) rows, at most 64: up to 16 positions keep a group of 4 heads in one tile, so each key block is
# read once per key/value head (the attention kernel reads it once per query head, in tiles of mostly empty rows),
# and few rows are where split-KV is needed to fill the GPU. Past that the attention kernel's own query tiles fill.
# Covers one token, speculative decoding's drafts and cross-attention of a few decoder tokens.
DECODE_MAX_QUERIES = 16

# Keyword arguments models pass through the attention interface that do not change sdpa's result: sdpa_attention
# ignores them too (the mask transformers builds already holds packing and windows), or they are bookkeeping.
_NEUTRAL = frozenset({
    "sliding_window", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",
    "use_cache", "cache_position", "num_items_in_batch", "output_hidden_states", "output_router_logits",
    "return_dict", "deterministic", "target_dtype", "use_top_left_mask", "layer_idx", "past_key_values",
    "past_key_value", "position_embeddings", "token_type_ids", "output_attentions", "softcap", "s_aux", "sinks",
    "position_bias", "cache",
})


def _sdpa_function() -> Callable:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _eager_function(module: nn.Module) -> Callable | None:
    """The model's own eager attention (``eager_attention_forward`` of its modeling file), if it has one."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if callable(fn) else None


def _fallback(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
              dropout: float, scaling: float | None, is_causal: bool | None, kwargs: dict, reason: str,
              eager_first: bool) -> tuple[Tensor, Tensor | None]:
    """Run a call fastattn cannot serve, warning once: through the model's eager attention where it serves what sdpa
    cannot (``eager_first``; given the mask it expects), else through transformers' sdpa."""
    eager = _eager_function(module) if eager_first else None
    who = "the model's eager_attention_forward" if eager is not None else "transformers' sdpa_attention_forward"
    _runtime.warn_fallback(_OP, f"{reason}; {who} runs instead")
    if eager is not None:
        return eager(module, query, key, value, _eager_mask(module, query, key, attention_mask, is_causal),
                     dropout=dropout, scaling=scaling, **kwargs)
    return _sdpa_function()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            is_causal=is_causal, **kwargs)


def _unserved(module: nn.Module, query: Tensor, kwargs: dict, softcap_served: bool = False) -> tuple[str, bool] | None:
    """Why this call cannot run the kernel (``softcap_served``: one that takes softcap), and whether the model's eager
    attention is the one to run it."""
    if kwargs.get("output_attentions"):
        return "output_attentions=True asks for the attention weights, which the kernels never form", True
    softcap = kwargs.get("softcap")
    if softcap is not None and float(softcap) > 0.0 and not (KERNEL_MODIFIERS or softcap_served):
        return f"softcap={softcap} (logit soft-capping is not in this fastattn's kernel yet)", True
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if sinks is not None and not KERNEL_MODIFIERS:
        return "attention sinks (s_aux) are not in this fastattn's kernel yet", True
    if kwargs.get("cache") is not None:
        return "a paged cache (continuous batching) updates itself inside sdpa's function", False
    bias = kwargs.get("position_bias")
    if bias is not None and not (isinstance(bias, Tensor) and bias.dtype in (torch.float32, query.dtype)
                                 and bias.dim() == 4):
        what = type(bias).__name__ if not isinstance(bias, Tensor) else f"{bias.dtype} {tuple(bias.shape)}"
        return f"position_bias is {what}, not a 4-D float32 / {query.dtype} additive bias", False
    unknown = sorted(k for k, v in kwargs.items() if k not in _NEUTRAL and v is not None and v is not False)
    if unknown:
        return f"it got keyword(s) {unknown} that fastattn does not know to leave the result unchanged", False
    return None


def _causal(module: nn.Module, query: Tensor, attention_mask: Tensor | None, is_causal: bool | None) -> bool:
    """sdpa_attention's causal rule: the kwarg, else the module's flag, and only for ``Lq > 1`` without a mask."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal
    if torch.jit.is_tracing() and isinstance(causal, Tensor):
        causal = bool(causal.item())
    return bool(causal)


def _eager_mask(module: nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None,
                is_causal: bool | None) -> Tensor | None:
    """The mask an eager attention function expects, from the one built for sdpa (``sdpa_mask``): additive (0 where
    a key is attended, the dtype's minimum elsewhere, as transformers' ``eager_mask``), and materialised where sdpa
    would have applied causality from ``is_causal``."""
    if attention_mask is None and _causal(module, query, attention_mask, is_causal):
        Lq, Lk = query.shape[2], key.shape[2]
        attention_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril()[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.where(attention_mask, torch.zeros((), device=query.device, dtype=query.dtype),
                                     torch.finfo(query.dtype).min)
    return attention_mask


def _modifiers(module: nn.Module, is_causal: bool | None, kwargs: dict) -> dict:
    """Gemma's softcap and a causal model's sliding window (key j visible from query i iff ``i - j < W``,
    bottom-right aligned: ``window_size=(W - 1, -1)``) as kernel arguments; a bidirectional window (``|i - j| <=
    W``) stays in the mask only."""
    modifiers = {}
    if kwargs.get("softcap") is not None and float(kwargs["softcap"]) > 0.0:
        modifiers["softcap"] = float(kwargs["softcap"])
    window = kwargs.get("sliding_window")
    causal_model = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if window is not None and int(window) > 0 and causal_model:
        modifiers["window_size"] = (int(window) - 1, -1)
    return modifiers


def _decode_step(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 dropout: float, scaling: float | None, is_causal: bool | None, kwargs: dict) -> dict | None:
    """``attention_with_kvcache``'s arguments where this call is a decode step it computes exactly as sdpa's contract
    does (see the module docstring), else None. Without a mask and causal flag sdpa attends to every key it is
    given; so does the kernel with ``cache_seqlens = Lk`` and no band. A window is applied as the path above applies
    it: transformers builds no mask for a sliding layer only while its keys are fewer than the window, where the
    band excludes none of them."""
    B, H, Lq, D = query.shape
    Bk, HKV, Lk, _ = key.shape
    if (attention_mask is not None or float(dropout) != 0.0 or not 0 < Lq <= DECODE_MAX_QUERIES or Lk <= Lq
            or _causal(module, query, attention_mask, is_causal)):
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None  # the training path: the KV-cache kernel has no backward
    if kwargs.get("s_aux", kwargs.get("sinks")) is not None or kwargs.get("position_bias") is not None:
        return None
    if _unserved(module, query, kwargs, softcap_served=True) is not None:
        return None
    if scaling is not None and (isinstance(scaling, bool) or not isinstance(scaling, (int, float))):
        return None
    if (Bk != B or key.shape[3] != D or value.shape[:3] != key.shape[:3] or HKV == 0 or H % HKV != 0
            or H // HKV != getattr(module, "num_key_value_groups", 1) or not query.dtype == key.dtype == value.dtype):
        return None  # a broadcast batch, mismatched heads or dtypes: the path above (and its errors) as before
    q, k_cache, v_cache = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # views, no copy
    # Whether a decode tile serves these dtypes and head dims does not depend on the cache length: a one-key view
    # keeps the check free of it (no guard on Lk under torch.compile).
    if kv_ops._fallback(q, k_cache[:, :1], v_cache[:, :1], None, 1)[0] is not None:
        return None
    lens = torch.full((B,), Lk, dtype=torch.int32, device=query.device)
    return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": lens, "scale": scaling,
            **_modifiers(module, is_causal, kwargs)}


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                      **kwargs) -> tuple[Tensor, None]:
    """transformers' attention interface on fastattn's kernels (the contract of sdpa_attention_forward; see the
    module docstring). Returns ``((B, Lq, H, Dv) contiguous, None)``."""
    decode = _decode_step(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if decode is not None:  # (B, Lq, H, Dv), contiguous: the layout the model reshapes
        return attention_with_kvcache(**decode), None
    unserved = _unserved(module, query, kwargs)
    if unserved is not None:
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs, *unserved)
    Lq = query.shape[2]
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    causal = _causal(module, query, attention_mask, is_causal)
    bias = kwargs.get("position_bias")
    if causal and key.shape[2] > Lq:  # an empty static cache's prefill: the later keys are all in the future
        key, value = key[:, :, :Lq], value[:, :, :Lq]
        bias = bias[..., :Lq] if bias is not None else None
    if bias is not None:  # T5: the bias and the mask as one additive mask, exactly as sdpa's function builds it
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask, causal = create_position_bias_mask(bias, attention_mask, causal, query, key), False
    modifiers = {}
    if KERNEL_MODIFIERS:
        modifiers = _modifiers(module, is_causal, kwargs)
        sinks = kwargs.get("s_aux", kwargs.get("sinks"))
        if sinks is not None:
            modifiers["sinks"] = sinks
    out = attention(query, key, value, attention_mask, dropout_p=float(dropout), is_causal=causal, scale=scaling,
                    enable_gqa=gqa, **modifiers)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register :func:`attention_forward` as ``"fastattn"`` with transformers' ``AttentionInterface`` and
    ``sdpa_mask`` with its ``AttentionMaskInterface`` (both global registries; idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
