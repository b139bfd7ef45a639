"""Long-lived gloo ranks for tests/test_distributed.py.

``Ranks(world)`` spawns ``world`` processes once (``multiprocessing`` spawn: a fresh interpreter each), joined in one
gloo process group through a ``file://`` store in a temporary directory (no network beyond loopback). Every test
then hands them a job, ``ranks.run(fn, *args)``: each rank calls ``fn(rank, world, *args)`` and the results come
back as a list, one per rank. Starting a rank (importing torch, fastattn, timm) costs far more on this machine than a
tiny model's training step, so the processes are started once per test module, not per test.

- The environment of the parent (``TRITON_INTERPRET=1`` from tests/conftest.py among it) is set in each rank before
  anything imports fastattn, and each rank applies tests/shims.py's torchvision work-around itself.
- ``fn`` must be a module-level function of an importable module (a test module is: the ranks get the parent's
  ``sys.path``). Arguments and results travel as ``torch.save`` bytes, so tensors and modules pass as they are.
- A job that raises in a rank fails the test with that rank's traceback; ``pytest.skip`` in a rank skips the test
  with its reason. After a failure or a timeout the ranks are stopped (a rank may be stuck in a collective its peer
  never joined) and the next job starts new ones.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing
import os
import queue
import shutil
import tempfile
import traceback

import pytest
import torch

COLLECTIVE_TIMEOUT_S = 120  # gloo gives up on a collective whose peer never comes after this
JOB_TIMEOUT_S = 600


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank: int, world: int, store: str, env: dict[str, str], jobs, results) -> None:
    os.environ.update(env)  # TRITON_INTERPRET=1 before any import of fastattn
    import torch.distributed as dist
    from shims import torchvision_cpu_shim

    torchvision_cpu_shim()
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        while (job := jobs.get()) is not None:
            try:
                fn, args = _loads(job)
                results.put((rank, "ok", _dumps(fn(rank, world, *args))))
            except pytest.skip.Exception as skip:
                results.put((rank, "skip", str(skip.msg)))
            except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test)
                results.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()
        results.close()
        results.join_thread()  # everything put is flushed to the parent
    os._exit(0)  # skip the interpreter's seconds-long teardown of torch, triton and timm


class Ranks:
    """``world`` worker processes in one gloo process group; ``run(fn, *args)`` -> one result per rank."""

    def __init__(self, world: int = 2) -> None:
        self.world = world
        self._procs: list = []

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="fastattn-ranks-")
        env = dict(os.environ)
        if os.path.exists("/sys/class/net/lo"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(self.world)]
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, self.world, os.path.join(self._dir, "store"), env, self._jobs[r],
                                         self._results))
                       for r in range(self.world)]
        for p in self._procs:
            p.start()

    def run(self, fn, *args) -> list:
        if not self._procs:
            self._start()
        job = _dumps((fn, args))
        for q in self._jobs:
            q.put(job)
        got: dict[int, tuple[str, object]] = {}
        try:
            while len(got) < self.world:
                rank, status, payload = self._results.get(timeout=JOB_TIMEOUT_S)
                got[rank] = (status, payload)
                if status == "error":  # its peers may wait in a collective until gloo's timeout
                    break
        except queue.Empty:
            self.close()
            raise AssertionError(f"{fn.__name__}: no result from ranks {sorted(set(range(self.world)) - set(got))} "
                                 f"within {JOB_TIMEOUT_S} s") from None
        errors = [f"rank {r}:\n{p}" for r, (s, p) in sorted(got.items()) if s == "error"]
        if errors:
            self.close()
            raise AssertionError(f"{fn.__name__} failed in a rank\n" + "\n".join(errors))
        skips = {p for s, p in got.values() if s == "skip"}
        if skips:
            pytest.skip("; ".join(sorted(skips)))
        return [_loads(got[r][1]) for r in range(self.world)]

    def close(self) -> None:
        for q in getattr(self, "_jobs", []):
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        self._procs = []
        if getattr(self, "_dir", None):
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
