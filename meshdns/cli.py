"""``meshdns serve | check | query | explain``: the command line (reference:
``docs/reference.md``)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import sys
import time
from pathlib import Path

from .catalog.file import FileSource, example_catalog_path
from .catalog.sources import source_for
from .config import Config, load_config, parse_hostport
from .documents import read_document
from .errors import ConfigError


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, message (and the traceback, if any); with
    several workers, the worker's number and pid."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
            entry["pid"] = record.process
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def log_problems(problems: list[str]) -> None:
    """Startup errors of ``serve``, as JSON lines like every other log line."""
    if not logging.getLogger("meshdns").handlers:
        setup_logging("info")
    for problem in problems:
        logging.getLogger("meshdns").error("%s", problem)


def version() -> str:
    try:
        return importlib.metadata.version("meshdns")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare tree
        return "unknown"


def setup_logging(level: str, worker: int | None = None) -> None:
    """JSON lines on stderr; with ``worker`` (``workers: N``), each line names the worker and
    its pid, so the processes' lines can be told apart."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(worker))
    root = logging.getLogger("meshdns")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def _settings(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """The config with the command line's overrides, and the catalog file to serve (None:
    the config follows a Consul cluster)."""
    config = load_config(Path(args.config) if args.config else None)
    overrides: dict = {}
    if getattr(args, "listen", None):
        for item in args.listen:
            try:
                parse_hostport(item, 8600)
            except ValueError as exc:
                raise ConfigError([f"--listen: {exc}"]) from None
        overrides["listen"] = args.listen
    admin = getattr(args, "admin", None)
    if admin is not None:
        if admin != "off":
            try:
                parse_hostport(admin, 8601)
            except ValueError as exc:
                raise ConfigError([f"--admin: {exc}"]) from None
        overrides["admin"] = config.admin.model_copy(
            update={"listen": None if admin == "off" else admin})
    if overrides:
        config = config.model_copy(update=overrides)
    return config, catalog_to_serve(args, config)


def catalog_to_serve(args: argparse.Namespace, config: Config) -> Path | None:
    """``--catalog``, else ``--example``, else the config's ``catalog.file``. The example catalog
    is served only when asked for, or when no config is given at all (``meshdns serve`` on a
    laptop): a production config that forgot its catalog must not serve demo addresses."""
    if args.catalog:
        return Path(args.catalog)
    if args.example:
        return example_catalog_path()
    if config.catalog.consul is not None:
        return None  # no file: the Consul source
    path = config.catalog_path()
    if args.config is None:
        return example_catalog_path()
    if path is None:
        raise ConfigError([f"{config_line(args.config, 'catalog')}: catalog.file: {args.config} "
                           "names no catalog: set catalog.file, or pass --catalog FILE "
                           "(--example serves the example catalog shipped with meshdns)"])
    if not path.exists():
        raise ConfigError([f"{config_line(args.config, 'catalog', 'file')}: catalog.file: "
                           f"{path} does not exist: mount or write the catalog there, or pass "
                           "--catalog FILE (--example serves the example catalog)"])
    return path


def config_line(file: str, *path: str) -> str:
    """``file:line`` of a key in the config (for problems found after validation)."""
    try:
        return read_document(Path(file)).where(path).rsplit(": ", 1)[0]
    except ConfigError:
        return f"{file}:1"


def cmd_serve(args: argparse.Namespace) -> int:
    from .workers import die_with_supervisor, is_worker, load_for_worker, worker_number

    if is_worker():
        die_with_supervisor()
    try:
        config, catalog = _settings(args)
    except ConfigError as exc:
        log_problems(exc.problems)
        return 1
    setup_logging(config.log_level, worker_number(config))
    log = logging.getLogger("meshdns")
    if catalog == example_catalog_path() and not is_worker():
        log.warning("serving the example catalog shipped with meshdns (%s), not your services: "
                    "%s", catalog, "asked for with --example" if args.example else
                    "no --config or --catalog given")
    try:
        source = source_for(config, catalog)
        if isinstance(source, FileSource):  # a broken file at start-up is an error, not a wait
            try:
                snapshot = source.load()
            except ConfigError as exc:
                # a worker restarted while the file is broken serves the supervisor's last good
                fallback = load_for_worker(source, exc.problems) if is_worker() else None
                if fallback is None:
                    raise
                snapshot = fallback
            log.info("catalog %s: %d nodes, %d service instances, %d virtual IPs", catalog,
                     snapshot.counts["nodes"], snapshot.counts["instances"],
                     snapshot.counts["virtual_ips"])
            for warning in source.warnings:
                log.warning("catalog: %s", warning)
    except ConfigError as exc:
        log_problems(exc.problems)
        return 1
    from .server import install_uvloop, run
    from .workers import serve_worker, serve_workers

    def reload_config() -> Config:
        return _settings(args)[0]

    try:
        if is_worker():
            return serve_worker(config, source, reload_config)
        if config.workers > 1:
            return serve_workers(config, source, args.config, reload_config)
        log.debug("event loop: %s", install_uvloop())
        return asyncio.run(run(config, source, reload_config=reload_config))
    except OSError as exc:
        log.error("%s", exc.strerror or exc)  # no "[Errno 98]": the message says it
        return 1


def cmd_check(args: argparse.Namespace) -> int:
    config, catalog = _settings(args)
    if catalog is None and config.catalog.consul is not None:
        from .catalog.consul.check import check_consul

        print(f"config: {args.config or '(defaults)'}: ok (domain {config.domain}, "
              f"datacenter {config.datacenter}, listen {', '.join(config.listen)})")
        return asyncio.run(check_consul(config))
    source = source_for(config, catalog)
    assert isinstance(source, FileSource)
    previous = FileSource(config, Path(args.against)).load() if args.against else None
    before = running_instances(args.server) if args.server else None
    snapshot = source.load(previous, before)  # refused as the running server would refuse it
    for warning in source.warnings:
        print(f"{'error' if args.strict else 'warning'}: {warning}", file=sys.stderr)
    c = snapshot.counts
    print(f"config: {args.config or '(defaults)'}: ok (domain {config.domain}, "
          f"datacenter {config.datacenter}, listen {', '.join(config.listen)})")
    print(f"catalog: {catalog}: ok")
    print(f"  {c['nodes']} nodes, {c['instances']} service instances of {c['services']} "
          f"services, {c['virtual_ips']} virtual IPs, {c['prepared_queries']} prepared queries")
    print(f"  datacenters: {', '.join(sorted(snapshot.datacenters))}")
    print(f"  partitions: {', '.join(sorted(snapshot.partitions))}")
    print(f"  peers: {', '.join(sorted(snapshot.peers)) or '(none)'}")
    if source.warnings:
        print(f"  {len(source.warnings)} dangling references" + (": failing (--strict)"
              if args.strict else " (warnings; --strict makes them errors)"))
    return 1 if args.strict and source.warnings else 0


def running_instances(admin_url: str) -> int:
    """How many service instances a running meshdns serves (its admin ``/v1/catalog``)."""
    import urllib.request

    url = admin_url.rstrip("/") + "/v1/catalog"
    if "://" not in url:
        url = "http://" + url
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - operator's URL
            return int(json.loads(response.read())["counts"]["instances"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError([f"--server {admin_url}: cannot read {url}: {exc}"]) from None


def cmd_query(args: argparse.Namespace) -> int:
    import dns.exception
    import dns.message
    import dns.query
    import dns.rdatatype

    try:
        host, port = parse_hostport(args.server, 8600)
    except ValueError as exc:
        print(f"meshdns query: --server {exc}", file=sys.stderr)
        return 2
    try:
        rdtype = dns.rdatatype.from_text(args.type)
    except dns.rdatatype.UnknownRdatatype:
        print(f"meshdns query: unknown record type {args.type!r}", file=sys.stderr)
        return 2
    try:
        message = dns.message.make_query(args.name, rdtype, use_edns=0 if args.edns else None)
    except dns.exception.DNSException as exc:  # an empty or too long label, a name too long
        print(f"meshdns query: {args.name!r} is not a valid DNS name: {exc}", file=sys.stderr)
        return 2
    try:
        if args.tcp:
            reply = dns.query.tcp(message, host, port=port, timeout=args.timeout)
        else:
            reply = dns.query.udp(message, host, port=port, timeout=args.timeout)
    except (dns.exception.DNSException, OSError) as exc:
        print(f"meshdns query: no answer from {host}:{port}: {exc}", file=sys.stderr)
        return 1
    print(reply.to_text())
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Why NAME gets its answer: from the configured catalog, or a running server's snapshot."""
    from .explain import ExplainError, explain, record_type, render_text, to_json

    try:
        record_type(args.type)
    except ExplainError as exc:
        print(f"meshdns explain: {exc}", file=sys.stderr)
        return 2
    if args.server:
        doc = _explain_remote(args.server, args.name, args.type)
        if doc is None:
            return 1
    else:
        config, catalog = _settings(args)
        source = source_for(config, catalog)
        if not isinstance(source, FileSource):
            print("meshdns explain: the config follows a Consul cluster: explain against the "
                  "running server's live catalog with --server http://HOST:PORT (its admin "
                  "endpoint)", file=sys.stderr)
            return 1
        snapshot = source.load()
        from .responder import Responder

        try:
            doc = explain(Responder(config, snapshot), args.name, args.type)
        except ExplainError as exc:
            print(f"meshdns explain: {exc}", file=sys.stderr)
            return 2
    print(to_json(doc) if args.json else render_text(doc), end="" if not args.json else "\n")
    return 0


def _explain_remote(server: str, name: str, qtype: str) -> dict | None:
    """GET /v1/explain from a running server's admin endpoint (None: said why on stderr)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    base = server if "://" in server else f"http://{server}"
    url = f"{base.rstrip('/')}/v1/explain?" + urllib.parse.urlencode({"name": name,
                                                                       "type": qtype})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace").strip()
        print(f"meshdns explain: {url}: HTTP {exc.code}: {detail}", file=sys.stderr)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"meshdns explain: cannot read {url}: {reason}", file=sys.stderr)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshdns", description="Consul mesh names over DNS.")
    parser.add_argument("--version", action="version", version=f"meshdns {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve DNS (default: the example catalog on "
                                         "127.0.0.1:8600)")
    check = sub.add_parser("check", help="validate a config and catalog, print a summary")
    for p in (serve, check):
        p.add_argument("--config", help="server config (YAML)")
        p.add_argument("--catalog", help="catalog file (YAML or JSON); overrides the config")
        p.add_argument("--example", action="store_true",
                       help="use the example catalog shipped with meshdns (demo data)")
    serve.add_argument("--listen", action="append", metavar="HOST:PORT",
                       help="address to serve on, UDP and TCP (repeatable; port 0: any free)")
    serve.add_argument("--admin", metavar="HOST:PORT",
                       help="admin HTTP endpoint address, or 'off' (overrides the config)")
    check.add_argument("--against", metavar="FILE",
                       help="the catalog being served now: refuse CATALOG as a reload from it "
                            "would be refused (catalog.max_drop)")
    check.add_argument("--server", metavar="ADMIN_URL",
                       help="a running meshdns's admin endpoint (http://HOST:PORT): compare "
                            "with the catalog it serves, as --against does")
    check.add_argument("--strict", action="store_true",
                       help="dangling references (virtual_ips, failover, sameness_groups, "
                            "prepared_queries, ingress naming what the catalog lacks) are "
                            "errors, not warnings")
    serve.set_defaults(func=cmd_serve)
    check.set_defaults(func=cmd_check)

    query = sub.add_parser("query", help="ask a DNS server (a small dig)")
    query.add_argument("name")
    query.add_argument("type", nargs="?", default="A")
    query.add_argument("--server", default="127.0.0.1:8600")
    query.add_argument("--tcp", action="store_true")
    query.add_argument("--edns", action="store_true", help="send EDNS0")
    query.add_argument("--timeout", type=float, default=2.0)
    query.set_defaults(func=cmd_query)

    explain = sub.add_parser("explain", help="say why a name gets the answer it gets")
    explain.add_argument("name", help="the name to explain, e.g. payments.service.consul")
    explain.add_argument("type", nargs="?", default="A", help="record type (default: A)")
    explain.add_argument("--config", help="server config (YAML)")
    explain.add_argument("--catalog", help="catalog file (YAML or JSON); overrides the config")
    explain.add_argument("--server", metavar="ADMIN_URL",
                         help="explain against a running server's live catalog, through its "
                              "admin endpoint (http://HOST:PORT)")
    explain.add_argument("--json", action="store_true", help="print one JSON document")
    explain.set_defaults(func=cmd_explain, example=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
