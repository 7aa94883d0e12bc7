"""Our CRDs on a real kube-apiserver (tests/real_kube.py): what the API server itself refuses."""

from __future__ import annotations

import yaml

from tests.real_kube import CRDS


def test_every_crd_we_ship_is_established_and_served(real_kube):
    for path in sorted(CRDS.glob("*.yaml")):
        crd = real_kube.get("apiextensions.k8s.io/v1", "CustomResourceDefinition",
                            yaml.safe_load(path.read_text())["metadata"]["name"])
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True", path.name
    assert real_kube.list("xds.controlplane.dev/v1alpha1", "Gateway", user="controlplane") == []
