"""Real mDNS: two gossip nodes in two network namespaces joined by a veth pair find each other
with no seeds and exchange a record; each advertises its namespace's own address."""

import os
import shutil
import subprocess

import pytest

from test_gossip_zmq import GossipProcess


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


def test_two_nodes_find_each_other_by_mdns_alone(tmp_path, two_namespaces):
    procs = []
    try:
        for i, (ns, address) in enumerate(two_namespaces):
            procs.append(GossipProcess(tmp_path / f"n{i}", "--listen", "0.0.0.0:7645", "--status-every", "0.5",
                                       prefix=("ip", "netns", "exec", ns)))
            assert procs[-1].address == f"{address}:7645", procs[-1].listening
        a, b = procs
        a.wait(lambda e: e["event"] == "mdns_found" and e["address"] == b.address, "b found by mDNS")
        b.wait(lambda e: e["event"] == "mdns_found" and e["address"] == a.address, "a found by mDNS")
        a.status(lambda s: s["alive"] == 1, "b as a member")
        rid = a.publish("found you by mDNS")
        b.wait_holds({rid})
        for p in procs:
            assert not [e for e in p.events if e["event"] in ("mdns_unavailable", "error")], p.events
            assert p.stop() == 0, p.stderr_tail()
        assert rid in b.stored_ids()
    finally:
        for p in procs:
            p.kill()
            p.stderr.close()
