"""``Store.put_if_absent``: the create-if-absent write promotions are built on, on a local folder and on a
real S3 server (moto); racing writers; servers and file systems that cannot do it."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from m3i.storage import StorageError, open_store


def test_only_the_first_write_of_a_key_lands(store_uri):
    store = open_store(store_uri)
    assert store.put_if_absent("log/0000000001.json", b'{"who": "first"}', {"sha256": "abc", "content-type": "application/json"})
    assert not store.put_if_absent("log/0000000001.json", b'{"who": "second"}')
    assert store.get_bytes("log/0000000001.json") == b'{"who": "first"}'
    assert store.stat("log/0000000001.json").metadata == {"sha256": "abc"}
    assert [o.key for o in store.list("")] == ["log/0000000001.json"]  # no temp file or probe object left behind


def _race(store_uri: str, key: str, n: int) -> list[bool]:
    barrier, results = threading.Barrier(n), [None] * n

    def write(i: int) -> None:
        store = open_store(store_uri)  # a client of its own, as another process would have
        barrier.wait()
        results[i] = store.put_if_absent(key, f"writer {i}".encode())

    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_of_racing_threads_exactly_one_creates_the_key(store_uri):
    for round_ in range(5):
        results = _race(store_uri, f"race/{round_}", 6)
        assert results.count(True) == 1, results
        assert open_store(store_uri).get_bytes(f"race/{round_}") == f"writer {results.index(True)}".encode()


def _process_write(store_uri: str, key: str, i: int, barrier, out) -> None:
    store = open_store(store_uri)
    barrier.wait()
    out.put((i, store.put_if_absent(key, f"process {i}".encode())))


def test_of_racing_processes_exactly_one_creates_the_key(store_uri):
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_process_write, args=(store_uri, "race/p", i, barrier, out)) for i in range(4)]
    try:
        for p in procs:
            p.start()
        results = dict(out.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert sorted(results.values()) == [False, False, False, True]
    winner = next(i for i, won in results.items() if won)
    assert open_store(store_uri).get_bytes("race/p") == f"process {winner}".encode()


def test_a_file_system_without_hard_links_is_a_clear_error(tmp_path, monkeypatch):
    import os

    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store = open_store(tmp_path / "store")
    with pytest.raises(StorageError, match="cannot hard-link .* conditional writes need link"):
        store.put_if_absent("a", b"x")
    assert list(store.list("")) == []


@pytest.mark.s3
def test_an_s3_server_that_ignores_if_none_match_is_refused(s3_bucket, monkeypatch):
    """A server that would let every writer win is caught by the probe before anything is written."""
    from moto.s3.responses import S3Response
    from werkzeug.datastructures import Headers

    original = S3Response.put_object

    def ignore_condition(self):
        headers = Headers(self.headers)
        headers.remove("If-None-Match")
        self.headers = headers
        return original(self)

    monkeypatch.setattr(S3Response, "put_object", ignore_condition)
    store = open_store(s3_bucket + "/models")
    with pytest.raises(StorageError, match=r"ignores If-None-Match: \* on PutObject .* cannot make a write conditional"):
        store.put_if_absent("m/promotions/0000000001.json", b"{}")
    assert list(store.list("")) == []  # neither the object nor the probe is left


@pytest.mark.s3
def test_a_retried_write_whose_first_attempt_landed_still_reports_it_created_the_key(s3_bucket, monkeypatch):
    """The reply to the first attempt is lost: the retry sees 412, finds its own bytes, and says True."""
    import urllib3

    store = open_store(s3_bucket)
    store.put_if_absent("warm-up", b"x")  # the conditional-write probe runs here, not under the patch
    client = store._client
    original = client._put_object
    calls = []

    def lose_first_reply(*args, **kwargs):
        calls.append(args[1])
        result = original(*args, **kwargs)
        if len(calls) == 1:
            raise urllib3.exceptions.ProtocolError("connection reset while reading the reply")
        return result

    monkeypatch.setattr(client, "_put_object", lose_first_reply)
    assert store.put_if_absent("mine", b"my bytes") and len(calls) == 2
    calls.clear()
    store.put_bytes("theirs", b"their bytes")
    assert not store.put_if_absent("theirs", b"my bytes")  # a 412 on another writer's bytes is a loss
