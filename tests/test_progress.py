"""TrainJob progress (m3i.train.progress) against a real HTTPS server on 127.0.0.1.

The server stands in for Kubeflow Trainer's status endpoint: TLS with a throwaway self-signed
certificate made here, ``POST .../trainjobs/<name>/status`` with a bearer token, JSON replies.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from m3i.config import MetricsConfig
from m3i.train.progress import ENV_CA_CERT, ENV_TOKEN, ENV_URL, TrainerStatusReporter, build_trainer_status
from tests.conftest import free_port

STATUS_PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs/m3i-run/status"
WAIT = 30.0  # a safety bound only: every wait below ends as soon as the awaited thing happens
LOGGER = "m3i.train.progress"


def _self_signed(folder: Path, name: str) -> tuple[str, str]:
    """A CA-capable self-signed certificate for 127.0.0.1 and its key; returns both paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, tuple[str, str]]:
    folder = tmp_path_factory.mktemp("certs")
    return {name: _self_signed(folder, name) for name in ("server", "other")}


class StatusServer:
    """An HTTPS server on 127.0.0.1 that records each request and answers with ``code``."""

    def __init__(self, cert: tuple[str, str], port: int = 0) -> None:
        self.requests: list[dict] = []
        self.code = 200
        self.got = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                code = outer.code
                if code == 200:
                    reply = body
                else:  # what the controller sends: a metav1.Status
                    reply = json.dumps({"kind": "Status", "status": "Failure", "message": "Forbidden", "reason": "Forbidden", "code": code}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                with outer.got:
                    outer.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                    outer.got.notify_all()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*cert)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}{STATUS_PATH}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(WAIT)

    def bodies(self) -> list[dict]:
        return [r["body"]["trainerStatus"] for r in self.requests]


@pytest.fixture
def server(certs):
    s = StatusServer(certs["server"])
    yield s
    s.stop()


@pytest.fixture
def token(tmp_path) -> Path:
    path = tmp_path / "token"
    path.write_text("tok-first-0123456789\n")
    return path


@pytest.fixture
def reporters():
    """Builds reporters and closes every one at the end of the test."""
    made: list[TrainerStatusReporter] = []

    def make(url: str, ca: str, token: Path, **kw) -> TrainerStatusReporter:
        kw.setdefault("min_interval_seconds", 0.0)
        r = TrainerStatusReporter(url, ca, str(token), **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close(timeout=WAIT)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------------ environment


def test_no_url_in_the_environment_means_no_reporter(certs, token):
    assert TrainerStatusReporter.from_env({}) is None
    assert TrainerStatusReporter.from_env({ENV_URL: " ", ENV_CA_CERT: certs["server"][0]}) is None
    env = {ENV_URL: "https://127.0.0.1:1/s", ENV_CA_CERT: certs["server"][0], ENV_TOKEN: str(token)}
    assert build_trainer_status(MetricsConfig(), is_main=False, environ=env) is None
    assert build_trainer_status(MetricsConfig(trainer_status=False), is_main=True, environ=env) is None
    r = build_trainer_status(MetricsConfig(interval_steps=7), is_main=True, environ=env)
    try:
        assert isinstance(r, TrainerStatusReporter) and r.interval_steps == 7 and r.url == env[ENV_URL]
    finally:
        r.close()


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({ENV_URL: "http://ctrl:8082/s", ENV_CA_CERT: "/ca", ENV_TOKEN: "/t"}, "KUBEFLOW_TRAINER_SERVER_URL='http://ctrl:8082/s' is not an https:// URL"),
        ({ENV_URL: "https://ctrl:8082/s", ENV_TOKEN: "/t"}, "KUBEFLOW_TRAINER_SERVER_CA_CERT='': a CA certificate file is required"),
        ({ENV_URL: "https://ctrl:8082/s", ENV_CA_CERT: "/ca"}, "KUBEFLOW_TRAINER_SERVER_TOKEN='': a token file is required"),
    ],
)
def test_unusable_variables_are_a_value_error_and_build_only_warns(env, match, caplog):
    with pytest.raises(ValueError, match=match):
        TrainerStatusReporter.from_env(env)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert build_trainer_status(MetricsConfig(), is_main=True, environ=env) is None
    assert any(match in m for m in _warnings(caplog))


def test_trainer_status_switch_is_a_config_boolean():
    from m3i.config.core import from_dict

    assert MetricsConfig().trainer_status is True
    assert from_dict(MetricsConfig, {"trainer_status": "false"}, section="metrics").trainer_status is False
    with pytest.raises(ValueError, match=r"metrics.trainer_status='maybe' is not a boolean"):
        from_dict(MetricsConfig, {"trainer_status": "maybe"}, section="metrics")


# ------------------------------------------------------------------------------------ the contract


def test_posts_progress_eta_and_losses_to_the_trainjob_status_endpoint(server, certs, token, reporters):
    clock = FakeClock()
    r = reporters(server.url, certs["server"][0], token, interval_steps=5, clock=clock)
    parts = {"loss": 1.25, "loss_img": 0.5, "loss_cls": 0.25, "loss_txt": 0.5, "n_img": 8.0, "acc_cls": 0.1}
    for step in range(1, 6):  # 2 s a step
        clock.now += 2.0
        r.on_step(step, 10, parts)
    assert r.flush(WAIT)
    assert len(server.requests) == 1  # interval_steps=5: steps 1-4 queue nothing
    req = server.requests[0]
    assert (req["method"], req["path"]) == ("POST", STATUS_PATH)
    assert req["headers"]["Authorization"] == "Bearer tok-first-0123456789"
    assert req["headers"]["Content-Type"] == "application/json"
    assert set(req["body"]) == {"trainerStatus"}
    status = req["body"]["trainerStatus"]
    assert status["progressPercentage"] == 50
    assert status["estimatedRemainingSeconds"] == 10  # 5 steps left x 2 s
    assert status["metrics"] == [
        {"name": "loss", "value": "1.25"}, {"name": "loss_img", "value": "0.5"},
        {"name": "loss_cls", "value": "0.25"}, {"name": "loss_txt", "value": "0.5"},
        {"name": "step", "value": "5"}, {"name": "steps", "value": "10"},
    ]
    stamp = datetime.datetime.strptime(status["lastUpdatedTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds()) < 3600

    for step in range(6, 11):
        clock.now += 2.0
        r.on_step(step, 10, {"loss": 0.75, "loss_img": 0.25, "loss_cls": 0.25, "loss_txt": 0.25})
    assert r.close()
    final = server.bodies()[-1]
    assert (final["progressPercentage"], final["estimatedRemainingSeconds"]) == (100, 0)
    assert {m["name"]: m["value"] for m in final["metrics"]}["loss"] == "0.75"
    assert (r.sent, r.failures) == (2, 0)


def test_the_last_step_is_reported_whatever_the_interval_and_eta_needs_two_steps(server, certs, token, reporters):
    r = reporters(server.url, certs["server"][0], token, interval_steps=100, clock=FakeClock())
    r.on_step(3, 3, {"loss": 2.0})  # resumed at step 2: one step seen, and it is the last
    assert r.flush(WAIT)
    r2 = reporters(server.url, certs["server"][0], token, interval_steps=1, clock=FakeClock())
    r2.on_step(1, 3, {"loss": 2.0})
    assert r2.flush(WAIT)
    first, second = server.bodies()
    assert (first["progressPercentage"], first["estimatedRemainingSeconds"]) == (100, 0)
    assert second["progressPercentage"] == 33 and "estimatedRemainingSeconds" not in second


def test_values_are_clamped_to_the_crd_and_bad_metric_names_dropped_with_one_warning(server, certs, token, reporters, caplog):
    r = reporters(server.url, certs["server"][0], token)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        r.update(150, -5, {"x" * 65: 1.0, "": 2.0, "ok": 1e-9, "big": 123456789.0, "steps": 7})
        assert r.flush(WAIT)
        r.update(-3, 2e12, {"y" * 70: 1})
        assert r.flush(WAIT)
    first, second = server.bodies()
    assert (first["progressPercentage"], first["estimatedRemainingSeconds"]) == (100, 0)
    assert first["metrics"] == [{"name": "ok", "value": "1e-09"}, {"name": "big", "value": "1.23457e+08"}, {"name": "steps", "value": "7"}]
    assert (second["progressPercentage"], second["estimatedRemainingSeconds"]) == (0, 2**31 - 1)
    assert "metrics" not in second
    assert len(_warnings(caplog)) == 1 and "dropped" in _warnings(caplog)[0]


def test_the_token_is_read_for_every_post_and_never_logged(server, certs, token, reporters, caplog):
    r = reporters(server.url, certs["server"][0], token)
    r.update(10)
    assert r.flush(WAIT)
    token.write_text("tok-rotated-9876543210")  # kubelet rotates projected tokens in place
    server.code = 403
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        r.update(20)
        assert r.flush(WAIT)
    assert [q["headers"]["Authorization"] for q in server.requests] == ["Bearer tok-first-0123456789", "Bearer tok-rotated-9876543210"]
    assert (r.sent, r.failures) == (1, 1)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "HTTP 403: Forbidden" in warnings[0] and server.url in warnings[0]
    assert "tok-" not in caplog.text


def test_newest_update_wins_while_throttled_and_close_sends_it_at_once(server, certs, token, reporters):
    r = reporters(server.url, certs["server"][0], token, min_interval_seconds=3600.0)
    r.update(10)
    assert r.flush(WAIT)
    for p in (20, 30, 40):  # the next post may only go in an hour: each replaces the one before
        r.update(p)
    assert r.close(timeout=WAIT)
    r.update(50)  # after close: ignored
    assert [b["progressPercentage"] for b in server.bodies()] == [10, 40]


# ------------------------------------------------------------------------------------ failures


def test_endpoint_down_counts_failures_warns_once_per_outage_and_recovers(certs, token, reporters, caplog):
    port = free_port()  # nothing listens there yet
    url = f"https://127.0.0.1:{port}{STATUS_PATH}"
    r = reporters(url, certs["server"][0], token)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for p in (1, 2, 3):
            r.update(p, 60, {"loss": 1.0})  # returns at once and never raises
            assert r.flush(WAIT)
        assert (r.sent, r.failures) == (0, 3)
        assert len(_warnings(caplog)) == 1 and "ConnectionRefusedError" in _warnings(caplog)[0]

        up = StatusServer(certs["server"], port=port)
        try:
            r.update(4)
            assert r.flush(WAIT)
        finally:
            up.stop()
        assert (r.sent, r.failures) == (1, 3) and up.bodies()[0]["progressPercentage"] == 4
        assert any("accepts updates again (3 failed posts so far)" in m.getMessage() for m in caplog.records)

        r.update(5)  # a second outage is a second warning
        assert r.flush(WAIT)
    assert r.failures == 4 and len(_warnings(caplog)) == 2


def test_a_hung_endpoint_never_holds_up_update_and_close_is_bounded(certs, token, reporters, caplog):
    listener = socket.create_server(("127.0.0.1", 0))
    accepted, release, stop = threading.Event(), threading.Event(), threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:  # accepts, then says nothing (no TLS handshake) until released
        while True:
            conn, _ = listener.accept()
            if stop.is_set():
                conn.close()
                return
            if release.is_set():
                conn.close()
                continue
            held.append(conn)
            accepted.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}{STATUS_PATH}"
    try:
        # A long timeout: were update() to wait for the post, the counters below would show it.
        r = reporters(url, certs["server"][0], token, timeout_seconds=WAIT)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            r.update(10)
            assert accepted.wait(WAIT)  # the sender is connected and now waits for a reply
            for p in range(11, 50):
                r.on_step(p, 100, {"loss": 1.0})
                r.update(p)
            assert (r.sent, r.failures) == (0, 0)  # the first post is still in flight
            assert not r.close(timeout=0.2)  # bounded: the final update is behind the hung post
            assert "not sent within 0.2s" in _warnings(caplog)[-1]
            release.set()
            for conn in held:
                conn.close()
            assert r.close(timeout=WAIT)  # the hung post fails, the final one is refused at once
        assert (r.sent, r.failures) == (0, 2)
        assert sum("failed" in m for m in _warnings(caplog)) == 1
    finally:
        release.set()
        stop.set()
        socket.create_connection(listener.getsockname(), timeout=WAIT).close()  # wakes accept() to see stop
        thread.join(WAIT)
        listener.close()


def test_a_certificate_from_another_ca_fails_verification_and_is_reported(server, certs, token, reporters, caplog, tmp_path):
    r = reporters(server.url, certs["other"][0], token)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        r.update(10)  # never raises
        assert r.flush(WAIT)
    assert (r.sent, r.failures) == (0, 1) and server.requests == []
    assert "CERTIFICATE_VERIFY_FAILED" in _warnings(caplog)[0]

    missing = reporters(server.url, str(tmp_path / "no-ca.crt"), token)
    missing.update(10)
    assert missing.flush(WAIT)
    assert (missing.sent, missing.failures) == (0, 1) and server.requests == []


# ------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_training_posts_progress_to_the_trainjob_and_ends_at_100(server, certs, token, tmp_path, monkeypatch):
    from m3i.config import load_config
    from m3i.train import loop
    from tests.helpers import shard_small, small_demo, train_env, write_train_config

    shards = str(tmp_path / "shards")
    shard_small(small_demo(tmp_path / "raw"), shards)
    for k, v in train_env().items():
        if k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(ENV_URL, server.url)
    monkeypatch.setenv(ENV_CA_CERT, certs["server"][0])
    monkeypatch.setenv(ENV_TOKEN, str(token))
    cfg = load_config(None, write_train_config(
        tmp_path / "c.yaml", shards, str(tmp_path / "run"), data={"num_workers": 0}, train={"steps": 4}
    ))

    summary = loop.train(cfg, progress=False)

    assert summary.steps == 4
    bodies = server.bodies()
    assert bodies and bodies[0]["progressPercentage"] == 25  # the first step goes out at once, then 5 s apart
    final = bodies[-1]
    assert (final["progressPercentage"], final["estimatedRemainingSeconds"]) == (100, 0)
    names = {m["name"]: m["value"] for m in final["metrics"]}
    assert {"loss", "loss_img", "loss_cls", "loss_txt", "step", "steps"} <= set(names)
    assert names["step"] == names["steps"] == "4"
    assert float(names["loss"]) == pytest.approx(summary.last_parts["loss"], rel=1e-4)
