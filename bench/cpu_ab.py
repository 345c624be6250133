"""What a change to train.py is worth on this machine: two files run alternately in the sandbox.
Alternating spreads a drift in the machine's speed over both.

    python bench/cpu_ab.py A.py B.py [--runs 3] [--budget 30] [--profile cpu]

A file may be a git revision's train.py: `REV:model/train.py` (e.g. HEAD~1:model/train.py).
Prints one row per run (val_bpb, optimizer steps), then each file's mean and sd and B - A.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import cpu_screen  # noqa: E402 (bench/, beside this file)

ROOT = cpu_screen.ROOT


def source(spec):
    if os.path.exists(spec):
        return open(spec).read()
    r = subprocess.run(["git", "show", spec], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"error: {spec!r} is neither a file nor a git REV:PATH ({r.stderr.strip().splitlines()[0]})")
    return r.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="a train.py, or REV:model/train.py")
    ap.add_argument("b")
    ap.add_argument("--runs", type=int, default=3, help="runs of each (alternating A, B)")
    ap.add_argument("--budget", type=float, default=30)
    ap.add_argument("--profile", default="cpu", choices=("cpu", "tiny"))
    args = ap.parse_args(argv)
    results = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for key, spec in (("A", args.a), ("B", args.b)):
            paths[key] = os.path.join(tmp, key, "train.py")
            os.makedirs(os.path.dirname(paths[key]))
            with open(paths[key], "w") as f:
                f.write(source(spec))
        print("| run | file | status | val_bpb | steps |\n| ---: | --- | --- | ---: | ---: |", flush=True)
        for i in range(args.runs):
            for key in ("A", "B"):
                out = cpu_screen.run(paths[key], args.budget, args.profile)
                results[key].append(out)
                bpb = f"{out['val_bpb']:.4f}" if out.get("val_bpb") is not None else "-"
                print(f"| {i + 1} | {key} | {out.get('status')} | {bpb} | {out.get('num_steps')} |", flush=True)
    print(f"\nbudget {args.budget:g} s, profile {args.profile}; A = {args.a}, B = {args.b}")
    means = {}
    for key in ("A", "B"):
        v = [r["val_bpb"] for r in results[key] if r.get("val_bpb") is not None]
        s = [r["num_steps"] for r in results[key] if r.get("num_steps") is not None]
        if v:
            means[key] = statistics.mean(v)
            sd = f", sd {statistics.stdev(v):.4f}" if len(v) > 1 else ""
            print(f"{key}: val_bpb mean {means[key]:.4f}{sd} over {len(v)} runs; steps {min(s)}-{max(s)}")
    if len(means) == 2:
        print(f"B - A: {means['B'] - means['A']:+.4f} val_bpb")
    return 0 if len(means) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
