"""A node's Ed25519 identity: the key file, the short node id, signing and verifying."""

import hashlib
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def node_id(public_key):
    """The short fingerprint people and logs see: 16 hex digits of the key's SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


class Identity:
    def __init__(self, private_key):
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                                serialization.PublicFormat.Raw)
        self.id = node_id(self.public_key)

    @classmethod
    def generate(cls):
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed):
        """A deterministic identity from 32 bytes (simulations and tests)."""
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))

    @classmethod
    def load(cls, path):
        """The key at `path`, created there on first use (PEM, mode 0600, written atomically)."""
        if not os.path.exists(path):
            pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            tmp = path + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(key)

    def sign(self, data):
        return self._key.sign(data)


# The encodings of Ed25519's small-order points (and of y = p, p + 1, which wrap onto two of them),
# without the sign bit, as libsodium's blocklist has them. A key of small order "verifies" a
# signature that nobody made (the identity key, 01 00..00, verifies R = 01 00..00, S = 0 over any
# message); no real key is one, so such a key never signs anything here.
SMALL_ORDER = frozenset(bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0100000000000000000000000000000000000000000000000000000000000000",  # order 1: the identity
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2: y = p - 1
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p, read as 0
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p + 1, read as 1
))


def small_order(public_key):
    return public_key[:31] + bytes([public_key[31] & 0x7f]) in SMALL_ORDER


def verify(public_key, signature, data):
    """Whether `signature` is `public_key`'s signature of `data`; never raises on bad input, and
    never holds for a key of small order."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES or small_order(public_key):
        return False
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        return True
    except (InvalidSignature, ValueError):
        return False
