"""Bad Secret rotations never reach Envoy: the postmortem's corpus, on translation and on a real
Envoy's mutual-TLS listener under steady mTLS client traffic; good rotations and a CA rotation with
overlap roll out with no failed request; every refusal is logged, counted and on the object."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import pytest
from cryptography.hazmat.primitives import serialization

from controlplane.runtime.metrics import ControlPlaneCollector
from controlplane.sources.store import ObjectKey, Store
from controlplane.translate import secrets, to_ir, to_xds
from controlplane.xds import SECRET, SnapshotCache
from tests.certs import BadRotation, MutualTlsWorld, bad_rotations, ca_secret, issue
from tests.harness import eventually, free_port, write
from tests.objects import NS, app, backend, endpoint_slice, gateway, ready, service

WORLD = MutualTlsWorld()
CORPUS = bad_rotations(WORLD)
GOOD = WORLD.server()


def mtls_listener(port: int = 8443, address: str = "0.0.0.0", **tls) -> dict:
    return {"name": "mtls", "port": port, "address": address, "protocol": "HTTPS", "hostname": WORLD.hostname,
            "tls": {"certificateSecret": "edge-cert", "clientCaSecret": "agents", **tls}}


def edge(*objects, **gateway_fields) -> Store:
    return Store([gateway(listeners=[mtls_listener()], **gateway_fields), *app("api"),
                  WORLD.certificate_secret(GOOD), WORLD.agents_secret(), *objects])


def gateway_conditions(translation) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason, c.message) for c in translation.conditions[ObjectKey("Gateway", NS, "edge")]}


def served_secrets(translation) -> dict[str, str]:
    return {name: resource.version for name, resource in
            to_xds.snapshot(translation.groups["edge"]).resources(SECRET).resources.items()}


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_a_bad_rotation_is_refused_by_its_check_and_the_last_valid_version_stays(case: BadRotation):
    store, translator = edge(), to_ir.Translator()
    before = served_secrets(translator.translate(store.view(), now=time.time()))
    store.put(case.secret)
    rotated = translator.translate(store.view(), now=time.time())
    assert served_secrets(rotated) == before  # nothing new for Envoy
    status, reason, message = gateway_conditions(rotated)["ResolvedRefs"]
    assert (status, reason) == ("False", "InvalidSecret")
    assert f"(check {case.check})" in message and "Envoys keep the last valid version" in message
    (rotation,) = rotated.secret_rotations
    assert (rotation.result, case.check in [f.check for f in rotation.failures]) == ("refused", True)
    line = rotation.log_line()
    name = case.secret["metadata"]["name"]
    assert f"Secret shop/{name}: rotation refused for Gateway shop/edge, check {case.check}" in line
    assert "Envoys keep serving the last valid version (" in line
    assert rotated.secret_rotations_total == {("refused", rotation.reason): 1}
    for obj in app("other", "10.0.0.9"):  # another change: a full translation, which judges Secrets again
        store.put(obj)
    again = translator.translate(store.view(), now=time.time())  # once per version: counted once
    assert again.secret_rotations == () and again.secret_rotations_total == {("refused", rotation.reason): 1}


def test_a_good_rotation_and_a_ca_rotation_with_overlap_are_accepted():
    store, translator = edge(), to_ir.Translator()
    first = served_secrets(translator.translate(store.view(), now=time.time()))
    steps = []
    renewed = WORLD.server()
    new_ca = issue("edge server CA 2", ca=True)
    both = WORLD.server_ca.cert_pem + new_ca.cert_pem
    new_agents_ca = issue("agents CA 2", ca=True)
    for secret in (WORLD.certificate_secret(renewed),  # same issuer
                   WORLD.certificate_secret(renewed, ca_pem=both),  # announce the new CA, certificate unchanged
                   WORLD.certificate_secret(WORLD.server(issuer=new_ca), ca_pem=both),  # then move to it
                   WORLD.agents_secret(WORLD.agents_ca, new_agents_ca)):  # clients' new CA added
        store.put(secret)
        translation = translator.translate(store.view(), now=time.time())
        assert gateway_conditions(translation)["ResolvedRefs"][0] == "True", gateway_conditions(translation)
        steps.append(served_secrets(translation))
    assert steps[0] != first and steps[2] != steps[1] and steps[3] != steps[2]  # announcing a CA sends nothing
    assert translation.secret_rotations_total == {("accepted", "Valid"): 4}


def test_dropping_a_client_ca_on_purpose_names_it_in_an_annotation():
    retiring = issue("agents CA old", ca=True)
    store, translator = edge(WORLD.agents_secret(WORLD.agents_ca, retiring)), to_ir.Translator()
    translator.translate(store.view(), now=time.time())
    store.put(WORLD.agents_secret(WORLD.agents_ca))
    refused = gateway_conditions(translator.translate(store.view(), now=time.time()))["ResolvedRefs"]
    assert "check CaDropped" in refused[2] and secrets.fingerprint(retiring.certificate) in refused[2]
    store.put(WORLD.agents_secret(WORLD.agents_ca, annotations={
        secrets.DROP_CAS_ANNOTATION: secrets.fingerprint(retiring.certificate).upper()}))
    assert gateway_conditions(translator.translate(store.view(), now=time.time()))["ResolvedRefs"][0] == "True"


def test_clients_trust_secret_decides_which_issuer_a_certificate_may_move_to():
    new_ca = issue("edge server CA 2", ca=True)
    trusted_by_clients = ca_secret("clients-trust", WORLD.server_ca.cert_pem + new_ca.cert_pem)
    store = Store([gateway(listeners=[mtls_listener(clientsTrustSecret="clients-trust")]), *app("api"),
                   WORLD.certificate_secret(GOOD), WORLD.agents_secret(), trusted_by_clients])
    translator = to_ir.Translator()
    translator.translate(store.view(), now=time.time())
    store.put(WORLD.certificate_secret(WORLD.server(issuer=new_ca), ca_pem=new_ca.cert_pem))  # clients have it
    assert gateway_conditions(translator.translate(store.view(), now=time.time()))["ResolvedRefs"][0] == "True"
    stranger = issue("a CA nobody trusts", ca=True)
    store.put(WORLD.certificate_secret(WORLD.server(issuer=stranger), ca_pem=stranger.cert_pem))
    refused = gateway_conditions(translator.translate(store.view(), now=time.time()))["ResolvedRefs"]
    assert "check ClientsTrust" in refused[2] and "shop/clients-trust" in refused[2]


def test_the_minimum_lifetime_is_set_on_the_gateway_or_for_the_translator():
    twelve_hours = WORLD.certificate_secret(WORLD.server(valid_days=1.5, starts_days_ago=1))
    for store, translator, accepted in ((edge(), to_ir.Translator(), False),
                                        (edge(), to_ir.Translator(min_certificate_lifetime=3600), True)):
        translator.translate(store.view(), now=time.time())
        store.put(twelve_hours)
        result = gateway_conditions(translator.translate(store.view(), now=time.time()))["ResolvedRefs"]
        assert (result[0] == "True") == accepted, result
    store = Store([gateway(listeners=[mtls_listener()], minCertificateLifetime="1h"), *app("api"),
                   twelve_hours, WORLD.agents_secret()])
    assert gateway_conditions(to_ir.translate(store.view(), now=time.time()))["ResolvedRefs"][0] == "True"


def test_the_last_valid_version_survives_a_restart_and_still_guards_continuity():
    store, translator = edge(), to_ir.Translator()
    translator.translate(store.view(), now=time.time())
    restarted = to_ir.Translator()
    assert restarted.restore(translator.remembered()) == []
    new_ca = issue("a new CA", ca=True)
    store.put(WORLD.certificate_secret(WORLD.server(issuer=new_ca), ca_pem=new_ca.cert_pem))
    result = restarted.translate(store.view(), now=time.time())
    assert "check NewIssuer" in gateway_conditions(result)["ResolvedRefs"][2]


def test_refused_rotations_are_counted_in_the_metrics():
    store, translator = edge(), to_ir.Translator()
    translator.translate(store.view(), now=time.time())
    store.put(next(case for case in CORPUS if case.check == "Hostname").secret)
    translation = translator.translate(store.view(), now=time.time())
    collected = {(s.name, tuple(sorted(s.labels.items()))): s.value
                 for family in ControlPlaneCollector(SnapshotCache(), lambda: translation).collect()
                 for s in family.samples}
    assert collected[("controlplane_secret_rotations_total", (("reason", "Hostname"), ("result", "refused")))] == 1


# --- a real Envoy, mutual TLS, steady client traffic -------------------------------------------------------


class Traffic:
    """Clients that open a new mutual-TLS connection per request (a new handshake each time, so a
    certificate change shows at once), counting answers and failures until stopped."""

    def __init__(self, port: int, context: ssl.SSLContext, *, clients: int = 2, limit: int = 100_000,
                 pause: float = 0.01):
        self.port, self.context, self.limit, self.pause = port, context, limit, pause
        self.ok, self.failed, self.errors = 0, 0, []
        self._running = True
        self._tasks = [asyncio.create_task(self._client()) for _ in range(clients)]

    async def request(self) -> bool:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", self.port, ssl=self.context, server_hostname=WORLD.hostname), timeout=5)
            writer.write(f"GET / HTTP/1.1\r\nHost: {WORLD.hostname}\r\nConnection: close\r\n\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), timeout=5)
            writer.close()
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as error:
            self.errors.append(repr(error))
            return False
        if not answer.startswith(b"HTTP/1.1 200"):
            self.errors.append(answer[:100].decode(errors="replace"))
            return False
        return True

    async def _client(self) -> None:
        while self._running and self.ok + self.failed < self.limit:
            if await self.request():
                self.ok += 1
            else:
                self.failed += 1
            await asyncio.sleep(self.pause)  # the pipeline and the xDS server share this event loop

    async def stop(self) -> None:
        self._running = False
        await asyncio.gather(*self._tasks)


def client_context(tmp_path, agent, *trusted) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata="".join(ca.cert_pem.decode() for ca in trusted))
    (tmp_path / "agent.pem").write_bytes(agent.cert_pem + agent.key_pem)
    context.load_cert_chain(str(tmp_path / "agent.pem"))
    return context


async def envoy_secrets(envoy) -> dict[str, tuple[str, str]]:
    """What Envoy has loaded over SDS: name -> (version, when), which changes with any new secret."""
    dump = await envoy.config_dump()
    section = next(c for c in dump["configs"] if c["@type"].endswith("SecretsConfigDump"))
    return {secret["name"]: (secret.get("version_info"), secret.get("last_updated"))
            for secret in section.get("dynamic_active_secrets", [])}


async def presented(port: int, context: ssl.SSLContext) -> bytes:
    _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=WORLD.hostname)
    certificate = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return certificate


def der(issued) -> bytes:
    return issued.certificate.public_bytes(serialization.Encoding.DER)


@pytest.mark.envoy
async def test_the_corpus_on_a_real_envoy_under_mutual_tls_traffic(served, envoys, backends, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="controlplane.runtime.pipeline")
    source, pipeline, server = served
    api = backends("api")
    port = free_port()
    write(source.directory / "gateway.yaml", gateway(listeners=[mtls_listener(port, "127.0.0.1")]))
    write(source.directory / "api.yaml", backend("api", routes=[{"pathPrefix": "/"}]), service("api"),
          endpoint_slice("api", [ready("127.0.0.1")], port=api.port))
    write(source.directory / "edge-cert.yaml", WORLD.certificate_secret(GOOD))
    write(source.directory / "agents.yaml", WORLD.agents_secret())
    envoy = envoys(server.port, node_cluster="edge")
    new_ca = issue("edge server CA 2", ca=True)
    context = client_context(tmp_path, issue("agent-7", issuer=WORLD.agents_ca, client=True),
                             WORLD.server_ca, new_ca)  # clients already trust the CA the overlap moves to
    await eventually(lambda: Traffic(port, context).request(), what="mutual TLS through Envoy", timeout=30)
    traffic = Traffic(port, context)
    try:
        for case in CORPUS:
            loaded = await envoy_secrets(envoy)
            write(source.directory / f"{case.secret['metadata']['name']}.yaml", case.secret)
            await eventually(lambda: f"(check {case.check})" in _resolved_refs(pipeline), what=f"{case.name} refused")
            assert await envoy_secrets(envoy) == loaded, case.name  # none reaches Envoy
            assert await presented(port, context) == der(GOOD)
            assert any(f"rotation refused for Gateway shop/edge, check {case.check}" in line
                       and "Envoys keep serving the last valid version" in line
                       for line in (record.getMessage() for record in caplog.records))
            write(source.directory / "edge-cert.yaml", WORLD.certificate_secret(GOOD))  # back to the good ones
            write(source.directory / "agents.yaml", WORLD.agents_secret())
            await eventually(lambda: "InvalidSecret" not in _resolved_refs(pipeline), what=f"{case.name} undone")
        during_corpus = traffic.ok

        renewed = WORLD.server()
        both = WORLD.server_ca.cert_pem + new_ca.cert_pem
        moved = WORLD.server(issuer=new_ca)
        for step, (secret, expected) in enumerate([
                (WORLD.certificate_secret(renewed), renewed),  # a good rotation
                (WORLD.certificate_secret(renewed, ca_pem=both), renewed),  # a CA rotation: announce the new CA
                (WORLD.certificate_secret(moved, ca_pem=both), moved)]):  # then move to it
            accepted = _accepted_rotations(pipeline)
            write(source.directory / "edge-cert.yaml", secret)
            await eventually(lambda: _accepted_rotations(pipeline) > accepted, what=f"good rotation step {step}")
            await eventually(lambda: _presents(port, context, der(expected)), what=f"Envoy to take step {step}")
    finally:
        await traffic.stop()
    assert (traffic.failed, traffic.errors[:3]) == (0, [])
    assert during_corpus > len(CORPUS) and traffic.ok > during_corpus  # traffic flowed all along


def _accepted_rotations(pipeline) -> int:
    return pipeline.last.secret_rotations_total.get(("accepted", "Valid"), 0)


def _resolved_refs(pipeline) -> str:
    found = pipeline.last.conditions.get(ObjectKey("Gateway", NS, "edge"), ()) if pipeline.last else ()
    return next((f"{c.reason}: {c.message}" for c in found if c.type == "ResolvedRefs"), "")


async def _presents(port: int, context: ssl.SSLContext, expected: bytes) -> bool:
    return await presented(port, context) == expected
