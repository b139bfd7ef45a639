"""fastattn.attention_with_kvcache against per-sequence float64 attention (fastattn.reference), under the 2x rule.

Each case runs three ways (tests/harness.py): the reference in float64, the reference in the low precision (eager)
and ours, on fresh copies of the caches; the kernels must have run. The caches after the call (the appended keys)
are compared exactly: the append is a copy.
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import cpu_only, dev, three_way

import fastattn
from fastattn import reference
from fastattn.ops import kvcache as kv_ops
from fastattn.testing import kvcache_floors


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


class Case:
    """float64 masters of one call, on the CPU: q (B, Lq, H, D), dense caches (B, L_cache, H_kv, D|DV), new keys,
    lengths; with ``page`` also a shuffled paged layout of the same caches. ``caches`` and ``expected_caches`` give
    them on the test device."""

    def __init__(self, B=3, Lq=1, H=4, Hkv=2, D=64, DV=None, L_cache=100, lens=(0, 1, 60), L_new=1, page=None):
        DV = DV or D
        self.q = randn(B, Lq, H, D)
        self.k_cache, self.v_cache = randn(B, L_cache, Hkv, D), randn(B, L_cache, Hkv, DV)
        self.k = randn(B, L_new, Hkv, D) if L_new else None
        self.v = randn(B, L_new, Hkv, DV) if L_new else None
        self.lens = torch.tensor(lens, dtype=torch.int32)
        self.page = page
        if page:
            assert L_cache % page == 0
            per = L_cache // page
            self.pages = B * per + 3  # a few pages no sequence uses
            order = torch.randperm(self.pages)[: B * per]
            self.block_table = order.view(B, per).to(torch.int32)

    def caches(self, lowp, paged):
        kc, vc = dev(self.k_cache, lowp, copy=True), dev(self.v_cache, lowp, copy=True)
        if not paged:
            return kc, vc, None
        shape = (self.pages, self.page, *kc.shape[2:])
        kp, vp = kc.new_zeros(shape), vc.new_zeros((*shape[:-1], vc.size(-1)))
        idx = dev(self.block_table.long().flatten())
        kp[idx] = kc.reshape(-1, self.page, *kc.shape[2:])
        vp[idx] = vc.reshape(-1, self.page, *vc.shape[2:])
        return kp, vp, dev(self.block_table)

    def dense(self, cache):
        """A paged cache read back in the dense layout."""
        B, per = self.block_table.shape
        return cache[dev(self.block_table.long().flatten())].reshape(B, per * self.page, *cache.shape[2:])

    def expected_caches(self, lowp):
        """The dense caches after the append: the new rows at cache_seqlens[b] ..., every other row untouched."""
        kc, vc = dev(self.k_cache, lowp, copy=True), dev(self.v_cache, lowp, copy=True)
        if self.k is not None:
            for b, n in enumerate(self.lens.tolist()):
                kc[b, n: n + self.k.size(1)] = dev(self.k[b], lowp)
                vc[b, n: n + self.k.size(1)] = dev(self.v[b], lowp)
        return kc, vc


def check(case: Case, dtype, *, paged=False, num_splits=0, alibi=None, **kw):
    """Three-way run of ``case``; returns the results (with the caches after each call, in the dense layout)."""

    def run(label, lowp):
        kc, vc, table = case.caches(lowp, paged)
        fn = fastattn.attention_with_kvcache if label == "ours" else reference.attention_with_kvcache
        k, v = dev(case.k, lowp), dev(case.v, lowp)
        out, lse = fn(dev(case.q, lowp), kc, vc, k, v, cache_seqlens=dev(case.lens, copy=True), block_table=table,
                      num_splits=num_splits, alibi_slopes=dev(alibi), return_lse=True, **kw)
        if paged:
            kc, vc = case.dense(kc), case.dense(vc)
        empty = torch.isneginf(lse)
        caches[label] = (kc, vc, empty)
        return {"out": out, "lse": lse.masked_fill(empty, 0.0)}

    def floors(results):
        kc, vc, _ = caches["ours"]
        lens = (case.lens + (case.k.size(1) if case.k is not None else 0)).tolist()
        keys = [kc[b, :n].double().cpu() for b, n in enumerate(lens)]
        values = [vc[b, :n].double().cpu() for b, n in enumerate(lens)]
        kc0, vc0, table = case.caches(dtype, paged)
        sched = kv_ops.launch_schedule(dev(case.q, dtype), kc0, vc0, table, num_splits)  # the test device's
        return kvcache_floors(case.q.to(dtype).double(), keys, values, dtype=dtype, alibi_slopes=alibi,
                              splits=sched.splits, block_n=sched.block_n, **kw)

    caches: dict = {}
    kernels = kv_ops.FORWARD_KERNELS + (kv_ops.APPEND_KERNELS if case.k is not None else ())
    res = three_way(run, dtype, kernels=kernels, floors=floors)
    expected = case.expected_caches(dtype)
    for label in ("ours", "eager"):
        kc, vc, empty = caches[label]
        assert torch.equal(kc, expected[0]) and torch.equal(vc, expected[1]), f"{label}: the caches differ"
        assert torch.equal(empty, caches["ref"][2]), f"{label}: lse is -inf on other rows than the reference's"
    res["caches"] = caches
    return res


def test_reference_is_per_sequence_attention():
    """The oracle itself (masked over the cache's capacity, so it needs no host sync) against plain attention on
    each sequence's own first N_b keys, sliced out one sequence at a time: ragged lengths (0 and 1 included), GQA,
    the bottom-right window and ALiBi as an explicit mask and bias, paged."""
    case = Case(B=4, Lq=3, H=4, Hkv=2, D=16, L_cache=48, lens=(0, 1, 30, 45), L_new=3, page=16)
    slopes = dev(torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64))
    kc, vc, table = case.caches(torch.float64, True)
    q = dev(case.q)
    out, lse = reference.attention_with_kvcache(q, kc, vc, dev(case.k), dev(case.v), cache_seqlens=dev(case.lens),
                                                block_table=table, window_size=(6, 0), alibi_slopes=slopes,
                                                return_lse=True)
    dense_k, dense_v = case.expected_caches(torch.float64)
    for b, n0 in enumerate(case.lens.tolist()):
        N, Lq = n0 + 3, 3
        i = dev(torch.arange(Lq))[:, None] + N - Lq
        j = dev(torch.arange(N))[None, :]
        keep = (j <= i) & (j >= i - 6)
        bias = (-slopes[:, None, None] * (i - j).abs()).masked_fill(~keep, float("-inf"))
        o, x = reference.scaled_dot_product_attention(
            q[b].transpose(0, 1), dense_k[b, :N].transpose(0, 1), dense_v[b, :N].transpose(0, 1),
            attn_mask=bias, enable_gqa=True, return_lse=True)
        torch.testing.assert_close(out[b], o.transpose(0, 1), msg=f"out of sequence {b}")
        torch.testing.assert_close(lse[b], x, msg=f"lse of sequence {b}")


# -- decoding: ragged lengths, GQA, dtypes ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_decode_ragged_lengths(dtype):
    """One new token per sequence after caches of 0, 1 and 60 keys (4 query heads over 2 key/value heads)."""
    check(Case(), dtype)


@pytest.mark.parametrize("H,Hkv", [(3, 3), (8, 2), (8, 1), (12, 4)], ids=["MHA", "GQA4", "MQA8", "GQA3"])
def test_gqa_groups(H, Hkv):
    check(Case(B=2, H=H, Hkv=Hkv, D=40, L_cache=97, lens=(96, 13)), torch.float16)


def test_head_dims_and_value_dim():
    check(Case(B=2, H=2, Hkv=1, D=24, DV=72, L_cache=50, lens=(7, 49)), torch.float16)
    check(Case(B=1, H=4, Hkv=2, D=128, L_cache=64, lens=(63,)), torch.bfloat16)


def test_no_new_keys_and_empty_sequences():
    """k = v = None: attention over the cache as it is; a sequence of 0 keys gives zeros and lse = -inf."""
    res = check(Case(B=3, L_cache=40, lens=(0, 17, 40), L_new=0), torch.float16)
    assert (res["ours"]["out"][0] == 0).all() and res["caches"]["ours"][2][0].all()


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_chunked_prefill(is_causal):
    """Lq = L_new = 37 new tokens after caches of 0, 5 and 60: bottom-right causal (chunked prefill), and the
    non-causal cross case where every query sees every key."""
    check(Case(B=3, Lq=37, H=4, Hkv=2, D=32, L_cache=100, lens=(0, 5, 60), L_new=37), torch.float16,
          is_causal=is_causal)


def test_more_queries_than_keys_causal():
    """Lq = 20 queries, caches of 3 and 50 keys, no new keys: bottom-right causal leaves the first rows of the short
    sequence with no key (zeros, lse -inf)."""
    res = check(Case(B=2, Lq=20, H=2, Hkv=1, D=32, L_cache=50, lens=(3, 50), L_new=0), torch.float16, is_causal=True)
    assert (res["ours"]["out"][0, :17] == 0).all() and res["caches"]["ours"][2][0, :, :17].all()


# -- score modifiers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window,is_causal", [((16, -1), False), ((16, 0), False), ((5, 3), False), ((-1, 2), False),
                                              ((30, -1), True)], ids=["left", "left+causal", "both", "right",
                                                                      "left-and-is_causal"])
def test_window(window, is_causal):
    check(Case(B=2, Lq=9, H=4, Hkv=2, D=32, L_cache=120, lens=(40, 100), L_new=9), torch.float16,
          window_size=window, is_causal=is_causal)


def test_sliding_window_prefill_across_blocks():
    """Mistral-style chunked prefill: 40 new tokens after 260 cached, window (80, 0). A tile's rows span 32
    positions, so its window's lower edge runs across two 64-key blocks: blocks wholly inside the band run
    untested, the rest are edge blocks (tests/test_kvcache.py's mutation check of kernels/_common.key_blocks)."""
    check(Case(B=1, Lq=40, H=4, Hkv=2, D=32, L_cache=320, lens=(260,), L_new=40), torch.float16,
          window_size=(80, 0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_softcap(dtype):
    case = Case(B=2, H=4, Hkv=2, D=64, L_cache=90, lens=(30, 88))
    case.q *= 4  # scores of several units, so the cap bites
    check(case, dtype, softcap=2.5)


@pytest.mark.parametrize("per_batch", [False, True], ids=["(H,)", "(B, H)"])
def test_alibi(per_batch):
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(4)])
    if per_batch:
        slopes = torch.stack([slopes, slopes.flip(0)])
    check(Case(B=2, Lq=5, H=4, Hkv=2, D=32, L_cache=80, lens=(20, 70), L_new=5), torch.float16, alibi=slopes,
          is_causal=True)


def test_every_modifier_paged_and_split():
    slopes = torch.tensor([0.25, 0.125, 0.0625, 0.03125])
    check(Case(B=2, Lq=3, H=4, Hkv=1, D=32, L_cache=192, lens=(150, 60), L_new=3, page=32), torch.bfloat16,
          paged=True, num_splits=3, alibi=slopes, is_causal=True, window_size=(70, -1), softcap=3.0, scale=0.3)


# -- paged caches ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", [16, 48])
def test_paged_shuffled_equals_dense(page):
    """Pages in a shuffled order (and pages no sequence uses): the keys land in the right pages, the result is the
    dense cache's (bitwise: the same blocks in the same order)."""
    case = Case(B=3, Lq=2, H=4, Hkv=2, D=32, L_cache=96, lens=(0, 47, 94), L_new=2, page=page)
    res = check(case, torch.float16, paged=True)
    dense = check(case, torch.float16)
    assert torch.equal(res["ours"]["out"], dense["ours"]["out"])
    assert torch.equal(res["ours"]["lse"], dense["ours"]["lse"])


# -- split-KV --------------------------------------------------------------------------------------------------------

def test_split_kv_1000_keys():
    """A 1000-key cache: 1, 4 and the automatic number of splits each within the rule of the float64 truth, the
    automatic schedule splitting (few query rows, long cache), and a fixed split count bitwise repeatable."""
    case = Case(B=2, Lq=1, H=8, Hkv=1, D=64, L_cache=1000, lens=(999, 700))
    kc, vc, _ = case.caches(torch.float16, False)
    q = dev(case.q, torch.float16)
    auto = kv_ops.launch_schedule(q, kc, vc, None, 0)
    assert auto.splits > 1, auto
    for splits in (1, 4, 0):
        res = check(case, torch.float16, num_splits=splits)
        assert (res["launches"]["_merge_fwd"] > 0) == (splits != 1)
    runs = []
    for _ in range(2):
        kc, vc, _ = case.caches(torch.float16, False)
        runs.append(fastattn.attention_with_kvcache(q, kc, vc, dev(case.k, torch.float16), dev(case.v, torch.float16),
                                                    cache_seqlens=dev(case.lens), num_splits=4, return_lse=True))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_schedule_is_a_pure_function_of_shapes():
    sched = kv_ops.schedule(1, 32, 8, 1, 32768, 128, 128, torch.float16, num_sms=132)
    assert sched.block_m == 16 and sched.m_blocks == 1 and sched.splits > 1  # 4 heads x 1 row in a 16-row tile
    assert sched.programs == 8 * sched.splits
    assert sched.scratch_bytes == sched.splits * 32 * (128 + 1) * 4
    assert kv_ops.schedule(64, 32, 8, 1, 32768, 128, 128, torch.float16, num_sms=132).splits == 1  # 512 tiles
    assert kv_ops.schedule(1, 32, 8, 1, 128, 128, 128, torch.float16, num_sms=132).splits == 1  # 2 key blocks
    fixed = kv_ops.schedule(1, 32, 8, 1, 1000, 128, 128, torch.float16, num_sms=132, num_splits=100)
    assert fixed.splits == math.ceil(1000 / fixed.block_n)  # clamped to the key blocks
    assert kv_ops.schedule(2, 4, 2, 37, 100, 32, 32, torch.float16, num_sms=4).block_m == 64
    assert kv_ops.schedule(1, 1, 1, 1, 64, 512, 512, torch.float16, num_sms=4) is None  # no tile: the reference
    # fp32 without TF32 at head dim 128: only 16-row tiles fit the registers, so 64 rows take four
    assert kv_ops.schedule(1, 8, 1, 8, 64, 128, 128, torch.float32, num_sms=4).m_blocks == 4
    # a chunked prefill's 64-row tile at head dim 128: 4 warps on sm_90 (one warpgroup, no replicated wgmma), the
    # shared 8-warp tile on sm_80 and without a GPU; hwfit compiles each for the archs that take it
    per_arch = {a: kv_ops.schedule(1, 32, 8, 16, 4096, 128, 128, torch.float16, num_sms=132, arch=a) for a in
                (None, 80, 90)}
    assert {a: (s.block_m, s.block_n, s.num_warps) for a, s in per_arch.items()} == {
        None: (64, 64, 8), 80: (64, 64, 8), 90: (64, 64, 4)}
    specs = [s for s in kv_ops.kernel_specs() if s.variant.startswith("float16 D<=128 plain")
             and s.config.kwargs["BLOCK_M"] == 64]
    assert sorted((s.config.num_warps, s.archs) for s in specs) == [(4, (90,)), (8, (80, 89))]


def test_scratch_is_the_schedules():
    """The bytes the launcher allocates beyond its results are the schedule's scratch_bytes, which the memory
    tracer's SCRATCH entry reads from the same schedule."""
    cpu_only("the allocations are traced on the interpreter's schedule (its SM count)")
    from test_cli import _scratch_of

    from fastattn.ops._common import INTERPRETER_SMS
    from fastattn.perf import cases_kv

    case = Case(B=2, Lq=1, H=8, Hkv=1, D=32, L_cache=600, lens=(599, 300))
    q = case.q.half()
    kc, vc, _ = case.caches(torch.float16, False)
    for splits in (0, 1, 5):
        sched = kv_ops.launch_schedule(q, kc, vc, None, splits)
        args = (q, kc, vc, case.lens, None, None, 1, 0.125, False, -1, -1, 0.0, splits)
        got, _ = _scratch_of(kv_ops._attention, *args, sched)
        assert got == sched.scratch_bytes == cases_kv._kvcache_scratch(args, {}, sms=INTERPRETER_SMS)
        assert (got > 0) == (sched.splits > 1)


# -- what the kernels do where the host cannot check --------------------------------------------------------------

def test_sequence_that_does_not_fit_gives_nan_and_writes_nothing():
    """On a GPU no host check reads cache_seqlens; the kernels themselves leave such a sequence's cache untouched
    and return NaN rows for it (launchers called directly, past the CPU checks)."""
    case = Case(B=3, L_cache=20, lens=(19, 20, -1))
    kc, vc, _ = case.caches(torch.float32, False)
    before = kc.clone()
    k, v, q, lens = dev(case.k, torch.float32), dev(case.v, torch.float32), dev(case.q, torch.float32), dev(case.lens)
    kv_ops._append(kc, vc, k, v, lens, None)
    assert torch.equal(kc[1:], before[1:]) and torch.equal(kc[0, 19], k[0, 0])
    sched = kv_ops.launch_schedule(q, kc, vc, None, 0)
    out, lse = kv_ops._attention(q, kc, vc, lens, None, None, 1, 0.125, False, -1, -1, 0.0, 0, sched)
    assert torch.isfinite(out[0]).all() and out[1:].isnan().all() and lse[1:].isnan().all()


def test_block_table_naming_no_page_gives_nan():
    case = Case(B=2, L_cache=32, lens=(10, 10), page=16)
    kc, vc, table = case.caches(torch.float32, True)
    table = table.clone()
    table[1, 0] = case.pages + 5
    q = dev(case.q, torch.float32)
    sched = kv_ops.launch_schedule(q, kc, vc, table, 0)
    out, _ = kv_ops._attention(q, kc, vc, dev(case.lens), table, None, 0, 0.125, False, -1, -1, 0.0, 0, sched)
    assert torch.isfinite(out[0]).all() and out[1].isnan().all()


# -- interfaces ------------------------------------------------------------------------------------------------------

def test_int_cache_seqlens_and_strided_q():
    case = Case(B=2, H=4, Hkv=2, D=32, L_cache=30, lens=(12, 12))
    packed = dev(torch.randn(2, 1, 3, 4, 32, dtype=torch.float16))  # (B, L, 3, H, D): a fused qkv projection
    q = packed[:, :, 0]
    assert not q.is_contiguous()
    kc, vc, _ = case.caches(torch.float16, False)
    kc2, vc2 = kc.clone(), vc.clone()
    k, v = dev(case.k, torch.float16), dev(case.v, torch.float16)
    a = fastattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=12)
    b = fastattn.attention_with_kvcache(q.contiguous(), kc2, vc2, k, v, cache_seqlens=dev(case.lens))
    assert torch.equal(a, b) and torch.equal(kc, kc2)


def test_torch_compile_fullgraph():
    case = Case(B=2, Lq=1, H=4, Hkv=2, D=32, L_cache=40, lens=(10, 30))

    def step(q, kc, vc, k, v, lens):
        out, lse = fastattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, is_causal=True,
                                                   softcap=5.0, return_lse=True)
        return out * 2, lse

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    q, k, v, lens = dev(case.q, torch.float16), dev(case.k, torch.float16), dev(case.v, torch.float16), dev(case.lens)
    kc, vc, _ = case.caches(torch.float16, False)
    kc2, vc2 = kc.clone(), vc.clone()
    with fastattn.record_launches() as launches:
        got = compiled(q, kc, vc, k, v, lens)
    assert launches["_kvcache_attn"] == 1 and launches["_kvcache_append"] == 1
    want = step(q, kc2, vc2, k, v, lens)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # the in-place append happened under compile too


def test_inference_only():
    case = Case(B=1, L_cache=8, lens=(3,))
    q, lens = dev(case.q, torch.float32).requires_grad_(), dev(case.lens)
    kc, vc, _ = case.caches(torch.float32, False)
    with pytest.raises(RuntimeError, match="inference only"):
        fastattn.attention_with_kvcache(q, kc, vc, cache_seqlens=lens)
    with torch.no_grad():
        fastattn.attention_with_kvcache(q, kc, vc, cache_seqlens=lens)
    with torch.inference_mode():
        fastattn.attention_with_kvcache(q.detach(), kc, vc, cache_seqlens=lens)


def _args():
    case = Case(B=2, H=4, Hkv=2, D=16, L_cache=32, lens=(3, 5))
    kc, vc, _ = case.caches(torch.float32, False)
    return {"q": dev(case.q, torch.float32), "k_cache": kc, "v_cache": vc, "k": dev(case.k, torch.float32),
            "v": dev(case.v, torch.float32), "cache_seqlens": dev(case.lens)}


BAD = {
    "q-rank": (lambda a: a.update(q=a["q"][0]), ValueError, "q must be 4-D"),
    "k_cache-dtype": (lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "k_cache must have q's dtype"),
    "head-dim": (lambda a: a.update(q=a["q"][..., :8]), ValueError, "q's head dim 8"),
    "heads": (lambda a: a.update(q=a["q"][:, :, :3]), ValueError, r"q's heads \(3\)"),
    "batch": (lambda a: a.update(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), ValueError,
              "k_cache holds 1 sequences"),
    "seqlens-dtype": (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), ValueError,
                      "cache_seqlens must be int32"),
    "seqlens-type": (lambda a: a.update(cache_seqlens=[3, 5]), TypeError, "cache_seqlens must be"),
    "k-only": (lambda a: a.update(v=None), ValueError, "both k and v"),
    "k-shape": (lambda a: a.update(k=a["k"][:, :, :1]), ValueError, "k must be"),
    "too-many-new": (lambda a: a.update(k=dev(torch.zeros(2, 40, 2, 16)), v=dev(torch.zeros(2, 40, 2, 16))), ValueError,
                     "k_cache is too short"),
    "cache-too-short": (lambda a: a.update(cache_seqlens=dev(torch.tensor([3, 32], dtype=torch.int32))), ValueError,
                        "k_cache is too short: sequence 1"),
    "negative-length": (lambda a: a.update(cache_seqlens=dev(torch.tensor([-1, 3], dtype=torch.int32))), ValueError,
                        "k_cache is too short: sequence 0"),
    "page-size": (lambda a: a.update(block_table=dev(torch.zeros(2, 4, dtype=torch.int32)),
                                     k_cache=dev(torch.zeros(8, 8, 2, 16)), v_cache=dev(torch.zeros(8, 8, 2, 16))),
                  ValueError, "multiple of 16"),
    "table-dtype": (lambda a: a.update(block_table=dev(torch.zeros(2, 2)), k_cache=dev(torch.zeros(4, 16, 2, 16)),
                                       v_cache=dev(torch.zeros(4, 16, 2, 16))), ValueError,
                    "block_table must be int32"),
    "table-page": (lambda a: a.update(block_table=dev(torch.tensor([[0, 1], [9, 2]], dtype=torch.int32)),
                                      k_cache=dev(torch.zeros(4, 16, 2, 16)), v_cache=dev(torch.zeros(4, 16, 2, 16))),
                   ValueError, "block_table row 1 names pages outside"),
    "alibi": (lambda a: a.update(alibi_slopes=dev(torch.ones(3))), ValueError, "alibi_slopes must be float32"),
    "window": (lambda a: a.update(window_size=(4,)), TypeError, "window_size must be two ints"),
    "window-float": (lambda a: a.update(window_size=(4.0, 0)), TypeError, "window_size must be two ints"),
    "softcap": (lambda a: a.update(softcap=-1.0), ValueError, "softcap must be"),
    "softcap-nan": (lambda a: a.update(softcap=float("nan")), ValueError, "softcap must be"),
    "scale": (lambda a: a.update(scale=float("inf")), ValueError, "scale must be"),
    "num_splits": (lambda a: a.update(num_splits=-2), ValueError, "num_splits must be"),
    "is_causal": (lambda a: a.update(is_causal=1), TypeError, "is_causal must be a bool"),
    "device": (lambda a: a.update(alibi_slopes=torch.ones(4, device="meta")), RuntimeError, "one device"),
}


# The checks of cache_seqlens' values, made only for CPU tensors (a GPU's would cost a host sync).
HOST_CHECKED = ("cache-too-short", "negative-length", "table-page")


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_naming_the_argument(name):
    if name in HOST_CHECKED:
        cpu_only("cache_seqlens' values are checked on the host for CPU tensors only")
    mutate, err, match = BAD[name]
    args = _args()
    mutate(args)
    with pytest.raises(err, match=match):
        fastattn.attention_with_kvcache(**args)
