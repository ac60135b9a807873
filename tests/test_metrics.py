"""The training metrics component: config, the per-rank endpoint, the push, and real servers."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import socket
import time
import urllib.request

import pytest
from prometheus_client import generate_latest

from m3i.config.core import from_dict
from m3i.config.metrics import MetricsConfig
from m3i.metrics import METRIC_NAMES, SUMMARY_METRIC, StepReport, TrainMetrics, build_metrics
from tests.prometheus import (  # noqa: F401 - fixtures
    free_port,
    free_port_pair,
    parse_metrics,
    prometheus_factory,
    pushgateway,
)

RUN = "run-test"
_SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def local_cfg(**kw) -> MetricsConfig:
    kw.setdefault("host", "127.0.0.1")
    kw.setdefault("port", free_port())
    return MetricsConfig(**kw)


def scrape(m: TrainMetrics) -> dict:
    with urllib.request.urlopen(m.url, timeout=5) as r:
        return parse_metrics(r.read().decode())


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def assert_port_free(port: int) -> None:
    """Bind the port as a server would (SO_REUSEADDR: scrapes leave TIME_WAIT entries behind)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def metric_of(sample_name: str) -> str:
    """The METRIC_NAMES entry a sample belongs to (``_bucket``/``_created``... stripped)."""
    if sample_name in METRIC_NAMES:
        return sample_name
    for suffix in _SUFFIXES:
        if sample_name.endswith(suffix):
            base = sample_name[: -len(suffix)]
            for name in (base, base + "_total"):
                if name in METRIC_NAMES:
                    return name
    raise AssertionError(f"{sample_name} is exported but not in METRIC_NAMES")


def step(m: TrainMetrics, s: int, loss: float = 1.0, **kw) -> None:
    parts = kw.pop("parts", {"loss": loss, "loss_img": loss / 2, "loss_cls": loss / 4, "loss_txt": loss / 8})
    parts = {**parts, **{k: kw.pop(k) for k in ("ema_momentum", "temperature", "target_std") if k in kw}}  # monitors ride in parts
    m.on_step(StepReport(step=s, steps=100, parts=parts, lr=kw.pop("lr", 1e-3), samples=kw.pop("samples", 8),
                         seconds=kw.pop("secs", 0.5), data_wait_seconds=kw.pop("wait", 0.01), time=time.time(), **kw))


# -- config ------------------------------------------------------------------------------------


def test_config_defaults_and_coercion():
    cfg = MetricsConfig()
    assert (cfg.port, cfg.host, cfg.pushgateway, cfg.job, cfg.interval_steps) == (9400, "0.0.0.0", "", "m3i-train", 1)
    cfg = from_dict(MetricsConfig, {"port": "9500", "interval_steps": "10", "pushgateway": "http://pg:9091"},
                    section="metrics")
    assert (cfg.port, cfg.interval_steps, cfg.pushgateway) == (9500, 10, "http://pg:9091")
    assert MetricsConfig(port=0).port == 0
    assert MetricsConfig(pushgateway="pg.monitoring:9091").pushgateway == "pg.monitoring:9091"


@pytest.mark.parametrize(
    "field, bad",
    [
        ("port", -1),
        ("port", 70000),
        ("host", ""),
        ("pushgateway", "ftp://pg:9091"),
        ("pushgateway", "http://"),
        ("pushgateway", "http://pg host:9091"),
        ("job", ""),
        ("job", "m3i train"),
        ("interval_steps", 0),
    ],
)
def test_config_rejects_bad_values(field, bad):
    with pytest.raises(ValueError, match=re.escape(f"metrics.{field}={bad!r}")):
        MetricsConfig(**{field: bad})


def test_build_rejects_bad_rank_args():
    with pytest.raises(ValueError, match=r"metrics.port=65535 \+ local_rank=1"):
        build_metrics(MetricsConfig(port=65535), rank=1, local_rank=1, run_id=RUN)
    with pytest.raises(ValueError, match="run_id"):
        build_metrics(MetricsConfig(port=0), rank=0, local_rank=0, run_id="")


# -- the endpoint --------------------------------------------------------------------------------


def test_endpoint_serves_labelled_values():
    with build_metrics(local_cfg(), rank=3, local_rank=0, run_id=RUN, world_size=4, model="vit_tiny", peak_flops=1e12) as m:
        step(m, 1, loss=2.0, branch_samples={"img": 8, "cls": 4}, ema_momentum=0.99, temperature=0.07)
        step(m, 2, loss=1.0, branch_samples={"img": 8, "txt": 4}, secs=2.0,
             parts={"loss": 1.0, "loss_img": 0.5, "target_std": 0.3, "acc": 0.9}, flops=5e11)
        m.on_skipped_step()
        m.on_overflow_step()
        m.on_overflow_step()
        m.on_checkpoint(3.0, ok=True)
        m.on_checkpoint(1.0, ok=False)
        s = scrape(m)

    lab = {"rank": "3", "run_id": RUN}
    assert value(s, "m3i_train_info", **lab, version="0.1.0", world_size="4", model="vit_tiny") == 1
    assert value(s, "m3i_train_loss", **lab, part="loss") == 1.0
    assert value(s, "m3i_train_loss", **lab, part="loss_img") == 0.5
    assert value(s, "m3i_train_loss", **lab, part="loss_cls") == 0.5  # from step 1, not in step 2's parts
    assert value(s, "m3i_train_lr", **lab) == 1e-3
    assert value(s, "m3i_train_ema_momentum", **lab) == 0.99
    assert value(s, "m3i_train_temperature", **lab) == 0.07
    assert value(s, "m3i_train_target_std", **lab) == 0.3
    assert value(s, "m3i_train_steps_total", **lab) == 2
    assert value(s, "m3i_train_samples_total", **lab) == 16
    assert value(s, "m3i_train_skipped_steps_total", **lab) == 1
    assert value(s, "m3i_train_samples_per_second", **lab) == 4.0  # 8 samples in 2 s
    assert value(s, "m3i_train_overflow_steps_total", **lab) == 2
    assert value(s, "m3i_train_model_flops_per_second", **lab) == 2.5e11  # 5e11 FLOPs in 2 s
    assert value(s, "m3i_train_mfu_ratio", **lab) == 0.25  # of a 1e12 FLOP/s peak
    assert value(s, "m3i_train_step_seconds_count", **lab) == 2
    assert value(s, "m3i_train_step_seconds_sum", **lab) == 2.5
    assert value(s, "m3i_train_step_seconds_bucket", **lab, le="0.5") == 1
    assert value(s, "m3i_train_data_wait_seconds_count", **lab) == 2
    assert value(s, "m3i_train_checkpoint_seconds_sum", **lab) == 4.0
    assert value(s, "m3i_train_checkpoint_failures_total", **lab) == 1
    assert value(s, "m3i_train_branch_samples_total", **lab, branch="img") == 16
    assert value(s, "m3i_train_branch_samples_total", **lab, branch="cls") == 4
    assert value(s, "m3i_train_branch_samples_total", **lab, branch="txt") == 4
    assert value(s, "m3i_train_step", **lab) == 2
    assert abs(value(s, "m3i_train_last_step_timestamp_seconds", **lab) - time.time()) < 30
    assert ("m3i_train_loss", frozenset({**lab, "part": "acc"}.items())) not in s

    # Every series carries rank and run_id, and every exported name is declared.
    for name, labels in s:
        if name.startswith("m3i_"):
            assert {"rank", "run_id"} <= dict(labels).keys(), name
            metric_of(name)
    exported = {metric_of(name) for name, _ in s if name.startswith("m3i_")}
    never_set_here = {SUMMARY_METRIC, "m3i_train_gpu_memory_bytes"}  # pushed only; CUDA only
    assert exported == set(METRIC_NAMES) - never_set_here


def test_metric_names_follow_conventions():
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert name.startswith("m3i_train_"), name
        assert not name.endswith(("_milliseconds", "_ms", "_mb", "_gb")), name


def test_interval_steps_sets_gauges_on_cadence_only():
    with build_metrics(local_cfg(interval_steps=10), rank=0, local_rank=0, run_id=RUN) as m:
        step(m, 10, loss=5.0, samples=10, secs=1.0)
        for s in range(11, 20):
            step(m, s, loss=1.0, samples=10, secs=1.0, parts={"loss": object()})  # never converted
        assert not m.should_record(19) and m.should_record(20)
        s = scrape(m)
        lab = {"rank": "0", "run_id": RUN}
        assert value(s, "m3i_train_loss", **lab, part="loss") == 5.0
        assert value(s, "m3i_train_steps_total", **lab) == 10
        assert value(s, "m3i_train_step", **lab) == 19
        step(m, 20, loss=2.0, samples=10, secs=1.0)
        s = scrape(m)
        assert value(s, "m3i_train_loss", **lab, part="loss") == 2.0
        assert value(s, "m3i_train_samples_per_second", **lab) == 10.0  # 100 samples over steps 11..20


def test_data_stats_are_cumulative():
    with build_metrics(local_cfg(), rank=0, local_rank=0, run_id=RUN) as m:
        lab = {"rank": "0", "run_id": RUN}
        s = scrape(m)
        assert value(s, "m3i_train_data_shards_failed_total", **lab) == 0  # present before any failure
        m.on_data_stats({"shards_failed": 1, "samples_failed": 3, "samples_padded": 0, "other": 7})
        m.on_data_stats({"shards_failed": 2, "samples_failed": 3, "samples_padded": 2})
        m.on_data_stats({"shards_failed": 2, "samples_failed": 10, "samples_padded": 2})
        s = scrape(m)
        assert value(s, "m3i_train_data_shards_failed_total", **lab) == 2
        assert value(s, "m3i_train_data_samples_failed_total", **lab) == 10
        assert value(s, "m3i_train_data_samples_padded_total", **lab) == 2
        # A new loader starts counting from 0 again: its totals are all new.
        m.on_data_stats({"shards_failed": 1, "samples_failed": 0})
        s = scrape(m)
        assert value(s, "m3i_train_data_shards_failed_total", **lab) == 3
        assert value(s, "m3i_train_data_samples_failed_total", **lab) == 10


def test_instances_coexist_on_separate_ports_and_registries():
    base = free_port_pair()
    cfg = MetricsConfig(host="127.0.0.1", port=base)
    with build_metrics(cfg, rank=4, local_rank=0, run_id=RUN) as a, build_metrics(
        cfg, rank=5, local_rank=1, run_id=RUN
    ) as b:
        assert (a.port, b.port) == (base, base + 1)
        step(a, 1)
        step(b, 1)
        step(b, 2)
        sa, sb = scrape(a), scrape(b)
    assert value(sa, "m3i_train_steps_total", rank="4", run_id=RUN) == 1
    assert value(sb, "m3i_train_steps_total", rank="5", run_id=RUN) == 2
    assert not any(dict(labels).get("rank") == "5" for _, labels in sa)


def test_port_zero_disables_the_endpoint():
    m = build_metrics(MetricsConfig(port=0), rank=0, local_rank=3, run_id=RUN)
    assert m.port is None and m.url is None
    step(m, 1)
    assert b'm3i_train_steps_total{rank="0",run_id="run-test"} 1.0' in generate_latest(m.registry)
    m.close()


def test_busy_port_raises_naming_it_and_close_frees_it():
    m = build_metrics(local_cfg(), rank=0, local_rank=0, run_id=RUN)
    port = m.port
    with pytest.raises(OSError, match=rf"127\.0\.0\.1:{port}.*metrics\.port={port}"):
        build_metrics(MetricsConfig(host="127.0.0.1", port=port), rank=1, local_rank=0, run_id=RUN)
    m.close()
    m.close()
    assert_port_free(port)
    step(m, 1)  # recording still works after close


def test_push_to_unreachable_gateway_only_warns(caplog):
    dead = f"http://127.0.0.1:{free_port()}"
    m = build_metrics(MetricsConfig(port=0, pushgateway=dead), rank=0, local_rank=0, run_id=RUN)
    with caplog.at_level(logging.WARNING, logger="m3i.metrics"):
        assert m.push_summary({"final_loss": 1.0}, timeout=2) is False
    assert "pushing the summary" in caplog.text and dead in caplog.text
    assert build_metrics(MetricsConfig(port=0), rank=0, local_rank=0, run_id=RUN).push_summary({"x": 1}) is False


# -- forked DataLoader workers ------------------------------------------------------------------


class _PidDataset:
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> int:
        time.sleep(0.01)
        return os.getpid()


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:"):
            out.add(link)
    return out


def test_forked_dataloader_workers_serve_nothing():
    import torch.utils.data

    m = build_metrics(local_cfg(), rank=0, local_rank=0, run_id=RUN)
    port = m.port
    listener = f"socket:[{os.fstat(m.endpoint._server.socket.fileno()).st_ino}]"
    loader = torch.utils.data.DataLoader(
        _PidDataset(), batch_size=2, num_workers=2, multiprocessing_context="fork", persistent_workers=True
    )
    try:
        worker_pids: set[int] = set()
        for i, batch in enumerate(loader):
            worker_pids.update(int(p) for p in batch)
            step(m, i + 1)
            assert value(scrape(m), "m3i_train_steps_total", rank="0", run_id=RUN) == i + 1
        assert len(worker_pids) == 2 and os.getpid() not in worker_pids
        # The workers are alive (persistent) and hold no copy of the listening socket.
        assert listener in _socket_inodes(os.getpid())
        for pid in worker_pids:
            assert listener not in _socket_inodes(pid), f"worker {pid} inherited the metrics socket"
        # So closing the endpoint frees the port even while the workers live.
        m.close()
        assert_port_free(port)
        assert sum(1 for _ in loader) == 8  # the workers still work
    finally:
        m.close()
        loader._iterator = None  # shuts the persistent workers down now


# -- real Prometheus and Pushgateway ------------------------------------------------------------


def _rank_main(base_port: int, rank: int, steps: int, ready, stop) -> None:
    """One rank of a two-rank run, in its own spawned process, until the parent says stop."""
    cfg = MetricsConfig(host="127.0.0.1", port=base_port)
    with build_metrics(cfg, rank=rank, local_rank=rank, run_id="run-2ranks", world_size=2, model="vit_tiny") as m:
        for s in range(1, steps + 1):
            m.on_step(StepReport(step=s, steps=steps, parts={"loss": 2.0 / s, "loss_img": 1.0 + rank}, lr=1e-3, samples=4,
                                 seconds=0.1, data_wait_seconds=0.01, time=time.time()))
        ready.put((rank, m.port))
        stop.wait(60)


@pytest.mark.prometheus
def test_prometheus_scrapes_two_rank_processes(prometheus_factory):
    base = free_port_pair()
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    steps = {0: 3, 1: 5}
    procs = [ctx.Process(target=_rank_main, args=(base, r, n, ready, stop), daemon=True) for r, n in steps.items()]
    for p in procs:
        p.start()
    try:
        prom = prometheus_factory([f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"])
        assert sorted(ready.get(timeout=30) for _ in procs) == [(0, base), (1, base + 1)]

        series = prom.wait_for_series('m3i_train_steps_total{run_id="run-2ranks"}', 2, timeout=30)
        assert {s["metric"]["rank"]: float(s["value"][1]) for s in series} == {"0": 3.0, "1": 5.0}
        assert {s["metric"]["instance"] for s in series} == {f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"}

        loss_img = prom.wait_for_series('m3i_train_loss{part="loss_img"}', 2, timeout=10)
        assert {s["metric"]["rank"]: float(s["value"][1]) for s in loss_img} == {"0": 1.0, "1": 2.0}
        total = prom.query('sum by (run_id) (m3i_train_samples_total{run_id="run-2ranks"})')
        assert float(total[0]["value"][1]) == 4 * (3 + 5)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]


@pytest.mark.prometheus
def test_push_summary_reaches_the_pushgateway(pushgateway):
    cfg = MetricsConfig(port=0, pushgateway=pushgateway.url, job="m3i-train")
    for rank in (0, 1):
        m = build_metrics(cfg, rank=rank, local_rank=rank, run_id="run/push")
        assert m.push_summary({"final_loss": 1.25 + rank, "steps": 100, "wall_seconds": 12.5})

    with urllib.request.urlopen(f"{pushgateway.url}/metrics", timeout=5) as r:
        pushed = parse_metrics(r.read().decode())
    got = {
        (labels["rank"], labels["name"]): v
        for (name, labelset), v in pushed.items()
        if name == SUMMARY_METRIC and (labels := dict(labelset))["job"] == "m3i-train"
        and labels["run_id"] == "run/push"
    }
    assert got == {
        ("0", "final_loss"): 1.25, ("0", "steps"): 100, ("0", "wall_seconds"): 12.5,
        ("1", "final_loss"): 2.25, ("1", "steps"): 100, ("1", "wall_seconds"): 12.5,
    }
