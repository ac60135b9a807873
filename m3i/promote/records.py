"""What the promotion state is made of: references to exported versions, the champion record, log events.

All three are plain JSON in object storage (:mod:`m3i.promote.ledger` says where). A version is
referred to by its export folder and pinned by two hashes, so a pointer that outlives its
version, or a version whose files changed, is noticed (:func:`version_problem`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from m3i.artifacts.evaluation import EvalSet
from m3i.artifacts.export import MANIFEST, WEIGHTS, listed_files, read_export_manifest
from m3i.storage import StorageError, join_uri, open_store

__all__ = [
    "ChampionRecord", "Event", "RunInfo", "VERSION_PATTERN", "VersionRef", "VersionRow", "check_name", "read_version",
    "version_problem",
]

VERSION_PATTERN = re.compile(r"^v\d{8}-[0-9a-f]{8}$")
"""An export's version folder: ``v<step:08d>-<first 8 hex digits of the weights' sha256>``."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CHAMPION_FORMAT = "m3i-champion"
EVENT_FORMAT = "m3i-promotion"
FORMAT_VERSION = 1


def check_name(name: str) -> str:
    """A model name as ``export.name`` allows it; raises ``ValueError`` otherwise."""
    if not _NAME.match(name or ""):
        raise ValueError(f"model name {name!r} is not allowed; use 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit")
    return name


@dataclass(frozen=True)
class RunInfo:
    """Which run asked for a promotion or rollback."""

    run_id: str = ""
    """The m3i training run of the candidate (empty: the one its ``export.json`` records)."""
    kfp_run_id: str = ""
    """The Kubeflow Pipelines run, when the step runs in one."""

    def to_json(self) -> dict[str, str]:
        return {"run_id": self.run_id, "kfp_run_id": self.kfp_run_id}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any] | None) -> "RunInfo":
        raw = raw or {}
        return cls(str(raw.get("run_id", "")), str(raw.get("kfp_run_id", "")))


@dataclass(frozen=True)
class VersionRef:
    """One exported version, pinned by hashes."""

    name: str
    version: str
    uri: str
    """The version folder, ``<out>/<name>/<version>``."""
    sha256: str
    """sha256 of ``model.safetensors`` as ``export.json`` lists it."""
    manifest_sha256: str
    """sha256 of the ``export.json`` bytes: the whole listing, every file's sha256."""
    step: int | None = None
    run_id: str = ""
    code_revision: str = ""
    """The code that trained it (``export.json``'s ``code_revision_train``, else the export's)."""
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "VersionRef":
        step = raw.get("step")
        return cls(
            str(raw["name"]), str(raw["version"]), str(raw["uri"]), str(raw["sha256"]), str(raw["manifest_sha256"]),
            int(step) if isinstance(step, int) else None, str(raw.get("run_id", "")), str(raw.get("code_revision", "")),
            str(raw.get("created", "")),
        )


def read_version(models_uri: str, name: str, version: str) -> VersionRef:
    """The :class:`VersionRef` of ``<models_uri>/<name>/<version>`` from its ``export.json``.

    Raises:
        ValueError: When the version is malformed or does not exist (naming the versions that do), or
            its ``export.json`` is not an export manifest that lists the weights.
    """
    check_name(name)
    if not VERSION_PATTERN.match(version or ""):
        raise ValueError(f"version {version!r} is not an export version; expected v<step:08d>-<sha8>, e.g. v00000300-1a2b3c4d")
    uri = join_uri(models_uri, name, version)
    store = open_store(uri)
    if not store.exists(MANIFEST):
        have = sorted({o.key.split("/")[0] for o in open_store(join_uri(models_uri, name)).list("") if o.key.endswith("/" + MANIFEST)})
        raise ValueError(f"model {name!r} has no version {version!r} under {models_uri} (no {MANIFEST}); it has {have}")
    doc, raw = read_export_manifest(store)
    weights = listed_files(doc).get(WEIGHTS)
    if not weights or not weights.get("sha256"):
        raise ValueError(f"{store.url(MANIFEST)} lists no {WEIGHTS} with a sha256")
    if doc.get("name") != name or doc.get("version") != version:
        raise ValueError(
            f"{store.url(MANIFEST)} describes {doc.get('name')!r} {doc.get('version')!r}, not {name!r} {version!r}: "
            "the folder is not where `m3i export` put it"
        )
    return VersionRef(
        name, version, store.uri, str(weights["sha256"]), hashlib.sha256(raw).hexdigest(),
        doc.get("step") if isinstance(doc.get("step"), int) else None, str(doc.get("run_id") or ""),
        str(doc.get("code_revision_train") or doc.get("code_revision") or ""), str(doc.get("created") or ""),
    )


def version_problem(ref: VersionRef, *, full: bool = True) -> str | None:
    """What is wrong with a referenced version now, or ``None`` when it is intact.

    Checks that ``export.json`` is there and unchanged, that every file it lists is there with its
    size, and (``full``) that the weights' sha256 is still the recorded one (a local file is read in
    full; an S3 object is taken at the sha256 its metadata records).
    """
    store = open_store(ref.uri)
    try:
        if not store.exists(MANIFEST):
            return f"it was deleted ({store.url(MANIFEST)} does not exist)"
        doc, raw = read_export_manifest(store)
        sha = hashlib.sha256(raw).hexdigest()
        if sha != ref.manifest_sha256:
            return f"{store.url(MANIFEST)} changed since it was recorded (sha256 {sha[:12]}..., recorded {ref.manifest_sha256[:12]}...)"
        sizes = {o.key: o.size for o in store.list("")}
        for key, entry in sorted(listed_files(doc).items()):
            if key not in sizes:
                return f"{store.url(key)} is missing"
            if sizes[key] != entry.get("bytes"):
                return f"{store.url(key)} has {sizes[key]} bytes, {MANIFEST} lists {entry.get('bytes')}"
        if full:
            sha = store.sha256(WEIGHTS)
            if sha != ref.sha256:
                return f"{store.url(WEIGHTS)} is damaged: sha256 {sha[:12]}..., recorded {ref.sha256[:12]}..."
    except (StorageError, ValueError) as e:
        return f"it cannot be read: {e}"
    return None


@dataclass(frozen=True)
class ChampionRecord:
    """The champion of a model: what ``champion.json`` holds, and what a promote or rollback event carries."""

    ref: VersionRef
    seq: int
    """The log event that made it champion."""
    action: str
    """``promote`` or ``rollback``."""
    at: str
    """When, ISO 8601 UTC."""
    unix: float
    scores: dict[str, float] = field(default_factory=dict)
    """Its scores on :attr:`eval_set`; empty after a rollback to a version never scored."""
    random_init: dict[str, float] = field(default_factory=dict)
    eval_set: EvalSet | None = None
    run: RunInfo = field(default_factory=RunInfo)
    reason: str = ""
    """Why (a rollback's reason, or the gate's first reason)."""
    previous: VersionRef | None = None
    """The champion it replaced."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CHAMPION_FORMAT, "format_version": FORMAT_VERSION, "name": self.ref.name, "version": self.ref.version,
            "uri": self.ref.uri, "sha256": self.ref.sha256, "ref": self.ref.to_json(), "seq": self.seq, "action": self.action,
            "at": self.at, "unix": self.unix, "scores": dict(self.scores), "random_init": dict(self.random_init),
            "eval_set": self.eval_set.to_json() if self.eval_set else None, "run": self.run.to_json(), "reason": self.reason,
            "previous": self.previous.to_json() if self.previous else None,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "ChampionRecord":
        if raw.get("format") != CHAMPION_FORMAT or raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a champion record of format {CHAMPION_FORMAT!r} version {FORMAT_VERSION}")
        return cls(
            VersionRef.from_json(raw["ref"]), int(raw["seq"]), str(raw["action"]), str(raw["at"]), float(raw["unix"]),
            {k: float(v) for k, v in (raw.get("scores") or {}).items()}, {k: float(v) for k, v in (raw.get("random_init") or {}).items()},
            EvalSet.from_json(raw["eval_set"]) if raw.get("eval_set") else None, RunInfo.from_json(raw.get("run")),
            str(raw.get("reason", "")), VersionRef.from_json(raw["previous"]) if raw.get("previous") else None,
        )


@dataclass(frozen=True)
class Event:
    """One entry of the promotion log: a gated candidate (promoted or rejected) or a rollback."""

    seq: int
    id: str
    """Random; tells this writer's entry from another's with the same ``seq``."""
    action: str
    """``promote``, ``reject`` or ``rollback``."""
    at: str
    unix: float
    candidate: VersionRef
    """The version gated, or rolled back to."""
    scores: dict[str, float] = field(default_factory=dict)
    random_init: dict[str, float] = field(default_factory=dict)
    eval_set: EvalSet | None = None
    champion_before: VersionRef | None = None
    champion_before_scores: dict[str, float] | None = None
    """The previous champion's scores on the candidate's eval set, as the gate read them."""
    reevaluated: str = ""
    """Where the previous champion was re-evaluated on the candidate's eval set; empty when not needed."""
    decision: dict[str, Any] | None = None
    """``{"outcome", "reasons", "checks"}`` of the gate; ``None`` for a rollback."""
    policy: dict[str, Any] | None = None
    run: RunInfo = field(default_factory=RunInfo)
    reason: str = ""
    champion: ChampionRecord | None = None
    """The new champion (promote, rollback); ``None`` for a rejection."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": EVENT_FORMAT, "format_version": FORMAT_VERSION, "seq": self.seq, "id": self.id, "action": self.action,
            "at": self.at, "unix": self.unix, "name": self.candidate.name, "candidate": self.candidate.to_json(),
            "scores": dict(self.scores), "random_init": dict(self.random_init),
            "eval_set": self.eval_set.to_json() if self.eval_set else None,
            "champion_before": self.champion_before.to_json() if self.champion_before else None,
            "champion_before_scores": self.champion_before_scores, "reevaluated": self.reevaluated,
            "decision": self.decision, "policy": self.policy, "run": self.run.to_json(), "reason": self.reason,
            "champion": self.champion.to_json() if self.champion else None,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "Event":
        if raw.get("format") != EVENT_FORMAT or raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a promotion event of format {EVENT_FORMAT!r} version {FORMAT_VERSION}")
        return cls(
            int(raw["seq"]), str(raw["id"]), str(raw["action"]), str(raw["at"]), float(raw["unix"]), VersionRef.from_json(raw["candidate"]),
            {k: float(v) for k, v in (raw.get("scores") or {}).items()}, {k: float(v) for k, v in (raw.get("random_init") or {}).items()},
            EvalSet.from_json(raw["eval_set"]) if raw.get("eval_set") else None,
            VersionRef.from_json(raw["champion_before"]) if raw.get("champion_before") else None,
            raw.get("champion_before_scores"), str(raw.get("reevaluated", "")), raw.get("decision"), raw.get("policy"),
            RunInfo.from_json(raw.get("run")), str(raw.get("reason", "")),
            ChampionRecord.from_json(raw["champion"]) if raw.get("champion") else None,
        )


@dataclass(frozen=True)
class VersionRow:
    """One exported version of a model, with what the promotion log knows of it."""

    ref: VersionRef
    champion: bool
    scores: dict[str, float]
    """Its latest recorded scores (gated, rolled back to, or from its export's ``evaluation``); empty when none."""
    random_init: dict[str, float]
    eval_set: EvalSet | None
    last_action: str
    """The latest event about it as the candidate: ``promote``, ``reject``, ``rollback``; empty when never gated."""
    last_seq: int
