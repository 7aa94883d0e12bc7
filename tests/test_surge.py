"""`controlplane surge` as a user runs it before a migration: a process of its own against a real
Envoy (or a sample backend), its per-step table on stdout, its exit status, and one clear line
when it cannot start.

The command runs through `surge.add_parser` and `surge.run`, as the `controlplane` entry point
calls them, in a child process: its exit status, stdout and stderr are what a user sees, and
Ctrl-C reaches it as a signal. Every run is small (at most 60 WebSockets) and given 120 s.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import sys
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from controlplane.translate import builders as b
from controlplane.xds import Snapshot
from tests.certs import issue
from tests.harness import eventually, free_port, write
from tests.objects import backend, endpoint_slice, gateway, ready, service
from tests.test_envoy_xds import body_of

LAUNCHER = ("import argparse, sys\n"
            "{prelude}\n"
            "from controlplane import surge\n"
            "parser = argparse.ArgumentParser(prog='controlplane')\n"
            "surge.add_parser(parser.add_subparsers())\n"
            "sys.exit(surge.run(parser.parse_args(sys.argv[1:])))\n")
QUICK = ["--hold", "0.5", "--rate", "20", "--timeout", "3"]


@pytest.fixture(autouse=True)
def listen_backlog(monkeypatch):
    """Sample backends that accept a burst of connections, as a real server does (the standard
    library's backlog of 5 drops SYNs of a burst: a second's retransmit, past Envoy's 1 s connect
    timeout)."""
    monkeypatch.setattr(ThreadingHTTPServer, "request_queue_size", 1024)


async def surge(*args: str, prelude: str = "") -> tuple[int, str, str]:
    """Run `controlplane surge ARGS`: its exit status, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCHER.format(prelude=prelude), "surge", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    return process.returncode, out.decode(), err.decode()


def rows(out: str) -> list[dict[str, str]]:
    """The per-step table, one dict per step, keyed by column."""
    lines = out.splitlines()
    start = next(number for number, line in enumerate(lines) if line.split()[:2] == ["step", "target"])
    columns = ["step", "target", "open", "opened", "failed", "dropped", "logins", "ok", "p50", "p99", "p99_held"]
    table = []
    for line in lines[start + 1:]:
        cells = line.replace(" (interrupted)", "+interrupted").split()
        if len(cells) != len(columns):
            break
        table.append(dict(zip(columns, cells)))
    return table


async def split_gateway(served, envoys, api, *, websocket_budget: dict) -> int:
    """A Gateway whose Backend splits WebSockets onto their own cluster and budget; its port."""
    source, _pipeline, server = served
    port = free_port()
    write(source.directory / "gateway.yaml", gateway(port=port))
    write(source.directory / "api.yaml",
          backend("api", routes=[{"path": "/login"}, {"pathPrefix": "/agents"}],
                  websocket={"circuitBreakers": websocket_budget}),
          service("api"), endpoint_slice("api", [ready("127.0.0.1")], port=api.port))
    envoys(server.port, node_cluster="edge")
    assert await eventually(lambda: body_of(port, "/login"), what="logins through Envoy") == "api"
    return port


@pytest.mark.envoy
async def test_a_surge_through_envoy_prints_each_step_and_draws_it(served, envoys, backends, tmp_path):
    api = backends("api")
    port = await split_gateway(served, envoys, api, websocket_budget={"maxConnections": 1000})
    picture = tmp_path / "surge.png"

    code, out, err = await surge("--websocket-url", f"ws://127.0.0.1:{port}/agents", "--connections", "60",
                                 "--step", "20", "--probe-url", f"http://127.0.0.1:{port}/login",
                                 "--plot", str(picture), *QUICK)

    assert code == 0, err
    table = rows(out)
    assert [(row["step"], row["target"], row["open"]) for row in table] == [
        ("0", "0", "0"), ("1", "20", "20"), ("2", "40", "40"), ("3", "60", "60")]
    assert all(row["ok"] == "100.0%" and int(row["logins"]) > 0 for row in table)
    assert all(row["p99"] != "-" and row["p99_held"] != "-" for row in table)
    assert api.most_websockets_open == 60  # held through Envoy at the backend, all at once
    assert api.websockets_open == 0  # and closed at the end
    assert "open files: soft limit" in err
    assert "Traceback" not in err
    assert picture.read_bytes().startswith(b"\x89PNG")


@pytest.mark.envoy
async def test_websockets_past_their_own_budget_wait_and_logins_go_on(served, envoys, backends):
    api = backends("api")
    port = await split_gateway(served, envoys, api, websocket_budget={"maxConnections": 30})

    code, out, err = await surge("--websocket-url", f"ws://127.0.0.1:{port}/agents", "--connections", "50",
                                 "--step", "25", "--probe-url", f"http://127.0.0.1:{port}/login", *QUICK)

    assert code == 0, err
    last = rows(out)[-1]
    assert (last["target"], last["open"], last["failed"], last["ok"]) == ("50", "30", "20", "100.0%")
    assert "WebSockets that failed to open: 20 × no answer within 3 s" in out  # waiting for the budget
    assert api.most_websockets_open == 30


@pytest.mark.envoy
async def test_logins_failing_under_one_shared_budget_exit_3(xds, envoys, backends):
    """The outage's setup: upgrades allowed on the API route, so WebSockets and logins share a budget."""
    cache, server = xds
    api = backends("api")
    port = free_port()
    budget = b.thresholds(0, max_connections=20, max_requests=20)
    cache.set_snapshot("edge", Snapshot(
        clusters=[b.eds_cluster("shop/api", budgets=[budget])],
        endpoints=[b.load_assignment("shop/api", [api.address])],
        listeners=[b.http_listener("http", address="127.0.0.1", port=port, route_config_name="http")],
        routes=[b.route_configuration("http", [b.virtual_host("all", [
            b.websocket_route("shop/api", prefix="/"), b.route("shop/api", prefix="/")])])]))
    envoys(server.port, node_cluster="edge")
    assert await eventually(lambda: body_of(port, "/login"), what="logins through Envoy") == "api"

    code, out, err = await surge("--websocket-url", f"ws://127.0.0.1:{port}/agents", "--connections", "40",
                                 "--step", "20", "--probe-url", f"http://127.0.0.1:{port}/login",
                                 "--hold", "1", "--rate", "20", "--timeout", "1")

    assert code == 3, out + err
    table = rows(out)
    assert table[0]["ok"] == "100.0%"  # before the surge
    assert table[-1]["open"] == "20", out  # the budget spent by WebSockets: logins wait for it, most in vain
    assert all(float(row["ok"].rstrip("%")) < 60 for row in table[1:]), out
    assert "logins that failed:" in out


@pytest.mark.envoy
async def test_a_path_envoy_does_not_route_is_one_clear_line(served, envoys, backends):
    api = backends("api")
    port = await split_gateway(served, envoys, api, websocket_budget={"maxConnections": 10})

    code, out, err = await surge("--websocket-url", f"ws://127.0.0.1:{port}/agents", "--connections", "5",
                                 "--probe-url", f"http://127.0.0.1:{port}/nowhere", *QUICK)
    assert code == 1 and out == ""
    assert err.strip().splitlines()[-1] == (
        f"surge: --probe-url http://127.0.0.1:{port}/nowhere answered 404 before the surge: give a URL that "
        "answers 2xx or 3xx (your login page)")

    code, out, err = await surge("--websocket-url", f"ws://127.0.0.1:{port}/nowhere", "--connections", "5",
                                 "--probe-url", f"http://127.0.0.1:{port}/login", *QUICK)
    assert code == 1 and out == ""
    assert f"surge: --websocket-url ws://127.0.0.1:{port}/nowhere: answered HTTP 404 instead of upgrading" in err


@pytest.mark.parametrize(("url_option", "url", "says"), [
    ("--probe-url", "http://127.0.0.1:{closed}/login", "connection refused: is the gateway listening"),
    ("--websocket-url", "ws://127.0.0.1:{closed}/agents", "connection refused: is the gateway listening"),
    ("--probe-url", "htp://127.0.0.1/login", "is not a URL: give http:// or https://HOST[:PORT]/PATH"),
    ("--websocket-url", "http://127.0.0.1/agents", "is not a URL: give ws:// or wss://HOST[:PORT]/PATH"),
    ("--probe-url", "http://127.0.0.1:99999/login", "is not a URL (Port out of range"),
    ("--probe-url", "http://no-such-host.invalid/login", "cannot resolve the host"),
    ("--websocket-url", "wss://127.0.0.1:{plain}/agents", "TLS handshake failed"),
])
async def test_what_cannot_start_is_one_line(backends, url_option, url, says):
    plain = backends("api")
    urls = {"--websocket-url": f"ws://127.0.0.1:{plain.port}/agents",
            "--probe-url": f"http://127.0.0.1:{plain.port}/login"}
    urls[url_option] = url.format(closed=free_port(), plain=plain.port)

    code, out, err = await surge(*(part for option, value in urls.items() for part in (option, value)),
                                 "--connections", "5", *QUICK)

    assert code == 1 and out == ""
    error = [line for line in err.strip().splitlines() if not line.startswith("open files: ")]
    assert len(error) == 1 and error[0].startswith(f"surge: {url_option} "), err
    assert says in err


async def test_wss_needs_the_ca_that_signed_the_gateway(backends, tmp_path):
    ca = issue("surge test CA", ca=True)
    server = issue("localhost", issuer=ca)
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    (tmp_path / "server.pem").write_bytes(server.cert_pem + server.key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "server.pem")
    gateway_tls = backends("api", tls=context)
    urls = ["--websocket-url", f"wss://localhost:{gateway_tls.port}/agents",
            "--probe-url", f"https://localhost:{gateway_tls.port}/login"]

    code, out, err = await surge(*urls, "--connections", "5", *QUICK)
    assert code == 1 and out == ""
    assert "TLS: the server's certificate is not trusted (unable to get local issuer certificate): give --ca " \
           "FILE with the CA that signed it" in err

    code, out, err = await surge(*urls, "--connections", "4", "--step", "2", "--ca", str(tmp_path / "ca.pem"),
                                 *QUICK)
    assert code == 0, err
    assert [row["open"] for row in rows(out)] == ["0", "2", "4"]

    code, out, err = await surge(*urls, "--connections", "4", "--ca", str(tmp_path / "server.pem.missing"),
                                 *QUICK)
    assert code == 1 and f"surge: --ca {tmp_path / 'server.pem.missing'}: no such file" in err


async def test_ctrl_c_ends_cleanly_with_the_table_so_far(backends):
    api = backends("api")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCHER.format(prelude=""), "surge",
        "--websocket-url", f"ws://127.0.0.1:{api.port}/agents", "--probe-url", f"http://127.0.0.1:{api.port}/login",
        "--connections", "40", "--step", "10", "--hold", "2", "--rate", "20",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    progress = []
    while not any(line.startswith("step 2/4: 20 WebSockets") for line in progress):  # bounded: step 2 begins
        line = await asyncio.wait_for(process.stderr.readline(), timeout=60)
        assert line, f"surge ended early: {progress}"
        progress.append(line.decode())
    process.send_signal(signal.SIGINT)  # during step 2
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)

    assert process.returncode == 130
    table = rows(out.decode())
    assert [row["step"] for row in table] == ["0", "1", "2+interrupted"]
    assert table[1]["open"] == "10" and table[1]["ok"] == "100.0%"
    assert "interrupted; the table shows the steps so far" in err.decode()
    assert "Traceback" not in err.decode()
    await eventually(lambda: api.websockets_open == 0, what="the WebSockets closed")


async def test_the_surge_stops_below_the_open_file_limit(backends):
    api = backends("api")
    code, out, err = await surge(
        "--websocket-url", f"ws://127.0.0.1:{api.port}/agents", "--probe-url", f"http://127.0.0.1:{api.port}/login",
        "--connections", "5000", "--step", "1000", *QUICK,
        prelude="import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (100, 200))")

    assert code == 0, err
    assert "open files: soft limit 200 (raised from 100; hard limit 200)" in err
    assert "--connections 5000 would pass the open-file limit: stopping at 136 WebSockets" in err
    assert [(row["target"], row["open"]) for row in rows(out)] == [("0", "0"), ("136", "136")]


async def test_plot_without_matplotlib_says_how_to_get_it(backends, tmp_path):
    api = backends("api")
    code, out, err = await surge(
        "--websocket-url", f"ws://127.0.0.1:{api.port}/agents", "--probe-url", f"http://127.0.0.1:{api.port}/login",
        "--connections", "5", "--plot", str(tmp_path / "surge.png"), *QUICK,
        prelude="sys.modules['matplotlib'] = None")

    assert code == 1 and out == ""
    assert err.strip() == ("surge: --plot needs matplotlib, which is not installed: pip install "
                           "'controlplane[plot]' (or leave out --plot)")
    assert not Path(tmp_path / "surge.png").exists()
