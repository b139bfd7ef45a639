"""Benchmark cases of ``batch_norm`` (BatchNorm + residual add + activation): ResNet-50's block tails and
EfficientNet-B0's BN + SiLU. Registered into :mod:`fastattn.perf.cases` (imported at its end), where the scratch of
its custom ops is counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import fastattn
from fastattn import reference
from fastattn.perf.cases import Case, Inputs, _elt, register

_BN_PARAMS = ("running_mean", "running_var", "weight", "bias")


def _away_from_relu_kink(x: Tensor, identity: Tensor, rm: Tensor, rv: Tensor, w: Tensor, b: Tensor,
                         training: bool, margin: float = 0.1) -> Tensor:
    """``identity`` moved where ``bn(x) + identity`` lies within ``margin`` of 0, in values every half type holds.

    Eager torch rounds ``bn(x)`` to the low precision before the add, so near 0 its ReLU mask differs from the
    float64 one and each such element costs it an O(|dy|) gradient error: the 2x-eager rule would measure nothing.
    The statistics do not depend on identity, so moving it keeps them (as tests/test_batch_norm.py does).
    """
    with torch.no_grad():
        for _ in range(4):
            z = F.batch_norm(x, rm, rv, w, b, training, 0.0, 1e-5) + identity
            close = z.abs() < margin
            if not close.any():
                break
            step = torch.where(z < 0, -2.0 * margin, 2.0 * margin)
            identity = torch.where(close, identity + step, identity).to(torch.bfloat16).to(identity.dtype)
    return identity


def _batch_norm_case(label: str, Nb: int, C: int, H: int, W: int, training: bool, channels_last: bool,
                     exact: bool = False, activation: str = "relu", identity: bool = True) -> Case:
    """``act(bn(x) + identity)``: ``batch_norm_add_relu`` for ReLU with an identity (a ResNet block's tail), else
    ``batch_norm_act`` (an EfficientNet BN + SiLU has no identity)."""
    from fastattn.ops.batch_norm import grad_from

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    relu_tail = activation == "relu" and identity
    names = ("x", "identity") + _BN_PARAMS
    act_kwargs = {} if relu_tail else {"activation": activation}

    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # parameters and statistics

        def act(std: float) -> Tensor:
            return torch.empty(Nb, C, H, W, device=device, dtype=dtype, memory_format=fmt).normal_(0.0, std)

        def vec(lo: float, hi: float) -> Tensor:
            return torch.empty(C, device=device, dtype=pdt).uniform_(lo, hi)

        x, ident = act(2.0), (act(1.0) if identity else None)
        rm, rv, w, b = vec(-0.5, 0.5), vec(0.5, 1.5), vec(0.5, 1.5), vec(-0.5, 0.5)
        if exact:  # the interpreter check: inputs every half type holds, away from the ReLU's kink
            x, rm, rv, w, b = (t.to(torch.bfloat16).to(t.dtype) for t in (x, rm, rv, w, b))
            if ident is not None:
                ident = _away_from_relu_kink(x, ident.to(torch.bfloat16).to(dtype), rm, rv, w, b, training)
        for t in (x, ident, w, b):
            if t is not None:
                t.requires_grad_()
        return Inputs((x, ident, rm, rv, w, b), {"training": training, "momentum": 0.1, "eps": 1e-5, **act_kwargs},
                      names, keep_fp32=_BN_PARAMS)

    source = grad_from(activation)  # what the backward reads besides dy and x: out (ReLU) or identity (z)
    extra = int(source == "out") + int(source == "z" and identity)

    def min_bytes(dtype: torch.dtype) -> tuple[int, int]:
        e, act, vec = _elt(dtype), Nb * C * H * W, 4 * C  # per-channel vectors: fp32
        stats = 6 * vec if training else 2 * vec  # running stats read and written + mean, rstd written | read
        fwd = e * (2 + identity) * act + 2 * vec + stats  # read x (, identity), weight, bias; write out
        # read dy, x (, out or identity), weight and the two statistics; write dx (, didentity), dweight, dbias
        bwd = e * (3 + extra + identity) * act + 3 * vec + 2 * vec
        return fwd, bwd

    allowed = {"input x"} | ({"output"} if source == "out" else set()) | \
        ({"input identity"} if source == "z" and identity else set())
    kept = ", ".join(sorted(r.split()[-1].replace("output", "out") for r in allowed))

    def check_saved(case: Case, saved: list) -> str | None:
        # x and what act' needs (ReLU's output, or the identity z is recomputed from); never the pre-activation
        big = [s for s in saved if s.role not in allowed and s.nbytes > 16 * C]
        if big:
            return f"saves more than {kept} and per-channel statistics: " + ", ".join(
                f"{s.role} {s.shape} {s.dtype}" for s in big)
        return None

    kernels = ("_bn_fwd_apply", "_bn_bwd_reduce", "_bn_bwd_combine")
    if training:
        kernels += ("_bn_fwd_reduce", "_bn_fwd_combine", "_bn_bwd_dx")
    what = "" if relu_tail else f" {activation}" + ("" if identity else " (no identity)")
    return Case(
        op="batch_norm", label=label,
        shape=f"N={Nb} C={C} {H}x{W} {'train' if training else 'eval'} {'NHWC' if channels_last else 'NCHW'}{what}",
        make=make, fused=fastattn.batch_norm_add_relu if relu_tail else fastattn.batch_norm_act,
        eager=reference.batch_norm_add_relu if relu_tail else reference.batch_norm_act,
        min_bytes=min_bytes, check_saved=check_saved,
        saved_note=f"saves {kept} and per-channel statistics" + (" (ReLU's mask), as eager does" if relu_tail else
                                                                  ""), kernels=kernels,
        dims={"N": Nb, "C": C, "HW": H * W, "train": int(training), "channels_last": int(channels_last)},
    )


# EfficientNet-B0 at 224 px: the BN + SiLU outputs of each stage's first block (the expansion's, and the stem's)
EFFICIENTNET_B0_STAGES = ((32, 112), (96, 112), (144, 56), (240, 28), (480, 14), (672, 14), (1152, 7), (1280, 7))


@register("batch_norm")
def batch_norm_cases(suite: str) -> list[Case]:
    """The tail of every ResNet-50 bottleneck, ``relu(bn3(conv3(x)) + identity)``, at the four stage outputs
    (256x56x56, 512x28x28, 1024x14x14, 2048x7x7), batch 64 and 256, training (batch statistics, running ones
    updated) and eval (running statistics; the gradient still flows, as when fine-tuning with frozen BatchNorm),
    NCHW and channels_last; and EfficientNet-B0's BN + SiLU (``batch_norm_act``, no identity) at its stages' shapes
    (stem 32x112x112 to head 1280x7x7), batch 64, training; weight, bias and running statistics in fp32 as in
    mixed-precision training."""
    stages = ((256, 56), (512, 28), (1024, 14), (2048, 7))

    def case(b: int, c: int, s: int, training: bool, cl: bool) -> Case:
        label = f"ResNet-50 {c}x{s}x{s} B{b} {'train' if training else 'eval'}" + (" NHWC" if cl else "")
        return _batch_norm_case(label, b, c, s, s, training, cl)

    def silu(c: int, s: int, cl: bool = False) -> Case:
        return _batch_norm_case(f"EfficientNet-B0 SiLU {c}x{s}x{s} B64 train" + (" NHWC" if cl else ""), 64, c, s, s,
                                True, cl, activation="silu", identity=False)

    if suite == "gpu":
        return ([case(b, c, s, t, cl) for b in (64, 256) for c, s in stages for t in (True, False)
                 for cl in (False, True)] + [silu(c, s) for c, s in EFFICIENTNET_B0_STAGES]
                + [silu(96, 112, True), silu(672, 14, True)])
    if suite in ("quick", "check"):
        return [case(64, 256, 56, True, True), case(64, 2048, 7, True, False), silu(96, 112)]
    if suite == "model":  # FakeTensors: the layout changes no byte count
        return [case(64, c, s, True, False) for c, s in stages] + [case(64, 256, 56, False, False), silu(96, 112)]
    return [_batch_norm_case("small train", 3, 5, 7, 9, True, False, exact=True),
            _batch_norm_case("small train NHWC", 2, 130, 5, 3, True, True, exact=True),
            _batch_norm_case("small eval NHWC", 4, 67, 3, 5, False, True, exact=True),
            _batch_norm_case("small train silu", 3, 6, 5, 7, True, False, exact=True, activation="silu",
                             identity=False)]
