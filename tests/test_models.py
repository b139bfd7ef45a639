"""fastattn.models: the fused models against the same models built eager (same weights; tests/modelcheck.py), the
cached greedy decoder against plain re-decoding, the configs' sizes, torchvision's ResNet weights, and the demo.

Tiny configs only: the fused models run the Triton kernels through the interpreter on a CPU.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from modelcheck import (
    ATTN,
    ATTN_BWD,
    BN_BWD,
    BN_EVAL,
    BN_TRAIN,
    DEVICE,
    LN,
    LN_BWD,
    PE,
    PE_BWD,
    assert_kernels,
    assert_step_close,
    compare_models,
    import_or_skip,
    step_results,
)
from torch import nn
from torch.nn.attention.bias import CausalBias, CausalVariant

import fastattn
from fastattn import models
from fastattn.ops import varlen as varlen_ops


def _pair(make):
    eager, fused = make(False), make(True)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _tiny_transformer(fused: bool, **kw) -> models.Transformer:
    return models.Transformer(11, 13, d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=2, d_ff=48,
                              dropout=0.0, max_len=32, fused=fused, **kw)


def _padding(lengths: list[int], L: int) -> torch.Tensor:
    return torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding


def test_transformer_fused_matches_eager():
    eager, fused = _pair(_tiny_transformer)
    assert [type(m) for m in fused.modules()].count(fastattn.nn.LayerNorm) == 2 + 2 * 3
    src, tgt = torch.randint(3, 11, (2, 7)), torch.randint(3, 13, (2, 5))
    kw = {"src_padding_mask": _padding([7, 4], 7), "tgt_padding_mask": _padding([5, 3], 5)}
    compare_models(fused, eager, (src, tgt), kw, eval_kernels=ATTN + LN, train_kernels=ATTN + LN + ATTN_BWD + LN_BWD)


def test_transformer_trains_on_packed_batches():
    """A packed batch (sources of 7, 2 and 5 tokens, targets of 3, 6 and 1, back to back: no padding) through every
    attention layer's varlen path (encoder self-attention, decoder causal self-attention and encoder-decoder
    attention with cross lengths) against the padded batch: the fused model on the packed batch, the eager model and
    its float64 copy on the padded one with padding masks. The logits at the real positions and every parameter
    gradient (padding gets no gradient) follow the rule (tests/modelcheck.py), and the varlen kernels ran."""
    eager, fused = _pair(_tiny_transformer)
    src_len, tgt_len = [7, 2, 5], [3, 6, 1]
    src, tgt = torch.randint(3, 11, (3, 7)), torch.randint(3, 13, (3, 6))
    padded = {"src_padding_mask": _padding(src_len, 7), "tgt_padding_mask": _padding(tgt_len, 6)}
    real = ~padded["tgt_padding_mask"]  # (B, T): the target positions that exist

    def pack(tokens, lengths):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        return torch.cat([t[:n] for t, n in zip(tokens, lengths)]).to(DEVICE), cu

    (src_p, cu_src), (tgt_p, cu_tgt) = pack(src, src_len), pack(tgt, tgt_len)
    packed = {"cu_seqlens_src": cu_src, "cu_seqlens_tgt": cu_tgt, "max_seqlen_src": 7, "max_seqlen_tgt": 6}
    grad_out = torch.randn(sum(tgt_len), 13, dtype=torch.float64)
    runs = {"ref": copy.deepcopy(eager).double(), "eager": eager, "ours": fused}
    res = {}
    for label, model in runs.items():
        model.to(DEVICE).train()
        with fastattn.record_launches() as launches:
            if label == "ours":
                out = model(src_p, tgt_p, **packed)
                out.backward(grad_out.to(DEVICE, out.dtype))
            else:
                logits = model(src.to(DEVICE), tgt.to(DEVICE), **{k: m.to(DEVICE) for k, m in padded.items()})
                out = logits[real.to(DEVICE)]  # (T_tgt, vocab): the packed rows' order
                out.backward(grad_out.to(DEVICE, out.dtype))
        res[label] = step_results(model, out)
    assert_step_close(res["ours"], res["eager"], res["ref"], what="packed vs padded")
    assert_kernels(launches, varlen_ops.FORWARD_KERNELS + varlen_ops.BACKWARD_KERNELS + LN + LN_BWD, "packed")


def _greedy_without_cache(model: models.Transformer, src, max_len, pad=None):
    ys = torch.ones(src.size(0), 1, dtype=torch.long, device=src.device)
    for _ in range(max_len - 1):
        logits = model(src, ys, src_padding_mask=pad)
        ys = torch.cat([ys, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ys


def test_generate_uses_the_cache_lower_right_causal():
    """Fused: each step's self-attention writes its key into a preallocated cache and attends with
    attention_with_kvcache; the encoder-decoder attention reuses the memory's keys. Eager: the keys are concatenated
    and attended lower-right causal. Both give the tokens of re-decoding the whole prefix at every step."""
    eager, fused = (m.eval().to(DEVICE) for m in _pair(_tiny_transformer))
    src, pad = torch.randint(3, 11, (2, 6), device=DEVICE), _padding([6, 3], 6).to(DEVICE)
    calls, steps = [], []
    kvcache = fastattn.attention_with_kvcache

    def spying(attend):
        def spy(self, q, k, v, mask, is_causal):
            calls.append((q.size(2), k.size(2), mask, is_causal))
            return attend(self, q, k, v, mask, is_causal)
        return spy

    def spy_kvcache(q, k_cache, v_cache, k, v, *, cache_seqlens, **kw):
        steps.append((q.size(1), k_cache.size(1), cache_seqlens.tolist(), kw.get("is_causal")))
        return kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, **kw)

    with pytest.MonkeyPatch.context() as mp, fastattn.record_launches() as launches:
        mp.setattr(fastattn, "attention_with_kvcache", spy_kvcache)
        mp.setattr(models.FusedMultiHeadAttention, "attend", spying(models.FusedMultiHeadAttention.attend))
        out = fused.generate(src, max_len=6, src_padding_mask=pad)
    assert len(steps) == 2 * 5 and launches["_kvcache_attn"] == launches["_kvcache_append"] == 2 * 5
    assert all(lq == 1 and cap == 6 and causal for lq, cap, _, causal in steps)  # one token, a 6-position cache
    assert [lens for _, _, lens, _ in steps[::2]] == [[n, n] for n in range(5)]  # one more key per step
    cross = [c for c in calls if c[0] == 1]  # the rest: the encoder's self-attention
    assert launches["_attn_fwd"] == len(calls) and len(cross) == 2 * 5 and all(lk == 6 for _, lk, _, _ in cross)
    assert not any(isinstance(c[2], CausalBias) for c in calls)
    expected = _greedy_without_cache(eager, src, 6, pad)
    assert torch.equal(out, expected)
    calls.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models.MultiHeadAttention, "attend", spying(models.MultiHeadAttention.attend))
        assert torch.equal(eager.generate(src, max_len=6, src_padding_mask=pad), expected)
    self_attn = [(lq, lk, mask) for lq, lk, mask, _ in calls if isinstance(mask, CausalBias)]
    assert all(lq == 1 and mask.variant == CausalVariant.LOWER_RIGHT for lq, _, mask in self_attn)
    assert [lk for _, lk, _ in self_attn[::2]] == [1, 2, 3, 4, 5]  # the cache grows by one key per step


def test_generate_stops_at_eos():
    model = _tiny_transformer(False).eval()
    nn.init.zeros_(model.generator.weight)
    with torch.no_grad():
        model.generator.bias.copy_(torch.arange(13.0) == 2)  # always predicts token 2
    out = model.generate(torch.randint(3, 11, (3, 4)), max_len=10, eos_id=2)
    assert out.tolist() == [[1, 2]] * 3


def test_vit_fused_matches_eager():
    def make(fused):
        return models.VisionTransformer(img_size=12, patch_size=4, in_chans=3, num_classes=5, embed_dim=48, depth=2,
                                        num_heads=3, mlp_ratio=2.0, fused=fused)

    eager, fused = _pair(make)
    assert isinstance(fused.patch_embed, fastattn.nn.PatchEmbed) and type(eager.patch_embed) is nn.Conv2d
    compare_models(fused, eager, (torch.randn(2, 3, 12, 12),), eval_kernels=ATTN + LN + PE,
                   train_kernels=ATTN + LN + PE + ATTN_BWD + LN_BWD + PE_BWD)


@pytest.mark.parametrize("block,size", [(models.BasicBlock, 64), (models.Bottleneck, 64)])
def test_resnet_fused_matches_eager(block, size):
    """Images large enough that the last stage's BatchNorm sees more than two values per channel (see
    tests/modelcheck.py): 64 px is 2x2 at the last stage, 8 values per channel with batch 2 (32 px would leave 2)."""
    def make(fused):
        return models.ResNet(block, [1, 1, 1, 1], num_classes=5, width=4, fused=fused)

    eager, fused = _pair(make)
    assert type(fused.bn1) is type(fused.layer2[0].bn2) is fastattn.nn.BatchNormAddReLU
    assert type(fused.layer2[0].downsample[1]) is nn.BatchNorm2d  # the shortcut's BN has no ReLU
    compare_models(fused, eager, (torch.randn(2, 3, size, size),), eval_kernels=BN_EVAL,
                   train_kernels=BN_TRAIN + BN_BWD)


def test_layers_helpers():
    x, residual = torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 3, 8, device=DEVICE)
    drop = nn.Dropout(0.5).eval()
    norm = fastattn.nn.LayerNorm(8).to(DEVICE)
    with fastattn.record_launches() as launches:
        out = fastattn.nn.add_norm(norm, x, residual, drop)
        h, res = fastattn.nn.add_then_norm(norm, x, residual, nn.Identity())
    assert launches["_layer_norm_fwd"] == 2
    torch.testing.assert_close(out, nn.functional.layer_norm(x + residual, (8,)))
    torch.testing.assert_close(res, x + residual)
    torch.testing.assert_close(h, out)
    with fastattn.record_launches() as launches:
        y = fastattn.nn.bn_relu(fastattn.nn.BatchNormAddReLU(3).eval().to(DEVICE), x.view(2, 3, 2, 4),
                           residual.view(2, 3, 2, 4))
    assert launches["_bn_fwd_apply"] == 1
    # a plain nn.Dropout in training becomes the fused kernel's dropout on x (not on the output)
    ones, zeros = torch.ones(4, 64, device=DEVICE), torch.zeros(4, 64, device=DEVICE)
    norm, drop = fastattn.nn.LayerNorm(64, elementwise_affine=False).to(DEVICE), nn.Dropout(0.5)
    _, res = fastattn.nn.add_then_norm(norm, ones, zeros, drop)
    assert set(res.unique().tolist()) == {0.0, 2.0} and 0.3 < (res == 0).float().mean() < 0.7
    assert fastattn.nn.add_norm(norm, ones, zeros, drop).abs().max() > 0.5  # LN of a constant row would be 0
    norm.eval(), drop.eval()
    assert fastattn.nn.add_norm(norm, ones, zeros, drop).abs().max() == 0
    torch.testing.assert_close(y, torch.relu(x.view(2, 3, 2, 4) / (1 + 1e-5) ** 0.5 + residual.view(2, 3, 2, 4)))


# ---------------------------------------------------------------------------------------------------------------
# configs and checkpoints
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory,params", [
    (models.vit_tiny, 5_717_416), (models.vit_small, 22_050_664), (models.vit_base, 86_567_656),
    (models.vit_large, 304_326_632), (models.resnet18, 11_689_512), (models.resnet34, 21_797_672),
    (models.resnet50, 25_557_032),
])
def test_config_sizes(factory, params):
    """The paper configs have the published parameter counts (timm's ViT-*/16 at 224 px, torchvision's ResNets)."""
    with torch.device("meta"):
        model = factory()
    assert sum(p.numel() for p in model.parameters()) == params


def test_resnet18_loads_torchvision_weights():
    tv = import_or_skip("torchvision")
    theirs = tv.models.resnet18(num_classes=10).eval()
    ours = models.resnet18(num_classes=10, fused=False).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: same keys and shapes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


# ---------------------------------------------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------------------------------------------


def test_demo_tiny_run():
    """``python -m fastattn.demo`` in a tiny mode, started without TRITON_INTERPRET: on a CPU it starts itself
    again with the interpreter on, trains both pairs and prints both curves and accuracies."""
    pytest.importorskip("sklearn")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # no wall-time assertion: speed goals live in benchmarks; the timeout only stops a hung child
    proc = subprocess.run([sys.executable, "-m", "fastattn.demo", "--steps", "2", "--batch", "4", "--eval-size", "4"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    if not torch.cuda.is_available():
        assert "running again with TRITON_INTERPRET=1" in out
    assert "loss fused" in out and "test accuracy: fused" in out and "exact-match accuracy: fused" in out
    for line in out.splitlines():  # the two curves agree
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit():
            assert abs(float(parts[1]) - float(parts[2])) < 1e-3, line


def test_demo_names_missing_scikit_learn(monkeypatch):
    from fastattn import demo

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit, match="scikit-learn"):
        demo.load_digits_dataset(torch.device("cpu"))
