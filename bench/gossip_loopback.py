"""Gossip over real processes on one machine: N `python -m gossip` nodes on 127.0.0.1 (one
seed), membership settled, then R records published from random nodes, one at a time.

For each record: the time from the publisher's publish call until the last of the N nodes
has stored it, each time taken from the nodes' JSON lines (time.time() on one machine, one
clock). Target (issue 5): stored by all within 1 s, p99 over 50 records.

usage: python bench/gossip_loopback.py [--nodes 20] [--records 50] [--gap 0.2] [--seed 1]
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_S = 1.0


class Node:
    def __init__(self, home, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "gossip", "--home", home, "--no-mdns", *args], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(os.path.join(home, "stderr.log"), "w"), text=True, bufsize=1)
        self.home, self.address, self.alive = home, None, -1
        self.stored = {}        # record id -> time stored (received or published)
        self.published = {}     # text -> (id, t0)
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            kind = e.get("event")
            if kind == "listening":
                self.address = e["address"]
                self.ready.set()
            elif kind == "status":
                self.alive = e["alive"]
            elif kind == "record":
                self.stored.setdefault(e["id"], e["t"])
            elif kind == "published":
                self.stored.setdefault(e["id"], e["t"])
                self.published[e["text"]] = (e["id"], e["t0"])

    def publish(self, text, timeout):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while text not in self.published:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.home}: publish of {text!r} not confirmed within {timeout} s")
            time.sleep(0.005)
        return self.published[text]

    def stop(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def wait_until(pred, timeout, progress, every=1.0):
    deadline, next_report = time.monotonic() + timeout, time.monotonic() + every
    while not pred():
        now = time.monotonic()
        if now > deadline:
            return False
        if now >= next_report:
            progress()
            next_report = now + every
        time.sleep(0.01)
    return True


def percentile(values, q):
    """Nearest rank: the smallest value with at least q of them at or below it."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--records", type=int, default=50)
    p.add_argument("--gap", type=float, default=0.2, help="seconds between one record reaching all and the next")
    p.add_argument("--seed", type=int, default=1, help="chooses the publishers")
    p.add_argument("--settle-timeout", type=float, default=90.0)
    p.add_argument("--record-timeout", type=float, default=10.0)
    args = p.parse_args()
    rng, n = random.Random(args.seed), args.nodes

    with tempfile.TemporaryDirectory(prefix="gossip-bench-") as tmp:
        nodes = []
        try:
            print(f"starting {n} nodes on 127.0.0.1 ...", flush=True)
            t_start = time.monotonic()
            homes = [os.path.join(tmp, f"n{i:02d}") for i in range(n)]
            for h in homes:
                os.makedirs(h)
            nodes.append(Node(homes[0], "--listen", "127.0.0.1:0", "--status-every", "0.5"))
            if not nodes[0].ready.wait(30):
                sys.exit("the seed did not start within 30 s")
            for h in homes[1:]:
                nodes.append(Node(h, "--listen", "127.0.0.1:0", "--seed", nodes[0].address, "--status-every", "0.5"))
            if not all(x.ready.wait(max(1.0, 60 - (time.monotonic() - t_start))) for x in nodes):
                sys.exit("not every node started within 60 s")
            print(f"  all {n} listening after {time.monotonic() - t_start:.1f} s", flush=True)

            settled = wait_until(lambda: all(x.alive == n - 1 for x in nodes), args.settle_timeout,
                                 lambda: print(f"  membership: {sum(x.alive == n - 1 for x in nodes)}/{n} nodes see "
                                               f"all {n - 1} others", flush=True))
            if not settled:
                sys.exit(f"membership did not settle within {args.settle_timeout} s: "
                         f"views {sorted(x.alive for x in nodes)}")
            print(f"  membership settled after {time.monotonic() - t_start:.1f} s", flush=True)
            time.sleep(1.0)

            rows = []
            for i in range(args.records):
                k = rng.randrange(n)
                rid, t0 = nodes[k].publish(f"bench record {i}", args.record_timeout)
                ok = wait_until(lambda: all(rid in x.stored for x in nodes), args.record_timeout, lambda: None)
                times = sorted(x.stored[rid] - t0 for x in nodes if rid in x.stored)
                held = len(times)
                all_s = times[-1] if ok else math.inf
                rows.append((i, k, held, times[len(times) // 2] if times else math.inf, all_s))
                print(f"  record {i + 1:2d}/{args.records} from node {k:2d}: "
                      + (f"all {n} stored it in {all_s * 1000:7.1f} ms" if ok else f"only {held}/{n} within "
                         f"{args.record_timeout} s"), flush=True)
                time.sleep(args.gap)
        finally:
            for x in nodes:
                x.stop()
            codes = [x.wait(15) for x in nodes]
        if any(codes):
            print(f"warning: exit codes {codes}", flush=True)

    alls = [r[4] for r in rows]
    print()
    print(f"{'record':>6} {'from':>4} {'held':>5} {'median node ms':>15} {'all stored ms':>14}")
    for i, k, held, med, all_s in rows:
        print(f"{i:>6} {k:>4} {held:>5} {med * 1000:>15.1f} {all_s * 1000:>14.1f}")
    p50, p99, worst = percentile(alls, 0.50), percentile(alls, 0.99), max(alls)
    print()
    print(f"time until all {n} nodes stored a record, over {len(alls)} records (nearest-rank percentiles):")
    print(f"  p50 {p50 * 1000:.1f} ms   p99 {p99 * 1000:.1f} ms   max {worst * 1000:.1f} ms")
    verdict = "PASS" if p99 <= TARGET_S else "FAIL"
    print(f"target: stored by all within {TARGET_S:.0f} s at p99: {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
