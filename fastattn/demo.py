"""``python -m fastattn.demo`` (or ``fastattn demo``): train a tiny ViT and a tiny Transformer, fused and eager,
side by side.

- ViT on scikit-learn's 8x8 handwritten digits (1797 images, 10 classes; needs ``scikit-learn``): patch size 4, so
  4 patch tokens and a class token, width 32, depth 1, 2 heads.
- Transformer (1 encoder + 1 decoder layer, width 32, 2 heads) on a synthetic task: reverse a sequence of 2-5
  digits. Accuracy is that of greedy ``generate`` (cached decoding) on held-out sequences: whole sequences exactly
  right, and tokens right.

Each pair is one ``fastattn.models`` model built with ``fused=False`` and the same model with ``fused=True`` holding
the same weights; both see the same batches, with dropout 0 (fused dropout draws its own random stream), so the two
loss curves agree to float rounding. It prints both curves, the final accuracies and the time each took.

On a GPU it trains 300 steps of batch 64 per model in seconds (eager runs of these settings reach about 92% test
accuracy on the digits and 98% exact reversals).
Without a CUDA device the fused models run the real Triton kernels through Triton's interpreter, which costs
milliseconds per kernel program, so the defaults drop to 30 steps of batch 16 (a few minutes; the models are then
only partly trained, and the timings say nothing about GPU speed).
Triton reads ``TRITON_INTERPRET`` when fastattn's kernels are decorated, i.e. on ``import fastattn``, which
``python -m fastattn.demo`` performs before this module runs; so when the interpreter is needed and off, the demo
starts itself again with ``TRITON_INTERPRET=1`` set.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastattn import _runtime
from fastattn.models import Transformer, VisionTransformer

PAD, BOS, EOS, DIGIT0 = 0, 1, 2, 3  # reversal task vocabulary: 3 specials, then 10 digits
VOCAB = DIGIT0 + 10


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastattn demo", description="Train a tiny ViT (8x8 digits) and a tiny "
                                "Transformer (sequence reversal), fused and eager side by side.")
    p.add_argument("--task", choices=("all", "vit", "transformer"), default="all")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: 300 on a GPU, 30 on "
                   "a CPU, where the kernels run through Triton's interpreter)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 64 on a GPU, 16 on a CPU)")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--eval-size", type=int, default=None, help="test images / sequences (default: all 297 images, "
                   "and 256 sequences on a GPU, 32 on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p


def load_digits_dataset(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(train_x, train_y, test_x, test_y)``; images ``(N, 1, 8, 8)`` in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("fastattn demo: the ViT task trains on scikit-learn's 8x8 digits, but scikit-learn is not "
                         "installed; `pip install scikit-learn` (or `pip install fastattn[demo]`), or run "
                         "`--task transformer`") from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm].to(device), y[perm].to(device)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def reversal_batch(n: int, gen: torch.Generator, device: torch.device, min_len: int = 2, max_len: int = 5):
    """``(src, tgt_in, tgt_out, src_padding)``: src = digits, tgt = BOS + reversed digits + EOS, right-padded."""
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
    digits = torch.randint(DIGIT0, VOCAB, (n, max_len), generator=gen)
    src = torch.full((n, max_len), PAD, dtype=torch.long)
    tgt = torch.full((n, max_len + 2), PAD, dtype=torch.long)
    tgt[:, 0] = BOS
    for i, length in enumerate(lengths.tolist()):
        src[i, :length] = digits[i, :length]
        tgt[i, 1: length + 1] = digits[i, :length].flip(0)
        tgt[i, length + 1] = EOS
    src, tgt = src.to(device), tgt.to(device)
    return src, tgt[:, :-1], tgt[:, 1:], src == PAD


def _train_pair(make, step_loss, steps: int, lr: float, seed: int):
    """Train ``make(fused=False)`` and ``make(fused=True)`` (same weights) on the same batches; losses and times."""
    torch.manual_seed(seed)
    eager = make(False)
    fused = make(True)
    fused.load_state_dict(eager.state_dict())
    curves, times = {}, {}
    for label, model in (("eager", eager), ("fused", fused)):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        start = time.perf_counter()
        for step in range(steps):
            loss = step_loss(model, step, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        times[label] = time.perf_counter() - start
        curves[label] = losses
    return eager, fused, curves, times


def _print_curves(curves: dict[str, list[float]], every: int) -> None:
    print(f"{'step':>6}  {'loss fused':>10}  {'loss eager':>10}")
    steps = len(curves["fused"])
    for i in list(range(0, steps, every)) + ([steps - 1] if (steps - 1) % every else []):
        print(f"{i:>6}  {curves['fused'][i]:>10.4f}  {curves['eager'][i]:>10.4f}")


def _print_times(times: dict[str, float], steps: int) -> None:
    note = " (fused runs through Triton's interpreter here: no GPU timing)" if _runtime.interpreting() else ""
    print(f"training time: fused {times['fused']:.1f} s, eager {times['eager']:.1f} s for {steps} steps{note}")


def run_vit(args, device: torch.device) -> dict[str, float]:
    train_x, train_y, test_x, test_y = load_digits_dataset(device)
    n_eval = args.eval_size or len(test_y)
    test_x, test_y = test_x[:n_eval], test_y[:n_eval]

    def make(fused: bool):
        return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                                 num_heads=2, mlp_ratio=2.0, fused=fused).to(device)

    def step_loss(model, step, gen):
        idx = torch.randint(0, len(train_y), (args.batch,), generator=gen).to(device)
        return F.cross_entropy(model(train_x[idx]), train_y[idx])

    print(f"== ViT on 8x8 digits: {len(train_y)} train / {n_eval} test images; patch 4 -> 4 tokens + class token, "
          f"width 32, depth 1, 2 heads; {args.steps} steps of batch {args.batch}")
    eager, fused, curves, times = _train_pair(make, step_loss, args.steps, args.lr, args.seed)
    _print_curves(curves, max(1, args.steps // 10))
    acc = {}
    with torch.no_grad():
        for label, model in (("fused", fused), ("eager", eager)):
            model.eval()
            acc[label] = (model(test_x).argmax(-1) == test_y).float().mean().item()
    print(f"test accuracy: fused {100 * acc['fused']:.1f}%  eager {100 * acc['eager']:.1f}%")
    _print_times(times, args.steps)
    return acc


def run_transformer(args, device: torch.device) -> dict[str, float]:
    n_eval = args.eval_size or (256 if device.type == "cuda" else 32)

    def make(fused: bool):
        return Transformer(VOCAB, VOCAB, d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                           d_ff=64, dropout=0.0, max_len=8, fused=fused).to(device)

    def step_loss(model, step, gen):
        src, tgt_in, tgt_out, src_pad = reversal_batch(args.batch, gen, device)
        logits = model(src, tgt_in, src_padding_mask=src_pad, tgt_padding_mask=tgt_in == PAD)
        return F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)

    print(f"== Transformer on sequence reversal (2-5 digits): 1 + 1 layers, width 32, 2 heads; {args.steps} steps "
          f"of batch {args.batch}; accuracy of greedy generate on {n_eval} new sequences")
    eager, fused, curves, times = _train_pair(make, step_loss, args.steps, args.lr, args.seed)
    _print_curves(curves, max(1, args.steps // 10))
    src, _, tgt_out, src_pad = reversal_batch(n_eval, torch.Generator().manual_seed(args.seed + 1), device)
    acc, tokens = {}, {}
    real = tgt_out != PAD
    for label, model in (("fused", fused), ("eager", eager)):
        model.eval()
        out = model.generate(src, max_len=tgt_out.size(1) + 1, bos_id=BOS, eos_id=EOS, src_padding_mask=src_pad)
        pred = torch.full_like(tgt_out, PAD)
        pred[:, : out.size(1) - 1] = out[:, 1: tgt_out.size(1) + 1]
        right = (pred == tgt_out) | ~real  # what follows EOS does not count
        acc[label] = right.all(-1).float().mean().item()
        tokens[label] = ((pred == tgt_out) & real).sum().item() / real.sum().item()
    print(f"exact-match accuracy: fused {100 * acc['fused']:.1f}%  eager {100 * acc['eager']:.1f}%; tokens right: "
          f"fused {100 * tokens['fused']:.1f}%  eager {100 * tokens['eager']:.1f}%")
    _print_times(times, args.steps)
    return acc


def _interpreter_needed() -> bool:
    return not torch.cuda.is_available() and not _runtime.interpreting()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if _interpreter_needed():
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("fastattn demo: no CUDA device, and Triton's interpreter is still off with "
                             "TRITON_INTERPRET=1 set")
        print("fastattn demo: no CUDA device; running again with TRITON_INTERPRET=1 so that the Triton kernels run "
              "on the CPU through Triton's interpreter", flush=True)
        return subprocess.call([sys.executable, "-m", "fastattn.demo", *argv],
                               env={**os.environ, "TRITON_INTERPRET": "1"})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    args.steps = args.steps if args.steps is not None else (300 if gpu else 30)
    args.batch = args.batch if args.batch is not None else (64 if gpu else 16)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"fastattn demo on {where}: fused = fastattn's Triton kernels, eager = PyTorch ops; same weights, same "
          f"batches")
    if args.task in ("all", "vit"):
        run_vit(args, device)
    if args.task in ("all", "transformer"):
        run_transformer(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
