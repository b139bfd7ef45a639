"""Triton kernels of fastattn. Installed as ``fastattn.kernels``; only ``@triton.jit`` code, configs and heuristics."""
