"""fastattn.merge_attention against the float64 merge, outputs and every gradient (2x-eager rule, fastattn.testing).

Each case runs three ways (tests/harness.py): the eager reference (fastattn.reference.merge_attention) in float64,
the same in the low precision, and ours, with a check that the Triton kernels ran. The lses stay float32 in the
low-precision runs (as fastattn.attention returns them) and are float32 values in the float64 run too.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from harness import DEVICE, cpu_only, dev, three_way

import fastattn
from fastattn import reference
from fastattn.ops import attention as attn_ops
from fastattn.ops import merge_attention as merge_ops
from fastattn.testing import assert_close_to_reference, attention_floors, merge_floors

KERNELS = merge_ops.FORWARD_KERNELS + merge_ops.BACKWARD_KERNELS


def _lse_dtype(lowp: torch.dtype) -> torch.dtype:
    return torch.float64 if lowp == torch.float64 else torch.float32


def check_merge(outs, lses, dtype, *, grad_lse=True):
    """``outs``/``lses`` are float64 masters on the CPU (lses holding float32 values), moved to the test device by each
    run; returns the three runs' results."""
    S = len(outs)
    grads = {}

    def run(label, lowp):
        os_ = [dev(o, lowp, copy=True).requires_grad_() for o in outs]
        ls = [dev(x, _lse_dtype(lowp), copy=True).requires_grad_() for x in lses]
        fn = fastattn.merge_attention if label == "ours" else reference.merge_attention
        out, lse = fn(os_, ls)
        if not grads:
            grads["out"] = torch.randn(out.shape, dtype=torch.float64)
            grads["lse"] = torch.randn(lse.shape, dtype=torch.float64)
        seeds = [dev(grads["out"], out.dtype)]
        if grad_lse:  # -inf rows: a finite seed, a finite gradient (zero) expected
            seeds.append(dev(grads["lse"], lse.dtype))
        torch.autograd.backward([out, lse] if grad_lse else [out], seeds)
        # -inf rows (empty everywhere) must be the same rows in every run; the rule compares the finite ones
        empty = torch.isneginf(lse)
        grads.setdefault("empty", empty)
        assert torch.equal(empty, grads["empty"]), f"{label}: lse is -inf on other rows than the reference's"
        res = {"out": out, "lse": lse.masked_fill(empty, 0.0)}
        res.update({f"dout{s}": o.grad for s, o in enumerate(os_)})
        res.update({f"dlse{s}": x.grad for s, x in enumerate(ls)})
        return res

    def floors(results):
        seen = [o.to(dtype).double() for o in outs]
        return merge_floors(seen, lses, grads["out"].to(dtype).double(), grads["lse"] if grad_lse else None,
                            dtype=dtype, lse_ours=results["ours"]["lse"].cpu())

    res = three_way(run, dtype, kernels=KERNELS, floors=floors)
    res["empty"] = grads["empty"]
    for name, t in res["ours"].items():
        if name != "lse":
            assert torch.isfinite(t).all(), f"{name} has non-finite values"
    assert S == sum(1 for n in res["ours"] if n.startswith("dout"))
    return res


def parts(S, shape, empty_frac=0.0, spread=3.0):
    outs = [torch.randn(*shape, dtype=torch.float64) for _ in range(S)]
    lses = [(spread * torch.randn(*shape[:-1])).float().double() for _ in range(S)]
    if empty_frac:
        for x in lses:
            x.masked_fill_(torch.rand(x.shape) < empty_frac, float("-inf"))
    return outs, lses


@pytest.mark.parametrize("S,shape", [(1, (3, 17, 64)), (2, (2, 3, 97, 64)), (3, (1, 113, 40)), (8, (2, 5, 16)),
                                     (2, (1, 1, 1, 1)), (5, (2, 2, 31, 128))],
                         ids=["S1", "S2-B2H3L97d64", "S3-L113d40", "S8-d16", "S2-ones", "S5-d128"])
def test_parts_fp16(S, shape):
    check_merge(*parts(S, shape), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dtypes(dtype):
    check_merge(*parts(4, (2, 3, 45, 72)), dtype)


def test_lse_gradient_alone_and_out_gradient_alone():
    outs, lses = parts(3, (2, 29, 32))
    check_merge(outs, lses, torch.float32, grad_lse=False)
    # only the lse used: dout arrives as None, every d out_s is zero
    os_ = [dev(o, torch.float32).requires_grad_() for o in outs]
    ls = [dev(x, torch.float32).requires_grad_() for x in lses]
    _, lse = fastattn.merge_attention(os_, ls)
    lse.sum().backward()
    assert all((o.grad == 0).all() for o in os_)
    w = torch.stack([(x - lse).exp() for x in ls]).detach()
    for s, x in enumerate(ls):  # d lse / d lse_s = w_s
        assert_close_to_reference(x.grad, w[s], w[s].double(), torch.float32, name=f"dlse{s}",
                                  floor=8 * 2**-24 * (1 + lse.abs().max().item()))


def test_empty_parts_and_empty_rows():
    """-inf lse entries: a part with no keys for a row adds nothing (its output, NaN here, is never read) and gets
    zero gradients; a row empty in every part gives out = 0, lse = -inf, with no NaN anywhere."""
    outs, lses = parts(4, (2, 3, 37, 32), empty_frac=0.3)
    for x in lses:
        x[0, 1, :5] = float("-inf")  # rows 0..4 of (0, 1): empty everywhere
    for o, x in zip(outs, lses):
        o[torch.isneginf(x)] = float("nan")
    res = check_merge(outs, lses, torch.float16)
    ours = res["ours"]
    assert (ours["out"][0, 1, :5] == 0).all() and res["empty"][0, 1, :5].all()  # lse -inf there (checked in run)
    for s, x in enumerate(lses):
        dead = torch.isneginf(x)
        assert (ours[f"dout{s}"][dead] == 0).all() and (ours[f"dlse{s}"][dead] == 0).all()


def test_all_parts_empty():
    outs = [dev(torch.randn(2, 7, 16)) for _ in range(3)]
    lses = [dev(torch.full((2, 7), float("-inf"))) for _ in range(3)]
    os_ = [o.requires_grad_() for o in outs]
    ls = [x.requires_grad_() for x in lses]
    with fastattn.record_launches() as launches:
        out, lse = fastattn.merge_attention(os_, ls)
        (out.sum() + lse.clamp_min(-1e30).sum()).backward()
    assert launches["_merge_fwd"] == 1 and launches["_merge_bwd"] == 1
    assert (out == 0).all() and torch.isneginf(lse).all()
    assert all((t.grad == 0).all() for t in os_ + ls)


def test_non_contiguous_parts():
    base = torch.randn(2, 40, 3, 48, dtype=torch.float64)
    outs = [base.transpose(1, 2), torch.randn(2, 48, 3, 40, dtype=torch.float64).permute(0, 2, 3, 1)]
    lses = [torch.randn(2, 40, 3).float().double().transpose(1, 2), (torch.randn(2, 3, 40) + 1).float().double()]
    check_merge(outs, lses, torch.bfloat16)


CUTS = [0, 17, 64, 101]  # three disjoint key ranges of a 101-key attention


def _split_attention(q, k, v):
    """Attention over the key ranges of CUTS by fastattn.attention, merged by fastattn.merge_attention."""
    pieces = [fastattn.attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True) for a, b in itertools.pairwise(CUTS)]
    return fastattn.merge_attention([p[0] for p in pieces], [p[1] for p in pieces]), pieces


def test_merged_key_splits_equal_full_attention():
    """The use it exists for: attention over a key set cut into disjoint parts (as ring attention or split-KV
    decoding does), each part's (out, lse) from fastattn.attention, merged, against attention over all keys. The
    floor: each part's attention floors carried through the merge (its out_errs / lse_errs) plus the merge's own."""
    B, H, M, D = 2, 2, 33, 32
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (M, CUTS[-1], CUTS[-1]))
    seen = [t.half().double() for t in (q, k, v)]

    def run(label, lowp):
        qs, ks, vs = (dev(t, lowp) for t in (q, k, v))
        if label == "ours":
            (out, lse), _ = _split_attention(qs, ks, vs)
        else:
            out, lse = reference.scaled_dot_product_attention(qs, ks, vs, return_lse=True)
        return {"out": out, "lse": lse.float() if lowp != torch.float64 else lse}

    def floors(results):
        errs, outs, lses = [], [], []
        for a, b in itertools.pairwise(CUTS):
            kk, vv = seen[1][:, :, a:b], seen[2][:, :, a:b]
            o, x = reference.scaled_dot_product_attention(seen[0], kk, vv, return_lse=True)
            f = attention_floors(seen[0], kk, vv, torch.zeros_like(o), dtype=torch.float16)
            outs.append(o)
            lses.append(x)
            # a part's fp16 output is rounded once more than the rule's rounding of the merged result
            errs.append((torch.full_like(o, f["out"]) + 2**-11 * o.abs(), torch.full_like(x, f["lse"])))
        return merge_floors(outs, lses, dtype=torch.float16, out_errs=[e[0] for e in errs],
                            lse_errs=[e[1] for e in errs])

    three_way(run, torch.float16, kernels=merge_ops.FORWARD_KERNELS + attn_ops.FORWARD_KERNELS, floors=floors)


def test_merged_key_splits_gradients_float64():
    """Gradients through the merge into every part's q, k, v equal full attention's (float64 through the
    interpreter: both sides exact to rounding, so torch's float64 tolerances apply)."""
    cpu_only("float64 runs the Triton kernels only in the interpreter")
    B, H, M, D = 1, 2, 21, 16
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64, requires_grad=True) for n in (M, CUTS[-1], CUTS[-1]))
    grad_out, grad_lse = torch.randn(B, H, M, D, dtype=torch.float64), torch.randn(B, H, M, dtype=torch.float64)
    with fastattn.record_launches() as launches:
        (out, lse), _ = _split_attention(q, k, v)
        torch.autograd.backward([out, lse], [grad_out, grad_lse])
    assert launches["_merge_bwd"] == 1 and launches["_attn_bwd_dq"] == 3
    ours = [out, lse, q.grad, k.grad, v.grad]
    q.grad = k.grad = v.grad = None
    ref_out, ref_lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True)
    torch.autograd.backward([ref_out, ref_lse], [grad_out, grad_lse])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, [ref_out, ref_lse, q.grad, k.grad, v.grad]):
        torch.testing.assert_close(a, b, msg=name)


def test_repeatable_bitwise():
    outs, lses = parts(5, (3, 61, 40))
    os_ = [dev(o, torch.float16) for o in outs]
    ls = [dev(x, torch.float32) for x in lses]
    a = fastattn.merge_attention(os_, ls)
    b = fastattn.merge_attention(os_, ls)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_torch_compile_fullgraph():
    outs, lses = parts(3, (2, 19, 32))
    os_ = [dev(o, torch.float32).requires_grad_() for o in outs]
    ls = [dev(x, torch.float32).requires_grad_() for x in lses]

    def f(a, b, c, la, lb, lc):
        out, lse = fastattn.merge_attention([a, b, c], [la, lb, lc])
        return out.sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with fastattn.record_launches() as launches:
        compiled(*os_, *ls).backward()
    assert launches["_merge_fwd"] == 1 and launches["_merge_bwd"] == 1
    got = [t.grad.clone() for t in os_ + ls]
    for t in os_ + ls:
        t.grad = None
    f(*os_, *ls).backward()
    for g, t in zip(got, os_ + ls):
        torch.testing.assert_close(g, t.grad, atol=0, rtol=0)


# -- bad input ------------------------------------------------------------------------------------------------------

def _good(S=2):
    return [dev(torch.randn(2, 5, 8)) for _ in range(S)], [dev(torch.randn(2, 5)) for _ in range(S)]


@pytest.mark.parametrize("mutate,err,match", [
    (lambda o, x: (o[0], x), TypeError, "outs must be a list or tuple"),
    (lambda o, x: ([], []), ValueError, "same number"),
    (lambda o, x: (o, x[:1]), ValueError, "same number"),
    (lambda o, x: ([o[0], "a"], x), TypeError, r"outs\[1\] must be a Tensor"),
    (lambda o, x: ([o[0], o[1][..., :4]], x), ValueError, r"outs\[1\] is \(2, 5, 4\)"),
    (lambda o, x: ([o[0], o[1].double()], x), ValueError, "shape and dtype"),
    (lambda o, x: (o, [x[0], x[1][:, :4]]), ValueError, r"lses\[1\] must have shape \(2, 5\)"),
    (lambda o, x: (o, [x[0], x[1].half()]), TypeError, "lses must be float32 or float64"),
    (lambda o, x: ([t.int() for t in o], x), TypeError, "outs must be"),
    (lambda o, x: ([t[0, 0] for t in o], [t[0] for t in x]), ValueError, r"\(\.\.\., L, D\)"),
    (lambda o, x: (o, [x[0], x[1].to("meta")]), RuntimeError, "one device"),
], ids=["tensor-not-list", "empty", "count", "not-tensor", "shape", "dtype", "lse-shape", "lse-dtype", "int",
        "rank", "device"])
def test_bad_input_raises_naming_the_argument(mutate, err, match):
    outs, lses = mutate(*_good())
    with pytest.raises(err, match=match):
        fastattn.merge_attention(outs, lses)


def test_fallback_above_the_kernels_head_dim():
    outs, lses = _good()
    outs = [dev(torch.randn(2, 5, 300)) for _ in range(2)]
    with pytest.warns(fastattn.FallbackWarning, match="head dim 300"):
        out, lse = fastattn.merge_attention(outs, lses)
    ref = reference.merge_attention(outs, lses)
    torch.testing.assert_close(out, ref[0]) and torch.testing.assert_close(lse, ref[1])
    assert math.isfinite(lse.sum().item())


def test_memory_and_traffic_at_a_ring_step():
    """FakeTensors at a ring-attention step (2 parts of 32 x 4096 rows of 128): the fused path moves the minimum plus
    the one copy that stacks the parts, saves only the stacked parts and the lses, and eager moves several times
    more."""
    from fastattn.perf import cases, memory

    case = cases.get("merge_attention", "model")[0]
    S, B, H, L, D = (case.dims[k] for k in "SBHLD")
    fused = memory.measure_call(case.make, case.fused, torch.float16, device=str(DEVICE))
    eager = memory.measure_call(case.make, case.eager, torch.float16, device=str(DEVICE))
    fwd_min, bwd_min = case.min_bytes(torch.float16)
    stack = 2 * S * B * H * L * (2 * D + 4)  # torch.stack reads and writes the outputs and the lses
    assert fused.traffic["fwd"] == fwd_min + stack and fused.traffic["bwd"] == bwd_min
    assert case.check_saved(case, fused.saved) is None
    assert sorted(s.role for s in fused.saved) == ["intermediate", "intermediate", "output"]
    assert eager.traffic["fwd"] + eager.traffic["bwd"] > 3 * (fused.traffic["fwd"] + fused.traffic["bwd"])
