"""Where a candidate's start goes on a GPU machine, in process and under the sandbox: time to
the first optimizer step and torch.compile's cache hits, for the cases a node meets (the
shipped baseline cold and warm; a candidate after the trusted baseline filled the shared
cache; an edit that keeps the graphs; one that changes them; a child of a kept candidate
that changed them, with what that run compiled kept).

    python3 bench/startup_diag.py [--budget 5] [--deadline 540]

Needs CUDA and prepared data (AUTORESEARCH_CACHE, AUTORESEARCH_PROFILE=gpu). Each case
runs a copy of model/train.py with a few timing lines added (imports done, setup done,
the compile counters); logs go to $OUT. Cases past --deadline seconds are skipped.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.environ.get("OUT", os.path.join(ROOT, "bench-out"))

DIAG_TAIL = '''
from torch._dynamo.utils import counters as _counters, compile_times as _compile_times
print("diag_counters: " + json.dumps({k: dict(_counters[k]) for k in ("inductor", "aot_autograd")}))
_names, _values = _compile_times(repr="csv", aggregate=True)
print("diag_compile_times: " + json.dumps(sorted(((float(v), n) for n, v in zip(_names, _values)), reverse=True)[:8]))
'''


def instrumented(src):
    """train.py with timing lines: after the imports and after the setup."""
    src = src.replace("import torch.nn as nn\n", "import torch.nn as nn\nprint(f'diag_t_import {time.time() - T_START:.2f}', flush=True)\n", 1)
    src = src.replace("x, y, epoch = next(loader)\n", "print(f'diag_t_setup {time.time() - T_START:.2f}', flush=True)\nx, y, epoch = next(loader)\n", 1)
    return "import json\n" + src + DIAG_TAIL


def fields(log):
    get = lambda key: (re.findall(rf"^{key}:?\s+([0-9.]+)", log, re.M) or [None])[-1]
    counters = re.findall(r"^diag_counters: (.*)$", log, re.M)
    c = json.loads(counters[-1]) if counters else {}
    ind, aot = c.get("inductor", {}), c.get("aot_autograd", {})
    times = re.findall(r"^diag_compile_times: (.*)$", log, re.M)
    return dict(compile=json.loads(times[-1]) if times else None, t_import=get("diag_t_import"), t_setup=get("diag_t_setup"), startup=get("startup_seconds"),
                eval=get("eval_seconds"), fx_hit=ind.get("fxgraph_cache_hit", 0), fx_miss=ind.get("fxgraph_cache_miss", 0),
                aot_hit=aot.get("autograd_cache_hit", 0), aot_miss=aot.get("autograd_cache_miss", 0))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=5)
    ap.add_argument("--deadline", type=float, default=540, help="skip cases that would start after this many seconds")
    ap.add_argument("--cases", default="ABDEFGLH", help="which cases, in order (letters as in the table)")
    args = ap.parse_args()
    from model import prepare
    from sandbox import run as sandbox
    os.makedirs(OUT, exist_ok=True)
    t0 = time.time()
    base = open(os.path.join(ROOT, "model", "train.py")).read()
    variants = {
        "baseline": base,
        "lr_edit": base.replace("MATRIX_LR = 0.04 ", "MATRIX_LR = 0.06 "),
        "depth_edit": base.replace("    DEPTH = 8 ", "    DEPTH = 9 "),
        "depth_lr_edit": base.replace("    DEPTH = 8 ", "    DEPTH = 9 ").replace("MATRIX_LR = 0.04 ", "MATRIX_LR = 0.06 "),
        "line_shift": base.replace("\ndef norm(x):", "\n# a comment line shifts every line below\ndef norm(x):"),
    }
    assert all(src != base for name, src in variants.items() if name != "baseline")
    trees = {}
    for name, src in variants.items():
        d = tempfile.mkdtemp(prefix=f"diag-{name}-")
        open(os.path.join(d, "train.py"), "w").write(instrumented(src))
        trees[name] = d
    cache = prepare.cache_dir()
    shared = os.path.join(cache, "sandbox-compile")
    kept = tempfile.mkdtemp(prefix="diag-kept-")
    rows = []

    def log_path(label):  # a repeated case keeps each run's log
        n = sum(r["case"] == label for r in rows)
        return os.path.join(OUT, f"{label}.log" if n == 0 else f"{label}-{n + 1}.log")

    def inprocess(label, tree, env=()):
        t = time.time()
        r = subprocess.run([sys.executable, os.path.join(tree, "train.py")], capture_output=True, text=True,
                           env=dict(os.environ, AUTORESEARCH_TIME_BUDGET=str(args.budget), PYTHONPATH=os.path.join(ROOT, "model"), **dict(env)))
        log = r.stdout + r.stderr
        open(log_path(label), "w").write(log)
        rows.append(dict(case=label, rc=r.returncode, wall=round(time.time() - t, 1), **fields(log)))

    def sandboxed(label, tree, trusted=False, **kw):
        t = time.time()
        res = sandbox.run(tree, budget=args.budget, trusted=trusted, **kw)
        open(log_path(label), "w").write(res.log_tail)
        phases = [line for line in res.log_tail.splitlines() if line.startswith("harness:")]
        rows.append(dict(case=label, rc=res.status + " " + ",".join(res.violations), wall=round(time.time() - t, 1),
                         harness_eval=res.evaluation_seconds, phases=phases[-1] if phases else None, **fields(res.log_tail)))

    everything = {
        "A": ("in-process cold", lambda: inprocess("A_inproc_cold", trees["baseline"])),
        "B": ("in-process warm", lambda: inprocess("B_inproc_warm", trees["baseline"])),
        "D": ("sandbox trusted (fills the shared cache)", lambda: (shutil.rmtree(shared, ignore_errors=True),
                                                                  sandboxed("D_sandbox_trusted_cold", trees["baseline"], trusted=True))),
        "E": ("sandbox after trusted", lambda: sandboxed("E_sandbox_after_trusted", trees["baseline"])),
        "F": ("sandbox lr edit", lambda: sandboxed("F_sandbox_lr_edit", trees["lr_edit"])),
        "G": ("sandbox depth edit", lambda: sandboxed("G_sandbox_depth_edit", trees["depth_edit"])),
        "L": ("sandbox comment line added", lambda: sandboxed("L_sandbox_line_shift", trees["line_shift"])),
        "K": ("sandbox depth edit, what it compiled kept", lambda: sandboxed("K_sandbox_depth_kept", trees["depth_edit"],
                                                                           keep_layer=kept)),
        "M": ("sandbox lr edit on top of the kept depth edit", lambda: sandboxed("M_sandbox_child_of_kept",
                                                                                trees["depth_lr_edit"], layers=[kept])),
        "H": ("in-process other HOME", lambda: inprocess("H_inproc_home", trees["baseline"], {"HOME": tempfile.mkdtemp()})),
    }
    cases = [(f"{k} {everything[k][0]}", everything[k][1]) for k in args.cases]
    for label, fn in cases:
        if time.time() - t0 > args.deadline:
            rows.append(dict(case=label, rc="skipped (deadline)"))
            continue
        print(f"[{time.time() - t0:.0f}s] {label}", flush=True)
        fn()
        print("   ", rows[-1], flush=True)
    keys = ["case", "rc", "wall", "t_import", "t_setup", "startup", "eval", "harness_eval", "fx_hit", "fx_miss", "aot_hit", "aot_miss"]
    for r in rows:
        if r.get("compile"):
            print(r["case"], "compile times (s):", r["compile"])
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    json.dump(rows, open(os.path.join(OUT, "startup_diag.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
