"""Research simulator: N nodes on a synthetic research task, driven by the node's real policies.

What is real: the offline proposer (node.proposer) editing the real baseline train.py; the GPU
node's settings (configs/default.toml: baseline runs, re-runs, keep rule, noise floor, re-measuring
the best, verification share); the keep rule and noise estimate (node.loop.verdict, node.loop.noise);
signed records (gossip.wire); the verification queue's ranking (node.swarm.Ledger.rank), rebuilding
and git's three-way rebase (node.swarm.plan); and swarm memory (node.memory: ideas by normal form,
claims honoured or not, other nodes' results in the proposer's history). What is synthetic: the
objective, a noisy quadratic bowl in the constants the offline proposer edits (in units of its
steps) with pairwise interactions and a per-hardware-tag shift of the optimum; and time: every run
takes RUN_MIN minutes, a record reaches every other node DELAY_S seconds after the run that made it
ends (the gossip simulator's measured time for a record to reach all of 1,000 nodes is ~2 s,
bench/RESULTS.md), nodes start within one run of each other (the first at 0) and never fail. Each
node is a generator that yields the minutes it waits: it learns a run's result when the run ends.
Figures are medians over --seeds task seeds (each seed: another objective and other node seeds).

For N = 1, 2, 5, 10, 20, 50 nodes (a third each on three hardware tags) it prints, with memory
and claims on and off: experiments and simulated hours until the swarm's best (true, noise-free
objective on its own tag) closes TARGET of the gap from the baseline to the optimum, parallel
efficiency against N = 1 (T1 / (N x TN), from the medians), and, up to the target, duplicate runs
(a (parent, child) pair run again on one tag, anywhere in the swarm, as a share of experiments)
wasted verification (verification runs that adopted nothing, as a share of all runs, baselines
and re-runs included) and false keeps (a node's own keeps not truly better than their parent, as a
share of its keeps); then where the swarm's run time went up to the target.

    python bench/swarm_sim.py [--nodes 1,2,5,10,20,50] [--hours 24] [--seeds 10] [--target 0.6] [--memory both|on|off] [--set KEY=VALUE] [--trace N]
"""

import argparse
import functools
import heapq
import math
import os
import random
import statistics
import sys
import time
from collections import Counter, defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gossip import wire  # noqa: E402
from gossip.identity import Identity  # noqa: E402
from node import config, gittree, loop, memory as memories, proposer as proposers, swarm  # noqa: E402

BASELINE = open(os.path.join(ROOT, "model", "train.py")).read()
SETTINGS = config.load(os.path.join(ROOT, "configs", "default.toml"))  # the GPU node's
RUN_MIN = 6.0          # one run: a 5-minute budget and its overhead
DELAY_S = 2.0
NOISE = 0.002          # run-to-run sd of the objective, like a real H100 baseline (4x the noise floor)
TARGET = 0.6           # share of the baseline-to-optimum gap to close
TAGS = [dict(accelerator=a, count=1, backend=b, framework="torch 2.11.0", budget_seconds=300.0, profile="gpu",
             data_fingerprint="f" * 64) for a, b in (("NVIDIA H100", "cuda"), ("NVIDIA A100", "cuda"), ("Apple M2", "mps"))]
TASK = "sim"
KINDS = ("baseline", "remeasure", "experiment", "rerun", "verify", "settle", "idle")


class Objective:
    """A noisy bowl over the tunable constants, in units of the proposer's steps."""

    def __init__(self, seed):
        rng = random.Random(seed)
        self.base = proposers.constants(BASELINE, "cpu")
        self.names = [n for n, c in self.base.items() if c.kind != "pattern" and n not in proposers.MEMORY]
        self.opt = {n: rng.gauss(0, 1.5) for n in self.names}
        self.curv = {n: rng.uniform(0.0005, 0.004) for n in self.names}
        pairs = [(a, b) for i, a in enumerate(self.names) for b in self.names[i + 1:]]
        self.inter = {p: rng.gauss(0, 0.0008) for p in rng.sample(pairs, min(6, len(pairs)))}
        self.shift = [{n: rng.gauss(0, 0.7) for n in self.names} for _ in TAGS]
        self.floor = {t: self._true_min(t) for t in range(len(TAGS))}

    def coords(self, source):
        c = proposers.constants(source, "cpu")
        out = {}
        for n in self.names:
            a, b = self.base[n], c.get(n)
            if b is None:
                out[n] = 0.0
            elif a.kind == "float":
                out[n] = math.log(b.value / a.value) / math.log(1.5)
            elif a.kind == "pow2":
                out[n] = math.log2(b.value / a.value)
            elif a.value > 8:  # a count the proposer steps by a factor (proposer.step)
                out[n] = math.log(b.value / a.value) / math.log(1.5)
            else:
                out[n] = float(b.value - a.value)
        return out

    def value(self, x, tag):
        v = 1.0
        for n in self.names:
            v += self.curv[n] * (x[n] - self.opt[n] - self.shift[tag][n]) ** 2
        for (a, b), k in self.inter.items():
            v += k * (x[a] - self.opt[a]) * (x[b] - self.opt[b])
        return v

    def _true_min(self, tag):
        x = {n: self.opt[n] + self.shift[tag][n] for n in self.names}  # near the optimum; a few descent steps
        for _ in range(200):
            for n in self.names:
                for d in (0.05, -0.05):
                    y = dict(x, **{n: x[n] + d})
                    if self.value(y, tag) < self.value(x, tag):
                        x = y
        return self.value(x, tag)

    @functools.lru_cache(maxsize=1 << 16)
    def true(self, source, tag):
        return self.value(self.coords(source), tag)


class Store:
    """The gossip store's interface, in memory: records become visible at their arrival time."""

    def __init__(self):
        self.rows = []

    def add(self, record):
        self.rows.append(record)

    def since(self, rowid=0):
        return [(i + 1, r) for i, r in enumerate(self.rows[rowid:], start=rowid)]


class Sim:
    def __init__(self, n, seed, use_memory, hours):
        self.rng = random.Random(seed)
        self.obj = Objective(seed)
        self.use_memory, self.end = use_memory, hours * 60
        self.nodes = [SimNode(self, i, i % len(TAGS)) for i in range(n)]
        self.inbox = []          # (arrival minute, seq, node index, record)
        self.seq = 0
        self.now = 0.0
        self.runs = defaultdict(int)   # (tag, parent, child) -> runs started
        self.minutes = Counter()       # kind -> node-minutes, up to the target
        self.duplicates = self.experiments = self.wasted = self.total_runs = 0
        self.keeps = self.false_keeps = 0  # the nodes' own keeps, and those not truly better than their parent
        base = {t: self.obj.true(BASELINE, t) for t in range(len(TAGS))}
        self.goal = {t: base[t] - TARGET * (base[t] - self.obj.floor[t]) for t in range(len(TAGS))}
        self.reached = None      # (minute, experiments, node index)

    def publish(self, author, record):
        author.store.add(record)
        for node in self.nodes:
            if node is not author:
                self.seq += 1
                heapq.heappush(self.inbox, (self.now + DELAY_S / 60, self.seq, node.index, record))

    def deliver(self):
        while self.inbox and self.inbox[0][0] <= self.now:
            _, _, i, record = heapq.heappop(self.inbox)
            self.nodes[i].store.add(record)

    def run(self):
        starts = [self.rng.uniform(0, RUN_MIN) for _ in self.nodes]  # nodes do not start in lockstep
        events = [(t - min(starts), i) for i, t in enumerate(starts)]
        heapq.heapify(events)
        lives = [node.life() for node in self.nodes]
        while events:
            self.now, i = heapq.heappop(events)
            if self.now > self.end:
                break
            self.deliver()
            wait = next(lives[i])  # the node works until it waits: a run, a claim's settling, idling
            for node in self.nodes:
                if node.true_best() <= self.goal[node.tag]:
                    self.reached = (self.now, self.experiments, node.index)
                    return self
            heapq.heappush(events, (self.now + wait, i))
        return self


class SimNode:
    def __init__(self, sim, index, tag):
        self.sim, self.index, self.tag = sim, index, tag
        self.identity = Identity.from_seed(b"sim%d" % index)
        self.hw = dict(TAGS[tag])
        self.store = Store()
        self.ledger = swarm.Ledger(self.store, TASK, self.identity.id)
        self.memory = memories.Memory(self.ledger, self.known)
        self.proposer = proposers.OfflineProposer(seed=index)
        self.sources = {swarm.content_hash(BASELINE): BASELINE}
        self.best = BASELINE
        self.m = defaultdict(list)   # content hash -> measurements
        self.history = []
        self.done = set()            # improvement ids with our verdict
        self.batch_failed = None     # the best when a merged verification last failed
        self.last = None             # what the last run was for
        self.verify_minutes = self.minutes = 0.0
        self.rng = random.Random(sim.rng.random())
        self.timeline = []           # (start minute, kind, what, outcome) for --trace

    def log(self, start, kind, what, outcome):
        base = self.sim.obj.true(BASELINE, self.tag)
        closed = (base - self.true_best()) / (base - self.sim.obj.floor[self.tag])
        self.timeline.append((start, kind, what, outcome, closed))

    def known(self, h):
        return self.sources.get(h)

    def true_best(self):
        return self.sim.obj.true(self.best, self.tag)

    def noise(self):
        return loop.noise(self.m, config.noise_floor(SETTINGS), self.peer_noise())

    def score(self, h):
        return swarm.score(self.m[h], self.noise())

    def sign(self, type_, body):
        return wire.make_record(self.identity, type_, body, self.sim.now * 60_000)

    def wait(self, kind, minutes):
        """Yield `minutes` of this node's time, spent on `kind`."""
        if self.sim.reached is None:
            self.sim.minutes[kind] += minutes
        yield minutes

    def run(self, source, kind):
        """One run: the node learns its result when it ends."""
        self.last = kind
        yield from self.wait(kind, RUN_MIN)
        h = swarm.content_hash(source)
        self.m[h].append(self.sim.obj.true(source, self.tag) + self.rng.gauss(0, NOISE))
        self.sim.total_runs += 1
        self.minutes += RUN_MIN
        if kind == "verify":
            self.verify_minutes += RUN_MIN

    def trial(self, source, kind):
        """The node's keep rule with its re-runs (loop.Node.trial): keep | discard, and the runs."""
        h, best = swarm.content_hash(source), swarm.content_hash(self.best)
        key = (self.tag, best, h)
        self.sim.duplicates += kind == "experiment" and self.sim.runs[key] > 0
        self.sim.runs[key] += 1
        runs, reruns, again = 0, SETTINGS["max_reruns"], False
        while True:
            if again:  # loop.rerun_best: the best has fewer runs than the candidate
                yield from self.run(self.best, "rerun")
            else:
                yield from self.run(source, kind if kind == "verify" or not runs else "rerun")
                runs += 1
            yield from self.ensure_noise()
            v = loop.verdict(self.m[best], self.m[h], self.noise(), SETTINGS["keep_sigmas"], reruns)
            if v != "rerun":
                return v, runs
            reruns -= 1
            again = loop.rerun_best(self.m[best], self.m[h])

    def ensure_noise(self):
        """loop.Node.ensure_noise: before a verdict, re-run the best while the noise rests on fewer
        degrees of freedom (ours and same-tag peers') than baseline_runs baseline runs give."""
        self.ledger.refresh()
        while not (loop.noise_measured(self.m, self.peer_noise(), SETTINGS["baseline_runs"])
                   or len(self.m[swarm.content_hash(self.best)]) >= SETTINGS["baseline_runs"]):
            kind = "baseline" if self.best == BASELINE else "remeasure"
            yield from self.run(self.best, kind)
            self.log(self.sim.now - RUN_MIN, kind, "the best (repeat, noise)", "")

    def peer_noise(self):
        return self.memory.peer_noise(self.hw) if self.sim.use_memory else (0, 0)

    def life(self):
        """The node's loop (loop.Node.run): baselines (one when peers are alive: ensure_noise runs the
        rest if needed), then verify or experiment, the best re-measured every remeasure_every
        experiments."""
        for i in range(SETTINGS["baseline_runs"] if len(self.sim.nodes) == 1 else 1):
            yield from self.run(BASELINE, "baseline")
            self.log(self.sim.now - RUN_MIN, "baseline", "the baseline" + (f" (repeat {i})" if i else ""), "")
        experiments = remeasured = 0
        while True:
            self.ledger.refresh()
            if SETTINGS["remeasure_every"] and experiments - remeasured >= SETTINGS["remeasure_every"]:
                yield from self.run(self.best, "remeasure")
                remeasured = experiments
                self.log(self.sim.now - RUN_MIN, "remeasure", "the best", "")
            if (yield from self.verify()):
                continue
            if (yield from self.experiment()):
                experiments += 1
            elif not (yield from self.verify(alternate=False)):
                yield from self.wait("idle", RUN_MIN)  # nothing untried: wait a run's time for news

    def verify(self, alternate=True):
        """loop.Node.verify_next and _verify: a batch of foreign improvements merged in one run, never
        two verifications in a row (with `alternate`), one at a time after a merged run that failed."""
        if not SETTINGS["verify_share"]:
            return False
        if alternate and SETTINGS["verify_batch"] > 1 and self.last == "verify":
            return False
        share = self.verify_minutes / self.minutes if self.minutes else 0.0
        entries = self.ledger.rank(self.hw, self.noise(), RUN_MIN, self.sim.now * 60, self.done, SETTINGS["keep_sigmas"])
        limit = 1 if self.batch_failed == self.best else SETTINGS["verify_batch"]
        b = swarm.batch(self.ledger, swarm.due(entries, share, SETTINGS["verify_share"]), self.best, self.known, limit,
                        pending={e.record.body["child"] for e in entries})
        self.done.update(r.id for r, _ in b.settled)
        if not b.records:
            return False
        start, old, h = self.sim.now, self.best, swarm.content_hash(b.source)
        parent = swarm.content_hash(old)
        self.sources[h] = b.source
        verdict, runs = yield from self.trial(b.source, "verify")
        if self.sim.use_memory:  # loop.Node._verify: the run is an experiment record too
            self.sim.publish(self, self.sign("experiment", dict(
                task=TASK, lineage=swarm.LINEAGE, parent=parent, child=h, idea=memories.idea_key(old, b.source),
                diff=gittree.diff_texts(old, b.source), hypothesis="verify", status=verdict,
                before=self.score(parent), after=self.score(h), hardware=self.hw, proposer="verify", log_tail="")))
        att = "confirmed" if verdict == "keep" else "refuted"
        if verdict == "keep" or len(b.records) == 1:
            for r in b.records:
                self.done.add(r.id)
                others = [o.id for o in b.records if o is not r]
                self.sim.publish(self, self.sign("attestation", dict(
                    task=TASK, improvement=r.id, verdict=att, before=self.score(parent), after=self.score(h),
                    hardware=self.hw, note="", **({"jointly": others} if others else {}))))
        else:
            self.batch_failed = self.best
        if verdict == "keep":
            self.best = b.source
            self.sim.publish(self, self.improvement(old, b.source, swarm.adopt_proposer(b.records)))
        else:
            self.sim.wasted += runs
        self.log(start, "verify", "; ".join(r.body["description"] for r in b.records), f"{att} ({runs} run(s))")
        return True

    def improvement(self, parent, child, proposer, description="sim"):
        ph, ch = swarm.content_hash(parent), swarm.content_hash(child)
        return self.sign("improvement", dict(task=TASK, lineage=swarm.LINEAGE, parent=ph, child=ch,
                                             diff=gittree.diff_texts(parent, child), before=self.score(ph),
                                             after=self.score(ch), hardware=self.hw, proposer=proposer,
                                             description=description))

    def experiment(self):
        """loop.Node.experiment: propose, claim, let the claim settle (the swarm's records arrive
        meanwhile), choose again when a peer claimed the same idea first, then run."""
        for lost in range(loop.CLAIM_TRIES):
            best, busy, measured, claimed = self.best, frozenset(), {}, {}
            if self.sim.use_memory:
                now = self.sim.now * 60
                measured, claimed = self.memory.measured(self.hw), self.memory.claims(self.hw, now)
                busy = self.memory.busy(self.hw, now)
            theirs = {r.body["child"] for rs in measured.values() for r in rs}

            def taken(source):  # loop.Node.context's: a tree measured here or by a peer on our tag, an idea claimed
                h = swarm.content_hash(source)
                if self.m.get(h) or h in theirs:
                    return True
                key = memories.idea_key(best, source)
                return key in measured or key in claimed
            history = self.history + (self.memory.history(self.hw, self.noise()) if self.sim.use_memory else [])
            p = self.proposer.propose(proposers.Context(best, history, self.noise(), "cpu", [], taken, busy))
            if p is None:
                return False
            ph, ch = swarm.content_hash(best), swarm.content_hash(p.source)
            self.sources[ch] = p.source
            idea = memories.idea_key(best, p.source)
            if not self.sim.use_memory:
                break
            expires = self.sim.now + 2 * RUN_MIN * (1 + SETTINGS["max_reruns"])  # as loop.Node.claim
            claim = self.sign("claim", dict(task=TASK, parent=ph, child=ch, idea=idea, hardware=self.hw,
                                            description=p.description, expires=int(expires * 60_000),
                                            diff=gittree.diff_texts(best, p.source), parent_score=self.score(ph)))
            self.sim.publish(self, claim)
            if lost == loop.CLAIM_TRIES - 1 or len(self.sim.nodes) == 1:  # no peer to race
                break
            yield from self.wait("settle", SETTINGS["claim_settle"] / 60)
            self.ledger.refresh()
            rivals = self.memory.claims(self.hw, self.sim.now * 60).get(idea, ())
            if not any((c.ts, c.author_id) < (claim.ts, claim.author_id) for c in rivals):
                break
        start, parent_bpb = self.sim.now, sum(self.m[ph]) / len(self.m[ph])
        verdict, runs = yield from self.trial(p.source, "experiment")
        self.sim.experiments += 1
        self.history.append(dict(edit=p.edit, status=verdict, val_bpb=self.m[ch][-runs], parent_bpb=parent_bpb,
                                 description=p.description))
        if self.sim.use_memory:
            self.sim.publish(self, self.sign("experiment", dict(
                task=TASK, lineage=swarm.LINEAGE, parent=ph, child=ch, idea=idea, diff=gittree.diff_texts(best, p.source),
                hypothesis=p.description, status=verdict, before=self.score(ph), after=self.score(ch), hardware=self.hw,
                proposer="offline", log_tail="")))
        if verdict == "keep":
            self.sim.keeps += 1
            self.sim.false_keeps += self.sim.obj.true(p.source, self.tag) >= self.sim.obj.true(best, self.tag)
            self.best = p.source
            self.sim.publish(self, self.improvement(best, p.source, "offline", p.description))
        self.log(start, "experiment", p.description, f"{verdict} ({runs} run(s))")
        return True


def trace(n, seed, hours):
    """The runs of the node that reached the target first: the swarm's critical path."""
    sim = Sim(n, seed, True, hours).run()
    if sim.reached is None:
        print(f"N={n}, seed {seed}: the target was not reached in {hours:g} h")
        return
    node = sim.nodes[sim.reached[2]]
    print(f"N={n}, seed {seed}: node {node.index} (tag {node.tag}) reached the target at {sim.reached[0]:.1f} min; "
          f"its runs (gap closed by its best after each):")
    for start, kind, what, outcome, gap in node.timeline:
        print(f"  {start:6.1f} min  {kind:10s} {what[:56]:56s} {outcome:22s} {gap:4.0%}")


def _number(text):
    try:
        return int(text)
    except ValueError:
        return float(text)


def main():
    global TARGET
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1,2,5,10,20,50")
    ap.add_argument("--hours", type=float, default=24)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--target", type=float, default=TARGET, help="share of the gap to the optimum to close")
    ap.add_argument("--memory", choices=("both", "on", "off"), default="both", help="swarm memory and claims")
    ap.add_argument("--trace", type=int, metavar="N", help="print the critical path of one N-node run (seed 0) and exit")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a node setting other than configs/default.toml's (e.g. verify_batch=1)")
    args = ap.parse_args()
    TARGET = args.target
    SETTINGS.update(config.load(os.path.join(ROOT, "configs", "default.toml"),
                                {k: _number(v) for k, v in (kv.split("=", 1) for kv in args.set)}))
    if args.trace:
        trace(args.trace, 0, args.hours)
        return
    ns = [int(x) for x in args.nodes.split(",")]
    print(f"synthetic task: {len(Objective(0).names)} constants, target {TARGET:.0%} of the gap to the optimum, "
          f"runs of {RUN_MIN:g} min, noise sd {NOISE}, records delayed {DELAY_S:g} s; cut off at {args.hours:g} h; "
          f"medians over {args.seeds} seeds" + (f"; settings {', '.join(args.set)}" if args.set else ""))
    print("| nodes | memory + claims | experiments to target | hours to target | parallel efficiency | duplicate runs |"
          " wasted verification | false keeps | wall s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    t1, spent = {}, {}
    med = lambda xs: statistics.median(xs) if xs else None
    for n in ns:
        for use in {"both": (True, False), "on": (True,), "off": (False,)}[args.memory]:
            t = time.perf_counter()
            sims = [Sim(n, seed, use, args.hours).run() for seed in range(args.seeds)]
            inf = float("inf")
            hours = med([s.reached[0] / 60 if s.reached else inf for s in sims])
            exps = med([s.reached[1] if s.reached else inf for s in sims])
            hours, exps = (None, None) if hours == inf else (hours, exps)
            if n == 1:
                t1[use] = hours
            eff = (t1.get(use) / (n * hours)) if hours and t1.get(use) else None
            dup = sum(s.duplicates for s in sims) / max(1, sum(s.experiments for s in sims))
            waste = sum(s.wasted for s in sims) / max(1, sum(s.total_runs for s in sims))
            false = sum(s.false_keeps for s in sims) / max(1, sum(s.keeps for s in sims))
            if use:
                spent[n] = sum((s.minutes for s in sims), Counter())
            fmt = lambda x, f: format(x, f) if x is not None else "not reached"
            print(f"| {n} | {'on' if use else 'off'} | {fmt(exps, '.0f')} | {fmt(hours, '.2f')} | "
                  f"{fmt(eff and 100 * eff, '.0f')}{' %' if eff else ''} | {100 * dup:.1f} % | {100 * waste:.1f} % | {100 * false:.0f} % | "
                  f"{time.perf_counter() - t:.0f} |", flush=True)
    print("\nwhere the run time went up to the target (memory + claims on; share of all nodes' minutes, all seeds):")
    print("| nodes | " + " | ".join(KINDS) + " |")
    print("| ---: |" + " ---: |" * len(KINDS))
    for n, c in spent.items():
        total = sum(c.values()) or 1
        print(f"| {n} | " + " | ".join(f"{100 * c[k] / total:.0f} %" for k in KINDS) + " |")


if __name__ == "__main__":
    main()
