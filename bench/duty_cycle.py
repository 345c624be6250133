"""The node's duty cycle on this machine: run `python -m node join` for a number of
experiments, then list every run from the node's store (its wall time, the candidate's
start-up to the first optimizer step, the harness's evaluation) and the share of wall time
spent inside the budgeted training.

    python3 bench/duty_cycle.py --budget 30 --max-experiments 4 [--home DIR] [--start FILE]
    python3 bench/duty_cycle.py --report HOME        # only the table, for a home that ran

Besides the duty cycle measured at this budget, it prints what the same per-run overhead
(everything but the budget: start-up, compilation, evaluation, the node's own work between
runs) would leave at a 300 s budget; that line is arithmetic on the measured overheads.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def report(home, projected_budget=300.0):
    from node import home as homes
    store = homes.Store(homes.store_path(home))
    exps = [e for e in store.experiments() if e["finished"] is not None]
    print("| # | kind | status | description | wall s | startup s | eval s | probe diff | overhead s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows, last = [], None
    for e in exps:
        r = json.loads(e["result"]) if e["result"] else {}
        budget = r.get("hardware", {}).get("budget_seconds", 0.0)
        gap = e["started"] - last if last is not None and 0 < e["started"] - last < 600 else 0.0
        wall = e["finished"] - e["started"] + gap  # the node's work before the run counts against it
        last = e["finished"]
        startup = (re.findall(r"^startup_seconds:\s+([0-9.]+)", r.get("log_tail", ""), re.M) or [None])[-1]
        trained = budget if r.get("status") == "ok" else 0.0
        rows.append((wall, trained, budget))
        print(f"| {e['id']} | {e['kind']} | {e['status']} | {e['description'][:50]} | {wall:.1f} | {startup or '-'} | "
              f"{r.get('evaluation_seconds') or '-'} | {r.get('probe_max_diff')} | {wall - trained:.1f} |")
        phases = [line for line in r.get("log_tail", "").splitlines() if line.startswith("harness:")]
        if phases:
            print(f"|   | {phases[-1][:300]} |")
    store.db.close()
    wall, trained = sum(r[0] for r in rows), sum(r[1] for r in rows)
    ok = [r for r in rows if r[1] > 0]
    overhead = sum(r[0] - r[1] for r in ok) / len(ok) if ok else float("nan")
    print(f"\nruns: {len(rows)} ({len(ok)} scored); wall {wall:.0f} s; budgeted training {trained:.0f} s; "
          f"duty cycle {100 * trained / wall:.1f} % at this budget")
    print(f"mean overhead per scored run: {overhead:.1f} s -> at a {projected_budget:.0f} s budget: "
          f"{100 * projected_budget / (projected_budget + overhead):.1f} % (projected from the overheads above)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=30)
    ap.add_argument("--max-experiments", type=int, default=4)
    ap.add_argument("--home", help="node home (default: a new temporary folder)")
    ap.add_argument("--start", help="the train.py the node starts from (an untrusted first run: see join --start)")
    ap.add_argument("--report", metavar="HOME", help="only print the table for this home")
    ap.add_argument("--deadline", type=float, help="stop the node (SIGTERM: it ends cleanly) after this many seconds")
    args = ap.parse_args()
    if args.report:
        return report(args.report)
    home = args.home or tempfile.mkdtemp(prefix="duty-home-")
    t = time.time()
    cmd = [sys.executable, "-m", "node", "join", "--home", home, "--listen", "off", "--no-mdns",
           "--budget", str(args.budget), "--max-experiments", str(args.max_experiments)]
    if args.start:
        cmd += ["--start", args.start]
    print(" ".join(cmd), flush=True)
    p = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        rc = p.wait(timeout=args.deadline)
    except subprocess.TimeoutExpired:
        p.terminate()
        rc = p.wait()
    print(f"node exited {rc} after {time.time() - t:.0f} s", flush=True)
    report(home)


if __name__ == "__main__":
    main()
