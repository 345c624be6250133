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


def claim(author, parent, child, expires_in=60.0, hardware=HW, now=None):
    now = now or time.time()
    body = dict(task=TASK, parent=swarm.content_hash(parent), child=swarm.content_hash(child),
                idea=memory.idea_key(parent, child), hardware=hardware, description="trying", expires=int((now + expires_in) * 1000))
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
        # and our own claims are published before a run (here, with the network off, stored)
        node.claim(node.best(), node.best(), "a" * 64, "x")
        assert any(r.type == "claim" and r.author_id == node.identity.id for _, r in node.records.since())
    finally:
        node.close()
