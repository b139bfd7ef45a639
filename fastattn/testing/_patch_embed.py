"""Floors of the ViT patch embedding.

The rounding model and the rule are in :mod:`fastattn.testing`."""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.testing._rule import _roundoffs, _top, blocked_terms


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
