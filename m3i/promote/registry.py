"""The promotion log mirrored in a Kubeflow Model Registry (optional: ``promote.registry.url``).

Every gated candidate becomes a model version (name: the export version; artifact: the export
folder) whose custom properties carry its scores, the gate's decision and reasons, the eval data set,
the code revision and the runs. The registry has no alias, so the champion is mirrored as custom
properties of the registered model (``m3i_champion``, ...). The object store stays the truth: a
failed mirror is a warning, and the next event mirrors the champion again.

Uses the ``model-registry`` client (``pip install 'm3i[registry]'``), imported only when the mirror
is on. Its REST calls, checked against the upstream OpenAPI spec in ``tests/data/model-registry``:
find / create / update registered models and model versions, upsert a version's model artifact.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Coroutine, TypeVar
from urllib.parse import urlsplit

from m3i.config.promote import RegistryConfig
from m3i.export.exporter import FORMAT, FORMAT_VERSION
from m3i.promote.records import ChampionRecord, Event

__all__ = ["RegistryMirror", "champion_properties", "mirror_event", "version_properties"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    # The client's default runner patches the process's event loop (nest_asyncio2); a fresh loop per call does not.
    return asyncio.run(coro)


def _key(name: str) -> str:
    return "m3i_" + name.replace(".", "_")


def version_properties(event: Event) -> dict[str, str | float | int]:
    """The custom properties of the candidate's model version: scores, decision, data set, code, runs."""
    props: dict[str, str | float | int] = {_key(f"score.{k}"): float(v) for k, v in event.scores.items()}
    props.update({_key(f"random_init.{k}"): float(v) for k, v in event.random_init.items()})
    if event.decision is not None:
        props[_key("decision")] = str(event.decision["outcome"])
        props[_key("reasons")] = "\n".join(event.decision["reasons"])
        props[_key("champion_before")] = event.champion_before.version if event.champion_before else ""
    if event.eval_set is not None:
        props[_key("eval_shards")] = event.eval_set.shards
        props[_key("eval_fingerprint")] = event.eval_set.fingerprint
    props.update({
        _key("seq"): event.seq, _key("weights_sha256"): event.candidate.sha256, _key("step"): event.candidate.step or 0,
        _key("code_revision"): event.candidate.code_revision, _key("run_id"): event.run.run_id,
        _key("kfp_run_id"): event.run.kfp_run_id, _key("gated_at"): event.at,
    })
    return props


def champion_properties(record: ChampionRecord) -> dict[str, str | int]:
    """The registered model's mirror of its champion."""
    return {
        _key("champion"): record.ref.version, _key("champion_uri"): record.ref.uri, _key("champion_seq"): record.seq,
        _key("champion_action"): record.action, _key("champion_since"): record.at, _key("champion_reason"): record.reason,
        _key("champion_previous"): record.previous.version if record.previous else "",
    }


class RegistryMirror:
    """A Model Registry client for the mirror.

    Raises:
        ValueError: The ``model-registry`` client is not installed.
        Exception: Whatever the client raises when the server cannot be reached.
    """

    def __init__(self, cfg: RegistryConfig) -> None:
        try:
            from model_registry import ModelRegistry
        except ImportError:
            raise ValueError(
                "promote.registry.url is set but the Model Registry client is not installed; pip install 'm3i[registry]'"
            ) from None
        parts = urlsplit(cfg.url)
        secure = parts.scheme == "https"
        self.client = ModelRegistry(
            f"{parts.scheme}://{parts.hostname}", parts.port or (443 if secure else 8080), author=cfg.author,
            is_secure=secure, user_token=os.environ.get(cfg.token_env) or None, async_runner=_run,
        )

    def record(self, event: Event) -> None:
        """Register the event's candidate as a model version (or update its properties when it is there)."""
        c = event.candidate
        props = version_properties(event)
        mv = self.client.get_model_version(c.name, c.version) if self.client.get_registered_model(c.name) else None
        if mv is None:
            self.client.register_model(
                c.name, c.uri, model_format_name=FORMAT, model_format_version=str(FORMAT_VERSION), version=c.version,
                version_description=f"m3i export of step {c.step}", metadata=props,
            )
        else:
            mv.custom_properties = {**(mv.custom_properties or {}), **props}
            self.client.update(mv)

    def mirror_champion(self, record: ChampionRecord) -> None:
        """Set the registered model's champion properties."""
        rm = self.client.get_registered_model(record.ref.name)
        if rm is None:
            raise ValueError(f"registered model {record.ref.name!r} is not in the registry")
        rm.custom_properties = {**(rm.custom_properties or {}), **champion_properties(record)}
        self.client.update(rm)


def mirror_event(cfg: RegistryConfig, event: Event) -> bool:
    """Mirror ``event`` (and a new champion) in the registry; a failure is a warning and returns ``False``."""
    try:
        mirror = RegistryMirror(cfg)
        mirror.record(event)
        if event.champion is not None:
            mirror.mirror_champion(event.champion)
    except Exception as e:  # noqa: BLE001 - the log in object storage is the truth; the mirror catches up next time
        log.warning("mirroring event #%d of %s in the Model Registry at %s failed: %s", event.seq, event.candidate.name, cfg.url, e)
        return False
    return True
