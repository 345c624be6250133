"""Where a CPU evaluation batch goes: the served forward of model/train.py's model (untrained:
weights do not change the cost) at the evaluation's batch size, and the harness's own work on
its reply (copy, bounds, cross-entropy, as sandbox/evaluate.score does it) at 1 thread and at
torch's default; --profile adds the forward's operators under the torch profiler.

    python bench/cpu_eval.py [--repeat 3] [--profile] [--file REV:model/train.py]

Needs prepared data (python -m node prepare); runs with the cpu profile.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("AUTORESEARCH_PROFILE", "cpu")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="the forward's operators under the torch profiler")
    ap.add_argument("--file", help="another train.py, as REV:PATH (git show) or a path")
    args = ap.parse_args()
    from bench import eval_overhead
    from bench.cpu_ab import source
    g = eval_overhead.untrained(source(args.file) if args.file else None)
    torch, model, prepare = g["torch"], g["model"], g["prepare"]
    model.eval()
    B, T, V = g["DEVICE_BATCH_SIZE"], prepare.MAX_SEQ_LEN, prepare.VOCAB_SIZE
    x = torch.randint(0, V, (B, T))
    print(f"threads {torch.get_num_threads()}, batch {B} x {T}, vocabulary {V}")
    with torch.no_grad(), g["autocast"]:
        for i in range(args.repeat):
            t = time.time()
            logits = model(x)
            print(f"served forward {i + 1}: {1000 * (time.time() - t):.0f} ms")
        if args.profile:
            with torch.profiler.profile() as prof:
                model(x)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
    targets, tb = torch.randint(0, V, (B, T)), torch.from_numpy(g["data"].token_bytes)
    spare, threads = torch.zeros_like(logits), torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        for i in range(args.repeat):
            t0 = time.time()
            spare.copy_(logits)
            t1 = time.time()
            torch.aminmax(spare)
            t2 = time.time()
            nats = sum(prepare.bpb_sums(spare[j:j + 1], targets[j:j + 1], tb)[0] for j in range(B))
            float(nats)
            t3 = time.time()
            print(f"harness, {n} thread(s), run {i + 1}: copy {1000 * (t1 - t0):.1f} ms, bounds {1000 * (t2 - t1):.1f} ms, "
                  f"cross-entropy {1000 * (t3 - t2):.1f} ms")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
