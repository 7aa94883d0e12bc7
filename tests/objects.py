"""Kubernetes objects for tests, as the API server would return them."""

from __future__ import annotations

from typing import Any

NS = "shop"


def gateway(name: str = "edge", *, node_cluster: str = "edge", listeners=None, port: int = 8080, namespace: str = NS,
            generation: int = 1, **spec: Any) -> dict:
    """A Gateway with `listeners`, or by default one plain HTTP listener on 127.0.0.1:`port`."""
    return {"apiVersion": "xds.controlplane.dev/v1alpha1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": namespace, "generation": generation},
            "spec": {"nodeCluster": node_cluster,
                     "listeners": listeners or [{"name": "http", "port": port, "address": "127.0.0.1"}], **spec}}


def backend(name: str, *, service: str | None = None, port: Any = "http", routes=None, gateway_name: str = "edge",
            namespace: str = NS, generation: int = 1, **spec: Any) -> dict:
    return {"apiVersion": "xds.controlplane.dev/v1alpha1", "kind": "Backend",
            "metadata": {"name": name, "namespace": namespace, "generation": generation},
            "spec": {"gateway": gateway_name, "service": {"name": service or name, "port": port},
                     "routes": routes if routes is not None else [{"pathPrefix": f"/{name}"}], **spec}}


def service(name: str, *, port: int = 80, port_name: str = "http", namespace: str = NS) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"ports": [{"name": port_name, "port": port, "targetPort": 8080}]}}


def endpoint_slice(service_name: str, endpoints: list[tuple[str, dict]], *, port: int = 8080,
                   port_name: str = "http", name: str | None = None, namespace: str = NS) -> dict:
    """`endpoints`: (address, conditions) pairs."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{service_name}-1", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address], "conditions": conditions} for address, conditions in endpoints]}


def ready(address: str) -> tuple[str, dict]:
    return (address, {"ready": True, "serving": True, "terminating": False})


def app(name: str, address: str = "10.0.0.1", **backend_spec: Any) -> list[dict]:
    """A Backend with its Service and one ready endpoint."""
    return [backend(name, **backend_spec), service(name), endpoint_slice(name, [ready(address)])]
