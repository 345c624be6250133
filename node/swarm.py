"""The swarm side of a node: which foreign improvements to verify, and how a foreign change
becomes a candidate of our own tree.

Improvements name their parent and child train.py by content hash (SHA-256). A node rebuilds a
parent it lacks by following improvements back to a file it holds (the shipped baseline, its own
commits): each step's diff is applied with git and must give exactly the child hash it names.
A node that adopts a foreign change publishes an improvement of its own from its old best to the
merged tree, with proposer "adopt:<record id>", so that peers can rebuild what it builds on next;
such records are for rebuilding and provenance, never queued for verification.

The queue ranks foreign improvements of our task by the val_bpb gain per minute of our compute
they are likely to bring:
    claimed gain x P(it holds) x author standing x hardware closeness x age decay / minutes per run
P(it holds) starts from the author's own evidence (gain over its standard error, against the
keep rule's 2 sigma) and moves with attestations of others, weighted by how close their hardware
is to ours. An author's standing is its confirmed against refuted claims (a Beta(1, 1) prior);
a sandbox violation attested by us, or by a node one of whose improvements we confirmed, cuts it
to a twentieth.
Every attestation weighs by its author's own standing, so a discredited node moves little; a
fresh key starts at the prior, so a refutation from one counts half (keys cost nothing: what
holds an honest author up is that honest nodes confirm it).
"""

import hashlib
import math
from collections import defaultdict, deque
from dataclasses import dataclass

from gossip import wire
from node import gittree

LINEAGE = "torch"         # of model/train.py; model/train_mlx.py is lineage "mlx" (see sandbox.backend)
ADOPT = "adopt:"
MAX_SOURCE_HASHES = 10_000  # hashes looked at to rebuild one parent (each one SQLite lookup)
AGE_HALF_LIFE_H = 24.0
CLOSENESS_WEIGHTS = dict(backend=0.35, accelerator=0.3, count=0.1, budget_seconds=0.15, framework=0.1)


def content_hash(text):
    return hashlib.sha256(text.encode()).hexdigest()


def task_id(fingerprint, profile, max_seq_len, eval_tokens):
    """What every record names: the data (and tokenizer) fingerprint and the evaluation settings."""
    canon = wire.canonical({"data": fingerprint, "profile": profile, "seq_len": max_seq_len, "eval_tokens": eval_tokens})
    return hashlib.sha256(canon).hexdigest()[:16]


def score(xs, noise):
    """A record's {val_bpb, runs, spread} of one commit's measurements (spread: their sd, or the
    node's noise for a single run)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) * (x - m) for x in xs) / (len(xs) - 1)) if len(xs) > 1 else noise  # ** 2 raises past 1e154
    bound = lambda v: min(float(v), wire.MAX_BPB) if math.isfinite(v) else wire.MAX_BPB  # what records may carry
    return {"val_bpb": bound(m), "runs": len(xs), "spread": bound(sd)}


def tag_name(hw):
    """One line naming a hardware tag: what people pass to export --tag."""
    budget = hw.get("budget_seconds", 0)
    budget = f"{budget:g}" if type(budget) in (int, float) else budget  # a peer's tag: any scalar
    part = lambda v: str(v)[:40]  # and any length
    return (f"{part(hw.get('backend', '?'))}/{part(hw.get('accelerator', '?'))} x{part(hw.get('count', '?'))}/"
            f"{part(budget)}s/{part(hw.get('profile', '?'))}")


def closeness(a, b):
    """0..1: how far a number measured on tag `a` carries to tag `b`."""
    return sum(w for k, w in CLOSENESS_WEIGHTS.items() if a.get(k) == b.get(k))


def adopted_from(record):
    """The ids (bytes) of the improvements an adoption record took in (several when they were
    verified merged in one run), or () for a record that adopts nothing."""
    p = record.body["proposer"]
    if not p.startswith(ADOPT):
        return ()
    try:
        ids = tuple(bytes.fromhex(x) for x in p[len(ADOPT):].split(","))
    except ValueError:
        return ()
    return ids if all(len(i) == wire.ID_BYTES for i in ids) else ()


def adopt_proposer(records):
    """The proposer field of the adoption record of `records` (what adopted_from reads back)."""
    return ADOPT + ",".join(r.id.hex() for r in records)


def weight(attestation):
    """How much one attestation says about its improvement: a verdict measured on the improvement
    merged with k others in one run is a 1/(k+1) share of one."""
    return 1.0 / (1 + len(attestation.body.get("jointly", ())))


@dataclass(frozen=True)
class Entry:
    """One foreign improvement waiting for our verdict."""
    record: wire.Record
    priority: float       # expected val_bpb gain per minute of our compute
    strong: bool          # worth running ahead of our own research
    gain: float           # claimed by its author
    p_hold: float
    standing: float       # of its author
    closeness: float      # of its author's hardware to ours
    confirmed: float      # attestations of others, weighted by their closeness to us
    refuted: float


class Ledger:
    """The records of our gossip store, indexed for the queue, rebuilding and provenance; read
    incrementally (only rows added since the last refresh)."""

    def __init__(self, records, task, me):
        self.db, self.task, self.me = records, task, me
        self.rowid = 0
        self.improvements = {}                  # id -> Record, our task
        self.by_child = defaultdict(list)        # child hash -> [Record]
        self.attestations = defaultdict(dict)    # improvement id -> {attestor id: Record}
        self.experiments = []                   # Records, our task
        self.claims = []
        self.other_tasks = defaultdict(int)     # task -> records seen
        self.by_author = defaultdict(list)       # author id -> [improvement ids]
        self.distrusted = set()                  # node ids this node caught lying itself (served wrong task bytes)
        self.unbuildable = set()                 # ids of improvements whose diff does not give their child
        self._standing = {}

    def refresh(self):
        self._standing = {}
        for self.rowid, r in self.db.since(self.rowid):
            task = r.body.get("task")
            if task is not None and task != self.task:
                self.other_tasks[task] += 1
                continue
            if r.type == "improvement":
                self.improvements[r.id] = r
                self.by_child[r.body["child"]].append(r)
                self.by_author[r.author_id].append(r.id)
            elif r.type == "attestation":
                self.attestations[r.body["improvement"]][r.author_id] = r  # one verdict per attestor counts
            elif r.type == "experiment":
                self.experiments.append(r)
            elif r.type == "claim":
                self.claims.append(r)
        return self

    # -- standing and ranking ---------------------------------------------------------------

    def verdicts(self, rid, author):
        """The attestations of `rid` by nodes other than its author."""
        return [a for who, a in self.attestations.get(rid, {}).items() if who != author]

    def standing(self, author, weighted=True):
        """The author's confirmed against refuted claims, Beta(1, 1), each attestation weighted by
        its attestor's own (unweighted) standing, so that a discredited node's word weighs little;
        an attested violation, or a lie we caught ourselves (`distrusted`), cuts it to a twentieth.
        A violation cuts only when it is ours or its attestor's work held when we ran it (`proven`:
        keys cost nothing, and fresh keys confirming each other must not discredit anyone); as a
        refutation it weighs like any other."""
        key = (author, weighted)
        if key not in self._standing:
            good = bad = violation = 0.0
            for rid in self.by_author.get(author, ()):
                for a in self.verdicts(rid, author):
                    w = (self.standing(a.author_id, False) if weighted else 1.0) * weight(a)
                    v = a.body["verdict"]
                    good += w * (v == "confirmed")
                    bad += w * (v in ("refuted", "crashed", "violation"))
                    if v == "violation" and (a.author_id == self.me or self.proven(a.author_id)):
                        violation = max(violation, weight(a))
            if author in self.distrusted:
                violation = 1.0
            self._standing[key] = (1 + good) / (2 + good + bad) * (1 - 0.95 * min(1.0, 2 * violation))
        return self._standing[key]

    def proven(self, author):
        """Whether we confirmed an improvement of `author`'s ourselves: the one standing that a swarm
        of fresh keys confirming each other cannot make."""
        return any(a.author_id == self.me and a.body["verdict"] == "confirmed"
                   for rid in self.by_author.get(author, ()) for a in self.verdicts(rid, author))

    def credible(self, record):
        """Whether a claim stands: its author is not discredited and no more nodes refuted it than
        confirmed it (what watch and export --tag show as a tag's best)."""
        votes = [a.body["verdict"] for a in self.verdicts(record.id, record.author_id)]
        bad = sum(v in ("refuted", "crashed", "violation") for v in votes)
        return self.standing(record.author_id) >= 0.4 and bad <= votes.count("confirmed")

    def rank(self, hardware, noise, minutes_per_run, now, done, keep_sigmas=2.0):
        """Foreign improvements of our task without our verdict (ids in `done`), best first."""
        out = []
        for rid, r in self.improvements.items():
            if r.author_id == self.me or rid in done or adopted_from(r):
                continue
            b, a = r.body["before"], r.body["after"]
            gain = b["val_bpb"] - a["val_bpb"]
            se = math.sqrt(b["spread"] ** 2 / max(1, b["runs"]) + a["spread"] ** 2 / max(1, a["runs"])) or noise
            p_claim = 0.5 * (1 + math.erf((gain / max(se, 1e-12) - keep_sigmas) / math.sqrt(2)))
            conf = ref = 0.0
            for att in self.verdicts(rid, r.author_id):
                w = closeness(att.body["hardware"], hardware) * self.standing(att.author_id, False) * 2 * weight(att)
                if att.body["verdict"] == "confirmed":
                    conf += w
                elif att.body["verdict"] in ("refuted", "crashed", "violation"):
                    ref += w * (3 if att.body["verdict"] == "violation" else 1)
            p_hold = (2 * p_claim + conf) / (2 + conf + ref)
            standing = self.standing(r.author_id)
            c = closeness(r.body["hardware"], hardware)
            decay = 0.5 ** (max(0.0, now - r.ts / 1000) / 3600 / AGE_HALF_LIFE_H)
            expected = max(0.0, gain) * p_hold * standing * (0.25 + 0.75 * c) * decay
            strong = expected > keep_sigmas * noise and p_hold >= 0.5 and standing >= 0.4  # a newcomer: 0.5
            out.append(Entry(r, expected / max(minutes_per_run, 1e-3), strong, gain, p_hold, standing, c, conf, ref))
        out.sort(key=lambda e: (-e.priority, e.record.ts))
        return out

    # -- rebuilding and rebasing ------------------------------------------------------------

    def source(self, h, known):
        """The train.py whose hash is `h`: from `known(h)` (text or None), else rebuilt through the
        improvements that name it as their child; None when no chain reaches a known file. It walks
        back from `h` to the hashes known here, then replays forward from them, each record at most
        once and checked as it is replayed: a record whose diff does not give its child (a forger's
        shortcut to someone's child) is passed over and remembered, and an honest chain beside it is
        still found. Linear in the records looked at, whatever shape a forger gives them."""
        text = known(h)
        if text is not None:
            return text
        texts, records, seen, frontier = {}, defaultdict(list), {h}, deque([h])
        while frontier:  # breadth first: the shortest chains are reached before a flood's far ends
            for r in self.by_child.get(frontier.popleft(), ()):
                parent = r.body["parent"]
                if r.id in self.unbuildable:
                    continue
                records[parent].append(r)
                if parent not in seen and len(seen) < MAX_SOURCE_HASHES:
                    seen.add(parent)
                    text = known(parent)
                    if text is None:
                        frontier.append(parent)
                    else:
                        texts[parent] = text
        ready = list(texts)
        while ready and h not in texts:
            parent = ready.pop()
            for r in records.get(parent, ()):
                child = r.body["child"]
                if child in texts:
                    continue
                try:
                    text = gittree.apply_diff(texts[parent], r.body["diff"])
                except gittree.GitError:
                    text = None
                if text is not None and content_hash(text) == child:
                    texts[child] = text
                    ready.append(child)
                else:
                    self.unbuildable.add(r.id)
        return texts.get(h)


def due(entries, share, verify_share):
    """The ranked entries it is our turn to verify, given the share of our run time verification
    has taken: strong ones up to 3/4 of it (or verify_share when larger), others up to verify_share."""
    return [e for e in entries if share < (max(0.75, verify_share) if e.strong else verify_share)]


@dataclass(frozen=True)
class Batch:
    """Foreign improvements to verify in one run, rebased onto our best one after another."""
    records: tuple = ()       # best-ranked first
    source: str = ""          # our best with all of them merged in
    settled: tuple = ()       # (record, Plan) met on the way that need no run: rejected or held


def batch(ledger, entries, best_source, known, limit, lineage=LINEAGE, pending=frozenset()):
    """What to verify next: the best-ranked entry that can run, then each further one that holds on
    its own evidence (p_hold >= 0.5, from an author of standing >= 0.4) and merges cleanly onto
    those taken, up to `limit` in all. One run of the merged tree verifies them together: when it
    beats our best by more than our noise, all are adopted. Verifying each alone costs every node
    a run per win: in the research simulator 20 nodes reached the target in 1.4 h one at a time,
    1.1 h in batches of up to 8 (bench/RESULTS.md). An entry whose only fault is a conflict with another one taken waits for a later run.
    `pending`: the child hashes of the improvements not judged here yet (see plan)."""
    records, settled, merged = [], [], best_source
    for e in entries:
        if len(records) >= limit:
            break
        if records and (e.p_hold < 0.5 or e.standing < 0.4):
            continue
        p = plan(ledger, e.record, best_source, known, lineage, pending)
        if p.action in ("reject", "held"):
            settled.append((e.record, p))
        elif p.action == "run" and not records:
            records, merged = [e.record], p.source
        elif p.action == "run":
            m, conflicts = gittree.merge3(merged, best_source, p.source)
            if not conflicts:  # the same change as one taken merges to the same tree: it is verified too
                records.append(e.record)
                merged = m
    return Batch(tuple(records), merged, tuple(settled))


@dataclass(frozen=True)
class Plan:
    """What to do with one foreign improvement: run | reject | wait | held."""
    action: str
    source: str = ""          # run: the rebased candidate
    verdict: str = ""         # reject: the attestation's verdict
    note: str = ""


def plan(ledger, record, best_source, known, lineage=LINEAGE, pending=frozenset()):
    """Check a foreign improvement and rebase it onto our best with git's three-way merge. One of
    another lineage is held, not rebased (its diff is of another file) nor judged: it stays in the
    store, shown and learned from (a proposer may port its idea). One that conflicts with our best
    waits while its parent is itself an improvement not judged here yet (its child hash in
    `pending`): a peer's win stacked on its earlier one rebases once that one is adopted."""
    body = record.body
    if body["lineage"] != lineage:
        return Plan("held", note=f"lineage {body['lineage'][:32]}, ours is {lineage}: shown, not rebased")
    parent = ledger.source(body["parent"], known)
    if parent is None:
        return Plan("wait", note=f"parent {body['parent'][:12]} cannot be rebuilt from the records held")
    try:
        child = gittree.apply_diff(parent, body["diff"])
    except gittree.GitError as e:
        return Plan("reject", verdict="failed_to_apply", note=str(e)[:300])
    if content_hash(child) != body["child"]:
        return Plan("reject", verdict="failed_to_apply", note="the diff applied to the parent does not give the child hash")
    if content_hash(parent) == content_hash(best_source):
        merged = child
    else:
        merged, conflicts = gittree.merge3(best_source, parent, child)
        if conflicts and body["parent"] in pending:
            return Plan("wait", note=f"its parent {body['parent'][:12]} is an improvement not judged here yet")
        if conflicts:
            return Plan("reject", verdict="failed_to_apply", note=f"{conflicts} conflict(s) rebasing onto our best")
    if merged == best_source:
        return Plan("held", note="our best already holds this change")
    return Plan("run", source=merged)
