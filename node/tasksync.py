"""Task sync: a node's task as a signed manifest, its files served to peers in hash-checked chunks
(node/taskserver.py), a fetcher that pulls a task from several peers at once (node/taskfetch.py),
and joining the task a new node's peers run.

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

import hashlib
import os
import struct
import time
from collections import Counter
from dataclasses import dataclass

from gossip import wire
from model import prepare
from node import swarm

CHUNK_BYTES = 4 << 20
REQUEST_BYTES = 512
MAX_PER_PEER = 4         # connections one address may hold to our server
CONNECTIONS_PER_PEER = 4  # the fetcher's connections to each serving peer (the server allows MAX_PER_PEER)
TIMEOUT_S = 30.0
MANIFEST = -1
SETTLE_S = 2.0  # once a task is chosen, how long a joiner waits for the seeds that have not answered yet
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
    """The manifest of a prepared folder, checked against its fingerprint in the same pass (each file
    read once, hashed whole and per chunk); TaskError on a link or a bad folder."""
    files = []
    for name in ("manifest.json", *prepare.DATA_FILES):
        path = os.path.join(folder, name)
        if os.path.islink(path):
            raise TaskError(f"{path} is a link: a task holds plain files only")
        whole, chunks, size = hashlib.sha256(), [], 0
        try:
            with open(path, "rb") as f:
                while block := f.read(chunk):
                    whole.update(block)
                    chunks.append(hashlib.sha256(block).digest())
                    size += len(block)
        except OSError as e:
            raise TaskError(f"prepared data at {folder} is incomplete: {e}") from None
        files.append(FileEntry(name, size, whole.hexdigest(), chunk, tuple(chunks)))
    try:
        fingerprint = prepare.verify(folder, {f.path: f.sha256 for f in files})["fingerprint"]
    except prepare.DataError as e:
        raise TaskError(str(e)) from None
    task = swarm.task_id(fingerprint, profile, seq_len, eval_tokens)
    return Manifest(task, fingerprint, profile, seq_len, eval_tokens, tuple(files))


def sign(identity, manifest, ts_ms):
    record = wire.make_record(identity, "task", manifest.body(), ts_ms)
    return Manifest.from_record(record)


# --- joining a task -----------------------------------------------------------------------------

def _serving(service):
    """The live peers that announce a task and the port that serves it."""
    return [p for p in service.peers() if p["state"] == "alive" and isinstance(p["meta"].get("task"), str)
            and isinstance(p["meta"].get("data_port"), int)]


def join_task(settings, say=print, wait_s=60.0, seed_wait_s=5.0, settle_s=SETTLE_S):
    """No prepared data and seeds given: join gossip under a throwaway identity, learn which tasks the
    peers run (their meta), take --task, else the seed's, else the one most peers run, and fetch it.
    Returns the fetched folder's fingerprint and {node id: reason} of the peers that served wrong bytes;
    TaskError when no peer serves a usable task."""
    from gossip.discovery import join_address, split_address
    from gossip.identity import Identity
    from gossip.transport import Service
    from node import taskfetch
    host = split_address(settings["listen"])[0] if settings["listen"] != "off" else "0.0.0.0"
    seeds = {join_address(*split_address(s)) for s in settings["seeds"]}
    service = Service(Identity.generate(), listen=f"{host}:0", seeds=settings["seeds"], mdns=settings["mdns"],
                      meta={"joining": True})
    service.start()
    try:
        t0 = time.time()
        say(f"no prepared data: asking peers {', '.join(sorted(seeds))} for their task")
        while True:
            running = _serving(service)
            tasks = Counter(p["meta"]["task"] for p in running)
            seed_tasks = [p["meta"]["task"] for p in running if p["address"] in seeds]
            waited = time.time() - t0
            task = (settings["task"] if settings["task"] in tasks else None) if settings["task"] else \
                seed_tasks[0] if seed_tasks else tasks.most_common(1)[0][0] if tasks and waited > seed_wait_s else None
            if task:
                break
            if waited > wait_s:
                if not settings["task"]:
                    raise TaskError(f"no peer announced a task after {wait_s:g} s (are the seeds running nodes?)")
                others = ", ".join(f"{t} ({n} peer{'s' * (n != 1)})" for t, n in tasks.most_common())
                raise TaskError(f"no peer runs task {settings['task']} after {wait_s:g} s"
                                + (f"; the peers run {others}" if others else ""))
            time.sleep(0.2)
        settle = time.time() + settle_s  # the other seeds too, so that the fetch draws on every peer it can
        while time.time() < settle and not seeds <= {p["address"] for p in service.peers() if p["state"] == "alive"}:
            time.sleep(0.1)
        running = _serving(service)
        peers = [taskfetch.Peer(split_address(p["address"])[0], p["meta"]["data_port"], p["id"]) for p in running
                 if p["meta"]["task"] == task]
        say(f"task {task}: run by {len(peers)} of {len(running)} peers ({len(tasks)} task{'s' * (len(tasks) != 1)} "
            "in the swarm)")
        manifest = taskfetch.fetch_manifest(peers, task)
        from model import prepare
        metric = prepare.PROFILES[settings["profile"]]
        want = (settings["profile"], metric["max_seq_len"], metric["eval_tokens"])
        if (manifest.profile, manifest.seq_len, manifest.eval_tokens) != want:
            raise TaskError(f"task {task} is profile {manifest.profile} (seq_len {manifest.seq_len}, eval_tokens "
                            f"{manifest.eval_tokens}); this node runs {want[0]} (--profile {manifest.profile})")
        say(f"task {task}: fetching {manifest.size / 1e6:.1f} MB in {sum(len(f.chunks) for f in manifest.files)} "
            f"chunks from {len(peers)} peer{'s' * (len(peers) != 1)}")
        done = taskfetch.Fetcher(manifest, peers, progress=say).fetch()
        say(f"task {task}: {done.fetched_bytes / 1e6:.1f} MB fetched in {done.seconds:.1f}s"
            + (f", {done.resumed_chunks} chunks resumed from disk" if done.resumed_chunks else "")
            + "".join(f"; {a} served wrong bytes: dropped" for a, _, _, bad, _ in done.peers if bad)
            + f"; verified against fingerprint {manifest.fingerprint[:16]}")
        return manifest.fingerprint, {p.node: p.dropped for p in peers if p.bad}
    finally:
        service.stop()
