"""Ordinary operator mistakes get a clear answer (issue 10, points 3 and 10).

Each test runs the real command line (``meshdns serve``, ``check``, ``query``, the scripts) and,
where a server starts, asks it over the wire.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import dns.rcode
import pytest
from conftest import MESHDNS, ROOT, addresses, write_catalog

CATALOG = """\
nodes:
  - {name: n1, address: 10.0.0.1}
services:
  - {name: web, node: n1, port: 80}
"""


def run(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*MESHDNS, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def json_lines(text: str) -> list[dict]:
    """Every line of ``text`` as JSON (a line that is not JSON fails the test)."""
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
    return out


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- point 3: no implicit demo data --------------------------------------------------------


def test_serve_without_options_serves_the_example_and_says_so(start_server) -> None:
    server = start_server()  # no --config, no --catalog
    assert addresses(server.query("web.virtual.consul")) == ["240.0.0.10"]
    warnings = [e["msg"] for e in server.logs() if e["level"] == "warning"]
    assert any("serving the example catalog" in w and "no --config or --catalog" in w
               for w in warnings), warnings


def test_config_naming_no_catalog_is_an_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "prod.yaml",
                          "listen: ['127.0.0.1:0']\nadmin: {listen: null}\n")
    result = run("serve", "--config", str(config))
    assert result.returncode == 1
    (entry,) = json_lines(result.stderr)
    assert entry["level"] == "error"
    assert entry["msg"].startswith(f"{config}:1: catalog.file: {config} names no catalog")
    assert "--example" in entry["msg"]
    checked = run("check", "--config", str(config))
    assert checked.returncode == 1
    assert f"{config} names no catalog" in checked.stderr
    assert "Traceback" not in checked.stderr + result.stderr


def test_config_naming_no_catalog_serves_the_example_with_explicit_flag(start_server,
                                                                         tmp_path: Path) -> None:
    server = start_server(config={"listen": ["127.0.0.1:0"]}, args=["--example"])
    assert addresses(server.query("web.virtual.consul")) == ["240.0.0.10"]
    assert any("asked for with --example" in e["msg"] for e in server.logs())


def test_missing_catalog_named_by_the_config_is_an_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml",
                          "listen: ['127.0.0.1:0']\ncatalog:\n  file: catalog.yaml\n")
    result = run("serve", "--config", str(config))
    assert result.returncode == 1
    (entry,) = json_lines(result.stderr)
    assert entry["msg"].startswith(f"{config}:3: catalog.file: {tmp_path / 'catalog.yaml'} "
                                   "does not exist")


# --- point 10: the CLI and error messages ---------------------------------------------------


@pytest.mark.parametrize("name", ["a..b", "x" * 64 + ".consul", ".".join(["abcdefgh"] * 40)])
def test_query_with_a_malformed_name_is_a_clear_error(name: str) -> None:
    result = run("query", name, "--server", "127.0.0.1:9", "--timeout", "0.2")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"meshdns query: {name!r} is not a valid DNS name")


def test_version() -> None:
    result = run("--version")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert result.returncode == 0
    assert result.stdout.strip() == f"meshdns {project['version']}"


@pytest.mark.parametrize(("value", "expected"), [
    ("1m30s", 90), ("1h2m3.5s", 3723), ("1500ms", 1), ("2000000us", 2), ("90", 90)])
def test_go_durations_are_accepted(start_server, tmp_path: Path, value: str,
                                   expected: int) -> None:
    catalog = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    server = start_server(catalog=catalog, config={"dns": {"service_ttl": {"*": value}}})
    reply = server.query("web.service.consul")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.answer[0].ttl == expected


@pytest.mark.parametrize("value", ["0s", "0", "1ms", "900us"])
def test_poll_interval_below_the_minimum_is_refused(tmp_path: Path, value: str) -> None:
    catalog = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    config = write_config(tmp_path / "config.yaml",
                          f"catalog:\n  file: catalog.yaml\n  poll_interval: '{value}'\n")
    result = run("serve", "--config", str(config))
    assert result.returncode == 1
    (entry,) = json_lines(result.stderr)
    assert entry["msg"].startswith(f"{config}:3: catalog.poll_interval: must be at least 5ms")
    assert catalog.exists()


def test_a_single_service_ttl_says_what_to_write(tmp_path: Path) -> None:
    """`service_ttl: 5s` (Consul's is a map by service name) names the form it wants."""
    write_catalog(tmp_path / "catalog.yaml", CATALOG)
    config = write_config(tmp_path / "config.yaml",
                          "catalog: {file: catalog.yaml}\ndns:\n  service_ttl: 5s\n")
    result = run("check", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{config}:3: dns.service_ttl: expected TTLs by service name, e.g. {{'*': 5s}} for "
        "every service or {'web': 10s, 'db*': 30s}, got '5s'"]


def test_unknown_keys_list_the_valid_ones_and_suggest(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    config = write_config(tmp_path / "config.yaml", "catalog: {file: catalog.yaml}\n"
                          "dns:\n  node_tll: 5s\n")
    result = run("check", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{config}:3: dns.node_tll: unknown field 'node_tll'; did you mean 'node_ttl'? "
        "(valid here: " + ", ".join(k for k in _dns_fields()) + ")"]
    assert "Extra inputs are not permitted" not in result.stderr
    assert catalog.exists()


def _dns_fields() -> list[str]:
    from meshdns.config import DnsSettings

    return list(DnsSettings.model_fields)


def test_top_level_recursors_points_at_dns_recursors(tmp_path: Path) -> None:
    write_catalog(tmp_path / "catalog.yaml", CATALOG)
    config = write_config(tmp_path / "config.yaml",
                          "catalog: {file: catalog.yaml}\nrecursors: ['1.1.1.1']\n")
    result = run("serve", "--config", str(config))
    assert result.returncode == 1
    (entry,) = json_lines(result.stderr)
    assert entry["msg"].startswith(f"{config}:2: recursors: unknown field 'recursors'; "
                                   "did you mean dns.recursors?")


def test_unknown_catalog_service_key_suggests(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "catalog.yaml", CATALOG.replace("port: 80", "prot: 80"))
    result = run("check", "--catalog", str(catalog))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{catalog}:4: services[0].prot: unknown field 'prot'; "
                                    "did you mean 'port'? (valid here: name, id, node,")


def test_startup_errors_are_json_log_lines(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "catalog.yaml", "nodes:\n  - {name: n1}\n")
    result = run("serve", "--catalog", str(catalog), "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    entries = json_lines(result.stderr)
    assert [e["level"] for e in entries] == ["error"]
    assert entries[0]["msg"] == f"{catalog}:2: nodes[0].address: Field required"
    config = write_config(tmp_path / "bad.yaml", "listen: 53\n: :\n")
    result = run("serve", "--config", str(config))
    assert result.returncode == 1
    assert all(e["level"] == "error" for e in json_lines(result.stderr))


# --- point 10: the scripts ------------------------------------------------------------------


def test_scripts_venv_does_not_reinstall_when_nothing_changed() -> None:
    """``./scripts/serve`` runs ``scripts/venv`` first: with pyproject.toml unchanged since the
    last install, it must not run pip again (4.7 s per start before)."""
    env_stamp = ROOT / ".venv" / ".meshdns-install-stamp"
    first = subprocess.run(["bash", "-x", str(ROOT / "scripts" / "venv")], capture_output=True,
                           text=True, timeout=300, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    assert env_stamp.exists()
    second = subprocess.run(["bash", "-x", str(ROOT / "scripts" / "venv")],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert second.returncode == 0, second.stderr
    assert "pip install" not in second.stderr, second.stderr


def test_scripts_test_puts_the_venv_tools_on_path() -> None:
    """The hadolint test needs the venv's hadolint as a command: ``scripts/test`` must put
    .venv/bin on PATH before pytest (checked by running its environment setup)."""
    script = (ROOT / "scripts" / "test").read_text()
    # run everything but the final exec, then print PATH as pytest would see it
    setup = "\n".join(line for line in script.splitlines()
                      if not line.startswith(("exec ", "scripts/system-deps", "scripts/venv")))
    result = subprocess.run(["bash", "-c", setup + '\necho "$PATH"'], capture_output=True,
                            text=True, timeout=30, cwd=ROOT / "scripts")
    assert result.returncode == 0, result.stderr
    first = result.stdout.strip().split(":")[0]
    assert Path(first) == ROOT / ".venv" / "bin"
    assert (Path(first) / "hadolint").exists()
