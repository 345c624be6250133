"""Research simulator: N nodes on a synthetic research task, driven by the node's real policies.

What is real: the offline proposer (node.proposer) editing the real baseline train.py, the keep
rule and noise estimate (node.loop.verdict, node.loop.noise), signed records (gossip.wire), the
verification queue's ranking (node.swarm.Ledger.rank), rebuilding and git's three-way rebase
(node.swarm.plan), and swarm memory (node.memory: ideas by normal form, claims honoured or not,
other nodes' results in the proposer's history). What is synthetic: the objective, a noisy
quadratic bowl in the constants the offline proposer edits (in units of its steps) with pairwise
interactions and a per-hardware-tag shift of the optimum; time, simulated: every run takes
RUN_MIN minutes, records reach every other node DELAY_S seconds after they are published (the
gossip simulator's measured time for a record to reach all of 1,000 nodes is ~2 s,
bench/RESULTS.md), nodes start within one run of each other and never fail. Figures are medians
over --seeds task seeds (each seed: another objective and other node seeds).

For N = 1, 2, 5, 10, 20, 50 nodes (a third each on three hardware tags) it prints, with memory
and claims on and off: experiments and simulated hours until the swarm's best (true, noise-free
objective on its own tag) closes TARGET of the gap from the baseline to the optimum, parallel
efficiency against N = 1 (T1 / (N x TN)), and, up to the target, duplicate runs (a (parent, child) pair run again on one
tag, anywhere in the swarm, as a share of experiments) and wasted verification (verification
runs that adopted nothing, as a share of all runs, baselines and re-runs included).

    python bench/swarm_sim.py [--nodes 1,2,5,10,20,50] [--hours 24] [--seeds 3]
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
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gossip import wire  # noqa: E402
from gossip.identity import Identity  # noqa: E402
from node import loop, memory as memories, proposer as proposers, swarm  # noqa: E402

BASELINE = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model", "train.py")).read()
RUN_MIN = 6.0          # one run: a 5-minute budget and its overhead
DELAY_S = 2.0
NOISE = 0.002          # run-to-run sd of the objective, like a real H100 baseline
TARGET = 0.6           # share of the baseline-to-optimum gap to close
TAGS = [dict(accelerator=a, count=1, backend=b, framework="torch 2.11.0", budget_seconds=300.0, profile="gpu",
             data_fingerprint="f" * 64) for a, b in (("NVIDIA H100", "cuda"), ("NVIDIA A100", "cuda"), ("Apple M2", "mps"))]
TASK = "sim"


class Objective:
    """A noisy bowl over the tunable constants, in units of the proposer's steps."""

    def __init__(self, seed):
        rng = random.Random(seed)
        self.base = proposers.constants(BASELINE, "cpu")
        self.names = [n for n, c in self.base.items() if c.kind != "pattern"]
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
        self.runs = defaultdict(int)   # (tag, parent, child) -> runs
        self.duplicates = self.experiments = self.verify_runs = self.wasted = self.total_runs = 0
        base = {t: self.obj.true(BASELINE, t) for t in range(len(TAGS))}
        self.goal = {t: base[t] - TARGET * (base[t] - self.obj.floor[t]) for t in range(len(TAGS))}
        self.reached = None

    def publish(self, author, record, now):
        author.store.add(record)
        for node in self.nodes:
            if node is not author:
                self.seq += 1
                heapq.heappush(self.inbox, (now + DELAY_S / 60, self.seq, node.index, record))

    def deliver(self, now):
        while self.inbox and self.inbox[0][0] <= now:
            _, _, i, record = heapq.heappop(self.inbox)
            self.nodes[i].store.add(record)

    def run(self):
        free = [(self.rng.uniform(0, RUN_MIN), i) for i in range(len(self.nodes))]  # nodes do not start in lockstep
        heapq.heapify(free)
        while free:
            now, i = heapq.heappop(free)
            if now > self.end:
                break
            self.deliver(now)
            took = self.nodes[i].step(now)
            if self.reached is None and any(n.true_best() <= self.goal[n.tag] for n in self.nodes):
                self.reached = (now + took, self.experiments)
                break  # the figures are up to the target
            if took is not None:
                heapq.heappush(free, (now + took, i))
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
        self.verify_minutes = self.minutes = 0.0
        self.rng = random.Random(sim.rng.random())

    def known(self, h):
        return self.sources.get(h)

    def true_best(self):
        return self.sim.obj.true(self.best, self.tag)

    def measure(self, source, now):
        h = swarm.content_hash(source)
        v = self.sim.obj.true(source, self.tag) + self.rng.gauss(0, NOISE)
        self.sim.total_runs += 1
        self.m[h].append(v)
        self.minutes += RUN_MIN
        return v

    def noise(self):
        return loop.noise(self.m, NOISE / 4)

    def trial(self, source, now, experiment=True):
        """The node's keep rule with its re-runs: (verdict, runs). An experiment whose (parent,
        child) already ran on this tag anywhere in the swarm counts as a duplicate."""
        h, best = swarm.content_hash(source), swarm.content_hash(self.best)
        key = (self.tag, best, h)
        self.sim.duplicates += experiment and self.sim.runs[key] > 0
        self.sim.runs[key] += 1
        runs, reruns = 0, 1
        while True:
            self.measure(source, now)
            runs += 1
            v = loop.verdict(self.m[best], self.m[h], self.noise(), 2.0, reruns)
            if v != "rerun":
                return v, runs
            reruns -= 1

    def sign(self, type_, body, now):
        return wire.make_record(self.identity, type_, body, now * 60_000)

    def score(self, h):
        return swarm.score(self.m[h], self.noise())

    def step(self, now):
        """The node's next piece of work at `now`; returns the minutes it took."""
        self.ledger.refresh()
        if len(self.m[swarm.content_hash(BASELINE)]) < 2:
            self.measure(BASELINE, now)
            return RUN_MIN
        ran = self.verify(now)
        return ran if ran else self.experiment(now)

    def verify(self, now):
        share = self.verify_minutes / self.minutes if self.minutes else 0.0
        for e in self.ledger.rank(self.hw, self.noise(), RUN_MIN, now * 60, self.done):
            if share >= (0.75 if e.strong else 0.3):
                return None
            plan = swarm.plan(self.ledger, e.record, self.best, self.known)
            if plan.action != "wait":
                self.done.add(e.record.id)
            if plan.action != "run":
                continue
            parent = swarm.content_hash(self.best)
            verdict, runs = self.trial(plan.source, now, experiment=False)
            self.sim.verify_runs += runs
            self.verify_minutes += runs * RUN_MIN
            h = swarm.content_hash(plan.source)
            self.sources[h] = plan.source
            att = "confirmed" if verdict == "keep" else "refuted"
            self.sim.publish(self, self.sign("attestation", dict(task=TASK, improvement=e.record.id, verdict=att,
                                                                 before=self.score(parent), after=self.score(h),
                                                                 hardware=self.hw, note=""), now), now)
            if verdict == "keep":
                old = self.best
                self.best = plan.source
                self.sim.publish(self, self.improvement(old, plan.source, swarm.ADOPT + e.record.id.hex(), now), now)
            else:
                self.sim.wasted += runs
            return runs * RUN_MIN
        return None

    def improvement(self, parent, child, proposer, now):
        from node import gittree
        ph, ch = swarm.content_hash(parent), swarm.content_hash(child)
        return self.sign("improvement", dict(task=TASK, lineage=swarm.LINEAGE, parent=ph, child=ch,
                                             diff=gittree.diff_texts(parent, child), before=self.score(ph),
                                             after=self.score(ch), hardware=self.hw, proposer=proposer,
                                             description="sim"), now)

    def experiment(self, now):
        best = self.best
        taken = None
        if self.sim.use_memory:
            measured, claimed = self.memory.measured(self.hw), self.memory.claims(self.hw, now * 60)

            def taken(source):
                key = memories.idea_key(best, source)
                return key in measured or key in claimed
        history = self.history + (self.memory.history(self.hw, self.noise()) if self.sim.use_memory else [])
        p = self.proposer.propose(proposers.Context(best, history, self.noise(), "cpu", [], taken))
        if p is None:
            return RUN_MIN  # nothing untried: wait a run's time for news
        ph, ch = swarm.content_hash(best), swarm.content_hash(p.source)
        self.sources[ch] = p.source
        idea = memories.idea_key(best, p.source)
        if self.sim.use_memory:
            self.sim.publish(self, self.sign("claim", dict(task=TASK, parent=ph, child=ch, idea=idea, hardware=self.hw,
                                                           description=p.description,
                                                           expires=int((now + 3 * RUN_MIN) * 60_000)), now), now)
        parent_bpb = sum(self.m[ph]) / len(self.m[ph])
        verdict, runs = self.trial(p.source, now)
        self.sim.experiments += 1
        self.history.append(dict(edit=p.edit, status=verdict, val_bpb=self.m[ch][-1], parent_bpb=parent_bpb,
                                 description=p.description))
        if self.sim.use_memory:
            from node import gittree
            self.sim.publish(self, self.sign("experiment", dict(
                task=TASK, lineage=swarm.LINEAGE, parent=ph, child=ch, idea=idea, diff=gittree.diff_texts(best, p.source),
                hypothesis=p.description, status=verdict, before=self.score(ph), after=self.score(ch), hardware=self.hw,
                proposer="offline", log_tail=""), now), now)
        if verdict == "keep":
            self.best = p.source
            self.sim.publish(self, self.improvement(best, p.source, "offline", now), now)
        return runs * RUN_MIN


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1,2,5,10,20,50")
    ap.add_argument("--hours", type=float, default=24)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    ns = [int(x) for x in args.nodes.split(",")]
    print(f"synthetic task: {len(Objective(0).names)} constants, target {TARGET:.0%} of the gap to the optimum, "
          f"runs of {RUN_MIN:g} min, noise sd {NOISE}, records delayed {DELAY_S:g} s; cut off at {args.hours:g} h; "
          f"medians over {args.seeds} seeds")
    print("| nodes | memory + claims | experiments to target | hours to target | parallel efficiency | duplicate runs |"
          " wasted verification | wall s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    t1 = {}
    med = lambda xs: statistics.median(xs) if xs else None
    for n in ns:
        for use in (True, False):
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
            fmt = lambda x, f: format(x, f) if x is not None else "not reached"
            print(f"| {n} | {'on' if use else 'off'} | {fmt(exps, '.0f')} | {fmt(hours, '.1f')} | "
                  f"{fmt(eff and 100 * eff, '.0f')}{' %' if eff else ''} | {100 * dup:.1f} % | {100 * waste:.1f} % | "
                  f"{time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
