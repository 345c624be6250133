"""The MLX baseline against the torch baseline on this machine, at matched model sizes:
optimizer steps per second (Muon + AdamW, one micro-batch per step), and the largest logit
difference when both models hold the same weights.

    python -m model.prepare --source stdlib --max-mb 3     # once
    AUTORESEARCH_PROFILE=cpu python bench/mlx_vs_torch.py [--depth 2 --dim 64 --head-dim 32 --batch 2 --steps 10]

Each file's model and optimizer code is taken as shipped (everything above its "Setup"
section), with the size constants of the branch this device runs replaced.
"""

import argparse
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "model"))
os.environ.setdefault("AUTORESEARCH_PROFILE", "cpu")

import numpy as np  # noqa: E402

import prepare  # noqa: E402


def load(name, sizes):
    """The namespace of model/<name> down to its Setup section, with `sizes` in its non-CUDA/non-GPU branch."""
    path = os.path.join(ROOT, "model", name)
    src = open(path).read().split("# Setup")[0].rsplit("# ----", 1)[0]
    head, tail = src.split("\nelse:", 1)
    for k, v in sizes.items():
        tail, n = re.subn(rf"^(\s*){k} = [^#\n]*", rf"\g<1>{k} = {v}", tail, count=1, flags=re.M)
        assert n == 1, k
    ns = {"__file__": path, "__name__": name}
    exec(compile(head + "\nelse:" + tail, path, "exec"), ns)
    return ns


def bench_torch(T, data, batches, steps):
    import torch
    torch.manual_seed(0)
    model = T["GPT"](data.vocab_size, data.bos_id)
    model.init_weights()
    adam, muon = T["make_optimizers"](model)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        x, y = (torch.from_numpy(b.astype(np.int64)) for b in batches[i % len(batches)])
        t0 = time.perf_counter()
        model(x, y).backward()
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return model, sorted(times[2:])[len(times[2:]) // 2]


def bench_mlx(M, data, batches, steps):
    import mlx.core as mx
    import mlx.nn as nn
    mx.random.seed(0)
    model = M["GPT"](data.vocab_size, data.bos_id)
    model.init_weights()
    optimizer, _ = M["make_optimizer"](model)
    loss_and_grad = nn.value_and_grad(model, lambda x, y: nn.losses.cross_entropy(model(x), y, reduction="mean"))
    times = []
    for i in range(steps + 2):
        x, y = (mx.array(b) for b in batches[i % len(batches)])
        t0 = time.perf_counter()
        _, grads = loss_and_grad(x, y)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        times.append(time.perf_counter() - t0)
    return model, sorted(times[2:])[len(times[2:]) // 2]


def same_weights_logits(tmodel, mmodel, data):
    """Copy the torch model's weights (blocks' zero-initialised projections made non-trivial)
    into the MLX model; the largest logit difference on two validation rows."""
    import mlx.core as mx
    import torch
    from mlx.utils import tree_flatten, tree_unflatten
    rng = np.random.default_rng(0)
    sd = {k: v.detach().float().numpy() for k, v in tmodel.state_dict().items()}
    for k in sd:
        if "proj" in k or "ve_gate" in k or "lm_head" in k:
            sd[k] = rng.normal(0, 0.05, sd[k].shape).astype(np.float32)
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    mmodel.update(tree_unflatten([(k, mx.array(sd[k.replace("value_embeds.layer", "value_embeds.")]))
                                  for k, _ in tree_flatten(mmodel.parameters())]))
    rows = prepare.eval_rows(data.val, data.val_docs)[:2, :-1]
    with torch.no_grad():
        lt = tmodel(torch.from_numpy(rows)).numpy()
    lm = np.asarray(mmodel(mx.array(rows.astype(np.int32))))
    return float(np.abs(lt - lm).max()), float(np.abs(lt).max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2, help="rows of MAX_SEQ_LEN tokens per step")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    sizes = dict(DEPTH=args.depth, MODEL_DIM=args.dim, HEAD_DIM=args.head_dim, DEVICE_BATCH_SIZE=args.batch)
    data = prepare.load_data()
    T, M = load("train.py", sizes), load("train_mlx.py", sizes)
    loader = prepare.TrainLoader(data, args.batch, prepare.MAX_SEQ_LEN, None)
    batches = [next(loader)[:2] for _ in range(4)]
    tokens = args.batch * prepare.MAX_SEQ_LEN
    import mlx.core as mx
    import torch
    print(f"depth {args.depth}, dim {args.dim}, head_dim {args.head_dim}, {tokens} tokens per step "
          f"(profile {prepare.PROFILE}); torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"mlx {mx.__version__} on the {'gpu' if mx.default_device() == mx.gpu else 'cpu'}")
    tmodel, t_step = bench_torch(T, data, batches, args.steps)
    mmodel, m_step = bench_mlx(M, data, batches, args.steps)
    for name, dt in (("torch", t_step), ("mlx", m_step)):
        print(f"{name:<6} {1 / dt:8.2f} steps/s  {tokens / dt:10,.0f} tokens/s  (median of {args.steps} steps)")
    diff, scale = same_weights_logits(tmodel, mmodel, data)
    print(f"same weights: largest logit difference {diff:.2e} (logits up to {scale:.2f})")


if __name__ == "__main__":
    main()
