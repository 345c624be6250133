"""python -m node watch: a live view of the swarm from one node's home.

Everything shown is read from the home (store.sqlite, gossip.sqlite, peers.json, events.jsonl),
so watch runs beside a node, or after it, without touching it. Records are read incrementally:
a refresh costs the rows added since the last one.
"""

import json
import math
import os
import time
from collections import defaultdict

from node import home as homes, loop, memory as memories, swarm

SPARKS = "▁▂▃▄▅▆▇█"
SHOWN_EVENTS = {"published": "published", "verify": "verifying", "verdict": None, "gossip_member_joined": "peer joined",
                "gossip_member_left": "peer left", "gossip_member_dead": "peer dead", "start": "started",
                "stop": "stopped"}


def sparkline(values, width=24):
    """The running best (lowest) of `values`, in time order, as block characters; low is good."""
    if not values:
        return ""
    best, out = float("inf"), []
    for v in values:
        best = min(best, v)
        out.append(best)
    if len(out) > width:  # the last value of each of `width` slices
        out = [out[min(len(out) - 1, (i + 1) * len(out) // width - 1)] for i in range(width)]
    lo, hi = min(out), max(out)
    return "".join(SPARKS[int((hi - v) / (hi - lo) * (len(SPARKS) - 1)) if hi > lo else 0] for v in out)


def tail_events(path, limit=12, chunk=1 << 16):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - chunk))
            lines = f.read().splitlines()[1:] if os.path.getsize(path) > chunk else f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in reversed(lines):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        kind = e.get("event")
        if kind not in SHOWN_EVENTS:
            continue
        if kind == "verdict":
            v = e.get("verdict")
            text = (f"adopted {e.get('improvement', '')[:12]} by {e.get('author')}" if e.get("adopted")
                    else f"{v} {e.get('improvement', '')[:12]} by {e.get('author')}")
        elif kind == "published":
            text = f"kept {str(e.get('commit'))[:7]}, published {e.get('record', '')[:12]}: {e.get('description', '')[:60]}"
        elif kind == "verify":
            text = f"verifying {e.get('improvement', '')[:12]} by {e.get('author')}"
        else:
            text = f"{SHOWN_EVENTS[kind]} {e.get('id', '')} {e.get('address', '')}".rstrip()
        out.append((e.get("t", 0), text))
        if len(out) >= limit:
            break
    return out[::-1]


class Watcher:
    """The state of one home, refreshed on demand."""

    def __init__(self, home):
        self.home = home
        self.records = homes.records(home)  # HomeError when there is no node here
        self.ledger = None

    def snapshot(self, now=None):
        now = now or time.time()
        st = loop.status(self.home)
        store = homes.Store(os.path.join(self.home, "store.sqlite"))
        try:
            task = store.get("task")
            hardware = json.loads(store.get("hardware") or "{}")
            done = {bytes.fromhex(k) for k in store.verdicts()}
        finally:
            store.db.close()
        if self.ledger is None or self.ledger.task != task:
            self.ledger = swarm.Ledger(self.records, task, st["node_id"])
        lg = self.ledger.refresh()
        queue = lg.rank(hardware, st["noise"] or 0.001, 1.0, now, done) if hardware else []
        best_own = {}   # author -> best val_bpb of its improvements on its own tags
        series = defaultdict(list)  # tag -> [(ts, val_bpb)]
        for r in lg.improvements.values():
            if not lg.credible(r):
                continue
            tag = swarm.tag_name(r.body["hardware"])
            v = r.body["after"]["val_bpb"]
            series[tag].append((r.ts, v))
            best_own[r.author_id] = min(v, best_own.get(r.author_id, v))
        hour = defaultdict(int)
        for r in lg.experiments:
            if r.ts / 1000 > now - 3600:
                hour[r.author_id] += 1
        peers = [dict(p, best_val_bpb=best_own.get(p["id"]), experiments_per_hour=hour.get(p["id"], 0)) for p in st["peers"]]
        tags = [dict(tag=t, best_val_bpb=min(v for _, v in xs), improvements=len(xs),
                     sparkline=sparkline([v for _, v in sorted(xs)])) for t, xs in sorted(series.items())]
        claims = [dict(author=c.author_id, description=c.body["description"], expires_in_s=round(memories.expiry(c) - now))
                  for c in memories.in_flight(lg.claims, lg.experiments, now)]
        return dict(node=st, peers=peers, tags=tags, other_tasks=dict(lg.other_tasks), claims=claims,
                    queue=[dict(record=e.record.id.hex(), author=e.record.author_id, gain=e.gain, p_hold=e.p_hold,
                                standing=e.standing, strong=e.strong, priority=e.priority,
                                description=e.record.body["description"]) for e in queue],
                    events=[dict(t=t, text=x) for t, x in tail_events(os.path.join(self.home, "events.jsonl"))])

    def close(self):
        self.records.close()


def render(snap):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
    st = snap["node"]
    fmt = lambda v, f=".6f": format(v, f) if v is not None else "-"
    v = st["verification"]
    head = Text(f"node {st['node_id'] or '-'} at {st['address'] or ('(no network)' if st['running'] else '(not running)')} | task {st['task'] or '-'} | best "
                f"{fmt(st['best_val_bpb'])} | {st['experiments']} experiments, {st['kept']} kept | verifying "
                f"{100 * v['share']:.0f} % of run time, {v['adopted']} adopted, {sum(v['verdicts'].values())} verdicts")
    peers = Table(title=f"peers ({len(snap['peers'])})", expand=True)
    for c in ("id", "hardware", "state", "best val_bpb", "exp/h", "last seen"):
        peers.add_column(c)
    for p in sorted(snap["peers"], key=lambda p: (p["best_val_bpb"] is None, p["best_val_bpb"] or 0))[:50]:
        peers.add_row(p["id"], swarm.tag_name(p["hardware"]), p["state"], fmt(p["best_val_bpb"]),
                      str(p["experiments_per_hour"]), f"{p['last_seen_s']:.0f}s ago")
    queue = Table(title=f"verification queue ({len(snap['queue'])})", expand=True)
    for c in ("record", "author", "claimed gain", "P(holds)", "standing", "strong", "description"):
        queue.add_column(c)
    for q in snap["queue"][:10]:
        queue.add_row(q["record"][:12], q["author"], f"{q['gain']:+.4f}", f"{q['p_hold']:.2f}", f"{q['standing']:.2f}",
                      "yes" if q["strong"] else "", q["description"][:50])
    tags = Table(title="best val_bpb per hardware tag", expand=True)
    for c in ("tag", "best val_bpb", "improvements", "progress"):
        tags.add_column(c)
    for t in snap["tags"]:
        tags.add_row(t["tag"], fmt(t["best_val_bpb"]), str(t["improvements"]), t["sparkline"])
    events = Table(title="recent events", expand=True, show_header=False)
    events.add_column("time")
    events.add_column("event")
    for e in snap["events"]:
        events.add_row(time.strftime("%H:%M:%S", time.localtime(e["t"])), e["text"])
    claims = Table(title=f"in flight ({len(snap['claims'])} claims)", expand=True)
    for c in ("node", "trying", "claim ends in"):
        claims.add_column(c)
    for c in snap["claims"][:10]:
        claims.add_row(c["author"], c["description"][:80], f"{c['expires_in_s']} s")
    parts = [head, peers, queue, claims, tags, events]
    if snap["other_tasks"]:
        parts.append(Text("records of other tasks (not compared): " + ", ".join(f"{k} {n}" for k, n in snap["other_tasks"].items())))
    return Group(*parts)


def main(args):
    import sys
    from rich.console import Console
    home = os.path.abspath(args.home or homes.default_home())
    if args.json and not args.once:
        print("error: --json needs --once: the live view is not JSON", file=sys.stderr)
        return 2
    if not (math.isfinite(args.interval) and args.interval > 0):
        print(f"error: --interval must be a number of seconds above 0, not {args.interval:g}", file=sys.stderr)
        return 2
    try:
        w = Watcher(home)
    except homes.HomeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.once:
            snap = w.snapshot()
            if args.json:
                print(json.dumps(snap))
            else:
                Console(width=max(100, Console().width), no_color=True, force_terminal=False).print(render(snap))
            return 0
        from rich.live import Live
        with Live(render(w.snapshot()), refresh_per_second=2, screen=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(render(w.snapshot()))
    except KeyboardInterrupt:
        return 0
    except homes.HomeError as e:  # the store went bad under a running view
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        w.close()
