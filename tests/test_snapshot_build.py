"""Snapshot build internals: a reload shares what did not change; the stepwise JSON reader
(reloads) builds the same snapshot as the one-pass reader (startup)."""

from __future__ import annotations

import json
from pathlib import Path

from meshdns.catalog.file import load_snapshot

NODES = [{"name": f"n{i}", "address": f"10.0.0.{i}", "meta": {"rack": str(i % 3)}}
         for i in range(1, 21)]


def _services(moved: str | None = None) -> list[dict]:
    out = []
    for s in range(30):
        for k in range(3):
            entry = {"name": f"svc-{s}", "id": f"svc-{s}-{k}", "node": f"n{(s + k) % 20 + 1}",
                     "port": 8000 + k, "tags": [f"t{(s + k) % 4}", "Primary"]}
            if s == 7 and k == 1 and moved:
                entry["address"] = moved
            out.append(entry)
    out.append({"name": "sick", "node": "n1", "health": "critical"})
    return out


def _write(path: Path, services: list[dict]) -> None:
    path.write_text(json.dumps({"nodes": NODES, "services": services,
                                "virtual_ips": [{"service": "svc-1", "ip": "240.0.0.9"}]}))


def _load(path: Path, previous=None, yielding: bool = False):
    return load_snapshot(path, local_datacenter="dc1", vip_range="240.0.0.0/4",
                         previous=previous, yielding=yielding)


def _answers(snap) -> dict:
    """Everything queries read, by value."""
    return {"services": {k: [(i.id, i.address, i.port, sorted(i.tags), i.status)
                             for i in v.usable] for k, v in snap.services.items()},
            "nodes": {k: (n.address, dict(n.meta)) for k, n in snap.nodes.items()},
            "vips": dict(snap.vips), "ptr": dict(snap.ptr), "counts": dict(snap.counts)}


def test_stepwise_reader_builds_the_same_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    _write(path, _services())
    assert _answers(_load(path, yielding=True)) == _answers(_load(path))


def test_reload_shares_unchanged_instances_and_nodes(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    _write(path, _services())
    first = _load(path)
    _write(path, _services(moved="10.9.9.9"))
    second = _load(path, previous=first, yielding=True)
    fresh = _load(path)
    assert _answers(second) == _answers(fresh)  # sharing changes no answer
    moved = ("", "dc1", "default", "default", "svc-7")
    assert [i.address for i in second.services[moved].usable][1] == "10.9.9.9"
    assert second.services[moved] is not first.services[moved]
    same = ("", "dc1", "default", "default", "svc-8")
    assert second.services[same] is first.services[same]  # the whole group kept
    kept = second.services[moved].usable[0]
    assert kept is first.services[moved].usable[0]  # an unchanged instance of a changed group
    assert all(second.nodes[k] is first.nodes[k] for k in first.nodes)
    # one frozenset per distinct tag list, shared by every instance that has it
    tag_sets = {id(i.tags) for g in second.services.values() for i in g.usable}
    assert len(tag_sets) <= 5


SERVICE_ENTRIES = [
    {"name": "web", "node": "n1"},
    {"name": "Web_2", "id": "w-1", "node": "n1", "port": "8080", "tags": ["A", "b"],
     "address": " 10.0.0.9 ", "meta": {"v": 1, "ok": True, "s": "x"}, "health": "warning",
     "weights": {"passing": 3, "warning": 0}, "namespace": "Team", "partition": "p1",
     "tagged_addresses": {"wan": "192.0.2.1", "lan": {"address": "db.example.com.",
                                                      "port": 5}}},
    {"name": "six", "node": "n1", "address": "2001:DB8::1", "datacenter": "dc2"},
    {"name": "proxy", "node": "n1", "kind": "connect-proxy", "destination": "web"},
    {"name": "gw", "node": "n1", "kind": "ingress-gateway", "ingress": ["web", "api"]},
    {"name": "native", "node": "n1", "connect_native": True, "peer": "cluster-2"},
    {"name": "port", "node": "n1", "port": 80.0},
    # refused: by the fields' own rules, or by the model's check across them
    {"name": "web", "node": "n1", "extra": 1},
    {"name": "bad name!", "node": "n1"},
    {"name": "web", "node": "n1", "port": 70000},
    {"name": "web", "node": "n1", "port": "eighty"},
    {"name": "web", "node": "n1", "address": "10.0.0.300"},
    {"name": "web", "node": "n1", "kind": "router"},
    {"name": "web", "node": "n1", "kind": "connect-proxy"},
    {"name": "web", "node": "n1", "destination": "api"},
    {"name": "web", "node": "n1", "ingress": ["api"]},
    {"name": "web", "node": "n1", "peer": "p", "datacenter": "dc2"},
    {"name": "web", "node": "n1", "tags": "a"},
    {"name": "web", "node": "n1", "health": "ok", "port": -1},
    {"node": "n1"},
    {"name": "web"},
    None, [], "web", 5,
]


def _errors(exc) -> list[dict]:  # noqa: ANN001 - a ValidationError
    # (the exceptions in ``ctx`` compare by identity: their text stands in for them)
    return [{**e, "ctx": {k: str(v) for k, v in e.get("ctx", {}).items()}}
            for e in exc.errors(include_url=False)]


def test_service_fields_are_the_models_fields_and_errors() -> None:
    """model.service_fields (the file path's validator, no model built) holds what the
    Service model holds for every entry it takes, and refuses what the model refuses with
    the model's own errors."""
    import pytest
    from pydantic import ValidationError

    from meshdns.catalog.model import SERVICE_DEFAULTS, Service, service_fields

    taken = 0
    for entry in SERVICE_ENTRIES:
        try:
            model = Service.model_validate(entry)
        except ValidationError as exc:
            with pytest.raises(ValidationError) as info:
                service_fields(entry)
            assert _errors(info.value) == _errors(exc), entry
            continue
        assert {**SERVICE_DEFAULTS, **service_fields(entry)} == model.__dict__, entry
        taken += 1
    assert taken == 7


def test_an_id_may_repeat_across_nodes_but_not_on_one() -> None:
    """Instance ids are unique per node: the same id on another node is fine, a second one on
    any node it is already on is a problem (the first node or a later one)."""
    import pytest

    from meshdns.catalog.model import Catalog
    from meshdns.catalog.snapshot import CatalogProblems, build_snapshot

    entries = [{"name": "web", "node": "n1"}, {"name": "web", "node": "n2"},
               {"name": "api", "id": "WEB", "node": "n2"}, {"name": "db", "id": "web",
                                                            "node": "n1"},
               {"name": "web", "node": "n3"}]
    with pytest.raises(CatalogProblems) as info:
        build_snapshot(Catalog.model_validate({"nodes": NODES, "services": entries}),
                       local_datacenter="dc1")
    assert [p for p, _ in info.value.problems] == [("services", 2, "id"), ("services", 3, "id")]
    fine = build_snapshot(Catalog.model_validate({"nodes": NODES, "services": entries[:2]}),
                          local_datacenter="dc1")
    assert fine.counts["instances"] == 2


def test_one_pass_json_reader_reports_what_the_stepwise_reader_reports(tmp_path: Path) -> None:
    """The first load validates a good JSON file's services while parsing it
    (model.CatalogFields); a file with a problem is read entry by entry as before, so each
    problem reads the same, with its line, whichever reader met it. Entries past the model's
    cross-field check (a proxy with no destination) pass the one-pass parse and are refused
    by the build, with the model's own message."""
    import pytest

    from meshdns.catalog.model import CatalogFields
    from meshdns.errors import ConfigError

    bad = [
        {"name": "proxy", "node": "n1", "kind": "connect-proxy"},
        {"name": "web", "node": "n1", "port": 70000},
        {"name": "web", "node": "n1", "extra": True},
        {"name": "web", "node": "nowhere"},
        {"name": "web", "node": "n1", "peer": "p", "datacenter": "dc2"},
    ]
    checked = 0
    for entries in [[b] for b in bad] + [bad]:
        path = tmp_path / "catalog.json"
        path.write_text(json.dumps({"nodes": NODES, "services": _services() + entries},
                                   indent=1))
        with pytest.raises(ConfigError) as one_pass:
            _load(path)
        with pytest.raises(ConfigError) as stepwise:
            _load(path, yielding=True)
        assert one_pass.value.problems == stepwise.value.problems
        assert len(one_pass.value.problems) == len(entries)
        checked += 1
    assert checked == 6
    good = tmp_path / "good.json"
    _write(good, _services())
    assert isinstance(CatalogFields.model_validate_json(good.read_bytes()), CatalogFields)
