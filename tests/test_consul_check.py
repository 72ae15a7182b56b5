"""``meshdns check --config FILE`` in Consul mode, against the fake Consul: what the token sees,
which permissions it misses, exit 1 when Consul cannot be reached or read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from fake_consul import FakeConsul

ROOT = Path(__file__).resolve().parent.parent


def check(tmp_path: Path, **consul) -> subprocess.CompletedProcess:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"catalog": {"consul": consul}}))
    return subprocess.run([sys.executable, "-m", "meshdns", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_check_lists_what_the_token_sees(tmp_path):
    with FakeConsul() as fake:
        fake.register_node("n1", "10.0.0.1")
        fake.register_service("web", "n1", id="web-1", address="10.0.1.1", port=80)
        fake.add_partition("part-2")
        fake.add_peer("cluster-02")
        run = check(tmp_path, address=fake.url, partitions=["*"])
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "datacenters: dc1" in out and "partitions: default, part-2" in out
    assert "peers cluster-02" in out
    assert "dc dc1, partition default, namespace default: 1 services" in out
    assert out.strip().endswith("consul: ok")


def test_check_names_missing_permissions(tmp_path):
    with FakeConsul() as fake:
        fake.register_node("n1", "10.0.0.1")
        fake.register_service("web", "n1", id="web-1", address="10.0.1.1", port=80)
        fake.enable_acls("deny")
        fake.add_token("svc-only", {"service_prefix": {"": {"policy": "read"}}})
        partial = check(tmp_path, address=fake.url, token="svc-only")
        denied = check(tmp_path, address=fake.url, token="nobody")
    assert "missing permissions:" in partial.stdout
    assert "peering:read (for /v1/peerings)" in partial.stdout
    assert "node:read" in partial.stdout  # nodes hidden by ACLs, not refused
    assert denied.returncode == 1
    assert "FAILED" in denied.stdout


def test_check_fails_when_consul_is_unreachable(tmp_path):
    run = check(tmp_path, address="http://127.0.0.1:1")
    assert run.returncode == 1
    assert "unreachable" in run.stdout and "Traceback" not in run.stderr
