"""The optional Kubeflow Model Registry mirror: the ``model-registry`` client against a loopback server
whose every request and response is checked against the upstream OpenAPI spec (tests/data/model-registry)."""

from __future__ import annotations

import pytest

from m3i.promote import rollback
from tests.model_registry_server import BASE, ModelRegistryServer, Spec
from tests.promote_helpers import fake_dataset, make_export, metrics_doc, promote_cfg

NAME = "m"


@pytest.fixture
def registry():
    with ModelRegistryServer() as server:
        yield server


@pytest.fixture(scope="module")
def spec() -> Spec:
    return Spec()


@pytest.fixture
def exports(tmp_path):
    models = str(tmp_path / "models")
    uris = {step: make_export(tmp_path, models, NAME, step).uri for step in (1, 2, 3)}
    return models, uris, fake_dataset(str(tmp_path / "eval-data"))


def _props(entity: dict) -> dict:
    """customProperties as plain values (the registry wraps each in a typed MetadataValue)."""
    out = {}
    for k, v in (entity.get("customProperties") or {}).items():
        kind = v["metadataType"][len("Metadata"):-len("Value")].lower()
        out[k] = v[f"{kind}_value"]
    return out


def test_every_candidate_is_registered_with_its_scores_and_the_champion_mirrored(registry, exports, monkeypatch):
    from m3i.promote import RunInfo, promote

    monkeypatch.setenv("M3I_MODEL_REGISTRY_TOKEN", "token-from-a-secret")
    models, uri, ds = exports
    cfg = promote_cfg(f"promote.registry.url={registry.url}")
    first = promote(cfg, uri[1], metrics_doc(uri[1], ds, 0.6, 0.5), run=RunInfo(kfp_run_id="kfp-run-1"))
    second = promote(cfg, uri[2], metrics_doc(uri[2], ds, 0.5, 0.5), run=RunInfo(kfp_run_id="kfp-run-2"))
    assert first.registered and second.registered and first.promoted and not second.promoted
    assert registry.violations == []

    (model,) = registry.models.values()
    assert model["name"] == NAME and model["owner"] == "m3i"
    versions = {v["name"]: v for v in registry.versions.values()}
    assert set(versions) == {first.candidate.version, second.candidate.version}
    won, lost = _props(versions[first.candidate.version]), _props(versions[second.candidate.version])
    assert won["m3i_decision"] == "promote" and lost["m3i_decision"] == "reject"
    assert lost["m3i_reasons"].startswith("probe.top1 50.00 % vs the champion's 60.00 %")
    assert won["m3i_score_probe_top1"] == 0.6 and lost["m3i_score_probe_top1"] == 0.5 and won["m3i_random_init_probe_top1"] == 0.2
    assert won["m3i_eval_fingerprint"] == first.event.eval_set.fingerprint and won["m3i_eval_shards"] == ds
    assert lost["m3i_kfp_run_id"] == "kfp-run-2" and lost["m3i_champion_before"] == first.candidate.version
    assert won["m3i_code_revision"] == first.candidate.code_revision and won["m3i_weights_sha256"] == first.candidate.sha256
    assert won["m3i_step"] == "1" and won["m3i_seq"] == "1"  # the registry keeps integers as strings
    artifacts = {a["_version"]: a for a in registry.artifacts.values()}
    assert artifacts[versions[first.candidate.version]["id"]]["uri"] == uri[1]
    assert artifacts[versions[first.candidate.version]["id"]]["modelFormatName"] == "m3i-export"
    champion = _props(model)
    assert champion["m3i_champion"] == first.candidate.version and champion["m3i_champion_action"] == "promote"

    # a rollback moves the mirrored champion; mirroring the same version again updates it in place
    r = rollback(models, NAME, second.candidate.version, "first one drifts", policy=cfg.promote)
    assert r.registered and registry.violations == []
    assert len(registry.versions) == 2 and _props(model)["m3i_champion"] == second.candidate.version
    assert _props(model)["m3i_champion_reason"] == "first one drifts" and _props(model)["m3i_champion_previous"] == first.candidate.version
    assert ("PATCH", f"{BASE}/model_versions/{{modelversionId}}") in {(c[0], c[1]) for c in registry.calls}

    # the token comes from the variable promote.registry.token_env names, as a bearer token
    assert set(registry.auth) == {"Bearer token-from-a-secret"}
    used = {(method, template) for method, template, *_ in registry.calls}
    assert used == {
        ("GET", f"{BASE}/registered_models"), ("GET", f"{BASE}/registered_model"), ("POST", f"{BASE}/registered_models"),
        ("PATCH", f"{BASE}/registered_models/{{registeredmodelId}}"), ("GET", f"{BASE}/model_version"),
        ("POST", f"{BASE}/model_versions"), ("PATCH", f"{BASE}/model_versions/{{modelversionId}}"),
        ("POST", f"{BASE}/model_versions/{{modelversionId}}/artifacts"),
    }


def test_an_unreachable_registry_is_a_warning_and_the_promotion_stands(exports, caplog):
    from m3i.promote import Ledger, promote
    from tests.conftest import free_port

    models, uri, ds = exports
    r = promote(promote_cfg(f"promote.registry.url=http://127.0.0.1:{free_port()}"), uri[1], metrics_doc(uri[1], ds, 0.6, 0.5))
    assert r.promoted and r.registered is False and "mirroring event #1 of m in the Model Registry" in caplog.text
    assert Ledger(models, NAME).pointer().ref.version == r.candidate.version


def test_the_spec_check_refuses_requests_outside_the_spec(spec):
    """The checker the mirror test relies on is not vacuous."""
    assert spec.check_request("POST", f"{BASE}/registered_models", {}, {"name": "m", "owner": "x"}) == []
    assert spec.check_request("POST", f"{BASE}/registered_models", {}, {"name": "m", "colour": "x"}) == [
        f"POST {BASE}/registered_models body: property 'colour' is not in the schema"
    ]
    assert "required" in " ".join(spec.check_request("POST", f"{BASE}/model_versions", {}, {"name": "v1"}))
    assert spec.check_request("DELETE", f"{BASE}/registered_models/1", {}, None) == [
        f"DELETE {BASE}/registered_models/1: no such operation in the spec"
    ]
    assert spec.check_request("GET", f"{BASE}/registered_models", {"colour": ["red"]}, None) == [
        f"GET {BASE}/registered_models: query parameter 'colour' is not declared"
    ]
    assert spec.check_request("PATCH", f"{BASE}/registered_models/abc", {}, {"owner": "x"})  # ids are digits
    bad_value = {"customProperties": {"k": {"metadataType": "MetadataIntValue", "int_value": "12.5"}}}
    assert spec.check_request("PATCH", f"{BASE}/model_versions/1", {}, bad_value)
    artifact = {"artifactType": "model-artifact", "uri": "s3://m/v1", "modelFormatName": "m3i-export"}
    assert spec.check_request("POST", f"{BASE}/model_versions/1/artifacts", {}, artifact) == []
    assert spec.check_request("POST", f"{BASE}/model_versions/1/artifacts", {}, {**artifact, "artifactType": "model"})


def test_the_clients_models_name_the_properties_of_the_stored_spec(spec):
    """Client 0.3.18 is generated from the v1 spec; the stored spec is v1alpha3 (see the README): the
    entities m3i sends and reads must have the same properties in both."""
    import mr_openapi.models as generated

    differences = {}
    for name in ("RegisteredModelCreate", "RegisteredModelUpdate", "RegisteredModel", "RegisteredModelList", "ModelVersionCreate",
                 "ModelVersionUpdate", "ModelVersion", "ModelArtifactCreate", "ModelArtifact", "MetadataStringValue",
                 "MetadataDoubleValue", "MetadataIntValue", "Error"):
        fields = {f.alias or k for k, f in getattr(generated, name).model_fields.items()}
        props = spec.properties({"$ref": f"#/components/schemas/{name}"})
        if fields != props:
            differences[name] = (sorted(fields - props), sorted(props - fields))
    # v1 no longer links a model artifact to an experiment run; m3i sets neither
    assert differences == {"ModelArtifact": ([], ["experimentId", "experimentRunId"])}
