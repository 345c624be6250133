"""Fetching a task from several peers at once (the protocol: node/tasksync.py): blocking sockets in
threads, every chunk hash-checked before it is written, a log of verified chunks to resume from,
and the folder renamed into the cache only once prepare.verify accepts it."""

import errno
import hashlib
import os
import shutil
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

from gossip import wire
from model import prepare
from node.tasksync import _REPLY, _REQ, CONNECTIONS_PER_PEER, MANIFEST, TIMEOUT_S, Manifest, TaskError


class Peer:
    """One serving address, kept over a fetch: its requests, bytes, bad chunks, and why it was dropped."""

    def __init__(self, host, port, node=None):
        self.host, self.port, self.node = host, port, node  # node: its gossip id, when known
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
        self.hashes = {}  # path -> SHA-256 of the whole file, from _hash_files

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
            self.pending = deque((f, i) for f in self.m.files for i in range(len(f.chunks)) if (f.path, i) not in self.done)
            self.left = len(self.pending)
            with open(self.log_path, "a") as self.log:
                self._fetch_all(t0)
            for fd in self.fds.values():  # on disk before the rename makes the folder the task's
                os.fsync(fd)
        finally:
            for fd in self.fds.values():
                os.close(fd)
        self._verify(self.files_dir, self.hashes if len(self.hashes) == len(self.m.files) else None)
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
        """CONNECTIONS_PER_PEER threads per peer share the pending chunks, taken in file order, and one
        more hashes each whole file behind them; hashing, receiving and writing release the GIL, so
        they overlap."""
        self.wake, self.error, self.socks, self.ended = threading.Condition(), None, set(), False
        threads = [threading.Thread(target=self._worker, args=(p,), name=f"fetch-{p}", daemon=True)
                   for p in self.peers for _ in range(CONNECTIONS_PER_PEER)]
        hasher = threading.Thread(target=self._hash_files, name="fetch-hash", daemon=True)
        for t in threads + [hasher]:
            t.start()
        last = time.time()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
                    if self.progress and time.time() - last >= self.progress_s:
                        self.progress(self.status(t0))
                        last = time.time()
        except KeyboardInterrupt:  # Ctrl-C: the workers stop after the chunk in hand; what they wrote stays
            with self.wake:
                self.error = TaskError(f"interrupted: {len(self.done)} verified chunks kept in {self.partial}; "
                                       "the next start resumes there")
                self.wake.notify_all()
                for sock in self.socks:  # a reply in flight ends now, not at its timeout
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            for t in threads:
                t.join()
        with self.wake:
            self.ended = True
            self.wake.notify_all()
        hasher.join()
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
                    f, i = self.pending.popleft()
                ok = False
                try:
                    if not sock:
                        sock = peer.connect()
                        with self.wake:
                            self.socks.add(sock)
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
                        self.pending.appendleft((f, i))
                    self.wake.notify_all()
        finally:
            with self.wake:
                if sock:
                    self.socks.discard(sock)
                    sock.close()
                self.wake.notify_all()

    def _hash_files(self):
        """The whole-file SHA-256s, chunk after chunk as they land (read back from the page cache), so
        that the fingerprint check at the end needs no second pass over the folder."""
        for f in self.m.files:
            whole = hashlib.sha256()
            for i in range(len(f.chunks)):
                with self.wake:
                    self.wake.wait_for(lambda: (f.path, i) in self.done or self.ended)
                    if (f.path, i) not in self.done:
                        return
                whole.update(os.pread(self.fds[f.path], min(f.chunk, f.size - i * f.chunk), i * f.chunk))
            self.hashes[f.path] = whole.hexdigest()

    def _all_dropped(self):
        return all(p.dropped for p in self.peers)

    def _write(self, f, i, data):
        """A checked chunk into its file, then into the log: the log never names unwritten bytes."""
        size = len(data)
        try:
            offset = i * f.chunk
            while data:  # a short write (the disk or a limit reached mid-chunk) is retried: the rest then fails
                n = os.pwrite(self.fds[f.path], data, offset)
                data, offset = data[n:], offset + n
        except OSError as e:
            why = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota reached", errno.EFBIG: "file size limit reached"}
            raise TaskError(why.get(e.errno, f"cannot write ({e.strerror})") + f" at "
                            f"{os.path.join(self.files_dir, f.path)}: {len(self.done)} verified chunks kept in "
                            f"{self.partial} for the next start") from None
        with self.log_lock:
            self.log.write(f"{i} {f.path}\n")
            self.log.flush()
            self.done.add((f.path, i))
            self.got += size

    def status(self, t0):
        total = self.m.size
        have = sum(min(f.chunk, f.size - i * f.chunk) for f in self.m.files for i in range(len(f.chunks))
                   if (f.path, i) in self.done)
        rate = self.got / max(time.time() - t0, 1e-9)
        serving = sum(1 for p in self.peers if not p.dropped)
        return (f"task {self.m.task}: {have / 1e6:.1f}/{total / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s, "
                f"{serving} peer{'s' * (serving != 1)} serving")

    def _verify(self, folder, hashes=None):
        try:
            fingerprint = prepare.verify(folder, hashes)["fingerprint"]
        except prepare.DataError as e:
            raise TaskError(f"fetched task {self.m.task} fails its fingerprint: {e}") from None
        if fingerprint != self.m.fingerprint:
            raise TaskError(f"fetched task {self.m.task} has fingerprint {fingerprint[:16]}, "
                            f"not {self.m.fingerprint[:16]}")
