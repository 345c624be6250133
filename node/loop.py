"""The local research loop: baseline runs, then propose -> commit -> sandbox ->
keep / discard / crash -> record, forever. Keeps only what beats the current best
by more than the measured noise allows; a thin win is re-run first.

Durability: an experiment's row is written (status running) before it runs; its
outcome and, for a keep, the new best commit are written in one transaction;
results.tsv and events.jsonl follow. On start, rows still running are marked
interrupted, the tree is reset to the best commit, and results.tsv is rewritten
from the store, so a node killed at any instant carries on consistently.
"""

import ast
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time

from gossip import store as records_store, wire
from gossip.identity import Identity
from node import claude, config, gittree, home as homes, memory as memories, proposer as proposers, swarm
from sandbox import backend as backends

MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model")
BASELINE = os.path.join(MODEL_DIR, "train.py")
# per lineage, the file a node starts from; its tree holds it as train.py whatever the lineage
BASELINES = {"torch": BASELINE, "mlx": os.path.join(MODEL_DIR, "train_mlx.py")}


class Stop(BaseException):
    """SIGINT or SIGTERM: end the current run and leave (not an Exception: no handler of errors
    on the way may swallow it)."""


def pooled(measurements, peers=(0.0, 0)):
    """(sum of squares, degrees of freedom) of val_bpb over commits measured more than once, with
    `peers` (the same) from same-tag peers' records (memory.Memory.peer_noise)."""
    ss, dof = peers
    for xs in measurements.values():
        if len(xs) > 1:
            m = sum(xs) / len(xs)
            ss += sum((x - m) ** 2 for x in xs)
            dof += len(xs) - 1
    return ss, dof


def noise(measurements, floor, peers=(0.0, 0)):
    """Pooled standard deviation of val_bpb (see pooled), never below `floor`."""
    ss, dof = pooled(measurements, peers)
    return max(floor, math.sqrt(ss / dof)) if dof else floor


def noise_measured(measurements, peers, baseline_runs):
    """Whether the noise rests on at least the degrees of freedom that baseline_runs runs of the
    baseline give, our own repeated runs and same-tag peers' together. A node with peers runs the
    baseline once and checks this only when it first needs the noise, at its first verdict: by
    then the peers that started before it have published their runs of the baseline, and it
    re-runs its best only when they have not (Node.ensure_noise)."""
    return pooled(measurements, peers)[1] >= baseline_runs - 1


def verdict(best, cand, sigma, sigmas, reruns_left):
    """keep | rerun | discard for a candidate's measurements against the best's."""
    mb, mc = sum(best) / len(best), sum(cand) / len(cand)
    se = sigma * math.sqrt(1 / len(best) + 1 / len(cand))
    if mb - mc > sigmas * se:
        return "keep"
    if mb - mc > 0 and reruns_left > 0:
        return "rerun"
    return "discard"


def _counted(rs):
    """The runs of one tree that reported a usable step count."""
    return [(v, n) for v, n in rs if isinstance(n, int) and n >= 1]


def step_slope(runs, prior, weight=0.005):
    """val_bpb's fall per unit of ln(steps), from trees run more than once (each against its own
    mean, so no edit's effect enters it), shrunk towards `prior` by `weight` (in ln-steps' sum of
    squares: 0.005 is about four pairs of runs 5 % apart) and held within [0, 2 prior].
    `runs`: commit -> [(val_bpb, steps or None)]."""
    sxx = sxy = 0.0
    for rs in map(_counted, runs.values()):
        if len(rs) > 1:
            xs, ys = [math.log(n) for _, n in rs], [v for v, _ in rs]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            sxx += sum((x - mx) ** 2 for x in xs)
            sxy -= sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return min(2 * prior, max(0.0, (sxy + weight * prior) / (sxx + weight)))


def at_steps(best, cand, runs, slope, floor, min_dof=1, reach=0.15):
    """The best's and a candidate's runs read at one step count (their mean ln steps) along `slope`,
    for an edit that leaves a step's cost alone (proposer.neutral_edit): (best's values, candidate's,
    their noise, the steps read at), or None, to read them as measured, where a run of either
    reported no step count or lies more than `reach` in ln steps from the best's mean (the
    machine's speed varies by about 5 % sd between runs: more is another load, or a report not to
    lean on), or where fewer than `min_dof` degrees of freedom give the noise of runs so read. That
    noise is the pooled sd of every repeated tree's runs so read, never below `floor`."""
    b, c = runs.get(best, []), runs.get(cand, [])
    if not (b and c) or len(_counted(b)) < len(b) or len(_counted(c)) < len(c):
        return None
    home = sum(math.log(n) for _, n in b) / len(b)
    if any(abs(math.log(n) - home) > reach for _, n in b + c):
        return None
    ref = sum(math.log(n) for _, n in b + c) / len(b + c)
    read = {k: [v + slope * (math.log(n) - ref) for v, n in rs] for k, rs in runs.items() if len(_counted(rs)) == len(rs)}
    if pooled(read)[1] < min_dof:
        return None
    return read[best], read[cand], noise(read, floor), math.exp(ref)


def rerun_best(best, cand):
    """Whether a thin win's next run re-measures the best rather than the candidate: when the best
    has fewer runs (a node that ran the baseline once, a best kept on one run), where one more run
    shrinks the standard error of their difference most; the best is compared with every later
    candidate too."""
    return len(best) < len(cand)


def failure(r):
    """A failed run of a tree that should run, in words: its status, the checks it failed, and what
    to do where the machine, not the code, is the likely cause (a loaded or slow machine)."""
    why = r.status + (f": {', '.join(r.violations)}" if r.violations else "")
    if r.status == "timeout" or "over_budget" in r.violations:
        why += ("; the machine may be too slow or too busy for this budget (another node training beside it?): "
                "give a longer --budget, or run fewer nodes on it at once")
    return why


def read_start(path):
    """The train.py a new home starts from (--start); HomeError when it is not Python source."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        ast.parse(source)
    except (OSError, SyntaxError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise homes.HomeError(f"cannot start from {path}: {e}") from None
    if not source.strip():
        raise homes.HomeError(f"cannot start from {path}: the file is empty")
    return source


class Node:
    def __init__(self, home, settings, data, out=sys.stdout):
        self.home, self.s, self.data, self.out = home, settings, data, out
        self.tty = out.isatty()
        os.makedirs(os.path.join(home, "queue"), exist_ok=True)
        self.lock = homes.Lock(home)
        self.identity = Identity.load(os.path.join(home, "identity.key"))
        self.network = self.server = None
        self.store = homes.Store(os.path.join(home, "store.sqlite"))
        self.records = records_store.Store(os.path.join(home, "gossip.sqlite"))
        from model import prepare
        profile = prepare.PROFILES[settings["profile"]]
        self.metric = (profile["max_seq_len"], profile["eval_tokens"])  # (seq_len, eval_tokens) of the task
        self.task = swarm.task_id(data.fingerprint, settings["profile"], *self.metric)
        self.ledger = swarm.Ledger(self.records, self.task, self.identity.id)
        self.ledger.distrusted = set(json.loads(self.store.get("distrusted", "{}")))
        self.memory = memories.Memory(self.ledger, self.store.source)
        self._hardware = None
        self.events = homes.Events(os.path.join(home, "events.jsonl"))
        self.results = os.path.join(home, "results.tsv")
        self.tree = gittree.Tree(os.path.join(home, "tree"))
        seed = settings["proposer_seed"]
        self.proposer = proposers.make(settings, int(self.identity.id[:8], 16) if seed is None else seed,
                                       self.events, self.say)
        self.backend = backends.resolve(settings["backend"])
        self.lineage = backends.lineage(self.backend)
        with open(BASELINES[self.lineage]) as f:
            self.baseline_source = f.read()
        self.done = 0          # experiments run by this process
        self._running = None   # the candidate under way: source, description
        self._read = None      # the last verdict read at one step count: commit, steps, the two means, noise
        self._forms = {}       # commit -> normal form of its train.py, for the commits we measured
        self._next = None      # the proposal being prepared: (context, skipped, future)
        self._signalled = 0  # the number of the SIGINT/SIGTERM that came; checked again where a swallowed Stop would be lost
        try:
            self._recover()
        except BaseException:
            self.close()  # the home's lock and stores with it: a refused start holds nothing
            raise

    # -- start and recovery -------------------------------------------------

    def _recover(self):
        measured, on = self.store.get("task"), json.loads(self.store.get("task_of") or "{}")
        if measured not in (None, self.task) and any(e["val_bpb"] is not None for e in self.store.experiments()):
            was = f" (data {on['data'][:16]} from {on.get('source', '?')}, profile {on['profile']})" if on else ""
            raise homes.HomeError(
                f"{self.home} measured task {measured}{was}; this start is task {self.task} (data "
                f"{self.data.fingerprint[:16]}, profile {self.s['profile']}): their scores cannot be compared. "
                f"Start it with the profile it had and its data current again (python -m node prepare --source SOURCE: "
                f"instant when cached), or give this task its own --home")
        self.store.set("task", self.task)
        self.store.set("task_of", json.dumps(dict(data=self.data.fingerprint, profile=self.s["profile"],
                                                  source=self.data.manifest.get("source", "?"))))
        kept = self.store.get("lineage") or ("torch" if self.store.get("best_commit") else self.lineage)  # older homes: torch
        if kept != self.lineage:
            raise homes.HomeError(f"{self.home} evolves the {kept} lineage ({os.path.basename(BASELINES[kept])}), not "
                                  f"{self.lineage}: give --backend {self.backend} its own --home")
        start = self.s.get("start")
        first = read_start(start) if start else self.baseline_source
        self.store.set("lineage", self.lineage)
        if self.store.get("best_commit") is None:
            if os.path.exists(self.tree.path):
                shutil.rmtree(self.tree.path)  # a first start killed before its first commit was recorded
            self.store.set("best_commit", self.tree.create(first))
            self.store.set("created", time.time())
        elif start and self.tree.read(self.tree.root()) != first:
            raise homes.HomeError(f"{self.home} started from another train.py: --start applies to a new home only "
                                  f"(give it a new --home, or remove {self.home} to start this one over)")
        self.store.add_source(first)
        interrupted = self.store.mark_interrupted()
        self.tree.reset(self.best())
        shutil.rmtree(self._compiled("runs"), ignore_errors=True)  # layers of runs never decided
        for path in BASELINES.values():  # every lineage's baseline: chains of records start there
            with open(path) as f:
                self.store.add_source(f.read())
        for commit in self.tree.git("rev-list", self.best()).split():  # the kept chain (older homes lack it)
            self.store.add_source(self.tree.read(commit))
        homes.write_results(self.results, self.store.experiments())
        self.store.set("started", time.time())
        self.events("start", pid=os.getpid(), best=self.best(), interrupted=interrupted, proposer=self.proposer.name,
                    why=self.proposer.why)
        if interrupted:
            self.say(f"recovered: {interrupted} interrupted experiment(s) recorded; tree reset to {self.best()[:7]}")

    def best(self):
        return self.store.get("best_commit")

    def measurements(self):
        return homes.measurements(self.store.experiments())

    def noise(self):
        return noise(self.measurements(), config.noise_floor(self.s), self.memory.peer_noise(self.hardware()))

    # -- running ------------------------------------------------------------

    def say(self, line):
        print(("\r\033[K" if self.tty else "") + line, file=self.out, flush=True)

    def measure(self, kind, commit, description, proposer="-", edit=None, usage=None):
        """One sandboxed run of `commit`, taking its turn on the device: nodes sharing a machine
        (one cache folder) run one at a time, so no run's clock is shared with another's. A slow
        proposer prepares the next proposal meanwhile."""
        self.prepare_next()
        with homes.device_lock(homes.device_lock_path(),
                               lambda: self.say("waiting for the device: another node on this machine is running")):
            return self._measure(kind, commit, description, proposer, edit, usage)

    def _measure(self, kind, commit, description, proposer, edit, usage):
        """Its row ends 'measured' (scored) or 'crash'."""
        from sandbox import run as sandbox
        exp = self.store.start(kind, self.best(), commit, description, proposer, edit, usage)
        self.events("run", id=exp, kind=kind, commit=commit, description=description)
        folder = tempfile.mkdtemp(prefix=sandbox.temp_prefix("node"))
        try:
            label = f"#{exp} {kind} {commit[:7]}"
            source = self.tree.read(commit)
            with open(os.path.join(folder, "train.py"), "w") as f:
                f.write(source)
            trusted = source == self.baseline_source  # only the shipped file may fill the shared compile cache
            r = sandbox.run(folder, budget=self.s["budget"], profile=self.s["profile"], data=self.data, seed=exp,
                            hide=[self.home], progress=self._progress(label), trusted=trusted, backend=self.backend,
                            layers=[self._compiled("kept")], keep_layer=self._compiled("runs", str(exp)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        status = "measured" if r.status == "ok" else "crash"
        mem = round(r.peak_memory_mb / 1024, 1)
        self.store.finish(exp, status, r.val_bpb, mem, self.noise(), r.to_json())
        self.events("result", id=exp, status=r.status, val_bpb=r.val_bpb, violations=list(r.violations),
                    training_seconds=r.training_seconds, total_seconds=r.total_seconds, budget=r.hardware.budget_seconds)
        shown = f"{r.val_bpb:.6f}" if r.val_bpb is not None else r.status + (f" ({', '.join(r.violations)})" if r.violations else "")
        self.say(f"{label}: {shown}  [{r.total_seconds:.0f}s] {description}")
        return exp, r

    def _compiled(self, *parts):
        return os.path.join(self.home, "compile", *parts)

    def _keep_compiled(self, ids, kept):
        """What the runs `ids` compiled joins the kept layer when they ran what is the best now (a new
        best, the baseline, a re-measure: its children then start warm, a changed model included), and
        is dropped otherwise. A baseline that is not the shipped file (--start) is not trusted to fill
        the shared cache; without this each run compiled it cold until something was
        kept (~50 s a run on an H200: bench/untrusted_first.sh). Only a cache: a node killed before
        this merely compiles again."""
        from sandbox import run as sandbox
        runs = [self._compiled("runs", str(i)) for i in ids]
        layer = next((r for r in runs if os.path.isdir(r)), None) if kept else None
        if layer:
            kept_layer = self._compiled("kept")
            if _folder_bytes(kept_layer) > KEPT_LAYER_BYTES:  # content-keyed entries of old bests: start afresh
                shutil.rmtree(kept_layer, ignore_errors=True)
            sandbox.merge_layer(layer, kept_layer)
        for r in runs:
            shutil.rmtree(r, ignore_errors=True)

    def _progress(self, label):
        last = [None]

        def show(phase, elapsed, remaining):
            self._check_stop()
            if self.tty:
                print(f"\r\033[K{label}: {phase} {elapsed:.0f}s (hand-over due within {max(0, remaining):.0f}s)",
                      end="", file=self.out, flush=True)
            elif phase != last[0]:
                print(f"{label}: {phase}", file=self.out, flush=True)
            last[0] = phase
        return show

    def decide(self, ids, status, best=None, records=(), verdicts=()):
        """Give every run of one candidate its final status (and move the best), with the signed
        records that announce it, then journal it and send the records."""
        self.store.decide(ids, status, best, [r.encoded for r in records], verdicts)
        self._keep_compiled(ids, status == "keep")
        rows = {e["id"]: e for e in self.store.experiments()}
        for i in ids:
            homes.append_results(self.results, rows[i])
        self.events("decision", ids=ids, status=status, best=self.best())
        self.flush()

    # -- records ------------------------------------------------------------

    def sign(self, type_, body):
        return wire.make_record(self.identity, type_, body, time.time() * 1000)

    def flush(self):
        """Send the records of decisions already durable (after a crash: those not yet sent)."""
        for row_id, blob in self.store.unsent():
            record = wire.load_stored(blob)
            if self.network:
                self.network.publish(record)
            else:
                self.records.add(record)
            self.store.sent(row_id)

    def hardware(self):
        """Our hardware tag (a dict), as the sandbox will record it."""
        if self._hardware is None:
            from sandbox.result import HardwareTag
            self._hardware = dataclasses.asdict(HardwareTag.detect(self.s["budget"], self.s["profile"], self.data.fingerprint,
                                                                   self.backend))
            self.store.set("hardware", json.dumps(self._hardware))
        return self._hardware

    def scores(self, commit):
        return swarm.score(self.measurements()[commit], self.noise())

    def claim(self, parent, commit, idea, description, diff):
        """Tell the swarm we run this candidate now (not durable: it only matters while we run). It
        lasts twice the wall time of the candidate with all its re-runs, at the pace this node has
        been finishing runs (a 30-minute run of three nodes taking turns on one CPU saw a claim
        expire during re-runs, and one duplicate); before two runs have ended, at the budget plus the
        profile's start-up allowance (the budget alone gave a first claim 60 s on a 15 s budget, and it
        expired while the run, after 30 s waiting for the shared device, was still going)."""
        from sandbox.run import LIMITS
        ends = sorted(e["finished"] for e in self.store.experiments() if e["finished"])[-11:]
        gaps = sorted(b - a for a, b in zip(ends, ends[1:]))
        # median run to run, waits for the device included
        cadence = gaps[len(gaps) // 2] if gaps else self.s["budget"] + LIMITS[self.s["profile"]]["startup"]
        expires = time.time() + 2 * max(self.s["budget"], cadence) * (1 + self.s["max_reruns"])
        record = self.sign("claim", dict(task=self.task, parent=swarm.content_hash(self.tree.read(parent)),
                                         child=swarm.content_hash(self.tree.read(commit)), idea=idea,
                                         hardware=self.hardware(), description=description[:500],
                                         expires=int(expires * 1000),
                                         **({"diff": diff} if len(diff) <= wire.CLAIM_DIFF_CHARS else {}),
                                         **({"parent_score": self.scores(parent)} if parent in self.measurements() else {})))
        if self.network:
            self.network.publish(record)
        else:
            self.records.add(record)
        return record

    def experiment_record(self, parent, commit, description, proposer, status, r, diff, idea, inspired=None):
        m = self.measurements()
        after = swarm.score(m[commit], self.noise()) if commit in m else None
        return self.sign("experiment", dict(
            task=self.task, lineage=self.lineage, parent=swarm.content_hash(self.tree.read(parent)),
            child=swarm.content_hash(self.tree.read(commit)), idea=idea, diff=diff if len(diff) <= 64 << 10 else "",
            hypothesis=description[:500], status=status, before=self.scores(parent), after=after,
            hardware=dataclasses.asdict(r.hardware), proposer=proposer,
            log_tail=scrub(r.log_tail, limit=wire.LOG_TAIL_CHARS) if r.status != "ok" else "",
            **_inspired(inspired)))

    def improvement_record(self, parent, commit, description, proposer, r, inspired=None):
        return self.sign("improvement", dict(
            task=self.task, lineage=self.lineage, parent=swarm.content_hash(self.tree.read(parent)),
            child=swarm.content_hash(self.tree.read(commit)), diff=self.tree.diff(parent, commit),
            before=self.scores(parent), after=self.scores(commit), hardware=dataclasses.asdict(r.hardware),
            proposer=proposer, description=description[:500], **_inspired(inspired)))

    def baseline(self):
        """Run the unmodified tree until it has been measured baseline_runs times; once when peers
        are alive (their records may give the noise by our first verdict: ensure_noise)."""
        while True:
            done = sum(e["kind"] == "baseline" and e["status"] == "keep" for e in self.store.experiments())
            if done >= self.s["baseline_runs"] or (done and self.network and self.network.alive()):
                return
            exp, r = self.measure("baseline", self.best(), "baseline" if not done else f"baseline (repeat {done}, noise)")
            self.decide([exp], "keep" if r.status == "ok" else "crash")
            if r.status != "ok":
                raise homes.HomeError(f"the baseline train.py did not run in the sandbox ({failure(r)}); its log ends:\n"
                                      + "\n".join(r.log_tail.splitlines()[-15:]))

    def history(self):
        """Finished candidates for the proposer, each with the best's mean when it was made."""
        out, means = [], {}
        for e in self.store.experiments():
            if e["val_bpb"] is not None:
                means.setdefault(e["commit_"], []).append(e["val_bpb"])
            if e["kind"] in ("candidate", "suggestion") and e["status"] in ("keep", "discard", "crash"):
                parent = means.get(e["parent"])
                result = json.loads(e["result"]) if e["status"] == "crash" and e["result"] else {}
                out.append(dict(edit=json.loads(e["edit"]) if e["edit"] else None, status=e["status"], val_bpb=e["val_bpb"],
                                parent_bpb=sum(parent) / len(parent) if parent else None, description=e["description"],
                                id=e["id"], proposer=e["proposer"], outcome=result.get("status"),
                                log_tail=scrub(result.get("log_tail", ""), lines=12)))
        return out

    def context(self, running=None):
        """(what the proposer sees now, the list its `taken` fills with reasons for skipped candidates)."""
        best = self.tree.read(self.best())
        self.ledger.refresh()
        hw, now = self.hardware(), time.time()
        measured, claimed = self.memory.measured(hw), self.memory.claims(hw, now)
        self.store.set("claims_ignored", json.dumps(dict(self.memory.ignored)))
        self.store.set("experiments_rejected", json.dumps(dict(self.memory.rejected)))
        skipped = []
        for commit in self.measurements():
            if commit not in self._forms:
                self._forms[commit] = memories.normal_form(self.tree.read(commit))
        ours = set(self._forms.values())  # trees we measured: a step back to one (the baseline) says nothing new
        theirs = {r.body["child"] for rs in measured.values() for r in rs}

        def taken(source):
            if running and memories.normal_form(source) == memories.normal_form(running["source"]):
                return True  # our own candidate under way: its result is not in the history yet
            key = memories.idea_key(best, source)
            seen = key in measured or memories.normal_form(source) in ours or swarm.content_hash(source) in theirs
            why = "measured" if seen else "claimed" if key in claimed else None
            if why:
                skipped.append(why)
            return why is not None
        more = {}
        if self.proposer.slow:
            m, verdicts = self.measurements(), {k: v["verdict"] for k, v in self.store.verdicts().items()}
            more = dict(hardware=hw, score=self.scores(self.best()) if self.best() in m else None,
                        swarm=self.memory.findings(hw, verdicts, now), crash=self._crash(), running=running)
        ctx = proposers.Context(best, self.history() + self.memory.history(hw, self.noise()), self.noise(),
                                self.proposer_backend(), self.store.notes(), taken, self.memory.busy(hw, now), **more)
        return ctx, skipped

    def proposer_backend(self):
        """What DEVICE is in our baseline file: the branch of constants the proposer edits."""
        return self.hardware()["device"] if self.lineage == "mlx" else self.backend

    def _crash(self):
        """Our last decided candidate, when it was the Claude proposer's own (not a repair) and
        crashed (not a timeout or a violation): what a repair round needs."""
        last = next((e for e in reversed(self.store.experiments()) if e["kind"] == "candidate"
                     and e["status"] in ("keep", "discard", "crash")), None)
        if last is None or last["status"] != "crash" or last["proposer"] != self.proposer.name:
            return None
        result = json.loads(last["result"] or "{}")
        if result.get("status") != "crash" or "repair_of" in json.loads(last["edit"] or "{}"):
            return None
        return dict(id=last["id"], description=last["description"], source=self.tree.read(last["commit_"]),
                    parent=self.tree.read(last["parent"]), log_tail=scrub(result.get("log_tail", ""), lines=30))

    def prepare_next(self):
        """Have a slow proposer prepare the next proposal while the device runs, so the device never
        waits for the model: one at a time, against the best of now, and none when no experiment
        follows this run (max_experiments)."""
        upcoming = self.done + (2 if self._running else 1)
        if not self.proposer.slow or self._next or (self.s["max_experiments"] and upcoming > self.s["max_experiments"]):
            return
        ctx, skipped = self.context(self._running)
        self._next = (ctx, skipped, self.proposer.submit(ctx))

    def _prepared(self):
        """The prepared proposal (asked for now if none is), rebased onto the best when the best moved
        since (git's three-way merge); when it no longer applies, a new one is asked for and waited for."""
        best = self.tree.read(self.best())
        for _ in range(2):
            if self._next is None:
                ctx, skipped = self.context(self._running)
                self._next = (ctx, skipped, self.proposer.submit(ctx))
            ctx, skipped, future = self._next
            while True:  # a signal still stops the node here: close() cancels the request
                self._check_stop()
                try:
                    p = future.result(timeout=0.5)
                    break
                except concurrent.futures.TimeoutError:
                    pass
            self._next = None
            self._count_skipped(skipped)
            base = p and (p.base or ctx.source)
            if p is None or base == best:
                return p
            merged, conflicts = gittree.merge3(best, base, p.source)
            if not conflicts and merged != best and _parses(merged):
                self.events("proposal_rebased", description=p.description[:200])
                return dataclasses.replace(p, source=merged, base=best)
            self.events("proposal_stale", description=p.description[:200],
                        reason=f"{conflicts} conflict(s) with the new best" if conflicts else "it no longer applies")
            self._unused(p.usage)
        return None

    def _count_skipped(self, skipped):
        for why in skipped:
            self.store.bump("skipped_" + why)
        if skipped:
            self.events("skipped", reasons=skipped)

    def _unused(self, usage):
        """Tokens of a proposal that never ran still count in status."""
        if usage:
            total = claude.add_usage(json.loads(self.store.get("proposer_usage_unused") or "null"), usage)
            self.store.set("proposer_usage_unused", json.dumps(total))

    def next_candidate(self):
        """The next Proposal, from the queue (a person's patch: proposer "human") or the proposer, or None."""
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
                return proposers.Proposal(source, f"suggestion {name}", None, "human")
        if self.proposer.slow:
            return self._prepared()
        ctx, skipped = self.context()
        p = self.proposer.propose(ctx)
        self._count_skipped(skipped)
        return p

    def experiment(self):
        """One candidate through to its decision; False when the proposer has nothing left."""
        for lost in range(CLAIM_TRIES):
            p = self.next_candidate()
            if p is None:
                return False
            source, description, proposer = p.source, p.description, p.proposer or self.proposer.name
            kind = "suggestion" if proposer == "human" else "candidate"
            parent = self.best()
            commit = self.tree.commit(source, description)
            self.store.add_source(source)
            diff = self.tree.diff(parent, commit)
            idea = memories.idea_key(self.tree.read(parent), source)
            claim = self.claim(parent, commit, idea, description, diff)
            if kind == "suggestion" or lost == CLAIM_TRIES - 1 or not self.lost_race(claim):
                break  # a person's suggestion runs here whoever else runs it
            self.tree.reset(self.best())
            self._count_skipped(["claimed"])
            self.events("claim_lost", idea=idea, description=description[:200])
        edit = dict(p.edit or {}, inspired_by=p.inspired_by) if p.inspired_by else p.edit
        self._running = dict(source=source, description=description)
        try:
            status, ids, r = self.trial(kind, commit, description, proposer, edit, p.usage)
        finally:
            self._running = None
        inspired = bytes.fromhex(p.inspired_by) if p.inspired_by else None
        records = [self.experiment_record(parent, commit, description, proposer, _experiment_status(status, r), r, diff,
                                          idea, inspired)]
        if status == "keep":
            records.append(self.improvement_record(parent, commit, description, proposer, r, inspired))
        self.decide(ids, status, best=commit if status == "keep" else None, records=records)
        if status == "keep":
            if self._reading(commit):  # for status: a best that may measure worse than its parent
                self.store.set("kept_reading", json.dumps(dict(self._read, steps=round(self._read["steps"], 1))))
            m = self.measurements()[commit]
            self.events("published", record=records[-1].id.hex(), commit=commit, description=description[:200])
            self.say(f"kept {commit[:7]}: {sum(m) / len(m):.6f} over {len(m)} run(s){self._read_note(commit)}; published")
        else:
            if status == "discard":
                self.say(self._discarded(commit))
            self.tree.reset(self.best())
        return True

    def _discarded(self, commit):
        """The console's line for a discard: by how much, against what noise (as the verdict read them)."""
        m = self.measurements()
        c, b, sigma, at = m[commit], m[self.best()], self.noise(), ""
        line = (f"discarded {commit[:7]}: {sum(c) / len(c):.6f} over {len(c)} run(s) against the best's "
                f"{sum(b) / len(b):.6f}")
        gain = sum(b) / len(b) - sum(c) / len(c)
        r = self._reading(commit)
        if r:
            at = f"; at {r['steps']:.0f} steps {r['val_bpb']:.6f} against {r['parent_val_bpb']:.6f}"
            gain, sigma = r["parent_val_bpb"] - r["val_bpb"], r["noise"]
        why = f"better by {gain:.6f}, within the noise ({sigma:.6f})" if gain > 0 else f"worse by {-gain:.6f}"
        return f"{line}{at}: {why}"

    def _reading(self, commit):
        """The last verdict's reading at one step count, where it was `commit`'s (else None)."""
        return self._read if self._read and self._read["commit"] == commit else None

    def _read_note(self, commit):
        """What the verdict read where it read both at one step count (at_steps), for the console."""
        r = self._reading(commit)
        return (f" (at {r['steps']:.0f} steps: {r['val_bpb']:.6f} against {r['parent_val_bpb']:.6f}, "
                f"noise {r['noise']:.6f})" if r else "")

    def lost_race(self, claim):
        """Whether a peer claimed the same idea before us. It waits claim_settle seconds first (about
        the time a record takes to reach the swarm), so that two nodes that chose one candidate
        within that time both see both claims and agree: the earlier claim runs (the lower node id
        on a tie), the other node chooses again. Only with peers to race."""
        if not (self.network and self.s["claim_settle"] and self.network.alive()):
            return False
        time.sleep(self.s["claim_settle"])
        self.ledger.refresh()
        rivals = self.memory.claims(self.hardware(), time.time()).get(claim.body["idea"], ())
        return any((c.ts, c.author_id) < (claim.ts, claim.author_id) for c in rivals)

    def trial(self, kind, commit, description, proposer, edit=None, usage=None):
        """Measure a committed candidate, re-running a thin win (or the best, when it has fewer runs:
        rerun_best): (keep | discard | crash, the candidate's run ids, its last result); nothing
        decided yet. The proposal's usage goes with its first run."""
        ids, reruns, again = [], self.s["max_reruns"], False
        neutral = self.reads_at_steps(commit)
        while True:
            if again:
                self.remeasure()
            else:
                exp, r = self.measure(kind if not ids or kind == "verify" else "rerun", commit, description, proposer,
                                      edit, None if ids else usage)
                ids.append(exp)
                if r.status != "ok":
                    return "crash", ids, r
            self.ensure_noise()
            m = self.measurements()
            best, cand, sigma = m[self.best()], m[commit], self.noise()
            read = neutral and self.at_steps(commit)
            self._read = None
            if read:
                best, cand, sigma, steps = read
                self._read = dict(commit=commit, steps=steps, val_bpb=sum(cand) / len(cand),
                                  parent_val_bpb=sum(best) / len(best), noise=sigma)
                self.events("read_at_steps", commit=commit, best=self.best(), steps=round(steps, 1),
                            best_val_bpb=best, val_bpb=cand, noise=sigma)
            v = verdict(best, cand, sigma, self.s["keep_sigmas"], reruns)
            if v == "rerun":
                reruns -= 1
                again = rerun_best(m[self.best()], m[commit])
                continue
            return v, ids, r

    def reads_at_steps(self, commit):
        """Whether a candidate is compared with the best at one step count (adjust_steps): on a
        profile with a step slope (a CPU's), where its train.py is the best's with only constants
        changed that leave a step's cost alone: our own candidates, and peers' wins merged onto our
        best where they are such edits of it. The step counts are the runs' own reports; the code
        that prints them is our best's, the same in both."""
        return (self.s["adjust_steps"] and self.s["profile"] in config.STEP_SLOPES
                and proposers.neutral_edit(self.tree.read(self.best()), self.tree.read(commit), self.proposer_backend()))

    def at_steps(self, commit):
        """loop.at_steps for the best and `commit` (None: read them as measured): its noise rests on
        our own runs alone, at least the degrees of freedom of baseline_runs runs (peers report
        their spreads as measured: a node that ran the baseline once reads raw until it has more),
        and never below the profile's STEP_FLOORS, scaled as the settings' noise_floor is to the
        profile's (a floor raised for a noisy machine is raised for both readings)."""
        runs = homes.measured_steps(self.store.experiments())
        profile = self.s["profile"]
        slope = step_slope(runs, config.STEP_SLOPES[profile])
        floor = config.STEP_FLOORS[profile] * config.noise_floor(self.s) / config.NOISE_FLOORS[profile]
        return at_steps(self.best(), commit, runs, slope, floor, min_dof=self.s["baseline_runs"] - 1)

    def ensure_noise(self):
        """Before a verdict: re-run the best while neither our own repeated runs nor same-tag peers'
        claims and records give the noise as many degrees of freedom as baseline_runs baseline runs would (a
        node that ran the baseline once because peers were alive, whose peers published nothing
        of use yet). A lone node has run all its baselines already and runs nothing here."""
        while True:
            self.ledger.refresh()  # what peers published while we ran
            m = self.measurements()
            if (noise_measured(m, self.memory.peer_noise(self.hardware()), self.s["baseline_runs"])
                    or len(m.get(self.best(), ())) >= self.s["baseline_runs"]):
                return
            kind = "baseline" if self.best() == self.tree.root() else "remeasure"
            exp, r = self.measure(kind, self.best(), f"{kind} (repeat, noise)")
            self.decide([exp], "keep" if r.status == "ok" else "crash")
            if r.status != "ok":  # the tree ran before: this machine fails, as when a baseline crashes
                raise homes.HomeError(f"the best {self.best()[:7]} did not run again in the sandbox ({failure(r)}); "
                                      "its log ends:\n" + "\n".join(r.log_tail.splitlines()[-15:]))

    # -- verification -------------------------------------------------------

    def verify_share(self, window_s=6 * 3600):
        """(share of the last window's run time spent verifying, mean minutes per run)."""
        since = time.time() - window_s
        runs = [e for e in self.store.experiments() if e["finished"] and e["finished"] > since]
        total = sum(e["finished"] - e["started"] for e in runs)
        spent = sum(e["finished"] - e["started"] for e in runs if e["kind"] == "verify")
        minutes = total / len(runs) / 60 if runs else self.s["budget"] / 60
        return (spent / total if total else 0.0), minutes

    def queue(self):
        share, minutes = self.verify_share()
        return self.ledger.refresh().rank(self.hardware(), self.noise(), minutes, time.time(),
                                          {bytes.fromhex(k) for k in self.store.verdicts()}, self.s["keep_sigmas"]), share

    def verify_next(self, alternate=True):
        """Verify foreign improvements if it is our turn (swarm.due): the best-ranked one that can
        run, merged with every further credible one that rebases cleanly beside it, up to
        verify_batch, in one run (swarm.batch). With `alternate` (and verify_batch > 1), a
        verification never follows a verification: our own run comes between, and wins that arrive
        meanwhile join the next batch. After a merged run that did not hold, the next ones run alone
        until the best moves. True if one ran."""
        if not self.s["verify_share"]:
            return False
        if alternate and self.s["verify_batch"] > 1 and self.store.last_kind() == "verify":
            return False
        entries, share = self.queue()
        limit = 1 if self.store.get("batch_failed") == self.best() else self.s["verify_batch"]
        b = swarm.batch(self.ledger, swarm.due(entries, share, self.s["verify_share"]), self.tree.read(self.best()),
                        self.store.source, limit, self.lineage, {e.record.body["child"] for e in entries})
        for record, plan in b.settled:
            self._settle(record, plan)
        if not b.records:
            return False
        self._verify(b.records, b.source)
        return True

    def verify(self, record):
        """Verify one foreign improvement alone: rebase it onto our best, run it, adopt it if it
        beats our best by more than our noise, and attest either way. ran | reject | held | waiting."""
        pending = {e.record.body["child"] for e in self.queue()[0]}
        plan = swarm.plan(self.ledger, record, self.tree.read(self.best()), self.store.source, self.lineage, pending)
        if plan.action == "wait":
            return "waiting"
        if plan.action in ("reject", "held"):
            self._settle(record, plan)
            return plan.action
        self._verify((record,), plan.source)
        return "ran"

    def _settle(self, record, plan):
        """Our verdict on an improvement that needs no run: rejected (attested) or held."""
        rid, who = record.id.hex(), record.author_id
        records = [self.attestation(record, plan.verdict, None, None, plan.note)] if plan.action == "reject" else []
        self.decide([], plan.action, records=records, verdicts=[(rid, plan.verdict or "held", None, plan.note)])
        self.events("verdict", improvement=rid, author=who, verdict=plan.verdict or "held", note=plan.note)
        self.say(f"improvement {rid[:12]} by {who}: {plan.verdict or 'held'} ({plan.note})")

    def _verify(self, records, source):
        """Run `source`, our best with `records` rebased onto it, under the keep rule; adopt them all
        when it holds. Each gets an attestation naming the others measured with it (`jointly`). A
        merged run that does not hold says nothing about any one of them: no verdict, and they are
        verified alone next (store key batch_failed)."""
        names = ", ".join(f"{r.id.hex()[:12]} by {r.author_id}" for r in records)
        description = (f"improvement {records[0].id.hex()} by {records[0].author_id}: {records[0].body['description']}"
                       if len(records) == 1 else f"{len(records)} improvements merged: {names}")[:500]
        parent = self.best()
        commit = self.tree.commit(source, description)
        self.store.add_source(source)
        for r in records:
            self.events("verify", improvement=r.id.hex(), author=r.author_id, commit=commit)
        self.say(f"verifying improvement {records[0].id.hex()[:12]} by {records[0].author_id}: "
                 f"{records[0].body['description'][:80]}" if len(records) == 1 else f"verifying {description}")
        status, ids, r = self.trial("verify", commit, description, ADOPT_PROPOSER, None)
        v = {"keep": "confirmed", "discard": "refuted"}.get(status) or ("violation" if r.status == "violation" else "crashed")
        m = self.measurements()
        after = self.scores(commit) if commit in m else None
        note = ", ".join(r.violations) if v == "violation" else ("" if r.status == "ok" else r.status)
        # the run is an experiment of the swarm's memory too: no node need propose this tree again
        signed = [self.experiment_record(parent, commit, description, ADOPT_PROPOSER, _experiment_status(status, r), r,
                                         self.tree.diff(parent, commit), memories.idea_key(self.tree.read(parent), source))]
        verdicts = []
        if status == "keep" or len(records) == 1:
            for rec in records:
                others = [o.id for o in records if o is not rec]
                signed.append(self.attestation(rec, v, self.scores(parent), after, note, others))
                verdicts.append((rec.id.hex(), v, commit, note))
        else:
            self.store.set("batch_failed", parent)
        if status == "keep":
            signed.append(self.improvement_record(parent, commit, description, swarm.adopt_proposer(records), r))
        self.decide(ids, status, best=commit if status == "keep" else None, records=signed, verdicts=verdicts)
        for rec in records:
            self.events("verdict", improvement=rec.id.hex(), author=rec.author_id, verdict=v if verdicts else "not held merged",
                        adopted=status == "keep", note=note)
        outcome = f"{v}; adopted as {commit[:7]}" if status == "keep" else (
            v if len(records) == 1 else f"{v} merged; they will be verified one at a time")
        self.say(f"improvement {records[0].id.hex()[:12]} by {records[0].author_id}: {outcome}" if len(records) == 1
                 else f"{len(records)} improvements merged ({names}): {outcome}")
        if status != "keep":
            self.tree.reset(self.best())

    def attestation(self, record, verdict_, before, after, note, jointly=()):
        return self.sign("attestation", dict(task=self.task, improvement=record.id, verdict=verdict_, before=before,
                                             after=after, hardware=self.hardware(), note=note[:500],
                                             **({"jointly": list(jointly)} if jointly else {})))

    def remeasure(self):
        exp, r = self.measure("remeasure", self.best(), "re-measure the best (noise)")
        self.decide([exp], "keep" if r.status == "ok" else "crash")

    def run(self):
        """The loop; returns when max_experiments are done or the proposer is exhausted (0), or on a
        signal (its number: the first one, a second is ignored)."""
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        from sandbox import run as sandbox
        removed = sandbox.sweep()
        if removed:
            self.say(f"removed {removed} temp files and folders left by nodes killed mid-run")
        try:
            self.join_network()
            self.flush()
            self.baseline()
            remeasured = 0  # self.done at the last re-measurement: once per remeasure_every experiments, not
            # once per pass (verifications and idle waits pass without an experiment)
            while not self.s["max_experiments"] or self.done < self.s["max_experiments"]:
                self._check_stop()
                if self.s["remeasure_every"] and self.done - remeasured >= self.s["remeasure_every"]:
                    self.remeasure()
                    remeasured = self.done
                if self.verify_next():
                    continue
                if not self.experiment():
                    if self.network is None:
                        self.say("the proposer has nothing more to try")
                        break
                    if self.verify_next(alternate=False):  # no run of our own to put between
                        continue
                    self.say("the proposer has nothing untried: waiting for news from peers")
                    time.sleep(IDLE_S)
                    continue
                self.done += 1
        except Stop:
            self.store.mark_interrupted()
            try:
                self.tree.reset(self.best())
                where = "the tree is at the best commit " + self.best()[:7]
            except gittree.GitError:  # a git the signal reached too: the next start resets the tree (_recover)
                where = "the tree goes back to the best commit " + self.best()[:7] + " at the next start"
            self.events("stop", reason="signal")
            self.say("stopped; " + where)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self._signalled

    def _stop(self, signum, frame):
        if self._signalled:  # a second signal (timeout(1) sends two) must not cut the clean-up of the first short
            return
        self._signalled = signum
        raise Stop()

    def _check_stop(self):
        """Raise Stop if a signal came. The handler raises it at once, but where it lands in a
        finalizer (a Popen's or a file's __del__ run by the garbage collector) Python prints it
        as 'Exception ignored' and goes on: this is where the node notices all the same."""
        if self._signalled:
            raise Stop()

    def join_network(self):
        """Start gossip beside the loop (settings listen, seeds, mdns; listen 'off': none)."""
        if self.s["listen"] == "off":
            return
        from node.network import Network
        from sandbox.result import HardwareTag
        from gossip.discovery import split_address
        from node import tasksync, taskserver
        tag = HardwareTag.detect(self.s["budget"], self.s["profile"], self.data.fingerprint, self.backend)
        host, port = split_address(self.s["listen"])
        manifest = tasksync.sign(self.identity, tasksync.build_manifest(
            self.data.folder, self.s["profile"], *self.metric), time.time() * 1000)
        data_port = self.s["data_port"] if self.s["data_port"] is not None else port + 1 if 0 < port < 65535 else 0
        self.server = taskserver.Server(self.data.folder, manifest, host, data_port, rate=self.s["serve_rate"] * 1e6)
        try:
            self.server.start()
        except OSError as e:
            self.server = None
            raise homes.HomeError(f"cannot serve the task on {host}:{data_port}: {e} "
                                  "(pick another with --data-port PORT, 0 for any)") from None
        self.network = Network(self.home, self.identity, self.s,
                               dict(dataclasses.asdict(tag), task=self.task, data_port=self.server.port),
                               self.events, self.say, self.records)
        try:
            self.network.start()
        except Exception as e:  # the I/O edge: a port in use, no such address, no permission
            self.network = None
            raise homes.HomeError(f"cannot start gossip on {self.s['listen']}: {e} "
                                  "(pick another with --listen HOST:PORT, port 0 for any, or --listen off)") from None
        self.network.publish(manifest.record)
        self.say(f"task {self.task}: serving {manifest.size / 1e6:.1f} MB on port {self.server.port}"
                 + (f" at up to {self.s['serve_rate']:g} MB/s" if self.s["serve_rate"] else ""))

    def distrust(self, nodes):
        """{node id: reason} of peers caught lying to us (wrong bytes for a task file): their claims
        rank from now on as those of an author with an attested violation. Kept across restarts."""
        if not nodes:
            return
        known = dict(json.loads(self.store.get("distrusted", "{}")), **nodes)
        self.store.set("distrusted", json.dumps(known))
        self.ledger.distrusted = set(known)
        self.ledger.refresh()
        for node, why in nodes.items():
            self.events("distrust", node=node, reason=why)
            self.say(f"distrusting node {node}: {why}")

    def close(self):
        """Stop the proposer (a request in flight is cancelled), gossip, and the stores."""
        if self._next is not None:
            future = self._next[2]
            if future.done() and not future.cancelled() and future.exception() is None and future.result():
                self._unused(future.result().usage)
            future.cancel()
            self._next = None
        self.proposer.close()
        if self.network:
            self.network.stop()
        if self.server:
            self.server.stop()
        self.records.close()
        self.store.db.close()
        self.lock.release()


ADOPT_PROPOSER = "verify"
KEPT_LAYER_BYTES = 8 << 30  # the kept candidates' compile cache (HOME/compile/kept) starts afresh beyond this
IDLE_S = 10.0
CLAIM_TRIES = 3    # candidates a node gives up to earlier claims before it runs the next one anyway


def _measured_noise(measurements):
    """The pooled sd of val_bpb, None before any commit was measured twice (no floor: what was measured)."""
    ss, dof = pooled(measurements)
    return math.sqrt(ss / dof) if dof else None


def _folder_bytes(path):
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files)


def _experiment_status(status, r):
    return status if r.status == "ok" else r.status  # crash | timeout | violation


def _inspired(record_id):
    """The optional record field naming the peer record a change ports (absent when none)."""
    return {"inspired_by": record_id} if record_id else {}


def _parses(source):
    try:
        ast.parse(source)
        return True
    except SyntaxError:
        return False


_PATH = re.compile(r"(?<![\w.])/(?:[^\s:'\"(),]+/)*([^\s:'\"(),/]*)")
_ASSIGN = re.compile(r"\b([A-Z][A-Z0-9_]{2,})=\S+")


def scrub(log_tail, lines=20, limit=4000):
    """A crash's last lines fit to leave the machine: no absolute path (the file name stays),
    no NAME=value pair."""
    tail = "\n".join(log_tail.splitlines()[-lines:])
    tail = _PATH.sub(lambda m: m.group(1) or "/", tail)
    return _ASSIGN.sub(r"\1=<scrubbed>", tail)[-limit:]


def status(home):
    """What `python -m node status` reports, from the store alone (no lock needed)."""
    store = homes.Store(homes.store_path(home))
    exps = store.experiments()
    best = store.get("best_commit")
    m = homes.measurements(exps)
    cands = [e for e in exps if e["kind"] in ("candidate", "suggestion") and e["status"] in ("keep", "discard", "crash")]
    results = [json.loads(e["result"]) for e in exps if e["result"]]
    trained = sum(r["hardware"]["budget_seconds"] for r in results if r["status"] == "ok")  # the budgeted training
    spent = _wall(exps)
    started = float(store.get("started", 0) or 0)
    out = dict(best_val_bpb=sum(m[best]) / len(m[best]) if m.get(best) else None, best_commit=best,
               baseline_val_bpb=_first_baseline(exps, m), experiments=len(cands),
               kept=sum(e["status"] == "keep" for e in cands), crashed=sum(e["status"] == "crash" for e in cands),
               discarded=sum(e["status"] == "discard" for e in cands),
               runs=sum(e["status"] in ("keep", "discard", "crash") for e in exps),  # decided: results.tsv's rows
               noise=_measured_noise(m), uptime_seconds=round(time.time() - started, 1) if started else None,
               running=homes.lock_held(home), duty_cycle=round(trained / spent, 4) if spent else None,
               task=store.get("task"), verification=_verification(exps, store.verdicts()),
               memory=dict(skipped_claimed=int(store.get("skipped_claimed", 0)),
                           skipped_measured=int(store.get("skipped_measured", 0)),
                           claims_ignored=json.loads(store.get("claims_ignored") or "{}"),
                           experiments_rejected=json.loads(store.get("experiments_rejected") or "{}")),
               model=_model_use(exps, store.get("proposer_usage_unused")))
    reading = json.loads(store.get("kept_reading") or "null")  # the best kept on a reading at one step count
    out["best_read_at_steps"] = reading if reading and reading["commit"] == best else None
    store.db.close()
    from node.network import snapshot
    snap = snapshot(home) if out["running"] else None
    out["node_id"] = homes.node_id(home)
    out["address"] = snap["address"] if snap else None
    out["peers"] = [{"id": p["id"], "address": p["address"], "hardware": p["meta"], "state": p["state"],
                     "last_seen_s": p["last_seen_s"], "score": p["score"], "service": p.get("service", 0.0),
                     "standing": p.get("standing", p["score"])} for p in (snap or {}).get("peers", [])]
    out["rejected"] = (snap or {}).get("rejected", {})
    out["records"] = (snap or {}).get("records")
    return out


def _model_use(exps, unused):
    """The proposer model's tokens and cost: every proposal that ran, and those prepared but never run."""
    usages = [json.loads(e["usage"]) for e in exps if e["usage"]]
    total = None
    for u in usages + ([json.loads(unused)] if unused else []):
        total = claude.add_usage(total, u)
    keys = ("calls", "input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens", "usd", "unpriced_calls")
    return dict({k: (total or {}).get(k, 0) for k in keys}, model=(total or {}).get("model"), proposals=len(usages))


def _verification(exps, verdicts):
    """How the node split its run time between its own research and verifying peers' claims."""
    runs = [e for e in exps if e["finished"] is not None]
    verify = sum(e["finished"] - e["started"] for e in runs if e["kind"] == "verify")
    total = sum(e["finished"] - e["started"] for e in runs)
    counts = {}
    for v in verdicts.values():
        counts[v["verdict"]] = counts.get(v["verdict"], 0) + 1
    return dict(share=round(verify / total, 4) if total else 0.0, seconds=round(verify, 1), own_seconds=round(total - verify, 1),
                verdicts=counts, adopted=counts.get("confirmed", 0))


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


def _first_baseline(exps, m):
    """The mean of every run of the unmodified tree this home started from (its re-measures too, as the
    best's mean counts them: while the baseline is the best, the two agree)."""
    first = next((e["commit_"] for e in exps if e["kind"] == "baseline"), None)
    return sum(m[first]) / len(m[first]) if m.get(first) else None
