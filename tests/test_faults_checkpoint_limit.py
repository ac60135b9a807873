"""Issue #22 item 6: ``checkpoint.max_consecutive_failures`` ends the job whatever part of a save fails.

The probe: with the S3 store paused 20 s, the saves at steps 9, 12 and 15 each logged "1 in a row":
the ``history.jsonl`` write, the first thing a save does, failed and raised before the checkpoint
save that counted failures, so the limit never ended the job. Here the store is paused for real:
a TCP proxy between the trainer and the moto S3 server resets every connection while paused.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.helpers import one_rank_here, shard_small, small_demo, write_train_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("limit-data")
    shard_small(small_demo(root / "raw"), str(root / "shards"))
    return str(root / "shards")


def _train(tmp: Path, shards: str, out: str, **sections):
    from m3i.config import load_config
    from m3i.train import loop

    sections["data"] = {"num_workers": 0}
    sections["checkpoint"] = {"staging_dir": str(tmp / "staging"), **sections.get("checkpoint", {})}
    return loop.train(load_config(None, write_train_config(tmp / "c.yaml", shards, out, **sections)), progress=False)


def _capture_metrics(monkeypatch) -> dict:
    from m3i.train import loop

    seen = {}
    real = loop.build_metrics
    monkeypatch.setattr(loop, "build_metrics", lambda *a, **kw: seen.setdefault("metrics", real(*a, **kw)))
    return seen


def _failures(metrics) -> float:
    return metrics.registry.get_sample_value("m3i_train_checkpoint_failures_total", {"rank": "0", "run_id": metrics.run_id})


def _on_forward(monkeypatch, hook) -> None:
    """Call ``hook(n)`` before the model's ``n``-th forward call (n = 1, 2, ...)."""
    from m3i.train import loop

    real_build = loop.build_model
    calls = {"n": 0}

    def build(cfg, num_classes=None):
        model = real_build(cfg, num_classes=num_classes)
        forward = model.forward

        def hooked(batch):
            calls["n"] += 1
            hook(calls["n"])
            return forward(batch)

        model.forward = hooked
        return model

    monkeypatch.setattr(loop, "build_model", build)


def _reset(sock: socket.socket) -> None:
    """Drop a connection at once: RST on close (SO_LINGER 0), after a shutdown that wakes a blocked recv."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class PausableProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream``; while paused, the store behind it is unreachable.

    Pausing drops every open connection and every new one (the client's retries all fail);
    resuming lets new connections through again.
    """

    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.target = (u.hostname, u.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.paused = threading.Event()
        self.refused = 0  # connections dropped while paused
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.paused.is_set():
                self.refused += 1
                _reset(client)
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._open |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with self._lock:
                    self._open.discard(s)
                _reset(s)

    def pause(self) -> None:
        self.paused.set()
        with self._lock:
            dropped, self._open = list(self._open), set()
        for s in dropped:
            _reset(s)

    def resume(self) -> None:
        self.paused.clear()

    def close(self) -> None:
        self.pause()
        self.listener.close()


@pytest.mark.s3
def test_s3_paused_failed_saves_count_in_a_row_from_the_history_write_and_the_limit_ends_the_job(
    shards, tmp_path, monkeypatch, caplog, s3_server, s3_bucket
):
    from m3i.storage import StorageError, open_store

    one_rank_here(monkeypatch)
    seen = _capture_metrics(monkeypatch)
    proxy = PausableProxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the trainer reaches S3 through the proxy only
    # Paused from the first forward call (after the resume check listed the bucket) to the 7th:
    # the saves at steps 2, 4 and 6 find the store unreachable, the one at 8 would not.
    _on_forward(monkeypatch, lambda n: proxy.pause() if n == 1 else proxy.resume() if n == 7 else None)
    out = s3_bucket + "/run"
    try:
        with caplog.at_level(logging.ERROR, logger="m3i"), pytest.raises(StorageError) as err:
            _train(tmp_path, shards, out, train={"steps": 10}, checkpoint={"interval_steps": 2, "max_consecutive_failures": 3})
    finally:
        proxy.close()
    assert proxy.refused > 0  # the store was unreachable, not merely slow
    assert re.search(
        r"checkpoint step 6 not saved: writing history.jsonl failed \(.*\); that is 3 failed checkpoint saves in a row "
        r"\(checkpoint.max_consecutive_failures=3\), so training stops", str(err.value)
    ), err.value
    said = caplog.text
    assert "checkpoint step 2 failed (1 in a row, checkpoint.max_consecutive_failures=3)" in said
    assert "checkpoint step 4 failed (2 in a row, checkpoint.max_consecutive_failures=3)" in said
    assert _failures(seen["metrics"]) == 3
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert not [o.key for o in open_store(out).list("checkpoints/") if o.key.endswith("/complete.json")]


def _fail_history(monkeypatch) -> None:
    from m3i.storage import LocalStore, StorageError

    real = LocalStore.put_bytes

    def put_bytes(self, key, data, metadata=None):
        if key == "history.jsonl":
            raise StorageError(f"put {self.url(key)}: [Errno 30] Read-only file system")
        return real(self, key, data, metadata)

    monkeypatch.setattr(LocalStore, "put_bytes", put_bytes)


def _fail_deepspeed_files(monkeypatch) -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    def save_checkpoint(self, *a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", save_checkpoint)


def _fail_rank_state(monkeypatch) -> None:
    import m3i.train.checkpoint

    def save_state(state, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(m3i.train.checkpoint, "save_state", save_state)


def _fail_uploads(monkeypatch) -> None:
    from m3i.storage import LocalStore, StorageError

    def put_file(self, key, path, metadata=None):
        raise StorageError(f"put {self.url(key)} failed after 5 attempts: connection refused")

    monkeypatch.setattr(LocalStore, "put_file", put_file)


def _fail_marker(monkeypatch) -> None:
    from m3i.storage import LocalStore, StorageError

    def write_manifest(self, key, manifest):
        raise StorageError(f"put {self.url(key)}: [Errno 30] Read-only file system")

    monkeypatch.setattr(LocalStore, "write_manifest", write_manifest)


PARTS = {
    "history.jsonl": (_fail_history, r"writing history.jsonl failed"),
    "DeepSpeed files": (_fail_deepspeed_files, r"writing its files to the staging folder .* failed.*PytorchStreamWriter"),
    "rank state": (_fail_rank_state, r"writing its files to the staging folder .* failed.*No space left on device"),
    "uploads": (_fail_uploads, r"upload from node 0 failed: .*connection refused"),
    "complete.json": (_fail_marker, r"writing complete.json failed"),
}


@pytest.mark.parametrize("part", list(PARTS))
def test_every_part_of_a_failed_save_counts_toward_the_limit(shards, tmp_path, monkeypatch, caplog, part):
    from m3i.storage import StorageError

    one_rank_here(monkeypatch)
    seen = _capture_metrics(monkeypatch)
    fail, why = PARTS[part]
    fail(monkeypatch)
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR, logger="m3i"):
        with pytest.raises(StorageError, match=rf"step.0*4.*{why}.*; that is 2 failed checkpoint saves in a row \(checkpoint.max_consecutive_failures=2\)"):
            _train(tmp_path, shards, str(out), train={"steps": 8}, checkpoint={"interval_steps": 2, "max_consecutive_failures": 2})
    assert "checkpoint step 2 failed (1 in a row, checkpoint.max_consecutive_failures=2); training goes on" in caplog.text
    assert _failures(seen["metrics"]) == 2
    assert not list(out.glob("checkpoints/*/complete.json"))
    assert not [p for p in (tmp_path / "staging").rglob("*") if p.is_file()]  # the failed saves' staging files are gone
