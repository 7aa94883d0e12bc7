"""The floor of grpc.aio itself: memory per stream, and CPU per stream per push, one connection each.

Context for the figures of bench/xds_fanout.py: what a stream costs before the control plane
keeps any state or runs any protocol. Each client sends what an Envoy sends first (~60 KB: its
node), gets an xDS-sized response (18 KB) and ACKs it (2 KB); the server keeps nothing. Then, in
each round, the server pushes 300 bytes (one endpoint set) to every stream and every client
ACKs it (2 KB); the figure is the server process's CPU time per stream per round. The server is
shaped like `XdsServer`: one task per stream reads; a push is a short-lived task that writes.

    python bench/grpc_floor.py [--streams 1000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import grpc
from xds_fanout import raise_fd_limit, rss_bytes  # the same measurement as the fan-out benchmark

METHOD = "/bench.Echo/Stream"


async def clients(port: int, count: int) -> None:
    raise_fd_limit()
    received = [0] * count

    async def client(index: int) -> None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        call = channel.stream_stream(METHOD)()
        await call.write(b"n" * 60_000)
        async for _response in call:
            await call.write(b"a" * 2_000)
            received[index] += 1

    tasks = [asyncio.create_task(client(index)) for index in range(count)]
    while min(received) < 1:
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while (line := (await reader.readline()).decode().strip()) != "done":
        while min(received) < int(line):
            await asyncio.sleep(0.002)
        print("round", flush=True)
    for task in tasks:
        task.cancel()


async def measure(count: int, rounds: int) -> tuple[float, float]:
    """(bytes of RSS per idle stream, seconds of server CPU per stream per push)."""
    raise_fd_limit()
    pushes = []

    async def handler(requests, context):
        loop = asyncio.get_running_loop()
        one_write_at_a_time = asyncio.Lock()  # gRPC refuses a write while one is in flight

        async def write(payload: bytes) -> None:
            async with one_write_at_a_time:
                await context.write(payload)

        pushes.append(lambda: loop.create_task(write(b"p" * 300)))
        async for request in requests:
            if len(request) > 10_000:
                await write(b"r" * 18_000)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(handler)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    baseline = rss_bytes()
    child = await asyncio.create_subprocess_exec(sys.executable, __file__, "--role", "clients", "--port", str(port),
                                                 "--streams", str(count), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert (await child.stdout.readline()).strip() == b"ready"
    await asyncio.sleep(1)
    per_stream = (rss_bytes() - baseline) / count

    cpu = 0.0
    for round_number in range(2, rounds + 2):  # every client has had one response already
        started = time.process_time()
        for push in pushes:
            push()
        child.stdin.write(f"{round_number}\n".encode())
        await child.stdin.drain()
        assert (await child.stdout.readline()).strip() == b"round"
        cpu += time.process_time() - started
    child.stdin.write(b"done\n")
    await child.stdin.drain()
    await child.wait()
    await server.stop(0)
    return per_stream, cpu / rounds / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--role", choices=["server", "clients"], default="server", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "clients":
        asyncio.run(clients(args.port, args.streams))
        return
    per_stream, cpu = asyncio.run(measure(args.streams, args.rounds))
    print(f"grpc {grpc.__version__}, {args.streams} streams, one connection each: {per_stream / 1024:.1f} KiB "
          f"per idle stream; {cpu * 1e6:.0f} µs of server CPU per stream per push ({args.rounds} rounds)")


if __name__ == "__main__":
    main()
