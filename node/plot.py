"""python -m node plot: val_bpb over this node's runs, like autoresearch's progress chart:
discarded candidates grey, own keeps green, improvements adopted from peers orange, the
running best as a step line. Needs matplotlib (pip install 'autoresearch-swarm[plot]')."""

import os
import sys

from node import home as homes


def points(home):
    """(run index, val_bpb, kind) of every scored, decided run; kind: baseline | kept | adopted | discarded."""
    store = homes.Store(homes.store_path(home))
    try:
        exps = store.experiments()
    finally:
        store.db.close()
    out = []
    for e in exps:
        if e["val_bpb"] is None or e["status"] not in ("keep", "discard"):
            continue
        if e["kind"] in ("baseline", "remeasure"):
            kind = "baseline"
        elif e["status"] == "discard":
            kind = "discarded"
        else:
            kind = "adopted" if e["kind"] == "verify" else "kept"
        out.append((len(out), e["val_bpb"], kind))
    return out


def main(args):
    home = os.path.abspath(args.home or homes.default_home())
    bad = homes.unwritable(args.output)
    if bad:  # before anything is read: a wrong path is answered at once
        print(f"error: {bad}", file=sys.stderr)
        return 2
    try:
        pts = points(home)
    except homes.HomeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not pts:
        print(f"error: the node at {home} has no scored runs yet: nothing to plot", file=sys.stderr)
        return 2
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: plot needs matplotlib: pip install 'autoresearch-swarm[plot]'", file=sys.stderr)
        return 2
    fig, ax = plt.subplots(figsize=(10, 5))
    formats = fig.canvas.get_supported_filetypes()
    fmt = os.path.splitext(args.output)[1][1:].lower() or "png"  # no suffix: PNG, as before
    if fmt not in formats:
        print(f"error: plot cannot write .{fmt} files ({args.output}); name a file ending in "
              f"{', '.join('.' + f for f in sorted(formats))}", file=sys.stderr)
        return 2
    _draw(ax, pts, home)
    fig.tight_layout()
    try:
        with homes.output_file(args.output) as tmp:
            fig.savefig(tmp, dpi=120, format=fmt)
    except homes.OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({len(pts)} runs)")
    return 0


def _draw(ax, pts, home):
    style = dict(baseline=("s", "tab:blue", "baseline"), discarded=("o", "lightgrey", "discarded"),
                 kept=("o", "tab:green", "kept"), adopted=("*", "tab:orange", "adopted from a peer"))
    for kind, (marker, color, label) in style.items():
        xs = [(i, v) for i, v, k in pts if k == kind]
        if xs:
            ax.scatter(*zip(*xs), marker=marker, c=color, s=80 if marker == "*" else 25, label=label, zorder=3)
    best, line = float("inf"), []
    for i, v, k in pts:
        if k != "discarded":
            best = min(best, v)
        line.append((i, best))
    ax.step(*zip(*line), where="post", c="black", lw=1, label="best kept")
    ax.set_xlabel("run")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(f"autoresearch-swarm node {os.path.basename(home)}: {sum(k == 'kept' for *_, k in pts)} kept, "
                 f"{sum(k == 'adopted' for *_, k in pts)} adopted, {sum(k == 'discarded' for *_, k in pts)} discarded")
    ax.legend()
    ax.grid(alpha=0.3)
