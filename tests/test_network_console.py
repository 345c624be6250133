"""What the node's console says about its network: lines a user acts on, with their reasons."""

import time

from gossip.identity import Identity
from gossip.store import Store
from node.network import Network


def test_mdns_unavailable_says_why(tmp_path):
    """A node on a loopback address cannot be found by mDNS: the console says so once, and why,
    not a bare 'mdns unavailable'."""
    lines = []
    settings = dict(listen="127.0.0.1:0", seeds=[], mdns=True)
    net = Network(str(tmp_path), Identity.generate(), settings, {}, lambda *a, **k: None, lines.append,
                  Store(str(tmp_path / "gossip.sqlite")))
    net.start()
    try:
        deadline = time.time() + 10
        while time.time() < deadline and not any("mDNS" in x and "loopback" in x for x in lines):
            time.sleep(0.05)
    finally:
        net.stop()
        net.store.close()
    warnings = [x for x in lines if "mDNS" in x and "seeds only" in x]
    assert warnings == ["gossip: mDNS off: the advertised address 127.0.0.1 is loopback; using seeds only"], lines
