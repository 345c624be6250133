"""The wire format: canonical msgpack for signed records and signed messages, and bounded
decoding of untrusted bytes.

A record is a msgpack map {v, type, author, ts, body, id, sig}. Its id is the SHA-256 of
the canonical encoding of {v, type, author, ts, body} (map keys sorted at every level,
integers in their shortest form, floats as float64); `sig` is the author's Ed25519
signature of the id. A receiver recomputes the id, so a body cannot travel under
another record's id.

A message is a msgpack array [v, kind, sender, address, ts, payload, sig]: every message,
records and membership alike, is signed by the node that sends it, over the canonical
encoding of its first six items; `address` is where the sender takes replies.

`decode_message` and `decode_record` take any bytes and return a value or raise
`WireError` with a short reason (counted per peer by the protocol); nothing else escapes.
"""

import functools
import hashlib
import math
from dataclasses import dataclass

import msgpack

from gossip.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, node_id, verify

VERSION = 1
ID_BYTES = 32


@dataclass(frozen=True)
class Limits:
    message_bytes: int = 1 << 20   # a whole message
    str_bytes: int = 256 << 10     # one string (a diff is the largest)
    bin_bytes: int = 1 << 20       # one byte string (a forwarded record)
    array_len: int = 4096
    map_len: int = 64
    depth: int = 8
    clock_skew_s: float = 300.0    # how far in the future a timestamp may lie


LIMITS = Limits()


class WireError(Exception):
    """Untrusted bytes rejected; `reason` is one short word counted per peer."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def canonical(obj):
    """The one encoding of a value: maps with sorted keys, shortest integers, float64."""
    return msgpack.packb(_sorted(obj), use_bin_type=True)


def _sorted(obj):
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [_sorted(x) for x in obj]
    return obj


def unpack(data, limits=LIMITS):
    """Bounded msgpack decoding of untrusted bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("malformed", "not bytes")
    if len(data) > limits.message_bytes:
        raise WireError("oversize", f"{len(data)} bytes")
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                              max_str_len=limits.str_bytes,
                              max_bin_len=limits.bin_bytes, max_array_len=limits.array_len,
                              max_map_len=limits.map_len, max_ext_len=0)
    except Exception as e:  # msgpack raises several types for hostile input; all mean one thing here
        raise WireError("malformed", type(e).__name__) from None
    _check_depth(obj, limits.depth)
    return obj


def _check_depth(obj, limit):
    stack = [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (list, dict)):
            if d > limit:
                raise WireError("malformed", "too deep")
            for y in (x.values() if isinstance(x, dict) else x):
                if isinstance(y, (list, dict)):
                    stack.append((y, d + 1))
                elif isinstance(y, float) and not math.isfinite(y):
                    raise WireError("malformed", "non-finite float")
        elif isinstance(x, float) and not math.isfinite(x):
            raise WireError("malformed", "non-finite float")


# --- schemas -----------------------------------------------------------------------------------
# A field spec is a type, a tuple of types, or a callable check. Every field of SCHEMAS is
# required (a field that may be empty names `None` among its types); a field of OPTIONAL may be
# absent, so that records written before it existed keep their bytes and ids. Unknown fields are
# rejected: a record means exactly what its signed bytes say.

def _hex_hash(x):
    return isinstance(x, str) and len(x) in (40, 64) and all(c in "0123456789abcdef" for c in x)


def _scalars(x):
    return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, (str, int, float, bool))
                                       for k, v in x.items())


MAX_BPB = 1000.0      # val_bpb of a score: a byte is 8 bits, so real ones are far below
MAX_RUNS = 1 << 20    # runs behind a score


def _score(x):
    """A measured score: finite, bounded numbers (a spread of 1e300 would overflow what peers
    compute from it)."""
    return (isinstance(x, dict) and set(x) == {"val_bpb", "runs", "spread"}
            and type(x["val_bpb"]) in (int, float) and 0 <= x["val_bpb"] <= MAX_BPB
            and type(x["runs"]) is int and 0 <= x["runs"] <= MAX_RUNS
            and type(x["spread"]) in (int, float) and 0 <= x["spread"] <= MAX_BPB)


def _score_or_none(x):
    return x is None or _score(x)


def _record_id(x):
    return isinstance(x, bytes) and len(x) == ID_BYTES


LOG_TAIL_CHARS = 4000
MAX_JOINTLY = 63          # improvements named beside the one attested (a node merges up to 8)
CLAIM_DIFF_CHARS = 4096   # a larger diff is left out of its claim
VERDICTS = ("confirmed", "refuted", "failed_to_apply", "crashed", "violation")
EXPERIMENT_STATUSES = ("keep", "discard", "crash", "timeout", "violation")

TASK_MAX_FILES = 64
TASK_MAX_BYTES = 64 << 30                 # a whole task
TASK_CHUNK_BYTES = (1 << 16, 1 << 26)     # the smallest and largest chunk size; a power of two

SCHEMAS = {
    "improvement": {"task": str, "lineage": str, "parent": _hex_hash, "child": _hex_hash, "diff": str,
                    "before": _score, "after": _score, "hardware": _scalars, "proposer": str,
                    "description": str},
    "attestation": {"task": str, "improvement": _record_id, "verdict": lambda x: x in VERDICTS,
                    "before": _score_or_none, "after": _score_or_none, "hardware": _scalars, "note": str},
    # idea: a hash of the parent's and the child's normal forms (formatting and comments left out),
    # so that a reformatted copy of an edit is the same idea
    "experiment": {"task": str, "lineage": str, "parent": _hex_hash, "child": _hex_hash, "idea": _hex_hash,
                   "diff": str, "hypothesis": str, "status": lambda x: x in EXPERIMENT_STATUSES,
                   "before": _score_or_none, "after": _score_or_none, "hardware": _scalars, "proposer": str,
                   "log_tail": lambda x: isinstance(x, str) and len(x) <= LOG_TAIL_CHARS},
    "claim": {"task": str, "parent": _hex_hash, "child": _hex_hash, "idea": _hex_hash, "hardware": _scalars,
              "description": lambda x: isinstance(x, str) and len(x) <= 500, "expires": int},
    "note": {"text": str},  # free text; tests and benchmarks publish these
    # task: what defines the metric, and the files a new node fetches in hash-checked chunks
    # (`check_task` bounds paths and sizes; node/tasksync checks the id against the settings)
    "task": {"task": lambda x: isinstance(x, str) and 0 < len(x) <= 64 and all(c in "0123456789abcdef" for c in x),
             "fingerprint": _hex_hash, "profile": str, "seq_len": int, "eval_tokens": int,
             "files": lambda x: isinstance(x, list) and 0 < len(x) <= TASK_MAX_FILES},
}
OPTIONAL = {
    # inspired_by: the id of the peer record whose idea this change ports to our tree
    "improvement": {"inspired_by": _record_id},
    "experiment": {"inspired_by": _record_id},
    # jointly: the other improvements measured merged with this one in the run the verdict is on
    "attestation": {"jointly": lambda x: isinstance(x, list) and 0 < len(x) <= MAX_JOINTLY
                    and all(_record_id(i) for i in x)},
    # diff: what the claimed candidate changes, so that peers can try other parameters meanwhile
    "claim": {"diff": lambda x: isinstance(x, str) and len(x) <= CLAIM_DIFF_CHARS,
              # parent_score: the claimant's own score of the parent, so that peers of its tag learn the
              # run-to-run noise from a tree many of them ran once (the baseline) a run sooner
              "parent_score": _score},
}


TASK_FILE_FIELDS = {"path": str, "size": int, "sha256": _hex_hash, "chunk": int,
                    "chunks": lambda x: isinstance(x, list) and all(isinstance(c, bytes) and len(c) == 32 for c in x)}


def check_task(body):
    """A task's file list: relative paths inside the task folder, each once, sizes within bounds,
    one 32-byte SHA-256 per chunk. Raises WireError("schema", reason)."""
    seen, total = set(), 0
    for i, f in enumerate(body["files"]):
        check_fields(f, TASK_FILE_FIELDS, f"task.files[{i}]")
        path, size, chunk = f["path"], f["size"], f["chunk"]
        parts = path.split("/")
        if (not path or path.startswith("/") or "\\" in path or "\0" in path or len(path) > 200
                or any(p in ("", ".", "..") for p in parts)):
            raise WireError("schema", f"task file path {path[:64]!r} is not a plain relative path inside the task folder")
        if path in seen:
            raise WireError("schema", f"task file path {path[:64]!r} appears twice")
        seen.add(path)
        if not (TASK_CHUNK_BYTES[0] <= chunk <= TASK_CHUNK_BYTES[1] and chunk & (chunk - 1) == 0):
            raise WireError("schema", f"task file {path[:64]!r}: chunk size {chunk} is not a power of two "
                                      f"between {TASK_CHUNK_BYTES[0]} and {TASK_CHUNK_BYTES[1]}")
        if not 0 <= size <= chunk * LIMITS.array_len:
            raise WireError("schema", f"task file {path[:64]!r}: size {size} is out of bounds")
        if len(f["chunks"]) != -(-size // chunk):
            raise WireError("schema", f"task file {path[:64]!r}: {len(f['chunks'])} chunk hashes for {size} bytes "
                                      f"in chunks of {chunk}")
        total += size
    if total > TASK_MAX_BYTES:
        raise WireError("schema", f"task of {total} bytes is over the bound of {TASK_MAX_BYTES}")


CHECKS = {"task": check_task}  # checks beyond one field at a time


def check_body(type_, body):
    check_fields(body, SCHEMAS[type_], type_, OPTIONAL.get(type_))
    if type_ in CHECKS:
        CHECKS[type_](body)


def check_fields(body, schema, what, optional=None):
    if not isinstance(body, dict):
        raise WireError("schema", f"{what} is not a map")
    allowed = {**schema, **(optional or {})}
    if not set(schema) <= set(body) <= set(allowed):
        missing, extra = set(schema) - set(body), set(body) - set(allowed)
        raise WireError("schema", f"{what}: missing {sorted(map(repr, missing))} extra {sorted(map(repr, extra))}"[:200])
    for name in body:
        spec, value = allowed[name], body[name]
        ok = spec(value) if callable(spec) and not isinstance(spec, type) else isinstance(value, spec)
        if not ok or (isinstance(value, bool) and spec in (int, float)):
            raise WireError("schema", f"{what}.{name}")


# --- records -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    type: str
    author: bytes       # Ed25519 public key
    ts: int             # milliseconds since the epoch, by the author's clock
    body: dict
    id: bytes
    sig: bytes
    encoded: bytes      # the exact bytes that travel and are stored

    @functools.cached_property
    def author_id(self):  # read in every pass over the ledger: hashed once
        return node_id(self.author)


def _unsigned(type_, author, ts, body):
    return {"v": VERSION, "type": type_, "author": author, "ts": ts, "body": body}


def make_record(identity, type_, body, ts_ms):
    """Sign a new record (raises WireError if the body does not fit its schema)."""
    if type_ not in SCHEMAS:
        raise WireError("unknown_type", type_)
    check_body(type_, body)
    unsigned = _unsigned(type_, identity.public_key, int(ts_ms), body)
    rid = hashlib.sha256(canonical(unsigned)).digest()
    sig = identity.sign(rid)
    encoded = canonical({**unsigned, "id": rid, "sig": sig})
    if len(encoded) > LIMITS.bin_bytes - 1024:
        raise WireError("oversize", f"record of {len(encoded)} bytes")
    unpack(encoded)  # the limits every receiver applies (string, array, map sizes, depth)
    return Record(type_, identity.public_key, int(ts_ms), body, rid, sig, encoded)


def decode_record(data, now_ms, limits=LIMITS):
    """Untrusted bytes -> a Record whose id and signature hold, or WireError."""
    obj = unpack(data, limits)
    check_fields(obj, {"v": int, "type": str, "author": bytes, "ts": int, "body": dict, "id": bytes,
                       "sig": bytes}, "record")
    if obj["v"] != VERSION:
        raise WireError("version", str(obj["v"]))
    if obj["type"] not in SCHEMAS:
        raise WireError("unknown_type", obj["type"][:32])
    if obj["ts"] > now_ms + limits.clock_skew_s * 1000:
        raise WireError("future", "record timestamp ahead of our clock")
    check_body(obj["type"], obj["body"])
    unsigned = _unsigned(obj["type"], obj["author"], obj["ts"], obj["body"])
    rid = hashlib.sha256(canonical(unsigned)).digest()
    if rid != obj["id"]:
        raise WireError("id_mismatch")
    if not verify(obj["author"], obj["sig"], rid):
        raise WireError("bad_signature", "record")
    return Record(obj["type"], obj["author"], obj["ts"], obj["body"], rid, obj["sig"], bytes(data))


def load_stored(data):
    """A record from our own store, where only records that passed `decode_record` are written:
    the schema is re-checked but not the signature (export --verify re-checks those)."""
    obj = unpack(data)
    check_fields(obj, {"v": int, "type": str, "author": bytes, "ts": int, "body": dict, "id": bytes,
                       "sig": bytes}, "record")
    if obj["type"] not in SCHEMAS:
        raise WireError("unknown_type", obj["type"][:32])
    check_body(obj["type"], obj["body"])
    return Record(obj["type"], obj["author"], obj["ts"], obj["body"], obj["id"], obj["sig"], bytes(data))


# --- messages ----------------------------------------------------------------------------------

def _ids(x):
    return isinstance(x, list) and all(_record_id(i) for i in x)


def _blobs(x):
    return isinstance(x, list) and all(isinstance(i, bytes) for i in x)


def _buckets(x):
    return isinstance(x, list) and all(
        isinstance(b, list) and len(b) == 3 and isinstance(b[0], int) and isinstance(b[1], int)
        and isinstance(b[2], bytes) for b in x)


def _address(x):
    return isinstance(x, str) and 0 < len(x) <= 300


# Membership updates (`hello` messages of other nodes, relayed as signed blobs, and suspicions)
# ride on the membership messages.
# Each relayed hello costs the receiver a signature check: a message carries at most
# MAX_RELAYED of them (and of suspicions), so no message buys more than ~3 ms of our CPU.
MAX_RELAYED = 32


def _hellos(x):
    return _blobs(x) and len(x) <= MAX_RELAYED


_GOSSIP = {"members": _hellos, "suspects": lambda x: isinstance(x, list) and len(x) <= MAX_RELAYED and all(
    isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and isinstance(s[1], int) for s in x)}

MESSAGES = {
    "hello": {"address": _address, "incarnation": int, "meta": _scalars},
    "join": {"hello": bytes},
    "welcome": {"members": _hellos},
    "ping": {"seq": int, **_GOSSIP},
    "ack": {"seq": int, **_GOSSIP},
    "ping_req": {"seq": int, "target": _address},
    "push": {"records": _blobs},
    "ihave": {"ids": _ids},
    "iwant": {"ids": _ids},
    "digest": {"buckets": _buckets, "reply": bool},
    "ids": {"bucket": int, "ids": _ids},
    "leave": {"incarnation": int},
}
# Fields a message may carry or not (messages of nodes from before the field still decode).
MAX_HAVE = 8
MESSAGES_OPTIONAL = {
    # have: ids of the newest records the sender holds; the receiver pulls those it lacks, so
    # every probe also spreads new records to one more member
    "ping": {"have": lambda x: _ids(x) and len(x) <= MAX_HAVE},
    "ack": {"have": lambda x: _ids(x) and len(x) <= MAX_HAVE},
}


@dataclass(frozen=True)
class Message:
    kind: str
    sender: bytes      # Ed25519 public key
    address: str       # where the sender takes replies
    ts: int            # milliseconds
    payload: dict
    encoded: bytes

    @property
    def sender_id(self):
        return node_id(self.sender)


def make_message(identity, kind, payload, ts_ms, address):
    check_fields(payload, MESSAGES[kind], kind, MESSAGES_OPTIONAL.get(kind))
    head = [VERSION, kind, identity.public_key, address, int(ts_ms), payload]
    sig = identity.sign(canonical(head))
    return msgpack.packb([*_sorted(head), sig], use_bin_type=True)


def decode_message(data, now_ms, limits=LIMITS, fresh=True):
    """Untrusted bytes -> a Message whose signature holds, or WireError. `fresh`: its timestamp
    must be within the clock skew of ours (false for relayed `hello`s, which age)."""
    obj = unpack(data, limits)
    if not isinstance(obj, list) or len(obj) != 7:
        raise WireError("malformed", "not a message")
    v, kind, sender, address, ts, payload, sig = obj
    if v != VERSION:
        raise WireError("version", str(v)[:16])
    if not isinstance(kind, str) or kind not in MESSAGES:
        raise WireError("unknown_type", str(kind)[:32])
    if not (isinstance(sender, bytes) and len(sender) == PUBLIC_KEY_BYTES and _address(address) and isinstance(ts, int)
            and isinstance(sig, bytes) and len(sig) == SIGNATURE_BYTES):
        raise WireError("malformed", "header")
    if ts > now_ms + limits.clock_skew_s * 1000 or (fresh and ts < now_ms - limits.clock_skew_s * 1000):
        raise WireError("stale", "message timestamp too far from our clock")
    check_fields(payload, MESSAGES[kind], kind, MESSAGES_OPTIONAL.get(kind))
    if not verify(sender, sig, canonical([v, kind, sender, address, ts, payload])):
        raise WireError("bad_signature", kind)
    return Message(kind, sender, address, ts, payload, bytes(data))
