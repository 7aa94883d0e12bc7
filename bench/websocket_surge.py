"""The WebSocket surge of the postmortem, replayed at scale through one real Envoy: do logins survive it?

Agents' WebSockets ramp up to `--websockets` (9,000 by default) in steps through a real Envoy on
127.0.0.1, to two backend pods (sample backends, each a process of its own: a pod restart is a
kill), while logins (`GET /login`) are probed at a steady rate from a process of their own. The
client side is `controlplane surge`'s own code (controlplane/surge.py). Three setups:

- "shared": the classic gateway, built with the builders: upgrades allowed on the API route, so
  WebSockets and logins draw on one budget, the API's (6,000 connections);
- "split": the Backend with a `websocket` block, translated from manifests as `serve` does: the
  API keeps its budget, WebSockets get a cluster and a budget of their own, sized for two pods of
  5,000 (10,000 connections, fixed);
- "split + perEndpoint + pod restart": the WebSocket budget is `perEndpoint: 5,000` (× ready pods);
  mid-surge one pod restarts (its endpoint leaves the EndpointSlice and it is killed: its agents
  are cut off and reconnect at the next step), so the budget halves and the pod left never holds
  more than its 5,000.

Envoy holds two open files per WebSocket: the soft limit of open files is raised to the hard one
(Envoy and the pods inherit it), printed, and the ramp stops below it. Every loop is bounded in
count and time (the surge module's bounds; pods and Envoy are stopped in `finally`).

    python bench/websocket_surge.py --plot docs/websocket_surge.png     # 9,000 WebSockets, ~5 minutes
    python bench/websocket_surge.py --websockets 300 --step 100         # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402

from controlplane import surge  # noqa: E402
from controlplane.runtime.envoy_process import EnvoyProcess  # noqa: E402
from controlplane.runtime.pipeline import Pipeline  # noqa: E402
from controlplane.sources.store import Store  # noqa: E402
from controlplane.translate import builders as b  # noqa: E402
from controlplane.xds import Snapshot, SnapshotCache, XdsServer  # noqa: E402

GROUP = "edge"
POD_CAPACITY = 5_000  # WebSockets one pod can hold
API_BUDGET = {"maxConnections": 6_000, "maxPendingRequests": 1_000, "maxRequests": 6_000}
WEBSOCKET_BUDGETS = {
    "split": {"maxConnections": 2 * POD_CAPACITY, "maxPendingRequests": 1_000, "maxRequests": 2 * POD_CAPACITY},
    "split + perEndpoint + pod restart": {"perEndpoint": {
        "maxConnections": POD_CAPACITY, "maxPendingRequests": 500, "maxRequests": POD_CAPACITY}},
}
SETUPS = ("shared", "split", "split + perEndpoint + pod restart")

# A pod: the sample backend in a process of its own, with a real server's listen backlog (the
# standard library's 5 drops the SYNs of a burst) and small thread stacks (a thread per WebSocket).
# Each line on its stdin is answered with the WebSockets it holds now and the most it held at once.
POD = """
import socketserver, sys, threading
threading.stack_size(256 * 1024)
socketserver.TCPServer.request_queue_size = 4096
from controlplane.runtime.sample_backend import SampleBackend
pod = SampleBackend(sys.argv[1])
print(pod.port, flush=True)
for _ in sys.stdin:
    print(pod.websockets_open, pod.most_websockets_open, flush=True)
"""


class Pod:
    def __init__(self, name: str):
        self.name = name
        self.process = subprocess.Popen([sys.executable, "-c", POD, name], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.port = int(self.process.stdout.readline())

    def websockets(self) -> tuple[int, int]:
        """(held now, the most held at once)."""
        self.process.stdin.write("?\n")
        self.process.stdin.flush()
        now, most = self.process.stdout.readline().split()
        return int(now), int(most)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.terminate()
            self.process.wait(timeout=10)


def split_objects(setup: str, port: int, pods: list[Pod]) -> list[dict]:
    """The manifests of a split setup, as a user writes them: one EndpointSlice per pod."""
    meta = {"namespace": "shop"}
    slices = [{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": pod.name, "labels": {"kubernetes.io/service-name": "api"}, **meta},
               "addressType": "IPv4", "ports": [{"name": "http", "port": pod.port}],
               "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]} for pod in pods]
    return [
        {"apiVersion": "xds.controlplane.dev/v1alpha1", "kind": "Gateway", "metadata": {"name": "edge", **meta},
         "spec": {"nodeCluster": GROUP, "listeners": [{"name": "http", "port": port, "address": "127.0.0.1"}]}},
        {"apiVersion": "xds.controlplane.dev/v1alpha1", "kind": "Backend", "metadata": {"name": "api", **meta},
         "spec": {"gateway": "edge", "service": {"name": "api", "port": 80}, "routes": [{"pathPrefix": "/"}],
                  "circuitBreakers": {"default": API_BUDGET},
                  "websocket": {"circuitBreakers": WEBSOCKET_BUDGETS[setup]}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", **meta},
         "spec": {"ports": [{"name": "http", "port": 80}]}},
        *slices,
    ]


def shared_snapshot(port: int, pods: list[Pod]) -> Snapshot:
    """The classic setup: upgrades allowed on the API route, one cluster, one budget."""
    budget = b.thresholds(base_pb2.DEFAULT, max_connections=API_BUDGET["maxConnections"],
                          max_pending_requests=API_BUDGET["maxPendingRequests"],
                          max_requests=API_BUDGET["maxRequests"])
    return Snapshot(
        clusters=[b.eds_cluster("shop/api", budgets=[budget])],
        endpoints=[b.load_assignment("shop/api", [("127.0.0.1", pod.port) for pod in pods])],
        listeners=[b.http_listener("http", address="127.0.0.1", port=port, route_config_name="http")],
        routes=[b.route_configuration("http", [b.virtual_host("all", [
            b.websocket_route("shop/api", prefix="/"), b.route("shop/api", prefix="/")])])])


@dataclass
class Outcome:
    steps: list[surge.Step]
    most_on_one_pod: list[int] = field(default_factory=list)  # per step: the most any pod held so far
    restarted_after: int | None = None


async def wait_for_logins(port: int, envoy: EnvoyProcess) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(timeout=1) as http:
        while time.monotonic() < deadline:
            if envoy.process.poll() is not None:
                raise SystemExit(f"Envoy exited:\n{envoy.log_tail()}")
            try:
                if (await http.get(f"http://127.0.0.1:{port}/login")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"no answer through Envoy after 30 s:\n{envoy.log_tail()}")


async def run(setup: str, args: argparse.Namespace) -> Outcome:
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    pods = [Pod("api-1"), Pod("api-2")]
    cache = SnapshotCache()
    server = XdsServer(cache, address="127.0.0.1:0")
    await server.start()
    port = _free_port()
    pipeline = Pipeline(cache)
    if setup == "shared":
        cache.set_snapshot(GROUP, shared_snapshot(port, pods))
    else:
        pipeline.publish(Store(split_objects(setup, port, pods)).view())
    workdir = Path(tempfile.mkdtemp(prefix="websocket-surge-"))
    envoy = EnvoyProcess(workdir, xds_port=server.port, admin_port=_free_port(), node_cluster=GROUP)
    settings = surge.Settings(websocket_url=f"ws://127.0.0.1:{port}/agents",
                              probe_url=f"http://127.0.0.1:{port}/login", connections=args.websockets,
                              step=args.step, rate=args.rate, hold=args.hold, timeout=args.timeout,
                              open_rate=args.open_rate)
    steps_total = math.ceil(args.websockets / args.step)
    outcome = Outcome(steps=[])
    live = list(pods)
    most = 0

    async def between_steps(number: int) -> None:
        nonlocal most
        if number == 0 and args.generator_nice:
            # The agents' side stands in for machines of their own: from the first surge step on,
            # this process (the WebSocket generator, and the xDS server beside it) yields the CPU to
            # Envoy, the pods and the login probe (a process started before this, at nice 0).
            os.setpriority(os.PRIO_PROCESS, 0, args.generator_nice)
        most = max([most, *(pod.websockets()[1] for pod in live)])
        outcome.most_on_one_pod.append(most)
        if setup.endswith("pod restart") and number == steps_total // 2 and len(live) == 2:
            restarted = live.pop()  # its endpoint leaves the EndpointSlice, then the pod dies
            pipeline.publish(Store(split_objects(setup, port, live)).view())
            await asyncio.sleep(0.2)
            restarted.kill()
            outcome.restarted_after = number

    try:
        await wait_for_logins(port, envoy)
        await surge.preflight(settings)
        outcome.steps = await surge.surge(settings, progress=surge.Progress(sys.stderr),
                                          between_steps=between_steps)
        if len(outcome.most_on_one_pod) < len(outcome.steps):  # the last step has no step after it
            outcome.most_on_one_pod.append(max([most, *(pod.websockets()[1] for pod in live)]))
    finally:
        envoy.stop()
        await server.stop(0)
        for pod in pods:
            pod.stop()
        _restore_priority(niceness)
    return outcome


def _restore_priority(niceness: int) -> None:
    """Back to `niceness` for the next setup's Envoy, pods and probe (they inherit it): lowering it
    needs root (CAP_SYS_NICE); without it, say that the next setups' figures are not comparable."""
    if os.getpriority(os.PRIO_PROCESS, 0) == niceness:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except PermissionError:
        print(f"Cannot go back to niceness {niceness} without root: run one setup per command "
              "(--setups) or --generator-nice 0 to compare setups.", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def markdown(outcomes: dict[str, Outcome]) -> str:
    lines = ["| setup | WebSockets asked | open | failed (this step) | dropped | most on one pod | logins ok | "
             "login p50 | login p99 | p99 while held |", "|---|---|---|---|---|---|---|---|---|---|"]
    for setup, outcome in outcomes.items():
        for step, most in zip(outcome.steps, outcome.most_on_one_pod):
            restart = " (pod restart after it)" if step.number == outcome.restarted_after else ""
            success = "-" if step.login_success is None else f"{step.login_success:.1f}%"
            lines.append(f"| {setup} | {step.target}{restart} | {step.open} | {step.failed} | {step.dropped} | "
                         f"{most} | {success} ({step.logins_ok}/{step.logins}) | {_ms(step.p50_ms)} | "
                         f"{_ms(step.p99_ms)} | {_ms(step.p99_held_ms)} |")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--websockets", type=int, default=9_000)
    parser.add_argument("--step", type=int, default=1_000)
    parser.add_argument("--hold", type=float, default=3.0, help="seconds each step holds its WebSockets")
    parser.add_argument("--rate", type=float, default=50.0, help="login probes per second")
    parser.add_argument("--open-rate", type=float, default=500.0, help="WebSockets opened per second at most")
    parser.add_argument("--timeout", type=float, default=1.0,
                        help="seconds a handshake or a login may take (a WebSocket waiting for a budget gives up then)")
    parser.add_argument("--generator-nice", type=int, default=10,
                        help="niceness of the WebSocket generator from the first surge step (0: compete with "
                             "Envoy for the CPU as it would not from agents' own machines)")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of: {', '.join(SETUPS)}")
    parser.add_argument("--plot", type=Path, help="write the PNG here (docs/websocket_surge.png)")
    args = parser.parse_args()
    files = surge.raise_open_file_limit()
    ceiling = (files.soft - surge.SPARE_FILES) // 2  # Envoy: a downstream and an upstream socket per WebSocket
    print(f"Open files: soft limit {files.soft} (raised from {files.was}; hard {files.hard}); Envoy holds two per "
          f"WebSocket, so at most {ceiling} WebSockets.")
    if args.websockets > ceiling:
        print(f"Stopping at {ceiling} WebSockets instead of {args.websockets}.")
        args.websockets = ceiling
    print(f"{args.websockets} WebSockets in steps of {args.step}, each held {args.hold:g} s; logins probed "
          f"{args.rate:g}/s. API budget {API_BUDGET}; pod capacity {POD_CAPACITY}.", flush=True)
    outcomes: dict[str, Outcome] = {}
    for setup in args.setups.split(","):
        if setup not in SETUPS:
            raise SystemExit(f"--setups: {setup!r} is not one of {', '.join(SETUPS)}")
        started = time.monotonic()
        outcomes[setup] = asyncio.run(run(setup, args))
        print(f"{setup}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    print(markdown(outcomes))
    for setup, outcome in outcomes.items():
        for what, summary in (("WebSockets that failed to open", surge.failure_summary(outcome.steps)),
                              ("logins that failed", surge.failure_summary(outcome.steps, logins=True))):
            if summary:
                print(f"{setup}: {what}: {summary}")
    if args.plot is not None:
        surge.plot({setup: outcome.steps for setup, outcome in outcomes.items()}, args.plot,
                   title=f"{args.websockets} WebSockets through one Envoy: logins")
        print(f"Plot: {args.plot}")


if __name__ == "__main__":
    main()
