"""fastattn.attention's score modifiers -- window_size, softcap, alibi_slopes, sinks -- and the key-block schedule.

Each case runs three ways (tests/harness.py): fastattn.reference in float64 (the oracle), the same eager reference in
the low precision (eager's error) and the kernels in the low precision, with a check that the Triton kernels ran;
outputs, the log-sum-exp and every gradient (dsinks included) under the rule of fastattn.testing.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from fastattn.kernels import attention as K
from fastattn.kernels import attention_configs as C
from harness import DEVICE, cpu_only, dev, three_way

import fastattn
from fastattn import _runtime, reference
from fastattn.ops import attention as attn_ops
from fastattn.testing import attention_floors

KERNELS = attn_ops.FORWARD_KERNELS + attn_ops.BACKWARD_KERNELS


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def check(q, k, v, *, dtype, mask=None, mask_grad=False, is_causal=False, window_size=(-1, -1), softcap=0.0,
          alibi=None, sinks=None, enable_gqa=False, scale=None, dropout_p=0.0, dropout_mask=None, seed=None):
    """q, k, v, mask, sinks are float64 masters (alibi: fp32 slopes), on the CPU: each run moves them to the test
    device; ``dropout_mask`` (on the test device) replays the kernels' mask, drawn from ``torch.manual_seed(seed)``."""
    grads: dict = {}
    empty: dict = {}

    def run(label, lowp):
        ts = [dev(t, lowp).detach().requires_grad_() for t in (q, k, v)]
        names = ["dq", "dk", "dv"]
        m = dev(mask)
        if mask is not None and mask.dtype != torch.bool:
            m = dev(mask, lowp).detach().requires_grad_(mask_grad)
            if mask_grad:
                ts.append(m)
                names.append("dmask")
        sk = None
        if sinks is not None:
            sk = dev(sinks, lowp).detach().requires_grad_()
            ts.append(sk)
            names.append("dsinks")
        kw = {"is_causal": is_causal, "scale": scale, "enable_gqa": enable_gqa, "return_lse": True,
              "window_size": window_size, "softcap": softcap, "alibi_slopes": dev(alibi), "sinks": sk}
        if label == "ours":
            if seed is not None:
                torch.manual_seed(seed)
            out, lse = fastattn.attention(ts[0], ts[1], ts[2], m, dropout_p, **kw)
        else:
            out, lse = reference.scaled_dot_product_attention(ts[0], ts[1], ts[2], m, dropout_p,
                                                              dropout_mask=dropout_mask, **kw)
        if not grads:
            grads["out"] = torch.randn(out.shape, dtype=torch.float64)
            grads["lse"] = torch.randn(lse.shape, dtype=torch.float64)
        finite = torch.isfinite(lse)
        empty[label] = ~finite
        lse = torch.where(finite, lse, 0)  # rows with no key and no sink: -inf, compared below
        loss = (out * dev(grads["out"], lowp)).sum() + (lse * dev(grads["lse"], lse.dtype)).sum()
        loss.backward()
        return dict(zip(["out", "lse", *names], [out, lse] + [t.grad for t in ts]))

    def floors(results):
        lowp = [t.to(dtype).double() for t in (q, k, v)]
        finite = torch.isfinite(results["ref"]["lse"].cpu())
        fm = mask
        if mask is not None and mask.dtype != torch.bool:
            fm = mask.to(dtype).double()
        return attention_floors(*lowp, grads["out"], dtype=dtype, attn_mask=fm, is_causal=is_causal, scale=scale,
                                enable_gqa=enable_gqa, dropout_p=dropout_p,
                                dropout_mask=dropout_mask.cpu() if dropout_mask is not None else None,
                                grad_lse=torch.where(finite, grads["lse"], 0.0), out=results["ours"]["out"].cpu(),
                                window_size=window_size, softcap=softcap, alibi_slopes=alibi,
                                sinks=None if sinks is None else sinks.to(dtype).double())

    results = three_way(run, dtype, kernels=KERNELS, floors=floors)
    assert torch.equal(empty["ours"], empty["ref"]), "rows with lse = -inf differ from the reference's"
    return results


def slopes(*shape):
    return (torch.rand(*shape) * 0.5 + 0.05).float()


# -- each modifier ----------------------------------------------------------------------------------------------------

WINDOWS = [(5, 3), (6, 0), (0, 0), (-1, 4), (9, -1), (200, 200)]


@pytest.mark.parametrize("window", WINDOWS, ids=[f"w{a}_{b}" for a, b in WINDOWS])
@pytest.mark.parametrize("M,N", [(37, 45), (61, 23)], ids=["q<k", "q>k"])
def test_window(window, M, N):
    check(randn(2, 2, M, 32), randn(2, 2, N, 32), randn(2, 2, N, 32), dtype=torch.float16, window_size=window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_softcap(dtype):
    q = randn(2, 2, 41, 48) * 3  # scores well into tanh's saturation
    check(q, randn(2, 2, 29, 48), randn(2, 2, 29, 48), dtype=dtype, softcap=4.0)


@pytest.mark.parametrize("per_batch", [False, True], ids=["H", "BH"])
def test_alibi(per_batch):
    check(randn(2, 3, 33, 32), randn(2, 3, 57, 32), randn(2, 3, 57, 32), dtype=torch.bfloat16,
          alibi=slopes(2, 3) if per_batch else slopes(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_sinks(dtype):
    check(randn(2, 3, 27, 32), randn(2, 3, 38, 32), randn(2, 3, 38, 32), dtype=dtype, sinks=randn(3) * 2)


def test_sinks_on_rows_with_no_visible_key():
    """A bottom-right window with Lq > Lk leaves the first Lq - Lk rows without a key; with a sink such a row gives
    zeros and lse = sink."""
    M, N = 19, 11
    sinks = randn(2)
    res = check(randn(1, 2, M, 32), randn(1, 2, N, 32), randn(1, 2, N, 32), dtype=torch.float16,
                window_size=(3, 0), sinks=sinks)
    out, lse = res["ours"]["out"], res["ours"]["lse"]
    empty = torch.arange(M) + N - M < 0  # the diagonal before key 0
    assert empty.any() and (out[:, :, empty] == 0).all()
    torch.testing.assert_close(lse[:, :, empty], dev(sinks.half().float())[:, None].expand(1, 2, int(empty.sum())),
                               rtol=1e-6, atol=0)


# -- combinations ---------------------------------------------------------------------------------------------------

COMBOS = {
    "causal+window+softcap+alibi+sinks": {"is_causal": True, "window_size": (11, -1), "softcap": 5.0,
                                          "alibi": slopes(4), "sinks": randn(4)},
    "window+sinks+gqa": {"window_size": (7, 2), "sinks": randn(4), "enable_gqa": True},
    "softcap+alibi_bh+gqa": {"softcap": 3.0, "alibi": slopes(2, 4), "enable_gqa": True},
    "bool_mask+window+softcap": {"mask": torch.rand(47, 71) > 0.3, "window_size": (20, 5), "softcap": 6.0},
    "float_mask_grad+alibi+sinks": {"mask": randn(1, 4, 47, 71), "mask_grad": True, "alibi": slopes(4),
                                    "sinks": randn(4)},
}


@pytest.mark.parametrize("name", list(COMBOS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_combinations(name, dtype):
    kw = dict(COMBOS[name])
    hkv = 2 if kw.get("enable_gqa") else 4
    check(randn(2, 4, 47, 40), randn(2, hkv, 71, 40), randn(2, hkv, 71, 24), dtype=dtype, **kw)


@pytest.mark.parametrize("M,N", [(1, 97), (3, 50), (16, 40), (113, 7)], ids=["decode", "q3", "q16", "q>k"])
def test_decode_and_odd_lengths_with_gqa(M, N):
    """Few query rows: the tile holds the (position, head) pairs of a GQA group (8 heads share a key/value head)."""
    check(randn(2, 8, M, 64), randn(2, 1, N, 64), randn(2, 1, N, 64), dtype=torch.bfloat16, enable_gqa=True,
          window_size=(30, 0), softcap=8.0, sinks=randn(8))


def test_strided_inputs():
    qkv = randn(2, 29, 3, 4, 32)  # (B, L, 3, H, D): a packed projection, read through its strides
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    check(q, k, v, dtype=torch.float16, window_size=(8, 8), alibi=slopes(4), sinks=randn(4))


def test_dropout_with_modifiers():
    """Output and gradients equal the reference run with the very mask the kernel drew."""
    B, H, M, N, p = 2, 2, 33, 41, 0.2
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    keep = attn_ops.dropout_keep_mask(seed, (B, H, M, N), p, DEVICE)
    check(randn(B, H, M, 32), randn(B, H, N, 32), randn(B, H, N, 32), dtype=torch.float16, window_size=(9, 4),
          softcap=5.0, alibi=slopes(H), sinks=randn(H), dropout_p=p, dropout_mask=keep, seed=5)


def test_gradcheck_float64_through_the_kernels():
    """Finite differences of the kernels themselves (float64 runs in the interpreter), dsinks included."""
    if not _runtime.interpreting():
        pytest.skip("float64 runs the Triton kernels only under the interpreter")
    q, k, v = (torch.randn(1, 2, 7, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    alibi = slopes(2)

    def f(q, k, v, sinks):
        out, lse = fastattn.attention(q, k, v, window_size=(3, 1), softcap=2.0, alibi_slopes=alibi, sinks=sinks,
                                      return_lse=True)
        return out, lse

    with _runtime.record_launches() as n:
        assert torch.autograd.gradcheck(f, (q, k, v, sinks), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
    assert n["_attn_fwd"] > 0 and n["_attn_bwd_dkdv"] > 0


def test_torch_compile_fullgraph_with_modifiers():
    q, k, v = (dev(torch.randn(2, 4, 19, 32)).requires_grad_() for _ in range(3))
    sinks = dev(torch.randn(4)).requires_grad_()
    alibi = dev(slopes(4))

    def f(q, k, v, sinks):
        return fastattn.attention(q, k, v, is_causal=True, window_size=(5, 0), softcap=3.0, alibi_slopes=alibi,
                                  sinks=sinks).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with _runtime.record_launches() as n:
        loss = compiled(q, k, v, sinks)
        grads = torch.autograd.grad(loss, (q, k, v, sinks))
    assert n["_attn_fwd"] == 1 and n["_attn_bwd_dq"] == 1
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v, sinks)]
    ref_loss = reference.scaled_dot_product_attention(*ref[:3], is_causal=True, window_size=(5, 0), softcap=3.0,
                                                      alibi_slopes=alibi, sinks=ref[3]).square().sum()
    ref_grads = torch.autograd.grad(ref_loss, ref)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_backward_is_bitwise_repeatable():
    q, k, v = (dev(torch.randn(2, 4, 37, 32, dtype=torch.float16)).requires_grad_() for _ in range(3))
    sinks = dev(torch.randn(4)).requires_grad_()
    runs = []
    for _ in range(2):
        for t in (q, k, v, sinks):
            t.grad = None
        fastattn.attention(q, k, v, window_size=(9, 2), softcap=4.0, alibi_slopes=dev(slopes(4)) * 0 + 0.1,
                           sinks=sinks).float().square().sum().backward()
        runs.append([t.grad.clone() for t in (q, k, v, sinks)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# -- the key-block schedule -----------------------------------------------------------------------------------------


def _spy_blocks(monkeypatch, name: str, start: str, own: str):
    """Record (own indices, block start, EDGE) of every call of the block function ``name`` (an interpreter hook:
    the kernels look their helpers up in the module at call time; compiled code is untouched)."""
    real = getattr(K, name)
    params = inspect.signature(real.fn).parameters
    calls = []

    def value(x):  # an interpreter tensor's numpy data, a constexpr's value, or the Python value itself
        return np.asarray(x.handle.data if hasattr(x, "handle") else getattr(x, "value", x)).reshape(-1)

    def spy(*args):
        bound = dict(zip(params, args))
        mine = value(bound[own])
        calls.append((int(mine.min()), int(mine.max()), int(value(bound[start])[0]), bool(value(bound["EDGE"])[0])))
        return real(*args)

    monkeypatch.setattr(K, name, spy)
    return calls


def _expected(lo_a, hi_a, band, n, block):
    """The blocks [b, b + block) of [0, n) that some a in [lo_a, hi_a] sees (band(a) = (first, last) visible), and
    whether every a sees the whole block."""
    out = set()
    for b in range(0, n, block):
        keys = range(b, min(b + block, n))
        seen = [[band(a)[0] <= x <= band(a)[1] for x in keys] for a in range(lo_a, hi_a + 1)]
        if any(any(r) for r in seen):
            out.add((b, not (all(all(r) for r in seen) and b + block <= n)))
    return out


@pytest.mark.parametrize("window,causal", [((13, 0), False), ((5, 9), False), ((-1, -1), True), ((20, -1), True)])
def test_only_the_band_s_blocks_are_visited(monkeypatch, window, causal):
    """Forward, dQ (key blocks per query tile) and dK/dV (query blocks per key block, the band transposed) visit
    exactly the blocks the band touches, the ones it covers whole without edge tests."""
    cpu_only("the block schedule is observed through the interpreter")
    M, N = 150, 170
    bm, bn = C.INTERPRETER_TILE[:2]
    left, right = window
    lo = N - M - left if left >= 0 else -10**6
    hi = min(N - M + right if right >= 0 else 10**6, 0 if causal else 10**6)
    fwd = _spy_blocks(monkeypatch, "_fwd_block", "start_n", "i")
    dq = _spy_blocks(monkeypatch, "_dq_block", "start_n", "i")
    dkdv = _spy_blocks(monkeypatch, "_dkdv_block", "start_m", "j")
    # fp16: the tensor-core path (fp32 without TF32 runs every block as an edge block)
    q, k, v = (torch.randn(1, 1, L, 32, dtype=torch.float16, requires_grad=True) for L in (M, N, N))
    fastattn.attention(q, k, v, is_causal=causal, window_size=window).float().sum().backward()
    for calls in (fwd, dq):
        tiles = {}
        for a0, a1, b, edge in calls:
            tiles.setdefault((a0, a1), []).append((b, edge))
        assert len(tiles) == -(-M // bm)
        for (a0, a1), got in tiles.items():
            want = _expected(a0, a1, lambda i: (i + lo, i + hi), N, bn)
            assert len(got) == len(set(got)) and set(got) == want, ((a0, a1), sorted(got), sorted(want))
    tiles = {}
    for a0, a1, b, edge in dkdv:
        tiles.setdefault((a0, a1), []).append((b, edge))
    for (a0, a1), got in tiles.items():
        want = _expected(a0, a1, lambda j: (j - hi, j - lo), M, bm)
        assert len(got) == len(set(got)) and set(got) == want, ((a0, a1), sorted(got), sorted(want))
    band = sum(max(0, min(N - 1, i + hi) - max(0, i + lo) + 1) for i in range(M))
    visited = sum(1 for c in fwd) * bm * bn
    assert band < M * N and visited < M * N  # work proportional to the band, not to Lq x Lk


def test_window_saves_no_score_sized_tensor():
    """No Lq x Lk tensor is saved for the backward or passed to the kernels: the window is computed from indices."""
    M, N = 64, 80
    q, k, v = (dev(torch.randn(1, 2, L, 16)).requires_grad_() for L in (M, N, N))
    saved, launched = [], []
    real = _runtime.launch

    def spy(kernel, grid, *args, **kwargs):
        launched.extend(a.shape for a in args if isinstance(a, torch.Tensor))
        return real(kernel, grid, *args, **kwargs)

    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t)
    with hooks, _runtime.record_launches() as n, pytest.MonkeyPatch.context() as mp:
        mp.setattr(_runtime, "launch", spy)
        out = fastattn.attention(q, k, v, window_size=(10, 0), softcap=2.0, sinks=dev(torch.zeros(2)))
        out.sum().backward()
    assert n["_attn_fwd"] == 1 and n["_attn_bwd_dq"] == 1 and saved and launched
    scores = 2 * M * N  # the (B, H, Lq, Lk) scores' size
    assert all(s.numel() < scores and tuple(s[-2:]) != (M, N) for s in saved + launched), (saved, launched)


# -- decoding tiles -------------------------------------------------------------------------------------------------


def test_decode_launches_take_16_row_tiles():
    """At most 16 (packed) query rows take the "decode" table's 16-row tiles in every kernel; more take the plain or
    heavy tables, whose fp16/bf16 tiles are wgmma-sized."""
    q = torch.empty(1, 8, 1, 64, dtype=torch.float16)
    for kernel in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"):
        decode = C.tiles_for(kernel, 2, "ieee", 64, "plain", rows=8)
        assert decode and all(t[0] == 16 for t in decode)
        prune = C._prune(kernel)
        configs = [C.config(t[:4]) for t in sorted({t for tb in C.TILES[kernel].values() for c in tb.values()
                                                    for ts in c.values() for t in ts})]
        args = {"Q": q, "PRECISION": "ieee", "BLOCK_D": 64, "BLOCK_DV": 64, "MASK_KIND": 0, "HAS_DROPOUT": False,
                "HAS_SOFTCAP": False, "HAS_ALIBI": False, "VARLEN": False}
        kept = prune(configs, {**args, "ROWS_BUCKET": 8})
        assert kept and all(c.kwargs["BLOCK_M"] == 16 for c in kept)
        kept = prune(configs, {**args, "ROWS_BUCKET": 4096})
        assert kept and all(c.kwargs["BLOCK_M" if kernel != "_attn_bwd_dkdv" else "BLOCK_N"] >= 64 for c in kept)


def test_packed_launches_take_varlen_tiles():
    """Packed (VARLEN) launches take VARLEN_TILES' entry where it has one for their arch class (the dense tile
    spills there), the dense table's elsewhere; the autotuner's candidates (all_tiles) hold every such tile."""
    assert C.tiles_for("_attn_bwd_dkdv", 2, "ieee", 128, "plain", arch=80) == [(16, 128, 8, 2)]
    assert C.tiles_for("_attn_bwd_dkdv", 2, "ieee", 128, "plain", arch=80, varlen=True) == [(16, 64, 8, 2)]
    assert C.tiles_for("_attn_bwd_dkdv", 2, "ieee", 128, "plain", arch=90, varlen=True) == [(16, 128, 8, 2)]
    for kernel, tables in C.VARLEN_TILES.items():
        listed = set(C.all_tiles(kernel))
        for table, classes in tables.items():
            for cls, dims in classes.items():
                for d, tiles in dims.items():
                    assert all(len(t) == 5 and t[:4] in listed for t in tiles), (kernel, table, cls, d)
                    for arch in {t[4] for t in tiles}:
                        assert C.table_entries(kernel, table, cls, d, arch, varlen=True) == [
                            t[:4] for t in tiles if t[4] == arch]


# -- bad input ------------------------------------------------------------------------------------------------------

BAD = [
    ({"window_size": 4}, TypeError, "window_size must be two ints"),
    ({"window_size": (1, 2, 3)}, TypeError, "window_size must be two ints"),
    ({"window_size": (1.0, 2)}, TypeError, "window_size must be two ints"),
    ({"softcap": -1.0}, ValueError, "softcap must be a finite float >= 0"),
    ({"softcap": float("nan")}, ValueError, "softcap"),
    ({"softcap": float("inf")}, ValueError, "softcap"),
    ({"alibi_slopes": dev(torch.ones(3))}, ValueError, r"alibi_slopes must be float32 of shape \(2,\)"),
    ({"alibi_slopes": dev(torch.ones(2, dtype=torch.float64))}, ValueError, "alibi_slopes must be float32"),
    ({"alibi_slopes": [0.5, 0.25]}, TypeError, "alibi_slopes must be a Tensor"),
    ({"alibi_slopes": dev(torch.ones(2)).requires_grad_()}, ValueError, "alibi_slopes requires grad"),
    ({"sinks": dev(torch.ones(2, 1))}, ValueError, r"sinks must be of shape \(2,\)"),
    ({"sinks": dev(torch.ones(2, dtype=torch.int32))}, ValueError, "sinks must be"),
    ({"sinks": torch.ones(2, device="meta")}, RuntimeError, "one device"),
    ({"return_lse": 1}, TypeError, "return_lse must be a bool"),
]


@pytest.mark.parametrize("kw,exc,text", BAD, ids=[f"{next(iter(b[0]))}-{i}" for i, b in enumerate(BAD)])
def test_bad_modifiers_raise_naming_the_argument(kw, exc, text):
    q = dev(torch.randn(1, 2, 5, 8))
    with pytest.raises(exc, match=text):
        fastattn.attention(q, q, q, **kw)


def test_fallback_keeps_the_modifiers(monkeypatch):
    """Where the kernels cannot serve (head dim above 256) the eager reference runs with every modifier, warning."""
    monkeypatch.setattr(_runtime, "_warned", set())  # a fresh one-time warning, and the process's left as it was
    q, k, v = (dev(torch.randn(1, 2, 7, 272)) for _ in range(3))
    kw = {"window_size": (2, 1), "softcap": 3.0, "alibi_slopes": dev(slopes(2)), "sinks": dev(torch.randn(2)),
          "return_lse": True}
    with pytest.warns(fastattn.FallbackWarning, match="head dim 272"), _runtime.record_launches() as n:
        out, lse = fastattn.attention(q, k, v, **kw)
    assert sum(n.values()) == 0
    r_out, r_lse = reference.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(lse, r_lse)
