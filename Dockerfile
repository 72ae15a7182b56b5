# syntax=docker/dockerfile:1
#
# meshdns container image.
#   docker build -t ghcr.io/example/meshdns:0.1.0 .
#   docker run --rm -p 53:53/udp -p 53:53/tcp -p 8601:8601 \
#       -v "$PWD/catalog.yaml:/etc/meshdns/catalog.yaml:ro" ghcr.io/example/meshdns:0.1.0
#   docker run --rm -p 53:53/udp -p 53:53/tcp ghcr.io/example/meshdns:0.1.0 --example   # demo
#
# The image holds no catalog: without one mounted at /etc/meshdns/catalog.yaml, meshdns refuses
# to start (it would otherwise answer with the example catalog's addresses in production).
# Arguments are options of `meshdns serve` (see configs/docker/entrypoint.sh).
#
# Port 53 as a non-root user (uid 10001): binding below 1024 needs CAP_NET_BIND_SERVICE, and a
# capability granted to the container (`--cap-add`, or Kubernetes `capabilities.add`) does not
# reach a non-root process by itself: the kernel clears it on exec unless the program file
# carries it or it is an ambient capability, which neither Docker nor Kubernetes lets you set.
# So the venv's python gets the file capability cap_net_bind_service=+ep below. Consequences:
#   - NET_BIND_SERVICE must stay in the container's bounding set. With `--cap-drop ALL` alone
#     the kernel refuses to start python ("operation not permitted"); add
#     `--cap-add NET_BIND_SERVICE` (Kubernetes: drop ALL, add NET_BIND_SERVICE).
#   - no_new_privs (`--security-opt no-new-privileges`, Kubernetes
#     `allowPrivilegeEscalation: false`) can stop the file capability from being raised. Docker
#     >= 20.10 sets net.ipv4.ip_unprivileged_port_start=0 in a container's own network namespace,
#     so :53 binds anyway there; the Kubernetes manifests set that sysctl to 53 for the same
#     reason. With `--network host` and no-new-privileges, listen on a port >= 1024 instead.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
# gcc builds the compiled UDP packet path (meshdns/_udpbatch.c; the image's Python has its
# headers) into meshdns's wheel; without it the wheel would hold the pure-Python path alone.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY . .
# meshdns and every dependency as wheels, so the runtime stage needs no compiler and no index.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# libcap2-bin (setcap) is installed, used and purged in this one layer, so it is not in the
# image. `--copies` gives the venv its own python binary, so only the interpreter named in the
# meshdns script's #! line carries the capability, not /usr/local/bin/python3.
# Debian drops superseded package versions from its mirrors, so pinning libcap2-bin would break
# rebuilds after the next security update; the base image tag fixes the release (bookworm).
# hadolint ignore=DL3008
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    apt-get update \
    && apt-get install -y --no-install-recommends libcap2-bin \
    && python -m venv --copies /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir --no-index --find-links=/wheels /wheels/meshdns-*.whl \
    && interpreter="$(readlink -f "$(head -n 1 /opt/venv/bin/meshdns | cut -c 3-)")" \
    && setcap 'cap_net_bind_service=+ep' "$interpreter" \
    && [[ "$(getcap "$interpreter")" == *cap_net_bind_service* ]] \
    && apt-get purge -y --auto-remove libcap2-bin \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 meshdns \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin meshdns

COPY configs/docker/config.yaml /etc/meshdns/config.yaml
COPY --chmod=0755 configs/docker/entrypoint.sh /usr/local/bin/meshdns-entrypoint

USER 10001:10001
EXPOSE 53/udp 53/tcp 8601/tcp
# Liveness only (/ready would mark a slow catalog load unhealthy); assumes the admin port above.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8601/health', timeout=2)"]
ENTRYPOINT ["meshdns-entrypoint"]
CMD []
