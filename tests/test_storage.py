import hashlib
import os
import time

import pytest

from m3i.storage import LocalStore, S3Store, StorageError, join_uri, open_store


def test_open_store_by_scheme(tmp_path, s3_env):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert isinstance(open_store("s3://bucket/prefix"), S3Store)
    with pytest.raises(ValueError, match="gs.*allowed schemes"):
        open_store("gs://bucket/x")
    with pytest.raises(ValueError, match="empty"):
        open_store("")
    with pytest.raises(ValueError, match="shorter than 3"):
        open_store("s3://ab/x")


def test_put_get_list_stat_delete(store_uri):
    s = open_store(store_uri)
    s.put_bytes("a/one.bin", b"1" * 10, {"sha256": "abc"})
    s.put_bytes("a/two.bin", b"22")
    s.put_bytes("b/three.bin", b"")
    assert s.get_bytes("a/one.bin") == b"1" * 10
    assert [o.key for o in s.list()] == ["a/one.bin", "a/two.bin", "b/three.bin"]
    assert [o.key for o in s.list("a/")] == ["a/one.bin", "a/two.bin"]
    info = s.stat("a/one.bin")
    assert info.size == 10 and info.metadata["sha256"] == "abc"
    assert s.stat("missing") is None and not s.exists("missing") and s.exists("a/two.bin")
    with s.open_read("a/two.bin") as f:
        assert f.read() == b"22"
    s.delete("a/one.bin")
    s.delete("a/one.bin")  # deleting a missing key is fine
    assert not s.exists("a/one.bin")
    with pytest.raises(StorageError, match="missing"):
        s.get_bytes("missing")
    assert s.url("a/two.bin") == join_uri(s.uri, "a/two.bin")


def test_large_file_streams_and_roundtrips(store_uri, tmp_path):
    # 20 MB forces a multipart upload on S3 (16 MiB parts).
    data = os.urandom(20 * 1024 * 1024)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    s = open_store(store_uri)
    s.put_file("big.bin", str(src), {"sha256": hashlib.sha256(data).hexdigest()})
    h = hashlib.sha256()
    with s.open_read("big.bin") as f:
        while chunk := f.read(1 << 16):
            h.update(chunk)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert s.sha256("big.bin") == h.hexdigest()
    dst = tmp_path / "back.bin"
    s.get_file("big.bin", str(dst))
    assert dst.read_bytes() == data


def test_manifest_is_json_and_sub_store(store_uri):
    s = open_store(store_uri)
    s.put_bytes("data/x", b"x")
    s.write_manifest("data/index.json", {"files": ["x"]})
    sub = s.sub("data")
    assert sub.read_json("index.json") == {"files": ["x"]}
    assert sub.get_bytes("x") == b"x"
    s.put_bytes("bad.json", b"{not json")
    with pytest.raises(StorageError, match="not valid JSON"):
        s.read_json("bad.json")


def test_local_writes_are_atomic_and_hide_temp_files(tmp_path):
    s = LocalStore(tmp_path)
    s.put_bytes("k", b"old")
    (tmp_path / ".k.123.tmp").write_bytes(b"partial")  # what a crashed writer leaves
    assert [o.key for o in s.list()] == ["k"]
    assert s.get_bytes("k") == b"old"
    with pytest.raises(ValueError, match="not a valid object key"):
        s.put_bytes("../escape", b"x")


@pytest.mark.s3
def test_missing_bucket_is_clear(s3_env):
    s = open_store("s3://no-such-bucket-here/x")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        s.put_bytes("k", b"v")


def test_endpoint_down_retries_then_names_endpoint_and_op(monkeypatch):
    from tests.conftest import free_port

    port = free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id-not-in-errors")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("M3I_S3_RETRIES", "3")
    monkeypatch.setenv("M3I_S3_BACKOFF", "0.05")
    s = open_store("s3://bucket/prefix")
    t0 = time.monotonic()
    with pytest.raises(StorageError) as exc:
        s.get_bytes("shard-000.tar")
    elapsed = time.monotonic() - t0
    msg = str(exc.value)
    assert "get s3://bucket/prefix/shard-000.tar failed after 3 attempts" in msg
    assert f"127.0.0.1:{port}" in msg
    assert "very-secret-value" not in msg and "id-not-in-errors" not in msg
    assert elapsed >= 0.05  # it really backed off between attempts


def test_bad_env_values_are_named(monkeypatch):
    from m3i.storage import S3Settings

    monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://host")
    with pytest.raises(ValueError, match="ftp://host"):
        S3Settings.from_env()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("M3I_S3_RETRIES", "many")
    with pytest.raises(ValueError, match="M3I_S3_RETRIES='many'"):
        S3Settings.from_env()
