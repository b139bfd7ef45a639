"""Output helpers shared by the GPU benchmark and the CPU report: environment stamp, text tables, CSV, progress."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import triton

import fastattn


def device_name() -> str:
    """The GPU's name, or the CPU's model name where there is no GPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def device_slug(name: str | None = None) -> str:
    """A directory name for a device: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    name = name or device_name()
    if name.startswith("CPU"):
        return "cpu"
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def environment() -> dict[str, str]:
    """The columns every CSV row carries, so a results file says where and when it was measured."""
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda or "-"),
        "fastattn": fastattn.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_csv(path: str, rows: Sequence[dict[str, Any]], env: dict[str, str] | None = None) -> str:
    """Write ``rows`` (dicts) with the environment columns appended; returns ``path``."""
    env = environment() if env is None else env
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    fields += [k for k in env if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**env, **{k: _cell(v) for k, v in row.items()}})
    return path


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A plain-text table (also valid GitHub markdown): ``align`` is one of ``l``/``r`` per column."""
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(cells):
        out = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)]
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def mib(n: float | None) -> str:
    return "" if n is None else f"{n / 2**20:,.1f}"


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``12.3x`` (blank when either is missing)."""
    if not a or not b:
        return ""
    return f"{a / b:.2f}x"


class Progress:
    """One status line on stderr: rewritten in place on a terminal, otherwise printed at most every few seconds."""

    def __init__(self, label: str, total: int, every_s: float = 5.0):
        self.label, self.total, self.every_s = label, total, every_s
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, done: int | None = None, note: str = "") -> None:
        self.done = self.done + 1 if done is None else done
        now = time.monotonic()
        final = self.done >= self.total
        if not (self.tty or final or now - self.last >= self.every_s):
            return
        self.last = now
        elapsed = now - self.start
        eta = f", ~{elapsed / self.done * (self.total - self.done):.0f} s left" if 0 < self.done < self.total else ""
        text = f"[fastattn] {self.label}: {self.done}/{self.total} ({elapsed:.0f} s{eta}) {note}"
        if self.tty:
            sys.stderr.write("\r\033[K" + text[:200] + ("\n" if final else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


def say(msg: str) -> None:
    """A progress message on stderr (stdout carries only the report)."""
    sys.stderr.write(f"[fastattn] {msg}\n")
    sys.stderr.flush()
