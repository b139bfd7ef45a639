"""Check a fused op against eager PyTorch the way fastattn checks itself.

**The rule.** Compute a float64 reference ``ref`` and run eager PyTorch in the low precision (``eager``); the fused
result ``ours`` in that precision passes when, in the max norm,

    err(ours) <= 2 * err(eager) + u(dtype) * max|ref| + floor,          err(t) = max |t - ref|

``u(dtype) * max|ref|`` is one rounding of the result. Twice eager's error covers the roundings the fused op shares with
eager PyTorch (products and sums in fp32, operands rounded to fp16/bf16). The ``floor`` covers the ones it does not
share -- where eager happens to be (nearly) exact there, twice its error says nothing: a gradient that cancels to zero,
torch's CPU kernels summing fp32 data in float64, a recomputation eager never makes. Each op's floor function
(``*_floors``, in this package's modules) derives it from the kernels' arithmetic, term by term, evaluated on the actual
data in float64 (first order, worst case over every order of summation, so it holds on any CPU or GPU). It is never a
constant chosen to pass; a kernel with a real defect (a dropped key, a wrong scale or eps, a misplaced mask) misses by
orders of magnitude more, and ``tests/test_numerics.py`` shows the rule rejecting such results.

**Rounding model** (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., ch. 2-4). Each fp32
operation rounds with relative error at most ``u = 2^-24`` (float64 inputs run the kernels in float64:
``2^-53``); a dot product of length ``n`` errs by at most ``n u sum|a_i b_i|`` in any order. A row sum inside a
kernel (``tl.sum``) is a tree: compiled, each thread adds at most 32 of its values in sequence and the threads
combine in a tree; interpreted, numpy's pairwise summation adds at most 16 values in sequence per partial before
its tree; so ``n`` values err by at most ``(ceil(log2 n) + 32) u sum|x|`` (:func:`tree_sum_terms`), plus one
rounding per chunk where a long row is summed in chunks. ``exp2``, ``log2``, ``sqrt`` and ``rsqrt`` err by at most
2 ulp (``4u``; PTX's ``ex2.approx`` and ``rsqrt.approx`` are specified within 2 ulp, numpy's within 1). The floors
assume IEEE fp32 products (TF32, ``allow_tf32``, is outside the model), as the tests run.
"""

from __future__ import annotations

from fastattn.testing._attention import (
    attention_floors,
    kvcache_floors,
    merge_floors,
    ring_attention_floors,
    varlen_floors,
    varlen_modifier_floors,
)
from fastattn.testing._norms import batch_norm_floors, norm_floors
from fastattn.testing._patch_embed import patch_embed_floors
from fastattn.testing._rule import (
    UNIT_ROUNDOFF,
    assert_close_to_reference,
    blocked_terms,
    max_err,
    rule_bound,
    tree_sum_terms,
)

__all__ = ["UNIT_ROUNDOFF", "assert_close_to_reference", "attention_floors", "batch_norm_floors", "blocked_terms",
           "kvcache_floors", "max_err", "merge_floors", "norm_floors", "patch_embed_floors", "ring_attention_floors",
           "rule_bound", "tree_sum_terms", "varlen_floors", "varlen_modifier_floors"]
