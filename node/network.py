"""The node on the network: the gossip service started beside the research loop, its events
in the node's journal, and a snapshot of the peers for `python -m node status`.

    HOME/gossip.sqlite  every valid record received or published (durable before forwarded)
    HOME/peers.json     the peers as the running node sees them, rewritten every few seconds
"""

import json
import os
import threading
import time

from gossip.transport import Service

SNAPSHOT_S = 2.0


class Network:
    def __init__(self, home, identity, settings, meta, events, say, store):
        self.home, self.events, self.say = home, events, say
        self.path = os.path.join(home, "peers.json")
        self.store = store  # the node's, which closes it
        self.service = Service(identity, listen=settings["listen"], seeds=settings["seeds"], store=self.store,
                               meta=meta, mdns=settings["mdns"], on_event=self._event, on_record=self._record)
        self.stopping = threading.Event()
        self.thread = None

    def start(self):
        self.service.start()
        self.say(f"gossip: node {self.service.identity.id} at {self.service.address}"
                 + (f", seeds {', '.join(self.service.seeds)}" if self.service.seeds else "")
                 + ("" if self.service.mdns else ", mDNS off"))
        self.events("listen", address=self.service.address, id=self.service.identity.id)
        self.thread = threading.Thread(target=self._snapshots, name="peers-snapshot", daemon=True)
        self.thread.start()

    def publish(self, record):
        self.service.publish(record)

    def alive(self):
        """How many peers this node sees alive now."""
        return sum(p["state"] == "alive" for p in self.service.status()["peers"])

    def _event(self, event):
        self.events("gossip_" + event.kind, **{k: v for k, v in event.detail.items() if isinstance(v, (str, int, float))})
        if event.kind == "mdns_unavailable":  # once, with why (loopback, no multicast route, ...)
            self.say(f"gossip: {event.detail.get('reason', 'mDNS unavailable')}")
        elif event.kind in ("member_joined", "member_dead", "member_left", "peer_banned"):
            who = event.detail.get("id", "")
            where = event.detail.get("address", "")
            self.say(f"gossip: {event.kind.replace('_', ' ')} {who} {where}".rstrip())
        elif event.kind == "seeds_silent":  # once; a seed that answers later shows as a member joined
            d = event.detail
            self.say(f"gossip: no answer from {d['seeds']} within {d['after_s']:g} s: going on alone, "
                     f"trying again every {d['retry_s']:g} s")

    def _record(self, record):
        self.events("gossip_record", id=record.id.hex(), type=record.type, author=record.author_id)

    def _snapshots(self):
        while not self.stopping.wait(SNAPSHOT_S):
            self.write_snapshot()

    def write_snapshot(self):
        snap = dict(self.service.status(), t=time.time(), pid=os.getpid())
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(snap, f)
        os.replace(tmp, self.path)

    def stop(self):
        self.stopping.set()
        if self.thread:
            self.thread.join()
        try:
            self.service.stop()
        finally:
            if os.path.exists(self.path):
                os.remove(self.path)  # a stopped node has no live peers to show


def snapshot(home):
    """The running node's last peers snapshot, or None."""
    try:
        with open(os.path.join(home, "peers.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
