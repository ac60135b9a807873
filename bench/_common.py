"""Helpers shared by the benchmarks: run header, demo inputs, timing, tables, a loopback S3 server.

Imported as ``_common`` by the scripts next to it (``python bench/<name>.py`` puts
``bench/`` first on ``sys.path``); never imported by ``m3i`` or the tests.
"""

from __future__ import annotations

import contextlib
import datetime
import tempfile
import logging
import multiprocessing as mp
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Hashable, Iterator, Sequence

from m3i.demo import DemoCounts, make_demo_data

__all__ = [
    "LoopbackS3",
    "TIME_HEADERS",
    "Timing",
    "demo_counts",
    "input_files",
    "make_inputs",
    "print_footer",
    "print_header",
    "print_ratio",
    "print_table",
    "quiet_logs",
    "time_interleaved",
    "time_runs",
]

# Variables that could send the m3i S3 client to a real endpoint or give it a developer's
# credentials; cleared so that a benchmark only ever talks to its own loopback server.
_S3_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "M3I_S3_ENDPOINT", "AWS_WEB_IDENTITY_TOKEN_FILE")


def quiet_logs() -> None:
    """Silence the per-request log lines of moto's werkzeug server."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)


def _git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")


def print_header(title: str) -> None:
    """Print what a reader needs to reproduce and judge the figures."""
    import PIL
    import torch

    import m3i

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"# {title}")
    print(f"command:  {shlex.join([sys.executable, *sys.argv])}")
    print(f"date:     {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}")
    print(f"python:   {platform.python_version()}  torch: {torch.__version__}  pillow: {PIL.__version__}  m3i: {m3i.__version__}")
    print(f"git:      {_git_revision()}")
    print(f"nproc:    {cores}  ({platform.processor() or platform.machine()})")
    print(f"loadavg:  {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start (other processes skew the figures)")
    sys.stdout.flush()


def print_footer() -> None:
    """Print the load at the end: a high figure means other processes shared the cores."""
    print(f"loadavg:  {' '.join(f'{x:.2f}' for x in os.getloadavg())} at end")


def demo_counts(scale: int, size: int | None = None) -> DemoCounts:
    """The standard demo counts with every image count multiplied by ``scale``; images of side ``size`` (default: the demo's)."""
    if scale < 1:
        raise ValueError(f"--scale={scale} must be >= 1")
    base = DemoCounts() if size is None else DemoCounts(size=size)
    return replace(base, **{f.name: getattr(base, f.name) * scale for f in fields(base) if f.name != "size"})


def make_inputs(root: Path, scale: int, size: int | None = None) -> dict[str, str]:
    """Write the demo data set under ``root``; returns ``make_demo_data``'s paths plus ``root``."""
    t0 = time.perf_counter()
    counts = demo_counts(scale, size)
    paths = make_demo_data(root, counts, seed=0)
    print(
        f"inputs:   m3i.demo data x{scale}: {counts.labelled} labelled PNG, {counts.captioned} captioned JPEG, "
        f"{counts.unlabelled} unlabelled JPEG, {counts.eval} eval PNG, {counts.size}x{counts.size} px "
        f"(written in {time.perf_counter() - t0:.1f}s)"
    )
    return {**paths, "root": str(Path(root).resolve())}


def input_files(root: str | Path, kinds: Sequence[str]) -> list[Path]:
    """The image files of the demo sources ``kinds`` (sorted)."""
    out: list[Path] = []
    for kind in kinds:
        out.extend(p for p in (Path(root) / kind).rglob("*") if p.suffix in (".png", ".jpg") and p.is_file())
    return sorted(out)


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _live_loader_workers_cpu() -> float:
    """CPU seconds so far of this process's running DataLoader workers (Linux ``/proc``; 0 elsewhere).

    Persistent workers outlive a timed epoch, so ``os.times()`` (children that have been
    waited for) never counts them. Only children named ``pt_data_worker`` (what torch
    calls its workers) count: a loopback S3 server process is left out, as before.
    """
    me, total = os.getpid(), 0.0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # ended meanwhile
        comm_end = stat.rfind(b")")
        comm = stat[stat.find(b"(") + 1 : comm_end]
        rest = stat[comm_end + 2 :].split()
        # After the command: state, ppid, ..., utime and stime are fields 14 and 15 of stat.
        if comm == b"pt_data_worker" and int(rest[1]) == me:
            total += (int(rest[11]) + int(rest[12])) / _CLK_TCK
    return total


def _cpu_seconds() -> float:
    """CPU time of this process, of its children that have been waited for, and of its running DataLoader workers."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + _live_loader_workers_cpu()


@dataclass(frozen=True)
class Timing:
    """Wall-clock and CPU seconds of repeated runs of one case."""

    seconds: list[float]
    """Wall-clock seconds per run."""
    cpu: list[float]
    """CPU seconds per run, of this process plus child processes that ended within the run
    (tar, shard and DataLoader workers); less sensitive than wall time to other load."""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    def spread(self) -> str:
        return f"{min(self.seconds):.3f}-{max(self.seconds):.3f}"

    def cells(self) -> list[str]:
        """Table cells: ``median (min-max)`` wall seconds and median CPU seconds."""
        return [f"{self.median:.3f} ({self.spread()})", f"{self.cpu_median:.2f}"]


TIME_HEADERS = ["median s (min-max)", "CPU s"]
"""Headers of :meth:`Timing.cells`."""


def time_runs(run: Callable[[int], object], repeats: int, *, warmup: int = 0) -> Timing:
    """Time ``run(i)`` for i in ``range(repeats)``, after ``warmup`` untimed calls with negative i."""
    for i in range(warmup):
        run(-1 - i)
    seconds, cpu = [], []
    for i in range(repeats):
        c0, t0 = _cpu_seconds(), time.perf_counter()
        run(i)
        seconds.append(time.perf_counter() - t0)
        cpu.append(_cpu_seconds() - c0)
    return Timing(seconds, cpu)


def time_interleaved(runs: dict[Hashable, Callable[[int], object]], repeats: int, *, warmup: int = 1) -> dict[Hashable, Timing]:
    """Time every case of ``runs`` once per round, ``repeats`` rounds, after ``warmup`` untimed rounds.

    Interleaving the cases (instead of all repeats of one case, then the next) makes a drift
    in machine load hit each case alike, so the ratios between them stay fair on a shared host.
    """
    for i in range(warmup):
        for run in runs.values():
            run(-1 - i)
    seconds: dict[Hashable, list[float]] = {name: [] for name in runs}
    cpu: dict[Hashable, list[float]] = {name: [] for name in runs}
    for i in range(repeats):
        for name, run in runs.items():
            c0, t0 = _cpu_seconds(), time.perf_counter()
            run(i)
            seconds[name].append(time.perf_counter() - t0)
            cpu[name].append(_cpu_seconds() - c0)
    return {name: Timing(seconds[name], cpu[name]) for name in runs}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain, aligned text table (Markdown-compatible pipes)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def print_ratio(name: str, value: float) -> None:
    print(f"RATIO {name}: {value:.3f}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_s3(port: int, ready) -> None:
    """Body of the server process: a moto S3 server until the parent terminates it."""
    quiet_logs()
    from moto.server import ThreadedMotoServer

    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    ready.set()
    threading.Event().wait()


class LoopbackS3:
    """A moto S3 server on 127.0.0.1, in its own process or in a thread of this one.

    In a thread of the benchmark process the server shares the GIL with the code
    being measured (the loader with ``num_workers=0`` decodes in that process), so the
    measurement would charge the server's Python work to the loader; a separate
    process is closer to a real object store on another host.

    On ``start()`` the process environment points the m3i S3 client at the server.
    """

    def __init__(self, mode: str = "process") -> None:
        if mode not in ("process", "thread"):
            raise ValueError(f"s3 server mode={mode!r}; allowed: 'process', 'thread'")
        self.mode = mode
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc = None
        self._server = None

    def start(self) -> "LoopbackS3":
        quiet_logs()
        if self.mode == "process":
            ctx = mp.get_context("spawn")  # a clean interpreter: no forked torch state
            ready = ctx.Event()
            self._proc = ctx.Process(target=_serve_s3, args=(self.port, ready), daemon=True)
            self._proc.start()
            deadline = time.monotonic() + 60
            while not ready.wait(0.2):
                if not self._proc.is_alive() or time.monotonic() > deadline:
                    code = self._proc.exitcode
                    self.stop()
                    raise RuntimeError(f"the moto S3 server on port {self.port} did not start (exit code {code})")
        else:
            from moto.server import ThreadedMotoServer

            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
        for name in _S3_ENV:
            os.environ.pop(name, None)
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": "bench-key",
                "AWS_SECRET_ACCESS_KEY": "bench-secret-value",
                "AWS_REGION": "us-east-1",
            }
        )
        return self

    def make_bucket(self, name: str) -> str:
        """Create ``name``; returns ``s3://name``."""
        from m3i.storage import S3Settings

        S3Settings.from_env().client().make_bucket(name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._proc is not None:
            self._proc.terminate()
            self._proc.join(10)
            self._proc = None


@contextlib.contextmanager
def workdir(path: Path | None, prefix: str) -> Iterator[Path]:
    """``path`` (created, kept) or a temporary folder removed afterwards."""
    if path is not None:
        path = path.resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
