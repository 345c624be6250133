"""The two fresh processes that serve a candidate's frozen model (model/serve.py): the
scoring server gets every real evaluation batch; the probe server gets only the probes'
twins, and only once the scoring server and the candidate are gone.

Both start with the candidate, while it trains, so that Python, the framework and the CUDA
context are ready when its model arrives; each in a confinement of its own (run.py starts
them: own mount, pid, network and IPC namespaces, an empty scratch folder, no data, nothing
writable that anything else can see). The candidate freezes its model into a file of the
harness's, which the harness seals against writes once the candidate says it is done, so
both servers load the very same model, and no candidate code ever runs in two of the three
processes at once, except the candidate's last moments beside the scoring server's first
(the candidate has seen no validation input; it has nothing to tell). A stateful model thus
gains nothing from remembering requests: the probe server never saw the real rows, and the
scoring server never sees a probe nor can tell, from anything it observes, which of its
batches the harness will check."""

import fcntl
import mmap
import os
import re
import time

from model import prepare
from sandbox import evaluate

SEALED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class LoadError(Exception):
    """A server could not load the frozen model; its log says why."""


def shared_memory(size, name="autoresearch-logits"):
    """(fd, mapping) of a fresh shared-memory file of `size` bytes, sealed so that the
    process it is given to cannot shrink it under the harness's mapping."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALED)
    return fd, mmap.mmap(fd, size)


def freeze_file(limit):
    """The file a candidate freezes its model into: `limit` bytes (sparse) that it cannot grow."""
    fd = os.memfd_create("autoresearch-model", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, limit)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
    return fd


def seal(fd, size):
    """Cut the candidate's file to the `size` bytes it says it wrote and seal it against any
    change: from here on both servers read these very bytes, and the candidate, still running,
    can change none of them. False where it cannot be sealed at that size: the candidate holds
    a writable mapping of it, or cut it shorter."""
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | SEALED)
    except OSError:
        return False
    return os.fstat(fd).st_size == size


class DeviceWeights:
    """The harness's copies of the device buffer a CUDA candidate froze its weights into
    (serve.freeze), read once while the candidate waits (it may then free its own): a host
    copy, and from it a device copy for each server in turn. The scoring server's goes as soon
    as that server has loaded (it keeps a copy of its own); the probe server's is made only once
    the scoring server and the candidate are gone (`for_probe`), so that nothing either can
    reach, through a handle guessed or passed in the model, ever leads to the probe server's
    bytes. Both are copies of one read of the candidate's buffer: the very same bytes."""

    def __init__(self, offer, device, limit):
        self.address = None
        try:
            handle, offset, self.nbytes = bytes.fromhex(offer["handle"]), offer["offset"], offer["bytes"]
        except (TypeError, KeyError, ValueError, AttributeError):
            raise evaluate.ModelError("bad_handover") from None
        self.device = cuda_device(device)
        if (self.device is None or len(handle) != 64 or type(offset) is not int or type(self.nbytes) is not int
                or offset < 0 or not 0 < self.nbytes <= limit or self.nbytes % 4):
            raise evaluate.ModelError("bad_handover")
        source, size = prepare.cuda_ipc_open(handle, self.device)  # RuntimeError: it does not map here
        try:
            if offset + self.nbytes > size:
                raise evaluate.ModelError("bad_handover")
            self._read(source + offset)
        except BaseException:
            self.free()
            try:
                prepare.cuda_ipc_close(source)
            except RuntimeError:
                pass  # the first fault is the one to report
            raise
        try:
            prepare.cuda_ipc_close(source)
        except RuntimeError:
            self.free()
            raise

    def _read(self, address):
        """The host copy; the scoring server's device copy too, made on the device, where there is room."""
        import torch
        source = _device_floats(address, self.nbytes, self.device)
        try:
            self.address, copy = prepare.cuda_alloc(self.nbytes // 4, self.device)
        except RuntimeError:  # no room beside the candidate: made from the host copy once it is gone
            copy = source
        else:
            copy.copy_(source)
        self.probe = _host_floats(self.nbytes // 4)
        self.probe.copy_(copy)  # before any server may write into `copy`
        torch.cuda.synchronize(self.device)

    def offer(self):
        """What the scoring server maps: its device copy."""
        if self.address is None:
            self._upload()
        return dict(prepare.cuda_ipc_export(self.address), bytes=self.nbytes, device=self.device)

    def for_probe(self):
        """What the probe server maps, once the scoring server and the candidate are gone: a
        fresh device copy of the host copy."""
        self.free()
        return self.offer()

    def _upload(self):
        import torch
        self.address, copy = prepare.cuda_alloc(self.nbytes // 4, self.device)
        copy.copy_(self.probe)
        torch.cuda.synchronize(self.device)

    def free(self):
        """Give the device copy back (the host copy goes with this object)."""
        address, self.address = self.address, None
        if address is not None:
            prepare.cuda_free(address)


def _device_floats(address, nbytes, device):
    import torch
    return torch.as_tensor(prepare.CudaArray(address, (nbytes // 4,)), device=device)


def _host_floats(n):
    """The host buffer the probe server's copy waits in: page-locked. A fresh pageable one
    (`Tensor.cpu()`, 160 MB faulted in as it was written) took 0.10-0.16 s of every run on an
    H100 and the upload back 0.02-0.05 s; torch keeps a freed page-locked block for the next,
    so only a node's first run pays for locking it."""
    import torch
    try:
        return torch.empty(n, dtype=torch.float32, pin_memory=True)
    except RuntimeError:  # none to be had: pageable
        return torch.empty(n, dtype=torch.float32)


class Server:
    """One server process (started by run.py) and the harness's end of it."""

    def __init__(self, role, proc, sock, shm, log_path, paths):
        self.role, self.proc, self.sock, self.shm, self.log_path, self.paths = role, proc, sock, shm, log_path, paths
        self.remote = None

    def load(self, size, deadline, weights=None):
        """Tell it to load the frozen model (and its copy of the weights' device buffer, given as
        DeviceWeights.offer); its device once it is ready."""
        self.sock.settimeout(max(0.001, deadline - time.time()))
        try:
            prepare.send_frame(self.sock, {"op": "load", "size": size, **({"weights": weights} if weights else {})})
            header, _ = prepare.recv_frame(self.sock, 0)
        except ValueError:
            raise evaluate.ModelError("bad_handover") from None
        except (EOFError, ConnectionError):
            raise LoadError(self.role) from None
        if header.get("op") != "ready" or not isinstance(header.get("device"), str):
            raise evaluate.ModelError("bad_handover")
        return header["device"]

    def model(self, vocab_size, device, deadline):
        """Its model for evaluate: logits over CUDA IPC where the harness can map them, else
        through this server's shared memory."""
        cuda = cuda_device(device)
        self.remote = (evaluate.CudaIpcModel(self.sock, vocab_size, cuda) if cuda else
                       evaluate.SharedMemoryModel(self.sock, vocab_size, self.shm))
        self.remote.deadline = deadline  # for the whole evaluation, not per reply
        return self.remote, cuda or "cpu"

    def stop(self, kill):
        """Unmap its logits and kill its whole tree; returns once every process is gone."""
        try:
            if self.remote is not None:
                self.remote.close()
        finally:
            if self.proc.returncode is None:  # once: a reaped pid may be another process's by now
                kill(self.proc)
            self.sock.close()

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                text = f.read()[-65536:].decode("utf-8", "replace").strip()
        except OSError:
            return ""
        return f"--- {self.role} server ---\n{text}\n" if text else ""


def evaluate_frozen(scorer, prober, size, weights, rows, token_bytes, batch_size, rng, probes, deadline, between, kill,
                    stats, tolerance, timings):
    """val_bpb of the frozen model (its file's `size` bytes, and DeviceWeights or None): scored by
    `scorer`, then, once it and the candidate are gone (`between()`), its probes checked by
    `prober`. `timings` gets each phase's seconds."""
    V = len(token_bytes)
    plan = evaluate.plan_probes(rows, batch_size, rng, probes, V)
    t = time.time()
    served = scorer.load(size, deadline, weights and weights.offer())
    if weights:
        weights.free()  # the server holds its own copy now
    model, device = scorer.model(V, served, deadline)
    timings["scoring server loaded"] = time.time() - t
    with evaluate.beside_server(served):
        bpb, kept = evaluate.score(model, rows, token_bytes, batch_size, plan, device, timings)
    if getattr(model, "mappings", 0):
        timings[f"replies' memory mapped {model.mappings}x"] = model.mapping_seconds
    t = time.time()
    scorer.stop(kill)
    between()
    timings["scoring server and candidate gone"] = time.time() - t
    t = time.time()
    offer = weights and weights.for_probe()
    if weights:
        timings["probe copy uploaded"], t = time.time() - t, time.time()
    model, _ = prober.model(V, prober.load(size, deadline, offer), deadline)
    timings["probe server loaded"] = time.time() - t
    t = time.time()
    evaluate.check_probes(model, plan, kept, stats, tolerance)
    timings[f"{len(plan)} probe batches checked"] = time.time() - t
    return bpb


def cuda_device(name):
    """The CUDA device a server's logits live on, when this process can map them."""
    m = re.fullmatch(r"cuda:(\d+)", name) if isinstance(name, str) else None
    if not m:
        return None
    import torch
    return f"cuda:{m[1]}" if torch.cuda.is_available() and int(m[1]) < torch.cuda.device_count() else None
