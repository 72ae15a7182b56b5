"""The file catalog source: read, validate and index a catalog file; watch it for changes."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import logging
import os
import stat
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import overload

from pydantic import ValidationError

from ..config import Config
from ..documents import (
    Document,
    error_message,
    problems_from,
    read_document,
    real_path,
    validate,
)
from ..errors import ConfigError
from ..offload import in_thread
from .checks import dangling_references, drop_refusal
from .model import Catalog, CatalogFields, CatalogFile, Service
from .snapshot import (
    CatalogProblems,
    Snapshot,
    build_snapshot,
    dismantle,
    release_free_memory,
)
from .source import EVERYTHING, Change, Publish, SourceState
from .writers import WriterWatch

log = logging.getLogger("meshdns")


def example_catalog_path() -> Path:
    """The example catalog shipped inside the package (also at ``configs/catalog.yaml``)."""
    return Path(str(resources.files("meshdns") / "examples" / "catalog.yaml"))


def read_catalog(path: Path, yielding: bool = False,
                 raw: bytes | str | None = None) -> tuple[Catalog, Document | None]:
    """Parse and validate a catalog file (YAML, or JSON for large catalogs).

    ``raw``: the file's bytes, already read (``read_file``); else the file is read here.
    Returns the document too when one was built (YAML), for the lines of later problems.
    ``yielding``: parse JSON in small steps so that the event loop's thread gets the GIL
    between them (a reload in a thread must not stall the packet path for the whole parse).
    """
    if raw is None:
        raw = read_file(path)
    if path.suffix.lower() == ".json":
        return (_read_json_yielding(path, raw) if yielding else _read_json(path, raw)), None
    doc = read_document(path, _text(path, raw))
    if doc.data is None:
        raise ConfigError([f"{path}:1: (top level): the document is empty: refused, the last "
                           "catalog is kept (write `nodes: []` to serve nothing on purpose)"])
    if not isinstance(doc.data, dict):
        raise ConfigError([f"{doc.where(())}: expected a mapping with nodes, services, ..."])
    try:
        return validate(doc, CatalogFile), doc
    except ConfigError as exc:  # report the services' own problems in the same pass
        raise ConfigError(exc.problems + _service_problems(doc)) from None


def _service_problems(doc: Document) -> list[str]:
    """Each service entry's validation problems (normally found one by one while the snapshot
    is built; needed here when another section failed first)."""
    services = doc.data.get("services")
    if not isinstance(services, list):
        return []
    out = []
    for i, entry in enumerate(services):
        try:
            Service.model_validate(entry)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                loc = tuple(p for p in err["loc"] if isinstance(p, (str, int)))
                where = doc.where(real_path(doc.data, ("services", i, *loc)))
                out.append(f"{where}: {error_message(err, Service)}")
    return out


def _text(path: Path, raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}:0: (file): not UTF-8 text: {exc.reason}"]) from None


def read_file(path: Path, max_size: int | None = None) -> bytes:
    """The file's bytes, refused rather than waited on: a FIFO or device would block a read
    forever (so it is opened non-blocking and refused), and a file over ``max_size`` would
    exhaust memory while it parses (refused unread). ``ReadFailed`` for a read that may
    succeed later unchanged (missing, EACCES, EMFILE)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ReadFailed(path, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError([f"{path}:0: (file): not a regular file (a FIFO, socket, device "
                               "or directory cannot be a catalog)"])
        if max_size is not None and st.st_size > max_size:
            raise ConfigError([f"{path}:0: (file): {st.st_size} bytes is over catalog.max_size "
                               f"({max_size} bytes): refused unread (loading takes ~20x the "
                               "size in memory as JSON, ~100x as YAML: raise catalog.max_size "
                               "with the memory limit)"])
        chunks = []
        left = (max_size if max_size is not None else st.st_size + (1 << 30)) + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:  # grew past the cap while being read
            raise ConfigError([f"{path}:0: (file): over catalog.max_size ({max_size} bytes) "
                               "once read (it grew, or its size is not known beforehand): "
                               "refused (raise catalog.max_size with the memory limit)"])
        return b"".join(chunks)
    except OSError as exc:
        raise ReadFailed(path, exc) from None
    finally:
        os.close(fd)


class ReadFailed(ConfigError):
    """The catalog file could not be read: missing, not permitted, out of file descriptors.
    Unlike a bad document, reading it again unchanged may succeed."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__([f"{path}:0: (file): cannot read: {exc.strerror or exc}"])
        self.errno = exc.errno


def _read_json(path: Path, raw: bytes | str) -> Catalog:
    # pydantic parses JSON in Rust: several times faster than json.loads + model_validate;
    # and a good file's services are validated in the same pass (model.CatalogFields)
    try:
        return CatalogFields.model_validate_json(raw)
    except ValidationError:
        pass  # (a bad file: each of its problems is found below, as for any file)
    try:
        return CatalogFile.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    doc = read_document(path, _text(path, raw))  # the slow path, only to name lines
    if not isinstance(doc.data, dict):
        raise ConfigError([f"{doc.where(())}: expected an object with nodes, services, ..."])
    raise ConfigError(problems_from(doc, errors, CatalogFile))


def _read_json_yielding(path: Path, raw: bytes | str) -> Catalog:
    text = _text(path, raw)
    try:
        data = _loads_stepwise(text)
    except (ValueError, IndexError, RecursionError):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError([f"{path}:{exc.lineno}: (syntax): {exc.msg}"]) from None
        except RecursionError:
            raise ConfigError([f"{path}:1: (syntax): nested too deeply"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: (top level): expected an object with nodes, services"])
    services = data.pop("services", [])
    try:
        catalog = CatalogFile.model_validate(data)
    except ValidationError as exc:
        doc = read_document(path, text)
        errors = exc.errors(include_url=False)
        raise ConfigError(problems_from(doc, errors, CatalogFile)) from None
    if not isinstance(services, (list, _Entries)):
        doc = read_document(path, text)
        raise ConfigError([f"{doc.where(('services',))}: expected a list of services"])
    # the services are validated one by one in build_snapshot
    return catalog.model_copy(update={"services": services})


_WS = frozenset(" \t\r\n")


class _Entries(Sequence[object]):
    """A JSON array's entries, decoded from ``text`` one at a time as they are read.

    build_snapshot consumes its entries (``entries[i] = None`` once indexed); here nothing is
    held, so that is a no-op."""

    def __init__(self, text: str, starts: array[int]) -> None:
        self.text = text
        self.starts = starts

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, index: int) -> object: ...
    @overload
    def __getitem__(self, index: slice) -> list[object]: ...
    def __getitem__(self, index: int | slice) -> object:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return _DECODE(self.text, self.starts[index])[0]

    def __iter__(self) -> Iterator[object]:
        text = self.text
        for start in self.starts:
            yield _DECODE(text, start)[0]

    def __setitem__(self, index: int, value: object) -> None:
        pass


_DECODE = json.JSONDecoder().raw_decode


def _loads_stepwise(text: str) -> object:
    """``json.loads`` for a top-level object, decoding its arrays one element at a time."""
    decode = json.JSONDecoder().raw_decode

    def skip(i: int) -> int:
        while text[i] in _WS:
            i += 1
        return i

    pos = skip(0)
    if text[pos] != "{":
        return json.loads(text)
    out: dict[str, object] = {}
    pos = skip(pos + 1)
    while text[pos] != "}":
        key, pos = decode(text, pos)
        pos = skip(pos)
        if text[pos] != ":":
            raise ValueError("expected ':'")
        pos = skip(pos + 1)
        if text[pos] == "[":
            # the services: only where each entry starts (build_snapshot decodes it again
            # when it gets there): held decoded, 300,000 entries are ~200 MiB of dicts
            # beside the snapshot being replaced
            spans = key == "services"
            items: list[object] = []
            starts = array("q")
            pos = skip(pos + 1)
            while text[pos] != "]":
                start = pos
                item, pos = decode(text, pos)
                if spans:
                    starts.append(start)
                else:
                    items.append(item)
                del item
                pos = skip(pos)
                if text[pos] == ",":
                    pos = skip(pos + 1)
                elif text[pos] != "]":
                    raise ValueError("expected ',' or ']'")
            value: object = _Entries(text, starts) if spans else items
            pos += 1
        else:
            value, pos = decode(text, pos)
        out[key] = value
        pos = skip(pos)
        if text[pos] == ",":
            pos = skip(pos + 1)
        elif text[pos] != "}":
            raise ValueError("expected ',' or '}'")
    if text[pos + 1:].strip():
        raise ValueError("trailing data")
    return out


def load_snapshot(
    path: Path,
    *,
    local_datacenter: str,
    vip_range: str,
    previous: Snapshot | None = None,
    yielding: bool = False,
    max_size: int | None = None,
    warnings: list[str] | None = None,
) -> Snapshot:
    """File to snapshot; every problem is reported as ``file:line: field: reason``.

    ``warnings``: when given, references that lead nowhere (``catalog/checks.py``) are added
    to it, in the same form.

    The cyclic garbage collector is paused while the snapshot is built: a large catalog is
    hundreds of thousands of new objects, none of them garbage, and collections triggered by
    their allocation cost more than the build itself (measured: 2-3x the load time).
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        try:
            version: float | None = os.stat(path).st_mtime
        except OSError:
            version = None  # read_file names the problem
        raw: bytes | str = read_file(path, max_size)
        if yielding and path.suffix.lower() == ".json":
            # the stepwise reader keeps the text for the whole build: not the bytes as well
            # (a reload's peak is the old snapshot and all of this: 29 MB of 300,000 instances)
            raw = _text(path, raw)
        catalog, doc = read_catalog(path, yielding, raw)
        try:
            snapshot = build_snapshot(
                catalog, local_datacenter=local_datacenter, vip_range=vip_range,
                previous=previous, version=version, yielding=yielding,
            )
        except CatalogProblems as exc:
            doc = doc or read_document(path, _text(path, raw))
            raise ConfigError([f"{doc.where(real_path(doc.data, p))}: {msg}"
                               for p, msg in exc.problems]) from None
        if warnings is not None:
            warnings += _dangling(path, raw, catalog, snapshot, doc)
        return snapshot
    finally:
        if paused:
            # Everything built here lives as long as the snapshot and has no cycles: freeze it
            # out of the collector's sight. Left young, the first collection after a large
            # load would walk it all with the GIL held (measured: 0.8 s with 300,000
            # instances, during which no query is answered).
            gc.freeze()
            gc.enable()
        release_free_memory()  # what the parse left behind (see release_free_memory)


def _dangling(path: Path, raw: bytes | str, catalog: Catalog, snapshot: Snapshot,
              doc: Document | None) -> list[str]:
    services = doc.data.get("services") if doc else None
    problems = dangling_references(catalog, snapshot, services)
    if problems and doc is None:  # JSON: lines are looked up only when there is a problem
        doc = read_document(path, _text(path, raw))
        services = doc.data.get("services") if isinstance(doc.data, dict) else None
        problems = dangling_references(catalog, snapshot, services)
    if not problems:
        return []
    assert doc is not None
    return [f"{doc.where(real_path(doc.data, p))}: {msg}" for p, msg in problems]


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is replaced or rewritten (follows symlinks, as ConfigMaps use)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


# --- the source: a catalog file followed as it changes ---------------------------------------

Signature = tuple[int, int, int]

SETTLE = 0.1  # seconds a changed file must hold still before it is read
QUIET_POLL = 1.0  # seconds between polls of a file inotify watches, when nothing happens
# A document that fails (or is refused) right after a change may be a writer's pause: it is
# reported once it has held still this long. (A finished broken edit waits this long for its
# error; a file being written never produces one.)
PARTIAL_GRACE = 1.0
WRITER_PATIENCE = 10.0  # seconds to wait for a writer that keeps the file open, then read
RETRY_FIRST, RETRY_MAX = 0.25, 30.0  # back-off (seconds) for reads that failed for a passing reason


class FileSource:
    """A catalog file, polled every ``catalog.poll_interval`` and read again when it changes.

    Every way a read can go wrong ends the same way: the reason is logged as ``file:line:
    field: reason`` (or ``file: reason``), counted in ``state.errors``, kept in
    ``state.last_error``, and the last good snapshot keeps being served. The watch loop itself
    never dies. A read is refused, too, when the new document is empty or would drop more than
    ``catalog.max_drop`` of the instances (see ``checks.py``)."""

    kind = "file"

    def __init__(self, config: Config, path: Path, follow_config: bool = False) -> None:
        self.config = config
        self.path = path
        self.follow_config = follow_config  # path is the config's catalog.file (not --catalog)
        self.state = SourceState("file", detail={"file": str(path)})
        self.snapshot: Snapshot | None = None  # the last good one
        self.warnings: list[str] = []  # dangling references of the last good one
        self._publish: Publish | None = None
        self._seen: Signature | None = None  # the version of the file last read, good or bad
        self.accepted: Signature | None = None  # the version the last good snapshot came from
        self._retry_at: float | None = None  # monotonic: read again then, even unchanged
        self._backoff = RETRY_FIRST
        self._held: tuple[list[str], float] | None = None  # problems kept back (PARTIAL_GRACE)
        self._writer_since: float | None = None  # monotonic: when a writer was first seen
        self._writers = WriterWatch(path)
        self._wake: Callable[[], None] | None = None  # ends a quiet wait (_pause) at once
        self._busy = False  # a reload in flight
        self._again: str | None = None  # why a reload was asked for while one was in flight
        self._parse: asyncio.Future[tuple[Snapshot, list[str], Change]] | None = None  # running

    # -- reading ------------------------------------------------------------------------------

    def load(self, previous: Snapshot | None = None, before: int | None = None) -> Snapshot:
        """Read the file now, in this thread (start-up, ``meshdns check``). Raises
        ``ConfigError`` with every problem found; nothing else escapes. ``previous`` (a
        snapshot) or ``before`` (its instance count): refuse as a reload from it would."""
        signature = file_signature(self.path)
        snapshot, warnings = self._build(previous, yielding=False)
        if previous is not None:
            before = previous.counts["instances"]
        refusal = drop_refusal(before, snapshot.counts["instances"],
                               self.config.catalog.max_drop)
        if refusal:
            raise ConfigError([f"{self.path}: {refusal}"])
        self._accept(snapshot, signature, warnings)
        return snapshot

    def adopt(self, snapshot: Snapshot, problems: list[str]) -> None:
        """Serve ``snapshot``, read from another copy of this catalog (a restarted worker gets
        its supervisor's last good one), while the file itself, as it is now, is refused for
        ``problems``: it is read again when it changes."""
        signature = file_signature(self.path)
        self._accept(snapshot, signature, [])
        self.accepted = None  # the file's current version is not what is served
        self._refuse(problems, signature, retry=False)

    def _build(self, previous: Snapshot | None, yielding: bool) -> tuple[Snapshot, list[str]]:
        """File to snapshot and its warnings, whatever goes wrong turned into a
        ``ConfigError`` naming the file (a parser's MemoryError or RecursionError must not
        kill the watcher, nor show a traceback to ``meshdns check``)."""
        config = self.config
        warnings: list[str] = []
        try:
            snapshot = load_snapshot(
                self.path, local_datacenter=config.datacenter,
                vip_range=config.virtual_ip_range, previous=previous, yielding=yielding,
                max_size=config.catalog.max_size, warnings=warnings)
        except ConfigError:
            raise
        except RecursionError:
            raise ConfigError([f"{self.path}: nested too deeply to read"]) from None
        except MemoryError:
            raise ConfigError([f"{self.path}: out of memory while reading it (lower "
                               "catalog.max_size, or give meshdns more memory)"]) from None
        except Exception as exc:  # noqa: BLE001 - whatever a parser raises is a bad file
            raise ConfigError([f"{self.path}: cannot be read: {type(exc).__name__}: "
                               f"{exc}"]) from None
        return snapshot, warnings

    def _accept(self, snapshot: Snapshot, signature: Signature | None,
                warnings: list[str]) -> None:
        recovered = self.state.failing_since
        self.snapshot = snapshot
        self._seen = self.accepted = signature
        self._retry_at = None
        self._held = None
        self._backoff = RETRY_FIRST
        state = self.state
        state.ready = state.serving = True
        state.last_error = None
        state.failing_since = None
        state.last_success = time.time()
        self.warnings = warnings
        state.detail = {"file": str(self.path), "generation": snapshot.generation,
                        "counts": dict(snapshot.counts), "warnings": warnings[:100]}
        if recovered is not None:
            log.info("catalog %s: read again after %.1f s of failures", self.path,
                     time.time() - recovered)

    def _refuse(self, problems: list[str], signature: Signature | None, *, retry: bool = False,
                hold: bool = False) -> None:
        """A read that gave nothing to serve: say why, count it, keep the last good one.
        ``retry``: it may succeed unchanged (read again, backing off); ``hold``: it may be a
        writer's pause (say nothing until the file has held still for PARTIAL_GRACE)."""
        self._seen = signature
        if hold:
            self._held = (problems, time.monotonic() + PARTIAL_GRACE)
            log.debug("catalog %s: not complete yet? %s", self.path, problems[0])
            return
        self._held = None
        state = self.state
        state.errors += 1
        state.last_error = "\n".join(problems)
        if state.failing_since is None:
            state.failing_since = time.time()
        if retry:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RETRY_MAX)
        else:
            self._retry_at = None
        serving = (f"still serving generation {self.snapshot.generation}" if self.snapshot
                   else "nothing to serve yet")
        for problem in problems:
            log.error("catalog reload refused, %s: %s", serving, problem)

    # -- the CatalogSource interface ----------------------------------------------------------

    async def run(self, publish: Publish) -> None:
        """Publish what ``load`` read (before any await, so the listeners open on it), then
        follow the file until cancelled."""
        self._publish = publish
        if self.snapshot is not None:
            publish(self.snapshot, EVERYTHING)
        else:
            try:
                await self.reload("start")
            except asyncio.CancelledError:
                raise
            except Exception:  # as below: a bug here must not end the watching
                log.exception("catalog watcher: unexpected error on the first read (still "
                              "watching)")
        try:
            while True:
                await self._pause()
                try:
                    await self._poll()
                except asyncio.CancelledError:
                    raise
                except Exception:  # the watcher must outlive any bug of its own
                    log.exception("catalog watcher: unexpected error (still watching)")
        finally:
            self._writers.close()

    async def _pause(self) -> None:
        """Wait for the next poll: ``catalog.poll_interval``. A quiet file, where inotify
        sees its folders (writers.py), is polled only when something happens there, and at
        least every QUIET_POLL (what inotify cannot see: network filesystems, links elsewhere):
        40 wake-ups a second cost an idle server ~2% of a core (bench: cold)."""
        interval = self.config.catalog.poll_interval
        fd = self._writers.fd
        if fd >= 0 and self._held is None and self._retry_at is None \
                and self._writer_since is None:
            loop = asyncio.get_running_loop()
            woken = loop.create_future()

            def wake(_: object = None) -> None:
                if self._wake is wake:
                    self._wake = None
                    timer.cancel()
                    loop.remove_reader(fd)  # before reconfigure may close it
                if not woken.done():
                    woken.set_result(None)

            timer = loop.call_later(max(interval, QUIET_POLL), wake)
            loop.add_reader(fd, wake)
            self._wake = wake
            try:
                await woken
            finally:
                wake()
        await asyncio.sleep(interval)  # at most one poll per interval, however busy the folder

    async def _poll(self) -> None:
        writing = self._writers.busy()  # read every time: its events queue up otherwise
        signature = file_signature(self.path)
        now = time.monotonic()
        if signature == self._seen:
            if self._held is not None and now >= self._held[1]:
                self._refuse(self._held[0], signature)  # it stayed that way: now it counts
            elif self._retry_at is not None and now >= self._retry_at:
                await self.reload("retry")
            return
        if signature is None:  # deleted, or its folder is unreadable: an error at once
            missing = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
            self._refuse(ReadFailed(self.path, missing).problems, None, retry=True)
            return
        if writing:  # a writer has it open: whatever is there now may be a part
            if self._writer_since is None:
                self._writer_since = now
            if now - self._writer_since < WRITER_PATIENCE:
                return
            log.warning("catalog %s: still open for writing after %.0f s; reading it anyway",
                        self.path, WRITER_PATIENCE)
        self._writer_since = None
        # Even a file whose writer is gone (or unseen: no inotify) must hold still first.
        await asyncio.sleep(SETTLE)
        if file_signature(self.path) != signature or self._writers.busy():
            return
        await self.reload("file changed")

    async def reload(self, why: str) -> None:
        """Read the file off the event loop; publish the new snapshot, or keep the last good
        one and say why. A reload asked for while one is in flight runs after it."""
        if self._busy:
            self._again = why
            return
        self._busy = True
        try:
            while True:
                await self._reload_once(why)
                if self._again is None:
                    return
                why, self._again = self._again, None
        finally:
            self._busy = False

    async def _reload_once(self, why: str) -> None:
        if self._parse is not None and not self._parse.done():
            # an abandoned parse still runs (max_parse_time): a second would double the memory
            log.debug("catalog %s: reload (%s) put off: the last one is still parsing",
                      self.path, why)
            self._retry_at = time.monotonic() + 0.5  # asked for (SIGHUP): not forgotten
            return
        signature = file_signature(self.path)
        log.debug("catalog reload (%s): reading %s", why, self.path)
        started = time.perf_counter()
        previous = self.snapshot
        limit = self.config.catalog.max_parse_time
        def work() -> tuple[Snapshot, list[str], Change]:
            snapshot, warnings = self._build(previous, yielding=True)
            return snapshot, warnings, change_between(previous, snapshot)

        self._parse = parse = in_thread(work, "meshdns-reload")
        held = why == "file changed"  # a content problem may be a writer's pause
        try:
            snapshot, warnings, change = await asyncio.wait_for(asyncio.shield(parse), limit)
        except TimeoutError:
            parse.add_done_callback(_discard)
            self._refuse([f"{self.path}: still parsing after {limit:g} s "
                          "(catalog.max_parse_time): abandoned"], signature)
            return
        except ReadFailed as exc:
            self._refuse(exc.problems, signature, retry=True)
            return
        except ConfigError as exc:
            self._refuse(exc.problems, signature, hold=held)
            return
        refusal = drop_refusal(previous.counts["instances"] if previous else None,
                               snapshot.counts["instances"], self.config.catalog.max_drop)
        if refusal:
            _discard(parse)
            self._refuse([f"{self.path}: {refusal}"], signature, hold=held)
            return
        self._accept(snapshot, signature, warnings)
        for warning in warnings:
            log.warning("catalog: %s", warning)
        if self._publish is not None:
            self._publish(snapshot, change)
        log.info("catalog reloaded (%s): generation %d, %d nodes, %d instances in %.0f ms (%s)",
                 why, snapshot.generation, snapshot.counts["nodes"],
                 snapshot.counts["instances"], (time.perf_counter() - started) * 1000,
                 "every answer may change" if change.everything else
                 f"{len(change.services)} services changed")

    def reconfigure(self, config: Config) -> list[str]:
        """Take a new server config: its catalog settings apply from the next read, and a
        new ``catalog.file`` is followed from now on (unless ``--catalog`` chose the file)."""
        self.config = config
        path = config.catalog_path()
        if self.follow_config and path is not None and path != self.path:
            log.info("catalog file is now %s (was %s)", path, self.path)
            self.path = path
            self._seen = None
            if self._wake is not None:
                self._wake()  # poll the new file now (and let go of the old one's watch)
            self._writers.close()
            self._writers = WriterWatch(path)
        return []


#: More changed services than this: drop the whole response cache rather than list them.
MAX_LISTED_CHANGES = 5000


def change_between(old: Snapshot | None, new: Snapshot) -> Change:
    """What a reload changed, found by comparing the two snapshots (in the reload's thread), so
    the response cache keeps every answer about the services an edit did not touch. Nodes,
    topology and config entries changed: everything. (Answers that depend on nodes, addresses
    or the SOA are untagged and dropped on any change; see ``cache.py``.)"""
    if old is None or not old.generation:
        return EVERYTHING
    for name in ("local_datacenter", "nodes", "datacenters", "peers", "partitions", "failover",
                 "sameness_groups", "default_sameness", "prepared_queries", "rtt"):
        if getattr(old, name) != getattr(new, name):
            return EVERYTHING
    changed: set[str] = set()
    for index in ("services", "connect", "ingress"):
        before, after = getattr(old, index), getattr(new, index)
        for key in before.keys() | after.keys():
            if before.get(key) != after.get(key):
                changed.add(key[-1])
        if len(changed) > MAX_LISTED_CHANGES:
            return EVERYTHING
    for key in old.vips.keys() | new.vips.keys():
        if old.vips.get(key) != new.vips.get(key):
            changed.add(key[-1])
    return Change(services=frozenset(changed))


def _discard(parse: asyncio.Future[tuple[Snapshot, list[str], Change]]) -> None:
    """Free what an abandoned or refused parse built, off the event loop."""
    if parse.cancelled() or parse.exception() is not None:
        return
    snapshot = parse.result()[0]
    in_thread(lambda: dismantle(snapshot), "meshdns-retire").add_done_callback(
        lambda f: f.exception())
