"""The container's and the Kubernetes Deployment's command, run outside a container.

No container engine or cluster is available here, so these tests read what the image and the
pod would run -- the Dockerfile's ENTRYPOINT/CMD and the files it COPYs into /etc/meshdns, the
Deployment's ``command`` and the ConfigMap mounted at /etc/meshdns -- lay those files out in a
temporary directory standing for /etc/meshdns, change only the listen addresses (port 53 and
0.0.0.0 are not ours to take in a test), run the very same command and query it, as the
readiness and liveness probes and cluster DNS would.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
import yaml
from conftest import generated_configmaps

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
KUBERNETES = ROOT / "configs" / "kubernetes"


# ----------------------------------------------------------------------------------------------
# Reading the Dockerfile and the manifests
# ----------------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "no FROM in the Dockerfile"
    return instructions[starts[-1]:]


def exec_form(arguments: str) -> list[str]:
    """ENTRYPOINT/CMD arguments; the exec (JSON) form is what lets SIGTERM reach meshdns."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


@dataclass
class Image:
    command: list[str]                       # ENTRYPOINT + CMD
    files: dict[PurePosixPath, Path]         # path in the image -> file in the checkout
    healthcheck: list[str] | None


def read_image() -> Image:
    stage = final_stage(dockerfile_instructions(DOCKERFILE))
    entrypoint: list[str] = []
    cmd: list[str] = []
    healthcheck = None
    files: dict[PurePosixPath, Path] = {}
    for keyword, arguments in stage:
        if keyword == "ENTRYPOINT":
            entrypoint = exec_form(arguments)
        elif keyword == "CMD":
            cmd = exec_form(arguments)
        elif keyword == "COPY":
            words = shlex.split(arguments)
            if any(w.startswith("--from") for w in words):
                continue  # from another stage, not from the checkout
            *sources, dest = [w for w in words if not w.startswith("--")]
            for source in sources:
                target = PurePosixPath(dest)
                if dest.endswith("/"):
                    target = target / PurePosixPath(source).name
                files[target] = ROOT / source
        elif keyword == "HEALTHCHECK":
            match = re.search(r"\bCMD\s+(\[.*\])\s*$", arguments)
            if match:
                healthcheck = exec_form(match.group(1))
    return Image(entrypoint + cmd, files, healthcheck)


def load_manifests() -> list[dict]:
    """What ``kubectl apply -k`` creates: the manifest files and the generated ConfigMaps."""
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs + generated_configmaps(KUBERNETES)


def manifest(kind: str, name: str | None = None) -> dict:
    found = [d for d in load_manifests() if d.get("kind") == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {KUBERNETES}"
    return found[0]


# ----------------------------------------------------------------------------------------------
# Running a command as the container would
# ----------------------------------------------------------------------------------------------


def meshdns_executable() -> str:
    """The ``meshdns`` console script of the Python running the tests (the venv's)."""
    beside = Path(sys.executable).parent / "meshdns"
    if beside.exists():
        return str(beside)
    found = shutil.which("meshdns")
    if found is None:
        pytest.fail("the meshdns console script is not installed (pip install -e .)")
    return found


def local_config(text: str) -> str:
    """The config with its listen addresses moved to loopback, any free port; nothing else."""
    config = yaml.safe_load(text)
    assert config["listen"], "the config must say where to listen"
    assert config["admin"]["listen"], "the probes need the admin endpoint"
    config["listen"] = ["127.0.0.1:0"]
    config["admin"]["listen"] = "127.0.0.1:0"
    return yaml.safe_dump(config)


def command_here(command: list[str], etc: Path, mount: PurePosixPath) -> list[str]:
    """The container's command as run here: its program found (``meshdns``: the venv's
    console script; ``meshdns-entrypoint``: the checkout's script the Dockerfile installs),
    paths under ``mount`` moved to ``etc``."""
    program = command[0]
    if program == "meshdns":
        here = meshdns_executable()
    else:
        installed = [source for target, source in read_image().files.items()
                     if target.name == program and str(target.parent) in IMAGE_PATH]
        assert installed, f"{program} is not installed on the image's PATH by the Dockerfile"
        here = str(installed[0])
    return [here, *(Running.map(a, etc, mount) for a in command[1:])]


IMAGE_PATH = ("/usr/local/bin", "/usr/bin", "/bin", "/opt/venv/bin")


def container_env(etc: Path, mount: PurePosixPath) -> dict[str, str]:
    """The environment, with the venv's ``meshdns`` first on PATH (as /opt/venv/bin is in the
    image) and the entrypoint's default config path moved to ``etc``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(meshdns_executable()).parent}:{os.environ.get('PATH', '')}"}
    default = entrypoint_default_config()
    if default is not None:
        env["MESHDNS_CONFIG"] = Running.map(str(default), etc, mount)
    return env


def entrypoint_default_config() -> PurePosixPath | None:
    """The config path the image's entrypoint script uses when given none."""
    for target, source in read_image().files.items():
        if target.name == "meshdns-entrypoint":
            match = re.search(r"\$\{MESHDNS_CONFIG:-([^}]+)\}", source.read_text())
            assert match, f"{source}: no default config path"
            return PurePosixPath(match.group(1))
    return None


class Running:
    """The command running with /etc/meshdns mapped to ``etc``."""

    def __init__(self, command: list[str], etc: Path, mount: PurePosixPath) -> None:
        self.args = command_here(command, etc, mount)
        self.log_path = etc.parent / "meshdns.log"
        env = container_env(etc, mount)
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=etc.parent, env=env)
        self.port = self.admin_port = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = self.log_path.read_text()
            dns_port = re.search(r"serving DNS on 127\.0\.0\.1:(\d+)", text)
            admin = re.search(r"admin endpoint on http://127\.0\.0\.1:(\d+)", text)
            if dns_port and admin:
                self.port, self.admin_port = int(dns_port.group(1)), int(admin.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"{' '.join(self.args)} did not start:\n{self.log_path.read_text()}")

    @staticmethod
    def map(arg: str, etc: Path, mount: PurePosixPath) -> str:
        path = PurePosixPath(arg)
        if path.is_absolute() and path.is_relative_to(mount):
            return str(etc / path.relative_to(mount))
        return arg

    def query(self, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
        msg = dns.message.make_query(name, rdtype)
        if tcp:
            return dns.query.tcp(msg, "127.0.0.1", port=self.port, timeout=2)
        return dns.query.udp(msg, "127.0.0.1", port=self.port, timeout=2)

    def http(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}",
                                        timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def run() -> Iterator:
    started: list[Running] = []

    def start(command: list[str], etc: Path, mount: PurePosixPath) -> Running:
        running = Running(command, etc, mount)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def addresses(reply: dns.message.Message) -> set[str]:
    return {r.to_text() for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A
            for r in rrset}


# ----------------------------------------------------------------------------------------------
# The image
# ----------------------------------------------------------------------------------------------


def image_etc(tmp_path: Path) -> tuple[Image, Path, PurePosixPath, PurePosixPath]:
    """The image's /etc/meshdns laid out in ``tmp_path`` (the config's listen moved); the
    config path the default command uses and the directory standing for /etc/meshdns."""
    image = read_image()
    config_arg = entrypoint_default_config()
    assert config_arg is not None, "the image's entrypoint is not meshdns-entrypoint"
    assert config_arg in image.files, f"the Dockerfile does not COPY {config_arg}"
    mount = config_arg.parent
    etc = tmp_path / "etc-meshdns"
    etc.mkdir()
    for target, source in image.files.items():
        if target.is_relative_to(mount):
            dest = etc / target.relative_to(mount)
            dest.parent.mkdir(parents=True, exist_ok=True)
            text = source.read_text()
            dest.write_text(local_config(text) if target == config_arg else text)
    return image, etc, mount, config_arg


def test_image_default_command_refuses_without_a_mounted_catalog(tmp_path: Path) -> None:
    """No catalog in the image: `docker run IMAGE` with nothing mounted must fail clearly,
    not serve the example catalog's addresses."""
    image, etc, mount, config_arg = image_etc(tmp_path)
    config = yaml.safe_load((etc / config_arg.name).read_text())
    catalog_in_image = mount / config["catalog"]["file"]
    assert catalog_in_image not in image.files, "the image must not bake in a catalog"
    result = subprocess.run(command_here(image.command, etc, mount), capture_output=True,
                            text=True, timeout=60, env=container_env(etc, mount))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error"
    assert f"catalog.file: {etc / config['catalog']['file']} does not exist" in entry["msg"]
    assert "--example" in entry["msg"]


def test_image_command_serves_a_mounted_catalog(run, tmp_path: Path) -> None:
    image, etc, mount, config_arg = image_etc(tmp_path)
    config = yaml.safe_load((etc / config_arg.name).read_text())
    # `docker run -v $PWD/catalog.yaml:/etc/meshdns/catalog.yaml:ro IMAGE`
    (etc / config["catalog"]["file"]).write_text(
        "nodes: [{name: n1, address: 10.1.2.3}]\nservices: [{name: web, node: n1, port: 80}]\n")
    server = run(image.command, etc, mount)
    assert addresses(server.query("web.service.consul")) == {"10.1.2.3"}
    reply = server.query("web.service.consul", "SRV", tcp=True)
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer
    assert server.query("nope.service.consul").rcode() == dns.rcode.NXDOMAIN
    assert server.http("/health") == 200
    assert server.http("/ready") == 200

    # the HEALTHCHECK command, aimed at the port the admin endpoint really got
    assert image.healthcheck, "the Dockerfile has no HEALTHCHECK"
    probe = [a.replace(":8601/", f":{server.admin_port}/") for a in image.healthcheck]
    probe[0] = sys.executable if probe[0] in ("python", "python3") else probe[0]
    assert subprocess.run(probe, timeout=10).returncode == 0

    # `docker stop` sends SIGTERM: drain and exit 0
    assert server.stop() == 0


def test_image_serves_the_example_only_when_asked(run, tmp_path: Path) -> None:
    """`docker run IMAGE --example`: the baked-in config, with the example catalog."""
    image, etc, mount, _ = image_etc(tmp_path)
    server = run([*image.command, "--example"], etc, mount)
    assert addresses(server.query("web.virtual.consul")) == {"240.0.0.10"}
    log = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    assert any("serving the example catalog" in e["msg"] and e["level"] == "warning"
               for e in log)
    assert server.stop() == 0


def test_image_passes_other_commands_through(tmp_path: Path) -> None:
    """`docker run IMAGE check --config ... --example`: a first word is a meshdns command."""
    image, etc, mount, config_arg = image_etc(tmp_path)
    command = [*image.command, "check", "--config", str(config_arg), "--example"]
    result = subprocess.run(command_here(command, etc, mount), capture_output=True, text=True,
                            timeout=60, env=container_env(etc, mount))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "catalog:" in result.stdout


# ----------------------------------------------------------------------------------------------
# The Kubernetes Deployment and its ConfigMap
# ----------------------------------------------------------------------------------------------


@dataclass
class Pod:
    command: list[str]
    mount: PurePosixPath
    data: dict[str, str]           # the ConfigMap's files
    readiness: str
    liveness: str


def read_pod() -> Pod:
    deployment = manifest("Deployment", "meshdns")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "meshdns"]
    command = container.get("command", []) + container.get("args", [])
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
    sources = volume["projected"]["sources"] if "projected" in volume else [volume]
    data: dict[str, str] = {}
    for source in sources:  # a projected volume: the files of each ConfigMap, in one directory
        data.update(manifest("ConfigMap", source["configMap"]["name"])["data"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert ports.get(port) == 8601 or port == 8601, f"{probe} is not on the admin port"
    return Pod(command, PurePosixPath(mount["mountPath"]), data,
               container["readinessProbe"]["httpGet"]["path"],
               container["livenessProbe"]["httpGet"]["path"])


def write_configmap_volume(directory: Path, data: dict[str, str], version: int) -> None:
    """Lay out files as the kubelet does for a ConfigMap volume: every key a symlink through
    ``..data``, itself a symlink to a timestamped directory swapped in one rename on update."""
    real = directory / f"..2026_01_01_00_00_0{version}.000000000"
    real.mkdir()
    for key, text in data.items():
        (real / key).write_text(text)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(real.name)
    os.replace(tmp, directory / "..data")
    for key in data:
        link = directory / key
        if not link.is_symlink():
            link.symlink_to(f"..data/{key}")


def test_deployment_command_serves_the_configmap(run, tmp_path: Path) -> None:
    pod = read_pod()
    assert pod.command[:2] == ["meshdns", "serve"], pod.command
    config_arg = PurePosixPath(pod.command[pod.command.index("--config") + 1])
    assert config_arg.is_relative_to(pod.mount)
    data = dict(pod.data)
    key = str(config_arg.relative_to(pod.mount))
    assert key in data, f"the ConfigMap has no {key}"
    data[key] = local_config(data[key])
    catalog_key = yaml.safe_load(data[key])["catalog"]["file"]
    assert catalog_key in data, f"the ConfigMap has no {catalog_key}"

    volume = tmp_path / "etc-meshdns"
    volume.mkdir()
    write_configmap_volume(volume, data, 1)
    server = run(pod.command, volume, pod.mount)

    # what the kubelet's probes ask
    assert server.http(pod.readiness) == 200
    assert server.http(pod.liveness) == 200
    # what cluster DNS forwards: the catalog in the ConfigMap
    reply = server.query("web.service.consul")
    assert addresses(reply) == {"10.0.0.1", "10.0.0.2"}
    assert reply.answer[0].ttl == 5  # service_ttl from the ConfigMap's config
    assert addresses(server.query("db.service.consul", tcp=True)) == {"10.0.2.10"}
    assert server.query("cache.service.consul").rcode() == dns.rcode.NXDOMAIN  # critical
    srv = server.query("web.service.consul", "SRV")
    assert {r.port for rrset in srv.answer for r in rrset} == {8080}
    assert server.query("example.com").rcode() == dns.rcode.REFUSED  # no recursion

    # `kubectl apply` of a changed catalog: the kubelet swaps ..data, meshdns reloads
    catalog = yaml.safe_load(data[catalog_key])
    catalog["services"].append({"name": "api2", "node": "node-1", "port": 7000})
    write_configmap_volume(volume, {**data, catalog_key: yaml.safe_dump(catalog)}, 2)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if server.query("api2.service.consul").rcode() == dns.rcode.NOERROR:
            break
        time.sleep(0.05)
    assert addresses(server.query("api2.service.consul")) == {"10.0.0.1"}
    assert server.stop() == 0


def test_configmap_passes_meshdns_check(tmp_path: Path) -> None:
    pod = read_pod()
    write_configmap_volume(tmp_path, pod.data, 1)
    config_arg = PurePosixPath(pod.command[pod.command.index("--config") + 1])
    result = subprocess.run([meshdns_executable(), "check", "--config",
                             str(tmp_path / config_arg.relative_to(pod.mount))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
