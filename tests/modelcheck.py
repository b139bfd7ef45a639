"""Model-level comparison: a fused model against its eager twin and a float64 copy of the eager one.

Outputs follow the 2x-eager rule of fastattn.testing. Gradients and buffers use a factor of 4: at model level each
gradient has passed through several fused backward kernels (BN -> conv -> BN ...), each rounding differently from
torch's, so the 2x bound of a single op compounds. A gradient that is zero in exact arithmetic (the key projection's
bias: softmax ignores a constant added to a row of scores) is pure cancellation noise in both runs; its floor is one
rounding of the model's largest gradient instead of its own (zero) magnitude. Likewise a BatchNorm running mean is
compared at the scale of its module's statistics (its running variance), not at its own, possibly tiny, value.

Configs must be well conditioned for this to mean anything: BatchNorm over two values per channel (batch 2 at 1x1
spatial) turns rounding differences into order-one gradient differences, for eager PyTorch as much as for us.
Likewise a derivative that jumps (ReLU's at 0, ReLU6's at 0 and 6, Hardswish's at +-3): in a deep network some of the
millions of fp32 pre-activations land within a rounding of a kink, where an fp32 run -- eager's or ours, at different
places -- takes the other side's derivative, an O(|dy|) gradient error no rounding analysis bounds. The training step
of such networks (MobileNets, RegNet, ResNet-D: ``train_dtype=torch.float64``) runs ours in float64, through the same
kernels interpreted in float64, against eager's fp32 error: a fused wiring or semantics error still shows at O(1),
the kinks do not (their flips need a pre-activation within 1e-16 of the kink).
"""

from __future__ import annotations

import copy

import pytest
import torch
from harness import DEVICE
from torch import nn

import fastattn
from fastattn.ops import attention as attn_ops
from fastattn.ops import batch_norm as bn_ops
from fastattn.ops import layer_norm as ln_ops
from fastattn.ops import patch_embed as pe_ops
from fastattn.testing import UNIT_ROUNDOFF, assert_close_to_reference, max_err

# The kernels a fused model's forward (and backward) must launch, from the op modules' own lists.
ATTN = attn_ops.FORWARD_KERNELS
ATTN_BWD = attn_ops.BACKWARD_KERNELS
LN = ln_ops.FORWARD_KERNELS
LN_BWD = ln_ops.BACKWARD_KERNELS[:1]  # the reduction runs only for affine norms
PE = pe_ops.FORWARD_KERNELS
PE_BWD = pe_ops.BACKWARD_KERNELS[:1]  # dweight; the others depend on what requires grad
BN_EVAL = bn_ops.FORWARD_KERNELS[-1:]  # eval: the apply pass only
BN_TRAIN = bn_ops.FORWARD_KERNELS
BN_BWD = (bn_ops.BACKWARD_KERNELS[0], bn_ops.BACKWARD_KERNELS[2])
MODEL_FACTOR = 4.0


def import_or_skip(name: str):
    try:
        return __import__(name)
    except Exception as e:  # noqa: BLE001  (torchvision's CUDA wheel can fail to load beside a CPU torch)
        pytest.skip(f"{name} is not importable here: {e}")


def _double(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    if isinstance(x, dict):
        return {k: _double(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_double(v) for v in x)
    return x


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def assert_kernels(launches, names, what):
    missing = [n for n in names if launches[n] == 0]
    assert not missing, f"{what}: Triton kernels {missing} did not run; launches: {dict(launches)}"


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb), "state_dict keys differ"
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"state_dict[{k!r}] differs"


def to_device(x, device):
    if isinstance(x, (torch.Tensor, nn.Module)):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


Step = tuple[torch.Tensor, dict, dict]  # a training step's output, {parameter: gradient or None}, {buffer: tensor}


def step_results(model: nn.Module, out: torch.Tensor) -> Step:
    """The output, the parameters' gradients and the buffers of ``model`` after a training step."""
    return (out.detach(), {n: p.grad for n, p in model.named_parameters()},
            {n: b.detach() for n, b in model.named_buffers()})


def assert_step_close(ours: Step, eager: Step, ref: Step, dtype: torch.dtype = torch.float32, what: str = "train",
                      output_factor: float = 2.0) -> None:
    """A training step of ``ours`` against eager PyTorch's and the float64 reference's: the output under the 2x rule
    (``output_factor``), every gradient and floating-point buffer with the model-level factor (see the module
    docstring), other buffers equal. ``dtype``: the precision both low-precision runs computed in."""
    assert_close_to_reference(ours[0], eager[0], ref[0], dtype, name=f"{what} output", factor=output_factor)
    scale = max((g.abs().max().item() for g in ref[1].values() if g is not None), default=0.0)
    for name, g in ref[1].items():
        ours_g, eager_g = ours[1][name], eager[1][name]
        if g is None:
            assert ours_g is None, f"{what}: {name}: gradient where the eager model has none"
            continue
        if g.abs().max().item() <= 1e-9 * scale:  # zero in exact arithmetic
            bound = MODEL_FACTOR * max_err(eager_g, g) + UNIT_ROUNDOFF[dtype] * scale
            assert max_err(ours_g, g) <= bound, f"{what}: grad {name} (zero in exact arithmetic): error too large"
            continue
        assert_close_to_reference(ours_g, eager_g, g, dtype, name=f"{what}: grad {name}", factor=MODEL_FACTOR)
    for name, b in ref[2].items():
        if b.is_floating_point():  # floor: the module's statistics scale (a running mean near 0 is a
            # cancellation of O(sqrt(running_var)) values)
            prefix = name.rpartition(".")[0]
            scale = max(v.abs().max().item() for k, v in ref[2].items()
                        if k.rpartition(".")[0] == prefix and v.is_floating_point())
            bound = MODEL_FACTOR * max_err(eager[2][name], b) + UNIT_ROUNDOFF[dtype] * scale
            assert max_err(ours[2][name], b) <= bound, f"{what}: buffer {name}: error above {bound:.3e}"
        else:
            assert torch.equal(ours[2][name], eager[2][name]), f"{what}: buffer {name} differs"


def compare_models(ours: nn.Module, eager: nn.Module, inputs: tuple, kwargs: dict | None = None, *, eval_kernels=(),
                   train_kernels=(), train: bool = True, evaluate: bool = True,
                   device: torch.device = DEVICE, seed: int | None = None,
                   train_dtype: torch.dtype = torch.float32) -> None:
    """``ours`` against ``eager`` (same weights, fp32) and a float64 copy of ``eager``: eval outputs under no_grad,
    then in training mode the output, every parameter gradient and every buffer (BN statistics). ``inputs`` are
    float32 (float tensors are cast to float64 for the reference); the kernels named must have run. ``seed``: reseed
    torch's generator before each training run, so that dropout and stochastic depth (torch's, left in place by
    fastattn) draw the same masks in the three (a float64 tensor draws the mask a float32 one does). ``train_dtype``
    float64 runs ours' training step in float64 (the same kernels, interpreted: see the module docstring on kinks)."""
    kwargs = kwargs or {}
    ours, eager, inputs, kwargs = (to_device(x, device) for x in (ours, eager, inputs, kwargs))
    ref = copy.deepcopy(eager).double()
    _assert_same_state(eager, ours)
    runs = (("ref", ref, _double(inputs), _double(kwargs)), ("eager", eager, inputs, kwargs),
            ("ours", ours, inputs, kwargs))
    if evaluate:
        outs = {}
        for label, m, ins, kw in runs:
            m.eval()
            with torch.no_grad(), fastattn.record_launches() as launches:
                outs[label] = _first(m(*ins, **kw))
        assert_close_to_reference(outs["ours"], outs["eager"], outs["ref"], torch.float32, name="eval output")
        assert_kernels(launches, eval_kernels, "eval")
    if train:
        grad_out = None
        res = {}
        if train_dtype == torch.float64:
            if device.type != "cpu":
                pytest.skip("float64 runs the Triton kernels only under the interpreter")
            runs = runs[:2] + (("ours", ours.double(), _double(inputs), _double(kwargs)),)
        for label, m, ins, kw in runs:
            m.train()
            if seed is not None:
                torch.manual_seed(seed)
            with fastattn.record_launches() as launches:
                out = _first(m(*ins, **kw))
                if grad_out is None:
                    grad_out = torch.randn(out.shape, dtype=torch.float64)
                out.backward(grad_out.to(out.dtype))
            res[label] = step_results(m, out)
        assert_step_close(res["ours"], res["eager"], res["ref"])
        assert_kernels(launches, train_kernels, "training")
