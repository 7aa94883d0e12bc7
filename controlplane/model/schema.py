"""CustomResourceDefinitions generated from the pydantic models: one source of truth.

pydantic's JSON Schema is turned into a Kubernetes *structural* schema: references inlined,
`X | None` as an optional X, `int | str` as `x-kubernetes-int-or-string`, scalar defaults only,
and the models' cross-field rules as CEL (`x-kubernetes-validations`), so the API server refuses
an obvious mistake before the control plane ever sees it (tests/test_real_kube_crds.py runs every
rule on a real API server). `kubectl get backends` shows the reason of the first condition that is
not True; `-o wide` adds its message.
"""

from __future__ import annotations

from typing import Any

from controlplane.model import crds

_DROP = {"title", "additionalProperties", "$defs"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(branches) == 1:
            return _structural({**branches[0], **rest}, defs)
        if {b.get("type") for b in branches} == {"integer", "string"}:
            return _structural({**rest, "x-kubernetes-int-or-string": True}, defs)
        raise ValueError(f"no structural schema for anyOf {branches}")
    out = {}
    for key, value in node.items():
        if key in _DROP or (key == "default" and (value is None or isinstance(value, (dict, list)))):
            continue
        out[key] = _structural(value, defs) if key != "properties" else {
            name: _structural(child, defs) for name, child in value.items()}
    if "properties" in out:
        out.setdefault("type", "object")
    return out


def openapi_schema(model: type) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(schema, schema.get("$defs", {}))


def crd(kind: str) -> dict[str, Any]:
    plural = crds.PLURALS[kind]
    condition = '.status.conditions[?(@.type=="{}")].status'
    not_true = '.status.conditions[?(@.status!="True")].{}'
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{crds.GROUP}"},
        "spec": {
            "group": crds.GROUP,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "categories": ["controlplane"]},
            "scope": "Namespaced",
            "versions": [{
                "name": crds.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Accepted", "type": "string", "jsonPath": condition.format("Accepted")},
                    {"name": "Programmed", "type": "string", "jsonPath": condition.format("Programmed")},
                    # The first condition that is not True says why (a column shows the first match):
                    # refused, a reference missing, or not yet on any Envoy. Empty when all is well.
                    {"name": "Reason", "type": "string", "jsonPath": not_true.format("reason")},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    {"name": "Message", "type": "string", "jsonPath": not_true.format("message"), "priority": 1},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": openapi_schema(crds.KINDS[kind]),
                        "status": openapi_schema(crds.Status),
                    },
                }},
            }],
        },
    }
