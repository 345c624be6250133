"""A real swarm on one CPU machine: N node processes on loopback for a while, then what each did.

Every node runs the offline proposer under the CPU profile; they take turns on the machine (the
device lock), so each gets about 1/N of it. At the end it prints, per node, what `status`
reports: experiments, keeps, verdicts on peers' improvements, adoptions, and the share of run
time spent verifying (the issue's bound: at most 30 % while no candidate is strong); then the
swarm memory: (parent, child) pairs that ran twice on one tag across the nodes, and how many of the
other nodes' discarded experiments each node's `knowledge` lists.

    python bench/swarm_cpu.py [--nodes 3] [--minutes 20] [--budget 5] [--keep]
    python bench/swarm_cpu.py --report DIR     # the tables again, for homes a --keep run left
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args):
    """Start the nodes, let them work for args.minutes, stop them; (folder, their homes)."""
    base = tempfile.mkdtemp(prefix="swarm-cpu-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--profile", "cpu", "--budget", str(args.budget), "--no-mdns", "--proposer", "offline"]
    procs, homes = [], []
    for i in range(args.nodes):
        home = os.path.join(base, f"node{i}")
        homes.append(home)
        where = ["--listen", f"127.0.0.1:{port}"] if i == 0 else ["--listen", "127.0.0.1:0", "--seed", f"127.0.0.1:{port}"]
        procs.append(subprocess.Popen([sys.executable, "-m", "node", "join", "--home", home, *common, *where], cwd=ROOT,
                                      stdout=open(os.path.join(base, f"node{i}.log"), "w"), stderr=subprocess.STDOUT))
    end = time.time() + args.minutes * 60
    try:
        while time.time() < end:
            time.sleep(min(30, max(0, end - time.time())))
            dead = [i for i, p in enumerate(procs) if p.poll() is not None]
            if dead:
                sys.exit(f"node {dead[0]} exited; see {base}/node{dead[0]}.log")
            print(f"{(args.minutes * 60 - (end - time.time())) / 60:.1f} min", file=sys.stderr, flush=True)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=120)
    return base, homes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--budget", type=float, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the node homes (printed) for watch/export")
    ap.add_argument("--report", metavar="DIR", help="only the tables, for the homes a --keep run left in DIR")
    args = ap.parse_args()
    if args.report:
        base, args.keep = args.report, True
        homes = sorted(os.path.join(base, n) for n in os.listdir(base) if os.path.isdir(os.path.join(base, n)))
        args.nodes = len(homes)
    else:
        base, homes = run(args)
    rows, known = [], []
    for i, home in enumerate(homes):
        r = subprocess.run([sys.executable, "-m", "node", "status", "--home", home, "--json"], cwd=ROOT,
                           capture_output=True, text=True)
        rows.append(json.loads(r.stdout))
        r = subprocess.run([sys.executable, "-m", "node", "knowledge", "--home", home, "--json"], cwd=ROOT,
                           capture_output=True, text=True)
        known.append(json.loads(r.stdout))
    ids = [st["node_id"] for st in rows]
    runs, checks = [], []   # (tag, parent, child) of every experiment each node ran itself / of its verifications
    discards = {}
    for i, k in enumerate(known):
        mine = [e for idea in k["ideas"] for e in idea["experiments"] if e["author"] == ids[i]]
        runs += [(e["tag"], e["parent"], e["child"]) for e in mine if e.get("proposer") != "verify"]
        checks += [(e["tag"], e["parent"], e["child"]) for e in mine if e.get("proposer") == "verify"]
        discards[ids[i]] = {e["record"] for e in mine if e["status"] == "discard"}
    print(f"{args.nodes} nodes, " + (f"the homes in {base}" if args.report else
          f"{args.minutes:g} min, CPU profile, budget {args.budget:g} s, one machine (turns on the device)"))
    print("| node | runs | experiments | kept | verdicts | adopted | verification share | best val_bpb | baseline |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for i, st in enumerate(rows):
        v = st["verification"]
        verdicts = ", ".join(f"{n} {k}" for k, n in sorted(v["verdicts"].items())) or "-"
        print(f"| {i} | {st['runs']} | {st['experiments']} | {st['kept']} | {verdicts} | {v['adopted']} | "
              f"{100 * v['share']:.1f} % | {st['best_val_bpb']:.4f} | {st['baseline_val_bpb']:.4f} |")
    dup = len(runs) - len(set(runs))
    print(f"experiments run: {len(runs)}; (parent, child) pairs run twice on one tag across the nodes: {dup}"
          f" ({100 * dup / max(1, len(runs)):.1f} %)")
    print(f"not counted above: {len(checks)} verification runs of peers' improvements ({len(set(checks))} pairs), "
          f"which re-run a peer's pair by design")
    for i, k in enumerate(known):
        held = {e["record"] for idea in k["ideas"] for e in idea["experiments"]}
        others = set().union(*(d for who, d in discards.items() if who != ids[i]))
        print(f"node {i}: knowledge lists {len(others & held)} of the other nodes' {len(others)} discarded experiments; "
              f"skipped as claimed {rows[i]['memory']['skipped_claimed']}, as measured {rows[i]['memory']['skipped_measured']}")
    if args.keep:
        print(f"homes under {base}")
    else:
        import shutil
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
