"""What the sandbox's malloc settings (sandbox/run.py, ALLOCATOR_ENV) are worth on this CPU: one
train.py run alternately under glibc's defaults and under the settings, in the sandbox.

    python bench/cpu_alloc.py [--runs 4] [--budget 30] [--file model/train.py]

Prints one row per run (optimizer steps, val_bpb, page faults and system CPU time of the whole
run: node, candidate and servers), then each arm's mean and sd and the mean of the paired
differences. Linux only (glibc reads the settings).
"""

import argparse
import os
import resource
import statistics
import sys

import cpu_screen  # noqa: E402 (bench/, beside this file)

ROOT = cpu_screen.ROOT
# `python -m node experiment ...`, with the harness's allocator settings dropped or kept
PRELUDE = ("import runpy, sys; from sandbox import run; arm = sys.argv.pop(1); "
           "arm == 'glibc' and (run.ALLOCATOR_ENV.clear(), run.CPU_ALLOCATOR_ENV.clear()); sys.argv[0] = 'node'; "
           "runpy.run_module('node', run_name='__main__', alter_sys=True)")
ARMS = ("glibc", "sandbox")


def run(arm, path, budget):
    """(result dict, page faults, system CPU seconds) of one sandboxed run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = cpu_screen.run(path, budget, launcher=("-c", PRELUDE, arm))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4, help="runs of each arm (alternating)")
    ap.add_argument("--budget", type=float, default=30)
    ap.add_argument("--file", default=os.path.join(ROOT, "model", "train.py"))
    args = ap.parse_args(argv)
    if not sys.platform.startswith("linux"):
        sys.exit("error: the settings are glibc's; this measures them on Linux only")
    path = os.path.abspath(args.file)
    rows = {arm: [] for arm in ARMS}
    print("| run | malloc | status | steps | val_bpb | page faults | system CPU |\n"
          "| ---: | --- | --- | ---: | ---: | ---: | ---: |", flush=True)
    for i in range(args.runs):
        for arm in ARMS:
            out, faults, stime = run(arm, path, args.budget)
            rows[arm].append(out)
            bpb = f"{out['val_bpb']:.4f}" if out.get("val_bpb") is not None else "-"
            print(f"| {i + 1} | {arm} | {out.get('status')} | {out.get('num_steps')} | {bpb} | "
                  f"{faults / 1e6:.2f} M | {stime:.1f} s |", flush=True)
            if out.get("status") == "error":
                print(out["log"], file=sys.stderr)
    print(f"\nbudget {args.budget:g} s, {os.path.relpath(path, ROOT)}")
    for arm in ARMS:
        v = [r["val_bpb"] for r in rows[arm] if r.get("val_bpb") is not None]
        s = [r["num_steps"] for r in rows[arm] if r.get("num_steps") is not None]
        if len(v) > 1:
            print(f"{arm}: val_bpb mean {statistics.mean(v):.4f}, sd {statistics.stdev(v):.4f}; "
                  f"steps mean {statistics.mean(s):.1f}, sd {statistics.stdev(s):.1f}")
    pairs = [(a["val_bpb"], b["val_bpb"]) for a, b in zip(*rows.values())
             if a.get("val_bpb") is not None and b.get("val_bpb") is not None]
    if pairs:
        d = [b - a for a, b in pairs]
        sd = f" (sd {statistics.stdev(d):.4f})" if len(d) > 1 else ""
        print(f"sandbox - glibc, paired: {statistics.mean(d):+.4f} val_bpb{sd} over {len(d)} pairs")
    return 0 if pairs else 1


if __name__ == "__main__":
    sys.exit(main())
