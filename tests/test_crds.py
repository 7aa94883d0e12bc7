"""The CRDs in k8s/crds are generated from the pydantic models, and are structural schemas."""

from __future__ import annotations

from pathlib import Path

import yaml

from controlplane.cli import crd_yaml
from controlplane.model import crds, schema

CRD_DIR = Path(__file__).resolve().parent.parent / "k8s" / "crds"


def test_crd_files_match_the_models():
    for kind in crds.KINDS:
        path = CRD_DIR / f"{crds.PLURALS[kind]}.yaml"
        assert path.read_text() == crd_yaml(schema.crd(kind)), f"{path} drifted from the models: run `make crds`"


def _walk(node, where="$"):
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from _walk(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{where}[{index}]")


def test_schemas_are_structural():
    for kind in crds.KINDS:
        root = yaml.safe_load((CRD_DIR / f"{crds.PLURALS[kind]}.yaml").read_text())
        openapi = root["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for where, node in _walk(openapi):
            if "properties" in node and not where.endswith(".properties"):
                assert node.get("type") == "object", f"{kind} {where}: an object schema needs type: object"
            assert "$ref" not in node and "anyOf" not in node, f"{kind} {where}: not structural"


def test_cel_rules_mirror_the_model_validators():
    rules = [v["rule"] for _, node in _walk(schema.crd("Backend")) for v in node.get("x-kubernetes-validations", [])]
    assert "has(self.pathPrefix) != has(self.path)" in rules
    gateway_rules = [v["message"] for _, node in _walk(schema.crd("Gateway"))
                     for v in node.get("x-kubernetes-validations", [])]
    assert gateway_rules == ["listener ports must be unique", "listener names must be unique",
                             "tls is required for HTTPS, and only for it",
                             "must be an IP address (Envoy binds an IP literal, such as 0.0.0.0 or ::)"]
