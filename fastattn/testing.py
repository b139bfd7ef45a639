"""Check a fused op against eager PyTorch the way fastattn checks itself.

**The rule.** Compute a float64 reference ``ref`` and run eager PyTorch in the low precision (``eager``); the fused
result ``ours`` in that precision passes when, in the max norm,

    err(ours) <= 2 * err(eager) + u(dtype) * max|ref| + floor,          err(t) = max |t - ref|

``u(dtype) * max|ref|`` is one rounding of the result. Twice eager's error covers the roundings the fused op
shares with eager PyTorch (products and sums in fp32, operands rounded to fp16/bf16). The ``floor`` covers the
ones it does not share -- where eager happens to be (nearly) exact there, twice its error says nothing: a gradient
that cancels to zero, torch's CPU kernels summing fp32 data in float64, a recomputation eager never makes. Each
op's floor function below derives it from the kernels' arithmetic, term by term, evaluated on the actual data in
float64 (first order, worst case over every order of summation, so it holds on any CPU or GPU). It is never a
constant chosen to pass; a kernel with a real defect (a dropped key, a wrong scale or eps, a misplaced mask)
misses by orders of magnitude more, and ``tests/test_numerics.py`` shows the rule rejecting such results.

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

import math
from collections.abc import Sequence

import torch
from torch import Tensor

UNIT_ROUNDOFF = {
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
}

__all__ = ["UNIT_ROUNDOFF", "assert_close_to_reference", "attention_floors", "batch_norm_floors", "blocked_terms",
           "kvcache_floors", "max_err", "merge_floors", "norm_floors", "patch_embed_floors", "ring_attention_floors",
           "rule_bound", "tree_sum_terms", "varlen_floors", "varlen_modifier_floors"]


def max_err(x: Tensor, ref: Tensor) -> float:
    """``max |x - ref|`` in float64 (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    return (x.detach().double() - ref.detach().double()).abs().max().item()


def rule_bound(eager: Tensor, ref: Tensor, dtype: torch.dtype, floor: float = 0.0, factor: float = 2.0) -> float:
    """The largest error the rule allows: ``factor * err(eager) + u(dtype) * max|ref| + floor``."""
    top = ref.detach().abs().max().item() if ref.numel() else 0.0
    return factor * max_err(eager, ref) + UNIT_ROUNDOFF[dtype] * top + floor


def assert_close_to_reference(ours: Tensor, eager: Tensor, ref: Tensor, dtype: torch.dtype, *, name: str = "output",
                              floor: float = 0.0, factor: float = 2.0) -> None:
    """Raise ``AssertionError`` unless ``err(ours) <= factor * err(eager) + u(dtype) * max|ref| + floor``.

    ``ref`` is the float64 reference, ``eager`` eager PyTorch in ``dtype``, ``floor`` the fused computation's own
    rounding bound (the ``*_floors`` functions here give it per output). ``ours`` must have ``ref``'s shape and be
    finite wherever ``ref`` is."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ours.detach().double()).all() or not torch.isfinite(ref).all(), f"{name}: non-finite values"
    e_ours, bound = max_err(ours, ref), rule_bound(eager, ref, dtype, floor, factor)
    assert e_ours <= bound, (f"{name}: max error {e_ours:.3e} > {bound:.3e} = {factor} x eager "
                             f"{max_err(eager, ref):.3e} + one rounding + floor {floor:.3e} ({dtype})")


def _roundoffs(dtype: torch.dtype) -> tuple[float, float, float]:
    """(u of the kernels' arithmetic, u of results stored in ``dtype``, u of tensor-core operands cast to ``dtype``:
    0 where the cast is exact, i.e. for fp32 and fp64)."""
    compute = UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    return compute, UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[dtype] if dtype in (torch.float16, torch.bfloat16) else 0.0


def tree_sum_terms(n: int) -> int:
    """The ``k`` of ``k u sum|x|``, the error bound of a kernel's ``tl.sum`` over ``n`` values of a row (see the
    module docstring): ``ceil(log2 n) + 32``, plus one per 2048-column chunk beyond the first (the looped paths)."""
    return math.ceil(math.log2(max(n, 2))) + 32 + max(0, math.ceil(n / 2048) - 1)


def blocked_terms(n: int) -> int:
    """The ``k`` of ``k u sum|a b|`` for a kernel's GEMM reduction over ``n`` terms: ``tl.dot`` tiles of at most 64
    summed in any order, at least 16 per tile, the tiles accumulated in sequence (at most ``n - 1`` in all)."""
    return min(max(n - 1, 0), 64 + math.ceil(n / 16))


def _top(t: Tensor) -> float:
    return t.max().item() if t.numel() else 0.0


def _sum_to(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Sum a broadcast result back to ``shape`` (the gradient of an expanded input)."""
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead else t
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.size(i) != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------


def attention_floors(query: Tensor, key: Tensor, value: Tensor, grad_out: Tensor, *, dtype: torch.dtype,
                     attn_mask: Tensor | None = None, is_causal: bool = False, causal_offset: int = 0,
                     scale: float | None = None, enable_gqa: bool = False, dropout_p: float = 0.0,
                     dropout_mask: Tensor | None = None, grad_lse: Tensor | None = None,
                     out: Tensor | None = None, lse_err: float | None = None, partials: int = 0,
                     window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: Tensor | None = None, sinks: Tensor | None = None) -> dict[str, float]:
    """Floors of ``out``, ``lse``, ``dq``, ``dk``, ``dv``, ``dmask``, ``dsinks`` of fused attention
    (kernels/attention.py).

    Shared with eager, so not in the floor: the fp32 dots and sums of q k^T, p v, dO v^T, dS k, dS^T q, p^T dO (torch's
    SDPA forms the same products in fp32) and the rounding of results to the input dtype. Fused only, per query row
    i and key j (natural-log units):

    - the tensor-core operands: p (and dS) rounded to fp16/bf16 for the P V, P^T dO, dS K and dS^T Q products
      (torch's CPU SDPA may keep them in fp32): ``u_op sum_j p'_ij |v_j|`` in out, likewise in dv, dq, dk, with
      ``u_op = u(dtype)`` for fp16/bf16 and 0 for fp32 (an exact cast);
    - the score's own error ``e_ij``: ``2u |s_ij|`` (``scale log2 e`` rounded, the product); softcapped (``s = c t``,
      ``t = tanh(y)``, ``y = scale q.k / c``) as :func:`kvcache_floors`: ``c ((1 - t^2) 2u |y| + tanh's error
      (_tanh_abs_error)) + 2u |s|``; ALiBi adds ``2u |bias_ij|`` (the slope times log2 e, the product) and the
      subtraction's ``u |s_ij|``; a sink is one more column with ``2u |sink|`` (its base-2 value) and value 0;
    - online softmax in base 2: exp2's ``4u``, the rescaling of the running sums by ``exp2(m_old - m_new)`` (two
      roundings per key block of at least 16 keys, ``nb = ceil(N / 16)``) and the final ``1 / l`` and product:
      ``err(out_i) = sum_j p'_ij f_ij |v_j - o_i| + (2 nb + 2) u sum_j p'_ij |v_j|`` with ``f_ij = e_ij + 4u``
      (p' with dropout's mask and scale; the sink column in ``sum_j p_ij f_ij``);
    - ``lse = m + log(l)`` from the base-2 values: ``dl_i = sum_j p_ij f_ij + (2 nb + 4) u + 3u |lse_i|``;
    - the backward recomputes ``p = exp2(s - lse)`` against the forward's lse: ``b_ij = e_ij + u |s_ij - lse_i| +
      4u + dl_i`` relative. (Its scores come from another kernel's fp32 dot, whose rounding -- like that of eager's
      one score dot, which perturbs eager's P alike -- is shared in kind: twice eager's error covers the two dots);
    - ``delta_i = rowsum(dO_i O_i) - dlse_i`` reads the *stored* output (FlashAttention-2; eager has no delta): its
      error is ``|dO_i . (O_i - exact O_i)|`` -- measured, when ``out`` (ours) is given, else bounded by
      ``|dO_i| . err(out_i)`` -- plus the dot's ``D u sum_d |dO_id O_id|``;
    - ``dX_ij = p_ij (dP'_ij - delta_i)``, where eager's ``P (dP - rowsum(P dP))`` cancels its own errors, cancels
      ours with their absolute size: ``g_ij = p_ij (b_ij |dP'_ij - delta_i| + (D + 1) u sum_d |dO_id v_jd| +
      err(delta_i) + u (|dP'_ij| + |delta_i|)) + u |dX_ij|``; softcapped, ``dS = dX (1 - t^2)`` errs by
      ``(1 - t^2) g + |dX| (2 |t| err(t) + 3u) + u |dS|`` (``err(t)``: y's two roundings and tanh's own), else dS = dX;
    - ``dq = scale dS k`` and ``dk = scale dS^T q`` carry that (and dS's operand rounding), ``dv = p'^T dO``
      carries ``b``, ``dmask`` is ``g`` summed over the dims where the mask broadcasts (fp32, ``count u sum |dX|``);
    - ``dsink_h = -sum_i exp(sink_h - lse_i) delta_i`` over every row of head h (R of them, summed in any order):
      ``sum_i ps_i ((3u |sink_h - lse_i| + 4u + dl_i) |delta_i| + err(delta_i) + u |delta_i|) + R u sum_i ps_i
      |delta_i|``;
    - ``lse_err``: the backward reads an lse computed elsewhere (ring attention's merge) with this error, in place of
      ``dl``; ``partials``: each gradient is the fp32 sum of that many partial results over disjoint key (or query)
      blocks, each rounded to ``dtype`` by the kernel: ``(u_dtype + partials u)`` times the partials' absolute sums
      ``|scale| |dS| |k|``, ``|scale| |dS|^T |q|``, ``|p'|^T |dO|``.

    In fp32 the largest terms are the dP-versus-delta cancellation and delta's dot (``D u`` each, worst case); they
    leave the rule sensitive to a 0.1% error of the scale (tests/test_numerics.py).

    All inputs are float64 tensors holding the values the low-precision run sees; ``attn_mask`` is bool (True =
    attends) or additive float; ``is_causal`` keeps key j for query i iff ``j <= i + causal_offset``;
    ``window_size``, ``softcap``, ``alibi_slopes`` and ``sinks`` as ``fastattn.attention`` takes them; ``out`` is the
    fused forward's output, if measured."""
    from fastattn.reference import per_head

    u, _, up = _roundoffs(dtype)
    q, k, v, do = (t.detach().double() for t in (query, key, value, grad_out))
    M, D, N = q.size(-2), q.size(-1), k.size(-2)
    sc = 1.0 / math.sqrt(D) if scale is None and D > 0 else (1.0 if scale is None else float(scale))
    nb = max(1, math.ceil(N / 16))
    group = 1
    if enable_gqa and q.dim() >= 3 and k.size(-3) != q.size(-3):
        group = q.size(-3) // k.size(-3)
        k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    s = sc * (q @ k.mT)
    e, t, err_t = 2 * u * s.abs(), None, None
    if softcap > 0:
        y = s / softcap
        t = torch.tanh(y)
        err_t = (1 - t * t) * 2 * u * y.abs() + _tanh_abs_error(y, t, u)
        s = softcap * t
        e = softcap * err_t + 2 * u * s.abs()
    i, j = torch.arange(M)[:, None], torch.arange(N)[None, :]
    if alibi_slopes is not None:
        bias = per_head(alibi_slopes.detach().double(), s.dim()) * (i + N - M - j).abs()
        s = s - bias
        e = e + 2 * u * bias.abs() + u * s.abs()
    valid = torch.ones(s.shape, dtype=torch.bool)
    if is_causal:
        valid = valid & (j <= i + causal_offset)
    if window_size[0] >= 0:
        valid = valid & (j >= i + N - M - window_size[0])
    if window_size[1] >= 0:
        valid = valid & (j <= i + N - M + window_size[1])
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            valid = valid & attn_mask
        else:
            m = attn_mask.detach().double()
            valid = valid & torch.isfinite(m)
            s = s + torch.where(torch.isfinite(m), m, 0.0)
    s, e, valid = s.masked_fill(~valid, -math.inf), e.expand(s.shape), valid.expand(s.shape)
    if sinks is not None:  # the sink: one more, always visible column
        sink = per_head(sinks.detach().double(), s.dim()).expand(*s.shape[:-1], 1)
        s, e = torch.cat([s, sink], -1), torch.cat([e, 2 * u * sink.abs()], -1)
        valid = torch.cat([valid, torch.ones_like(sink, dtype=torch.bool)], -1)
    row_max = s.amax(-1, keepdim=True) if s.size(-1) else s.new_full((*s.shape[:-1], 1), -math.inf)
    full = torch.isfinite(row_max)
    mx = torch.where(full, row_max, 0.0)
    p = (s - mx).exp()
    den = p.sum(-1, keepdim=True)
    p = p / torch.where(full, den, 1.0)
    lse = torch.where(full, mx + den.clamp_min(1e-300).log(), 0.0)
    keep = 1.0 / (1.0 - dropout_p) if dropout_mask is None else dropout_mask.double() / (1.0 - dropout_p)
    fa = torch.where(valid, e + 4 * u, 0.0)  # f over every column (the sink's included)
    pf = (p * fa).sum(-1, keepdim=True)
    p, s, valid = p[..., :N], s[..., :N], valid[..., :N]
    pd = p * keep
    o = pd @ v

    def live(t: Tensor) -> Tensor:  # excluded keys contribute exact zeros in the kernels
        return torch.where(valid, t, 0.0).expand(s.shape)

    av, ado = v.abs(), do.abs()
    f = fa[..., :N]
    err_out = (pd * f) @ av + o.abs() * pf + ((2 * nb + 2) * u + up) * (pd.abs() @ av)
    dl = torch.where(full, pf + (2 * nb + 4) * u + 3 * u * lse.abs(), 0.0)
    if lse_err is not None:
        dl = torch.where(full, float(lse_err), 0.0)
    b = live(e[..., :N] + u * (s - lse).abs() + 4 * u + dl)
    dp = (do @ v.mT) * keep
    terms = (ado @ av.mT) * abs(keep) if isinstance(keep, float) else (ado @ av.mT) * keep.abs()
    gl = grad_lse.detach().double()[..., None] if grad_lse is not None else torch.zeros(())
    delta = (do * o).sum(-1, keepdim=True) - gl
    if out is not None:
        o_err = (do * (out.detach().double() - o)).sum(-1, keepdim=True).abs()
    else:
        o_err = (ado * err_out).sum(-1, keepdim=True)
    err_delta = o_err + D * u * (do * o).abs().sum(-1, keepdim=True) + u * gl.abs()
    ds = p * (dp - delta)
    g = p * (b * (dp - delta).abs() + (D + 1) * u * terms + err_delta + u * (dp.abs() + delta.abs())) + u * ds.abs()
    g_s, ds_s = g, ds
    if t is not None:  # dS = dX (1 - t^2)
        ds_s = ds * (1 - t * t)
        g_s = (1 - t * t) * g + ds.abs() * (2 * t.abs() * err_t + 3 * u) + u * ds_s.abs()
    g_op = g_s + up * ds_s.abs()  # dS rounded to the input dtype for the dS K and dS^T Q products
    err_dq = abs(sc) * (g_op @ k.abs())
    err_dk = abs(sc) * (g_op.mT @ q.abs())
    err_dv = (pd.abs() * (b + up)).mT @ ado
    if partials:
        extra = UNIT_ROUNDOFF[dtype] + partials * u
        err_dq = err_dq + extra * abs(sc) * (ds_s.abs() @ k.abs())
        err_dk = err_dk + extra * abs(sc) * (ds_s.abs().mT @ q.abs())
        err_dv = err_dv + extra * (pd.abs().mT @ ado)
    if group > 1:  # dk, dv sum over the query heads of each key/value head
        err_dk = err_dk.unflatten(-3, (-1, group)).sum(-3)
        err_dv = err_dv.unflatten(-3, (-1, group)).sum(-3)
    floors = {"out": _top(err_out), "lse": _top(dl), "dq": _top(_sum_to(err_dq, tuple(query.shape))),
              "dk": _top(_sum_to(err_dk, tuple(key.shape))), "dv": _top(_sum_to(err_dv, tuple(value.shape)))}
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        count = g.numel() // max(attn_mask.numel(), 1)
        floors["dmask"] = _top(_sum_to(g + count * u * ds.abs(), tuple(attn_mask.shape)))
    if sinks is not None:  # per head: over the batch dims and the rows
        ps = (sink[..., 0] - lse[..., 0]).exp() * full[..., 0]
        dlt = delta[..., 0].abs()
        per_row = ps * ((3 * u * (sink[..., 0] - lse[..., 0]).abs() + 4 * u + dl[..., 0]) * dlt + err_delta[..., 0]
                        + u * dlt)
        rows = ps.numel() // max(ps.size(-2), 1) if ps.dim() >= 2 else ps.numel()
        heads = per_row.sum(-1) + rows * u * (ps * dlt).sum(-1)
        floors["dsinks"] = _top(heads.reshape(-1, heads.size(-1)).sum(0) if heads.dim() > 1 else heads)
    return floors


def varlen_floors(query: Tensor, key: Tensor, value: Tensor, grad_out: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor, *,
                  dtype: torch.dtype, window_size: tuple[int, int] = (-1, -1), scale: float | None = None,
                  grad_lse: Tensor | None = None, out: Tensor | None = None, dropout_p: float = 0.0,
                  dropout_mask: Tensor | None = None) -> dict[str, float]:
    """Floors of ``out``, ``lse``, ``dq``, ``dk``, ``dv`` of ``fastattn.varlen_attn`` on packed ``(T, H, D)`` tensors:
    each sequence is an attention of its own (the kernels never mix two sequences' rows in a sum), so the floor is
    the worst over the sequences of :func:`attention_floors` on that sequence, its bottom-right window given as
    the causal offset (no left bound) or as the boolean mask of visible keys; ``grad_lse (H, T_q)``, ``out (T_q,
    H, DV)`` (ours, measured), ``dropout_mask (N, H, max_q, max_k)`` as ``fastattn.reference.varlen_attn`` takes
    them. Inputs are float64 tensors holding the values the low-precision run sees."""
    q_off, k_off = cu_seq_q.tolist(), cu_seq_k.tolist()
    left, right = window_size
    worst: dict[str, float] = {}
    for b in range(len(q_off) - 1):
        (q0, q1), (k0, k1) = q_off[b: b + 2], k_off[b: b + 2]
        M, N = q1 - q0, k1 - k0
        if M == 0:
            continue

        def heads(t: Tensor, a: int, z: int) -> Tensor:
            return t[a:z].transpose(0, 1)

        extra: dict = {}
        if left >= 0:  # flash's window: key j for query i iff -left <= j - i - (N - M) <= right
            d = torch.arange(N)[None, :] - torch.arange(M)[:, None] - (N - M)
            extra["attn_mask"] = (d >= -left) & ((d <= right) if right >= 0 else True)
        elif right >= 0:
            extra.update(is_causal=True, causal_offset=N - M + right)
        if dropout_mask is not None:
            extra["dropout_mask"] = dropout_mask[b, :, :M, :N]
        f = attention_floors(heads(query, q0, q1), heads(key, k0, k1), heads(value, k0, k1),
                             heads(grad_out, q0, q1), dtype=dtype, scale=scale,
                             enable_gqa=query.size(1) != key.size(1), dropout_p=dropout_p,
                             grad_lse=grad_lse[:, q0:q1] if grad_lse is not None else None,
                             out=heads(out, q0, q1) if out is not None else None, **extra)
        worst = {name: max(worst.get(name, 0.0), v) for name, v in f.items()}
    return worst


def varlen_modifier_floors(query: Tensor, key: Tensor, value: Tensor, grad_out: Tensor, cu_seq_q: Tensor,
                           cu_seq_k: Tensor, *, dtype: torch.dtype, window_size: tuple[int, int] = (-1, -1),
                           scale: float | None = None, grad_lse: Tensor | None = None, out: Tensor | None = None,
                           dropout_p: float = 0.0, dropout_mask: Tensor | None = None, softcap: float = 0.0,
                           alibi_slopes: Tensor | None = None, sinks: Tensor | None = None) -> dict[str, float]:
    """:func:`varlen_floors` with the kernels' score modifiers, and ``dsinks``: each sequence's
    :func:`attention_floors` with its bottom-right ``window_size``, ``softcap``, its slopes (``alibi_slopes (H,)``
    or its row of ``(N, H)``) and ``sinks``; the worst over the sequences. ``dsinks`` alone sums over sequences:
    the kernels sum one head's shares over all ``T_q`` packed rows in one fp32 sum (rows of no sequence add exact
    zeros), whose rounding is ``T_q u sum|share|`` where one sequence's floor counts its ``R_b`` rows; each
    sequence's floor times ``T_q / R_b`` bounds its rows' part (the other terms only grow), and the parts add."""
    q_off, k_off = cu_seq_q.tolist(), cu_seq_k.tolist()
    worst: dict[str, float] = {}
    for b in range(len(q_off) - 1):
        (q0, q1), (k0, k1) = q_off[b: b + 2], k_off[b: b + 2]
        if q1 == q0:
            continue
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        f = attention_floors(*(t[a:z].transpose(0, 1) for t, a, z in ((query, q0, q1), (key, k0, k1),
                                                                        (value, k0, k1), (grad_out, q0, q1))),
                             dtype=dtype, scale=scale, enable_gqa=query.size(1) != key.size(1), dropout_p=dropout_p,
                             dropout_mask=dropout_mask[b, :, : q1 - q0, : k1 - k0] if dropout_mask is not None
                             else None, grad_lse=grad_lse[:, q0:q1] if grad_lse is not None else None,
                             out=out[q0:q1].transpose(0, 1) if out is not None else None, window_size=window_size,
                             softcap=softcap, alibi_slopes=slopes, sinks=sinks)
        share = f.pop("dsinks", 0.0) * query.size(0) / (q1 - q0)
        worst.update({name: max(worst.get(name, 0.0), v) for name, v in f.items()})
        if sinks is not None:
            worst["dsinks"] = worst.get("dsinks", 0.0) + share
    return worst


# ---------------------------------------------------------------------------------------------------------------
# merge_attention (and the split-KV combine)
# ---------------------------------------------------------------------------------------------------------------


def _exp_weight_terms(x: Tensor, shift: Tensor, u: float) -> Tensor:
    """Relative error of a kernel's ``exp2((x - shift) * LOG2E)`` for exact ``x`` and ``shift``: the subtraction,
    the rounded constant and the product each err by ``u |x - shift|`` in the exponent (relative in the result),
    exp2 by ``4u``."""
    return 3 * u * (x - shift).abs() + 4 * u


def merge_floors(outs: Sequence[Tensor], lses: Sequence[Tensor], grad_out: Tensor | None = None,
                 grad_lse: Tensor | None = None, *, dtype: torch.dtype, lse_ours: Tensor | None = None,
                 out_errs: Sequence[Tensor] | None = None, lse_errs: Sequence[Tensor] | None = None
                 ) -> dict[str, float]:
    """Floors of ``out``, ``lse``, ``dout<s>``, ``dlse<s>`` of the merge (kernels/merge_attention.py), per row.

    Eager computes the same formula in fp32 with other roundings (torch.logsumexp, exp, a broadcast product and a
    sum), so all of the kernel's are counted. Per row, with ``m = max lse_s``, ``e_s = exp(lse_s - m)``,
    ``w_s = e_s / l``, ``S`` parts:

    - ``e_s`` errs by ``c_s = 3u |lse_s - m| + 4u`` relative (:func:`_exp_weight_terms`), plus ``lse_errs[s]`` where
      the lse_s themselves carry an error (the split-KV combine's partials; the parts' outputs then carry
      ``out_errs[s]``); ``acc = sum e_s o_s`` (products and S sequential adds) and ``l = sum e_s`` (S - 1 adds).
    - ``out = acc / l``: the weights' errors common to acc and l cancel, leaving ``sum_s w_s (c_s |o_s - out| +
      err(o_s)) + S u sum_s w_s |o_s| + S u |out|`` (the division included).
    - ``lse = m + log2(l) ln2``: ``l``'s relative error ``sum w_s c_s + (S - 1) u`` plus log2's ``4u`` (2 ulp of
      a result of magnitude at most ``max(1, log2 S)``), the product by ln2 and the add: ``u (|log l| + |lse|)``.
    - backward, ``w_s = exp2((lse_s - lse') LOG2E)`` from the fused forward's lse' (``lse_ours``, else the floor
      above bounds its error): ``b_s = 3u |lse_s - lse| + 4u + err(lse)``; ``dout_s = w_s dout``: ``w_s |dout|
      (b_s + u)``; ``g_s = dout . o_s`` (fp32 tree sum over D): ``(tree_sum_terms(D) + 1) u sum |dout o_s|``;
      ``G = sum w_t g_t - dlse``: ``sum_t w_t (b_t |g_t| + err(g_t)) + (S + 1) u (sum_t w_t |g_t| + |dlse|)``;
      ``dlse_s = w_s (g_s - G)``: ``w_s (b_s |g_s - G| + err(g_s) + err(G) + u |g_s - G|) + u |dlse_s|``.

    Inputs are float64 tensors holding the values the low-precision run sees."""
    u = _roundoffs(dtype)[0]
    o = torch.stack([t.detach().double() for t in outs])  # (S, ..., L, D)
    x = torch.stack([t.detach().double() for t in lses])  # (S, ..., L)
    S, D = o.size(0), o.size(-1)
    live = torch.isfinite(x)
    m = torch.where(live, x, -math.inf).amax(0)
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.where(live, (x - m).exp(), 0.0)
    den = e.sum(0)
    empty = den == 0
    w = e / torch.where(empty, 1.0, den)
    o = torch.where(live[..., None], o, 0.0)
    out = (w[..., None] * o).sum(0)
    lse = torch.where(empty, 0.0, m + torch.where(empty, 1.0, den).log())
    c = torch.where(live, _exp_weight_terms(x, m, u), 0.0)
    if lse_errs is not None:
        c = c + torch.stack([t.double() for t in lse_errs])
    o_err = torch.stack([t.double() for t in out_errs]) if out_errs is not None else torch.zeros(())
    err_out = ((w * c)[..., None] * (o - out).abs() + w[..., None] * o_err).sum(0) \
        + S * u * (w[..., None] * o.abs()).sum(0) + S * u * out.abs()
    rel_l = (w * c).sum(0) + (S - 1) * u
    err_lse = torch.where(empty, 0.0, rel_l + 4 * u * max(1.0, math.log2(max(S, 1))) * math.log(2)
                          + u * (lse - m).abs() + u * lse.abs())
    floors = {"out": _top(err_out), "lse": _top(err_lse)}
    if grad_out is None:
        return floors
    do = grad_out.detach().double()
    dl = grad_lse.detach().double() if grad_lse is not None else torch.zeros(())
    lse_err = err_lse if lse_ours is None else (lse_ours.detach().double() - lse).abs().nan_to_num(0.0)
    b = torch.where(live, _exp_weight_terms(x, lse, u) + lse_err, 0.0)
    g = (do * o).sum(-1)
    err_g = (tree_sum_terms(D) + 1) * u * (do.abs() * o.abs()).sum(-1)
    big_g = (w * g).sum(0) - dl
    err_big_g = (w * (b * g.abs() + err_g)).sum(0) + (S + 1) * u * ((w * g.abs()).sum(0) + dl.abs())
    dlse = w * (g - big_g)
    err_dlse = w * (b * (g - big_g).abs() + err_g + err_big_g + u * (g - big_g).abs()) + u * dlse.abs()
    for s in range(S):
        floors[f"dout{s}"] = _top((w[s] * (b[s] + u))[..., None] * do.abs())
        floors[f"dlse{s}"] = _top(err_dlse[s])
    return floors


def ring_attention_floors(query: Tensor, key: Tensor, value: Tensor, grad_out: Tensor, *, dtype: torch.dtype,
                          world_size: int, layout: str = "contiguous", is_causal: bool = False,
                          scale: float | None = None, out: Tensor | None = None) -> dict[str, float]:
    """Floors of ``out``, ``dq``, ``dk``, ``dv`` of ``fastattn.distributed.ring_attention`` over ``world_size`` ranks,
    for the whole (gathered) sequence; ``out``: the ring's gathered output, if measured.

    Forward, per rank, following ``ring_schedule``: each step's block attention has :func:`attention_floors` on its
    tile, plus one rounding of the part to ``dtype`` (the kernel stores it so); the parts are folded into the
    running fp32 result one merge at a time, each with :func:`merge_floors` given the errors of its two inputs, plus
    one fp32 rounding of the stored result. Backward: each block's gradient is the fused backward of the whole
    sequence restricted to the block (the same ``p = exp(s - lse)``, ``delta`` from the stored output), so
    :func:`attention_floors` of the whole sequence holds with the merged lse's error and ``world_size`` partials per
    gradient."""
    from fastattn import reference
    from fastattn.distributed import ring_schedule, shard_sequence

    u = _roundoffs(dtype)[0]
    q, k, v, do = (t.detach().double() for t in (query, key, value, grad_out))
    gqa = k.size(-3) != q.size(-3)
    sc = 1.0 / math.sqrt(q.size(-1)) if scale is None else float(scale)
    local = q.size(-2) // world_size
    out_err = lse_err = 0.0
    for rank in range(world_size):
        qs = shard_sequence(q, world_size, rank, layout=layout)
        acc = None
        for step in ring_schedule(world_size, rank, local, is_causal=is_causal, layout=layout):
            if step.rows.stop == step.rows.start:
                continue
            kb, vb = (shard_sequence(t, world_size, step.source, layout=layout)[..., step.keys, :] for t in (k, v))
            qr = qs[..., step.rows, :]
            f = attention_floors(qr, kb, vb, qr.new_zeros((*qr.shape[:-1], vb.size(-1))), dtype=dtype,
                                 is_causal=step.causal, scale=sc, enable_gqa=gqa)
            o_b, l_b = reference.scaled_dot_product_attention(qr, kb, vb, is_causal=step.causal, scale=sc,
                                                              enable_gqa=gqa, return_lse=True)
            o = qs.new_zeros((*qs.shape[:-1], vb.size(-1)))
            lse = qs.new_full(qs.shape[:-1], -math.inf)
            o[..., step.rows, :], lse[..., step.rows] = o_b, l_b
            part = (f["out"] + UNIT_ROUNDOFF[dtype] * o.abs(), torch.full_like(lse, f["lse"]))
            if acc is None:
                acc = (o, lse, *part)
                continue
            m = merge_floors([acc[0], o], [acc[1], lse], dtype=dtype, out_errs=[acc[2], part[0]],
                             lse_errs=[acc[3], part[1]])
            merged, merged_lse = reference.merge_attention([acc[0], o], [acc[1], lse])
            acc = (merged, merged_lse, torch.full_like(o, m["out"] + u * _top(merged.abs())),
                   torch.full_like(lse, m["lse"]))
        out_err, lse_err = max(out_err, _top(acc[2])), max(lse_err, _top(acc[3]))
    back = attention_floors(q, k, v, do, dtype=dtype, is_causal=is_causal, scale=sc, enable_gqa=gqa, out=out,
                            lse_err=lse_err, partials=world_size)
    return {"out": out_err, "dq": back["dq"], "dk": back["dk"], "dv": back["dv"]}


# ---------------------------------------------------------------------------------------------------------------
# attention_with_kvcache (the decode kernel, split-KV)
# ---------------------------------------------------------------------------------------------------------------


def _tanh_abs_error(x: Tensor, t: Tensor, u: float) -> Tensor:
    """Absolute error of kernels/_common.tanh at exact ``x`` (``t = tanh(x)``). Series branch (|x| < 0.55): the
    Horner steps on a correction ``|x|^3 / 3`` at most, their roundings and the final add and products within
    ``4u |x|`` (the series' truncation below ``0.1u``). Exp branch: ``e = exp2(2|x| log2 e)`` errs by ``4u |x| +
    4u`` relative (the constant, the product, exp2), then ``e + 1``, the division (2 ulp) and ``1 - q``:
    ``(1 - |t|) (4u |x| + 8u) + u |t|``."""
    a = x.abs()
    return torch.where(a < 0.55, 4 * u * a, (1 - t.abs()) * (4 * u * a + 8 * u) + u * t.abs())


def kvcache_floors(q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], *, dtype: torch.dtype,
                   scale: float | None = None, is_causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                   softcap: float = 0.0, alibi_slopes: Tensor | None = None, splits: int = 1,
                   block_n: int = 64) -> dict[str, float]:
    """Floors of ``out`` and ``lse`` of ``attention_with_kvcache`` (kernels/kvcache.py), per sequence.

    ``q (B, Lq, H, D)``; ``keys[b]``, ``values[b]`` ``(N_b, H_kv, D)``: the cache's first N_b rows after the
    append; ``splits``/``block_n``: the launch's schedule. Shared with eager (the reference computes fp32 scores
    from the same operands and casts p to v's dtype before ``p @ v``): the fp32 dot products and the operand and
    result roundings. Fused only, for query row i and key j (natural units):

    - the score's error ``ds_ij``: plain, ``2u |s|`` (``scale log2 e`` rounded, the product); softcapped
      (``s = c t``, ``t = tanh(x)``, ``x = scale q.k / c``), ``c ((1 - t^2) 2u |x| + tanh's error
      (:func:`_tanh_abs_error`)) + 2u |s|``; ALiBi adds ``2u |alibi_ij|`` (the slope times log2 e, the product) and
      the subtraction ``u |s_ij|``;
    - online softmax as in :func:`attention_floors`, over the ``nb`` key blocks a split visits:
      ``f_ij = ds_ij + u |s_ij - m_i| + 4u`` relative in p, ``err(o_i) = sum_j p_ij f_ij |v_j - o_i| +
      (2 nb + 2) u sum_j p_ij |v_j|``, ``err(lse_i) = sum_j p_ij f_ij + (2 nb + 4) u + 3u |lse_i|``;
    - with several splits (split s: keys ``[s C, (s + 1) C)``, ``C = ceil(N_b / splits)`` rounded up to
      ``block_n``), each split's partial output and lse carry the errors above into the combine, whose own
      roundings :func:`merge_floors` adds (``out_errs``, ``lse_errs``).

    All inputs are float64 tensors holding the values the low-precision run sees."""
    u = _roundoffs(dtype)[0]
    B, Lq, H, D = q.shape
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    left, right = window_size
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    worst = {"out": 0.0, "lse": 0.0}
    for b in range(B):
        kb, vb = keys[b].double(), values[b].double()
        N = kb.size(0)
        group = H // kb.size(1)
        kb, vb = kb.transpose(0, 1).repeat_interleave(group, 0), vb.transpose(0, 1).repeat_interleave(group, 0)
        qb = q[b].double().transpose(0, 1)  # (H, Lq, D)
        s = sc * (qb @ kb.mT)  # (H, Lq, N)
        ds = 2 * u * s.abs()
        if softcap > 0:
            x = s / softcap
            t = torch.tanh(x)
            s = softcap * t
            ds = softcap * ((1 - t * t) * 2 * u * x.abs() + _tanh_abs_error(x, t, u)) + 2 * u * s.abs()
        i = torch.arange(Lq)[:, None] + N - Lq
        j = torch.arange(N)[None, :]
        if alibi_slopes is not None:
            slopes = alibi_slopes.double() if alibi_slopes.dim() == 1 else alibi_slopes[b].double()
            bias = slopes[:, None, None] * (i - j).abs()
            s = s - bias
            ds = ds + 2 * u * bias.abs() + u * s.abs()
        visible = torch.ones(Lq, N, dtype=torch.bool)
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
        chunk = math.ceil(math.ceil(N / splits) / block_n) * block_n  # the kernel's split length
        parts = []
        for lo in range(0, N, max(chunk, 1)):
            keep = visible & (j >= lo) & (j < lo + chunk)
            sp = s.masked_fill(~keep, -math.inf)
            mx = sp.amax(-1, keepdim=True)
            full = torch.isfinite(mx)
            m = torch.where(full, mx, 0.0)
            e = torch.where(keep, (sp - m).exp(), 0.0)
            den = e.sum(-1, keepdim=True)
            p = e / torch.where(full, den, 1.0)
            o = p @ vb
            lse = torch.where(full, m + den.clamp_min(1e-300).log(), -math.inf).squeeze(-1)
            f = torch.where(keep, ds + u * (s - m).abs() + 4 * u, 0.0)
            nb = min(chunk, N - lo) // block_n + 2  # blocks a tile visits in this split (alignment included)
            err_o = (p * f) @ vb.abs() + o.abs() * (p * f).sum(-1, keepdim=True) + (2 * nb + 2) * u * (p @ vb.abs())
            err_l = torch.where(full.squeeze(-1), (p * f).sum(-1) + (2 * nb + 4) * u + 3 * u * lse.abs(), 0.0)
            parts.append((o, lse, err_o, err_l))
        if not parts:
            continue
        if len(parts) == 1 or splits == 1:
            o, lse, err_o, err_l = parts[0]
            got = {"out": _top(err_o), "lse": _top(err_l)}
        else:
            outs, lses, errs_o, errs_l = zip(*parts)
            got = merge_floors(outs, lses, dtype=dtype, out_errs=errs_o, lse_errs=errs_l)
        worst = {k: max(worst[k], got[k]) for k in worst}
    return worst


# ---------------------------------------------------------------------------------------------------------------
# add + LayerNorm / RMSNorm
# ---------------------------------------------------------------------------------------------------------------


def norm_floors(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, grad_out: Tensor,
                grad_residual_out: Tensor | None = None, *, dtype: torch.dtype, eps: float, rms: bool = False,
                dropout_p: float = 0.0, dropout_mask: Tensor | None = None) -> dict[str, float]:
    """Floors of ``out``, ``residual_out``, ``dx``, ``dresidual``, ``dweight``, ``dbias`` of the fused add + norm
    (kernels/layer_norm.py), over the last dim of ``x`` (n values per row, R rows).

    Fused only: every sum, since torch's CPU kernels accumulate fp32 rows in float64 (fp16/bf16 in fp32, where the
    floors are negligible against eager's own error). With ``T = tree_sum_terms(n)``:

    - ``residual_out = dropout(x) + residual``: computed in fp32 and rounded once, as eager's add; dropout scales
      by the fp32 reciprocal of ``1 - p`` (two roundings, eager divides once): ``2u |x'|``.
    - ``mean = sum z / n``: ``T u mean|z| + u |mean|``; ``var = sum (z - mean)^2 / n`` from rounded differences:
      ``(T + 3) u var`` (the mean's error enters at second order only: ``sum (z - mean) = 0``); RMSNorm's ``sum
      z^2 / n``: ``(T + 2) u ms``. ``rstd = rsqrt(var + eps)``: relative ``(err(var) + u (var + eps)) / (2 (var +
      eps)) + 4u``.
    - ``xhat = (z - mean) rstd``: ``rstd (err(mean) + u |z - mean|) + |xhat| (err(rstd) + u)``;
      ``out = xhat w + b``: ``|w| err(xhat) + 2u |xhat w| + u |out|``.
    - backward, ``g = w dy``, ``c1 = mean(xhat g)``, ``c2 = mean(g)``: ``err(c1) = mean(|g| err(xhat)) + (T + 3) u
      mean|xhat g|``, ``err(c2) = (T + 2) u mean|g|``; ``dz = (g - xhat c1 - c2) rstd``: ``rstd (u |g| +
      err(xhat) |c1| + |xhat| err(c1) + err(c2) + 3u (|g| + |xhat c1| + |c2|)) + |dz| (err(rstd) + u)``, plus the
      add of d residual_out (``u |dz|``) and, for dx, dropout's scale (``2u |dz|``).
    - ``dweight = sum_rows dy xhat``, ``dbias = sum_rows dy`` (per-program sums, then the partial rows in order; any
      order of R terms): ``sum |dy| err(xhat) + R u sum |dy xhat|`` and ``R u sum |dy|``.
    """
    u = _roundoffs(dtype)[0]
    x64 = x.detach().double()
    n = x64.size(-1)
    tree = tree_sum_terms(n)
    xs = x64 * (dropout_mask.double() / (1.0 - dropout_p)) if dropout_mask is not None else x64
    z = xs + residual.detach().double() if residual is not None else xs
    z, rows = z.reshape(-1, n), z.numel() // max(n, 1)
    w = weight.detach().double().reshape(n).abs() if weight is not None else torch.ones(n, dtype=torch.float64)
    bb = bias.detach().double().reshape(n).abs() if bias is not None else 0.0
    if rms:
        centred, err_mean = z, 0.0
        var = z.square().mean(-1, keepdim=True)
        err_var = (tree + 2) * u * var
    else:
        mean = z.mean(-1, keepdim=True)
        centred = z - mean
        err_mean = tree * u * z.abs().mean(-1, keepdim=True) + u * mean.abs()
        var = centred.square().mean(-1, keepdim=True)
        err_var = (tree + 3) * u * var
    rstd = (var + eps).rsqrt()
    err_rstd = (err_var + u * (var + eps)) / (2 * (var + eps)) + 4 * u
    xhat = centred * rstd
    err_xhat = rstd * (err_mean + u * centred.abs()) + xhat.abs() * (err_rstd + u)
    out = xhat * w + bb
    floors = {"out": _top(w * err_xhat + 2 * u * xhat.abs() * w + u * out.abs()),
              "residual_out": _top(2 * u * xs.abs()) if dropout_mask is not None else 0.0}
    dy = grad_out.detach().double().reshape(-1, n)
    g = dy * w
    c1 = (xhat * g).mean(-1, keepdim=True)
    c2 = torch.zeros(()) if rms else g.mean(-1, keepdim=True)
    err_c1 = (g.abs() * err_xhat).mean(-1, keepdim=True) + (tree + 3) * u * (xhat * g).abs().mean(-1, keepdim=True)
    err_c2 = 0.0 if rms else (tree + 2) * u * g.abs().mean(-1, keepdim=True)
    dz = (g - xhat * c1 - c2) * rstd
    err_dz = (rstd * (u * g.abs() + err_xhat * c1.abs() + xhat.abs() * err_c1 + err_c2
                      + 3 * u * (g.abs() + (xhat * c1).abs() + c2.abs())) + dz.abs() * (err_rstd + u))
    if grad_residual_out is not None:
        dz = dz + grad_residual_out.detach().double().reshape(-1, n)
        err_dz = err_dz + u * dz.abs()
    err_dx = err_dz + 2 * u * dz.abs() if dropout_mask is not None else err_dz
    ady = dy.abs()
    floors.update(dx=_top(err_dx / (1.0 - dropout_p)), dresidual=_top(err_dz),
                  dweight=_top((ady * err_xhat).sum(0) + rows * u * (ady * xhat.abs()).sum(0)),
                  dbias=_top(rows * u * ady.sum(0)))
    return floors


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm + add + activation
# ---------------------------------------------------------------------------------------------------------------


def _activation_terms(z: Tensor, activation: str, slope: float, u: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For exact pre-activations ``z`` (float64): ``act'(z)``, ``act''(z)`` (autograd on the float64 reference), and
    the absolute errors of the kernels' ``act(z)`` and ``act'(z)`` evaluated in arithmetic of unit roundoff ``u``
    (kernels/batch_norm.py's formulas, operation by operation; ``exp`` as ``exp2(x log2 e)``: ``2u |x| + 4u``
    relative, ``erf`` and the ``tanh`` of kernels/_common.py as stated there). Zero where the kernels only select
    (relu, relu6, the flat parts of the piecewise ones)."""
    from fastattn.reference import ACTIVATIONS

    zz = z.detach().clone().requires_grad_()
    (d1,) = torch.autograd.grad(ACTIVATIONS[activation](zz, slope).sum(), zz, create_graph=True)
    d2 = torch.autograd.grad(d1.sum(), zz, allow_unused=True)[0] if d1.requires_grad else None
    d1, d2 = d1.detach(), (d2.detach() if d2 is not None else torch.zeros_like(z))
    out = ACTIVATIONS[activation](z, slope)
    zero = torch.zeros_like(z)
    a, o = z.abs(), out.abs()
    if activation == "leaky_relu":  # z * slope, the slope rounded to fp32
        return d1, d2, 2 * u * o, u * d1.abs()
    if activation == "hardsigmoid":  # relu6(z + 3) / 6
        live = (z > -3) & (z < 3)
        return d1, d2, torch.where(live, u * (z + 3).abs() / 6, zero) + u * o, zero
    if activation == "hardswish":  # z * relu6(z + 3) / 6; act' = z / 3 + 0.5 between the kinks
        live = (z > -3) & (z < 3)
        return d1, d2, torch.where(live, u * a * (z + 3).abs() / 6, zero) + 2 * u * o, \
            torch.where(live, u * a / 3 + u * d1.abs(), zero)
    if activation == "silu":  # z / (1 + exp(-z)); act' = s (1 + z (1 - s))
        s = torch.sigmoid(z)
        rel_s = (1 - s) * (2 * u * a + 4 * u) + 2 * u
        err_s = s * rel_s
        err_zo = a * (err_s + u * (1 - s)) + u * (a * (1 - s))
        q = 1 + z * (1 - s)
        return d1, d2, o * rel_s, q.abs() * err_s + s * (err_zo + u * q.abs()) + u * d1.abs()
    if activation == "gelu":  # 0.5 z (1 + erf(z / sqrt 2)); act' = cdf + z pdf
        arg = z * math.sqrt(0.5)
        erf = torch.erf(arg)
        err_erf = 2 / math.sqrt(math.pi) * torch.exp(-arg * arg) * 2 * u * arg.abs() + 4 * u * erf.abs()
        err_cdf = 0.5 * (err_erf + u * (1 + erf).abs())
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        err_zp = a * pdf * (1.5 * u * z * z + 6 * u) + u * a * pdf
        return d1, d2, a * err_cdf + u * o, err_cdf + err_zp + u * d1.abs()
    if activation == "gelu_tanh":  # 0.5 z (1 + tanh(beta (z + kappa z^3)))
        beta, kappa = math.sqrt(2 / math.pi), 0.044715
        cube = a ** 3
        s1 = z + kappa * z ** 3
        inner = beta * s1
        err_inner = beta * (4 * u * kappa * cube + u * s1.abs()) + 2 * u * inner.abs()
        t = torch.tanh(inner)
        err_t = (1 - t * t) * err_inner + (1 - t.abs()) * (4 * inner.abs() + 6) * u + 4 * u * t.abs() + u
        err_h1 = 0.5 * (err_t + u * (1 + t).abs())
        omt = 1 - t * t
        h2a = 0.5 * a * omt
        err_h2a = 0.5 * a * (2 * t.abs() * err_t + u * t * t + u * omt) + u * h2a
        ip = beta * (1 + 3 * kappa * z * z)
        err_ip = beta * (9 * u * kappa * z * z + u * (1 + 3 * kappa * z * z)) + 2 * u * ip
        return d1, d2, a * err_h1 + u * o, err_h1 + ip * err_h2a + h2a * err_ip + u * h2a * ip + u * d1.abs()
    return d1, d2, zero, zero  # identity, relu, relu6: exact selections


def batch_norm_floors(x: Tensor, identity: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
                      weight: Tensor | None, bias: Tensor | None, grad_out: Tensor | None, *, dtype: torch.dtype,
                      training: bool, eps: float = 1e-5, momentum: float | None = 0.1,
                      lane_terms: int | None = None, activation: str = "relu",
                      negative_slope: float = 0.01) -> dict[str, float]:
    """Floors of ``out``, ``dx``, ``didentity``, ``dweight``, ``dbias``, ``running_mean``, ``running_var`` of the
    fused BatchNorm + add + activation (kernels/batch_norm.py), per channel over its ``M = N H W`` values.

    Fused only (torch's CPU kernels compute fp32 batch norm in higher precision). Each lane of a program sums its
    share of a channel in fp32 (``L = lane_terms`` values, at most ``M``; the launcher's schedule gives it), then the
    lanes and the partials add in float64 (negligible). With ``K`` the shift (an average of some of the channel's
    values, so ``|x - K| <= |x - mean| + max |x - mean|``):

    - training statistics: ``err(mean) = L u mean|x - K|``, ``err(var) = (L + 2) u mean (x - K)^2 + 2 |mean - K|
      err(mean)``; ``rstd`` from float64 rounded to fp32: relative ``err(var) / (2 (var + eps)) + u``. Eval: ``w
      rstd`` from float64, rounded: ``u``.
    - ``z = ((x - hi) - lo) (w rstd) + b + identity`` in fp32 (two subtractions, the product, two adds): ``err(z) =
      |w| rstd (err(mean) + 2u |x - mean|) + |xhat w| (err(rstd) + 2u) + 2u (|xhat w + b| + |z|)``;
      ``out = act(z)``: ``|act'(z)| err(z) + e_f(z)``, ``e_f`` the activation's own rounding (:func:`_activation_terms`;
      0 for relu, relu6 and identity). First order: the tests keep z away from the kinks of the piecewise ones.
    - backward, ``g = dy act'(z)``: exact for relu (the mask of ``out > 0``) and identity, else ``err(g) = |dy|
      (|act''(z)| err(z) + e_d(z)) + u |g|`` (z recomputed as the forward computed it, ``e_d`` the rounding of
      act'); lane sums of ``g`` and ``g xm`` (``xm = x - mean`` as above): ``err(sum g) = L u sum|g| + sum
      err(g)``, ``err(sum g xm) = (L + 3) u sum|g xm| + err(mean) |sum g| + sum err(g) |xm|``; ``dbias = sum g``,
      ``dweight = rstd sum g xm`` (relative ``err(rstd) + u`` more); training ``dx = k1 g + k2 xm + k3`` from fp32
      coefficients: ``|w| rstd (err(g) + (3 err(rstd) + 6u) t + err(sum g) / M + |xhat| rstd err(sum g xm) / M) +
      |w| rstd^2 |sum g xhat| / M (err(mean) + 2u |xm|)`` with ``t = |g| + |sum g| / M + |xhat| |sum g xhat| / M``;
      eval ``dx = g (w rstd)``: ``|w| rstd err(g) + 3u |dx|``. ``didentity = g``: ``err(g)``.
    - running statistics ``(1 - m) r + m stat`` (the variance unbiased by ``M / (M - 1)``): ``3u (|r| + |stat|) + m
      err(stat)``.
    """
    u = _roundoffs(dtype)[0]
    dims = (0, 2, 3)
    x64 = x.detach().double()
    C, M = x64.size(1), x64.numel() // max(x64.size(1), 1)
    lanes = M if lane_terms is None else lane_terms

    def per_channel(t: Tensor | None, default: float) -> Tensor:
        if t is None:
            return torch.full((1, C, 1, 1), default, dtype=torch.float64)
        return t.detach().double().view(1, -1, 1, 1)

    w, b = per_channel(weight, 1.0), per_channel(bias, 0.0)
    if training:
        mean, var = x64.mean(dims, keepdim=True), x64.var(dims, unbiased=False, keepdim=True)
        spread = (x64 - mean).abs()
        worst = spread.amax(dims, keepdim=True)
        err_mean = lanes * u * (spread.mean(dims, keepdim=True) + worst)
        err_var = (lanes + 2) * u * (spread + worst).square().mean(dims, keepdim=True) + 2 * worst * err_mean
        err_rstd = err_var / (2 * (var + eps)) + u
    else:
        mean, var = per_channel(running_mean, 0.0), per_channel(running_var, 1.0)
        err_mean, err_var, err_rstd = 0.0, 0.0, u
    rstd = (var + eps).rsqrt()
    xm = x64 - mean
    xhat = xm * rstd
    z = xhat * w + b + (identity.detach().double() if identity is not None else 0.0)
    w, b = w.abs(), b.abs()
    err_z = (w * rstd * (err_mean + 2 * u * xm.abs()) + (xhat * w).abs() * (err_rstd + 2 * u)
             + 2 * u * ((xhat * w).abs() + b + z.abs()))
    d1, d2, e_f, e_d = _activation_terms(z, activation, negative_slope, u)
    floors = {"out": _top(d1.abs() * err_z + e_f)}
    if training and running_mean is not None:
        mom = 0.1 if momentum is None else float(momentum)
        rm, rv = per_channel(running_mean, 0.0).abs(), per_channel(running_var, 1.0).abs()
        unbias = M / max(M - 1, 1)
        floors["running_mean"] = _top(3 * u * (rm + mean.abs()) + mom * err_mean)
        floors["running_var"] = _top(3 * u * (rv + var * unbias) + mom * unbias * err_var)
    if grad_out is None:
        return floors
    dy = grad_out.detach().double().abs()
    g = dy * d1.abs()
    err_g = 0.0 if activation in ("relu", "identity") else dy * (d2.abs() * err_z + e_d) + u * g
    err_g = torch.as_tensor(err_g, dtype=torch.float64).expand_as(g)
    sum_g, sum_gxm = g.sum(dims, keepdim=True), (g * xm.abs()).sum(dims, keepdim=True)
    err_sum_g = lanes * u * sum_g + err_g.sum(dims, keepdim=True)
    err_sum_gxm = (lanes + 3) * u * sum_gxm + err_mean * sum_g + (err_g * xm.abs()).sum(dims, keepdim=True)
    floors["didentity"] = _top(err_g)
    floors["dbias"] = _top(err_sum_g)
    floors["dweight"] = _top(rstd * err_sum_gxm + rstd * sum_gxm * (err_rstd + u))
    if training:
        sum_gxhat = rstd * sum_gxm
        t = g + sum_g / M + xhat.abs() * sum_gxhat / M
        err_dx = (w * rstd * (err_g + (3 * err_rstd + 6 * u) * t + err_sum_g / M + xhat.abs() * rstd * err_sum_gxm / M)
                  + w * rstd * rstd * sum_gxhat / M * (err_mean + 2 * u * xm.abs()))
    else:
        err_dx = w * rstd * (err_g + 3 * u * g)
    floors["dx"] = _top(err_dx)
    return floors


# ---------------------------------------------------------------------------------------------------------------
# patch embedding
# ---------------------------------------------------------------------------------------------------------------


def patch_embed_floors(images: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor | None,
                       cls_token: Tensor | None, grad_out: Tensor, *, dtype: torch.dtype) -> dict[str, float]:
    """Floors of ``out``, ``dimages``, ``dweight``, ``dbias``, ``dpos_embed``, ``dcls_token`` of the fused patch
    embedding (kernels/patch_embed.py).

    The GEMMs' fp32 reductions -- over ``K = C P^2`` pixels (out), ``D`` features (dimages), the ``B N`` tokens
    (dweight, dbias: split ranges whose partials add in order) -- count as fused only, since torch's CPU convolution
    may sum in another precision: ``blocked_terms(n) u sum|terms|``, plus one rounding per add (bias, position
    embedding, partials); dpos_embed and dcls_token sum ``B`` images in sequence. The op is linear in each input, so
    running it on absolute values (in float64) gives every result's ``sum |terms|`` exactly."""
    from fastattn import reference

    u = _roundoffs(dtype)[0]
    B, C, _, _ = images.shape
    D, P = weight.shape[0], weight.shape[-1]
    absolute = [t.detach().double().abs().requires_grad_() if t is not None else None
                for t in (images, weight, bias, pos_embed, cls_token)]
    out = reference.patch_embed(*absolute)
    tokens = (out.shape[1] - (cls_token is not None)) * B
    out.backward(grad_out.detach().double().abs())
    counts = {"out": blocked_terms(C * P * P) + 2, "dimages": blocked_terms(D), "dweight": blocked_terms(tokens) + 1,
              "dbias": blocked_terms(tokens) + 1, "dpos_embed": B, "dcls_token": B}
    grads = dict(zip(("dimages", "dweight", "dbias", "dpos_embed", "dcls_token"), (t.grad if t is not None else None
                                                                                  for t in absolute)))
    floors = {"out": counts["out"] * u * _top(out.detach())}
    floors.update({name: counts[name] * u * _top(g) for name, g in grads.items() if g is not None})
    return floors
