"""``s3://bucket/prefix`` stores through the minio client, for any S3-compatible server.

Connection settings come from environment variables only, so that no credential is
ever part of a config, a compiled pipeline, a log line or an error message:

========================== ==============================================================
``AWS_ENDPOINT_URL``       Server URL, e.g. ``http://minio.m3i:9000`` or
                           ``https://s3.eu-west-1.amazonaws.com`` (``M3I_S3_ENDPOINT``
                           wins when both are set). Default ``https://s3.amazonaws.com``.
                           The scheme decides TLS.
``AWS_ACCESS_KEY_ID``      Access key; with ``AWS_SECRET_ACCESS_KEY`` (and optionally
``AWS_SECRET_ACCESS_KEY``  ``AWS_SESSION_TOKEN``). Without them: web-identity (IRSA)
``AWS_SESSION_TOKEN``      when ``AWS_WEB_IDENTITY_TOKEN_FILE`` is set, else anonymous.
``AWS_REGION``             Region (or ``AWS_DEFAULT_REGION``); servers that ignore
                           regions need none.
``M3I_S3_CA_BUNDLE``       PEM file of CAs to trust for a private TLS endpoint.
``M3I_S3_VERIFY_TLS``      ``false`` skips certificate checks (development only).
``M3I_S3_RETRIES``         Attempts per operation on connection errors, timeouts and
                           5xx (default 5), with exponential backoff.
``M3I_S3_BACKOFF``         First backoff in seconds (default 0.5; doubles, capped 20 s).
``M3I_S3_TIMEOUT``         Connect and read timeout in seconds (default 60).
========================== ==============================================================
"""

from __future__ import annotations

import io
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, TypeVar
from urllib.parse import urlparse

import certifi
import urllib3
from minio import Minio
from minio.credentials import IamAwsProvider
from minio.error import InvalidResponseError, S3Error, ServerError

from m3i.storage.base import ObjectInfo, StorageError, Store

__all__ = ["S3Settings", "S3Store", "parse_s3_uri"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# S3 error codes that mean "try again later" rather than "this will never work".
# ConditionalRequestConflict (409): a conditional write raced another; AWS asks to retry it.
_RETRY_CODES = {
    "InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed", "ConditionalRequestConflict",
}
_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}
_MULTIPART_PART = 16 * 1024 * 1024
_PROBE_PREFIX = ".m3i-conditional-write-probe"
_conditional_ok: set[tuple[str, str]] = set()
"""(endpoint, bucket) pairs seen to refuse a second ``If-None-Match: *`` write, in this process."""
_conditional_lock = threading.Lock()


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/prefix`` into (``bucket``, ``some/prefix``)."""
    p = urlparse(uri)
    if p.scheme != "s3" or not p.netloc:
        raise ValueError(f"uri={uri!r} is not an s3://bucket[/prefix] URI")
    if len(p.netloc) < 3:
        raise ValueError(f"uri={uri!r}: bucket name {p.netloc!r} is shorter than 3 characters")
    return p.netloc, p.path.strip("/")


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean; use true or false")


def _env_num(name: str, default: float, cast: Callable[[str], float] = float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r} must be >= 0")
    return value


@dataclass(frozen=True)
class S3Settings:
    """Connection settings read from the environment (see the module docstring)."""

    endpoint: str
    """``host[:port]`` without scheme."""
    secure: bool
    region: str | None
    verify_tls: bool
    ca_bundle: str | None
    retries: int
    backoff: float
    timeout: float

    @property
    def endpoint_url(self) -> str:
        return ("https://" if self.secure else "http://") + self.endpoint

    @classmethod
    def from_env(cls) -> "S3Settings":
        url = os.environ.get("M3I_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or "https://s3.amazonaws.com"
        p = urlparse(url if "://" in url else "https://" + url)
        if p.scheme not in ("http", "https") or not p.netloc:
            raise ValueError(f"S3 endpoint {url!r} must look like http(s)://host[:port]")
        if p.path.strip("/"):
            raise ValueError(f"S3 endpoint {url!r} must not have a path; put the prefix in the s3:// URI")
        return cls(
            endpoint=p.netloc,
            secure=p.scheme == "https",
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
            verify_tls=_env_bool("M3I_S3_VERIFY_TLS", True),
            ca_bundle=os.environ.get("M3I_S3_CA_BUNDLE") or None,
            retries=max(1, int(_env_num("M3I_S3_RETRIES", 5, int))),
            backoff=_env_num("M3I_S3_BACKOFF", 0.5),
            timeout=_env_num("M3I_S3_TIMEOUT", 60.0),
        )

    def client(self) -> Minio:
        """A minio client; credentials are read here and kept only inside it."""
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout),
            maxsize=16,
            cert_reqs="CERT_REQUIRED" if self.verify_tls else "CERT_NONE",
            ca_certs=self.ca_bundle or os.environ.get("SSL_CERT_FILE") or certifi.where(),
            # Retries are ours (see _retry), so a failure is reported once, clearly.
            retries=urllib3.Retry(total=0, connect=0, read=0, redirect=3, status=0, raise_on_status=False),
        )
        key = os.environ.get("AWS_ACCESS_KEY_ID")
        secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
        if key and not secret:
            raise ValueError("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not")
        credentials = None
        if not key and os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
            credentials = IamAwsProvider()
        return Minio(
            self.endpoint,
            access_key=key or None,
            secret_key=secret or None,
            session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
            secure=self.secure,
            region=self.region,
            http_client=http,
            credentials=credentials,
            cert_check=self.verify_tls,
        )


def _retryable(e: BaseException) -> bool:
    if isinstance(e, S3Error):
        return e.code in _RETRY_CODES
    return isinstance(e, (ServerError, InvalidResponseError, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def _describe(e: BaseException) -> str:
    if isinstance(e, S3Error):
        return f"{e.code}: {e.message}"
    # urllib3 wraps the root cause; its repr holds host and path, never credentials.
    return f"{type(e).__name__}: {e}"


class _ResumingReader(io.RawIOBase):
    """A streaming GET that, on a dropped connection, re-requests from the byte it reached."""

    def __init__(self, store: "S3Store", key: str) -> None:
        self._store, self._key = store, key
        self._pos = 0
        self._resp = None
        self._open()

    def _open(self) -> None:
        obj = self._store._obj(self._key)
        self._resp = self._store._retry(
            "get", self._key, lambda: self._store._client.get_object(self._store.bucket, obj, offset=self._pos)
        )

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        for attempt in range(self._store.settings.retries):
            try:
                n = self._resp.readinto(b)
                self._pos += n
                return n
            except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as e:
                if attempt + 1 >= self._store.settings.retries:
                    raise StorageError(
                        f"get {self._store.url(self._key)} at byte {self._pos} failed on "
                        f"{self._store.settings.endpoint_url}: {_describe(e)}"
                    ) from None
                self._close_resp()
                time.sleep(self._store._delay(attempt))
                self._open()
        return 0  # unreachable: the loop returns or raises

    def _close_resp(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp.release_conn()
            self._resp = None

    def close(self) -> None:
        self._close_resp()
        super().close()


class S3Store(Store):
    """Objects under ``s3://bucket/prefix`` on any S3-compatible server.

    Every request is retried with exponential backoff and jitter on connection
    errors, timeouts, 5xx and throttling; then :class:`StorageError` names the
    endpoint, the operation and the object. Missing objects and permission errors
    are not retried.
    """

    def __init__(self, uri: str, settings: S3Settings | None = None) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.settings = settings or S3Settings.from_env()
        self._client = self.settings.client()

    # -- plumbing -------------------------------------------------------------

    def _obj(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.prefix}/{key}" if self.prefix and key else (key or self.prefix)

    def _delay(self, attempt: int) -> float:
        return min(20.0, self.settings.backoff * (2**attempt)) * (0.5 + random.random() / 2)

    def _retry(self, op: str, key: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.settings.retries):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified right below
                if isinstance(e, S3Error) and e.code == "NoSuchBucket":
                    raise StorageError(
                        f"{op} {self.url(key)}: bucket {self.bucket!r} does not exist on {self.settings.endpoint_url}"
                    ) from None
                if not _retryable(e):
                    raise StorageError(f"{op} {self.url(key)} on {self.settings.endpoint_url}: {_describe(e)}") from None
                if attempt + 1 >= self.settings.retries:
                    raise StorageError(
                        f"{op} {self.url(key)} failed after {self.settings.retries} attempts on "
                        f"{self.settings.endpoint_url}: {_describe(e)}"
                    ) from None
                delay = self._delay(attempt)
                log.warning("%s %s: %s; retrying in %.2fs", op, self.url(key), _describe(e), delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- Store ------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        ctype = (metadata or {}).get("content-type", "application/octet-stream")
        meta = {k: v for k, v in (metadata or {}).items() if k != "content-type"} or None
        self._retry(
            "put",
            key,
            lambda: self._client.put_object(
                self.bucket, self._obj(key), io.BytesIO(data), len(data), content_type=ctype, metadata=meta
            ),
        )

    def put_file(self, key: str, path: str, metadata: dict[str, str] | None = None) -> None:
        # fput_object switches to multipart above part_size and uploads parts in parallel.
        self._retry(
            "put",
            key,
            lambda: self._client.fput_object(
                self.bucket, self._obj(key), path, metadata=metadata or None, part_size=_MULTIPART_PART
            ),
        )

    def put_if_absent(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> bool:
        """``PutObject`` with ``If-None-Match: *`` (AWS S3 since 2024-08, MinIO, moto 5).

        A server that would ignore the header (and so let every writer win) is caught first: once
        per endpoint and bucket and process, a probe object under ``.m3i-conditional-write-probe/``
        is written twice and the second write must be refused; else :class:`StorageError`.
        """
        self._check_conditional_writes()
        return self._create(key, data, metadata)

    def _create(self, key: str, data: bytes, metadata: dict[str, str] | None) -> bool:
        meta = metadata or {}
        headers = {"Content-Type": meta.get("content-type", "application/octet-stream"), "If-None-Match": "*"}
        headers.update({f"x-amz-meta-{k}": v for k, v in meta.items() if k != "content-type"})
        attempts = 0

        def put() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                # minio 7.2.20's put_object turns every extra header into x-amz-meta-*; _put_object (the
                # request put_object sends for a one-part object) sends them as given.
                self._client._put_object(self.bucket, self._obj(key), data, headers)
            except S3Error as e:
                if e.code != "PreconditionFailed":
                    raise
                # After a retry, the object may be this call's own first attempt, whose reply was lost.
                return attempts > 1 and self.get_bytes(key) == data
            return True

        return self._retry("put if absent", key, put)

    def _check_conditional_writes(self) -> None:
        where = (self.settings.endpoint_url, self.bucket)
        with _conditional_lock:
            if where in _conditional_ok:
                return
        probe = f"{_PROBE_PREFIX}/{uuid.uuid4().hex}"
        try:
            created, again = self._create(probe, b"probe", None), self._create(probe, b"probe", None)
        except StorageError as e:
            raise StorageError(
                f"{self.settings.endpoint_url} (bucket {self.bucket!r}) refused a conditional write "
                f"(PutObject with If-None-Match: *), which this operation needs: {e}"
            ) from None
        finally:
            try:
                self.delete(probe)
            except StorageError as e:
                log.warning("could not delete the probe object %s: %s", self.url(probe), e)
        if not created or again:
            raise StorageError(
                f"{self.settings.endpoint_url} (bucket {self.bucket!r}) ignores If-None-Match: * on PutObject (a second "
                "write of one key succeeded), so it cannot make a write conditional; use a server that supports "
                "conditional writes (AWS S3, MinIO, moto 5) or a local folder"
            )
        with _conditional_lock:
            _conditional_ok.add(where)

    def open_read(self, key: str) -> BinaryIO:
        return io.BufferedReader(_ResumingReader(self, key), buffer_size=1 << 20)

    def get_bytes(self, key: str) -> bytes:
        def fetch() -> bytes:
            resp = self._client.get_object(self.bucket, self._obj(key))
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._retry("get", key, fetch)

    def get_file(self, key: str, path: str) -> None:
        self._retry("get", key, lambda: self._client.fget_object(self.bucket, self._obj(key), path))

    def stat(self, key: str) -> ObjectInfo | None:
        def fetch() -> ObjectInfo | None:
            try:
                st = self._client.stat_object(self.bucket, self._obj(key))
            except S3Error as e:
                if e.code in _MISSING_CODES:
                    return None
                raise
            meta = {}
            for k, v in (st.metadata or {}).items():
                lk = k.lower()
                if lk.startswith("x-amz-meta-"):
                    meta[lk[len("x-amz-meta-") :]] = v
            return ObjectInfo(key.strip("/"), int(st.size or 0), meta or None, (st.etag or "").strip('"') or None)

        return self._retry("stat", key, fetch)

    def sha256(self, key: str) -> str:
        info = self.stat(key)
        if info is not None and info.metadata and info.metadata.get("sha256"):
            return info.metadata["sha256"]
        return super().sha256(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self._obj(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        if prefix.endswith("/") and not full.endswith("/"):
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0

        def fetch() -> list[ObjectInfo]:
            return [
                ObjectInfo(o.object_name[strip:], int(o.size or 0), etag=(o.etag or "").strip('"') or None)
                for o in self._client.list_objects(self.bucket, prefix=full, recursive=True)
                if not o.is_dir
            ]

        yield from sorted(self._retry("list", prefix, fetch), key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self._retry("delete", key, lambda: self._client.remove_object(self.bucket, self._obj(key)))

    def url(self, key: str) -> str:
        obj = self._obj(key)
        return f"s3://{self.bucket}/{obj}" if obj else f"s3://{self.bucket}"

    def sub(self, prefix: str) -> "S3Store":
        return S3Store(self.url(prefix.strip("/")), self.settings)
