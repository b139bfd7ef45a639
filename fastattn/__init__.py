"""fastattn: fused Triton kernels for Transformer, ViT and ResNet building blocks, forward and backward.

Public ops keep torch's signatures so that swapping is a one-word change::

    from fastattn import scaled_dot_product_attention
    out = scaled_dot_product_attention(q, k, v, is_causal=True)
"""

from fastattn import nn
from fastattn._runtime import FallbackWarning, deterministic_backward, record_launches
from fastattn.ops.attention import attention, scaled_dot_product_attention
from fastattn.ops.batch_norm import batch_norm_add_relu
from fastattn.ops.layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fastattn.ops.patch_embed import patch_embed

__version__ = "0.1.0"

__all__ = [
    "FallbackWarning",
    "add_layer_norm",
    "add_rms_norm",
    "attention",
    "batch_norm_add_relu",
    "deterministic_backward",
    "layer_norm",
    "nn",
    "patch_embed",
    "record_launches",
    "rms_norm",
    "scaled_dot_product_attention",
]
