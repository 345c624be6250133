"""Real mDNS: two gossip nodes in two network namespaces joined by a veth pair find each other
with no seeds and exchange a record; each advertises its namespace's own address."""

from test_gossip_zmq import GossipProcess


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
