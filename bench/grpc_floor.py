"""The memory floor of grpc.aio itself: RSS per idle bidirectional stream, one connection each.

Context for the per-stream figure of bench/xds_fanout.py: what a stream costs before the
control plane keeps any state for it. Each client sends what an Envoy sends first (~60 KB: its
node), gets an xDS-sized response (18 KB) and ACKs it (2 KB); the server keeps nothing.

    python bench/grpc_floor.py [--streams 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys

import grpc
from xds_fanout import raise_fd_limit, rss_bytes  # the same measurement as the fan-out benchmark

METHOD = "/bench.Echo/Stream"


async def clients(port: int, count: int) -> None:
    raise_fd_limit()
    held = []
    for _ in range(count):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        call = channel.stream_stream(METHOD)()
        await call.write(b"n" * 60_000)
        await call.read()
        await call.write(b"a" * 2_000)
        held.append((channel, call))
    print("ready", flush=True)
    await asyncio.Event().wait()


async def measure(count: int) -> float:
    raise_fd_limit()

    async def respond_to_first(requests, context):
        async for request in requests:
            if len(request) > 10_000:
                await context.write(b"r" * 18_000)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(respond_to_first)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    baseline = rss_bytes()
    child = await asyncio.create_subprocess_exec(sys.executable, __file__, "--role", "clients", "--port", str(port),
                                                 "--streams", str(count), stdout=subprocess.PIPE)
    assert (await child.stdout.readline()).strip() == b"ready"
    await asyncio.sleep(1)
    per_stream = (rss_bytes() - baseline) / count
    child.kill()
    await child.wait()
    await server.stop(0)
    return per_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--role", choices=["server", "clients"], default="server", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "clients":
        asyncio.run(clients(args.port, args.streams))
        return
    per_stream = asyncio.run(measure(args.streams))
    print(f"grpc {grpc.__version__}, {args.streams} idle streams, one connection each: "
          f"{per_stream / 1024:.1f} KiB per stream")


if __name__ == "__main__":
    main()
