"""python -m node export: the merged best train.py with where every change came from.

For our own hardware tag the file is the node's best tree; each kept commit on the way from the
baseline is matched to the signed improvement that announced it (our own, or our adoption of a
peer's, which names the original). For another tag the best improvement measured on that tag is
rebuilt from records alone. `--verify` re-checks every signature and replays every diff.
"""

import json
import os

from gossip import wire
from node import gittree, home as homes, swarm

END = "# --- end of provenance ---\n"


class ExportError(Exception):
    pass


def _open(home):
    try:
        return homes.stores(home)  # before anything is created, when there is no node's store here
    except homes.HomeError as e:
        raise ExportError(str(e)) from None


def provenance(home, tag=None, verify=False):
    """(train.py text, provenance dict); ExportError when there is nothing to export or a link of
    the chain does not hold."""
    store, records = _open(home)
    try:
        held = [r for _, r in records.since()]
        exps = store.experiments()
        if not any(e["kind"] != "baseline" and e["status"] in ("keep", "discard", "crash") for e in exps) and tag is None:
            raise ExportError(f"the node at {home} has run no experiments yet: nothing to export")
        improvements = [r for r in held if r.type == "improvement"]
        attestations = [r for r in held if r.type == "attestation"]
        if tag is None:
            text, chain, best = _own_chain(home, store, improvements)
        else:
            ledger = swarm.Ledger(records, store.get("task"), None).refresh()
            text, chain, best = _tag_chain(home, store, ledger, tag)
        steps = [_step(r, improvements, attestations) for r in chain]
        if verify:
            _verify(chain, improvements, store, text)
        runs = homes.measurements(exps).get(best, []) if tag is None else []  # nothing kept: the baseline's runs
        out = dict(tag=tag or (swarm.tag_name(chain[-1].body["hardware"]) if chain else None), best=best,
                   val_bpb=chain[-1].body["after"]["val_bpb"] if chain else sum(runs) / len(runs) if runs else None,
                   runs=chain[-1].body["after"]["runs"] if chain else len(runs),  # what val_bpb is the mean of
                   sha256=swarm.content_hash(text),
                   steps=steps, verified=verify)
        return text, out
    finally:
        store.db.close()
        records.close()


def _own_chain(home, store, improvements):
    tree = gittree.Tree(os.path.join(home, "tree"))
    best = store.get("best_commit")
    commits = tree.git("rev-list", "--reverse", best).split()
    by_child = {}
    me = homes.node_id(home)
    for r in improvements:
        if r.author_id == me:
            by_child.setdefault(r.body["child"], r)
    chain = []
    for c in commits[1:]:
        h = swarm.content_hash(tree.read(c))
        if h not in by_child:
            raise ExportError(f"kept commit {c[:7]} has no signed improvement record in {home}/gossip.sqlite")
        chain.append(by_child[h])
    return tree.read(best), chain, best


def _tag_chain(home, store, ledger, tag):
    """The best improvement measured on `tag` that others did not refute (nor its author
    discredited), rebuilt through records from the train.py this home started from or a
    lineage's baseline."""
    from node.loop import BASELINES
    tree = gittree.Tree(os.path.join(home, "tree"))
    bases = {swarm.content_hash(tree.read(tree.root()))}
    for path in BASELINES.values():  # each lineage's chain starts at its own baseline
        with open(path) as f:
            bases.add(swarm.content_hash(f.read()))
    improvements = list(ledger.improvements.values())
    on_tag = [r for r in improvements if swarm.tag_name(r.body["hardware"]) == tag and ledger.credible(r)]
    if not on_tag:
        tags = sorted({swarm.tag_name(r.body["hardware"]) for r in improvements})
        raise ExportError(f"no improvement measured on tag {tag!r}" + (f" (tags held: {'; '.join(tags)})" if tags else ""))
    by_child = {}
    for r in sorted(improvements, key=lambda r: swarm.tag_name(r.body["hardware"]) != tag):  # the tag's own first
        by_child.setdefault(r.body["child"], r)
    for best in sorted(on_tag, key=lambda r: r.body["after"]["val_bpb"]):
        chain, h, seen = [], best.body["child"], set()
        while h not in bases:  # back to the baseline, through records only
            r = by_child.get(h)
            if r is None or h in seen:
                break
            seen.add(h)
            chain.insert(0, r)
            h = r.body["parent"]
        text = store.source(h)
        if text is None:
            continue
        try:
            for r in chain:
                text = gittree.apply_diff(text, r.body["diff"])
                if swarm.content_hash(text) != r.body["child"]:
                    raise gittree.GitError("child hash")
        except gittree.GitError:
            continue
        return text, chain, best.body["child"]
    raise ExportError(f"no improvement on tag {tag!r} can be rebuilt from the records held")


def _step(r, improvements, attestations):
    originals = swarm.adopted_from(r)  # several when they were verified merged in one run
    by_id = {i.id: i for i in improvements}
    sources = [by_id.get(o) for o in originals] if originals else [r]
    confirmed = sorted({a.author_id for a in attestations for source in sources if source is not None
                        and a.body["improvement"] == source.id and a.body["verdict"] == "confirmed"
                        and a.author_id != source.author_id})
    b, a = r.body["before"], r.body["after"]
    step = dict(record=r.id.hex(), author=r.author_id, tag=swarm.tag_name(r.body["hardware"]),
                description=r.body["description"], before=b, after=a, delta=a["val_bpb"] - b["val_bpb"],
                child=r.body["child"], confirmed_by=confirmed)
    if originals:
        step["adopted"] = [dict(record=o.hex(), author=source.author_id if source else None,
                                description=source.body["description"] if source else None,
                                tag=swarm.tag_name(source.body["hardware"]) if source else None,
                                delta=(source.body["after"]["val_bpb"] - source.body["before"]["val_bpb"]) if source else None)
                           for o, source in zip(originals, sources)]
    return step


def _verify(chain, improvements, store, text):
    ids = {r.id for r in improvements}
    for r in chain:
        try:
            wire.decode_record(r.encoded, now_ms=1 << 62)
        except wire.WireError as e:
            raise ExportError(f"record {r.id.hex()[:16]} by {r.author_id} does not verify ({e})") from None
        for original in swarm.adopted_from(r):
            if original not in ids:
                raise ExportError(f"record {r.id.hex()[:16]} adopts {original.hex()[:16]}, which is not held")
    if chain:
        source = store.source(chain[0].body["parent"])
        if source is None:
            raise ExportError(f"the chain starts at {chain[0].body['parent'][:12]}, a file this node does not hold")
        for r in chain:
            try:
                source = gittree.apply_diff(source, r.body["diff"])
            except gittree.GitError as e:
                raise ExportError(f"record {r.id.hex()[:16]}: {e}") from None
            if swarm.content_hash(source) != r.body["child"]:
                raise ExportError(f"record {r.id.hex()[:16]}: its diff does not give its child hash")
        if source != text:
            raise ExportError("the chain of records does not end at the exported file")


def header(prov):
    lines = [f"# autoresearch-swarm export: the best train.py for {prov['tag'] or 'this node (the baseline)'}",
             f"# sha256 {prov['sha256']}" + (f"; val_bpb {prov['val_bpb']:.6f}, the mean of {prov['runs']} run(s) "
                                             + ("when it was kept" if prov["steps"] else "of the baseline")
                                             if prov["val_bpb"] is not None else ""),
             f"# {len(prov['steps'])} improvement(s) from the baseline" + (" (signatures and diffs re-checked)"
                                                                           if prov["verified"] else "") + ":"]
    for i, s in enumerate(prov["steps"], 1):
        b, a = s["before"], s["after"]
        what = "; ".join(o["description"] or "?" for o in s["adopted"]) if "adopted" in s else s["description"]
        line = (f"#  {i}. {what[:70]} | {s['author']} on {s['tag']} | {b['val_bpb']:.4f} -> {a['val_bpb']:.4f}"
                f" ({a['runs']} run(s), sd {a['spread']:.4f}) | record {s['record'][:16]}")
        lines.append(line)
        for o in s.get("adopted", ()):
            lines.append(f"#     adopted from {o['author']} (record {o['record'][:16]}, {o['tag']}, "
                         f"claimed {o['delta']:+.4f})" if o["author"] else f"#     adopted from record {o['record'][:16]}")
        if s["confirmed_by"]:
            lines.append(f"#     confirmed by {', '.join(s['confirmed_by'])}")
    lines.append("# run it as it is: python -m node experiment THIS_FILE (sandboxed, scored by the harness); "
                 "python THIS_FILE works only as model/train.py of this repository, beside prepare.py")
    return "\n".join(lines) + "\n" + END


def strip_header(text):
    """The train.py an export holds, without its provenance header."""
    return text.split(END, 1)[1] if END in text else text


def main(args):
    import sys
    home = os.path.abspath(args.home or homes.default_home())
    bad = args.output and homes.unwritable(args.output)
    if bad:  # before anything is read: a wrong path is answered at once
        print(f"error: {bad}", file=sys.stderr)
        return 2
    try:
        text, prov = provenance(home, args.tag, args.verify)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = json.dumps(prov, indent=2) + "\n" if args.json else header(prov) + text
    if args.output:
        try:
            with homes.output_file(args.output) as tmp, open(tmp, "w") as f:
                f.write(out)
        except homes.OutputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.output}: {len(prov['steps'])} improvement(s)"
              + (f", val_bpb {prov['val_bpb']:.6f} on {prov['tag']}" if prov["val_bpb"] is not None else "")
              + ("" if args.json else f"; run it with python -m node experiment {args.output}"), file=sys.stderr)
    else:
        sys.stdout.write(out)
    return 0
