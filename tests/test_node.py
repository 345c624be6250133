"""The node: settings, proposer, noise-aware keeping, the real loop on CPU, kill -9
recovery, the lock, suggestions and status."""
import difflib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

import prepare
from conftest import ROOT
from node import config, gittree, home as homes, loop, proposer as proposers, swarm

BASELINE = open(os.path.join(ROOT, "model", "train.py")).read()


def node_cli(*args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def env(stdlib_cache, stdlib_data):
    return dict(os.environ, AUTORESEARCH_CACHE=str(stdlib_cache), AUTORESEARCH_DATA=stdlib_data.fingerprint)


# -- settings ---------------------------------------------------------------

def test_config_files_and_overrides(tmp_path):
    s = config.load(os.path.join(ROOT, "configs", "cpu.toml"), {"budget": 7, "proposer_seed": None})
    assert s["profile"] == "cpu" and s["budget"] == 7.0 and s["proposer_seed"] is None
    assert config.load(os.path.join(ROOT, "configs", "default.toml"))["budget"] == 300
    assert config.PROFILES == tuple(prepare.PROFILES)  # named there without importing the harness
    # the noise floor is the profile's unless set: a 2-core CPU's 30 s runs are twenty times noisier than an H100's
    assert [config.noise_floor(dict(config.load(None), profile=p)) for p in ("gpu", "cpu", "tiny")] == [0.0005, 0.01, 0.003]
    assert config.noise_floor(dict(config.load(None, {"noise_floor": 0.01}), profile="gpu")) == 0.01
    assert set(config.NOISE_FLOORS) == set(config.PROFILES)
    bad = tmp_path / "bad.toml"
    bad.write_text("budget = 10\nbugdet = 3\n")
    with pytest.raises(config.ConfigError, match="unknown key 'bugdet'"):
        config.load(str(bad))
    bad.write_text('budget = "soon"\n')
    with pytest.raises(config.ConfigError, match="budget must be float"):
        config.load(str(bad))
    bad.write_text("budget = [\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(str(bad))
    bad.write_text('seeds = ["10.0.0.2:7645", "nohost"]\n')
    with pytest.raises(config.ConfigError, match="seed must be HOST:PORT"):
        config.load(str(bad))
    with pytest.raises(config.ConfigError, match="listen must be HOST:PORT"):
        config.load(None, {"listen": "0.0.0.0:99999"})
    assert config.load(None, {"seeds": ["a.lan:7645"], "mdns": False})["seeds"] == ["a.lan:7645"]
    for text in (b"\xc9\x93 not text", b"budget = inf\n", b"noise_floor = nan\n"):
        bad.write_bytes(text)
        with pytest.raises(config.ConfigError, match="not valid TOML|finite"):
            config.load(str(bad))


def test_a_broken_config_is_one_line_and_exit_2(env, tmp_path):
    (tmp_path / "c.toml").write_text("bugdet = 3\n")
    r = node_cli("join", "--home", str(tmp_path / "home"), "--config", str(tmp_path / "c.toml"), env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown key 'bugdet'" in r.stderr
    assert not (tmp_path / "home" / "store.sqlite").exists()


def test_a_start_refused_before_anything_is_made(env, tmp_path):
    """A --start that is no Python, Claude without a key, a --listen address this machine cannot bind,
    an infinite budget, seeds without the network: one line, exit 2, no home made, no data prepared."""
    import socket
    (tmp_path / "empty.py").write_text("")
    (tmp_path / "binary.py").write_bytes(b"\xc9\x93\x00")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for extra, message in ((["--start", str(tmp_path / "none.py")], "cannot start from"),
                               (["--start", str(tmp_path)], "cannot start from"),
                               (["--start", str(tmp_path / "empty.py")], "the file is empty"),
                               (["--start", str(tmp_path / "binary.py")], "cannot start from"),
                               (["--proposer", "claude"], "needs ANTHROPIC_API_KEY"),
                               (["--listen", f"127.0.0.1:{port}"], "in use"),
                               (["--listen", f"127.0.0.1:{port - 1}"], "--data-port"),
                               (["--listen", "nosuchhost.invalid:7645"], "cannot listen on"),
                               (["--budget", "inf"], "finite"),
                               (["--listen", "off", "--seed", "127.0.0.1:7645"], "--seed needs the network")):
            r = node_cli("join", "--home", str(tmp_path / "home"), "--profile", "tiny", "--no-mdns", *extra,
                         env={k: v for k, v in env.items() if k != "ANTHROPIC_API_KEY"}, timeout=60)
            assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (extra, r.stderr)
            assert not (tmp_path / "home").exists() and r.stdout == "", extra


# -- the offline proposer ---------------------------------------------------

def test_constants_follow_the_device_branch():
    cpu, cuda = proposers.constants(BASELINE, "cpu"), proposers.constants(BASELINE, "cuda")
    assert cpu["DEPTH"].value == 4 and cuda["DEPTH"].value == 8
    assert cpu["TOTAL_BATCH_SIZE"].value == 2048 and cuda["TOTAL_BATCH_SIZE"].kind == "pow2"
    assert cuda["TOTAL_BATCH_SIZE"].value > 2**14
    assert {"MATRIX_LR", "WARMDOWN_RATIO", "WINDOW_PATTERN"} <= set(cpu)


def test_steps_are_sized_to_the_value():
    cpu = proposers.constants(BASELINE, "cpu")
    assert [proposers.step(cpu["DEPTH"], d) for d in ("up", "down")] == [5, 3]  # a small count: one more or less
    warmup = cpu["MUON_MOMENTUM_WARMUP"]  # a large count moves like a float, not 200 -> 199
    assert warmup.kind == "int" and [proposers.step(warmup, d) for d in ("up", "down")] == [300, 133]
    assert proposers.step(warmup, "up", scale=1 / 3) == 229
    assert [proposers.step(cpu["TOTAL_BATCH_SIZE"], d) for d in ("up", "down")] == [4096, 1024]


def test_the_proposer_leaves_rows_per_pass_alone():
    # DEVICE_BATCH_SIZE is memory, not quality: train.py takes TOTAL_BATCH_SIZE tokens a step either way
    p, history, names = proposers.OfflineProposer(0), [], set()
    for _ in range(40):
        prop = p.propose(proposers.Context(BASELINE, history, 0.01, "cpu", []))
        names.update(c["name"] for c in prop.edit["changes"])
        history.append(dict(edit=prop.edit, status="discard", val_bpb=3.01, parent_bpb=3.0))
    assert "DEVICE_BATCH_SIZE" not in names and {"MATRIX_LR", "TOTAL_BATCH_SIZE", "DEPTH"} <= names


def test_proposals_are_real_one_line_diffs_reproducible_under_a_seed():
    ctx = proposers.Context(BASELINE, [], 0.01, "cpu", [])
    a, b = proposers.OfflineProposer(3).propose(ctx), proposers.OfflineProposer(3).propose(ctx)
    assert a == b and a.source != BASELINE and "\n" not in a.description
    changed = [(x, y) for x, y in zip(BASELINE.splitlines(), a.source.splitlines()) if x != y]
    assert len(changed) == 1 and changed[0][0].split("=")[0] == changed[0][1].split("=")[0]
    compile(a.source, "train.py", "exec")


def test_the_bandit_learns_from_history():
    p = proposers.OfflineProposer(0)
    first = p.propose(proposers.Context(BASELINE, [], 0.01, "cpu", []))
    change = first.edit["changes"][0]
    crashed = [dict(edit=first.edit, status="crash", val_bpb=None, parent_bpb=3.0)]
    second = p.propose(proposers.Context(BASELINE, crashed, 0.01, "cpu", []))
    assert second.edit["changes"][0]["name"] + second.edit["changes"][0]["dir"] != change["name"] + change["dir"]
    # two near-misses on different parameters get combined
    near = [dict(edit={"changes": [{"name": n, "dir": "up", "old": 0, "new": 0}]}, status="discard", val_bpb=2.99,
                 parent_bpb=3.0) for n in ("MATRIX_LR", "EMBEDDING_LR", "SCALAR_LR", "WEIGHT_DECAY")]
    combo = p.propose(proposers.Context(BASELINE, near, 0.01, "cpu", []))
    assert len(combo.edit["changes"]) == 2 and ";" in combo.description


# -- noise-aware keeping ----------------------------------------------------

def test_noise_and_verdicts():
    assert loop.noise({"a": [1.0, 1.02], "b": [2.0]}, 0.001) == pytest.approx(0.0141421, rel=1e-4)
    assert loop.noise({"a": [1.0]}, 0.003) == 0.003
    best = [3.00, 3.02]
    assert loop.verdict(best, [2.90], 0.01, 2.0, 1) == "keep"
    assert loop.verdict(best, [3.005], 0.01, 2.0, 1) == "rerun"  # better, but within the noise
    assert loop.verdict(best, [3.005], 0.01, 2.0, 0) == "discard"
    assert loop.verdict(best, [3.05], 0.01, 2.0, 1) == "discard"


def test_only_edits_that_leave_a_steps_cost_alone_are_neutral():
    lr = BASELINE.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.06", 1)
    assert proposers.neutral_edit(BASELINE, lr, "cpu")
    assert proposers.neutral_edit(BASELINE, lr.replace("WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.5"), "cpu")
    assert not proposers.neutral_edit(BASELINE, BASELINE, "cpu")
    assert not proposers.neutral_edit(BASELINE, BASELINE.replace("    DEPTH = 4", "    DEPTH = 5", 1), "cpu")  # a shape
    assert not proposers.neutral_edit(BASELINE, lr.replace("import gc\n", "import gc\nimport os\n"), "cpu")  # code too
    # the other branch's constants are not this machine's: a change there is not read as neutral here
    assert not proposers.neutral_edit(BASELINE, BASELINE.replace("    DEPTH = 8", "    DEPTH = 9", 1), "cpu")


def test_runs_are_read_at_one_step_count():
    """val_bpb falling 0.25 per unit of ln(steps): the machine's speed drops out of the comparison."""
    val = lambda base, n: base - 0.25 * math.log(n)
    runs = {"best": [(val(3.0, 95), 95), (val(3.0, 105), 105)], "cand": [(val(2.99, 90), 90)]}
    slope = loop.step_slope(runs, prior=0.2, weight=0.0)
    assert slope == pytest.approx(0.25)
    best, cand, sigma, steps = loop.at_steps("best", "cand", runs, slope, floor=0.004)
    assert sum(best) / 2 - cand[0] == pytest.approx(0.01) and sigma == 0.004
    assert steps == pytest.approx((95 * 105 * 90) ** (1 / 3))
    assert runs["cand"][0][0] > sum(v for v, _ in runs["best"]) / 2  # as measured, the better tree looks worse
    assert loop.step_slope({"cand": runs["cand"]}, prior=0.24) == pytest.approx(0.24)  # no tree run twice: the prior
    sxx = math.log(105 / 95) ** 2 / 2  # the best's two runs: shrunk towards the prior by their weight against 0.005
    assert loop.step_slope(runs, prior=0.2, weight=0.005) == pytest.approx((0.25 * sxx + 0.2 * 0.005) / (sxx + 0.005))
    assert loop.step_slope({"x": [(2.0, 90), (2.1, 110)]}, prior=0.24) == 0.0  # held within [0, 2 x prior]
    assert loop.step_slope({"x": [(2.3, 100), (2.0, 110)]}, prior=0.24) == pytest.approx(0.48)
    # a run that printed no step count (or 0) counts nowhere, and a comparison with one is read as measured
    assert loop.step_slope(dict(runs, x=[(2.3, None), (2.4, 0), (2.5, 100)]), prior=0.2, weight=0.0) == pytest.approx(0.25)
    assert loop.at_steps("best", "cand", dict(runs, cand=[(2.3, None)]), slope, 0.004) is None
    assert loop.at_steps("best", "cand", dict(runs, cand=[(2.3, 84)]), slope, 0.004) is None  # 16 % off the best's steps
    assert loop.at_steps("best", "cand", dict(runs, best=runs["best"][:1]), slope, 0.004) is None  # noise unmeasured
    assert loop.at_steps("best", "new", runs, slope, 0.004) is None  # a tree not measured yet


def test_a_neutral_candidate_is_judged_at_the_best_runs_step_count(tmp_path, stdlib_data, monkeypatch):
    """A CPU that ran the candidate 12 % slower: as measured it is worse (by 0.012) and discarded; read
    at one step count it is kept (0.02 better). A shape edit, or adjust_steps off, is read as measured."""
    from sandbox import result, run as sandbox
    speed = iter([100, 100, 88] * 4)  # steps a run gets from the machine

    def run(folder, seed=None, **kw):
        src = open(os.path.join(folder, "train.py")).read()
        n = next(speed)
        v = 3.0 - 0.02 * ("MATRIX_LR = 0.06" in src or "DEPTH = 5" in src) - 0.25 * math.log(n)
        hw = result.HardwareTag("cpu", 1, "cpu", "torch", 1.0, "cpu", stdlib_data.fingerprint, "cpu", 1)
        return result.Result("ok", v, 1.0, 1.0, 0.1, 100.0, n, 1000, (), 0.0, hw, (), "")
    monkeypatch.setattr(sandbox, "run", run)
    lr = BASELINE.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.06", 1)
    depth = BASELINE.replace("    DEPTH = 4", "    DEPTH = 5", 1)
    # (the cpu profile's floors: 0.01 as measured, 0.005 at one step count; a noise_floor set at 0.03 raises
    # the second threefold too)
    for name, source, adjust, floor, kept in (("lr", lr, True, None, True), ("depth", depth, True, None, False),
                                              ("off", lr, False, None, False), ("noisy", lr, True, 0.03, False)):
        s = dict(config.load(os.path.join(ROOT, "configs", "cpu.toml")), profile="cpu", budget=1.0, listen="off",
                 max_reruns=0, adjust_steps=adjust, noise_floor=floor)
        node = loop.Node(str(tmp_path / name), s, stdlib_data, out=open(os.devnull, "w"))
        monkeypatch.setattr(node, "next_candidate", lambda: proposers.Proposal(source, name, None, "offline"))
        try:
            node.baseline()
            assert node.experiment()
            assert (node.best() != node.tree.root()) == kept, name
            reads = [json.loads(line) for line in open(tmp_path / name / "events.jsonl") if "read_at_steps" in line]
            assert bool(reads) == (name in ("lr", "noisy")) and all(e["noise"] == pytest.approx(0.005 * (floor or 0.01) / 0.01)
                                                                    for e in reads)
        finally:
            node.close()
        reading = loop.status(str(tmp_path / name))["best_read_at_steps"]  # what status and the done line show
        assert (reading is not None) == kept and (not kept or reading["val_bpb"] < reading["parent_val_bpb"])


def test_a_failed_run_of_the_best_says_what_failed_and_what_to_try():
    """A baseline that ran over its budget on a loaded machine ended 'did not run in the sandbox
    (violation)': neither the check that failed nor that the machine, not the code, was the cause."""
    from sandbox.result import HardwareTag, Result
    hw = HardwareTag.detect(15.0, "cpu", "f" * 16, "cpu")
    run = lambda status, violations=(): Result(status, None, 30.0, 31.0, None, 100.0, None, None, violations, None, hw,
                                               (), "")
    over = loop.failure(run("violation", ("over_budget",)))
    assert over.startswith("violation: over_budget; ") and "longer --budget" in over and "fewer nodes" in over
    assert "longer --budget" in loop.failure(run("timeout"))
    assert loop.failure(run("crash")) == "crash"
    assert loop.failure(run("violation", ("non_causal",))) == "violation: non_causal"


# -- the real loop ----------------------------------------------------------

def test_join_runs_a_baseline_and_experiments(env, tmp_path):
    import pandas
    home = tmp_path / "home"
    r = node_cli("join", "--home", str(home), "--config", os.path.join(ROOT, "configs", "cpu.toml"), "--profile", "tiny", "--budget", "3",
                 "--max-experiments", "2", "--max-reruns", "0", "--listen", "127.0.0.1:0", "--no-mdns", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("done: 2 experiments, ")  # --max-experiments ends it: not a signal
    assert "| profile tiny |" in r.stdout  # the flag wins over the config file and $AUTORESEARCH_PROFILE (cpu here)
    table = pandas.read_csv(home / "results.tsv", sep="\t")
    assert list(table.columns) == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert list(table.description[:2]) == ["baseline", "baseline (repeat 1, noise)"] and len(table) == 4
    assert set(table.status) <= {"keep", "discard", "crash"}
    st = json.loads(node_cli("status", "--home", str(home), "--json", env=env).stdout)
    assert st["experiments"] == 2 and st["kept"] + st["crashed"] + st["discarded"] == 2 and st["best_val_bpb"] > 0
    assert st["runs"] == len(table)  # "runs decided": as results.tsv lists them
    # every decision has its console line: a keep, a discard (by how much, against what), a crash
    said = [l for l in r.stdout.splitlines() if l.startswith(("kept ", "discarded "))]
    assert len(said) == st["kept"] + st["discarded"], r.stdout
    assert all(" against the best's " in l and ("within the noise" in l or "worse by" in l)
               for l in said if l.startswith("discarded "))
    tree = gittree.Tree(str(home / "tree"))
    assert tree.is_clean() and tree.head() == st["best_commit"]
    assert oct(os.stat(home / "identity.key").st_mode & 0o777) == "0o600"
    events = [json.loads(line) for line in open(home / "events.jsonl")]
    assert [e["event"] for e in events].count("result") == 4
    # the same home on another profile: its scores are not comparable with the home's; refused, nothing changed
    before = (home / "results.tsv").read_bytes(), (home / "events.jsonl").read_bytes()
    r = node_cli("join", "--home", str(home), "--profile", "cpu", "--budget", "3", "--listen", "off", "--no-mdns", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot be compared" in r.stderr, r.stderr
    assert ((home / "results.tsv").read_bytes(), (home / "events.jsonl").read_bytes()) == before


def test_a_second_node_on_one_home_is_refused(env, tmp_path, stdlib_data):
    home = str(tmp_path / "home")
    os.makedirs(home)
    lock = homes.Lock(home)
    try:
        r = node_cli("join", "--home", home, "--budget", "2", "--listen", "off", env=env)
        assert r.returncode == 2 and "another node" in r.stderr and r.stderr.count("\n") == 1
    finally:
        lock.release()


def check_consistent(home, data):
    """Open the home as a restarting node does, and check tree, store and results.tsv agree."""
    s = config.load(os.path.join(ROOT, "configs", "cpu.toml"))
    node = loop.Node(home, dict(s, profile="tiny", budget=2.0, listen="off"), data, out=open(os.devnull, "w"))
    try:
        exps = node.store.experiments()
        assert not [e for e in exps if e["status"] in ("running", "measured")]
        assert node.tree.is_clean() and node.tree.head() == node.best()
        kept = [e for e in exps if e["status"] == "keep" and e["kind"] != "baseline" and e["kind"] != "remeasure"]
        assert all(node.tree.git("merge-base", "--is-ancestor", e["commit_"], node.best(), check=False) == "" for e in kept)
        rows = open(os.path.join(home, "results.tsv")).read().splitlines()[1:]
        assert len(rows) == sum(e["status"] in ("keep", "discard", "crash") for e in exps)
        node.flush()  # what a restarted node sends first: every decision's records, none twice
        held = [r for _, r in node.records.since()]
        announced = {r.body["child"] for r in held if r.type == "improvement"}
        assert all(swarm.content_hash(node.tree.read(e["commit_"])) in announced for e in kept if e["kind"] != "rerun")
        tried = [r.body["child"] for r in held if r.type == "experiment"]
        decided = {e["commit_"] for e in exps if e["kind"] in ("candidate", "suggestion") and e["status"] in ("keep", "discard", "crash")}
        assert len(tried) == len(decided)  # one experiment record per decided candidate
        return len(exps)
    finally:
        node.close()


def test_kill_9_at_random_instants_loses_nothing(env, tmp_path, stdlib_data):
    home = str(tmp_path / "home")
    rng = random.Random(7)
    seen, killed = 0, []
    for i in range(6):
        p = subprocess.Popen([sys.executable, "-m", "node", "join", "--home", home, "--profile", "tiny", "--budget", "1",
                              "--max-reruns", "0", "--listen", "127.0.0.1:0", "--no-mdns"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        time.sleep(rng.uniform(1.0, 12.0))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        killed.append(p.pid)
        n = check_consistent(home, stdlib_data)
        assert n >= seen  # no row of the store ever disappears
        seen = n
    deadline = time.time() + 5  # the candidates die with the node (parent-death signal), within moments
    while subprocess.run(["pgrep", "-f", "autoresearch-candidate-"], capture_output=True).stdout and time.time() < deadline:
        time.sleep(0.1)
    assert subprocess.run(["pgrep", "-f", "autoresearch-candidate-"], capture_output=True).stdout == b""
    # what the killed nodes left in the temp folder goes at a node's next start; a live node's stays
    from sandbox import run as sandbox
    import tempfile
    ours = tempfile.mkdtemp(prefix=sandbox.temp_prefix("candidate"))
    sandbox.sweep()
    left = [n for n in os.listdir(tempfile.gettempdir()) for pid in killed if n.startswith("autoresearch-") and f"-{pid}-" in n]
    assert left == [] and os.path.isdir(ours)
    os.rmdir(ours)


def test_suggestions_run_next_and_bad_ones_are_refused(env, tmp_path, stdlib_data, stdlib_cache, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_cache))
    home = tmp_path / "home"
    r = node_cli("suggest", "--home", str(home), "--note", "try more", env=env)
    assert r.returncode == 2 and "no node home" in r.stderr
    s = dict(config.load(os.path.join(ROOT, "configs", "cpu.toml")), profile="tiny", budget=2.0, max_experiments=1,
             max_reruns=0, listen="off")
    node = loop.Node(str(home), s, stdlib_data, out=open(os.devnull, "w"))
    node.close()
    patch = tmp_path / "p.diff"
    new = re.sub(r"^WARMDOWN_RATIO = [0-9.]+", "WARMDOWN_RATIO = 0.61", BASELINE, flags=re.M)
    diff = "".join(difflib.unified_diff(BASELINE.splitlines(True), new.splitlines(True), "a/train.py", "b/train.py"))
    patch.write_text(diff)
    assert node_cli("suggest", "--home", str(home), str(patch), env=env).returncode == 0
    r = node_cli("suggest", "--home", str(home), str(patch), env=env)  # the same patch again: it would run twice
    assert r.returncode == 0 and "already queued as" in r.stdout and len(os.listdir(home / "queue")) == 1
    assert node_cli("suggest", "--home", str(home), "--note", "deeper might pay off", env=env).returncode == 0
    other = tmp_path / "other.diff"
    other.write_text(diff.replace("train.py", "prepare.py"))
    r = node_cli("suggest", "--home", str(home), str(other), env=env)
    assert r.returncode == 2 and "only train.py" in r.stderr
    stale = tmp_path / "stale.diff"  # a context line the best train.py does not have: refused now, not when it runs
    stale.write_text(diff.replace(" WARMDOWN_RATIO", " WARMUP_RATIO", 1) if " WARMDOWN_RATIO" in diff else
                     diff.replace("-WARMDOWN_RATIO", "-WARMDOWN_RATI0", 1))
    queued = sorted(os.listdir(home / "queue"))
    r = node_cli("suggest", "--home", str(home), str(stale), env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not apply" in r.stderr, r.stderr
    assert sorted(os.listdir(home / "queue")) == queued
    node = loop.Node(str(home), s, stdlib_data, out=open(os.devnull, "w"))
    try:
        node.run()
        exps = node.store.experiments()
        assert [e["kind"] for e in exps][-1] == "suggestion" and "WARMDOWN_RATIO = 0.61" in node.tree.read(exps[-1]["commit_"])
        assert node.store.notes() == ["deeper might pay off"]
    finally:
        node.close()


def test_a_suggestion_to_a_home_that_never_ran_checks_nothing_and_creates_no_store(env, tmp_path):
    home = tmp_path / "home"
    (home / "queue").mkdir(parents=True)  # a home made, its node not yet started: no store, no best
    new = re.sub(r"^WARMDOWN_RATIO = [0-9.]+", "WARMDOWN_RATIO = 0.61", BASELINE, flags=re.M)
    patch = tmp_path / "p.diff"
    patch.write_text("".join(difflib.unified_diff(BASELINE.splitlines(True), new.splitlines(True), "a/train.py", "b/train.py")))
    r = node_cli("suggest", "--home", str(home), str(patch), env=env)
    assert r.returncode == 0 and "it runs next" in r.stdout, r.stderr
    assert sorted(os.listdir(home)) == ["queue"]


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_join_through_a_seed_and_status_lists_peers(env, tmp_path):
    port = _free_port()
    common = ["--profile", "tiny", "--budget", "1", "--max-reruns", "0", "--no-mdns"]
    homes_ = [str(tmp_path / "a"), str(tmp_path / "b")]
    procs = [subprocess.Popen([sys.executable, "-m", "node", "join", "--home", homes_[0], "--listen", f"127.0.0.1:{port}",
                               *common], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    procs.append(subprocess.Popen([sys.executable, "-m", "node", "join", "--home", homes_[1], "--listen", "127.0.0.1:0",
                                   "--seed", f"127.0.0.1:{port}", *common], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
    try:
        deadline, seen = time.time() + 90, None
        while time.time() < deadline:
            rs = [node_cli("status", "--home", h, "--json", env=env) for h in homes_]
            st = [json.loads(r.stdout) if r.returncode == 0 else {"peers": []} for r in rs]  # homes appear at start
            if all(s["peers"] for s in st):
                seen = st
                break
            assert all(p.poll() is None for p in procs), [p.stdout.read() for p in procs if p.poll() is not None]
            time.sleep(1)
        assert seen, "the nodes did not see each other within 90 s"
        a, b = seen
        assert a["address"] == f"127.0.0.1:{port}" and b["address"].startswith("127.0.0.1:")
        assert [(p["id"], p["address"]) for p in a["peers"]] == [(b["node_id"], b["address"])]
        assert [(p["id"], p["address"]) for p in b["peers"]] == [(a["node_id"], a["address"])]
        assert a["peers"][0]["hardware"]["backend"] == "cpu" and a["peers"][0]["last_seen_s"] < 30
        assert a["peers"][0]["service"] >= 0 and a["peers"][0]["standing"] >= 0  # what it did for us, what it owes
        text = node_cli("status", "--home", homes_[0], env=env).stdout
        assert "peers:          1" in text and b["node_id"] in text and "standing +" in text
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 143 for p in procs), outs  # stopped by SIGTERM, as a shell reports it
    assert "gossip: node" in outs[0] and "member joined" in outs[0]
    assert not os.path.exists(os.path.join(homes_[0], "peers.json"))  # a stopped node shows no live peers


def test_a_full_disk_stops_the_node_with_one_line_and_loses_nothing(env, tmp_path, stdlib_data):
    """The home on a small tmpfs, filled once the first baseline is in: the node stops with exit 2 and
    one line; once there is space again it restarts consistent and carries on."""
    home = tmp_path / "home"
    home.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(home)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        join = [sys.executable, "-m", "node", "join", "--home", str(home), "--profile", "tiny", "--budget", "1",
                "--max-reruns", "0", "--listen", "off"]
        p = subprocess.Popen([*join, "--max-experiments", "50"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not (home / "results.tsv").exists() or len(open(home / "results.tsv").readlines()) < 2:
            assert p.poll() is None and time.time() < deadline, "the first baseline never finished"
            time.sleep(0.2)
        with open(home / "filler", "wb", buffering=0) as f:  # every byte that is left; unbuffered: closing it
            try:                                                # has nothing left to write, and cannot fail
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2 and err.strip().count("\n") == 0 and err.startswith("error: disk full"), err
        os.remove(home / "filler")
        check_consistent(str(home), stdlib_data)
        r = node_cli("join", "--home", str(home), "--profile", "tiny", "--budget", "1", "--max-reruns", "0",
                     "--listen", "off", "--max-experiments", "1", env=env)
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(["umount", "-l", str(home)], capture_output=True)


class _SignalInFinalizer:
    """Sends this process SIGTERM from __del__, where Python prints the handler's exception as
    'Exception ignored' and goes on: what a garbage-collected Popen or file can do to a node."""
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10000):  # the handler runs at the next check, inside this finalizer
            pass


def test_a_signal_swallowed_by_a_finalizer_still_stops_the_node(tmp_path, stdlib_data, stdlib_cache, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_cache))
    s = dict(config.load(os.path.join(ROOT, "configs", "cpu.toml")), budget=60.0, listen="off")
    node = loop.Node(str(tmp_path / "n"), s, stdlib_data, out=open(os.devnull, "w"))
    progress = node._progress

    def swallowing(label):
        show, fired = progress(label), []

        def first_call_signals(*a):
            if not fired:
                fired.append(1)
                _SignalInFinalizer()  # dropped at once: its __del__ runs here
            show(*a)
        return first_call_signals
    node._progress = swallowing
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_type))
    try:
        t0 = time.time()
        assert node.run() == signal.SIGTERM  # run() answers with the signal that stopped it
        assert time.time() - t0 < 30  # not the 60 s budget: stopped within moments of the signal
        assert swallowed == [loop.Stop]  # the handler's Stop really was swallowed
        assert [e["status"] for e in node.store.experiments()] == ["interrupted"]
    finally:
        node.close()


def test_a_home_keeps_the_data_it_measured_and_data_named_on_the_command_line_wins(tmp_path, monkeypatch, capsys):
    """join took the data prepared last, whatever its home had measured (a home started on stdlib
    refused to start once a lab had prepared its own folder), and --data only when nothing was prepared."""
    import json
    import shutil
    from conftest import run_prepare
    from node import home as homes
    from node.__main__ import _data
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    monkeypatch.delenv("AUTORESEARCH_DATA", raising=False)
    fps = []
    for name in ("a", "b"):
        src = tmp_path / name
        src.mkdir()
        for i in range(6):
            (src / f"doc{i}.txt").write_text(f"{name} document {i} " * 40)
        assert run_prepare(cache, "--source", str(src), timeout=120).returncode == 0
        fps.append((cache / "current").read_text().strip())
    a, b = fps  # b was prepared last
    home = tmp_path / "home"
    home.mkdir()
    store = homes.Store(str(home / "store.sqlite"))
    store.set("task_of", json.dumps(dict(data=a, profile="cpu", source=str(tmp_path / "a"))))
    store.finish(store.start("baseline", "c" * 40, "c" * 40, "baseline", "offline"), "measured", val_bpb=3.0)
    store.db.close()
    s = dict(data="stdlib", seeds=[])
    assert _data(s, str(home), explicit=False)[0].fingerprint == a  # its own, not the last prepared
    assert _data(s, str(tmp_path / "new"), explicit=False)[0].fingerprint == b  # a new home: the last prepared
    shutil.rmtree(cache / "data" / a[:16])  # its data left the cache: as a new home (the node says the task changed)
    assert _data(s, str(home), explicit=False)[0].fingerprint == b
    assert _data(dict(s, data=str(tmp_path / "a")), str(tmp_path / "new"), explicit=True)[0].fingerprint == a
    assert _data(dict(s, data=str(tmp_path / "nowhere")), str(home), explicit=True)[0] is None  # said why, in one line
    assert "error:" in capsys.readouterr().err
