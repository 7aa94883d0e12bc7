"""Identity, not claims: raw gRPC clients after another node group's private keys.

Two node groups, each with an HTTPS listener whose certificate and key travel over SDS. An
attacker tries every road to team-b's key (ADS State-of-the-World by name and wildcard, Delta,
the standalone SDS stream, FetchSecrets): over plaintext, without a client certificate, with a
certificate from another CA, with team-a's certificate, and with no node group in its
certificate. None of them ever sees team-b's key; a claim its certificate does not back is
refused with PERMISSION_DENIED and logged once.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2 as d

from controlplane.runtime import xds_certificates as pki
from controlplane.translate import builders as b
from controlplane.xds import CLUSTER, LISTENER, SECRET, Snapshot, SnapshotCache, XdsServer
from controlplane.xds.server_tls import ServerTls

GROUPS = ("team-a", "team-b")
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
SDS = "/envoy.service.secret.v3.SecretDiscoveryService/"


def key_of(group: str) -> bytes:
    return f"-----PRIVATE KEY OF {group}-----".encode()


def group_snapshot(group: str, port: int) -> Snapshot:
    """An HTTPS listener with its certificate over SDS, a client CA (public), an upstream cluster."""
    return Snapshot(
        clusters=[b.eds_cluster("api")], endpoints=[b.load_assignment("api", [("10.0.0.1", 80)])],
        listeners=[b.http_listener("https", address="127.0.0.1", port=port, route_config_name="https",
                                   transport_socket=b.downstream_tls(f"{group}-cert", f"{group}-clients")),
                   b.http_listener("http", address="127.0.0.1", port=port + 1, route_config_name="https")],
        routes=[b.route_configuration("https", [b.virtual_host("all", [b.route("api", prefix="/")])])],
        secrets=[b.certificate_secret(f"{group}-cert", b"CERTIFICATE OF " + group.encode(), key_of(group)),
                 b.trusted_ca_secret(f"{group}-clients", b"CA OF THE CLIENTS OF " + group.encode())])


class Pki:
    def __init__(self, directory):
        self.ca = pki.new_ca()
        server = pki.server_certificate(self.ca, ["localhost", "127.0.0.1"])
        self.files = {}
        for name, pem in {"ca": self.ca.cert, "cert": server.cert, "key": server.key}.items():
            self.files[name] = directory / f"{name}.pem"
            self.files[name].write_bytes(pem)

    def tls(self) -> ServerTls:
        return ServerTls(self.files["cert"], self.files["key"], client_ca=self.files["ca"])

    def credentials(self, client: pki.Pair | None) -> grpc.ChannelCredentials:
        if client is None:
            return grpc.ssl_channel_credentials(self.ca.cert)
        return grpc.ssl_channel_credentials(self.ca.cert, client.key, client.cert)


async def started(tmp_path, *, tls: ServerTls | None, **options) -> XdsServer:
    cache = SnapshotCache()
    for number, group in enumerate(GROUPS):
        cache.set_snapshot(group, group_snapshot(group, 20000 + 10 * number))
    server = XdsServer(cache, address="127.0.0.1:0", tls=tls, **options)
    await server.start()
    return server


def node(group: str) -> base_pb2.Node:
    return base_pb2.Node(id="attacker", cluster=group)


async def _first_response(call, request):
    await call.write(request)
    try:
        return await asyncio.wait_for(call.read(), 5)
    finally:
        call.cancel()


async def every_road(channel: grpc.aio.Channel, group: str, names: tuple[str, ...] = ()) -> dict[str, object]:
    """What each way of asking for `group`'s secrets gives: the secrets' bytes, or the status code."""
    sotw_request = d.DiscoveryRequest(node=node(group), type_url=SECRET, resource_names=names)
    delta_request = d.DeltaDiscoveryRequest(node=node(group), type_url=SECRET, resource_names_subscribe=names)
    sotw = dict(request_serializer=d.DiscoveryRequest.SerializeToString,
                response_deserializer=d.DiscoveryResponse.FromString)
    roads = {
        "ads": lambda: _first_response(channel.stream_stream(ADS + "StreamAggregatedResources", **sotw)(),
                                       sotw_request),
        "ads-delta": lambda: _first_response(channel.stream_stream(
            ADS + "DeltaAggregatedResources", request_serializer=d.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=d.DeltaDiscoveryResponse.FromString)(), delta_request),
        "sds": lambda: _first_response(channel.stream_stream(SDS + "StreamSecrets", **sotw)(), sotw_request),
        "fetch": lambda: channel.unary_unary(SDS + "FetchSecrets", **sotw)(sotw_request, timeout=5),
    }
    results = {}
    for road, ask in roads.items():
        try:
            response = await ask()
        except grpc.aio.AioRpcError as error:
            results[road] = error.code()
            continue
        resources = [r.resource if road == "ads-delta" else r for r in response.resources]
        results[road] = sorted(secret_pb2.Secret.FromString(r.value).SerializeToString() for r in resources)
    return results


def served_keys(results: dict[str, object]) -> set[bytes]:
    return {group.encode() for secrets in results.values() if isinstance(secrets, list)
            for secret in secrets for group in GROUPS if key_of(group) in secret}


@pytest.mark.parametrize("names", [(), ("team-b-cert",)], ids=["wildcard", "by-name"])
async def test_a_certificate_gets_its_own_group_and_is_refused_anothers(tmp_path, caplog, names):
    world = Pki(tmp_path)
    server = await started(tmp_path, tls=world.tls())
    team_a = pki.client_certificate(world.ca, "team-a")
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", world.credentials(team_a)) as channel:
            own = await every_road(channel, "team-a", tuple(n.replace("team-b", "team-a") for n in names))
            assert {road: served_keys({road: r}) for road, r in own.items()} == {
                road: {b"team-a"} for road in ("ads", "ads-delta", "sds", "fetch")}
            with caplog.at_level(logging.WARNING, logger="controlplane.xds.server"):
                foreign = await every_road(channel, "team-b", names)
                again = await every_road(channel, "team-b", names)
    finally:
        await server.stop(0)
    assert foreign == again == {road: grpc.StatusCode.PERMISSION_DENIED for road in ("ads", "ads-delta", "sds",
                                                                                       "fetch")}
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1, refusals  # once per identity and claimed group, however often it asks
    assert "node group 'team-b' is not this client's" in refusals[0]
    assert "spiffe://controlplane/node-group/team-a" in refusals[0]


async def test_the_refusal_says_what_to_do(tmp_path):
    world = Pki(tmp_path)
    server = await started(tmp_path, tls=world.tls())
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}",
                                           world.credentials(pki.client_certificate(world.ca, "team-a"))) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(SDS + "FetchSecrets", request_serializer=d.DiscoveryRequest.SerializeToString,
                                          response_deserializer=d.DiscoveryResponse.FromString)(
                    d.DiscoveryRequest(node=node("team-b"), type_url=SECRET), timeout=5)
    finally:
        await server.stop(0)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "names node groups: team-a" in refused.value.details()
    assert "use a certificate issued for 'team-b' (`controlplane certs`)" in refused.value.details()


async def test_no_key_without_a_proven_identity(tmp_path):
    """Plaintext to a mutual-TLS server, no client certificate, another CA's certificate naming the
    group, a certificate of our CA naming the group in another trust domain: never a key."""
    world = Pki(tmp_path)
    server = await started(tmp_path, tls=world.tls())
    other_ca = pki.new_ca("someone else's CA")
    elsewhere = pki.client_certificate(world.ca, "team-b", trust_domain="elsewhere")  # not our trust domain
    attempts = {
        "plaintext": grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"),
        "no certificate": grpc.aio.secure_channel(f"127.0.0.1:{server.port}", world.credentials(None)),
        "another CA": grpc.aio.secure_channel(f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(
            world.ca.cert, *_key_and_chain(pki.client_certificate(other_ca, "team-b")))),
        "no node group": grpc.aio.secure_channel(f"127.0.0.1:{server.port}", world.credentials(elsewhere)),
    }
    try:
        results = {}
        for what, channel in attempts.items():
            async with channel:
                results[what] = await every_road(channel, "team-b")
    finally:
        await server.stop(0)
    assert {what: served_keys(r) for what, r in results.items()} == {what: set() for what in attempts}
    assert set(results["no node group"].values()) == {grpc.StatusCode.PERMISSION_DENIED}
    for what in ("plaintext", "no certificate", "another CA"):  # the handshake fails: no call at all
        assert set(results[what].values()) == {grpc.StatusCode.UNAVAILABLE}, what


def _key_and_chain(pair: pki.Pair) -> tuple[bytes, bytes]:
    return pair.key, pair.cert


async def test_plaintext_serves_no_private_key_and_leaves_out_what_needs_one(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="controlplane.xds.server")
    server = await started(tmp_path, tls=None)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            results = await every_road(channel, "team-b")
            listeners, clusters = [await _first_response(channel.stream_stream(
                ADS + "StreamAggregatedResources", request_serializer=d.DiscoveryRequest.SerializeToString,
                response_deserializer=d.DiscoveryResponse.FromString)(),
                d.DiscoveryRequest(node=node("team-b"), type_url=type_url)) for type_url in (LISTENER, CLUSTER)]
    finally:
        await server.stop(0)
    assert served_keys(results) == set()
    # The public client CA still comes, so nothing that needs no key stops working.
    assert all(len(secrets) == 1 and b"CA OF THE CLIENTS OF team-b" in secrets[0] for secrets in results.values())
    assert [r.value for r in listeners.resources if b"https" in r.value and b"team-b-cert" in r.value] == []
    assert len(listeners.resources) == 1  # the plain HTTP listener, not the HTTPS one without its key
    assert len(clusters.resources) == 1
    left_out = [r.getMessage() for r in caplog.records if "not served over xDS without mutual TLS" in r.getMessage()]
    assert left_out == ["node group 'team-b': not served over xDS without mutual TLS, because their private keys "
                        "would travel to whoever asks: listeners https; secrets team-b-cert. Serve xDS over mutual "
                        "TLS to serve them"]
    assert "xDS without mutual TLS: Envoys prove no identity, so no private key is served" in caplog.text


async def test_the_insecure_flag_serves_keys_over_plaintext_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="controlplane.xds.server"):
        server = await started(tmp_path, tls=None, insecure_private_keys_over_plaintext=True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            results = await every_road(channel, "team-b")
    finally:
        await server.stop(0)
    assert served_keys(results) == {b"team-b"}
    assert "INSECURE: private keys are served over xDS without mutual TLS" in caplog.text


async def test_an_envoy_pushes_stats_for_its_own_node_group_only(tmp_path):
    """The metrics service on the xDS port: team-a's certificate pushing stats as team-b is refused;
    as team-a, accepted (a client must not write what `status` shows of another group's budgets)."""
    from controlplane.xds.metrics_service import METHOD, SERVICE, MetricsService, StatsStore, StreamMetricsMessage

    def flush(group: str) -> bytes:
        message = StreamMetricsMessage()
        message.identifier.node.id, message.identifier.node.cluster = "envoy-7", group
        return message.SerializeToString()

    world, store = Pki(tmp_path), StatsStore()
    server = await started(tmp_path, tls=world.tls(), services=(MetricsService(store).handler(),))
    team_a = pki.client_certificate(world.ca, "team-a")
    outcomes = {}
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", world.credentials(team_a)) as channel:
            push = channel.stream_unary(f"/{SERVICE}/{METHOD}")
            for group in ("team-b", "team-a"):
                try:
                    await push(iter([flush(group)]), timeout=10)
                    outcomes[group] = "accepted"
                except grpc.aio.AioRpcError as error:
                    outcomes[group] = error.code()
    finally:
        await server.stop(0)
    assert outcomes == {"team-b": grpc.StatusCode.PERMISSION_DENIED, "team-a": "accepted"}
    assert [envoy.node_group for envoy in store.envoys()] == ["team-a"]
