"""The file catalog source: read, validate and index a catalog file; watch it for changes."""

from __future__ import annotations

import gc
import json
import os
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from ..documents import Document, problems_from, read_document, real_path, validate
from ..errors import ConfigError
from .model import Catalog, CatalogFile
from .snapshot import CatalogProblems, Snapshot, build_snapshot


def example_catalog_path() -> Path:
    """The example catalog shipped inside the package (also at ``configs/catalog.yaml``)."""
    return Path(str(resources.files("meshdns") / "examples" / "catalog.yaml"))


def read_catalog(path: Path, yielding: bool = False) -> tuple[Catalog, Document | None]:
    """Parse and validate a catalog file (YAML, or JSON for large catalogs).

    Returns the document too when one was built (YAML), for the lines of later problems.
    ``yielding``: parse JSON in small steps so that the event loop's thread gets the GIL
    between them (a reload in a thread must not stall the packet path for the whole parse).
    """
    if path.suffix.lower() == ".json":
        return (_read_json_yielding(path) if yielding else _read_json(path)), None
    doc = read_document(path)
    if doc.data is not None and not isinstance(doc.data, dict):
        raise ConfigError([f"{doc.where(())}: expected a mapping with nodes, services, ..."])
    return validate(doc, CatalogFile), doc


def _read_json(path: Path) -> Catalog:
    # pydantic parses JSON in Rust: several times faster than json.loads + model_validate
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}:0: (file): cannot read: {exc.strerror or exc}"]) from None
    try:
        return CatalogFile.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    doc = read_document(path)  # the slow path, only to name lines
    if not isinstance(doc.data, dict):
        raise ConfigError([f"{doc.where(())}: expected an object with nodes, services, ..."])
    raise ConfigError(problems_from(doc, errors, CatalogFile))


def _read_json_yielding(path: Path) -> Catalog:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}:0: (file): cannot read: {exc}"]) from None
    try:
        data = _loads_stepwise(text)
    except (ValueError, IndexError):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError([f"{path}:{exc.lineno}: (syntax): {exc.msg}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: (top level): expected an object with nodes, services"])
    services = data.pop("services", [])
    try:
        catalog = CatalogFile.model_validate(data)
    except ValidationError as exc:
        doc = read_document(path)
        errors = exc.errors(include_url=False)
        raise ConfigError(problems_from(doc, errors, CatalogFile)) from None
    if not isinstance(services, list):
        doc = read_document(path)
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
            version = None  # read_catalog names the problem
        catalog, doc = read_catalog(path, yielding)
        try:
            return build_snapshot(
                catalog, local_datacenter=local_datacenter, vip_range=vip_range,
                previous=previous, version=version,
            )
        except CatalogProblems as exc:
            doc = doc or read_document(path)
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


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is replaced or rewritten (follows symlinks, as ConfigMaps use)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
