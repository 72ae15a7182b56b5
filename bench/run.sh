#!/usr/bin/env bash
# One command for the whole benchmark: install what it needs, run bench/run.py, clean up.
#   bash bench/run.sh [--quick] [--servers meshdns,unbound,nsd,dnsmasq,dnslib] [...]  (README.md)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# --- tools: Debian packages (dnsperf, unbound, nsd, dnsmasq, taskset), only what is missing ---
scripts/system-deps --bench || { echo "bench: scripts/system-deps --bench failed" >&2; exit 1; }

# --- Python: the checkout's own .venv, as the README's other commands use ---------------------
# (scripts/venv creates it and installs meshdns, dnslib included, into it, building the compiled
# packet path where gcc is; run again it does nothing unless pyproject.toml, setup.py or the C
# source changed: so the servers never run an extension older than the checkout). The bench
# and every meshdns it starts run on that interpreter.
scripts/venv || { echo "bench: scripts/venv failed" >&2; exit 1; }
if ! .venv/bin/python -c 'import meshdns.cli, dnslib' 2>/dev/null; then
    echo "bench: meshdns or dnslib is missing from .venv after scripts/venv" >&2
    exit 1
fi

# --- run, and leave nothing behind ---------------------------------------------------------------
# run.py appends the PID of every server it starts (each leads its own process group) here.
BENCH_PIDFILE=$(mktemp -t meshdns-bench-pids.XXXXXX)
export BENCH_PIDFILE
py_pid=

stop_servers() {
    local sig=$1 pid
    while read -r pid; do
        [[ $pid =~ ^[0-9]+$ ]] || continue
        # Only a process that is still one of ours: its command line names the bench's temp dir.
        grep -qa meshdns-bench- "/proc/$pid/cmdline" 2>/dev/null || continue
        kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null
    done <"$BENCH_PIDFILE"
}

cleanup() {
    trap - EXIT INT TERM
    if [[ -n $py_pid ]] && kill -0 "$py_pid" 2>/dev/null; then
        kill -TERM "$py_pid" 2>/dev/null
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$py_pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$py_pid" 2>/dev/null
    fi
    stop_servers TERM
    sleep 0.5
    stop_servers KILL
    rm -f "$BENCH_PIDFILE"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

.venv/bin/python bench/run.py "$@" &
py_pid=$!
rc=0
wait "$py_pid" || rc=$?
exit "$rc"
