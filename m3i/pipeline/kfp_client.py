"""Talk to a Kubeflow Pipelines endpoint: upload a pipeline version, start a run, schedule retraining.

    client = connect()                                   # KFP_HOST, KFP_NAMESPACE, KFP_TOKEN, ...
    upload(client)                                       # new version of m3i-pretrain (idempotent)
    start_run(client, {"steps": 1000}, experiment="m3i")
    schedule(client, "0 0 3 * * 0", name="m3i-pretrain-weekly", params={...})

Endpoint and auth come from the environment only, never from arguments that land in
logs or shell history:

    KFP_HOST          the API endpoint, e.g. http://ml-pipeline.kubeflow.svc.cluster.local:8888
                      or https://kubeflow.example.com/pipeline (required)
    KFP_NAMESPACE     the profile namespace of a multi-user install (optional)
    KFP_TOKEN         a bearer token (optional). Without it kfp uses the projected
                      ServiceAccount token at KF_PIPELINES_SA_TOKEN_PATH
                      (/var/run/secrets/kubeflow/pipelines/token) when there is one.
    KFP_CA_BUNDLE     CA file of a private TLS endpoint (optional)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from m3i import __version__
from m3i.pipeline import PIPELINE_NAME
from m3i.pipeline.build import packaged_pipeline, pipeline_sha256, version_name

__all__ = ["check_params", "pipeline_parameters", "connect", "upload", "latest_version", "start_run", "schedule", "normalize_cron", "parse_params", "parse_params_json", "Uploaded"]

log = logging.getLogger(__name__)


def connect(env: Mapping[str, str] | None = None, factory: Callable[..., Any] | None = None) -> Any:
    """A ``kfp.Client`` for the endpoint the environment names.

    Raises:
        ValueError: ``KFP_HOST`` is unset, or ``KFP_CA_BUNDLE`` names no file.
    """
    env = os.environ if env is None else env
    host = env.get("KFP_HOST", "").strip()
    if not host:
        raise ValueError("KFP_HOST is not set; export the KFP API endpoint, e.g. KFP_HOST=http://ml-pipeline.kubeflow:8888")
    kw: dict[str, Any] = {"host": host}
    if env.get("KFP_NAMESPACE"):
        kw["namespace"] = env["KFP_NAMESPACE"]
    if env.get("KFP_TOKEN"):
        kw["existing_token"] = env["KFP_TOKEN"]
    ca = env.get("KFP_CA_BUNDLE", "")
    if ca:
        if not Path(ca).is_file():
            raise ValueError(f"KFP_CA_BUNDLE={ca!r} is not a file")
        kw["ssl_ca_cert"] = ca
    if factory is None:
        import kfp

        factory = kfp.Client
    return factory(**kw)


def _name_filter(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"key": key, "operation": "EQUALS", "string_value": value}]})


@dataclass(frozen=True)
class Uploaded:
    pipeline_id: str
    version_id: str
    version_name: str
    created: bool
    """False when a version of that name already existed (nothing was uploaded)."""


def upload(client: Any, package: str | os.PathLike | None = None, version: str | None = None) -> Uploaded:
    """Upload ``package`` as version ``version`` of ``m3i-pretrain``, creating the pipeline if needed.

    Idempotent: a version of the same name is left as it is (names carry the code
    revision, so the same name means the same pipeline).
    """
    path = Path(package) if package else packaged_pipeline()
    version = version or version_name(path)
    sha = pipeline_sha256(path)
    ns = getattr(client, "_context_setting", {}).get("namespace") or None
    pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
    if pipeline_id is None:
        # The first upload creates the pipeline (with a first version named like it); ours follows.
        created = client.upload_pipeline(
            str(path), pipeline_name=PIPELINE_NAME, description="M3I all-in-one pre-training: shard, train, export, evaluate",
            namespace=ns,
        )
        pipeline_id = created.pipeline_id
        log.info("created pipeline %s (%s)", PIPELINE_NAME, pipeline_id)
    found = client.list_pipeline_versions(pipeline_id, page_size=1, filter=_name_filter("display_name", version))
    existing = list(getattr(found, "pipeline_versions", None) or [])
    if existing:
        return Uploaded(pipeline_id, existing[0].pipeline_version_id, version, False)
    v = client.upload_pipeline_version(
        str(path), pipeline_version_name=version, pipeline_id=pipeline_id,
        description=f"m3i {__version__}, pipeline sha256 {sha}",
    )
    return Uploaded(pipeline_id, v.pipeline_version_id, version, True)


def latest_version(client: Any) -> tuple[str, str, str]:
    """``(pipeline_id, version_id, version_name)`` of the newest version of ``m3i-pretrain``.

    Raises:
        LookupError: The pipeline or any version of it is missing (run ``m3i pipeline upload``).
    """
    pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
    if pipeline_id is None:
        raise LookupError(f"KFP has no pipeline {PIPELINE_NAME!r}; run `m3i pipeline upload` first")
    resp = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
    versions = list(getattr(resp, "pipeline_versions", None) or [])
    if not versions:
        raise LookupError(f"pipeline {PIPELINE_NAME!r} ({pipeline_id}) has no versions; run `m3i pipeline upload`")
    return pipeline_id, versions[0].pipeline_version_id, versions[0].display_name


def _experiment_id(client: Any, experiment: str) -> str:
    ns = getattr(client, "_context_setting", {}).get("namespace") or None
    return client.create_experiment(experiment, namespace=ns).experiment_id  # returns the existing one if any


def start_run(
    client: Any,
    params: Mapping[str, Any],
    *,
    experiment: str = "m3i",
    run_name: str | None = None,
    service_account: str | None = None,
) -> dict[str, str]:
    """Start one run of the newest version; returns its ids and version name."""
    pipeline_id, version_id, vname = latest_version(client)
    exp = _experiment_id(client, experiment)
    run = client.run_pipeline(
        experiment_id=exp,
        job_name=run_name or f"{PIPELINE_NAME} {vname}",
        params=dict(params),
        pipeline_id=pipeline_id,
        version_id=version_id,
        service_account=service_account,
    )
    return {"run_id": run.run_id, "pipeline_id": pipeline_id, "version_id": version_id, "version": vname, "experiment_id": exp}


def normalize_cron(expr: str) -> str:
    """KFP's 6-field cron (seconds first); a 5-field crontab line gets ``0`` seconds; ``@daily``-style descriptors pass.

    Raises:
        ValueError: Not 5 or 6 space-separated fields.
    """
    if expr.strip().startswith("@"):  # @hourly, @daily, @weekly, @every 1h: KFP's cron takes them as they are
        return expr.strip()
    fields = expr.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ValueError(f"cron={expr!r} needs 5 (crontab) or 6 (KFP, seconds first) fields; it has {len(expr.split())}")
    return " ".join(fields)


def schedule(
    client: Any,
    cron: str,
    *,
    name: str = f"{PIPELINE_NAME}-scheduled",
    experiment: str = "m3i",
    params: Mapping[str, Any] | None = None,
    service_account: str | None = None,
    max_concurrency: int = 1,
    enabled: bool = True,
) -> dict[str, Any]:
    """Create or replace the recurring run ``name``: every trigger runs the newest pipeline version.

    The recurring run references the pipeline without a version id, which KFP (2.5+)
    resolves to the latest version at each trigger; so uploading a new version is all a
    release needs. KFP cannot update a recurring run in place: the new one is created, then
    any older one of the same name in the experiment is deleted.
    """
    import kfp_server_api

    if max_concurrency < 1:
        raise ValueError(f"max_concurrency={max_concurrency} must be >= 1")
    cron6 = normalize_cron(cron)
    pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
    if pipeline_id is None:
        raise LookupError(f"KFP has no pipeline {PIPELINE_NAME!r}; run `m3i pipeline upload` first")
    exp = _experiment_id(client, experiment)
    old = client.list_recurring_runs(experiment_id=exp, page_size=100, filter=_name_filter("display_name", name))
    previous = [rr.recurring_run_id for rr in getattr(old, "recurring_runs", None) or []]
    body = kfp_server_api.V2beta1RecurringRun(
        display_name=name,
        description=f"Scheduled {PIPELINE_NAME}; always the latest pipeline version",
        experiment_id=exp,
        mode=kfp_server_api.RecurringRunMode.ENABLE if enabled else kfp_server_api.RecurringRunMode.DISABLE,
        pipeline_version_reference=kfp_server_api.V2beta1PipelineVersionReference(pipeline_id=pipeline_id),
        runtime_config=kfp_server_api.V2beta1RuntimeConfig(parameters=dict(params or {})),
        trigger=kfp_server_api.V2beta1Trigger(cron_schedule=kfp_server_api.V2beta1CronSchedule(cron=cron6)),
        max_concurrency=str(max_concurrency),
        no_catchup=True,
        service_account=service_account,
    )
    # Create before deleting: a refused create (bad cron, unknown service account) keeps the old schedule.
    created = client.recurring_runs.recurring_run_service_create_recurring_run(recurring_run=body)
    for rid in previous:
        client.delete_recurring_run(rid)
    replaced = previous
    return {"recurring_run_id": created.recurring_run_id, "pipeline_id": pipeline_id, "experiment_id": exp, "cron": cron6, "replaced": replaced}


def _parameter_specs(package: str | os.PathLike | None) -> dict[str, Any]:
    """The compiled pipeline's root parameters: name -> {parameterType, defaultValue, ...}."""
    doc = next(yaml.safe_load_all(Path(package or packaged_pipeline()).read_text()))  # then the platform spec
    return doc["root"]["inputDefinitions"]["parameters"]


def pipeline_parameters(package: str | os.PathLike | None = None) -> dict[str, Any]:
    """Parameter name -> default of the compiled pipeline (``None`` for one without a default)."""
    params = _parameter_specs(package)
    out = {}
    for name, spec in params.items():
        default = spec.get("defaultValue")
        out[name] = int(default) if spec.get("parameterType") == "NUMBER_INTEGER" and default is not None else default
    return out


_TYPES: dict[str, tuple[type, ...]] = {
    "STRING": (str,),
    "NUMBER_INTEGER": (int,),
    "NUMBER_DOUBLE": (int, float),
    "BOOLEAN": (bool,),
    "LIST": (list,),
    "STRUCT": (dict,),
}


def check_params(params: Mapping[str, Any], package: str | os.PathLike | None = None) -> dict[str, Any]:
    """The arguments typed as the pipeline declares them.

    A string given for a non-string parameter (``--param steps=10``) is read as JSON; a
    string parameter keeps its text as it is (``--param run_name=2024`` stays ``"2024"``).

    Raises:
        ValueError: An argument the pipeline has no parameter for, or one of the wrong type.
    """
    specs = {k: v["parameterType"] for k, v in _parameter_specs(package).items()}
    unknown = sorted(set(params) - set(specs))
    if unknown:
        raise ValueError(f"pipeline {PIPELINE_NAME} has no parameter {unknown}; its parameters are {sorted(specs)}")
    out = {}
    for name, value in params.items():
        kind = specs[name]
        if isinstance(value, str) and kind != "STRING":
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError(f"pipeline parameter {name}={value!r} is not a {kind.lower()} (give JSON)") from None
        ok = _TYPES.get(kind, (object,))
        if not isinstance(value, ok) or (isinstance(value, bool) and kind in ("NUMBER_INTEGER", "NUMBER_DOUBLE")):
            raise ValueError(f"pipeline parameter {name}={value!r} must be {kind.lower()}; got {type(value).__name__}")
        out[name] = value
    return out


def parse_params_json(text: str | None) -> dict[str, Any]:
    """A JSON object of pipeline arguments (empty text: none).

    Raises:
        ValueError: Not JSON, or not an object.
    """
    if not text or not text.strip():
        return {}
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--params is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"--params must be a JSON object of name: value; got {type(doc).__name__}")
    return doc


def parse_params(items: list[str] | None) -> dict[str, str]:
    """``key=value`` pairs -> ``{key: "value"}``, the text kept; :func:`check_params` types them.

    Raises:
        ValueError: An item without ``=`` or without a key.
    """
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {item!r} must be key=value")
        out[key] = raw
    return out
