"""Ring (context-parallel) attention over a sequence sharded along its length across the ranks of a process group.

Each of the ``R`` ranks holds ``q``, ``k``, ``v`` of shape ``(B, H, L_local, D)``: its share of the sequence's
``R * L_local`` tokens, in one of two layouts (:func:`shard_sequence` cuts a whole sequence that way):

- ``"contiguous"``: rank ``r`` holds tokens ``[r L_local, (r + 1) L_local)``;
- ``"zigzag"``: the sequence cut into ``2R`` chunks, rank ``r`` holds chunks ``r`` and ``2R - 1 - r`` (in that order).
  Under a causal mask every rank then does the same work (in ``"contiguous"`` rank ``R - 1`` does ``R`` blocks and
  rank 0 one).

Forward, step ``t = 0 .. R-1``: rank ``r`` holds the key/value block of rank ``s = (r - t) mod R`` and passes it on
to rank ``r + 1`` while it computes ``fastattn.attention(q_rows, k_keys, v_keys, return_lse=True)`` on the part
that block contributes (:func:`ring_schedule`: nothing for a block wholly in the future, causal for its own block,
full attention otherwise), then folds it into a float32 running result with ``fastattn.merge_attention``, which
combines attention over disjoint key sets by their log-sum-exps. The result is rounded to the inputs' dtype once.

Backward: the reverse ring. With the final output ``O`` and log-sum-exp ``lse`` saved, the gradient of each block
is the FlashAttention-2 backward of that block alone, ``p_ij = exp(s_ij - lse_i)``, ``dS = p (dP - rowsum(dO O))``
(fastattn's attention backward kernels, given the global ``O`` and ``lse``): ``dq`` accumulates on its rank while
the float32 ``dk``/``dv`` partials travel around the ring with their block and arrive back at the block's owner
after ``R`` hops. Every sum runs in a fixed order, so the result does not depend on message timing. Memory per
rank: one extra key/value block in flight and, in the backward, its float32 ``dk``/``dv``; nothing is gathered.

Communication is ``torch.distributed`` point-to-point (``batch_isend_irecv``, posted before each step's compute
so the transfer overlaps it). Tested with the gloo backend on CPU processes only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from fastattn import _runtime
from fastattn.ops import attention as _attn
from fastattn.ops._common import stat_dtype
from fastattn.ops.merge_attention import merge_attention

LAYOUTS = ("contiguous", "zigzag")
_OP = "distributed.ring_attention"

__all__ = ["LAYOUTS", "RingStep", "ring_attention", "ring_schedule", "shard_sequence", "unshard_sequence"]


class RingStep(NamedTuple):
    """What one rank computes at one step of the ring: the local query ``rows`` against the ``keys`` of the key/value
    block that rank ``source`` holds (empty ``rows``: the block is skipped), causal (top-left, within the tile) or
    not."""

    source: int
    rows: slice
    keys: slice
    causal: bool


def ring_schedule(world_size: int, rank: int, local_len: int, *, is_causal: bool = False,
                  layout: str = "contiguous") -> list[RingStep]:
    """The steps of ring attention on ``rank`` (a pure function: the communication and the kernel calls follow it).

    Step ``t`` holds the block of rank ``(rank - t) mod world_size``. Without a causal mask every step is the full
    tile. Causal, ``"contiguous"``: the rank's own block is causal, earlier ranks' blocks full, later ones skipped.
    Causal, ``"zigzag"`` (chunks of ``C = local_len / 2``): the own block is causal (its two chunks are in sequence
    order); an earlier rank's block: every row against its first chunk (its second lies in the future of both of
    ours); a later rank's block: our second chunk against both of its chunks (both lie in the future of our
    first)."""
    _check_layout(layout, local_len)
    every, none = slice(0, local_len), slice(0, 0)
    steps = []
    for t in range(world_size):
        source = (rank - t) % world_size
        if not is_causal:
            steps.append(RingStep(source, every, every, False))
        elif source == rank:
            steps.append(RingStep(source, every, every, True))
        elif layout == "contiguous":
            steps.append(RingStep(source, every if source < rank else none, every, False))
        elif source < rank:
            steps.append(RingStep(source, every, slice(0, local_len // 2), False))
        else:
            steps.append(RingStep(source, slice(local_len // 2, local_len), every, False))
    return steps


def _check_layout(layout: str, local_len: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"fastattn.{_OP}: layout must be one of {LAYOUTS}; got {layout!r}")
    if layout == "zigzag" and local_len % 2:
        raise ValueError(f"fastattn.{_OP}: layout='zigzag' holds two chunks per rank, so the local sequence length "
                         f"must be even; got {local_len}")


def shard_sequence(x: Tensor, world_size: int, rank: int, *, layout: str = "contiguous", dim: int = -2) -> Tensor:
    """Rank ``rank``'s share of the whole sequence ``x`` (length along ``dim``) in ``layout`` (a view for
    ``"contiguous"``, a copy for ``"zigzag"``)."""
    n = x.size(dim)
    parts = world_size if layout == "contiguous" else 2 * world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"fastattn.distributed.shard_sequence: need 0 <= rank < world_size; got rank={rank}, "
                         f"world_size={world_size}")
    if layout not in LAYOUTS:
        raise ValueError(f"fastattn.distributed.shard_sequence: layout must be one of {LAYOUTS}; got {layout!r}")
    if n % parts:
        raise ValueError(f"fastattn.distributed.shard_sequence: a sequence of {n} along dim {dim} does not split into "
                         f"{parts} equal chunks ({layout!r} over {world_size} ranks)")
    chunks = x.chunk(parts, dim)
    if layout == "contiguous":
        return chunks[rank]
    return torch.cat([chunks[rank], chunks[parts - 1 - rank]], dim)


def unshard_sequence(shards: Sequence[Tensor], *, layout: str = "contiguous", dim: int = -2) -> Tensor:
    """The whole sequence from every rank's share (``shards[r]`` of rank ``r``), the inverse of
    :func:`shard_sequence`."""
    if layout not in LAYOUTS:
        raise ValueError(f"fastattn.distributed.unshard_sequence: layout must be one of {LAYOUTS}; got {layout!r}")
    if layout == "contiguous":
        return torch.cat(list(shards), dim)
    halves = [s.chunk(2, dim) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


# ---------------------------------------------------------------------------------------------------------------
# the ring
# ---------------------------------------------------------------------------------------------------------------


class _Ring:
    """The rank's neighbours in ``group`` and one exchange: send to the next rank, receive from the previous."""

    def __init__(self, group) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError(f"fastattn.{_OP}: this process (global rank {dist.get_rank()}) is not in group")
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, tensors: Sequence[Tensor], tag: int) -> tuple[list, list[Tensor]]:
        sends = [t.contiguous() for t in tensors]
        recvs = [torch.empty_like(t) for t in sends]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in sends]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for t in recvs]
        return dist.batch_isend_irecv(ops), recvs

    @staticmethod
    def finish(pending: tuple[list, list[Tensor]]) -> list[Tensor]:
        works, recvs = pending
        for work in works:
            work.wait()
        return recvs


_KV, _DKV = 0, 1  # message tags


def _block_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                    scale: float, fused: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of one block given the whole attention's ``out`` and ``lse`` (all ``(B, H, L, D)`` / ``(B, H, L)``,
    ``k``/``v`` with ``H_kv`` heads)."""
    if fused:
        dq, dk, dv, *_ = _attn.attention_backward_op(do, q, k, v, out, lse.contiguous(), None, None, 0.0, None,
                                                     causal, 0, scale, False)
        return dq, dk, dv
    acc = stat_dtype(q.dtype)  # the eager fallback: the same formulas in float32
    group = q.size(1) // k.size(1)
    q, k, v, do, out = (t.to(acc) for t in (q, k, v, do, out))
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ kk.mT) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
    p = (s - lse[..., None].to(acc)).exp()
    ds = p * (do @ vv.mT - (do * out).sum(-1, keepdim=True))
    dq = (ds @ kk) * scale
    dk = ((ds.mT @ q) * scale).unflatten(1, (-1, group)).sum(2)
    dv = (p.mT @ do).unflatten(1, (-1, group)).sum(2)
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, ring: _Ring, steps: list[RingStep], scale: float) -> Tensor:
        gqa = q.size(1) != k.size(1)
        acc_dtype = stat_dtype(q.dtype)
        kv = [k, v]
        out = lse = None
        for t, step in enumerate(steps):
            pending = ring.start(kv, _KV) if t + 1 < len(steps) else None
            if step.rows.stop > step.rows.start:
                part, part_lse = _attn.attention(q[:, :, step.rows], kv[0][:, :, step.keys], kv[1][:, :, step.keys],
                                                 is_causal=step.causal, scale=scale, enable_gqa=gqa, return_lse=True)
                if out is None:  # step 0: the rank's own block, every row
                    out, lse = part.to(acc_dtype), part_lse
                else:
                    rows = step.rows
                    merged, merged_lse = merge_attention([out[:, :, rows], part.to(acc_dtype)],
                                                         [lse[:, :, rows], part_lse])
                    out[:, :, rows], lse[:, :, rows] = merged, merged_lse
            if pending is not None:
                kv = ring.finish(pending)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.steps, ctx.scale = ring, steps, scale
        ctx.fused = _attn.fused_reason(q, q.size(-1), v.size(-1)) is None
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        ring, steps = ctx.ring, ctx.steps
        acc_dtype = stat_dtype(q.dtype)
        if not ctx.fused:
            _runtime.warn_fallback(_OP, _attn.fused_reason(q, q.size(-1), v.size(-1)) or "")
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        kv = [k, v]
        dkv = [torch.zeros(k.shape, dtype=acc_dtype, device=k.device),
               torch.zeros(v.shape, dtype=acc_dtype, device=v.device)]  # the partials of the block held now
        for t, step in enumerate(steps):
            pending = ring.start(kv, _KV) if t + 1 < len(steps) else None
            rows, keys = step.rows, step.keys
            if rows.stop > rows.start:
                dq_b, dk_b, dv_b = _block_backward(dout[:, :, rows], q[:, :, rows], kv[0][:, :, keys],
                                                   kv[1][:, :, keys], out[:, :, rows], lse[:, :, rows], step.causal,
                                                   ctx.scale, ctx.fused)
                dq[:, :, rows] += dq_b
                dkv[0][:, :, keys] += dk_b
                dkv[1][:, :, keys] += dv_b
            if ring.size > 1:  # on to the next rank, which holds this block at the next step (home after R hops)
                dkv = ring.finish(ring.start(dkv, _DKV))
            if pending is not None:
                kv = ring.finish(pending)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None, *,
                   is_causal: bool = False, scale: float | None = None, layout: str = "contiguous") -> Tensor:
    """Attention over the whole sequence sharded across the ranks of ``group`` (default: the world), from this
    rank's share: ``q (B, H, L_local, D)``, ``k (B, H_kv, L_local, D)``, ``v (B, H_kv, L_local, Dv)``
    (``H % H_kv == 0``: grouped-query attention when ``H_kv < H``) -> this rank's rows of the output,
    ``(B, H, L_local, Dv)``, in the inputs' dtype.

    ``layout``: which tokens each rank holds, ``"contiguous"`` or ``"zigzag"`` (see the module docstring;
    :func:`shard_sequence` cuts a whole sequence). ``is_causal``: each token attends to itself and the tokens before it
    in the whole sequence. ``scale``: as in ``scaled_dot_product_attention`` (default ``1/sqrt(D)``).
    Differentiable in ``q``, ``k`` and ``v``; every rank of ``group`` must call it with the same shapes, dtype and
    arguments (a collective). No dropout and no mask other than causal.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fastattn.{_OP}: {name} must be a Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"fastattn.{_OP}: {name} must be (B, H, L_local, D); got shape {tuple(t.shape)}")
    if not (q.size(2) == k.size(2) == v.size(2)):
        raise ValueError(f"fastattn.{_OP}: q, k and v must hold the same tokens (the same L_local); got lengths "
                         f"{q.size(2)}, {k.size(2)}, {v.size(2)}")
    _attn._check_flags(is_causal, scale, False)
    _attn._check(q, k, v, None, 0.0, q.size(1) != k.size(1))
    _check_layout(layout, q.size(2))
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"fastattn.{_OP}: needs an initialized torch.distributed process group "
                           f"(torch.distributed.init_process_group)")
    ring = _Ring(group if group is not None else dist.group.WORLD)
    D = q.size(-1)
    sm_scale = (1.0 / math.sqrt(D) if D > 0 else 1.0) if scale is None else float(scale)
    steps = ring_schedule(ring.size, ring.rank, q.size(2), is_causal=is_causal, layout=layout)
    return _RingAttention.apply(q, k, v, ring, steps, sm_scale)
