"""Which pods a PodMonitor selects and which addresses it scrapes, worked out offline.

    from tests.podmonitor import inline_train_pod, scrape_addresses
    scrape_addresses(monitor, inline_train_pod())   # ["10.0.0.7:9400", ...]

Prometheus' pod discovery gives one target per declared container port, and one target
per container that declares none (``__address__`` = the pod IP, no port). For each
``podMetricsEndpoints`` entry the Prometheus Operator keeps the targets of its ``port``
(by name) or ``portNumber``, if set, then applies its ``relabelings``. This follows both
for the relabel actions the chart and the manifests use (keep, drop, replace).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.k8s_tools import ROOT

__all__ = ["POD_IP", "inline_train_pod", "relabel", "scrape_addresses", "selects"]

POD_IP = "10.0.0.7"
PIPELINE = ROOT / "m3i" / "pipeline" / "m3i-pretrain.yaml"


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels and matchExpressions) selects ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """``labels`` after Prometheus relabel ``configs`` (CRD field names); None when dropped."""
    out = dict(labels)
    for c in configs:
        action = c.get("action", "replace").lower()
        value = c.get("separator", ";").join(out.get(n, "") for n in c.get("sourceLabels", []))
        m = re.fullmatch(c.get("regex", "(.*)"), value)
        if (action == "keep" and not m) or (action == "drop" and m):
            return None
        if action == "replace" and m:
            # Go's Expand: $1 / ${1} / ${name}; an unknown group expands to "".
            new = re.sub(r"\$\{?(\w+)\}?", lambda g: m.group(int(g[1]) if g[1].isdigit() else g[1]) or "",
                         c.get("replacement", "$1"))
            if new:
                out[c["targetLabel"]] = new
            else:
                out.pop(c["targetLabel"], None)
        elif action not in ("keep", "drop", "replace"):
            raise AssertionError(f"this test model of Prometheus relabelling has no action {action!r}: add it before using it")
    return out


def _targets(pod: dict[str, Any], ip: str) -> list[dict[str, str]]:
    """Prometheus' pod-role targets of ``pod`` (a Pod or pod template) at ``ip``."""
    spec = pod["spec"]
    out = []
    for init, c in [(True, c) for c in spec.get("initContainers", [])] + [(False, c) for c in spec["containers"]]:
        base = {
            "__address__": ip,
            "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_container_name": c["name"],
            "__meta_kubernetes_pod_container_init": str(init).lower(),
        }
        if not c.get("ports"):
            out.append(base)
        for p in c.get("ports", []):
            out.append({
                **base,
                "__address__": f"{ip}:{p['containerPort']}",
                "__meta_kubernetes_pod_container_port_name": p.get("name", ""),
                "__meta_kubernetes_pod_container_port_number": str(p["containerPort"]),
            })
    return out


def scrape_addresses(monitor: dict[str, Any], pod: dict[str, Any], ip: str = POD_IP) -> list[str]:
    """Sorted addresses ``monitor`` scrapes on ``pod``, one entry per target (repeats show double scrapes)."""
    spec = monitor["spec"]
    if not selects(spec["selector"], pod["metadata"].get("labels", {})):
        return []
    found = []
    for ep in spec["podMetricsEndpoints"]:
        for t in _targets(pod, ip):
            if "port" in ep and t.get("__meta_kubernetes_pod_container_port_name") != ep["port"]:
                continue
            if "portNumber" in ep and t.get("__meta_kubernetes_pod_container_port_number") != str(ep["portNumber"]):
                continue
            t = relabel(t, ep.get("relabelings", []))
            if t is not None and t["__address__"]:
                found.append(t["__address__"])
    return sorted(found)


def inline_train_pod() -> dict[str, Any]:
    """The KFP pod of the compiled pipeline's in-pod train step (``exec-train``).

    Its labels are the compiled ``podMetadata``. Its containers are those of an Argo
    Workflows executor pod running a KFP v2 step: init containers ``init`` and
    ``kfp-launcher``, containers ``wait`` and ``main`` (the step's command); none declares
    a port.
    """
    platform = list(yaml.safe_load_all(PIPELINE.read_text()))[1]
    executor = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    return {
        "metadata": {"labels": dict(executor["podMetadata"]["labels"])},
        "spec": {
            "initContainers": [{"name": "init"}, {"name": "kfp-launcher"}],
            "containers": [{"name": "wait"}, {"name": "main"}],
        },
    }
