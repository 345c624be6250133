"""What freezing a model costs at the hand-over (model/serve.py's freeze), on the CPU or on CUDA:
its weights written into the sealed file, and, on CUDA, copied into one device buffer instead
(what the sandbox takes over CUDA IPC).

    python bench/freeze_cost.py [--mb 160] [--device cpu|cuda] [--repeat 3]

Prints one row per way: the median seconds of --repeat freezes of a model of --mb megabytes
of float32 weights (model/train.py's GPU baseline freezes 160 MB).
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "model")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=160)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import serve
    import torch
    from model import prepare
    from sandbox import servers
    layers = max(1, args.mb * 10**6 // (4 * 2048 * 2048))
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(layers)]).to(args.device)
    payload = dict(framework="torch", fn=model, device=args.device, ambient=serve.ambient())
    print(f"| {layers * 2048 * 2048 * 4 / 1e6:.0f} MB on {args.device} | seconds (median of {args.repeat}) |")
    print("| --- | ---: |")
    ways = [("weights into the file", False)] + ([("weights into a device buffer", True)] if args.device != "cpu" else [])
    for name, device_weights in ways:
        times = []
        for _ in range(args.repeat):
            fd = servers.freeze_file(4 << 30)
            try:
                t = time.time()
                _, weights = serve.freeze(payload, fd, "torch", device_weights)
                times.append(time.time() - t)
                if weights:
                    prepare.cuda_free(weights["address"])
            finally:
                os.close(fd)
        print(f"| {name} | {statistics.median(times):.3f} |")


if __name__ == "__main__":
    main()
