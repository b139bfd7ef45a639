"""fastattn.varlen_attn (packed variable-length sequences) against per-sequence float64 attention, under the 2x rule.

Each case runs three ways (tests/harness.py): ``fastattn.reference.varlen_attn`` in float64 (checked first against a
plain loop over the sequences), the same reference in the low precision (eager) and ours, outputs, lse and every
gradient (dsinks included); the kernels must have run, each once per call whatever the number of sequences (the
attention kernels' VARLEN path). Combinations the kernels cannot serve (``varlen_ops.kernel_reason``: a head dim
above 256, ...) must announce the eager fallback with a ``FallbackWarning`` instead.
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from harness import three_way
from test_gradcheck import no_slow_mode_rerun  # noqa: F401 (a fixture)

import fastattn
from fastattn import _runtime, reference
from fastattn.ops import kvcache as kv_ops
from fastattn.ops import varlen as varlen_ops
from fastattn.ops._common import draw_seed
from fastattn.testing import kvcache_floors, varlen_modifier_floors

LSE = fastattn.AuxRequest(lse=True)


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


class Packed:
    """float64 masters of one packed batch: ``lq``/``lk`` the sequences' query and key lengths (``lk``: ``lq``, self
    attention), ``tail_*`` extra rows past the last sequence."""

    def __init__(self, lq, lk=None, H=4, Hkv=None, D=32, DV=None, tail_q=0, tail_k=0, strided=False):
        lk = lq if lk is None else lk
        self.strided = strided
        self.H, self.Hkv = H, Hkv or H
        self.cu_q, self.cu_k = offsets(lq), offsets(lk)
        self.max_q, self.max_k = max(lq, default=0), max(lk, default=0)
        self.q = randn(sum(lq) + tail_q, H, D)
        self.k = randn(sum(lk) + tail_k, self.Hkv, D)
        self.v = randn(sum(lk) + tail_k, self.Hkv, DV or D)

    def args(self, lowp):
        """Leaves in ``lowp``; ``strided``: stored heads-major with the rows innermost ((H, D, T) memory), as a
        transposed projection gives them, so no row or head is contiguous."""
        def leaf(t):
            t = t.to(lowp)
            if self.strided:
                t = t.permute(1, 2, 0).contiguous().permute(2, 0, 1)
            return t.detach().requires_grad_()

        return (*(leaf(t) for t in (self.q, self.k, self.v)), self.cu_q, self.cu_k, self.max_q, self.max_k)


def check(case: Packed, dtype, *, dropout_p=0.0, **kw):
    """Three-way run of ``case`` (forward, backward through out and lse); returns the three runs' results."""
    kw.setdefault("enable_gqa", case.H != case.Hkv)
    grads, masks, empties = {}, {}, {}

    def run(label, lowp):
        q, k, v, *rest = case.args(lowp)
        sinks = {}
        if kw.get("sinks") is not None:  # float32 beside half activations, float64 in the reference
            sinks["sinks"] = kw["sinks"].to(torch.float64 if label == "ref" else torch.float32).requires_grad_()
        args = {**kw, **sinks}
        if label == "ours":
            torch.manual_seed(7)
            out, lse = fastattn.varlen_attn(q, k, v, *rest, return_aux=LSE, dropout_p=dropout_p, **args)
        else:
            if dropout_p and "mask" not in masks:  # replay the kernels' mask: the seed ours draws after the reseed
                torch.manual_seed(7)
                masks["mask"] = varlen_ops.dropout_mask(draw_seed(dropout_p), case.cu_q, case.cu_k, case.H,
                                                        case.max_q, case.max_k, dropout_p)
            out, lse = reference.varlen_attn(q, k, v, *rest, return_aux=LSE, dropout_p=dropout_p,
                                             dropout_mask=masks.get("mask"), **args)
        if not grads:
            grads["out"] = randn(*out.shape)
            grads["lse"] = randn(*lse.shape).masked_fill(torch.isneginf(lse), 0.0)
        empty = torch.isneginf(lse)
        torch.autograd.backward((out, lse), (grads["out"].to(out.dtype), grads["lse"].to(lse.dtype)))
        empties[label] = empty
        result = {"out": out, "lse": lse.masked_fill(empty, 0.0), "dq": q.grad, "dk": k.grad, "dv": v.grad}
        return {**result, "dsinks": sinks["sinks"].grad} if sinks else result

    def floors(results):
        lowp = [t.to(dtype).double() for t in (case.q, case.k, case.v)]
        sinks = kw.get("sinks")
        return varlen_modifier_floors(
            *lowp, grads["out"], case.cu_q, case.cu_k, dtype=dtype, window_size=kw.get("window_size", (-1, -1)),
            scale=kw.get("scale"), grad_lse=grads["lse"], out=results["ours"]["out"], dropout_p=dropout_p,
            dropout_mask=masks.get("mask"), softcap=kw.get("softcap", 0.0), alibi_slopes=kw.get("alibi_slopes"),
            sinks=sinks.float().double() if sinks is not None else None)

    reason = varlen_ops.kernel_reason(case.q.to(dtype), case.k.to(dtype), case.v.to(dtype), kw.get("sinks"))
    _runtime._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if reason is None:  # each kernel once: one forward and one backward for all the sequences
            once = dict.fromkeys(varlen_ops.FORWARD_KERNELS + varlen_ops.BACKWARD_KERNELS, 1)
            if kw.get("sinks") is not None:  # the backward's lse with +inf past the last sequence
                once["_varlen_tail"] = 2
            res = three_way(run, dtype, kernels=once, floors=floors)
        else:  # the eager reference serves it, announced; ours is then eager itself
            res = three_way(run, dtype)
    fallbacks = [w for w in caught if issubclass(w.category, fastattn.FallbackWarning)]
    assert bool(fallbacks) == (reason is not None), [str(w.message) for w in fallbacks]
    assert torch.equal(empties["ours"], empties["ref"]), "lse is -inf on other rows than the reference's"
    res["reason"], res["empty"] = reason, empties["ours"]
    return res


# -- the oracle ------------------------------------------------------------------------------------------------------

def test_reference_is_per_sequence_attention():
    """reference.varlen_attn (a padded batch gathered on the device) against a plain loop over the sequences:
    each sequence's own attention, bottom-right window as an explicit mask, softcap, ALiBi and sinks written out;
    ragged lengths with 0 and 1, cross lengths, GQA, rows past the last sequence."""
    lq, lk = [3, 0, 7, 1, 4], [5, 2, 7, 0, 9]
    case = Packed(lq, lk, H=4, Hkv=2, D=8, tail_q=2, tail_k=3)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    sinks = torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64)
    kw = {"scale": 0.4, "window_size": (3, 1), "softcap": 2.0, "alibi_slopes": slopes, "sinks": sinks}
    out, lse = reference.varlen_attn(case.q, case.k, case.v, case.cu_q, case.cu_k, 7, 9, return_aux=LSE, **kw)
    assert out.shape == (17, 4, 8) and lse.shape == (4, 17)
    for b, (q0, k0, M, N) in enumerate(zip(case.cu_q.tolist(), case.cu_k.tolist(), lq, lk)):
        q = case.q[q0: q0 + M].transpose(0, 1)
        k, v = (t[k0: k0 + N].transpose(0, 1).repeat_interleave(2, 0) for t in (case.k, case.v))
        s = 2.0 * torch.tanh(0.4 * q @ k.mT / 2.0)
        d = torch.arange(N)[None, :] - torch.arange(M)[:, None] - (N - M)  # j - (i + N - M)
        s = s - slopes.double()[:, None, None] * d.abs()
        s = s.masked_fill(~((d >= -3) & (d <= 1)), float("-inf"))
        s = torch.cat([s, sinks[:, None, None].expand(4, M, 1)], -1)
        p = s.softmax(-1)[..., :N]
        torch.testing.assert_close(out[q0: q0 + M], (p @ v).transpose(0, 1), msg=f"out of sequence {b}")
        torch.testing.assert_close(lse[:, q0: q0 + M], s.logsumexp(-1), msg=f"lse of sequence {b}")
    assert (out[15:] == 0).all() and torch.isneginf(lse[:, 15:]).all()  # rows past the last sequence


def test_reference_seqused_and_pages_are_the_packed_keys():
    """seqused_k keeps each sequence's first keys; a shuffled paged layout of the same keys gives the same result."""
    lq, lk, used = [2, 3, 1], [16, 32, 16], [9, 32, 0]
    case = Packed(lq, lk, H=2, D=8)
    seqused = torch.tensor(used, dtype=torch.int32)
    got = reference.varlen_attn(case.q, case.k, case.v, case.cu_q, case.cu_k, 3, 32, seqused_k=seqused,
                                window_size=(-1, 0))
    short = offsets(used)
    idx = torch.cat([torch.arange(k0, k0 + n) for k0, n in zip(case.cu_k.tolist(), used)])
    want = reference.varlen_attn(case.q, case.k[idx], case.v[idx], case.cu_q, short, 3, 32, window_size=(-1, 0))
    torch.testing.assert_close(got, want)
    table = torch.tensor([[4, 0], [2, 5], [1, 3]], dtype=torch.int32)  # 16-key pages, shuffled, two unused
    k_pages, v_pages = torch.zeros(6, 16, 2, 8, dtype=torch.float64), torch.zeros(6, 16, 2, 8, dtype=torch.float64)
    for b, (k0, n) in enumerate(zip(case.cu_k.tolist(), lk)):
        for p in range(n // 16):
            k_pages[table[b, p]], v_pages[table[b, p]] = (t[k0 + 16 * p: k0 + 16 * (p + 1)] for t in (case.k, case.v))
    paged = reference.varlen_attn(case.q, k_pages, v_pages, case.cu_q, None, 3, 32, seqused_k=seqused,
                                  block_table=table, window_size=(-1, 0))
    torch.testing.assert_close(paged, want)


# -- packed training path: lengths, dtypes, GQA, windows -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ragged_lengths(dtype, causal):
    """Self-attention over sequences of 5, 1, 0, 37 and 13 tokens (a 0-length sequence and a 1-token one)."""
    res = check(Packed([5, 1, 0, 37, 13], H=2, D=32), dtype, window_size=(-1, 0) if causal else (-1, -1))
    assert res["launches"]["_attn_fwd"] == 1  # one launch for all five sequences (check: every kernel once)


def test_cross_lengths_bottom_right():
    """Queries and keys of different lengths per sequence (3/20, 17/5, 0/4, 1/0, 6/6): causal is bottom-right, so
    the first 12 queries of the 17/5 sequence and the query with no keys see nothing (0, lse -inf, no gradient)."""
    res = check(Packed([3, 17, 0, 1, 6], [20, 5, 4, 0, 6], H=2, D=16), torch.float16, window_size=(-1, 0))
    out, empty = res["ours"]["out"], res["empty"]
    assert (out[3:15] == 0).all() and empty[:, 3:15].all() and not empty[:, 15:20].any()
    assert (out[20] == 0).all() and empty[:, 20].all() and (res["ours"]["dq"][3:15] == 0).all()


def test_cross_lengths_full():
    check(Packed([3, 17, 1], [20, 5, 9], H=2, D=40, DV=24), torch.float16)


@pytest.mark.parametrize("H,Hkv", [(8, 2), (6, 1)], ids=["GQA4", "MQA6"])
def test_gqa(H, Hkv):
    check(Packed([9, 30, 2], [12, 30, 7], H=H, Hkv=Hkv, D=16), torch.bfloat16, window_size=(-1, 0))


@pytest.mark.parametrize("window", [(-1, 3), (-5, 0), (4, 0), (2, 2), (0, 0), (0, -1), (30, 30)],
                         ids=["right-only", "negative-left", "sliding", "band", "diagonal", "diagonal-and-after",
                              "wider-than-every-sequence"])
def test_window(window):
    """flash's windows, bottom-right per sequence, in the kernels."""
    res = check(Packed([7, 20, 1], [11, 20, 3], H=2, D=16), torch.float16, window_size=window)
    assert res["reason"] is None


def test_explicit_scale_and_value_head_dim():
    check(Packed([13, 4], [9, 21], H=3, D=24, DV=40), torch.float32, scale=0.3, window_size=(-1, 0))


def test_dropout_replays_the_kernels_mask():
    """One seed from torch's generator; each sequence's mask is drawn at its packed rows (varlen_ops.dropout_mask
    replays it), so sequences never share a draw; the reference given that mask is within the rule, gradients
    included."""
    res = check(Packed([6, 19, 3], H=2, D=16), torch.float32, dropout_p=0.3, window_size=(-1, 0))
    assert res["reason"] is None


def test_lse_layout_and_gradient():
    """lse is (H, T_q) fp32, torch's layout; it is differentiable (the three-way runs backpropagate through it)."""
    case = Packed([4, 9], H=3, D=16)
    q, k, v, *rest = case.args(torch.float16)
    out, lse = fastattn.varlen_attn(q, k, v, *rest, return_aux=LSE)
    assert out.shape == (13, 3, 16) and out.dtype == torch.float16
    assert lse.shape == (3, 13) and lse.dtype == torch.float32
    assert fastattn.varlen_attn(q, k, v, *rest, return_aux=fastattn.AuxRequest(lse=False)).shape == out.shape


def test_rows_past_the_last_sequence_are_zero():
    res = check(Packed([5, 8], [6, 8], H=2, D=16, tail_q=3, tail_k=2), torch.float16)
    assert (res["ours"]["out"][13:] == 0).all() and res["empty"][:, 13:].all()
    assert (res["ours"]["dq"][13:] == 0).all() and (res["ours"]["dk"][14:] == 0).all()


def test_strided_inputs():
    """q, k, v stored (H, D, T) (no row or head contiguous), GQA, causal, ragged with a 0 and a 1: read in place
    by the kernels, every gradient within the rule."""
    check(Packed([9, 0, 1, 26], H=4, Hkv=2, D=24, strided=True), torch.float16, window_size=(-1, 0))


def test_strided_inputs_are_read_in_place():
    """q, k, v as views of one fused (T, 3, H, D) projection and a transposed value: the same bits as contiguous."""
    torch.manual_seed(1)
    cu = offsets([7, 1, 12])
    qkv = torch.randn(20, 3, 2, 16, dtype=torch.float16)
    q, k = qkv[:, 0], qkv[:, 1]
    v = torch.randn(20, 16, 2, dtype=torch.float16).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    a = fastattn.varlen_attn(q, k, v, cu, cu, 12, 12, window_size=(-1, 0))
    b = fastattn.varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, 12, 12, window_size=(-1, 0))
    assert torch.equal(a, b)


def test_empty_batch_and_empty_tensors():
    q = torch.randn(0, 2, 16)
    cu = torch.zeros(1, dtype=torch.int32)
    out, lse = fastattn.varlen_attn(q, q, q, cu, cu, 0, 0, return_aux=LSE)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
    q = torch.randn(3, 2, 16)  # N = 0 sequences: every row is past the last one
    out = fastattn.varlen_attn(q, q, q, cu, cu, 0, 0)
    assert (out == 0).all()


# -- extras and the fallback -----------------------------------------------------------------------------------------

def test_softcap_alibi_sinks():
    """fastattn's extras, forward and every gradient, dsinks included (the sinks join the denominator)."""
    case = Packed([6, 11, 1], [9, 11, 4], H=2, D=16)
    slopes = torch.tensor([[0.5, 0.25], [0.125, 0.0625], [1.0, 0.5]])
    res = check(case, torch.bfloat16, softcap=3.0, alibi_slopes=slopes, sinks=torch.tensor([0.5, -0.25]),
                window_size=(-1, 0))
    assert res["ours"]["dsinks"].abs().min() > 0


def test_extras_gqa_window_ragged_tail():
    """Softcap, per-head ALiBi slopes ``(H,)`` (one row for every sequence), sinks and a sliding window with GQA over
    ragged lengths with 0 and 1 (a query with no key: its sink alone, lse = sink) and rows past the last sequence
    (0, lse -inf, and no share of dsinks)."""
    case = Packed([6, 0, 1, 1, 23], [9, 4, 0, 1, 23], H=4, Hkv=2, D=16, tail_q=2, tail_k=1)
    res = check(case, torch.float16, softcap=5.0, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]),
                sinks=torch.tensor([0.5, -0.25, 1.0, 0.0]), window_size=(7, 0))
    assert (res["ours"]["out"][31:] == 0).all() and res["empty"][:, 31:].all() and not res["empty"][:, :31].any()
    assert torch.isfinite(res["ours"]["dsinks"]).all() and res["ours"]["dsinks"].abs().min() > 0


def test_dropout_with_every_extra():
    """Dropout (the heavy kernels) with GQA, a window, softcap, ALiBi and sinks; every gradient, dsinks included."""
    check(Packed([5, 1, 0, 18], [7, 3, 2, 18], H=4, Hkv=1, D=16), torch.bfloat16, dropout_p=0.2, softcap=4.0,
          alibi_slopes=torch.tensor([[0.5, 0.25, 0.125, 0.0625]] * 4), sinks=torch.tensor([0.3, -1.0, 0.2, 0.0]),
          window_size=(6, 2))


def test_dropout_mask_is_drawn_at_the_packed_rows():
    """The kernels' mask of sequence b is the packed draw at rows cu_seq_q[b] + i, cu_seq_k[b] + j: shifting the
    sequences within the packed tensors changes it (no per-sequence stream), the same packing repeats it."""
    cu_a, cu_b = offsets([4, 9]), offsets([5, 9])
    seed = torch.tensor(11)
    a = varlen_ops.dropout_mask(seed, cu_a, cu_a, 2, 9, 9, 0.5)
    assert torch.equal(a, varlen_ops.dropout_mask(seed, cu_a, cu_a, 2, 9, 9, 0.5))
    b = varlen_ops.dropout_mask(torch.tensor(11), cu_b, cu_b, 2, 9, 9, 0.5)
    assert not torch.equal(a[1], b[1])
    full = fastattn.ops.attention.dropout_keep_mask(11, (1, 2, 13, 13), 0.5, torch.device("cpu"))[0]
    assert torch.equal(a[1], full[:, 4:13, 4:13]) and not a[0, :, 4:].any() and not a[0, :, :, 4:].any()


def test_head_dim_above_the_kernels_falls_back():
    """A head dim above 256 has no kernel: the eager reference serves it, announced once."""
    res = check(Packed([3, 1], H=1, D=264), torch.float32, window_size=(-1, 0))
    assert "head dim 264" in res["reason"]


def test_packed_path_reads_no_offsets_on_the_host(monkeypatch):
    """Forward and backward (sinks and dropout on) never bring the offsets to the host: no sync on a GPU, so no
    check of their values either (those run for CPU tensors only, here switched off as on a GPU)."""
    monkeypatch.setattr(varlen_ops, "_host_values_ok", lambda t: False)
    case = Packed([3, 0, 8], H=2, D=16, tail_q=1)
    q, k, v, cu_q, cu_k, mq, mk = case.args(torch.float32)
    storages = {cu_q.untyped_storage().data_ptr(), cu_k.untyped_storage().data_ptr()}
    reads = []
    for name in ("tolist", "item", "__int__", "__index__", "__bool__", "numpy"):
        real = getattr(torch.Tensor, name)

        def spy(t, *a, _real=real, _name=name, **kw):
            if t.untyped_storage().data_ptr() in storages:
                reads.append(_name)
            return _real(t, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    sinks = torch.zeros(2, requires_grad=True)
    out, lse = fastattn.varlen_attn(q, k, v, cu_q, cu_k, mq, mk, window_size=(-1, 0), sinks=sinks, dropout_p=0.1,
                                    return_aux=LSE)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert not reads, reads
    assert q.grad is not None and sinks.grad is not None


@pytest.mark.parametrize("with_sinks", [False, True], ids=["plain", "sinks"])
def test_scratch_is_the_launchers(monkeypatch, with_sinks):
    """What the memory tracer adds for the backward (fastattn.perf.cases_kv, from varlen_ops.backward_scratch_bytes)
    is what the launchers allocate besides their results (the copy of lse with sinks counted too); the forward
    allocates nothing else."""
    from test_cli import _Allocations, _scratch_of

    from fastattn.perf import cases_kv

    monkeypatch.setattr(_Allocations, "FACTORIES", _Allocations.FACTORIES + ("aten::clone",))
    case = Packed([5, 0, 9], H=2, D=16, tail_q=2)
    q, k, v, cu_q, cu_k, mq, mk = (t.detach() if isinstance(t, torch.Tensor) else t for t in case.args(torch.float32))
    sinks = torch.zeros(2) if with_sinks else None
    fwd, (out, lse) = _scratch_of(varlen_ops._varlen_forward, q, k, v, cu_q, cu_k, mq, mk, 0.25, -1, 0, 0.0, None,
                                  sinks, 0.0, None)
    args = (torch.randn_like(out), q, k, v, out, lse, None, cu_q, cu_k, None, sinks, None, mq, mk, 0.25, -1, 0, 0.0,
            0.0)
    bwd, _ = _scratch_of(varlen_ops._varlen_backward, *args[:9], mq, mk, 0.25, -1, 0, 0.0, None, sinks, 0.0, None)
    assert fwd == 0 and "fastattn::varlen_attention" not in cases_kv.SCRATCH
    assert bwd == cases_kv.SCRATCH["fastattn::varlen_attention_backward"](args, {}) >= lse.numel() * 4  # delta


def test_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.setattr(_runtime, "_INTERPRETING", False)
    case = Packed([3, 4], H=2, D=8)
    _runtime._warned.clear()
    with pytest.warns(fastattn.FallbackWarning, match="interpreter is off"), fastattn.record_launches() as launches:
        out = fastattn.varlen_attn(*case.args(torch.float32), window_size=(-1, 0))
    assert not launches
    torch.testing.assert_close(out, reference.varlen_attn(*case.args(torch.float32), window_size=(-1, 0)))


# -- seqused_k and paged keys (inference) ----------------------------------------------------------------------------

def _cache_check(case: Packed, used, dtype, *, table=None, pages=None, **kw):
    seqused = torch.tensor(used, dtype=torch.int32)
    q = case.q.to(dtype)
    key, value = (case.k.to(dtype), case.v.to(dtype)) if table is None else (p.to(dtype) for p in pages)
    cu_k = case.cu_k if table is None else None
    with torch.no_grad(), fastattn.record_launches() as launches:
        out, lse = fastattn.varlen_attn(q, key, value, case.cu_q, cu_k, case.max_q, case.max_k, seqused_k=seqused,
                                        block_table=table, return_aux=LSE, **kw)
        eager = reference.varlen_attn(q, key, value, case.cu_q, cu_k, case.max_q, case.max_k, seqused_k=seqused,
                                      block_table=table, return_aux=LSE, **kw)
        ref = reference.varlen_attn(case.q, *(t.double() for t in (key, value)), case.cu_q, cu_k, case.max_q,
                                    case.max_k, seqused_k=seqused, block_table=table, return_aux=LSE, **kw)
    assert launches[varlen_ops.PAGED_KERNELS[0]] == sum(n > 0 for n in torch.diff(case.cu_q).tolist())
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref[1]))
    floors = {"out": 0.0, "lse": 0.0}
    for b, (q0, q1) in enumerate(zip(case.cu_q.tolist(), case.cu_q.tolist()[1:])):
        k0 = case.cu_k[b].item()
        keys, values = (t[k0: k0 + used[b]].to(dtype).double() for t in (case.k, case.v))
        k_cache = case.k.to(dtype)[k0: k0 + case.max_k][None]
        sched = kv_ops.launch_schedule(q[q0:q1][None], k_cache, k_cache, None, 0)
        f = kvcache_floors(q[q0:q1][None].double(), [keys], [values], dtype=dtype, splits=sched.splits,
                           block_n=sched.block_n, **{n: kw[n] for n in ("softcap", "alibi_slopes", "scale") if n in kw})
        floors = {n: max(floors[n], f[n]) for n in floors}
    from fastattn.testing import assert_close_to_reference
    assert_close_to_reference(out, eager[0], ref[0], dtype, floor=floors["out"])
    live = ~torch.isneginf(ref[1])
    assert_close_to_reference(lse[live], eager[1][live], ref[1][live], torch.float32, name="lse", floor=floors["lse"])
    return out


def test_seqused_k_runs_the_cache_kernel():
    """Only the first seqused_k[b] keys of each packed sequence take part (0 included), bottom-right causal, with
    softcap and ALiBi (the KV-cache kernel has both)."""
    case = Packed([2, 5, 1], [40, 16, 70], H=4, Hkv=2, D=32)
    _cache_check(case, [33, 16, 0], torch.float16, window_size=(-1, 0), enable_gqa=True, softcap=4.0,
                 alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]))


def test_paged_keys_equal_the_dense_ones():
    """A shuffled block table over 16-key pages gives the bits of the same keys read densely."""
    lq, lk, used = [3, 1], [48, 32], [41, 20]
    case = Packed(lq, lk, H=2, D=32)
    table = torch.tensor([[5, 0, 3], [2, 4, 1]], dtype=torch.int32)
    pages = [torch.zeros(6, 16, 2, 32, dtype=torch.float64) for _ in range(2)]
    for b, (k0, n) in enumerate(zip(case.cu_k.tolist(), lk)):
        for p in range(n // 16):
            for dst, src in zip(pages, (case.k, case.v)):
                dst[table[b, p]] = src[k0 + 16 * p: k0 + 16 * (p + 1)]
    paged = _cache_check(case, used, torch.float16, table=table, pages=pages, window_size=(-1, 0))
    dense = _cache_check(case, used, torch.float16, window_size=(-1, 0))
    assert torch.equal(paged, dense)


def test_cache_paths_are_inference_only():
    case = Packed([2, 3], H=2, D=16)
    q, k, v, cu_q, cu_k, mq, mk = case.args(torch.float32)
    used = torch.tensor([2, 3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="inference-only"):
        fastattn.varlen_attn(q, k, v, cu_q, cu_k, mq, mk, seqused_k=used)
    with torch.no_grad():
        fastattn.varlen_attn(q, k, v, cu_q, cu_k, mq, mk, seqused_k=used)


# -- interfaces ------------------------------------------------------------------------------------------------------

def test_signature_is_torchs_plus_keyword_extras():
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    ours = inspect.signature(fastattn.varlen_attn).parameters
    theirs = inspect.signature(varlen.varlen_attn).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name
    extras = list(ours)[len(theirs):]
    assert extras == ["softcap", "alibi_slopes", "sinks", "dropout_p"]
    assert all(ours[n].kind == inspect.Parameter.KEYWORD_ONLY for n in extras)
    assert fastattn.AuxRequest is varlen.AuxRequest


def test_torch_compile_fullgraph():
    case = Packed([5, 0, 9], H=2, D=16)

    def step(q, k, v, cu_q, cu_k):
        out, lse = fastattn.varlen_attn(q, k, v, cu_q, cu_k, 9, 9, window_size=(-1, 0), return_aux=LSE)
        return (out.float() * 2).sum() + lse.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    q, k, v, cu_q, cu_k, *_ = case.args(torch.float16)
    with fastattn.record_launches() as launches:
        loss = compiled(q, k, v, cu_q, cu_k)
        loss.backward()
    assert launches["_attn_fwd"] == 1 and launches["_attn_bwd_dq"] == 1  # one launch for the three sequences
    q2, k2, v2, *_ = case.args(torch.float16)
    want = step(q2, k2, v2, cu_q, cu_k)
    want.backward()
    assert torch.equal(loss, want)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.usefixtures("no_slow_mode_rerun")
def test_gradcheck_float64_through_the_kernels():
    """torch.autograd.gradcheck in float64 (the interpreter runs the kernels in float64): out and lse, every input,
    ragged lengths with a 0, causal, GQA."""
    case = Packed([3, 0, 4], [5, 1, 4], H=2, Hkv=1, D=8)
    q, k, v, *rest = case.args(torch.float64)

    def f(q, k, v):
        return fastattn.varlen_attn(q, k, v, *rest, window_size=(-1, 0), enable_gqa=True, return_aux=LSE)

    with fastattn.record_launches() as launches:
        assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    assert launches["_attn_fwd"] > 0 and launches["_attn_bwd_dq"] > 0


def _args():
    case = Packed([3, 5], H=4, Hkv=2, D=16)
    q, k, v, cu_q, cu_k, mq, mk = case.args(torch.float32)
    return {"query": q, "key": k, "value": v, "cu_seq_q": cu_q, "cu_seq_k": cu_k, "max_q": mq, "max_k": mk,
            "enable_gqa": True}


def _cu(*values):
    return torch.tensor(values, dtype=torch.int32)


BAD = {
    "cu-dtype": (lambda a: a.update(cu_seq_q=a["cu_seq_q"].long()), ValueError, "cu_seq_q must be int32"),
    "cu-rank": (lambda a: a.update(cu_seq_k=a["cu_seq_k"][None]), ValueError, r"cu_seq_k must be int32 of shape"),
    "cu-length": (lambda a: a.update(cu_seq_k=_cu(0, 8)), ValueError, "cu_seq_k must have cu_seq_q's length 3"),
    "cu-start": (lambda a: a.update(cu_seq_q=_cu(1, 3, 8)), ValueError, "cu_seq_q must start at 0"),
    "cu-decreasing": (lambda a: a.update(cu_seq_k=_cu(0, 6, 5)), ValueError, "cu_seq_k must be non-decreasing"),
    "cu-past-q": (lambda a: a.update(cu_seq_q=_cu(0, 3, 9)), ValueError, "cu_seq_q ends at 9, past the 8 rows"),
    "cu-past-k": (lambda a: a.update(cu_seq_k=_cu(0, 3, 9)), ValueError, "cu_seq_k ends at 9, past the 8 rows"),
    "cu_k-none": (lambda a: a.update(cu_seq_k=None), ValueError, "cu_seq_k is needed"),
    "max_q-small": (lambda a: a.update(max_q=4), ValueError, "max_q = 4 is smaller than sequence 1's length 5"),
    "max_k-small": (lambda a: a.update(max_k=2), ValueError, "max_k = 2 is smaller than sequence 1's length 5"),
    "max_q-type": (lambda a: a.update(max_q=5.0), TypeError, "max_q must be an int"),
    "heads": (lambda a: a.update(enable_gqa=False), ValueError, "same number of heads unless enable_gqa"),
    "gqa-ratio": (lambda a: a.update(query=torch.randn(8, 3, 16)), ValueError, r"query's heads \(3\) must be a "),
    "query-rank": (lambda a: a.update(query=a["query"][None]), ValueError, r"query must be \(T_q, H, D\)"),
    "head-dim": (lambda a: a.update(key=a["key"][..., :8]), ValueError, "key must have query's head dim 16"),
    "kv-length": (lambda a: a.update(value=a["value"][:7]), ValueError, "value key's leading dims"),
    "dtype": (lambda a: a.update(value=a["value"].double()), TypeError, "value must have query's dtype"),
    "int-query": (lambda a: a.update(query=torch.ones(8, 4, 16, dtype=torch.int32)), TypeError, "query must have"),
    "device": (lambda a: a.update(cu_seq_k=a["cu_seq_k"].to("meta")), RuntimeError, "one device"),
    "window": (lambda a: a.update(window_size=(4,)), TypeError, "window_size must be two ints"),
    "window-float": (lambda a: a.update(window_size=(4.0, 0)), TypeError, "window_size must be two ints"),
    "scale": (lambda a: a.update(scale=float("nan")), ValueError, "scale must be a finite float"),
    "return_aux": (lambda a: a.update(return_aux=True), TypeError, "return_aux must be None or"),
    "num_splits": (lambda a: a.update(num_splits=-1), ValueError, "num_splits must be"),
    "softcap": (lambda a: a.update(softcap=-1.0), ValueError, "softcap must be"),
    "dropout": (lambda a: a.update(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    "alibi": (lambda a: a.update(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes must be float32"),
    "sinks": (lambda a: a.update(sinks=torch.ones(2)), ValueError, r"sinks must be float32 .* of shape \(4,\)"),
    "seqused-dtype": (lambda a: a.update(seqused_k=torch.tensor([1, 2])), ValueError, "seqused_k must be int32"),
    "seqused-range": (lambda a: a.update(seqused_k=_cu(4, 2)), ValueError, r"seqused_k\[0\] = 4 is outside \[0, 3\]"),
    "table-without-seqused": (lambda a: a.update(block_table=_cu(0, 1).view(2, 1), key=torch.randn(2, 16, 2, 16),
                                                 value=torch.randn(2, 16, 2, 16)), ValueError, "needs seqused_k"),
    "table-shape": (lambda a: a.update(block_table=_cu(0, 1), seqused_k=_cu(3, 5), key=torch.randn(2, 16, 2, 16),
                                       value=torch.randn(2, 16, 2, 16)), ValueError, "block_table must be int32"),
    "table-page": (lambda a: a.update(block_table=_cu(0, 7).view(2, 1), seqused_k=_cu(3, 5),
                                      key=torch.randn(2, 16, 2, 16), value=torch.randn(2, 16, 2, 16)), ValueError,
                   "block_table row 1 names pages outside key's 2 pages"),
    "paged-rank": (lambda a: a.update(block_table=_cu(0, 1).view(2, 1), seqused_k=_cu(3, 5)), ValueError,
                   "key must be .pages, page_size, H_kv, D."),
    "cache-dropout": (lambda a: a.update(seqused_k=_cu(3, 5), dropout_p=0.1), ValueError, "no dropout_p"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_naming_the_argument(name):
    mutate, err, match = BAD[name]
    args = _args()
    mutate(args)
    with torch.no_grad(), pytest.raises(err, match=match):
        fastattn.varlen_attn(**args)


def test_alibi_slopes_that_require_grad_raise():
    """The kernels compute no gradient for the slopes: with grad mode on, slopes that require grad raise (a silent
    zero gradient would be wrong); under no_grad, or detached, they run."""
    args = _args()
    args["alibi_slopes"] = torch.ones(4).requires_grad_()
    with pytest.raises(ValueError, match="alibi_slopes requires grad"):
        fastattn.varlen_attn(**args)
    with torch.no_grad():
        fastattn.varlen_attn(**args)


def test_offsets_are_checked_on_the_fallback_path_too(monkeypatch):
    monkeypatch.setattr(_runtime, "_INTERPRETING", False)
    args = _args()
    args["cu_seq_q"] = _cu(0, 5, 3)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="cu_seq_q must be non-decreasing"):
        warnings.simplefilter("ignore", fastattn.FallbackWarning)
        fastattn.varlen_attn(**args)


def test_scale_default_is_inverse_sqrt_head_dim():
    case = Packed([4, 6], H=2, D=16)
    a = fastattn.varlen_attn(*case.args(torch.float32))
    b = fastattn.varlen_attn(*case.args(torch.float32), scale=1 / math.sqrt(16))
    assert torch.equal(a, b)
