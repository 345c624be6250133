"""Real gossip nodes (`python -m gossip` processes) over real ZeroMQ sockets on loopback:
records reach every node through one seed, a node killed with SIGKILL catches up after a
restart without fetching what it already stored, and a flood of bad messages from one
connection gets it banned without hiding a valid record from another."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq

from gossip import wire
from gossip.identity import Identity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 20.0


class GossipProcess:
    """One `python -m gossip` process; its JSON lines are collected by a reader thread."""

    def __init__(self, home, *args, prefix=()):
        self.home = str(home)
        os.makedirs(self.home, exist_ok=True)
        self.stderr = open(os.path.join(self.home, "stderr.log"), "a")
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "gossip", "--home", self.home, *args], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     bufsize=1)
        self.events, self.cond = [], threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.listening = self.wait(lambda e: e["event"] == "listening", "the listening line")
        self.id, self.address = self.listening["id"], self.listening["address"]

    def _read(self):
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "unparsed", "line": line}
            with self.cond:
                self.events.append(event)
                self.cond.notify_all()
        with self.cond:
            self.events.append({"event": "eof"})
            self.cond.notify_all()

    def wait(self, pred, what, timeout=DEADLINE_S):
        """The first event (in order) for which pred holds; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            seen = 0
            while True:
                for e in self.events[seen:]:
                    if pred(e):
                        return e
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(min(left, 0.5))
        raise AssertionError(f"{self.home}: no {what} within {timeout} s; last events {self.events[-5:]}; "
                             f"stderr {self.stderr_tail()!r}")

    def wait_holds(self, ids, timeout=DEADLINE_S):
        ids = set(ids)
        return self.wait(lambda e: ids <= self.held(), f"records {sorted(i[:8] for i in ids - self.held())}", timeout)

    def held(self):
        """Ids this process stored in its current life: received or published."""
        return {e["id"] for e in list(self.events) if e["event"] in ("record", "published")}

    def received(self):
        return {e["id"] for e in list(self.events) if e["event"] == "record"}

    def publish(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.wait(lambda e: e["event"] == "published" and e["text"] == text, f"published {text!r}")["id"]

    def status(self, pred=lambda s: True, what="a status line", timeout=DEADLINE_S):
        return self.wait(lambda e: e["event"] == "status" and pred(e), what, timeout)

    def stop(self, timeout=15):
        """End of input: the node leaves and exits; its exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            return self.proc.wait(timeout)
        finally:
            self.reader.join(5)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.reader.join(5)

    def stderr_tail(self):
        try:
            with open(os.path.join(self.home, "stderr.log")) as f:
                return f.read()[-1500:]
        except OSError:
            return ""

    def stored_ids(self):
        """What the store on disk holds (read with plain sqlite)."""
        db = sqlite3.connect(os.path.join(self.home, "gossip.sqlite"))
        try:
            return {row[0].hex() for row in db.execute("SELECT id FROM records")}
        finally:
            db.close()


@pytest.fixture
def spawn():
    """Starts gossip processes and kills whatever is left of them at the end."""
    procs = []

    def start(home, *args, **kw):
        p = GossipProcess(home, *args, **kw)
        procs.append(p)
        return p
    yield start
    for p in procs:
        p.kill()
        p.stderr.close()


def alive(n):
    return lambda s: s["alive"] == n


def test_four_nodes_share_records_and_a_killed_node_catches_up(tmp_path, spawn):
    opts = ("--no-mdns", "--status-every", "0.5")
    seed = spawn(tmp_path / "seed", "--listen", "127.0.0.1:0", *opts)
    assert seed.address.startswith("127.0.0.1:") and not seed.address.endswith(":0")
    nodes = [seed] + [spawn(tmp_path / name, "--listen", "127.0.0.1:0", "--seed", seed.address, *opts)
                      for name in ("a", "b", "c")]
    for n in nodes:
        n.status(alive(3), "a view of all 3 others")

    first = {n.publish(f"first from {n.id}") for n in nodes}
    for n in nodes:
        n.wait_holds(first)

    # c dies without a word; the others must notice before the next records go out, so only
    # anti-entropy (not a queued push) can bring them to c when it is back.
    c = nodes[3]
    c.kill()
    for n in nodes[:3]:
        n.wait(lambda e: e["event"] == "member_dead" and e["id"] == c.id, f"c ({c.id}) declared dead")
    missed = {nodes[1].publish("while c was down, from a"), seed.publish("while c was down, from the seed")}
    for n in nodes[:3]:
        n.wait_holds(first | missed)

    c2 = spawn(c.home, "--listen", c.address, "--seed", seed.address, *opts)
    assert (c2.id, c2.address, c2.listening["records"]) == (c.id, c.address, len(first))
    c2.wait_holds(missed)
    after = c2.publish("c is back")
    for n in nodes[:3]:
        n.wait_holds({after})
    time.sleep(1.0)  # a digest round or two: anything wrongly re-sent to c would show by now
    assert c2.received() == missed, "the restarted node fetched records it had stored"

    nodes[3] = c2
    for n in nodes:
        assert n.stop() == 0, n.stderr_tail()
        assert n.wait(lambda e: e["event"] == "stopped", "the stopped line")
        assert n.stored_ids() == first | missed | {after}


def test_a_flood_from_one_connection_is_banned_and_hides_no_valid_record(tmp_path, spawn):
    target = spawn(tmp_path / "target", "--listen", "127.0.0.1:0", "--no-mdns", "--status-every", "0.5")
    honest = spawn(tmp_path / "honest", "--listen", "127.0.0.1:0", "--seed", target.address, "--no-mdns")
    target.status(alive(1), "the honest node as a member")

    # 10,000 messages: random bytes, well-formed messages under a forged signature, and signed
    # messages whose payload breaks the schema.
    attacker, now_ms = Identity.generate(), int(time.time() * 1000)
    rng = __import__("random").Random(5)
    flood = []
    for i in range(10_000):
        if i % 3 == 0:
            flood.append(rng.randbytes(rng.randrange(1, 300)))
        elif i % 3 == 1:
            m = bytearray(wire.make_message(attacker, "ping", {"seq": i, "members": [], "suspects": []}, now_ms,
                                            "127.0.0.1:9"))
            m[-1] ^= 0xFF
            flood.append(bytes(m))
        else:
            flood.append(msgpack.packb([wire.VERSION, "push", attacker.public_key, "127.0.0.1:9", now_ms,
                                        {"records": [b"\x00" * 40]}, b"\x01" * 64]))

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(f"tcp://{target.address}")
    sent, rid = 0, None
    try:
        for start in range(0, len(flood), 500):  # spread over ~1 s, the valid record in the middle
            for m in flood[start:start + 500]:
                sock.send(m)
                sent += 1
            if start == 2500:
                rid = honest.publish("an honest record inside the flood")
            time.sleep(0.05)
    finally:
        sock.close()
        ctx.term()
    assert sent == 10_000

    target.wait_holds({rid})
    banned = target.wait(lambda e: e["event"] == "peer_banned", "a peer_banned event")
    assert banned["reasons"].get("malformed", 0) + banned["reasons"].get("bad_signature", 0) > 0
    # every one of the 10,000 is accounted for under a reason: the few that got the ban, the rest refused
    final = target.status(lambda s: sum(s["rejected"].values()) >= 10_000, "all 10,000 counted", timeout=30)
    assert sum(final["rejected"].values()) == 10_000, final["rejected"]
    assert final["rejected"]["refused"] >= 9_900 and final["banned"] == 1, final
    peer = {p["id"]: p for p in final["peers"]}[honest.id]
    assert peer["state"] == "alive" and peer["score"] >= 0, peer

    assert target.stop() == 0 and honest.stop() == 0
    assert rid in target.stored_ids()


def test_a_taken_port_is_a_clear_error(tmp_path, spawn):
    first = spawn(tmp_path / "one", "--listen", "127.0.0.1:0", "--no-mdns")
    r = subprocess.run([sys.executable, "-m", "gossip", "--home", str(tmp_path / "two"), "--listen", first.address,
                        "--no-mdns"], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "already in use" in r.stderr, r.stderr


def test_the_service_api_in_one_process(tmp_path):
    """Two Services in this process: add_seed joins, publish stores then gossips, on_record sees
    the foreign record after it is stored, stop leaves no thread and frees the port."""
    from gossip.store import Store
    from gossip.transport import Service

    got, events = [], []
    store_a, store_b = Store(str(tmp_path / "a.sqlite")), Store(str(tmp_path / "b.sqlite"))
    a = Service(Identity.generate(), listen="127.0.0.1:0", store=store_a, mdns=False, on_event=events.append)
    b = Service(Identity.generate(), listen="127.0.0.1:0", store=store_b, mdns=False,
                on_record=lambda r: got.append((r.id, store_b.count())), advertise=None)
    threads = set(threading.enumerate())
    try:
        a.start()
        b.start()
        assert a.address.startswith("127.0.0.1:") and a.address != b.address
        assert b.add_seed(a.address) and not b.add_seed(a.address) and not b.add_seed(b.address)
        deadline = time.monotonic() + DEADLINE_S
        while not ({p["id"] for p in a.peers()} == {b.id} and {p["id"] for p in b.peers()} == {a.id}):
            assert time.monotonic() < deadline, (a.peers(), b.peers())
            time.sleep(0.05)
        record = wire.make_record(a.identity, "note", {"text": "in-process"}, int(time.time() * 1000))
        assert a.publish(record) and not a.publish(record)
        assert store_a.count() == 1  # durable when publish returns
        while not got:
            assert time.monotonic() < deadline, b.status()
            time.sleep(0.02)
        assert got == [(record.id, 1)]  # stored before on_record ran
        assert b.rejected() == {} and b.status()["records"] == 1
        assert any(e.kind == "member_joined" for e in events)
    finally:
        a.stop()
        b.stop()
    assert set(threading.enumerate()) <= threads, threading.enumerate()
    again = Service(Identity.generate(), listen=a.address, mdns=False).start()  # the port is free again
    again.stop()
    with pytest.raises(RuntimeError):
        a.peers()
    store_a.close()
    store_b.close()


def test_new_connections_are_throttled_per_address():
    from gossip.transport import ConnectionGate

    gate = ConnectionGate(3, 1.0)
    assert all(gate.admit(c, "10.0.0.1", 0.0) for c in (b"a", b"b", b"c"))
    assert not gate.admit(b"d", "10.0.0.1", 0.0)  # a fourth new connection at once
    assert gate.admit(b"a", "10.0.0.1", 0.0)      # a connection already heard is always heard
    assert gate.admit(b"x", "10.0.0.2", 0.0)      # another address has its own bucket
    assert gate.admit(b"d", "10.0.0.1", 1.0)      # a second later, one more
    assert not gate.admit(b"e", "10.0.0.1", 1.5)


def test_a_peer_reconnecting_for_fresh_accounts_is_throttled(tmp_path):
    """Ten connections from one address at once, each with a valid hello of its own key: the
    service hears the first four (its burst here) and drops the rest before the core sees them."""
    from gossip.transport import Service

    svc = Service(Identity.generate(), listen="127.0.0.1:0", mdns=False, new_connections=(4, 0.001)).start()
    ctx, socks = zmq.Context(), []
    try:
        keys = [Identity.generate() for _ in range(10)]
        for key in keys:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{svc.address}")
            sock.send(wire.make_message(key, "hello", {"address": "127.0.0.1:9", "incarnation": 1, "meta": {}},
                                        int(time.time() * 1000), "127.0.0.1:9"))
            socks.append(sock)
        deadline = time.monotonic() + DEADLINE_S
        while svc.status()["dropped"].get("new_connection", 0) < 6:
            assert time.monotonic() < deadline, svc.status()
            time.sleep(0.05)
        status = svc.status()
        assert status["dropped"]["new_connection"] == 6
        assert len(status["peers"]) == 4 and {p["id"] for p in status["peers"]} <= {k.id for k in keys}
    finally:
        for sock in socks:
            sock.close()
        ctx.term()
        svc.stop()
