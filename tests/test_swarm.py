"""The swarm: foreign improvements rebuilt, rebased with git's three-way merge, ranked, verified
in the real sandbox, adopted or refuted, attested; records durable before they are sent."""
import contextlib
import os
import time

import pytest

from conftest import LR_LINE, ROOT, SLOW, SMALL
from gossip import wire
from gossip.identity import Identity
from gossip.store import Store
from node import config, export, gittree, loop, plot, swarm, watch

BASELINE = open(os.path.join(ROOT, "model", "train.py")).read()
ALICE, MALLORY = Identity.from_seed(b"alice"), Identity.from_seed(b"mallory")
HW = dict(accelerator="Intel(R) Xeon(R) Processor", count=1, backend="cpu", framework="torch 2.13.0",
          budget_seconds=2.0, profile="cpu", data_fingerprint="f" * 64)
TASK = "t" * 16


def edit(text, old, new):
    assert old in text
    return text.replace(old, new, 1)


def improvement(author, parent, child, gain=0.05, spread=0.002, runs=2, hardware=HW, task=TASK, diff=None,
                proposer="offline", ts=None, description="a change"):
    body = dict(task=task, lineage=swarm.LINEAGE, parent=swarm.content_hash(parent), child=swarm.content_hash(child),
                diff=gittree.diff_texts(parent, child) if diff is None else diff,
                before=dict(val_bpb=3.0, runs=runs, spread=spread), after=dict(val_bpb=3.0 - gain, runs=runs, spread=spread),
                hardware=hardware, proposer=proposer, description=description)
    return wire.make_record(author, "improvement", body, ts or time.time() * 1000)


def attestation(author, record, verdict, hardware=HW):
    body = dict(task=TASK, improvement=record.id, verdict=verdict, before=None, after=None, hardware=hardware, note="")
    return wire.make_record(author, "attestation", body, time.time() * 1000)


@pytest.fixture
def ledger(tmp_path):
    store = Store(str(tmp_path / "gossip.sqlite"))
    yield swarm.Ledger(store, TASK, "me")
    store.close()


def add(ledger, *records):
    for r in records:
        ledger.db.add(r)
    return ledger.refresh()


KNOWN = {swarm.content_hash(BASELINE): BASELINE}
X = edit(BASELINE, "MATRIX_LR = 0.04", "MATRIX_LR = 0.08")
Y = edit(X, "WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.6")
Z = edit(BASELINE, "ROPE_BASE = 200_000", "ROPE_BASE = 100_000")


def test_a_parent_is_rebuilt_through_a_chain_of_improvements(ledger):
    rx, ry = improvement(ALICE, BASELINE, X), improvement(ALICE, X, Y)
    add(ledger, ry)
    assert ledger.source(swarm.content_hash(Y), KNOWN.get) is None  # X is not known yet
    add(ledger, rx)
    assert ledger.source(swarm.content_hash(Y), KNOWN.get) == Y
    # a record whose diff does not give the child it names is never followed
    liar = improvement(MALLORY, BASELINE, Z, diff=gittree.diff_texts(BASELINE, X))
    add(ledger, liar)
    assert ledger.source(swarm.content_hash(Z), KNOWN.get) is None
    # a cycle of records ends
    a, b = edit(Z, "100_000", "50_000"), edit(Z, "100_000", "25_000")
    add(ledger, improvement(MALLORY, a, b), improvement(MALLORY, b, a))
    assert ledger.source(swarm.content_hash(a), KNOWN.get) is None


def test_plans_rebase_reject_hold_and_wait(ledger):
    rx, ry = improvement(ALICE, BASELINE, X), improvement(ALICE, X, Y)
    add(ledger, rx)
    p = swarm.plan(ledger, rx, Z, KNOWN.get)  # our best holds another change: three-way merge keeps both
    assert p.action == "run" and "MATRIX_LR = 0.08" in p.source and "ROPE_BASE = 100_000" in p.source
    assert swarm.plan(ledger, rx, BASELINE, KNOWN.get) == swarm.Plan("run", source=X)
    assert swarm.plan(ledger, rx, X, KNOWN.get).action == "held"
    assert swarm.plan(ledger, ry, BASELINE, KNOWN.get).action == "run"  # its parent rebuilt from rx
    conflict = edit(BASELINE, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05")
    p = swarm.plan(ledger, rx, conflict, KNOWN.get)
    assert (p.action, p.verdict) == ("reject", "failed_to_apply") and "conflict" in p.note
    other = improvement(MALLORY, BASELINE, X, diff=gittree.diff_texts(BASELINE, X).replace("train.py", "prepare.py"))
    p = swarm.plan(ledger, other, BASELINE, KNOWN.get)
    assert p.action == "reject" and "only changes to train.py" in p.note
    wrong = improvement(MALLORY, BASELINE, Z, diff=gittree.diff_texts(BASELINE, X))
    p = swarm.plan(ledger, wrong, BASELINE, KNOWN.get)
    assert p.action == "reject" and "child hash" in p.note
    orphan = improvement(MALLORY, edit(BASELINE, "ROPE_BASE = 200_000", "ROPE_BASE = 10_000"), Z)
    assert swarm.plan(ledger, orphan, BASELINE, KNOWN.get).action == "wait"


def test_a_win_stacked_on_an_earlier_one_waits_for_it_rather_than_being_rejected(ledger):
    """Alice kept MATRIX_LR 0.04 -> 0.08, then 0.08 -> 0.07 on top. Before her first win is judged
    here, the second conflicts with our best (both change one line); rejected then, it was never
    tried again once the first was adopted."""
    rx = improvement(ALICE, BASELINE, X)
    stacked = edit(X, "MATRIX_LR = 0.08", "MATRIX_LR = 0.07")
    rs = improvement(ALICE, X, stacked)
    add(ledger, rx, rs)
    pending = {rx.body["child"], rs.body["child"]}
    p = swarm.plan(ledger, rs, BASELINE, KNOWN.get, pending=pending)
    assert p.action == "wait" and "not judged here yet" in p.note
    assert swarm.plan(ledger, rs, X, KNOWN.get, pending={rs.body["child"]}) == swarm.Plan("run", source=stacked)
    assert swarm.plan(ledger, rs, BASELINE, KNOWN.get, pending={rs.body["child"]}).verdict == "failed_to_apply"  # refuted
    entry = dict(priority=1.0, strong=True, gain=0.01, p_hold=0.9, standing=1.0, closeness=1.0, confirmed=0.0, refuted=0.0)
    b = swarm.batch(ledger, [swarm.Entry(rs, **entry), swarm.Entry(rx, **entry)], BASELINE, KNOWN.get, 8, pending=pending)
    assert b.records == (rx,) and not b.settled  # the stacked one waits; its parent runs


def test_edits_of_neighbouring_constants_merge_and_edits_of_one_line_conflict():
    ours = edit(BASELINE, "MATRIX_LR = 0.04", "MATRIX_LR = 0.06")
    theirs = edit(BASELINE, "SCALAR_LR = 0.5", "SCALAR_LR = 0.4")  # the line above: git alone calls it a conflict
    merged, conflicts = gittree.merge3(ours, BASELINE, theirs)
    assert conflicts == 0 and merged == edit(ours, "SCALAR_LR = 0.5", "SCALAR_LR = 0.4")
    both = edit(theirs, "MATRIX_LR = 0.04", "MATRIX_LR = 0.06")  # theirs holds ours too
    assert gittree.merge3(ours, BASELINE, both) == (both, 0)
    assert gittree.merge3(ours, BASELINE, edit(BASELINE, "MATRIX_LR = 0.04", "MATRIX_LR = 0.08"))[1] == 1
    grown = edit(BASELINE, "SCALAR_LR = 0.5            # Adam, per-layer residual scalars\n",
                 "SCALAR_LR = 0.5            # Adam, per-layer residual scalars\nEXTRA = 1\n")
    assert gittree.merge3(ours, BASELINE, grown)[1] == 1  # sides of unequal length: left to a person


def test_diffs_that_rename_or_touch_other_files_do_not_apply():
    d = gittree.diff_texts(BASELINE, X)
    for bad in (d.replace("diff --git a/train.py b/train.py", "diff --git a/train.py b/other.py\nrename from train.py\nrename to other.py"),
                d + "diff --git a/x b/x\nnew file mode 100755\n--- /dev/null\n+++ b/x\n@@ -0,0 +1 @@\n+hi\n",
                "not a diff at all\n"):
        with pytest.raises(gittree.GitError):
            gittree.apply_diff(BASELINE, bad)
    assert gittree.apply_diff(BASELINE, d) == X


def test_a_node_tree_diff_applies_even_when_its_last_context_line_is_blank(tmp_path):
    """A hunk three lines above a blank line ends on a context line of one space: stripping
    git's output turned it into a corrupt patch that every peer refused."""
    tree = gittree.Tree(str(tmp_path / "tree"))
    parent = tree.create(BASELINE)
    child = edit(BASELINE, "WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.612")
    diff = tree.diff(parent, tree.commit(child, "warmdown"))
    assert diff.endswith(" \n")
    assert gittree.apply_diff(BASELINE, diff) == child


def test_ranking_follows_evidence_standing_and_hardware(ledger):
    bob, carol = Identity.from_seed(b"bob"), Identity.from_seed(b"carol")
    good = improvement(ALICE, BASELINE, X, gain=0.02)
    forged = improvement(MALLORY, BASELINE, Z, gain=0.03)
    thin = improvement(bob, BASELINE, Y, gain=0.002, spread=0.002)  # inside its own noise
    far = improvement(carol, BASELINE, edit(BASELINE, "SCALAR_LR = 0.5", "SCALAR_LR = 0.45"), gain=0.02,
                      hardware=dict(HW, backend="cuda", accelerator="NVIDIA H100"))
    add(ledger, good, forged, thin, far, improvement(ALICE, BASELINE, Z, task="other-task"))
    rank = lambda done=(): [e.record.id for e in ledger.rank(HW, 0.002, 1.0, time.time(), set(done))]
    assert rank()[:2] == [forged.id, good.id] and rank()[-1] == thin.id  # before anyone attested
    assert ledger.other_tasks == {"other-task": 1}
    assert rank().index(far.id) > rank().index(good.id)  # the same claim from far hardware counts less
    add(ledger, attestation(bob, forged, "refuted"), attestation(carol, forged, "refuted"))
    assert rank().index(forged.id) > rank().index(good.id)
    assert ledger.standing(MALLORY.id) > 0.2
    add(ledger, attestation(bob, forged, "violation"))  # from a key that earned nothing: no more than a refutation
    assert ledger.standing(MALLORY.id) > 0.2
    earned = improvement(bob, BASELINE, edit(BASELINE, "SCALAR_LR = 0.5", "SCALAR_LR = 0.55"), gain=0.01)
    add(ledger, earned, attestation(carol, earned, "confirmed"), attestation(ALICE, earned, "confirmed"))
    assert ledger.standing(MALLORY.id) > 0.2  # others' confirmations: keys that confirm each other cost nothing
    me = Identity.from_seed(b"this node")
    ledger.me = me.id
    add(ledger, attestation(me, earned, "confirmed"))  # bob's work held when we ran it: his word now cuts
    later = improvement(MALLORY, BASELINE, Y, gain=0.03)
    add(ledger, later, attestation(bob, improvement(MALLORY, BASELINE, X), "violation"))
    add(ledger, attestation(bob, forged, "violation"))
    assert ledger.standing(MALLORY.id) < 0.05 and rank().index(later.id) > rank().index(good.id)
    entries = {e.record.id: e for e in ledger.rank(HW, 0.002, 1.0, time.time(), set())}
    assert entries[good.id].strong and not entries[thin.id].strong and not entries[later.id].strong
    assert good.id not in rank({good.id})  # our own verdict takes it off the queue
    add(ledger, attestation(MALLORY, good, "refuted"))  # a discredited node's word weighs little
    entries = {e.record.id: e for e in ledger.rank(HW, 0.002, 1.0, time.time(), set())}
    assert entries[good.id].strong and entries[good.id].p_hold > 0.9 and ledger.standing(ALICE.id) > 0.45
    adoption = improvement(bob, BASELINE, X, proposer=swarm.ADOPT + good.id.hex())
    add(ledger, adoption)
    assert adoption.id not in rank() and swarm.adopted_from(adoption) == (good.id,)


def test_log_tails_leave_no_paths_or_secrets():
    tail = ('Traceback:\n  File "/tmp/autoresearch-candidate-x/train.py", line 3\n'
            "ANTHROPIC_API_KEY=sk-ant-123 /home/alice/.ssh/id_ed25519\nValueError: 1/2")
    out = loop.scrub(tail)
    assert '"train.py"' in out and "sk-ant" not in out and "/home" not in out and "1/2" in out


def fake_sandbox(monkeypatch, score):
    """sandbox.run replaced by `score(train.py text, seed)`: the loop's own bookkeeping, no training."""
    from sandbox import result, run as sandbox

    def run(folder, budget=None, profile=None, data=None, seed=None, backend=None, **kw):
        with open(os.path.join(folder, "train.py")) as f:
            v = score(f.read(), seed)
        hw = result.HardwareTag(**dict(HW, device="cpu", memory_gb=1))
        return result.Result("ok", v, 1.0, 1.0, 0.1, 100.0, 10, 1000, (), 0.0, hw, (), "")
    monkeypatch.setattr(sandbox, "run", run)


def test_foreign_improvements_are_verified_merged_in_one_run(tmp_path, stdlib_data, monkeypatch):
    """Credible wins that rebase cleanly beside each other run as one tree and are adopted together,
    each attested with the others named; one that conflicts waits; a merged run that does not hold
    attests nothing and the next verification runs one alone; two verifications never follow each
    other unless asked."""
    lr, emb = edit(BASELINE, "MATRIX_LR = 0.04", "MATRIX_LR = 0.08"), edit(BASELINE, "EMBEDDING_LR = 0.9", "EMBEDDING_LR = 0.6")
    rival = edit(BASELINE, "MATRIX_LR = 0.04", "MATRIX_LR = 0.06")  # the same line as `lr`
    harm = edit(BASELINE, "WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.5")
    scalar = edit(BASELINE, "SCALAR_LR = 0.5", "SCALAR_LR = 0.75")
    fake_sandbox(monkeypatch, lambda src, seed: (3.0 - 0.05 * ("MATRIX_LR = 0.08" in src) - 0.05 * ("EMBEDDING_LR = 0.6" in src)
                                                 + 0.2 * ("WARMDOWN_RATIO = 0.5" in src) - 0.01 * ("SCALAR_LR = 0.75" in src)
                                                 + 0.0005 * (seed % 3 - 1)))
    # its scripted gains (0.01 the smallest) are read as measured against a noise floor of 0.003, not
    # configs/cpu.toml's 0.01 (nor tiny's 0.012 for runs read at one step count: every scripted run reports 10)
    node = make_node(tmp_path / "n", stdlib_data, verify_share=1.0, verify_batch=8, noise_floor=0.003, adjust_steps=False)
    try:
        node.baseline()
        hw, bob, carol = node.hardware(), Identity.from_seed(b"bob"), Identity.from_seed(b"carol")
        mk = lambda who, child, gain: improvement(who, BASELINE, child, gain=gain, hardware=hw, task=node.task)
        a, b, c = mk(ALICE, lr, 0.05), mk(bob, emb, 0.04), mk(carol, rival, 0.03)
        for r in (a, b, c):
            node.records.add(r)
        assert node.verify_next()
        merged = edit(lr, "EMBEDDING_LR = 0.9", "EMBEDDING_LR = 0.6")
        assert node.tree.read(node.best()) == merged
        verdicts = {k: v["verdict"] for k, v in node.store.verdicts().items()}
        assert verdicts == {a.id.hex(): "confirmed", b.id.hex(): "confirmed"}  # c conflicts with a: not merged
        ours = [r for _, r in node.records.since() if r.author_id == node.identity.id]
        atts = {r.body["improvement"]: r for r in ours if r.type == "attestation"}
        assert atts[a.id].body["jointly"] == [b.id] and atts[b.id].body["jointly"] == [a.id]
        [adopt] = [r for r in ours if r.type == "improvement"]
        assert swarm.adopted_from(adopt) == (a.id, b.id) and adopt.body["child"] == swarm.content_hash(merged)
        assert node.ledger.refresh().standing(ALICE.id) < (1 + 1) / (2 + 1)  # a joint confirmation is half a one
        assert not node.verify_next()  # a verification was the last run: our own comes first
        # a harmful change merged with a good one: the merged run does not hold; nothing is attested
        d, e = mk(Identity.from_seed(b"dave"), harm, 0.06), mk(Identity.from_seed(b"erin"), scalar, 0.05)
        for r in (d, e):
            node.records.add(r)
        best = node.best()
        assert node.verify_next(alternate=False)
        verdicts = {k: v["verdict"] for k, v in node.store.verdicts().items()}
        assert node.best() == best and node.store.get("batch_failed") == best
        assert verdicts == {a.id.hex(): "confirmed", b.id.hex(): "confirmed", c.id.hex(): "failed_to_apply"}  # onto `lr`
        assert node.verify_next(alternate=False)  # now one alone: the best-ranked first
        verdicts = {k: v["verdict"] for k, v in node.store.verdicts().items()}
        assert verdicts[d.id.hex()] == "refuted" and e.id.hex() not in verdicts
        assert node.verify_next(alternate=False) and node.tree.read(node.best()) == edit(merged, "SCALAR_LR = 0.5",
                                                                                          "SCALAR_LR = 0.75")
    finally:
        node.close()
    text, prov = export.provenance(str(tmp_path / "n"), verify=True)
    assert [o["author"] for o in prov["steps"][0]["adopted"]] == [ALICE.id, bob.id]
    assert prov["steps"][0]["confirmed_by"] == [node.identity.id]


def test_a_step_back_to_a_measured_tree_is_not_proposed(tmp_path, stdlib_data, monkeypatch):
    """After keeping MATRIX_LR 0.04 -> 0.06, the step down again would rebuild the baseline, which the
    node measured twice: an H200 node spent one of its first four experiments on it. Nor is a tree a
    peer measured on our tag run again, whatever parent it was reached from."""
    up = edit(BASELINE, "MATRIX_LR = 0.04", "MATRIX_LR = 0.06")
    fake_sandbox(monkeypatch, lambda src, seed: 3.0 - 0.1 * ("MATRIX_LR = 0.06" in src) + 0.0005 * (seed % 3 - 1))
    node = make_node(tmp_path / "n", stdlib_data, max_reruns=0)
    try:
        node.baseline()
        best = node.tree.commit(up, "MATRIX_LR 0.04 -> 0.06")
        exp, _ = node.measure("candidate", best, "MATRIX_LR 0.04 -> 0.06")
        node.decide([exp], "keep", best=best)
        assert node.tree.read(node.best()) == up
        ctx, skipped = node.context()
        assert ctx.taken(BASELINE) and skipped == ["measured"]
        p = node.proposer.propose(ctx)
        assert p.source != BASELINE
        peers = edit(up, "EMBEDDING_LR = 0.9", "EMBEDDING_LR = 0.6")
        other = edit(BASELINE, "EMBEDDING_LR = 0.9", "EMBEDDING_LR = 0.6")
        node.records.add(experiment_on(ALICE, other, peers, node))
        ctx, _ = node.context()
        assert ctx.taken(peers) and not ctx.taken(edit(up, "EMBEDDING_LR = 0.9", "EMBEDDING_LR = 0.7"))
    finally:
        node.close()


def experiment_on(author, parent, child, node):
    from node import memory
    score = dict(val_bpb=3.0, runs=2, spread=0.002)
    return wire.make_record(author, "experiment", dict(
        task=node.task, lineage="torch", parent=swarm.content_hash(parent), child=swarm.content_hash(child),
        idea=memory.idea_key(parent, child), diff=gittree.diff_texts(parent, child), hypothesis="a try", status="discard",
        before=score, after=score, hardware=node.hardware(), proposer="offline", log_tail=""), time.time() * 1000)


# -- the real thing: a node verifies foreign improvements in the sandbox ------------------------

PEEK = """    def peek(x):
        out = model(x).clone()
        out[:, :-1].scatter_(2, x[:, 1:, None], 30.0)
        return out
    val_bpb = prepare.hand_over(peek,"""


def make_node(home, data, **kw):
    s = dict(config.load(os.path.join(ROOT, "configs", "cpu.toml")), profile="tiny", budget=1.0, listen="off", max_reruns=1)
    s.update(kw)
    return loop.Node(str(home), s, data, out=open(os.devnull, "w"))


def test_a_home_starts_from_the_file_it_is_given_and_only_a_new_home_does(tmp_path, stdlib_data, stdlib_cache, slow_start,
                                                                           monkeypatch):
    from node import home as homes
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_cache))
    node = make_node(tmp_path / "n", stdlib_data, start=slow_start)
    assert node.tree.read(node.best()) == SLOW and node.store.source(swarm.content_hash(SLOW)) == SLOW
    node.close()
    make_node(tmp_path / "n", stdlib_data, start=slow_start).close()  # the same file again: fine
    with pytest.raises(homes.HomeError, match="started from another train.py"):
        make_node(tmp_path / "n", stdlib_data, start=os.path.join(ROOT, "model", "train.py"))
    (tmp_path / "bad.py").write_text("def broken(:\n")
    for bad in (tmp_path / "bad.py", tmp_path / "missing.py"):
        with pytest.raises(homes.HomeError, match="cannot start from"):
            make_node(tmp_path / "m", stdlib_data, start=str(bad))


def test_an_untrusted_baselines_compiled_code_serves_the_nodes_later_runs(tmp_path, stdlib_data, stdlib_cache, monkeypatch):
    """A start file is not the shipped baseline, so its runs may not write the shared compile cache;
    what they compile joins the node's kept layer instead (the baseline is the best every later
    candidate is made from), and what a discarded candidate compiled does not."""
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_cache))
    write = ('import os, uuid\nopen(os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "{0}-" + uuid.uuid4().hex), "w").close()\n')
    start = tmp_path / "start.py"
    start.write_text(write.format("baseline") + SLOW)
    node = make_node(tmp_path / "n", stdlib_data, start=str(start), budget=1.0, max_reruns=0)
    try:
        node.baseline()
        kept = os.path.join(node.home, "compile", "kept")
        assert len([n for n in os.listdir(kept) if n.startswith("baseline-")]) == node.s["baseline_runs"]
        assert not [p for p in (stdlib_cache / "sandbox-compile").iterdir() if p.name.startswith("baseline-")]
        exp, r = node.measure("candidate", node.tree.commit(write.format("candidate") + SLOW, "a candidate"), "a candidate")
        assert r.status == "ok"
        node.decide([exp], "discard")
        node.tree.reset(node.best())
        assert not [n for n in os.listdir(kept) if n.startswith("candidate-")]
    finally:
        node.close()


def test_a_node_adopts_what_holds_refutes_what_does_not_and_attests(tmp_path, stdlib_data, stdlib_cache, slow_start, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_cache))
    node = make_node(tmp_path / "b", stdlib_data, start=slow_start, budget=2.0)
    try:
        node.baseline()
        hw = node.hardware()
        better = SMALL  # the learning rates restored: a gain far above any timing noise
        worse = edit(SLOW, "MATRIX_LR = 0.04", "MATRIX_LR = 0.0")  # claims a gain; the blocks never learn
        cheat = edit(SLOW, "    val_bpb = prepare.hand_over(model,", PEEK)  # sees the next token
        good = improvement(ALICE, SLOW, better, gain=0.2, hardware=hw, task=node.task, description="restore the LRs")
        forged = improvement(MALLORY, SLOW, worse, gain=0.3, hardware=hw, task=node.task)
        cheating = improvement(MALLORY, SLOW, cheat, gain=0.5, hardware=hw, task=node.task)
        for r in (good, forged, cheating):
            node.records.add(r)
        queue, _ = node.queue()
        assert {e.record.id for e in queue} == {good.id, forged.id, cheating.id}
        outcomes = {r.id: node.verify(r) for r in (forged, cheating, good)}
        assert set(outcomes.values()) == {"ran"}, [(k[:4], dict(v)) for k, v in node.store.verdicts().items()]
        verdicts = {bytes.fromhex(k): v["verdict"] for k, v in node.store.verdicts().items()}
        assert verdicts == {forged.id: "refuted", cheating.id: "violation", good.id: "confirmed"}
        assert node.tree.read(node.best()) == better
        assert good.id.hex() in node.tree.git("log", "-1", "--format=%s", node.best()) and ALICE.id in node.tree.git(
            "log", "-1", "--format=%s", node.best())
        ours = [r for _, r in node.records.since() if r.author_id == node.identity.id]
        atts = {r.body["improvement"]: r for r in ours if r.type == "attestation"}
        assert {k: a.body["verdict"] for k, a in atts.items()} == {k: v for k, v in verdicts.items()}
        assert atts[good.id].body["after"]["val_bpb"] < atts[good.id].body["before"]["val_bpb"]
        assert "non_causal" in atts[cheating.id].body["note"]
        [adopt] = [r for r in ours if r.type == "improvement"]
        assert swarm.adopted_from(adopt) == (good.id,) and adopt.body["child"] == swarm.content_hash(better)
        assert all(wire.decode_record(r.encoded, time.time() * 1000 + 1) for r in ours)  # signatures hold
        assert node.queue()[0] == [] and node.ledger.standing(MALLORY.id) < 0.05
        # the same change again, from someone else: our best holds it already; nothing runs
        again = improvement(Identity.from_seed(b"dave"), SLOW, better, hardware=hw, task=node.task)
        node.records.add(again)
        runs = len(node.store.experiments())
        assert node.verify(node.ledger.refresh().improvements[again.id]) == "held"
        assert len(node.store.experiments()) == runs
    finally:
        node.close()
    home = str(tmp_path / "b")
    # export: the best tree, its signed chain, the adoption named
    text, prov = export.provenance(home, verify=True)
    assert text == better and export.strip_header(export.header(prov) + text) == text
    [step] = prov["steps"]
    assert [(o["record"], o["author"]) for o in step["adopted"]] == [(good.id.hex(), ALICE.id)]
    assert "adopted from " + ALICE.id in export.header(prov)
    assert f"the mean of {step['after']['runs']} run(s) when it was kept" in export.header(prov)
    text2, prov2 = export.provenance(home, tag=swarm.tag_name(hw), verify=True)  # from records alone
    assert text2 == better and prov2["steps"][-1]["record"] in (good.id.hex(), adopt.id.hex())
    # watch: the adoption and the verdicts, nothing left in the queue
    w = watch.Watcher(home)
    try:
        snap = w.snapshot()
    finally:
        w.close()
    assert snap["queue"] == [] and any(e["text"].startswith("adopted " + good.id.hex()[:12]) for e in snap["events"])
    assert any(e["text"].startswith("violation") for e in snap["events"])
    v = snap["node"]["verification"]
    assert v["adopted"] == 1 and 0 < v["share"] < 1 and v["own_seconds"] > 0  # the baseline runs are our own
    assert [t["tag"] for t in snap["tags"]] == [swarm.tag_name(hw)] and snap["tags"][0]["improvements"] == 3
    # plot: the adoption marked apart from the runs of our own
    assert [k for *_, k in plot.points(home)].count("adopted") == 1
    import subprocess, sys
    r = subprocess.run([sys.executable, "-m", "node", "plot", "--home", home, "-o", str(tmp_path / "p.png")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG", r.stderr
    # a broken signature anywhere in the chain: one line, exit 2
    import sqlite3
    db = sqlite3.connect(os.path.join(home, "gossip.sqlite"))
    blob = db.execute("SELECT encoded FROM records WHERE id = ?", (adopt.id,)).fetchone()[0]
    i = blob.index(adopt.sig)
    db.execute("UPDATE records SET encoded = ? WHERE id = ?", (blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1:], adopt.id))
    db.commit()
    db.close()
    with pytest.raises(export.ExportError, match="does not verify"):
        export.provenance(home, verify=True)


def test_export_of_a_node_without_experiments_is_one_line_and_exit_2(tmp_path, stdlib_data, stdlib_cache, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_cache))
    make_node(tmp_path / "n", stdlib_data).close()
    import subprocess, sys
    r = subprocess.run([sys.executable, "-m", "node", "export", "--home", str(tmp_path / "n")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no experiments" in r.stderr and r.stdout == ""
    r = subprocess.run([sys.executable, "-m", "node", "export", "--home", str(tmp_path / "none")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no node home" in r.stderr


def test_export_of_a_node_that_kept_nothing_shows_its_baseline_score(tmp_path, stdlib_data, stdlib_cache, monkeypatch):
    """A review exported a node whose candidates were all discarded: the header had no score and
    --json said val_bpb null, though the baseline it hands out was measured twice."""
    import json, subprocess, sys
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_cache))
    node = make_node(tmp_path / "n", stdlib_data)
    try:
        base = node.best()
        up = node.tree.commit(node.tree.read(base).replace("\nMATRIX_LR = 0.04", "\nMATRIX_LR = 0.05", 1), "up")
        for kind, commit, bpb, status in (("baseline", base, 2.50, "keep"), ("baseline", base, 2.52, "keep"),
                                          ("experiment", up, 2.60, "discard")):
            exp = node.store.start(kind, base, commit, kind, "-")
            node.store.finish(exp, "measured", bpb)
            node.decide([exp], status)
        node.tree.reset(base)
    finally:
        node.close()
    r = subprocess.run([sys.executable, "-m", "node", "export", "--home", str(tmp_path / "n"), "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["val_bpb"] == pytest.approx(2.51), r.stderr
    assert json.loads(r.stdout)["runs"] == 2
    r = subprocess.run([sys.executable, "-m", "node", "export", "--home", str(tmp_path / "n")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "val_bpb 2.510000, the mean of 2 run(s) of the baseline" in r.stdout.split("\n", 3)[1], r.stdout[:300]


# -- three real nodes on loopback ---------------------------------------------------------------

def test_three_nodes_publish_verify_adopt_watch_and_export(tmp_path, stdlib_data, stdlib_cache, slow_start):
    """A keeps a clear win (a queued suggestion); B and C verify it on their own runs, adopt it if
    it holds for them, and attest; watch and export agree on every node."""
    import json, signal, socket, subprocess, sys
    env = dict(os.environ, AUTORESEARCH_CACHE=str(stdlib_cache), AUTORESEARCH_DATA=stdlib_data.fingerprint)
    with socket.socket() as s_:
        s_.bind(("127.0.0.1", 0))
        port = s_.getsockname()[1]
    homes = {n: str(tmp_path / n) for n in "abc"}
    os.makedirs(os.path.join(homes["a"], "queue"))
    # the learning rates restored, on a line the offline proposer never edits: the change merges
    # cleanly with whatever B and C keep meanwhile, and it is a clear win at any load
    with open(os.path.join(homes["a"], "queue", "0-restore-the-lrs.patch"), "w") as f:
        f.write(gittree.diff_texts(SLOW, SMALL))
    common = ["--profile", "tiny", "--budget", "2", "--max-reruns", "0", "--no-mdns", "--noise-floor", "0.002",
              "--start", slow_start]
    cmd = lambda n, *extra: [sys.executable, "-m", "node", "join", "--home", homes[n], *common, *extra]
    procs = {"a": subprocess.Popen(cmd("a", "--listen", f"127.0.0.1:{port}"), cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)}
    for n in "bc":
        procs[n] = subprocess.Popen(cmd(n, "--listen", "127.0.0.1:0", "--seed", f"127.0.0.1:{port}"), cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "node", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)

    def verdicts(n):
        from node import home as homes_
        st = homes_.Store(os.path.join(homes[n], "store.sqlite"))
        try:
            return {k: r["verdict"] for k, r in st.verdicts().items()}
        finally:
            st.db.close()
    failure = None
    try:
        deadline, published = time.time() + 600, None
        while time.time() < deadline:
            assert all(p.poll() is None for p in procs.values()), {n: p.stdout.read() for n, p in procs.items() if p.poll() is not None}
            if published is None and os.path.exists(os.path.join(homes["a"], "events.jsonl")):
                with open(os.path.join(homes["a"], "events.jsonl")) as f:
                    published = next((json.loads(l)["record"] for l in f if '"published"' in l), None)
            if published and all(published in verdicts(n) for n in "bc"):
                break
            time.sleep(2)
        assert published, "A kept nothing within the deadline"
        got = {n: verdicts(n).get(published) for n in "bc"}
        assert set(got.values()) <= {"confirmed", "refuted"} and None not in got.values(), got
        assert "confirmed" in got.values(), got
        time.sleep(3)  # the attestations reach every node (eager push: well under a second on loopback)
        for n in "abc":
            snap = json.loads(cli("watch", "--home", homes[n], "--once", "--json").stdout)
            assert len(snap["peers"]) == 2, (n, snap["peers"])
            plain = cli("watch", "--home", homes[n], "--once")
            assert plain.returncode == 0 and "verification queue" in plain.stdout
        adopters = [n for n in "bc" if got[n] == "confirmed"]
        watched = cli("watch", "--home", homes[adopters[0]], "--once").stdout
        assert "adopted " + published[:12] in watched
    except AssertionError as e:
        failure = e
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        try:
            outs = {n: p.communicate(timeout=120)[0] for n, p in procs.items()}
        finally:
            for p in procs.values():  # never leave a node behind to load the tests after this one
                p.kill()
    if failure:  # with what each node printed: a swarm's failure is rarely clear from one side
        raise AssertionError(f"{failure}\n" + "\n".join(f"--- node {n} ---\n{o[-6000:]}" for n, o in outs.items()))
    assert all(p.returncode == 143 for p in procs.values()), outs  # stopped by SIGTERM
    print("\n" + "\n".join(l for l in outs["a"].splitlines() if ": training" not in l and ": evaluating" not in l
                            and ("baseline" in l or "restore-the-lrs" in l)))  # what A measured (pytest -s)
    for n in "abc":
        out = tmp_path / f"{n}.py"
        r = cli("export", "--home", homes[n], "--verify", "-o", str(out))
        assert r.returncode == 0, (n, r.stderr)
        tree = gittree.Tree(os.path.join(homes[n], "tree"))
        assert export.strip_header(out.read_text()) == tree.read(tree.head())
    ids = {n: json.loads(cli("status", "--home", homes[n], "--json").stdout)["node_id"] for n in "abc"}
    a_export = (tmp_path / "a.py").read_text()
    assert "restore-the-lrs" in a_export and "confirmed by " + ", ".join(sorted(ids[n] for n in adopters)) in a_export
    for n in adopters:
        assert LR_LINE in export.strip_header((tmp_path / f"{n}.py").read_text())  # the cut undone


def test_the_best_is_re_measured_once_per_remeasure_every_experiments(tmp_path, stdlib_data, monkeypatch):
    """Verifications between experiments do not re-measure the best again (they once did, before each)."""
    node = make_node(tmp_path / "n", stdlib_data, max_experiments=9, remeasure_every=4)
    calls = []
    try:
        monkeypatch.setattr(node, "baseline", lambda: None)
        monkeypatch.setattr(node, "remeasure", lambda: calls.append(("remeasure", node.done)))
        monkeypatch.setattr(node, "verify_next", lambda: len(calls) % 3 == 1 and not calls.append(("verify", node.done)))
        monkeypatch.setattr(node, "experiment", lambda: not calls.append(("experiment", node.done)))
        assert node.run() == 0
    finally:
        node.close()
    assert [d for kind, d in calls if kind == "remeasure"] == [4, 8]
    assert sum(kind == "experiment" for kind, _ in calls) == 9 and any(kind == "verify" for kind, _ in calls)


class _Peers:
    """A stand-in for the gossip network: one peer alive, records stored as they are sent."""

    def __init__(self, records):
        self.records = records

    def alive(self):
        return 1

    def publish(self, record):
        self.records.add(record)


def _scripted(node, values):
    """Replace the sandbox: a run of commit c scores values(c, kind); every run is listed."""
    from sandbox.result import HardwareTag, Result
    hw = HardwareTag.detect(node.s["budget"], node.s["profile"], node.data.fingerprint, node.backend)
    runs = []

    def measure(kind, commit, description, proposer="-", edit=None, usage=None):
        exp = node.store.start(kind, node.best(), commit, description, proposer, edit, usage)
        val = values(commit, kind)
        r = Result("ok", val, 1.0, 1.5, 0.5, 100.0, 10, 1000, (), 0.0, hw, (), "")
        node.store.finish(exp, "measured", val, 0.1, node.noise(), r.to_json())
        runs.append((kind, commit == node.tree.root()))
        return exp, r
    return measure, runs


@pytest.mark.parametrize("peers_ran_it", [False, True])
def test_a_node_with_peers_runs_the_baseline_once_and_again_only_if_they_give_no_noise(
        tmp_path, stdlib_data, monkeypatch, peers_ran_it):
    """With peers alive a node runs the baseline once; before its first verdict it re-runs it only
    when no same-tag peers' claims or records give the noise (here: two peers' claims carrying
    their one run of the baseline)."""
    with _node_with_peers(tmp_path / "n", stdlib_data, monkeypatch, 2.9, baseline_runs=2, max_reruns=0) as (node, runs):
        assert runs == [("baseline", True)]
        if peers_ran_it:
            _peers_claim_with_scores(node, (3.002, 2.999))
        assert node.experiment()
    again = [] if peers_ran_it else [("baseline", True)]
    assert runs == [("baseline", True), ("candidate", False)] + again
    ss, dof = loop.pooled(node_measurements(tmp_path / "n"), (0.0, 0))
    assert dof == (0 if peers_ran_it else 1)


@contextlib.contextmanager
def _node_with_peers(home, data, monkeypatch, candidate_score, **settings):
    """(node, its runs) of a node that believes peers alive and has run its baseline (scored 3.0;
    every other tree scores `candidate_score`); closed on the way out."""
    node = make_node(home, data, claim_settle=0.0, **settings)
    try:
        node.network = _Peers(node.records)
        measure, runs = _scripted(node, lambda commit, kind: 3.0 if commit == node.tree.root() else candidate_score)
        monkeypatch.setattr(node, "measure", measure)
        node.baseline()
        yield node, runs
    finally:
        node.network = None
        node.close()


def _peers_claim_with_scores(node, scores):
    """One claim per score, each from another peer of the node's tag, carrying its one run of the
    node's best (its baseline)."""
    parent = swarm.content_hash(node.tree.read(node.best()))
    for i, val in enumerate(scores):
        body = dict(task=node.task, parent=parent, child="c" * 64, idea="d" * 64, hardware=node.hardware(),
                    description="trying", expires=int((time.time() + 600) * 1000),
                    parent_score=dict(val_bpb=val, runs=1, spread=0.0005))
        node.records.add(wire.make_record(Identity.from_seed(b"peer%d" % i), "claim", body, time.time() * 1000))


def node_measurements(home):
    from node import home as homes
    store = homes.Store(os.path.join(str(home), "store.sqlite"))
    try:
        return homes.measurements(store.experiments())
    finally:
        store.db.close()


def test_a_thin_win_re_runs_the_best_when_the_best_has_fewer_runs(tmp_path, stdlib_data, monkeypatch):
    """A best measured once (one baseline run, its noise from peers) against a thin win measured
    twice: the next run is the best's, where the standard error of the difference falls most."""
    # the raw rule (adjust_steps off): read at one step count, the scripted runs would agree exactly, a noise of 0
    with _node_with_peers(tmp_path / "n", stdlib_data, monkeypatch, 2.99, max_reruns=2, noise_floor=0.01,
                          adjust_steps=False) as (node, runs):
        _peers_claim_with_scores(node, (3.002, 2.999))  # two peers' runs of the baseline: the noise
        assert node.experiment()
    assert runs == [("baseline", True), ("candidate", False), ("rerun", False), ("remeasure", True)]
    assert [loop.rerun_best([1.0], [1.0]), loop.rerun_best([1.0], [1.0, 1.0]), loop.rerun_best([1.0] * 2, [1.0])] == [
        False, True, False]
