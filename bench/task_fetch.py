"""Task fetch throughput against a plain TCP copy, between two network namespaces joined by a veth
pair (issue 11: >= 50 % of the plain copy; three serving peers faster than one). Needs root.

    sudo python bench/task_fetch.py --mb 400

The task is synthetic but valid (random shards, a manifest whose hashes and fingerprint
prepare.verify accepts), so the whole path is measured: chunk requests, SHA-256 of every chunk,
writes, the final verify and rename. The plain copy is one socket.sendfile per file into a file, with and without an fsync at the end
(the fetcher fsyncs every file before it renames the folder into place); "vs plain" is against the
copy without.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
NS_A, NS_B, IP_A, IP_B = "arsw-a", "arsw-b", "10.77.0.1", "10.77.0.2"


def sh(*cmd):
    subprocess.run(cmd, check=True)


def netns_up():
    netns_down()
    sh("ip", "netns", "add", NS_A)
    sh("ip", "netns", "add", NS_B)
    sh("ip", "link", "add", "arsw-va", "netns", NS_A, "type", "veth", "peer", "name", "arsw-vb", "netns", NS_B)
    for ns, dev, ip in ((NS_A, "arsw-va", IP_A), (NS_B, "arsw-vb", IP_B)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def netns_down():
    for ns in (NS_A, NS_B):
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


def in_ns(ns, *args, **kw):
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), *args],
                            cwd=ROOT, env=dict(os.environ, AUTORESEARCH_PROFILE="cpu"), **kw)


def synthetic_task(root, mb):
    """A prepared folder of `mb` MB that prepare.verify accepts, and its signed task record."""
    from gossip.identity import Identity
    from model import prepare
    from node import tasksync
    tmp = os.path.join(root, "build")
    os.makedirs(tmp)
    sizes = {"tokenizer.json": 1 << 20, "token_bytes.npy": 1 << 15, "train.bin": (mb - 2) << 20,
             "train_docs.npy": 1 << 18, "val.bin": 1 << 20, "val_docs.npy": 1 << 12}
    for name, size in sizes.items():
        with open(os.path.join(tmp, name), "wb") as f:
            for left in range(size, 0, -(1 << 24)):
                f.write(os.urandom(min(left, 1 << 24)))
    hashes = {n: prepare._sha256(os.path.join(tmp, n)) for n in prepare.DATA_FILES}
    fp = prepare._fingerprint(hashes)
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"fingerprint": fp, "files": {n: {"sha256": h} for n, h in hashes.items()}}, f)
    folder = os.path.join(root, fp[:16])
    os.rename(tmp, folder)
    m = tasksync.sign(Identity.generate(), tasksync.build_manifest(folder, "cpu", 256, 65536), time.time() * 1000)
    with open(os.path.join(root, "task.record"), "wb") as f:
        f.write(m.record.encoded)
    return folder, m


# --- the processes inside the namespaces ----------------------------------------------------------

def serve(folder, record, port, rate):
    from gossip import wire
    from node import taskserver, tasksync
    with open(record, "rb") as f:
        m = tasksync.Manifest.from_record(wire.decode_record(f.read(), time.time() * 1000))
    server = taskserver.Server(folder, m, IP_A, int(port), rate=float(rate) * 1e6).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop()


def fetch(task, cache, *ports):
    from node import taskfetch
    peers = [taskfetch.Peer(IP_A, int(p)) for p in ports]
    t0 = time.time()
    m = taskfetch.fetch_manifest(peers, task)
    done = taskfetch.Fetcher(m, peers, cache=cache).fetch()
    print(json.dumps({"seconds": time.time() - t0, "bytes": m.size, "per_peer": [p[2] for p in done.peers]}))


def send(path, port):
    with socket.create_server((IP_A, int(port))) as srv:
        print("ready", flush=True)
        conn, _ = srv.accept()
        with conn, open(path, "rb") as f:
            conn.sendfile(f)


def receive(port, out, sync):
    t0, n = time.time(), 0
    with socket.create_connection((IP_A, int(port))) as s, open(out, "wb") as f:
        while block := s.recv(1 << 20):
            f.write(block)
            n += len(block)
        if sync == "1":
            f.flush()
            os.fsync(f.fileno())
    print(json.dumps({"seconds": time.time() - t0, "bytes": n}))


# --- the parent -----------------------------------------------------------------------------------

def ready(proc):
    assert proc.stdout.readline().strip() == "ready"


def plain_copy(work, folder, sync):
    """All of the task's files, one after another, each over one TCP connection (`sync`: each
    file fsynced at its end, as the fetcher does before its rename)."""
    total, seconds = 0, 0.0
    for name in sorted(os.listdir(folder)):
        sender = in_ns(NS_A, "_send", os.path.join(folder, name), "7900", stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
        ready(sender)
        r = json.loads(in_ns(NS_B, "_recv", "7900", os.path.join(work, "copy"), sync, stdout=subprocess.PIPE,
                             text=True).communicate()[0])
        sender.wait()
        total, seconds = total + r["bytes"], seconds + r["seconds"]
    os.remove(os.path.join(work, "copy"))
    return total, seconds


def task_fetch(work, folder, m, peers, rate):
    servers = [in_ns(NS_A, "_serve", folder, os.path.join(os.path.dirname(folder), "task.record"), str(7910 + i), rate,
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(peers)]
    try:
        for s in servers:
            ready(s)
        cache = os.path.join(work, f"fetch-{peers}")
        r = json.loads(in_ns(NS_B, "_fetch", m.task, cache, *(str(7910 + i) for i in range(peers)),
                             stdout=subprocess.PIPE, text=True).communicate()[0])
        shutil.rmtree(cache)
        return r
    finally:
        for s in servers:
            s.stdin.close()
            s.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=400, help="task size in MB [400]")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, the best kept [2]")
    ap.add_argument("--rates", default="0,50", help="each server's serve_rate in MB/s, one set of rows per value "
                                                    "(0: unbounded) [0,50]")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("error: needs root (ip netns)")
    work = tempfile.mkdtemp(prefix="task-fetch-bench-")
    try:
        netns_up()
        folder, m = synthetic_task(os.path.join(work, "task"), args.mb)
        rows = []
        for sync in ("0", "1"):
            best = min((plain_copy(work, folder, sync) for _ in range(args.repeat)), key=lambda r: r[1])
            rows.append(("plain TCP copy" + (" + fsync" if sync == "1" else ""), 1, best[0], best[1], ""))
        plain_rate = rows[0][2] / rows[0][3]
        for rate in args.rates.split(","):
            for peers in (1, 3):
                r = min((task_fetch(work, folder, m, peers, rate) for _ in range(args.repeat)), key=lambda r: r["seconds"])
                rows.append((f"task fetch, serve_rate {rate}", peers, r["bytes"], r["seconds"],
                             " / ".join(f"{b / 1e6:.0f}" for b in r["per_peer"]) + " MB"))
        print(f"{'method':<32}{'peers':>6}{'MB':>8}{'s':>8}{'MB/s':>9}{'vs plain':>10}  served by")
        for what, peers, n, s, per in rows:
            print(f"{what:<32}{peers:>6}{n / 1e6:>8.0f}{s:>8.2f}{n / s / 1e6:>9.0f}{n / s / plain_rate:>9.0%}  {per}")
    finally:
        netns_down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1].startswith("_"):
        {"_serve": serve, "_fetch": fetch, "_send": send, "_recv": receive}[sys.argv[1]](*sys.argv[2:])
    else:
        main()
