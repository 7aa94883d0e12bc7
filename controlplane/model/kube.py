"""The parts of Kubernetes objects we read, as lenient pydantic models (extra fields ignored).

Only what translation needs: a Service's ports, an EndpointSlice's endpoints and their
conditions, a TLS Secret's data. Kubernetes validated these already; we only parse them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


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


SERVICE_NAME_LABEL = "kubernetes.io/service-name"
