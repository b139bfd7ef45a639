"""fastattn as torch's SDPA flash backend: ``fastattn.register_sdpa_backend()``.

torch >= 2.13 lets a library replace the kernels behind its flash-attention backend
(``torch.nn.attention.register_flash_attention_impl``; torch's own FA3 / FA4 bindings use it). After::

    fastattn.register_sdpa_backend()
    torch.nn.attention.activate_flash_attention_impl("fastattn")

every ``F.scaled_dot_product_attention`` call on CUDA that takes the flash backend, and
``torch.nn.attention.varlen.varlen_attn``, runs fastattn's kernels, with no change to the model;
``torch.nn.attention.restore_flash_attention_impl()`` puts torch's back. The register function installs, for one
dispatch key (``"CUDA"``; the tests use ``"CPU"``, where the kernels run through Triton's interpreter), these aten
ops (torch's autograd formulas call the backward ones):

- ``_scaled_dot_product_flash_attention`` / ``_backward``: ``(B, H, L, D)`` tensors, the ops SDPA's flash path
  calls; on ``"CPU"`` also ``_scaled_dot_product_flash_attention_for_cpu`` / ``_backward``, CPU SDPA's flash path.
- ``_flash_attention_forward`` / ``_forward_no_dropout_inplace`` / ``_backward``: ``(B, L, H, D)``, or packed
  ``(total, H, D)`` with ``cum_seq_q`` / ``cum_seq_k`` (varlen).

The mapping: ``scale=None`` is ``D ** -0.5``; ``is_causal`` is flash's bottom-right alignment (SDPA sends only
square causal calls to flash; ``_for_cpu`` is SDPA's top-left); ``window_size_left/right`` (-1 or None =
unbounded) keep key j for query i iff ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``, in the kernel; key/value
heads fewer than the query's run the kernel's GQA; dropout is drawn in the kernel from a seed that travels in
``rng_state`` to the backward; the log-sum-exp is float32 ``(B, H, Lq)`` (packed: ``(H, total_q)``), natural log,
as torch's flash returns it.

Packed sequences run ``fastattn::varlen_attention`` (:mod:`fastattn.ops.varlen`, as ``fastattn.varlen_attn``: one
VARLEN launch of the attention kernels), dropout included; with ``seqused_k`` or a paged ``block_table`` (forward
only) its KV-cache path, where ``num_splits`` is the split-KV count (a hint elsewhere, ignored). Not served
(``NotImplementedError``, naming the argument): ``return_debug_mask``, ``alibi_slopes`` (torch's flash backward has
no slopes to differentiate through), ``seqused_k`` / ``block_table`` on dense ``(B, L, H, D)`` tensors, dropout in
``_for_cpu`` (which has no ``rng_state`` for the backward to replay it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import torch
from torch import Tensor

from fastattn.ops import varlen as varlen_ops
from fastattn.ops._common import draw_seed
from fastattn.ops.attention import attention_backward_op, attention_op

NAME = "fastattn"



@dataclasses.dataclass
class _Handle:
    """What ``activate_flash_attention_impl`` keeps alive; ``remove`` (``restore_flash_attention_impl``) takes the
    kernels out of the dispatcher again."""

    library: torch.library.Library | None

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()
            self.library = None


def _unsupported(op: str, **args) -> None:
    for name, value in args.items():
        if value is not None and value is not False:
            raise NotImplementedError(f"fastattn SDPA backend ({op}): {name} is not supported by fastattn's kernels; "
                                      f"call torch.nn.attention.restore_flash_attention_impl() to use torch's")


def _window(left: int | None, right: int | None) -> tuple[int, int]:
    return (-1 if left is None or left < 0 else int(left), -1 if right is None or right < 0 else int(right))


def _mask4(mask: Tensor | None) -> Tensor | None:
    """A mask of fewer dims as the 4-D one the kernel's op takes (size 1 where it broadcasts)."""
    return mask if mask is None or mask.dim() == 4 else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _scale(scale: float | None, D: int) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(D)


def _rng_state(seed: Tensor | None, device: torch.device) -> Tensor:
    """The dropout seed as flash's (2,) uint64 ``rng_state`` (zeros without dropout)."""
    state = torch.zeros(2, dtype=torch.int64)
    if seed is not None:
        state[0] = seed
    return state.to(device).view(torch.uint64)


def _seed(rng_state: Tensor | None, dropout_p: float) -> Tensor | None:
    if dropout_p == 0.0:
        return None
    return rng_state.view(torch.int64)[0].cpu()


def _dense_forward(q4: Tensor, k4: Tensor, v4: Tensor, dropout_p: float, causal: bool, offset: int,
                   scale: float | None, window: tuple[int, int], seed: Tensor | None) -> tuple[Tensor, Tensor]:
    """(Z, H, M, D) views -> (out (Z, H, M, DV) contiguous, lse (Z, H, M) fp32)."""
    return attention_op(q4, k4, v4, None, float(dropout_p), seed, bool(causal), offset if causal else 0,
                        _scale(scale, q4.shape[3]), *window)


def _dense_backward(do4: Tensor, q4: Tensor, k4: Tensor, v4: Tensor, out4: Tensor, lse: Tensor, dropout_p: float,
                    causal: bool, offset: int, scale: float | None, window: tuple[int, int],
                    seed: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    grads = attention_backward_op(do4, q4, k4, v4, out4, lse.contiguous(), None, None, float(dropout_p), seed,
                                  bool(causal), offset if causal else 0, _scale(scale, q4.shape[3]), False, *window)
    return grads[0], grads[1], grads[2]


def _laid_out(t: Tensor, like: Tensor | None = None, permutation: tuple[int, ...] | None = None) -> Tensor:
    """``t`` in the strides torch's meta kernel gives this output (``empty_like(like)``, or memory in the order
    ``permutation``): a compiled graph takes the real output to have those, so a result in another layout is copied
    (one output-sized copy; none where the layouts agree, as for contiguous inputs)."""
    if permutation is not None:
        want = torch.empty_permuted(t.shape, permutation, device="meta").stride()
    else:
        want = torch.empty_like(like, device="meta").stride() if like.shape == t.shape else t.stride()
    if t.stride() == want or t.numel() <= 1:
        return t
    return torch.empty_strided(t.shape, want, dtype=t.dtype, device=t.device).copy_(t)


def _packed_window(window: tuple[int, int], is_causal: bool) -> tuple[int, int]:
    """flash's window with its causal flag folded in (causal: the right bound is 0), as fastattn.varlen_attn takes
    it."""
    return (window[0], 0) if is_causal else window


def _bhsd(t: Tensor) -> Tensor:
    return t.transpose(1, 2)  # (B, L, H, D) <-> (B, H, L, D), a view


# ---------------------------------------------------------------------------------------------------------------
# the aten ops
# ---------------------------------------------------------------------------------------------------------------


def _flash_forward(query: Tensor, key: Tensor, value: Tensor, cum_seq_q: Tensor | None, cum_seq_k: Tensor | None,
                   max_q: int, max_k: int, dropout_p: float, is_causal: bool, return_debug_mask: bool, *,
                   scale: float | None = None, window_size_left: int | None = None,
                   window_size_right: int | None = None, seqused_k: Tensor | None = None,
                   alibi_slopes: Tensor | None = None, block_table: Tensor | None = None,
                   num_splits: int | None = None):
    _unsupported("_flash_attention_forward", return_debug_mask=return_debug_mask, alibi_slopes=alibi_slopes)
    window = _window(window_size_left, window_size_right)
    debug = torch.empty(0, dtype=query.dtype, device=query.device)
    offset_state = torch.zeros((), dtype=torch.uint64, device=query.device)
    seed = draw_seed(dropout_p)
    if cum_seq_q is None:  # dense (B, L, H, D)
        _unsupported("_flash_attention_forward (dense tensors)", seqused_k=seqused_k, block_table=block_table)
        out4, lse = _dense_forward(_bhsd(query), _bhsd(key), _bhsd(value), dropout_p, is_causal,
                                   key.shape[1] - query.shape[1], scale, window, seed)
        return _laid_out(_bhsd(out4), query), lse, _rng_state(seed, query.device), offset_state, debug
    if cum_seq_k is None and block_table is None:
        raise NotImplementedError("fastattn SDPA backend (_flash_attention_forward): packed sequences need cum_seq_k "
                                  "(or a block_table)")
    out, lse = varlen_ops.varlen_attention_op(
        query, key, value, cum_seq_q, cum_seq_k, seqused_k, block_table, None, None, seed, max_q, max_k,
        _scale(scale, query.shape[-1]), *_packed_window(window, is_causal), 0.0, float(dropout_p), num_splits or 0)
    return _laid_out(out, query), lse, _rng_state(seed, query.device), offset_state, debug


def _flash_forward_inplace(out: Tensor, query: Tensor, key: Tensor, value: Tensor, cum_seq_q: Tensor | None,
                           cum_seq_k: Tensor | None, max_q: int, max_k: int, dropout_p: float, is_causal: bool,
                           return_debug_mask: bool, **kwargs) -> Tensor:
    result, lse, *_ = _flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                                     return_debug_mask, **kwargs)
    out.copy_(result)
    return lse


def _flash_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, logsumexp: Tensor,
                    cum_seq_q: Tensor | None, cum_seq_k: Tensor | None, max_q: int, max_k: int, dropout_p: float,
                    is_causal: bool, rng_state: Tensor, unused: Tensor, *, scale: float | None = None,
                    window_size_left: int | None = None, window_size_right: int | None = None):
    window = _window(window_size_left, window_size_right)
    if cum_seq_q is None:
        dq, dk, dv = _dense_backward(_bhsd(grad_out), _bhsd(query), _bhsd(key), _bhsd(value), _bhsd(out), logsumexp,
                                     dropout_p, is_causal, key.shape[1] - query.shape[1], scale, window,
                                     _seed(rng_state, dropout_p))
        return _laid_out(_bhsd(dq), query), _laid_out(_bhsd(dk), key), _laid_out(_bhsd(dv), value)
    dq, dk, dv, _ = varlen_ops.varlen_attention_backward_op(
        grad_out, query, key, value, out, logsumexp, None, cum_seq_q, cum_seq_k, None, None,
        _seed(rng_state, dropout_p), max_q, max_k, _scale(scale, query.shape[-1]), *_packed_window(window, is_causal),
        0.0, float(dropout_p))
    return _laid_out(dq, query), _laid_out(dk, key), _laid_out(dv, value)


def _sdpa_flash(query: Tensor, key: Tensor, value: Tensor, dropout_p: float = 0.0, is_causal: bool = False,
                return_debug_mask: bool = False, *, scale: float | None = None):
    _unsupported("_scaled_dot_product_flash_attention", return_debug_mask=return_debug_mask)
    seed = draw_seed(dropout_p)
    out, lse = _dense_forward(query, key, value, dropout_p, is_causal, key.shape[2] - query.shape[2], scale,
                              (-1, -1), seed)
    debug = torch.empty(0, dtype=query.dtype, device=query.device)
    return (_laid_out(out, query), lse, None, None, query.shape[2], key.shape[2], _rng_state(seed, query.device),
            torch.zeros((), dtype=torch.uint64, device=query.device), debug)


def _sdpa_flash_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, logsumexp: Tensor,
                         cum_seq_q: Tensor | None, cum_seq_k: Tensor | None, max_q: int, max_k: int, dropout_p: float,
                         is_causal: bool, philox_seed: Tensor, philox_offset: Tensor, *, scale: float | None = None):
    dq, dk, dv = _dense_backward(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal,
                                 key.shape[2] - query.shape[2], scale, (-1, -1), _seed(philox_seed, dropout_p))
    return _laid_out(dq, query), _laid_out(dk, key), _laid_out(dv, value)


def _sdpa_flash_cpu(query: Tensor, key: Tensor, value: Tensor, dropout_p: float = 0.0, is_causal: bool = False, *,
                    attn_mask: Tensor | None = None, scale: float | None = None):
    if dropout_p > 0.0:
        raise NotImplementedError("fastattn SDPA backend (_scaled_dot_product_flash_attention_for_cpu): dropout_p > 0 "
                                  "(the op has no rng_state for its backward to replay the mask)")
    out, lse = attention_op(query, key, value, _mask4(attn_mask), 0.0, None, bool(is_causal), 0,
                            _scale(scale, query.shape[-1]))
    return _laid_out(out, query), _laid_out(lse, permutation=(0, 2, 1))  # lse (B, H, L) over (B, L, H) memory


def _sdpa_flash_cpu_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                             logsumexp: Tensor, dropout_p: float, is_causal: bool, *, attn_mask: Tensor | None = None,
                             scale: float | None = None):
    grads = attention_backward_op(grad_out, query, key, value, out, logsumexp.contiguous(), None, _mask4(attn_mask),
                                  0.0, None, bool(is_causal), 0, _scale(scale, query.shape[-1]), False)
    return tuple(_laid_out(g, permutation=(0, 2, 1, 3)) for g in grads[:3])  # CPU grads are (B, L, H, D) memory


_IMPLS = {
    "_flash_attention_forward": _flash_forward,
    "_flash_attention_forward_no_dropout_inplace": _flash_forward_inplace,
    "_flash_attention_backward": _flash_backward,
    "_scaled_dot_product_flash_attention": _sdpa_flash,
    "_scaled_dot_product_flash_attention_backward": _sdpa_flash_backward,
}
_CPU_IMPLS = {
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa_flash_cpu,
    "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_flash_cpu_backward,
}


def _install(dispatch_key: str) -> _Handle:
    """The register function ``activate_flash_attention_impl("fastattn")`` calls: fastattn's kernels behind the
    flash ops for ``dispatch_key``."""
    lib = torch.library.Library("aten", "IMPL", dispatch_key)
    with warnings.catch_warnings():  # torch warns that a CPU kernel of torch's own is overridden: that is the point
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for name, fn in {**_IMPLS, **(_CPU_IMPLS if dispatch_key == "CPU" else {})}.items():
            lib.impl(name, fn, dispatch_key)
    return _Handle(lib)


def register_sdpa_backend(dispatch_key: str = "CUDA") -> bool:
    """Register fastattn as ``"fastattn"`` with ``torch.nn.attention.register_flash_attention_impl``; activate it
    with ``torch.nn.attention.activate_flash_attention_impl("fastattn")`` (see :mod:`fastattn.sdpa_backend`).

    ``dispatch_key``: the device whose flash ops fastattn takes over (``"CUDA"``; ``"CPU"`` for tests through the
    interpreter). Returns False, with a warning, on a torch without that API (torch < 2.13), where nothing is
    registered."""
    if not isinstance(dispatch_key, str) or dispatch_key not in ("CUDA", "CPU"):
        raise ValueError(f"fastattn.register_sdpa_backend: dispatch_key must be 'CUDA' or 'CPU'; got {dispatch_key!r}")
    register = getattr(torch.nn.attention, "register_flash_attention_impl", None)
    if register is None:
        warnings.warn(f"fastattn.register_sdpa_backend: torch {torch.__version__} has no "
                      f"torch.nn.attention.register_flash_attention_impl (torch >= 2.13); nothing was registered",
                      RuntimeWarning, stacklevel=2)
        return False
    register(NAME, register_fn=functools.partial(_install, dispatch_key))
    return True
