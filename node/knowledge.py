"""python -m node knowledge: what the swarm has tried, grouped by idea, and who is trying what now."""

import json
import os
import sys
import time

from node import home as homes, memory as memories, swarm


def read(home, tag=None, grep=None):
    store, records = homes.stores(home)  # HomeError, before anything is created, when there is no node's store here
    try:
        ledger = swarm.Ledger(records, store.get("task"), homes.node_id(home)).refresh()
        mem = memories.Memory(ledger, store.source)
        out = mem.knowledge(time.time(), tag, grep)
        out["rejected"] = dict(mem.rejected)
        out["task"] = store.get("task")
        return out
    finally:
        records.close()
        store.db.close()


def main(args):
    home = os.path.abspath(args.home or homes.default_home())
    try:
        k = read(home, args.tag, args.grep)
    except homes.HomeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(k))
        return 0
    print(f"task {k['task']}: {k['experiments']} experiments in {len(k['ideas'])} ideas"
          + (f" (records left out: {', '.join(f'{n} {r}' for r, n in k['rejected'].items())})" if k["rejected"] else ""))
    if args.tag and args.tag not in k["tags"]:
        print(f"no experiment on tag {args.tag!r}; the tags here: {', '.join(k['tags']) or 'none yet'}")
    if k["ideas"]:
        print(f"{'median delta':>12}  {'tries':>5}  {'keep/discard/crash':>18}  {'nodes':>5}  {'tags':>4}  idea")
    for i in k["ideas"]:
        o = i["outcomes"]
        crash = o.get("crash", 0) + o.get("timeout", 0) + o.get("violation", 0)
        delta = f"{i['median_delta']:+.4f}" if i["median_delta"] is not None else "-"
        print(f"{delta:>12}  {i['tries']:>5}  {o.get('keep', 0):>6}/{o.get('discard', 0)}/{crash:<9}  "
              f"{len(i['authors']):>5}  {len(i['tags']):>4}  {i['description'][:80]}")
    if k["claims"]:
        print("being tried now:")
        for c in k["claims"]:
            print(f"  {c['author']}  {c['description'][:70]}  ({c['tag']}, claim ends in {c['expires_in_s']} s)")
    return 0
