"""fastattn.patch on Hugging Face transformers models built from tiny configs (no downloads): logits and every
parameter gradient against the unpatched model under the model-level rule of tests/modelcheck.py, the Triton kernels
launched, ``generate`` (decode steps through the KV-cache kernel, split-KV for a long cache), gradient checkpointing,
``torch.compile``, unpatch, pickling, the RMSNorm probe and the attention function's fallbacks.

Every config is 1-2 layers of width 32, vocabulary 100, sequences of 7 tokens and images of 32 px: every kernel runs
through Triton's interpreter. Dropout is 0 wherever gradients are compared (fused dropout draws its own stream).
"""

from __future__ import annotations

import copy
import os
import pickle
import warnings

import pytest
import torch
from harness import three_way
from modelcheck import ATTN, ATTN_BWD, LN, LN_BWD, PE, PE_BWD, assert_kernels, compare_models, import_or_skip

import fastattn
from fastattn import reference
from fastattn.ops import kvcache as kv_ops
from fastattn.patching import rules
from fastattn.patching import transformers_attention as hf_attention
from fastattn.testing import assert_close_to_reference, kvcache_floors, norm_floors

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = import_or_skip("transformers")

TINY = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "max_position_embeddings": 64, "attention_dropout": 0.0}
EVAL, TRAIN = ATTN + LN, ATTN + LN + ATTN_BWD + LN_BWD


def _tokens(B: int = 2, L: int = 7, left_pad: int = 0, right_pad: int = 0) -> dict:
    ids = torch.randint(1, 100, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    if left_pad:
        mask[1, :left_pad] = 0
    if right_pad:
        mask[1, L - right_pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _check(model, kwargs: dict, eval_kernels=EVAL, train_kernels=TRAIN):
    """fastattn.patch(deepcopy(model)) against the unpatched ``model`` and a float64 copy of it; returns ours."""
    ours = fastattn.patch(copy.deepcopy(model))
    assert ours.config._attn_implementation == hf_attention.NAME
    extra = {"use_cache": False} if model.can_generate() else {}
    compare_models(ours, model, (), {**kwargs, **extra, "return_dict": False}, eval_kernels=eval_kernels,
                   train_kernels=train_kernels)
    return ours


def _fused(ours, cls_name: str) -> list[str]:
    return [e.name for e in fastattn.patch_report(ours).fused if e.module == cls_name]


def llama(**kw):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "num_key_value_heads": 2, **kw}))


# ---------------------------------------------------------------------------------------------------------------
# the models of the issue
# ---------------------------------------------------------------------------------------------------------------


def test_llama_gqa_left_padding():
    """GQA (4 query heads on 2 key/value heads) and a left-padded row, whose first query rows have no key at all:
    zeros, and no NaN in any gradient (compare_models requires finite results)."""
    ours = _check(llama(num_hidden_layers=2), _tokens(left_pad=3))
    report = fastattn.patch_report(ours)
    assert len(_fused(ours, "LlamaDecoderLayer")) == 2 and len(_fused(ours, "LlamaRMSNorm")) == 5
    assert len(_fused(ours, "LlamaAttention")) == 2
    hf_modules = {n for n, m in ours.named_modules() if type(m).__module__.startswith(("transformers",
                                                                                       "fastattn.patching"))}
    assert hf_modules <= {e.name for e in report.fused + report.left_alone}, "every transformers module is reported"


def test_mistral_sliding_window_shorter_than_the_sequence():
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, num_key_value_heads=2,
                                                                      sliding_window=3))
    _check(model, _tokens())


def test_qwen3_q_norm_k_norm():
    """No padding: transformers builds no mask and the kernel applies causality from the module's is_causal."""
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=8))
    ours = _check(model, {"input_ids": _tokens()["input_ids"]})
    assert {"model.layers.0.self_attn.q_norm", "model.layers.0.self_attn.k_norm"} <= set(_fused(ours,
                                                                                                "Qwen3RMSNorm"))


def test_gemma2_softcap():
    """Gemma 2's ``1 + w`` RMSNorms run the norm kernel; its softcapped attention runs the kernel where fastattn has
    ``softcap``, else the model's own eager attention with a FallbackWarning (transformers' sdpa refuses softcap)."""
    cfg = transformers.Gemma2Config(**TINY, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=None, sliding_window=4)
    model = transformers.Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.5)  # Gemma initialises them to 0 (a norm of 1 + 0)
    kernels = (EVAL, TRAIN) if hf_attention.KERNEL_MODIFIERS else (LN, LN + LN_BWD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = _check(model, _tokens(), *kernels)
    fell_back = [w for w in caught if issubclass(w.category, fastattn.FallbackWarning) and "softcap" in str(w.message)]
    assert bool(fell_back) != hf_attention.KERNEL_MODIFIERS
    assert len(_fused(ours, "Gemma2RMSNorm")) == 5


def test_gpt_oss_sinks():
    """gpt-oss's attention sinks (``s_aux``) run the kernel where fastattn has ``sinks``, else the model's eager
    attention (FallbackWarning); its RMSNorm rounds once, after the weight multiply, and the probe finds that."""
    cfg = transformers.GptOssConfig(**{**TINY, "num_hidden_layers": 2, "intermediate_size": 32}, num_key_value_heads=2,
                                    head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=4,
                                    experts_implementation="eager")  # grouped_mm has no float64 (the reference)
    kernels = (EVAL, TRAIN) if hf_attention.KERNEL_MODIFIERS else (LN, LN + LN_BWD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = _check(transformers.GptOssForCausalLM(cfg), {"input_ids": _tokens()["input_ids"]}, *kernels)
    fell_back = [w for w in caught if issubclass(w.category, fastattn.FallbackWarning) and "s_aux" in str(w.message)]
    assert bool(fell_back) != hf_attention.KERNEL_MODIFIERS
    forms = {e.detail for e in fastattn.patch_report(ours).fused if e.module == "GptOssRMSNorm"}
    assert forms == {"RMSNorm kernel (w * x_norm in float32; out input dtype)"}


def test_gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    ours = _check(transformers.GPT2LMHeadModel(cfg), _tokens(left_pad=2))
    assert len(_fused(ours, "GPT2Block")) == 2


def test_bert_padding():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    ours = _check(transformers.BertModel(cfg, add_pooling_layer=False), _tokens(right_pad=3))
    assert _fused(ours, "BertSelfOutput") and _fused(ours, "BertOutput")


def test_vit():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=3, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    ours = _check(transformers.ViTForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 32, 32)},
                  EVAL + PE, TRAIN + PE + PE_BWD)
    assert _fused(ours, "ViTEmbeddings") and _fused(ours, "ViTLayer")


def test_clip_text():
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=64, attention_dropout=0.0)
    ours = _check(transformers.CLIPTextModel(cfg), _tokens(right_pad=2))
    assert _fused(ours, "CLIPEncoderLayer")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter: min-valued mask * log2(e)
def test_t5_position_bias():
    """T5's learned relative position bias reaches the kernel as an additive mask (scaling 1.0), its gradient
    through the kernel's mask gradient; T5LayerNorm is an RMSNorm without the Llama rounding."""
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                num_heads=4, dropout_rate=0.0, relative_attention_num_buckets=8,
                                relative_attention_max_distance=16)
    inputs = _tokens(right_pad=2)
    ours = _check(transformers.T5ForConditionalGeneration(cfg),
                  {**inputs, "decoder_input_ids": torch.randint(1, 100, (2, 5))})
    assert len(_fused(ours, "T5LayerNorm")) == 7 and len(_fused(ours, "T5Attention")) == 3


# ---------------------------------------------------------------------------------------------------------------
# decoding, checkpointing, compile, unpatch, pickling
# ---------------------------------------------------------------------------------------------------------------


KV = kv_ops.FORWARD_KERNELS[0]


def _generate(model, inputs: dict, new: int = 4):
    """Greedy ``generate`` of the unpatched ``model`` and of a patched copy: (tokens, ours, launches of ours)."""
    ours = fastattn.patch(copy.deepcopy(model))
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    with fastattn.record_launches() as launches:
        got = ours.generate(**inputs, **kw)
    return got, model.generate(**inputs, **kw), launches


def test_generate_gives_the_same_tokens():
    """Left padding: every step has a mask, which the KV-cache kernel does not take, so each runs the attention
    kernel."""
    got, expected, launches = _generate(llama(num_hidden_layers=2).eval(), _tokens(left_pad=2))
    assert torch.equal(got, expected)
    assert launches["_attn_fwd"] == 2 * 4 and launches[KV] == 0  # prefill and three cached decode steps, each layer


def test_generate_decodes_through_the_kvcache_kernel():
    """No padding: the decode steps get no mask, and each layer's runs attention_with_kvcache over the DynamicCache's
    keys (GQA: 4 query heads on 2 key/value heads); the prefill keeps the attention kernel."""
    got, expected, launches = _generate(llama(num_hidden_layers=2).eval(), _tokens())
    assert torch.equal(got, expected)
    assert (launches["_attn_fwd"], launches[KV]) == (2, 2 * 3), dict(launches)


def test_generate_gemma2_softcap_decodes_through_the_kvcache_kernel():
    """Gemma 2 alternates a sliding layer (window 4, shorter than the sequence: a mask every step) and a global one
    (no mask when decoding): the global layer's decode steps run the KV-cache kernel with the softcap, the sliding
    layer's the path of the prefill (the attention kernel where it takes softcap, else the model's eager attention
    with a FallbackWarning). Same tokens as the unpatched model (whose default is its eager attention)."""
    cfg = transformers.Gemma2Config(**{**TINY, "num_hidden_layers": 2}, num_key_value_heads=2, head_dim=8,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=None, sliding_window=4)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [4, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastattn.FallbackWarning)
        got, expected, launches = _generate(model, _tokens())
    assert torch.equal(got, expected)
    assert launches[KV] == 3, dict(launches)


def test_generate_with_a_long_prompt_decodes_split_kv():
    """A 300-token prompt, one sequence: each decode step's 2 key/value heads are fewer tiles than the interpreter's
    SMs, so the schedule splits the cache and the combine kernel runs; same tokens as the unpatched model."""
    model = llama(max_position_embeddings=512).eval()
    got, expected, launches = _generate(model, {"input_ids": torch.randint(1, 100, (1, 300))}, new=3)
    assert torch.equal(got, expected)
    assert (launches[KV], launches["_merge_fwd"]) == (2, 2), dict(launches)


def test_gradient_checkpointing_still_recomputes():
    """transformers 5 checkpoints a layer by wrapping its class forward; the fused class's forward is wrapped too,
    so the backward recomputes it: the forward kernels of the layers run twice per step."""
    model = llama(num_hidden_layers=2)
    ours = fastattn.patch(copy.deepcopy(model)).train()
    ids = _tokens()["input_ids"]
    counts = []
    for checkpointing in (False, True):
        if checkpointing:
            ours.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        ours.zero_grad()
        with fastattn.record_launches() as launches:
            ours(ids, use_cache=False).logits.sum().backward()
        counts.append((launches["_attn_fwd"], launches["_attn_bwd_dq"]))
    assert counts == [(2, 2), (4, 2)], counts
    grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    model.train().zero_grad()
    model(ids, use_cache=False).logits.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_compile_fullgraph_llama():
    ours = fastattn.patch(llama()).eval()
    ids = _tokens()["input_ids"]
    with torch.no_grad():
        eager = ours(ids, use_cache=False).logits
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
        with fastattn.record_launches() as launches:
            out = compiled(ids, use_cache=False).logits
    torch.testing.assert_close(out, eager)
    assert_kernels(launches, EVAL, "compiled Llama")


def test_unpatch_restores_the_implementation_and_classes():
    model = llama().eval()
    classes = {n: type(m) for n, m in model.named_modules()}
    ids = _tokens()["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    fastattn.patch(model)
    assert (model.config._attn_implementation, model.model.config._attn_implementation) == ("fastattn", "fastattn")
    fastattn.unpatch(model)
    assert model.config is model.model.config and model.config._attn_implementation == "sdpa"
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any(k.startswith("_fastattn") for m in model.modules() for k in vars(m))
    with torch.no_grad(), fastattn.record_launches() as launches:
        assert torch.equal(model(ids).logits, before)
    assert not launches


def test_unpatch_restores_every_config_of_a_composite_model():
    """CLIP holds a text and a vision submodel with their own configs (sub-configs of the top one): patching sets
    all three, unpatch writes back what each had, here a mix."""
    text = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 16}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 16, "patch_size": 8}
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                           projection_dim=16))
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    configs = (model.config, model.config.text_config, model.config.vision_config)
    before = [c._attn_implementation for c in configs]
    assert before[1:] == ["eager", "sdpa"]
    fastattn.patch(model)
    assert [c._attn_implementation for c in configs] == ["fastattn"] * 3
    assert model.text_model.config._attn_implementation == "fastattn"
    fastattn.unpatch(model)
    assert [c._attn_implementation for c in configs] == before


def test_unpatch_restores_an_eager_model():
    cfg = transformers.LlamaConfig(**{**TINY, "num_key_value_heads": 2}, attn_implementation="eager")
    model = fastattn.patch(transformers.LlamaForCausalLM(cfg))
    assert model.config._attn_implementation == "fastattn"
    assert fastattn.unpatch(model).config._attn_implementation == "eager"


def test_patched_model_pickles_into_a_fresh_process_state():
    """The generated fused classes pickle by value, and the saved implementations re-register "fastattn"; both are
    rebuilt here as in a process that never patched anything."""
    model = fastattn.patch(llama()).eval()
    stream = pickle.dumps(model)
    rules._GENERATED.clear()
    transformers.AttentionInterface._global_mapping.pop("fastattn")
    transformers.masking_utils.AttentionMaskInterface._global_mapping.pop("fastattn")
    loaded = pickle.loads(stream)
    assert type(loaded.model.layers[0]).__name__ == "FusedTransformersLlamaDecoderLayer"
    assert type(loaded.model.layers[0]) is not type(model.model.layers[0])  # rebuilt, not the cached one
    ids = _tokens()["input_ids"]
    with torch.no_grad(), fastattn.record_launches() as launches:
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert_kernels(launches, EVAL, "unpickled model")
    assert fastattn.unpatch(loaded).config._attn_implementation == "sdpa"


def test_patch_options_and_twice():
    model = llama()
    fastattn.patch(model, attention=False)
    report = fastattn.patch_report(model)
    assert model.config._attn_implementation == "sdpa"
    assert any(e.name == "" and "attention=False" in e.detail for e in report.left_alone)
    fastattn.unpatch(model)
    fastattn.patch(model)
    fastattn.patch(model)  # nothing more
    assert all(e.detail in ("already fused", "built fused") for e in fastattn.patch_report(model).fused)
    assert fastattn.unpatch(model).config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm: recognised by structure and a numerical probe
# ---------------------------------------------------------------------------------------------------------------


def _norm_forms():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from fastattn.patching.transformers import RMSForm

    return [(LlamaRMSNorm(48, eps=1e-5), RMSForm("variance_epsilon", False, True, True)),
            (Gemma2RMSNorm(48, eps=1e-6), RMSForm("eps", True, False, False)),
            (T5LayerNorm(48, eps=1e-6), RMSForm("variance_epsilon", False, False, True))]


@pytest.mark.parametrize("case", [0, 1, 2], ids=["llama", "gemma2", "t5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_semantics(case, dtype):
    """Each norm's form is found by the probe; the fused norm then matches the module's own forward (float32
    weights, activations in ``dtype``: the output dtype too) under the 2x rule, forward and gradients, and rounds
    as the module does: it agrees with the module's own result more often than the other rounding order does."""
    norm, form = _norm_forms()[case]
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48) * 0.5 + (0.0 if form.plus_one else 1.0))
    ours = fastattn.patch(copy.deepcopy(norm))
    assert ours._fastattn_rms == form
    x = (torch.randn(2, 5, 48) * 3).to(dtype)
    runs = {}
    for label, m, inp in (("ref", copy.deepcopy(norm).double(), x.double()), ("eager", norm, x), ("ours", ours, x)):
        inp = inp.clone().requires_grad_()
        with fastattn.record_launches() as launches:
            out = m(inp)
            out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype))
        runs[label] = (out, inp.grad, m.weight.grad)
        m.weight.grad = None
    assert runs["ours"][0].dtype == runs["eager"][0].dtype
    assert_kernels(launches, LN + LN_BWD, "fused RMSNorm")
    weight = norm.weight.detach().double() + form.plus_one
    grad = torch.linspace(-1, 1, x.numel()).reshape(x.shape).double()
    floors = norm_floors(x.double(), None, weight, None, grad, dtype=dtype, eps=norm.__dict__[form.eps_attr],
                         rms=True)
    for i, what in enumerate(("out", "dx", "dweight")):
        ref, eager, got = (runs[k][i] for k in ("ref", "eager", "ours"))
        assert_close_to_reference(got, eager, ref, got.dtype, name=what, floor=floors[what])
    if dtype == torch.bfloat16:
        eager_out, ours_out = runs["eager"][0], runs["ours"][0]
        xhat = x.double() * torch.rsqrt(x.double().square().mean(-1, keepdim=True) + norm.__dict__[form.eps_attr])
        w = norm.weight.double() + form.plus_one
        other = (w * xhat.to(dtype).double() if not form.round_xhat else w * xhat).to(eager_out.dtype)
        assert (ours_out != eager_out).sum() < (other != eager_out).sum()


def test_rms_norm_like_modules_that_compute_something_else_are_left_alone():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class ScaledNorm(LlamaRMSNorm):  # eps outside the square root: not an RMSNorm the kernel computes
        def forward(self, hidden_states):
            h = hidden_states.float()
            return self.weight * (h / (h.pow(2).mean(-1, keepdim=True).sqrt() + self.variance_epsilon))

    ScaledNorm.__module__ = LlamaRMSNorm.__module__
    norm = ScaledNorm(16, eps=1e-2)
    fastattn.patch(norm)
    (entry,) = fastattn.patch_report(norm).left_alone
    assert "numerical check" in entry.detail and type(norm) is ScaledNorm
    model = llama().eval()  # such a norm inside a decoder layer: the layer's residual add stays eager, and says so
    model.model.layers[0].post_attention_layernorm = ScaledNorm(32, eps=1e-2)
    ours = fastattn.patch(copy.deepcopy(model))
    (layer,) = [e for e in fastattn.patch_report(ours).fused if e.module == "LlamaDecoderLayer"]
    assert "eager" in layer.detail
    ids = _tokens()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------------------------
# the attention function's contract and fallbacks
# ---------------------------------------------------------------------------------------------------------------


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def _qkv(B=2, H=4, HKV=2, Lq=6, Lk=6, D=8):
    q = torch.randn(B, Lq, H, D).transpose(1, 2)  # strided views, as the models pass them
    k = torch.randn(B, Lk, HKV, D).transpose(1, 2)
    v = torch.randn(B, Lk, HKV, D).transpose(1, 2)
    return q, k, v


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter: min-valued mask * log2(e)
def test_attention_function_matches_sdpa_attention():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv()
    bool_mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    bool_mask[1, :, :, :2] = False  # left padding: rows 0 and 1 of batch 1 have no key
    float_mask = torch.randn(2, 1, 6, 6)
    bias = torch.randn(1, 4, 6, 6)
    empty = torch.zeros(2, 6, dtype=torch.bool)
    empty[1, :2] = True  # (batch, query) rows of bool_mask with no key
    for mask, kw in ((None, {}), (bool_mask, {}), (float_mask, {"scaling": 1.0}), (None, {"is_causal": False}),
                     (bool_mask, {"position_bias": bias}), (None, {"position_bias": bias})):
        with fastattn.record_launches() as launches:
            out, weights = hf_attention.attention_forward(_Module(), q, k, v, mask, **kw)
        ref, _ = sdpa_attention_forward(_Module(), q, k, v, mask, **kw)
        assert weights is None and out.is_contiguous() and launches["_attn_fwd"] == 1
        if mask is bool_mask:  # rows with no key: zeros (sdpa gives the mean of v where the bias folds the mask
            # into a float mask of the dtype's minimum)
            assert not out[empty].any()
            out, ref = out[~empty], ref[~empty]
        torch.testing.assert_close(out, ref, msg=lambda m, kw=kw: f"{kw}: {m}")


def test_attention_function_static_cache_prefill_and_decode():
    """A causal prefill into a longer cache attends to the first Lq keys (as sdpa, which slices them); a single
    query (decoding) is never causal."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for Lq in (3, 1):
        q, k, v = _qkv(Lq=Lq, Lk=8)
        out, _ = hf_attention.attention_forward(_Module(), q, k, v, None)
        torch.testing.assert_close(out, sdpa_attention_forward(_Module(), q, k, v, None)[0])


def test_attention_function_falls_back_visibly():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv()
    for kw, words in (({"some_new_knob": 3}, "some_new_knob"), ({"output_attentions": True}, "output_attentions")):
        fastattn._runtime._warned.clear()
        with pytest.warns(fastattn.FallbackWarning, match=words), fastattn.record_launches() as launches:
            out, _ = hf_attention.attention_forward(_Module(), q, k, v, None, **kw)
        assert not launches
        torch.testing.assert_close(out, sdpa_attention_forward(_Module(), q, k, v, None)[0])


def test_attention_function_hands_the_modifiers_to_a_kernel_that_takes_them(monkeypatch):
    """Where fastattn.attention has softcap / window_size / sinks (the attention-v2 issue), the function passes
    Gemma's softcap, a causal model's sliding window (i - j < W: window (W - 1, -1)) and gpt-oss's s_aux to it, and
    keeps a bidirectional window in the mask only."""
    calls = []

    def kernel(*args, **kwargs):
        calls.append(kwargs)
        return torch.zeros(args[0].shape)

    monkeypatch.setattr(hf_attention, "KERNEL_MODIFIERS", True)
    monkeypatch.setattr(hf_attention, "attention", kernel)
    q, k, v = _qkv()
    sinks = torch.randn(4)
    hf_attention.attention_forward(_Module(), q, k, v, None, softcap=5.0, sliding_window=3, s_aux=sinks)
    hf_attention.attention_forward(_Module(), q, k, v, None, is_causal=False, sliding_window=3)
    assert calls[0]["softcap"] == 5.0 and calls[0]["window_size"] == (2, -1) and calls[0]["sinks"] is sinks
    assert "window_size" not in calls[1] and "softcap" not in calls[1]


class _Cross(_Module):
    is_causal = False  # cross-attention (Whisper's, T5's decoder): a few decoder rows against the encoder's keys


def _cache_qkv(B, H, HKV, Lq, Lk, D, dtype=torch.float64):
    """q as the models pass it (a (B, Lq, H, D) projection transposed), k/v as a DynamicCache holds them: (B, H_kv,
    Lk, D) contiguous, which the KV-cache kernel reads as (B, Lk, H_kv, D) through strides."""
    q = torch.randn(B, Lq, H, D, dtype=dtype).transpose(1, 2)
    return q, torch.randn(B, HKV, Lk, D, dtype=dtype), torch.randn(B, HKV, Lk, D, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["decode", "cross-softcap"])
def test_long_cache_decode_step_takes_the_split_kv_path(case, dtype):
    """A 523-key cache, one sequence, 8 query heads on 2 key/value heads: 2 tiles, fewer than the interpreter's
    INTERPRETER_SMS, so the schedule splits the keys and the combine kernel merges them. The result is within the 2x
    rule of the float64 truth against eager attention over the same cache, with kvcache_floors for that schedule.
    "cross-softcap": 3 non-causal query rows (cross-attention) with Gemma's softcap."""
    Lq, module, softcap = (1, _Module(), None) if case == "decode" else (3, _Cross(), 5.0)
    module.num_key_value_groups = 4
    q, k, v = _cache_qkv(1, 8, 2, Lq, 523, 16)
    lowp = [t.to(dtype) for t in (q, k, v)]
    sched = kv_ops.launch_schedule(*(t.transpose(1, 2) for t in lowp), None, 0)
    assert sched.splits > 1, sched

    def run(label, prec):
        qq, kk, vv = (t.to(prec) for t in (q, k, v))
        if label == "ours":
            with torch.no_grad():
                out, _ = hf_attention.attention_forward(module, qq, kk, vv, None, scaling=0.3, softcap=softcap)
        else:
            out = reference.attention_with_kvcache(*(t.transpose(1, 2) for t in (qq, kk, vv)), cache_seqlens=523,
                                                   scale=0.3, softcap=softcap or 0.0)
        return {"out": out}

    def floors(_):
        qd, kd, vd = (t.double().transpose(1, 2) for t in lowp)
        return kvcache_floors(qd, [kd[0]], [vd[0]], dtype=dtype, scale=0.3, softcap=softcap or 0.0,
                              splits=sched.splits, block_n=sched.block_n)

    res = three_way(run, dtype, kernels=kv_ops.FORWARD_KERNELS + kv_ops.COMBINE_KERNELS, floors=floors)
    assert res["launches"]["_attn_fwd"] == 0


@pytest.mark.filterwarnings("ignore::fastattn.FallbackWarning")
@pytest.mark.parametrize("case", ["decode", "cross", "grad", "dropout", "mask", "prefill", "rows", "sinks", "bias"])
def test_which_calls_are_decode_steps(case):
    """The KV-cache kernel takes a decode step (few query rows against more keys, no mask, no dropout, nothing that
    needs a gradient, no sinks or position_bias); everything else keeps the attention kernel, training included (its
    backward runs and matches sdpa's)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    Lq, Lk = {"prefill": (6, 6), "rows": (hf_attention.DECODE_MAX_QUERIES + 1, 40), "cross": (5, 9)}.get(case, (1, 9))
    module = _Cross() if case in ("cross", "rows") else _Module()
    q, k, v = (t.float().requires_grad_(case == "grad") for t in _cache_qkv(2, 4, 2, Lq, Lk, 8))
    mask = torch.ones(2, 1, Lq, Lk, dtype=torch.bool) if case == "mask" else None
    kw = {"dropout": 0.1} if case == "dropout" else {}
    kw |= {"s_aux": torch.randn(4)} if case == "sinks" else {}
    kw |= {"position_bias": torch.randn(1, 4, Lq, Lk)} if case == "bias" else {}
    with torch.set_grad_enabled(case == "grad"), fastattn.record_launches() as launches:
        out, _ = hf_attention.attention_forward(module, q, k, v, mask, **kw)
    decode = case in ("decode", "cross")
    attn = not decode and (case != "sinks" or hf_attention.KERNEL_MODIFIERS)  # else the sdpa function, warning
    assert (launches[KV] > 0, launches["_attn_fwd"] > 0) == (decode, attn), dict(launches)
    if case in ("dropout", "sinks"):
        return  # dropout draws its own stream; sinks run where the model's eager attention can take them
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, **kw)
    torch.testing.assert_close(out, ref)
    if case == "grad":
        grad = torch.randn_like(out)
        with fastattn.record_launches() as launches:
            got = torch.autograd.grad(out, (q, k, v), grad)
        assert launches["_attn_bwd_dq"] == 1
        for g, r in zip(got, torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(g, r)


def test_compiled_decode_step_is_one_graph_for_every_cache_length():
    """Under torch.compile(fullgraph=True, dynamic=True) a decode step traces into one graph around the KV-cache op:
    nothing in the choice of path reads the cache length, so a growing cache compiles once."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    module = _Module()
    step = torch.compile(lambda q, k, v: hf_attention.attention_forward(module, q, k, v, None)[0], fullgraph=True,
                         dynamic=True, backend=counter)
    frames = []
    with torch.no_grad():
        for Lk in (9, 10, 300):  # 300 keys: a split schedule (sched.splits > 1), 9 and 10 unsplit
            q, k, v = _cache_qkv(1, 4, 2, 1, Lk, 8, torch.float32)
            with fastattn.record_launches() as launches:
                out = step(q, k, v)
            frames.append(counter.frame_count)
            assert launches[KV] == 1 and not launches["_attn_fwd"]
            assert bool(launches["_merge_fwd"]) == (Lk == 300)
            torch.testing.assert_close(out, hf_attention.attention_forward(module, q, k, v, None)[0])
    assert frames[0] > 0 and frames == frames[:1] * 3, frames  # compiled for the first length only

