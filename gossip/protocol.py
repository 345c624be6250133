"""The gossip protocol core. Pure: bytes and time in; messages to send, records to deliver and
events out. It owns no socket, clock, thread or randomness (the caller passes `now` in
seconds and a seeded `random.Random`), so the same code runs over ZeroMQ and over a simulated
network of thousands of nodes (gossip/sim.py).

- Membership, in the manner of SWIM: join through seeds, a signed `hello` per node (its
  address and incarnation) relayed by peers, one probe per period with indirect probes
  through k others, suspicion before removal, refutation by a higher incarnation, rejoin of
  recently dead members (so a healed partition finds itself again).
- Dissemination: a new valid record is pushed at once to `fanout` random members; its id is
  announced lazily (`ihave`) to `lazy_fanout` more each round, who pull (`iwant`) what they
  miss. A record is delivered (to be stored) before anything forwards it.
- Anti-entropy: every period a digest of the store (count and xor-hash per hour of record
  time, per day beyond 48 h) goes to one random member; both sides list their ids of the
  buckets that differ and pull what they lack.
- Per-peer accounting, by the connection a message came on: a token bucket, then a score
  that malformed, oversized, badly signed or forged input and broken `ihave` promises pull
  down; below `ban_score` the peer is refused for `ban_s`. First deliveries of new records
  raise a member's standing, and peers below zero are not chosen to gossip to.

The caller must act on outputs in order: a `Deliver` comes before the `Send`s that forward
its record, so a store written on `Deliver` is durable before the record is announced.
"""

import math
import random
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from gossip import wire
from gossip.identity import node_id


@dataclass(frozen=True)
class Config:
    tick_s: float = 0.1            # how often the caller must call tick()
    fanout: int = 5                # eager push targets per new record
    lazy_fanout: int = 3           # ihave targets per round
    round_s: float = 0.2           # a gossip round: one ihave batch
    ping_interval_s: float = 1.0   # one probe per period
    ping_timeout_s: float = 0.4    # then indirect probes
    indirect_checks: int = 3
    suspect_timeout_s: float = 6.0
    ae_interval_s: float = 2.0     # anti-entropy period
    rejoin_interval_s: float = 4.0 # seeds (while alone) and recently dead members
    max_view: int = 256            # members known at once
    piggyback: int = 4             # membership updates per ping or ack
    intro_per_message: int = 16    # new members one message may introduce
    promise_timeout_s: float = 1.0
    rate_per_s: float = 400.0      # messages per connection, sustained
    burst: float = 800.0
    ban_score: float = -20.0
    ban_s: float = 600.0
    max_accounts: int = 4096


CONFIG = Config()

PENALTY = {"malformed": 1.0, "oversize": 2.0, "schema": 2.0, "version": 0.5, "unknown_type": 1.0,
           "future": 1.0, "stale": 0.5, "bad_signature": 4.0, "id_mismatch": 4.0, "broken_promise": 1.0,
           "throttled": 0.05, "spoofed": 4.0}


@dataclass(frozen=True)
class Send:
    address: str
    data: bytes
    kind: str


@dataclass(frozen=True)
class Deliver:
    record: wire.Record


@dataclass(frozen=True)
class Event:
    kind: str        # member_joined | member_suspect | member_dead | member_left | peer_banned | refuted
    detail: dict


class Member:
    __slots__ = ("id", "key", "address", "incarnation", "meta", "hello", "state", "suspect_until",
                 "last_seen", "deliveries", "seed", "debt", "debt_at")

    def __init__(self, msg, now):
        self.id, self.key, self.seed, self.deliveries = msg.sender_id, msg.sender, False, 0
        self.debt, self.debt_at = 0.0, now  # unanswered anti-entropy digests, forgiven at DEBT_DECAY per second
        self.state, self.suspect_until, self.last_seen = "alive", 0.0, now
        self.update(msg)

    def update(self, msg):
        p = msg.payload
        self.address, self.incarnation, self.meta, self.hello = p["address"], p["incarnation"], p["meta"], msg.encoded
        self.state = "alive"


@dataclass
class Account:
    """What one connection has sent us."""
    origin: object
    tokens: float
    refilled: float
    score: float = 0.0
    banned_until: float = 0.0
    node: str = ""
    counts: Counter = field(default_factory=Counter)


HOUR_MS, DAY_MS, RECENT_HOURS = 3_600_000, 86_400_000, 48
DEBT_DECAY = 0.1  # per second: one lost reply sidelines an honest member for ~10 s, a censor for good


class Node:
    def __init__(self, identity, address, config=CONFIG, seeds=(), meta=None, rng=None, now=0.0):
        self.identity, self.id, self.address, self.config = identity, identity.id, address, config
        self.rng = rng or random.Random()
        self.meta = dict(meta or {})
        self.incarnation = int(now * 1000)  # a restarted node always outranks its former self
        self.hello = self._hello(now)
        self.seeds = list(seeds)
        self.members = {}                   # id -> Member
        self.dead = OrderedDict()           # id -> (incarnation, address, last heard from), most recent last
        self.records = {}                   # id -> Record
        self.hours = {}                     # hour -> [count, xor of ids, ids]
        self.accounts = OrderedDict()       # connection -> Account
        self.node_accounts = {}             # member id -> its connections' Accounts
        self.updates = []                   # [hello blob, sends left]
        self.suspicions = []                # [[id, incarnation], sends left]
        self.lazy = []                      # ids to announce next round
        self.wanted = {}                    # id -> (deadline, connection we asked)
        self._now = now                     # the time of the input being handled
        self.probe = None
        self.ae_waiting = None              # the member whose digest reply we wait for
        self.probe_order = []
        self.relays = {}                    # our seq -> (requester address, their seq)
        self.seq = 0
        self.sent = Counter()
        self.next = {"round": now, "ping": now + config.ping_interval_s, "ae": now + config.ae_interval_s,
                     "rejoin": now + config.rejoin_interval_s}

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
        self._keep(record)
        out = [Deliver(record)]
        out += self._push([record], [m.address for m in self._targets(self.config.fanout)], now)
        self.lazy.append(record.id)
        return out

    def leave(self, now):
        payload = {"incarnation": self.incarnation}
        return [self._message(m.address, "leave", payload, now) for m in self._targets(self.config.fanout * 2)]

    def receive(self, origin, data, now):
        self._now = now
        acct = self._account(origin, now)
        if acct.banned_until > now:
            acct.counts["refused"] += 1
            return []
        acct.tokens = min(self.config.burst, acct.tokens + (now - acct.refilled) * self.config.rate_per_s)
        acct.refilled = now
        if acct.tokens < 1:
            return self._penalize(acct, "throttled", now)
        acct.tokens -= 1
        try:
            msg = wire.decode_message(data, int(now * 1000))
        except wire.WireError as e:
            return self._penalize(acct, e.reason, now)
        if msg.sender == self.identity.public_key:
            return []
        if acct.node and acct.node != msg.sender_id:
            return self._penalize(acct, "spoofed", now)  # one connection, one sender
        if not acct.node:
            acct.node = msg.sender_id
            self.node_accounts.setdefault(msg.sender_id, []).append(acct)
        acct.counts["ok"] += 1
        member = self.members.get(msg.sender_id)
        if member:
            member.last_seen = now
            if member.state == "suspect":
                member.state = "alive"
        return getattr(self, "_on_" + msg.kind)(msg, acct, now)

    def tick(self, now):
        self._now = now
        out, c, nxt = [], self.config, self.next
        if self.probe:
            out += self._probe_step(now)
        for m in [m for m in self.members.values() if m.state == "suspect" and now >= m.suspect_until]:
            out.append(self._remove(m, "member_dead"))
        for rid, (deadline, origin) in list(self.wanted.items()):
            if now >= deadline:
                del self.wanted[rid]
                if rid not in self.records and origin in self.accounts:
                    out += self._penalize(self.accounts[origin], "broken_promise", now)
        if now >= nxt["round"]:
            nxt["round"] = now + c.round_s
            if self.lazy:
                ids, self.lazy = self.lazy[:wire.LIMITS.array_len], self.lazy[wire.LIMITS.array_len:]
                for m in self._targets(c.lazy_fanout):
                    out.append(self._message(m.address, "ihave", {"ids": ids}, now))
        if now >= nxt["ping"]:
            nxt["ping"] = now + c.ping_interval_s
            out += self._probe_start(now)
        if now >= nxt["ae"]:
            nxt["ae"] = now + c.ae_interval_s
            waited = self.members.get(self.ae_waiting)
            if waited is not None:  # the last digest's reply never came: a member that skips anti-entropy
                self._owe(waited, 1.0, now)
            self.ae_waiting = None
            for m in self._targets(1):
                self.ae_waiting = m.id
                out.append(self._message(m.address, "digest", {"buckets": self._digest(now), "reply": True}, now))
        if now >= nxt["rejoin"]:
            nxt["rejoin"] = now + c.rejoin_interval_s
            join = {"hello": self.hello}
            if not self.members:
                out += [self._message(a, "join", join, now) for a in self.seeds if a != self.address]
            if self.dead:
                _, (_, address, _) = self.rng.choice(list(self.dead.items()))
                out.append(self._message(address, "join", join, now))
            elif self.seeds and self.rng.random() < 0.25:  # islands of a partial view find the rest
                out.append(self._message(self.rng.choice(self.seeds), "join", join, now))
        return out

    # --- state for status ----------------------------------------------------------------------

    def peers(self, now):
        """Members with their standing, and what each connection bound to them has sent."""
        by_node = {}
        for a in self.accounts.values():
            if a.node:
                s = by_node.setdefault(a.node, {"score": 0.0, "counts": Counter()})
                s["score"] = min(s["score"], a.score)
                s["counts"].update(a.counts)
        return [{"id": m.id, "address": m.address, "meta": m.meta, "state": m.state,
                 "last_seen_s": round(now - m.last_seen, 1), "deliveries": m.deliveries,
                 "score": round(by_node.get(m.id, {}).get("score", 0.0), 2),
                 "counts": dict(by_node.get(m.id, {}).get("counts", {}))} for m in self.members.values()]

    def banned(self, now):
        """Connections refused now."""
        return sum(1 for a in self.accounts.values() if a.banned_until > now)

    def rejected(self):
        """Counted reasons over all connections, the banned ones included."""
        total = Counter()
        for a in self.accounts.values():
            total.update({k: v for k, v in a.counts.items() if k not in ("ok", "duplicate")})
        return dict(total)

    # --- membership ----------------------------------------------------------------------------

    def _hello(self, now):
        payload = {"address": self.address, "incarnation": self.incarnation, "meta": self.meta}
        return wire.make_message(self.identity, "hello", payload, int(now * 1000), self.address)

    def _learn(self, blob, acct, now, direct=False, said_ms=None):
        """A relayed or direct `hello`: add or refresh the member it describes."""
        if self._known_hello(blob):
            return []  # the very bytes we hold for that member: nothing new, no signature to check
        try:
            msg = wire.decode_message(blob, int(now * 1000), fresh=False)
        except wire.WireError as e:
            return self._penalize(acct, e.reason, now)
        if msg.kind != "hello":
            return self._penalize(acct, "schema", now)
        mid, inc = msg.sender_id, msg.payload["incarnation"]
        if mid == self.id:
            if inc > self.incarnation:  # a former life of ours outranks us (clock went back): step past it
                return self._refute(inc, now)
            return []
        if mid in self.dead and self.dead[mid][0] >= inc and not (
                direct and acct.node == mid and said_ms is not None and said_ms > self.dead[mid][2] * 1000):
            return []  # dead at this incarnation: back only on its own word, said since we last heard it
        m = self.members.get(mid)
        if m:
            if inc > m.incarnation:
                m.update(msg)
                self._spread(msg.encoded)
            return []
        if len(self.members) >= self.config.max_view:
            victims = [x for x in self.members.values() if not x.seed and x.deliveries == 0]
            if not direct or not victims:
                return []
            del self.members[self.rng.choice(victims).id]
        m = self.members[mid] = Member(msg, now)
        m.seed = m.address in self.seeds
        self.dead.pop(mid, None)
        self._spread(msg.encoded)
        return [Event("member_joined", {"id": mid, "address": m.address})]

    def _known_hello(self, blob):
        try:
            head = wire.unpack(blob)
            m = self.members.get(node_id(head[2]))
        except (wire.WireError, IndexError, KeyError, TypeError):
            return False
        return m is not None and m.hello == blob

    def _spread(self, blob):
        n = len(self.members) + 1
        self.updates.insert(0, [blob, 3 * math.ceil(math.log2(n + 1))])  # newest first

    def _refute(self, inc, now):
        self.incarnation = max(self.incarnation, inc) + 1
        self.hello = self._hello(now)
        self._spread(self.hello)
        return [Event("refuted", {"incarnation": self.incarnation})]

    def _piggyback(self, own):
        members = [self.hello] if own else []
        self.updates.sort(key=lambda u: -u[1])  # least sent first (stable sort: newest first among equals)
        for u in self.updates[:self.config.piggyback]:
            members.append(u[0])
            u[1] -= 1
        if len(self.members) > 1:  # peer exchange: two random members keep partial views mixing
            members += [m.hello for m in self.rng.sample(list(self.members.values()), 2)]
        self.updates = [u for u in self.updates if u[1] > 0]
        suspects = []
        for s in self.suspicions[:self.config.piggyback]:
            suspects.append(s[0])
            s[1] -= 1
        self.suspicions = [s for s in self.suspicions if s[1] > 0]
        return {"members": members, "suspects": suspects}

    def _absorb(self, payload, acct, now, said_ms=None):
        out, fresh = [], 0
        for blob in payload["members"]:
            known = len(self.members)
            out += self._learn(blob, acct, now, direct=(fresh == 0 and blob is payload["members"][0]),
                               said_ms=said_ms)
            fresh += len(self.members) > known
            if fresh >= self.config.intro_per_message:
                break
        for mid, inc in payload["suspects"][:self.config.piggyback * 2]:
            if mid == self.id:
                if inc >= self.incarnation:
                    out += self._refute(inc, now)
                continue
            m = self.members.get(mid)
            if m and m.state == "alive" and inc >= m.incarnation:
                out += self._suspect(m, now)
                self.seq += 1  # check a rumour ourselves: any answer from the member clears it
                out.append(self._message(m.address, "ping", {"seq": self.seq, **self._piggyback(True)}, now))
        return out

    def _suspect(self, m, now):
        m.state, m.suspect_until = "suspect", now + self.config.suspect_timeout_s
        self.suspicions.append([[m.id, m.incarnation], 3 * math.ceil(math.log2(len(self.members) + 2))])
        return [Event("member_suspect", {"id": m.id, "address": m.address})]

    def _remove(self, m, kind):
        del self.members[m.id]
        self.dead[m.id] = (m.incarnation, m.address, m.last_seen)
        while len(self.dead) > self.config.max_view:
            self.dead.popitem(last=False)
        return Event(kind, {"id": m.id, "address": m.address})

    def _probe_start(self, now):
        if not self.members:
            return []
        while self.probe_order and self.probe_order[-1] not in self.members:
            self.probe_order.pop()
        if not self.probe_order:
            self.probe_order = list(self.members)
            self.rng.shuffle(self.probe_order)
        target = self.members[self.probe_order.pop()]
        self.seq += 1
        self.probe = {"target": target.id, "seq": self.seq, "at": now, "indirect": False}
        return [self._message(target.address, "ping", {"seq": self.seq, **self._piggyback(True)}, now)]

    def _probe_step(self, now):
        p, c = self.probe, self.config
        target = self.members.get(p["target"])
        if target is None:
            self.probe = None
            return []
        if not p["indirect"] and now >= p["at"] + c.ping_timeout_s:
            p["indirect"] = True
            helpers = [m for m in self._targets(c.indirect_checks + 1) if m.id != target.id][:c.indirect_checks]
            return [self._message(m.address, "ping_req", {"seq": p["seq"], "target": target.address}, now)
                    for m in helpers]
        if now >= p["at"] + c.ping_interval_s * 0.9:
            self.probe = None
            if target.state == "alive" and now - target.last_seen >= c.ping_interval_s * 0.9:
                return self._suspect(target, now)
        return []

    def _on_hello(self, msg, acct, now):
        return self._learn(msg.encoded, acct, now, direct=True, said_ms=msg.ts)

    def _on_join(self, msg, acct, now):
        out = self._learn(msg.payload["hello"], acct, now, direct=True, said_ms=msg.ts)
        sample = self.rng.sample(list(self.members.values()), min(len(self.members), self.config.intro_per_message - 1))
        blobs = [self.hello] + [x.hello for x in sample if x.id != msg.sender_id]
        return out + [self._message(msg.address, "welcome", {"members": blobs}, now)]

    def _on_welcome(self, msg, acct, now):
        return self._absorb({"members": msg.payload["members"], "suspects": []}, acct, now, msg.ts)

    def _on_ping(self, msg, acct, now):
        out = self._absorb(msg.payload, acct, now, msg.ts)
        out.append(self._message(msg.address, "ack", {"seq": msg.payload["seq"], **self._piggyback(False)}, now))
        return out

    def _on_ack(self, msg, acct, now):
        out = self._absorb(msg.payload, acct, now, msg.ts)
        seq = msg.payload["seq"]
        if seq in self.relays:
            address, their_seq = self.relays.pop(seq)
            out.append(self._message(address, "ack", {"seq": their_seq, "members": [], "suspects": []}, now))
        elif self.probe and self.probe["seq"] == seq:
            target = self.members.get(self.probe["target"])
            if target:
                target.last_seen, target.state = now, "alive"
            self.probe = None
        return out

    def _on_ping_req(self, msg, acct, now):
        self.seq += 1
        self.relays[self.seq] = (msg.address, msg.payload["seq"])
        while len(self.relays) > 64:
            self.relays.pop(next(iter(self.relays)))
        return [self._message(msg.payload["target"], "ping", {"seq": self.seq, **self._piggyback(True)}, now)]

    def _on_leave(self, msg, acct, now):
        m = self.members.get(msg.sender_id)
        if m and msg.payload["incarnation"] >= m.incarnation:
            return [self._remove(m, "member_left")]
        return []

    # --- dissemination -------------------------------------------------------------------------

    def _keep(self, record):
        self.records[record.id] = record
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
                    continue
                record = wire.decode_record(blob, int(now * 1000))
            except wire.WireError as e:
                out += self._penalize(acct, e.reason, now)
                if acct.banned_until > now:
                    return out
                continue
            if record.id in self.records:  # the same record in other bytes (decoding accepts any key order)
                acct.counts["duplicate"] += 1
                continue
            self._keep(record)
            self.wanted.pop(record.id, None)
            new.append(record)
            out.append(Deliver(record))
            m = self.members.get(msg.sender_id)
            if m:
                m.deliveries += 1
            acct.score = min(10.0, acct.score + 0.1)
        if new:
            targets = [m for m in self._targets(self.config.fanout + 1) if m.id != msg.sender_id][:self.config.fanout]
            out += self._push(new, [m.address for m in targets], now)
            self.lazy += [r.id for r in new]
        return out

    def _on_ihave(self, msg, acct, now):
        missing = [i for i in msg.payload["ids"] if i not in self.records and i not in self.wanted]
        if not missing:
            return []
        for i in missing:
            self.wanted[i] = (now + self.config.promise_timeout_s, acct.origin)
        return [self._message(msg.address, "iwant", {"ids": missing}, now)]

    def _on_iwant(self, msg, acct, now):
        have = [self.records[i] for i in msg.payload["ids"] if i in self.records]
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
        address = msg.address
        if not msg.payload["reply"] and msg.sender_id == self.ae_waiting:
            self.ae_waiting = None
            m = self.members.get(msg.sender_id)
            if m:
                self._owe(m, -1.0, now)
        theirs = {k: (c, h) for k, c, h in msg.payload["buckets"]}
        mine = {k: (c, h) for k, c, h in self._digest(now)}
        out = []
        for k in sorted(set(mine) | set(theirs)):
            if mine.get(k) != theirs.get(k) and k in mine:
                ids = [i for hour, b in self.hours.items() if self._bucket(hour, now) == k for i in b[2]]
                for j in range(0, len(ids), wire.LIMITS.array_len):
                    out.append(self._message(address, "ids", {"bucket": k, "ids": ids[j:j + wire.LIMITS.array_len]}, now))
        if msg.payload["reply"]:
            out.append(self._message(address, "digest", {"buckets": self._digest(now), "reply": False}, now))
        return out

    def _on_ids(self, msg, acct, now):
        return self._on_ihave(msg, acct, now)

    # --- peers ---------------------------------------------------------------------------------

    def _targets(self, k):
        """k random alive members in good standing."""
        pool = [m for m in self.members.values() if m.state == "alive" and self._standing(m.id) >= 0]
        return self.rng.sample(pool, min(k, len(pool)))

    def _standing(self, mid):
        """The worst score of the member's connections (one bad connection taints the member),
        less what it owes in unanswered digests."""
        m = self.members.get(mid)
        debt = max(0.0, m.debt - DEBT_DECAY * (self._now - m.debt_at)) if m else 0.0
        return min((a.score for a in self.node_accounts.get(mid, ())), default=0.0) - debt

    def _owe(self, m, amount, now):
        m.debt = max(0.0, m.debt - DEBT_DECAY * (now - m.debt_at) + amount)
        m.debt_at = now

    def _account(self, origin, now):
        a = self.accounts.get(origin)
        if a is None:
            a = self.accounts[origin] = Account(origin, tokens=self.config.burst, refilled=now)
            if len(self.accounts) > self.config.max_accounts:  # forget the longest-idle unbanned one
                for k, old in self.accounts.items():
                    if old.banned_until <= now and k != origin:
                        del self.accounts[k]
                        if old.node in self.node_accounts:
                            self.node_accounts[old.node] = [x for x in self.node_accounts[old.node] if x is not old]
                        break
        self.accounts.move_to_end(origin)
        return a

    def _penalize(self, acct, reason, now):
        acct.counts[reason] += 1
        acct.score -= PENALTY.get(reason, 1.0)
        if acct.score <= self.config.ban_score and acct.banned_until <= now:
            acct.banned_until = now + self.config.ban_s
            m = self.members.get(acct.node)
            out = [Event("peer_banned", {"id": acct.node, "reasons": dict(acct.counts)})]
            if m:
                out.append(self._remove(m, "member_dead"))
            return out
        return []

    def _message(self, address, kind, payload, now):
        self.sent[kind] += 1
        return Send(address, wire.make_message(self.identity, kind, payload, int(now * 1000), self.address), kind)

