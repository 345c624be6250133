"""The MLX backend: train_mlx.py trains for real in the sandbox and the harness scores it; the
sandbox's cheat checks hold for MLX candidates; a node with backend mlx evolves the mlx lineage
and holds torch-lineage improvements instead of rebasing them.

MLX's Linux CPU build multiplies matrices with the reference BLAS (~15x slower than torch here):
one evaluation of the cpu profile costs ~30 s of its (B, T, 8192) logits. These tests shrink the
harness's evaluation to 2^11 tokens (`small_eval`), which changes what is measured, not how."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import ROOT

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'autoresearch-swarm[mlx]')")

from gossip import wire  # noqa: E402
from gossip.identity import Identity  # noqa: E402
from model import prepare as harness  # noqa: E402  (the sandbox's copy of the module, not conftest's `prepare`)
from node import config, gittree, home as homes, loop, proposer as proposers, swarm, watch  # noqa: E402
from sandbox import backend as backends, run as sandbox  # noqa: E402
from sandbox.result import HardwareTag  # noqa: E402

TRAIN_MLX = open(os.path.join(ROOT, "model", "train_mlx.py")).read()
TRAIN = open(os.path.join(ROOT, "model", "train.py")).read()
EVAL_TOKENS = 2**11
FAST = dict(startup=20, grace=5, evaluation=60)
UNIGRAM = """
import os, socket, time
import numpy as np
import mlx.core as mx
import prepare
data = prepare.load_data()
counts = np.bincount(np.asarray(data.train[:100000]), minlength=data.vocab_size) + 1
logp = mx.log(mx.array(counts / counts.sum(), dtype=mx.float32))
def unigram(x):
    return mx.broadcast_to(logp, (*x.shape, data.vocab_size))
"""


@pytest.fixture
def small_eval(monkeypatch, stdlib_cache):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_cache))
    monkeypatch.setitem(harness.PROFILES, "cpu", dict(harness.PROFILES["cpu"], eval_tokens=EVAL_TOKENS))


def rows(data):
    return harness.eval_rows(data.val, data.val_docs, harness.PROFILES["cpu"]["max_seq_len"], EVAL_TOKENS)


def uniform_bpb(data):
    """Where an untrained model starts (its lm_head is initialised near zero)."""
    b = data.token_bytes[rows(data)[:, 1:]]
    return (b > 0).sum() * math.log2(data.vocab_size) / b.sum()


def unigram_bpb(data):
    counts = np.bincount(np.asarray(data.train[:100000]), minlength=data.vocab_size) + 1
    p = counts / counts.sum()
    r = rows(data)
    b = data.token_bytes[r[:, 1:]]
    return -np.log2(p[r[:, 1:]].astype(np.float32))[b > 0].sum() / b.sum()


@pytest.fixture
def run_candidate(small_eval, stdlib_data, tmp_path):
    def go(body, budget=2, limits=None):
        tree = tmp_path / f"tree{len(list(tmp_path.iterdir()))}"
        tree.mkdir()
        (tree / "train.py").write_text(UNIGRAM + textwrap.dedent(body))
        return sandbox.run(str(tree), budget=budget, data=stdlib_data, seed=0, limits=dict(FAST, **(limits or {})),
                           backend="mlx")
    return go


# -- the baseline, for real ------------------------------------------------------------------

def test_train_mlx_learns_in_the_sandbox_and_the_harness_scores_it(small_eval, stdlib_data, tmp_path):
    (tmp_path / "train.py").write_text(TRAIN_MLX)
    r = sandbox.run(str(tmp_path), budget=3, data=stdlib_data, seed=0, backend="mlx")
    assert r.status == "ok" and r.violations == (), r.log_tail
    assert r.val_bpb < uniform_bpb(stdlib_data) - 0.05  # below the untrained model, by far more than noise
    assert "val_bpb:          nan" in r.log_tail  # the candidate never learns its own score
    assert r.probe_max_diff == 0.0 and r.num_steps >= 1
    hw = r.hardware
    assert (hw.backend, hw.device, hw.count) == ("mlx", "cpu", 1) and hw.framework == f"mlx {mx.__version__}"
    assert hw.accelerator == HardwareTag.detect(3, "cpu", "f", "cpu").accelerator  # the CPU model, on Linux
    assert hw.memory_gb > 0 and "network-namespace" in r.isolation


# -- the sandbox's guarantees for MLX candidates ---------------------------------------------

def test_an_mlx_model_is_scored_by_the_harness_and_a_printed_metric_counts_for_nothing(run_candidate, stdlib_data):
    r = run_candidate("""
        print("val_bpb:          0.000001")
        prepare.hand_over_mlx(unigram, 8)
    """)
    assert r.status == "ok" and r.val_bpb == pytest.approx(unigram_bpb(stdlib_data), rel=1e-5)


def test_peeking_at_the_next_token_is_caught(run_candidate):
    r = run_candidate("""
        def peek(x):  # puts 30 on the next input token: perfect on real batches, not causal
            following = mx.concatenate([x[:, 1:], x[:, -1:]], axis=1)
            return unigram(x) + 30.0 * (mx.arange(data.vocab_size) == following[..., None])
        prepare.hand_over_mlx(peek, 8)
    """)
    assert (r.status, r.violations, r.val_bpb) == ("violation", ("non_causal",), None)


@pytest.mark.parametrize("body, violation", [
    ("lambda x: unigram(x) * mx.nan", "nan_logits"),
    ("lambda x: unigram(x)[..., 1:]", "bad_logits"),
])
def test_malformed_logits(run_candidate, body, violation):
    r = run_candidate(f"prepare.hand_over_mlx({body}, 8)")
    assert (r.status, r.violations) == ("violation", (violation,))


def test_training_past_the_budget_is_a_violation(run_candidate):
    r = run_candidate("""
        time.sleep(3)
        prepare.hand_over_mlx(unigram, 8)
    """, budget=1, limits=dict(startup=0.5, grace=20))
    assert (r.status, r.violations) == ("violation", ("over_budget",))


def test_no_network(run_candidate):
    server = __import__("socket").socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    r = run_candidate(f"""
        socket.create_connection(("127.0.0.1", {port}), timeout=2)
        prepare.hand_over_mlx(unigram, 8)
    """)
    with pytest.raises(BlockingIOError):
        server.accept()  # nothing ever reached the server
    server.close()
    assert r.status == "crash" and ("ConnectionRefusedError" in r.log_tail or "unreachable" in r.log_tail)


@pytest.mark.skipif(sandbox.isolation()[0] != "view", reason="this machine allows no private filesystem view")
def test_the_validation_split_is_out_of_reach(run_candidate, stdlib_data):
    r = run_candidate(f"""
        for name in ("val.bin", "val_docs.npy"):
            try:
                mx.array(np.fromfile(os.path.join({stdlib_data.folder!r}, name), dtype=np.uint16))
                print("READ", name)
            except OSError as e:
                print("refused", name, type(e).__name__)
        prepare.hand_over_mlx(unigram, 8)
    """)
    assert r.status == "ok" and "READ" not in r.log_tail and r.log_tail.count("refused") == 2


# -- the node -------------------------------------------------------------------------------

def test_a_node_with_backend_mlx_evolves_the_mlx_lineage(small_eval, stdlib_data, tmp_path):
    """join --backend mlx --profile cpu --budget 2 --max-experiments 1 --listen off, in this process
    (so that small_eval holds): a baseline, its repeat, one experiment, all on MLX."""
    s = config.load(None, dict(backend="mlx", profile="cpu", budget=2.0, max_experiments=1, max_reruns=0,
                               listen="off", proposer_seed=1))
    node = loop.Node(str(tmp_path / "home"), s, stdlib_data, out=open(os.devnull, "w"))
    try:
        node.run()
        exps = node.store.experiments()
        assert [e["kind"] for e in exps] == ["baseline", "baseline", "candidate"]
        results = [json_result(e) for e in exps]
        assert all(r["hardware"]["backend"] == "mlx" and r["hardware"]["device"] == "cpu" for r in results)
        assert all(e["val_bpb"] < uniform_bpb(stdlib_data) for e in exps[:2]), [e["val_bpb"] for e in exps]
        first = node.tree.git("rev-list", "--max-parents=0", "HEAD")
        assert node.tree.read(first) == TRAIN_MLX  # the tree holds train_mlx.py, as train.py
        child = node.tree.read(exps[2]["commit_"])
        before, after = proposers.constants(TRAIN_MLX, "cpu"), proposers.constants(child, "cpu")
        assert len([n for n in before if before[n].value != after[n].value]) == 1  # one constant of the CPU branch
        records = [r for _, r in node.records.since()]
        experiment = next(r for r in records if r.type == "experiment")
        assert experiment.body["lineage"] == "mlx" and experiment.body["hardware"]["backend"] == "mlx"
        assert all(r.body["lineage"] == "mlx" for r in records if r.type == "improvement")
    finally:
        node.close()
    with pytest.raises(homes.HomeError, match="evolves the mlx lineage"):  # the home is the mlx lineage's now
        loop.Node(str(tmp_path / "home"), dict(s, backend="cpu"), stdlib_data, out=open(os.devnull, "w"))


def json_result(e):
    return json.loads(e["result"])


def test_each_lineage_holds_the_others_improvements_instead_of_rebasing_them(stdlib_data, stdlib_cache, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_cache))
    base = config.load(None, dict(profile="cpu", budget=2.0, listen="off"))
    for ours, theirs, source in (("mlx", "torch", TRAIN), ("cpu", "mlx", TRAIN_MLX)):
        node = loop.Node(str(tmp_path / ours), dict(base, backend=ours), stdlib_data, out=open(os.devnull, "w"))
        try:
            record = improvement(node, Identity.from_seed(b"peer"), theirs, source)
            node.records.add(record)
            assert [e.record.id for e in node.queue()[0]] == [record.id]  # shown in the queue ...
            best = node.best()
            assert node.verify(record) == "held"  # ... and held: nothing rebased, nothing run, nothing attested
            assert node.store.experiments() == [] and node.best() == best and node.tree.is_clean()
            assert node.store.verdicts()[record.id.hex()]["verdict"] == "held"
            assert not [r for _, r in node.records.since() if r.type == "attestation"]
            assert node.queue()[0] == []
            node.records.add(improvement(node, Identity.from_seed(b"other"), node.lineage, node.baseline_source))
        finally:
            node.close()
        w = watch.Watcher(str(tmp_path / ours))  # what watch --once shows: a best per tag, both lineages
        try:
            assert sorted(t["tag"].split("/")[0] for t in w.snapshot()["tags"]) == ["cpu", "mlx"]  # the backends
        finally:
            w.close()


def improvement(node, author, lineage, source):
    """A peer's signed claim that MATRIX_LR 0.05 beats `source` (a baseline of `lineage`) on our task."""
    child = source.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.05", 1)
    backend = "cpu" if lineage == "torch" else "mlx"
    body = dict(task=node.task, lineage=lineage, parent=swarm.content_hash(source), child=swarm.content_hash(child),
                diff=gittree.diff_texts(source, child), before=dict(val_bpb=3.0, runs=2, spread=0.001),
                after=dict(val_bpb=2.5, runs=2, spread=0.001), hardware=dict(node.hardware(), backend=backend),
                proposer="offline", description="MATRIX_LR up")
    return wire.make_record(author, "improvement", body, time.time() * 1000)


# -- settings, tags and the proposer --------------------------------------------------------

def test_backend_choice_and_the_mlx_hardware_tag():
    assert backends.resolve("mlx") == "mlx" and backends.lineage("mlx") == "mlx"
    import torch
    if not (torch.cuda.is_available() or backends.apple_silicon()):
        assert backends.resolve("auto") == "cpu" and backends.lineage("cpu") == "torch"
    with pytest.raises(backends.BackendError, match="backend must be one of"):
        backends.resolve("tpu")
    with pytest.raises(config.ConfigError, match="backend must be one of auto, cuda, mps, cpu, mlx"):
        config.load(None, {"backend": "metal"})
    tag = dataclasses.asdict(HardwareTag.detect(30, "cpu", "f" * 64, "mlx"))
    assert tag["backend"] == "mlx" and tag["framework"] == f"mlx {mx.__version__}" and tag["device"] == "cpu"
    assert swarm.tag_name(tag).startswith("mlx/") and swarm.closeness(tag, dict(tag, backend="cpu")) < 0.85


def test_without_mlx_backend_mlx_is_one_line_saying_how_to_install(tmp_path, stdlib_cache):
    fake = tmp_path / "site" / "mlx"  # a package named mlx without mlx.core shadows the installed one
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), AUTORESEARCH_CACHE=str(stdlib_cache))
    r = subprocess.run([sys.executable, "-m", "node", "join", "--backend", "mlx", "--home", str(tmp_path / "home"),
                        "--listen", "off"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "pip install 'autoresearch-swarm[mlx]'" in r.stderr and "pip install mlx" in r.stderr


def test_the_offline_proposer_edits_the_branch_train_mlx_runs():
    cpu, gpu = proposers.constants(TRAIN_MLX, "cpu"), proposers.constants(TRAIN_MLX, "gpu")
    assert cpu["MODEL_DIM"].value < gpu["MODEL_DIM"].value and {"MATRIX_LR", "WINDOW_PATTERN"} <= set(cpu)
    p = proposers.OfflineProposer(0).propose(proposers.Context(TRAIN_MLX, [], 0.01, "cpu", []))
    assert p.source != TRAIN_MLX and compile(p.source, "train.py", "exec")
    assert proposers.constants(TRAIN, "cuda")["DEPTH"].value == 8  # train.py's branches unchanged
