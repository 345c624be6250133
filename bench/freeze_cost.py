"""What freezing a model costs at the hand-over (model/serve.py's freeze into a sealed file),
with and without torch.save's CRC32 of every record, on the CPU or on CUDA.

    python bench/freeze_cost.py [--mb 160] [--device cpu|cuda] [--repeat 3]

Prints one row per setting: the median seconds of --repeat freezes of a model of --mb
megabytes of float32 weights (model/train.py's GPU baseline freezes 160 MB).
"""
import argparse
import contextlib
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
    from torch.utils.serialization import config
    from sandbox import servers
    layers = max(1, args.mb * 10**6 // (4 * 2048 * 2048))
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(layers)]).to(args.device)
    payload = dict(framework="torch", fn=model, device=args.device, ambient=serve.ambient())
    print(f"| {layers * 2048 * 2048 * 4 / 1e6:.0f} MB on {args.device} | seconds (median of {args.repeat}) |")
    print("| --- | ---: |")
    for name, crc in (("torch.save as is (CRC32 of each record)", True), ("serve.freeze (no CRC32)", False)):
        times = []
        for _ in range(args.repeat):
            fd = servers.freeze_file(4 << 30)
            try:
                with contextlib.ExitStack() as stack:
                    if crc:  # serve.freeze turns it off; undo that for the baseline row
                        stack.enter_context(_crc_on(serve, config))
                    t = time.time()
                    serve.freeze(payload, fd, "torch")
                    times.append(time.time() - t)
            finally:
                os.close(fd)
        print(f"| {name} | {statistics.median(times):.3f} |")


@contextlib.contextmanager
def _crc_on(serve, config):
    off = serve._no_checksums
    serve._no_checksums = contextlib.nullcontext
    before, config.save.compute_crc32 = config.save.compute_crc32, True
    try:
        yield
    finally:
        serve._no_checksums, config.save.compute_crc32 = off, before


if __name__ == "__main__":
    main()
