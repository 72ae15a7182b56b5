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
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from ..config import Config
from ..documents import Document, problems_from, read_document, real_path, validate
from ..errors import ConfigError
from ..offload import in_thread
from .model import Catalog, CatalogFile
from .snapshot import CatalogProblems, Snapshot, build_snapshot, release_free_memory
from .source import EVERYTHING, Publish, SourceState

log = logging.getLogger("meshdns")


def example_catalog_path() -> Path:
    """The example catalog shipped inside the package (also at ``configs/catalog.yaml``)."""
    return Path(str(resources.files("meshdns") / "examples" / "catalog.yaml"))


def read_catalog(path: Path, yielding: bool = False,
                 raw: bytes | None = None) -> tuple[Catalog, Document | None]:
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
    return validate(doc, CatalogFile), doc


def _text(path: Path, raw: bytes) -> str:
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
                               f"({max_size} bytes): refused unread"])
        chunks = []
        left = (max_size if max_size is not None else st.st_size + (1 << 30)) + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:  # grew past the cap while being read
            raise ConfigError([f"{path}:0: (file): over catalog.max_size ({max_size} bytes): "
                               "refused"])
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


def _read_json(path: Path, raw: bytes) -> Catalog:
    # pydantic parses JSON in Rust: several times faster than json.loads + model_validate
    try:
        return CatalogFile.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    doc = read_document(path, _text(path, raw))  # the slow path, only to name lines
    if not isinstance(doc.data, dict):
        raise ConfigError([f"{doc.where(())}: expected an object with nodes, services, ..."])
    raise ConfigError(problems_from(doc, errors, CatalogFile))


def _read_json_yielding(path: Path, raw: bytes) -> Catalog:
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
    if not isinstance(services, list):
        doc = read_document(path, text)
        raise ConfigError([f"{doc.where(('services',))}: expected a list of services"])
    # the services are validated one by one in build_snapshot
    return catalog.model_copy(update={"services": services})


_WS = frozenset(" \t\r\n")


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
            items: list[object] = []
            pos = skip(pos + 1)
            while text[pos] != "]":
                item, pos = decode(text, pos)
                items.append(item)
                pos = skip(pos)
                if text[pos] == ",":
                    pos = skip(pos + 1)
                elif text[pos] != "]":
                    raise ValueError("expected ',' or ']'")
            value: object = items
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
) -> Snapshot:
    """File to snapshot; every problem is reported as ``file:line: field: reason``.

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
        raw = read_file(path, max_size)
        catalog, doc = read_catalog(path, yielding, raw)
        try:
            return build_snapshot(
                catalog, local_datacenter=local_datacenter, vip_range=vip_range,
                previous=previous, version=version, yielding=yielding,
            )
        except CatalogProblems as exc:
            doc = doc or read_document(path, _text(path, raw))
            raise ConfigError([f"{doc.where(real_path(doc.data, p))}: {msg}"
                               for p, msg in exc.problems]) from None
    finally:
        if paused:
            # Everything built here lives as long as the snapshot and has no cycles: freeze it
            # out of the collector's sight. Left young, the first collection after a large
            # load would walk it all with the GIL held (measured: 0.8 s with 300,000
            # instances, during which no query is answered).
            gc.freeze()
            gc.enable()
        release_free_memory()  # what the parse left behind (see release_free_memory)


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
RETRY_FIRST, RETRY_MAX = 0.25, 30.0  # back-off (seconds) for reads that failed for a passing reason


class FileSource:
    """A catalog file, polled every ``catalog.poll_interval`` and read again when it changes.

    Every way a read can go wrong ends the same way: the reason is logged as ``file:line:
    field: reason`` (or ``file: reason``), counted in ``state.errors``, kept in
    ``state.last_error``, and the last good snapshot keeps being served. The watch loop itself
    never dies."""

    kind = "file"

    def __init__(self, config: Config, path: Path, follow_config: bool = False) -> None:
        self.config = config
        self.path = path
        self.follow_config = follow_config  # path is the config's catalog.file (not --catalog)
        self.state = SourceState("file", detail={"file": str(path)})
        self.snapshot: Snapshot | None = None  # the last good one
        self._publish: Publish | None = None
        self._seen: Signature | None = None  # the version of the file last read, good or bad
        self.accepted: Signature | None = None  # the version the last good snapshot came from
        self._retry_at: float | None = None  # monotonic: read again then, even unchanged
        self._backoff = RETRY_FIRST
        self._busy = False  # a read in flight
        self._again: str | None = None  # why a reload was asked for while one was in flight

    # -- reading ------------------------------------------------------------------------------

    def load(self) -> Snapshot:
        """Read the file now, in this thread (start-up, ``meshdns check``). Raises
        ``ConfigError`` with every problem found; nothing else escapes."""
        signature = file_signature(self.path)
        snapshot = self._build(None, yielding=False)
        self._accept(snapshot, signature)
        return snapshot

    def adopt(self, snapshot: Snapshot, problems: list[str]) -> None:
        """Serve ``snapshot``, read from another copy of this catalog (a restarted worker gets
        its supervisor's last good one), while the file itself, as it is now, is refused for
        ``problems``: it is read again when it changes."""
        signature = file_signature(self.path)
        self._accept(snapshot, signature)
        self.accepted = None  # the file's current version is not what is served
        self._refuse(problems, signature, retry=False)

    def _build(self, previous: Snapshot | None, yielding: bool) -> Snapshot:
        """File to snapshot, whatever goes wrong turned into a ``ConfigError`` naming the file
        (a parser's MemoryError or RecursionError must not kill the watcher, nor show a
        traceback to ``meshdns check``)."""
        config = self.config
        try:
            return load_snapshot(self.path, local_datacenter=config.datacenter,
                                 vip_range=config.virtual_ip_range, previous=previous,
                                 yielding=yielding, max_size=config.catalog.max_size)
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

    def _accept(self, snapshot: Snapshot, signature: Signature | None) -> None:
        recovered = self.state.failing_since
        self.snapshot = snapshot
        self._seen = self.accepted = signature
        self._retry_at = None
        self._backoff = RETRY_FIRST
        state = self.state
        state.ready = state.serving = True
        state.last_error = None
        state.failing_since = None
        state.last_success = time.time()
        state.detail = {"file": str(self.path), "generation": snapshot.generation,
                        "counts": dict(snapshot.counts)}
        if recovered is not None:
            log.info("catalog %s: readable again after %.1f s of failures", self.path,
                     time.time() - recovered)

    def _refuse(self, problems: list[str], signature: Signature | None, retry: bool) -> None:
        """A read that gave nothing to serve: say why, count it, keep the last good one."""
        state = self.state
        self._seen = signature
        state.errors += 1
        state.last_error = "\n".join(problems)
        if state.failing_since is None:
            state.failing_since = time.time()
        if retry:  # may succeed unchanged: try again, backing off
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
            await self.reload("start")
        while True:
            await asyncio.sleep(self.config.catalog.poll_interval)
            try:
                await self._poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must outlive any bug of its own
                log.exception("catalog watcher: unexpected error (still watching)")

    async def _poll(self) -> None:
        signature = file_signature(self.path)
        if signature != self._seen:
            if signature is None:  # gone (or unreadable directory): an error at once
                missing = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
                self._refuse(ReadFailed(self.path, missing).problems, None, retry=True)
                return
            # Rewritten in place (same inode), the file may still be half-written, and even
            # a rename may land a file its writer has just closed: let it hold still first.
            await asyncio.sleep(SETTLE)
            if file_signature(self.path) != signature:
                return
            await self.reload("file changed")
        elif self._retry_at is not None and time.monotonic() >= self._retry_at:
            await self.reload("retry")

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
        signature = file_signature(self.path)
        started = time.perf_counter()
        previous = self.snapshot
        try:
            snapshot = await in_thread(lambda: self._build(previous, yielding=True),
                                       "meshdns-reload")
        except ReadFailed as exc:
            self._refuse(exc.problems, signature, retry=True)
            return
        except ConfigError as exc:
            self._refuse(exc.problems, signature, retry=False)
            return
        self._accept(snapshot, signature)
        if self._publish is not None:
            self._publish(snapshot, EVERYTHING)
        log.info("catalog reloaded (%s): generation %d, %d nodes, %d instances in %.0f ms",
                 why, snapshot.generation, snapshot.counts["nodes"],
                 snapshot.counts["instances"], (time.perf_counter() - started) * 1000)

    def reconfigure(self, config: Config) -> list[str]:
        """Take a new server config: its catalog settings apply from the next read."""
        self.config = config
        return []
