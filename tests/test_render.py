"""`controlplane render`: what the control plane sends, shown so it can be compared with what runs.

`--format config-dump` is keyed like Envoy's admin `/config_dump?include_eds`: the test diffs it
with a real Envoy's dump of the same manifests (only what a running Envoy adds taken out), and
`--source kubernetes` with the same objects read from a real API server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from controlplane import cli
from tests.certs import ca_secret, issue, tls_secret
from tests.harness import eventually, free_port, write
from tests.objects import backend, endpoint_slice, gateway, ready, service
from tests.test_envoy_tls import CA, client_context, https_body

pytestmark = pytest.mark.envoy

DYNAMIC = {"ClustersConfigDump": "dynamic_active_clusters", "EndpointsConfigDump": "dynamic_endpoint_configs",
           "ListenersConfigDump": "dynamic_listeners", "RoutesConfigDump": "dynamic_route_configs",
           "SecretsConfigDump": "dynamic_active_secrets"}


README_JQ_FILTER = next(line for line in (Path(__file__).parents[1] / "README.md").read_text().splitlines()
                        if line.startswith("curl -s 'localhost:9901")).split(" jq '", 1)[1].rsplit("' >", 1)[0]
"""The jq program the README gives users to make a running Envoy's /config_dump diff with render's."""


def dynamic_part(dump: dict) -> dict:
    """A running Envoy's /config_dump without what only it has: versions, times, static resources."""
    kept = []
    for config in dump["configs"]:
        dump_type = config["@type"].rpartition(".")[2]
        if dump_type not in DYNAMIC:
            continue
        entries = []
        for entry in config.get(DYNAMIC[dump_type], []):
            entry = {key: value for key, value in entry.items() if key not in ("version_info", "last_updated")}
            if "active_state" in entry:
                entry["active_state"] = {"listener": entry["active_state"]["listener"]}
            entries.append(entry)
        if dump_type == "SecretsConfigDump":  # Envoy lists them in an order of its own
            entries.sort(key=lambda entry: entry["name"])
        kept.append({"@type": config["@type"], **({DYNAMIC[dump_type]: entries} if entries else {})})
    return {"configs": kept}


def manifests(api_port: int, https_port: int, certificate) -> list[dict]:
    return [
        gateway(listeners=[{"name": "https", "port": https_port, "address": "127.0.0.1", "protocol": "HTTPS",
                            "tls": {"certificateSecret": "edge-cert", "clientCaSecret": "agents"}}]),
        backend("api", routes=[{"pathPrefix": "/"}], websocket={}), service("api"),
        endpoint_slice("api", [ready("127.0.0.1")], port=api_port),
        tls_secret("edge-cert", certificate.cert_pem, certificate.key_pem), ca_secret("agents", CA.cert_pem)]


def rendered(capsys, *argv: str) -> dict:
    code = cli.main(["render", *argv, "--node-cluster", "edge", "--format", "config-dump"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


async def test_render_config_dump_is_what_a_real_envoy_runs_with_keys_redacted(served, envoys, backends, tmp_path,
                                                                                capsys):
    source, _pipeline, server = served
    api, https = backends("api"), free_port()
    certificate = issue("localhost", issuer=CA)
    write(source.directory / "all.yaml", *manifests(api.port, https, certificate))
    envoy = envoys(server.port, node_cluster="edge")
    agent = issue("agent-7", issuer=CA, client=True)
    assert await eventually(lambda: https_body(https, client_context(tmp_path, agent)),
                            what="mutual TLS through Envoy") == "api"
    running = dynamic_part((await envoy.admin.get("/config_dump?include_eds")).json())

    from_files = rendered(capsys, "--source", str(source.directory))
    assert from_files == running
    if shutil.which("jq"):  # the README's own command gives the same (where jq is installed)
        dumped_by_envoy = (await envoy.admin.get("/config_dump?include_eds")).text
        normalized = subprocess.run(["jq", README_JQ_FILTER], input=dumped_by_envoy, capture_output=True, text=True,
                                    check=True).stdout
        assert json.loads(normalized) == from_files
    dumped = json.dumps(from_files)
    assert certificate.key_pem.decode().splitlines()[1] not in dumped and "W3JlZGFjdGVkXQ==" in dumped


def test_render_from_a_real_api_server_equals_render_from_the_same_manifests(real_kube, kube_namespace, tmp_path,
                                                                              capsys):
    """`render --source kubernetes` as the shipped ServiceAccount reads the objects: the same output
    as the same objects in files (endpoints on TEST-NET: the API server refuses loopback ones)."""
    objects = manifests(8080, 8443, issue("edge.example", issuer=CA))
    objects[3] = endpoint_slice("api", [ready("192.0.2.10")], port=8080)
    for obj in objects:
        obj["metadata"]["namespace"] = kube_namespace
        real_kube.create(obj)
    write(tmp_path / "all.yaml", *objects)

    from_files = rendered(capsys, "--source", str(tmp_path))
    from_cluster = rendered(capsys, "--source", "kubernetes", "--namespace", kube_namespace,
                            "--kubeconfig", str(real_kube.kubeconfig("controlplane")))
    assert from_cluster == from_files
    assert any(entry["cluster"]["name"] == f"{kube_namespace}/api"
               for entry in from_cluster["configs"][0]["dynamic_active_clusters"])


def test_render_from_an_api_server_that_does_not_answer_is_one_line(tmp_path, capsys):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "https://127.0.0.1:{free_port()}", insecure-skip-tls-verify: true}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
""")
    code = cli.main(["render", "--source", "kubernetes", "--kubeconfig", str(kubeconfig), "--node-cluster", "edge"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("controlplane render: cannot read the cluster's objects (") and \
        "Traceback" not in err
