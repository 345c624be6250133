"""Membership, the half of the protocol core that knows who is out there (gossip/protocol.py
is the other half: records). Pure like it; a mixin of protocol.Node, which supplies the
identity, config, rng, ledger and clock (`_now`), signs what goes out (`_message`), bans
(`_penalize`), and lets records ride on membership messages (`_have`, `_hear_of`).

- SWIM: a signed `hello` per node (its address and incarnation) relayed by peers; one probe per
  period, then indirect probes through k others; suspicion before removal; refutation by a
  higher incarnation; rejoin of recently dead members, so a healed partition finds itself.
- Rumours: a suspicion another member relays is checked by our own direct and indirect pings
  before we believe or repeat it. No rumour rides on the check but the one checked, told to the
  member it is about so that it can refute it. A rumour the member disproves by answering puts
  its teller in debt (scoring.Ledger), and tellers in debt are not heard: hostile members cannot
  talk honest ones to death, nor make us ping in storms.
- The view is a sample: bounded, and when full a newcomer gets in only by ranking above the
  worst member by a keyed hash only this node knows, so it is a uniform sample of the members
  seen however often (or by whom) each was introduced.
- Gossip targets and peer exchange lean on evidence of service: members that delivered us
  records first are drawn half the time (scoring.Ledger.served), and named in peer exchange.
- Verified addresses: a message names the address its sender takes replies at, and anyone may
  sign any address. Every ping we send carries a fresh nonce that only we can compute, one per
  destination; an ack signed by member M that echoes the nonce of a ping we sent to address A
  proves that M receives what is sent to A, and (M, A) counts as verified for `verified_s`. A
  reply that can be larger than its request (a digest's ids and reply, the records an `iwant`
  asks for, a welcome, the ping a `ping_req` relays) goes only to the verified address of its
  requester: until then the request waits (`_answer`) while one ping that carries nothing (the
  size of a small request) asks the address, one per address at a time and twice at most, and
  an ack to an address not verified carries no more than the ping it answers. Nothing larger
  than what a peer sent goes to an address no member has answered at, however many keys claim it.
  What we send on our own schedule that is larger than a ping (records, announcements, digests)
  goes only to members verified at their current address (`_gossip_targets`): a member new to the
  view, or whose hello moves it, is asked at once with a ping that carries nothing (and so does
  the ack), one per address per `reask_s`, and gets nothing else until its ack comes.
"""

import hashlib
import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from gossip import wire
from gossip.identity import node_id


@dataclass(frozen=True)
class Event:
    kind: str        # member_joined | member_suspect | member_dead | member_left | peer_banned | refuted | seeds_silent
    detail: dict


class Member:
    __slots__ = ("id", "key", "address", "incarnation", "meta", "hello", "state", "suspect_until",
                 "last_seen", "deliveries", "seed", "rank", "since", "first")

    def __init__(self, msg, seen, rank, since, first):
        self.id, self.key, self.seed, self.deliveries, self.rank = msg.sender_id, msg.sender, False, 0, rank
        self.since, self.first = since, first  # when it became a member here (this time; the first time)
        self.state, self.suspect_until, self.last_seen = "alive", 0.0, seen  # the last time we know it spoke
        self.update(msg)

    def update(self, msg):
        p = msg.payload
        self.address, self.incarnation, self.meta, self.hello = p["address"], p["incarnation"], p["meta"], msg.encoded
        self.state = "alive"


@dataclass
class Check:
    """A ping awaiting its answer: our own probe (no tellers) or the check of a rumour."""
    target: str
    at: float
    tellers: list = None
    indirect: bool = False
    via: tuple = ()         # the nonces of the ping_reqs sent for it, one per helper


@dataclass
class Pending:
    """An address being verified: the requests that wait for it, each answered if its sender is
    the one that answers there."""
    retry: float                                          # when to ask again, or (asked twice) give up
    tries: int = 1
    waiting: deque = field(default_factory=deque)         # (sender id, answer, message, connection)
    size: int = 0                                         # bytes of the messages waiting


class Membership:
    def _init_membership(self, now):
        self.salt = self.rng.getrandbits(128).to_bytes(16, "big")  # our view's ranking, unknown to others
        self.incarnation = int(now * 1000)  # a restarted node always outranks its former self
        self.hello = self._hello(now)
        self.members = {}                   # id -> Member
        self.dead = OrderedDict()           # id -> (incarnation, address, last heard from), most recent last
        self.updates = []                   # [hello blob, sends left, member id]
        self.suspicions = []                # [[id, incarnation], sends left]
        self.checks = {}                    # our seq -> Check
        self.rumours = Counter()            # heard, confirmed, disproved, unheard (teller in debt or unknown)
        self.probe_order = []
        self.relays = {}                    # our nonce -> (requester address, their seq)
        self.via = {}                       # a ping_req's nonce -> the nonce of the check it helps
        self.seq = 0                        # pings sent: the counter our nonces hash
        self.pinged = OrderedDict()         # nonce -> the address the ping carrying it went to
        self.verified = OrderedDict()       # member id -> (address it answered a nonce at, when), oldest first
        self.verified_at = {}               # address -> the member last verified there
        self.verifying = OrderedDict()      # address -> Pending, oldest first
        self.asked = OrderedDict()          # address -> when we last asked it on our own initiative, oldest first
        self.waiting_bytes = 0              # of the requests waiting on verifications
        self.replies = Counter()            # answered (verified at once), waited, answered_late, dropped
        self._ack_base = None               # bytes of an ack that carries nothing
        self._worst = None                  # (view size, time, the member a better-ranked newcomer evicts)
        self.next_probe = now + self.config.ping_interval_s
        self.next_rejoin = now + self.config.rejoin_interval_s
        self.seed_retry = {}                # seed address missing from the view -> (next join, joins so far)
        self.silent_due = now + self.config.seeds_silent_s  # then, still alone, say once that no seed answered

    def _membership_tick(self, now):
        out, c = [], self.config
        for seq in list(self.checks):
            out += self._check_step(seq, now)
        for address, p in list(self.verifying.items()):
            if now >= p.retry:
                if p.tries >= 2:  # asked twice, no answer as that member: the requests are dropped
                    self._unwait(address, "dropped")
                else:
                    p.tries, p.retry = p.tries + 1, now + c.verify_timeout_s
                    out.append(self._verify_ping(address, now))
        for m in [m for m in self.members.values() if m.state == "suspect" and now >= m.suspect_until]:
            out.append(self._remove(m, "member_dead"))
        if now >= self.next_probe:
            self.next_probe = now + c.ping_interval_s
            out += self._probe_start(now)
        if self.silent_due is not None and now >= self.silent_due:
            self.silent_due = None
            out += self._seeds_silent(now)
        if now >= self.next_rejoin:
            self.next_rejoin = now + c.rejoin_interval_s
            join = {"hello": self.hello}
            known = {m.address for m in self.members.values()}
            missing = [a for a in self.seeds if a != self.address and a not in known]
            self.seed_retry = {a: r for a, r in self.seed_retry.items() if a in missing}  # back in the view: forgotten
            asked = False
            if not self.members:
                out += [self._message(a, "join", join, now) for a in missing]
            elif missing:
                ask = self._ask_seed(missing, join, now)
                out, asked = out + ask, bool(ask)
            if self.dead:
                _, (_, address, _) = self.rng.choice(list(self.dead.items()))
                out.append(self._message(address, "join", join, now))
            elif self.seeds and not asked and self.rng.random() < 0.25:  # islands of a partial view find the rest
                out.append(self._message(self.rng.choice(self.seeds), "join", join, now))
        return out

    def _ask_seed(self, missing, join, now):
        """A join to one seed missing from our view (its welcome lost, or it was down), each such
        seed asked again after 1, 2, 4 ... 64 rejoin intervals: a lost welcome is mended at the
        next interval, while a seed that answers under another address than the one we were
        given (a host name, a NAT) costs a join every few minutes."""
        due = [a for a in missing if self.seed_retry.get(a, (0.0, 0))[0] <= now]
        if not due:
            return []
        a = self.rng.choice(due)
        _, k = self.seed_retry.get(a, (0.0, 0))
        self.seed_retry[a] = (now + self.config.rejoin_interval_s * 2 ** min(k, 6), k + 1)
        return [self._message(a, "join", join, now)]

    def _seeds_silent(self, now):
        """Once, `seeds_silent_s` after start: if no member was ever heard though seeds were given, an
        event naming them (the node goes on alone and keeps joining through them every rejoin interval)."""
        seeds = [a for a in self.seeds if a != self.address]
        if not seeds or self.members or self.dead:
            return []
        return [Event("seeds_silent", {"seeds": ", ".join(seeds), "after_s": self.config.seeds_silent_s,
                                       "retry_s": self.config.rejoin_interval_s})]

    def _hello(self, now):
        payload = {"address": self.address, "incarnation": self.incarnation, "meta": self.meta}
        return wire.make_message(self.identity, "hello", payload, int(now * 1000), self.address)

    def _rank(self, mid):
        return hashlib.sha256(self.salt + mid.encode()).digest()[:8]

    def _learn(self, blob, acct, now, direct=False, said_ms=None):
        """A relayed or direct `hello`: add or refresh the member it describes. What the unchecked
        bytes claim may only save us work (a hello that could not change anything is dropped
        before its signature is checked); nothing is taken on their word."""
        head = self._peek(blob)
        if head is not None:
            mid, inc = head
            m = self.members.get(mid)
            if m is not None and (m.hello == blob or inc <= m.incarnation):
                return []  # nothing newer than what we hold
            if mid == self.id and inc <= self.incarnation:
                return []
            if m is None and mid != self.id and not (direct and mid == acct.node):
                if mid in self.dead and self.dead[mid][0] >= inc:
                    return []
                if len(self.members) >= self.config.max_view and not self._outranks(mid):
                    return []
        if not self.ledger.take(acct, 1, now):  # a signature check costs the sender a token
            return self._penalize(acct, "throttled", now)
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
                m.last_seen = max(m.last_seen, min(now, msg.ts / 1000))  # it spoke when it signed this
                self._spread(msg.encoded, mid)
                if not self._verified(mid, m.address, now):  # it moved: its new address is asked at once
                    return self._ask_address(m.address, now)
            return []
        if len(self.members) >= self.config.max_view:
            if not (self._outranks(mid) or (self._seat_seed(msg, acct) and self._victim())):
                return []
            self._drop(self._victim())  # still alive, just out of our sample
        seen = now if direct and acct.node == mid else min(now, msg.ts / 1000)  # a relayed hello: when it was said
        m = self.members[mid] = Member(msg, seen, self._rank(mid), now, self.ledger.first_seen(mid, now))
        m.seed = m.address in self.seeds
        self._worst = None
        self.dead.pop(mid, None)
        if seen >= now - self.config.news_s:  # news (a join, a restart, or first-hand): spread it; an old
            self._spread(msg.encoded, mid)     # hello heard second-hand travels by peer exchange alone
        out = [Event("member_joined", {"id": mid, "address": m.address})]
        if not self._verified(mid, m.address, now):  # asked at once, it is verified before we have much to send it
            out += self._ask_address(m.address, now)
        return out

    def _seat_seed(self, msg, acct):
        """Whether a full view makes room for this hello's member although it does not outrank
        the worst: it speaks for itself, from an address the operator named as a seed, and no
        member holds that address (so the seats taken this way are at most the seeds)."""
        address = msg.payload["address"]
        return (acct.node == msg.sender_id and address in self.seeds
                and all(m.address != address for m in self.members.values()))

    def _peek(self, blob):
        """(member id, incarnation) as a hello's bytes claim them, unchecked; None if they do not parse."""
        try:
            head = wire.unpack(blob)
            inc = head[5]["incarnation"]
            return (node_id(head[2]), inc) if isinstance(inc, int) and isinstance(head[2], bytes) else None
        except (wire.WireError, IndexError, KeyError, TypeError):
            return None

    def _victim(self):
        """The worst-ranked member a newcomer may replace: not a seed, and not one that serves us.
        Cached for a second (service changes slowly), and until the view changes."""
        if self._worst is None or self._worst[0] != len(self.members) or self._now - self._worst[1] > 1.0:
            now = self._now
            pool = [m for m in self.members.values() if not m.seed and not self.ledger.served(m.id, now)]
            self._worst = (len(self.members), now, max(pool, key=lambda m: m.rank) if pool else None)
        victim = self._worst[2]
        return victim if victim is not None and victim.id in self.members else None

    def _drop(self, m):
        del self.members[m.id]
        self._worst = None
        self.updates = [u for u in self.updates if u[2] != m.id]

    def _outranks(self, mid):
        victim = self._victim()
        return victim is not None and self._rank(mid) < victim.rank

    def _spread(self, blob, mid):
        n = len(self.members) + 1
        self.updates.insert(0, [blob, 3 * math.ceil(math.log2(n + 1)), mid])  # newest first

    def _refute(self, inc, now):
        self.incarnation = max(self.incarnation, inc) + 1
        self.hello = self._hello(now)
        self._spread(self.hello, self.id)
        return [Event("refuted", {"incarnation": self.incarnation})]

    def _piggyback(self, own, rumours=True):
        members = [self.hello] if own else []
        since = self._now - self.config.news_s  # news of a member that has not spoken since is stale
        self.updates = [u for u in self.updates if u[2] == self.id or (
            u[2] in self.members and self.members[u[2]].last_seen >= since)]
        self.updates.sort(key=lambda u: -u[1])  # least sent first (stable sort: newest first among equals)
        for u in self.updates[:self.config.piggyback]:
            members.append(u[0])
            u[1] -= 1
        members += [m.hello for m in self._exchange(2)]
        self.updates = [u for u in self.updates if u[1] > 0]
        suspects = []
        if rumours:
            self.suspicions = [s for s in self.suspicions if self._doubted(*s[0])]
            self.suspicions.sort(key=lambda s: -s[1])  # least sent first, as the hellos
            for s in self.suspicions[:self.config.suspicions]:
                suspects.append(s[0])
                s[1] -= 1
            self.suspicions = [s for s in self.suspicions if s[1] > 0]
        out = {"members": members, "suspects": suspects}
        have = self._have()
        if have:
            out["have"] = have
        return out

    @staticmethod
    def _trim(gossip, budget):
        """A piggyback cut to at most `budget` bytes (each item counted with more than its msgpack
        header): the ids we have first (they are what a healed partition pulls through), then
        suspicions (so a member learns it must refute), then hellos."""
        def fits(n):
            nonlocal budget
            if n + 6 > budget:
                return False
            budget -= n + 6
            return True
        have = [rid for rid in gossip.get("have", ()) if fits(len(rid) + 4)]
        out = {"suspects": [s for s in gossip["suspects"] if fits(len(s[0]) + 12)]}
        out["members"] = [h for h in gossip["members"] if fits(len(h))]
        if have:
            out["have"] = have
        return out

    def _exchange(self, k):
        """Peer exchange: k random live members that spoke lately (to us, or in a hello said
        within `news_s`), so that a member cut off stops being named; and one more among those
        that served us (when any did), so that members who forward get introduced to each other."""
        since = self._now - self.config.news_s
        alive = [m for m in self.members.values() if m.state == "alive" and m.last_seen >= since]
        if len(alive) <= k:
            return alive
        picked = self.rng.sample(alive, k)
        served = [m for m in alive if m not in picked and self.ledger.served(m.id, self._now)]
        return picked + ([self.rng.choice(served)] if served else [])

    def _doubted(self, mid, inc):
        """Whether we still hold a suspicion we spread: the member is suspect, or dead, at that
        incarnation (one that answered since would only put us in debt with whoever checks)."""
        m = self.members.get(mid)
        if m is not None:
            return m.state == "suspect" and m.incarnation == inc
        return mid in self.dead and self.dead[mid][0] == inc

    def _absorb(self, msg, acct, now):
        """The hellos and suspicions a membership message carries."""
        out, fresh = [], 0
        blobs = msg.payload["members"]
        for i, blob in enumerate(blobs):
            events = self._learn(blob, acct, now, direct=(i == 0), said_ms=msg.ts)
            out += events
            if acct.banned_until > now:
                return out
            fresh += any(type(e) is Event and e.kind == "member_joined" for e in events)
            if fresh >= self.config.intro_per_message:
                break
        out += self._hear(msg.sender_id, msg.payload.get("suspects", ()), now)
        self._hear_of(msg.payload.get("have", ()), acct, msg.address, now)
        return out

    def _hear(self, teller, suspects, now):
        """Suspicions relayed by `teller`: rumours, checked by our own pings before we believe
        or repeat them. A teller we do not know, or one in debt, is not heard."""
        out = []
        heard = teller in self.members and self.ledger.standing(teller, now) >= 0
        for mid, inc in suspects[:self.config.suspicions]:
            if mid == self.id:
                if inc >= self.incarnation:
                    out += self._refute(inc, now)
                continue
            m = self.members.get(mid)
            if m is None or m.state != "alive" or inc < m.incarnation or mid == teller:
                continue
            if not heard:
                self.rumours["unheard"] += 1
                continue
            out += self._check(m, teller, now)
        return out

    def _check(self, m, teller, now):
        for ch in self.checks.values():
            if ch.target == m.id:  # already being checked: the teller answers for it too
                if ch.tellers is not None and teller not in ch.tellers and len(ch.tellers) < 4:
                    ch.tellers.append(teller)
                return []
        rumours = [ch for ch in self.checks.values() if ch.tellers is not None]
        if (len(rumours) >= self.config.rumour_checks
                or sum(teller in ch.tellers for ch in rumours) >= self.config.checks_per_teller):
            self.rumours["unheard"] += 1
            return []
        self.rumours["heard"] += 1
        seq = self._nonce(m.address)
        self.checks[seq] = Check(m.id, now, [teller])
        # No rumours ride on the check (so checking cannot start a storm of checks) but the one
        # checked, told to the member it is about, so that it refutes it before its tellers' time runs out.
        ping = {"seq": seq, **self._piggyback(True, rumours=False), "suspects": [[m.id, m.incarnation]]}
        return [self._message(m.address, "ping", ping, now)]

    def _suspect(self, m, now):
        m.state, m.suspect_until = "suspect", now + self.config.suspect_timeout_s
        self.suspicions.insert(0, [[m.id, m.incarnation], 3 * math.ceil(math.log2(len(self.members) + 2))])
        self.updates = [u for u in self.updates if u[2] != m.id]  # relay no hello of a member we doubt
        return [Event("member_suspect", {"id": m.id, "address": m.address})]

    def _remove(self, m, kind):
        self._drop(m)
        self.dead[m.id] = (m.incarnation, m.address, m.last_seen)
        while len(self.dead) > self.config.max_dead:
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
        seq = self._nonce(target.address)
        self.checks[seq] = Check(target.id, now)
        return [self._message(target.address, "ping", {"seq": seq, **self._piggyback(True)}, now)]

    def _check_step(self, seq, now):
        """A probe or rumour check past its timeouts: indirect pings, then a verdict."""
        ch, c = self.checks[seq], self.config
        target = self.members.get(ch.target)
        if target is None:
            self._end_check(seq)
            return []
        if not ch.indirect and now >= ch.at + c.ping_timeout_s:
            ch.indirect = True
            skip = {target.id, *(ch.tellers or ())}
            helpers = self._targets(c.indirect_checks, exclude=skip)
            out = []
            for m in helpers:  # a nonce per helper: one that leaked it cannot answer for the target's address
                n = self._nonce(m.address)
                self.via[n] = seq
                ch.via += (n,)
                out.append(self._message(m.address, "ping_req", {"seq": n, "target": target.address}, now))
            return out
        if now < ch.at + c.ping_interval_s * 0.9:
            return []
        self._end_check(seq)
        if target.last_seen > ch.at:  # it said something since: alive
            return self._disproved(ch, now)
        if target.state != "alive":
            return []
        if ch.tellers is not None:
            self.rumours["confirmed"] += 1
        return self._suspect(target, now)

    def _disproved(self, ch, now):
        if ch.tellers is not None:
            self.rumours["disproved"] += 1
            for teller in ch.tellers:
                self.ledger.owe(teller, 1.0, now)
        return []

    def _on_hello(self, msg, acct, now):
        return self._learn(msg.encoded, acct, now, direct=True, said_ms=msg.ts)

    def _end_check(self, seq):
        ch = self.checks.pop(seq)
        for n in ch.via:
            self.via.pop(n, None)
        return ch

    def _on_join(self, msg, acct, now):
        out = self._learn(msg.payload["hello"], acct, now, direct=True, said_ms=msg.ts)
        return out + self._answer(msg, acct, now, self._welcome)

    def _welcome(self, msg, acct, now):
        sample = [m for m in self._exchange(self.config.intro_per_message - 2) if m.id != msg.sender_id]
        hellos = [self.hello] + [m.hello for m in sample]
        return [self._message(msg.address, "welcome", {"members": hellos}, now)]

    def _on_welcome(self, msg, acct, now):
        return self._absorb(msg, acct, now)

    def _on_ping(self, msg, acct, now):
        out = self._absorb(msg, acct, now)
        if not msg.payload["members"]:  # a ping that only asks whether we are there: so little back
            gossip = {"members": [], "suspects": []}
        elif self._verified(msg.sender_id, msg.address, now):
            gossip = self._piggyback(False)
        else:  # an address nobody answered at as this sender: no more bytes back than came
            gossip = self._trim(self._piggyback(False), len(msg.encoded) - self._ack_bytes())
        out.append(self._message(msg.address, "ack", {"seq": msg.payload["seq"], **gossip}, now))
        return out

    def _on_ack(self, msg, acct, now):
        out = self._absorb(msg, acct, now)
        seq = msg.payload["seq"]
        out += self._acked(msg, seq, now)
        if seq in self.relays:
            address, their_seq = self.relays.pop(seq)
            out.append(self._message(address, "ack", {"seq": their_seq, "members": [], "suspects": []}, now))
            return out
        seq = self.via.get(seq, seq)  # a helper's answer to our ping_req stands for the target's
        if seq in self.checks:
            ch = self._end_check(seq)
            target = self.members.get(ch.target)
            if target:
                target.last_seen, target.state = now, "alive"
            out += self._disproved(ch, now)
        return out

    def _on_ping_req(self, msg, acct, now):
        return self._answer(msg, acct, now, self._relay)

    def _relay(self, msg, acct, now):
        """Ping the target for a requester whose address is verified. A target that no member
        answered at gets a ping that carries nothing (the size of the request, within a few bytes)."""
        target = msg.payload["target"]
        seq = self._nonce(target)
        self.relays[seq] = (msg.address, msg.payload["seq"])
        while len(self.relays) > 64:
            self.relays.pop(next(iter(self.relays)))
        mid = self.verified_at.get(target)
        if mid is not None and self._verified(mid, target, now):
            ping = {"seq": seq, **self._piggyback(True, rumours=False)}  # it may be a rumour's check
        else:
            ping = {"seq": seq, "members": [], "suspects": []}
        return [self._message(target, "ping", ping, now)]

    # --- verified addresses ------------------------------------------------------------------------

    def _nonce(self, address):
        """A fresh nonce for a ping (or ping_req) to `address`: a keyed hash of a counter, so that
        no one who did not receive it can answer with it; remembered with its address."""
        self.seq += 1
        digest = hashlib.blake2b(self.seq.to_bytes(8, "big"), key=self.salt, person=b"ping nonce", digest_size=8)
        n = int.from_bytes(digest.digest(), "big") >> 1
        self.pinged[n] = address
        while len(self.pinged) > self.config.max_pinged:
            self.pinged.popitem(last=False)
        return n

    def _acked(self, msg, seq, now):
        """An ack that echoes a nonce we sent to one address: its signer receives there. Requests
        of that member waiting on the address are answered now."""
        address = self.pinged.pop(seq, None)
        if address is None:
            return []
        mid = msg.sender_id
        old = self.verified.pop(mid, None)
        if old is not None and self.verified_at.get(old[0]) == mid:
            del self.verified_at[old[0]]
        self.verified[mid] = (address, now)
        self.verified_at[address] = mid
        while len(self.verified) > self.config.max_verified:
            gone, (a, _) = self.verified.popitem(last=False)
            if self.verified_at.get(a) == gone:
                del self.verified_at[a]
        p = self.verifying.get(address)
        if p is None or not any(w[0] == mid for w in p.waiting):
            return []
        answered = [w for w in p.waiting if w[0] == mid]
        p.waiting = deque(w for w in p.waiting if w[0] != mid)  # other keys that claim the address wait on
        done = sum(len(w[2].encoded) for w in answered)
        p.size, self.waiting_bytes = p.size - done, self.waiting_bytes - done
        self.replies["answered_late"] += len(answered)
        if not p.waiting:
            del self.verifying[address]
        out = []
        for _, answer, request, origin in answered:
            acct = self.ledger.accounts.get(origin)
            if acct is not None and acct.banned_until <= now:
                out += answer(request, acct, now)
        return out

    def _verified(self, mid, address, now):
        v = self.verified.get(mid)
        return v is not None and v[0] == address and now - v[1] < self.config.verified_s

    def _answer(self, msg, acct, now, answer):
        """`answer(msg, acct, now)` now if the sender's address is verified; else once it is: the
        request waits (bounded) while a small ping asks the address."""
        if self._verified(msg.sender_id, msg.address, now):
            self.replies["answered"] += 1
            return answer(msg, acct, now)
        c, address, out = self.config, msg.address, []
        if len(msg.encoded) + self.waiting_bytes > c.max_waiting_bytes:
            self.replies["dropped"] += 1
            return []
        p = self.verifying.get(address)
        if p is None:  # one ping per address, whatever keys claim it
            p = self.verifying[address] = Pending(now + c.verify_timeout_s)
            while len(self.verifying) > c.max_verifying:
                self._unwait(next(iter(self.verifying)), "dropped")
            out.append(self._verify_ping(address, now))
        p.waiting.append((msg.sender_id, answer, msg, acct.origin))
        p.size += len(msg.encoded)
        self.waiting_bytes += len(msg.encoded)
        self.replies["waited"] += 1
        if len(p.waiting) > c.max_waiting:
            old = p.waiting.popleft()[2]
            p.size -= len(old.encoded)
            self.waiting_bytes -= len(old.encoded)
            self.replies["dropped"] += 1
        return out

    def _unwait(self, address, why):
        p = self.verifying.pop(address)
        self.waiting_bytes -= p.size
        self.replies[why] += len(p.waiting)

    def _verify_ping(self, address, now):
        """A ping that carries nothing but its nonce: the size of a small request."""
        payload = {"seq": self._nonce(address), "members": [], "suspects": []}
        return self._message(address, "ping", payload, now, label="verify")

    def _ask_address(self, address, now):
        """A ping that carries nothing, on our own initiative, to the address of a member we may gossip
        to (one new to the view, moved, or drawn while not verified): unless a request's ping asks it
        already, or we asked it within `reask_s` (so an address that many keys claim, or that answers
        none of them, gets one small ping per `reask_s`)."""
        asked = self.asked
        while asked and next(iter(asked.values())) <= now - self.config.reask_s:
            asked.popitem(last=False)
        if address in asked or address in self.verifying:
            return []
        asked[address] = now
        while len(asked) > self.config.max_verified:
            asked.popitem(last=False)
        return [self._verify_ping(address, now)]

    def _ack_bytes(self):
        """The size of an ack of ours that carries nothing (at the largest seq and timestamp)."""
        if self._ack_base is None:
            empty = {"seq": (1 << 64) - 1, "members": [], "suspects": []}
            self._ack_base = len(wire.make_message(self.identity, "ack", empty, (1 << 64) - 1, self.address))
        return self._ack_base

    def _on_leave(self, msg, acct, now):
        m = self.members.get(msg.sender_id)
        if m and msg.payload["incarnation"] >= m.incarnation:
            return [self._remove(m, "member_left")]
        return []

    def _targets(self, k, exclude=()):
        """k random live members in good standing, each drawn with probability `prefer_served`
        among those that served us (when there are any), else among all."""
        return self._draw(self._eligible(exclude), k)

    def _gossip_targets(self, k, exclude=()):
        """(targets, pings): k members to send records, announcements or a digest to, drawn as by
        `_targets` but all at verified addresses, since what we send on our own schedule goes where a
        hello says and a hello may name anyone's address. A member drawn whose address is not verified
        gets a ping that carries nothing instead (`_ask_address`; its ack verifies it, and it is drawn
        like the others from then on), and a verified member takes its place. Nothing is kept for it:
        a record it misses reaches it from other members, by the ids on pings and acks, or by
        anti-entropy."""
        now, pool, targets, pings = self._now, self._eligible(exclude), [], []
        drawn = self._draw(pool, k)
        for m in drawn:
            if self._verified(m.id, m.address, now):
                targets.append(m)
            else:
                pings += self._ask_address(m.address, now)
        if len(targets) == len(drawn):  # all verified, as in a settled view: no stand-ins to look for
            return targets, pings
        drawn = set(drawn)
        rest = [m for m in pool if m not in drawn and self._verified(m.id, m.address, now)]
        return targets + self._draw(rest, k - len(targets)), pings

    def _eligible(self, exclude):
        now, led = self._now, self.ledger
        return [m for m in self.members.values()
                if m.state == "alive" and m.id not in exclude and led.standing(m.id, now) >= 0]

    def _draw(self, pool, k):
        now, led = self._now, self.ledger
        if len(pool) <= k:
            return self.rng.sample(pool, len(pool))
        served = [m for m in pool if led.served(m.id, now)] if self.config.prefer_served > 0 else []
        out = []
        while len(out) < k:
            src = served if served and self.rng.random() < self.config.prefer_served else pool
            m = src[self.rng.randrange(len(src))]
            out.append(m)
            pool.remove(m)
            if m in served:
                served.remove(m)
        return out
