"""The kernels' VARLEN path (``fastattn.ops.attention.varlen_forward`` / ``varlen_backward``: packed variable-length
sequences, each its own attention, bottom-right aligned) against per-sequence attention.

Three ways (tests/harness.py): the float64 reference and eager reference in the low precision run each sequence
alone and concatenate; ours runs the packed launchers (the Triton kernels, counted). Outputs, lse and every gradient
(dsinks included) under the rule of fastattn.testing, the floor the worst of the sequences' attention floors.
"""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, dev, three_way

from fastattn import reference
from fastattn.ops import attention as attn_ops
from fastattn.testing import attention_floors

KERNELS = attn_ops.FORWARD_KERNELS + attn_ops.BACKWARD_KERNELS


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def check_packed(lq, lk, *, H=4, HKV=2, D=32, DV=32, dtype=torch.float16, window_size=(-1, -1), softcap=0.0,
                 alibi=None, sinks=None, dropout_p=0.0):
    cu_q, cu_k = _cu(lq), _cu(lk)
    Tq, Tk = int(cu_q[-1]), int(cu_k[-1])
    q, k, v = torch.randn(Tq, H, D, dtype=torch.float64), torch.randn(Tk, HKV, D, dtype=torch.float64), \
        torch.randn(Tk, HKV, DV, dtype=torch.float64)
    do, dlse = torch.randn(Tq, H, DV, dtype=torch.float64), torch.randn(H, Tq, dtype=torch.float64)
    seed = 1234
    keep = attn_ops.dropout_keep_mask(seed, (1, H, Tq, Tk), dropout_p, DEVICE)[0] if dropout_p else None
    scale = D ** -0.5
    slopes = dev(alibi)
    kw = {"scale": scale, "window_size": window_size, "softcap": softcap, "alibi_slopes": slopes}
    empty = {}

    def seqs():
        for b in range(len(lq)):
            yield b, slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))

    def run(label, lowp):
        ts = [dev(t, lowp) for t in (q, k, v)]
        sk = dev(sinks, lowp)
        if label == "ours":
            out, lse = attn_ops.varlen_forward(*ts, dev(cu_q), dev(cu_k), max(lq), max(lk), sinks=sk,
                                               dropout_p=dropout_p, seed=seed, **kw)
            finite = torch.isfinite(lse)
            dq, dk, dv, dsinks = attn_ops.varlen_backward(
                dev(do, lowp), *ts, out, lse, dev(cu_q), dev(cu_k), max(lq), max(lk), sinks=sk, dropout_p=dropout_p,
                seed=seed, dlse=torch.where(finite, dev(dlse), 0).float(), **kw)
            empty[label] = ~finite
            res = {"out": out, "lse": torch.where(finite, lse, 0), "dq": dq, "dk": dk, "dv": dv}
            return {**res, "dsinks": dsinks} if sinks is not None else res
        leaves = [t.detach().requires_grad_() for t in (*ts, *([sk] if sk is not None else []))]
        outs, lses = [], []
        for b, rq, rk in seqs():
            o, lse = reference.scaled_dot_product_attention(
                leaves[0][rq].transpose(0, 1), leaves[1][rk].transpose(0, 1), leaves[2][rk].transpose(0, 1),
                dropout_p=dropout_p, enable_gqa=True, return_lse=True, sinks=leaves[3] if sk is not None else None,
                dropout_mask=keep[:, rq, rk] if keep is not None else None,
                **{**kw, "alibi_slopes": slopes if slopes is None or slopes.dim() == 1 else slopes[b]})
            outs.append(o.transpose(0, 1))
            lses.append(lse)
        out, lse = torch.cat(outs), torch.cat(lses, -1)
        finite = torch.isfinite(lse)
        empty[label] = ~finite
        lse = torch.where(finite, lse, 0)
        ((out * dev(do, lowp)).sum() + (lse * dev(dlse, lse.dtype)).sum()).backward()
        res = {"out": out, "lse": lse, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
        return {**res, "dsinks": leaves[3].grad} if sk is not None else res

    def floors(results):
        worst: dict[str, float] = {"dsinks": 0.0}
        for b, rq, rk in seqs():
            if rq.stop == rq.start:
                continue
            f = attention_floors(*(t.to(dtype).double()[r].transpose(0, 1) for t, r in ((q, rq), (k, rk), (v, rk))),
                                 do[rq].transpose(0, 1), dtype=dtype, enable_gqa=True, dropout_p=dropout_p,
                                 dropout_mask=keep[:, rq, rk].cpu() if keep is not None else None,
                                 grad_lse=torch.where(empty["ref"][:, rq].cpu(), 0.0, dlse[:, rq]),
                                 out=results["ours"]["out"][rq].transpose(0, 1).cpu(), window_size=window_size,
                                 softcap=softcap, alibi_slopes=alibi if alibi is None or alibi.dim() == 1 else alibi[b],
                                 sinks=sinks.to(dtype).double() if sinks is not None else None, scale=scale)
            # dsinks sums every sequence's rows: its floor counts R rows of sums; all T_q rows in any order
            share = f.pop("dsinks", 0.0) * Tq / (rq.stop - rq.start)
            worst = {**{n: max(worst.get(n, 0.0), v) for n, v in f.items()}, "dsinks": worst["dsinks"] + share}
        return worst

    results = three_way(run, dtype, kernels=KERNELS, floors=floors)
    assert torch.equal(empty["ours"], empty["ref"])
    return results


@pytest.mark.parametrize("lq,lk", [([5, 1, 37, 0, 20], [9, 3, 37, 4, 0]), ([64], [64]), ([3, 70], [80, 2])],
                         ids=["ragged", "one", "cross"])
def test_packed_plain(lq, lk):
    check_packed(lq, lk)


def test_packed_causal_window_softcap_alibi_sinks():
    check_packed([13, 40, 1, 27], [20, 40, 9, 7], window_size=(11, 0), softcap=4.0, alibi=(torch.rand(4, 4) * 0.3)
                 .float(), sinks=torch.randn(4, dtype=torch.float64))


def test_packed_alibi_per_head():
    """Slopes ``(H,)``: every sequence reads the same row (stride 0 over the sequences, not past the slopes)."""
    check_packed([6, 1, 30], [6, 9, 30], window_size=(-1, 0), alibi=torch.tensor([0.5, 0.25, 0.125, 0.0625]))


def test_packed_dropout_bf16():
    check_packed([17, 33], [25, 9], dtype=torch.bfloat16, window_size=(-1, 0), dropout_p=0.25, HKV=4)
