"""Run one candidate tree: a scratch copy, confined, under the budget and a hard wall
limit; the harness evaluates the model the candidate hands over and returns a Result."""

import ctypes
import functools
import glob
import hashlib
import json
import os
import re
import resource
import select
import shutil
import signal
import stat
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from model import prepare, serve
from sandbox import backend as backends, evaluate, scope, servers
from sandbox.result import HardwareTag, Result

# Seconds beyond the training budget: `startup` to start (imports, compilation); a hand-over
# later than budget + startup is over budget, and none by `grace` seconds more is a timeout;
# then `evaluation` seconds to serve the validation batches. Sizes bound the candidate.
# `probe_rows`: rows checked for causality, each at its own random cut, in whole probe
# batches of the candidate's batch size (each batch one more forward pass); a logit before
# the cut may move by `probe_tolerance`. Honest baselines move them by exactly 0 on an H100
# (1216 probe rows, 4 runs) and on an H200; on this CPU mostly by 0 too, but in 2 of 7 node
# runs by 1.2e-4 (the probe server is a fresh process: float32 kernels may take another path
# there), so the CPU allows 1e-3. A one-token look-ahead moved every row by >= 0.28. A leak
# of tau per logit can buy up to ~0.84 tau bpb, so tau stays far below the noise (the CPU
# profile's noise floor is 0.002).
# `model_bytes`: the most a frozen model (code and weights) may take.
LIMITS = {
    "gpu": dict(startup=120, grace=30, evaluation=180, processes=64, file_bytes=4 << 30, probe_rows=64, probe_tolerance=1e-4,
                model_bytes=4 << 30),
    "cpu": dict(startup=30, grace=10, evaluation=120, processes=64, file_bytes=4 << 30, probe_rows=16, probe_tolerance=1e-3,
                model_bytes=1 << 30),
}
LIMITS["tiny"] = LIMITS["cpu"]
LOG_TAIL_LINES = 40
MODEL_DIR = os.path.dirname(os.path.abspath(prepare.__file__))


BASE_ISOLATION = ("process-group", "parent-death-signal", "rlimits", "scrubbed-environment", "scratch-copy")
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/sys")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
CONFINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "confine.py")
SERVE = os.path.join(MODEL_DIR, "serve.py")
# How the model was evaluated: frozen at the hand-over and served by fresh processes (every
# run); the probe server shares no namespace or writable storage with the scoring server
# (only where each has its own filesystem view; elsewhere they share the node user's files).
FROZEN, ISOLATED_PROBES = ("frozen-model",), ("isolated-probe-server",)


def temp_prefix(kind):
    """A temp name's prefix that carries this process's pid, so that sweep() can tell a dead node's
    leftovers from a live one's."""
    return f"autoresearch-{kind}-{os.getpid()}-"


def sweep(folder=None):
    """Remove what runs of dead processes left in the temp folder: a node killed with kill -9 cannot
    clean up, and a candidate's scratch folder may hold a copy of the compile cache. Returns how many."""
    folder = folder or tempfile.gettempdir()
    removed = 0
    for name in os.listdir(folder):
        m = re.fullmatch(r"autoresearch-(?:node|candidate|server|log|root|probe)-(\d+)-\w+", name)
        if not m or _alive(int(m.group(1))):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed += 1
        except OSError:  # another user's, or going away meanwhile
            pass
    return removed


@functools.cache
def isolation():
    """The strongest confinement this machine allows: (kind, command prefix, names).
    "view": own mount, pid, network and IPC namespaces, a filesystem showing only the
    system, the training split and the scratch folder, no privileges, no kernel
    keyrings; "namespaces": own pid, network and IPC namespaces only; "none"."""
    if not (sys.platform.startswith("linux") and shutil.which("unshare")):
        return "none", [], BASE_ISOLATION
    users = [[], ["--user", "--map-root-user"]] if os.geteuid() == 0 else [["--user", "--map-root-user"]]
    for user in users:
        prefix = ["unshare", *user, "--mount", "--pid", "--net", "--ipc", "--fork", "--kill-child=SIGKILL", "--propagation",
                  "private"]
        who = "user-nobody" if not user else "no-capabilities"
        with tempfile.TemporaryDirectory(prefix=temp_prefix("probe")) as tmp:
            root, scratch = os.path.join(tmp, "root"), os.path.join(tmp, "scratch")
            os.mkdir(root), os.mkdir(scratch)
            if _works(_view_command(prefix, root, scratch, [sys.executable, "-c", "import numpy, torch"], _candidate_uid(prefix), [])):
                return "view", prefix, BASE_ISOLATION + ("network-namespace", "pid-namespace", "ipc-namespace",
                                                         "mount-namespace", "validation-hidden", "read-only-outside-scratch",
                                                         "no-keyrings", who)
    for user in users:
        prefix = ["unshare", *user, "--net", "--pid", "--ipc", "--fork", "--mount-proc", "--kill-child=SIGKILL"]
        if _works([*prefix, "true"]):
            return "namespaces", prefix, BASE_ISOLATION + ("network-namespace", "pid-namespace", "ipc-namespace")
    return "none", [], BASE_ISOLATION


def _works(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _candidate_uid(prefix):
    """nobody when the harness is really root; else the namespace's root without capabilities."""
    if "--user" in prefix:
        return None
    try:
        import pwd
        return pwd.getpwnam("nobody").pw_uid
    except (ImportError, KeyError):
        return 65534


def _python_dirs():
    """What the interpreter and its packages need, besides the system folders."""
    import site
    import sysconfig
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
            site.getusersitepackages(), *site.getsitepackages(), *sysconfig.get_paths().values()}
    for mod in (np, __import__("torch")):
        dirs.add(os.path.dirname(os.path.dirname(os.path.realpath(mod.__file__))))
    return sorted(d for d in dirs if d and os.path.isdir(d) and os.path.realpath(d) != "/")


def _view_command(prefix, root, scratch, argv, uid, shown, writable=(), hidden=(), overlays=()):
    """The command that runs argv inside the confined view (see confine.py), built on
    the empty folder `root`."""
    spec = dict(root=root, ro=[*SYSTEM_DIRS, *_python_dirs(), MODEL_DIR, *shown],
                rw=[scratch, *writable], overlays=[list(o) for o in overlays], hide=list(hidden), uid=uid, cwd=scratch,
                argv=argv, shm_bytes=1 << 30,
                devices=[*DEVICES, *sorted(glob.glob("/dev/nvidia*")), *sorted(glob.glob("/dev/dri"))])
    if uid is not None:
        for path in (scratch, *writable):
            _chown_tree(path, uid)
    return [*prefix, sys.executable, "-I", CONFINE, json.dumps(spec)]


def _chown_tree(path, uid):
    if os.stat(path).st_uid == uid:
        return
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, uid, uid)


def _confine(limits):
    """In the child before exec: own session, die with the harness, bounded files."""
    def confine():
        os.setsid()
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"] * 4,) * 2)  # root ignores it: the tree is counted too
    return confine


def _exit_status(proc, log_path):
    """Status and violations of a candidate that exited before it was done. Python turns
    the file-size limit into OSError 27 rather than SIGXFSZ; a candidate that fakes that
    message only gives itself a violation."""
    code = proc.returncode
    with open(log_path, "rb") as f:
        f.seek(max(0, os.path.getsize(log_path) - 8192))
        tail = f.read()
    if code in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or (code and b"[Errno 27] File too large" in tail):
        return "violation", ["file_too_large"]
    return "crash", [] if code else ["no_handover"]


def _descendants(pid):
    """Processes under pid (Linux /proc children lists); [] where unavailable."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
                out += kids
                todo += kids
        except (OSError, ValueError):
            pass
    return out


def _peak_mb(pids):
    """Sum of the peak resident sizes (VmHWM) of these processes."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
        except (OSError, ValueError):
            pass
    return total / 1024


# What a torch candidate imports, its first step's imports on demand included (torch._dynamo:
# over half of the baseline's start on this CPU when compiled from source); CUDA adds inductor.
WARM_MODULES = ("numpy", "torch", "torch.nn.functional", "torch._dynamo", "torch._dynamo.aot_compile",
                "torch.nn.attention.flex_attention", "prepare")
WARM_MODULES_CUDA = ("torch._inductor.compile_fx",)
# Imports each module it is given (one missing from this torch is skipped), then writes the marker.
WARM_CODE = """import importlib, os, sys
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except Exception:
        pass
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
open(sys.argv[1], "w").close()
"""


def warm_bytecode(compiled, backend, view=None, progress=None):
    """Compile the library modules every torch candidate imports into the shared cache's
    pycache, once per Python, torch and module list. A candidate's own bytecode dies with its
    overlay, so without this every untrusted run compiled some 2000 of torch's modules again
    (startup 8.7 s -> 3.7 s on this 2-core CPU). With `view`, (prefix, uid) of the confined
    view, it runs there as a trusted run does: as the candidates' user, the cache its one
    writable folder; else as this process. Returns whether it spent time; it never raises
    for a failure, which costs only the time (it is a cache)."""
    from importlib import metadata
    modules = WARM_MODULES + (WARM_MODULES_CUDA if backend == "cuda" else ())
    try:
        key = f"{sys.version}|{metadata.version('torch')}|{modules}"
    except metadata.PackageNotFoundError:
        return False
    pycache = os.path.join(compiled, "pycache")
    marker = os.path.join(pycache, ".warm-" + hashlib.sha256(key.encode()).hexdigest()[:16])
    if backend == "mlx" or os.path.exists(marker):
        return False
    if progress:
        progress("compiling torch's bytecode (once)")
    scratch, root = tempfile.mkdtemp(prefix=temp_prefix("warm")), tempfile.mkdtemp(prefix=temp_prefix("root"))
    command = [sys.executable, "-c", WARM_CODE, marker, *modules]
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL") if k in os.environ}
    try:
        if view:
            command = _view_command(view[0], root, scratch, command, view[1], [], [compiled])
        subprocess.run(command, cwd=scratch, stdin=subprocess.DEVNULL, capture_output=True, timeout=600,
                       preexec_fn=_confine(LIMITS["cpu"]), env=dict(env, HOME=scratch, TMPDIR=scratch, PYTHONPATH=MODEL_DIR,
                                                                    CUDA_VISIBLE_DEVICES="", PYTHONPYCACHEPREFIX=pycache))
    except (OSError, subprocess.SubprocessError):
        pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    return True


# what passes from the node's environment to a candidate and its servers; nothing else does
KEPT_ENV = ("PATH", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "CUDA_MODULE_LOADING")
# glibc's malloc by default hands freed blocks back to the system and maps large ones afresh, so
# torch's CPU tensors fault their pages in again every step (1.5 M page faults in 30 s of training
# on a 2-core machine): blocks up to 32 MiB (glibc's largest threshold) come from the heap and
# the heap is never trimmed. 8 % more steps in 30 s on that CPU (bench/cpu_alloc.py).
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)} \
    if sys.platform.startswith("linux") else {}
# On the CPU backend, no mapped blocks at all: an evaluation's logits (67 MB a batch on the cpu
# profile) are over any threshold, so a server mapped and faulted them in afresh for every batch;
# from the heap they are reused. The harness's evaluation took 4.98 s instead of 5.68 s, less in
# each of five alternating pairs (bench/RESULTS.md). Not on CUDA, where it is unmeasured.
CPU_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0"} if ALLOCATOR_ENV else {}


def _base_env(scratch, backend):
    """What a candidate's environment and its servers' share: the kept variables, the allocator's
    settings, the backend's, and their own folder as home."""
    keep = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
    return dict(keep, **ALLOCATOR_ENV, **(CPU_ALLOCATOR_ENV if backend == "cpu" else {}), **backends.environment(backend),
                HOME=scratch, TMPDIR=scratch, PYTHONPATH=MODEL_DIR,
                PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")


def _scrubbed_env(scratch, fd, data, profile, budget, compiled, backend):
    return dict(_base_env(scratch, backend), TORCHINDUCTOR_CACHE_DIR=compiled, TRITON_CACHE_DIR=os.path.join(compiled, "triton"),
                PYTHONPYCACHEPREFIX=os.path.join(compiled, "pycache"),
                AUTORESEARCH_CACHE=prepare.cache_dir(), AUTORESEARCH_DATA=data.fingerprint,
                AUTORESEARCH_PROFILE=profile, AUTORESEARCH_TIME_BUDGET=str(budget), **{prepare.HARNESS_ENV: str(fd)})


def _server_env(scratch, fds, profile, budget, backend):
    return dict(_base_env(scratch, backend), AUTORESEARCH_CACHE=scratch, AUTORESEARCH_PROFILE=profile,
                AUTORESEARCH_TIME_BUDGET=str(budget), TORCHINDUCTOR_CACHE_DIR=os.path.join(scratch, ".compile"), **fds)


def _start_server(role, kind, prefix, limits, model_fd, shm_bytes, profile, budget, backend, hidden):
    """One of the two fresh processes that will serve the frozen model (servers.py), confined
    like a candidate but in a view of its own: the system, Python and model/, read-only, and
    an empty scratch folder; no data at all."""
    scratch, root = tempfile.mkdtemp(prefix=temp_prefix("server")), tempfile.mkdtemp(prefix=temp_prefix("root"))
    log_fd, log_path = tempfile.mkstemp(prefix=temp_prefix("log"))
    ours, theirs = socket.socketpair()
    shm_fd, shm = servers.shared_memory(shm_bytes)
    argv = [sys.executable, SERVE, "mlx" if backend == "mlx" else "torch"]
    command = (_view_command(prefix, root, scratch, argv, _candidate_uid(prefix), [], (), hidden) if kind == "view"
               else [*prefix, *argv])
    fds = {serve.SOCKET_ENV: str(theirs.fileno()), serve.MODEL_ENV: str(model_fd), prepare.SHARED_ENV: f"{shm_fd}:{len(shm)}"}
    try:
        proc = subprocess.Popen(command, cwd=scratch, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
                                pass_fds=[theirs.fileno(), model_fd, shm_fd], env=_server_env(scratch, fds, profile, budget, backend),
                                # threads count too, for the user it shares with the candidate: room for its own pool
                                preexec_fn=_confine(dict(limits, processes=limits["processes"] + (os.cpu_count() or 1))))
    finally:
        os.close(log_fd), os.close(shm_fd), theirs.close()
    return servers.Server(role, proc, ours, shm, log_path, (scratch, root))


def _summary_value(log, key):
    """The last `key:` line's number as the candidate printed it; None for none, or for a malformed
    or absurd one ("." or a thousand digits: what the candidate prints must not make this raise)."""
    m = re.findall(rf"^{key}:\s+(\d{{1,15}}(?:\.\d{{0,12}})?)\s*$", log, re.M)
    return float(m[-1]) if m else None


def run(candidate, budget=None, profile=None, parent=None, data=None, seed=None, probes=None, limits=None, hide=(),
        progress=None, trusted=False, backend=None, layers=(), keep_layer=None):
    """Run the tree at `candidate` (a folder with train.py); never raises for what
    the candidate does. `limits` overrides entries of the profile's LIMITS; `hide`
    names more paths the candidate must not see (the node's home); `progress` is
    called as progress(phase, seconds elapsed, budget seconds left) while it runs;
    `trusted` (the shipped baseline only) lets the run write the shared compile cache;
    `layers` are compile caches shown above the shared one (what runs of the node's kept
    candidates compiled), and `keep_layer` a folder that receives what this run compiled
    when it scored (only with the private view: see merge_layer);
    `backend` (auto | cuda | mps | cpu | mlx, see sandbox.backend; default: torch's own
    choice, as train.py makes it) names what the candidate runs on: an MLX candidate
    (train_mlx.py) hands over through prepare.hand_over_mlx and is evaluated here
    exactly as a torch one on the CPU."""
    t0 = time.time()
    profile = profile or prepare.PROFILE
    budget = float(budget if budget is not None else prepare.TIME_BUDGET)
    data = data or prepare.load_data()
    limits = dict(LIMITS[profile], **(limits or {}))
    kind, prefix, confinement = isolation()
    confinement += FROZEN + (ISOLATED_PROBES if kind == "view" else ())
    hardware = HardwareTag.detect(budget, profile, data.fingerprint, backend)

    stats = {}

    def result(status, violations=(), val_bpb=None, handover=None, log="", rss=0.0, evaluated=None):
        steps, tokens_m = _summary_value(log, "num_steps"), _summary_value(log, "total_tokens_M")
        return Result(status=status, val_bpb=val_bpb, training_seconds=round(handover if handover else time.time() - t0, 2),
                      total_seconds=round(time.time() - t0, 2), peak_memory_mb=round(rss, 1),
                      evaluation_seconds=round(evaluated - handover, 2) if evaluated else None,
                      num_steps=int(steps) if steps is not None else None,
                      tokens=round(tokens_m * 1e6) if tokens_m is not None else None, violations=tuple(violations),
                      probe_max_diff=stats.get("probe_max_diff"),
                      hardware=hardware, isolation=confinement, log_tail="\n".join(log.splitlines()[-LOG_TAIL_LINES:]))

    problems = scope.check_tree(candidate, parent)
    if problems:
        return result("violation", problems)
    # Compile caches. A trusted run (the shipped baseline) fills the shared one; any other run
    # sees it at the same path (compiled code records absolute paths: a copy elsewhere misses,
    # or writes back to the original) through an overlay whose upper layer dies with the run,
    # so nothing it writes reaches a later run. Without the view there is no such protection.
    compiled = os.path.join(prepare.cache_dir(), "sandbox-compile")
    os.makedirs(compiled, exist_ok=True)
    if not trusted:  # a trusted run writes its own bytecode there
        view = (prefix, _candidate_uid(prefix)) if kind == "view" else None
        if warm_bytecode(compiled, hardware.backend, view, progress and (lambda phase: progress(phase, 0, budget))):
            t0 = time.time()  # a one-off cost of this cache, not of the candidate: its clocks start now
    scratch = tempfile.mkdtemp(prefix=temp_prefix("candidate"))
    shutil.copy(os.path.join(candidate, scope.EDITABLE), os.path.join(scratch, scope.EDITABLE))
    ours, theirs = socket.socketpair()
    model_fd = servers.freeze_file(min(limits["model_bytes"], limits["file_bytes"]))  # the candidate freezes its model here
    log_fd, log_path = tempfile.mkstemp(prefix=temp_prefix("log"))  # outside the candidate's folder
    os.close(log_fd)
    argv = [sys.executable, scope.EDITABLE]
    root = tempfile.mkdtemp(prefix=temp_prefix("root"))
    layer_dir = tempfile.mkdtemp(prefix=temp_prefix("candidate"))  # the overlay's layer: outside the view
    upper = os.path.join(layer_dir, "upper")
    secret = [os.path.join(data.folder, n) for n in prepare.DATA_FILES if n not in prepare.TRAIN_FILES]
    hidden = [*secret, log_path, *map(os.path.abspath, hide)]
    if kind == "view":
        lower = ":".join([*(p for p in layers if os.path.isdir(p) and ":" not in p and os.listdir(p)), compiled])
        layer = [] if trusted else [(lower, upper, os.path.join(layer_dir, "work"), compiled)]
        command = _view_command(prefix, root, scratch, argv, _candidate_uid(prefix),
                                [os.path.join(data.folder, n) for n in prepare.TRAIN_FILES], [compiled] if trusted else [],
                                hidden, layer)
    else:
        command = [*prefix, *argv]
    deadline = budget + limits["startup"]  # for the hand-over
    hard_limit = deadline + limits["grace"] + limits["evaluation"]
    status, violations, val_bpb, handover, ready, size, evaluated, rss = None, [], None, None, None, None, None, 0.0
    takes_weights, weights = hardware.backend == "cuda", None  # a CUDA model's weights come over CUDA IPC
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, cwd=scratch, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                pass_fds=[theirs.fileno(), model_fd], env=dict(
                                    _scrubbed_env(scratch, theirs.fileno(), data, profile, budget, compiled, hardware.backend),
                                    **{prepare.FREEZE_ENV: str(model_fd)}, **({prepare.WEIGHTS_ENV: "1"} if takes_weights else {})),
                                preexec_fn=_confine(limits))
    theirs.close()
    pair, timings = [], {}
    try:
        # while the candidate starts: the servers of its model-to-be, and what the evaluation needs
        shm_bytes = _batch_size(profile, data, shared=False) * prepare.PROFILES[profile]["max_seq_len"] * data.vocab_size * 4
        for role in ("scoring", "probe"):
            pair.append(_start_server(role, kind, prefix, limits, model_fd, shm_bytes, profile, budget, hardware.backend, hidden))
        rows = prepare.eval_rows(data.val, data.val_docs, prepare.PROFILES[profile]["max_seq_len"],
                                 prepare.PROFILES[profile]["eval_tokens"])
        _warm_cuda(hardware, data.vocab_size)
        # training: wait for the hand-over (ready, then the frozen model), watching the process tree and the clock
        while status is None and size is None:
            readable, _, _ = select.select([ours], [], [], 0.2)
            if progress:
                progress("training", time.time() - t0, deadline - (time.time() - t0))
            tree = _descendants(proc.pid)
            rss = max(rss, _peak_mb([proc.pid, *tree]))
            if readable:
                ours.settimeout(2.0)  # a frame begun must finish: a stalled one is a broken protocol
                try:
                    header, _ = prepare.recv_frame(ours, 0)
                except (ValueError, EOFError, OSError):
                    header = None
                op = header.get("op") if header is not None else None
                if op == "ready" and handover is None:
                    handover, ready = time.time() - t0, header
                    if handover > deadline:
                        status, violations = "violation", ["over_budget"]
                elif op == "model" and handover is not None:
                    timings["model frozen"] = time.time() - t0 - handover  # the candidate's side: pickled, weights exported
                    size = header.get("size")
                    if type(size) is not int or not 0 < size <= os.fstat(model_fd).st_size:
                        status, violations = "violation", ["bad_handover"]
                    elif "weights" in header:
                        t = time.time()
                        weights, status, violations = _take_weights(header["weights"] if takes_weights else None, ready,
                                                                    min(limits["model_bytes"], limits["file_bytes"]) - size, ours)
                        if weights is not None:
                            timings[f"weights of {weights.nbytes / 1e6:.2f} MB copied"] = time.time() - t
                else:  # a closed or garbled channel: it exited, or it broke the protocol
                    try:
                        proc.wait(timeout=2)
                        status, violations = _exit_status(proc, log_path)
                    except subprocess.TimeoutExpired:
                        status, violations = "violation", ["bad_handover"]
            elif proc.poll() is not None and not select.select([ours], [], [], 0)[0]:  # what it sent before it exited first
                status, violations = _exit_status(proc, log_path)
            elif len(tree) > limits["processes"]:
                status, violations = "violation", ["too_many_processes"]
            elif time.time() - t0 > (deadline + limits["grace"] if handover is None else hard_limit):
                status = "timeout"
        if status is None:  # evaluation, driven from here
            if progress:
                progress("evaluating", time.time() - t0, 0)
            try:
                t = time.time()
                if not servers.seal(model_fd, size):
                    raise evaluate.ModelError("bad_handover")
                timings[f"model of {size / 1e6:.2f} MB sealed"] = time.time() - t
                batch = _eval_batch(ready, profile, data)
                val_bpb = servers.evaluate_frozen(
                    *pair, size, weights, rows, data.token_bytes, batch, np.random.default_rng(seed),
                    -(-limits["probe_rows"] // batch) if probes is None else probes, t0 + hard_limit,
                    lambda: _kill(proc), _kill, stats, limits["probe_tolerance"], timings)
                status, evaluated = "ok", time.time() - t0
            except servers.LoadError:
                status, violations = "crash", ["model_load_failed"]
            except evaluate.ModelError as e:
                status, violations = "violation", [str(e)]
            except socket.timeout:
                status = "timeout"
            except (EOFError, OSError):
                status, violations = "crash", ["died_during_evaluation"]
            except RuntimeError:  # CUDA refused what a server's buffer turned into
                status, violations = "crash", ["evaluation_error"]
            except Exception as e:  # noqa: BLE001 -- a fault of ours on this candidate's replies: no score, node lives
                status, violations = "crash", [f"harness_error: {type(e).__name__}: {e}"[:200]]
    finally:
        rss = max(rss, _peak_mb([proc.pid, *_descendants(proc.pid)]))
        _kill(proc)
        for server in pair:
            try:
                server.stop(_kill)
            except RuntimeError:  # unmapping a dead server's buffer
                pass
        if weights is not None:
            try:
                weights.free()
            except RuntimeError:  # a CUDA context gone bad: what it held goes with it
                pass
        ours.close()
        os.close(model_fd)
        with open(log_path, "rb") as f:
            log = f.read()[-65536:].decode("utf-8", "replace")
        log += "".join(server.log() for server in pair)
        if timings:
            log += "harness: " + " | ".join(f"{k} {v:.2f}s" for k, v in timings.items()) + "\n"
        for path in [log_path, *(server.log_path for server in pair)]:
            os.remove(path)
        for folder in [scratch, *(server.paths[0] for server in pair)]:
            shutil.rmtree(folder, ignore_errors=True)
        if keep_layer and status == "ok" and kind == "view" and not trusted and os.path.isdir(upper):
            merge_layer(upper, keep_layer)
        _remove(layer_dir)
        for folder in [root, *(server.paths[1] for server in pair)]:
            os.rmdir(folder)
    return result(status, violations, val_bpb if status == "ok" else None, handover, log, rss, evaluated)


def merge_layer(src, dst):
    """Move what an overlay's upper layer `src` holds into the folder `dst`, owners kept, the
    overlay's deletion marks left out. A run's compiled code may serve later runs only because
    its training process never sees a validation input (the model is frozen at the hand-over
    and scored by other processes), and because a kept candidate's code runs in every later
    candidate anyway. Its `pycache` is left out: a library module's bytecode would outlive the
    code that wrote it, and the harness compiles the libraries' itself (warm_bytecode)."""
    for dirpath, dirnames, filenames in os.walk(src):
        if dirpath == src and "pycache" in dirnames:  # library bytecode: the harness's own (warm_bytecode), never a run's
            dirnames.remove("pycache")
        target = os.path.join(dst, os.path.relpath(dirpath, src))
        os.makedirs(target, exist_ok=True)
        st = os.lstat(dirpath)
        os.chown(target, st.st_uid, st.st_gid)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not stat.S_ISREG(os.lstat(path).st_mode) and not os.path.islink(path):  # whiteouts: char devices
                continue
            try:
                os.replace(path, os.path.join(target, name))
            except OSError:  # another filesystem
                shutil.copy2(path, os.path.join(target, name), follow_symlinks=False)
                st = os.lstat(path)
                os.lchown(os.path.join(target, name), st.st_uid, st.st_gid)


def _remove(path):
    """rmtree that also clears what the kernel left unreadable (an overlay's work folder)."""
    def unlock(fn, p, exc):
        os.chmod(os.path.dirname(p), 0o700)
        os.chmod(p, 0o700) if os.path.isdir(p) and not os.path.islink(p) else None
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    try:
        shutil.rmtree(path, onerror=unlock)
    except OSError:
        pass


def _batch_size(profile, data, shared):
    """Rows per evaluation call (prepare.eval_batch_cap)."""
    return prepare.eval_batch_cap(prepare.PROFILES[profile]["max_seq_len"], data.vocab_size, shared)


def _warm_cuda(hardware, vocab_size):
    """Create this process's CUDA context now (about a second) and load the kernels the
    evaluation uses, not when evaluation starts."""
    if hardware.backend == "cuda":
        evaluate.warm("cuda", vocab_size)


def _eval_batch(ready, profile, data):
    """Rows per evaluation call: what the candidate evaluates in-process with, within the cap."""
    asked = ready.get("batch_size") if type(ready.get("batch_size")) is int else 1 << 30
    return max(1, min(asked, _batch_size(profile, data, bool(servers.cuda_device(ready.get("device"))))))


def _take_weights(offer, ready, limit, sock):
    """(DeviceWeights, status, violations) for the device buffer of weights a candidate offers
    with its frozen model (at most `limit` bytes: what its file left of the hand-over limit),
    then tell it that it may free its own. A malformed offer, or one not asked for (`offer`
    None), is a broken hand-over; one that CUDA cannot map or copy here is a crash."""
    weights, status, violations = None, None, []
    try:
        if offer is None:
            raise evaluate.ModelError("bad_handover")
        weights = servers.DeviceWeights(offer, ready.get("device"), limit)
    except evaluate.ModelError:
        status, violations = "violation", ["bad_handover"]
    except RuntimeError as e:
        status, violations = "crash", [f"weights_not_taken: {e}"[:200]]
    try:
        prepare.send_frame(sock, {"op": "copied"})
    except OSError:
        pass
    return weights, status, violations


def _kill(proc, patience=10.0):
    """Kill the candidate's whole tree and return only once every member is gone:
    killing a namespace's first process ends the others asynchronously, and a member
    that left the process group is reached by its pid."""
    tree = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.kill()
    proc.wait()
    end = time.time() + patience
    while time.time() < end and any(_alive(pid) for pid in tree):
        time.sleep(0.02)


def _alive(pid):
    """Running or stopped; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
