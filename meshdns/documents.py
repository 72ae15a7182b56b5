"""Reading YAML and JSON files so that every problem can name its line.

A ``Document`` is the parsed data plus a way to find the line of any value by its path
(``("services", 3, "port")``). YAML keeps the marks of its node graph; JSON is parsed by the
fast C parser and the line is looked up only when a problem needs it.
"""

from __future__ import annotations

import difflib
import json
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError

try:  # the C loader is ~10x faster; fall back where libyaml is missing
    _Base: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on the PyYAML build
    _Base = yaml.SafeLoader


class _Loader(_Base):  # type: ignore[misc, valid-type]
    """The safe loader, minus two surprises: dates stay text (Consul's meta is text, and
    ``release: 2024-02-30`` must not fail as an impossible date), and a value that cannot be
    built (``port: 0b_``) is a syntax error at its line instead of an exception from deep
    inside PyYAML."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers
                if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in _Base.yaml_implicit_resolvers.items()
    }

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} cannot be read as {node.tag.rsplit(':', 1)[-1]}: "
                f"{exc}", node.start_mark) from None

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


def read_document(path: Path, text: str | None = None) -> Document:
    """Parse a YAML or JSON file (``text``: its content, already read); syntax errors become a
    ``ConfigError`` with the line."""
    file = str(path)
    try:
        if text is None:
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
    except RecursionError:
        raise ConfigError([f"{file}:1: (syntax): nested too deeply"]) from None
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
    except RecursionError:
        raise ConfigError([f"{file}:1: (syntax): nested too deeply"]) from None
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
        raise ConfigError(problems_from(doc, exc.errors(include_url=False), model)) from None


def problems_from(doc: Document, errors: Sequence[Any],
                  model: type[BaseModel] | None = None) -> list[str]:
    """Format pydantic error dicts against a document (``model``: what the document was
    validated as, so an unknown key can be answered with the valid ones)."""
    out = []
    for err in errors:
        loc = tuple(p for p in err["loc"] if isinstance(p, (str, int)))
        # pydantic adds union-branch names ("str", "function-after[...]") to loc: drop them
        loc = real_path(doc.data, loc)
        out.append(f"{doc.where(loc)}: {error_message(err, model)}")
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


def error_message(err: Any, model: type[BaseModel] | None = None) -> str:
    """A pydantic error dict as a reason a user can act on (``model``: the model ``err``'s
    location starts from, to list the valid keys of an unknown one)."""
    if err.get("type") == "string_pattern_mismatch":
        return (f"{err.get('input')!r} cannot be used in a DNS name "
                "(letters, digits, '-', '_' and '.', at most 63 characters)")
    if err.get("type") == "extra_forbidden" and model is not None:
        loc = [p for p in err["loc"] if isinstance(p, (str, int))]
        parent = model_at(model, loc[:-1])
        if parent is not None and loc and isinstance(loc[-1], str):
            return unknown_key(loc[-1], parent)
    return str(err["msg"]).removeprefix("Value error, ")


def unknown_key(key: str, model: type[BaseModel]) -> str:
    """``unknown field 'recursor'; did you mean 'recursors'? valid fields: ...``.

    A key that belongs to a section below (``recursors`` at the top of the server config, where
    Consul's agent config has it) is pointed there."""
    fields = [name for name, info in model.model_fields.items() if not info.exclude]
    text = f"unknown field {key!r}"
    elsewhere = [".".join(path) for path in field_paths(model) if path[-1] == key.lower()
                 and len(path) > 1]
    close = difflib.get_close_matches(key.lower(), fields, n=1, cutoff=0.6)
    if elsewhere and len(elsewhere) <= 2:
        text += f"; did you mean {' or '.join(elsewhere)}?"
    elif close:
        text += f"; did you mean {close[0]!r}?"
    return f"{text} (valid here: {', '.join(fields)})"


def field_paths(model: type[BaseModel], prefix: tuple[str, ...] = (),
                depth: int = 3) -> list[tuple[str, ...]]:
    """Every field path below ``model`` (through nested models), a few levels deep."""
    out: list[tuple[str, ...]] = []
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        out.append((*prefix, name))
        nested = nested_model(info.annotation)
        if nested is not None and depth > 1:
            out += field_paths(nested, (*prefix, name), depth - 1)
    return out


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, directly or in a list, dict or optional; else ``None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return nested_model(args[0])
    if origin is dict and len(args) == 2:
        return nested_model(args[1])
    for arg in args:  # list[X], X | None, Union[...]
        found = nested_model(arg)
        if found is not None:
            return found
    return None


def model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model that validates the value at ``loc`` below ``model`` (list indexes and dict
    keys pass through), or ``None`` where the path leaves the models."""
    current: type[BaseModel] | None = model
    pending_container = False
    for part in loc:
        if current is None:
            return None
        if pending_container:
            pending_container = False  # a list index or dict key: same model
            continue
        info = current.model_fields.get(str(part))
        if info is None:
            return None
        annotation = info.annotation
        current = nested_model(annotation)
        pending_container = _is_container(annotation)
    return None if pending_container else current


def _is_container(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _is_container(typing.get_args(annotation)[0])
    if origin in (list, dict, tuple, set, frozenset):
        return True
    return any(_is_container(a) for a in typing.get_args(annotation)
               if a is not type(None) and typing.get_origin(a) is not None)
