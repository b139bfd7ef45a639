"""fastattn: fused Triton kernels for Transformer, ViT and ResNet building blocks, forward and backward.

Public ops keep torch's signatures so that swapping is a one-word change::

    from fastattn import scaled_dot_product_attention
    out = scaled_dot_product_attention(q, k, v, is_causal=True)
"""

from fastattn._runtime import FallbackWarning, record_launches
from fastattn.ops.attention import attention, scaled_dot_product_attention

__version__ = "0.1.0"

__all__ = [
    "FallbackWarning",
    "attention",
    "record_launches",
    "scaled_dot_product_attention",
]
