"""How long `python -m node watch` takes to refresh with many peers and records.

Builds a node home with PEERS live peers and RECORDS signed records (improvements, attestations,
experiments from those peers), then times the first snapshot (every record read), a refresh
after RECORDS/100 more arrive (only the new rows read), and the rendering of one frame.

    python bench/watch_load.py [--peers 50] [--records 10000]
"""

import argparse
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gossip import store as records_store, wire  # noqa: E402
from gossip.identity import Identity  # noqa: E402
from node import home as homes, watch  # noqa: E402

TASK = "0123456789abcdef"


def hardware(i):
    return dict(accelerator=["NVIDIA H100 80GB HBM3", "NVIDIA A100", "Apple M2", "Xeon"][i % 4], count=1,
                backend=["cuda", "cuda", "mps", "cpu"][i % 4], framework="torch 2.11.0", budget_seconds=300.0,
                profile="gpu", data_fingerprint="f" * 64)


def records(peers, n, rng, t0):
    h = lambda: "%064x" % rng.getrandbits(256)
    improvements, out = [], []
    for k in range(n):
        i = rng.randrange(len(peers))
        who, hw = peers[i], hardware(i)
        score = dict(val_bpb=1.0 - k * 1e-6, runs=2, spread=0.001)
        kind = rng.random()
        if kind < 0.2 or not improvements:
            body = dict(task=TASK, lineage="torch", parent=h(), child=h(), diff="--- a/train.py\n+++ b/train.py\n" * 20,
                        before=score, after=dict(score, val_bpb=score["val_bpb"] - rng.random() * 0.01), hardware=hw,
                        proposer="offline", description=f"change {k}")
            r = wire.make_record(who, "improvement", body, t0 + k * 100)
            improvements.append(r)
        elif kind < 0.4:
            target = rng.choice(improvements)
            body = dict(task=TASK, improvement=target.id, verdict=rng.choice(["confirmed", "refuted"]), before=score,
                        after=score, hardware=hw, note="")
            r = wire.make_record(who, "attestation", body, t0 + k * 100)
        else:
            body = dict(task=TASK, lineage="torch", parent=h(), child=h(), diff="", hypothesis=f"idea {k}",
                        status="discard", before=score, after=score, hardware=hw, proposer="offline", log_tail="")
            r = wire.make_record(who, "experiment", body, t0 + k * 100)
        out.append(r)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=50)
    ap.add_argument("--records", type=int, default=10000)
    args = ap.parse_args()
    rng = random.Random(0)
    home = tempfile.mkdtemp(prefix="watch-load-")
    lock = homes.Lock(home)  # watch shows live peers only while a node holds the home
    store = homes.Store(os.path.join(home, "store.sqlite"))
    store.set("task", TASK)
    store.set("hardware", json.dumps(hardware(0)))
    store.set("best_commit", "0" * 40)
    store.set("started", time.time())
    store.db.close()
    peers = [Identity.from_seed(b"peer%d" % i) for i in range(args.peers)]
    with open(os.path.join(home, "peers.json"), "w") as f:
        json.dump(dict(id="me", address="10.0.0.1:7645", rejected={}, records=args.records,
                       peers=[dict(id=p.id, address=f"10.0.0.{i + 2}:7645", meta=hardware(i), state="alive",
                                   last_seen_s=1.0, score=0.0) for i, p in enumerate(peers)]), f)
    t0 = time.time() * 1000 - args.records * 100
    made = time.perf_counter()
    rs = records(peers, args.records + args.records // 100, rng, t0)
    made = time.perf_counter() - made
    db = records_store.Store(os.path.join(home, "gossip.sqlite"))
    with db.db:
        for r in rs[:args.records]:
            db.add(r)
    w = watch.Watcher(home)
    t = time.perf_counter()
    snap = w.snapshot()
    first = time.perf_counter() - t
    for r in rs[args.records:]:
        db.add(r)
    t = time.perf_counter()
    snap = w.snapshot()
    again = time.perf_counter() - t
    from rich.console import Console
    t = time.perf_counter()
    Console(file=io.StringIO(), width=160).print(watch.render(snap))
    frame = time.perf_counter() - t
    w.close()
    db.close()
    lock.release()
    print(f"| peers | records | first snapshot | refresh (+{args.records // 100} records) | render one frame |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    print(f"| {len(snap['peers'])} | {args.records} | {first * 1000:.0f} ms | {again * 1000:.0f} ms | {frame * 1000:.0f} ms |")
    print(f"(signing the records took {made:.1f} s; queue {len(snap['queue'])}, tags {len(snap['tags'])})")
    shutil.rmtree(home)


if __name__ == "__main__":
    main()
