"""Prepared queries in Consul mode (catalog/consul/queries.py): the responder asks for an
execution when no result is held, answers from a held one, and NXDOMAINs an unknown query."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype

from meshdns.catalog.consul.mapping import query_result
from meshdns.catalog.consul.queries import PreparedQueries
from meshdns.catalog.snapshot import empty_snapshot
from meshdns.config import Config
from meshdns.responder import Execute, Responder

DOCS = Path(__file__).parent / "consul_documents"


def test_execute_then_answer_from_the_held_result():
    responder = Responder(Config(), empty_snapshot("dc1"))
    prepared = PreparedQueries(source=None)
    responder.prepared = prepared
    query = dns.message.make_query("redis-q.query.dc3.consul.", dns.rdatatype.A)
    first = responder.respond(query.to_wire())
    assert isinstance(first, Execute) and (first.name, first.datacenter) == ("redis-q", "dc3")
    result = query_result(json.loads((DOCS / "query_execute.json").read_text()), "dc1")
    prepared.held[("redis-q", "dc3")] = (90.0, result)
    reply = dns.message.from_wire(responder.respond(query.to_wire()))
    assert [(rrset.ttl, rr.to_text()) for rrset in reply.answer for rr in rrset] == \
        [(90, "10.1.10.12")]
    prepared.held[("gone", "dc1")] = (5.0, None)  # Consul said 404: no such query
    missing = dns.message.make_query("gone.query.consul.", dns.rdatatype.A)
    assert dns.message.from_wire(responder.respond(missing.to_wire())).rcode() == \
        dns.rcode.NXDOMAIN


def test_execution_without_a_client_fails_so_the_server_answers_servfail():
    class NotStarted:
        client = None
        local_dc = "dc1"

    prepared = PreparedQueries(NotStarted())
    assert asyncio.run(prepared.execute("web", "dc1")) is False
