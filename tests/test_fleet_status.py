"""`controlplane status` against a running control plane with real Envoys, one of them NACKing;
the debug views it reads (loopback only, keys redacted); and the Envoy rows every replica keeps in
its Lease record (the two-replica case runs on the real API server: tests/test_real_kube_status.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

from controlplane import cli, fleet_status
from controlplane.runtime import envoy_rows
from controlplane.runtime.debug_views import DebugViews, is_loopback
from controlplane.translate import builders as b
from controlplane.xds import EnvoyStatus, Snapshot
from controlplane.xds.cache import NackRecord, TypeStatus
from controlplane.xds.resources import CLUSTER, LISTENER
from tests.certs import issue
from tests.harness import eventually, free_port
from tests.test_envoy_xds import web_snapshot


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def debug_server(xds):
    """The debug views of `xds`'s cache on 127.0.0.1, as `serve` mounts them on its metrics port."""
    cache, _server = xds
    server = make_server("127.0.0.1", 0, DebugViews(cache, "cp-test"), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


async def _status(capsys, *argv: str) -> tuple[int, str]:
    code = await asyncio.to_thread(cli.main, ["status", *argv])
    out, err = capsys.readouterr()
    return code, out + err


def _with_key(snapshot: Snapshot, key_pem: bytes, cert_pem: bytes) -> Snapshot:
    return snapshot.replace(secrets=[b.certificate_secret("edge-cert", cert_pem, key_pem)])


@pytest.mark.envoy
async def test_status_lists_every_envoy_with_its_state_per_type_and_the_nack(xds, envoys, backends, debug_server,
                                                                              capsys, tmp_path):
    cache, server = xds
    api = backends("api")
    good_port = free_port()
    leaf = issue("edge.example")
    cache.set_snapshot("edge", _with_key(web_snapshot(good_port, {"api": [api.address]}),
                                         leaf.key_pem, leaf.cert_pem))
    with socket.socket() as taken:  # a port something else holds: the "other" group's Envoy NACKs its listener
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = b.http_listener("busy", address="127.0.0.1", port=taken.getsockname()[1], route_config_name="http")
        cache.set_snapshot("other", web_snapshot(free_port(), {"api": [api.address]}, extra_listeners=[busy]))
        envoys(server.port, node_cluster="edge", node_id="envoy-sotw")
        envoys(server.port, node_cluster="other", node_id="envoy-delta", delta=True)

        async def both_reported() -> dict | None:
            code, out = await _status(capsys, "--server", debug_server, "--output", "json")
            rows = {row["node"]: row for replica in json.loads(out)["replicas"] for row in replica["rows"]}
            ready = (len(rows) == 2 and rows["envoy-sotw"]["types"]["LDS"]["state"] == "SYNCED"
                     and "nack" in rows["envoy-delta"]["types"]["LDS"])
            return rows if code == 0 and ready else None
        rows = await eventually(both_reported, what="both Envoys reported, one NACKing")

    sotw, delta = rows["envoy-sotw"], rows["envoy-delta"]
    assert (sotw["group"], sotw["replica"], sotw["transport"]) == ("edge", "cp-test", "ads")
    assert delta["transport"] == "ads-delta"
    assert {short: entry["state"] for short, entry in sotw["types"].items()} == {
        "CDS": "SYNCED", "EDS": "SYNCED", "LDS": "SYNCED", "RDS": "SYNCED", "SDS": "NOT SENT", "RTDS": "SYNCED"}
    assert sotw["types"]["CDS"]["acked"] == sotw["types"]["CDS"]["sent"] != ""
    nack = delta["types"]["LDS"]["nack"]
    assert nack["resources"] == ["busy"] and "cannot bind" in nack["message"]
    assert "nack" not in sotw["types"]["LDS"]
    assert delta["types"]["CDS"]["state"] == "SYNCED"  # one rejected type: the others still in sync

    code, out = await _status(capsys, "--server", debug_server)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NODE", "GROUP", "REPLICA", "CONNECTED", "CDS", "EDS", "LDS", "RDS", "SDS", "RTDS"]
    assert any(line.split()[:3] == ["envoy-delta", "other", "cp-test"] for line in lines)
    assert any(line.strip().startswith("envoy-delta LDS ") and "busy: " in line and "cannot bind" in line
               for line in lines)
    assert "2 Envoy(s) on 1 replica(s): 1 in sync, 1 not" in out

    code, out = await _status(capsys, "--server", debug_server, "--node", "envoy-sotw", "--output", "json")
    assert code == 0
    shown = json.loads(out)
    assert [row["node"] for row in shown["envoys"]] == ["envoy-sotw"]
    dumped = json.dumps(shown["config"])
    [secret] = next(c for c in shown["config"]["configs"] if c["@type"].endswith("SecretsConfigDump"))[
        "dynamic_active_secrets"]
    assert base64.b64decode(secret["secret"]["tls_certificate"]["private_key"]["inline_bytes"]) == b"[redacted]"
    assert base64.b64encode(leaf.key_pem).decode()[:40] not in dumped  # never a private key, in any form
    assert leaf.key_pem.decode().splitlines()[1] not in dumped
    code, out = await _status(capsys, "--server", debug_server, "--node", "nobody")
    assert code == 1 and "no Envoy with node id 'nobody'" in out


async def test_a_control_plane_that_is_not_there_is_one_line_saying_what_to_do(capsys):
    code, out = await _status(capsys, "--server", f"http://127.0.0.1:{free_port()}")
    assert code == 2
    assert "no control plane answers at" in out and "--metrics-address" in out and "Traceback" not in out


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.7", False), ("::ffff:10.0.0.7", False), ("192.0.2.10", False), ("", False), ("nonsense", False)])
def test_only_loopback_peers_are_shown_the_debug_views(address, loopback):
    assert is_loopback(address) is loopback
    answered = []
    body = DebugViews(None, "cp")({"REMOTE_ADDR": address, "PATH_INFO": "/debug/envoys"},
                                  lambda status, headers: answered.append(status)) if not loopback else None
    if not loopback:
        assert answered == ["403 Forbidden"]
        assert b"kubectl port-forward" in b"".join(body)


def _status_of(node: str, *, sent: str = "v1", acked: str = "v1", nack: str | None = None) -> EnvoyStatus:
    types = {CLUSTER: TypeStatus(sent, acked), LISTENER: TypeStatus(sent, acked if nack is None else "v0",
                                                                    NackRecord(LISTENER, sent, ("l",), nack, 0.0)
                                                                    if nack else None)}
    return EnvoyStatus(node, "edge", 1000.0, "sotw", types)


def test_the_rows_of_a_lease_record_round_trip_and_say_how_many_were_left_out():
    statuses = [_status_of(f"envoy-{n:05d}") for n in range(envoy_rows.MAX_ROWS + 3)]
    statuses.append(_status_of("envoy-nack", nack="x" * 1000))
    uses = [{"node_group": "edge", "backend": f"shop/b{n}", "cluster": f"shop/b{n}", "traffic": "api",
             "priority": "default", "resource": "cx", "limit": 100, "in_use": n % 7, "envoys": 1}
            for n in range(envoy_rows.MAX_BUDGETS + 5)]
    uses.append({**uses[0], "backend": "shop/quiet", "in_use": None})  # nothing reported: not recorded
    packed = envoy_rows.pack(envoy_rows.rows(statuses, "cp-a"), uses)
    assert len(packed) < 128 * 1024  # well within the 256 KiB a Lease's annotations may hold
    record = envoy_rows.unpack(packed)
    rows, left_out = record.rows, record.left_out
    assert (len(rows), left_out) == (envoy_rows.MAX_ROWS, 4)
    assert (len(record.budgets), record.budgets_left_out) == (envoy_rows.MAX_BUDGETS, 5)
    assert record.budgets[3] == uses[3]
    assert rows[0]["types"]["CDS"] == {"sent": "v1", "acked": "v1", "state": "SYNCED"}
    nacked = envoy_rows.row(statuses[-1], "cp-a")["types"]["LDS"]
    assert nacked["state"] == "NACKED" and len(nacked["nack"]["message"]) == envoy_rows.MAX_MESSAGE
    with pytest.raises(ValueError, match="unreadable Envoy list"):
        envoy_rows.unpack("not base64 at all!")
    notes = fleet_status._notes([{"replica": "cp-a", "rows": rows, "left_out": left_out, "expired": True}], rows)
    assert any("4 more Envoy(s) not listed" in note for note in notes)
    assert any("its record has expired" in note for note in notes)


def test_budget_use_of_every_replica_is_merged_as_the_busiest_envoy():
    one = {"node_group": "edge", "backend": "shop/api", "cluster": "shop/api/websocket", "traffic": "websocket",
           "priority": "default", "resource": "cx", "limit": 50, "in_use": 12, "envoys": 2}
    merged = fleet_status.merged_budgets([one, {**one, "in_use": 40, "envoys": 1}, {**one, "resource": "rq"}])
    assert [(use["resource"], use["in_use"], use["envoys"]) for use in merged] == [("cx", 40, 3), ("rq", 12, 2)]
    table = fleet_status.budget_table(merged)
    assert ["edge", "shop/api", "shop/api/websocket", "websocket", "default", "40/50", "-", "12/50", "3"] in [
        line.split() for line in table.splitlines()]
