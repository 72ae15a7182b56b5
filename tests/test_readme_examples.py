"""The README's lookup table is true: every ``dig`` example is run against the example catalog.

The table sits between ``<!-- lookup-table:start -->`` and ``<!-- lookup-table:end -->``; each
row is ``form | `dig @127.0.0.1 -p 8600 ... +short` | returns``, where ``returns`` is the exact
``+short`` output (records in code spans, separated by ``<br>``, compared as sorted lists since
answers are shuffled; ``SERIAL`` stands for the SOA serial) or ``*no answer, status RCODE*``.
The README's failover walkthrough is replayed too.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLE_CATALOG, ROOT, MeshdnsProcess, wait_for

README = ROOT / "README.md"
DIG_PREFIX = ["dig", "@127.0.0.1", "-p", "8600"]


@dataclass(frozen=True)
class Example:
    form: str
    args: tuple[str, ...]  # after `dig @127.0.0.1 -p 8600`
    records: tuple[str, ...]  # expected +short lines, sorted
    status: str | None  # for rows without records: the expected rcode

    @property
    def id(self) -> str:
        return " ".join(a for a in self.args if a != "+short")


def lookup_table() -> list[Example]:
    text = README.read_text()
    body = text.split("<!-- lookup-table:start -->", 1)[1].split("<!-- lookup-table:end -->")[0]
    rows = [line for line in body.splitlines() if line.startswith("|")]
    assert rows[0].replace(" ", "") == "|form|example|returns|", rows[0]
    assert set(rows[1].replace("|", "")) <= {"-", ":", " "}
    examples = []
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 3, row
        form, command, returns = cells
        assert command.startswith("`") and command.endswith("`"), row
        argv = shlex.split(command.strip("`"))
        assert argv[:4] == DIG_PREFIX and "+short" in argv, row
        status = re.fullmatch(r"\*no answer, status ([A-Z]+)\*", returns)
        if status:
            records: tuple[str, ...] = ()
        else:
            parts = [p.strip() for p in returns.split("<br>")]
            assert all(p.startswith("`") and p.endswith("`") for p in parts), row
            records = tuple(p[1:-1] for p in parts)
            assert list(records) == sorted(records), f"records not sorted: {row}"
        examples.append(Example(form, tuple(argv[4:]), records,
                                status.group(1) if status else None))
    return examples


EXAMPLES = lookup_table()


def short_lines(output: str) -> list[str]:
    return sorted(line.strip() for line in output.splitlines() if line.strip())


def matches(expected: tuple[str, ...], got: list[str]) -> bool:
    if len(expected) != len(got):
        return False
    return all(re.fullmatch(re.escape(e).replace("SERIAL", r"\d+"), g)
               for e, g in zip(expected, got))


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_readme_example(example_server: MeshdnsProcess, example: Example) -> None:
    got = short_lines(example_server.dig(*example.args))
    if example.status is None:
        assert matches(example.records, got), f"{example.id}: README says {example.records}"
        return
    assert got == [], example.id
    full = example_server.dig(*(a for a in example.args if a != "+short"))
    assert f"status: {example.status}," in full, full


def test_table_covers_every_lookup_form() -> None:
    names = [" ".join(e.args) for e in EXAMPLES]

    def has(pattern: str) -> bool:
        return any(re.search(pattern, n) for n in names)

    for pattern in [
        r"^\w+\.service\.consul ",  # service
        r"^\w+\.\w+\.service\.consul",  # tag
        r"\.service\.[\w-]+\.ns\.[\w-]+\.ap\.consul",  # namespace, partition
        r"\.service\.\w+\.dc\.consul",  # datacenter
        r"\.service\.dc2\.consul",  # legacy datacenter
        r"\.service\.[\w-]+\.peer\.consul",  # peer
        r"\.service\.[\w-]+\.sg\.consul",  # sameness group
        r"^_\w+\._\w+\.service\.consul SRV",  # RFC 2782
        r"^_\w+\._tcp\.service\.consul SRV",  # RFC 2782, any tag
        r"^_\w+\._\w+\.\w+\.consul SRV",  # RFC 2782 without .service
        r"\.connect\.consul",
        r"\.ingress\.consul",
        r"\.virtual\.consul",
        r"\.virtual\.[\w-]+\.peer\.consul",
        r"\.virtual\.cluster-02\.consul",  # legacy peer
        r"\.node\.consul ",
        r"\.node\.consul TXT",
        r"\.node\.\w+\.dc\.consul",
        r"\.node\.[\w-]+\.ap\.consul",
        r"\.query\.consul",
        r"^_[\w-]+\._tcp\.query\.consul SRV",
        r"\.query\.dc2\.consul",
        r"^[0-9a-f]{8}\.addr\.",
        r"^[0-9a-f]{32}\.addr\.",
        r"^-x \d+\.\d+\.\d+\.\d+",  # in-addr.arpa
        r"^-x [0-9a-f:]+:",  # ip6.arpa
        r"^consul SOA",
        r"^consul NS",
    ]:
        assert has(pattern), f"no README example for {pattern}"
    forms = " ".join(e.form for e in EXAMPLES).lower()
    assert "failover" in forms and "sameness group" in forms and "prepared query" in forms


def test_readme_failover_walkthrough(start_server, tmp_path: Path) -> None:
    """Mark web's dc1 instances critical in a copy of the example catalog: cluster-02 answers."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(EXAMPLE_CATALOG.read_text())
    server = start_server(catalog=catalog)

    def web() -> list[str]:
        return short_lines(server.dig("web.service.consul", "SRV", "+short"))

    local = ["1 1 8080 0a000114.addr.dc1.consul.", "1 1 8080 node-1.node.dc1.consul.",
             "1 1 8080 node-3.node.dc1.consul."]
    peer = ["1 1 8080 c02-node-1.node.cluster-02.peer.consul.",
            "1 1 8080 c02-node-2.node.cluster-02.peer.consul."]
    assert web() == local

    data = yaml.safe_load(catalog.read_text())
    for service in data["services"]:
        in_dc1 = "peer" not in service and "datacenter" not in service
        if service["name"] == "web" and in_dc1 and service.get("id") in ("web-1", "web-2",
                                                                           "web-3"):
            service["health"] = "critical"
    _replace(catalog, yaml.safe_dump(data))
    assert wait_for(lambda: web() == peer), web()

    _replace(catalog, EXAMPLE_CATALOG.read_text())
    assert wait_for(lambda: web() == local), web()


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
