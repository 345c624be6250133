"""Where a training step of model/train.py spends its time, by the torch profiler.
A few steps, then the table of operations (CUDA: kernels of the compiled step; CPU: operators, eager).

    python bench/profile_step.py [--file model/train.py] [--threads N]

Needs prepared data. On a CPU it profiles the cpu profile's model (`AUTORESEARCH_PROFILE=cpu` is
the default there); `--file` takes another train.py (a file, or `REV:model/train.py`).
"""
import argparse
import os
import sys
import time

import cpu_ab  # bench/, beside this file: a file or REV:PATH

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--file", default=os.path.join(root, "model", "train.py"))
ap.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
args = ap.parse_args()
src = cpu_ab.source(args.file)
sys.argv = ["train.py"]
sys.path.insert(0, root + "/model")
import torch  # noqa: E402
from torch.profiler import profile, ProfilerActivity  # noqa: E402

if args.threads:
    torch.set_num_threads(args.threads)
src = src[:src.index("x, y, epoch = next(loader)")]
g = {"__file__": root + "/model/train.py", "__name__": "prof"}
exec(compile(src, "train.py", "exec"), g)
loader, train_model, adam, muon, model, grad_accum = (g[k] for k in ("loader", "train_model", "adam", "muon", "model", "grad_accum"))
cuda = g["DEVICE"] == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)


def step():
    for _ in range(grad_accum):
        x, y, _ = next(loader)
        with g["autocast"]:
            loss = train_model(x, y)
        (loss / grad_accum).backward()
    adam.step(); muon.step(); model.zero_grad(set_to_none=True)
    return loss.item()


t = time.time()
step()
sync(); print(f"first step {time.time() - t:.1f} s{' (compiling)' if cuda else ''}")
for _ in range(5 if cuda else 2):
    step()
n = 20 if cuda else 5
sync(); t = time.time()
for _ in range(n):
    step()
sync(); dt = (time.time() - t) / n
mfu = f", MFU {100 * g['flops_per_token'] * g['batch_tokens'] / dt / g['peak']:.2f} %" if g["peak"] else ""
print(f"step time {dt * 1000:.1f} ms over {n} steps ({g['DEVICE']}, {torch.get_num_threads()} threads){mfu}")
with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as p:
    for _ in range(3):
        step()
    sync()
print(p.key_averages().table(sort_by="cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30,
                             max_name_column_width=70))


def kind(name):  # kernel name -> share-table row
    n = name.lower()
    if "flex" in n:
        return "flex attention backward" if "backward" in n else "flex attention forward"
    if "nvjet" in n or "gemm" in n or "cutlass" in n or "xmma" in n:
        return "matrix products (cuBLAS)"
    if "softmax" in n:
        return "log-softmax (cross-entropy)"
    if n.startswith("triton_"):
        return "other fused Triton kernels (norms, activations, casts, optimizer)"
    return "other: " + name[:40]


if cuda:
    shares = {}
    for e in p.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            shares[kind(e.key)] = shares.get(kind(e.key), 0) + t
    total = sum(shares.values())
    print(f"kernel time per step {total / 3e3:.1f} ms; shares:")
    for k, t in sorted(shares.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {100 * t / total:5.1f} %  {t / 3e3:6.1f} ms  {k}")
