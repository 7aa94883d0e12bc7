"""The parts of Kubernetes objects we read, as lenient pydantic models (extra fields ignored).

Only what translation needs: metadata, a Service's ports, an EndpointSlice's endpoints and their
conditions, a Secret's data. The API server validated what the Kubernetes source reads; a
manifest file was written by hand, so the file source checks each object with `problems` and
refuses the file (keeping its last good objects) rather than let a wrong shape reach translation.

What reaches Envoy is checked here, even from the API server, whose rules are not Envoy's:
- ports are 1-65535 (an EndpointSlice port may be absent). Kubernetes 1.36 checks a Service's
  ports, but not an EndpointSlice's: it stores 0, -1 or 70000, which Envoy refuses (or, for 0,
  connects to nothing) and which a proto cannot even hold (-1, 2**32);
- the addresses of an IPv4 or IPv6 EndpointSlice are IP literals of that family, without a zone
  or an IPv4-mapped form (Envoy NACKs a cluster with `999.1.2.3` or `localhost`). Kubernetes
  refuses these too, and more that Envoy takes (loopback, 0.0.0.0, non-canonical IPv6), which
  we accept: the file source's tests send traffic to 127.0.0.1. FQDN slices are not checked:
  translation skips them.
A bad value raises `pydantic.ValidationError`, like any wrong shape; `problems.explain` words it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, ValidationInfo, field_validator
from pydantic.alias_generators import to_camel

from controlplane.model import problems as checks
from controlplane.model.problems import explain

Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
"""A TCP port, 1-65535 (Envoy takes 0 too: nothing listens there); strict: not "80", not true."""
_IANA_SERVICE_NAME = re.compile(r"(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?=[a-z0-9])){0,14}")


def _target_port(value: Any) -> int | str | None:
    """A Service's targetPort: a number (1-65535; 0 means unset, as the API server reads it: the
    Service's port) or a container port's name (IANA_SVC_NAME). Translation does not use it."""
    if value is None or type(value) is int and value == 0:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return checks.port_number(value)
    if isinstance(value, str) and _IANA_SERVICE_NAME.fullmatch(value):
        return value
    raise checks.problem("port", f"{checks.shown(value)} is neither a port number (1-65535) nor a port name (at "
                                 "most 15 lowercase letters, digits and single '-', with a letter, such as http)")


class Lenient(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class ServicePort(Lenient):
    name: str = ""
    port: Port
    target_port: Annotated[int | str | None, PlainValidator(_target_port)] = None
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
    port: Port | None = None
    protocol: str = "TCP"


class EndpointSlice(Lenient):
    address_type: Literal["IPv4", "IPv6", "FQDN"] = "IPv4"  # what the API server accepts
    endpoints: list[Endpoint] = Field(default_factory=list)
    ports: list[EndpointPort] = Field(default_factory=list)

    @field_validator("endpoints")
    @classmethod
    def _addresses_of_the_family(cls, endpoints: list[Endpoint], info: ValidationInfo) -> list[Endpoint]:
        family = info.data.get("address_type")
        if family not in ("IPv4", "IPv6"):
            return endpoints  # FQDN (names, not addresses) and unknown types: translation skips them
        for index, endpoint in enumerate(endpoints):
            for position, address in enumerate(endpoint.addresses):
                wrong = checks.ip_problem(address, family)
                if wrong is not None:
                    raise checks.problem("ip_address", f"{wrong} (the EndpointSlice's addressType is {family})",
                                         at=f"[{index}].addresses[{position}]")
        return endpoints


def draining(ready: bool | None, serving: bool | None, terminating: bool | None) -> bool | None:
    """Whether an endpoint with these conditions is draining (it serves, but takes new traffic only
    when nothing else is healthy); None if it does not serve. Unset ready means ready, unset
    serving means as ready (discovery.k8s.io/v1)."""
    ready = ready is not False
    if not (serving if serving is not None else ready):
        return None
    return not ready or bool(terminating)


OfferedEndpoints = tuple[tuple[tuple[str, int | None], ...], tuple[str, ...], tuple[bool, ...]]
"""What an EndpointSlice offers: (port name, number) of its ports, the first address of each
serving endpoint, and whether each of those drains. Columns, not a tuple per endpoint: a full
translation at 10,000 Backends keeps 100,000 endpoints, and each object it keeps is one more the
garbage collector walks after it."""


def plain_endpoint_slice(raw: Mapping[str, Any]) -> OfferedEndpoints | None:
    """An IPv4 or IPv6 EndpointSlice of the usual shape read without pydantic, as translation reads
    a valid `EndpointSlice`; None for anything else (a value of another type, a key in snake case,
    a bad port or address), which the model then decides. Validating 10,000 slices of 10 endpoints
    through the model was ~300 ms of a full translation; tests/test_translate.py checks both
    readings agree on generated slices."""
    family = raw.get("addressType", "IPv4")
    endpoints, ports = raw.get("endpoints", []), raw.get("ports", [])
    if family not in ("IPv4", "IPv6") or "address_type" in raw or type(endpoints) is not list \
            or type(ports) is not list:
        return None
    offered_ports = []
    for port in ports:
        if type(port) is not dict:
            return None
        name, number, protocol = port.get("name", ""), port.get("port"), port.get("protocol", "TCP")
        if type(name) is not str or type(protocol) is not str or not (
                number is None or type(number) is int and 1 <= number <= 65535):
            return None
        offered_ports.append((name, number))
    dotted = checks.dotted_ipv4 if family == "IPv4" else None
    addresses, drains = [], []
    for endpoint in endpoints:
        if type(endpoint) is not dict:
            return None
        found, conditions = endpoint.get("addresses", []), endpoint.get("conditions", {})
        if type(found) is not list or type(conditions) is not dict:
            return None
        ready = conditions.get("ready")
        if ready is True and len(conditions) == 1:  # most endpoints: ready, nothing else said
            it_drains = False
        else:
            serving, terminating = conditions.get("serving"), conditions.get("terminating")
            if not ((ready is None or ready is True or ready is False) and (serving is None or serving is True
                    or serving is False) and (terminating is None or terminating is True or terminating is False)):
                return None  # 1 equals True, but is not a bool
            it_drains = draining(ready, serving, terminating)
        for address in found:
            if (dotted is None or type(address) is not str or dotted(address) is None) \
                    and checks.ip_problem(address, family) is not None:  # what is not a str too
                return None
        if it_drains is not None and found:
            addresses.append(found[0])
            drains.append(it_drains)
    return tuple(offered_ports), tuple(addresses), tuple(drains)


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


def slice_service(obj: Mapping[str, Any]) -> str | None:
    """The Service an EndpointSlice belongs to (its kubernetes.io/service-name label), if any."""
    return ((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
