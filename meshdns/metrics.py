"""Counters the server keeps and their Prometheus text exposition.

Plain integers and a ``Counter``: incrementing them is the only cost on the packet path.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field

# seconds; the packet path is tens of microseconds, forwarding and reloads are milliseconds
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Metrics:
    queries: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # kind,rcode,proto
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    truncated: int = 0
    dropped: int = 0
    reloads: int = 0
    reload_errors: int = 0
    forward_failures: int = 0
    forward_timeouts: int = 0  # recursor exchanges that timed out (their sockets closed)
    forward_rejected: int = 0  # forwards refused past dns.recursor_max_pending
    tcp_refused: int = 0  # TCP connections closed on accept (global or per-client cap)
    tcp_stalled: int = 0  # TCP connections cut because their replies went unread
    generation: int = 0
    loaded_at: float = 0.0
    started_at: float = field(default_factory=time.time)

    def observe(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def render(self, extra: dict[str, float] | None = None,
               reload_errors: int | None = None) -> str:
        """The Prometheus text format (version 0.0.4). Cache hits are counted here once the
        caches were folded (Responder.fold_steps); ``extra``: gauges, by metric name;
        ``reload_errors``: the source's count (``SourceState.errors``)."""
        queries = self.queries
        truncated = self.truncated
        reload_errors = self.reload_errors if reload_errors is None else reload_errors
        lines = [
            "# HELP meshdns_queries_total DNS queries answered, by lookup kind, rcode and "
            "transport.",
            "# TYPE meshdns_queries_total counter",
        ]
        for (kind, rcode, proto), value in sorted(queries.items()):
            lines.append(f'meshdns_queries_total{{kind="{kind}",rcode="{rcode}",'
                         f'transport="{proto}"}} {value}')
        lines += [
            "# HELP meshdns_query_duration_seconds Time from packet in to reply out "
            "(every TCP query; one UDP datagram in 64, sampled to keep the UDP path cheap).",
            "# TYPE meshdns_query_duration_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip(LATENCY_BUCKETS, self.latency_counts):
            cumulative += count
            lines.append(f'meshdns_query_duration_seconds_bucket{{le="{bound}"}} {cumulative}')
        cumulative += self.latency_counts[-1]
        lines.append(f'meshdns_query_duration_seconds_bucket{{le="+Inf"}} {cumulative}')
        lines.append(f"meshdns_query_duration_seconds_sum {self.latency_sum}")
        lines.append(f"meshdns_query_duration_seconds_count {cumulative}")
        now = time.time()
        gauges = {
            ("meshdns_truncated_total", "counter", "Replies sent with TC set."): truncated,
            ("meshdns_dropped_total", "counter", "Packets dropped unanswered."): self.dropped,
            ("meshdns_catalog_reloads_total", "counter", "Catalog snapshots swapped in."):
                self.reloads,
            ("meshdns_catalog_reload_errors_total", "counter",
             "Catalog reloads refused (the last good catalog kept serving)."): reload_errors,
            ("meshdns_recursor_failures_total", "counter",
             "Forwarded queries no recursor answered."): self.forward_failures,
            ("meshdns_recursor_timeouts_total", "counter",
             "Recursor exchanges that timed out (their sockets closed)."): self.forward_timeouts,
            ("meshdns_recursor_rejected_total", "counter",
             "Queries answered SERVFAIL at once because dns.recursor_max_pending forwards "
             "were already waiting."): self.forward_rejected,
            ("meshdns_tcp_refused_total", "counter",
             "TCP connections closed on accept: the global or per-client cap was reached."):
                self.tcp_refused,
            ("meshdns_tcp_stalled_total", "counter",
             "TCP connections cut because the client left its replies unread."):
                self.tcp_stalled,
            ("meshdns_catalog_generation", "gauge", "Generation of the catalog being served."):
                self.generation,
            ("meshdns_catalog_age_seconds", "gauge", "Seconds since the catalog was loaded."):
                round(now - self.loaded_at, 3) if self.loaded_at else 0,
            ("meshdns_uptime_seconds", "gauge", "Seconds since the server started."):
                round(now - self.started_at, 3),
        }
        for (name, kind, help_text), value in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        for name, value in (extra or {}).items():
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"


#: (name, type, help, [(labels, value)]): a metric family a catalog source adds to /metrics
Family = tuple[str, str, str, list[tuple[str, float]]]


def render_families(families: list[Family]) -> str:
    """Families in the Prometheus text format; ``labels`` is ``key="value",...`` or ""."""
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            lines.append(f"{name}{{{labels}}} {value}" if labels else f"{name} {value}")
    return "\n".join(lines) + "\n" if lines else ""
