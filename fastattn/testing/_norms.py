"""Floors of the normalisations: add + LayerNorm / RMSNorm and BatchNorm + add + activation.

The rounding model and the rule are in :mod:`fastattn.testing`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastattn.testing._rule import _roundoffs, _top, tree_sum_terms


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
