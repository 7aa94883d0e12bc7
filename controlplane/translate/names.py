"""Names of the Envoy resources we emit: one module, so every name is made the same way.

Names carry the Kubernetes namespace and object name, so an Envoy NACK or a stat names the
object a user can fix (`cluster.default/api.upstream_rq_pending_overflow`).
"""


def cluster(namespace: str, backend: str) -> str:
    return f"{namespace}/{backend}"


def websocket_cluster(namespace: str, backend: str) -> str:
    """Cannot collide with `cluster`: Kubernetes names have no '/'."""
    return f"{namespace}/{backend}/websocket"


def listener(namespace: str, gateway: str, listener_name: str) -> str:
    return f"{namespace}/{gateway}/{listener_name}"


def route_configuration(namespace: str, gateway: str, listener_name: str) -> str:
    return listener(namespace, gateway, listener_name)


def certificate_secret(namespace: str, secret: str) -> str:
    return f"{namespace}/{secret}/certificate"


def trusted_ca_secret(namespace: str, secret: str) -> str:
    return f"{namespace}/{secret}/ca"
