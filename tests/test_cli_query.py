"""``meshdns query``: the small dig, run as a user would, against a real server."""

from __future__ import annotations

import subprocess

from conftest import MESHDNS, MeshdnsProcess, free_port


def run_query(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHDNS, "query", *args], capture_output=True, text=True,
                          timeout=30)


def answer_lines(text: str) -> list[str]:
    """The records of dnspython's text form, between ';ANSWER' and the next section."""
    lines = text.splitlines()
    start = lines.index(";ANSWER") + 1
    out = []
    for line in lines[start:]:
        if line.startswith(";"):
            break
        out.append(" ".join(line.split()))
    return sorted(out)


def test_query_over_udp_and_tcp(example_server: MeshdnsProcess) -> None:
    server = f"127.0.0.1:{example_server.port}"
    for extra in ([], ["--tcp"]):
        done = run_query("web.virtual.consul", "A", "--server", server, *extra)
        assert done.returncode == 0, done.stderr
        assert "rcode NOERROR" in done.stdout
        assert answer_lines(done.stdout) == ["web.virtual.consul. 0 IN A 240.0.0.10"]


def test_query_default_type_is_a_and_edns_flag(example_server: MeshdnsProcess) -> None:
    done = run_query("web.service.consul", "--server", f"127.0.0.1:{example_server.port}",
                     "--edns")
    assert done.returncode == 0, done.stderr
    assert answer_lines(done.stdout) == [
        "web.service.consul. 0 IN A 10.0.1.1",
        "web.service.consul. 0 IN A 10.0.1.20",
        "web.service.consul. 0 IN A 10.0.1.3",
    ]
    assert "edns 0" in done.stdout


def test_query_nxdomain_is_printed(example_server: MeshdnsProcess) -> None:
    done = run_query("nope.service.consul", "A", "--server",
                     f"127.0.0.1:{example_server.port}")
    assert done.returncode == 0
    assert "rcode NXDOMAIN" in done.stdout
    assert "consul. 0 IN SOA ns.consul. hostmaster.consul." in done.stdout


def test_query_errors_are_clear() -> None:
    silent = f"127.0.0.1:{free_port()}"  # nothing listens there
    done = run_query("web.service.consul", "A", "--server", silent, "--timeout", "0.3")
    assert done.returncode == 1
    assert done.stderr.startswith(f"meshdns query: no answer from {silent}")
    bad_type = run_query("web.service.consul", "NOPE", "--server", silent)
    assert bad_type.returncode == 2
    assert "unknown record type 'NOPE'" in bad_type.stderr
