"""The README's Kubernetes checks give what the README says (issue 10 point 8).

Every ``dig`` command of "4. Check it from a pod" is run with the real dig against meshdns
serving the manifests' own config and catalog (the files mounted at /etc/meshdns, listen moved
to loopback). Cluster DNS forwards the ``consul.`` zone unchanged, so a command without ``@`` asks
meshdns too, and ``@10.96.0.53`` (the Service) becomes meshdns's loopback port. A command added to
the README without a check here fails the test.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, MeshdnsProcess, generated_configmaps

KUBERNETES = ROOT / "configs" / "kubernetes"


def readme_checks() -> list[str]:
    """The dig commands of the README's "Check it from a pod" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### 4. Check it from a pod", 1)[1].split("\n### ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            command = line.split("#", 1)[0].strip()
            if " -- dig " in command:  # kubectl run ... -- dig NAME
                command = command.split(" -- ", 1)[1]
            if command.startswith("dig "):
                commands.append(" ".join(command.split()))
    return commands


def service_ip() -> str:
    service = yaml.safe_load((KUBERNETES / "service.yaml").read_text())
    return service["spec"]["clusterIP"]


def mounted_files() -> dict[str, str]:
    files: dict[str, str] = {}
    docs = yaml.safe_load_all((KUBERNETES / "catalog-configmap.yaml").read_text())
    for configmap in [*docs, *generated_configmaps(KUBERNETES)]:
        files.update(configmap["data"])
    return files


@dataclass
class Dig:
    """dig's output, parsed: status, flags, and each section's records as (name, type, data)."""

    status: str
    flags: set[str]
    sections: dict[str, list[tuple[str, str, str]]]
    text: str

    @classmethod
    def parse(cls, text: str) -> Dig:
        status = re.search(r"status: (\w+)", text)
        flags = re.search(r";; flags: ([a-z ]+);", text)
        sections: dict[str, list[tuple[str, str, str]]] = {}
        current = None
        for line in text.splitlines():
            heading = re.match(r";; (\w+) SECTION:", line)
            if heading:
                current = heading.group(1)
                sections[current] = []
            elif not line.strip():
                current = None
            elif current and not line.startswith(";"):
                name, _ttl, _class, rdtype, *data = line.split()
                sections[current].append((name, rdtype, " ".join(data)))
        assert status and flags, text
        return cls(status.group(1), set(flags.group(1).split()), sections, text)

    def records(self, section: str, rdtype: str) -> list[tuple[str, str]]:
        return [(name, data) for name, t, data in self.sections.get(section, []) if t == rdtype]


# What the README says of each command (the comment next to it, or the paragraph before it).

def virtual_ip(reply: Dig) -> None:
    """status NOERROR and the service's virtual IP, in 240.0.0.0/4 unless the catalog fixes it"""
    assert reply.status == "NOERROR", reply.text
    (address,) = [data for _, data in reply.records("ANSWER", "A")]
    assert ipaddress.ip_address(address) in ipaddress.ip_network("240.0.0.0/4")


def srv_with_targets(reply: Dig) -> None:
    """ports and targets; the targets' addresses in ADDITIONAL"""
    assert reply.status == "NOERROR", reply.text
    targets = {data.split()[3] for _, data in reply.records("ANSWER", "SRV")}
    ports = {data.split()[2] for _, data in reply.records("ANSWER", "SRV")}
    assert targets and ports == {"8080"}, reply.text
    glued = {name for name, _ in reply.records("ADDITIONAL", "A")}
    assert targets <= glued, reply.text


def nxdomain_with_soa(reply: Dig) -> None:
    """status: NXDOMAIN, consul. SOA in AUTHORITY"""
    assert reply.status == "NXDOMAIN"
    assert [name for name, _ in reply.records("AUTHORITY", "SOA")] == ["consul."], reply.text


def nodata(reply: Dig) -> None:
    """IPv4-only service: NOERROR with no answer (NODATA)"""
    assert reply.status == "NOERROR" and not reply.sections.get("ANSWER"), reply.text
    assert reply.records("AUTHORITY", "SOA"), reply.text


def authoritative(reply: Dig) -> None:
    """meshdns itself, bypassing cluster DNS (flag aa set)"""
    assert reply.status == "NOERROR" and "aa" in reply.flags, reply.text
    assert sorted(data for _, data in reply.records("ANSWER", "A")) == ["10.0.0.1", "10.0.0.2"]


def ns_glue(reply: Dig) -> None:
    """the NS glue: 10.96.0.53 (advertise), where meshdns is"""
    assert reply.status == "NOERROR", reply.text
    assert [data for _, data in reply.records("ANSWER", "A")] == [service_ip()]


CHECKS: dict[str, Callable[[Dig], None]] = {
    "dig web.virtual.consul": virtual_ip,
    "dig web.service.consul SRV": srv_with_targets,
    "dig nope.service.consul": nxdomain_with_soa,
    "dig web.service.consul AAAA": nodata,
    "dig @10.96.0.53 web.service.consul": authoritative,
    "dig +tcp @10.96.0.53 web.service.consul": authoritative,
    "dig ns.consul": ns_glue,
}


def test_every_readme_command_is_checked() -> None:
    commands = readme_checks()
    assert commands, "no dig command found in the README's Kubernetes section"
    assert set(commands) == set(CHECKS), "README commands and this test's checks differ"
    assert "@10.96.0.53" in " ".join(commands) and service_ip() == "10.96.0.53"


@pytest.fixture(scope="module")
def pod_meshdns(tmp_path_factory: pytest.TempPathFactory) -> MeshdnsProcess:
    """meshdns on the manifests' config and catalog, listening on loopback."""
    workdir: Path = tmp_path_factory.mktemp("pod")
    files = mounted_files()
    config = yaml.safe_load(files["config.yaml"])
    config["listen"] = ["127.0.0.1:0"]
    config["admin"]["listen"] = "127.0.0.1:0"
    (workdir / config["catalog"]["file"]).write_text(files[config["catalog"]["file"]])
    server = MeshdnsProcess(workdir, config=config)
    yield server
    server.stop()


@pytest.mark.parametrize("command", readme_checks())
def test_readme_command_answers_as_documented(pod_meshdns: MeshdnsProcess, command: str) -> None:
    args = [a for a in shlex.split(command)[1:] if a != f"@{service_ip()}"]
    reply = Dig.parse(pod_meshdns.dig(*args))
    CHECKS[command](reply)
