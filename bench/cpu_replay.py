"""Replay a node home's keep decisions both ways: as measured, and read at one step count.

For every candidate run of an edit that leaves a step's cost alone (proposer.neutral_edit against
its parent), the verdict each rule gives with what the home knew right after that run: the raw
rule at the profile's noise floor (loop.noise, loop.verdict) and the reading at one step count
(loop.step_slope, loop.at_steps), one re-run left. A table per home:

    python bench/cpu_replay.py HOME [HOME ...] [--profile cpu]
"""

import argparse
import os
import sqlite3
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from node import config, gittree, home as homes, loop, proposer  # noqa: E402


def replay(home, profile):
    db = sqlite3.connect(os.path.join(home, "store.sqlite"))
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute("SELECT * FROM experiments ORDER BY id")]
    tree = gittree.Tree(os.path.join(home, "tree"))
    floor, step_floor = config.NOISE_FLOORS[profile], config.STEP_FLOORS[profile]
    print(f"{home}\n| run | edit | steps | as measured: gain, verdict | at one step count: gain, verdict | decided |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, r in enumerate(rows):
        if r["kind"] not in ("candidate", "rerun") or r["val_bpb"] is None:
            continue
        best, cand = r["parent"], r["commit_"]
        if not proposer.neutral_edit(tree.read(best), tree.read(cand), "cpu"):
            continue
        seen = rows[:i] + [dict(r, status="measured")]
        m, runs = homes.measurements(seen), homes.measured_steps(seen)
        raw = loop.verdict(m[best], m[cand], loop.noise(m, floor), 2.0, 1)
        gain = sum(m[best]) / len(m[best]) - sum(m[cand]) / len(m[cand])
        read = loop.at_steps(best, cand, runs, loop.step_slope(runs, config.STEP_SLOPES[profile]), step_floor)
        at = "read as measured"
        if read:
            b, c, sigma, _ = read
            at = f"{sum(b) / len(b) - sum(c) / len(c):+.4f}, {loop.verdict(b, c, sigma, 2.0, 1)}"
        steps = runs[cand][-1][1]
        print(f"| {r['id']} | {r['description'][:40]} | {steps} | {gain:+.4f}, {raw} | {at} | {r['status']} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("homes", nargs="+", metavar="HOME")
    ap.add_argument("--profile", default="cpu", choices=sorted(config.STEP_SLOPES))
    args = ap.parse_args()
    for home in args.homes:
        if not os.path.exists(os.path.join(home, "store.sqlite")):
            print(f"error: {home} is not a node home (no store.sqlite)", file=sys.stderr)
            sys.exit(2)
        replay(home, args.profile)


if __name__ == "__main__":
    main()
