"""Table of train.py summaries: one row per log, then mean and spread.

    python bench/summarize.py bench-out/run*.log
"""
import statistics
import sys

KEYS = ["val_bpb", "mfu_percent", "num_steps", "total_tokens_M", "epochs", "startup_seconds",
        "data_wait_s", "training_seconds", "total_seconds", "peak_vram_mb"]


def read(path):
    out = {}
    for line in open(path, errors="replace"):
        key, sep, value = line.partition(":")
        if sep and key.strip() in KEYS:
            try:
                out[key.strip()] = float(value)
            except ValueError:
                pass
    return out


def main(paths):
    rows = [(p, read(p)) for p in paths]
    rows = [(p, r) for p, r in rows if "val_bpb" in r]
    if not rows:
        sys.exit("no finished runs in " + " ".join(paths))
    print("| run | " + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 1) + "|")
    for p, r in rows:
        print(f"| {p.rsplit('/', 1)[-1]} | " + " | ".join(f"{r.get(k, float('nan')):g}" for k in KEYS) + " |")
    for name, fn in (("mean", statistics.mean), ("sd", statistics.stdev)):
        if name == "sd" and len(rows) < 2:
            continue
        print(f"| {name} | " + " | ".join(f"{fn([r[k] for _, r in rows if k in r]):.4g}" for k in KEYS) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
