"""The trusted side of evaluation: validation inputs go to the candidate's model,
logits come back, and only the harness sees targets and computes bits per byte.
Causality probes are mixed in: a copy of a real batch whose tokens after a random
cut come from other validation rows; logits up to the cut must not move."""

import math

import numpy as np
import torch

from model import prepare

PROBE_TOLERANCE = 1e-2  # absolute, on soft-capped logits; batch-invariant causal models give ~0


class ModelError(Exception):
    """The candidate's model broke a rule; the message is the violation's name."""


def check_logits(logits, shape):
    if not isinstance(logits, np.ndarray) or logits.dtype != np.float32 or logits.shape != shape:
        raise ModelError("bad_logits")
    if not np.isfinite(logits).all():
        raise ModelError("nan_logits")
    return logits


def evaluate(forward, rows, token_bytes, batch_size, rng, probes=2):
    """val_bpb of `forward` (int32 (B, T) -> float32 (B, T, V)) on `rows` (N, T + 1),
    with `probes` causality probes hidden among the batches."""
    V = len(token_bytes)
    n_batches = -(-len(rows) // batch_size)
    probed = set(rng.choice(n_batches, size=min(probes, n_batches), replace=False).tolist())
    tb = torch.from_numpy(np.asarray(token_bytes))
    nats, nbytes = 0.0, 0
    for k, (batch, real) in enumerate(prepare.eval_batches(rows, batch_size)):
        x = np.ascontiguousarray(batch[:, :-1], dtype=np.int32)
        shape = (*x.shape, V)
        if k in probed:
            px, cuts = probe_inputs(x, rows, rng, V)
            if rng.random() < 0.5:
                logits = check_logits(forward(x), shape)
                plogits = check_logits(forward(px), shape)
            else:
                plogits = check_logits(forward(px), shape)
                logits = check_logits(forward(x), shape)
            for r, cut in enumerate(cuts):
                if np.abs(logits[r, :cut + 1] - plogits[r, :cut + 1]).max() > PROBE_TOLERANCE:
                    raise ModelError("non_causal")
        else:
            logits = check_logits(forward(x), shape)
        n, b = prepare.bpb_counts(torch.from_numpy(logits[:real]), torch.from_numpy(batch[:real, 1:]), tb)
        nats, nbytes = nats + n, nbytes + b
    return nats / (math.log(2) * nbytes)


def probe_inputs(x, rows, rng, vocab_size):
    """x with each row's tokens after a random cut replaced by the same positions of
    another validation row: still real text, a different future. The token right
    after the cut always differs, even where the donor happens to agree."""
    B, T = x.shape
    cuts = rng.integers(0, T - 1, size=B)
    donors = rng.integers(0, len(rows), size=B)
    px = x.copy()
    for r, c in enumerate(cuts):
        px[r, c + 1:] = rows[donors[r], c + 1:T]
        if px[r, c + 1] == x[r, c + 1]:
            px[r, c + 1] = (x[r, c + 1] + rng.integers(1, vocab_size)) % vocab_size
    return px, cuts


class RemoteModel:
    """`forward` over the candidate's socket, with every reply checked and bounded."""

    def __init__(self, sock, vocab_size):
        self.sock, self.vocab_size = sock, vocab_size

    def __call__(self, x):
        B, T = x.shape
        prepare.send_frame(self.sock, {"op": "forward", "shape": [B, T]}, x.tobytes())
        try:
            header, payload = prepare.recv_frame(self.sock, B * T * self.vocab_size * 4)
        except ValueError:
            raise ModelError("bad_logits") from None
        if header.get("op") != "logits" or header.get("dtype") != "float32" or header.get("shape") != [B, T, self.vocab_size] \
                or len(payload) != B * T * self.vocab_size * 4:
            raise ModelError("bad_logits")
        return np.frombuffer(payload, dtype=np.float32).reshape(B, T, self.vocab_size)
