"""Swarm memory: what every node tried (experiment records) and is trying now (claims), so that
no node pays twice for an idea, and the proposers learn from the whole swarm.

Two edits are the same idea when their parents and children have the same normal form: the
Python AST without comments or formatting (`0.08` and `8e-2` are one constant), so a reformatted
copy of an edit is still the same idea. A node about to run a candidate skips it when a peer on a
compatible hardware tag (same backend, accelerator, count and budget) claimed it and the claim
has not expired, or already measured it.

Claims are honoured with care: at most MAX_ACTIVE_CLAIMS of one peer at a time (a node runs one
candidate at a time), and none from a peer whose expired claims mostly never became experiment
records (claiming to starve the others).
"""

import ast
import functools
import hashlib
import re
import statistics
from collections import defaultdict

from node import gittree, proposer as proposers, swarm

MAX_ACTIVE_CLAIMS = 2
UNFULFILLED_LIMIT = 3          # expired claims without a record before a peer's claims stop counting
COMPATIBLE = 0.85              # closeness: backend, accelerator, count and budget agree
MAX_PEER_DOF = 8               # degrees of freedom one peer adds to our noise estimate
MAX_CLAIM_S = 24 * 3600        # the longest a claim is honoured, whatever its expiry says (a 4 h budget, 2 reruns)
CLAIMS_PER_AUTHOR = 64         # a peer's newest claims that count (an older flood costs nothing)
TEXT_CHARS = 300               # of a peer's description or hypothesis shown to the Claude proposer
MAX_EDIT_DIFF = 1 << 16        # a diff read as constants' edits; longer ones are no such edit
MAX_EDIT_LINE = 200            # a line of one


@functools.lru_cache(maxsize=4096)
def normal_form(source):
    """A hash of the code without comments and formatting (of the text, whitespace collapsed, when
    it does not parse)."""
    try:
        canon = ast.dump(ast.parse(source), annotate_fields=False, include_attributes=False)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # a peer's text: any of these
        canon = "\0" + " ".join(source.split())
    return hashlib.sha256(canon.encode()).hexdigest()


def idea_key(parent_source, child_source):
    return hashlib.sha256((normal_form(parent_source) + normal_form(child_source)).encode()).hexdigest()


def change_of(diff):
    """What a diff changes, independent of its parent: its added and removed lines without
    comments and spacing (how `knowledge` groups tries of one idea made on different parents)."""
    out = []
    for line in diff.splitlines():
        if line[:1] in "+-" and not line.startswith(("+++", "---")):
            code = line[1:].split("#", 1)[0]
            code = " ".join(code.split())
            if code:
                out.append(line[0] + re.sub(r"\s*([=*+/,()-])\s*", r"\1", code))
    return "\n".join(sorted(out))


def edit_from_diff(diff):
    """The offline proposer's structured edit of a diff that only changes constants, else None
    (also for a peer's diff that makes no sense as one: a number turned into a pattern, ...)."""
    old, new = {}, {}
    if len(diff) > MAX_EDIT_DIFF:
        return None
    for line in diff.splitlines():
        if line[:1] not in "+-" or line.startswith(("+++", "---")):
            continue
        if len(line) > MAX_EDIT_LINE:  # ASSIGN takes time quadratic in a line's run of spaces
            return None
        m = proposers.ASSIGN.match(line[1:])
        if not m:
            return None
        c = proposers._parse(m["name"], m["value"].strip(), 0, 0)
        if c is None:
            return None
        (old if line[0] == "-" else new)[m["name"]] = c.value
    if not new or set(old) != set(new):
        return None
    changes = []
    for name in sorted(new):
        a, b = old[name], new[name]
        if isinstance(a, str) != isinstance(b, str):
            return None
        if a == b:  # its comment or its spelling changed, not its value
            continue
        up = b.count("L") > a.count("L") if isinstance(a, str) else b > a
        changes.append({"name": name, "dir": "up" if up else "down", "old": a, "new": b})
    return {"changes": changes} if changes else None


def _lost(claim, rivals):
    """Whether another node on a compatible tag claimed the same idea earlier, while its claim held
    (the lower node id on a tie): the node that made `claim` lost the race (loop.Node.lost_race) and
    chose again, so that the claim never becomes a record is no fault of its author's. `rivals`:
    the idea's claims, oldest first."""
    for r in rivals:
        if (r.ts, r.author_id) >= (claim.ts, claim.author_id):
            return False
        if (r.author_id != claim.author_id and expiry(r) > claim.ts / 1000
                and swarm.closeness(r.body["hardware"], claim.body["hardware"]) >= COMPATIBLE):
            return True
    return False


def finished(experiments):
    """(author, idea) of each experiment record: a claim of one of them is done, no longer held."""
    return {(r.author_id, r.body["idea"]) for r in experiments}


def in_flight(claims, experiments, now):
    """The claims that stand for work under way at `now` (what knowledge and watch show): unexpired,
    their experiment record not here, and not lost to an earlier claim of the same idea (its author
    chose again and runs something else)."""
    done, by_idea = finished(experiments), _by_idea(claims)
    return [c for c in claims if expiry(c) > now and (c.author_id, c.body["idea"]) not in done
            and not _lost(c, by_idea[c.body["idea"]])]


def _by_idea(claims):
    """idea -> its claims, oldest first (the rivals _lost compares)."""
    by_idea = defaultdict(list)
    for c in claims:
        by_idea[c.body["idea"]].append(c)
    for cs in by_idea.values():
        cs.sort(key=lambda c: (c.ts, c.author_id))
    return by_idea


def _changed_lines(diff):
    """The lines a diff removes or adds (not its context, which names the neighbouring constants)."""
    return "\n".join(line[1:] for line in diff.splitlines() if line.startswith(("+", "-")) and not line.startswith(("+++", "---")))


def expiry(claim):
    """When a claim stops being honoured (seconds): its own expiry, but never more than
    MAX_CLAIM_S after it was made (a claim that never expires would hold its idea for good)."""
    return min(claim.body["expires"], claim.ts + MAX_CLAIM_S * 1000) / 1000


class Memory:
    """Experiments and claims of our task, as the node's ledger holds them. An experiment record
    whose parent we can rebuild is checked: its diff must apply and give its child hash, and the
    idea it names must be that of its parent and child; one that fails is left out and counted."""

    def __init__(self, ledger, known):
        self.ledger, self.known = ledger, known
        self.ignored = defaultdict(int)   # reason -> claims not honoured
        self.rejected = defaultdict(int)  # reason -> experiment records left out
        self._checked = {}                # record id -> kept (bool), or the ledger's stamp it went unchecked at

    def experiments(self):
        out = []
        stamp = len(self.ledger.improvements)  # a parent becomes rebuildable only through new improvements
        for r in self.ledger.experiments:
            kept = self._checked.get(r.id)
            if kept is None or (type(kept) is int and kept != stamp):  # new, or unchecked before the last improvements
                kept = self._check(r)
                self._checked[r.id] = stamp if kept is None else kept
            if kept is not False:
                out.append(r)
        return out

    def _check(self, r):
        body = r.body
        if not body["diff"]:
            return True  # a diff too large to travel inline: nothing to check it against here
        parent = self.ledger.source(body["parent"], self.known)
        if parent is None:
            return None  # its parent is not rebuildable here (yet): kept as its author's word
        try:
            child = gittree.apply_diff(parent, body["diff"])
        except gittree.GitError:
            self.rejected["diff_does_not_apply"] += 1
            return False
        if swarm.content_hash(child) != body["child"]:
            self.rejected["child_mismatch"] += 1
            return False
        if idea_key(parent, child) != body["idea"]:
            self.rejected["idea_mismatch"] += 1
            return False
        return True

    def measured(self, hardware):
        """idea -> experiment records on a tag compatible with `hardware`."""
        out = defaultdict(list)
        for r in self.experiments():
            if swarm.closeness(r.body["hardware"], hardware) >= COMPATIBLE:
                out[r.body["idea"]].append(r)
        return out

    def claims(self, hardware, now, compatible=True):
        """idea -> the honoured, unexpired claims of other nodes on compatible tags (any tag with
        `compatible` false)."""
        done = finished(self.experiments())
        by_author, by_idea = defaultdict(list), _by_idea(self.ledger.claims)
        for c in self.ledger.claims:
            if c.author_id != self.ledger.me:
                by_author[c.author_id].append(c)
        for author, cs in by_author.items():
            cs.sort(key=lambda c: -c.ts)
            del cs[CLAIMS_PER_AUTHOR:]
        self.ignored = defaultdict(int)
        out = defaultdict(list)
        for author, cs in by_author.items():
            expired = [c for c in cs if expiry(c) <= now]
            unfulfilled = sum((author, c.body["idea"]) not in done and not _lost(c, by_idea[c.body["idea"]])
                              for c in expired)
            # a claim whose experiment record is here is done: it no longer holds its idea
            active = [c for c in cs if expiry(c) > now and (author, c.body["idea"]) not in done]
            if unfulfilled >= UNFULFILLED_LIMIT and unfulfilled * 2 > len(expired):
                self.ignored["unfulfilled"] += len(active)
                continue
            self.ignored["over_limit"] += max(0, len(active) - MAX_ACTIVE_CLAIMS)
            for c in active[:MAX_ACTIVE_CLAIMS]:
                if not compatible or swarm.closeness(c.body["hardware"], hardware) >= COMPATIBLE:
                    out[c.body["idea"]].append(c)
        return out

    def busy(self, hardware, now):
        """(constant, direction) pairs that other nodes' honoured claims change now, on any tag (read
        from the diff a claim carries): the offline proposer tries them last, so that nodes whose
        trees differ (and whose candidates are therefore different ideas) still try different
        parameters at once. In the research simulator 20 nodes reached the target in 1.1 h with it,
        1.8 h without (bench/RESULTS.md); other tags count too: the direction of a step mostly
        carries over, and a node learns of a parameter from any tag's result."""
        out = set()
        for cs in self.claims(hardware, now, compatible=False).values():
            for c in cs:
                edit = edit_from_diff(c.body.get("diff", ""))
                out.update((ch["name"], ch["dir"]) for ch in (edit or {}).get("changes", ()))
        return frozenset(out)

    def peer_noise(self, hardware):
        """(sum of squares, degrees of freedom) of run-to-run val_bpb spread that other nodes on a
        compatible tag report in their signed records: per node and commit, the score with the most
        runs (two or more), each node counted for at most MAX_PEER_DOF degrees of freedom and only
        while its standing holds. Pooled with a node's own repeated runs (loop.noise), it replaces an
        estimate of one degree of freedom (two baseline runs) with one of many, which is most often
        too small: in the research simulator 13 % of 20 nodes' keeps were false with their own
        estimates alone, 9 % with peers' (at a cost: 1.1 h to the target instead of 0.9,
        bench/RESULTS.md, before this rule). Peers none of whose improvements we confirmed
        ourselves count together as one peer: a swarm of fresh keys reporting no spread at all
        (or confirming each other) moves the estimate no more than one node can. A tree that several
        peers ran once each (the baseline, which every node runs first) gives their spread too: k
        runs, k - 1 degrees of freedom, on k machines of one tag, so any difference between the
        machines adds to it (a larger estimate: a stricter keep rule, never a looser one). Claims
        carry their parent's score: a peer's baseline is known here as soon as it starts its first
        experiment, before our own first verdict (loop.Node.ensure_noise)."""
        best = {}
        for r in self.ledger.experiments + self.ledger.claims:
            if r.author_id == self.ledger.me or swarm.closeness(r.body["hardware"], hardware) < COMPATIBLE:
                continue
            scores = (((r.body["parent"], r.body.get("parent_score")),) if r.type == "claim" else
                      ((r.body["parent"], r.body["before"]), (r.body["child"], r.body["after"])))
            for h, sc in scores:
                if sc and sc["runs"] > best.get((r.author_id, h), {"runs": 0})["runs"]:
                    best[(r.author_id, h)] = sc
        per, single = defaultdict(lambda: [0.0, 0]), defaultdict(dict)
        for (author, h), sc in best.items():
            if sc["runs"] == 1:
                single[h][author] = sc["val_bpb"]
            elif self.ledger.standing(author) >= 0.4:
                per[author][0] += (sc["runs"] - 1) * sc["spread"] ** 2
                per[author][1] += sc["runs"] - 1
        earned, fresh = [0.0, 0.0], [0.0, 0.0]  # (ss, dof) of peers proven to us / the others
        for author, (a_ss, a_dof) in per.items():
            keep = min(1.0, MAX_PEER_DOF / a_dof)
            pool = earned if self.ledger.proven(author) else fresh
            pool[0], pool[1] = pool[0] + a_ss * keep, pool[1] + a_dof * keep
        for values in single.values():  # one tree run once by each of several peers: their spread
            xs = {a: x for a, x in values.items() if self.ledger.standing(a) >= 0.4}
            if len(xs) >= 2:
                m = sum(xs.values()) / len(xs)
                pool = earned if all(self.ledger.proven(a) for a in xs) else fresh
                pool[0], pool[1] = pool[0] + sum((x - m) ** 2 for x in xs.values()), pool[1] + len(xs) - 1
        # keys cost nothing: peers none of whose improvements were confirmed count together as one
        keep = min(1.0, MAX_PEER_DOF / fresh[1]) if fresh[1] else 0.0
        return earned[0] + fresh[0] * keep, earned[1] + fresh[1] * keep

    def history(self, hardware, noise):
        """Other nodes' finished experiments for the offline proposer: dicts like the node's own
        history, with a weight (1 on compatible tags, a weaker prior of 0.3 elsewhere) and the
        gain measured in the author's own noise, carried over in ours."""
        out = []
        for r in self.experiments():
            if r.author_id == self.ledger.me:
                continue
            edit = edit_from_diff(r.body["diff"])
            b, a = r.body["before"], r.body["after"]
            status = "crash" if r.body["status"] in ("crash", "timeout", "violation") else r.body["status"]
            if edit is None or (status != "crash" and (a is None or b is None)):
                continue
            weight = 1.0 if swarm.closeness(r.body["hardware"], hardware) >= COMPATIBLE else 0.3
            parent_bpb = val_bpb = None
            if status != "crash":
                # their gain in their noise, in ours; bounded, so that no reported spread (1e-9) turns
                # a peer's word into a sure thing
                scale = min(4.0, max(0.25, noise / max(a["spread"], b["spread"], 1e-9)))
                parent_bpb, val_bpb = b["val_bpb"], b["val_bpb"] - (b["val_bpb"] - a["val_bpb"]) * scale
            out.append(dict(edit=edit, status=status, val_bpb=val_bpb, parent_bpb=parent_bpb,
                            description=r.body["hypothesis"], weight=weight, author=r.author_id))
        return out

    def findings(self, hardware, verdicts, now, limit=8):
        """What the Claude proposer is shown of the swarm (plain data): peers' improvements, biggest
        claimed gain first, with their attestations and our verdict (hex id -> verdict); ideas tried
        by peers without a keep; claims in flight."""
        improvements = []
        for rid, r in self.ledger.improvements.items():
            if r.author_id == self.ledger.me or swarm.adopted_from(r) or not self.ledger.credible(r):
                continue
            votes = [a.body["verdict"] for a in self.ledger.verdicts(rid, r.author_id)]
            improvements.append(dict(
                id=rid.hex(), author=r.author_id, tag=swarm.tag_name(r.body["hardware"]), lineage=r.body["lineage"][:40],
                description=r.body["description"][:TEXT_CHARS], delta=r.body["after"]["val_bpb"] - r.body["before"]["val_bpb"],
                runs=r.body["after"]["runs"], confirmed=votes.count("confirmed"),
                refuted=sum(v in ("refuted", "crashed", "violation") for v in votes), ours=verdicts.get(rid.hex()),
                diff=r.body["diff"]))
        improvements.sort(key=lambda i: i["delta"])
        known = self.knowledge(now)
        avoid = [dict(description=i["description"][:TEXT_CHARS], tries=i["tries"], tags=len(i["tags"]),
                      median_delta=i["median_delta"], outcomes=i["outcomes"]) for i in known["ideas"]
                 if not i["outcomes"].get("keep") and set(i["authors"]) != {self.ledger.me}]
        avoid.sort(key=lambda a: -a["tries"])
        claims = [dict(description=c.body["description"][:TEXT_CHARS], tag=swarm.tag_name(c.body["hardware"]))
                  for cs in self.claims(hardware, now, compatible=False).values() for c in cs]
        return dict(improvements=improvements[:limit], avoid=avoid[:2 * limit], claims=claims[:limit])

    def knowledge(self, now, tag=None, grep=None):
        """What the swarm has tried, grouped by the change: tries, tags, median delta, outcomes,
        and who claims what now."""
        groups, experiments, tags = defaultdict(list), self.experiments(), set()
        for r in experiments:
            tags.add(on := swarm.tag_name(r.body["hardware"]))
            if tag and on != tag:
                continue
            if grep and grep.lower() not in (r.body["hypothesis"] + "\n" + _changed_lines(r.body["diff"])).lower():
                continue
            groups[change_of(r.body["diff"]) or r.body["idea"]].append(r)
        ideas = []
        for rs in groups.values():
            deltas = [r.body["after"]["val_bpb"] - r.body["before"]["val_bpb"] for r in rs
                      if r.body["after"] and r.body["before"]]
            outcomes = defaultdict(int)
            for r in rs:
                outcomes[r.body["status"]] += 1
            ideas.append(dict(description=rs[0].body["hypothesis"], tries=len(rs),
                              tags=sorted({swarm.tag_name(r.body["hardware"]) for r in rs}),
                              authors=sorted({r.author_id for r in rs}),
                              median_delta=statistics.median(deltas) if deltas else None, outcomes=dict(outcomes),
                              experiments=[dict(record=r.id.hex(), author=r.author_id, status=r.body["status"],
                                                proposer=r.body["proposer"],
                                                parent=r.body["parent"], child=r.body["child"],
                                                tag=swarm.tag_name(r.body["hardware"]),
                                                delta=(r.body["after"]["val_bpb"] - r.body["before"]["val_bpb"])
                                                if r.body["after"] and r.body["before"] else None) for r in rs]))
        ideas.sort(key=lambda i: (i["median_delta"] is None, i["median_delta"] or 0.0))
        claims = [dict(author=c.author_id, description=c.body["description"], idea=c.body["idea"],
                       tag=swarm.tag_name(c.body["hardware"]), expires_in_s=round(expiry(c) - now))
                  for c in in_flight(self.ledger.claims, experiments, now)
                  if (not grep or grep.lower() in c.body["description"].lower())
                  and (not tag or swarm.tag_name(c.body["hardware"]) == tag)]
        return dict(ideas=ideas, claims=claims, experiments=sum(i["tries"] for i in ideas), tags=sorted(tags))
