"""Hostile input: nothing that works stops working.

One `controlplane serve --source DIR` (a subprocess, as it runs in production), one real Envoy and
one loop of steady HTTP traffic through it, to a Backend on an established Gateway. Generated
malformed manifest files (`tests/hostile.py`: every class, from wrong types to alias bombs) are
written into the directory one at a time, beside the established ones. For each file: wait until
`serve` has logged its refusal (its log is polled for the file's name), change an unrelated file
once (a refusal is logged once, not on every change), then remove the file, or, for a bad edit of
an established file, restore the good one. Across the whole run:

- `serve` never exits;
- Envoy never rejects anything (every `*.update_rejected` counter of its `/stats`: CDS, LDS, each
  cluster's EDS, each route configuration's RDS, stays where it started);
- every request of the steady traffic is answered 200 by the sample backend;
- each refusal is logged once, naming the file (and, where there is one, the object and the
  field), and `serve` never prints a traceback.

A case that breaks one of them is reported with what broke (a case that makes `serve` exit or
hang is recorded, and `serve` is restarted, so the cases after it are still measured).

`make test` runs a deterministic sample of every class; `pytest --hostile-full
tests/test_hostile_input.py` the full generated set.
"""

from __future__ import annotations

import asyncio
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from controlplane.runtime.envoy_process import stop_process
from tests import hostile
from tests.harness import eventually, free_port

pytestmark = pytest.mark.envoy

POLL = 0.02  # how often serve's log and Envoy's stats are looked at
REFUSAL_WAIT = 4.0  # serve reads a changed file within ~0.5 s (its 0.25 s poll, then one more to settle)
HEAVY_REFUSAL_WAIT = 20.0
UNNAMED_GRACE = 0.75  # after a refusal that does not name the file, how long to wait for one that does
NUDGE_WAIT = 2.0
PROBE_WAIT = 8.0
SERVE_MEMORY = 4 * 2**30  # an alias bomb must not take the machine with it: serve gets MemoryError instead
REQUEST_INTERVAL = 0.05
BUDGET = {"sample": 300.0, "full": 3600.0}  # seconds for the cases; what is left is reported as not run

RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", re.M)
SEVERE = ("WARNING", "ERROR", "CRITICAL")


# ---------------------------------------------------------------------------------------------
# serve, its log, the traffic

class Serve:
    """`controlplane serve --source DIR` as a subprocess, its output appended to one log file."""

    def __init__(self, directory: Path, port: int, log_path: Path):
        self.directory, self.port, self.log_path = directory, port, log_path
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "controlplane.cli", "serve", "--source", str(self.directory),
                 "--xds-address", f"127.0.0.1:{self.port}", "--metrics-address", "",
                 "--state-file", str(self.log_path.with_name("serve-state.json"))],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            resource.prlimit(self.process.pid, resource.RLIMIT_AS, (SERVE_MEMORY, SERVE_MEMORY))
        except (OSError, AttributeError):  # not Linux: unguarded
            pass

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


@dataclass
class Record:
    level: str  # a logging level, or "RAW": output that is no log record (an uncaught traceback, say)
    text: str


class Log:
    """serve's output, read as it grows; offsets are bytes into the file."""

    def __init__(self, path: Path):
        self.path = path
        self.data = bytearray()

    def refresh(self) -> int:
        with open(self.path, "rb") as file:
            file.seek(len(self.data))
            self.data += file.read()
        return len(self.data)

    def text(self, start: int = 0) -> str:
        return self.data[start:].decode("utf-8", "replace")

    def records(self, start: int) -> list[Record]:
        text = self.text(start)
        found, matches = [], list(RECORD.finditer(text))
        if not matches or matches[0].start() > 0:
            head = text[:matches[0].start() if matches else len(text)]
            if head.strip():
                found.append(Record("RAW", head))
        for index, match in enumerate(matches):
            end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
            found.append(Record(match.group(1), text[match.start():end]))
        return found


class Traffic:
    """GETs through Envoy every REQUEST_INTERVAL, each on a new connection; every one must be a 200
    from the sample backend. Failures are kept with the case that was running."""

    def __init__(self, port: int, answer: str):
        self.url = f"http://127.0.0.1:{port}"
        self.answer = answer
        self.current = "(before the cases)"
        self.sent = 0
        self.streak = 0  # requests answered well in a row
        self.failures: list[tuple[str, str]] = []
        self.by_case: dict[str, int] = {}

    async def run(self, stop: asyncio.Event, *, limit: int, until: float) -> None:
        paths = ["/", "/login", "/api/v1/orders?page=2", "/static/app.js"]
        async with httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            while not stop.is_set() and self.sent < limit and time.monotonic() < until:
                label, path = self.current, paths[self.sent % len(paths)]
                failed = None
                try:
                    response = await http.get(self.url + path, headers={"connection": "close"})
                    if response.status_code != 200 or response.text.strip() != self.answer:
                        failed = f"GET {path}: {response.status_code} {response.text[:100]!r}"
                except httpx.HTTPError as error:
                    failed = f"GET {path}: {error!r}"
                if failed is None:
                    self.streak += 1
                else:
                    self.streak = 0
                    self.failures.append((label, failed))
                self.sent += 1
                self.by_case[label] = self.by_case.get(label, 0) + 1
                await asyncio.sleep(REQUEST_INTERVAL)


async def rejections(envoy) -> dict[str, int]:
    """Envoy's `update_rejected` counters: a NACK of CDS, LDS, a cluster's EDS or a route's RDS."""
    response = await envoy.admin.get("/stats", params={"filter": "update_rejected$", "format": "json"})
    return {s["name"]: s["value"] for s in response.json()["stats"] if "value" in s}


def nacks(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return [f"{name}: {before.get(name, 0)} -> {value}" for name, value in sorted(after.items())
            if value > before.get(name, 0)]


async def logged(log: Log, serve: Serve, text: str, start: int, timeout: float) -> bool:
    """Whether `text` shows up in serve's output after `start` within `timeout` (False at once if it exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log.refresh()
        if text in log.text(start):
            return True
        if not serve.running():
            return False
        await asyncio.sleep(POLL)
    return False


# ---------------------------------------------------------------------------------------------
# The run

@dataclass
class Outcome:
    case: hostile.Case
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    refused_after: float | None = None


class Run:
    def __init__(self, directory: Path, world: hostile.World, serve: Serve, log: Log, envoy, traffic: Traffic):
        self.directory, self.world, self.serve, self.log = directory, world, serve, log
        self.envoy, self.traffic = envoy, traffic
        self.good = hostile.established(world)
        self.nudges = 0
        self.probes = 0
        self.nudge_marker_missing = 0
        self.rejected = {}

    # -- helpers --------------------------------------------------------------------------------

    async def write(self, name: str, content: bytes) -> None:
        await asyncio.to_thread((self.directory / name).write_bytes, content)

    async def wait_for(self, text: str, start: int, timeout: float) -> bool:
        return await logged(self.log, self.serve, text, start, timeout)

    async def nudge(self) -> None:
        """Change an unrelated file (a ConfigMap, a kind serve ignores) and wait until serve has read it:
        a changed directory makes serve re-read and re-publish, which must not log an old refusal again.
        Files written before it are read by then too (serve reads a file once it has settled)."""
        self.nudges += 1
        marker = f"noise-{self.nudges}"
        start = self.log.refresh()
        await self.write("noise.yaml", hostile.dump([{"apiVersion": "v1", "kind": "ConfigMap",
                                                      "metadata": {"name": marker, "namespace": hostile.NS},
                                                      "data": {"n": str(self.nudges)}}]))
        if not await self.wait_for(marker, start, NUDGE_WAIT):
            self.nudge_marker_missing += 1
        await asyncio.sleep(0.15)  # the pipeline publishes 50 ms after the change (its hold-off), then logs

    async def probe(self, timeout: float = PROBE_WAIT) -> bool:
        """Whether serve still reads the directory: a file of broken YAML must be refused in time."""
        self.probes += 1
        name = f"probe-{self.probes}.yaml"
        start = self.log.refresh()
        await self.write(name, b"kind: [unclosed\n")
        answered = await self.wait_for(name, start, timeout)
        (self.directory / name).unlink(missing_ok=True)
        return answered

    async def restart(self) -> None:
        self.serve.stop()
        self.serve.start()
        if not await self.probe(30):
            pytest.fail(f"serve did not come back after a restart:\n{self.log.text()[-3000:]}")

    def refusals(self, records: list[Record], file_name: str) -> list[Record]:
        return [r for r in records if r.level in SEVERE and file_name in r.text]

    # -- one case -------------------------------------------------------------------------------

    async def run_case(self, case: hostile.Case) -> Outcome:
        outcome = Outcome(case)
        problems = outcome.problems
        path = self.directory / case.file_name
        content = await asyncio.to_thread(case.content, self.world)
        failures_before = len(self.traffic.failures)
        before = self.rejected
        self.traffic.current = case.label
        start = self.log.refresh()
        began = time.monotonic()
        await self.write(case.file_name, content)

        state = await self.wait_for_refusal(case, start)
        if state == "refused":
            outcome.refused_after = time.monotonic() - began
            await self.nudge()
        self.log.refresh()
        records = self.log.records(start)  # this case's, before any probe
        self.check_log(case, records, state, problems)
        alive = self.serve.running()
        if state == "timeout" and alive and not await self.probe(PROBE_WAIT + (10 if case.heavy else 0)):
            problems.append(f"serve hung: it answered neither this file nor a probe within "
                            f"{self._wait(case) + PROBE_WAIT:.0f} s")
            alive = False

        if case.target:
            await self.write(case.target, self.good[case.target])
        else:
            path.unlink(missing_ok=True)
        if not self.serve.running():
            code = self.serve.returncode
            problems.append(f"serve exited (status {code}); last output: {_tail(self.log.text(start))}")
        if not alive:
            await self.restart()
        elif case.target:
            await self.nudge()  # the restored file is read before the next case
        if len(self.traffic.failures) > failures_before:
            # Requests failed: count them all against this case, until its file is gone and traffic is back
            if not case.target and self.serve.running():
                await self.nudge()  # the removal is read
            await self.recovered()

        self.rejected = await rejections(self.envoy)
        rejected = nacks(before, self.rejected)
        if rejected:
            problems.append("Envoy NACKed: " + "; ".join(rejected))
        failed = self.traffic.failures[failures_before:]
        if failed:
            problems.append(f"{len(failed)} failed requests, first: {failed[0][1]}")
        outcome.seconds = time.monotonic() - began
        return outcome

    async def recovered(self, timeout: float = 10.0) -> None:
        """Wait until the next five requests in a row were answered well (or `timeout`)."""
        sent = self.traffic.sent
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.traffic.sent - sent >= 5 and self.traffic.streak >= 5:
                return
            await asyncio.sleep(POLL)

    def _wait(self, case: hostile.Case) -> float:
        return HEAVY_REFUSAL_WAIT if case.heavy else REFUSAL_WAIT

    async def wait_for_refusal(self, case: hostile.Case, start: int) -> str:
        """"refused" (a WARNING or ERROR record names the file), "unnamed" (one names the case's object
        but none the file), "exited" or "timeout"."""
        deadline = time.monotonic() + self._wait(case)
        objects = case.expected_objects()
        pattern = re.compile("|".join(rf"(?<![\w-]){re.escape(o)}(?![\w-])" for o in objects)) if objects else None
        unnamed_since = None
        while True:
            self.log.refresh()
            records = self.log.records(start)
            if self.refusals(records, case.file_name):
                return "refused"
            if not self.serve.running():
                return "exited"
            if pattern is not None and unnamed_since is None and any(
                    r.level in SEVERE and pattern.search(r.text) for r in records):
                unnamed_since = time.monotonic()
            now = time.monotonic()
            if unnamed_since is not None and now - unnamed_since > UNNAMED_GRACE:
                return "unnamed"
            if now > deadline:
                return "timeout"
            await asyncio.sleep(POLL)

    def check_log(self, case: hostile.Case, records: list[Record], state: str, problems: list[str]) -> None:
        refusals = self.refusals(records, case.file_name)
        if not refusals:
            if state == "unnamed":
                mention = next(r for r in records if r.level in SEVERE and any(
                    _names(r.text, o, is_object=True) for o in case.expected_objects()))
                problems.append(f"refusal does not name the file: {_one_line(mention.text)}")
            elif state == "timeout":
                severe = [r for r in records if r.level in SEVERE]
                problems.append(f"no refusal naming the file logged within {self._wait(case):.0f} s" +
                                (f"; logged instead: {_one_line(severe[0].text)}" if severe else ""))
        elif len(refusals) > 1:
            problems.append(f"refusal logged {len(refusals)} times: " +
                            " | ".join(_one_line(r.text, 160) for r in refusals[:3]))
        if refusals:
            said = _without_file(" ".join(r.text for r in refusals), self.directory, case.file_name)
            missing = [o for o in case.expected_objects() if not _names(said, o, is_object=True)]
            missing += [f for f in case.expected_fields(self.world) if not _names(said, f, is_object=False)]
            if missing:
                problems.append(f"refusal does not name {', '.join(map(repr, missing))}: "
                                f"{_one_line(refusals[0].text)}")
        tracebacks = [r for r in records if "Traceback" in r.text]
        if tracebacks:
            problems.append(f"traceback in serve's output: {_one_line(tracebacks[0].text, 300)}")


def _names(text: str, item: str, *, is_object: bool) -> bool:
    """Whether `text` names `item`: an object's name as a whole word (not `api` in `api-1`), a field as is."""
    if is_object:
        return re.search(rf"(?<![\w-]){re.escape(item)}(?![\w-])", text) is not None
    return item in text


def _without_file(text: str, directory: Path, file_name: str) -> str:
    return text.replace(str(directory / file_name), "<file>").replace(file_name, "<file>")


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _tail(text: str, lines: int = 6) -> str:
    return " / ".join(line for line in text.strip().splitlines()[-lines:])[-600:]


# ---------------------------------------------------------------------------------------------

async def test_hostile_manifests_are_refused_and_nothing_that_works_stops_working(request, tmp_path, envoys,
                                                                                 backends):
    full = request.config.getoption("--hostile-full")
    mode = "full" if full else "sample"
    every = hostile.all_cases()
    cases = hostile.run_order(every if full else hostile.sample(every))
    assert len(cases) >= (300 if full else 60)
    assert {c.klass for c in cases} == set(hostile.CLASSES)

    one = backends("one")
    world = hostile.World(listener_port=free_port(), backend_port=one.port, fresh_port=free_port)
    directory = tmp_path / "manifests"
    directory.mkdir()
    for name, content in hostile.established(world).items():
        (directory / name).write_bytes(content)
    (directory / "noise.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                                                          "metadata": {"name": "noise-0", "namespace": hostile.NS}}))
    log_path = tmp_path / "serve.log"
    log_path.touch()
    serve = Serve(directory, free_port(), log_path)
    log = Log(log_path)
    serve.start()
    run = None
    try:
        started = time.monotonic()
        assert await logged(log, serve, "xDS server listening", 0, 30), log.text()[-2000:]
        envoy = envoys(serve.port, node_cluster="edge")
        port = world.listener_port

        async def answers() -> bool:
            async with httpx.AsyncClient(timeout=2) as http:
                response = await http.get(f"http://127.0.0.1:{port}/")
                return response.status_code == 200 and response.text.strip() == "one"
        await eventually(answers, timeout=30, what="traffic through Envoy to the established Backend")
        baseline = await rejections(envoy)
        rds = [name for name in baseline if re.fullmatch(r"http\..+\.rds\..+\.update_rejected", name)]
        assert {"cluster_manager.cds.update_rejected", "listener_manager.lds.update_rejected",
                "cluster.shop/api.update_rejected"} <= set(baseline) and rds, sorted(baseline)
        assert not any(baseline.values()), baseline  # nothing was rejected before the cases either
        setup = time.monotonic() - started

        traffic = Traffic(port, "one")
        run = Run(directory, world, serve, log, envoy, traffic)
        run.rejected = baseline
        stop = asyncio.Event()
        deadline = time.monotonic() + BUDGET[mode]
        loop = asyncio.create_task(traffic.run(stop, limit=int(BUDGET[mode] / REQUEST_INTERVAL) + 1000,
                                               until=deadline + 60))
        outcomes: list[Outcome] = []
        not_run: list[hostile.Case] = []
        try:
            for case in cases:
                if time.monotonic() > deadline:
                    not_run.append(case)
                    continue
                outcomes.append(await run.run_case(case))
                assert not loop.done(), "the traffic loop stopped early"
        finally:
            traffic.current = "(after the cases)"
            await asyncio.sleep(0.5)
            stop.set()
            await loop
        cases_seconds = sum(o.seconds for o in outcomes)

        # Across the whole run
        final = await rejections(envoy)
        overall: list[str] = []
        if not serve.running():
            overall.append(f"serve is not running at the end (status {serve.returncode})")
        if serve.starts > 1:
            overall.append(f"serve had to be restarted {serve.starts - 1} times (it exited or hung)")
        if nacks(baseline, final):
            overall.append("Envoy NACKed during the run: " + "; ".join(nacks(baseline, final)))
        if traffic.failures:
            overall.append(f"{len(traffic.failures)} of {traffic.sent} requests failed")
        if "Traceback" in log.text():
            overall.append("serve printed a traceback")
        late = [f for f in traffic.failures if f[0] == "(after the cases)"]
        if late:
            overall.append(f"{len(late)} requests failed after the last case, first: {late[0][1]}")
        if traffic.sent < len(outcomes):
            overall.append(f"only {traffic.sent} requests were sent during {len(outcomes)} cases")

        failed = [o for o in outcomes if o.problems]
        report = _report(mode, outcomes, not_run, failed, overall, setup=setup, cases_seconds=cases_seconds,
                         traffic=traffic, run=run)
        print(report)
        (tmp_path / "hostile-report.txt").write_text(report)
        if failed or not_run or overall:
            pytest.fail(report, pytrace=False)
    finally:
        serve.stop()
        # An alias bomb that gets through can leave a state file of a GiB: not kept with the test's files
        log_path.with_name("serve-state.json").unlink(missing_ok=True)


PROBLEM_KINDS = ("serve exited", "serve hung", "Envoy NACKed", "refusal does not name the file",
                 "no refusal naming the file", "refusal logged", "refusal does not name", "traceback")
PROBLEM_KINDS = tuple(sorted(PROBLEM_KINDS, key=len, reverse=True))
FAILED_REQUESTS = re.compile(r"\d+ failed requests")


def _report(mode: str, outcomes: list[Outcome], not_run: list[hostile.Case], failed: list[Outcome],
            overall: list[str], *, setup: float, cases_seconds: float, traffic: Traffic, run: Run) -> str:
    lines = [f"hostile input ({mode}): {len(outcomes)} cases run, {len(failed)} failed, {len(not_run)} not run "
             f"(time budget spent); setup {setup:.1f} s, cases {cases_seconds:.1f} s; "
             f"{traffic.sent} requests, {len(traffic.failures)} failed; serve started {run.serve.starts} time(s)"]
    if run.nudge_marker_missing:
        lines.append(f"note: {run.nudge_marker_missing} nudges were not seen in serve's log (waited "
                     f"{NUDGE_WAIT} s each instead)")
    refused = sorted(o.refused_after for o in outcomes if o.refused_after is not None)
    if refused:
        lines.append(f"refusal logged after: median {refused[len(refused) // 2]:.2f} s, max {refused[-1]:.2f} s")
    by_class: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_class.setdefault(outcome.case.klass, []).append(outcome)
    for klass in hostile.CLASSES:
        members = by_class.get(klass, [])
        if members:
            bad = sum(1 for o in members if o.problems)
            lines.append(f"  {klass:17} {len(members):4} cases, {bad:4} failed, "
                         f"{sum(o.seconds for o in members) / len(members):.2f} s each")
    kinds: dict[str, int] = {}
    for outcome in failed:
        for problem in outcome.problems:
            kind = next((k for k in PROBLEM_KINDS if problem.startswith(k)),
                        "failed requests" if FAILED_REQUESTS.match(problem) else problem[:40])
            kinds[kind] = kinds.get(kind, 0) + 1
    for kind, count in sorted(kinds.items(), key=lambda item: -item[1]):
        lines.append(f"  {count:4} x {kind}")
    for problem in overall:
        lines.append(f"OVERALL: {problem}")
    for outcome in failed:
        lines.append(f"FAIL {outcome.case.label} ({outcome.seconds:.1f} s)")
        for problem in outcome.problems:
            lines.append(f"    - {problem}")
    for case in not_run:
        lines.append(f"NOT RUN {case.label}")
    return "\n".join(lines)
