"""python -m node: the node's command line."""

import argparse
import os
import shutil
import sys
import tempfile


def experiment(args):
    path = os.path.abspath(args.train_py)
    if os.path.isdir(path):
        path = os.path.join(path, "train.py")
    if not os.path.isfile(path):
        print(f"error: no such file: {args.train_py}", file=sys.stderr)
        return 2
    if args.profile:
        os.environ["AUTORESEARCH_PROFILE"] = args.profile  # read when the harness is imported
    from model import prepare
    from sandbox import run
    try:
        data = prepare.load_data()
    except prepare.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tree = tempfile.mkdtemp(prefix="autoresearch-tree-")
    try:
        shutil.copy(path, os.path.join(tree, "train.py"))
        result = run.run(tree, budget=args.budget, data=data)
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
        print(f"peak_memory_mb:   {r.peak_memory_mb:.0f}")
        print(f"hardware:         {r.hardware.accelerator} x{r.hardware.count} ({r.hardware.backend}, {r.hardware.framework}, "
              f"profile {r.hardware.profile}, budget {r.hardware.budget_seconds:g}s, data {r.hardware.data_fingerprint[:16]})")
        print(f"isolation:        {', '.join(r.isolation)}")
        if r.status != "ok":
            print("--- log tail ---\n" + r.log_tail)
    return 0 if result.status == "ok" else 1


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m node", description="An autoresearch-swarm node.")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("experiment", help="run one candidate train.py in the sandbox and report its result",
                        description="Run one candidate train.py in the sandbox: confined, under the budget, "
                                    "its val_bpb computed by the harness. Exit 0 if ok, 1 otherwise.")
    ex.add_argument("train_py", metavar="PATH_TO_TRAIN_PY", help="the candidate file (or a folder holding train.py)")
    ex.add_argument("--budget", type=float, help="training seconds (default: $AUTORESEARCH_TIME_BUDGET or 300)")
    ex.add_argument("--profile", choices=["gpu", "cpu"], help="evaluation profile (default: gpu with CUDA, else cpu)")
    ex.add_argument("--json", action="store_true", help="print exactly one JSON object")
    args = ap.parse_args(argv)
    if args.budget is not None and not args.budget > 0:
        ap.error("--budget must be a positive number of seconds")
    return experiment(args)


if __name__ == "__main__":
    sys.exit(main())
