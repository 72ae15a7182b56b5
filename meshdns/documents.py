"""Reading YAML and JSON files so that every problem can name its line.

A ``Document`` is the parsed data plus a way to find the line of any value by its path
(``("services", 3, "port")``). YAML keeps the marks of its node graph; JSON is parsed by the
fast C parser and the line is looked up only when a problem needs it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError

try:  # the C loader is ~10x faster; fall back where libyaml is missing
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on the PyYAML build
    _Loader = yaml.SafeLoader

PathKey = tuple[str | int, ...]


@dataclass(frozen=True)
class Document:
    """Parsed file content and a line finder for paths inside it."""

    file: str
    data: Any
    line_of: Callable[[PathKey], int]

    def where(self, path: PathKey, field: str | None = None) -> str:
        """``file:line: field`` for a path (the field defaults to the dotted path)."""
        return f"{self.file}:{self.line_of(path)}: {field or dotted(path)}"


def dotted(path: Iterable[str | int]) -> str:
    """``services[3].port`` from ``("services", 3, "port")``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def read_document(path: Path) -> Document:
    """Parse a YAML or JSON file; syntax errors become a ``ConfigError`` with the line."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}:0: (file): cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{file}:0: (file): not UTF-8 text: {exc.reason}"]) from None
    if path.suffix.lower() == ".json":
        return _read_json(file, text)
    return _read_yaml(file, text)


def _read_json(file: str, text: str) -> Document:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{file}:{exc.lineno}: (syntax): {exc.msg}"]) from None
    return Document(file, data, lambda p: _json_line(text, p))


def _read_yaml(file: str, text: str) -> Document:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if exc.context_mark and mark and mark.index >= len(text):
            mark = exc.context_mark  # an unclosed quote or bracket: where it was opened
        line = mark.line + 1 if mark else 0
        raise ConfigError([f"{file}:{line}: (syntax): {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{file}:0: (syntax): {exc}"]) from None
    finally:
        loader.dispose()
    return Document(file, data, lambda p: _yaml_line(node, p))


def _yaml_line(node: Any, path: PathKey) -> int:
    """Line of the deepest node on ``path`` that exists (1-based)."""
    if node is None:
        return 1
    line = node.start_mark.line + 1
    for part in path:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    # point at the key: that is where the user wrote the field
                    line, child = key.start_mark.line + 1, value
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                and 0 <= part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def _json_line(text: str, path: PathKey) -> int:
    """Line of the value at ``path`` in JSON text, found by a small scanner (errors only)."""
    decoder = json.JSONDecoder()
    pos = 0

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(pos)
    for part in path:
        if pos >= len(text):
            break
        if text[pos] == "{" and isinstance(part, str):
            i = skip_ws(pos + 1)
            found = False
            while i < len(text) and text[i] != "}":
                key, i = decoder.raw_decode(text, i)
                i = skip_ws(skip_ws(i) + 1)  # past ':'
                if key == part:
                    pos, found = i, True
                    break
                _, i = decoder.raw_decode(text, i)
                i = skip_ws(i)
                if i < len(text) and text[i] == ",":
                    i = skip_ws(i + 1)
            if not found:
                break
        elif text[pos] == "[" and isinstance(part, int):
            i = skip_ws(pos + 1)
            index = 0
            while i < len(text) and text[i] != "]" and index < part:
                _, i = decoder.raw_decode(text, i)
                i = skip_ws(i)
                if i < len(text) and text[i] == ",":
                    i = skip_ws(i + 1)
                index += 1
            if index != part or i >= len(text) or text[i] == "]":
                break
            pos = i
        else:
            break
    return text.count("\n", 0, pos) + 1


def validate(doc: Document, model: type[BaseModel], context: dict[str, Any] | None = None) -> Any:
    """``model.model_validate`` with every error turned into ``file:line: field: reason``."""
    try:
        return model.model_validate(doc.data if doc.data is not None else {}, context=context)
    except ValidationError as exc:
        raise ConfigError(problems_from(doc, exc.errors(include_url=False))) from None


def problems_from(doc: Document, errors: Sequence[Any]) -> list[str]:
    """Format pydantic error dicts against a document."""
    out = []
    for err in errors:
        loc = tuple(p for p in err["loc"] if isinstance(p, (str, int)))
        # pydantic adds union-branch names ("str", "function-after[...]") to loc: drop them
        loc = real_path(doc.data, loc)
        out.append(f"{doc.where(loc)}: {error_message(err)}")
    return out


def real_path(data: Any, loc: PathKey) -> PathKey:
    """Keep the prefix of ``loc`` that exists in the data, plus a missing final key."""
    out: list[str | int] = []
    node = data
    for n, part in enumerate(loc):
        present = (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node))
        if present:
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and n == len(loc) - 1:
            out.append(part)  # a missing required field: name it
            break
    return tuple(out)


def error_message(err: Any) -> str:
    """A pydantic error dict as a reason a user can act on."""
    if err.get("type") == "string_pattern_mismatch":
        return (f"{err.get('input')!r} cannot be used in a DNS name "
                "(letters, digits, '-', '_' and '.', at most 63 characters)")
    return str(err["msg"]).removeprefix("Value error, ")
