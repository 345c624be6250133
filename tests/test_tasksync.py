"""Task sync: the signed task manifest, chunk serving and fetching from several peers (a lying one
among them), resumption after a killed fetch, two tasks in one swarm, and a node that joins with
nothing but --seed."""

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from gossip import wire
from gossip.identity import Identity
from gossip.transport import Service
from model import prepare
from node import swarm, tasksync
from node.taskfetch import Fetcher, Peer
from node.taskserver import Server
from node.tasksync import Manifest, TaskError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_CHUNK = 1 << 16  # the smallest the wire allows: the 2 MB test task is ~40 chunks
ALICE = Identity.from_seed(b"alice")


def now_ms():
    return int(time.time() * 1000)


def manifest_of(folder, identity=ALICE):
    m = tasksync.build_manifest(folder, "cpu", prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS, chunk=SMALL_CHUNK)
    return tasksync.sign(identity, m, now_ms())


@pytest.fixture(scope="module")
def task(stdlib_data):
    return manifest_of(stdlib_data.folder)


@pytest.fixture
def server(stdlib_data, task):
    s = Server(stdlib_data.folder, task, "127.0.0.1").start()
    yield s
    s.stop()


def chunk_count(m):
    return sum(len(f.chunks) for f in m.files)


# --- the manifest -------------------------------------------------------------------------------

def test_manifest_is_signed_round_trips_and_names_its_task(task, stdlib_data):
    back = Manifest.from_record(wire.decode_record(task.record.encoded, now_ms()))
    assert back.files == task.files and back.fingerprint == stdlib_data.fingerprint
    assert back.task == swarm.task_id(stdlib_data.fingerprint, "cpu", prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS)
    assert {f.path for f in task.files} == {"manifest.json", *prepare.DATA_FILES}
    assert chunk_count(task) > 20

    raw = wire.unpack(task.record.encoded)
    forged = wire.canonical(dict(raw, sig=bytes([raw["sig"][0] ^ 1]) + raw["sig"][1:]))
    with pytest.raises(wire.WireError, match="bad_signature"):
        wire.decode_record(forged, now_ms())
    lying = wire.make_record(ALICE, "task", dict(task.body(), seq_len=1024), now_ms())
    with pytest.raises(TaskError, match="does not match its settings"):
        Manifest.from_record(lying)


def one_file(**change):
    f = {"path": "train.bin", "size": 5, "sha256": "a" * 64, "chunk": SMALL_CHUNK, "chunks": [b"\1" * 32]}
    return {**f, **change}


@pytest.mark.parametrize("files, reason", [
    ([one_file(path="/etc/passwd")], "not a plain relative path"),
    ([one_file(path="../../.ssh/authorized_keys")], "not a plain relative path"),
    ([one_file(path="a//b")], "not a plain relative path"),
    ([one_file(path="")], "not a plain relative path"),
    ([one_file(), one_file()], "appears twice"),
    ([one_file(size=SMALL_CHUNK * 5000)], "out of bounds"),
    ([one_file(size=(1 << 26) * 1100, chunk=1 << 26, chunks=[b"\1" * 32] * 1100)], "over the bound"),
    ([one_file(size=SMALL_CHUNK + 1)], "1 chunk hashes for"),
    ([one_file(chunk=3000)], "not a power of two"),
])
def test_a_bad_manifest_is_refused_with_its_reason(task, files, reason):
    body = dict(task.body(), files=files)
    with pytest.raises(wire.WireError, match=reason):
        wire.make_record(ALICE, "task", body, now_ms())
    # a receiver refuses the same body signed by anyone (the encoding skips make_record's checks)
    unsigned = {"v": wire.VERSION, "type": "task", "author": ALICE.public_key, "ts": now_ms(), "body": body}
    rid = hashlib.sha256(wire.canonical(unsigned)).digest()
    data = wire.canonical({**unsigned, "id": rid, "sig": ALICE.sign(rid)})
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_record(data, now_ms())


def test_a_task_is_built_only_from_a_folder_that_matches_its_fingerprint(tmp_path, stdlib_data):
    bad = tmp_path / stdlib_data.fingerprint[:16]
    shutil.copytree(stdlib_data.folder, bad)
    data = bytearray((bad / "val.bin").read_bytes())
    data[0] ^= 1
    (bad / "val.bin").write_bytes(data)
    with pytest.raises(TaskError, match="does not match its fingerprint .val.bin"):
        tasksync.build_manifest(str(bad), "cpu", prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS)
    os.remove(bad / "val.bin")
    with pytest.raises(TaskError, match="is incomplete"):
        tasksync.build_manifest(str(bad), "cpu", prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS)


def test_a_link_is_neither_served_nor_written(tmp_path, stdlib_data, task):
    linked = tmp_path / stdlib_data.fingerprint[:16]
    shutil.copytree(stdlib_data.folder, linked)
    os.remove(linked / "train.bin")
    os.symlink(os.path.join(stdlib_data.folder, "train.bin"), linked / "train.bin")
    with pytest.raises(TaskError, match="is a link"):
        tasksync.build_manifest(str(linked), "cpu", prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS)
    # a link planted in the partial fetch is not written through
    partial = tmp_path / "cache" / "partial" / task.fingerprint / task.fingerprint[:16]
    partial.mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", partial / "train.bin")
    with pytest.raises(TaskError, match="cannot write .*train.bin"):
        Fetcher(task, [], cache=str(tmp_path / "cache")).fetch()
    assert not (tmp_path / "elsewhere").exists()
    # a signed manifest with a file the task layout does not have is refused before anything is written
    extra = tasksync.sign(ALICE, Manifest(**{**task.__dict__, "files": task.files + (
        tasksync.FileEntry("run.sh", 0, hashlib.sha256().hexdigest(), SMALL_CHUNK, ()),), "record": None}), now_ms())
    with pytest.raises(TaskError, match="lists .*run.sh.*; a task folder holds exactly"):
        Fetcher(extra, [], cache=str(tmp_path / "extra"))


# --- fetching -----------------------------------------------------------------------------------

def lying_server(tmp_path, stdlib_data, task):
    """A server of `task` whose every chunk of every file is wrong."""
    liar_folder = tmp_path / "liar" / stdlib_data.fingerprint[:16]
    shutil.copytree(stdlib_data.folder, liar_folder)
    for f in task.files:
        path = liar_folder / f.path
        data = bytearray(path.read_bytes())
        data[::1000] = bytes((b + 1) % 256 for b in data[::1000])
        path.write_bytes(data)
    return Server(str(liar_folder), task, "127.0.0.1").start()


def test_a_lying_peer_is_dropped_and_its_chunk_fetched_from_an_honest_one(tmp_path, stdlib_data, task, server):
    liar = lying_server(tmp_path, stdlib_data, task)
    try:
        # the liar alone: the fetch fails, nothing it sent was written, nothing reached data/
        alone = tmp_path / "alone"
        with pytest.raises(TaskError, match="served wrong bytes"):
            Fetcher(task, [Peer("127.0.0.1", liar.port)], cache=str(alone)).fetch()
        assert not (alone / "data").exists()
        partial = alone / "partial" / task.fingerprint
        assert not any(any((partial / task.fingerprint[:16] / f.path).read_bytes()) for f in task.files)
        assert (partial / "verified").read_text() == ""

        # beside an honest peer: the liar is scored down, every chunk lands verified
        liar_peer, honest = Peer("127.0.0.1", liar.port), Peer("127.0.0.1", server.port)
        done = Fetcher(task, [liar_peer, honest], cache=str(tmp_path / "both")).fetch()
        assert liar_peer.bad >= 1 and "wrong bytes" in liar_peer.dropped and honest.bad == 0
        assert prepare.verify(done.folder)["fingerprint"] == task.fingerprint
        assert done.folder == str(tmp_path / "both" / "data" / task.fingerprint[:16])
        assert not (tmp_path / "both" / "partial" / task.fingerprint).exists()
    finally:
        liar.stop()


def test_chunks_that_match_a_forged_manifest_still_fail_the_fingerprint(tmp_path, stdlib_data, task):
    """A signer whose chunk hashes describe other bytes than the task's fingerprint: every chunk checks,
    the whole files do not, and nothing reaches data/."""
    forged_folder = tmp_path / "forged" / stdlib_data.fingerprint[:16]
    shutil.copytree(stdlib_data.folder, forged_folder)
    train = forged_folder / "train.bin"
    data = bytearray(train.read_bytes())
    data[:2] = data[2:4]
    train.write_bytes(data)
    chunks = tuple(hashlib.sha256(data[i:i + SMALL_CHUNK]).digest() for i in range(0, len(data), SMALL_CHUNK))
    files = tuple(tasksync.FileEntry(f.path, f.size, hashlib.sha256(data).hexdigest(), f.chunk, chunks)
                  if f.path == "train.bin" else f for f in task.files)
    forged = tasksync.sign(Identity.from_seed(b"forger"), Manifest(**{**task.__dict__, "files": files, "record": None}),
                           now_ms())
    srv = Server(str(forged_folder), forged, "127.0.0.1").start()
    try:
        peer = Peer("127.0.0.1", srv.port)
        with pytest.raises(TaskError, match="fails its fingerprint"):
            Fetcher(forged, [peer], cache=str(tmp_path / "cache")).fetch()
    finally:
        srv.stop()
    assert peer.bad == 0 and not (tmp_path / "cache" / "data").exists()


FETCH = """
import sys
from node import taskfetch, tasksync
m = taskfetch.fetch_manifest([taskfetch.Peer('127.0.0.1', {port})], {task!r})
try:
    taskfetch.Fetcher(m, [taskfetch.Peer('127.0.0.1', {port})], cache={cache!r}).fetch()
except tasksync.TaskError as e:
    sys.exit(f"error: {{e}}")
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_a_killed_fetch_resumes_without_fetching_verified_chunks_again(tmp_path, stdlib_data, task, how):
    cache = tmp_path / "cache"
    log = cache / "partial" / task.fingerprint / "verified"
    slow = Server(stdlib_data.folder, task, "127.0.0.1", rate=400_000).start()  # ~5 s for the whole task
    try:
        # Ctrl-C as at a terminal, also where the suite itself runs with SIGINT ignored (a background job
        # of a shell without job control), which the child would inherit and so finish the fetch
        proc = subprocess.Popen([sys.executable, "-c", FETCH.format(port=slow.port, task=task.task, cache=str(cache))],
                                cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 30
        while not (log.exists() and len(log.read_text().splitlines()) >= 8):
            assert proc.poll() is None and time.time() < deadline, "the fetch ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(how)
        err = proc.communicate(timeout=10)[1]
        if how == signal.SIGINT:  # one line, no traceback, and the workers stopped at once
            assert proc.returncode == 1 and err.count("\n") == 1 and "error: interrupted:" in err, err
            assert f"verified chunks kept in {cache / 'partial' / task.fingerprint}" in err
    finally:
        slow.stop()
    kept = len(set(log.read_text().splitlines()))
    assert 8 <= kept < chunk_count(task)
    fast = Server(stdlib_data.folder, task, "127.0.0.1").start()
    try:
        done = Fetcher(task, [Peer("127.0.0.1", fast.port)], cache=str(cache)).fetch()
    finally:
        fast.stop()
    assert done.resumed_chunks == kept
    assert sum(fast.requests.values()) == chunk_count(task) - kept  # not one verified chunk asked again
    assert prepare.verify(done.folder)["fingerprint"] == task.fingerprint


FULL = """
import resource, signal, sys
from node import taskfetch, tasksync
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
peers = [taskfetch.Peer('127.0.0.1', {port})]
try:
    taskfetch.Fetcher(taskfetch.fetch_manifest(peers, {task!r}), peers, cache={cache!r}).fetch()
except tasksync.TaskError as e:
    sys.exit(f"error: {{e}}")
"""


def test_a_full_disk_is_one_line_and_keeps_the_partial_fetch(tmp_path, task, server):
    cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-c", FULL.format(port=server.port, task=task.task, cache=str(cache))],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "file size limit reached at" in r.stderr and "verified chunks kept in" in r.stderr
    assert not (cache / "data").exists()
    kept = len((cache / "partial" / task.fingerprint / "verified").read_text().splitlines())
    assert kept > 0
    asked = sum(server.requests.values())
    done = Fetcher(task, [Peer("127.0.0.1", server.port)], cache=str(cache)).fetch()
    assert done.resumed_chunks == kept and sum(server.requests.values()) - asked == chunk_count(task) - kept
    assert prepare.verify(done.folder)["fingerprint"] == task.fingerprint


def test_two_tasks_side_by_side_a_joiner_takes_the_one_it_is_told(tmp_path, stdlib_data, task):
    other_cache = tmp_path / "other"
    r = subprocess.run([sys.executable, "-m", "model.prepare", "--source", "stdlib", "--max-mb", "1"], cwd=ROOT,
                       env=dict(os.environ, AUTORESEARCH_CACHE=str(other_cache)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fp = (other_cache / "current").read_text().strip()
    other = manifest_of(str(other_cache / "data" / fp[:16]), Identity.from_seed(b"bob"))
    assert other.task != task.task
    servers, services = [], []
    try:
        for m, folder in ((task, stdlib_data.folder), (other, str(other_cache / "data" / fp[:16])),
                          (other, str(other_cache / "data" / fp[:16]))):
            servers.append(Server(folder, m, "127.0.0.1").start())
            services.append(Service(Identity.generate(), listen="127.0.0.1:0", mdns=False,
                                    seeds=[services[0].address] if services else [],
                                    meta={"task": m.task, "data_port": servers[-1].port}).start())
        settings = dict(listen="127.0.0.1:0", seeds=[services[0].address], mdns=False, profile="cpu", task=None)
        os.environ["AUTORESEARCH_CACHE"] = str(tmp_path / "joiner")
        try:
            lines = []
            # told nothing: the seed's task, though most peers run the other
            assert tasksync.join_task(settings, say=lines.append) == (task.fingerprint, {})
            assert sum(servers[0].requests.values()) == chunk_count(task)
            # told --task: the other, from both peers that run it, and never from the first
            asked_first = sum(servers[0].requests.values())
            assert tasksync.join_task(dict(settings, task=other.task), say=lines.append) == (other.fingerprint, {})
            assert sum(servers[0].requests.values()) == asked_first
            assert sum(s.requests[p] for s in servers[1:] for p in s.requests) == chunk_count(other)
            assert any("run by 2 of 2 peers" in line or "run by 2 of" in line for line in lines), lines
            with pytest.raises(TaskError, match=f"no peer runs task 00000000 after 1 s; the peers run "
                                                f"{other.task} .2 peers., {task.task} .1 peer.$"):
                tasksync.join_task(dict(settings, task="00000000"), say=lines.append, wait_s=1)
        finally:
            os.environ.pop("AUTORESEARCH_CACHE")
    finally:
        for s in services + servers:
            s.stop()


def test_a_joiner_names_the_peer_that_lied_and_its_node_distrusts_it(tmp_path, stdlib_data, stdlib_cache, task, server):
    from node import config, loop
    mallory = Identity.from_seed(b"mallory")
    liar = lying_server(tmp_path, stdlib_data, task)
    services = []
    try:
        for who, srv in ((Identity.from_seed(b"honest"), server), (mallory, liar)):
            services.append(Service(who, listen="127.0.0.1:0", mdns=False, seeds=[s.address for s in services],
                                    meta={"task": task.task, "data_port": srv.port}).start())
        settings = dict(listen="127.0.0.1:0", seeds=[s.address for s in services], mdns=False, profile="cpu",
                        task=task.task)
        os.environ["AUTORESEARCH_CACHE"] = str(tmp_path / "joiner")
        try:
            # both seeds heard before the fetch (on a loaded machine the second can answer after the
            # default 2 s, and the fetch then never asks the liar): the wait ends once they are
            fingerprint, liars = tasksync.join_task(settings, say=lambda line: None, settle_s=30.0)
        finally:
            os.environ.pop("AUTORESEARCH_CACHE")
    finally:
        for s in services + [liar]:
            s.stop()
    assert fingerprint == task.fingerprint and list(liars) == [mallory.id] and "wrong bytes" in liars[mallory.id]
    # the node that joined: the liar's claims rank as after an attested violation, across restarts
    s = dict(config.load(os.path.join(ROOT, "configs", "cpu.toml")), listen="off")
    node = loop.Node(str(tmp_path / "home"), s, stdlib_data, out=open(os.devnull, "w"))
    try:
        before = node.ledger.standing(mallory.id)
        node.distrust(liars)
        assert before == 0.5 and node.ledger.standing(mallory.id) < 0.05 and node.ledger.standing(ALICE.id) == 0.5
    finally:
        node.close()
    node = loop.Node(str(tmp_path / "home"), s, stdlib_data, out=open(os.devnull, "w"))
    try:
        assert node.ledger.standing(mallory.id) < 0.05
    finally:
        node.close()


# --- a node that joins with nothing but --seed -------------------------------------------------

@pytest.mark.parametrize("cache", ["empty", "folder_deleted"])
def test_a_node_with_an_empty_cache_fetches_the_seeds_task_and_runs_its_baseline(tmp_path, stdlib_cache, stdlib_data,
                                                                                 cache):
    if cache == "folder_deleted":  # a corrupt dataset removed by hand, as its refusal says: `current` still names it
        (tmp_path / "empty" / "data").mkdir(parents=True)
        (tmp_path / "empty" / "current").write_text(stdlib_data.fingerprint + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--profile", "cpu", "--budget", "1", "--no-mdns", "--max-experiments", "1"]
    join = lambda home, *extra: [sys.executable, "-m", "node", "join", "--home", str(tmp_path / home), *common, *extra]
    env = dict(os.environ, AUTORESEARCH_CACHE=str(stdlib_cache), AUTORESEARCH_DATA=stdlib_data.fingerprint)
    a = subprocess.Popen(join("a", "--listen", f"127.0.0.1:{port}"), cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env_b = dict(os.environ, AUTORESEARCH_CACHE=str(tmp_path / "empty"))
    env_b.pop("AUTORESEARCH_DATA", None)
    b = subprocess.Popen(join("b", "--listen", "127.0.0.1:0", "--seed", f"127.0.0.1:{port}"), cwd=ROOT, env=env_b,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, out = time.time() + 60, ""
        while "baseline" not in out:
            line = b.stdout.readline()
            assert line and time.time() < deadline, "node b did not reach its baseline:\n" + out
            out += line
    finally:
        for p in (a, b):
            p.terminate()
        outs = {n: p.communicate(timeout=30)[0] for n, p in (("a", a), ("b", b))}
    out += outs["b"]
    expect = swarm.task_id(stdlib_data.fingerprint, "cpu", prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS)
    assert f"task {expect}: fetching" in out and "verified against fingerprint" in out, out
    assert (tmp_path / "empty" / "current").read_text().strip() == stdlib_data.fingerprint
    assert prepare.verify(str(tmp_path / "empty" / "data" / stdlib_data.fingerprint[:16]))
    from node import home as homes
    store = homes.Store(str(tmp_path / "b" / "store.sqlite"))
    try:
        assert store.get("task") == expect
    finally:
        store.db.close()
    assert f"task {expect}: serving" in out  # and b serves it on in turn


def test_a_fresh_node_on_another_host_fetches_the_task_with_only_a_seed(tmp_path, stdlib_cache, stdlib_data,
                                                                       two_namespaces):
    """Two hosts (network namespaces over a veth pair): A prepared a task; B has an empty cache and
    only --seed. B fetches A's task, starts its baseline on the same task id, and A sees B at B's
    own address although B listens on 0.0.0.0. Prints the time from B's command to its baseline."""
    import json
    (ns_a, ip_a), (ns_b, ip_b) = two_namespaces
    common = ["--profile", "cpu", "--budget", "1", "--no-mdns", "--max-experiments", "2", "--listen", "0.0.0.0:7645"]
    join = lambda ns, home, *extra: ["ip", "netns", "exec", ns, sys.executable, "-m", "node", "join", "--home",
                                     str(tmp_path / home), *common, *extra]
    env_a = dict(os.environ, AUTORESEARCH_CACHE=str(stdlib_cache), AUTORESEARCH_DATA=stdlib_data.fingerprint)
    env_b = dict(os.environ, AUTORESEARCH_CACHE=str(tmp_path / "empty"))
    env_b.pop("AUTORESEARCH_DATA", None)
    a = subprocess.Popen(join(ns_a, "a"), cwd=ROOT, env=env_a, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    b, out_a, out_b = None, "", ""
    try:
        deadline = time.time() + 60
        while ": serving" not in out_a:
            line = a.stdout.readline()
            assert line and time.time() < deadline, "node a did not start serving:\n" + out_a
            out_a += line
        t0 = time.time()
        b = subprocess.Popen(join(ns_b, "b", "--seed", f"{ip_a}:7645"), cwd=ROOT, env=env_b,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while "baseline" not in out_b:
            line = b.stdout.readline()
            assert line and time.time() < t0 + 60, "node b did not reach its baseline:\n" + out_b
            out_b += line
        seconds = time.time() - t0
        deadline, peers = time.time() + 20, []
        while f"{ip_b}:7645" not in peers and time.time() < deadline:
            st = subprocess.run([sys.executable, "-m", "node", "status", "--home", str(tmp_path / "a"), "--json"],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
            peers = [p["address"] for p in json.loads(st.stdout)["peers"]] if st.returncode == 0 else []
            time.sleep(0.5)
        assert f"{ip_b}:7645" in peers, peers  # B told A an address A can reach, not 0.0.0.0
    finally:
        for p in (a, b):
            if p:
                p.terminate()
        for p in (a, b):
            if p:
                try:
                    p.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    expect = swarm.task_id(stdlib_data.fingerprint, "cpu", prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS)
    assert f"task {expect}: fetching" in out_b and "verified against fingerprint" in out_b, out_b
    assert prepare.verify(str(tmp_path / "empty" / "data" / stdlib_data.fingerprint[:16]))
    print(f"\nfresh node on a second host: baseline started {seconds:.1f} s after `join --seed {ip_a}:7645`")
