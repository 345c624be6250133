"""Swarm memory: ideas equal by content, claims honoured, expired, flooded and unfulfilled,
experiment records checked, and the proposers learning from (and stepping around) the swarm."""
import os
import time

import pytest

from conftest import ROOT
from gossip import wire
from gossip.identity import Identity
from gossip.store import Store
from node import config, gittree, loop, memory, proposer as proposers, swarm

BASELINE = open(os.path.join(ROOT, "model", "train.py")).read()
BOB, MALLORY = Identity.from_seed(b"bob"), Identity.from_seed(b"mallory")
HW = dict(accelerator="Xeon", count=1, backend="cpu", framework="torch 2.13.0", budget_seconds=30.0, profile="cpu",
          data_fingerprint="f" * 64)
TASK = "t" * 16
KNOWN = {swarm.content_hash(BASELINE): BASELINE}


def edit(text, old, new):
    assert old in text
    return text.replace(old, new, 1)


UP = edit(BASELINE, "MATRIX_LR = 0.04", "MATRIX_LR = 0.06")


def experiment(author, parent, child, status="discard", gain=-0.01, hardware=HW, idea=None, diff=None, ts=None):
    score = dict(val_bpb=3.0, runs=1, spread=0.002)
    body = dict(task=TASK, lineage="torch", parent=swarm.content_hash(parent), child=swarm.content_hash(child),
                idea=idea or memory.idea_key(parent, child), diff=gittree.diff_texts(parent, child) if diff is None else diff,
                hypothesis="a try", status=status, before=score,
                after=None if status == "crash" else dict(score, val_bpb=3.0 - gain), hardware=hardware,
                proposer="offline", log_tail="")
    return wire.make_record(author, "experiment", body, ts or time.time() * 1000)


def claim(author, parent, child, expires_in=60.0, hardware=HW, now=None, diff=False):
    now = now or time.time()
    body = dict(task=TASK, parent=swarm.content_hash(parent), child=swarm.content_hash(child),
                idea=memory.idea_key(parent, child), hardware=hardware, description="trying", expires=int((now + expires_in) * 1000),
                **({"diff": gittree.diff_texts(parent, child)} if diff else {}))
    return wire.make_record(author, "claim", body, now * 1000)


@pytest.fixture
def mem(tmp_path):
    store = Store(str(tmp_path / "gossip.sqlite"))
    yield memory.Memory(swarm.Ledger(store, TASK, "me"), KNOWN.get)
    store.close()


def add(mem, *records):
    for r in records:
        mem.ledger.db.add(r)
    mem.ledger.refresh()
    return mem


def test_a_reformatted_edit_is_the_same_idea():
    same = edit(UP, "MATRIX_LR = 0.06           # Muon", "MATRIX_LR=6e-2  # Muon, a note of ours;")
    assert memory.idea_key(BASELINE, same) == memory.idea_key(BASELINE, UP)
    assert memory.idea_key(BASELINE, edit(BASELINE, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05")) != memory.idea_key(BASELINE, UP)
    assert memory.idea_key(UP, UP) != memory.idea_key(BASELINE, UP)  # the same child of another parent
    other_parent = edit(BASELINE, "ROPE_BASE = 200_000", "ROPE_BASE = 100_000")
    assert memory.change_of(gittree.diff_texts(BASELINE, UP)) == memory.change_of(
        gittree.diff_texts(other_parent, edit(other_parent, "MATRIX_LR = 0.04", "MATRIX_LR = 0.06")))
    assert memory.edit_from_diff(gittree.diff_texts(BASELINE, UP)) == {
        "changes": [{"name": "MATRIX_LR", "dir": "up", "old": 0.04, "new": 0.06}]}
    assert memory.edit_from_diff(gittree.diff_texts(BASELINE, edit(BASELINE, "lr=MATRIX_LR,", "lr=2 * MATRIX_LR,"))) is None


def test_claims_honoured_expired_flooded_and_unfulfilled(mem):
    now = time.time()
    a, b = edit(BASELINE, "DEPTH = 4", "DEPTH = 5"), edit(BASELINE, "DEPTH = 4", "DEPTH = 3")
    add(mem, claim(BOB, BASELINE, UP, now=now), claim(BOB, BASELINE, a, expires_in=-1, now=now),
        claim(BOB, BASELINE, b, hardware=dict(HW, backend="cuda", accelerator="H100"), now=now))
    honoured = mem.claims(HW, now)
    assert set(honoured) == {memory.idea_key(BASELINE, UP)}  # the expired one and the other tag's are not
    flood = [claim(MALLORY, BASELINE, edit(BASELINE, "MATRIX_LR = 0.04", f"MATRIX_LR = 0.0{i}"), now=now - i)
             for i in range(5, 10)]
    add(mem, *flood)
    assert sum(c.author_id == MALLORY.id for cs in mem.claims(HW, now).values() for c in cs) == memory.MAX_ACTIVE_CLAIMS
    assert mem.ignored["over_limit"] == 3
    # claims that never turn into experiment records: that peer's claims stop counting
    stale = [claim(MALLORY, BASELINE, edit(BASELINE, "SCALAR_LR = 0.5", f"SCALAR_LR = 0.{i}"), expires_in=-10, now=now)
             for i in range(1, 4)]
    add(mem, *stale)
    assert not any(c.author_id == MALLORY.id for cs in mem.claims(HW, now).values() for c in cs)
    assert mem.ignored["unfulfilled"] == 5
    # Bob's expired claim became an experiment: he stays honoured
    add(mem, experiment(BOB, BASELINE, a))
    assert memory.idea_key(BASELINE, UP) in mem.claims(HW, now) and memory.idea_key(BASELINE, a) in mem.measured(HW)


def test_a_claim_that_says_it_lasts_a_year_is_honoured_and_shown_for_a_day_at_most(mem):
    now = time.time()
    c = claim(MALLORY, BASELINE, UP, expires_in=365 * 86400, now=now)
    add(mem, c)
    assert memory.expiry(c) == pytest.approx(now + memory.MAX_CLAIM_S)
    assert not mem.claims(HW, now + memory.MAX_CLAIM_S + 1)  # knowledge and watch show this expiry too


def test_knowledge_grep_matches_what_an_idea_changes_not_its_neighbours(mem):
    add(mem, experiment(BOB, BASELINE, UP))  # MATRIX_LR: its diff's context shows EMBEDDING_LR and SCALAR_LR
    assert "EMBEDDING_LR" in experiment(BOB, BASELINE, UP).body["diff"]
    assert not mem.knowledge(time.time(), grep="EMBEDDING_LR")["ideas"]
    assert len(mem.knowledge(time.time(), grep="matrix_lr = 0.06")["ideas"]) == 1
    add(mem, claim(BOB, BASELINE, edit(BASELINE, "DEPTH = 4", "DEPTH = 5")))
    k = mem.knowledge(time.time(), tag="nosuchtag")
    assert not k["ideas"] and not k["claims"] and k["tags"] == [swarm.tag_name(HW)]  # knowledge names the tags there are


def test_claims_lost_in_a_race_are_not_held_against_their_author(mem):
    """A node that claimed an idea a peer had claimed a moment earlier chooses again (loop.Node.lost_race):
    that its claim never becomes a record does not make its later claims count for nothing."""
    now = time.time()
    carol = Identity.from_seed(b"carol")
    children = [edit(BASELINE, "SCALAR_LR = 0.5", f"SCALAR_LR = 0.{i}") for i in range(1, 4)]
    for child in children:  # Carol claimed first each time and ran it; Bob lost the race three times
        add(mem, claim(carol, BASELINE, child, expires_in=90, now=now - 100), claim(BOB, BASELINE, child, expires_in=89, now=now - 99),
            experiment(carol, BASELINE, child))
    add(mem, claim(BOB, BASELINE, UP, now=now))
    assert memory.idea_key(BASELINE, UP) in mem.claims(HW, now) and not mem.ignored["unfulfilled"]
    # claims that lost to another tag's claim were no race: they count
    other = dict(HW, backend="cuda", accelerator="H100")
    for child in children:
        add(mem, claim(MALLORY, BASELINE, child, expires_in=89, now=now - 99, hardware=other))
    add(mem, claim(MALLORY, BASELINE, UP, hardware=other, now=now))
    claimed = mem.claims(HW, now, compatible=False)[memory.idea_key(BASELINE, UP)]
    assert [c.author_id for c in claimed] == [BOB.id] and mem.ignored["unfulfilled"] == 1


def test_experiment_records_are_checked_against_their_parent(mem):
    good = experiment(BOB, BASELINE, UP)
    wrong_diff = experiment(MALLORY, BASELINE, UP, diff=gittree.diff_texts(UP, edit(UP, "MATRIX_LR = 0.06", "MATRIX_LR = 0.07")))
    wrong_child = experiment(MALLORY, BASELINE, edit(BASELINE, "DEPTH = 4", "DEPTH = 9"), diff=gittree.diff_texts(BASELINE, UP))
    wrong_idea = experiment(MALLORY, BASELINE, UP, idea="0" * 64)
    unknown_parent = experiment(BOB, UP, edit(UP, "DEPTH = 4", "DEPTH = 5"))
    add(mem, good, wrong_diff, wrong_child, wrong_idea, unknown_parent)
    assert {r.id for r in mem.experiments()} == {good.id, unknown_parent.id}
    assert dict(mem.rejected) == {"diff_does_not_apply": 1, "child_mismatch": 1, "idea_mismatch": 1}
    body = dict(good.body, log_tail="x" * (wire.LOG_TAIL_CHARS + 1))
    with pytest.raises(wire.WireError, match="log_tail"):
        wire.make_record(BOB, "experiment", body, time.time() * 1000)


def test_the_offline_proposer_learns_from_the_swarm_and_steps_around_it(mem):
    ctx = lambda history, taken=None: proposers.Context(BASELINE, history, 0.002, "cpu", [], taken)
    first = proposers.OfflineProposer(0).propose(ctx([]))
    assert "MATRIX_LR" in first.description and "->" in first.description
    # the swarm measured that very edit (elsewhere crashing): it is not proposed again, and its arm is penalised
    add(mem, *[experiment(BOB, BASELINE, first.source, status="crash") for _ in range(1)])
    measured = mem.measured(HW)
    taken = lambda source: memory.idea_key(BASELINE, source) in measured
    history = mem.history(HW, 0.002)
    assert history and history[0]["status"] == "crash" and history[0]["weight"] == 1.0
    second = proposers.OfflineProposer(0).propose(ctx(history, taken))
    assert second.source != first.source and memory.idea_key(BASELINE, second.source) not in measured
    far = mem.history(dict(HW, backend="cuda", accelerator="H100"), 0.002)
    assert far[0]["weight"] == 0.3  # another tag's result: a weaker prior


def test_a_node_skips_what_a_peer_claimed_and_counts_it(tmp_path, stdlib_data):
    s = dict(config.load(os.path.join(ROOT, "configs", "cpu.toml")), budget=1.0, listen="off", proposer_seed=0)
    node = loop.Node(str(tmp_path / "n"), s, stdlib_data, out=open(os.devnull, "w"))
    try:
        first = node.next_candidate()
        hw = node.hardware()
        for r in (claim(BOB, BASELINE, first.source, hardware=hw),):
            node.records.add(wire.make_record(BOB, "claim", dict(r.body, task=node.task), r.ts))
        second = node.next_candidate()
        assert second.source != first.source
        st = loop.status(str(tmp_path / "n"))
        assert st["memory"]["skipped_claimed"] == 1
        # and our own claims are published before a run (here, with the network off, stored), with the diff
        node.claim(node.best(), node.best(), "a" * 64, "x", "-A = 1\n+A = 2\n")
        assert any(r.type == "claim" and r.author_id == node.identity.id and r.body["diff"] == "-A = 1\n+A = 2\n"
                   for _, r in node.records.since())
        assert not node.lost_race(node.records.since()[-1][1])  # no network, no peers: nothing to wait for
        # no run has ended yet: the claim lasts twice the budget and the start-up allowance, each
        # run (a first claim that lasted twice the budget expired while its run waited for the device)
        from sandbox.run import LIMITS
        mine = node.records.since()[-1][1]
        run_s = s["budget"] + LIMITS[s["profile"]]["startup"]
        assert mine.body["expires"] >= mine.ts + 2 * run_s * (1 + s["max_reruns"]) * 1000 - 1000
    finally:
        node.close()


def test_of_two_claims_of_one_candidate_made_at_once_the_earlier_runs(tmp_path, stdlib_data, monkeypatch):
    s = dict(config.load(os.path.join(ROOT, "configs", "cpu.toml")), budget=1.0, listen="off", claim_settle=0.01)
    node = loop.Node(str(tmp_path / "n"), s, stdlib_data, out=open(os.devnull, "w"))
    try:
        class Peers:  # a network with one peer alive; what we publish lands in our store
            alive = staticmethod(lambda: 1)
            publish = staticmethod(node.records.add)
            stop = staticmethod(lambda: None)
        monkeypatch.setattr(node, "network", Peers)
        hw, best = node.hardware(), node.tree.read(node.best())
        diff = gittree.diff_texts(best, UP)
        ours = node.claim(node.best(), node.tree.commit(UP, "up"), memory.idea_key(best, UP), "up", diff)
        node.tree.reset(node.best())
        later = claim(BOB, best, UP, hardware=hw, now=ours.ts / 1000 + 0.5)
        node.records.add(wire.make_record(BOB, "claim", dict(later.body, task=node.task), later.ts))
        assert not node.lost_race(ours)
        earlier = claim(MALLORY, best, UP, hardware=hw, now=ours.ts / 1000 - 0.5)
        node.records.add(wire.make_record(MALLORY, "claim", dict(earlier.body, task=node.task), earlier.ts))
        assert node.lost_race(ours)
    finally:
        node.close()


def test_parameters_peers_are_trying_now_come_last(mem):
    """Claims carry their diffs: nodes whose trees differ (so their candidates are different ideas)
    still try different parameters at once, on any tag."""
    now = time.time()
    ctx = lambda busy: proposers.Context(BASELINE, [], 0.002, "cpu", [], None, busy)
    alone = proposers.OfflineProposer(0).propose(ctx(frozenset()))
    [change] = alone.edit["changes"]
    other_tree = edit(BASELINE, "DEPTH = 4", "DEPTH = 5")
    line = next(l for l in BASELINE.splitlines() if l.startswith(change["name"] + " ="))
    on_other_tree = edit(other_tree, line, line.replace(str(change["old"]), str(change["new"]), 1))
    add(mem, claim(BOB, other_tree, on_other_tree, diff=True, hardware=dict(HW, backend="cuda", accelerator="H100"), now=now),
        claim(MALLORY, BASELINE, edit(BASELINE, "WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.5"), diff=True,
              expires_in=-1, now=now))
    assert mem.busy(HW, now) == {(change["name"], change["dir"])}  # another tag's claim counts; an expired one does not
    crowded = proposers.OfflineProposer(0).propose(ctx(mem.busy(HW, now)))
    assert [(c["name"], c["dir"]) for c in crowded.edit["changes"]] != [(change["name"], change["dir"])]


def test_the_step_of_a_parameter_shrinks_with_our_own_tries_only():
    tries = lambda n, author: [dict(edit={"changes": [{"name": "MATRIX_LR", "dir": "up"}]}, status="discard",
                                    val_bpb=3.01, parent_bpb=3.0, **({"author": author} if author else {}))] * n
    ctx = lambda history: proposers.Context(BASELINE, history, 0.002, "cpu", [], None)
    peers = dict(proposers.OfflineProposer(0)._stats(ctx(tries(9, "bob"))))[("MATRIX_LR", "up")]
    ours = dict(proposers.OfflineProposer(0)._stats(ctx(tries(9, None))))[("MATRIX_LR", "up")]
    assert peers[0] == ours[0] == 9 and peers[2] == 0 and ours[2] == 9  # the bandit counts both


def test_noise_is_pooled_with_same_tag_peers_records(mem):
    def spread(author, sd, runs, hardware=HW, child=UP):
        r = experiment(author, BASELINE, child, hardware=hardware)
        body = dict(r.body, before=dict(val_bpb=3.0, runs=runs, spread=sd), after=dict(val_bpb=3.0, runs=runs, spread=sd))
        return wire.make_record(author, "experiment", body, r.ts)
    add(mem, spread(BOB, 0.003, 2), spread(BOB, 0.003, 3, child=edit(BASELINE, "DEPTH = 4", "DEPTH = 5")),
        spread(MALLORY, 0.0001, 1), spread(Identity.from_seed(b"far"), 0.05, 5, hardware=dict(HW, accelerator="H100")))
    ss, dof = mem.peer_noise(HW)
    # Bob: the baseline (before) twice with 3 runs at most, UP with 2, the other child with 3; one run says nothing
    assert dof == 2 + 1 + 2 and ss == pytest.approx(5 * 0.003 ** 2)
    assert loop.noise({"c": [1.0, 1.0]}, 0.0, (ss, dof)) == pytest.approx(0.003 * (5 / 6) ** 0.5)
    many = [spread(Identity.from_seed(b"sybil"), 0.0001, 40, child=edit(BASELINE, "DEPTH = 4", f"DEPTH = {d}"))
            for d in (6, 7, 8)]
    add(mem, *many)
    # one peer counts for at most 8 degrees of freedom, and peers none of whose improvements were
    # confirmed (Bob and the sybil here) for at most 8 together
    assert mem.peer_noise(HW)[1] == memory.MAX_PEER_DOF


def raw_claim(author, diff, now, expires, idea="b" * 64):
    body = dict(task=TASK, parent=swarm.content_hash(BASELINE), child="a" * 64, idea=idea, hardware=HW,
                description="trying", expires=expires, diff=diff)
    return wire.make_record(author, "claim", body, now * 1000)


def test_hostile_records_cost_a_node_nothing(mem):
    """One signed record from a fresh key must not stop a node (records are kept: a crash would
    come back on every start), hold an idea for good, or hold the node in arithmetic."""
    now = time.time()
    deep = edit(BASELINE, "MATRIX_LR = 0.04", "MATRIX_LR = " + "-" * 3000 + "1")  # ast.parse: RecursionError
    hunk = lambda old, new: f"--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-{old}\n+{new}\n"
    add(mem, experiment(MALLORY, BASELINE, deep),
        raw_claim(MALLORY, hunk("DEPTH = 8", 'DEPTH = "SL"'), now, int((now + 60) * 1000), idea="1" * 64),
        raw_claim(MALLORY, hunk("DEPTH = 8", "DEPTH = " + "9" * 4000), now, int((now + 60) * 1000), idea="2" * 64),
        raw_claim(BOB, hunk("DEPTH = 8", "DEPTH = 2**9999999999"), now, int((now + 60) * 1000), idea="3" * 64),
        raw_claim(BOB, hunk("MATRIX_LR = 0.04", "MATRIX_LR = 1e999"), now, 2**62, idea="4" * 64))
    unknown = edit(BASELINE, "DEPTH = 4", "DEPTH = 6")  # a parent not rebuildable here: the record is kept unchecked
    add(mem, experiment(MALLORY, unknown, UP, diff=hunk("MATRIX_LR = 0.04", "MATRIX_LR = " + "9" * 5000)))  # int(): 4300 digits at most
    assert mem.busy(HW, now) == frozenset() and mem.history(HW, 0.01) == []
    assert len(mem.experiments()) == 2
    assert memory.normal_form("x = " + "-" * 3000 + "1")  # the text's form: no exception
    assert set(mem.claims(HW, now)) == {c * 64 for c in "1234"}
    assert set(mem.claims(HW, now + 25 * 3600)) == set()  # an expiry 2^62 ms away holds 24 h at most
    for bad in (dict(val_bpb=3.0, runs=2, spread=1e300), dict(val_bpb=float("nan"), runs=2, spread=0.0),
                dict(val_bpb=3.0, runs=2, spread=-1.0), dict(val_bpb=3.0, runs=10**9, spread=0.0)):
        with pytest.raises(wire.WireError):
            wire.make_record(MALLORY, "experiment", dict(experiment(MALLORY, BASELINE, UP).body, before=bad), now * 1000)
    assert swarm.tag_name(dict(HW, budget_seconds="x")) == "cpu/Xeon x1/xs/cpu"


def test_a_claim_is_done_once_its_record_is_here(mem):
    now = time.time()
    add(mem, claim(BOB, BASELINE, UP, now=now, diff=True))
    assert mem.busy(HW, now) == {("MATRIX_LR", "up")}
    assert [c["author"] for c in mem.knowledge(now)["claims"]] == [BOB.id]
    add(mem, experiment(BOB, BASELINE, UP))
    assert mem.claims(HW, now) == {} and mem.busy(HW, now) == frozenset()
    assert mem.knowledge(now)["claims"] == []  # not shown as tried now either (python -m node knowledge)


def test_a_claim_that_lost_the_race_is_not_shown_as_tried_now(mem):
    """Two nodes claimed one idea; the later chose again (loop.Node.lost_race) and ran something else.
    knowledge and watch showed its claim as "being tried now" until it expired (seen with two nodes on
    loopback: the winner's own watch listed the loser trying the very change the winner had just kept)."""
    now = time.time()
    won, lost = claim(MALLORY, BASELINE, UP, now=now - 3), claim(BOB, BASELINE, UP, now=now - 2)
    add(mem, won, lost)
    assert [c["author"] for c in mem.knowledge(now)["claims"]] == [MALLORY.id]
    assert memory.in_flight(mem.ledger.claims, mem.experiments(), now) == [won]  # what watch shows
    add(mem, experiment(MALLORY, BASELINE, UP, status="keep"))
    assert mem.knowledge(now)["claims"] == [] and memory.in_flight(mem.ledger.claims, mem.experiments(), now) == []
    # a claim of the same idea on another kind of hardware raced nobody: it stands
    other = claim(BOB, BASELINE, UP, now=now - 1, hardware=dict(HW, backend="cuda", accelerator="H100"))
    add(mem, other)
    assert memory.in_flight(mem.ledger.claims, mem.experiments(), now) == [other]


def test_fresh_keys_move_the_noise_estimate_no_more_than_one_peer(mem):
    keys = [Identity.from_seed(b"sybil%d" % i) for i in range(20)]
    quiet = dict(val_bpb=3.0, runs=9, spread=0.0)
    for i, k in enumerate(keys):
        child = edit(BASELINE, "MATRIX_LR = 0.04", f"MATRIX_LR = 0.0{i + 10}")
        add(mem, wire.make_record(k, "experiment", dict(experiment(k, BASELINE, child).body, before=quiet, after=quiet),
                                  time.time() * 1000))
    ss, dof = mem.peer_noise(HW)
    assert ss == 0 and dof == pytest.approx(memory.MAX_PEER_DOF)


def improvement(author, parent, child, diff=None):
    """An improvement record from `parent` to `child` whose diff is `diff` (default: the true one)."""
    score = dict(val_bpb=3.0, runs=2, spread=0.002)
    return wire.make_record(author, "improvement", dict(
        task=TASK, lineage="torch", parent=swarm.content_hash(parent), child=swarm.content_hash(child),
        diff=gittree.diff_texts(parent, child) if diff is None else diff, before=score,
        after=dict(score, val_bpb=2.99), hardware=HW, proposer="offline", description="x"), time.time() * 1000)


def test_a_forged_shortcut_does_not_hide_an_honest_chain(tmp_path):
    """A record from the baseline straight to an honest chain's end, with a diff that does not give
    it, must not stop the node rebuilding that end through the honest chain."""
    store = Store(str(tmp_path / "gossip.sqlite"))
    ledger = swarm.Ledger(store, TASK, "me")
    c1 = UP
    c2 = edit(c1, "EMBEDDING_LR = ", "EMBEDDING_LR = 0.5 * ")
    forged = improvement(MALLORY, BASELINE, c2, gittree.diff_texts(BASELINE, c1))
    for r in (forged, improvement(BOB, BASELINE, c1), improvement(BOB, c1, c2)):
        store.add(r)
    ledger.refresh()
    assert ledger.source(swarm.content_hash(c2), KNOWN.get) == c2
    assert forged.id in ledger.unbuildable
    store.close()


def test_a_peers_text_and_numbers_stay_bounded(tmp_path):
    """What a peer controls: a tag of any length, a diff line of 250 KB of spaces (a quadratic
    regex), a comment-only change beside a real one; and our own scores must always sign."""
    assert len(swarm.tag_name(dict(HW, accelerator="A" * 100_000, profile="p" * 100_000))) < 300
    assert memory.edit_from_diff("+AB = 1" + " " * 250_000 + "x\n") is None
    both = edit(edit(BASELINE, "MATRIX_LR = 0.04           # Muon", "MATRIX_LR = 0.04  # Muon, noted"),
                "EMBEDDING_LR = 0.9", "EMBEDDING_LR = 0.6")
    assert memory.edit_from_diff(gittree.diff_texts(BASELINE, both)) == {
        "changes": [{"name": "EMBEDDING_LR", "dir": "down", "old": 0.9, "new": 0.6}]}
    huge = swarm.score([1e300, 1e300, float("inf")], 0.01)
    assert huge["val_bpb"] == huge["spread"] == wire.MAX_BPB
    wire.make_record(BOB, "experiment", dict(experiment(BOB, BASELINE, UP).body, after=huge), time.time() * 1000)


def test_a_route_cut_short_does_not_hide_a_parent_from_another(tmp_path):
    """Honest K -> W -> X -> Y. A forger's W -> Y (a wrong diff) is tried first and reaches X only
    by way of W, where W -> X is cut as a cycle: X must not count as unbuildable for the honest
    X -> Y tried next."""
    store = Store(str(tmp_path / "gossip.sqlite"))
    ledger = swarm.Ledger(store, TASK, "me")
    w = UP
    x = edit(w, "EMBEDDING_LR = 0.9", "EMBEDDING_LR = 0.6")
    y = edit(x, "WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.6")
    for r in (improvement(MALLORY, w, y, gittree.diff_texts(w, x)), improvement(MALLORY, x, w),
              improvement(BOB, BASELINE, w), improvement(BOB, w, x), improvement(BOB, x, y)):
        store.add(r)
    ledger.refresh()
    assert ledger.source(swarm.content_hash(y), KNOWN.get) == y
    store.close()


def test_a_tangle_of_forged_records_costs_one_pass(tmp_path):
    """Sixteen made-up parents, each named the child of every other and the parent of the wanted
    tree: a search over routes would try them all (16! of them); one pass over the records finds
    the honest step beside them."""
    store = Store(str(tmp_path / "gossip.sqlite"))
    ledger = swarm.Ledger(store, TASK, "me")
    fakes = [edit(BASELINE, "DEPTH = 4", f"DEPTH = {d}") for d in range(10, 26)]  # never known here
    for a in fakes:
        store.add(improvement(MALLORY, a, UP))
        for b in fakes:
            if a is not b:
                store.add(improvement(MALLORY, a, b))
    store.add(improvement(BOB, BASELINE, UP))
    ledger.refresh()
    assert ledger.source(swarm.content_hash(UP), KNOWN.get) == UP
    store.close()


def test_one_tree_run_once_by_several_peers_gives_their_spread(mem):
    """Peers of our tag that each ran the baseline once (read from their claims' parent_score, or
    from their records' scores) give the noise: k runs, k - 1 degrees of freedom; one peer alone,
    or peers of another tag, give none."""
    now = time.time()

    def claiming(author, val, hardware=HW):
        body = dict(claim(author, BASELINE, UP, now=now).body, hardware=hardware,
                    parent_score=dict(val_bpb=val, runs=1, spread=0.0005))
        return wire.make_record(author, "claim", body, now * 1000)
    add(mem, claiming(BOB, 3.000), claiming(Identity.from_seed(b"far"), 3.5, hardware=dict(HW, accelerator="H100")))
    assert mem.peer_noise(HW) == (0.0, 0.0)
    carol = Identity.from_seed(b"carol")
    add(mem, claiming(carol, 3.004))
    ss, dof = mem.peer_noise(HW)
    assert dof == 1 and ss == pytest.approx(2 * 0.002 ** 2)
    add(mem, experiment(Identity.from_seed(b"dave"), BASELINE, UP))  # its before: the baseline at 3.0, one run
    ss, dof = mem.peer_noise(HW)
    m = (3.000 + 3.004 + 3.0) / 3
    assert dof == 2 and ss == pytest.approx(sum((x - m) ** 2 for x in (3.000, 3.004, 3.0)))
    assert loop.noise({}, 0.0005, (ss, dof)) == pytest.approx((ss / 2) ** 0.5)
