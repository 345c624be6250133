"""How `join` ends and what its console says on the way: seeds that never answer are named once,
a signal ends it with the shell's status for that signal (130, 143) and a line that says so, not
"done"; and the read commands open the node's store once. Real node processes on loopback, the
`tiny` profile, a one-second budget."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT
from node import export, gittree, home as homes, knowledge

JOIN = ["join", "--profile", "tiny", "--budget", "1", "--max-reruns", "0", "--no-mdns"]


@pytest.fixture
def env(stdlib_cache, stdlib_data):
    return dict(os.environ, AUTORESEARCH_CACHE=str(stdlib_cache), AUTORESEARCH_DATA=stdlib_data.fingerprint,
                PYTHONUNBUFFERED="1")


def _closed_port():
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(home, *args, env):
    """A node in a session of its own, as at a terminal: Ctrl-C reaches it and every process it started."""
    return subprocess.Popen([sys.executable, "-m", "node", *JOIN, "--home", str(home), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


class Console:
    """The node's console lines as they come (a thread reads them, so that waiting never blocks on a read)."""

    def __init__(self, p):
        self.lines = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(p.stdout.readline, "")), daemon=True)
        self.thread.start()

    def text(self):
        self.thread.join(60)
        return "".join(self.lines)


def _wait(p, console, done, deadline):
    while not done():
        assert p.poll() is None, "the node ended:\n" + console.text()[-4000:]
        assert time.time() < deadline, "".join(console.lines)[-4000:]
        time.sleep(0.2)


def _decided(home):
    """The runs decided after the two baselines (rows of results.tsv)."""
    try:
        return len(open(home / "results.tsv").read().splitlines()) - 3
    except FileNotFoundError:
        return -3


def _check_nothing_lost(home):
    """The stopped line counts what the store holds; the tree is clean at the best commit; results.tsv has a
    row for every decided run, and no run is left running."""
    st = json.loads(subprocess.run([sys.executable, "-m", "node", "status", "--home", str(home), "--json"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=60).stdout)
    store = homes.Store(str(home / "store.sqlite"))
    try:
        exps = store.experiments()
    finally:
        store.db.close()
    assert not [e for e in exps if e["status"] in ("running", "measured")]
    decided = [e for e in exps if e["status"] in ("keep", "discard", "crash")]
    assert len(open(home / "results.tsv").read().splitlines()) == 1 + len(decided)
    tree = gittree.Tree(str(home / "tree"))
    assert tree.is_clean() and tree.head() == st["best_commit"]
    return st


def test_seeds_that_never_answer_are_named_once_and_sigterm_exits_143(env, tmp_path):
    seed = f"127.0.0.1:{_closed_port()}"
    home = tmp_path / "home"
    t0 = time.time()
    p = _start(home, "--listen", "127.0.0.1:0", "--seed", seed, env=env)
    console = Console(p)
    try:
        _wait(p, console, lambda: any("no answer from" in l for l in console.lines), t0 + 60)
        assert time.time() - t0 < 40  # 12 s after gossip started (a few seconds after the process)
        warned = time.time()  # then a decided run, and a few of the node's retries of its seed
        _wait(p, console, lambda: _decided(home) >= 1 and time.time() - warned > 10, t0 + 240)
        p.send_signal(signal.SIGTERM)
        p.wait(60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    out = console.text()
    silent = [l for l in out.splitlines() if "no answer from" in l]
    assert silent == [f"gossip: no answer from {seed} within 12 s: going on alone, trying again every 4 s"], out
    assert p.returncode == 143, out
    st = _check_nothing_lost(home)
    stopped = out.splitlines()[-1]
    assert stopped.startswith(f"stopped by SIGTERM after {st['experiments']} experiments, {st['kept']} kept, "), out
    assert "nothing lost" in stopped and st["experiments"] >= 1


def test_ctrl_c_says_stopped_exits_130_and_loses_nothing(env, tmp_path):
    home = tmp_path / "home"
    t0 = time.time()
    p = _start(home, "--listen", "off", env=env)
    console = Console(p)
    try:
        _wait(p, console, lambda: _decided(home) >= 1, t0 + 240)
        seen = len(console.lines)  # then the next run's training, cut short
        _wait(p, console, lambda: any(": training" in l for l in console.lines[seen:]), t0 + 300)
        os.killpg(p.pid, signal.SIGINT)  # to the node and the candidate it runs, as Ctrl-C at a terminal
        p.wait(60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    out = console.text()
    assert p.returncode == 130, out
    assert "Traceback" not in out
    st = _check_nothing_lost(home)
    assert out.splitlines()[-1].startswith(f"stopped by SIGINT after {st['experiments']} experiments"), out
    # a restart carries on from there: one more run, and --max-experiments (this start's) ends it with exit 0, "done"
    r = subprocess.run([sys.executable, "-m", "node", *JOIN, "--home", str(home), "--listen", "off",
                        "--max-experiments", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1].startswith(f"done: {st['experiments'] + 1} experiments"), r.stdout


# -- the read commands open the node's store once ----------------------------------------------

@pytest.fixture
def store_opens():
    """The paths sqlite3.connect is given while the test runs (an audit hook: stays for the process, inert after)."""
    opened = []
    active = [True]

    def hook(event, args):
        if active[0] and event == "sqlite3.connect":
            opened.append(os.path.basename(str(args[0])))
    sys.addaudithook(hook)
    yield opened
    active[0] = False


def _baseline_home(path):
    path.mkdir()
    store = homes.Store(str(path / "store.sqlite"))
    store.finish(store.start("baseline", "a" * 40, "b" * 40, "baseline", "-"), "keep", val_bpb=3.5)
    store.db.close()
    return path


def test_knowledge_and_export_open_the_store_once(tmp_path, store_opens):
    home = str(_baseline_home(tmp_path / "home"))
    store_opens.clear()
    assert knowledge.read(home)["ideas"] == []
    with pytest.raises(export.ExportError, match="no experiments yet"):  # said once both stores are read
        export.provenance(home)
    assert store_opens == ["store.sqlite", "gossip.sqlite"] * 2


def test_ctrl_c_during_an_experiment_is_one_line_and_exit_130(env, tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "node", "experiment", os.path.join(ROOT, "model", "train.py"),
                          "--profile", "tiny", "--budget", "30"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(6)  # the candidate is training
    os.killpg(p.pid, signal.SIGINT)  # as Ctrl-C at a terminal: the whole group
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip().splitlines() == ["interrupted: no result"], err


def test_an_experiment_takes_its_turn_on_the_device_with_the_nodes(env, stdlib_cache):
    """A node's runs and an `experiment` on one machine share the device's lock, so no run's clock is shared."""
    lock = os.path.join(str(stdlib_cache), "device-" + env.get("CUDA_VISIBLE_DEVICES", "all") + ".lock")
    with homes.device_lock(lock, lambda: None):  # as a node's run holds it
        p = subprocess.Popen([sys.executable, "-m", "node", "experiment", os.path.join(ROOT, "model", "train.py"),
                              "--profile", "tiny", "--budget", "1", "--json"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(8)
        assert p.poll() is None  # waiting, not running beside it
    out, err = p.communicate(timeout=120)
    assert "waiting for the device" in err and json.loads(out)["status"] == "ok", err
