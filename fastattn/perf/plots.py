"""PNG plots of the benchmark results (matplotlib, from the ``bench`` extra; without it no plot is drawn)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from fastattn.perf.report import say


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed (pip install 'fastattn[bench]'): no plots")
        return None
    return plt


def _compact(v: float) -> str:
    """Axis labels that stay narrow on a log axis spanning many decades: 100, 1k, 10k, 1M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def _hbars(ax, labels: list[str], series: list[tuple[str, str, list[float]]], xlabel: str, title: str) -> None:
    """Grouped horizontal bars on a log axis, each labelled with its value; the second series also with how many
    times smaller it is than the first."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    n = len(series)
    for j, (name, color, vals) in enumerate(series):
        ys = [i + (j - (n - 1) / 2) * 0.8 / n for i in range(len(labels))]
        ax.barh(ys, vals, height=0.8 / n, color=color, label=name)
        for y, v, base in zip(ys, vals, series[0][2]):
            if v:
                text = f" {v:,.0f}" + (f"  ({base / v:.1f}x less)" if j and base and v < base else "")
                ax.text(v, y, text, va="center", fontsize=7)
    vals = [v for _, _, vs in series for v in vs if v]
    ax.set_xscale("log")
    if vals:
        ax.set_xlim(min(vals) / 3, max(vals) * 12)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _compact(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)


def cpu_memory(mem: Sequence[dict], traffic: Sequence[dict], path: str, dtype: str) -> str | None:
    """Two panels: peak live MiB (eager vs fused) per case, and traffic (eager counted vs fused minimum)."""
    plt = _pyplot()
    if plt is None:
        return None
    cases = [c for c in dict.fromkeys(r["case"] for r in mem)
             if any(r["case"] == c and r["impl"] == "fastattn" and r["peak_bytes"] for r in mem)]

    def peak(case: str, impl: str) -> float:
        r = next((m for m in mem if m["case"] == case and m["impl"] == impl), None)
        return (r["peak_bytes"] or 0) / 2**20 if r else 0.0

    rows = max(len(cases), len(traffic), 1)
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.6 * rows + 1.6))
    _hbars(axes[0], cases, [("eager", "#b0b0b0", [peak(c, "eager") for c in cases]),
                            ("fastattn", "#d62728", [peak(c, "fastattn") for c in cases])],
           f"peak live MiB, forward + backward ({dtype}, measured on FakeTensors)", "Memory")
    _hbars(axes[1], [t["case"] for t in traffic],
           [("eager (counted)", "#b0b0b0", [(t["eager_fwd"] + t["eager_bwd"]) / 2**20 for t in traffic]),
            ("fused minimum", "#d62728", [(t["min_fwd"] + t["min_bwd"]) / 2**20 for t in traffic])],
           "HBM traffic MiB, forward + backward", "Traffic")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gpu(rows: Sequence[dict], out_dir: str, device: str) -> list[str]:
    """Per op: forward+backward speed-up over eager for each case and implementation; for attention also
    TFLOP/s against sequence length for the LM shapes. Returns the files written."""
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    ops = [op for op in dict.fromkeys(r["op"] for r in rows)]
    for op in ops:
        rs = [r for r in rows if r["op"] == op and r["mode"] in ("fwd+bwd", "train step")]
        mode = "forward+backward"
        if not rs:  # an inference-only op: its forward
            rs, mode = [r for r in rows if r["op"] == op and r["mode"] == "fwd"], "forward"
        cases = list(dict.fromkeys(r["case"] for r in rs))
        impls = [i for i in dict.fromkeys(r["impl"] for r in rs) if i != "eager"]
        if not cases or not impls:
            continue
        fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(cases) * len(impls) / 2 + 4), 5))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            vals = []
            for c in cases:
                r = next((x for x in rs if x["case"] == c and x["impl"] == impl), None)
                vals.append(r["speedup_vs_eager"] if r and r["speedup_vs_eager"] else 0)
            ax.bar([i + (j - (len(impls) - 1) / 2) * width for i in range(len(cases))], vals, width=width, label=impl)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(cases)), cases, rotation=45, ha="right")
        ax.set_ylabel(f"speed-up over eager ({mode})" if op != "end-to-end" else "speed-up over eager")
        ax.set_title(f"{op} on {device}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}_speedup.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    decode = [r for r in rows if r["op"] == "kvcache" and r["ms"] and "dim_L" in r]
    if decode:  # decode latency against the cache length, one line per implementation and batch
        fig, ax = plt.subplots(figsize=(8, 5))
        for impl in dict.fromkeys(r["impl"] for r in decode):
            for b in sorted({r["dim_B"] for r in decode}):
                pts = sorted((r["dim_L"], r["ms"]) for r in decode if r["impl"] == impl and r["dim_B"] == b)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1, label=f"{impl} B{b}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cache length (tokens)")
        ax.set_ylabel("ms per decode step (one layer)")
        ax.set_title(f"attention_with_kvcache decode latency, {device}")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, "kvcache_decode_latency.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    lm = [r for r in rows if r["op"] == "attention" and r["case"].startswith("LM ") and r["throughput"]]
    if lm:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
        for ax, mode in zip(axes, ("fwd", "bwd", "fwd+bwd")):
            for impl in dict.fromkeys(r["impl"] for r in lm):
                for d in sorted({r["dim_D"] for r in lm}):
                    for causal in (0, 1):
                        pts = sorted((r["dim_L"], r["throughput"]) for r in lm if r["impl"] == impl and
                                     r["mode"] == mode and r["dim_D"] == d and r["dim_causal"] == causal)
                        if pts:
                            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1,
                                    ls="-" if causal else "--",
                                    label=f"{impl} d{d}{' causal' if causal else ''}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length (16k tokens per batch)")
            ax.set_title(mode)
        axes[0].set_ylabel("TFLOP/s")
        axes[-1].legend(fontsize=6, ncol=2)
        fig.suptitle(f"attention, LM shapes, {device}")
        fig.tight_layout()
        path = os.path.join(out_dir, "attention_lm_tflops.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
