"""A simulated network for the protocol core: one process, simulated time, seeded.

Messages take a random latency, may be lost, never cross a partition and never reach a node
that is down. Every node ticks every `config.tick_s`. Used by the tests and by
bench/gossip_sim.py; what runs inside each node is the real protocol core, signatures and
all.
"""

import heapq
import random
from collections import Counter

from gossip import protocol
from gossip.identity import Identity


class Network:
    def __init__(self, seed=0, latency=(0.005, 0.05), loss=0.0, config=protocol.CONFIG):
        self.rng = random.Random(seed)
        self.latency, self.loss, self.config = latency, loss, config
        self.now = 0.0
        self.nodes = {}          # address -> protocol.Node
        self.down = set()
        self.group = {}          # address -> partition group; absent = group 0
        self.queue = []
        self.seq = 0
        self.sent = Counter()    # kind -> messages
        self.bytes = 0
        self.held = {}           # record id -> {address: time first held}
        self.events = []         # (time, address, Event)
        self.next_tick = 0.0

    def add(self, seeds=(), identity=None, cls=protocol.Node, **kw):
        """A new node at address "n<i>", joining through `seeds`."""
        address = f"n{len(self.nodes)}"
        identity = identity or Identity.from_seed(f"{self.rng.random()}".encode())
        node = cls(identity, address, self.config, seeds=seeds, rng=random.Random(self.rng.random()),
                   now=self.now, **kw)
        self.nodes[address] = node
        self._act(address, node.start(self.now))
        return node

    def publish(self, address, record):
        self._act(address, self.nodes[address].publish(record, self.now))

    def inject(self, src, dst, data, delay=0.0):
        """Bytes from `src` (any origin, e.g. an attacker) to node `dst`."""
        self._schedule(self.now + delay, dst, src, data)

    def restart(self, address, identity, **kw):
        """The node at `address` comes back with a fresh core (same key), its records reloaded."""
        old = self.nodes[address]
        node = protocol.Node(identity, address, self.config, seeds=old.seeds, rng=random.Random(self.rng.random()),
                             now=self.now, **kw)
        node.load(old.records.values())
        self.nodes[address] = node
        self.down.discard(address)
        self._act(address, node.start(self.now))
        return node

    def run(self, seconds):
        self.run_until(self.now + seconds)

    def run_until(self, t, stop=None):
        """Advance simulated time to `t` (or until `stop()` holds, checked after each tick)."""
        while True:
            if self.queue and self.queue[0][0] <= min(t, self.next_tick):
                at, _, dst, src, data = heapq.heappop(self.queue)
                self.now = at
                if dst in self.down or dst not in self.nodes:
                    continue
                self._act(dst, self.nodes[dst].receive(src, data, at))
                continue
            if self.next_tick > t:
                self.now = t
                return
            self.now = self.next_tick
            self.next_tick += self.config.tick_s
            for address, node in list(self.nodes.items()):
                if address not in self.down:
                    self._act(address, node.tick(self.now))
            if stop and stop():
                return

    def holders(self, rid):
        return self.held.get(rid, {})

    def live(self):
        return [a for a in self.nodes if a not in self.down]

    def _act(self, address, outputs):
        for o in outputs:
            if isinstance(o, protocol.Send):
                self.sent[o.kind] += 1
                self.bytes += len(o.data)
                if self.rng.random() < self.loss or self.group.get(address, 0) != self.group.get(o.address, 0):
                    continue
                self._schedule(self.now + self.rng.uniform(*self.latency), o.address, address, o.data)
            elif isinstance(o, protocol.Deliver):
                self.held.setdefault(o.record.id, {}).setdefault(address, self.now)
            else:
                self.events.append((self.now, address, o))

    def _schedule(self, at, dst, src, data):
        self.seq += 1
        heapq.heappush(self.queue, (at, self.seq, dst, src, data))
