"""python -m node: the node's command line."""

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time


def experiment(args):
    path = os.path.abspath(args.train_py)
    if os.path.isdir(path):
        path = os.path.join(path, "train.py")
    if not os.path.isfile(path):
        print(f"error: no train.py in {args.train_py}" if os.path.isdir(args.train_py) else
              f"error: no such file: {args.train_py}", file=sys.stderr)
        return 2
    if args.profile:
        os.environ["AUTORESEARCH_PROFILE"] = args.profile  # read when the harness is imported
    from model import prepare
    from sandbox import backend as backends, run
    try:
        data = prepare.load_data()
        with open(path, encoding="utf-8") as f:
            source = f.read()
        backend = backends.resolve(args.backend) if args.backend else backends.of_source(source)
    except UnicodeDecodeError as e:
        print(f"error: {args.train_py} is not UTF-8 text ({e.reason} at byte {e.start})", file=sys.stderr)
        return 2
    except (prepare.DataError, backends.BackendError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tree = tempfile.mkdtemp(prefix="autoresearch-tree-")
    try:
        shutil.copy(path, os.path.join(tree, "train.py"))
        from node import home as homes
        with homes.device_lock(homes.device_lock_path(), lambda: print(
                "waiting for the device: a node on this machine is running", file=sys.stderr, flush=True)):
            result = run.run(tree, budget=args.budget, profile=args.profile, data=data, backend=backend)
    except KeyboardInterrupt:  # the sandbox has killed the candidate and its servers on the way out
        print("interrupted: no result", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    if args.json:
        print(result.to_json())
    else:
        r = result
        print(f"status:           {r.status}{'  (' + ', '.join(r.violations) + ')' if r.violations else ''}")
        print(f"val_bpb:          {r.val_bpb:.6f}" if r.val_bpb is not None else "val_bpb:          -")
        print(f"training_seconds: {r.training_seconds:.1f}  (launch to hand-over)")
        print(f"total_seconds:    {r.total_seconds:.1f}")
        if r.evaluation_seconds is not None:
            print(f"eval_seconds:     {r.evaluation_seconds:.1f}  (the harness's evaluation)")
        print(f"peak_memory_mb:   {r.peak_memory_mb:.0f}")
        hw = r.hardware
        print(f"hardware:         {hw.accelerator} x{hw.count} ({hw.backend} on the {hw.device}, {hw.framework}, "
              f"{hw.memory_gb} GB, profile {hw.profile}, budget {hw.budget_seconds:g}s, data {hw.data_fingerprint[:16]})")
        print(f"isolation:        {', '.join(r.isolation)}")
        if r.status != "ok":
            print("--- log tail ---\n" + r.log_tail)
    return 0 if result.status == "ok" else 1


def _settings(args):
    from node import config
    overrides = {k: getattr(args, k, None) for k in config.SETTINGS}
    s = config.load(args.config, overrides)
    if s["profile"]:
        os.environ["AUTORESEARCH_PROFILE"] = s["profile"]  # read when the harness is imported
    from model import prepare
    from sandbox import backend as backends
    if s["profile"] and s["profile"] != prepare.PROFILE:
        raise RuntimeError(f"the harness was imported before the profile {s['profile']} was set")
    s["profile"] = prepare.PROFILE  # else the harness's own choice: gpu with CUDA, cpu without
    s["backend"] = backends.resolve(s["backend"])  # BackendError, one line, when this machine lacks it
    s["budget"] = s["budget"] or (prepare.TIME_BUDGET if s["profile"] == "gpu" else config.CPU_BUDGET)
    return s


def _data(s, home, explicit):
    """(the prepared data, {node id: reason} of peers that lied): the `data` source when the command
    line named it (prepared here: instant when cached); else the data this home's scores were
    measured on, while it is in the cache; else the data prepared last; when there is none, the
    seeds' task fetched from peers, or without seeds the `data` source prepared here."""
    from model import prepare
    from node import home as homes
    if explicit:
        return _prepared(s["data"]), {}
    own = None if os.environ.get("AUTORESEARCH_DATA") else homes.measured_data(home)
    try:
        return prepare.load_data(own), {}
    except prepare.NoDataError:
        if own:  # its data left the cache: as for a new home (the node then says whether the task changed)
            try:
                return prepare.load_data(), {}
            except prepare.NoDataError:
                pass
    if s["seeds"]:
        from node import tasksync
        fingerprint, liars = tasksync.join_task(s, say=lambda line: print(line, flush=True))
        prepare._set_current(fingerprint)
        return prepare.load_data(fingerprint), liars
    print(f"no prepared data yet: preparing --source {s['data']} (once; cached in {prepare.cache_dir()})", flush=True)
    return _prepared(s["data"]), {}


def _prepared(source):
    """The data of `source`, prepared (or found prepared) by model.prepare; None when it cannot be (it said why)."""
    from model import prepare
    if prepare.main(["--source", source]) != 0:
        return None
    return prepare.load_data()


def _refused_start(s):
    """Why join cannot start with settings `s`, found before it creates or changes anything (None if it can):
    a --start file that is not Python, Claude without its key, a --listen address this machine cannot bind."""
    import errno
    import socket
    from node import home as homes, loop
    if s["start"]:
        try:
            loop.read_start(s["start"])
        except homes.HomeError as e:
            return str(e)
    if s["proposer"] == "claude" and not os.environ.get("ANTHROPIC_API_KEY"):
        return "--proposer claude needs ANTHROPIC_API_KEY in the environment (--proposer auto uses the offline proposer without it)"
    if s["listen"] == "off":
        return "--seed needs the network, which --listen off turns off" if s["seeds"] else None
    from gossip.discovery import split_address
    host, port = split_address(s["listen"])  # checked by config already
    data_port = s["data_port"] if s["data_port"] is not None else port + 1 if 0 < port < 65535 else 0
    for p, flag in ((port, "--listen HOST:PORT"), (data_port, "--data-port PORT")):
        try:  # as the node will bind it (a race with another program stays possible: join_network says so then)
            family, address = ((socket.AF_INET, ("0.0.0.0", p)) if host in ("", "*", "0.0.0.0") else
                               socket.getaddrinfo(host, p, type=socket.SOCK_STREAM)[0][::4])
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds: a closed port's TIME_WAIT is no bar
                probe.bind(address)
        except OSError as e:
            why = ("it is in use (another node running?)" if getattr(e, "errno", None) == errno.EADDRINUSE
                   else e.strerror or str(e))
            return f"cannot listen on {host or '*'}:{p}: {why}; choose another with {flag} (port 0 for any) or --listen off"
    return None


def _disk_full(e):
    """What filled up, when `e` (from a store write, a journal line, git or the sandbox's temp files) is
    a full disk or quota; else None. Every write is a transaction or is rebuilt at start, so the node
    can stop right there."""
    import errno
    import sqlite3
    from node import gittree
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return e.filename or os.strerror(e.errno)
    if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
        return f"the store: {e}"
    if isinstance(e, gittree.GitError) and "No space left on device" in str(e):
        return "the git tree"
    return None


def join(args):
    from node import config
    from sandbox.backend import BackendError
    try:
        s = _settings(args)  # before anything imports the harness: it reads the profile once, when imported
    except (config.ConfigError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from model import prepare
    from node import home as homes, loop, tasksync
    refused = _refused_start(s)
    if refused:  # before the home, the data and the banner: a refused start changes nothing
        print(f"error: {refused}", file=sys.stderr)
        return 2
    made = False
    try:
        home = homes.refuse_file(os.path.abspath(args.home or homes.default_home()))
        if os.path.lexists(os.path.join(home, "store.sqlite")):  # a folder that is no node's home: refused untouched
            homes.Store(os.path.join(home, "store.sqlite")).db.close()
        made = not os.path.isdir(home)
        os.makedirs(home, exist_ok=True)
        data, liars = _data(s, home, explicit=args.data is not None)
        if data is not None:
            node = loop.Node(home, s, data)
            node.distrust(liars)
    except (prepare.DataError, homes.HomeError, tasksync.TaskError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        data = None
    except KeyboardInterrupt:  # while data is prepared or fetched: both resume on the next start
        print("interrupted before the node started", file=sys.stderr)
        return 130
    if data is None:  # a home made for this start goes again while still empty
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(home)
        return 2
    print(f"node home {home} | backend {s['backend']} (lineage {node.lineage}) | profile {s['profile']} | "
          f"budget {s['budget']:g}s | proposer {node.proposer.name} "
          f"({node.proposer.why}{', model ' + s['model'] if node.proposer.name == 'claude' else ''}) | "
          f"data {data.fingerprint[:16]}", flush=True)
    from sandbox import run as sandbox
    kind, _, names = sandbox.isolation()
    if kind != "view":
        print(f"WARNING: this machine allows no private filesystem view for candidates (isolation: {', '.join(names)}): "
              "they can read what this user can read, the validation split included. Results record it.", flush=True)
    try:
        signum = node.run()
    except homes.HomeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 -- only a full disk is answered here; anything else stays a traceback
        full = _disk_full(e)
        if full is None:
            raise
        print(f"error: disk full ({full}): the node stopped; what it kept is in {home} and a restart carries on "
              "once there is space", file=sys.stderr)
        return 2
    finally:
        node.close()
    st = loop.status(home)
    summary = f"{st['experiments']} experiments, {st['kept']} kept, {st['crashed']} crashed" + (
        f"; best val_bpb {st['best_val_bpb']:.6f} (baseline {st['baseline_val_bpb']:.6f}, noise "
        f"{'-' if st['noise'] is None else format(st['noise'], '.6f')})" if st["best_val_bpb"] is not None else "")
    if st["best_read_at_steps"]:
        r = st["best_read_at_steps"]
        summary += f"; the best kept as read at {r['steps']:.0f} steps: {r['val_bpb']:.6f} against {r['parent_val_bpb']:.6f}"
    if signum:  # the run under way is recorded as interrupted; every decided run is in the store already
        print(f"stopped by {signal.Signals(signum).name} after {summary}; nothing lost: what was decided is in "
              f"{home}, and join carries on from there", flush=True)
        return 128 + signum  # as a shell reports a process a signal ended: 130 for SIGINT, 143 for SIGTERM
    print(f"done: {summary}", flush=True)
    return 0


def status(args):
    import json
    from node import home as homes, loop
    try:
        st = loop.status(os.path.abspath(args.home or homes.default_home()))
    except homes.HomeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(st))
        return 0
    fmt = lambda v, f: format(v, f) if v is not None else "-"
    print(f"best val_bpb:   {fmt(st['best_val_bpb'], '.6f')}  (commit {(st['best_commit'] or '-')[:7]})")
    if st["best_read_at_steps"]:
        r = st["best_read_at_steps"]
        print(f"  kept as read at {r['steps']:.0f} steps: {r['val_bpb']:.6f} against its parent's {r['parent_val_bpb']:.6f} "
              f"(noise {r['noise']:.6f}; the machine's speed set apart)")
    print(f"baseline:       {fmt(st['baseline_val_bpb'], '.6f')}")
    print(f"noise (sd):     {fmt(st['noise'], '.6f')}")
    print(f"experiments:    {st['experiments']} ({st['kept']} kept, {st['discarded']} discarded, {st['crashed']} crashed); "
          f"{st['runs']} runs decided (results.tsv's rows)")
    print(f"duty cycle:     {fmt(st['duty_cycle'] and 100 * st['duty_cycle'], '.1f')} %  (budgeted training / wall)")
    v = st["verification"]
    print(f"verification:   {100 * v['share']:.1f} % of run time ({v['seconds']:.0f} s; own research {v['own_seconds']:.0f} s); "
          + (", ".join(f"{n} {k}" for k, n in sorted(v["verdicts"].items())) or "no verdicts yet"))
    u = st["model"]
    print(f"model use:      {u['calls']} calls for {u['proposals']} proposals ({u['model']}): tokens {u['input_tokens']:,} "
          f"input, {u['cache_read_tokens']:,} cache reads, {u['cache_write_tokens']:,} cache writes, {u['output_tokens']:,} "
          f"output; ${u['usd']:.4f} at the list prices in node/claude.py"
          + (f" ({u['unpriced_calls']} calls of an unpriced model not included)" if u["unpriced_calls"] else "")
          if u["calls"] else "model use:      none")
    print(f"running:        {'yes, up ' + fmt(st['uptime_seconds'], '.0f') + ' s' if st['running'] else 'no'}")
    print(f"node id:        {st['node_id'] or '-'}" + (f"  at {st['address']}" if st["address"] else ""))
    if st["running"]:
        print(f"peers:          {len(st['peers'])}" + (f"  (records held: {st['records']})" if st["records"] is not None else ""))
        for p in sorted(st["peers"], key=lambda p: p["last_seen_s"]):
            hw = p["hardware"]
            tag = f"{hw.get('accelerator', '?')} x{hw.get('count', '?')} {hw.get('backend', '?')} {hw.get('profile', '')}"
            task = hw.get("task", "-") + ("" if hw.get("task") == st["task"] else " (another task)")
            print(f"  {p['id']}  {p['address']:<21}  {tag:<40}  task {task}  seen {p['last_seen_s']:.0f}s ago"
                  f"  served {p['service']:.1f}  standing {p['standing']:+.1f}"
                  + (f"  [{p['state']}]" if p["state"] != "alive" else ""))
        if st["rejected"]:
            print("rejected input: " + ", ".join(f"{k} {v}" for k, v in sorted(st["rejected"].items())))
    return 0


def suggest(args):
    from node import home as homes
    home = os.path.abspath(args.home or homes.default_home())
    queue = os.path.join(home, "queue")
    if not os.path.isdir(queue):
        print(f"error: no node home at {home}", file=sys.stderr)
        return 2
    if args.note is not None:
        if not args.note.strip():
            print("error: the note is empty", file=sys.stderr)
            return 2
        body, ext = args.note.strip() + "\n", ".note"
    else:
        try:
            with open(args.patch) as f:
                body = f.read()
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: cannot read {args.patch}: {e}", file=sys.stderr)
            return 2
        named = [line[4:].split("\t")[0] for line in body.splitlines() if line.startswith(("--- ", "+++ "))]
        touched = {n[2:] for n in named if n.startswith(("a/", "b/"))}
        if not named:
            print(f"error: {args.patch} is not a unified diff (git diff format)", file=sys.stderr)
            return 2
        if not touched:  # a plain diff -u: its names are paths of this machine, which the node's tree does not have
            print(f"error: {args.patch} names its files {' and '.join(dict.fromkeys(named))}; the node's tree names "
                  "it train.py (--- a/train.py, +++ b/train.py): from this repository, git diff --relative=model; "
                  "else diff -u --label a/train.py --label b/train.py OLD NEW", file=sys.stderr)
            return 2
        if touched != {"train.py"}:
            print(f"error: the patch touches {', '.join(sorted(touched))}; only train.py may change, named as the "
                  "node's tree names it (--- a/train.py; from this repository: git diff --relative=model)", file=sys.stderr)
            return 2
        refused = _patch_refused(home, body)
        if refused:
            print(f"error: {args.patch}: {refused}", file=sys.stderr)
            return 2
        ext = ".patch"
    for queued in sorted(os.listdir(queue)):
        if queued.endswith(ext) and not queued.startswith("."):
            try:
                with open(os.path.join(queue, queued)) as f:
                    same = f.read() == body
            except OSError:  # taken by the node meanwhile
                same = False
            if same:
                print(f"already queued as {queued}: not queued again")
                return 0
    name = f"{time.time():.6f}-{os.getpid()}{ext}"
    tmp = os.path.join(queue, "." + name)
    with open(tmp, "w") as f:
        f.write(body)
    os.replace(tmp, os.path.join(queue, name))
    print(f"queued {name}: it runs next" if ext == ".patch" else
          f"queued note {name} for the Claude proposer (the offline proposer reads no notes)")
    return 0


def _patch_refused(home, body):
    """Why the patch `body` cannot run on the home's best train.py (None if it can): checked when it is
    queued, as the node checks it when it takes it (the best may move in between: the node says so then)."""
    from node import gittree, home as homes
    best, path = None, os.path.join(home, "store.sqlite")
    try:
        if os.path.exists(path):  # else no run yet, so no best to check against: opening would create a store
            store = homes.Store(path)
            try:
                best = store.get("best_commit")
            finally:
                store.db.close()
        if best:
            gittree.apply_diff(gittree.Tree(os.path.join(home, "tree")).read(best), body)
    except (homes.HomeError, gittree.GitError) as e:
        why = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())  # git's lines: one line
        return f"{why} (against the best train.py{', ' + best[:7] if best else ''})"
    return None


def main(argv=None):
    from node import config
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:  # everything after it belongs to model.prepare, --help included
        from model import prepare
        return prepare.main(argv[1:], prog="python -m node prepare")
    ap = argparse.ArgumentParser(prog="python -m node", description=(
        "An autoresearch-swarm node: evolves train.py by experiments in a sandbox, keeping only what beats "
        "the measured noise."))
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    jn = sub.add_parser("join", help="run the research loop (forever, or --max-experiments N)",
                        description="Start the node: prepare data if needed, run the baseline, then propose, run and "
                                    "keep or discard experiments until stopped (Ctrl-C stops cleanly; kill -9 is safe too).")
    jn.add_argument("--home", help="node folder (default: ~/.cache/autoresearch-swarm/node); one node per home")
    jn.add_argument("--config", help="a TOML file of settings (see configs/); flags override it")
    for key, (default, kind, text) in config.SETTINGS.items():
        if key == "seeds":
            jn.add_argument("--seed", dest=key, action="append", metavar="HOST:PORT", help=text)
        elif kind is bool:
            jn.add_argument("--no-" + key.replace("_", "-"), dest=key, action="store_const", const=False, help=text)
        else:
            jn.add_argument("--" + key.replace("_", "-"), dest=key, type=kind,
                            help=text + (f" [{default}]" if default is not None else ""))

    ex = sub.add_parser("experiment", help="run one candidate train.py in the sandbox and report its result",
                        description="Run one candidate train.py in the sandbox: confined, under the budget, "
                                    "its val_bpb computed by the harness. Exit 0 if ok, 1 otherwise.")
    ex.add_argument("train_py", metavar="PATH_TO_TRAIN_PY", help="the candidate file (or a folder holding train.py)")
    ex.add_argument("--budget", type=float, help="training seconds (default: $AUTORESEARCH_TIME_BUDGET or 300)")
    ex.add_argument("--profile", choices=config.PROFILES, help="evaluation profile (default: gpu with CUDA, else cpu)")
    ex.add_argument("--backend", choices=config.BACKENDS,
                    help="what the candidate runs on (default: mlx for a file that imports mlx, else torch's choice)")
    ex.add_argument("--json", action="store_true", help="print exactly one JSON object")

    st = sub.add_parser("status", help="best val_bpb, experiments run/kept/crashed, noise, uptime",
                        description="Report a node's state from its store (works while it runs).")
    st.add_argument("--home", help="node folder (default: ~/.cache/autoresearch-swarm/node)")
    st.add_argument("--json", action="store_true", help="one JSON object")

    sg = sub.add_parser("suggest", help="queue a diff to run next, or a note for the LLM proposer",
                        description="Queue a person's suggestion: a unified diff of train.py (run next, like any "
                                    "candidate) or --note TEXT (context for the Claude proposer).")
    sg.add_argument("--home", help="node folder (default: ~/.cache/autoresearch-swarm/node)")
    what = sg.add_mutually_exclusive_group(required=True)
    what.add_argument("patch", nargs="?", metavar="PATCH_FILE", help="a git-style diff touching only train.py")
    what.add_argument("--note", help="a note for the Claude proposer (the offline proposer reads none)")

    wt = sub.add_parser("watch", help="a live view of the swarm: peers, verification queue, events, best per tag",
                        description="A live terminal view of the swarm as this node sees it (Ctrl-C leaves).")
    wt.add_argument("--home", help="node folder (default: ~/.cache/autoresearch-swarm/node)")
    wt.add_argument("--once", action="store_true", help="print one plain snapshot and exit")
    wt.add_argument("--json", action="store_true", help="with --once: the snapshot as one JSON object")
    wt.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes [2]")

    xp = sub.add_parser("export", help="write the merged best train.py with its signed provenance",
                        description="Write the best train.py (ours, or the best measured on --tag from records) with a "
                                    "header naming every improvement from the baseline: author, hardware tag, deltas, "
                                    "who confirmed it. Exit 2 when there is nothing to export or the chain is broken.")
    xp.add_argument("--home", help="node folder (default: ~/.cache/autoresearch-swarm/node)")
    xp.add_argument("-o", "--output", metavar="FILE", help="write here (default: standard output)")
    xp.add_argument("--tag", help="a hardware tag as watch shows it (default: this node's own best tree)")
    xp.add_argument("--json", action="store_true", help="write the provenance as JSON instead of the file")
    xp.add_argument("--verify", action="store_true", help="re-check every signature and replay every diff of the chain")

    kn = sub.add_parser("knowledge", help="what the swarm has tried, grouped by idea, and who tries what now",
                        description="The swarm's memory as this node holds it: every experiment record grouped by "
                                    "the change it made (tries, hardware tags, median delta, keep/discard/crash, "
                                    "nodes), and the claims in flight.")
    kn.add_argument("--home", help="node folder (default: ~/.cache/autoresearch-swarm/node)")
    kn.add_argument("--json", action="store_true", help="one JSON object")
    kn.add_argument("--tag", help="only experiments measured on this hardware tag (as watch shows it)")
    kn.add_argument("--grep", metavar="WORD", help="only ideas whose description or diff contains WORD")

    pl = sub.add_parser("plot", help="val_bpb over this node's runs, kept and adopted marked (needs matplotlib)",
                        description="Plot val_bpb over the node's runs: discarded grey, kept green, adopted from "
                                    "peers orange, the best as a step line (pip install 'autoresearch-swarm[plot]').")
    pl.add_argument("--home", help="node folder (default: ~/.cache/autoresearch-swarm/node)")
    pl.add_argument("-o", "--output", default="progress.png", help="the image to write [progress.png]")

    pr = sub.add_parser("prepare", help="prepare data and tokenizer (python -m model.prepare)", add_help=False,
                        description="Prepare the training and validation data; arguments go to python -m model.prepare.")
    pr.add_argument("rest", nargs=argparse.REMAINDER)

    args = ap.parse_args(argv)
    if args.command == "experiment":
        if args.budget is not None and not 0 < args.budget < float("inf"):
            ex.error("--budget must be a positive number of seconds")
        return experiment(args)
    if args.command == "watch":
        from node import watch
        return watch.main(args)
    if args.command == "knowledge":
        from node import knowledge
        return knowledge.main(args)
    if args.command == "plot":
        from node import plot
        return plot.main(args)
    if args.command == "export":
        from node import export
        return export.main(args)
    return {"join": join, "status": status, "suggest": suggest}[args.command](args)


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()  # here, where a reader that left (| head) can be answered
    except BrokenPipeError:  # the reader of our output left: no traceback, as other command-line tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that Python's own flush at exit is quiet
        code = 1
    sys.exit(code)
