"""Raw JSON requests to the Kubernetes API through the official client (its auth, TLS, kubeconfig).

Like a dynamic client without discovery: the paths are ours, for our CRDs and built-in kinds
alike, and bodies are plain dicts. Used by the source (list, watch), the status writer (patch
status) and leader election (the Lease).

Retrying is the callers' (the source's backoff, the leader's renew loop), never urllib3's: its
default retries each failed request three times, logging a warning each time (186 `Retrying`
lines in one 30 s API-server outage), and delays the caller's own error handling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from kubernetes import client as k8s


def timestamp(seconds: float) -> str:
    """Kubernetes' MicroTime/Time format (RFC 3339, UTC)."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(value: str | None) -> float:
    if not value:
        return 0.0
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def brief(error: Exception) -> str:
    """One line for a log: the API's answer, or the error's type and first line (clients' are long)."""
    if isinstance(error, ApiError):
        return str(error)
    return f"{type(error).__name__}: {error}".split("\n")[0][:300]


@dataclass(frozen=True)
class Kind:
    kind: str
    group: str
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}" if namespace else f"{base}/{self.plural}"
        return path + "".join(f"/{part}" for part in (name, subresource) if part)


class KubeApi:
    def __init__(self, api_client: k8s.ApiClient):
        self.api_client = api_client
        _without_retries(api_client)

    def request(self, method: str, path: str, *, query: dict[str, str] | None = None, body: Any = None,
                content_type: str = "application/json", timeout: float = 30):
        """The streamed response (for watches); raises ApiError for HTTP errors."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, post = self.api_client.param_serialize(
            method, path, query_params=list((query or {}).items()), header_params=headers, body=body,
            auth_settings=["BearerToken"])
        response = self.api_client.call_api(method, url, headers, body, post, _request_timeout=(10, timeout))
        if response.status >= 400:
            raise ApiError(response.status, _status_message(response.read()))
        return response

    def json(self, method: str, path: str, **options) -> dict[str, Any]:
        return json.loads(self.request(method, path, **options).read() or b"{}")


def _without_retries(api_client: k8s.ApiClient) -> None:
    """Every connection pool of this client, present and future, fails at once instead of retrying."""
    pool_manager = api_client.rest_client.pool_manager
    if pool_manager.connection_pool_kw.get("retries") is not False:
        pool_manager.connection_pool_kw["retries"] = False
        pool_manager.clear()  # pools already made keep the retries they were made with


def _status_message(data: bytes) -> str:
    try:
        return json.loads(data).get("message") or data.decode(errors="replace")
    except ValueError:
        return data.decode(errors="replace")[:200]
