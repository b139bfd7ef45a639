"""Launchers, autograd and ``torch.library`` registration of each fused op (one module per op)."""

# Op modules, each with ``kernel_specs()`` for the hardware-fit report.
OPS = ("attention", "batch_norm", "layer_norm", "patch_embed", "merge_attention", "kvcache", "varlen")
