"""What one service change costs: ``apply_update`` on a 10,000-service snapshot versus a rebuild.

    python bench/snapshot_update.py [--services 10000] [--instances 3]

Prints microseconds per update (median of 200) and the time to build the same catalog whole.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from meshdns.catalog.consul import mapping
from meshdns.catalog.consul.mapping import Scope
from meshdns.catalog.model import Catalog
from meshdns.catalog.snapshot import Update, apply_update, build_snapshot

LOCAL = Scope("", "dc1", "default", "default")


def entries(i: int, n: int, status: str = "passing") -> list[dict]:
    return [{"Node": {"Node": f"node-{(i + j) % 500}", "Address": f"10.0.{(i + j) % 500 // 250}."
                      f"{(i + j) % 250 + 1}"},
             "Service": {"ID": f"svc{i}-{j}", "Service": f"svc{i}", "Port": 8080,
                         "Address": f"10.{1 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"
                         if j == 0 else ""},
             "Checks": [{"Node": "n", "CheckID": f"c{i}-{j}", "Status": status,
                         "ServiceID": f"svc{i}-{j}", "ServiceName": f"svc{i}"}]}
            for j in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--instances", type=int, default=3)
    args = ap.parse_args()
    interned: dict = {}
    start = time.perf_counter()
    services = {("", "dc1", "default", "default", f"svc{i}"):
                mapping.instances(entries(i, args.instances), LOCAL, interned)
                for i in range(args.services)}
    mapped = time.perf_counter() - start
    empty = build_snapshot(Catalog(), local_datacenter="dc1")
    start = time.perf_counter()
    snap = apply_update(empty, Update(services=services)).snapshot
    whole = time.perf_counter() - start
    gc.collect()
    gc.freeze()  # as the server does (server.run): a long-lived catalog is no GC work
    costs = []
    for n in range(200):
        i = n * 37 % args.services
        status = "critical" if n % 2 else "passing"
        change = {("", "dc1", "default", "default", f"svc{i}"):
                  mapping.instances(entries(i, args.instances, status), LOCAL, interned)}
        start = time.perf_counter()
        snap = apply_update(snap, Update(services=change)).snapshot
        costs.append(time.perf_counter() - start)
    print(f"{args.services} services x {args.instances} instances: mapping {mapped * 1000:.0f} ms,"
          f" first snapshot {whole * 1000:.0f} ms; one service changed: "
          f"median {statistics.median(costs) * 1e6:.0f} us, "
          f"max {max(costs) * 1e6:.0f} us")


if __name__ == "__main__":
    main()
