"""A loopback Kubeflow Model Registry for tests: the subset of its REST API (v1alpha3) that m3i uses,
with every request and every response checked against the upstream OpenAPI spec.

    with ModelRegistryServer() as server:       # 127.0.0.1, a free port
        ...                                     # point the client at server.url
        assert server.violations == []          # what the client sent, or the server answered, outside the spec
        server.calls                            # [(method, path template, query, body), ...]

The registry itself needs MySQL or PostgreSQL; this keeps its entities in dicts. The spec is
``tests/data/model-registry/model-registry.yaml`` (see the README there): an operation must exist
for the method and path, path and query parameters must be declared and match their schemas,
a request body must validate against the operation's schema and use only properties it names;
a response must validate against the schema of its status.

The stored spec (the newest snapshot of the upstream repository, 2026-04-29) serves its API under
``/api/model_registry/v1alpha3``; client 0.3.18 calls its successor ``/api/model_registry/v1``, which
upstream serves beside the deprecated v1alpha3 with the same entities. Requests to either prefix are
checked against the stored spec's v1alpha3 operations; ``tests/test_promote_registry.py`` checks that
the client's models (generated from the v1 spec) name the properties the stored spec names.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import referencing
import yaml
from referencing.jsonschema import DRAFT4

__all__ = ["BASE", "CLIENT_BASE", "ModelRegistryServer", "Spec", "SPEC_FILE"]

SPEC_FILE = Path(__file__).parent / "data" / "model-registry" / "model-registry.yaml"
BASE = "/api/model_registry/v1alpha3"
"""The prefix of the stored spec's operations."""
CLIENT_BASE = "/api/model_registry/v1"
"""The prefix model-registry 0.3.18 calls (v1alpha3's successor upstream)."""
_URN = "urn:model-registry-openapi"


def _discriminate(node: Any) -> None:
    """OpenAPI's ``discriminator`` in JSON Schema terms: each ``oneOf`` branch also requires its mapped value.

    Plain JSON Schema ignores ``discriminator``, and a ModelArtifact body is valid under every Artifact
    branch of ``oneOf`` (``artifactType`` has only a default), so ``oneOf`` alone fails it.
    """
    if isinstance(node, dict):
        disc = node.get("discriminator")
        if disc and "oneOf" in node and disc.get("mapping"):
            prop = disc["propertyName"]
            node["oneOf"] = [
                {"allOf": [{"type": "object", "required": [prop], "properties": {prop: {"enum": [value]}}}, {"$ref": target}]}
                for value, target in disc["mapping"].items()
            ]
        for v in node.values():
            _discriminate(v)
    elif isinstance(node, list):
        for v in node:
            _discriminate(v)


class Spec:
    """The upstream OpenAPI document and the checks of one request or response against it."""

    def __init__(self, path: Path = SPEC_FILE) -> None:
        self.doc = yaml.safe_load(path.read_text())
        _discriminate(self.doc)
        self._registry = referencing.Registry().with_resource(_URN, referencing.Resource.from_contents(self.doc, default_specification=DRAFT4))
        self._routes = [
            (re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + "$"), template)
            for template in self.doc["paths"]
        ]

    def _deref(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = functools.reduce(lambda d, k: d[k], node["$ref"].lstrip("#/").split("/"), self.doc)
        return node

    def _errors(self, schema: dict[str, Any], value: Any) -> list[str]:
        wrapped = {"$ref": f"{_URN}#/" + schema["$ref"].lstrip("#/")} if "$ref" in schema else schema
        validator = jsonschema.Draft4Validator(wrapped, registry=self._registry)
        return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(value)]

    def properties(self, schema: dict[str, Any]) -> set[str]:
        """Every property name a schema allows, through $ref, allOf, oneOf and anyOf."""
        node = self._deref(schema)
        names = set(node.get("properties", {}))
        for key in ("allOf", "oneOf", "anyOf"):
            for sub in node.get(key, []):
                names |= self.properties(sub)
        return names

    def route(self, method: str, path: str) -> tuple[str, dict[str, Any], dict[str, str]] | None:
        """``(template, operation, path parameters)`` of a request, or ``None`` outside the spec."""
        if path.startswith(CLIENT_BASE + "/"):
            path = BASE + path[len(CLIENT_BASE):]
        for pattern, template in self._routes:
            if (m := pattern.match(path)) and method.lower() in self.doc["paths"][template]:
                return template, self.doc["paths"][template][method.lower()], m.groupdict()
        return None

    def check_request(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> list[str]:
        """What is wrong with a request in the spec's eyes (empty: nothing)."""
        found = self.route(method, path)
        if found is None:
            return [f"{method} {path}: no such operation in the spec"]
        template, op, path_params = found
        params = [self._deref(p) for p in self.doc["paths"][template].get("parameters", []) + op.get("parameters", [])]
        errors = []
        for p in params:
            where = {"path": path_params, "query": {k: v[-1] for k, v in query.items()}}.get(p["in"], {})
            if p.get("required") and p["name"] not in where:
                errors.append(f"{method} {template}: required {p['in']} parameter {p['name']!r} is missing")
            elif p["name"] in where:
                errors += [f"{method} {template} {p['in']} parameter {p['name']}: {e}" for e in self._errors(p["schema"], where[p["name"]])]
        declared = {p["name"] for p in params if p["in"] == "query"}
        errors += [f"{method} {template}: query parameter {k!r} is not declared" for k in query if k not in declared]
        request = op.get("requestBody")
        if request is None:
            if body is not None:
                errors.append(f"{method} {template}: takes no request body")
            return errors
        schema = self._deref(request)["content"]["application/json"]["schema"]
        if body is None:
            return errors + ([f"{method} {template}: the request body is required"] if self._deref(request).get("required") else [])
        errors += [f"{method} {template} body {e}" for e in self._errors(schema, body)]
        if isinstance(body, dict):
            allowed = self.properties(schema)
            errors += [f"{method} {template} body: property {k!r} is not in the schema" for k in body if k not in allowed]
        return errors

    def check_response(self, method: str, template: str, status: int, body: Any) -> list[str]:
        """What is wrong with a response in the spec's eyes (empty: nothing)."""
        responses = self.doc["paths"][template][method.lower()]["responses"]
        if str(status) not in responses:
            return [f"{method} {template}: status {status} is not a documented response"]
        content = self._deref(responses[str(status)]).get("content", {}).get("application/json")
        return [f"{method} {template} -> {status} {e}" for e in self._errors(content["schema"], body)] if content else []


class _Handler(BaseHTTPRequestHandler):
    server: "ModelRegistryServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        registry = self.server
        with registry.lock:
            registry.auth.append(self.headers.get("Authorization"))
            registry.violations += registry.spec.check_request(method, parts.path, query, body)
            found = registry.spec.route(method, parts.path)
            template = found[0] if found else parts.path
            registry.calls.append((method, template, {k: v[-1] for k, v in query.items()}, copy.deepcopy(body)))
            status, answer = registry.answer(method, template, found[2] if found else {}, {k: v[-1] for k, v in query.items()}, body)
            if found:
                registry.violations += registry.spec.check_response(method, template, status, answer)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_PATCH(self) -> None:  # noqa: N802
        self._serve("PATCH")


class ModelRegistryServer(ThreadingHTTPServer):
    """The loopback registry; a context manager that serves on a thread and stops on exit."""

    daemon_threads = True

    def __init__(self, spec: Spec | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spec = spec or Spec()
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, dict[str, str], Any]] = []
        self.violations: list[str] = []
        self.auth: list[str | None] = []
        self.models: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.artifacts: dict[str, dict[str, Any]] = {}
        self._ids = 0
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "ModelRegistryServer":
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _new(self, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
        self._ids += 1
        now = str(int(time.time() * 1000))
        return {**body, **extra, "id": str(self._ids), "createTimeSinceEpoch": now, "lastUpdateTimeSinceEpoch": now}

    @staticmethod
    def _update(entity: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        entity.update(body)  # the registry replaces customProperties as a whole, as the client sends them
        entity["lastUpdateTimeSinceEpoch"] = str(int(time.time() * 1000))
        return entity

    @staticmethod
    def _missing(what: str) -> tuple[int, dict[str, str]]:
        return 404, {"code": "404", "message": f"{what} not found"}

    def answer(self, method: str, template: str, path: dict[str, str], query: dict[str, str], body: Any) -> tuple[int, Any]:
        """The response of the subset m3i uses; 404 for the rest of the spec."""
        route = (method, template.removeprefix(BASE))
        if route == ("GET", "/registered_models"):
            items = list(self.models.values())[: int(query.get("pageSize", "100"))]
            return 200, {"items": items, "size": len(items), "pageSize": int(query.get("pageSize", "100")), "nextPageToken": ""}
        if route == ("GET", "/registered_model"):
            found = [m for m in self.models.values() if m["name"] == query.get("name")]
            return (200, found[0]) if found else self._missing(f"registered model {query.get('name')!r}")
        if route == ("POST", "/registered_models"):
            model = self._new(body, state="LIVE")
            self.models[model["id"]] = model
            return 201, model
        if route == ("PATCH", "/registered_models/{registeredmodelId}"):
            model = self.models.get(path["registeredmodelId"])
            return (200, self._update(model, body)) if model else self._missing("registered model")
        if route == ("GET", "/model_version"):
            found = [v for v in self.versions.values() if v["name"] == query.get("name") and v["registeredModelId"] == query.get("parentResourceId")]
            return (200, found[0]) if found else self._missing(f"model version {query.get('name')!r}")
        if route == ("POST", "/model_versions"):
            version = self._new(body, state="LIVE")
            self.versions[version["id"]] = version
            return 201, version
        if route == ("PATCH", "/model_versions/{modelversionId}"):
            version = self.versions.get(path["modelversionId"])
            return (200, self._update(version, body)) if version else self._missing("model version")
        if route == ("POST", "/model_versions/{modelversionId}/artifacts"):
            if path["modelversionId"] not in self.versions:
                return self._missing("model version")
            artifact = self._new(body)
            self.artifacts[artifact["id"]] = {**artifact, "_version": path["modelversionId"]}
            return 201, artifact
        return self._missing(f"{method} {template} (not served by the loopback registry)")
