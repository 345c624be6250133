"""The gossip protocol core. Pure: bytes and time in; messages to send, records to deliver and
events out. It owns no socket, clock, thread or randomness (the caller passes `now` in
seconds and a seeded `random.Random`), so the same code runs over ZeroMQ and over a simulated
network of thousands of nodes (gossip/sim.py).

- Membership (gossip/membership.py, a mixin of Node): SWIM with checked rumours, a view that is
  a keyed-hash sample of the members seen, gossip targets that lean on evidence of service.
- Dissemination: a node's own new record goes to every member in good standing (flood
  publishing: the first hop does not depend on the forwarders); a record new to us is pushed
  at once to `fanout` members; its id is announced lazily (`ihave`) to `lazy_fanout` more each
  round, and rides on our pings and acks for `have_s`; whoever lacks it pulls (`iwant`) it. A
  record that reaches us `late_s` after it was signed is announced to every member in good
  standing (the push path around us failed). A record is delivered (to be stored) before
  anything forwards it.
- Anti-entropy: every period a digest of the store (count and xor-hash per hour of record
  time, per day beyond 48 h) goes to one member; both sides list their ids of the buckets
  that differ and pull what they lack. A member whose digest equals ours must serve one of our
  records when asked (a spot check): a censor that answers digests with ours cannot.
- Possession checks: a few times a second, a member that has neither served us nor been vetted
  is asked for a record it must hold: one of our 64 newest, got `check_age_s` ago or more, after
  we first knew of the member (and not within `check_age_s` of its joining our view), with a
  ping. A member that answers the ping but not with the record, three times, broke a promise and
  is no longer gossiped to; one that serves it (in any encoding) is vetted; one that answers
  nothing may be cut off and is not blamed (and, if its address never answered a ping as itself,
  is not asked again for a vetting period: a hello may name another node's address). So hostile
  members that only take are found however few of them we would ever gossip with, and honest
  ones are asked once per vetting period.
- Per-peer accounting (gossip/scoring.py), by the connection a message came on: a token bucket
  that every message and every signature check it causes draws on, and a score that bad input
  pulls down, to a ban.
- Replies go to verified addresses (gossip/membership.py): a digest's ids and reply and the
  records an `iwant` asks for are sent only to an address where the requester answered a ping
  nonce of ours; until then the request waits (a few per address, a bounded number of addresses
  and bytes) while one empty ping asks. What we send on our own schedule that is larger than a ping
  (records, pushed or published, announcements, digests) goes only to members verified at their
  current address; a member that is not gets an empty ping (at most one per address per `reask_s`)
  and nothing else until it answers, and a record it misses meanwhile reaches it from others or by
  anti-entropy. A hostile peer that signs a third party's address gets nothing larger than a ping
  sent there, by its requests or by its hellos (our probes still go where hellos say).

The caller must act on outputs in order: a `Deliver` comes before the `Send`s that forward
its record, so a store written on `Deliver` is durable before the record is announced.
"""

import random
from collections import Counter, deque
from dataclasses import dataclass

from gossip import wire
from gossip.membership import Event, Membership
from gossip.scoring import Ledger

__all__ = ["CONFIG", "Config", "Deliver", "Event", "Node", "Send"]


@dataclass(frozen=True)
class Config:
    tick_s: float = 0.1            # how often the caller must call tick()
    fanout: int = 5                # eager push targets per new record
    lazy_fanout: int = 3           # ihave targets per round
    round_s: float = 0.2           # a gossip round: one ihave batch
    prefer_served: float = 0.5     # share of gossip targets drawn from members that served us
    ping_interval_s: float = 1.0   # one probe per period
    ping_timeout_s: float = 0.4    # then indirect probes
    indirect_checks: int = 3
    suspect_timeout_s: float = 6.0
    rumour_checks: int = 16        # rumours being checked at once, at most
    checks_per_teller: int = 4     # ... of which one teller's
    ae_interval_s: float = 2.0     # anti-entropy period
    rejoin_interval_s: float = 4.0 # seeds (while alone) and recently dead members
    seeds_silent_s: float = 12.0   # alone this long after start with seeds given: say so, once (seeds_silent)
    max_view: int = 256            # members known at once
    max_dead: int = 1024           # dead members remembered (so their old hellos stay dead)
    news_s: float = 10.0           # a hello said within this is news we spread; peer exchange names
                                   # members that spoke within it
    piggyback: int = 4             # hellos relayed per ping or ack (besides peer exchange)
    suspicions: int = 8            # suspicions relayed per ping or ack, and heard from one
    intro_per_message: int = 16    # new members one message may introduce
    promise_timeout_s: float = 1.0
    have_s: float = 60.0           # a record's id rides on our pings and acks this long after we got it
    have_ids: int = 4              # ... the newest this many
    have_wait_s: float = 0.5       # we pull an id a ping said its sender has this late (the push is faster)
    late_s: float = 5.0            # a record this old (by its own time, and at most have_s) when it first reaches
                                   # us found the push path failing: we announce it to every member in good
                                   # standing, at most once per anti-entropy period
    flood_publish: bool = True     # our own new record goes to every member in good standing, not `fanout`
    spot_checks: float = 0.25      # share of digests equal to ours whose sender must then serve one of our records
    checks_per_s: float = 4.0      # possession checks: members neither vetted nor serving asked for a record ...
    check_age_s: float = 60.0      # ... we have held this long (honest nodes got records within 60 s in every attack simulated)
    verified_s: float = 600.0      # an address a member answered a ping nonce of ours at is its own this long
                                   # (our probes renew it: each member is probed every max_view s at most)
    verify_timeout_s: float = 0.5  # a request from an address not yet verified waits this long for the ack
                                   # of the ping that asks it, which is sent twice at most
    max_verified: int = 4096       # (member, address) pairs verified, remembered
    max_verifying: int = 256       # addresses being verified at once (the oldest is given up)
    reask_s: float = 10.0          # an address we ask on our own (a member's, before we gossip to it) is asked
                                   # again no sooner than this
    max_waiting: int = 8           # requests waiting on one address (the oldest is dropped)
    max_waiting_bytes: int = 4 << 20  # ... on all of them together
    max_pinged: int = 4096         # nonces of pings awaiting an ack (the oldest is forgotten)
    max_wanted: int = 16384        # records pulled and awaited at once (ids past it: a later announcement or digest)
    rate_per_s: float = 400.0      # tokens per connection, sustained: a message or a signature check each
    burst: float = 800.0
    ban_score: float = -20.0
    ban_s: float = 600.0
    max_accounts: int = 4096


CONFIG = Config()


@dataclass(frozen=True)
class Send:
    address: str
    data: bytes
    kind: str


@dataclass(frozen=True)
class Deliver:
    record: wire.Record


@dataclass
class Promise:
    """A record a member must serve us by `deadline` (a spot or possession check)."""
    rid: bytes
    deadline: float
    origin: object          # the connection it answers for
    again: int = 0          # asks left after this one (possession checks: a lost message is no broken promise)
    seq: int = None         # a possession check's ping, whose direct ack shows the member reachable
    answered: bool = False  # ... and it came


HOUR_MS, RECENT_HOURS = 3_600_000, 48


class Node(Membership):
    def __init__(self, identity, address, config=CONFIG, seeds=(), meta=None, rng=None, now=0.0):
        self.identity, self.id, self.address, self.config = identity, identity.id, address, config
        self.rng = rng or random.Random()
        self.meta = dict(meta or {})
        self.seeds = list(seeds)
        self._now = now                     # the time of the input being handled
        self.ledger = Ledger(config)        # connections' accounts, members' debt and service
        self._init_membership(now)
        self.records = {}                   # id -> Record
        self.hours = {}                     # hour -> [count, xor of ids, ids]
        self.lazy = []                      # ids to announce next round
        self.late_ids = []                  # ids that reached us late: to announce to every member
        self.recent = []                    # (time we got it, id), oldest first: the ids our pings carry
        self.got = deque(maxlen=64)         # (time we got it, id) of our newest records: possession checks
        self.spot = {}                      # member id -> Promise
        self.heard = {}                     # record id a ping said its sender has -> (pull at, address, connection)
        self.arrivals = {}                  # record id -> (first held, members that had it from us or were credited)
        self.wanted = {}                    # id -> (deadline, connection we asked)
        self.ae_waiting = None              # the member whose digest reply we wait for
        self.sent = Counter()
        self.next = {"round": now, "ae": now + config.ae_interval_s, "wide": now, "check": now}

    # --- inputs --------------------------------------------------------------------------------

    def start(self, now):
        """Join through the seeds."""
        return [self._message(a, "join", {"hello": self.hello}, now) for a in self.seeds if a != self.address]

    def add_seed(self, address, now):
        """Another address to join through (found by discovery): kept with the seeds, joined now."""
        if address == self.address or address in self.seeds:
            return []
        self.seeds.append(address)
        return [self._message(address, "join", {"hello": self.hello}, now)]

    def load(self, records):
        """Records the store already holds (after a restart): served and digested, not delivered."""
        for r in records:
            self._keep(r)

    def publish(self, record, now):
        """A record made by this node: delivered, then pushed."""
        if record.id in self.records:
            return []
        self._now = now
        self._keep(record, now)
        first, pings = self._gossip_targets(len(self.members) if self.config.flood_publish else self.config.fanout)
        self.arrivals[record.id] = (now, {m.id for m in first})
        out = [Deliver(record)] + pings + self._push([record], [m.address for m in first], now)
        self.lazy.append(record.id)
        return out

    def leave(self, now):
        self._now = now
        payload = {"incarnation": self.incarnation}
        return [self._message(m.address, "leave", payload, now) for m in self._targets(self.config.fanout * 2)]

    def receive(self, origin, data, now):
        self._now = now
        acct = self.ledger.account(origin, now)
        if acct.banned_until > now:
            acct.counts["refused"] += 1
            return []
        if not self.ledger.take(acct, 1, now):
            return self._penalize(acct, "throttled", now)
        try:
            msg = wire.decode_message(data, int(now * 1000))
        except wire.WireError as e:
            return self._penalize(acct, e.reason, now)
        if msg.sender == self.identity.public_key:
            return []
        if acct.node and acct.node != msg.sender_id:
            return self._penalize(acct, "spoofed", now)  # one connection, one sender
        if not acct.node:
            self.ledger.bind(acct, msg.sender_id)
        acct.counts["ok"] += 1
        member = self.members.get(msg.sender_id)
        if member:
            member.last_seen = now
            if member.state == "suspect":
                member.state = "alive"
        return getattr(self, "_on_" + msg.kind)(msg, acct, now)

    def tick(self, now):
        self._now = now
        out, c, nxt = self._membership_tick(now), self.config, self.next
        for mid, p in list(self.spot.items()):
            if now >= p.deadline:
                del self.spot[mid]
                m = self.members.get(mid)
                if p.seq is not None and (m is None or not p.answered):
                    continue  # it did not answer the ping either: unreachable (a partition), not a broken promise
                if p.again:  # a lost request or reply is no broken promise: ask again
                    out += self._ask(m, self.ledger.accounts.get(p.origin), p.again - 1, now)
                elif p.origin in self.ledger.accounts:
                    out += self._penalize(self.ledger.accounts[p.origin], "broken_promise", now)
        out += self._pull_heard(now)
        if c.checks_per_s > 0 and now >= nxt["check"]:
            nxt["check"] = now + 1 / c.checks_per_s
            out += self._possession_check(now)
        for rid in [rid for rid, (t, _) in self.arrivals.items() if now - t > self.config.round_s]:
            del self.arrivals[rid]
        for rid, (deadline, origin) in list(self.wanted.items()):
            if now >= deadline:
                del self.wanted[rid]
                if rid not in self.records and origin in self.ledger.accounts:  # one ask: it may be a lost message,
                    out += self._penalize(self.ledger.accounts[origin], "unserved_pull", now)  # not a check's three
        if now >= nxt["round"]:
            nxt["round"] = now + c.round_s
            if self.lazy:
                ids, self.lazy = self.lazy[:wire.LIMITS.array_len], self.lazy[wire.LIMITS.array_len:]
                targets, pings = self._gossip_targets(c.lazy_fanout)
                out += pings + [self._message(m.address, "ihave", {"ids": ids}, now) for m in targets]
        if self.late_ids and now >= nxt["wide"]:
            out += self._announce_wide(now)
        if now >= nxt["ae"]:
            nxt["ae"] = now + c.ae_interval_s
            if self.ae_waiting in self.members:  # the last digest's reply never came: a member that skips anti-entropy
                self.ledger.owe(self.ae_waiting, 1.0, now)
            self.ae_waiting = None
            targets, pings = self._gossip_targets(1)
            out += pings
            for m in targets:
                self.ae_waiting = m.id
                out.append(self._message(m.address, "digest", {"buckets": self._digest(now), "reply": True}, now))
        return out

    # --- state for status ----------------------------------------------------------------------

    def peers(self, now):
        """Members with what they did for us (first deliveries, service), what they owe (debt), their
        standing, and what each connection bound to them has sent."""
        led, conn = self.ledger, self.ledger.by_connection()
        return [{"id": m.id, "address": m.address, "meta": m.meta, "state": m.state,
                 "last_seen_s": round(now - m.last_seen, 1), "deliveries": m.deliveries,
                 "service": round(led.service(m.id, now), 2), "debt": round(led.debt(m.id, now), 2),
                 "standing": round(led.standing(m.id, now), 2),
                 "score": round(conn.get(m.id, (0.0,))[0], 2),
                 "counts": dict(conn.get(m.id, (0.0, {}))[1])} for m in self.members.values()]

    def banned(self, now):
        """Connections refused now."""
        return self.ledger.banned(now)

    def rejected(self):
        """Counted reasons over all connections, the banned ones included."""
        return self.ledger.rejected()

    # --- dissemination -------------------------------------------------------------------------

    def _keep(self, record, now=None):
        self.records[record.id] = record
        if now is not None:  # new to us (not loaded from the store): our pings carry its id for a while
            self.recent.append((now, record.id))
            self.got.append((now, record.id))
        b = self.hours.setdefault(record.ts // HOUR_MS, [0, 0, []])
        b[0] += 1
        b[1] ^= int.from_bytes(record.id[:16], "big")
        b[2].append(record.id)

    def _push(self, records, addresses, now):
        out = []
        for address in addresses:
            batch, size = [], 0
            for r in records:
                if batch and size + len(r.encoded) > wire.LIMITS.message_bytes // 2:
                    out.append(self._message(address, "push", {"records": batch}, now))
                    batch, size = [], 0
                batch.append(r.encoded)
                size += len(r.encoded)
            if batch:
                out.append(self._message(address, "push", {"records": batch}, now))
        return out

    def _on_push(self, msg, acct, now):
        out, new = [], []
        for blob in msg.payload["records"]:
            try:
                head = wire.unpack(blob)
                rid = head.get("id") if isinstance(head, dict) else None
                if isinstance(rid, bytes) and rid in self.records and self.records[rid].encoded == blob:
                    acct.counts["duplicate"] += 1
                    self._kept_promise(msg.sender_id, rid, now)
                    self._forwarded(rid, msg.sender_id, 0.5, now)
                    continue
                asked = isinstance(rid, bytes) and self.wanted.get(rid, (0, None))[1] == acct.origin
                if not asked and not self.ledger.take(acct, 1, now):  # an unasked-for signature check costs a token
                    return out + self._penalize(acct, "throttled", now)
                record = wire.decode_record(blob, int(now * 1000))
            except wire.WireError as e:
                out += self._penalize(acct, e.reason, now)
                if acct.banned_until > now:
                    return out
                continue
            if record.id in self.records:  # the same record in other bytes (decoding accepts any key order)
                acct.counts["duplicate"] += 1
                self._kept_promise(msg.sender_id, record.id, now)  # checked and signed: it holds the record
                continue
            self._keep(record, now)
            self.wanted.pop(record.id, None)
            new.append(record)
            out.append(Deliver(record))
            m = self.members.get(msg.sender_id)
            if m:
                m.deliveries += 1
            self.arrivals[record.id] = (now, {record.author_id})  # its author's own copy is no service
            self._forwarded(record.id, msg.sender_id, 1.0, now)
            self.ledger.reward(acct, 0.1)
        if new:
            targets, pings = self._gossip_targets(self.config.fanout, exclude={msg.sender_id})
            for r in new:
                self.arrivals[r.id][1].update(m.id for m in targets)
            out += pings + self._push(new, [m.address for m in targets], now)
            self.lazy += [r.id for r in new]
            self.late_ids += [r.id for r in new if self.config.late_s <= now - r.ts / 1000 <= self.config.have_s]
        return out

    def _forwarded(self, rid, mid, worth, now):
        """`mid` pushed us a record someone else wrote, within a round of our first copy: service.
        Not from those we pushed it to (an echo), and once per member and record."""
        first = self.arrivals.get(rid)
        if first is not None and now - first[0] <= self.config.round_s and mid not in first[1]:
            first[1].add(mid)
            self.ledger.serve(mid, worth, now)

    def _have(self):
        """The ids of our newest records, got within `have_s`: they ride on our pings and acks."""
        while self.recent and self.recent[0][0] < self._now - self.config.have_s:
            self.recent.pop(0)
        return [rid for _, rid in self.recent[-self.config.have_ids:]]

    def _hear_of(self, ids, acct, address, now):
        """Ids a ping or ack said its sender has: pulled in `have_wait_s` if still missing, by then
        usually pushed to us; so they fill gaps (a cold start, a lost push) and cost little else."""
        for rid in ids[:self.config.have_ids * 2]:
            if rid not in self.records and rid not in self.wanted and rid not in self.heard and len(self.heard) < 1024:
                self.heard[rid] = (now + self.config.have_wait_s, address, acct.origin)

    def _pull_heard(self, now):
        due = {}
        for rid, (at, address, origin) in list(self.heard.items()):
            if now >= at:
                del self.heard[rid]
                if rid not in self.records and rid not in self.wanted and origin in self.ledger.accounts:
                    due.setdefault((address, origin), []).append(rid)
        return [o for (address, origin), ids in due.items() for o in self._want(ids, self.ledger.accounts[origin], address, now)]

    def _announce_wide(self, now):
        """Records that reached us late: the push path around us is failing (forwarders that drop
        them, a partition that healed), and the few honest members a polluted view holds are not
        among `fanout` random ones. Announce them to every member in good standing; whoever lacks
        them pulls. At most once per anti-entropy period, so that records backdated on purpose buy
        no more than one announcement per member per period."""
        self.next["wide"] = now + self.config.ae_interval_s
        ids, self.late_ids = self.late_ids[:wire.LIMITS.array_len], self.late_ids[wire.LIMITS.array_len:]
        targets, pings = self._gossip_targets(len(self.members))
        return pings + [self._message(m.address, "ihave", {"ids": ids}, now) for m in targets]

    def _on_ihave(self, msg, acct, now):
        return self._want(msg.payload["ids"], acct, msg.address, now)

    def _want(self, ids, acct, address, now):
        """Pull the announced records we lack; the announcer has promised to serve them."""
        missing = [i for i in ids if i not in self.records and i not in self.wanted]
        missing = missing[:max(0, self.config.max_wanted - len(self.wanted))]  # ids that exist nowhere cost memory
        if not missing:
            return []
        for i in missing:
            self.wanted[i] = (now + self.config.promise_timeout_s, acct.origin)
        return [self._message(address, "iwant", {"ids": missing}, now)]

    def _on_iwant(self, msg, acct, now):
        if not any(i in self.records for i in msg.payload["ids"]):
            return []
        return self._answer(msg, acct, now, self._serve)

    def _serve(self, msg, acct, now):
        """The records an `iwant` names that we hold, each once, to its sender's verified address."""
        have = [self.records[i] for i in dict.fromkeys(msg.payload["ids"]) if i in self.records]
        return self._push(have, [msg.address], now) if have else []

    # --- anti-entropy --------------------------------------------------------------------------

    def _bucket(self, hour, now):
        """Hours of the last two days stand alone; older hours fold into their day (negative keys)."""
        if hour >= int(now * 1000) // HOUR_MS - RECENT_HOURS:
            return hour
        return -(hour // 24) - 1

    def _digest(self, now):
        agg = {}
        for hour, (count, xor, _) in self.hours.items():
            a = agg.setdefault(self._bucket(hour, now), [0, 0])
            a[0] += count
            a[1] ^= xor
        return [[k, c, x.to_bytes(16, "big")] for k, (c, x) in sorted(agg.items())][-wire.LIMITS.array_len:]

    def _on_digest(self, msg, acct, now):
        if not msg.payload["reply"] and msg.sender_id == self.ae_waiting:
            self.ae_waiting = None
            self.ledger.owe(msg.sender_id, -1.0, now)
        theirs, mine = self._buckets(msg), {k: (c, h) for k, c, h in self._digest(now)}
        if msg.payload["reply"] or any(mine[k] != theirs.get(k) for k in mine):
            return self._answer(msg, acct, now, self._reconcile)
        if (theirs == mine and mine and msg.sender_id not in self.spot and not self.ledger.served(msg.sender_id, now)
                and not self.ledger.vetted(msg.sender_id, now) and self.rng.random() < self.config.spot_checks):
            return self._spot_check(msg, acct, now)
        return []

    def _buckets(self, msg):
        return {k: (c, h) for k, c, h in msg.payload["buckets"]}

    def _reconcile(self, msg, acct, now):
        """To a digest's sender (its address verified): our ids of the buckets that differ, and our
        digest if it asked for one."""
        address, theirs, digest, out = msg.address, self._buckets(msg), self._digest(now), []
        for k, c, h in digest:
            if (c, h) != theirs.get(k):
                ids = [i for hour, b in self.hours.items() if self._bucket(hour, now) == k for i in b[2]]
                for j in range(0, len(ids), wire.LIMITS.array_len):
                    out.append(self._message(address, "ids", {"bucket": k, "ids": ids[j:j + wire.LIMITS.array_len]}, now))
        if msg.payload["reply"]:
            out.append(self._message(address, "digest", {"buckets": digest, "reply": False}, now))
        return out

    def _spot_check(self, msg, acct, now):
        """Its digest says it holds all we hold: it must serve one of our newest records when asked.
        A censor that answers digests with ours (so that nothing is owed or swapped) cannot."""
        newest = max(self.hours)
        rid = self.rng.choice(self.hours[newest][2])
        self.spot[msg.sender_id] = Promise(rid, now + self.config.promise_timeout_s, acct.origin)
        return [self._message(msg.address, "iwant", {"ids": [rid]}, now)]

    def _possession_check(self, now):
        """Ask one member that has neither served us nor been vetted for a record it must hold: one
        we got at least `check_age_s` ago, and after the member first became known to us (so it
        was published while the member was among us). It must serve it within `promise_timeout_s`
        (tick() asks twice more when no record comes, then penalizes, unless the member did not answer
        the ping sent with the request either: it may be cut off; _on_push vets a kept promise)."""
        if not self.got or self.got[0][0] > now - self.config.check_age_s:
            return []
        led, members = self.ledger, list(self.members.values())
        for m in self.rng.sample(members, min(8, len(members))):  # a few draws: no scan of the view
            # a member whose address never answered as itself is asked once per half-life at most: a hello
            # may name another node's address, and that node would get every check meant for it
            if (m.state == "alive" and m.id not in self.spot and led.standing(m.id, now) >= 0
                    and (self._verified(m.id, m.address, now) or not led.asked(m.id, now))
                    and not led.vetted(m.id, now) and not led.served(m.id, now)):
                out = self._ask(m, next(iter(led.by_member.get(m.id, ())), None), 2, now)
                if out:
                    led.ask(m.id, now)
                    return out
        return []

    def _ask(self, m, acct, again, now):
        """Ask member `m` (on connection `acct`) for a record it must hold, with a ping like a probe's;
        `again`: asks left."""
        if acct is None or now - m.since < self.config.check_age_s:  # never spoke to us; or (re)joined lately
            return []                                                  # and may still be catching up
        due = [rid for t, rid in self.got if m.first <= t <= now - self.config.check_age_s]
        if not due:
            return []
        seq = self._nonce(m.address)
        self.spot[m.id] = Promise(self.rng.choice(due), now + self.config.promise_timeout_s, acct.origin, again, seq)
        # an iwant and a ping, counted apart from dissemination's and the probes'
        return [self._message(m.address, "iwant", {"ids": [self.spot[m.id].rid]}, now, label="check"),
                self._message(m.address, "ping", {"seq": seq, **self._piggyback(True)}, now, label="check")]

    def _kept_promise(self, mid, rid, now):
        p = self.spot.get(mid)
        if p is not None and p.rid == rid:  # served what its digest claimed, or what a check asked for
            del self.spot[mid]
            self.ledger.vet(mid, now)

    def _on_ack(self, msg, acct, now):
        p = self.spot.get(msg.sender_id)
        if p is not None and p.seq is not None and msg.payload["seq"] == p.seq:
            p.answered = True  # reachable, from itself: not through a helper, not a replay of an old ack
        return super()._on_ack(msg, acct, now)

    def _on_ids(self, msg, acct, now):
        return self._on_ihave(msg, acct, now)

    # --- peers ---------------------------------------------------------------------------------

    def _penalize(self, acct, reason, now):
        if not self.ledger.penalize(acct, reason, now):
            return []
        m = self.members.get(acct.node)
        out = [Event("peer_banned", {"id": acct.node, "reasons": dict(acct.counts)})]
        if m:
            out.append(self._remove(m, "member_dead"))
        return out

    def _message(self, address, kind, payload, now, label=None):
        """A signed message to `address`; `label` (default: its kind) is what `sent` counts it as."""
        self.sent[label or kind] += 1
        return Send(address, wire.make_message(self.identity, kind, payload, int(now * 1000), self.address), label or kind)
