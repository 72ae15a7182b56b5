"""The field reference and the JSON Schemas in docs/ are what the models say (issue 10 point 9).

``docs/reference.md``, ``docs/config.schema.json`` and ``docs/catalog.schema.json`` are generated
by ``python -m meshdns.docs``. When a field is added or changed, these tests fail until the
files are regenerated; every field must say what it means; the schemas must accept every file
the project ships and refuse what meshdns refuses.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import ROOT, generated_configmaps
from pydantic import BaseModel

from meshdns import docs
from meshdns.config import Config, parse_duration

DOCS = ROOT / "docs"


def test_generated_files_are_up_to_date() -> None:
    stale = docs.stale(ROOT)
    assert not stale, (f"{', '.join(map(str, stale))} out of date with the models: run "
                       "`python -m meshdns.docs` and commit the result")


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    for path, text in docs.render().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    command = [sys.executable, "-m", "meshdns.docs", "--check", "--root", str(tmp_path)]
    assert subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    reference = tmp_path / "docs" / "reference.md"
    reference.write_text(reference.read_text().replace("| `node_ttl` |", "| `nodettl` |"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "docs/reference.md: stale" in result.stderr


def all_models(model: type[BaseModel]) -> list[tuple[str, type[BaseModel]]]:
    return [(s.path or "(top level)", s.model) for s in docs.sections(model, "")]


@pytest.mark.parametrize("root", [Config, docs.CatalogDocument], ids=["config", "catalog"])
def test_every_field_is_described(root: type[BaseModel]) -> None:
    missing = [f"{path}.{name}" for path, model in all_models(root)
               for name, info in docs.fields(model) if not (info.description or "").strip()]
    assert not missing, (f"fields without description=: {missing} (add one, then run "
                         "`python -m meshdns.docs`)")


def test_reference_has_a_row_for_every_field() -> None:
    text = (DOCS / "reference.md").read_text()
    for root in (Config, docs.CatalogDocument):
        for path, model in all_models(root):
            for name, _ in docs.fields(model):
                assert re.search(rf"^\| `{re.escape(name)}` \|", text, re.M), f"{path}.{name}"
    assert "| `base_dir` |" not in text  # internal, not a user's field


# --- the JSON Schemas ---------------------------------------------------------------------


def schema(name: str) -> dict[str, Any]:
    document = json.loads((DOCS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(document)
    return document


def configmap_files() -> dict[str, str]:
    """The files the Kubernetes manifests mount at /etc/meshdns."""
    kubernetes = ROOT / "configs" / "kubernetes"
    docs_ = yaml.safe_load_all((kubernetes / "catalog-configmap.yaml").read_text())
    files: dict[str, str] = {}
    for configmap in [*docs_, *generated_configmaps(kubernetes)]:
        files.update(configmap["data"])
    return files


def shipped_configs() -> list[tuple[str, Any]]:
    return [("configs/config.yaml", yaml.safe_load((ROOT / "configs/config.yaml").read_text())),
            ("configs/docker/config.yaml",
             yaml.safe_load((ROOT / "configs/docker/config.yaml").read_text())),
            ("configmap config.yaml", yaml.safe_load(configmap_files()["config.yaml"]))]


def shipped_catalogs() -> list[tuple[str, Any]]:
    return [("configs/catalog.yaml", yaml.safe_load((ROOT / "configs/catalog.yaml").read_text())),
            ("configmap catalog.yaml", yaml.safe_load(configmap_files()["catalog.yaml"]))]


@pytest.mark.parametrize(("name", "data"), shipped_configs(), ids=lambda v: str(v)[:40])
def test_config_schema_accepts_the_shipped_configs(name: str, data: Any) -> None:
    jsonschema.validate(data, schema("config.schema.json"))


@pytest.mark.parametrize(("name", "data"), shipped_catalogs(), ids=lambda v: str(v)[:40])
def test_catalog_schema_accepts_the_shipped_catalogs(name: str, data: Any) -> None:
    jsonschema.validate(data, schema("catalog.schema.json"))


@pytest.mark.parametrize("broken", [
    {"dns": {"nodettl": "5s"}},                    # unknown key
    {"recursors": ["1.1.1.1"]},                    # Consul's place, not ours
    {"dns": {"node_ttl": "5 parsecs"}},            # not a duration
    {"workers": 0},
    {"log_level": "verbose"},
])
def test_config_schema_refuses_what_meshdns_refuses(broken: dict) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema("config.schema.json"))
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        Config.model_validate(broken)


@pytest.mark.parametrize("broken", [
    {"nodes": [{"name": "n1"}]},                                     # no address
    {"nodes": [{"name": "n1", "address": "10.0.0.1", "colour": "red"}]},
    {"services": [{"name": "web", "node": "n1", "port": 70000}]},
    {"services": [{"name": "web", "node": "n1", "health": "sick"}]},
    {"servics": []},
])
def test_catalog_schema_refuses_broken_catalogs(broken: dict) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema("catalog.schema.json"))


@pytest.mark.parametrize("value", ["10s", "250ms", "1m30s", "1h2m3.5s", "500us", "500µs", "7",
                                   "0", 5, 0.5])
def test_schema_durations_accept_what_meshdns_accepts(value: Any) -> None:
    parse_duration(value)
    jsonschema.validate({"dns": {"node_ttl": value}}, schema("config.schema.json"))


@pytest.mark.parametrize("value", ["16MiB", "500KB", "1GiB", 4096])
def test_schema_sizes_accept_what_meshdns_accepts(value: Any) -> None:
    jsonschema.validate({"catalog": {"max_size": value}}, schema("config.schema.json"))
    assert Config.model_validate({"catalog": {"max_size": value}}).catalog.max_size > 0


@pytest.mark.parametrize("value", ["1d", "-1s", "", "10x", "1m30"])
def test_schema_durations_refuse_what_meshdns_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"dns": {"node_ttl": value}}, schema("config.schema.json"))


# --- users are pointed at docs/, never outside the repository --------------------------------


def user_facing_files() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    return [ROOT / f for f in tracked if not f.startswith(("tests/", "bench/results/"))]


def test_nothing_points_at_the_unshipped_spec() -> None:
    offenders = [str(path.relative_to(ROOT)) for path in user_facing_files()
                 if path.is_file() and "shared/" in path.read_text(errors="replace")]
    assert not offenders, f"these point at shared/ (not in the repository): {offenders}"


@pytest.mark.parametrize("path", ["README.md", "configs/config.yaml", "configs/catalog.yaml",
                                  "meshdns/examples/catalog.yaml"])
def test_user_files_point_at_the_reference(path: str) -> None:
    assert "docs/reference.md" in (ROOT / path).read_text()
