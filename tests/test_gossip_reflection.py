"""Replies go to verified addresses: a message names the address its sender takes replies at,
and anyone can sign any address. A node sends what can be larger than a request (a digest's
ids and reply, the records an iwant names, a welcome, the ping a ping_req relays) only to an
address where the requester answered a ping nonce of its own; an attacker that signs a third
party's address gets nothing larger than its own messages sent there."""

import dataclasses
import random
from collections import Counter

from gossip import protocol, wire
from gossip.identity import Identity
from test_gossip_protocol import CFG, MALLORY, Sim, _member_hello, held_by, note, sends, swarm

AUTHOR = Identity.from_seed(b"reflection author")
REPLIES = {"ids", "digest", "push", "welcome", "ping"}  # what an answer carries (a relayed ping included)


def message(ident, kind, payload, t, address):
    return wire.make_message(ident, kind, payload, int(t * 1000), address)


def test_requests_signed_for_a_third_address_send_nothing_larger_there():
    """Mallory, a member whose hello says she is at "victim", asks for all of a node's record ids,
    all its records, a welcome, a relayed ping and an ack, twice a second for 6 s. She reads every
    message the node sends anywhere but to the victim, and answers every ping nonce she reads as
    herself. The victim gets no reply: only the small pings that ask whether she is there (one
    address at a time, twice at most) and acks no larger than her pings, fewer bytes than she sent.
    (What the node sends a member on its own schedule, its probes and anti-entropy digests, still
    goes to the address her hello names: at the node's rate, whatever she sends.)"""
    node = protocol.Node(Identity.from_seed(b"me"), "me", rng=random.Random(1), now=0.0)
    honest = Identity.from_seed(b"honest member")
    node.receive("h", _member_hello(honest, "h", ms=500), 0.5)  # its pings are hers to read too
    node.receive("evil", _member_hello(MALLORY, "victim", ms=500), 0.5)
    records = [note(f"record {i}", 1.0 + i / 100, AUTHOR) for i in range(300)]
    node.load(records)
    assert MALLORY.id in node.members

    def requests(t):
        ms = int(t * 1000)
        return [message(MALLORY, "digest", {"buckets": [], "reply": True}, t, "victim"),
                message(MALLORY, "iwant", {"ids": [r.id for r in records]}, t, "victim"),
                message(MALLORY, "join", {"hello": _member_hello(MALLORY, "victim", ms=ms)}, t, "victim"),
                message(MALLORY, "ping_req", {"seq": ms, "target": "h"}, t, "victim"),
                message(MALLORY, "ping", {"seq": ms, "members": [], "suspects": []}, t, "victim")]

    to_victim, scheduled, asked, echoed = [], Counter(), 0, 0
    for step in range(10, 80):
        t = step / 10
        out = node.tick(t)
        own = [o for o in sends(out, {"ping", "digest"}) if o.address == "victim"]  # its probes, anti-entropy
        scheduled.update(o.kind for o in own)
        out = [o for o in out if o not in own]
        if step % 5 == 0 and t <= 6.0:
            for data in requests(t):
                asked += len(data)
                out += node.receive("evil", data, t)
        while out:
            o = out.pop(0)
            if not isinstance(o, protocol.Send):
                continue
            if o.address == "victim":
                to_victim.append(o)
                continue
            msg = wire.decode_message(o.data, int(t * 1000))
            if msg.kind in ("ping", "ping_req"):  # a nonce she has read: she answers it as herself
                echoed += 1
                ack = message(MALLORY, "ack", {"seq": msg.payload["seq"], "members": [], "suspects": []}, t, "victim")
                out += node.receive("evil", ack, t)
    kinds = Counter(o.kind for o in to_victim)
    assert echoed > 0 and not set(kinds) & REPLIES, kinds
    assert set(kinds) <= {"verify", "ack"}, kinds
    assert sum(scheduled.values()) <= 8, scheduled  # one probe in two (a view of two), one digest in two per period
    assert kinds["verify"] <= 2 * 7, kinds  # one address asked at a time, twice a second at most
    smallest = min(len(data) for data in requests(6.0))  # her empty ping
    assert all(len(o.data) <= smallest + 16 for o in to_victim)  # empty pings and acks
    assert sum(len(o.data) for o in to_victim) < asked / 30
    assert node.verified.get(MALLORY.id, ("",))[0] != "victim"
    assert node.replies["answered_late"] == 0 and node.replies["dropped"] > 0
    assert not node.verifying and node.waiting_bytes == 0  # everything that waited for her is gone


def test_a_ping_req_from_a_verified_member_relays_an_empty_ping_to_an_unknown_address():
    """The requester's own address verified, the target is another matter: a ping_req may name any
    address, and one that no member has answered at gets a ping that carries nothing (no larger than
    the request, within a few bytes); a member's verified address gets the usual ping with its
    hellos."""
    node = protocol.Node(Identity.from_seed(b"me"), "me", rng=random.Random(2), now=0.0)
    honest = Identity.from_seed(b"honest member")
    node.receive("h", _member_hello(honest, "h", ms=500), 0.5)
    node.receive("m", _member_hello(MALLORY, "m", ms=500), 0.5)
    for ident, address in ((MALLORY, "m"), (honest, "h")):  # each answers a probe at its own address
        out = []
        while not any(o.address == address for o in sends(out, {"ping"})):
            node.next_probe = 0.0
            out = node.tick(1.0)
        seq = wire.decode_message(next(o for o in sends(out, {"ping"}) if o.address == address).data, 1_000).payload["seq"]
        node.receive(address, message(ident, "ack", {"seq": seq, "members": [], "suspects": []}, 1.0, address), 1.0)
    assert node._verified(MALLORY.id, "m", 1.0) and node._verified(honest.id, "h", 1.0)
    for target, carries in (("victim", False), ("h", True)):
        req = message(MALLORY, "ping_req", {"seq": 7, "target": target}, 1.1, "m")
        relayed = sends(node.receive("m", req, 1.1), {"ping"})
        assert [o.address for o in relayed] == [target]
        payload = wire.decode_message(relayed[0].data, 1_100).payload
        assert bool(payload["members"]) == carries
        if not carries:  # its own nonce and two empty lists: the size of the request within a few bytes
            assert len(relayed[0].data) <= len(req) + 16


def test_an_honest_member_is_answered_at_once_or_within_a_round_trip():
    """A member whose address answered our probe gets its digest answered in the same step; a node
    new to the swarm (no one has verified it yet) still holds every record the others hold one
    anti-entropy period after it joined: its first digest waits one round trip, not a period."""
    net = swarm(8, seed=131)
    n0 = net.nodes["n0"]
    net.run_until(net.now + 30, stop=lambda: n0._verified(net.nodes["n1"].id, "n1", net.now))
    assert n0._verified(net.nodes["n1"].id, "n1", net.now)
    records = [note(f"old {i}", net.now - 30 + i / 10, AUTHOR) for i in range(200)]
    for n in net.nodes.values():
        n.load(records)
    digest = message(net.nodes["n1"].identity, "digest", {"buckets": [], "reply": True}, net.now, "n1")
    out = sends(n0.receive("n1", digest, net.now))
    assert {o.kind for o in out} == {"ids", "digest"} and {o.address for o in out} == {"n1"}

    t0 = net.now
    new = net.add(seeds=["n0"])
    net.run_until(t0 + 2 * CFG.ae_interval_s, stop=lambda: all(r.id in new.records for r in records))
    assert all(r.id in new.records for r in records)
    assert net.now - t0 <= CFG.ae_interval_s + 0.5, net.now - t0
    late = Counter()
    for n in net.nodes.values():
        late.update(n.replies)
    assert late["answered_late"] >= 2 and late["dropped"] == 0, late  # its welcome and its first digest waited


def test_bookkeeping_per_address_is_bounded():
    """Thousands of keys, each claiming its own address, and big requests that wait: the addresses
    being verified, the requests and bytes that wait, the nonces awaiting acks and the verified
    addresses stay within their bounds, and all that waited is gone a second later."""
    cfg = dataclasses.replace(CFG, max_verifying=8, max_waiting=2, max_waiting_bytes=64 << 10, max_pinged=64,
                              max_verified=16)
    node = protocol.Node(Identity.from_seed(b"me"), "me", config=cfg, rng=random.Random(3), now=0.0)
    node.load([note(f"r{i}", 0.5 + i / 100, AUTHOR) for i in range(20)])
    keys = [Identity.from_seed(b"key %d" % i) for i in range(300)]
    t = 1.0
    nonces = []
    for i, k in enumerate(keys):  # each its own connection and address; a digest that asks for everything
        out = node.receive(f"c{i}", message(k, "digest", {"buckets": [], "reply": True}, t, f"a{i}"), t)
        nonces += [(i, wire.decode_message(o.data, 1_000).payload["seq"]) for o in sends(out, {"verify"})]
        assert len(node.verifying) <= 8 and len(node.pinged) <= 64
    for _ in range(20):  # one key, one address: many requests, two wait
        node.receive("c0", message(keys[0], "iwant", {"ids": list(node.records)}, t, "a0"), t)
        assert all(len(p.waiting) <= 2 for p in node.verifying.values())
    buckets = [[h, 1, bytes(16)] for h in range(4000)]  # ~90 kB each
    for i, k in enumerate(keys[:10]):
        node.receive(f"c{i}", message(k, "digest", {"buckets": buckets, "reply": True}, t, f"a{i}"), t)
        assert node.waiting_bytes <= 64 << 10
    assert node.waiting_bytes == sum(p.size for p in node.verifying.values())
    for i, seq in nonces:  # every key answers its ping (most nonces were forgotten: 64 kept)
        node.receive(f"c{i}", message(keys[i], "ack", {"seq": seq, "members": [], "suspects": []}, t, f"a{i}"), t)
    assert 0 < len(node.verified) <= 16 and len(node.verified_at) <= 16
    assert set(node.verified_at.values()) <= set(node.verified)
    for step in range(1, 15):
        node.tick(t + step / 10)
    assert not node.verifying and node.waiting_bytes == 0
    assert node.replies["dropped"] > 0


class Reflection(Sim):
    """The simulated network with a victim at "victim" that is no node of the swarm: it answers
    every ping sent there with an ack signed by its own key, and counts what it gets."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.victim, self.to_victim = Identity.from_seed(b"victim"), Counter()

    def _act(self, address, outputs):
        for o in outputs:
            if isinstance(o, protocol.Send) and o.address == "victim":
                self.to_victim[o.kind] += 1
                msg = wire.decode_message(o.data, int(self.now * 1000))
                if msg.kind == "ping":
                    ack = {"seq": msg.payload["seq"], "members": [], "suspects": []}
                    self.inject("victim", address, message(self.victim, "ack", ack, self.now, "victim"), delay=0.01)
        super()._act(address, [o for o in outputs if not (isinstance(o, protocol.Send) and o.address == "victim")])


def test_a_hello_naming_a_third_address_gets_it_no_records_announcements_or_digests():
    """What a node sends on its own schedule (its own records to every member, pushes of records
    it forwards, announcements, anti-entropy digests) goes only to members whose address answered
    a ping nonce as them. In a swarm of six, a Sybil's hello names "victim", and Mallory, one of the
    six, signs a newer hello that moves her there. For 30 s the others publish a record a second:
    the victim, which answers every ping as itself (so both stay alive in every view), gets pings
    alone (probes, and the empty ping that asks its address once per `reask_s`); every record
    reaches every honest node, and Mallory got those published before she moved."""
    net = swarm(6, seed=133, identities={"n5": MALLORY}, cls=Reflection)
    honest = [f"n{i}" for i in range(5)]
    sybil = Identity.from_seed(b"sybil")
    for a in honest:
        net.inject("evil", a, message(sybil, "hello", {"address": "victim", "incarnation": 1, "meta": {}}, net.now, "victim"))
    before = []
    for i in range(30):
        if i == 10:  # Mallory moves: her node goes quiet, her newer hello names the victim's address
            net.down.add("n5")
            moved = message(MALLORY, "hello", {"address": "victim", "incarnation": 1 << 50, "meta": {}}, net.now, "victim")
            for a in honest:
                net.inject("evil-m", a, moved)
        r = note(f"record {i}", net.now, AUTHOR)
        net.publish(honest[i % 5], r)
        before += [r.id] if i < 10 else []
        net.run(1.0)
    net.run(2.0)
    assert all(sum(m.address == "victim" for m in net.nodes[a].members.values()) == 2 for a in honest)
    assert set(net.to_victim) <= {"ping", "verify"}, net.to_victim  # probes of the two members there, and asks
    assert net.to_victim["verify"] <= len(honest) * (net.now / CFG.reask_s + 1), net.to_victim
    assert all(held_by(net, rid, honest) for rid in net.held)
    assert all(held_by(net, rid, ["n5"]) for rid in before)


def test_a_member_not_yet_verified_when_a_record_spreads_still_gets_it():
    """A node new to the swarm is not pushed a record published before its address answered (one
    round trip after a member learns of it); nothing waits for it, and it still holds the record
    within an anti-entropy period, by its own digest or the ids on pings and acks."""
    net = swarm(8, seed=132)
    n0 = net.nodes["n0"]
    new = net.add(seeds=["n0"])
    while new.id not in n0.members:  # message by message: n0 has its hello, not yet the ack that verifies it
        net.run_until(net.now + 0.001)
    assert not n0._verified(new.id, new.address, net.now)
    r = note("spreads as it joins", net.now)
    net.publish("n0", r)
    assert new.id not in n0.arrivals[r.id][1] and len(n0.arrivals[r.id][1]) == 7  # pushed to every verified member
    t0 = net.now
    net.run_until(t0 + CFG.ae_interval_s + 0.5, stop=lambda: r.id in new.records)
    assert r.id in new.records, net.now - t0
    assert all(r.id in n.records for n in net.nodes.values())
