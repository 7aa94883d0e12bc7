"""A directory of YAML manifests as a source: the embedded default, so no cluster is needed.

The same manifests a cluster would hold (Gateways, Backends, Services, EndpointSlices, Secrets),
in `*.yaml`/`*.yml` files, multi-document allowed. The directory is watched with file-system
events (inotify, through watchfiles), so a saved change reaches translation in about 10 ms; where
there are none (CONTROLPLANE_FILE_WATCH=poll, or inotify unavailable) it is polled, and the log
says which at startup. Hidden files and directories are skipped (a ConfigMap volume keeps a copy
of every file under `..<timestamp>/`). A file the source cannot take keeps its last
good objects and its error is reported with the file, the line or the field: a typo never empties
a Gateway, never reaches translation, and never stops the control plane. Any file at all is
either read or refused, and it is refused when
- it is not a regular file, not UTF-8 text (a UTF-8 byte order mark is fine, as kubectl reads it),
  not valid YAML, or holds an object of the wrong shape (a Service port that is not a number,
  labels that are not a mapping), a name the API server would refuse (`api/websocket` would
  collide with Backend `api`'s WebSocket cluster) or one object twice: what a cluster could hold,
  a file may hold, nothing more;
- it is over 4 MiB, is nested over 100 levels deep, or holds over a million YAML nodes or 16 MiB of
  text counting each alias as all it stands for (an "alias bomb" a few lines long stands for
  billions of nodes, or of copies of one long string): limits
  far above any real manifest, checked on the parser's events before any object is built, so a
  hostile file costs neither the stack nor the memory;
- it defines an object another file already serves: the one served stays (at startup, the first
  file by path), and the newcomer waits, refused as a whole like any file error, until the object
  is its alone (the other file dropped it or was deleted). Never "the last one read wins", which
  would let a stray copy silently replace what Envoys run.

While watching, a changed file is read only once it is complete: renamed into place, or closed by
the program writing it (`_complete`), never half-written. A directory that disappears keeps
serving what its files served until it is back.
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import fcntl
import logging
import os
import re
import signal
import stat
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import watchfiles
import yaml

from controlplane.model import crds, kube
from controlplane.sources.store import KINDS, ObjectKey, Store

log = logging.getLogger(__name__)

API_VERSIONS = {"Gateway": crds.API_VERSION, "Backend": crds.API_VERSION, "Service": "v1", "Secret": "v1",
                "EndpointSlice": "discovery.k8s.io/v1"}
"""The apiVersion of each kind we read: any other is an object no cluster would take (kubectl: no
matches for kind "Backend" in version "v1")."""
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 100
MAX_NODES = 1_000_000
MAX_EXPANDED_CHARACTERS = 16 * 1024 * 1024

# libyaml (C) when PyYAML has it: five times faster than the pure-Python parser on large files.
_Parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SERVICE_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN_RULE = ("lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, "
                   "at most 253 characters")
_LABEL_RULE = "lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters"

Stamp = tuple[int, int, int, int]
"""(mtime, ctime, size, inode) of a file: a write or a rename into place changes it."""
UNREADABLE: Stamp = (0, 0, -1, 0)
"""The stamp of a path that cannot be looked at (a link loop): no file's stamp."""

EVENTS, POLL = "events", "poll"
MODE_VARIABLE = "CONTROLPLANE_FILE_WATCH"
EVENT_STEP_MS = 5
"""How often watchfiles looks for events the kernel queued, and how long a batch waits for more:
a change is seen 5-10 ms after it; idle, its thread's wake-ups cost ~9 ms of CPU a second (6 at
10 ms, for 5 ms more latency; docs/benchmarks.md)."""
EVENT_BATCH_MS = 50
"""A burst of events is handed over at least this often."""
LOAD_GAP_FIRST, LOAD_GAP_LAST = 0.05, 0.4
"""A change after a quiet spell is read at once; while events keep coming (a burst), re-reads are
50 ms apart, then twice as far apart each time, up to 0.4 s: a burst costs a few, not one per file."""
SETTLE = 0.1
"""Where no lease tells whether a file is still open for writing, it is read once its stamp has
stayed the same for SETTLE seconds."""
RECHECK_FIRST, RECHECK_LAST = 0.01, 0.5
"""A file not complete yet is looked at again after 10 ms, then twice as long each time, up to 0.5 s."""
logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every batch of events at INFO


class ManifestError(Exception):
    """A manifest file that cannot be read: the file, and what is wrong with it."""

    def __init__(self, path: Path, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


class _Refused(Exception):
    """Valid YAML this source will not build objects from: where, and why."""

    def __init__(self, mark: yaml.Mark, message: str):
        super().__init__(message)
        self.mark, self.message = mark, message


class _Loader(_Parser):
    """The safe loader, with a value its tag cannot be (`!!bool maybe`) refused where it is, not raised."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, LookupError, AttributeError) as error:  # a value its tag cannot be: `2024-13-01`,
            # an integer of 5,000 digits (ValueError), `!!bool maybe`, `!!int ''` (LookupError), `!!timestamp x`
            kind = node.tag.rpartition(":")[2]
            detail = str(error).split(";")[0]
            raise _Refused(node.start_mark, f"cannot read this {kind} ({detail}); quote the value if it is "
                                            "meant as a string") from None


def parse_file(path: Path) -> list[Mapping[str, Any]]:
    """The objects of one manifest file; raises ManifestError saying where and what is wrong."""
    text = _read_text(path)
    try:
        _check_nesting_and_aliases(text)
        documents = list(yaml.load_all(text, Loader=_Loader))
    except _Refused as error:
        mark = error.mark
        raise ManifestError(path, f"line {mark.line + 1}, column {mark.column + 1}: {error.message}") from None
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, max(text.find(chr(error.character)), 0)) + 1
        raise ManifestError(path, f"line {line}: the character "
                                  f"U+{error.character:04X} is not allowed in YAML (a binary or UTF-16 file?); "
                                  "save the manifest as UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise ManifestError(path, f"{where}not valid YAML ({problem})") from None
    objects: dict[ObjectKey, tuple[int, Mapping[str, Any]]] = {}
    for index, document in enumerate(documents):
        if document is None:
            continue
        if not isinstance(document, dict):
            raise ManifestError(path, f"document {index + 1} is not a mapping (a Kubernetes object)")
        metadata = document.get("metadata")
        if not document.get("kind") or not isinstance(metadata, dict) or not metadata.get("name"):
            raise ManifestError(path, f"document {index + 1} has no kind or no metadata.name")
        if not isinstance(document["kind"], str):
            raise ManifestError(path, f"document {index + 1}: kind: {document['kind']!r} is not a kind; write the "
                                      "object's kind as a string, such as Backend")
        if document["kind"] in KINDS:
            wrong = kube.problems(document) + _name_problems(document) + _api_version_problems(document)
            if wrong:
                raise ManifestError(path, f"document {index + 1} ({document['kind']} "
                                          f"{document['metadata']['name']}): {'; '.join(wrong)}")
            key = ObjectKey.of(document)
            if key in objects:
                raise ManifestError(path, f"document {index + 1} defines {key} again (document "
                                          f"{objects[key][0] + 1} did first); remove one of the two")
            objects[key] = (index, document)
        else:
            log.info("%s: ignoring %s %s (not a kind this control plane reads)", path, document["kind"],
                     document["metadata"]["name"])
    return [document for _, document in objects.values()]


def _read_text(path: Path) -> str:
    """The file's text: a regular file of UTF-8, of at most MAX_FILE_BYTES (sized before it is read)."""
    try:
        status = path.stat()
        if not stat.S_ISREG(status.st_mode):
            raise ManifestError(path, "is not a regular file; keep only manifests in the directory")
        if status.st_size > MAX_FILE_BYTES:
            raise _too_large(path, status.st_size)
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)  # it may have grown since
    except OSError as error:
        raise ManifestError(path, f"cannot read it ({error.strerror or error})") from None
    if len(data) > MAX_FILE_BYTES:
        raise _too_large(path, len(data))
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ManifestError(path, "is UTF-16 text (it starts with a UTF-16 byte order mark); save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ManifestError(path, f"line {line}: byte 0x{data[error.start]:02x} is not UTF-8 ({error.reason}); "
                                  "save the manifest as UTF-8 text, as Kubernetes manifests are") from None


def _too_large(path: Path, size: int) -> ManifestError:
    return ManifestError(path, f"is {size} bytes, over the {MAX_FILE_BYTES // 2**20} MiB limit for one manifest "
                               "file; split it into several files")


def _check_nesting_and_aliases(text: str) -> None:
    """Refuse, from the parser's events alone, what would exhaust the stack or memory if built:
    nesting over MAX_DEPTH, over MAX_NODES nodes or MAX_EXPANDED_CHARACTERS of scalars once aliases
    are expanded, an alias inside itself."""
    depth = nodes = characters = 0
    # per open collection: [anchor, nodes before it, deepest depth within, characters before it]
    open_nodes: list[list] = []
    anchored: dict[str, tuple[int, int, int]] = {}  # anchor -> (nodes it stands for, levels it adds, characters)
    for event in yaml.parse(text, Loader=_Parser):
        reached = depth
        if isinstance(event, yaml.DocumentStartEvent):
            anchored = {}
        elif isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, *_ in open_nodes):
                raise _Refused(event.start_mark, f"the alias *{event.anchor} is inside the node &{event.anchor} it "
                                                 "names (a value that contains itself); write the value out")
            size, levels, length = anchored.get(event.anchor, (1, 0, 0))  # an unknown anchor is the loader's error
            nodes, reached, characters = nodes + size, depth + levels, characters + length
        elif isinstance(event, yaml.ScalarEvent):
            nodes, characters = nodes + 1, characters + len(event.value)
            if event.anchor is not None:
                anchored[event.anchor] = (1, 0, len(event.value))
        elif isinstance(event, yaml.CollectionStartEvent):
            nodes, depth = nodes + 1, depth + 1
            reached = depth
            open_nodes.append([event.anchor, nodes - 1, depth, characters])
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, before, deepest, characters_before = open_nodes.pop()
            depth -= 1
            if anchor is not None:
                anchored[anchor] = (nodes - before, deepest - depth, characters - characters_before)
            reached = deepest
        if reached > MAX_DEPTH:
            raise _Refused(event.start_mark, f"nested more than {MAX_DEPTH} levels deep (counting what aliases stand "
                                             "for); Kubernetes objects need far fewer")
        if open_nodes:
            open_nodes[-1][2] = max(open_nodes[-1][2], reached)
        if nodes > MAX_NODES:
            raise _Refused(event.start_mark, f"more than {MAX_NODES:,} YAML nodes, counting each alias as all it "
                                             "stands for (an alias bomb?); split the file, and use fewer aliases")
        if characters > MAX_EXPANDED_CHARACTERS:
            raise _Refused(event.start_mark, f"more than {MAX_EXPANDED_CHARACTERS // 2**20} MiB of text, counting "
                                             "each alias as all it stands for (an alias bomb?); split the file, and "
                                             "use fewer aliases")


def _api_version_problems(document: Mapping[str, Any]) -> list[str]:
    kind, expected = document["kind"], API_VERSIONS[document["kind"]]
    if document.get("apiVersion", expected) == expected:  # left out: the kind says which object it is
        return []
    return [f"apiVersion: {document.get('apiVersion')!r} does not serve {kind}; write apiVersion: {expected}"]


def _name_problems(document: Mapping[str, Any]) -> list[str]:
    """The API server's rules for names: a manifest holds nothing a cluster could not."""
    metadata, problems = document["metadata"], []
    name, namespace = metadata["name"], metadata.get("namespace")
    if document["kind"] == "Service":  # a DNS-1035 label: a Service's name is a DNS name in the cluster
        if isinstance(name, str) and not (len(name) <= 63 and _SERVICE_NAME.fullmatch(name)):
            problems.append(f"metadata.name: {name!r} is not a valid Service name: lowercase letters, digits and "
                            "'-', starting with a letter and ending with a letter or digit, at most 63 characters")
    elif isinstance(name, str) and not (len(name) <= 253 and _SUBDOMAIN.fullmatch(name)):
        problems.append(f"metadata.name: {name!r} is not a valid name: {_SUBDOMAIN_RULE}")
    if isinstance(namespace, str) and namespace and not (len(namespace) <= 63 and _LABEL.fullmatch(namespace)):
        problems.append(f"metadata.namespace: {namespace!r} is not a valid namespace: {_LABEL_RULE}")
    return problems


def open_for_writing(path: Path) -> bool | None:
    """Whether a process has `path` open for writing; None where that cannot be told.

    Linux grants a read lease only on a file no process has open for writing (fcntl(2),
    F_SETLEASE), so taking one and giving it back at once tells, whatever the writer (an editor,
    a `>` redirection, a copy). Only the file's owner (or root) may take a lease, and a network file
    system's other clients are not seen: there the caller waits for the file to settle instead."""
    if not hasattr(fcntl, "F_SETLEASE"):
        return None
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block us
    except OSError:
        return None
    try:
        # A writer opening the file while we hold the lease makes the kernel signal us: SIGURG, which
        # is ignored, not SIGIO, which would end the process. The writer waits the microseconds we hold it.
        fcntl.fcntl(descriptor, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(descriptor, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as error:
        return True if error.errno == errno.EAGAIN else None  # EAGAIN: open for writing; else not ours, no leases
    else:
        fcntl.fcntl(descriptor, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(descriptor)


def _identity(directory: Path) -> tuple[int, int] | None:
    """The directory's device and inode: another one at the same path (moved into place) is another directory."""
    try:
        status = directory.stat()
    except OSError:
        return None
    return (status.st_dev, status.st_ino) if stat.S_ISDIR(status.st_mode) else None


class DirectorySource:
    """Loads a directory into a Store and reloads it when its files change."""

    def __init__(self, directory: Path | str, *, interval: float = 0.25, mode: str | None = None):
        """`interval`: how often to poll where there are no file-system events. `mode`: EVENTS or
        POLL; by default the CONTROLPLANE_FILE_WATCH environment variable, else EVENTS."""
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ManifestError(self.directory, "is not a directory of manifests")
        self.interval = interval
        self.mode = mode or os.environ.get(MODE_VARIABLE) or EVENTS
        if self.mode not in (EVENTS, POLL):
            raise ManifestError(self.directory, f"{MODE_VARIABLE}={self.mode!r} is not a way to watch it; set "
                                                f"{EVENTS} (file-system events) or {POLL}, or leave it unset")
        # Invariant: no key is in two files' served objects; `_holders` maps each to its file.
        self._by_file: dict[Path, dict[ObjectKey, Mapping[str, Any]]] = {}  # served: each file's last good objects
        self._holders: dict[ObjectKey, Path] = {}
        self._waiting: dict[Path, dict[ObjectKey, Mapping[str, Any]]] = {}  # read, but defining a served object
        self._applied: dict[Path, Stamp] = {}  # the stamp of every file when it was read
        self._changing: dict[Path, tuple[Stamp, int, float]] = {}  # changed, not read yet: stamp, since which look, when
        self._looks = 0
        self._gone = False
        self._announced: set[Path] = set()  # files said to be open for writing
        self._store = Store()
        self.errors: dict[Path, ManifestError] = {}

    @property
    def pending(self) -> bool:
        """Whether a changed file waits to be complete (its writer has it open, or it has not settled)."""
        return bool(self._changing)

    def _files(self) -> dict[Path, Stamp]:
        found = {}
        for path in sorted([*self.directory.rglob("*.yaml"), *self.directory.rglob("*.yml")]):
            if any(part.startswith(".") for part in path.relative_to(self.directory).parts):
                continue
            try:
                status = path.stat()
            except FileNotFoundError:  # deleted since, or a dangling link: as good as absent
                continue
            except OSError:  # a link loop, say: UNREADABLE is no file's stamp, so it is read once, and refused
                found[path] = UNREADABLE
                continue
            found[path] = (status.st_mtime_ns, status.st_ctime_ns, status.st_size, status.st_ino)
        return found

    def load(self, *, settled_only: bool = False) -> bool:
        """Re-read changed files; returns whether the set of objects may have changed.

        With `settled_only`, a changed file waits until it is complete (`_complete`). A directory
        that is gone keeps serving what its files served, until it is back.
        """
        self._looks += 1
        if _identity(self.directory) is None:
            if not self._gone:
                log.error("%s is gone: keeping the %d objects its files served; changes apply again once it is "
                          "back", self.directory, sum(len(objects) for objects in self._by_file.values()))
            self._gone = True
            return False
        if self._gone:
            log.warning("%s is back: reading its files again", self.directory)
            self._gone = False
        files, now = self._files(), time.monotonic()
        removed = set(self._applied) - set(files)
        for path in removed:
            del self._applied[path]
            self._serve(path, None)
            self._waiting.pop(path, None)
            self.errors.pop(path, None)
        changed = [path for path, stamp in files.items() if self._applied.get(path) != stamp]
        self._changing = {path: self._changing.get(path, (None, 0, 0.0)) for path in changed}
        if settled_only:
            changed = [path for path in changed if self._complete(path, files[path], now)]
        for path in changed:
            del self._changing[path]
            self._announced.discard(path)
            self._applied[path] = files[path]
            try:
                self._waiting[path] = {ObjectKey.of(obj): obj for obj in parse_file(path)}
            except ManifestError as error:
                self._waiting.pop(path, None)
                self._refuse(error)
        if removed or changed:
            self._apply_waiting()
        return bool(removed or changed)

    def _complete(self, path: Path, stamp: Stamp, now: float) -> bool:
        """Whether a changed file is written in full: no process has it open for writing and, where
        that cannot be told (or when polling, where a writer may be on another machine), its stamp
        stayed the same for SETTLE seconds (polling: since the previous poll).

        Editors and `>` redirections truncate a file before writing it: reading it in between would
        apply an empty file, deleting its objects, and a parse error that follows would then keep
        that empty state as the "last good" one."""
        seen, look, since = self._changing[path]
        if seen != stamp:
            self._changing[path] = (stamp, self._looks, now)
            look, since = self._looks, now
        if stamp == UNREADABLE:
            return True  # read at once: reading it says what is wrong
        writing = open_for_writing(path)
        if writing and now - since >= 1.0 and path not in self._announced:
            log.info("%s is open for writing by another program: its change applies once it is closed", path)
            self._announced.add(path)
        if self.mode == POLL:
            return not writing and look < self._looks
        return writing is False or (writing is None and now - since >= SETTLE)

    def _apply_waiting(self) -> None:
        """Serve every file read that can be without defining an object twice; refuse the rest."""
        while self._apply_alone() or self._apply_together():
            pass
        for path, objects in sorted(self._waiting.items()):
            key = next(key for key in objects if self._holders.get(key, path) != path)
            self._refuse(ManifestError(path, f"{key} is already defined in {self._holders[key]}, which serves it; "
                                             "remove it from one of the two files"))

    def _apply_alone(self) -> bool:
        """Serve, in path order, each waiting file that defines nothing another file serves."""
        applied = False
        for path in sorted(self._waiting):
            if all(self._holders.get(key, path) == path for key in self._waiting[path]):
                self._serve(path, self._waiting.pop(path))
                applied = True
        return applied

    def _apply_together(self) -> bool:
        """Serve together the waiting files that define only what other waiting files let go of (two
        files that swapped objects, in a `git checkout`): each is refused alone, but not together."""
        group = set(self._waiting)
        while True:
            claims = Counter(key for path in group for key in self._waiting[path])
            keep = {path for path in group if all(claims[key] == 1 and self._holders.get(key, path) in group
                                                  for key in self._waiting[path])}
            if keep == group:
                break
            group = keep
        for path in group:
            self._serve(path, None)
        for path in sorted(group):
            self._serve(path, self._waiting.pop(path))
        return bool(group)

    def _serve(self, path: Path, objects: dict[ObjectKey, Mapping[str, Any]] | None) -> None:
        """Make `objects` (None: nothing) what `path` serves; the caller keeps keys in one file only."""
        before = self._by_file.pop(path, {})
        for key in before:
            del self._holders[key]
        if objects is not None:
            # An object the file still defines as it was stays the same object: a file edit changes what it changed.
            objects = {key: before[key] if before.get(key) == obj else obj for key, obj in objects.items()}
            self._by_file[path] = objects
            self._holders.update(dict.fromkeys(objects, path))
            self.errors.pop(path, None)

    def _refuse(self, error: ManifestError) -> None:
        if str(self.errors.get(error.path)) != str(error):
            kept = len(self._by_file.get(error.path, {}))
            log.error("%s; keeping the %d objects it had before: fix the file to apply changes", error, kept)
        self.errors[error.path] = error

    def store(self) -> Store:
        """The objects served, in one Store kept for the source's life: each call writes only what
        changed since the last, so translation sees what a file edit changed and costs that
        (a new Store each time made every edit a full translation)."""
        self._store.sync({key: obj for objects in self._by_file.values() for key, obj in objects.items()})
        self._store.origins = {key: str(path) for path, objects in self._by_file.items() for key in objects}
        return self._store


    async def watch(self, on_change: Callable[[Store], None]) -> None:
        """Call `on_change` with the current objects now and after every change, until cancelled."""
        self.load()
        on_change(self.store())
        if self.mode == EVENTS:
            try:
                await self._follow_events(on_change)
            except (OSError, RuntimeError) as error:  # no inotify here, or its limits reached (fs.inotify.*)
                log.warning("%s: file-system events are not available (%s: %s); polling it every %gs instead",
                            self.directory, type(error).__name__, error, self.interval)
                self.mode = POLL
        else:
            log.info("polling %s every %gs for changes (%s=%s)", self.directory, self.interval, MODE_VARIABLE, POLL)
        while True:
            await asyncio.sleep(self.interval)
            if await asyncio.to_thread(self.load, settled_only=True):
                on_change(self.store())

    async def _follow_events(self, on_change: Callable[[Store], None]) -> None:
        """Re-read on file-system events, until a watcher fails. Events only say when to look: what
        changed is what the files' stamps say, so a hidden file's event (a ConfigMap volume swaps its
        `..data` link) finds the files that changed through it."""
        log.info("watching %s for changes with file-system events (%s=%s polls it instead)", self.directory,
                 MODE_VARIABLE, POLL)
        while True:
            identity = _identity(self.directory)
            if identity is None:  # gone: look for it again, without events until it is back
                self.load(settled_only=True)
                await asyncio.sleep(self.interval * 2)
                continue
            await self._follow_directory(on_change, identity)
            if self.load(settled_only=True):  # moved away, or another directory moved into place
                on_change(self.store())

    async def _follow_directory(self, on_change: Callable[[Store], None], identity: tuple[int, int]) -> None:
        """Re-read on each batch of events in the directory `identity` is, until it is gone or replaced.
        A burst (a `git checkout` of 1,000 files) is one batch per EVENT_BATCH_MS at most, and re-reads
        further and further apart (LOAD_GAP_*); a file not complete yet is looked at again, sooner at first."""
        loop = asyncio.get_running_loop()
        events = watchfiles.awatch(self.directory, watch_filter=None, debounce=EVENT_BATCH_MS, step=EVENT_STEP_MS,
                                   force_polling=False, recursive=True, ignore_permission_denied=True)
        batch = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)  # the watcher starts (the first step of `batch`): a change from now on is an event
        recheck, gap, loaded_at = RECHECK_FIRST, LOAD_GAP_FIRST, -LOAD_GAP_LAST
        try:
            while True:
                await asyncio.sleep(max(0.0, loaded_at + gap - loop.time()))
                if await asyncio.to_thread(self.load, settled_only=True):
                    on_change(self.store())
                loaded_at = loop.time()  # after it: a long re-read is no quiet spell
                if _identity(self.directory) != identity:
                    return
                done, _ = await asyncio.wait({batch}, timeout=recheck if self.pending else None)
                if batch in done:
                    batch.result()  # a watcher that failed raises here
                    batch = asyncio.ensure_future(anext(events))
                    recheck = RECHECK_FIRST
                    gap = min(gap * 2, LOAD_GAP_LAST) if loop.time() - loaded_at < gap else LOAD_GAP_FIRST
                else:
                    recheck = min(recheck * 2, RECHECK_LAST)
        finally:
            batch.cancel()
            await asyncio.gather(batch, return_exceptions=True)
            await events.aclose()
