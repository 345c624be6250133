"""Where a fresh model server's first batch goes on a GPU machine: model/train.py's model
(untrained: weights do not change the cost) frozen as the sandbox freezes it, then served by
fresh processes like the sandbox's scoring and probe servers (unconfined), each timing its
warm-up, its load and its first forwards at the evaluation's batch size, under variants of
the environment; beside it, the plain in-process evaluation.

    python3 bench/serve_first_use.py [--variants default,file,eager,nowarm,profile]  (default: default,file,nowarm,profile)

`file`: the model's weights read from the frozen file, as on the CPU, instead of a device buffer
(CUDA IPC, as the sandbox hands over a CUDA model).

Needs CUDA and prepared data (AUTORESEARCH_CACHE, AUTORESEARCH_PROFILE=gpu).
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {  # name: (environment, warm-up, profile the first forward, weights through the file)
    "default": ({}, True, False, False),
    "file": ({}, True, False, True),
    "eager": ({"CUDA_MODULE_LOADING": "EAGER"}, True, False, False),
    "nowarm": ({}, False, False, False),
    "profile": ({}, True, True, False),
}


def child(args):
    t0 = time.time()
    sys.path.insert(0, os.path.join(ROOT, "model"))
    import serve
    import torch
    from model import prepare
    env, warm, profile, _ = VARIANTS[args.child]
    if warm:
        serve.warm("torch")
    else:
        torch.cuda.init()
        torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    out = {"variant": args.child, "warm": time.time() - t0}
    time.sleep(2)  # as when the candidate trains: the load comes later
    t = time.time()
    payload = serve.thaw_loaded(json.loads(args.load))
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        serve.apply_ambient(payload["ambient"], stack)
        fn, device = payload["fn"], torch.device(payload["device"])
        torch.cuda.synchronize()
        out["load"] = time.time() - t
        B, T, V = args.batch, prepare.MAX_SEQ_LEN, prepare.VOCAB_SIZE
        x = torch.randint(0, V, (B, T), dtype=torch.int32).numpy()
        for i in range(args.forwards):
            ctx = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                   if profile and i in (0, 2) else contextlib.nullcontext())  # the first, and one warm
            with ctx as prof:
                t = time.time()
                logits = fn(torch.from_numpy(x).to(device).long())
                torch.cuda.synchronize()
                t_fwd = time.time() - t
                shared = prepare.cuda_ipc_export(logits.data_ptr())  # as serve.py replies: in place
                out.setdefault("allocations", set()).add(shared["handle"])
            out[f"forward{i}"], out[f"reply{i}"] = t_fwd, time.time() - t
            logits = None
            if prof is not None:
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
                print(f"forward {i}:\n{table}", file=sys.stderr)
    out["allocations"] = len(out["allocations"])
    print(json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="default,file,nowarm,profile")
    ap.add_argument("--forwards", type=int, default=4)
    ap.add_argument("--child"), ap.add_argument("--load")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    if args.child:
        return child(args)
    from bench.eval_overhead import untrained
    g = untrained()
    torch, prepare, model, data = g["torch"], g["prepare"], g["model"], g["data"]
    sys.path.insert(0, os.path.join(ROOT, "model"))
    import serve
    from sandbox import servers
    model.eval()
    for i in range(2):
        g["sync"]()
        t = time.time()
        with g["autocast"]:
            prepare.evaluate_bpb(model, data, g["DEVICE_BATCH_SIZE"], g["DEVICE"])
        g["sync"]()
        print(f"in-process evaluation {i + 1}: {time.time() - t:.2f} s", flush=True)
    frozen = {}  # weights through the file or not: (fd, "load" request)
    for file in (True, False, True, False):
        source = servers.freeze_file(4 << 30)
        t = time.time()
        with g["autocast"]:
            payload = dict(framework="torch", fn=model, device="cuda:0", ambient=serve.ambient())
            size, weights = serve.freeze(payload, source, "torch", device_weights=not file)
        t_save = time.time() - t
        assert servers.seal(source, size)
        print(f"frozen: {size / 1e6:.1f} MB in the file, {weights['bytes'] / 1e6 if weights else 0:.1f} MB in a device "
              f"buffer, in {t_save:.3f} s; sealed in {time.time() - t - t_save:.3f} s", flush=True)
        load = {"op": "load", "size": size}
        if weights:  # served straight from the candidate's buffer here: no harness copy in this benchmark
            load["weights"] = dict(prepare.cuda_ipc_export(weights["address"]), bytes=weights["bytes"], device="cuda:0")
        frozen[file] = (source, load)
    del model
    torch.cuda.empty_cache()
    rows = []
    for name in args.variants.split(","):
        # as the sandbox's servers: without train.py's allocator setting, whose expandable segments
        # cannot be shared in place (the parent imported train.py, which sets it)
        fd, load = frozen[VARIANTS[name][3]]
        env = dict({k: v for k, v in os.environ.items() if k != "PYTORCH_ALLOC_CONF"}, **VARIANTS[name][0],
                   **{serve.MODEL_ENV: str(fd)})
        p = subprocess.run([sys.executable, __file__, "--child", name, "--load", json.dumps(load),
                            "--forwards", str(args.forwards), "--batch", str(args.batch)],
                           pass_fds=[fd], env=env, capture_output=True, text=True)
        if p.returncode:
            print(f"{name}: exit {p.returncode}\n{p.stderr[-3000:]}")
            continue
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        if p.stderr.strip():
            print(f"--- {name} stderr ---\n{p.stderr[-6000:]}")
    keys = ["warm", "load"] + [f"{k}{i}" for i in range(args.forwards) for k in ("forward", "reply")] + ["allocations"]
    print("| variant | " + " | ".join(keys) + " |")
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join(f"{r.get(k, float('nan')):.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
