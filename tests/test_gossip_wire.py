"""The wire format and the identity: hostile bytes get a WireError with a reason and nothing
else; records round-trip and their encoding is canonical; limits hold; keys and signatures."""

import hashlib
import os
import stat
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gossip import wire
from gossip.identity import Identity, node_id, verify
from gossip.wire import LIMITS, SCHEMAS, WireError, canonical, decode_message, decode_record, make_message, make_record

NOW_MS = 1_760_000_000_000
SKEW_MS = int(LIMITS.clock_skew_s * 1000)
ALICE = Identity.from_seed(b"alice")
MALLORY = Identity.from_seed(b"mallory")

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ---------------------------------------------------------------------------------

text = st.text(max_size=40)
finite = st.floats(allow_nan=False, allow_infinity=False)
hex_hash = st.sampled_from([40, 64]).flatmap(lambda n: st.text("0123456789abcdef", min_size=n, max_size=n))
bounded = st.floats(0, wire.MAX_BPB, allow_nan=False)  # a score's numbers are bounded (wire._score)
score = st.fixed_dictionaries({"val_bpb": st.one_of(bounded, st.integers(0, 1000)),
                               "runs": st.integers(0, wire.MAX_RUNS), "spread": bounded})
scalars = st.dictionaries(st.text(max_size=16), st.one_of(st.text(max_size=24), finite, st.booleans(),
                                                          st.integers(-2**63, 2**64 - 1)), max_size=8)
record_id = st.binary(min_size=32, max_size=32)

BODIES = {
    "improvement": st.fixed_dictionaries({
        "task": text, "lineage": text, "parent": hex_hash, "child": hex_hash, "diff": text, "before": score,
        "after": score, "hardware": scalars, "proposer": text, "description": text},
        optional={"inspired_by": record_id}),
    "attestation": st.fixed_dictionaries({
        "task": text, "improvement": record_id, "verdict": st.sampled_from(wire.VERDICTS),
        "before": st.none() | score, "after": st.none() | score, "hardware": scalars, "note": text},
        optional={"jointly": st.lists(record_id, min_size=1, max_size=3)}),
    "experiment": st.fixed_dictionaries({
        "task": text, "lineage": text, "parent": hex_hash, "child": hex_hash, "idea": hex_hash, "diff": text,
        "hypothesis": text, "status": st.sampled_from(wire.EXPERIMENT_STATUSES), "before": st.none() | score,
        "after": st.none() | score, "hardware": scalars, "proposer": text, "log_tail": text},
        optional={"inspired_by": record_id}),
    "claim": st.fixed_dictionaries({"task": text, "parent": hex_hash, "child": hex_hash, "idea": hex_hash,
                                    "hardware": scalars, "description": text,
                                    "expires": st.integers(-2**63, 2**64 - 1)}, optional={"diff": text}),
    "note": st.fixed_dictionaries({"text": text}),
    "task": st.fixed_dictionaries({
        "task": st.text("0123456789abcdef", min_size=1, max_size=64), "fingerprint": hex_hash, "profile": text,
        "seq_len": st.integers(-2**63, 2**64 - 1), "eval_tokens": st.integers(-2**63, 2**64 - 1),
        "files": st.lists(st.integers(0, 3 << 16), min_size=1, max_size=4, unique=True).map(lambda sizes: [
            {"path": f"d/{i}.bin", "size": n, "sha256": "a" * 64, "chunk": 1 << 16,
             "chunks": [bytes([i]) * 32] * -(-n // (1 << 16))} for i, n in enumerate(sizes)])}),
}

typed_body = st.sampled_from(sorted(SCHEMAS)).flatmap(lambda t: st.tuples(st.just(t), BODIES[t]))

# Any msgpack value the decoder can produce, maps with text or byte-string keys alike.
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner,
                                                                max_size=5),
    max_leaves=20)
hashable_values = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20) \
    | st.binary(max_size=40)


def sample_body(type_):
    return {
        "improvement": {"task": "t0", "lineage": "torch", "parent": "a" * 64, "child": "b" * 64,
                        "diff": "--- a\n+++ b\n", "before": {"val_bpb": 1.01, "runs": 3, "spread": 0.002},
                        "after": {"val_bpb": 0.99, "runs": 3, "spread": 0.001},
                        "hardware": {"accelerator": "H100", "count": 1, "budget_s": 300.0, "bf16": True},
                        "proposer": "offline", "description": "wider MLP"},
        "attestation": {"task": "t0", "improvement": b"\x07" * 32, "verdict": "confirmed", "before": None,
                        "after": {"val_bpb": 0.99, "runs": 1, "spread": 0.0}, "hardware": {"backend": "cpu"},
                        "note": ""},
        "experiment": {"task": "t0", "lineage": "mlx", "parent": "c" * 40, "child": "d" * 40, "idea": "e" * 64, "diff": "",
                       "hypothesis": "h", "status": "discard", "before": None, "after": None, "hardware": {},
                       "proposer": "claude", "log_tail": "step 10"},
        "claim": {"task": "t0", "parent": "e" * 64, "child": "f" * 64, "idea": "a" * 64, "hardware": {"backend": "cpu"},
                  "description": "MATRIX_LR 0.04 -> 0.06", "expires": NOW_MS + 60_000},
        "note": {"text": "hello swarm"},
        "task": {"task": "0123456789abcdef", "fingerprint": "f" * 64, "profile": "cpu", "seq_len": 256,
                 "eval_tokens": 65536, "files": [{"path": "train.bin", "size": 5, "sha256": "a" * 64,
                                                  "chunk": 1 << 16, "chunks": [b"\x01" * 32]}]},
    }[type_]


def record(type_="note", body=None, identity=ALICE, ts=NOW_MS - 1000):
    return make_record(identity, type_, sample_body(type_) if body is None else body, ts)


def raw_record(r):
    """The record as the plain map that travels."""
    return msgpack.unpackb(r.encoded, raw=False)


def unsigned_id(obj):
    return hashlib.sha256(canonical({k: obj[k] for k in ("v", "type", "author", "ts", "body")})).digest()


HELLO = {"address": "10.0.0.1:7700", "incarnation": 5, "meta": {"backend": "cpu"}}


def message(kind="hello", payload=None, identity=ALICE, ts=NOW_MS, address="10.0.0.1:7700"):
    return make_message(identity, kind, HELLO if payload is None else payload, ts, address)


def signed(head, identity=ALICE):
    """A message array signed over its head as given (no schema check on our side)."""
    return msgpack.packb([*head, identity.sign(canonical(head))], use_bin_type=True)


def reason(fn, *args, **kw):
    with pytest.raises(WireError) as e:
        fn(*args, **kw)
    return e.value.reason


def decodes_or_wire_error(fn, data, now_ms=NOW_MS):
    """fn(data) returns a value or raises WireError; anything else is a bug."""
    try:
        return fn(data, now_ms)
    except WireError as e:
        assert isinstance(e.reason, str) and e.reason
        return None


def flip(data, at, mask):
    return data[:at] + bytes([data[at] ^ mask]) + data[at + 1:]


# --- any bytes -----------------------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=600))
@example(b"")
@example(b"\xc1")                            # never used
@example(b"\xdd\xff\xff\xff\xff")            # array32 of 2**32-1 items announced, none present
@example(b"\xc7\x00\x05")                    # zero-length ext
@example(b"\xd6\xff\x00\x00\x00\x01")        # msgpack timestamp
@example(b"\x91" * 100_000 + b"\xc0")        # 100,000 nested arrays
def test_any_bytes_decode_or_wire_error(data):
    for fn in (decode_message, decode_record):
        value = decodes_or_wire_error(fn, data)
        assert value is None  # random bytes are never validly signed


@FUZZ
@given(msgpack_values)
def test_any_msgpack_value_decodes_or_wire_error(obj):
    data = msgpack.packb(obj, use_bin_type=True)
    assert decodes_or_wire_error(decode_message, data) is None
    assert decodes_or_wire_error(decode_record, data) is None


@FUZZ
@given(st.integers(0, 6), hashable_values | msgpack_values, st.data())
def test_message_with_one_item_replaced(index, value, data):
    """A signed message with one of its seven items replaced: a WireError, or (when the new item
    equals the old) the same message."""
    head = [wire.VERSION, "hello", ALICE.public_key, "10.0.0.1:7700", NOW_MS, HELLO]
    items = [*head, ALICE.sign(canonical(head))]
    if index == 1:  # the kind; an unhashable kind is test_unhashable_kind_is_a_wire_error
        value = data.draw(hashable_values | st.sampled_from(sorted(wire.MESSAGES)))
    items[index] = value
    m = decodes_or_wire_error(decode_message, msgpack.packb(items, use_bin_type=True))
    if m is not None:
        assert [wire.VERSION, m.kind, m.sender, m.address, m.ts, m.payload] == head


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _replace(obj, path, value):
    if not path:
        return value
    copy = dict(obj) if isinstance(obj, dict) else list(obj)
    copy[path[0]] = _replace(obj[path[0]], path[1:], value)
    return copy


@FUZZ
@given(typed_body, st.data(), msgpack_values)
def test_record_with_any_part_replaced(typed, data, value):
    """Any subtree of a valid record replaced by any value and re-encoded without re-signing:
    a WireError, or the very same record (the new value equals the old one)."""
    type_, body = typed
    r = record(type_, body)
    obj = raw_record(r)
    path = data.draw(st.sampled_from(list(_paths(obj))))
    got = decodes_or_wire_error(decode_record, msgpack.packb(_replace(obj, path, value), use_bin_type=True))
    if got is not None:
        assert got.id == r.id and canonical(got.body) == canonical(r.body) and got.sig == r.sig


@FUZZ
@given(typed_body, st.data())
def test_record_byte_flip_is_rejected(typed, data):
    type_, body = typed
    r = record(type_, body)
    at = data.draw(st.integers(0, len(r.encoded) - 1))
    mask = data.draw(st.integers(1, 255))
    got = decodes_or_wire_error(decode_record, flip(r.encoded, at, mask))
    if got is not None:  # only a re-encoding of the same value (e.g. uint16 -> int16) may pass
        assert got.id == r.id and got.sig == r.sig and canonical(got.body) == canonical(r.body)


@FUZZ
@given(st.data())
def test_message_byte_flip_is_rejected(data):
    m = message()
    at = data.draw(st.integers(0, len(m) - 1))
    got = decodes_or_wire_error(decode_message, flip(m, at, data.draw(st.integers(1, 255))))
    if got is not None:  # only a re-encoding of the same value may pass
        assert (got.kind, got.sender, got.address, got.ts, got.payload) == (
            "hello", ALICE.public_key, "10.0.0.1:7700", NOW_MS, HELLO)


@SOME
@given(typed_body, st.data())
def test_truncated_or_extended_record_is_malformed(typed, data):
    r = record(*typed)
    cut = data.draw(st.integers(0, len(r.encoded) - 1))
    assert reason(decode_record, r.encoded[:cut], NOW_MS) == "malformed"
    extra = data.draw(st.binary(min_size=1, max_size=16))
    assert reason(decode_record, r.encoded + extra, NOW_MS) == "malformed"


@SOME
@given(st.data())
def test_truncated_or_extended_message_is_malformed(data):
    m = message("push", {"records": [record().encoded]})
    assert reason(decode_message, m[:data.draw(st.integers(0, len(m) - 1))], NOW_MS) == "malformed"
    assert reason(decode_message, m + data.draw(st.binary(min_size=1, max_size=16)), NOW_MS) == "malformed"


# --- records: reasons ----------------------------------------------------------------------------

def test_record_flipped_in_its_signature_or_id_or_text():
    r = record("note", {"text": "hello swarm"})
    sig_at, id_at, text_at = r.encoded.index(r.sig), r.encoded.index(r.id), r.encoded.index(b"hello swarm")
    for i in (0, 31, 63):
        assert reason(decode_record, flip(r.encoded, sig_at + i, 0x01), NOW_MS) == "bad_signature"
    for i in (0, 17, 31):
        assert reason(decode_record, flip(r.encoded, id_at + i, 0x80), NOW_MS) == "id_mismatch"
    assert reason(decode_record, flip(r.encoded, text_at, 0x20), NOW_MS) == "id_mismatch"  # 'h' -> 'H'


def _tamper(r, **changes):
    obj = raw_record(r)
    for k, v in changes.items():
        obj[k] = v
    return obj


def _pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def _record_cases():
    r = record("improvement")
    body = dict(r.body, description="a better description")
    resigned_future = _tamper(r, ts=NOW_MS + SKEW_MS + 1000)
    resigned_future["id"] = unsigned_id(resigned_future)
    resigned_future["sig"] = ALICE.sign(resigned_future["id"])
    other_author_same_id = _tamper(r, author=MALLORY.public_key)
    other_author_new_id = _tamper(r, author=MALLORY.public_key)
    other_author_new_id["id"] = unsigned_id(other_author_new_id)
    new_body_new_id = _tamper(r, body=body)
    new_body_new_id["id"] = unsigned_id(new_body_new_id)
    wrong_key = _tamper(r)
    wrong_key["sig"] = MALLORY.sign(r.id)
    missing = raw_record(r)
    del missing["sig"]
    extra_body = _tamper(r, body=dict(r.body, extra="x"))
    extra_body["id"] = unsigned_id(extra_body)
    extra_body["sig"] = ALICE.sign(extra_body["id"])
    return [
        ("body changed, not re-signed", _tamper(r, body=body), "id_mismatch"),
        ("body changed, id recomputed, not re-signed", new_body_new_id, "bad_signature"),
        ("author swapped, id kept", other_author_same_id, "id_mismatch"),
        ("author swapped, id recomputed", other_author_new_id, "bad_signature"),
        ("ts changed", _tamper(r, ts=r.ts + 1), "id_mismatch"),
        ("signature by another key", wrong_key, "bad_signature"),
        ("signature cut short", _tamper(r, sig=r.sig[:63]), "bad_signature"),
        ("id of another record", _tamper(r, id=record("note").id), "id_mismatch"),
        ("ts in the future, re-signed", resigned_future, "future"),
        ("ts in the future, not re-signed", _tamper(r, ts=NOW_MS + SKEW_MS + 1), "future"),
        ("version 2", _tamper(r, v=2), "version"),
        ("version as text", _tamper(r, v="1"), "schema"),
        ("unknown type", _tamper(r, type="proposal"), "unknown_type"),
        ("another known type", _tamper(r, type="note"), "schema"),
        ("a field missing", missing, "schema"),
        ("an extra field", _tamper(r, extra=1), "schema"),
        ("an extra body field, re-signed", extra_body, "schema"),
        ("a body field of the wrong type", _tamper(r, body=dict(r.body, proposer=7)), "schema"),
        ("a score missing runs", _tamper(r, body=dict(r.body, after={"val_bpb": 0.9, "spread": 0.0})), "schema"),
        ("a bool where an int goes", _tamper(r, ts=True), "schema"),
        ("not a map", [1, "note"], "schema"),
    ]


@pytest.mark.parametrize("name,obj,why", _record_cases(), ids=[c[0] for c in _record_cases()])
def test_tampered_record_reason(name, obj, why):
    assert reason(decode_record, _pack(obj), NOW_MS) == why


def test_record_timestamp_window():
    """Records age (a node back from a week away still takes them), but may not lie in the future."""
    old = record(ts=NOW_MS - 30 * 86_400_000)
    assert decode_record(old.encoded, NOW_MS).id == old.id
    edge = record(ts=NOW_MS + SKEW_MS)
    assert decode_record(edge.encoded, NOW_MS).id == edge.id
    assert reason(decode_record, record(ts=NOW_MS + SKEW_MS + 1).encoded, NOW_MS) == "future"


def test_make_record_checks_its_body():
    assert reason(make_record, ALICE, "proposal", {"text": "x"}, NOW_MS) == "unknown_type"
    assert reason(make_record, ALICE, "note", {"text": "x", "more": 1}, NOW_MS) == "schema"
    assert reason(make_record, ALICE, "claim", dict(sample_body("claim"), parent="XYZ"), NOW_MS) == "schema"
    assert reason(make_record, ALICE, "note", {"text": "x" * (LIMITS.bin_bytes - 1000)}, NOW_MS) == "oversize"


# --- messages: reasons ---------------------------------------------------------------------------

def _head(**changes):
    head = {"v": wire.VERSION, "kind": "hello", "sender": ALICE.public_key, "address": "10.0.0.1:7700",
            "ts": NOW_MS, "payload": HELLO}
    head.update(changes)
    return list(head.values())


def _message_cases():
    good = message()
    items = msgpack.unpackb(good, raw=False)
    return [
        ("signature flipped", flip(good, len(good) - 1, 0x01), "bad_signature"),
        ("payload changed, not re-signed", _pack([*items[:5], dict(HELLO, incarnation=6), items[6]]), "bad_signature"),
        ("address changed, not re-signed", _pack([*items[:3], "10.6.6.6:7700", *items[4:]]), "bad_signature"),
        ("sender is another key", _pack([items[0], items[1], MALLORY.public_key, *items[3:]]), "bad_signature"),
        ("signed by another key than its sender", signed(_head(), MALLORY), "bad_signature"),
        ("version 2", signed(_head(v=2)), "version"),
        ("unknown kind", signed(_head(kind="gimme")), "unknown_type"),
        ("kind is a number", signed(_head(kind=3)), "unknown_type"),
        ("ts too old", signed(_head(ts=NOW_MS - SKEW_MS - 1)), "stale"),
        ("ts too new", signed(_head(ts=NOW_MS + SKEW_MS + 1)), "stale"),
        ("ts not an int", signed(_head(ts=float(NOW_MS))), "malformed"),
        ("sender of 31 bytes", signed(_head(sender=ALICE.public_key[:31])), "malformed"),
        ("empty address", signed(_head(address="")), "malformed"),
        ("address too long", signed(_head(address="x" * 301)), "malformed"),
        ("signature of 63 bytes", _pack([*items[:6], items[6][:63]]), "malformed"),
        ("six items", _pack(items[:6]), "malformed"),
        ("a map", _pack({"kind": "hello"}), "malformed"),
        ("payload missing a field", signed(_head(payload={"address": "a", "incarnation": 1})), "schema"),
        ("payload with an extra field", signed(_head(payload=dict(HELLO, extra=1))), "schema"),
        ("payload of the wrong type", signed(_head(payload=dict(HELLO, incarnation="5"))), "schema"),
        ("payload not a map", signed(_head(payload=[1, 2])), "schema"),
        ("ids of the wrong size", signed(_head(kind="iwant", payload={"ids": [b"\x00" * 31]})), "schema"),
        ("a record that is not bytes", signed(_head(kind="push", payload={"records": ["x"]})), "schema"),
    ]


@pytest.mark.parametrize("name,data,why", _message_cases(), ids=[c[0] for c in _message_cases()])
def test_tampered_message_reason(name, data, why):
    assert reason(decode_message, data, NOW_MS) == why


def test_message_round_trip_and_freshness():
    for kind, payload in [("hello", HELLO), ("join", {"hello": message()}), ("ping", {"seq": 3, "members": [],
                          "suspects": [["abcd", 4]]}), ("ihave", {"ids": [b"\x01" * 32]}),
                          ("digest", {"buckets": [[489_000, 2, b"\x00" * 16]], "reply": True}),
                          ("leave", {"incarnation": 9})]:
        m = decode_message(message(kind, payload), NOW_MS)
        assert (m.kind, m.sender, m.sender_id, m.address, m.ts, m.payload) == (
            kind, ALICE.public_key, ALICE.id, "10.0.0.1:7700", NOW_MS, payload)
    old = message(ts=NOW_MS - SKEW_MS - 1)
    assert reason(decode_message, old, NOW_MS) == "stale"
    assert decode_message(old, NOW_MS, fresh=False).payload == HELLO  # relayed hellos age
    assert reason(decode_message, message(ts=NOW_MS + SKEW_MS + 1), NOW_MS, fresh=False) == "stale"


# --- round trip and the canonical encoding -------------------------------------------------------

def test_every_record_type_has_a_strategy():
    assert set(BODIES) == set(SCHEMAS)
    for t in SCHEMAS:
        assert set(sample_body(t)) == set(SCHEMAS[t])
    assert set(wire.OPTIONAL) <= set(SCHEMAS)


def test_an_optional_field_may_be_absent_and_is_checked_when_present():
    body = sample_body("experiment")
    plain = make_record(ALICE, "experiment", body, NOW_MS)
    assert "inspired_by" not in decode_record(plain.encoded, NOW_MS).body  # records without it keep their bytes
    ported = make_record(ALICE, "experiment", dict(body, inspired_by=b"\x01" * 32), NOW_MS)
    assert decode_record(ported.encoded, NOW_MS).body["inspired_by"] == b"\x01" * 32 and ported.id != plain.id
    for bad in (b"\x01" * 31, "ab" * 32, None):
        with pytest.raises(WireError, match="experiment.inspired_by"):
            make_record(ALICE, "experiment", dict(body, inspired_by=bad), NOW_MS)
    with pytest.raises(WireError, match="extra"):
        make_record(ALICE, "claim", dict(sample_body("claim"), inspired_by=b"\x01" * 32), NOW_MS)
    joint = make_record(ALICE, "attestation", dict(sample_body("attestation"), jointly=[b"\x02" * 32]), NOW_MS)
    assert decode_record(joint.encoded, NOW_MS).body["jointly"] == [b"\x02" * 32]
    for bad in ([], [b"\x02" * 31], b"\x02" * 32, [b"\x02" * 32] * (wire.MAX_JOINTLY + 1)):
        with pytest.raises(WireError, match="attestation.jointly"):
            make_record(ALICE, "attestation", dict(sample_body("attestation"), jointly=bad), NOW_MS)
    claim = make_record(ALICE, "claim", dict(sample_body("claim"), diff="-A = 1\n+A = 2\n"), NOW_MS)
    assert decode_record(claim.encoded, NOW_MS).body["diff"] == "-A = 1\n+A = 2\n"
    with pytest.raises(WireError, match="claim.diff"):
        make_record(ALICE, "claim", dict(sample_body("claim"), diff="x" * (wire.CLAIM_DIFF_CHARS + 1)), NOW_MS)


@FUZZ
@given(typed_body, st.integers(0, NOW_MS))
def test_record_round_trip(typed, ts):
    type_, body = typed
    r = make_record(ALICE, type_, body, ts)
    got = decode_record(r.encoded, NOW_MS)
    assert got == r
    assert got.encoded == r.encoded
    assert got.author_id == ALICE.id == node_id(ALICE.public_key)


def _reorder(obj, rng_keys):
    if isinstance(obj, dict):
        keys = rng_keys(list(obj))
        return {k: _reorder(obj[k], rng_keys) for k in keys}
    return obj


@FUZZ
@given(typed_body, st.randoms(use_true_random=False))
def test_canonical_encoding_ignores_key_order(typed, rnd):
    type_, body = typed

    def shuffled(keys):
        rnd.shuffle(keys)
        return keys

    a = make_record(ALICE, type_, body, NOW_MS)
    b = make_record(ALICE, type_, _reorder(body, shuffled), NOW_MS)
    reversed_ = make_record(ALICE, type_, _reorder(body, lambda k: k[::-1]), NOW_MS)
    assert a.encoded == b.encoded == reversed_.encoded
    assert a.id == b.id == reversed_.id
    # and the record decoded from another order of the same map has the same id
    assert decode_record(_pack(_reorder(raw_record(a), shuffled)), NOW_MS).id == a.id


@FUZZ
@given(typed_body)
def test_id_is_sha256_of_canonical_unsigned_body(typed):
    type_, body = typed
    r = make_record(ALICE, type_, body, NOW_MS)
    unsigned = {"v": wire.VERSION, "type": type_, "author": ALICE.public_key, "ts": NOW_MS, "body": body}
    assert r.id == hashlib.sha256(canonical(unsigned)).digest()
    assert verify(ALICE.public_key, r.sig, r.id)
    obj = raw_record(r)
    assert set(obj) == {"v", "type", "author", "ts", "body", "id", "sig"}
    assert r.encoded == canonical(obj)


def test_canonical_bytes():
    """Sorted keys at every level, shortest integers, float64, bin for bytes, str for text."""
    assert canonical({"b": 1, "a": {"d": 2, "c": 3}}) == b"\x82\xa1a\x82\xa1c\x03\xa1d\x02\xa1b\x01"
    assert canonical(1) == b"\x01"
    assert canonical(-1) == b"\xff"
    assert canonical(300) == b"\xcd\x01\x2c"
    assert canonical(2**40) == b"\xcf" + struct.pack(">Q", 2**40)
    assert canonical(1.5) == b"\xcb" + struct.pack(">d", 1.5)
    assert canonical(b"\x00") == b"\xc4\x01\x00"
    assert canonical("x") == b"\xa1x"
    assert canonical(("a", [{"z": 0, "y": 1}])) == b"\x92\xa1a\x91\x82\xa1y\x01\xa1z\x00"


def test_reencoded_record_keeps_its_id():
    """The id is computed, never trusted: a record sent with its keys in another order, or with
    a longer integer form, still has the one id."""
    r = record("claim")
    obj = raw_record(r)
    head = msgpack.packb({k: obj[k] for k in reversed(list(obj))}, use_bin_type=True)
    assert head != r.encoded
    assert decode_record(head, NOW_MS).id == r.id


# --- limits --------------------------------------------------------------------------------------

def _message_with(payload_value, kind="push", field="records"):
    return signed(_head(kind=kind, payload={field: payload_value}))


def test_message_over_one_mebibyte_is_oversize():
    big = [b"\x00" * (512 << 10), b"\x00" * (512 << 10)]
    data = _message_with(big)
    assert len(data) > LIMITS.message_bytes
    assert reason(decode_message, data, NOW_MS) == "oversize"
    assert reason(decode_record, data, NOW_MS) == "oversize"
    assert reason(decode_message, b"\x00" * (LIMITS.message_bytes + 1), NOW_MS) == "oversize"
    # one byte under the limit passes the size check and fails on what it is
    assert reason(decode_message, b"\xc0" * LIMITS.message_bytes, NOW_MS) == "malformed"


def test_just_under_the_limits_decodes():
    ok = make_message(ALICE, "push", {"records": [b"\x00" * (LIMITS.message_bytes - 200)]}, NOW_MS, "a")
    assert len(decode_message(ok, NOW_MS).payload["records"][0]) == LIMITS.message_bytes - 200
    ids = [bytes([i % 256, i // 256]) * 16 for i in range(LIMITS.array_len)]
    assert decode_message(make_message(ALICE, "ihave", {"ids": ids}, NOW_MS, "a"), NOW_MS).payload["ids"] == ids
    meta = {f"k{i}": i for i in range(LIMITS.map_len)}
    hello = dict(HELLO, meta=meta)
    assert decode_message(make_message(ALICE, "hello", hello, NOW_MS, "a"), NOW_MS).payload["meta"] == meta
    note = record("note", {"text": "x" * LIMITS.str_bytes})
    assert decode_record(note.encoded, NOW_MS).body["text"] == "x" * LIMITS.str_bytes


@pytest.mark.parametrize("name,data", [
    ("string over its limit", lambda: _message_with(["x" * (LIMITS.str_bytes + 1)])),
    ("array over its limit", lambda: _message_with([b"\x00" * 32] * (LIMITS.array_len + 1), "ihave", "ids")),
    ("map over its limit",
     lambda: signed(_head(payload=dict(HELLO, meta={f"k{i}": i for i in range(LIMITS.map_len + 1)})))),
    ("record text over the string limit",
     lambda: _pack(dict(raw_record(record()), body={"text": "x" * (LIMITS.str_bytes + 1)}))),
    ("nesting deeper than the limit", lambda: _message_with([[[[[[[[b""]]]]]]]])),
    ("nesting far deeper", lambda: b"\x91" * 5000 + b"\xc0"),
    ("a NaN at the top", lambda: msgpack.packb(float("nan"))),
    ("an infinity at the top", lambda: msgpack.packb(float("-inf"))),
    ("an ext value", lambda: b"\xd4\x01\x00"),
])
def test_limits_are_malformed(name, data):
    raw = data()
    assert reason(decode_message, raw, NOW_MS) == "malformed"
    assert reason(decode_record, raw, NOW_MS) == "malformed"


def test_depth_limit_is_exact():
    nested = b""
    for _ in range(LIMITS.depth):
        nested = [nested]
    assert wire.unpack(msgpack.packb(nested)) == nested
    assert reason(wire.unpack, msgpack.packb([nested])) == "malformed"


@pytest.mark.parametrize("where", ["score", "hardware", "meta"])
def test_nested_non_finite_float_is_rejected(where):
    if where == "meta":
        data = make_message(ALICE, "hello", dict(HELLO, meta={"x": float("nan")}), NOW_MS, "a")
        assert reason(decode_message, data, NOW_MS) in ("malformed", "schema")
        return
    body = sample_body("improvement")
    if where == "score":
        body = dict(body, after={"val_bpb": float("nan"), "runs": 3, "spread": 0.0})
    else:
        body = dict(body, hardware={"budget_s": float("inf")})
    obj = {"v": wire.VERSION, "type": "improvement", "author": ALICE.public_key, "ts": NOW_MS, "body": body}
    obj["id"] = unsigned_id(obj)
    obj["sig"] = ALICE.sign(obj["id"])
    assert reason(decode_record, canonical(obj), NOW_MS) in ("malformed", "schema")


@pytest.mark.parametrize("kind", [[1], {"a": 1}])
def test_unhashable_kind_is_a_wire_error(kind):
    data = msgpack.packb([wire.VERSION, kind, b"\x00" * 32, "a", NOW_MS, {}, b"\x00" * 64], use_bin_type=True)
    assert reason(decode_message, data, NOW_MS) in ("unknown_type", "malformed")


@pytest.mark.parametrize("which", ["message", "record"])
def test_mixed_key_map_is_a_wire_error(which):
    mixed = {"a": 1, b"b": 2}
    if which == "message":
        data = msgpack.packb([*_head(payload=dict(HELLO, meta=mixed)), b"\x00" * 64], use_bin_type=True)
        assert reason(decode_message, data, NOW_MS) in ("schema", "malformed")
    else:
        obj = dict(raw_record(record("attestation")))
        obj["body"] = dict(obj["body"], hardware=mixed)
        assert reason(decode_record, _pack(obj), NOW_MS) in ("schema", "malformed")


# --- identity -------------------------------------------------------------------------------------

def test_key_file_is_private_and_reloads_to_the_same_id(tmp_path):
    path = str(tmp_path / "node.key")
    a = Identity.load(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not os.path.exists(path + ".tmp")
    b = Identity.load(path)
    assert (a.id, a.public_key) == (b.id, b.public_key)
    assert a.id == node_id(a.public_key) and len(a.id) == 16
    assert verify(b.public_key, a.sign(b"x"), b"x")
    other = Identity.load(str(tmp_path / "other.key"))
    assert other.id != a.id


def test_key_file_of_another_kind_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    path = tmp_path / "ec.key"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ValueError):
        Identity.load(str(path))


def test_from_seed_is_deterministic():
    assert Identity.from_seed(b"s").public_key == Identity.from_seed(b"s").public_key
    assert Identity.from_seed(b"s").id != Identity.from_seed(b"t").id


def test_verify_good_and_bad():
    sig = ALICE.sign(b"data")
    assert verify(ALICE.public_key, sig, b"data") is True
    assert verify(MALLORY.public_key, sig, b"data") is False
    assert verify(ALICE.public_key, MALLORY.sign(b"data"), b"data") is False
    assert verify(ALICE.public_key, sig, b"datA") is False
    assert verify(ALICE.public_key, sig[:63], b"data") is False
    assert verify(ALICE.public_key + b"\x00", sig, b"data") is False
    assert verify(b"", b"", b"") is False
    assert verify(b"\xff" * 32, sig, b"data") is False


def test_small_order_keys_verify_nothing():
    """Each small-order key (both signs) lets anyone forge: the library alone accepts a signature
    R = a small-order point, S = 0 over one of a few messages. verify() accepts none of them, and
    no message signed by such a key decodes."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gossip.identity import SMALL_ORDER
    points = sorted(SMALL_ORDER) + [p[:31] + bytes([p[31] | 0x80]) for p in sorted(SMALL_ORDER)]

    def forgery(key):
        lib = ed25519.Ed25519PublicKey.from_public_bytes(key)
        for m in (b"%d" % i for i in range(16)):
            for r in points:
                try:
                    lib.verify(r + bytes(32), m)
                    return r + bytes(32), m
                except Exception:  # noqa: BLE001 (InvalidSignature: try the next)
                    pass
        return None

    for key in points:
        forged = forgery(key)
        assert forged is not None, key.hex()  # the hole is real for every one of them
        assert verify(key, *forged) is False, key.hex()
    head = [wire.VERSION, "ihave", points[1], "evil", NOW_MS, {"ids": []}]
    data = msgpack.packb([*head, points[1] + bytes(32)], use_bin_type=True)
    assert reason(decode_message, data, NOW_MS) == "bad_signature"


@FUZZ
@given(st.binary(max_size=40), st.binary(max_size=80), st.binary(max_size=64))
@example(b"\x00" * 32, b"\x00" * 64, b"")
@example(b"\xff" * 32, b"\xff" * 64, b"x")
@example(b"\x01" + b"\x00" * 31, b"\x00" * 64, b"")  # the identity point
def test_verify_never_raises(key, sig, data):
    assert verify(key, sig, data) is False


@SOME
@given(st.binary(max_size=200), st.integers(0, 63), st.integers(1, 255))
def test_verify_rejects_any_flipped_signature(data, at, mask):
    sig = ALICE.sign(data)
    assert verify(ALICE.public_key, sig, data)
    assert not verify(ALICE.public_key, flip(sig, at, mask), data)
    assert not verify(flip(ALICE.public_key, at % 32, mask), sig, data)
