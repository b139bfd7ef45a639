"""Reference Transformer, Vision Transformer and ResNet models built from fastattn's fused layers."""
