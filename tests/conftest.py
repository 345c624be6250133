import math
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "model"))  # train.py's view: `import prepare`
os.environ.setdefault("AUTORESEARCH_PROFILE", "cpu")
os.environ.pop("ANTHROPIC_API_KEY", None)  # --proposer auto is offline in tests: none calls the real API


def train_section(start, end, **names):
    """The definitions of model/train.py from the line starting `start` up to `end`, run without the
    training script around them; `names` are the globals they need."""
    src = open(os.path.join(ROOT, "model", "train.py")).read()
    g = dict(names)
    exec(src[src.index(start):src.index(end)], g)
    return g


def run_prepare(cache, *args, timeout=300):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "model.prepare", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder, used by prepare in this process and its children."""
    path = tmp_path / "cache"
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def stdlib_cache(tmp_path_factory):
    """One small prepared dataset (3 MB of this Python's library), shared by the session."""
    path = tmp_path_factory.mktemp("stdlib-cache")
    r = run_prepare(path, "--source", "stdlib", "--max-mb", "3")
    assert r.returncode == 0, r.stderr
    return path


@pytest.fixture(scope="session")
def stdlib_data(stdlib_cache):
    import prepare
    fp = (stdlib_cache / "current").read_text().strip()
    folder = str(stdlib_cache / "data" / fp[:16])
    return prepare.Data(folder, prepare.verify(folder))


# The baseline at a quarter of its CPU cost per step (half the width, half the batch).
SMALL = (open(os.path.join(ROOT, "model", "train.py")).read()
         .replace("    MODEL_DIM = 128\n    DEVICE_BATCH_SIZE = 8\n    TOTAL_BATCH_SIZE = 8 * 256",
                  "    MODEL_DIM = 64\n    DEVICE_BATCH_SIZE = 4\n    TOTAL_BATCH_SIZE = 4 * 256"))
# SMALL with every learning rate cut a hundredfold: what test nodes start from. It barely learns, so
# its score hardly depends on how many steps a (loaded) machine fits into a budget of a second or two,
# and undoing the cut (SLOW -> SMALL) is a gain no timing noise hides: on an idle 2-core machine
# 4.94 -> 4.35 val_bpb in 14 steps, and still better at 2 steps against 5 under a CPU hog.
LR_LINE = 'group["lr"] = group["initial_lr"] * lr_mult\n'
SLOW = SMALL.replace(LR_LINE, LR_LINE[:-1] + " / 100\n")


@pytest.fixture(scope="session")
def slow_start(tmp_path_factory):
    """SLOW as a file, for join --start."""
    assert SMALL.count("MODEL_DIM = 64") == 1 and SMALL.count(LR_LINE) == 1
    path = tmp_path_factory.mktemp("start") / "train.py"
    path.write_text(SLOW)
    return str(path)


def uniform_bpb(data):
    """val_bpb of a uniform guess over the vocabulary: where an untrained model starts
    (its output layer is initialised near zero)."""
    import prepare
    rows = prepare.eval_rows(data.val, data.val_docs)
    b = data.token_bytes[rows[:, 1:]]
    return (b > 0).sum() * math.log2(data.vocab_size) / b.sum()


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)


@pytest.fixture
def two_namespaces():
    """[(namespace, address), (namespace, address)] on one /24 over a veth pair, multicast routed."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    tag = os.getpid() % 100_000
    names, veths = [f"argossip{tag}a", f"argossip{tag}b"], [f"arg{tag}a", f"arg{tag}b"]
    net = f"10.{200 + tag % 50}.{tag % 250}"
    addresses = [f"{net}.1", f"{net}.2"]
    made = []
    try:
        for ns in names:
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
            made.append(ns)
        steps = [("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])]
        for ns, veth, address in zip(names, veths, addresses):
            steps += [("link", "set", veth, "netns", ns),
                      ("-n", ns, "addr", "add", f"{address}/24", "dev", veth),
                      ("-n", ns, "link", "set", veth, "up"),
                      ("-n", ns, "link", "set", "lo", "up"),
                      ("-n", ns, "route", "add", "224.0.0.0/4", "dev", veth)]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                pytest.skip(f"cannot set up the veth pair (ip {' '.join(step)}): {r.stderr.strip()}")
        yield list(zip(names, addresses))
    finally:
        for ns in made:  # deleting a namespace deletes the veth end inside it, and so the pair
            _ip("netns", "del", ns)
