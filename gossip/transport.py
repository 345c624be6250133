"""The ZeroMQ transport: one protocol.Node driven over real sockets by an asyncio loop in a
background thread, so a synchronous program (the node's research loop) can use it.

Sockets. One ROUTER, bound on the listen port (default 7645; port 0 lets the kernel pick),
receives everything; the routing id the ROUTER gives a connection is the origin the core's
per-peer accounting sees, so rate limits, scores and bans are per connection. Its
MAXMSGSIZE is the wire limit: libzmq drops an oversized frame, and the connection that sent
it, before Python sees a byte. Replies never go back through the ROUTER: every message
names the sender's address, and one DEALER per destination address sends, created on first
use and kept in a bounded LRU. A DEALER queues while it connects (no IMMEDIATE: the first
message on a new socket is usually a join, which must not be lost), up to a small
high-water mark; a full queue drops the message and counts it, and the core's timers send
again. A member the core declares dead or gone has its DEALER closed, queue and all.

The address peers are told to reply to is `advertise` if given, else the listen host made
reachable (discovery.advertised_host).

New connections are throttled per IP address (ConnectionGate): every connection is a fresh
account in the core, with a clean score and a full token bucket, so a peer that reconnects to
shed a ban or a bad score gets a new connection heard about once a second, not once a message.

Threads. Everything that touches the core, the sockets or the store runs on the service's
loop; publish, peers, status and add_seed hand their work to it and wait. Each Deliver is
written to the store before the Sends that follow it, so a record is durable before it is
forwarded. Callbacks (on_record, on_event) run on the loop thread: keep them short.
"""

import asyncio
import concurrent.futures
import errno
import logging
import random
import threading
import time
from collections import Counter, OrderedDict

import zmq
import zmq.asyncio

from gossip import protocol, wire
from gossip.discovery import DEFAULT_PORT, WILDCARD, Mdns, advertised_host, join_address, split_address

MAX_DEALERS = 512        # outgoing sockets kept open; the least recently used is closed
MAX_SEEDS = 64           # seeds the core holds (given ones plus those mDNS finds)
SNDHWM = 256             # messages queued per destination
RECEIVE_BATCH = 64       # messages handled before the loop lets the timers run
STOP_LINGER_MS = 200     # how long closing waits to flush the last messages (leave)
NEW_CONNECTIONS = (64.0, 1.0)  # per IP address: burst (20 nodes on one host all fit), then per second
LOG = logging.getLogger(__name__)


class ConnectionGate:
    """A token bucket per IP address, drawn on by each connection (routing id) the first time it
    is heard. Pure: the caller passes `now`. Bounded: the least recently heard are forgotten."""

    def __init__(self, burst, per_s, max_connections=8192, max_addresses=4096):
        self.burst, self.per_s = burst, per_s
        self.max_connections, self.max_addresses = max_connections, max_addresses
        self.connections = OrderedDict()   # routing id -> IP address
        self.addresses = OrderedDict()     # IP address -> [tokens, as of]

    def admit(self, connection, address, now):
        """Whether a message on `connection` (from `address`) may reach the core."""
        if connection in self.connections:
            self.connections.move_to_end(connection)
            return True
        bucket = self.addresses.get(address)
        if bucket is None:
            bucket = self.addresses[address] = [self.burst, now]
            while len(self.addresses) > self.max_addresses:
                self.addresses.popitem(last=False)
        self.addresses.move_to_end(address)
        bucket[0], bucket[1] = min(self.burst, bucket[0] + (now - bucket[1]) * self.per_s), now
        if bucket[0] < 1:
            return False
        bucket[0] -= 1
        self.connections[connection] = address
        while len(self.connections) > self.max_connections:
            self.connections.popitem(last=False)
        return True

class Service:
    """One gossip node on the network. start(), then publish/peers/status from any thread; stop()."""

    def __init__(self, identity, listen=f"0.0.0.0:{DEFAULT_PORT}", seeds=(), store=None, meta=None, mdns=True,
                 config=protocol.CONFIG, on_record=None, on_event=None, advertise=None,
                 new_connections=NEW_CONNECTIONS):
        self.identity, self.id = identity, identity.id
        self.listen_host, self.listen_port = split_address(listen, DEFAULT_PORT)
        self.seeds = [join_address(*split_address(s, DEFAULT_PORT)) for s in seeds]
        self.store, self.meta, self.mdns, self.config = store, dict(meta or {}), mdns, config
        self.on_record, self.on_event, self.advertise = on_record, on_event, advertise
        self.address = None              # "host:port" peers reply to, set by start()
        self.loaded = 0                  # records the store held at start
        self.node = None                 # the protocol core; touched only on the loop thread
        self.counts = Counter()          # transport-level drops: send_queue_full, bad_address, frames, new_connection
        self.gate = ConnectionGate(*new_connections)
        self._dealers = OrderedDict()    # address -> zmq.Socket (sync, send-only)
        self._thread = self._loop = self._thread_id = None
        self._ready = threading.Event()
        self._error = None

    # --- the caller's side -------------------------------------------------------------------------

    def start(self, timeout=10.0):
        """Bind and join; returns once listening. OSError(EADDRINUSE) if the port is taken."""
        if self._thread is not None:
            raise RuntimeError("service already started")
        self._thread = threading.Thread(target=self._run, name=f"gossip-{self.id}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"gossip service did not start within {timeout} s")
        if self._error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise self._error
        return self

    def stop(self, timeout=10.0):
        """Tell peers we leave, close every socket, end the thread. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        loop, stopping = self._loop, getattr(self, "_stopping", None)
        if loop is not None and stopping is not None:
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop already ended
                pass
        if threading.get_ident() != self._thread_id:
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"gossip service thread did not end within {timeout} s")
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def publish(self, record):
        """Our own new record: stored, then pushed. False if the core already held it."""
        return self._call(lambda: self._act(self.node.publish(record, time.time())) > 0)

    def peers(self):
        return self._call(lambda: self.node.peers(time.time()))

    def rejected(self):
        return self._call(lambda: self.node.rejected())

    def status(self):
        """A JSON-ready snapshot: address, peers, rejected reasons, banned connections, counts."""
        def snapshot():
            now = time.time()
            return {"id": self.id, "address": self.address, "peers": self.node.peers(now),
                    "rejected": self.node.rejected(), "records": len(self.node.records),
                    "banned": self.node.banned(now),
                    "dropped": dict(self.counts), "sent": dict(self.node.sent)}
        return self._call(snapshot)

    def add_seed(self, address):
        """Another address to join through (mDNS finds these): a join goes out at once and the
        core retries it like any seed. False if it was known, ours or over MAX_SEEDS."""
        address = join_address(*split_address(address, DEFAULT_PORT))
        return self._call(lambda: self._add_seed(address))

    # --- the loop's side ---------------------------------------------------------------------------

    def _call(self, fn, timeout=30.0):
        if threading.get_ident() == self._thread_id:
            return fn()
        loop = self._loop
        if loop is None or not self._ready.is_set() or self._error is not None:
            raise RuntimeError("gossip service is not running")
        fut = concurrent.futures.Future()

        def run():
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to the calling thread
                    fut.set_exception(e)
        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:
            raise RuntimeError("gossip service is not running") from None
        return fut.result(timeout)

    def _run(self):
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 (reported to start() or on_event, never lost)
            if not self._ready.is_set():
                self._error = e
                self._ready.set()
            else:
                self._emit(protocol.Event("fatal", {"error": repr(e)}))
                LOG.error("gossip service %s ended: %r", self.id, e)
        finally:
            self._loop = None

    async def _main(self):
        self._loop, self._thread_id = asyncio.get_running_loop(), threading.get_ident()
        self._stopping = asyncio.Event()
        ctx = zmq.asyncio.Context()
        self._sync_ctx = zmq.Context.shadow(ctx.underlying)
        self._router = None
        try:
            self._bind(ctx)
            now = time.time()
            self.node = protocol.Node(self.identity, self.address, self.config, seeds=self.seeds, meta=self.meta,
                                      rng=random.Random(), now=now)
            if self.store is not None:
                records = [r for _, r in self.store.since()]  # checked before they were stored
                self.node.load(records)
                self.loaded = len(records)
            self._ready.set()
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._receive()), tg.create_task(self._ticks())]
                self._guard(lambda: self._act(self.node.start(time.time())), "start")
                if self.mdns:
                    tasks.append(tg.create_task(self._discover()))
                await self._stopping.wait()
                self._guard(lambda: self._act(self.node.leave(time.time())), "leave")
                for t in tasks:
                    t.cancel()
        finally:
            if self._router is not None:
                self._router.close(linger=0)
            for sock in self._dealers.values():
                sock.close(linger=STOP_LINGER_MS)
            self._dealers.clear()
            ctx.term()  # returns once the dealers have flushed or lingered out

    def _bind(self, ctx):
        host, port = self.listen_host, self.listen_port
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.MAXMSGSIZE, wire.LIMITS.message_bytes)
        router.setsockopt(zmq.RCVHWM, 1000)     # per connection: a flooding peer backs up on its own pipe
        router.setsockopt(zmq.SNDHWM, 16)       # never used to send
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.HANDSHAKE_IVL, 5000)
        router.setsockopt(zmq.TCP_KEEPALIVE, 1)
        if ":" in host:
            router.setsockopt(zmq.IPV6, 1)
        bind_host = "*" if host in WILDCARD else join_address(host, 0).rsplit(":", 1)[0]
        try:
            router.bind(f"tcp://{bind_host}:{port or '*'}")
        except zmq.ZMQError as e:
            router.close(linger=0)
            if e.errno == errno.EADDRINUSE:
                raise OSError(errno.EADDRINUSE, f"port {port} on {host or '*'} is already in use "
                              "(another node running? choose --listen HOST:PORT, or port 0 for any)") from None
            raise OSError(e.errno, f"cannot listen on {join_address(host, port)}: {e}") from None
        self._router = router
        port = int(router.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        self.listen_port = port
        self.address = self.advertise or join_address(advertised_host(host, self.seeds), port)

    async def _receive(self):
        router, n = self._router, 0
        while True:
            frames = await router.recv_multipart(copy=False)
            # [routing id, message]; anything else is malformed and counted against the connection
            origin, data = frames[0].bytes, frames[1].bytes if len(frames) == 2 else b""
            if len(frames) != 2:
                self.counts["frames"] += 1
            if not self.gate.admit(origin, _peer_address(frames[-1]), time.monotonic()):
                self.counts["new_connection"] += 1  # its IP opened too many connections lately
                continue
            self._guard(lambda: self._act(self.node.receive(origin, data, time.time()), foreign=True), "receive")
            n += 1
            if n % RECEIVE_BATCH == 0:
                await asyncio.sleep(0)  # a ready socket never suspends the await: let the timers in

    async def _ticks(self):
        loop, period = asyncio.get_running_loop(), self.config.tick_s
        due = loop.time()
        while True:
            due += period
            await asyncio.sleep(max(0.0, due - loop.time()))
            if loop.time() - due > 10 * period:  # after a stall, carry on rather than catch up
                due = loop.time()
            self._guard(lambda: self._act(self.node.tick(time.time())), "tick")

    async def _discover(self):
        host, port = split_address(self.address)
        mdns = Mdns(self.id, host, port, on_found=self._found,
                    on_warning=lambda text: self._emit(protocol.Event("mdns_unavailable", {"reason": text})))
        try:
            await mdns.start()
            await asyncio.Event().wait()  # until cancelled by stop()
        finally:
            await mdns.close()

    def _found(self, address, peer_id):
        def add():
            if self._add_seed(address):
                self._emit(protocol.Event("mdns_found", {"id": peer_id, "address": address}))
        self._guard(add, "mdns")

    def _add_seed(self, address):
        node = self.node
        if address == self.address or address in node.seeds or len(node.seeds) >= MAX_SEEDS:
            return False
        self._act(node.add_seed(address, time.time()))
        return True

    def _guard(self, fn, where):
        """One failed batch (a store error, a bug) is reported; the rest of that batch is not
        sent, so nothing follows a Deliver that was not stored."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self.counts["errors"] += 1
            self._emit(protocol.Event("error", {"where": where, "error": repr(e)}))
            LOG.debug("gossip %s failed", where, exc_info=True)

    def _act(self, outputs, foreign=False):
        """Outputs in order: a Deliver is stored before any Send after it. Returns the Delivers."""
        delivered = 0
        for o in outputs:
            if isinstance(o, protocol.Send):
                self._send(o.address, o.data)
            elif isinstance(o, protocol.Deliver):
                if self.store is not None:
                    self.store.add(o.record)
                delivered += 1
                if foreign and self.on_record is not None:
                    self._callback(self.on_record, o.record)
            else:
                if o.kind in ("member_dead", "member_left"):
                    self._close_dealer(o.detail.get("address"))
                self._emit(o)
        return delivered

    def _emit(self, event):
        if self.on_event is not None:
            self._callback(self.on_event, event)

    def _callback(self, fn, arg):
        try:
            fn(arg)
        except Exception:  # noqa: BLE001 (a caller's bug must not stop the node)
            LOG.exception("gossip callback %r failed", fn)

    def _send(self, address, data):
        sock = self._dealer(address)
        if sock is None:
            self.counts["bad_address"] += 1
            return
        try:
            sock.send(data, zmq.NOBLOCK, copy=len(data) < 4096)
        except zmq.Again:
            self.counts["send_queue_full"] += 1

    def _dealer(self, address):
        sock = self._dealers.get(address)
        if sock is not None:
            self._dealers.move_to_end(address)
            return sock
        try:
            host, port = split_address(address)
        except ValueError:
            return None
        if port == 0 or host == "*":
            return None
        sock = self._sync_ctx.socket(zmq.DEALER)
        for opt, value in ((zmq.SNDHWM, SNDHWM), (zmq.RCVHWM, 16), (zmq.MAXMSGSIZE, 4096), (zmq.LINGER, 100),
                           (zmq.RECONNECT_IVL, 100), (zmq.RECONNECT_IVL_MAX, 2000), (zmq.IMMEDIATE, 0),
                           (zmq.HEARTBEAT_IVL, 2000), (zmq.HEARTBEAT_TIMEOUT, 6000), (zmq.TCP_KEEPALIVE, 1),
                           (zmq.IPV6, int(":" in host))):
            sock.setsockopt(opt, value)
        try:
            sock.connect(f"tcp://{join_address(host, port)}")
        except zmq.ZMQError:
            sock.close(linger=0)
            return None
        self._dealers[address] = sock
        while len(self._dealers) > MAX_DEALERS:
            self._dealers.popitem(last=False)[1].close(linger=0)
        return sock

    def _close_dealer(self, address):
        sock = self._dealers.pop(address, None)
        if sock is not None:
            sock.close(linger=0)


def _peer_address(frame):
    """The IP address a received frame came from ("" where libzmq cannot say)."""
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError, TypeError, ValueError):
        return ""
