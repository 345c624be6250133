"""The local research loop: baseline runs, then propose -> commit -> sandbox ->
keep / discard / crash -> record, forever. Keeps only what beats the current best
by more than the measured noise allows; a thin win is re-run first.

Durability: an experiment's row is written (status running) before it runs; its
outcome and, for a keep, the new best commit are written in one transaction;
results.tsv and events.jsonl follow. On start, rows still running are marked
interrupted, the tree is reset to the best commit, and results.tsv is rewritten
from the store, so a node killed at any instant carries on consistently.
"""

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time

from gossip.identity import Identity
from node import gittree, home as homes, proposer as proposers

BASELINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model", "train.py")


class Stop(Exception):
    """SIGINT or SIGTERM: end the current run and leave."""


def noise(measurements, floor):
    """Pooled standard deviation of val_bpb over commits measured more than once."""
    ss, dof = 0.0, 0
    for xs in measurements.values():
        if len(xs) > 1:
            m = sum(xs) / len(xs)
            ss += sum((x - m) ** 2 for x in xs)
            dof += len(xs) - 1
    return max(floor, math.sqrt(ss / dof)) if dof else floor


def verdict(best, cand, sigma, sigmas, reruns_left):
    """keep | rerun | discard for a candidate's measurements against the best's."""
    mb, mc = sum(best) / len(best), sum(cand) / len(cand)
    se = sigma * math.sqrt(1 / len(best) + 1 / len(cand))
    if mb - mc > sigmas * se:
        return "keep"
    if mb - mc > 0 and reruns_left > 0:
        return "rerun"
    return "discard"


class Node:
    def __init__(self, home, settings, data, out=sys.stdout):
        self.home, self.s, self.data, self.out = home, settings, data, out
        self.tty = out.isatty()
        os.makedirs(os.path.join(home, "queue"), exist_ok=True)
        self.lock = homes.Lock(home)
        self.identity = Identity.load(os.path.join(home, "identity.key"))
        self.network = None
        self.store = homes.Store(os.path.join(home, "store.sqlite"))
        self.events = homes.Events(os.path.join(home, "events.jsonl"))
        self.results = os.path.join(home, "results.tsv")
        self.tree = gittree.Tree(os.path.join(home, "tree"))
        self.proposer = proposers.make(settings["proposer"], settings["proposer_seed"])
        self.backend = None
        self._recover()

    # -- start and recovery -------------------------------------------------

    def _recover(self):
        if self.store.get("best_commit") is None:
            if os.path.exists(self.tree.path):
                shutil.rmtree(self.tree.path)  # a first start killed before its first commit was recorded
            with open(BASELINE) as f:
                self.store.set("best_commit", self.tree.create(f.read()))
            self.store.set("created", time.time())
        interrupted = self.store.mark_interrupted()
        self.tree.reset(self.best())
        homes.write_results(self.results, self.store.experiments())
        self.store.set("started", time.time())
        self.events("start", pid=os.getpid(), best=self.best(), interrupted=interrupted)
        if interrupted:
            self.say(f"recovered: {interrupted} interrupted experiment(s) recorded; tree reset to {self.best()[:7]}")

    def best(self):
        return self.store.get("best_commit")

    def measurements(self):
        return homes.measurements(self.store.experiments())

    def noise(self):
        return noise(self.measurements(), self.s["noise_floor"])

    # -- running ------------------------------------------------------------

    def say(self, line):
        print(("\r\033[K" if self.tty else "") + line, file=self.out, flush=True)

    def measure(self, kind, commit, description, proposer="-", edit=None):
        """One sandboxed run of `commit`; its row ends 'measured' (scored) or 'crash'."""
        from sandbox import run as sandbox
        exp = self.store.start(kind, self.best(), commit, description, proposer, edit)
        self.events("run", id=exp, kind=kind, commit=commit, description=description)
        folder = tempfile.mkdtemp(prefix="autoresearch-node-")
        try:
            label = f"#{exp} {kind} {commit[:7]}"
            source = self.tree.read(commit)
            with open(os.path.join(folder, "train.py"), "w") as f:
                f.write(source)
            with open(BASELINE) as f:
                trusted = source == f.read()  # only the shipped file may fill the shared compile cache
            r = sandbox.run(folder, budget=self.s["budget"], profile=self.s["profile"], data=self.data,
                            seed=exp, hide=[self.home], progress=self._progress(label), trusted=trusted)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.backend = r.hardware.backend
        status = "measured" if r.status == "ok" else "crash"
        mem = round(r.peak_memory_mb / 1024, 1)
        self.store.finish(exp, status, r.val_bpb, mem, self.noise(), r.to_json())
        self.events("result", id=exp, status=r.status, val_bpb=r.val_bpb, violations=list(r.violations),
                    training_seconds=r.training_seconds, total_seconds=r.total_seconds, budget=r.hardware.budget_seconds)
        shown = f"{r.val_bpb:.6f}" if r.val_bpb is not None else r.status + (f" ({', '.join(r.violations)})" if r.violations else "")
        self.say(f"{label}: {shown}  [{r.total_seconds:.0f}s] {description}")
        return exp, r

    def _progress(self, label):
        last = [None]

        def show(phase, elapsed, remaining):
            if self.tty:
                print(f"\r\033[K{label}: {phase} {elapsed:.0f}s (hand-over due within {max(0, remaining):.0f}s)",
                      end="", file=self.out, flush=True)
            elif phase != last[0]:
                print(f"{label}: {phase}", file=self.out, flush=True)
            last[0] = phase
        return show

    def decide(self, ids, status, best=None):
        """Give every run of one candidate its final status (and move the best), then journal it."""
        self.store.decide(ids, status, best)
        rows = {e["id"]: e for e in self.store.experiments()}
        for i in ids:
            homes.append_results(self.results, rows[i])
        self.events("decision", ids=ids, status=status, best=self.best())

    def baseline(self):
        """Run the unmodified tree until it has been measured baseline_runs times."""
        while True:
            done = sum(e["kind"] == "baseline" and e["status"] == "keep" for e in self.store.experiments())
            if done >= self.s["baseline_runs"]:
                return
            exp, r = self.measure("baseline", self.best(), "baseline" if not done else f"baseline (repeat {done}, noise)")
            self.decide([exp], "keep" if r.status == "ok" else "crash")
            if r.status != "ok":
                raise homes.HomeError(f"the baseline train.py did not run in the sandbox ({r.status}); its log ends:\n"
                                      + "\n".join(r.log_tail.splitlines()[-15:]))

    def history(self):
        """Finished candidates for the proposer, each with the best's mean when it was made."""
        out, means = [], {}
        for e in self.store.experiments():
            if e["val_bpb"] is not None:
                means.setdefault(e["commit_"], []).append(e["val_bpb"])
            if e["kind"] in ("candidate", "suggestion") and e["status"] in ("keep", "discard", "crash"):
                parent = means.get(e["parent"])
                out.append(dict(edit=json.loads(e["edit"]) if e["edit"] else None, status=e["status"], val_bpb=e["val_bpb"],
                                parent_bpb=sum(parent) / len(parent) if parent else None, description=e["description"]))
        return out

    def next_candidate(self):
        """(source, description, proposer name, kind, edit) from the queue or the proposer, or None."""
        queue = os.path.join(self.home, "queue")
        names = sorted(os.listdir(queue))
        for name in (n for n in names if n.endswith(".note")):  # notes first: context for this very proposal
            path = os.path.join(queue, name)
            with open(path) as f:
                self.store.add_note(f.read().strip())
            os.remove(path)
            self.events("note", file=name)
        for name in names:
            path = os.path.join(queue, name)
            if name.endswith(".patch"):
                try:
                    touched = self.tree.apply_check(path)
                    if touched != [gittree.EDITABLE]:
                        raise gittree.GitError(f"it touches {', '.join(touched)}; only {gittree.EDITABLE} may change")
                    source = self.tree.apply(path)
                except gittree.GitError as e:
                    self.tree.reset(self.best())
                    os.replace(path, path + ".rejected")
                    self.events("suggestion_rejected", file=name, reason=str(e))
                    self.say(f"suggestion {name} rejected: {e}")
                    continue
                os.remove(path)
                return source, f"suggestion {name}", "human", "suggestion", None
        ctx = proposers.Context(self.tree.read(self.best()), self.history(), self.noise(), self.backend or "cpu",
                                self.store.notes())
        p = self.proposer.propose(ctx)
        return (p.source, p.description, self.proposer.name, "candidate", p.edit) if p else None

    def experiment(self):
        """One candidate through to its decision; False when the proposer has nothing left."""
        nxt = self.next_candidate()
        if nxt is None:
            return False
        source, description, proposer, kind, edit = nxt
        commit = self.tree.commit(source, description)
        ids, reruns = [], self.s["max_reruns"]
        while True:
            exp, r = self.measure(kind if not ids else "rerun", commit, description, proposer, edit)
            ids.append(exp)
            if r.status != "ok":
                self.decide(ids, "crash")
                self.tree.reset(self.best())
                return True
            m = self.measurements()
            v = verdict(m[self.best()], m[commit], self.noise(), self.s["keep_sigmas"], reruns)
            if v == "rerun":
                reruns -= 1
                continue
            if v == "keep":
                self.decide(ids, "keep", best=commit)
                self.say(f"kept {commit[:7]}: {sum(m[commit]) / len(m[commit]):.6f} over {len(m[commit])} run(s)")
            else:
                self.decide(ids, "discard")
                self.tree.reset(self.best())
            return True

    def remeasure(self):
        exp, r = self.measure("remeasure", self.best(), "re-measure the best (noise)")
        self.decide([exp], "keep" if r.status == "ok" else "crash")

    def run(self):
        """The loop; returns when max_experiments are done, the proposer is exhausted, or on a signal."""
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.join_network()
            self.baseline()
            done = 0
            while not self.s["max_experiments"] or done < self.s["max_experiments"]:
                if done and self.s["remeasure_every"] and done % self.s["remeasure_every"] == 0:
                    self.remeasure()
                if not self.experiment():
                    self.say("the proposer has nothing more to try")
                    break
                done += 1
        except Stop:
            self.store.mark_interrupted()
            self.tree.reset(self.best())
            self.events("stop", reason="signal")
            self.say("stopped; the tree is at the best commit " + self.best()[:7])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    def _stop(self, signum, frame):
        raise Stop()

    def join_network(self):
        """Start gossip beside the loop (settings listen, seeds, mdns; listen 'off': none)."""
        if self.s["listen"] == "off":
            return
        from node.network import Network
        from sandbox.result import HardwareTag
        import dataclasses
        tag = HardwareTag.detect(self.s["budget"], self.s["profile"], self.data.fingerprint)
        self.network = Network(self.home, self.identity, self.s, dataclasses.asdict(tag), self.events, self.say)
        try:
            self.network.start()
        except Exception as e:  # the I/O edge: a port in use, no such address, no permission
            self.network = None
            raise homes.HomeError(f"cannot start gossip on {self.s['listen']}: {e} "
                                  "(pick another with --listen HOST:PORT, port 0 for any, or --listen off)") from None

    def close(self):
        if self.network:
            self.network.stop()
        self.store.db.close()
        self.lock.release()


def status(home):
    """What `python -m node status` reports, from the store alone (no lock needed)."""
    path = os.path.join(home, "store.sqlite")
    if not os.path.exists(path):
        raise homes.HomeError(f"no node home at {home} (start one with python -m node join --home {home})")
    store = homes.Store(path)
    exps = store.experiments()
    best = store.get("best_commit")
    m = homes.measurements(exps)
    cands = [e for e in exps if e["kind"] in ("candidate", "suggestion") and e["status"] in ("keep", "discard", "crash")]
    results = [json.loads(e["result"]) for e in exps if e["result"]]
    trained = sum(r["hardware"]["budget_seconds"] for r in results if r["status"] == "ok")  # the budgeted training
    spent = _wall(exps)
    started = float(store.get("started", 0) or 0)
    out = dict(best_val_bpb=sum(m[best]) / len(m[best]) if m.get(best) else None, best_commit=best,
               baseline_val_bpb=_first_baseline(exps), experiments=len(cands),
               kept=sum(e["status"] == "keep" for e in cands), crashed=sum(e["status"] == "crash" for e in cands),
               discarded=sum(e["status"] == "discard" for e in cands), runs=len(exps),
               noise=noise(m, 0.0), uptime_seconds=round(time.time() - started, 1) if started else None,
               running=homes.lock_held(home), duty_cycle=round(trained / spent, 4) if spent else None)
    store.db.close()
    from node.network import snapshot
    snap = snapshot(home) if out["running"] else None
    out["node_id"] = Identity.load(key).id if os.path.exists(key := os.path.join(home, "identity.key")) else None
    out["address"] = snap["address"] if snap else None
    out["peers"] = [{"id": p["id"], "address": p["address"], "hardware": p["meta"], "state": p["state"],
                     "last_seen_s": p["last_seen_s"], "score": p["score"]} for p in (snap or {}).get("peers", [])]
    out["rejected"] = (snap or {}).get("rejected", {})
    out["records"] = (snap or {}).get("records")
    return out


def _wall(exps):
    """Seconds the node spent on its runs, the node's own work between them included
    (a gap of ten minutes or more is a node that was stopped, and not counted)."""
    total, last = 0.0, None
    for e in exps:
        if e["finished"] is None:
            continue
        gap = e["started"] - last if last is not None else 0.0
        total += (e["finished"] - e["started"]) + (gap if 0 < gap < 600 else 0.0)
        last = e["finished"]
    return total


def _first_baseline(exps):
    xs = [e["val_bpb"] for e in exps if e["kind"] == "baseline" and e["val_bpb"] is not None]
    return sum(xs) / len(xs) if xs else None
