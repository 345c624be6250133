"""Whether a speed index timed beside each run predicts a CPU run's step count (and so its val_bpb).
The same train.py runs in the sandbox again and again; before and after each run this process times
a fixed torch workload (matrix products and elementwise work at the cpu profile's sizes, torch's
threads); then it prints each run and the correlations.

    python bench/cpu_speed.py [--runs 8] [--budget 30] [--file model/train.py]

On a machine whose speed drifts, a CPU run's val_bpb follows its step count (bench/RESULTS.md, "The
CPU's noise floor"); a candidate's own step count also carries its own speed, so a keep rule that
reads through the drift needs an index that the candidate cannot move. This measures whether this
one would serve.
"""

import argparse
import math
import os
import statistics
import sys
import time

import cpu_screen  # bench/, beside this file

ROOT = cpu_screen.ROOT


def index(seconds=1.0):
    """Rounds of a fixed workload a second: a (2048 x 128) by (128 x 512) product, its ReLU^2, and
    the product back, float32, as a cpu-profile forward does them."""
    import torch
    g = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(s, generator=g) for s in ((2048, 128), (128, 512), (512, 128)))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        h = torch.relu(x @ w1).square_()
        x = torch.nn.functional.rms_norm(h @ w2, (128,))
        n += 1
    return n / (time.perf_counter() - t0)


def corr(a, b):
    return statistics.correlation(a, b) if len(a) > 2 and len(set(a)) > 1 and len(set(b)) > 1 else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--budget", type=float, default=30)
    ap.add_argument("--file", default=os.path.join(ROOT, "model", "train.py"))
    args = ap.parse_args(argv)
    if args.runs < 3:
        sys.exit("error: --runs must be at least 3 (a correlation needs them)")
    rows = []
    print("| run | index before | index after | steps | val_bpb |\n| ---: | ---: | ---: | ---: | ---: |", flush=True)
    for i in range(args.runs):
        before = index()
        out = cpu_screen.run(args.file, args.budget)
        after = index()
        if out.get("val_bpb") is None or not out.get("num_steps"):
            print(f"| {i + 1} | {before:.1f} | {after:.1f} | - | {out.get('status')} |", flush=True)
            continue
        rows.append(((before + after) / 2, out["num_steps"], out["val_bpb"]))
        print(f"| {i + 1} | {before:.1f} | {after:.1f} | {out['num_steps']} | {out['val_bpb']:.4f} |", flush=True)
    if len(rows) < 3:
        sys.exit("error: fewer than three runs scored")
    idx, steps, bpb = ([r[k] for r in rows] for k in range(3))
    print(f"\n{len(rows)} runs, budget {args.budget:g} s: index {min(idx):.1f}-{max(idx):.1f}, steps {min(steps)}-{max(steps)}")
    print(f"r(index, steps) = {corr(idx, steps):.2f}; r(steps, val_bpb) = {corr(steps, bpb):.2f}; "
          f"r(index, val_bpb) = {corr(idx, bpb):.2f}")
    # val_bpb about its line on log(index): what a keep rule reading through the index would see
    li = [math.log(v) for v in idx]
    slope, intercept = statistics.linear_regression(li, bpb)
    sd_line = math.sqrt(sum((y - intercept - slope * x) ** 2 for x, y in zip(li, bpb)) / (len(rows) - 2))
    print(f"val_bpb sd {statistics.stdev(bpb):.4f} raw, {sd_line:.4f} about its line on log(index) (slope {slope:.3f})")


if __name__ == "__main__":
    main()
