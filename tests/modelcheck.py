"""Model-level comparison: a fused model against its eager twin and a float64 copy of the eager one.

Outputs follow the 2x-eager rule of fastattn.testing. Gradients and buffers use a factor of 4: at model level each
gradient has passed through several fused backward kernels (BN -> conv -> BN ...), each rounding differently from
torch's, so the 2x bound of a single op compounds. A gradient that is zero in exact arithmetic (the key projection's
bias: softmax ignores a constant added to a row of scores) is pure cancellation noise in both runs; its floor is one
rounding of the model's largest gradient instead of its own (zero) magnitude. Likewise a BatchNorm running mean is
compared at the scale of its module's statistics (its running variance), not at its own, possibly tiny, value.

Configs must be well conditioned for this to mean anything: BatchNorm over two values per channel (batch 2 at 1x1
spatial) turns rounding differences into order-one gradient differences, for eager PyTorch as much as for us.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
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
DEVICE = torch.device(os.environ.get("FASTATTN_TEST_DEVICE", "cpu"))  # as tests/conftest.py


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


def compare_models(ours: nn.Module, eager: nn.Module, inputs: tuple, kwargs: dict | None = None, *, eval_kernels=(),
                   train_kernels=(), train: bool = True, evaluate: bool = True,
                   device: torch.device = DEVICE) -> None:
    """``ours`` against ``eager`` (same weights, fp32) and a float64 copy of ``eager``: eval outputs under no_grad,
    then in training mode the output, every parameter gradient and every buffer (BN statistics). ``inputs`` are
    float32 (float tensors are cast to float64 for the reference); the kernels named must have run."""
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
        for label, m, ins, kw in runs:
            m.train()
            with fastattn.record_launches() as launches:
                out = _first(m(*ins, **kw))
                if grad_out is None:
                    grad_out = torch.randn(out.shape, dtype=torch.float64)
                out.backward(grad_out.to(out.dtype))
            res[label] = (out, dict(m.named_parameters()), dict(m.named_buffers()))
        assert_close_to_reference(res["ours"][0], res["eager"][0], res["ref"][0], torch.float32, name="train output")
        scale = max((p.grad.abs().max().item() for p in res["ref"][1].values() if p.grad is not None), default=0.0)
        for name, p in res["ref"][1].items():
            if p.grad is None:
                assert res["ours"][1][name].grad is None, f"{name}: gradient where the eager model has none"
                continue
            ours_g, eager_g = res["ours"][1][name].grad, res["eager"][1][name].grad
            if p.grad.abs().max().item() <= 1e-9 * scale:  # zero in exact arithmetic
                bound = MODEL_FACTOR * max_err(eager_g, p.grad) + UNIT_ROUNDOFF[torch.float32] * scale
                assert max_err(ours_g, p.grad) <= bound, f"grad {name} (zero in exact arithmetic): error too large"
                continue
            assert_close_to_reference(ours_g, eager_g, p.grad, torch.float32, name=f"grad {name}", factor=MODEL_FACTOR)
        for name, b in res["ref"][2].items():
            if b.is_floating_point():  # floor: the module's statistics scale (a running mean near 0 is a
                # cancellation of O(sqrt(running_var)) values)
                prefix = name.rpartition(".")[0]
                scale = max(v.abs().max().item() for k, v in res["ref"][2].items()
                            if k.rpartition(".")[0] == prefix and v.is_floating_point())
                bound = MODEL_FACTOR * max_err(res["eager"][2][name], b) + UNIT_ROUNDOFF[torch.float32] * scale
                assert max_err(res["ours"][2][name], b) <= bound, f"buffer {name}: error above {bound:.3e}"
            else:
                assert torch.equal(res["ours"][2][name], res["eager"][2][name]), f"buffer {name} differs"
        assert_kernels(launches, train_kernels, "training")
