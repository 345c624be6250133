"""The trusted side of evaluation: validation inputs go to the candidate's model,
logits come back, and only the harness sees targets and computes bits per byte.

Two servers of one frozen model answer (see servers.py). The scoring server gets every
real batch, in order, and nothing else: `score` copies each reply as it arrives, sends the
next request, then computes the metric on its copy, the same work for every batch, and
keeps the copies of the batches chosen for probes. Only once it is gone does the probe
server get those batches' twins (`check_probes`): each row's tokens after a random cut
come from another validation row; its logits up to the cut must equal the kept ones.
So neither server ever sees both a probe and its twin, and nothing the scoring server
can observe depends on which batches are probed."""

import contextlib
import math
import socket
import time

import numpy as np
import torch

from model import prepare

PROBE_TOLERANCE = 1e-2  # absolute, on soft-capped logits; the sandbox sets one per profile


class ModelError(Exception):
    """The candidate's model broke a rule; the message is the violation's name."""


def plan_probes(rows, batch_size, rng, probes, vocab_size):
    """{batch index: (twin inputs, cuts)} for `probes` batches drawn at random."""
    batches = list(prepare.eval_batches(rows, batch_size))
    chosen = rng.choice(len(batches), size=min(probes, len(batches)), replace=False)
    return {int(k): probe_inputs(_inputs(batches[k][0]), rows, rng, vocab_size) for k in sorted(chosen)}


def _inputs(batch):
    return np.ascontiguousarray(batch[:, :-1], dtype=np.int32)


@contextlib.contextmanager
def beside_server(served):
    """Where the server computes on the CPU (`served`: the device it reported), the harness's share
    of the cores while the server computes the next batch beside it: a quarter of torch's threads,
    at least one (on this 2-core machine, one: a run's evaluation took 5.7-6.3 s against 6.7 s
    with two, the two processes' threads no longer crowding each other)."""
    threads = torch.get_num_threads()
    if served in ("cpu", "mlx:cpu"):
        torch.set_num_threads(max(1, threads // 4))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def score(model, rows, token_bytes, batch_size, plan, device="cpu", timings=None):
    """(val_bpb, {probed batch: its logits}) of `model` on `rows` (N, T + 1). Each reply is
    copied once, as it arrives; the metric and every check read only the copy, so a reply
    rewritten while the harness reads it changes nothing, and the next request goes out at
    once, while the harness works on the copy (no device round trip per batch). `timings`, a
    dict, gets the seconds spent making the harness's buffers, scoring, waiting for the first
    reply (a fresh server's first forward: what warming did not load) and for the rest."""
    t = time.time()
    batches = list(prepare.eval_batches(rows, batch_size))
    V = len(token_bytes)
    shape = (batch_size, rows.shape[1] - 1, V)
    # made and touched now: no allocation or first-touch page fault tells a probed batch apart
    spare = torch.zeros(shape, device=device)
    kept = {k: torch.zeros(shape, device=device) for k in plan}
    tb = torch.from_numpy(np.asarray(token_bytes)).to(device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.int64, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    made = time.time()
    model.send(_inputs(batches[0][0]))
    # every batch's targets on the device while the first batch is served: no copy between replies
    targets = [torch.from_numpy(batch[:real, 1:]).to(device) for batch, real in batches]
    chunk = 1 if spare.device.type == "cpu" else 8  # rows a softmax: on a CPU one row's logits stay in cache (half the time)
    for k, (_, real) in enumerate(batches):
        logits = kept.get(k, spare)
        reply = model.receive()
        last = time.time()
        first = last if k == 0 else first
        logits.copy_(reply)
        model.release()
        if k + 1 < len(batches):
            model.send(_inputs(batches[k + 1][0]))
        lo, hi = torch.aminmax(logits)  # NaN propagates: finite bounds, finite logits (a 15th of isfinite's cost)
        finite &= torch.isfinite(lo) & torch.isfinite(hi)
        for j in range(0, real, chunk):  # bounded memory for the float32 softmax; padding rows of a last batch left out
            n, b = prepare.bpb_sums(logits[j:min(j + chunk, real)], targets[k][j:j + chunk], tb)
            nats += n
            nbytes += b
    if not finite.item():
        raise ModelError("nan_logits")
    if timings is not None:
        timings["buffers made"], timings[f"{len(batches)} batches scored"] = made - t, time.time() - t
        timings["first reply"], timings[f"next {len(batches) - 1} replies"] = first - t, last - first
    return nats.item() / (math.log(2) * nbytes.item()), kept


def check_probes(model, plan, kept, stats=None, tolerance=PROBE_TOLERANCE):
    """Send each probed batch's twin and compare the logits up to each row's cut with the kept
    ones. `stats`, a dict, gets the largest change seen ("probe_max_diff")."""
    for k, (px, cuts) in plan.items():
        ours, theirs = kept[k], model(px)
        worst = torch.stack([(ours[r, :c + 1] - theirs[r, :c + 1].to(ours.device)).abs().max()
                             for r, c in enumerate(cuts)]).max().item()
        model.release()
        if stats is not None:
            stats["probe_max_diff"] = max(stats.get("probe_max_diff", 0.0), worst)
        if not worst <= tolerance:  # NaN too: a twin's logits are read in place, once
            raise ModelError("non_causal")


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


def warm(device, vocab_size):
    """Run the kernels the evaluation uses once, on small tensors: CUDA loads each lazily."""
    logits = torch.zeros(1, 8, vocab_size, device=device)
    copy = torch.empty_like(logits)
    copy.copy_(logits)
    targets = torch.zeros(1, 8, dtype=torch.long, device=device)
    n, b = prepare.bpb_sums(copy, targets, torch.ones(vocab_size, dtype=torch.long, device=device))
    (n / b + torch.isfinite(copy).all() + (copy[0, :4] - logits[0, :4]).abs().max()).item()


class RemoteModel:
    """A server's model over its socket: send a request, receive the reply, checked and
    bounded; a reply stays valid until `release`."""

    def __init__(self, sock, vocab_size):
        self.sock, self.vocab_size, self.shape, self.extra = sock, vocab_size, None, {}

    deadline = float("inf")  # time.time() by which the whole evaluation must be done

    def send(self, x, **extra):
        left = self.deadline - time.time()
        if left <= 0:
            raise socket.timeout("evaluation past the wall limit")
        self.sock.settimeout(min(left, 3600))
        self.shape, self.extra = (*x.shape, self.vocab_size), extra
        prepare.send_frame(self.sock, {"op": "forward", "shape": list(x.shape), **extra}, x.tobytes())

    def _reply(self):
        left = self.deadline - time.time()
        if left <= 0:
            raise socket.timeout("evaluation past the wall limit")
        self.sock.settimeout(min(left, 3600))
        try:
            header, payload = prepare.recv_frame(self.sock, 0 if self.extra else math.prod(self.shape) * 4)
        except ValueError:
            raise ModelError("bad_logits") from None
        if header.get("op") != "logits" or header.get("dtype") != "float32" or header.get("shape") != list(self.shape):
            raise ModelError("bad_logits")
        return header, payload

    def receive(self):
        _, payload = self._reply()
        if len(payload) != math.prod(self.shape) * 4:
            raise ModelError("bad_logits")
        return torch.frombuffer(payload, dtype=torch.float32).view(self.shape)

    def release(self):
        pass

    def __call__(self, x):
        self.send(x)
        return self.receive()

    def close(self):
        pass


class SharedMemoryModel(RemoteModel):
    """Requests over the socket; the logits come back in a shared-memory file the
    harness made and sealed (it cannot shrink under the harness's mapping)."""

    def __init__(self, sock, vocab_size, shm):
        super().__init__(sock, vocab_size)
        self.shm = shm

    def send(self, x):
        if x.size * self.vocab_size * 4 > len(self.shm):
            return super().send(x)
        super().send(x, shm=True)

    def receive(self):
        if not self.extra:
            return super().receive()
        header, _ = self._reply()
        if header.get("shm") is not True:
            raise ModelError("bad_logits")
        return torch.frombuffer(self.shm, dtype=torch.float32, count=math.prod(self.shape)).view(self.shape)


class CudaIpcModel(RemoteModel):
    """Requests over the socket; the logits stay in the server's GPU memory, mapped here
    (CUDA IPC) once per allocation they come in: no copy through the socket."""

    def __init__(self, sock, vocab_size, device):
        super().__init__(sock, vocab_size)
        self.device, self.handle, self.address, self.size = torch.device(device), None, None, 0
        self.mapping_seconds, self.mappings = 0.0, 0  # spent mapping the server's memory, and how often

    def send(self, x):
        super().send(x, ipc=True)

    def receive(self):
        header, _ = self._reply()
        ipc = header.get("ipc")
        try:
            handle, offset = bytes.fromhex(ipc["handle"]), ipc["offset"]
        except (TypeError, KeyError, ValueError, AttributeError):
            raise ModelError("bad_logits") from None
        nbytes = math.prod(self.shape) * 4
        if len(handle) != 64 or type(offset) is not int or offset < 0 or offset % 4:
            raise ModelError("bad_logits")
        if handle != self.handle:
            self.close()
            t = time.time()
            try:
                self.address, self.size = prepare.cuda_ipc_open(handle, self.device)
            except RuntimeError:
                raise ModelError("bad_logits") from None
            self.handle, self.mapping_seconds, self.mappings = handle, self.mapping_seconds + time.time() - t, self.mappings + 1
        if offset + nbytes > self.size:
            raise ModelError("bad_logits")
        return torch.as_tensor(prepare.CudaArray(self.address + offset, self.shape), device=self.device)

    def release(self):
        torch.cuda.synchronize(self.device)  # done reading the reply before the server may overwrite it

    def close(self):
        if self.address is not None:
            torch.cuda.synchronize(self.device)
            prepare.cuda_ipc_close(self.address)
            self.handle = self.address = None
