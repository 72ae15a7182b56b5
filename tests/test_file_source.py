"""The catalog file source under the mistakes and accidents of real operations (issues 8 and 10).

Every test runs ``meshdns serve`` (or ``meshdns check``) as a user would and changes the files
under it: a parse that raises something unusual, a file that cannot be read for a while, a FIFO,
a huge file, an empty one, one that would drop most of the catalog, a writer that pauses, a
deleted file, references that lead nowhere, an edited server config. The answer is always the
same: the last good catalog keeps answering, the reason is logged as ``file:line: field:
reason``, counted, and shown on ``/v1/catalog``.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
import yaml
from conftest import MESHDNS, ROOT, MeshdnsProcess, wait_for, write_catalog

CATALOG = """\
nodes:
  - {name: node-1, address: 10.0.0.1}
services:
  - {name: web, id: web-1, node: node-1, port: 80, address: 10.0.1.1}
  - {name: web, id: web-2, node: node-1, port: 80, address: 10.0.1.2}
  - {name: web, id: web-3, node: node-1, port: 80, address: 10.0.1.3}
"""
WEB = ["10.0.1.1", "10.0.1.2", "10.0.1.3"]


def web(server: MeshdnsProcess, name: str = "web.service.consul") -> list[str]:
    reply = server.query(name, "A", tcp=True)  # all of them (UDP answers carry 3)
    return sorted(rd.address for rrset in reply.answer for rd in rrset)


def admin(server: MeshdnsProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}{path}",
                                    timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def state(server: MeshdnsProcess) -> dict:
    return json.loads(admin(server, "/v1/catalog")[1])["state"]


def reload_errors(server: MeshdnsProcess) -> int:
    for line in admin(server, "/metrics")[1].splitlines():
        if line.startswith("meshdns_catalog_reload_errors_total "):
            return int(float(line.split()[1]))
    raise AssertionError("no meshdns_catalog_reload_errors_total")


def errors(server: MeshdnsProcess, text: str = "") -> list[str]:
    return [e["msg"] for e in server.logs() if e["level"] == "error" and text in e["msg"]]


def logged(server: MeshdnsProcess, text: str, level: str | None = None) -> list[str]:
    return [e["msg"] for e in server.logs()
            if text in e["msg"] and (level is None or e["level"] == level)]


def replace(path: Path, text: str) -> None:
    """Write a new version atomically (what kubectl, ConfigMaps and careful tools do)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHDNS, "check", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.fixture
def served(start_server, tmp_path: Path):
    """``served(text, suffix=".yaml", config=None)`` -> (server, catalog path)."""
    def start(text: str = CATALOG, suffix: str = ".yaml", config: dict | None = None):
        catalog = write_catalog(tmp_path / f"catalog{suffix}", text)
        server = start_server(catalog=catalog, config=config)
        assert web(server)
        return server, catalog
    return start


# --- issue 8 point 3: the watcher survives any exception -----------------------------------

DEEP_JSON = '{"nodes": ' + "[" * 100_000 + "]" * 100_000 + "}"
BAD_YAML = [
    # (what is written, what the error names)
    (CATALOG.replace("port: 80, address: 10.0.1.3", "port: 0b_, address: 10.0.1.3"),
     ":6: (syntax): '0b_' cannot be read as int"),
    ("nodes: " + "[" * 100_000 + "\n", ":1: (syntax): "),
    ("nodes:\n  - {name: node-1, address: 10.0.0.1, meta: {x: !!python/object:os.system 1}}\n",
     ":2: (syntax): "),
]


def test_a_meta_date_is_text_not_an_impossible_date(served) -> None:
    server, catalog = served(config={"admin": {"listen": "127.0.0.1:0"}})
    text = CATALOG.replace("{name: node-1, address: 10.0.0.1}",
                           "{name: node-1, address: 10.0.0.1, meta: {release: 2024-02-30}}")
    replace(catalog, text)
    assert wait_for(lambda: server.query("node-1.node.consul", "TXT").answer, timeout=10)
    txt = [s.decode() for rrset in server.query("node-1.node.consul", "TXT").answer
           for rd in rrset for s in rd.strings]
    assert txt == ["release=2024-02-30"]
    assert check("--catalog", str(catalog)).returncode == 0


def test_the_watcher_survives_whatever_a_parse_raises(served) -> None:
    server, catalog = served(config={"admin": {"ready_max_reload_failure": "0s"}})
    for n, (text, reason) in enumerate(BAD_YAML, start=1):
        replace(catalog, text)
        assert wait_for(lambda n=n: reload_errors(server) == n, timeout=10), server.logs()
        [message] = errors(server, reason)[-1:]
        assert message.startswith(f"catalog reload refused, still serving generation 1: "
                                  f"{catalog}:"), message
        assert reason in state(server)["last_error"]
        assert admin(server, "/ready")[0] == 503  # ready_max_reload_failure: 0s
        assert web(server) == WEB
        # meshdns check says the same thing, without a traceback
        result = check("--catalog", str(catalog))
        assert result.returncode == 1
        assert reason in result.stderr and "Traceback" not in result.stderr, result.stderr
    # and the watcher is still there: the next good edit is served
    replace(catalog, CATALOG.replace("10.0.1.3", "10.0.1.9"))
    assert wait_for(lambda: web(server) == ["10.0.1.1", "10.0.1.2", "10.0.1.9"], timeout=10)
    assert state(server)["last_error"] is None and admin(server, "/ready")[0] == 200
    assert [e for e in server.logs() if "Traceback" in json.dumps(e)] == []


def test_a_100000_deep_json_array_is_refused_on_reload_and_by_check(served,
                                                                      tmp_path: Path) -> None:
    server, catalog = served(json.dumps(yaml.safe_load(CATALOG)), ".json")
    replace(catalog, DEEP_JSON)
    assert wait_for(lambda: reload_errors(server) == 1, timeout=10), server.logs()
    assert f"{catalog}:1: (syntax): nested too deeply" in state(server)["last_error"]
    assert web(server) == WEB
    result = check("--catalog", str(catalog))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{catalog}:1: " in result.stderr, result.stderr
    replace(catalog, json.dumps(yaml.safe_load(CATALOG.replace("10.0.1.3", "10.0.1.8"))))
    assert wait_for(lambda: "10.0.1.8" in web(server), timeout=10), server.logs()


def test_serve_refuses_a_bad_file_at_start_with_the_same_message(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "catalog.json", DEEP_JSON)
    result = subprocess.run([*MESHDNS, "serve", "--catalog", str(catalog), "--listen",
                             "127.0.0.1:0", "--admin", "off"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert f"{catalog}:1: " in result.stderr and "Traceback" not in result.stderr


# --- issue 8 point 4: a read that failed for a passing reason is retried ----------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder another user can read (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="meshdns-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_an_unreadable_catalog_is_read_once_readable_again_unchanged(shared_dir: Path) -> None:
    catalog = write_catalog(shared_dir / "catalog.yaml", CATALOG)
    catalog.chmod(0o644)
    # root reads any file: run meshdns as nobody then, so that EACCES can happen
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] \
        if os.geteuid() == 0 else []
    server = MeshdnsProcess(shared_dir, catalog, prefix=prefix)
    try:
        assert web(server) == WEB
        new = shared_dir / "new.yaml"
        new.write_text(CATALOG.replace("10.0.1.3", "10.0.1.7"))
        new.chmod(0)
        os.replace(new, catalog)  # a new version meshdns may not read
        assert wait_for(lambda: errors(server, "Permission denied"), timeout=10), server.logs()
        assert web(server) == WEB
        catalog.chmod(0o644)  # fixed, without touching the content: only the retry sees it
        assert wait_for(lambda: web(server) == ["10.0.1.1", "10.0.1.2", "10.0.1.7"],
                        timeout=15), server.logs()
        assert logged(server, "read again after")
    finally:
        server.stop()


def test_a_reload_that_ran_out_of_file_descriptors_is_retried_unchanged(served) -> None:
    """Issue 8 point 4, EMFILE: the running server's descriptor limit is lowered to 0 from
    outside (prlimit), so its next open() fails for real; once the limit is back, the file,
    not touched again, is read by the retry."""
    server, catalog = served()
    pid = server.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (0, hard))
    try:
        replace(catalog, CATALOG.replace("10.0.1.3", "10.0.1.7"))
        assert wait_for(lambda: errors(server, "Too many open files"), timeout=10), \
            server.logs()
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert wait_for(lambda: web(server) == ["10.0.1.1", "10.0.1.2", "10.0.1.7"],
                    timeout=15), server.logs()
    assert logged(server, "read again after")
    assert reload_errors(server) >= 1


# --- issue 8 point 9: size cap, parse bound, FIFOs, SIGTERM during a reload -------------------


def big_yaml(nodes: int) -> str:
    lines = ["nodes:"] + [f"  - name: n{i}\n    address: 10.{i // 65536 % 256}.{i // 256 % 256}."
                          f"{i % 256}\n    meta: {{rack: r{i % 7}}}" for i in range(nodes)]
    lines += ["services:"] + [f"  - {{name: web, id: web-{i}, node: n{i}, port: 80}}"
                              for i in range(nodes)]
    return "\n".join(lines) + "\n"


def test_a_fifo_is_refused_and_sigterm_still_exits_promptly(served, tmp_path: Path) -> None:
    server, catalog = served()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.replace(fifo, catalog)  # nobody will ever write to it: a blocking read never returns
    assert wait_for(lambda: errors(server, "not a regular file"), timeout=10), server.logs()
    assert web(server) == WEB
    os.unlink(catalog)
    write_catalog(catalog, CATALOG.replace("10.0.1.3", "10.0.1.6"))
    assert wait_for(lambda: "10.0.1.6" in web(server), timeout=10), server.logs()
    os.unlink(catalog)
    os.mkfifo(catalog)
    server.signal(signal.SIGHUP)
    assert wait_for(lambda: len(errors(server, "not a regular file")) >= 2, timeout=10)
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert time.monotonic() - started < 3


def test_a_file_over_max_size_is_refused_unread(served) -> None:
    server, catalog = served(config={"catalog": {"max_size": "2KiB"}})
    replace(catalog, big_yaml(40))  # about 3 KB
    assert wait_for(lambda: errors(server, "over catalog.max_size (2048 bytes)"), timeout=10)
    assert web(server) == WEB
    result = check("--catalog", str(catalog), "--config", str(server.config_path))
    assert result.returncode == 1 and "over catalog.max_size" in result.stderr


def test_a_file_whose_size_is_unknown_beforehand_is_cut_at_max_size(tmp_path: Path) -> None:
    """A regular file may say 0 bytes and hold more (/proc files; a file that grows while it is
    read): refused once max_size is read, and the message names the setting to raise."""
    catalog = tmp_path / "catalog.yaml"
    catalog.symlink_to("/proc/self/maps")  # regular, st_size 0, several KB when read
    config = tmp_path / "config.yaml"
    config.write_text(f"catalog: {{file: {catalog}, max_size: 100}}\n")
    result = check("--config", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{catalog}:0: (file): over catalog.max_size (100 bytes) once read (it grew, or its "
        "size is not known beforehand): refused (raise catalog.max_size with the memory "
        "limit)"]


def test_a_slow_parse_is_abandoned(served) -> None:
    server, catalog = served(config={"catalog": {"max_parse_time": "0.2s"}})
    replace(catalog, big_yaml(10000))  # ~0.8 MB: about a second to parse here
    assert wait_for(lambda: errors(server, "still parsing after 0.2 s"), timeout=20), \
        server.logs()
    assert web(server) == WEB  # answered while the abandoned parse runs on
    assert "catalog.max_parse_time" in state(server)["last_error"]


def test_sigterm_does_not_wait_for_a_reload(served) -> None:
    server, catalog = served(config={"log_level": "debug"})
    replace(catalog, big_yaml(20000))  # ~1.6 MB: seconds to parse here
    assert wait_for(lambda: logged(server, "catalog reload (file changed): reading"),
                    timeout=10)
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert time.monotonic() - started < 1.5, "SIGTERM waited for the reload"
    assert logged(server, "catalog reloaded") == []  # it was still parsing


# --- issue 10 point 1: reload guards ------------------------------------------------------


def test_an_empty_catalog_is_refused_on_reload_and_by_check(served) -> None:
    server, catalog = served()
    catalog.write_text("")  # `: > catalog.yaml`
    assert wait_for(lambda: reload_errors(server) == 1, timeout=10), server.logs()
    assert "the document is empty" in state(server)["last_error"]
    assert web(server) == WEB
    replace(catalog, "# all services moved\n")
    assert wait_for(lambda: reload_errors(server) == 2, timeout=10), server.logs()
    assert web(server) == WEB
    result = check("--catalog", str(catalog))
    assert result.returncode == 1 and f"{catalog}:1: (top level): the document is empty" \
        in result.stderr


SHRUNK = CATALOG.split("  - {name: web, id: web-2")[0]  # web-1 only: 2 of 3 instances go


def test_a_reload_dropping_most_instances_is_refused(served, tmp_path: Path) -> None:
    server, catalog = served()
    replace(catalog, SHRUNK)
    assert wait_for(lambda: reload_errors(server) == 1, timeout=10), server.logs()
    assert "would drop 2 of 3 service instances (67%, over catalog.max_drop 50%)" in \
        state(server)["last_error"]
    assert logged(server, "would drop 2 of 3", "error")
    assert web(server) == WEB
    # meshdns check says so too, against the file being served or the running server
    old = write_catalog(tmp_path / "old.yaml", CATALOG)
    for how in (["--against", str(old)], ["--server", f"http://127.0.0.1:{server.admin_port}"]):
        result = check("--catalog", str(catalog), *how)
        assert result.returncode == 1, result
        assert "would drop 2 of 3 service instances" in result.stderr
    assert check("--catalog", str(catalog)).returncode == 0  # alone, it is a valid catalog


def test_max_drop_one_turns_the_guard_off(served) -> None:
    server, catalog = served(config={"catalog": {"max_drop": 1.0}})
    replace(catalog, SHRUNK)
    assert wait_for(lambda: web(server) == ["10.0.1.1"], timeout=10), server.logs()
    assert reload_errors(server) == 0


# --- issue 10 point 2: a slow in-place writer ------------------------------------------------

NINE = "nodes:\n" + "".join(f"  - {{name: n{i}, address: 10.0.0.{i}}}\n" for i in (1, 2, 3)) \
    + "services:\n" + "".join(f"  - {{name: web, id: web-{i}, node: n{i % 3 + 1}, port: 80, "
                              f"address: 10.0.1.{i}}}\n" for i in range(1, 10))


def test_a_paused_in_place_writer_never_serves_a_partial_catalog(served) -> None:
    server, catalog = served(NINE)
    seen: set[int] = set()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.add(len(web(server)))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        new = catalog.with_name("new.yaml")
        new.write_text(NINE.replace("10.0.1.", "10.0.2."))
        # the issue's own command: the first 12 lines (3 nodes, 7 instances: a valid catalog
        # within max_drop), a pause, the rest
        subprocess.run(["bash", "-c", f"(head -12 {new}; sleep .4; tail -n +13 {new}) "
                                      f"> {catalog}"], check=True, timeout=10)
        assert wait_for(lambda: web(server)[0].startswith("10.0.2."), timeout=10)
        time.sleep(0.1)
    finally:
        done.set()
        sampler.join()
    assert seen == {9}, f"answer sizes seen during the write: {sorted(seen)}"
    assert reload_errors(server) == 0 and errors(server) == []


def test_a_partial_document_is_retried_not_counted(served) -> None:
    """A writer that closes between two parts (``head -c N > f; sleep; tail >> f``) leaves a
    document that does not parse for a moment: that is not an error, the rest is waited for."""
    text = json.dumps(yaml.safe_load(NINE), indent=1)
    server, catalog = served(text, ".json")
    new = catalog.with_name("new.json")
    new.write_text(text.replace("10.0.1.", "10.0.2."))
    half = len(text) // 2
    subprocess.run(["bash", "-c", f"head -c {half} {new} > {catalog}; sleep .4; "
                                  f"tail -c +{half + 1} {new} >> {catalog}"],
                   check=True, timeout=10)
    assert wait_for(lambda: web(server)[0].startswith("10.0.2."), timeout=10)
    assert len(web(server)) == 9
    time.sleep(1.2)  # past the grace a broken file gets
    assert reload_errors(server) == 0 and errors(server) == [], server.logs()


# --- issue 10 point 4: a missing catalog ---------------------------------------------------


def test_a_deleted_catalog_is_an_error_at_once_and_recovery_is_logged(served) -> None:
    server, catalog = served()
    catalog.unlink()
    assert wait_for(lambda: reload_errors(server) >= 1, timeout=5), server.logs()
    assert f"{catalog}:0: (file): cannot read: No such file or directory" in \
        state(server)["last_error"]
    assert errors(server, "No such file or directory")
    assert state(server)["failing_since"] is not None
    assert web(server) == WEB
    write_catalog(catalog, CATALOG.replace("10.0.1.3", "10.0.1.5"))
    assert wait_for(lambda: "10.0.1.5" in web(server), timeout=10), server.logs()
    assert logged(server, f"catalog {catalog}: read again after", "info")
    assert state(server)["last_error"] is None


# --- issue 10 point 5: references -----------------------------------------------------------

DANGLING = CATALOG + """\
virtual_ips:
  - {service: wbe, ip: 240.0.0.5}
failover:
  - {service: web, targets: [{peer: cluster-2}]}
sameness_groups:
  - {name: sg, members: [{partition: part-9}]}
prepared_queries:
  - {name: q, service: web, failover: {datacenters: [dc7]}}
"""


def test_dangling_references_are_warned_about_on_reload_and_by_check(served) -> None:
    server, catalog = served()
    replace(catalog, DANGLING)
    expected = [
        f"{catalog}:8: virtual_ips[0].service: no service 'wbe' in the catalog (partition "
        "default, namespace default; did you mean 'web'?)",
        f"{catalog}:10: failover[0].targets[0].peer: no peer 'cluster-2' in the catalog",
        f"{catalog}:12: sameness_groups[0].members[0].partition: no partition 'part-9' in the "
        "catalog",
        f"{catalog}:14: prepared_queries[0].failover.datacenters[0]: no datacenter 'dc7' in the "
        "catalog (did you mean 'dc1'?)",
    ]
    assert wait_for(lambda: len(logged(server, "catalog: ", "warning")) == 4, timeout=10), \
        server.logs()
    assert logged(server, "catalog: ", "warning") == [f"catalog: {w}" for w in expected]
    assert web(server) == WEB  # warnings: the catalog is served

    result = check("--catalog", str(catalog))
    assert result.returncode == 0
    assert result.stderr.splitlines() == [f"warning: {w}" for w in expected]
    strict = check("--catalog", str(catalog), "--strict")
    assert strict.returncode == 1
    assert strict.stderr.splitlines() == [f"error: {w}" for w in expected]


def test_many_dangling_references_in_a_large_catalog_stay_quick(tmp_path: Path) -> None:
    """Each "did you mean" compared the name with every service (0.25-2 s each at 100,000
    services): 300 dangling references in a 60,000-service catalog took minutes, past
    catalog.max_parse_time on reload. Now suggestions are bounded; every reference is still
    reported."""
    services = 60_000
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({
        "nodes": [{"name": "n", "address": "10.0.0.1"}],
        "services": [{"name": f"svc-{i:05d}", "id": f"svc-{i}", "node": "n", "port": 80}
                     for i in range(services)],
        "virtual_ips": [{"service": f"svc-{i:05d}x", "ip": f"240.0.{i // 250}.{i % 250 + 1}"}
                        for i in range(300)]}))
    config = tmp_path / "config.yaml"
    config.write_text(f"catalog: {{file: {path}, max_size: 64MiB}}\n")
    started = time.monotonic()
    result = check("--config", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = result.stderr.splitlines()
    assert len(warnings) == 300 and all(w.startswith(f"warning: {path}:") for w in warnings)
    assert "no service 'svc-00007x' in the catalog" in warnings[7]
    assert time.monotonic() - started < 30  # before: minutes (the 60 s timeout of check())


def test_check_reports_every_problem_of_a_file_in_one_pass(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "catalog.yaml", """\
        nodes:
          - {name: node-1, address: 10.0.0.300}
        services:
          - {name: web, node: node-1, port: eighty}
          - {name: api, node: node-1, port: 70000}
        """)
    result = check("--catalog", str(catalog))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert [line.split(": ")[0] + ": " + line.split(": ")[1] for line in lines] == [
        f"{catalog}:2: nodes[0].address", f"{catalog}:4: services[0].port",
        f"{catalog}:5: services[1].port"], lines


# --- a reload drops only the cached answers it may have changed ---------------------------------

TWO = CATALOG + "  - {name: api, id: api-1, node: node-1, port: 81, address: 10.0.2.1}\n"


def cache_entries(server: MeshdnsProcess) -> int:
    for line in admin(server, "/metrics")[1].splitlines():
        if line.startswith("meshdns_cache_entries "):
            return int(float(line.split()[1]))
    raise AssertionError("no meshdns_cache_entries")


def test_a_reload_keeps_the_cached_answers_of_untouched_services(served) -> None:
    server, catalog = served(TWO)
    assert web(server) == WEB and web(server, "api.service.consul") == ["10.0.2.1"]
    assert cache_entries(server) == 2
    replace(catalog, TWO.replace("10.0.2.1", "10.0.2.2"))  # only api changes
    assert wait_for(lambda: web(server, "api.service.consul") == ["10.0.2.2"], timeout=10)
    [reloaded] = logged(server, "catalog reloaded")
    assert reloaded.endswith("(1 services changed)"), reloaded
    assert cache_entries(server) == 2  # web's answer stayed, api's was rebuilt
    assert web(server) == WEB
    # a node edit may change any answer: everything goes
    replace(catalog, TWO.replace("10.0.2.2", "10.0.2.1").replace("address: 10.0.0.1",
                                                                "address: 10.0.0.9"))
    assert wait_for(lambda: web(server, "api.service.consul") == ["10.0.2.1"], timeout=10)
    assert logged(server, "catalog reloaded")[-1].endswith("(every answer may change)")
    assert cache_entries(server) == 1
    assert web(server) == WEB


# --- issue 10 point 6: the server config on SIGHUP ------------------------------------------


def ttl(server: MeshdnsProcess) -> int:
    return server.query("web.service.consul", "A").answer[0].ttl


def test_sighup_applies_the_edited_config(start_server, tmp_path: Path) -> None:
    write_catalog(tmp_path / "catalog.yaml", CATALOG)
    other = write_catalog(tmp_path / "other.yaml", CATALOG.replace("10.0.1.3", "10.0.1.4"))
    config = {"catalog": {"file": "catalog.yaml"}, "dns": {"service_ttl": {"*": "5s"}}}
    server = start_server(config=config)
    assert ttl(server) == 5 and web(server) == WEB
    assert server.query("example.org").rcode() == dns.rcode.REFUSED

    # TTLs, recursors, log level and the catalog file change live; workers need a restart
    edited = {"catalog": {"file": other.name}, "dns": {"service_ttl": {"*": "30s"},
              "recursors": ["127.0.0.1:9"], "recursor_timeout": "100ms"},
              "log_level": "debug", "workers": 2}
    server.config_path.write_text(yaml.safe_dump(edited))
    server.signal(signal.SIGHUP)
    assert wait_for(lambda: "10.0.1.4" in web(server), timeout=10), server.logs()
    assert ttl(server) == 30
    assert server.query("example.org").rcode() == dns.rcode.SERVFAIL  # forwarded, nobody there
    [applied] = logged(server, "config reloaded: applied")
    for name in ("catalog.file", "dns.service_ttl", "dns.recursors", "log_level"):
        assert name in applied
    [restart] = logged(server, "takes a restart", "warning")
    assert restart.startswith("config reloaded: workers changed")
    assert logged(server, "catalog reload (SIGHUP): reading", "debug")  # log_level applied

    # a broken config is refused; the running one stays
    server.config_path.write_text("dns: {service_ttl: {'*': forever}}\n")
    server.signal(signal.SIGHUP)
    assert wait_for(lambda: logged(server, "config reload refused"), timeout=10)
    assert ttl(server) == 30


def test_sighup_applies_connection_caps_and_names_what_needs_a_restart(start_server,
                                                                        tmp_path: Path) -> None:
    """dns.tcp_max_connections and admin.max_connections were logged as applied on SIGHUP
    while the running caps stayed the ones of the start; admin.idle_timeout (aiohttp's timer,
    set once) was logged as applied too."""
    write_catalog(tmp_path / "catalog.yaml", CATALOG)
    server = start_server(config={"catalog": {"file": "catalog.yaml"}})
    edited = {"catalog": {"file": "catalog.yaml"}, "dns": {"tcp_max_connections": 3},
              "admin": {"max_connections": 2, "idle_timeout": "9s"}}
    server.config_path.write_text(yaml.safe_dump(edited))
    server.signal(signal.SIGHUP)
    assert wait_for(lambda: logged(server, "config reloaded: applied"), timeout=10)
    [applied] = logged(server, "config reloaded: applied")
    assert "dns.tcp_max_connections" in applied and "admin.max_connections" in applied
    [restart] = logged(server, "takes a restart", "warning")
    assert "admin.idle_timeout" in restart and "admin.idle_timeout" not in applied

    def held_open(port: int, count: int) -> int:
        """How many of ``count`` connections the server keeps (the others: closed at once)."""
        socks = [socket.create_connection(("127.0.0.1", port), timeout=3) for _ in range(count)]
        try:
            kept = 0
            for sock in socks:
                sock.settimeout(0.5)
                try:
                    sock.recv(1)  # b"": closed by the server, refused
                except TimeoutError:
                    kept += 1  # nothing came, not closed: held
                except OSError:
                    pass  # reset: refused
            return kept
        finally:
            for sock in socks:
                sock.close()

    assert held_open(server.port, 8) == 3
    assert held_open(server.admin_port, 6) == 2
    assert web(server) == WEB


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("how", ["rewritten", "replaced", "configmap"])
def test_a_quiet_file_is_watched_by_inotify_not_by_waking_every_poll(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """A quiet catalog costs no wake-ups: the source waits on inotify (writers.py) and polls
    only when its folders see an event. With the quiet fallback poll an hour away, each way of
    changing the file must still be picked up, by the event alone (a ConfigMap's ``..data``
    swap happens in the folder of the name as given, not in the file's own)."""
    import asyncio

    import meshdns.catalog.file as file_module
    from meshdns.catalog.file import FileSource
    from meshdns.config import Config

    monkeypatch.setattr(file_module, "QUIET_POLL", 3600.0)
    second = CATALOG.replace("10.0.1.3", "10.0.1.9")
    if how == "configmap":  # catalog.yaml -> ..data/catalog.yaml, ..data -> ..v1
        (tmp_path / "..v1").mkdir()
        (tmp_path / "..v1" / "catalog.yaml").write_text(CATALOG)
        (tmp_path / "..data").symlink_to("..v1")
        (tmp_path / "catalog.yaml").symlink_to("..data/catalog.yaml")
    else:
        (tmp_path / "catalog.yaml").write_text(CATALOG)
    path = tmp_path / "catalog.yaml"

    def change() -> None:
        if how == "rewritten":
            path.write_text(second)
        elif how == "replaced":
            (tmp_path / "new.yaml").write_text(second)
            os.replace(tmp_path / "new.yaml", path)
        else:
            (tmp_path / "..v2").mkdir()
            (tmp_path / "..v2" / "catalog.yaml").write_text(second)
            (tmp_path / "..data_tmp").symlink_to("..v2")
            os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

    async def follow() -> list[int]:
        source = FileSource(Config.model_validate({"catalog": {"poll_interval": "10ms"}}), path)
        seen: list[int] = []
        published = asyncio.Event()

        def publish(snapshot, change) -> None:  # noqa: ANN001
            seen.append(len(snapshot.services))
            published.set()

        task = asyncio.ensure_future(source.run(publish))
        try:
            await asyncio.wait_for(published.wait(), 10)
            await asyncio.sleep(0.3)  # the source is in its quiet wait now
            assert source._wake is not None
            published.clear()
            change()
            await asyncio.wait_for(published.wait(), 10)  # the event woke it, not the hour
            snapshot = source.snapshot
            assert snapshot is not None
            addresses = {inst.address for group in snapshot.services.values()
                         for inst in group.usable}
            assert "10.0.1.9" in addresses
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return seen

    assert len(asyncio.run(follow())) == 2
