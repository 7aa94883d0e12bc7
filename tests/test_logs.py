"""The log, as an operator reads it: JSON lines that parse, with node, group, type and version
where they apply; one line when a node group's new version is applied by all its Envoys; a NACK on
one line naming the object and the file the rejected resource came from. With a real Envoy."""

from __future__ import annotations

import io
import json
import logging
import socket

import pytest

from controlplane.runtime.logs import JsonFormatter
from controlplane.runtime.pipeline import Pipeline, cancel, feed
from controlplane.sources.files import DirectorySource
from controlplane.xds import SnapshotCache, XdsServer
from tests.harness import eventually, free_port, write
from tests.objects import NS, backend, endpoint_slice, gateway, ready, service

pytestmark = pytest.mark.envoy


@pytest.fixture
def json_log():
    """Every record of the control plane's loggers, as `--log-format json` writes it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("controlplane")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in out.getvalue().splitlines()]  # each line parses, or the test fails
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_json_lines_name_the_envoy_the_rollout_and_the_object_a_nack_came_from(json_log, envoys, backends,
                                                                                   tmp_path):
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    server = XdsServer(cache, address="127.0.0.1:0", describe=pipeline.describe)
    await server.start()
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    source = DirectorySource(manifests, interval=0.05)
    _coalescer, tasks = feed(source, pipeline)
    pod = backends("api-1")
    port = free_port()
    write(manifests / "gateway.yaml", gateway(port=port))
    write(manifests / "api.yaml", backend("api", routes=[{"pathPrefix": "/"}]), service("api"),
          endpoint_slice("api", [ready("127.0.0.1")], port=pod.port))
    try:
        envoys(server.port, node_cluster="edge", node_id="envoy-json")

        def lines(containing: str) -> list[dict]:
            return [entry for entry in json_log() if containing in entry["message"]]
        [connected] = await eventually(lambda: lines("connected over"), what="the connection logged")
        assert (connected["node"], connected["group"], connected["level"]) == ("envoy-json", "edge", "INFO")

        # A new version: one line once the Envoy applied it, saying how long it took.
        routes = [{"pathPrefix": "/"}, {"path": "/login", "priority": "High"}]
        write(manifests / "api.yaml", backend("api", routes=routes), service("api"),
              endpoint_slice("api", [ready("127.0.0.1")], port=pod.port))
        [applied] = await eventually(lambda: lines("applied by all 1 Envoy in"), what="the rollout's line")
        assert applied["group"] == "edge" and applied["version"] in applied["message"]

        # A listener the Envoy cannot bind: the NACK names the Gateway and its file.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            listeners = [{"name": "http", "port": port, "address": "127.0.0.1"},
                         {"name": "busy", "port": taken.getsockname()[1], "address": "127.0.0.1"}]
            write(manifests / "gateway.yaml", gateway(listeners=listeners))
            [nack] = await eventually(lambda: lines("rejected listeners"), what="the NACK's line")
            [rejected_rollout] = await eventually(lambda: lines("rejected by 1 of its 1 Envoys"),
                                                  what="the rollout's rejection")
        assert nack["level"] == "WARNING"
        assert (nack["node"], nack["group"], nack["type"]) == ("envoy-json", "edge", "listeners")
        assert nack["version"] and nack["version"] in nack["message"]
        assert f"It came from Gateway {NS}/edge (in {manifests / 'gateway.yaml'})." in nack["message"]
        assert "cannot bind" in nack["message"] and "\n" not in nack["message"]
        assert rejected_rollout["level"] == "WARNING"
        for entry in json_log():
            assert set(entry) >= {"time", "level", "logger", "message"}
    finally:
        await cancel(tasks)
        await server.stop(0)
