"""What ``fastattn bench`` and ``fastattn inspect`` run; shipped with the package so the installed CLI has it all.

- ``cases``: the per-op benchmark registry (one function per op: shapes, fused and eager callables, FLOP or byte
  formulas) and the kernel scratch that fake implementations do not allocate.
- ``blocks``: a ViT-B/16 and a ResNet-50 composed from per-op callables (eager or fused op tables), for the
  block-level memory report and the end-to-end training step.
- ``gpu``: timing with ``triton.testing.do_bench`` (median, 20/80 quantiles), throughput, peak memory, the
  pytest-benchmark glue.
- ``memory``: saved-for-backward bytes, peak live bytes and HBM traffic, measured on FakeTensors at real shapes.
- ``cpu``: the CPU report (hardware fit, measured memory, traffic, interpreter agreement).
- ``fit``: the hardware-fit report over ``fastattn.hwfit`` with an on-disk cache.
- ``ceiling``: the issue-slot ceiling table (``fastattn ceiling``); ``refloop``: the minimal FlashAttention-2
  reference loops it compiles beside the shipped kernels.
- ``gpucheck``: ``fastattn gpu-check``, the op tests, agreement and a bounded benchmark on a CUDA GPU.
- ``report``: environment stamp, text tables, CSV, progress; ``plots``: the PNGs.
"""
