"""fastattn under torch.distributed: patched models in DDP and FSDP2, and ring attention (fastattn.distributed).

Two gloo ranks on the CPU (tests/ranks.py: started once for the module), the Triton kernels through the
interpreter in each, tiny models (depth 1-2, width 32, images 8-64 px, batch 2 per rank), one training step. Each
rank's results come back to this process, which compares them with eager PyTorch and a float64 copy of the same
model run here on the whole batch, and checks that the Triton kernels ran in the ranks. The rule is
tests/modelcheck.py's model-level one (``MODEL_FACTOR`` x eager's error), for the training step's outputs too: a
rank's output has passed through every fused forward kernel of the model, where the 2x bound of one op compounds as
it does for the gradients (measured: the patched ResNet below, in one process without DDP, reaches 2.04x eager's
output error on torch's scalar CPU path). The ring attention tests hold every result to the 2x rule.

The gradients a rank computes are scaled by the world size before DDP / FSDP average them over the ranks (exact in
floating point), so the averaged gradient is the gradient of the whole batch's loss, the one a single process
computes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from harness import assert_launched, three_way
from modelcheck import (
    ATTN,
    ATTN_BWD,
    BN_BWD,
    BN_TRAIN,
    DEVICE,
    LN,
    LN_BWD,
    MODEL_FACTOR,
    PE,
    PE_BWD,
    assert_kernels,
    assert_step_close,
    import_or_skip,
    step_results,
)
from ranks import Ranks
from torch import nn

import fastattn
from fastattn.ops import merge_attention as merge_ops
from fastattn.patching.wrappers import SHARDED
from fastattn.testing import ring_attention_floors

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build", allow_module_level=True)
if DEVICE.type != "cpu":
    pytest.skip("the ranks run on the CPU with gloo and Triton's interpreter; FASTATTN_TEST_DEVICE is "
                f"{DEVICE.type}", allow_module_level=True)

pytestmark = pytest.mark.xdist_group("distributed")  # one set of ranks per run (./run.sh test: --dist loadgroup)

WORLD = 2
VIT_KERNELS = ATTN + LN + PE + ATTN_BWD + LN_BWD + PE_BWD


@pytest.fixture(scope="module")
def ranks():
    pool = Ranks(WORLD)
    yield pool
    pool.close()


# ---------------------------------------------------------------------------------------------------------------
# models and the single-process runs they are compared with
# ---------------------------------------------------------------------------------------------------------------


def _timm_vit() -> nn.Module:
    timm = import_or_skip("timm")
    return timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2,
                                                           num_heads=2, mlp_ratio=2.0, num_classes=5)


def _own_vit() -> nn.Module:
    return fastattn.models.VisionTransformer(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=32,
                                             depth=1, num_heads=2, fused=False)


def _own_resnet() -> nn.Module:
    return fastattn.models.ResNet(fastattn.models.BasicBlock, [1, 1, 1, 1], num_classes=5, width=4, fused=False)


MODELS = {"timm_vit": (_timm_vit, 16), "own_vit": (_own_vit, 8), "own_resnet": (_own_resnet, 64)}


def _batch(model_name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (float32, eager), the whole batch of images (batch 2 per rank) and the output gradient."""
    build, size = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    images = torch.randn(2 * WORLD, 3, size, size)
    grad_out = torch.randn(2 * WORLD, 5)
    return model, images, grad_out


def _local(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world)[rank]


def _single_process(model: nn.Module, images: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype,
                    per_rank: bool = False) -> list:
    """One training step of ``model`` (a copy, in ``dtype``) in this process on the whole batch, as a
    ``modelcheck.Step`` per rank. ``per_rank``: each rank's half of the batch on its own, the gradients summed over
    the halves (what DDP averages when each rank's BatchNorm uses its local batch statistics), the output and
    buffers those of that rank's half."""
    halves = [(images, grad_out)] if not per_rank else [(_local(images, r, WORLD), _local(grad_out, r, WORLD))
                                                        for r in range(WORLD)]
    steps = []
    for x, g in halves:
        m = copy.deepcopy(model).to(dtype).train()
        out = m(x.to(dtype))
        out.backward(g.to(dtype))
        steps.append(step_results(m, out))
    if not per_rank:
        out, grads, buffers = steps[0]
        return [(_local(out, r, WORLD), grads, buffers) for r in range(WORLD)]
    total = {n: None if steps[0][1][n] is None else sum(s[1][n] for s in steps) for n in steps[0][1]}
    return [(out, total, buffers) for out, _, buffers in steps]


def _check_ranks(results: list, eager: list, ref: list, dtype: torch.dtype, kernels, what: str) -> None:
    """Each rank's step (output, gradients, buffers, kernel launches) against this process's."""
    for rank, (ours, launches) in enumerate(results):
        assert_step_close(ours, eager[rank], ref[rank], dtype, what=f"{what}, rank {rank}", output_factor=MODEL_FACTOR)
        assert_kernels(launches, kernels, f"{what}, rank {rank}")


# ---------------------------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------------------------


def _ddp_step(rank: int, world: int, model: nn.Module, images, grad_out, patch_after_wrap: bool):
    from torch.nn.parallel import DistributedDataParallel

    if not patch_after_wrap:
        fastattn.patch(model)
    ddp = DistributedDataParallel(model)
    if patch_after_wrap:
        fastattn.patch(ddp)
    model.train()
    with fastattn.record_launches() as launches:
        out = ddp(_local(images, rank, world))
        out.backward(_local(grad_out, rank, world) * world)
    return step_results(model, out), dict(launches)


@pytest.mark.parametrize("model_name,patch_after_wrap", [("timm_vit", False), ("own_vit", True),
                                                         ("own_resnet", False)])
def test_ddp_step_equals_single_process(ranks, model_name, patch_after_wrap):
    """A patched model (patched before DistributedDataParallel wraps it, or the DDP module patched) trained one
    step: every rank's gradients are bitwise the same, and equal a single process's on the whole batch. The ResNet's
    BatchNorms (fused BatchNormAddReLU) use each rank's local batch statistics, as torch's do under DDP: its
    gradients are those of the two halves run on their own, summed, and each rank's running statistics those of its
    half."""
    model, images, grad_out = _batch(model_name)
    per_rank = model_name == "own_resnet"
    ref = _single_process(model, images, grad_out, torch.float64, per_rank)
    eager = _single_process(model, images, grad_out, torch.float32, per_rank)
    results = ranks.run(_ddp_step, model, images, grad_out, patch_after_wrap)
    grads = [ours[1] for ours, _ in results]
    for name, g in grads[0].items():
        assert g is None or torch.equal(g, grads[1][name]), f"{name}: the ranks' gradients differ"
    kernels = BN_TRAIN + BN_BWD if per_rank else VIT_KERNELS
    _check_ranks(results, eager, ref, torch.float32, kernels, f"DDP {model_name}")
    if per_rank:  # the local statistics really differ between the ranks (else the test could not tell)
        assert not torch.equal(results[0][0][2]["bn1.running_mean"], results[1][0][2]["bn1.running_mean"])


def test_sync_batchnorm_stays_torchs():
    """SyncBatchNorm is not fused. convert_sync_batchnorm after patch turns the fused BatchNormAddReLU back into
    torch's SyncBatchNorm (what convert does to any BatchNorm subclass), which the patched blocks then call unfused;
    patching a converted model leaves the SyncBatchNorms (and the blocks whose BNs they are) alone, with the reason.
    Either way the model computes what the converted eager model does (here in eval, where SyncBatchNorm does not
    synchronise: its training step needs GPU tensors, below)."""
    model, images, _ = _batch("own_resnet")
    eager = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    after = nn.SyncBatchNorm.convert_sync_batchnorm(fastattn.patch(copy.deepcopy(model))).eval()
    before = fastattn.patch(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))).eval()
    for converted in (after, before):
        assert not any(isinstance(m, fastattn.nn.BatchNormAddReLU) for m in converted.modules())
        assert {n for n, m in converted.named_modules() if isinstance(m, nn.SyncBatchNorm)} == {
            n for n, m in eager.named_modules() if isinstance(m, nn.SyncBatchNorm)}
    assert type(after.layer1[0]) is fastattn.models.BasicBlock  # written against fastattn.nn.bn_relu: unfused now
    left = {e.name: e.detail for e in fastattn.patch_report(before).left_alone}
    assert "SyncBatchNorm reduces its statistics across ranks" in left["bn1"]
    assert "bn1 is SyncBatchNorm" in left["layer1.0"]
    with torch.no_grad():
        want = eager(images)
        for converted in (after, before):
            torch.testing.assert_close(converted(images), want, rtol=1e-5, atol=1e-5)


def _ddp_sync_bn_step(rank: int, world: int, model: nn.Module, images, grad_out):
    bn = nn.SyncBatchNorm(2).train()
    try:
        bn(torch.randn(2, 2, 3, 3))
    except ValueError as err:
        pytest.skip(f"SyncBatchNorm does not train on CPU tensors in torch {torch.__version__} ({err}), so "
                    "synchronised statistics cannot run on gloo/CPU ranks")
    return _ddp_step(rank, world, nn.SyncBatchNorm.convert_sync_batchnorm(fastattn.patch(model)), images, grad_out,
                     False)


def test_sync_batchnorm_training_under_ddp(ranks):
    """A patched ResNet converted to SyncBatchNorm, one DDP step: the statistics are the whole batch's, so every rank's
    gradients and running statistics are a single process's on the whole batch."""
    model, images, grad_out = _batch("own_resnet")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))  # no process group here: plain BN
    ref = _single_process(converted, images, grad_out, torch.float64)
    eager = _single_process(converted, images, grad_out, torch.float32)
    _check_ranks(ranks.run(_ddp_sync_bn_step, model, images, grad_out), eager, ref, torch.float32, (), "SyncBN")


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 (fully_shard)
# ---------------------------------------------------------------------------------------------------------------


def _classes(model: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules()}


def _fsdp_step(rank: int, world: int, model: nn.Module, images, grad_out, patch_first: bool, bf16: bool,
               shard_also: tuple[str, ...] = ()):
    """fully_shard each block, the submodules ``shard_also`` and the root, patching before or after; one SGD step;
    then unpatch and one more forward. Returns what the parent checks."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    if patch_first:
        fastattn.patch(model)
    for name in shard_also:
        fully_shard(model.get_submodule(name), mp_policy=policy)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if not patch_first:
        fastattn.patch(model)
    report = fastattn.patch_report(model)
    patched = _classes(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with fastattn.record_launches() as launches:
        out = model(_local(images, rank, world))
        out.backward(_local(grad_out, rank, world).to(out.dtype) * world)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    optimizer.step()
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    fastattn.unpatch(model)
    assert all(isinstance(m, FSDPModule) for m in (model, *model.blocks)), "unpatch dropped FSDP's class"
    with torch.no_grad(), fastattn.record_launches() as eager_launches:
        after = model(_local(images, rank, world))
    return {"step": (out.detach(), grads, {}), "launches": dict(launches), "report": report, "patched": patched,
            "unpatched": _classes(model), "after": after, "after_launches": sum(eager_launches.values()),
            "params": params}


def _check_fsdp(results: list, model: nn.Module, images, grad_out, dtype: torch.dtype, kernels, what: str) -> None:
    """Each rank's FSDP step against the unsharded model's on the whole batch (in ``dtype``; the float64 reference
    from the parameters rounded to ``dtype``, which FSDP's mixed precision computes with), the SGD update of the
    sharded parameters, and the unpatched model's forward after it."""
    lowp = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    ref = _single_process(lowp, images.to(dtype), grad_out, torch.float64)
    eager = _single_process(model, images, grad_out, dtype)
    for rank, res in enumerate(results):
        assert_step_close(res["step"], eager[rank], ref[rank], dtype, what=f"{what}, rank {rank}",
                          output_factor=MODEL_FACTOR)
        assert_kernels(res["launches"], kernels, f"{what}, rank {rank}")
        for name, p in model.named_parameters():  # SGD applied each averaged gradient to its own shards
            assert torch.equal(res["params"][name], p.detach() - 0.5 * res["step"][1][name]), name
        assert res["after_launches"] == 0, f"{what}: unpatched, the model still launched Triton kernels"
        updated = copy.deepcopy(model)
        updated.load_state_dict(res["params"])
        with torch.no_grad():
            want = updated.to(dtype)(_local(images, rank, WORLD).to(dtype))
        torch.testing.assert_close(res["after"], want, msg=lambda m, r=rank: f"{what}, rank {r}, after unpatch: {m}")


@pytest.mark.parametrize("patch_first", [True, False], ids=["patch_then_shard", "shard_then_patch"])
def test_fsdp_step_equals_unsharded(ranks, patch_first):
    """fastattn.patch then fully_shard (each block and the root), or the other way round: the same fused classes
    (FSDP's subclass of the fused class: FSDPFusedTimmBlock), the same report, a training step equal to the
    unsharded model's on the whole batch, SGD on the sharded parameters; unpatch gives each module FSDP's class of its
    original class (FSDPBlock), which then runs torch's ops."""
    model, images, grad_out = _batch("timm_vit")
    results = ranks.run(_fsdp_step, model, images, grad_out, patch_first, False)
    _check_fsdp(results, model, images, grad_out, torch.float32, VIT_KERNELS,
                "FSDP " + ("patch, shard" if patch_first else "shard, patch"))
    res = results[0]
    assert res["patched"]["blocks.0"] == "FSDPFusedTimmBlock" and res["patched"][""] == \
        "FSDPFusedTimmVisionTransformer"
    assert res["patched"]["blocks.0.attn"] == "FusedTimmAttention"
    assert res["unpatched"]["blocks.0"] == "FSDPBlock" and res["unpatched"][""] == "FSDPVisionTransformer"
    assert not any(c.startswith("Fused") or "Fused" in c for c in res["unpatched"].values())
    assert not res["report"].left_alone, str(res["report"])
    fused_as = {e.name: e.fused_as for e in res["report"].fused}  # the report of a sharded model says so
    want = "fastattn.patching.timm.FusedTimmBlock" if patch_first else "FSDP<fastattn.patching.timm.FusedTimmBlock>"
    assert fused_as["blocks.0"] == want, str(res["report"])
    plain = fastattn.patch(copy.deepcopy(model))  # the same modules fused as without FSDP
    assert [e.name for e in res["report"].fused] == [e.name for e in fastattn.patch_report(plain).fused]


def test_fsdp_sharded_child_a_fused_forward_bypasses_is_left_alone(ranks):
    """fully_shard on the ViT's patch_embed, then patch: the ViT's fused forward_features would read patch_embed's
    parameters without its forward (and FSDP's hooks that unshard them), so the ViT is left alone with the reason;
    its blocks are still fused, and the step is still right."""
    model, images, grad_out = _batch("timm_vit")
    results = ranks.run(_fsdp_step, model, images, grad_out, False, False, ("patch_embed",))
    left = {e.name: e.detail for e in results[0]["report"].left_alone}
    assert SHARDED in left[""], str(results[0]["report"])
    assert results[0]["patched"]["blocks.1"] == "FSDPFusedTimmBlock"
    _check_fsdp(results, model, images, grad_out, torch.float32, ATTN + LN + ATTN_BWD + LN_BWD,
                "FSDP, patch_embed sharded")
    assert all(res["launches"].get(PE[0], 0) == 0 for res in results), "the unfused ViT ran patch_embed's kernel"


def test_fsdp_mixed_precision_bf16(ranks):
    """MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32) on the CPU: the fused kernels run in bf16
    (the parameters FSDP unshards and the inputs it casts), against eager PyTorch in bf16 on the whole batch."""
    model, images, grad_out = _batch("timm_vit")
    results = ranks.run(_fsdp_step, model, images, grad_out, True, True)
    assert results[0]["step"][0].dtype == torch.bfloat16
    _check_fsdp(results, model, images, grad_out, torch.bfloat16, VIT_KERNELS, "FSDP bf16")


# ---------------------------------------------------------------------------------------------------------------
# ring attention (fastattn.distributed)
# ---------------------------------------------------------------------------------------------------------------

MERGE = merge_ops.FORWARD_KERNELS


def _ring_job(rank: int, world: int, q, k, v, do, layout: str, causal: bool, scale, own_group: bool):
    """This rank's shard of the whole sequence through ring_attention, forward and backward."""
    import warnings

    from fastattn.distributed import ring_attention, shard_sequence

    group = dist.new_group(list(range(world))) if own_group else None
    q, k, v = (shard_sequence(t.detach(), world, rank, layout=layout).clone().requires_grad_() for t in (q, k, v))
    with warnings.catch_warnings(record=True) as caught, fastattn.record_launches() as launches:
        warnings.simplefilter("always")
        out = ring_attention(q, k, v, group, is_causal=causal, scale=scale, layout=layout)
        out.backward(shard_sequence(do, world, rank, layout=layout))
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, fastattn.FallbackWarning)]
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}, dict(launches), fallbacks


def _ring_case(ranks, dtype, layout, causal, *, B=2, H=2, H_kv=2, L=5, D=16, scale=None, own_group=False):
    """ring_attention on every rank against attention of the whole sequence in this process: float64 reference,
    eager PyTorch in ``dtype`` (tests/harness.three_way; the ranks' shards gathered in sequence order), under the
    ring's floors (fastattn.testing.ring_attention_floors). Returns each rank's launches and fallback warnings."""
    from fastattn.distributed import unshard_sequence

    torch.manual_seed(1)
    n = L * WORLD
    q, k, v = (torch.randn(B, h, n, D).to(dtype) for h in (H, H_kv, H_kv))
    do = torch.randn(B, H, n, D).to(dtype)
    per_rank = []

    def run(label: str, lowp: torch.dtype):
        if label == "ours":
            per_rank[:] = ranks.run(_ring_job, q, k, v, do, layout, causal, scale, own_group)
            return {name: unshard_sequence([r[0][name] for r in per_rank], layout=layout)
                    for name in ("out", "dq", "dk", "dv")}
        leaves = [t.to(lowp, copy=True).requires_grad_() for t in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal, scale=scale,
                                                               enable_gqa=H != H_kv)
        out.backward(do.to(lowp))
        return {"out": out.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}

    def floors(results):
        return ring_attention_floors(q, k, v, do, dtype=dtype, world_size=WORLD, layout=layout, is_causal=causal,
                                     scale=scale, out=results["ours"]["out"])

    three_way(run, dtype, floors=floors)
    return [(launches, fallbacks) for _, launches, fallbacks in per_rank]


@pytest.mark.parametrize("layout,causal,L", [("contiguous", False, 5), ("contiguous", True, 5),
                                             ("zigzag", False, 6), ("zigzag", True, 6)])
def test_ring_attention(ranks, layout, causal, L):
    """fp32, every layout with and without the causal mask: each rank's output and gradients, gathered, against the
    whole sequence's attention; the fused kernels ran on every rank, the merge wherever a rank had a second part."""
    per_rank = _ring_case(ranks, torch.float32, layout, causal, L=L, own_group=layout == "zigzag")
    for rank, (launches, fallbacks) in enumerate(per_rank):
        assert not fallbacks, fallbacks
        merges = 0 if causal and layout == "contiguous" and rank == 0 else 1  # rank 0 skips the future block
        assert_launched(launches, {**dict.fromkeys(ATTN, 1 + merges), **dict.fromkeys(ATTN_BWD, 1 + merges),
                                   **dict.fromkeys(MERGE, merges)})


@pytest.mark.parametrize("dtype,layout,causal", [(torch.bfloat16, "zigzag", True), (torch.float16, "contiguous", True)])
def test_ring_attention_low_precision_gqa(ranks, dtype, layout, causal):
    """Half precision, grouped-query attention (4 query heads on 2 key/value heads), an explicit scale, head dim 24."""
    per_rank = _ring_case(ranks, dtype, layout, causal, H=4, H_kv=2, L=8, D=24, scale=0.3)
    for launches, fallbacks in per_rank:
        assert not fallbacks, fallbacks
        assert_launched(launches, ATTN + ATTN_BWD)


def test_ring_attention_fallback(ranks):
    """A head dim above the kernels' limit: every block runs the eager reference (forward) and the eager block
    backward, with a FallbackWarning, and the result is still the whole sequence's attention."""
    per_rank = _ring_case(ranks, torch.float32, "zigzag", True, B=1, H=1, H_kv=1, L=4, D=264)
    for launches, fallbacks in per_rank:
        assert not sum(launches.values()), launches
        assert any("ring_attention" in f for f in fallbacks) and any("above the kernels' limit" in f
                                                                     for f in fallbacks), fallbacks


def test_shard_and_unshard_sequence():
    from fastattn.distributed import ring_schedule, shard_sequence, unshard_sequence

    x = torch.arange(12.0).reshape(1, 12, 1)
    assert shard_sequence(x, 3, 1, layout="zigzag").flatten().tolist() == [2.0, 3.0, 8.0, 9.0]
    assert shard_sequence(x, 3, 2).flatten().tolist() == [8.0, 9.0, 10.0, 11.0]
    for layout in ("contiguous", "zigzag"):
        assert torch.equal(unshard_sequence([shard_sequence(x, 3, r, layout=layout) for r in range(3)],
                                            layout=layout), x)
    # zigzag, causal: every rank computes the same number of (query, key) pairs
    work = [sum((s.rows.stop - s.rows.start) * (s.keys.stop - s.keys.start)
                for s in ring_schedule(4, r, 6, is_causal=True, layout="zigzag")) for r in range(4)]
    assert len(set(work)) == 1, work
    with pytest.raises(ValueError, match="does not split into 6 equal chunks"):
        shard_sequence(torch.zeros(1, 10, 1), 3, 0, layout="zigzag")


def test_ring_attention_bad_input():
    from fastattn.distributed import ring_attention

    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, q, q, layout="striped")
    with pytest.raises(ValueError, match="local sequence length must be even"):
        ring_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], layout="zigzag")
    with pytest.raises(ValueError, match=r"must be \(B, H, L_local, D\)"):
        ring_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="same L_local"):
        ring_attention(q, q[:, :, :4], q[:, :, :4])
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        ring_attention(q, q, q, is_causal=1)
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        ring_attention(q, q, q)  # this process has no process group
