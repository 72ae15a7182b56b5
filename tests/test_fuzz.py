"""The short version of bench/fuzz.py in the default run: hostile inputs over UDP and TCP
against a real server, every reply parsed by dnspython, no finding allowed (the long run,
1,000,000 inputs and more, is `python bench/fuzz.py`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz.py"), "--count", "15000",
                          "--seed", "11", "--rss-every", "1", "--timeout", "120",
                          "--json", str(out)], capture_output=True, text=True, timeout=180)
    result = json.loads(out.read_text())
    assert run.returncode == 0, run.stdout + run.stderr
    assert result["findings"] == {}
    assert result["inputs"] == 15000 and result["tcp_sent"] > 0
    assert result["udp_replies"] > 5000 and result["tcp_replies"] > 1000
    assert result["exit_code"] == 0
    rss = [point["rss_mb"] for point in result["rss_curve"]]
    assert max(rss) - rss[0] < 40, rss
