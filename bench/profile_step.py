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
