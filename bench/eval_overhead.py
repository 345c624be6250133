"""The plain in-process evaluation of model/train.py's model, timed: the yardstick for the
harness's evaluation under the sandbox (`evaluation_seconds` of a result, and the phases on
its log's `harness:` line). The weights do not change the cost, so the model is not trained.

    python3 bench/eval_overhead.py [--repeat 3]

Needs prepared data (AUTORESEARCH_CACHE); on CUDA, the gpu profile.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "model"))


def untrained(src=None):
    """The globals of model/train.py (or of the train.py source `src`) run up to its training
    loop: its model (untrained), data, sizes, `autocast` and `sync`."""
    sys.argv = ["train.py"]
    src = src or open(os.path.join(ROOT, "model", "train.py")).read()
    src = src[:src.index("x, y, epoch = next(loader)")]  # everything before training: model, data, sizes
    g = {"__file__": os.path.join(ROOT, "model", "train.py"), "__name__": "untrained"}
    exec(compile(src, "train.py", "exec"), g)
    return g


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    g = untrained()
    prepare, model, data = g["prepare"], g["model"], g["data"]
    model.eval()
    t = time.time()
    prepare.eval_rows(data.val, data.val_docs)
    print(f"eval_rows (the harness builds them while the candidate trains): {time.time() - t:.2f} s")
    for i in range(args.repeat):
        g["sync"]()
        t = time.time()
        with g["autocast"]:
            bpb = prepare.evaluate_bpb(model, data, g["DEVICE_BATCH_SIZE"], g["DEVICE"])
        g["sync"]()
        print(f"in-process evaluation {i + 1}: {time.time() - t:.2f} s (val_bpb {bpb:.4f}, untrained)", flush=True)


if __name__ == "__main__":
    main()
