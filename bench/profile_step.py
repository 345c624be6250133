"""Where a training step of model/train.py spends its GPU time: a few compiled steps under
the torch profiler, then the kernel table (needs CUDA and prepared data).

    python bench/profile_step.py
"""
import os, sys, time
sys.argv = ["train.py"]
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root + "/model")
src = open(root + "/model/train.py").read()
src = src[:src.index("x, y, epoch = next(loader)")]
g = {"__file__": root + "/model/train.py", "__name__": "prof"}
exec(compile(src, "train.py", "exec"), g)
torch, loader, train_model, adam, muon, model, grad_accum = (g[k] for k in ("torch", "loader", "train_model", "adam", "muon", "model", "grad_accum"))
def step():
    for _ in range(grad_accum):
        x, y, _ = next(loader)
        with g["autocast"]:
            loss = train_model(x, y)
        (loss / grad_accum).backward()
    adam.step(); muon.step(); model.zero_grad(set_to_none=True)
    return loss.item()
for _ in range(6):
    step()
torch.cuda.synchronize(); t = time.time()
for _ in range(5):
    step()
torch.cuda.synchronize(); print(f"step time {(time.time() - t) / 5 * 1000:.1f} ms")
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as p:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))

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

shares = {}
for e in p.key_averages():
    t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    if t > 0:
        shares[kind(e.key)] = shares.get(kind(e.key), 0) + t
total = sum(shares.values())
print(f"kernel time per step {total / 3e3:.1f} ms; shares:")
for k, t in sorted(shares.items(), key=lambda kv: -kv[1])[:12]:
    print(f"  {100 * t / total:5.1f} %  {t / 3e3:6.1f} ms  {k}")
