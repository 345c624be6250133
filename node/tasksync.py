"""Task sync: a node's task as a signed manifest, its files served to peers in hash-checked chunks,
and a fetcher that pulls a task from several peers at once.

The task record (gossip/wire.py, type "task") names the task id, the data fingerprint, the
evaluation settings and every file of the prepared folder with its size, SHA-256, chunk size and
one SHA-256 per chunk. Files travel over plain TCP beside gossip, on the port a node announces
as `data_port` in its gossip meta:

    request:  u32 length, msgpack [task id, path, chunk index]   (index -1: the signed task record)
    reply:    u8 status, u32 length, bytes                      (status 0: the bytes; 1: a reason)

A connection carries any number of requests, one at a time. The server shares one token bucket
(`rate` bytes/s, 0: unbounded) among all its connections and takes at most MAX_PER_PEER
connections from one address.

The fetcher writes into CACHE/partial/<fingerprint>/<fingerprint[:16]>/ and appends each chunk it
has checked to CACHE/partial/<fingerprint>/verified ("index path" lines); a restart re-hashes
those chunks from disk and asks peers only for the rest. A complete folder must pass
`prepare.verify` before it is renamed into CACHE/data/.
"""

import asyncio
import errno
import hashlib
import os
import shutil
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

from gossip import wire
from model import prepare
from node import swarm

CHUNK_BYTES = 4 << 20
REQUEST_BYTES = 512
REPLY_BYTES = wire.TASK_CHUNK_BYTES[1] + 1024  # a chunk or a record, whichever is larger
MAX_PER_PEER = 4         # connections one address may hold to our server
CONNECTIONS_PER_PEER = 2  # the fetcher's connections to each serving peer (the server allows MAX_PER_PEER)
TIMEOUT_S = 30.0
MANIFEST = -1
_REQ, _REPLY = struct.Struct(">I"), struct.Struct(">BI")


class TaskError(Exception):
    """A task that cannot be built, served or fetched; the message is one line for a person."""


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    chunk: int
    chunks: tuple  # 32-byte SHA-256 of each chunk


@dataclass(frozen=True)
class Manifest:
    task: str
    fingerprint: str
    profile: str
    seq_len: int
    eval_tokens: int
    files: tuple
    record: wire.Record = None

    @property
    def size(self):
        return sum(f.size for f in self.files)

    def body(self):
        return dict(task=self.task, fingerprint=self.fingerprint, profile=self.profile, seq_len=self.seq_len,
                    eval_tokens=self.eval_tokens,
                    files=[dict(path=f.path, size=f.size, sha256=f.sha256, chunk=f.chunk, chunks=list(f.chunks))
                           for f in self.files])

    @classmethod
    def from_record(cls, record):
        """A record that passed wire's checks -> Manifest; TaskError if its id does not name its settings."""
        if record.type != "task":
            raise TaskError(f"record {record.id.hex()[:16]} is a {record.type}, not a task")
        b = record.body
        if b["task"] != swarm.task_id(b["fingerprint"], b["profile"], b["seq_len"], b["eval_tokens"]):
            raise TaskError(f"task record {record.id.hex()[:16]}: task id {b['task']} does not match its settings")
        files = tuple(FileEntry(f["path"], f["size"], f["sha256"], f["chunk"], tuple(f["chunks"])) for f in b["files"])
        return cls(b["task"], b["fingerprint"], b["profile"], b["seq_len"], b["eval_tokens"], files, record)


def build_manifest(folder, profile, seq_len, eval_tokens, chunk=CHUNK_BYTES):
    """The manifest of a prepared folder (verified first); TaskError on a link or a bad folder."""
    try:
        fingerprint = prepare.verify(folder)["fingerprint"]
    except prepare.DataError as e:
        raise TaskError(str(e)) from None
    files = []
    for name in ("manifest.json", *prepare.DATA_FILES):
        path = os.path.join(folder, name)
        if os.path.islink(path):
            raise TaskError(f"{path} is a link: a task holds plain files only")
        whole, chunks = hashlib.sha256(), []
        with open(path, "rb") as f:
            while block := f.read(chunk):
                whole.update(block)
                chunks.append(hashlib.sha256(block).digest())
        files.append(FileEntry(name, os.path.getsize(path), whole.hexdigest(), chunk, tuple(chunks)))
    task = swarm.task_id(fingerprint, profile, seq_len, eval_tokens)
    return Manifest(task, fingerprint, profile, seq_len, eval_tokens, tuple(files))


def sign(identity, manifest, ts_ms):
    record = wire.make_record(identity, "task", manifest.body(), ts_ms)
    return Manifest.from_record(record)


# --- serving --------------------------------------------------------------------------------------

class Bucket:
    """Token bucket shared by the server's connections: `rate` bytes/s, bursts of one chunk."""

    def __init__(self, rate, burst):
        self.rate, self.burst, self.tokens, self.t = rate, burst, burst, time.monotonic()

    async def take(self, n):
        if not self.rate:
            return
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate) - n
        self.t = now
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


class Server:
    """Serves one task's files from `folder`; start() binds (port 0: any free one), stop() ends it."""

    def __init__(self, folder, manifest, host="0.0.0.0", port=0, rate=0, per_peer=MAX_PER_PEER):
        self.folder, self.manifest, self.host, self.port = folder, manifest, host, port
        self.files = {f.path: f for f in manifest.files}
        self.bucket, self.per_peer = Bucket(rate, max(f.chunk for f in manifest.files)), per_peer
        self.requests, self.served = Counter(), 0  # chunk requests by path; bytes sent
        self.connections = Counter()
        self._loop = self._thread = self._server = None
        self._ready = threading.Event()
        self._error = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name="task-server", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error
        return self

    def stop(self):
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
        self._thread = None

    def _run(self):
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except OSError as e:
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self):
        self._stopping, self._handlers = asyncio.Event(), set()
        server = await asyncio.start_server(self._serve, self.host, self.port, limit=REQUEST_BYTES * 2)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for task in self._handlers:  # connections still open: 3.11's server.close() leaves them
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader, writer):
        peer = writer.get_extra_info("peername")[0]
        self.connections[peer] += 1
        self._handlers.add(asyncio.current_task())
        try:
            if self.connections[peer] > self.per_peer:
                return await self._reply(writer, 1, b"too many connections from one address")
            while True:
                try:
                    (n,) = _REQ.unpack(await reader.readexactly(_REQ.size))
                    if n > REQUEST_BYTES:
                        return await self._reply(writer, 1, b"request too large")
                    request = wire.unpack(await reader.readexactly(n))
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except wire.WireError:
                    return await self._reply(writer, 1, b"malformed request")
                status, data = self._answer(request)
                await self.bucket.take(len(data) if isinstance(data, bytes) else data[2])
                await self._reply(writer, status, data)
        except ConnectionError:
            pass
        finally:
            self._handlers.discard(asyncio.current_task())
            self.connections[peer] -= 1
            writer.close()

    def _answer(self, request):
        if not (isinstance(request, list) and len(request) == 3 and isinstance(request[0], str)
                and isinstance(request[1], str) and isinstance(request[2], int)):
            return 1, b"malformed request"
        task, path, index = request
        if task != self.manifest.task:
            return 1, b"not our task"
        if index == MANIFEST:
            return 0, self.manifest.record.encoded
        f = self.files.get(path)
        if f is None or not 0 <= index < len(f.chunks):
            return 1, b"no such chunk"
        self.requests[path] += 1
        return 0, (path, index * f.chunk, min(f.chunk, f.size - index * f.chunk))

    async def _reply(self, writer, status, data):
        """Bytes, or a (path, offset, count) span of a file, which goes by sendfile (no copy through us)."""
        if isinstance(data, bytes):
            writer.write(_REPLY.pack(status, len(data)) + data)
            return await writer.drain()
        path, offset, count = data
        writer.write(_REPLY.pack(status, count))
        with open(os.open(os.path.join(self.folder, path), os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
            sent = await asyncio.get_running_loop().sendfile(writer.transport, f, offset, count)
        self.served += sent
        if sent != count:  # the file shrank under us: the reply is broken, and so is the connection
            raise ConnectionResetError(f"{path} is shorter than its manifest")


# --- fetching -------------------------------------------------------------------------------------

class Peer:
    """One serving address, kept over a fetch: its requests, bytes, bad chunks, and why it was dropped."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.requests = self.bad = self.bytes = 0
        self.dropped = None  # the reason this fetch stopped asking it

    def __repr__(self):
        return f"{self.host}:{self.port}"

    def connect(self):
        sock = socket.create_connection((self.host, self.port), TIMEOUT_S)
        sock.settimeout(TIMEOUT_S)
        return sock

    def ask(self, sock, task, path, index, buf):
        """One request; the reply's bytes as a view into `buf` (received straight into it, no copy)."""
        body = wire.canonical([task, path, index])
        sock.sendall(_REQ.pack(len(body)) + body)
        self.requests += 1
        head = bytearray(_REPLY.size)
        _receive(sock, memoryview(head))
        status, n = _REPLY.unpack(head)
        if n > len(buf):
            raise ConnectionError(f"reply of {n} bytes")
        data = memoryview(buf)[:n]
        _receive(sock, data)
        if status != 0:
            raise ConnectionError(bytes(data[:200]).decode("utf-8", "replace"))
        self.bytes += n
        return data


def _receive(sock, view):
    while view:
        n = sock.recv_into(view)
        if not n:
            raise ConnectionError("the peer closed the connection")
        view = view[n:]


def fetch_manifest(peers, task, now_ms=None):
    """The signed task record from the first peer that serves it; TaskError naming every refusal."""
    reasons = []
    for peer in peers:
        try:
            with peer.connect() as sock:
                data = bytes(peer.ask(sock, task, "", MANIFEST, bytearray(wire.LIMITS.bin_bytes)))
            manifest = Manifest.from_record(wire.decode_record(data, now_ms or int(time.time() * 1000)))
        except (OSError, wire.WireError, TaskError) as e:
            reasons.append(f"{peer}: {e}")
            continue
        if manifest.task != task:
            reasons.append(f"{peer}: sent task {manifest.task}, not {task}")
            continue
        return manifest
    raise TaskError(f"no peer sent the manifest of task {task}: " + "; ".join(reasons))


@dataclass(frozen=True)
class Fetched:
    folder: str           # CACHE/data/<fingerprint[:16]>
    fetched_bytes: int    # over the network in this run
    resumed_chunks: int   # already verified on disk
    seconds: float
    peers: tuple          # (address, requests, bytes, bad chunks, why dropped or "")


class Fetcher:
    """Pulls one task's missing chunks from `peers` into the partial folder, then renames it into place."""

    def __init__(self, manifest, peers, cache=None, progress=None, progress_s=2.0):
        layout = {"manifest.json", *prepare.DATA_FILES}
        if {f.path for f in manifest.files} != layout:
            raise TaskError(f"task {manifest.task} lists {', '.join(sorted(f.path for f in manifest.files))[:200]}; "
                            f"a task folder holds exactly {', '.join(sorted(layout))}")
        self.m, self.peers, self.progress, self.progress_s = manifest, list(peers), progress, progress_s
        cache = cache or prepare.cache_dir()
        self.partial = os.path.join(cache, "partial", manifest.fingerprint)
        self.files_dir = os.path.join(self.partial, manifest.fingerprint[:16])
        self.final = os.path.join(cache, "data", manifest.fingerprint[:16])
        self.log_path = os.path.join(self.partial, "verified")
        self.fds, self.pending, self.left, self.got, self.resumed = {}, [], 0, 0, 0
        self.done, self.log_lock = set(), threading.Lock()

    def fetch(self):
        if os.path.isdir(self.final):
            self._verify(self.final)
            return Fetched(self.final, 0, 0, 0.0, ())
        t0 = time.time()
        os.makedirs(self.files_dir, exist_ok=True)
        with open(os.path.join(self.partial, "task.record"), "wb") as f:
            f.write(self.m.record.encoded if self.m.record else b"")
        try:
            self._open()
            self.pending = [(f, i) for f in self.m.files for i in range(len(f.chunks)) if (f.path, i) not in self.done]
            self.left = len(self.pending)
            with open(self.log_path, "a") as self.log:
                self._fetch_all(t0)
            for fd in self.fds.values():  # on disk before the rename makes the folder the task's
                os.fsync(fd)
        finally:
            for fd in self.fds.values():
                os.close(fd)
        self._verify(self.files_dir)
        os.makedirs(os.path.dirname(self.final), exist_ok=True)
        os.rename(self.files_dir, self.final)
        shutil.rmtree(self.partial, ignore_errors=True)
        return Fetched(self.final, self.got, self.resumed, time.time() - t0,
                       tuple((repr(p), p.requests, p.bytes, p.bad, p.dropped or "") for p in self.peers))

    def _open(self):
        """Open (or create) every file, and keep the logged chunks that still hash right."""
        logged = set()
        if os.path.exists(self.log_path):
            with open(self.log_path) as f:
                for line in f:
                    index, _, path = line.rstrip("\n").partition(" ")
                    if index.isdigit():
                        logged.add((path, int(index)))
        self.done = set()
        for f in self.m.files:
            path = os.path.join(self.files_dir, f.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise TaskError(f"cannot write {path}: {e.strerror} (a link or a folder in the partial fetch?)") from None
            self.fds[f.path] = fd
            for i, want in enumerate(f.chunks):
                if (f.path, i) in logged and hashlib.sha256(os.pread(fd, f.chunk, i * f.chunk)).digest() == want:
                    self.done.add((f.path, i))
            if os.fstat(fd).st_size > f.size:  # chunks extend a file as they land: no space is taken ahead
                os.ftruncate(fd, f.size)
        self.resumed = len(self.done)

    def _fetch_all(self, t0):
        """CONNECTIONS_PER_PEER threads per peer share the pending chunks; hashing, receiving and
        writing release the GIL, so they overlap."""
        self.wake, self.error = threading.Condition(), None
        threads = [threading.Thread(target=self._worker, args=(p,), name=f"fetch-{p}", daemon=True)
                   for p in self.peers for _ in range(CONNECTIONS_PER_PEER)]
        for t in threads:
            t.start()
        last = time.time()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
                if self.progress and time.time() - last >= self.progress_s:
                    self.progress(self.status(t0))
                    last = time.time()
        if self.error:
            raise self.error
        if self.left:
            why = "; ".join(f"{p}: {p.dropped}" for p in self.peers if p.dropped) or "no peers"
            raise TaskError(f"{self.left} chunks of task {self.m.task} could not be fetched ({why}); "
                            f"the verified ones are kept in {self.partial}")

    def _worker(self, peer):
        sock, buf = None, bytearray(max(f.chunk for f in self.m.files))
        try:
            while not peer.dropped:
                with self.wake:
                    self.wake.wait_for(lambda: self.pending or not self.left or self._all_dropped() or self.error)
                    if not self.pending or self.error:
                        return
                    f, i = self.pending.pop()
                ok = False
                try:
                    sock = sock or peer.connect()
                    data = peer.ask(sock, self.m.task, f.path, i, buf)
                    if len(data) == min(f.chunk, f.size - i * f.chunk) and hashlib.sha256(data).digest() == f.chunks[i]:
                        self._write(f, i, data)
                        ok = True
                    else:
                        peer.bad += 1
                        peer.dropped = f"served wrong bytes for {f.path} chunk {i}"
                except TaskError as e:
                    self.error = self.error or e
                except OSError as e:
                    peer.dropped = f"{type(e).__name__}: {e}"[:200]
                with self.wake:
                    if ok:
                        self.left -= 1
                    else:
                        self.pending.append((f, i))
                    self.wake.notify_all()
        finally:
            if sock:
                sock.close()
            with self.wake:
                self.wake.notify_all()

    def _all_dropped(self):
        return all(p.dropped for p in self.peers)

    def _write(self, f, i, data):
        """A checked chunk into its file, then into the log: the log never names unwritten bytes."""
        try:
            os.pwrite(self.fds[f.path], data, i * f.chunk)
        except OSError as e:
            why = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota reached", errno.EFBIG: "file size limit reached"}
            raise TaskError(why.get(e.errno, f"cannot write ({e.strerror})") + f" at "
                            f"{os.path.join(self.files_dir, f.path)}: {len(self.done)} verified chunks kept in "
                            f"{self.partial} for the next start") from None
        with self.log_lock:
            self.log.write(f"{i} {f.path}\n")
            self.log.flush()
            self.done.add((f.path, i))
            self.got += len(data)

    def status(self, t0):
        total = self.m.size
        have = sum(min(f.chunk, f.size - i * f.chunk) for f in self.m.files for i in range(len(f.chunks))
                   if (f.path, i) in self.done)
        rate = self.got / max(time.time() - t0, 1e-9)
        serving = sum(1 for p in self.peers if not p.dropped)
        return (f"task {self.m.task}: {have / 1e6:.1f}/{total / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s, "
                f"{serving} peer{'s' * (serving != 1)} serving")

    def _verify(self, folder):
        try:
            fingerprint = prepare.verify(folder)["fingerprint"]
        except prepare.DataError as e:
            raise TaskError(f"fetched task {self.m.task} fails its fingerprint: {e}") from None
        if fingerprint != self.m.fingerprint:
            raise TaskError(f"fetched task {self.m.task} has fingerprint {fingerprint[:16]}, "
                            f"not {self.m.fingerprint[:16]}")


# --- joining a task -----------------------------------------------------------------------------

def join_task(settings, say=print, wait_s=60.0, seed_wait_s=5.0):
    """No prepared data and seeds given: join gossip under a throwaway identity, learn which tasks the
    peers run (their meta), take --task, else the seed's, else the one most peers run, and fetch it.
    Returns the fetched folder's fingerprint; TaskError when no peer serves a usable task."""
    from gossip.discovery import join_address, split_address
    from gossip.identity import Identity
    from gossip.transport import Service
    host = split_address(settings["listen"])[0] if settings["listen"] != "off" else "0.0.0.0"
    seeds = {join_address(*split_address(s)) for s in settings["seeds"]}
    service = Service(Identity.generate(), listen=f"{host}:0", seeds=settings["seeds"], mdns=settings["mdns"],
                      meta={"joining": True})
    service.start()
    try:
        t0 = time.time()
        say(f"no prepared data: asking peers {', '.join(sorted(seeds))} for their task")
        while True:
            running = [p for p in service.peers() if p["state"] == "alive" and isinstance(p["meta"].get("task"), str)
                       and isinstance(p["meta"].get("data_port"), int)]
            tasks = Counter(p["meta"]["task"] for p in running)
            seed_tasks = [p["meta"]["task"] for p in running if p["address"] in seeds]
            waited = time.time() - t0
            task = (settings["task"] if settings["task"] in tasks else None) if settings["task"] else \
                seed_tasks[0] if seed_tasks else tasks.most_common(1)[0][0] if tasks and waited > seed_wait_s else None
            if task:
                break
            if waited > wait_s:
                raise TaskError(f"no peer runs task {settings['task']} after {wait_s:g} s" if settings["task"] else
                                f"no peer announced a task after {wait_s:g} s (are the seeds running nodes?)")
            time.sleep(0.2)
        peers = [Peer(split_address(p["address"])[0], p["meta"]["data_port"]) for p in running
                 if p["meta"]["task"] == task]
        say(f"task {task}: run by {len(peers)} of {len(running)} peers ({len(tasks)} task{'s' * (len(tasks) != 1)} "
            "in the swarm)")
        manifest = fetch_manifest(peers, task)
        from model import prepare
        want = (settings["profile"], prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS)
        if (manifest.profile, manifest.seq_len, manifest.eval_tokens) != want:
            raise TaskError(f"task {task} is profile {manifest.profile} (seq_len {manifest.seq_len}, eval_tokens "
                            f"{manifest.eval_tokens}); this node runs {want[0]} (--profile {manifest.profile})")
        say(f"task {task}: fetching {manifest.size / 1e6:.1f} MB in {sum(len(f.chunks) for f in manifest.files)} "
            f"chunks from {len(peers)} peer{'s' * (len(peers) != 1)}")
        done = Fetcher(manifest, peers, progress=say).fetch()
        say(f"task {task}: {done.fetched_bytes / 1e6:.1f} MB fetched in {done.seconds:.1f}s"
            + (f", {done.resumed_chunks} chunks resumed from disk" if done.resumed_chunks else "")
            + "".join(f"; {a} served wrong bytes: dropped" for a, _, _, bad, _ in done.peers if bad)
            + f"; verified against fingerprint {manifest.fingerprint[:16]}")
        return manifest.fingerprint
    finally:
        service.stop()
