#!/usr/bin/env python3
"""The gossip core in the simulator: dissemination, partition heal, and attacks.

    python bench/gossip_sim.py [--parts abc] [--sizes 10,100,1000,5000] [--seed S] [--quick] [--set KEY=VALUE]

Prints markdown tables on stdout (progress on stderr):

A. Dissemination at 1 % message loss for each N: nodes join through 3 seeds among the nodes
   before them, in batches (N/10, 50 to 200, per 0.5 s), then membership settles for 15 s; records
   are published one at a time from random nodes. Rounds and seconds until 99 % and 100 % of
   live nodes hold a record (median and worst over records), dissemination messages (push,
   ihave, iwant, ids) per node per record, and all traffic per node per second over a quiet
   window. Targets (issue 5): 99 % within 2·log2(N) rounds, 100 % within one anti-entropy period
   after that, messages per node per record <= 2 x fanout.
B. Partition heal: 30 % of the nodes in another group until no view holds a member across the
   cut (all declared dead; checked, at most 60 s), records published on both sides, heal, then
   time until every node holds every record (target: <= 3 anti-entropy periods).
C. The attacks of libp2p gossipsub v1.1's evaluation that apply here (Sybil flash, eclipse of
   one node, censorship by dropping or delaying, cold boot), by hostile subclasses of
   protocol.Node, 100 honest nodes each (--honest); each against the same honest population
   without attack; and the CPU one connection can make a node spend on valid messages.
   `--set checks_per_s=0` (any field of gossip.protocol.Config) runs every node with it changed.

Every node runs the real protocol core (gossip/protocol.py), signatures and all. To save time,
signature checks and the decoding of relayed `hello` blobs are memoized per exact bytes (the
same answer the core would compute; `--no-memo` turns it off: same results, slower).
"""

import argparse
import dataclasses
import hashlib
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gossip import protocol, sim, wire  # noqa: E402
from gossip.identity import Identity  # noqa: E402

CFG = protocol.CONFIG
LATER_S = CFG.check_age_s + 30  # an attack scenario's pause before its later records (checks run for the last 30 s)
LOSS = 0.01
DISSEMINATION = ("push", "ihave", "iwant", "ids")
AIMED = ("push", "ihave", "digest")    # an honest node's choice of gossip target shows in these
T0 = time.time()
UNMEMOIZED = (wire.verify, wire.decode_message)


def log(*args):
    print(f"[{time.time() - T0:7.1f}s]", *args, file=sys.stderr, flush=True)


# --- speed: memoized signature checks ----------------------------------------------------------

def memoize_signatures():
    """Relayed `hello` blobs reach a node again and again and each is decoded and verified anew
    (~80 % of the simulator's time). Memoize both on the exact bytes: same answers, less time."""
    verify, decode = wire.verify, wire.decode_message
    checked, decoded = {}, {}

    def verify_memo(public_key, signature, data):
        key = (bytes(signature), bytes(public_key), hashlib.blake2b(data, digest_size=16).digest())
        ok = checked.get(key)
        if ok is None:
            if len(checked) > 500_000:
                checked.clear()
            ok = checked[key] = verify(public_key, signature, data)
        return ok

    def decode_memo(data, now_ms, limits=wire.LIMITS, fresh=True):
        if fresh or limits is not wire.LIMITS:
            return decode(data, now_ms, limits, fresh)
        msg = decoded.get(data)
        if msg is not None and msg.ts <= now_ms + limits.clock_skew_s * 1000:  # the one time-dependent check
            return msg
        msg = decode(data, now_ms, limits, fresh)
        if len(decoded) > 200_000:
            decoded.clear()
        decoded[bytes(data)] = msg
        return msg

    wire.verify, wire.decode_message = verify_memo, decode_memo


# --- the network, with hostile nodes told apart ------------------------------------------------

class Net(sim.Network):
    def __init__(self, **kw):
        super().__init__(**{"config": CFG, **kw})
        self.hostile = set()     # addresses
        self.order = []          # addresses in the order they joined
        self.aimed = Counter()   # (kind, to a hostile node?) for sends by honest nodes, by their choice (not answers)
        self.honest_sent = 0     # messages sent by honest nodes
        self.publishing = False  # a publisher's own record goes to every member: no choice to count

    def _act(self, address, outputs):
        if address in self.hostile:  # what a hostile node holds does not count as delivered
            outputs = [o for o in outputs if type(o) is not protocol.Deliver]
        else:
            node = self.nodes[address]
            answers, node.answers = getattr(node, "answers", None) or (), None
            for o in outputs:
                if type(o) is protocol.Send:
                    self.honest_sent += 1
                    if o.kind in AIMED and not self.publishing and not any(o is a for a in answers):
                        self.aimed[o.kind, o.address in self.hostile] += 1
        super()._act(address, outputs)

    def publish(self, address, record):
        self.publishing = True
        try:
            super().publish(address, record)
        finally:
            self.publishing = False

    def honest(self):
        return [a for a in self.order if a not in self.hostile and a not in self.down]

    def join(self, cls=None, seeds=None, rng=None):
        """One node joins through `seeds` (default: 3 random nodes that joined before it)."""
        if seeds is None:
            seeds = rng.sample(self.order, min(3, len(self.order)))
        node = self.add(seeds=seeds, cls=cls or Honest)
        self.order.append(node.address)
        if cls:
            self.hostile.add(node.address)
        return node


def populate(net, kinds, rng, batch, lab_seed=False):
    """`kinds[i]` (None for honest, else a Hostile subclass) joins; `batch` joins per 0.5 s. With
    `lab_seed`, every honest node after the first joins through the first honest node and 2 random
    earlier nodes (a lab's own `--seed`), others through 3 random earlier nodes."""
    first = None
    for i, cls in enumerate(kinds):
        seeds = None
        if lab_seed and cls is None and first is not None and len(net.order) > 3:
            seeds = [first] + rng.sample([a for a in net.order if a != first], 2)
        node = net.join(cls, seeds=seeds, rng=rng)
        if cls is None and first is None:
            first = node.address
        if (i + 1) % batch == 0 or i == len(kinds) - 1:
            net.run(0.5)


def batch_for(n):
    return max(50, min(200, n // 10))


class Honest(protocol.Node):
    """The protocol core as is; it only notes which of its sends answer a request (the records an
    `iwant` asked for, the digest and ids a digest asked for, at once or once the asker's address
    is verified): they go to the asker, by no choice of its own, and Net leaves them out of `aimed`."""
    answers = None

    def _serve(self, msg, acct, now):
        out = super()._serve(msg, acct, now)
        self.answers = (self.answers or []) + out
        return out

    def _reconcile(self, msg, acct, now):
        out = super()._reconcile(msg, acct, now)
        self.answers = (self.answers or []) + out
        return out


# --- hostile nodes -----------------------------------------------------------------------------

class Hostile(protocol.Node):
    """Keeps up membership (answers probes, so it stays in honest views) and attacks the rest.
    Subclass per scenario with `hostile_class`, which gives the class its own clan."""
    drop = True          # swallow records: never forward, announce or serve them
    evade = True         # ... but answer anti-entropy digests, with the asker's own digest (nothing to swap)
    delay_s = 0.0        # or: behave, but act on each push this late
    censor = None        # or: behave, but drop the records of this author (public key)
    pollute = False      # peer exchange and welcomes name only fellow hostile members
    slander = False      # piggyback suspicions of honest members
    victim = None        # address to flood with this node's own hello
    hello_rate = 0.0     # hellos per second to the victim
    garbage_rate = 0.0   # forged records (bad signature) per second, pushed to random members
    clan = None          # id -> hello, shared by the class
    clan_hellos = None

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.clan[self.id] = self.hello
        self.clan_hellos.append(self.hello)
        self.late = []   # (due, message, account)
        self.forged = None

    # dissemination
    def _on_push(self, msg, acct, now):
        if self.delay_s:
            self.late.append((now + self.delay_s, msg, acct))
            return []
        if self.censor is None:
            if self.drop:
                return []
            return super()._on_push(msg, acct, now)
        keep = []
        for blob in msg.payload["records"]:
            try:
                record = wire.decode_record(blob, int(now * 1000))
            except wire.WireError:
                continue
            if record.author != self.censor:
                keep.append(blob)
        return super()._on_push(dataclasses.replace(msg, payload={"records": keep}), acct, now) if keep else []

    def _on_ihave(self, msg, acct, now):
        return [] if self.drop and self.censor is None else super()._on_ihave(msg, acct, now)

    def _on_iwant(self, msg, acct, now):
        return [] if self.drop and self.censor is None else super()._on_iwant(msg, acct, now)

    def _on_digest(self, msg, acct, now):
        if not (self.drop and self.censor is None):
            return super()._on_digest(msg, acct, now)
        if self.evade and msg.payload["reply"]:
            return [self._message(msg.address, "digest", {"buckets": msg.payload["buckets"], "reply": False}, now)]
        return []

    def _on_ids(self, msg, acct, now):
        return [] if self.drop and self.censor is None else super()._on_ids(msg, acct, now)

    # membership
    def _piggyback(self, own, rumours=True):
        p = super()._piggyback(own, rumours)
        if self.pollute:
            k = min(len(self.clan_hellos), self.config.piggyback + 2)
            p["members"] = ([self.hello] if own else []) + self.rng.sample(self.clan_hellos, k)
        if self.slander:
            honest = [m for m in self.members.values() if m.id not in self.clan]
            p["suspects"] = [[m.id, m.incarnation] for m in self.rng.sample(honest, min(self.config.piggyback, len(honest)))]
        return p

    def _on_join(self, msg, acct, now):
        if not self.pollute:
            return super()._on_join(msg, acct, now)
        out = self._learn(msg.payload["hello"], acct, now, direct=True)
        blobs = [self.hello] + self.rng.sample(self.clan_hellos, min(len(self.clan_hellos), self.config.intro_per_message - 1))
        return out + [self._message(msg.address, "welcome", {"members": blobs}, now)]

    def tick(self, now):
        out = super().tick(now)
        if self.drop and self.censor is None:  # takes no part in lazy pull or anti-entropy
            out = [o for o in out if not (type(o) is protocol.Send and o.kind in ("ihave", "iwant", "digest"))]
        while self.late and self.late[0][0] <= now:
            _, msg, acct = self.late.pop(0)
            out += protocol.Node._on_push(self, msg, acct, now)
        dt = self.config.tick_s
        if self.victim and self.rng.random() < self.hello_rate * dt:
            out.append(protocol.Send(self.victim, self.hello, "hello"))
        if self.garbage_rate and self.members and self.rng.random() < self.garbage_rate * dt:
            if self.forged is None:  # a record whose signature does not hold
                obj = wire.unpack(wire.make_record(self.identity, "note", {"text": "forged"}, int(now * 1000)).encoded)
                self.forged = wire.canonical({**obj, "sig": bytes(64)})
            m = self.rng.choice(list(self.members.values()))
            out.append(self._message(m.address, "push", {"records": [self.forged]}, now))
        return out


def hostile_class(name, **behaviour):
    return type(name, (Hostile,), {"clan": {}, "clan_hellos": [], **behaviour})


# --- measurements ------------------------------------------------------------------------------

def disseminate(net, src, among, limit_s, tail_s=None):
    """Publish one record at `src`, run until every address in `among` holds it (or `limit_s`),
    then a short tail for the last lazy rounds; times and dissemination messages."""
    node = net.nodes[src]
    record = wire.make_record(node.identity, "note", {"text": f"bench {net.now:.3f} {src}"}, int(net.now * 1000))
    t0, sent0 = net.now, Counter(net.sent)
    among = list(among)
    net.publish(src, record)
    held = net.held.setdefault(record.id, {})
    n = len(among)
    net.run_until(t0 + limit_s, stop=lambda: len(held) >= n and all(a in held for a in among))
    times = sorted(held[a] - t0 for a in among if a in held)
    net.run(tail_s if tail_s is not None else 2 * CFG.round_s + 0.1)
    k99 = math.ceil(0.99 * n)
    return {"id": record.id, "t99": times[k99 - 1] if len(times) >= k99 else None,
            "t100": times[-1] if len(times) == n else None, "held": len(times) / n,
            "msgs": {k: net.sent[k] - sent0[k] for k in DISSEMINATION}}


def at_rest(net, seconds):
    """All traffic per live node per second over a window with no new record."""
    b0, m0, t0 = net.bytes, sum(net.sent.values()), net.now
    net.run(seconds)
    live = len(net.live())
    return (net.bytes - b0) / live / (net.now - t0), (sum(net.sent.values()) - m0) / live / (net.now - t0)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def worst(xs):
    return None if any(x is None for x in xs) or not xs else max(xs)


def fmt(x, digits=2, none="—"):
    return none if x is None else f"{x:.{digits}f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- A. dissemination --------------------------------------------------------------------------

def part_a(n, seed, records):
    rng = random.Random(seed)
    net = Net(seed=seed, loss=LOSS)
    started = time.time()
    populate(net, [None] * n, rng, batch_for(n))
    net.run(15.0)
    views = [len(x.members) for x in net.nodes.values()]
    log(f"A N={n}: built and settled at t={net.now:.1f}s sim in {time.time() - started:.0f}s; "
        f"view min/mean/max {min(views)}/{sum(views) / n:.0f}/{max(views)}")
    bound99 = 2 * math.log2(n) * CFG.round_s
    runs = []
    for i in range(records):
        src = rng.choice(net.order)
        r = disseminate(net, src, net.live(), limit_s=bound99 + 10 * CFG.ae_interval_s)
        runs.append(r)
        log(f"A N={n}: record {i + 1}/{records}: t99 {fmt(r['t99'])}s t100 {fmt(r['t100'])}s "
            f"msgs/node {sum(r['msgs'].values()) / n:.2f} ({time.time() - started:.0f}s)")
    net.run(2.0)
    bps, mps = at_rest(net, 10.0 if n <= 2000 else 5.0)
    log(f"A N={n}: at rest {bps:.0f} B/node/s, {mps:.2f} msgs/node/s ({time.time() - started:.0f}s)")
    msgs = {k: statistics.mean(r["msgs"][k] for r in runs) / n for k in DISSEMINATION}
    return {"n": n, "records": records, "t99": [r["t99"] for r in runs], "t100": [r["t100"] for r in runs],
            "msgs": msgs, "bps": bps, "mps": mps, "view": sum(views) / n, "bound99": bound99,
            "real_s": time.time() - started}


def report_a(results):
    c = CFG
    rows = []
    for r in results:
        n, b99 = r["n"], r["bound99"]
        b100 = b99 + c.ae_interval_s
        t99, t100 = med(r["t99"]), med(r["t100"])
        w99, w100 = worst(r["t99"]), worst(r["t100"])
        total = sum(r["msgs"].values())
        ok = (w99 is not None and w99 <= b99, w100 is not None and w100 <= b100, total <= 2 * c.fanout)
        rows.append([
            n, r["records"], f"{b99 / c.round_s:.1f} ({b99:.2f} s)",
            f"{fmt(t99 and t99 / c.round_s, 1)} / {fmt(w99 and w99 / c.round_s, 1)}",
            f"{fmt(t99)} / {fmt(w99)}", f"{b100:.2f}", f"{fmt(t100)} / {fmt(w100)}",
            f"{total:.2f} ({' + '.join(format(r['msgs'][k], '.2f') for k in DISSEMINATION)})", 2 * c.fanout,
            f"{r['bps']:.0f} ({r['mps']:.2f})",
            " ".join("pass" if x else "FAIL" for x in ok)])
    return table(["N", "records", "99 % bound: rounds (s)", "t99 rounds: median / worst", "t99 s: median / worst",
                  "100 % bound s", "t100 s: median / worst", "msgs/node/record (push + ihave + iwant + ids)",
                  "bound", "at rest: B/node/s (msgs/node/s)", "99 % / 100 % / msgs"], rows)


# --- B. partition heal -------------------------------------------------------------------------

def cross_entries(net):
    """Members of another group still in views (alive or suspect)."""
    g = net.group
    return sum(1 for a, x in net.nodes.items() for m in x.members.values() if g.get(m.address, 0) != g.get(a, 0))


def part_b(n, seed, per_side=3, max_wait_s=60.0):
    rng = random.Random(seed + 1)
    net = Net(seed=seed + 1, loss=LOSS)
    started = time.time()
    populate(net, [None] * n, rng, batch_for(n))
    net.run(15.0)
    side = set(rng.sample(net.order, round(0.3 * n)))
    for a in side:
        net.group[a] = 1
    before = cross_entries(net)
    cut, trail = net.now, {}
    log(f"B N={n}: partitioned at t={cut:.1f}s; {before} cross-group view entries")
    while net.now - cut < max_wait_s:
        net.run(1.0)
        left = cross_entries(net)
        if round(net.now - cut) in (5, 10, 20, 30, 60, 120) or not left:
            trail[round(net.now - cut)] = left / before
            log(f"B N={n}: {left} cross-group entries left after {net.now - cut:.0f}s ({time.time() - started:.0f}s)")
        if not left:
            break
    left, dead_after = cross_entries(net), net.now - cut
    across = {a: net.group.get(a, 0) for a in net.order}
    by_address = {x.id: x.address for x in net.nodes.values()}
    deaths = returns = 0
    for t, a, e in net.events:
        if t >= cut and e.kind in ("member_dead", "member_joined") and across[a] != across.get(by_address.get(e.detail["id"]), -1):
            deaths += e.kind == "member_dead"
            returns += e.kind == "member_joined"
    log(f"B N={n}: {left} cross-group entries left after {dead_after:.0f}s: {deaths} cross-group member_dead and "
        f"{returns} member_joined events ({time.time() - started:.0f}s)")
    ids = []
    for group in (0, 1):
        members = [a for a in net.order if net.group.get(a, 0) == group]
        for _ in range(per_side):
            r = disseminate(net, rng.choice(members), members, limit_s=10.0)
            ids.append(r["id"])
            log(f"B N={n}: record in group {group}: t100 within the group {fmt(r['t100'])}s ({time.time() - started:.0f}s)")
    net.run(1.0)
    heal = net.now
    net.group.clear()

    def all_hold():
        return all(len(net.held.get(i, {})) >= n for i in ids)

    net.run_until(heal + 20 * CFG.ae_interval_s, stop=all_hold)
    lags = [max(net.held[i].values()) - heal if len(net.held[i]) >= n else None for i in ids]
    done = worst(lags)
    log(f"B N={n}: healed; every node holds every record after {fmt(done)}s ({time.time() - started:.0f}s)")
    return {"n": n, "side": len(side), "before": before, "dead_after": dead_after, "left": left, "trail": trail,
            "deaths": deaths, "returns": returns, "records": len(ids), "lags": lags, "done": done,
            "real_s": time.time() - started}


def report_b(r):
    ae = CFG.ae_interval_s
    done, all_dead = r["done"], not r["left"]
    trail = ", ".join(f"{t} s: {x:.0%}" for t, x in sorted(r["trail"].items()))
    return table(["N", "in the 30 % group", "cross-group view entries at the cut", "left in views (after)",
                  "all declared dead?", "cross-group deaths / re-additions", "records (per side)",
                  "every node holds every record after heal", "in anti-entropy periods (target ≤ 3)", "result"],
                 [[r["n"], r["side"], r["before"], f"{r['left']} ({trail})",
                   f"yes, after {r['dead_after']:.0f} s" if all_dead else f"no, {r['left'] / r['before']:.0%} left at {r['dead_after']:.0f} s",
                   f"{r['deaths']} / {r['returns']}", f"{r['records']} ({r['records'] // 2})", f"{fmt(done)} s",
                   fmt(done and done / ae, 2),
                   ("pass" if done is not None and done <= 3 * ae else "FAIL") + ("" if all_dead else
                                                                                  " (but the check of deaths fails)")]])


# --- C. attacks --------------------------------------------------------------------------------

def warm(net, rng, records=3):
    for _ in range(records):
        disseminate(net, rng.choice(net.honest()), net.honest(), limit_s=20.0)


def isolation(net):
    """What honest nodes think of hostile and honest members: standing, service (records they
    delivered first, decaying), bans, and what became of the rumours honest nodes heard."""
    hostile_ids = {net.nodes[a].id for a in net.hostile}
    s, service = {True: [], False: []}, {True: [], False: []}
    excluded, served, bans, rumours = Counter(), Counter(), Counter(), Counter()
    for a in net.honest():
        x = net.nodes[a]
        for m in x.members.values():
            h = m.id in hostile_ids
            st = x.ledger.standing(m.id, net.now)
            s[h].append(st)
            excluded[h] += st < 0
            service[h].append(x.ledger.service(m.id, net.now))
            served[h] += x.ledger.served(m.id, net.now)
        for acct in x.ledger.accounts.values():
            if acct.banned_until > net.now and acct.node:
                bans[acct.node in hostile_ids] += 1
        rumours.update(x.rumours)
    share = len(s[True]) / max(1, len(s[True]) + len(s[False]))
    return {"share": share, "standing": {h: statistics.mean(v) if v else None for h, v in s.items()},
            "excluded": {h: excluded[h] / max(1, len(s[h])) for h in s},
            "service": {h: statistics.mean(v) if v else None for h, v in service.items()},
            "served": {h: served[h] / max(1, len(s[h])) for h in s}, "bans": bans, "rumours": rumours}


def reach(net, src):
    """The honest nodes joined to `src` by honest links (one knows the other; either way): all a
    record can reach while hostile nodes relay no honest member's hello. A node outside learns
    of this set only from someone inside it, who does not know it: an island, that no protocol
    fed by honest relays alone reaches (hostile nodes that probe it may yet join it, rarely)."""
    honest = set(net.honest())
    by_id = {net.nodes[a].id: a for a in honest}
    links = {a: set() for a in honest}
    for a in honest:
        for m in net.nodes[a].members:
            if m in by_id:
                links[a].add(by_id[m])
                links[by_id[m]].add(a)
    seen, todo = {src}, [src]
    while todo:
        for b in links[todo.pop()] - seen:
            seen.add(b)
            todo.append(b)
    return seen


def islands(net):
    """Sizes of the honest components, largest first."""
    left, sizes = set(net.honest()), []
    while left:
        c = reach(net, next(iter(left)))
        sizes.append(len(c))
        left -= c
    return sorted(sizes, reverse=True)


def false_deaths(net, since):
    """member_dead events at honest nodes about honest members that were up."""
    honest_ids = {net.nodes[a].id for a in net.honest()}
    return sum(1 for t, a, e in net.events
               if t >= since and e.kind == "member_dead" and a not in net.hostile and e.detail["id"] in honest_ids)


def attack_records(net, rng, records, sources=None, limit_s=60.0, reachable=False):
    """`records` records from honest sources; with `reachable`, each measured among the honest
    nodes its publisher can reach at publish time (its honest component), not all honest nodes."""
    runs = []
    for i in range(records):
        src = sources[i % len(sources)] if sources else rng.choice(net.honest())
        among = reach(net, src) if reachable else net.honest()
        r = disseminate(net, src, among, limit_s=limit_s)
        if reachable:
            r["reach"] = (len(among), len(net.honest()))
            r["outside"] = sum(a in net.held[r["id"]] for a in net.honest() if a not in among)
            r["islands"] = islands(net)
        runs.append(r)
    return runs


def scenario(name, seed, honest, records, hostile=0, cls=None, how="flash", settle=15.0, victim=False, censor=False,
             attack_s=15.0, limit_s=60.0, lab_seed=False, later_records=None):
    """`honest` honest nodes and `hostile` nodes of `cls` (a list: cycled): with `how` = "flash" the
    hostile ones join at once into a settled network (after 3 warm-up records) and attack for
    `attack_s` first; "mixed": they are there from the start; "cold": they boot with the honest
    ones and records follow `settle` seconds after the last join (`lab_seed`: honest nodes share
    one honest seed, see `populate`). Then `records` records, and `later_records` (default `records`) more
    once the first are LATER_S old."""
    rng = random.Random(seed)
    net = Net(seed=seed, loss=LOSS)
    started = time.time()
    classes = cls if isinstance(cls, list) else [cls]
    kinds = [None] * honest + [classes[i % len(classes)] for i in range(hostile if how != "flash" else 0)]
    if how != "flash":
        rng.shuffle(kinds)
    populate(net, kinds, rng, batch_for(len(kinds)), lab_seed)
    net.run(settle)
    since = net.now
    if how != "cold":
        warm(net, rng)
    notes = {}
    target = net.order[rng.randrange(honest)] if victim else None
    if how == "flash":
        if target:
            for c in classes:
                c.victim = target
            notes["victim's view before the attack"] = len(net.nodes[target].members)
        for i in range(hostile):
            net.join(classes[i % len(classes)], seeds=[target] if target else None, rng=rng)
        net.run(attack_s)
    net.aimed.clear()
    sources = None
    if censor:
        target = rng.choice(net.honest())
        for c in classes:
            c.censor = net.nodes[target].identity.public_key
        sources = [target]
    runs = attack_records(net, rng, records, sources, limit_s, reachable=how == "cold")
    if how == "cold":
        notes["honest nodes its publisher could reach (its honest component), for each record"] = ", ".join(
            f"{r['reach'][0]} of {r['reach'][1]}" for r in runs)
        notes["sizes of the honest components (islands) at each record's limit"] = "; ".join(
            " ".join(map(str, r["islands"])) for r in runs)
        notes["honest nodes outside the publisher's component that got the record"] = ", ".join(
            str(r["outside"]) for r in runs)
    t0, sent0 = net.now, net.honest_sent
    net.run(5.0)
    traffic = (net.honest_sent - sent0) / len(net.honest()) / (net.now - t0)
    extra = []
    if victim:
        v = net.nodes[target]
        ids = {net.nodes[a].id for a in net.hostile}
        notes["victim's view after: hostile / all"] = f"{sum(m.id in ids for m in v.members.values())} / {len(v.members)}"
        notes["victim's mean standing of hostile / honest members"] = " / ".join(
            fmt(statistics.mean([v.ledger.standing(m.id, net.now) for m in v.members.values() if (m.id in ids) == h] or [0]))
            for h in (True, False))
        delays = [net.held[r["id"]][target] - min(net.held[r["id"]].values()) if target in net.held[r["id"]] else None
                  for r in runs]
        notes["victim: seconds until it held each record others published"] = ", ".join(fmt(d) for d in delays)
        extra = attack_records(net, rng, records, [target], limit_s)  # the victim publishes
    net.run(LATER_S)  # the records are old enough now for possession checks
    later = attack_records(net, rng, records if later_records is None else later_records, sources, limit_s, reachable=how == "cold")
    iso = isolation(net)
    aimed = {k: net.aimed[k, True] / max(1, net.aimed[k, True] + net.aimed[k, False]) for k in AIMED}
    fd = false_deaths(net, since)
    log(f"C {name}: honest {honest} hostile {hostile}: t99 {fmt(med([r['t99'] for r in runs]))} "
        f"t100 {fmt(med([r['t100'] for r in runs]))} held {min(r['held'] for r in runs):.3f} "
        f"hostile share of views {iso['share']:.2f}, of push targets {aimed['push']:.2f}, "
        f"honest msgs/node/s {traffic:.1f} ({time.time() - started:.0f}s)")
    return {"name": name, "honest": honest, "hostile": hostile, "runs": runs, "extra": extra, "later": later, "iso": iso,
            "aimed": aimed, "false_deaths": fd, "traffic": traffic, "notes": notes, "limit": limit_s,
            "real_s": time.time() - started}


def flood_cpu(seed):
    """Real CPU one node spends on one valid `ping` whose piggyback is stuffed with relayed hellos
    of members it already knows, each in new bytes (re-signed), against an ordinary ping: the
    most the wire lets through, and 4096 (the array limit) built past make_message's check; and
    pings relaying hellos of keys it has never seen (new in every ping), each a signature check."""
    rng = random.Random(seed)
    ids = [Identity.from_seed(f"flood {seed} {i}".encode()) for i in range(201)]
    node = protocol.Node(ids[0], "v", rng=rng, now=0.0)

    def hello(k, ts):
        return wire.make_message(ids[k + 1], "hello", {"address": f"m{k}", "incarnation": 0, "meta": {}}, ts, f"m{k}")

    def raw(identity, kind, payload, ts, address):  # make_message without its schema check
        head = [wire.VERSION, kind, identity.public_key, address, ts, payload]
        return wire.canonical([*head, identity.sign(wire.canonical(head))])

    for k in range(199):
        node.receive(f"m{k}", hello(k, 0), 0.01)
    attacker = ids[200]
    most = getattr(wire, "MAX_RELAYED", wire.LIMITS.array_len)
    cases = [("ordinary ping (7 hellos)", [hello(199, 0)] + [node.members[ids[k + 1].id].hello for k in range(6)]),
             (f"ping with {most} relayed hellos, new bytes", [hello(199, 0)] + [hello(k % 199, 1 + k) for k in range(most - 1)])]
    if most < wire.LIMITS.array_len:
        cases.append((f"ping with {wire.LIMITS.array_len} relayed hellos, new bytes",
                      [hello(199, 0)] + [hello(k % 199, 1 + k) for k in range(wire.LIMITS.array_len - 1)]))

    def strangers(i):  # hellos of keys never seen before, new ones in every ping
        keys = [Identity.from_seed(f"stranger {seed} {i} {j}".encode()) for j in range(most - 1)]
        return [hello(199, 0)] + [wire.make_message(k, "hello", {"address": f"s{i}.{j}", "incarnation": 0, "meta": {}},
                                                    0, f"s{i}.{j}") for j, k in enumerate(keys)]
    cases.append((f"ping with {most} relayed hellos of new keys (each ping its own)", strangers))
    out = {}
    memo = wire.verify, wire.decode_message
    wire.verify, wire.decode_message = UNMEMOIZED
    rate, t = node.config.rate_per_s, 1.0
    try:
        for name, members in cases:  # one second of them at the connection's sustained rate limit
            before = Counter(node.rejected())
            msgs = [raw(attacker, "ping", {"seq": i, "members": members(i) if callable(members) else members,
                                           "suspects": []}, int(t * 1000) + i, "m199") for i in range(int(rate))]
            c0 = time.process_time()
            for i, data in enumerate(msgs):
                node.receive("m199", data, t + i / rate)
            cpu = time.process_time() - c0
            t += 2.0
            out[name] = (len(msgs[0]), cpu / len(msgs), cpu, ", ".join(f"{k} {v}" for k, v in
                                                                       (Counter(node.rejected()) - before).items()) or "taken")
            node.ledger.accounts.clear()  # a fresh connection for the next case
            node.ledger.by_member.clear()
    finally:
        wire.verify, wire.decode_message = memo
    return out, node.config.rate_per_s


def part_c(h, k, seed, limit_s=60.0, only=None, later_records=None):
    """The two runs without attack, and each attack scenario whose name contains one of `only` (all if None)."""
    log(f"C: honest population {h}, {k} records per scenario")
    base = scenario("no attack", seed, h, k, limit_s=limit_s, later_records=later_records)
    cold_base = scenario("no attack, cold (5 s after boot)", seed, h, k, how="cold", settle=5.0, limit_s=limit_s,
                         later_records=later_records)
    sybil = dict(drop=True, pollute=True, slander=True)
    cls = hostile_class("Sybil", **sybil)
    forger = type("Forger", (cls,), {"garbage_rate": 0.5})  # same clan
    scenarios = [
        ("sybil flash", dict(hostile=h, cls=[forger, cls, cls, cls])),
        ("eclipse of one node", dict(hostile=(2 * h) // 3, victim=True, cls=hostile_class("Eclipser", hello_rate=2.0, **sybil))),
        ("censor (drop, skip anti-entropy)", dict(hostile=h // 2, cls=hostile_class("Skipper", evade=False), how="mixed")),
        ("censor (drop)", dict(hostile=h // 2, cls=hostile_class("Dropper"), how="mixed")),
        ("censor (delay 3 s)", dict(hostile=h // 2, cls=hostile_class("Delayer", drop=False, delay_s=3.0), how="mixed")),
        ("censor (one publisher)", dict(hostile=h // 2, cls=hostile_class("Censor", drop=False), how="mixed", censor=True)),
        ("cold boot (hostile 2:1)", dict(hostile=2 * h, cls=hostile_class("Cold", drop=True, pollute=True), how="cold",
                                         settle=5.0)),
        ("cold boot, one honest seed (hostile 2:1)", dict(hostile=2 * h, cls=hostile_class("ColdSeeded", drop=True, pollute=True),
                                                          how="cold", settle=5.0, lab_seed=True)),
    ]
    results = [scenario(name, seed, h, k, limit_s=limit_s, later_records=later_records, **kw) for name, kw in scenarios
               if only is None or any(o in name for o in only)]
    return base, cold_base, results


def report_c(base, cold_base, results):
    def got(runs, limit):
        if all(x["t100"] is not None for x in runs) and "reach" in runs[0]:
            reach = Counter(f"{r['reach'][0]}/{r['reach'][1]}" for r in runs)
            return (f"every one its publisher could reach: yes ({', '.join(k if n == 1 else f'{k} x{n}' for k, n in reach.items())} "
                    "of honest; the rest in islands that no honest node knows)")
        if "reach" in runs[0]:
            return (f"no: {min(x['held'] for x in runs):.0%} of those its publisher could reach at {limit:.0f} s "
                    "(worst record)")
        if all(x["t100"] is not None for x in runs):
            return "yes"
        return f"no: {min(x['held'] for x in runs):.0%} of honest at {limit:.0f} s (worst record)"

    def times(runs, key):
        return f"{fmt(med([x[key] for x in runs]))} / {fmt(worst([x[key] for x in runs]))}"

    rows = []
    for r in [base, cold_base] + results:
        ref = cold_base if r["name"].startswith("cold") else base
        rows.append([r["name"], r["honest"], r["hostile"], len(r["runs"]), got(r["runs"], r["limit"]),
                     times(r["runs"], "t99"), times(r["runs"], "t100"),
                     "—" if r is ref else f"{fmt(med([x['t99'] for x in ref['runs']]))} / "
                                          f"{fmt(med([x['t100'] for x in ref['runs']]))}", f"{r['traffic']:.1f}"])
        rows.append([f"{r['name']}: {LATER_S:.0f} s later", r["honest"], r["hostile"], len(r["later"]),
                     got(r["later"], r["limit"]), times(r["later"], "t99"), times(r["later"], "t100"),
                     "—" if r is ref else f"{fmt(med([x['t99'] for x in ref['later']]))} / "
                                          f"{fmt(med([x['t100'] for x in ref['later']]))}", ""])
        if r["extra"]:
            rows.append([r["name"] + ": the victim publishes", r["honest"], r["hostile"], len(r["extra"]),
                         got(r["extra"], r["limit"]), times(r["extra"], "t99"), times(r["extra"], "t100"),
                         f"{fmt(med([x['t99'] for x in base['runs']]))} / {fmt(med([x['t100'] for x in base['runs']]))}",
                         ""])
    delivery = table(["scenario", "honest", "hostile", "records", "every honest node got every record",
                      "t99 s: median / worst", "t100 s: median / worst", "no attack: t99 / t100 s",
                      "honest msgs/node/s, no new record"], rows)
    rows = []
    for r in [base] + results:
        i, a = r["iso"], r["aimed"]
        rows.append([r["name"], f"{i['share']:.2f}", f"{a['push']:.2f} / {a['ihave']:.2f} / {a['digest']:.2f}",
                     f"{fmt(i['standing'][True])} / {fmt(i['standing'][False])}",
                     f"{i['excluded'][True]:.2f} / {i['excluded'][False]:.2f}",
                     f"{fmt(i['service'][True])} / {fmt(i['service'][False])}",
                     f"{i['served'][True]:.2f} / {i['served'][False]:.2f}",
                     f"{i['bans'][True]} / {i['bans'][False]}", r["false_deaths"],
                     " / ".join(str(i["rumours"][k]) for k in ("heard", "confirmed", "disproved", "unheard"))])
    scores = table(["scenario", "hostile share of honest views",
                    "hostile share of honest gossip targets: push / ihave / digest",
                    "mean standing: hostile / honest members", "standing < 0 (not chosen): hostile / honest",
                    "mean service: hostile / honest", "served (preferred): hostile / honest",
                    "bans in force: of hostile / of honest", "honest members declared dead",
                    "rumours honest nodes checked / confirmed / disproved / did not hear"], rows)
    notes = [f"- {r['name']}: {k}: {v}" for r in results for k, v in r["notes"].items()]
    return delivery, scores, "\n".join(notes)


ATTACKS_DOC = """\
Attack classes, after the gossipsub v1.1 evaluation (Vyzovitis et al., PL-TechRep-2020-001, and
its test plans, libp2p/gossipsub-hardening): there, Sybils are peers run by one attacker that
connect to honest peers and then drop every message (or some, or those of one publisher) instead
of forwarding them; the report runs them against a single target (eclipse), a network booted
with them already inside (cold boot), in a flash of connections, and as censors of one publisher.
Here gossipsub's mesh does not exist (pushes go to random members), so the hostile nodes below
keep membership honest enough to stay in views (they answer probes) and attack the rest:
- sybil flash: hostile nodes equal in number to the honest join within 0.5 s through random honest
  seeds, then drop every record (no forward, ihave or iwant reply; they answer an anti-entropy digest
  with the asker's own, so nothing is swapped and nothing is owed), tell peers only of fellow hostile
  members, piggyback suspicions of honest members, and a quarter push forged records.
- eclipse: hostile nodes join through one honest victim, flood it with their hellos (2/s each: a
  direct hello may evict a member that never delivered a record from a full view), tell it only of
  each other, slander its honest members, and drop records.
- censor (drop, skip anti-entropy): a third of all nodes, present from the start, silently drop every
  record and leave digests unanswered.
- censor (drop): the same, but they answer digests as the sybils do.
- censor (delay): the same nodes forward every record, but 3 s late.
- censor (one publisher): the same nodes behave, except that they drop every record of one author.
- cold boot: hostile nodes outnumber honest ones 2:1 and boot with them, mixed; records from 5 s after
  the last join (no record yet, so no standing earned); they drop records and tell only of each other
  (no slander here: it makes the simulation too slow at this size; the two rows above have it).
  Each node joins through 3 random nodes before it, so about (2/3)^3 of the honest ones join through
  hostile nodes alone; since hostile nodes relay no honest member's hello, the honest nodes split
  into components (who knows whom, either way) that only honest links could join. A record is
  measured among the honest nodes of its publisher's component at publish time: no protocol fed
  by honest relays reaches the others (the notes give the islands' sizes).
- cold boot, one honest seed: the same, but each honest node joins through one honest node (a lab's
  own `--seed`, or its LAN by mDNS) and 2 random earlier nodes: one honest component.
Standing is the core's per-member score (the worst score of its connections, which bad input and
broken promises lower: a record it did not serve when a spot or possession check asked for it; less
its debt: unanswered digests, disproved rumours); the core does not choose members below 0 as gossip targets. Service is
the records a member delivered first (decaying by half in 10 min); "served" members (service >= 0.5)
are drawn for half of every choice of gossip target. Target shares count the honest nodes' own
choices (pushes of records they forward, ihave, digest), not the publisher's flood of its own record.
"No attack" is the same honest population without hostile nodes. Each scenario then waits {later:.0f} s
(possession checks need records {age:.0f} s old) and publishes as many records again ("... later"
rows); the scores are taken after those."""


# --- main --------------------------------------------------------------------------------------

def git_state():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "gossip"], capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
        return head + (" with uncommitted changes in gossip/" if dirty else "")
    except OSError:
        return "unknown"


def _setting(kv):
    """("key", value) of a --set KEY=VALUE, the value of the field's type."""
    key, sep, raw = kv.partition("=")
    if not sep or key not in {f.name for f in dataclasses.fields(protocol.Config)}:
        raise ValueError(f"{kv!r} is not KEY=VALUE with KEY a field of gossip.protocol.Config")
    kind = type(getattr(protocol.CONFIG, key))
    if kind is bool:
        if raw not in ("true", "false"):
            raise ValueError(f"{key} takes true or false, not {raw!r}")
        return key, raw == "true"
    return key, kind(raw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=None, help="comma-separated N for part A (default 10,100,1000,5000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    ap.add_argument("--records", type=int, default=5, help="records per size in part A (at most 3 at N > 2000)")
    ap.add_argument("--parts", default="abc", help="which parts to run (a, b, c)")
    ap.add_argument("--honest", type=int, default=None, help="honest nodes in each attack scenario (default 100)")
    ap.add_argument("--scenarios", default=None,
                    help="part C: comma-separated parts of attack scenario names to run, e.g. sybil,cold (default all)")
    ap.add_argument("--later", type=int, default=3,
                    help="part C: records published once the first three are check_age_s + 30 s (90 s) old (default 3)")
    ap.add_argument("--no-memo", action="store_true", help="verify every signature (3x slower, same results)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of gossip.protocol.Config for every node, e.g. checks_per_s=0")
    args = ap.parse_args()
    global CFG, LATER_S
    try:
        CFG = dataclasses.replace(CFG, **dict(_setting(kv) for kv in args.set))
    except (ValueError, TypeError) as e:
        ap.error(f"--set: {e}")
    LATER_S = CFG.check_age_s + 30
    sizes = [int(s) for s in (args.sizes or ("10,100" if args.quick else "10,100,1000,5000")).split(",")]
    if not args.no_memo:
        memoize_signatures()
    c = CFG
    print(f"# Gossip simulation\n\nCore {git_state()}; fanout {c.fanout}, lazy fanout {c.lazy_fanout}, round "
          f"{c.round_s} s, anti-entropy every {c.ae_interval_s} s, probe every {c.ping_interval_s} s, suspicion "
          f"{c.suspect_timeout_s} s, view ≤ {c.max_view}; {LOSS:.0%} message loss, latency 5–50 ms; seed {args.seed}"
          f"{'; set ' + ', '.join(args.set) if args.set else ''}.\n",
          flush=True)

    if "a" in args.parts:
        results = []
        for n in sizes:
            records = min(args.records, 3) if n > 2000 else args.records
            results.append(part_a(n, args.seed, records))
        print("## A. Dissemination\n")
        print(report_a(results))
        print("\nt99/t100: time from publish until 99 % / every live node holds the record; rounds = time / "
              f"{c.round_s} s. Bounds: 2·log2(N) rounds; that plus one anti-entropy period ({c.ae_interval_s} s); "
              f"2 × fanout. Messages counted from publish until every node holds it plus 0.3 s. At rest: all traffic "
              "(membership, anti-entropy) over 10 s (5 s at N > 2000) without new records.\n", flush=True)

    if "b" in args.parts:
        r = part_b(100 if args.quick else 1000, args.seed, max_wait_s=30.0 if args.quick else 60.0)
        print("## B. Partition heal\n")
        print(report_b(r))
        print(f"\nHeal time per record (s): {', '.join(fmt(x) for x in r['lags'])}.\n", flush=True)

    if "c" in args.parts:
        only = args.scenarios.split(",") if args.scenarios else None
        base, cold_base, results = part_c(args.honest or (20 if args.quick else 100), 3, args.seed + 2,
                                          20.0 if args.quick else 60.0, only, args.later)
        flood, rate = flood_cpu(args.seed)
        delivery, scores, notes = report_c(base, cold_base, results)
        print("## C. Attacks\n")
        print(ATTACKS_DOC.format(later=LATER_S, age=CFG.check_age_s) + "\n")
        print(delivery + "\n")
        print(scores + "\n")
        if notes:
            print(notes + "\n")
        print("CPU one node spends on valid pings from one connection whose piggyback relays hellos of members it "
              "knows, re-signed so the bytes are new, or of keys it has never seen (no memo):\n")
        print(table(["message", "bytes", f"CPU s for {rate:.0f} of them in 1 s (the per-connection rate limit)",
                     "CPU ms each", "rejected"],
                    [[k, b, f"{total:.2f}", f"{each * 1000:.2f}", how] for k, (b, each, total, how) in flood.items()])
              + "\n", flush=True)
    log("done")


if __name__ == "__main__":
    main()
