"""Packed variable-length attention (``fastattn.varlen_attn``, torch's ``varlen_attn`` signature): argument checks,
the ``fastattn::varlen_attention`` custom op with its fake and autograd, and its launchers.

``query (T_q, H, D)``, ``key``/``value (T_k, H_kv, D|DV)`` hold N sequences back to back; ``cu_seq_q``/``cu_seq_k``
(int32, ``(N + 1,)``) are their offsets. Sequence b attends from its ``Lq_b`` queries to its own ``N_b`` keys only,
with flash-attention's bottom-right alignment (``window_size=(-1, 0)`` is causal).

The packed path is one launch of the attention kernels' VARLEN path (:func:`fastattn.ops.attention.varlen_forward`
/ ``varlen_backward``) over every sequence: each program finds its sequence in the offsets on the device, so
nothing is padded or copied and nothing is read on the host (no sync; the fake never reads the offsets, so
``torch.compile(fullgraph=True)`` traces it). Window, softcap, ALiBi, sinks, GQA and dropout run in the kernels.
Rows past ``cu_seq_q[-1]`` belong to no sequence: kernels/varlen.py's ``_varlen_tail`` writes them (0, lse -inf).
Where the kernels cannot serve a call (:func:`kernel_reason`: head dim above 256, fp32 without TF32 above 128, CPU
without the interpreter, ...) the eager reference runs with a one-time ``FallbackWarning``.

``seqused_k`` and a paged ``block_table`` (inference only, as torch) run the KV-cache kernel of
:mod:`fastattn.ops.kvcache` (the VARLEN path takes each sequence's keys as ``cu_seq_k[b]:cu_seq_k[b + 1]``, not a
used prefix or pages): one launch per sequence with queries, the offsets read on the host.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from fastattn import _runtime, reference
from fastattn.hwfit import KernelSpec
from fastattn.kernels import varlen as K
from fastattn.ops import attention as attn_ops
from fastattn.ops import kvcache as kv_ops
from fastattn.ops._common import (
    check_alibi_no_grad,
    check_float_dtype,
    check_window_softcap,
    draw_seed,
    dtype_name,
    seed_int,
    stat_dtype,
)

try:  # torch >= 2.10
    from torch.nn.attention.varlen import AuxRequest
except ImportError:  # pragma: no cover - older torch: the same request, ours

    class AuxRequest(NamedTuple):
        """Which auxiliary outputs ``varlen_attn`` returns (torch's ``torch.nn.attention.varlen.AuxRequest``)."""

        lse: bool = False


_OP = "varlen_attn"
# What the packed path launches, once per call whatever the number of sequences (tests and benchmarks check these
# ran, not the eager fallback): the attention kernels' VARLEN specialisations, and the rows past the last sequence.
FORWARD_KERNELS = attn_ops.FORWARD_KERNELS + (_runtime.kernel_name(K._varlen_tail),)
BACKWARD_KERNELS = attn_ops.BACKWARD_KERNELS
PAGED_KERNELS = kv_ops.FORWARD_KERNELS  # seqused_k / block_table (forward only)
MIN_PAGE = 16  # the KV-cache kernels take pages of a multiple of 16 positions
_TAIL_ROWS, _TAIL_WARPS = 32, 4  # rows per program of _varlen_tail, and its warps


# ---------------------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_scalars(max_q, max_k, return_aux, scale, window_size, enable_gqa, num_splits, softcap, dropout_p) -> None:
    for name, n in (("max_q", max_q), ("max_k", max_k)):
        if not _is_int(n) or n < 0:
            raise TypeError(f"fastattn.{_OP}: {name} must be an int >= 0 (the longest sequence); got {n!r}")
    if return_aux is not None and not isinstance(return_aux, AuxRequest):
        raise TypeError(f"fastattn.{_OP}: return_aux must be None or torch.nn.attention.varlen.AuxRequest; got "
                        f"{type(return_aux).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"fastattn.{_OP}: scale must be a finite float or None (1/sqrt(D)); got {scale!r}")
    check_window_softcap(_OP, window_size, softcap)
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"fastattn.{_OP}: enable_gqa must be a bool; got {type(enable_gqa).__name__}")
    if num_splits is not None and (not _is_int(num_splits) or num_splits < 0):
        raise ValueError(f"fastattn.{_OP}: num_splits must be None or an int >= 0; got {num_splits!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastattn.{_OP}: dropout_p must be a float in [0, 1); got {dropout_p!r}")


def _check_tensors(query, key, value, cu_seq_q, cu_seq_k, enable_gqa, seqused_k, block_table, alibi_slopes,
                   sinks) -> None:
    named = {"query": query, "key": key, "value": value, "cu_seq_q": cu_seq_q, "cu_seq_k": cu_seq_k,
             "seqused_k": seqused_k, "block_table": block_table, "alibi_slopes": alibi_slopes, "sinks": sinks}
    for name, t in named.items():
        if (t is not None or name in ("query", "key", "value", "cu_seq_q")) and not isinstance(t, Tensor):
            raise TypeError(f"fastattn.{_OP}: {name} must be a Tensor; got {type(t).__name__}")
    check_float_dtype(_OP, "query", query)
    for name in ("key", "value"):
        if named[name].dtype != query.dtype:
            raise TypeError(f"fastattn.{_OP}: {name} must have query's dtype {dtype_name(query.dtype)}; got "
                            f"{dtype_name(named[name].dtype)}")
    _runtime.check_same_device(_OP, **named)
    paged = block_table is not None
    if query.dim() != 3:
        raise ValueError(f"fastattn.{_OP}: query must be (T_q, H, D); got shape {_shape(query)}")
    want = 4 if paged else 3
    for name in ("key", "value"):
        if named[name].dim() != want:
            raise ValueError(f"fastattn.{_OP}: {name} must be " + ("(pages, page_size, H_kv, D) with a block_table"
                             if paged else "(T_k, H_kv, D)") + f"; got shape {_shape(named[name])}")
    _, H, D = query.shape
    if key.shape[:-1] != value.shape[:-1] or key.size(-1) != D:
        raise ValueError(f"fastattn.{_OP}: key must have query's head dim {D} and value key's leading dims; got "
                         f"query {_shape(query)}, key {_shape(key)}, value {_shape(value)}")
    if min(D, value.size(-1)) == 0:
        raise ValueError(f"fastattn.{_OP}: head dims must be >= 1; got query {_shape(query)}, value {_shape(value)}")
    Hkv = key.size(-2)
    if not enable_gqa and H != Hkv:
        raise ValueError(f"fastattn.{_OP}: query and key/value must have the same number of heads unless "
                         f"enable_gqa=True; got H={H} and H_kv={Hkv}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"fastattn.{_OP}: query's heads ({H}) must be a multiple of key/value's heads ({Hkv})")
    for name in ("cu_seq_q", "cu_seq_k"):
        cu = named[name]
        if cu is not None and (cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() == 0):
            raise ValueError(f"fastattn.{_OP}: {name} must be int32 of shape (N + 1,), the sequences' offsets; got "
                             f"{_shape(cu)} {dtype_name(cu.dtype)}")
    N = cu_seq_q.numel() - 1
    if cu_seq_k is not None and cu_seq_k.numel() != N + 1:
        raise ValueError(f"fastattn.{_OP}: cu_seq_k must have cu_seq_q's length {N + 1}; got {cu_seq_k.numel()}")
    if cu_seq_k is None and not paged:
        raise ValueError(f"fastattn.{_OP}: cu_seq_k is needed unless the keys are paged (block_table); got None")
    if seqused_k is not None and (seqused_k.dtype != torch.int32 or _shape(seqused_k) != (N,)):
        raise ValueError(f"fastattn.{_OP}: seqused_k must be int32 of shape ({N},); got {_shape(seqused_k)} "
                         f"{dtype_name(seqused_k.dtype)}")
    if paged:
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.size(0) != N:
            raise ValueError(f"fastattn.{_OP}: block_table must be int32 (N={N}, max_pages); got "
                             f"{_shape(block_table)} {dtype_name(block_table.dtype)}")
        if seqused_k is None:
            raise ValueError(f"fastattn.{_OP}: block_table needs seqused_k (each sequence's number of keys)")
    if alibi_slopes is not None and (alibi_slopes.dtype != torch.float32
                                     or _shape(alibi_slopes) not in ((H,), (N, H))):
        raise ValueError(f"fastattn.{_OP}: alibi_slopes must be float32 of shape ({H},) or ({N}, {H}); got "
                         f"{_shape(alibi_slopes)} {dtype_name(alibi_slopes.dtype)}")
    if sinks is not None and (sinks.dtype not in (torch.float32, query.dtype) or _shape(sinks) != (H,)):
        raise ValueError(f"fastattn.{_OP}: sinks must be float32 (or query's dtype) of shape ({H},); got "
                         f"{_shape(sinks)} {dtype_name(sinks.dtype)}")
    check_alibi_no_grad(_OP, alibi_slopes)


def _host_values_ok(t: Tensor) -> bool:
    """Whether ``t``'s values can be read without a device sync or a graph break: a real CPU tensor, not traced."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(t)


def _offsets(name: str, cu: Tensor, total: int) -> list[int]:
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"fastattn.{_OP}: {name} must start at 0; got {values[0]}")
    if any(b < a for a, b in itertools.pairwise(values)):
        raise ValueError(f"fastattn.{_OP}: {name} must be non-decreasing (offsets of sequences back to back); got "
                         f"{values}")
    if values[-1] > total:
        raise ValueError(f"fastattn.{_OP}: {name} ends at {values[-1]}, past the {total} rows of "
                         f"{'query' if name == 'cu_seq_q' else 'key/value'}")
    return values


def check_offsets(query: Tensor, key: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor | None, max_q: int, max_k: int,
                  seqused_k: Tensor | None = None, block_table: Tensor | None = None) -> None:
    """The checks of the offsets' *values*, which need them on the host: ``cu_seq_*`` starting at 0, non-decreasing
    and within the tensors, ``max_q``/``max_k`` at least every sequence's length, ``seqused_k`` within each
    sequence's keys (or its pages), the used pages of ``block_table`` inside ``key``. Callers make them only where
    that costs no device sync (:func:`_host_values_ok`)."""
    q = _offsets("cu_seq_q", cu_seq_q, query.size(0))
    lens_q = [b - a for a, b in itertools.pairwise(q)]
    if block_table is not None:
        page, pages = key.size(1), key.size(0)
        capacity = block_table.size(1) * page
        lens_k = seqused_k.tolist()
        for b, n in enumerate(lens_k):
            if not 0 <= n <= capacity:
                raise ValueError(f"fastattn.{_OP}: seqused_k[{b}] = {n} is outside [0, {capacity}], the positions "
                                 f"of block_table's {block_table.size(1)} pages of {page}")
            used = block_table[b, : -(-n // page)]
            if ((used < 0) | (used >= pages)).any():
                raise ValueError(f"fastattn.{_OP}: block_table row {b} names pages outside key's {pages} pages: "
                                 f"{used.tolist()}")
    else:
        k = _offsets("cu_seq_k", cu_seq_k, key.size(0))
        lens_k = [b - a for a, b in itertools.pairwise(k)]
        if seqused_k is not None:
            used = seqused_k.tolist()
            bad = [b for b, (n, cap) in enumerate(zip(used, lens_k)) if not 0 <= n <= cap]
            if bad:
                b = bad[0]
                raise ValueError(f"fastattn.{_OP}: seqused_k[{b}] = {used[b]} is outside [0, {lens_k[b]}], the "
                                 f"keys of sequence {b} in cu_seq_k")
            lens_k = used
    for name, bound, lens in (("max_q", max_q, lens_q), ("max_k", max_k, lens_k)):
        if lens and max(lens) > bound:
            b = lens.index(max(lens))
            raise ValueError(f"fastattn.{_OP}: {name} = {bound} is smaller than sequence {b}'s length {lens[b]}")


# ---------------------------------------------------------------------------------------------------------------
# what serves a call
# ---------------------------------------------------------------------------------------------------------------


def kernel_reason(query: Tensor, key: Tensor, value: Tensor, sinks: Tensor | None = None,
                  block_table: Tensor | None = None, seqused_k: Tensor | None = None,
                  num_splits: int | None = None) -> str | None:
    """Why the kernels cannot serve this call (None: they can), which then runs the eager reference."""
    if seqused_k is not None or block_table is not None:  # the KV-cache kernels, one sequence at a time
        if sinks is not None:
            return "the KV-cache kernels have no sinks"
        if block_table is not None and key.size(1) % MIN_PAGE != 0:
            return f"the KV-cache kernels take pages of a multiple of {MIN_PAGE} positions, not {key.size(1)}"
        k_cache = key if block_table is not None else key[None]
        return kv_ops._fallback(query[None], k_cache, value if block_table is not None else value[None],
                                block_table, num_splits or 0)[0]
    return attn_ops.fused_reason(query, query.size(-1), value.size(-1))


# ---------------------------------------------------------------------------------------------------------------
# the launchers: one VARLEN launch of the attention kernels over every sequence
# ---------------------------------------------------------------------------------------------------------------


def _tail(out: Tensor | None, lse: Tensor, cu_seq_q: Tensor, lse_fill: float = -math.inf) -> None:
    """Rows of ``out (T_q, H, DV)`` / ``lse (H, T_q)`` past ``cu_seq_q[-1]`` (no sequence's) set to 0 / ``lse_fill``
    in place (``out=None``: lse only), without reading the offsets on the host."""
    H, T = lse.shape
    if T * H == 0:
        return
    DV, out_strides = (out.size(-1), out.stride()) if out is not None else (1, (0, 0, 0))
    _runtime.launch(K._varlen_tail, (triton.cdiv(T, _TAIL_ROWS), H), out, lse, cu_seq_q, *out_strides,
                    *lse.stride(), T, DV, cu_seq_q.numel() - 1, lse_fill, BLOCK_T=_TAIL_ROWS,
                    BLOCK_DV=max(16, triton.next_power_of_2(DV)), num_warps=_TAIL_WARPS)


def _varlen_forward(query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor, max_q: int,
                    max_k: int, scale: float, window_left: int, window_right: int, softcap: float,
                    alibi_slopes: Tensor | None, sinks: Tensor | None, dropout_p: float,
                    seed: Tensor | None) -> tuple[Tensor, Tensor]:
    """``out (T_q, H, DV)``, ``lse (H, T_q)`` of the packed sequences: the attention kernels' VARLEN forward (one
    launch), then the rows past the last sequence (:func:`_tail`)."""
    out, lse = attn_ops.varlen_forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                       window_size=(window_left, window_right), softcap=softcap,
                                       alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p,
                                       seed=seed_int(seed))
    _tail(out, lse, cu_seq_q)
    return out, lse


def _sink_lse(lse: Tensor, cu_seq_q: Tensor) -> Tensor:
    """``lse`` as the backward reads it with sinks: a copy with +inf on the rows past the last sequence, which join
    no sink's sum (their ``exp(sink - lse)`` must be 0, not ``exp(+inf)``)."""
    lse = lse.clone()
    _tail(None, lse, cu_seq_q, math.inf)
    return lse


def backward_scratch_bytes(lse: Tensor, has_sinks: bool) -> int:
    """Bytes :func:`_varlen_backward` allocates besides its results, for a forward's ``lse (H, T_q)`` (any device):
    the attention backward's (:func:`fastattn.ops.attention.backward_scratch_bytes`) and, with sinks,
    :func:`_sink_lse`'s copy, alive with them."""
    own = lse.numel() * lse.element_size() if has_sinks else 0
    return attn_ops.backward_scratch_bytes(lse, has_sinks) + own


def _varlen_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                     grad_lse: Tensor | None, cu_seq_q: Tensor, cu_seq_k: Tensor, max_q: int, max_k: int,
                     scale: float, window_left: int, window_right: int, softcap: float,
                     alibi_slopes: Tensor | None, sinks: Tensor | None, dropout_p: float,
                     seed: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dq``, ``dk``, ``dv`` (and ``dsinks``, empty without sinks) of :func:`_varlen_forward`: the VARLEN backward
    (one launch of each backward kernel) from the saved output and log-sum-exp."""
    if sinks is not None:
        lse = _sink_lse(lse, cu_seq_q)
    dq, dk, dv, dsinks = attn_ops.varlen_backward(
        grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
        window_size=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
        dropout_p=dropout_p, seed=seed_int(seed), dlse=grad_lse)
    return dq, dk, dv, dsinks if dsinks is not None else query.new_zeros((0,))


def _segments(cu_seq_q: Tensor, cu_seq_k: Tensor | None) -> list[tuple[int, int, int, int]]:
    """(q0, q1, k0, k1) of each sequence (k0 = k1 = 0 without cu_seq_k): a host read of the offsets (the KV-cache
    path only)."""
    q = cu_seq_q.tolist()
    k = cu_seq_k.tolist() if cu_seq_k is not None else [0] * len(q)
    return [(q[b], q[b + 1], k[b], k[b + 1]) for b in range(len(q) - 1)]


def _cache_forward(query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor | None,
                   seqused_k: Tensor, block_table: Tensor | None, alibi_slopes: Tensor | None, scale: float,
                   window_left: int, window_right: int, softcap: float, num_splits: int) -> tuple[Tensor, Tensor]:
    """``seqused_k`` (and pages): each sequence with queries through the KV-cache kernel, its keys as a one-sequence
    dense cache (a view of the packed keys) or its row of ``block_table``: one launch per such sequence."""
    T_q, H, _ = query.shape
    out = query.new_zeros((T_q, H, value.size(-1)))
    lse = torch.full((H, T_q), float("-inf"), dtype=stat_dtype(query.dtype), device=query.device)
    for b, (q0, q1, k0, k1) in enumerate(_segments(cu_seq_q, cu_seq_k)):
        if q1 == q0:
            continue
        if block_table is not None:
            k_cache, v_cache, table = key, value, block_table[b: b + 1]
        else:
            k_cache, v_cache, table = key[k0:k1][None], value[k0:k1][None], None
        slopes = alibi_slopes[b: b + 1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        o, x = kv_ops.kvcache_attention_op(query[q0:q1][None], k_cache, v_cache, seqused_k[b: b + 1], table, slopes,
                                           0, scale, False, window_left, window_right, softcap, num_splits)
        out[q0:q1], lse[:, q0:q1] = o[0], x[0].transpose(0, 1)
    return out, lse


def dropout_mask(seed: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor, heads: int, max_q: int, max_k: int,
                 dropout_p: float) -> Tensor:
    """The keep-mask the kernels draw for ``seed``, as ``(N, heads, max_q, max_k)`` over the padded positions (what
    ``fastattn.reference.varlen_attn``'s ``dropout_mask`` takes, to replay it in tests): head h keeps query row i of
    sequence b with key j iff ``philox(seed; cu_seq_k[b] + j, cu_seq_q[b] + i, h) >= dropout_p``, counters in the
    packed tensors, drawn here for every (query row, key row) pair (O(heads T_q T_k) memory: for tests)."""
    T_q, T_k = int(cu_seq_q[-1]), int(cu_seq_k[-1])
    packed = (attn_ops.dropout_keep_mask(seed_int(seed), (1, heads, T_q, T_k), dropout_p, cu_seq_q.device)[0]
              if T_q * T_k else torch.zeros((heads, T_q, T_k), dtype=torch.bool, device=cu_seq_q.device))
    packed = torch.nn.functional.pad(packed, (0, 1, 0, 1))  # row T_q / column T_k: the padding, never kept
    rows_q, _ = reference.varlen_rows(cu_seq_q, max_q, T_q)
    rows_k, _ = reference.varlen_rows(cu_seq_k, max_k, T_k)
    return packed[:, rows_q[:, :, None], rows_k[:, None, :]].transpose(0, 1)


# ---------------------------------------------------------------------------------------------------------------
# custom ops + autograd
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastattn::varlen_attention", mutates_args=(), device_types=None)
def varlen_attention_op(query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor | None,
                        seqused_k: Tensor | None, block_table: Tensor | None, alibi_slopes: Tensor | None,
                        sinks: Tensor | None, seed: Tensor | None, max_q: int, max_k: int, scale: float,
                        window_left: int, window_right: int, softcap: float, dropout_p: float,
                        num_splits: int) -> tuple[Tensor, Tensor]:
    """Packed attention -> ``(out (T_q, H, DV), lse (H, T_q))``; with ``seqused_k`` the KV-cache path."""
    if _host_values_ok(cu_seq_q):
        check_offsets(query, key, cu_seq_q, cu_seq_k, max_q, max_k, seqused_k, block_table)
    if seqused_k is not None:
        if dropout_p > 0.0:
            raise ValueError(f"fastattn.{_OP}: seqused_k and block_table are inference only: no dropout_p")
        return _cache_forward(query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table, alibi_slopes, scale,
                              window_left, window_right, softcap, num_splits)
    return _varlen_forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_left, window_right,
                           softcap, alibi_slopes, sinks, dropout_p, seed)


@varlen_attention_op.register_fake
def _(query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table, alibi_slopes, sinks, seed, max_q, max_k, scale,
      window_left, window_right, softcap, dropout_p, num_splits):
    T_q, H, _ = query.shape
    return query.new_empty((T_q, H, value.size(-1))), query.new_empty((H, T_q), dtype=stat_dtype(query.dtype))


@torch.library.custom_op("fastattn::varlen_attention_backward", mutates_args=(), device_types=None)
def varlen_attention_backward_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                                 lse: Tensor, grad_lse: Tensor | None, cu_seq_q: Tensor, cu_seq_k: Tensor,
                                 alibi_slopes: Tensor | None, sinks: Tensor | None, seed: Tensor | None, max_q: int,
                                 max_k: int, scale: float, window_left: int, window_right: int, softcap: float,
                                 dropout_p: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv, dsinks)`` of ``fastattn::varlen_attention``; dsinks is empty without sinks."""
    return _varlen_backward(grad_out, query, key, value, out, lse, grad_lse, cu_seq_q, cu_seq_k, max_q, max_k,
                            scale, window_left, window_right, softcap, alibi_slopes, sinks, dropout_p, seed)


@varlen_attention_backward_op.register_fake
def _(grad_out, query, key, value, out, lse, grad_lse, cu_seq_q, cu_seq_k, alibi_slopes, sinks, seed, max_q, max_k,
      scale, window_left, window_right, softcap, dropout_p):
    def grad(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    dsinks = torch.empty_like(sinks, dtype=torch.float32) if sinks is not None else query.new_empty((0,))
    return grad(query), grad(key), grad(value), dsinks


def _setup_context(ctx, inputs, output):
    (query, key, value, cu_seq_q, cu_seq_k, _, _, alibi_slopes, sinks, seed, *scalars) = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, cu_seq_q, cu_seq_k, out, lse, alibi_slopes, sinks, seed)
    ctx.scalars = scalars[:-1]  # max_q, max_k, scale, window_left, window_right, softcap, dropout_p
    ctx.set_materialize_grads(False)  # an unused lse arrives as None


def _backward_autograd(ctx, grad_out, grad_lse):
    query, key, value, cu_seq_q, cu_seq_k, out, lse, alibi_slopes, sinks, seed = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dsinks = varlen_attention_backward_op(grad_out, query, key, value, out, lse, grad_lse, cu_seq_q,
                                                      cu_seq_k, alibi_slopes, sinks, seed, *ctx.scalars)
    dsinks = dsinks.to(sinks.dtype) if sinks is not None and ctx.needs_input_grad[8] else None
    return (dq, dk, dv, None, None, None, None, None, dsinks) + (None,) * 9


varlen_attention_op.register_autograd(_backward_autograd, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


def varlen_attn(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux: AuxRequest | None = None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: Tensor | None = None,
    block_table: Tensor | None = None,
    num_splits: int | None = None,
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over packed variable-length sequences: ``torch.nn.attention.varlen.varlen_attn``'s signature and
    semantics (torch 2.13), plus fastattn's keyword extras ``softcap``, ``alibi_slopes``, ``sinks``, ``dropout_p``.

    ``query (T_q, H, D)``, ``key``/``value (T_k, H_kv, D|DV)``; ``cu_seq_q``/``cu_seq_k`` int32 ``(N + 1,)``
    offsets: sequence b is ``query[cu_seq_q[b]:cu_seq_q[b + 1]]`` (``Lq_b`` rows) attending to
    ``key[cu_seq_k[b]:cu_seq_k[b + 1]]`` (``N_b`` keys) only. ``max_q``/``max_k``: the longest lengths.
    ``window_size=(left, right)``: key j visible from query i iff ``i + N_b - Lq_b - left <= j <= i + N_b - Lq_b +
    right``, negative = unbounded, so ``(-1, 0)`` is causal aligned bottom-right per sequence. ``enable_gqa``: H a
    multiple of H_kv (otherwise they must be equal). ``scale``: default ``1/sqrt(D)``. Returns ``out (T_q, H, DV)``;
    with ``return_aux=AuxRequest(lse=True)`` also ``lse (H, T_q)`` fp32, natural log, -inf for a row with no
    visible key (whose output is 0): the layout torch returns (its docstring says ``(T_q, H)``). Rows past
    ``cu_seq_q[-1]`` are 0.

    ``seqused_k (N,)`` int32: only the first ``seqused_k[b]`` keys of each sequence take part; ``block_table (N,
    max_pages)`` int32 with ``key``/``value (pages, page_size, H_kv, D)``: paged keys (needs ``seqused_k``; then
    ``cu_seq_k`` may be None). Both are inference only, as in torch, and run the KV-cache kernels (``num_splits``:
    their split-KV count, 0/None = automatic; the packed path never splits keys). Extras: ``softcap > 0`` caps the
    scaled scores ``softcap tanh(s / softcap)``; ``alibi_slopes (H,)`` or ``(N, H)`` fp32 subtract ``slope |i + N_b
    - Lq_b - j|`` (no gradient: slopes that require grad raise); ``sinks (H,)`` one logit per head joining every
    row's denominator (it attends to nothing; lse includes it; differentiable); ``dropout_p`` on the
    probabilities: one seed per call from torch's default generator, and head h drops query row r with key row c
    of the packed tensors iff ``philox(seed; c, r, h) < dropout_p`` (the backward redraws the same), so no two
    sequences share a draw and a sequence's mask depends on where it is packed.

    Bad input raises naming the argument; the checks of the offsets' values (start at 0, non-decreasing, within
    the tensors, ``max_q``/``max_k`` large enough, ``seqused_k``) run on CPU tensors only: on a GPU they would
    cost a sync, so there invalid offsets give undefined results, as in torch.
    """
    _check_scalars(max_q, max_k, return_aux, scale, window_size, enable_gqa, num_splits, softcap, dropout_p)
    _check_tensors(query, key, value, cu_seq_q, cu_seq_k, enable_gqa, seqused_k, block_table, alibi_slopes, sinks)
    left, right = (w if w >= 0 else -1 for w in window_size)
    cache = seqused_k is not None or block_table is not None
    if cache:
        if dropout_p > 0.0:
            raise ValueError(f"fastattn.{_OP}: seqused_k and block_table are inference only: no dropout_p")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (query, key, value, alibi_slopes, sinks)):
            raise RuntimeError(f"fastattn.{_OP}: seqused_k and block_table are inference-only parameters (as in "
                               "torch): call under torch.no_grad() or torch.inference_mode()")
    sm_scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else float(scale)
    reason = kernel_reason(query, key, value, sinks, block_table, seqused_k, num_splits)
    want_lse = return_aux is not None and return_aux.lse
    if reason is not None:
        _runtime.warn_fallback(_OP, reason)
        if _host_values_ok(cu_seq_q):
            check_offsets(query, key, cu_seq_q, cu_seq_k, max_q, max_k, seqused_k, block_table)
        return reference.varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux,
                                     scale=sm_scale, window_size=(left, right), seqused_k=seqused_k,
                                     block_table=block_table, softcap=float(softcap), alibi_slopes=alibi_slopes,
                                     sinks=sinks, dropout_p=float(dropout_p))
    out, lse = varlen_attention_op(query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table, alibi_slopes, sinks,
                                   draw_seed(float(dropout_p)), max_q, max_k, sm_scale, left, right, float(softcap),
                                   float(dropout_p), num_splits or 0)
    return (out, lse) if want_lse else out


def _tail_args(dtype: torch.dtype | None, dv: int) -> dict:
    """Arguments of a :func:`_tail` launch over 4000 packed rows of 8 heads, on the meta device (``dtype`` None:
    lse only)."""
    out = torch.empty((4000, 8, dv), device="meta", dtype=dtype) if dtype is not None else None
    lse = torch.empty((8, 4000), device="meta", dtype=torch.float32)
    cu = torch.empty((3,), device="meta", dtype=torch.int32)
    return {"Out": out, "Lse": lse, "CuQ": cu, **dict(zip(("stride_ot", "stride_oh", "stride_od"),
                                                          out.stride() if out is not None else (0, 0, 0))),
            **dict(zip(("stride_lh", "stride_lt"), lse.stride())), "T": 4000, "DV": dv, "B": 2,
            "lse_fill": -math.inf if out is not None else math.inf}


def kernel_specs() -> list[KernelSpec]:
    """What the packed path launches, for ``fastattn.hwfit``: the attention kernels' VARLEN specialisations at every
    tile their tables give (:func:`fastattn.ops.attention.kernel_specs` with ``varlen=True``) and
    :func:`_tail` for each dtype and padded value head dim. Its other kernels are specialisations listed by the ops
    that own them: ``_attn_bwd_preprocess`` (no VARLEN flag: the same compile as attention's) and, for
    ``seqused_k`` / ``block_table``, the KV-cache kernel (kvcache's)."""
    specs = attn_ops.kernel_specs(varlen=True)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, None):
        for block_dv in (16, 32, 64, 128, 256) if dtype is not None else (16,):
            specs.append(KernelSpec("varlen", K._varlen_tail, _tail_args(dtype, block_dv),
                                    triton.Config({"BLOCK_T": _TAIL_ROWS, "BLOCK_DV": block_dv},
                                                  num_warps=_TAIL_WARPS),
                                    f"{dtype_name(dtype)} DV<={block_dv}" if dtype is not None else "lse only"))
    return specs
