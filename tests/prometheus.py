"""Real Prometheus and Pushgateway servers on 127.0.0.1 for the tests marked ``prometheus``.

The Debian binaries must be on PATH (``scripts/install-services.sh`` installs them); a test
that needs one fails, never skips, when it is missing. Use the fixtures by importing them
into a test module:

    from tests.prometheus import prometheus_factory, pushgateway  # noqa: F401
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest
import yaml

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "ManagedServer",
    "PrometheusServer",
    "free_port",
    "free_port_pair",
    "parse_metrics",
    "prometheus_factory",
    "pushgateway",
    "require_binary",
    "wait_until",
]

INSTALL_HINT = "run scripts/install-services.sh (apt-get install prometheus prometheus-pushgateway)"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port ``p`` with ``p`` and ``p + 1`` free on 127.0.0.1 (two ranks on one node)."""
    for _ in range(50):
        p = free_port()
        if p >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
        except OSError:
            continue
        return p
    raise RuntimeError("no two consecutive free ports found on 127.0.0.1")


def require_binary(name: str) -> str:
    """Path of executable ``name``; fails the test (never skips) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name!r} is not on PATH; {INSTALL_HINT}", pytrace=False)
    return path


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode("utf-8")


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text exposition -> ``{(sample name, frozenset(labels)): value}``."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def wait_until(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Call ``probe`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except (OSError, ValueError) as e:  # not up yet, or a half-written answer
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}", pytrace=False)
        time.sleep(interval)


class ManagedServer:
    """A server binary run as a child process, ready once ``/-/ready`` answers 200."""

    def __init__(self, name: str, args: Sequence[str], port: int, log_path: Path) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([name, *args], stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}",
                    pytrace=False,
                )
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200

        wait_until(ready, timeout, f"{self.name} on {self.url} to be ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


class PrometheusServer(ManagedServer):
    """Prometheus scraping fixed targets every second, with its TSDB in a temp folder."""

    def __init__(self, workdir: Path, targets: Sequence[str], job: str = "m3i-train") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        port = free_port()
        args = [
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        super().__init__(require_binary("prometheus"), args, port, workdir / "prometheus.log")
        self.name = "prometheus"

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query through the HTTP API -> the ``result`` vector."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        body = json.loads(http_get(url))
        if body.get("status") != "success":
            raise ValueError(f"query {promql!r} failed: {body}")
        return body["data"]["result"]

    def wait_for_series(self, promql: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll ``promql`` until it returns at least ``count`` series."""

        def probe() -> list[dict[str, Any]] | None:
            result = self.query(promql)
            return result if len(result) >= count else None

        return wait_until(
            probe,
            timeout,
            f"{count} series of {promql!r} in Prometheus",
            interval=0.5,
        )


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """Start a real Prometheus scraping ``targets`` (``host:port``) every 1 s; stopped at teardown."""
    require_binary("prometheus")
    started: list[PrometheusServer] = []

    def start(targets: Sequence[str], job: str = "m3i-train") -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus-{len(started)}", targets, job)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[ManagedServer]:
    """A real Pushgateway on 127.0.0.1 (state in memory); stopped at teardown."""
    binary = require_binary("prometheus-pushgateway")
    port = free_port()
    server = ManagedServer(
        binary, [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], port, tmp_path / "pushgateway.log"
    )
    server.name = "prometheus-pushgateway"
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
