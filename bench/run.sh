#!/usr/bin/env bash
# One command for the whole benchmark: install what it needs, run bench/run.py, clean up.
#   bash bench/run.sh [--quick] [--servers meshdns,dnsmasq,unbound,dnslib] [...]  (see README.md)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# --- tools: Debian packages ----------------------------------------------------------------------
need=()
command -v dnsperf >/dev/null || need+=(dnsperf)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
{ command -v unbound && command -v unbound-checkconf; } >/dev/null || need+=(unbound)
command -v taskset >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
    echo "bench: installing ${need[*]}"
    # Keep the unbound package from starting a system resolver: we start our own.
    policy=/usr/sbin/policy-rc.d
    made_policy=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    status=$?
    [[ -n $made_policy ]] && rm -f "$policy"
    ((status == 0)) || { echo "bench: apt-get install ${need[*]} failed" >&2; exit 1; }
fi

# --- Python: the project and the baseline --------------------------------------------------------
if ! python3 -c 'import meshdns.cli' 2>/dev/null; then
    if [[ -f pyproject.toml || -f setup.py ]]; then
        echo "bench: installing meshdns (pip install -e .)"
        python3 -m pip install -q -e . || echo "bench: pip install -e . failed" >&2
    else
        echo "bench: no pyproject.toml yet; meshdns rows will read FAILED" >&2
    fi
fi
python3 -c 'import dnslib' 2>/dev/null || python3 -m pip install -q dnslib

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

python3 bench/run.py "$@" &
py_pid=$!
rc=0
wait "$py_pid" || rc=$?
exit "$rc"
