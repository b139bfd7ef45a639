"""fastattn: fused Triton kernels for Transformer, ViT and ResNet building blocks, forward and backward.

Public ops keep torch's signatures so that swapping is a one-word change::

    from fastattn import scaled_dot_product_attention
    out = scaled_dot_product_attention(q, k, v, is_causal=True)

``fastattn.patch(model)`` swaps them into an existing model (``fastattn.patching``; ``fastattn.patch`` is that
function, and ``sys.modules["fastattn.patch"]`` a compatibility module for old import paths and pickles).
"""

from fastattn import models, nn
from fastattn import patch as _patch_module  # the compatibility module: imported before the function takes its name
from fastattn._runtime import FallbackWarning, deterministic_backward, record_launches
from fastattn.ops.attention import attention, scaled_dot_product_attention
from fastattn.ops.batch_norm import batch_norm_act, batch_norm_add_relu
from fastattn.ops.kvcache import attention_with_kvcache
from fastattn.ops.layer_norm import add_layer_norm, add_rms_norm, layer_norm, layer_norm2d, rms_norm
from fastattn.ops.merge_attention import merge_attention
from fastattn.ops.patch_embed import patch_embed
from fastattn.ops.varlen import AuxRequest, varlen_attn
from fastattn.patching import PatchEntry, PatchReport, patch, patch_report, unpatch
from fastattn.sdpa_backend import register_sdpa_backend

del _patch_module


def __getattr__(name: str):
    if name == "distributed":  # ring attention: imported on first use (fastattn.distributed)
        import importlib

        return importlib.import_module("fastattn.distributed")
    raise AttributeError(f"module 'fastattn' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "AuxRequest",
    "FallbackWarning",
    "PatchEntry",
    "PatchReport",
    "add_layer_norm",
    "add_rms_norm",
    "attention",
    "attention_with_kvcache",
    "batch_norm_act",
    "batch_norm_add_relu",
    "deterministic_backward",
    "layer_norm",
    "layer_norm2d",
    "merge_attention",
    "models",
    "nn",
    "patch",
    "patch_embed",
    "patch_report",
    "record_launches",
    "register_sdpa_backend",
    "rms_norm",
    "scaled_dot_product_attention",
    "unpatch",
    "varlen_attn",
]
