"""One-step edits of the baseline on this machine, each run in the sandbox, beside repeated
baselines: how large the offline proposer's first steps are against the run-to-run noise.

    python bench/cpu_screen.py [--budget 30] [--baselines 3] [--edits MATRIX_LR:up,DEPTH:down,...]
                               [--set NAME=VALUE ...] [--file model/train.py]

Uses the current prepared data (`python -m node prepare`; $AUTORESEARCH_CACHE picks the cache).
Baselines are spread among the edits (first, middle, last) so that a drift in the machine's
speed shows in them. Prints one row per run: edit, val_bpb, optimizer steps, and the edit's
difference from the baselines' mean in units of their standard deviation.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from node import proposer  # noqa: E402

DEFAULT_EDITS = ("MATRIX_LR:up,MATRIX_LR:down,TOTAL_BATCH_SIZE:down,DEPTH:down,MODEL_DIM:down,WARMDOWN_RATIO:up,"
                 "EMBEDDING_LR:up,UNEMBEDDING_LR:up")


def run(path, budget, profile="cpu", launcher=("-m", "node")):
    """The sandbox's result for the train.py at `path`, as a dict (status "error" when none came).
    `launcher`: what runs the node's CLI (Python's arguments before `experiment`)."""
    r = subprocess.run([sys.executable, *launcher, "experiment", "--budget", str(budget), "--profile", profile,
                        "--backend", "cpu", "--json", path], cwd=ROOT, capture_output=True, text=True)
    try:
        out = json.loads(r.stdout)
    except json.JSONDecodeError:
        return {"status": "error", "val_bpb": None, "num_steps": None, "log": r.stderr[-300:]}
    return out


def edit(base, consts, name, value):
    """(label, source) of the baseline with one constant set."""
    c = consts[name]
    return f"{name} {proposer.render(c, c.value)} -> {proposer.render(c, value)}", proposer.apply(base, consts, [(name, value)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=30)
    ap.add_argument("--baselines", type=int, default=3)
    ap.add_argument("--edits", default=DEFAULT_EDITS, help="NAME:up|down, comma-separated (one proposer step each)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="an edit to an exact value")
    ap.add_argument("--file", default=os.path.join(ROOT, "model", "train.py"))
    args = ap.parse_args(argv)
    base = open(args.file).read()
    consts = proposer.constants(base, "cpu")
    edits = []
    for item in filter(None, args.edits.split(",")):
        name, _, d = item.partition(":")
        if name not in consts or d not in ("up", "down"):
            ap.error(f"{item!r} is not NAME:up|down with NAME a constant of the cpu branch ({', '.join(consts)})")
        new = proposer.step(consts[name], d)
        if new is None:
            ap.error(f"{item!r}: no step that way")
        edits.append(edit(base, consts, name, new))
    for kv in args.set:
        name, _, raw = kv.partition("=")
        if name not in consts:
            ap.error(f"{kv!r}: {name} is not a constant of the cpu branch")
        c = consts[name]
        try:
            value = raw if c.kind == "pattern" else type(c.value)(raw)
        except ValueError:
            ap.error(f"{kv!r}: {name} takes a {type(c.value).__name__}")
        edits.append(edit(base, consts, name, value))
    k, plan = max(1, args.baselines), list(edits)
    for i in reversed(range(k)):  # the i-th baseline goes before edit round(i * n / (k - 1)): first, ..., last
        plan.insert(round(i * len(edits) / max(1, k - 1)), ("baseline", base))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, source) in enumerate(plan):
            path = os.path.join(tmp, f"c{i}", "train.py")
            os.makedirs(os.path.dirname(path))
            with open(path, "w") as f:
                f.write(source)
            r = run(path, args.budget)
            rows.append((label, r.get("status"), r.get("val_bpb"), r.get("num_steps")))
            bpb = f"{r['val_bpb']:.4f}" if r.get("val_bpb") is not None else "-"
            print(f"[{i + 1}/{len(plan)}] {label}: {r.get('status')} {bpb} ({r.get('num_steps')} steps)", file=sys.stderr,
                  flush=True)
    bases = [v for label, _, v, _ in rows if label == "baseline" and v is not None]
    mean = statistics.mean(bases) if bases else None
    sd = statistics.stdev(bases) if len(bases) > 1 else None
    print(f"\nbudget {args.budget:g} s, profile cpu; baselines: mean {mean:.4f}" + (f", sd {sd:.4f}" if sd else "")
          if mean is not None else "\nno baseline finished")
    print("| run | status | val_bpb | steps | vs baseline mean | in baseline sd |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for label, status, v, steps in rows:
        d = f"{v - mean:+.4f}" if v is not None and mean is not None else "-"
        z = f"{(v - mean) / sd:+.1f}" if v is not None and sd else "-"
        print(f"| {label} | {status} | {v:.4f} | {steps} | {d} | {z} |" if v is not None else
              f"| {label} | {status} | - | {steps} | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
