"""Each way a candidate can cheat or break, run for real in the sandbox on CPU."""
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import prepare
from conftest import ROOT, uniform_bpb
from sandbox import run as sandbox

UNIGRAM = """
import os, sys, time, subprocess, socket
import numpy as np, torch
import prepare
data = prepare.load_data()
counts = np.bincount(np.asarray(data.train[:100000]), minlength=data.vocab_size) + 1
logp = torch.log(torch.tensor(counts / counts.sum(), dtype=torch.float32))
def unigram(x):
    return logp.expand(*x.shape, -1).contiguous()
"""
FAST = dict(startup=20, grace=5, evaluation=60)


def unigram_bpb(data):
    counts = np.bincount(np.asarray(data.train[:100000]), minlength=data.vocab_size) + 1
    logp = torch.log(torch.tensor(counts / counts.sum(), dtype=torch.float32))
    return prepare.evaluate_bpb(lambda x: logp.expand(*x.shape, -1).contiguous(), data, 32, "cpu")


@pytest.fixture
def run_candidate(stdlib_cache, stdlib_data, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_cache))

    def go(body, budget=2, limits=None, **kw):
        tree = tmp_path / f"tree{len(list(tmp_path.iterdir()))}"
        tree.mkdir()
        (tree / "train.py").write_text(UNIGRAM + textwrap.dedent(body))
        return sandbox.run(str(tree), budget=budget, data=stdlib_data, seed=0, limits=dict(FAST, **(limits or {})), **kw)
    return go


def no_process_with(marker):
    return subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout.strip() == b""


def test_honest_model_is_scored_by_the_harness(run_candidate, stdlib_data):
    r = run_candidate("prepare.hand_over(unigram, 8, 'cpu')")
    assert r.status == "ok" and r.violations == () and r.probe_max_diff == 0.0
    assert r.val_bpb == pytest.approx(unigram_bpb(stdlib_data), rel=1e-6)  # float32 reductions may sum in another order
    assert {"network-namespace", "pid-namespace", "ipc-namespace", "frozen-model"} <= set(r.isolation)
    assert r.hardware.backend == ("cuda" if torch.cuda.is_available() else "cpu")  # the machine's, whatever the model ran on
    assert r.hardware.data_fingerprint == stdlib_data.fingerprint


@pytest.mark.parametrize("batch", [7, 3])
def test_any_evaluation_batch_size_scores_the_same(run_candidate, stdlib_data, batch):
    """A last, partial batch is padded; its padding rows must not meet the targets (a node's own
    offline proposer once tried DEVICE_BATCH_SIZE 7 and took the harness down)."""
    r = run_candidate(f"prepare.hand_over(unigram, {batch}, 'cpu')")
    assert r.status == "ok" and r.val_bpb == pytest.approx(unigram_bpb(stdlib_data), rel=1e-6)


def test_the_figures_a_candidate_prints_are_read_without_trusting_their_form():
    assert sandbox._summary_value("num_steps:        103\nnum_steps: 104\n", "num_steps") == 104
    for text in ("num_steps: .", "num_steps: 1.2.3", "num_steps: " + "9" * 400, "num_steps: -5", "num_steps: 1e9"):
        assert sandbox._summary_value(text + "\n", "num_steps") is None, text


def test_a_printed_metric_counts_for_nothing(run_candidate, stdlib_data):
    r = run_candidate("""
        print("val_bpb:          0.000001")
        prepare.hand_over(unigram, 8, 'cpu')
    """)
    assert r.status == "ok" and r.val_bpb == pytest.approx(unigram_bpb(stdlib_data), rel=1e-6)  # float32 reductions may sum in another order
    assert r.val_bpb > 1


def test_peeking_at_the_next_token_is_caught(run_candidate):
    r = run_candidate("""
        def peek(x):  # predicts the next input token: perfect on real batches, not causal
            out = unigram(x).clone()
            out[:, :-1].scatter_(2, x[:, 1:, None], 30.0)
            return out
        prepare.hand_over(peek, 8, 'cpu')
    """)
    assert (r.status, r.violations, r.val_bpb) == ("violation", ("non_causal",), None)


def test_a_model_that_remembers_requests_cannot_answer_a_probe_as_its_twin(run_candidate):
    """A probe and its twin share a prefix. This model peeks at the next token, but answers a prefix
    it has answered before as it did then: served by one process it passed every probe (issue 3). Served
    by fresh processes, the one that answers the probes never saw the real rows."""
    r = run_candidate("""
        seen = []
        def remembers(x):
            following = torch.cat([x[:, 1:], x[:, -1:]], 1)
            for r, row in enumerate(x.tolist()):
                if seen:
                    known = np.array(seen)
                    same = (known == row).cumprod(1).sum(1)  # the common prefix with each row seen
                    k = int(same.argmax())
                    if 0 < same[k] < len(row):  # its last shared position answers as it did then
                        following[r, same[k] - 1] = int(known[k, same[k]])
                seen.append(row)
            out = unigram(x).clone()
            out[:, :-1].scatter_(2, following[:, :-1, None], 30.0)
            return out
        prepare.hand_over(remembers, 8, 'cpu')
    """)
    assert (r.status, r.violations, r.val_bpb) == ("violation", ("non_causal",), None)


@pytest.mark.parametrize("body, message", [
    ("""
        import threading
        lock = threading.Lock()
        def locked(x):
            with lock:
                return unigram(x)
        prepare.hand_over(locked, 8, 'cpu')
    """, "the model handed over cannot be pickled: model.lock: TypeError: cannot pickle '_thread.lock' object"),
    ("prepare.hand_over(unigram, 8, 'cpu')", "the frozen model is larger than the hand-over limit (4,096 bytes)"),
])
def test_a_model_that_cannot_be_handed_over_is_a_crash_that_says_why(run_candidate, body, message):
    r = run_candidate(body, limits=dict(model_bytes=4096) if "limit" in message else None)
    assert (r.status, r.violations) == ("crash", ()) and message in r.log_tail, r.log_tail


def test_the_harness_leaves_the_cores_to_a_cpu_server_while_it_scores_and_then_takes_them_back():
    from sandbox import evaluate
    threads = torch.get_num_threads()
    for served, inside in (("cpu", max(1, threads // 4)), ("mlx:cpu", max(1, threads // 4)), ("mps", threads),
                           ("cuda:0", threads)):
        with pytest.raises(KeyError):
            with evaluate.beside_server(served):
                assert torch.get_num_threads() == inside
                raise KeyError("a fault while scoring")
        assert torch.get_num_threads() == threads


def test_both_servers_load_the_same_sealed_bytes():
    """Once the harness seals the candidate's file, nothing changes it: not the candidate, still
    running, nor a server; a server refuses bytes that are not sealed, and a file the candidate
    keeps a writable mapping of, or cut short, cannot be sealed."""
    import mmap
    from model import serve
    from sandbox import servers
    source = servers.freeze_file(1 << 20)
    try:
        size, _ = serve.freeze(dict(framework="torch", fn=torch.nn.Linear(4, 2), device="cpu", ambient=serve.ambient()),
                            source, "torch")
        with pytest.raises(RuntimeError, match="not sealed"):
            serve.thaw(source, size)
        assert servers.seal(source, size) and os.fstat(source).st_size == size
        for change in (lambda: os.pwrite(source, b"rewritten after the hand-over", 0), lambda: os.ftruncate(source, 1),
                       lambda: os.ftruncate(source, size + 1)):
            with pytest.raises(PermissionError):
                change()
        assert isinstance(serve.thaw(source, size)["fn"], torch.nn.Linear)
    finally:
        os.close(source)
    for hold in ("mapping", "cut"):
        source = servers.freeze_file(1 << 20)
        try:
            size, _ = serve.freeze(dict(framework="torch", fn=torch.nn.Linear(4, 2), device="cpu", ambient=serve.ambient()),
                                source, "torch")
            if hold == "mapping":
                with mmap.mmap(source, 4096):  # writable and shared, as the candidate could keep it
                    assert not servers.seal(source, size)
            else:
                os.ftruncate(source, size - 1)
                assert not servers.seal(source, size)
        finally:
            os.close(source)


def test_tensors_that_shared_a_storage_share_it_once_thawed():
    """Tied weights and views of one storage are one storage again in the server (each its own
    copy would cost memory, and in-place updates through a view would reach nothing)."""
    from model import serve
    from sandbox import servers
    w = torch.randn(6, 4)
    payload = dict(framework="torch", fn=dict(empty=torch.empty(0), w=w, t=w.t(), row=w[1], raw=w.view(torch.uint8),
                                              other=torch.zeros(3)),  # an empty storage takes no room: w is at its offset
                   device="cpu", ambient=serve.ambient())
    fd = servers.freeze_file(1 << 20)
    try:
        size, _ = serve.freeze(payload, fd, "torch")
        assert servers.seal(fd, size)
        got = serve.thaw(fd, size)["fn"]
    finally:
        os.close(fd)
    storages = {k: v.untyped_storage()._cdata for k, v in got.items()}
    assert storages["w"] == storages["t"] == storages["row"] == storages["raw"] != storages["other"] != storages["empty"]
    assert torch.equal(got["t"], w.t()) and torch.equal(got["row"], w[1]) and got["raw"].dtype == torch.uint8
    got["w"][1, 0] = 42.0
    assert got["row"][0] == 42.0 and got["t"][0, 1] == 42.0


def test_the_ambient_state_of_the_hand_over_goes_with_the_model():
    """train.py hands over inside `with autocast:`; the servers must evaluate as it would have."""
    import contextlib
    from model import serve
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            state = serve.ambient()
        torch.set_float32_matmul_precision(before)
        with contextlib.ExitStack() as stack:
            serve.apply_ambient(state, stack)
            assert torch.get_float32_matmul_precision() == "medium"
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert not torch.is_autocast_enabled("cpu")
    finally:
        torch.set_float32_matmul_precision(before)


def test_training_past_the_budget_is_a_violation(run_candidate):
    r = run_candidate("""
        time.sleep(3)
        prepare.hand_over(unigram, 8, 'cpu')
    """, budget=1, limits=dict(startup=0.5, grace=20))
    assert (r.status, r.violations) == ("violation", ("over_budget",))


def test_a_run_that_hangs_is_killed_at_the_wall_limit(run_candidate):
    r = run_candidate("""
        subprocess.Popen(["sleep", "313.1"])
        time.sleep(10_000)
    """, budget=1, limits=dict(startup=1, grace=1))
    assert r.status == "timeout" and r.total_seconds < 15
    assert no_process_with("sleep 313.1")


def test_no_network(run_candidate):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    r = run_candidate(f"""
        socket.create_connection(("127.0.0.1", {port}), timeout=2)
        prepare.hand_over(unigram, 8, 'cpu')
    """)
    with pytest.raises(BlockingIOError):
        server.accept()  # nothing ever reached the server
    server.close()
    assert r.status == "crash"
    assert "ConnectionRefusedError" in r.log_tail or "unreachable" in r.log_tail


view = pytest.mark.skipif(sandbox.isolation()[0] != "view", reason="this machine allows no private filesystem view")


def test_isolation_is_probed_once_per_process_and_temp_names_carry_the_pid():
    assert sandbox.isolation() is sandbox.isolation()  # the probe starts a confined python: seconds, not per run
    assert sandbox.temp_prefix("candidate") == f"autoresearch-candidate-{os.getpid()}-"


@view
def test_the_validation_split_is_out_of_reach(run_candidate, stdlib_data):
    r = run_candidate(f"""
        folder = {stdlib_data.folder!r}
        print("listing:", sorted(os.listdir(folder)))
        for name in ("val.bin", "val_docs.npy"):
            try:
                open(os.path.join(folder, name), "rb").read(16)
                print("READ", name)
            except OSError as e:
                print("refused", name, type(e).__name__)
        prepare.hand_over(unigram, 8, 'cpu')
    """)
    assert r.status == "ok" and "READ" not in r.log_tail
    assert r.log_tail.count("refused") == 2 and "val.bin" not in r.log_tail.split("listing:")[1].splitlines()[0]
    assert r.val_bpb == pytest.approx(unigram_bpb(stdlib_data), rel=1e-6)


@view
def test_writes_outside_the_scratch_folder_fail(run_candidate, stdlib_data, tmp_path):
    outside = tmp_path / "outside.txt"
    targets = [os.path.join(ROOT, "model", "prepare.py"), os.path.join(stdlib_data.folder, "train.bin"), str(outside),
               os.path.join(os.path.dirname(stdlib_data.folder), "new.bin"), "/etc/escape", "/tmp/escape", "/escape"]
    before = {t: open(t, "rb").read() for t in targets[:2]}
    r = run_candidate(f"""
        for path in {targets!r}:
            try:
                with open(path, "ab") as f:
                    f.write(b"pwned")
                print("WROTE", path)
            except OSError as e:
                print("refused", type(e).__name__)
        with open("mine.txt", "w") as f:  # its own folder is writable
            f.write("ok")
        prepare.hand_over(unigram, 8, 'cpu')
    """)
    assert r.status == "ok" and "WROTE" not in r.log_tail and r.log_tail.count("refused") == len(targets)
    assert {t: open(t, "rb").read() for t in targets[:2]} == before and not outside.exists()
    assert not any(os.path.exists(p) for p in ("/etc/escape", "/tmp/escape", "/escape"))


@view
def test_no_secret_environment_no_other_processes_no_root(run_candidate, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-secret")
    r = run_candidate("""
        found = [k for k, v in os.environ.items() if "secret" in v]
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    found += [pid] if b"secret" in open(f"/proc/{pid}/environ", "rb").read() else []
                except OSError:
                    pass
        print("pids:", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), "me:", os.getpid(), "found:", found)
        print("allocator:", {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")})
        try:
            os.setuid(0)
            print("BECAME ROOT")
        except OSError:
            print("no root")
        prepare.hand_over(unigram, 8, 'cpu')
    """)
    assert r.status == "ok" and "found: []" in r.log_tail and "no root" in r.log_tail
    assert "pids: [1] me: 1" in r.log_tail  # nothing of the harness's side is visible
    # the harness's malloc settings (this run is on the CPU), and only those
    assert f"allocator: {dict(sandbox.ALLOCATOR_ENV, **sandbox.CPU_ALLOCATOR_ENV)}" in r.log_tail
    assert "user-nobody" in r.isolation or "no-capabilities" in r.isolation


@view
def test_the_servers_see_no_data_and_share_no_files(run_candidate, stdlib_data):
    """Each server has its own empty scratch folder: a note the scoring server leaves there is not
    in the probe server's, and neither can read the validation split."""
    r = run_candidate(f"""
        def nosy(x):
            if not os.path.exists("note"):
                with open("note", "w") as f:
                    f.write("seen")
                for name in ("val.bin", "train.bin"):
                    try:
                        open(os.path.join({stdlib_data.folder!r}, name), "rb")
                        print("READ", name)
                    except OSError as e:
                        print("refused", name, type(e).__name__)
            return unigram(x)
        prepare.hand_over(nosy, 8, 'cpu')
    """)
    assert r.status == "ok" and "READ" not in r.log_tail
    assert r.log_tail.count("refused val.bin") == r.log_tail.count("refused train.bin") == 2  # once per server


@view
def test_kernel_keyrings_are_refused(run_candidate):
    """Keyrings belong to a user, not to a namespace: processes running as the same user could leave
    each other notes there."""
    import platform
    from sandbox import confine
    if platform.machine() not in confine.KEYRING_CALLS:
        pytest.skip(f"no keyctl number for {platform.machine()}")
    keyctl = confine.KEYRING_CALLS[platform.machine()][1][2]
    r = run_candidate(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print("keyctl", libc.syscall({keyctl}, 0, -4, 0), ctypes.get_errno())  # the user keyring's id
        prepare.hand_over(unigram, 8, 'cpu')
    """)
    assert r.status == "ok" and "keyctl -1 1" in r.log_tail  # EPERM


@view
def test_nothing_a_candidate_writes_reaches_a_later_run(run_candidate, stdlib_cache):
    shared = stdlib_cache / "sandbox-compile"
    r = run_candidate("""
        for var in ("TORCHINDUCTOR_CACHE_DIR", "PYTHONPYCACHEPREFIX"):
            os.makedirs(os.environ[var], exist_ok=True)
            with open(os.path.join(os.environ[var], "trojan.py"), "w") as f:
                f.write("stolen validation rows")
        prepare.hand_over(unigram, 8, 'cpu')
    """)
    assert r.status == "ok", r.log_tail
    assert not [p for p in shared.rglob("trojan.py")]  # it wrote into its own copy, gone with it


@view
def test_what_a_kept_run_compiled_serves_later_runs_and_nothing_else(run_candidate, stdlib_cache, tmp_path):
    shared, kept = stdlib_cache / "sandbox-compile", tmp_path / "kept"
    write = """
        with open(os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "compiled-{0}.py"), "w") as f:
            f.write("kernels")
        os.makedirs(os.path.join(os.environ["PYTHONPYCACHEPREFIX"], "torch"), exist_ok=True)
        open(os.path.join(os.environ["PYTHONPYCACHEPREFIX"], "torch", "planted.pyc"), "w").close()
        {1}
    """
    r = run_candidate(write.format("a", "prepare.hand_over(unigram, 8, 'cpu')"), keep_layer=str(kept))
    assert r.status == "ok" and (kept / "compiled-a.py").read_text() == "kernels"
    assert not list(kept.rglob("planted.pyc"))  # library bytecode outlives its code: the harness compiles it
    r = run_candidate(write.format("b", "raise SystemExit(3)"), keep_layer=str(kept))
    assert r.status == "crash" and not (kept / "compiled-b.py").exists()  # a run that did not score keeps nothing
    r = run_candidate("""
        print("sees:", open(os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "compiled-a.py")).read())
        prepare.hand_over(unigram, 8, 'cpu')
    """, layers=[str(kept)])
    assert r.status == "ok" and "sees: kernels" in r.log_tail
    assert not list(shared.rglob("compiled-*.py"))  # the shared cache stays the trusted run's alone


@pytest.mark.parametrize("frame", [b"\0\0\0\x10{", b"\0\0\x0f\xa0" + b"[" * 4000])
def test_a_broken_hand_over_frame_is_a_violation_not_a_hang(run_candidate, frame):
    r = run_candidate(f"""
        sock = socket.socket(fileno=int(os.environ[prepare.HARNESS_ENV]))
        sock.sendall({frame!r})
        time.sleep(60)
    """)
    assert (r.status, r.violations) == ("violation", ("bad_handover",)) and r.total_seconds < 20


@pytest.mark.parametrize("weights", [{"handle": "00" * 64, "offset": 0, "bytes": 256}, {"handle": "zz"}, "all of them"])
def test_weights_offered_on_the_device_that_cannot_be_taken_are_a_violation(run_candidate, weights):
    """A model's weights come in a device buffer only where the harness asked for them (a CUDA
    run), in a well-formed offer of memory that maps; anything else is a broken hand-over."""
    r = run_candidate(f"""
        sock = socket.socket(fileno=int(os.environ[prepare.HARNESS_ENV]))
        prepare.send_frame(sock, {{"op": "ready", "batch_size": 8, "device": "cuda:0"}})
        size, _ = prepare._serve_module().freeze(dict(framework="torch", fn=unigram, device="cpu", ambient={{}}),
                                                int(os.environ[prepare.FREEZE_ENV]), "torch")
        prepare.send_frame(sock, {{"op": "model", "size": size, "weights": {weights!r}}})
        time.sleep(60)
    """)
    if torch.cuda.is_available() and isinstance(weights, dict) and "offset" in weights:  # asked for, well formed
        assert r.status == "crash" and r.violations[0].startswith("weights_not_taken: cuIpcOpenMemHandle failed")
    else:
        assert (r.status, r.violations) == ("violation", ("bad_handover",))
    assert r.total_seconds < 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_model_hands_its_weights_over_on_the_device(run_candidate, stdlib_data):
    """On CUDA the weights never pass through the host: the candidate copies them into one device
    buffer, the harness takes two copies of it over CUDA IPC (one per server) and the candidate
    frees its own; the score is the model's, as in process."""
    r = run_candidate("""
        class Unigram(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.logp = torch.nn.Parameter(logp.cuda())
                self.tied = self.logp  # one storage, however many names
            def forward(self, x):
                return (self.logp + 0 * self.tied).expand(*x.shape, -1).float().contiguous()
        prepare.hand_over(Unigram(), 8, 'cuda')
    """)
    assert r.status == "ok" and r.probe_max_diff == 0.0, r.log_tail
    assert " MB copied" in r.log_tail
    assert r.val_bpb == pytest.approx(unigram_bpb(stdlib_data), rel=1e-5)


def test_too_many_processes(run_candidate):
    r = run_candidate("""
        procs = [subprocess.Popen(["sleep", "314.1"]) for _ in range(100)]
        time.sleep(30)
    """, limits=dict(processes=20))
    assert (r.status, r.violations) == ("violation", ("too_many_processes",))
    assert no_process_with("sleep 314.1")


def test_filling_the_disk_is_stopped(run_candidate):
    r = run_candidate("""
        with open("big.bin", "wb") as f:
            for _ in range(64):
                f.write(b"x" * (1 << 20))
        prepare.hand_over(unigram, 8, 'cpu')
    """, limits=dict(file_bytes=4 << 20))
    assert (r.status, r.violations) == ("violation", ("file_too_large",))


def test_deleting_its_log_changes_nothing(run_candidate):
    r = run_candidate("""
        import shutil
        for name in os.listdir("."):
            if name != "train.py":
                shutil.rmtree(name) if os.path.isdir(name) else os.remove(name)
        prepare.hand_over(unigram, 8, 'cpu')
    """)
    assert r.status == "ok"


def test_exiting_without_a_model(run_candidate):
    r = run_candidate("print('done training, bye')")
    assert (r.status, r.violations) == ("crash", ("no_handover",))
    assert "done training, bye" in r.log_tail


def test_raising_during_evaluation_returns_the_traceback(run_candidate):
    r = run_candidate("""
        calls = []
        def flaky(x):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("shape mismatch in layer 3")
            return unigram(x)
        prepare.hand_over(flaky, 8, 'cpu')
    """)
    assert (r.status, r.violations) == ("crash", ("died_during_evaluation",))
    assert "Traceback" in r.log_tail and "shape mismatch in layer 3" in r.log_tail


@pytest.mark.parametrize("body,violation", [
    ("prepare.hand_over(lambda x: unigram(x) * float('nan'), 8, 'cpu')", "nan_logits"),
    ("prepare.hand_over(lambda x: unigram(x)[:, :-1], 8, 'cpu')", "bad_logits"),
    ("prepare.hand_over(lambda x: unigram(x)[..., :100], 8, 'cpu')", "bad_logits"),
])
def test_malformed_logits(run_candidate, body, violation):
    r = run_candidate(body)
    assert (r.status, r.violations) == ("violation", (violation,))


def test_scope_is_checked_before_anything_runs(stdlib_data, tmp_path):
    parent, tree = tmp_path / "parent", tmp_path / "tree"
    for d in (parent, tree):
        d.mkdir()
        (d / "train.py").write_text("raise SystemExit('must not run')\n")
        (d / "notes.txt").write_text("same\n")
    (tree / "notes.txt").write_text("changed\n")
    (tree / "big.bin").write_bytes(b"0" * 2_000_001)
    os.symlink("/etc/passwd", tree / "link")
    r = sandbox.run(str(tree), budget=1, parent=str(parent), data=stdlib_data)
    assert r.status == "violation" and r.total_seconds < 5
    assert set(r.violations) >= {"link: link", "file_too_large: big.bin", "outside_editable_file: notes.txt",
                                 "outside_editable_file: big.bin"}


def test_the_baseline_passes_every_check(stdlib_cache, stdlib_data, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_cache))
    r = sandbox.run(os.path.join(ROOT, "model"), budget=8, data=stdlib_data, seed=0)
    assert r.status == "ok", r.log_tail
    assert r.val_bpb < 0.9 * uniform_bpb(stdlib_data)
    assert r.num_steps and r.num_steps > 5
    assert r.tokens == r.num_steps * 8 * 256  # the cpu branch: 8 rows of the cpu profile's 256 tokens, to the token


def test_cli_json_and_exit_codes(stdlib_cache, tmp_path):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(stdlib_cache), AUTORESEARCH_PROFILE="cpu")
    bad = subprocess.run([sys.executable, "-m", "node", "experiment", str(tmp_path / "nope.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: no such file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "binary.py").write_bytes(b"\x93\xc9 not text")
    for path, message in (("empty", "no train.py in"), ("binary.py", "binary.py is not UTF-8 text")):
        bad = subprocess.run([sys.executable, "-m", "node", "experiment", str(tmp_path / path)], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr, bad.stderr
    (tmp_path / "train.py").write_text("print('no model')\n")
    r = subprocess.run([sys.executable, "-m", "node", "experiment", str(tmp_path / "train.py"), "--budget", "2", "--json"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    import json
    out = json.loads(r.stdout)
    assert out["status"] == "crash" and out["violations"] == ["no_handover"] and out["val_bpb"] is None


def test_torch_bytecode_is_compiled_once_by_the_trusted_side(tmp_path, monkeypatch):
    """Untrusted runs' own bytecode dies with them: the harness compiles the libraries' for them."""
    import importlib.util
    import torch._dynamo
    seen = []
    assert sandbox.warm_bytecode(str(tmp_path), "cpu", progress=seen.append)
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "pycache"))  # where a candidate looks
    assert os.path.exists(importlib.util.cache_from_source(torch._dynamo.__file__))
    assert seen == ["compiling torch's bytecode (once)"]
    assert not sandbox.warm_bytecode(str(tmp_path), "cpu", progress=seen.append) and len(seen) == 1
    kind, prefix, _ = sandbox.isolation()
    if kind == "view":  # confined as a trusted run: as the candidates' user, the cache its one writable folder
        confined = tmp_path / "confined"
        confined.mkdir()
        assert sandbox.warm_bytecode(str(confined), "cpu", (prefix, sandbox._candidate_uid(prefix)))
        monkeypatch.setattr(sys, "pycache_prefix", str(confined / "pycache"))
        assert os.path.exists(importlib.util.cache_from_source(torch._dynamo.__file__))
