"""python -m gossip: a gossip-only node, for tests, benchmarks and trying the network by hand.

It speaks the same protocol as `python -m node join`, without the research loop: every line
read on stdin is published as a signed `note` record, and everything that happens is printed
on stdout as one JSON object per line, each with "event" and "t" (time.time()).
"""

import argparse
import json
import os
import signal
import sys
import threading
import time

from gossip import wire
from gossip.identity import Identity
from gossip.store import Store
from gossip.transport import DEFAULT_PORT, Service

EPILOG = f"""\
stdout, one JSON object per line:
  listening   the node is up: its id, the advertised address peers reply to, records loaded
  published   a stdin line became a note record: its id
  record      a new record from the network, stored: id, type, author (a note's text too)
  status      with --status-every: peers, rejected reasons, banned connections, record count
  stopped     on exit: the same counts
  and the protocol's events: member_joined, member_suspect, member_dead, member_left,
  peer_banned, refuted, seeds_silent (once, when no seed answered), mdns_found,
  mdns_unavailable, error

The default port is {DEFAULT_PORT}; port 0 takes any free port (see the listening line).
The node stops cleanly on end of input, SIGTERM or SIGINT (with --no-stdin: on a signal).

example: printf 'hello\\n' | python -m gossip --home /tmp/a --listen 127.0.0.1:0 --seed 127.0.0.1:{DEFAULT_PORT}
"""


class _Stop(Exception):
    pass


class Printer:
    """One JSON line at a time, from the service thread and the main thread alike."""

    def __init__(self, stream):
        self.stream, self.lock = stream, threading.Lock()

    def __call__(self, event, **fields):
        line = json.dumps({"event": event, **fields, "t": time.time()}, default=str, separators=(",", ":"))
        with self.lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):  # nobody reads any more; keep running until told to stop
                pass


def _record_fields(record):
    fields = {"id": record.id.hex(), "type": record.type, "author": record.author_id}
    if record.type == "note":
        fields["text"] = record.body["text"][:200]
    return fields


def _status(service):
    s = service.status()
    peers = [{k: p[k] for k in ("id", "address", "state", "score", "service", "standing", "last_seen_s")}
             for p in s["peers"]]
    return {"address": s["address"], "alive": sum(p["state"] == "alive" for p in peers), "peers": peers,
            "records": s["records"], "rejected": s["rejected"], "banned": s["banned"], "dropped": s["dropped"]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gossip", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", required=True, help="folder for identity.key and gossip.sqlite (created if absent)")
    p.add_argument("--listen", default=f"0.0.0.0:{DEFAULT_PORT}", metavar="HOST:PORT",
                   help=f"where to listen (default 0.0.0.0:{DEFAULT_PORT}; port 0 = any free port)")
    p.add_argument("--seed", action="append", default=[], metavar="HOST:PORT",
                   help="a node to join through (repeatable)")
    p.add_argument("--advertise", metavar="HOST:PORT", help="the address peers reply to (default: worked out)")
    p.add_argument("--no-mdns", action="store_true", help="do not register or browse mDNS on the LAN")
    p.add_argument("--status-every", type=float, default=0.0, metavar="S", help="print a status line every S seconds")
    p.add_argument("--no-stdin", action="store_true", help="ignore stdin; run until SIGTERM or SIGINT")
    args = p.parse_args(argv)

    os.makedirs(args.home, exist_ok=True)
    identity = Identity.load(os.path.join(args.home, "identity.key"))
    store = Store(os.path.join(args.home, "gossip.sqlite"))
    emit = Printer(sys.stdout)

    failed = threading.Event()

    def on_event(e):
        emit(e.kind, **e.detail)
        if e.kind == "fatal":  # the service thread ended on its own: stop the process too
            failed.set()
            os.kill(os.getpid(), signal.SIGTERM)

    service = Service(identity, listen=args.listen, seeds=args.seed, store=store, meta={"role": "gossip-cli"},
                      mdns=not args.no_mdns, on_record=lambda r: emit("record", **_record_fields(r)),
                      on_event=on_event, advertise=args.advertise)

    def on_signal(signum, frame):
        raise _Stop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    done, reporter = threading.Event(), None
    try:
        try:
            service.start()
        except OSError as e:
            print(f"python -m gossip: {e.strerror or e}", file=sys.stderr)
            return 2
        emit("listening", id=identity.id, address=service.address, pid=os.getpid(), records=service.loaded)
        if args.status_every > 0:
            def report():
                while not done.wait(args.status_every):
                    try:
                        emit("status", **_status(service))
                    except (RuntimeError, TimeoutError):
                        return
            reporter = threading.Thread(target=report, name="gossip-status", daemon=True)
            reporter.start()
        if args.no_stdin:
            while True:
                done.wait(3600)
        while line := sys.stdin.readline():
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            t0 = time.time()
            try:
                record = wire.make_record(identity, "note", {"text": text}, int(t0 * 1000))
                new = service.publish(record)
            except wire.WireError as e:
                emit("error", where="stdin", error=f"not published: {e}")
                continue
            emit("published", id=record.id.hex(), new=new, text=text[:200], t0=t0)
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        done.set()
        if reporter is not None:
            reporter.join(5)
        final = None
        if service.node is not None:
            try:
                final = _status(service)
            except (RuntimeError, TimeoutError):
                pass
        service.stop()
        if final is not None:
            emit("stopped", **final)
        store.close()
    return 1 if failed.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
