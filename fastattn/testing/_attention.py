"""Floors of the attention family: attention (dense, packed), merge, ring attention, the KV-cache decode.

The rounding model and the rule are in :mod:`fastattn.testing`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastattn.testing._rule import UNIT_ROUNDOFF, _roundoffs, _sum_to, _top, tree_sum_terms


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
