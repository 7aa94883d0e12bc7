"""`controlplane surge`: a WebSocket surge against your own gateway, with logins probed throughout.

The postmortem behind this project asked for scalability testing: agents' WebSockets grew past the
backend's connection budget after a migration, and *logins* failed. Before a migration, run this
against the gateway: it opens WebSockets in steps up to `--connections`, holds them, and probes a
login URL at a steady rate the whole time; per step it prints the WebSockets open (and failed,
and dropped by the far end), the share of logins that succeeded and their p50/p99 latency.
Step 0 is the baseline, before any WebSocket opens.

Logins are probed from a child process of their own (`python -m controlplane.surge`), so the CPU
spent opening thousands of WebSockets here never shows up as login latency. At each step the
WebSockets are brought up to the step's target: one dropped by the far end is opened again, as an
agent reconnects. Everything is bounded: at most 100 steps, each with at most 60 s to open its
WebSockets; the connections stop below this process's open-file limit (its soft limit is raised to
the hard one first). Ctrl-C ends the run cleanly with the table so far.

Exit status: 0 when every login succeeded at every step, 3 when some failed (the gateway did not
keep logins apart from the surge), 1 when the surge could not start (a wrong URL, a refused
connection, TLS), 2 for wrong arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.protocol import State

MAX_STEPS = 100
STEP_OPENING_LIMIT = 60.0  # seconds a step may spend opening its WebSockets; the rest count as failed
OPENING_AT_ONCE = 100  # WebSocket handshakes in flight at once: agents reconnecting, not one instant burst
SPARE_FILES = 64  # open files kept for the probe's pipe, DNS, the plot, Python itself
EXIT_LOGINS_FAILED, EXIT_CANNOT_START, EXIT_INTERRUPTED = 3, 1, 130


class SurgeError(Exception):
    """Something the user can fix (a URL, a CA file): one line, no traceback."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "surge", help="open WebSockets in steps against a gateway while probing a login URL (before a migration)",
        description="Open up to N WebSockets in steps against a gateway while probing a login URL; print, per "
        "step, the WebSockets open and failed, the share of logins that succeeded and their p50/p99 latency. "
        "Exit 0 when every login succeeded, 3 when some failed, 1 when the surge could not start, 130 on Ctrl-C.")
    parser.add_argument("--websocket-url", required=True, metavar="URL", help="ws:// or wss:// URL the agents open")
    parser.add_argument("--connections", required=True, type=_count, metavar="N",
                        help="WebSockets to reach (stopped below this process's open-file limit)")
    parser.add_argument("--probe-url", required=True, metavar="URL",
                        help="http:// or https:// URL probed with GET (your login page): a 2xx or 3xx answer is a "
                        "success")
    parser.add_argument("--rate", type=_positive, default=20.0, metavar="R", help="probes per second (default 20)")
    parser.add_argument("--step", type=_count, metavar="S", help="WebSockets added per step (default: N/10)")
    parser.add_argument("--hold", type=_positive, default=5.0, metavar="SECONDS",
                        help="how long each step holds its WebSockets open while probing (default 5)")
    parser.add_argument("--open-rate", type=_positive, metavar="PER_SECOND",
                        help=f"open at most this many WebSockets a second (default: as fast as the gateway answers, "
                        f"{OPENING_AT_ONCE} handshakes at a time)")
    parser.add_argument("--timeout", type=_positive, default=5.0, metavar="SECONDS",
                        help="time a WebSocket handshake or a probe may take (default 5)")
    parser.add_argument("--ca", type=Path, metavar="FILE",
                        help="PEM CA certificates that signed the gateway's certificate (wss://, https://); "
                        "default: the system's")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="draw WebSockets vs login success and p99 (needs matplotlib: pip install "
                        "'controlplane[plot]')")
    return parser


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count from 1 to 1000000")
    return int(text)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0 (at most 3600)")
    return value


@dataclass(frozen=True)
class Settings:
    websocket_url: str
    probe_url: str
    connections: int
    step: int
    rate: float = 20.0
    hold: float = 5.0
    timeout: float = 5.0
    ca: Path | None = None
    open_rate: float | None = None  # WebSockets opened per second at most; None: OPENING_AT_ONCE at a time


@dataclass(frozen=True)
class Step:
    """One step of the surge: its WebSockets at the end of the step, and the logins probed during it."""

    number: int
    target: int
    open: int
    opened: int
    failed: int
    dropped: int
    logins: int
    logins_ok: int
    p50_ms: float | None
    p99_ms: float | None
    p99_held_ms: float | None  # logins while the step held its WebSockets, none opening: the cost of holding
    failures: Mapping[str, int] = field(default_factory=dict)  # why WebSockets failed to open, counted
    login_failures: Mapping[str, int] = field(default_factory=dict)  # 'HTTP 503', 'no answer', counted
    interrupted: bool = False

    @property
    def login_success(self) -> float | None:
        return 100.0 * self.logins_ok / self.logins if self.logins else None


# ----- the command -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        if args.plot is not None:
            _check_plot_target(args.plot)
        files = raise_open_file_limit()
        print(f"open files: soft limit {files.soft} (raised from {files.was}; hard limit {files.hard})",
              file=sys.stderr)
        ceiling = files.soft - SPARE_FILES
        if settings.connections > ceiling:
            print(f"--connections {settings.connections} would pass the open-file limit: stopping at {ceiling} "
                  f"WebSockets", file=sys.stderr)
            settings = _replace_connections(settings, ceiling)
        steps, interrupted = asyncio.run(_run_with_signals(settings))
    except SurgeError as error:
        print(f"surge: {error}", file=sys.stderr)
        return EXIT_CANNOT_START
    print(table(steps))
    for what, summary in (("WebSockets that failed to open", failure_summary(steps)),
                          ("logins that failed", failure_summary(steps, logins=True))):
        if summary:
            print(f"{what}: {summary}")
    if args.plot is not None and steps:
        try:
            plot({"surge": steps}, args.plot, title=f"WebSocket surge: {settings.websocket_url}")
        except OSError as error:
            print(f"surge: --plot {args.plot}: {error.strerror or error}", file=sys.stderr)
            return EXIT_CANNOT_START
        print(f"plot written to {args.plot}", file=sys.stderr)
    if interrupted:
        print("surge: interrupted; the table shows the steps so far", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if all(step.logins_ok == step.logins for step in steps) else EXIT_LOGINS_FAILED


def _settings(args: argparse.Namespace) -> Settings:
    step = args.step or max(1, math.ceil(args.connections / 10))
    if math.ceil(args.connections / step) > MAX_STEPS:
        raise SurgeError(f"--connections {args.connections} in steps of {step} is "
                         f"{math.ceil(args.connections / step)} steps; at most {MAX_STEPS}: raise --step")
    settings = Settings(websocket_url=args.websocket_url, probe_url=args.probe_url, connections=args.connections,
                        step=step, rate=args.rate, hold=args.hold, timeout=args.timeout, ca=args.ca,
                        open_rate=args.open_rate)
    check_urls(settings)
    tls_context(settings.ca)  # a wrong --ca is said now, not at the first wss:// or https:// connection
    return settings


def _replace_connections(settings: Settings, connections: int) -> Settings:
    return Settings(**{**settings.__dict__, "connections": connections,
                       "step": min(settings.step, connections)})


async def _run_with_signals(settings: Settings) -> tuple[list[Step], bool]:
    """The surge, ended early (cleanly, the steps so far kept) by Ctrl-C or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await preflight(settings)
        steps = await surge(settings, stop=stop, progress=Progress(sys.stderr))
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return steps, stop.is_set()


@dataclass(frozen=True)
class OpenFiles:
    was: int
    soft: int
    hard: int


def raise_open_file_limit() -> OpenFiles:
    """Raise this process's soft limit of open files to the hard limit (children inherit it)."""
    was, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(was, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):  # a hard limit of "unlimited" the kernel caps lower: keep the soft one
        wanted = was
    return OpenFiles(was=was, soft=wanted, hard=hard)


# ----- input checks and the first connections ---------------------------------------------------

def check_urls(settings: Settings) -> None:
    for option, url, schemes in (("--websocket-url", settings.websocket_url, ("ws", "wss")),
                                 ("--probe-url", settings.probe_url, ("http", "https"))):
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises ValueError on a port out of range or not a number)
        except ValueError as error:
            raise SurgeError(f"{option} {url!r} is not a URL ({error})") from None
        if parts.scheme not in schemes or not parts.hostname:
            raise SurgeError(f"{option} {url!r} is not a URL: give {' or '.join(s + '://' for s in schemes)}"
                             f"HOST[:PORT]/PATH")


def tls_context(ca: Path | None) -> ssl.SSLContext:
    """The context for wss:// and https://: the system's CAs, or only those of `ca`."""
    if ca is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca))
    except FileNotFoundError:
        raise SurgeError(f"--ca {ca}: no such file") from None
    except (ssl.SSLError, OSError, ValueError) as error:
        raise SurgeError(f"--ca {ca}: not PEM CA certificates ({error})") from None


def _ssl_for(url: str, settings: Settings) -> ssl.SSLContext | None:
    return tls_context(settings.ca) if urlsplit(url).scheme in ("wss", "https") else None


async def preflight(settings: Settings) -> None:
    """One login and one WebSocket before the surge: a wrong URL, a refused connection or a TLS
    problem is said in one line here, instead of as a step of 100% failures."""
    try:
        async with _http_client(settings) as http:
            response = await http.get(settings.probe_url)
    except (httpx.HTTPError, OSError) as error:
        raise SurgeError(f"--probe-url {settings.probe_url}: {explain(error, settings)}") from None
    if response.status_code >= 400:
        raise SurgeError(f"--probe-url {settings.probe_url} answered {response.status_code} before the surge: "
                         f"give a URL that answers 2xx or 3xx (your login page)")
    outcome = await open_websocket(settings)
    if isinstance(outcome, str):
        raise SurgeError(f"--websocket-url {settings.websocket_url}: {outcome}")
    await outcome.close()


def explain(error: BaseException, settings: Settings) -> str:
    """What went wrong connecting, in words a user can act on."""
    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for cause in chain:
        if isinstance(cause, ssl.SSLCertVerificationError):
            hint = "is --ca the CA that signed it?" if settings.ca else "give --ca FILE with the CA that signed it"
            return f"TLS: the server's certificate is not trusted ({cause.verify_message}): {hint}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed ({cause.reason or cause}): is this a TLS port (wss://, https://)?"
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve the host ({cause.strerror})"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused: is the gateway listening on that host and port?"
        if isinstance(cause, InvalidStatus):
            return (f"answered HTTP {cause.response.status_code} instead of upgrading to a WebSocket: is this the "
                    f"path agents open, with WebSockets enabled on its route?")
        if isinstance(cause, InvalidHandshake):
            return f"not a WebSocket handshake ({cause}): is this an HTTP port (ws:// for plain, wss:// for TLS)?"
        if isinstance(cause, (TimeoutError, httpx.TimeoutException)):
            return f"no answer within {settings.timeout:g} s"
        if isinstance(cause, httpx.RemoteProtocolError):
            return f"not an HTTP answer ({cause}): is this an HTTP port (http:// for plain, https:// for TLS)?"
    return f"{type(error).__name__}: {error}"


def _http_client(settings: Settings, *, connections: int = 1) -> httpx.AsyncClient:
    """A client that measures the gateway itself: no proxy from the environment, no redirect followed."""
    verify: ssl.SSLContext | bool = _ssl_for(settings.probe_url, settings) or True
    return httpx.AsyncClient(timeout=settings.timeout, verify=verify, trust_env=False, follow_redirects=False,
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


# ----- WebSockets -------------------------------------------------------------------------------

async def open_websocket(settings: Settings) -> ClientConnection | str:
    """An open WebSocket, or why it failed to open (a short reason)."""
    try:
        return await connect(settings.websocket_url, ssl=_ssl_for(settings.websocket_url, settings),
                             open_timeout=settings.timeout, ping_interval=None, close_timeout=1, proxy=None,
                             compression=None, max_size=1 << 16, max_queue=4)  # small: thousands at once
    except InvalidStatus as refused:
        return f"HTTP {refused.response.status_code}" if refused.response.status_code >= 500 \
            else explain(refused, settings)
    except (OSError, TimeoutError, InvalidHandshake, ssl.SSLError) as error:
        return explain(error, settings)


async def close_all(websockets: Sequence[ClientConnection], *, limit: float = 10.0) -> None:
    """Close every WebSocket, many at once; those not closed within `limit` seconds are cut."""
    if not websockets:
        return
    closing = asyncio.Semaphore(500)

    async def close(websocket: ClientConnection) -> None:
        async with closing:
            await websocket.close()
    tasks = [asyncio.create_task(close(websocket)) for websocket in websockets]
    _done, pending = await asyncio.wait(tasks, timeout=limit)
    for task in pending:
        task.cancel()
    for websocket in websockets:
        if websocket.state is not State.CLOSED:
            websocket.transport.abort()
    await asyncio.gather(*pending, return_exceptions=True)


# ----- the surge ----------------------------------------------------------------------------------

@dataclass
class _Window:
    """A step while it runs: its WebSockets, and when it began and ended (its logins come later)."""

    target: int
    started: float
    holding_from: float = 0.0
    ended: float = 0.0
    opened: int = 0
    dropped: int = 0
    failures: Counter = field(default_factory=Counter)
    open: int = 0
    interrupted: bool = False


BetweenSteps = Callable[[int], Awaitable[None]]


async def surge(settings: Settings, *, stop: asyncio.Event | None = None, progress: Progress | None = None,
                between_steps: BetweenSteps | None = None) -> list[Step]:
    """Step 0 (no WebSockets), then steps of `settings.step` more WebSockets up to
    `settings.connections`, each held `settings.hold` seconds, logins probed throughout.
    `between_steps(number)` runs after each step (a benchmark restarts a pod there). Returns the
    steps run; when `stop` is set, the step under way ends at once (marked interrupted), and so
    does the surge. A step's logins are those probed while it ran, each awaited to its end."""
    stop = stop or asyncio.Event()
    progress = progress or Progress(None)
    targets = [0, *range(settings.step, settings.connections, settings.step), settings.connections]
    websockets: list[ClientConnection] = []
    windows: list[_Window] = []
    async with Prober(settings) as prober:
        try:
            for number, target in enumerate(targets):
                window = await _one_step(settings, target, websockets, stop=stop,
                                         progress=progress.step(number, len(targets) - 1, target))
                windows.append(window)
                if window.interrupted:
                    break
                if between_steps is not None:
                    await between_steps(number)
        finally:
            progress.done()
            await close_all(websockets)
    return [_summary(number, window, prober.results_between(window.started, window.ended),
                     held=prober.results_between(window.holding_from, window.ended))
            for number, window in enumerate(windows)]


async def _one_step(settings: Settings, target: int, websockets: list[ClientConnection], *,
                    stop: asyncio.Event, progress: StepProgress) -> _Window:
    window = _Window(target=target, started=time.monotonic(), dropped=_forget_closed(websockets))

    async def open_one(index: int, opening: asyncio.Semaphore) -> None:
        if settings.open_rate is not None:  # paced: the index-th opening starts index/open_rate s in
            await asyncio.sleep(index / settings.open_rate)
        async with opening:
            outcome = await open_websocket(settings)
        if isinstance(outcome, str):
            window.failures[outcome] += 1
        else:
            websockets.append(outcome)
            window.opened += 1
        progress.update(len(websockets), window.failures.total())

    opening = asyncio.Semaphore(OPENING_AT_ONCE)
    tasks = [asyncio.create_task(open_one(index, opening)) for index in range(max(0, target - len(websockets)))]
    stopped = asyncio.create_task(stop.wait())
    all_opened = asyncio.ensure_future(asyncio.wait(tasks)) if tasks else None
    try:
        if all_opened is not None:
            await asyncio.wait([all_opened, stopped], timeout=STEP_OPENING_LIMIT,
                               return_when=asyncio.FIRST_COMPLETED)
        window.holding_from = time.monotonic()
        if not stop.is_set():
            await asyncio.wait([stopped], timeout=settings.hold)
    finally:
        stopped.cancel()
        unfinished = [task for task in tasks if not task.done()]
        for task in (*unfinished, *([all_opened] if all_opened is not None else [])):
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        if unfinished and not stop.is_set():
            window.failures[f"not opened within the step's {STEP_OPENING_LIMIT:g} s"] += len(unfinished)
    window.dropped += _forget_closed(websockets)
    window.open, window.ended, window.interrupted = len(websockets), time.monotonic(), stop.is_set()
    progress.finish(window.open, window.failures.total())
    return window


def _forget_closed(websockets: list[ClientConnection]) -> int:
    """Drop the WebSockets the far end closed from `websockets`; how many there were."""
    still_open = [websocket for websocket in websockets if websocket.state is State.OPEN]
    closed = len(websockets) - len(still_open)
    websockets[:] = still_open
    return closed


def _summary(number: int, window: _Window, logins: list[tuple[float, int]], *,
             held: list[tuple[float, int]]) -> Step:
    ok = sorted(latency for latency, status in logins if 200 <= status < 400)
    ok_held = sorted(latency for latency, status in held if 200 <= status < 400)
    return Step(number=number, target=window.target, open=window.open, opened=window.opened,
                failed=window.failures.total(), dropped=window.dropped, logins=len(logins), logins_ok=len(ok),
                p50_ms=percentile(ok, 50), p99_ms=percentile(ok, 99), p99_held_ms=percentile(ok_held, 99),
                failures=dict(window.failures),
                login_failures=dict(Counter(_status_word(status) for _, status in logins
                                            if not 200 <= status < 400)),
                interrupted=window.interrupted)


def _status_word(status: int) -> str:
    return f"HTTP {status}" if status else "no answer"


def percentile(ordered: Sequence[float], percent: float) -> float | None:
    """Nearest rank: the smallest value with at least `percent`% of the values at or below it."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


# ----- logins, probed from a process of their own -----------------------------------------------

class Prober:
    """The login probe, run as `python -m controlplane.surge` in a session of its own (Ctrl-C here
    does not reach it; it ends when its stdin closes). It prints one line per probe: when it
    started (CLOCK_MONOTONIC, the same in every process), its latency in ms, its HTTP status (0:
    no answer)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._results: list[tuple[float, float, int]] = []

    async def __aenter__(self) -> Prober:
        settings = self.settings
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controlplane.surge", settings.probe_url, str(settings.rate),
            str(settings.timeout), str(settings.ca or ""), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            start_new_session=True)
        ready = await asyncio.wait_for(self._process.stdout.readline(), timeout=30)
        if ready.strip() != b"ready":
            await self._process.wait()
            raise SurgeError(f"the login probe did not start ({ready.decode(errors='replace').strip() or 'no output'})")
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for line in self._process.stdout:
            started, latency, status = line.split()
            self._results.append((float(started), float(latency), int(status)))

    async def __aexit__(self, *_exc) -> None:
        """Stop probing; wait for the probes in flight (each ends within the timeout)."""
        self._process.stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout=self.settings.timeout + 5)
            await asyncio.wait_for(self._process.wait(), timeout=5)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
            self._reader.cancel()

    def results_between(self, start: float, end: float) -> list[tuple[float, int]]:
        """(latency ms, status) of the probes started from `start` to `end`."""
        return [(latency, status) for started, latency, status in self._results if start <= started < end]


def _probe_child(argv: list[str]) -> int:
    """The probe process: GET `url` `rate` times a second, each on its own schedule (a slow answer
    never delays the next probe), until stdin closes."""
    url, rate, timeout, ca = argv[0], float(argv[1]), float(argv[2]), argv[3]
    settings = Settings(websocket_url="", probe_url=url, connections=1, step=1, rate=rate, timeout=timeout,
                        ca=Path(ca) if ca else None)
    return asyncio.run(_probe_until_stdin_closes(settings))


async def _probe_until_stdin_closes(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    stdin_closed = asyncio.Event()
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), loop.call_soon_threadsafe(stdin_closed.set)),
                     daemon=True).start()
    in_flight_at_most = math.ceil(settings.rate * settings.timeout) + 1  # more would all have timed out
    out = sys.stdout

    async def probe(http: httpx.AsyncClient) -> None:
        started = time.monotonic()
        try:
            status = (await http.get(settings.probe_url)).status_code
        except (httpx.HTTPError, OSError):
            status = 0
        out.write(f"{started:.6f} {(time.monotonic() - started) * 1000:.3f} {status}\n")
        out.flush()

    async with _http_client(settings, connections=in_flight_at_most) as http:
        try:  # a first connection, unrecorded, so the baseline does not count its setup
            await http.get(settings.probe_url)
        except (httpx.HTTPError, OSError):
            pass
        out.write("ready\n")
        out.flush()
        in_flight: set[asyncio.Task] = set()
        next_probe = time.monotonic()
        while not stdin_closed.is_set():
            if len(in_flight) < in_flight_at_most:
                task = asyncio.create_task(probe(http))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            next_probe += 1 / settings.rate
            await asyncio.wait([asyncio.ensure_future(stdin_closed.wait())],
                               timeout=max(0.0, next_probe - time.monotonic()))
        await asyncio.gather(*in_flight)
    return 0


# ----- what the user sees -------------------------------------------------------------------------

class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, otherwise a line per step (and one
    every 10 s while a step opens its WebSockets)."""

    def __init__(self, stream: TextIO | None):
        self.stream = stream
        self.terminal = stream is not None and stream.isatty()

    def step(self, number: int, last: int, target: int) -> StepProgress:
        return StepProgress(self, number, last, target)

    def write(self, text: str, *, in_place: bool = False) -> None:
        if self.stream is None:
            return
        self.stream.write(f"\r\x1b[K{text}" if in_place else f"{text}\n")
        self.stream.flush()

    def done(self) -> None:
        if self.terminal:
            self.write("", in_place=True)


class StepProgress:
    def __init__(self, progress: Progress, number: int, last: int, target: int):
        self.progress, self.number, self.last, self.target = progress, number, last, target
        self.shown_at = 0.0
        if not progress.terminal:
            progress.write(f"step {number}/{last}: {target} WebSockets")

    def update(self, open_now: int, failed: int) -> None:
        every = 0.1 if self.progress.terminal else 10.0
        if time.monotonic() - self.shown_at >= every:
            self.shown_at = time.monotonic()
            self._show(open_now, failed)

    def finish(self, open_now: int, failed: int) -> None:
        self._show(open_now, failed)

    def _show(self, open_now: int, failed: int) -> None:
        if self.progress.terminal:
            width = 30
            filled = width * min(open_now, self.target) // self.target if self.target else width
            self.progress.write(f"step {self.number}/{self.last} [{'#' * filled}{'.' * (width - filled)}] "
                                f"{open_now}/{self.target} open, {failed} failed", in_place=True)
        else:
            self.progress.write(f"step {self.number}/{self.last}: {open_now}/{self.target} open, {failed} failed")


_COLUMNS = ("step", "target", "open", "opened", "failed", "dropped", "logins", "login ok", "p50 ms", "p99 ms",
            "p99 held")


def table(steps: Sequence[Step]) -> str:
    """The steps as aligned columns: target is the WebSockets asked for, open those open at the
    step's end, opened/failed/dropped what happened during the step; p99 held: the logins' p99
    while the step held its WebSockets (none opening)."""
    rows = [_COLUMNS] + [(
        f"{step.number}{' (interrupted)' if step.interrupted else ''}", str(step.target), str(step.open),
        str(step.opened), str(step.failed), str(step.dropped), str(step.logins),
        "-" if step.login_success is None else f"{step.login_success:.1f}%",
        _ms(step.p50_ms), _ms(step.p99_ms), _ms(step.p99_held_ms)) for step in steps]
    widths = [max(len(row[column]) for row in rows) for column in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def failure_summary(steps: Sequence[Step], *, logins: bool = False) -> str:
    """'300 × HTTP 503, 12 × no answer within 5 s': why WebSockets (or logins) failed, over all steps."""
    counted: Counter[str] = Counter()
    for step in steps:
        counted.update(step.login_failures if logins else step.failures)
    return ", ".join(f"{count} × {reason}" for reason, count in counted.most_common())


# ----- the plot -----------------------------------------------------------------------------------

def _check_plot_target(path: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SurgeError("--plot needs matplotlib, which is not installed: pip install 'controlplane[plot]' "
                         "(or leave out --plot)") from None
    if not path.parent.resolve().is_dir():
        raise SurgeError(f"--plot {path}: no such directory {path.parent}")


def plot(runs: Mapping[str, Sequence[Step]], path: Path, *, title: str) -> None:
    """WebSockets asked for (x) against WebSockets open, login success and login p99 (dashed: while the
    step held its WebSockets, none opening), one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (opened, success, p99) = pyplot.subplots(3, 1, sharex=True, figsize=(8, 9))
    for name, steps in runs.items():
        targets = [step.target for step in steps]
        opened.plot(targets, [step.open for step in steps], marker="o", label=name)
        success.plot(targets, [step.login_success for step in steps], marker="o", label=name)
        line, = p99.plot(targets, [step.p99_ms for step in steps], marker="o", label=name)
        p99.plot(targets, [step.p99_held_ms for step in steps], linestyle="--", color=line.get_color(),
                 label=f"{name}: while held, none opening")
    opened.set_ylabel("WebSockets open")
    success.set_ylabel("login success (%)")
    success.set_ylim(-5, 105)
    p99.set_ylabel("login p99 (ms)")
    p99.set_xlabel("WebSockets asked for (the surge)")
    for axes in (opened, success, p99):
        axes.grid(True, alpha=0.3)
    opened.legend()
    p99.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


if __name__ == "__main__":  # the login probe's process (Prober)
    sys.exit(_probe_child(sys.argv[1:]))
