"""configs/consul/: the ACL policies and the Kubernetes overlay that runs meshdns in Consul mode.

Like test_deploy_files.py: no cluster is needed. The overlay is rendered with ``kubectl
kustomize`` and every object is validated against the Kubernetes OpenAPI schemas; the embedded
config is validated by meshdns itself; the HCL and JSON policies must say the same thing and
grant reads only.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import hcl
import pytest
import yaml

from meshdns.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONSUL = ROOT / "configs" / "consul"
OVERLAY = CONSUL / "kubernetes"
BASE = ROOT / "configs" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # as test_deploy_files.py
POLICIES = ["meshdns-policy", "meshdns-policy-enterprise"]


def render(directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def the(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render(OVERLAY)


def test_overlay_renders_the_base_objects_but_the_catalog(rendered: list[dict[str, Any]]
                                                         ) -> None:
    base = [o for o in render(BASE) if o["metadata"]["name"] != "meshdns-catalog"]
    assert sorted(o["kind"] for o in rendered) == sorted(o["kind"] for o in base)


def test_overlay_objects_validate_against_the_schemas(rendered: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    for obj in rendered:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_embedded_config_is_consul_mode_and_valid(rendered: list[dict[str, Any]],
                                                 tmp_path: Path) -> None:
    data = the(rendered, "ConfigMap")["data"]
    assert sorted(data) == ["config.yaml"], "Consul mode ships no catalog file"
    path = tmp_path / "config.yaml"
    path.write_text(data["config.yaml"])
    config = load_config(path)
    consul = config.catalog.consul
    assert consul is not None and config.catalog.file is None
    assert consul.token is None and consul.token_file, "the token comes from a file, not git"
    assert consul.max_requests <= 64
    assert consul.address.startswith(("http://", "https://"))


def test_token_file_is_the_mounted_secret(rendered: list[dict[str, Any]]) -> None:
    configmap = the(rendered, "ConfigMap")
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    pod = the(rendered, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config_path = PurePosixPath(container["command"][container["command"].index("--config") + 1])
    token_file = config_path.parent / config["catalog"]["consul"]["token_file"]  # relative
    mounts = [m for m in container["volumeMounts"] if token_file.is_relative_to(m["mountPath"])]
    assert len(mounts) == 1, f"no volume mounted where {token_file} lives"
    mount = mounts[0]
    assert mount.get("readOnly") is True
    assert "subPath" not in mount, "a subPath mount never sees a rotated Secret"
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    sources = volume["projected"]["sources"]
    assert {"name": configmap["metadata"]["name"]} == {
        "name": next(s["configMap"]["name"] for s in sources if "configMap" in s)}
    secret = next(s["secret"] for s in sources if "secret" in s)
    relative = str(token_file.relative_to(mount["mountPath"]))
    item = next(i for i in secret["items"] if i["path"] == relative)
    assert item["key"] == "token"
    assert item["mode"] & 0o007 == 0, "the token is not world-readable"
    assert pod["securityContext"]["fsGroup"], "group-readable needs the pod's fsGroup"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_no_secret_is_committed(rendered: list[dict[str, Any]]) -> None:
    assert not [o for o in rendered if o["kind"] == "Secret"]


@pytest.mark.parametrize("name", POLICIES)
def test_hcl_and_json_policies_agree(name: str) -> None:
    from_hcl = hcl.loads((CONSUL / f"{name}.hcl").read_text())
    from_json = json.loads((CONSUL / f"{name}.json").read_text())
    assert from_hcl == from_json


def _levels(rules: Any) -> list[str]:
    if isinstance(rules, str):
        return [rules]
    if isinstance(rules, dict):
        return [lvl for key, value in rules.items() for lvl in
                (_levels(value) if key != "policy" else [value])]
    return []


@pytest.mark.parametrize("name", POLICIES)
def test_policies_only_read(name: str) -> None:
    policy = json.loads((CONSUL / f"{name}.json").read_text())
    assert set(_levels(policy)) == {"read"}
    text = json.dumps(policy)
    for resource in ("node_prefix", "service_prefix", "peering", "mesh"):
        assert resource in text
    for never in ("key_prefix", "acl", "keyring", "event_prefix", "session_prefix"):
        assert f'"{never}"' not in text
