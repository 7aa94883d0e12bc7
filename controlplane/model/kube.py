"""The parts of Kubernetes objects we read, as lenient pydantic models (extra fields ignored).

Only what translation needs: metadata, a Service's ports, an EndpointSlice's endpoints and their
conditions, a Secret's data. The API server validated what the Kubernetes source reads; a
manifest file was written by hand, so the file source checks each object with `problems` and
refuses the file (keeping its last good objects) rather than let a wrong shape reach translation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from controlplane.model.problems import explain


class Lenient(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class ServicePort(Lenient):
    name: str = ""
    port: int
    target_port: int | str | None = None
    protocol: str = "TCP"


class ServiceSpec(Lenient):
    ports: list[ServicePort] = Field(default_factory=list)


class EndpointConditions(Lenient):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class Endpoint(Lenient):
    addresses: list[str] = Field(default_factory=list)
    conditions: EndpointConditions = EndpointConditions()


class EndpointPort(Lenient):
    name: str = ""
    port: int | None = None
    protocol: str = "TCP"


class EndpointSlice(Lenient):
    address_type: str = "IPv4"
    endpoints: list[Endpoint] = Field(default_factory=list)
    ports: list[EndpointPort] = Field(default_factory=list)


class ObjectMeta(Lenient):
    name: str = Field(min_length=1)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    generation: int = 0


class _Object(Lenient):
    metadata: ObjectMeta


class _Service(_Object):
    spec: ServiceSpec = ServiceSpec()


class _EndpointSlice(_Object, EndpointSlice):
    pass


class _Secret(_Object):
    type: str = "Opaque"
    data: dict[str, str] = Field(default_factory=dict)


_SHAPES: dict[str, type[_Object]] = {"Service": _Service, "EndpointSlice": _EndpointSlice, "Secret": _Secret}


def problems(obj: Mapping[str, Any]) -> list[str]:
    """What is wrong with the shape of a Kubernetes object we read (empty when nothing is). Our
    CRDs' metadata is checked here; their spec is translation's to check (it becomes a condition)."""
    try:
        _SHAPES.get(obj.get("kind"), _Object).model_validate(obj)
    except ValidationError as error:
        return explain(error, "")
    return []


SERVICE_NAME_LABEL = "kubernetes.io/service-name"
