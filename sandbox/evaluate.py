"""The trusted side of evaluation: validation inputs go to the candidate's model,
logits come back, and only the harness sees targets and computes bits per byte.
Causality probes are mixed in: a copy of a real batch whose tokens after a random
cut come from other validation rows; logits up to the cut must not move."""

import math
import socket
import time

import numpy as np
import torch

from model import prepare

PROBE_TOLERANCE = 1e-2  # absolute, on soft-capped logits; the sandbox sets one per profile


class ModelError(Exception):
    """The candidate's model broke a rule; the message is the violation's name."""


def check_logits(logits, shape):
    if not isinstance(logits, torch.Tensor) or logits.dtype != torch.float32 or tuple(logits.shape) != shape:
        raise ModelError("bad_logits")
    if not torch.isfinite(logits).all():
        raise ModelError("nan_logits")
    return logits


def evaluate(forward, rows, token_bytes, batch_size, rng, probes=2, device="cpu", stats=None, tolerance=PROBE_TOLERANCE):
    """val_bpb of `forward` (int32 (B, T) -> float32 (B, T, V) on `device`) on `rows`
    (N, T + 1), with `probes` causality probes hidden among the batches. A reply may
    live in a buffer the next call overwrites: what is kept is copied. `stats`, a dict,
    gets the largest logit change the probes saw ("probe_max_diff")."""
    V = len(token_bytes)
    n_batches = -(-len(rows) // batch_size)
    probed = set(rng.choice(n_batches, size=min(probes, n_batches), replace=False).tolist())
    tb = torch.from_numpy(np.asarray(token_bytes)).to(device)
    nats, nbytes = 0.0, 0
    for k, (batch, real) in enumerate(prepare.eval_batches(rows, batch_size)):
        x = np.ascontiguousarray(batch[:, :-1], dtype=np.int32)
        shape = (*x.shape, V)
        if k in probed:
            px, cuts = probe_inputs(x, rows, rng, V)
            if rng.random() < 0.5:
                logits = check_logits(forward(x), shape).clone()
                plogits = check_logits(forward(px), shape)
            else:
                plogits = check_logits(forward(px), shape).clone()
                logits = check_logits(forward(x), shape)
            for r, cut in enumerate(cuts):
                diff = (logits[r, :cut + 1] - plogits[r, :cut + 1]).abs().max().item()
                if stats is not None:
                    stats["probe_max_diff"] = max(stats.get("probe_max_diff", 0.0), diff)
                if diff > tolerance:
                    raise ModelError("non_causal")
        else:
            logits = check_logits(forward(x), shape)
        targets = torch.from_numpy(batch[:real, 1:]).to(device)
        for j in range(0, real, 8):  # bounded memory for the float32 softmax; padding rows of a last batch left out
            n, b = prepare.bpb_counts(logits[j:min(j + 8, real)], targets[j:j + 8], tb)
            nats, nbytes = nats + n, nbytes + b
    bpb = nats / (math.log(2) * nbytes)
    if not math.isfinite(bpb):  # replies are read in place: one rewritten after its check
        raise ModelError("nan_logits")
    return bpb


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

    deadline = float("inf")  # time.time() by which the whole evaluation must be done

    def request(self, x, **extra):
        B, T = x.shape
        left = self.deadline - time.time()
        if left <= 0:
            raise socket.timeout("evaluation past the wall limit")
        self.sock.settimeout(min(left, 3600))
        prepare.send_frame(self.sock, {"op": "forward", "shape": [B, T], **extra}, x.tobytes())
        try:
            header, payload = prepare.recv_frame(self.sock, 0 if extra else B * T * self.vocab_size * 4)
        except ValueError:
            raise ModelError("bad_logits") from None
        if header.get("op") != "logits" or header.get("dtype") != "float32" or header.get("shape") != [B, T, self.vocab_size]:
            raise ModelError("bad_logits")
        return header, payload

    def __call__(self, x):
        _, payload = self.request(x)
        if len(payload) != x.size * self.vocab_size * 4:
            raise ModelError("bad_logits")
        return torch.frombuffer(payload, dtype=torch.float32).view(*x.shape, self.vocab_size)


class SharedMemoryModel(RemoteModel):
    """Requests over the socket; the logits come back in a shared-memory file the
    harness made and sealed (it cannot shrink under the harness), read in place."""

    def __init__(self, sock, vocab_size, shm):
        super().__init__(sock, vocab_size)
        self.shm = shm

    def __call__(self, x):
        n = x.size * self.vocab_size
        if n * 4 > len(self.shm):
            return super().__call__(x)
        header, _ = self.request(x, shm=True)
        if header.get("shm") is not True:
            raise ModelError("bad_logits")
        return torch.frombuffer(self.shm, dtype=torch.float32, count=n).view(*x.shape, self.vocab_size)

    def close(self):
        pass


class CudaIpcModel(RemoteModel):
    """Requests over the socket; the logits stay in the candidate's GPU buffer, mapped
    here once (CUDA IPC) and read in place: no copy through the socket."""

    def __init__(self, sock, vocab_size, device):
        super().__init__(sock, vocab_size)
        self.device, self.handle, self.address, self.size = torch.device(device), None, None, 0

    def __call__(self, x):
        torch.cuda.synchronize(self.device)  # done reading the last reply before the candidate overwrites it
        header, _ = self.request(x, ipc=True)
        ipc = header.get("ipc")
        try:
            handle, offset = bytes.fromhex(ipc["handle"]), ipc["offset"]
        except (TypeError, KeyError, ValueError, AttributeError):
            raise ModelError("bad_logits") from None
        nbytes = x.size * self.vocab_size * 4
        if len(handle) != 64 or type(offset) is not int or offset < 0 or offset % 4:
            raise ModelError("bad_logits")
        if handle != self.handle:
            self.close()
            try:
                self.address, self.size = prepare.cuda_ipc_open(handle, self.device)
            except RuntimeError:
                raise ModelError("bad_logits") from None
            self.handle = handle
        if offset + nbytes > self.size:
            raise ModelError("bad_logits")
        return torch.as_tensor(prepare.CudaArray(self.address + offset, (*x.shape, self.vocab_size)), device=self.device)

    def close(self):
        if self.address is not None:
            torch.cuda.synchronize(self.device)
            prepare.cuda_ipc_close(self.address)
            self.handle = self.address = None
