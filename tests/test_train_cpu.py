import os
import re
import subprocess
import sys

from conftest import ROOT, uniform_bpb


def test_tiny_cpu_training_beats_the_untrained_model(stdlib_cache, stdlib_data):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(stdlib_cache), AUTORESEARCH_TIME_BUDGET="15",
               AUTORESEARCH_PROFILE="cpu")
    r = subprocess.run([sys.executable, "model/train.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = dict(re.findall(r"^(\w+):\s+(\S+)$", r.stdout, re.M))
    for key in ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth"):
        assert key in summary, key
    # 15 s is 25-55 steps on a 2-core machine, depending on its load: about where a unigram model
    # scores (3.9 bpb here, against 4.9 for the untrained model), so the bar is that it learned at all
    untrained = uniform_bpb(stdlib_data)
    assert int(summary["num_steps"]) > 0
    assert round(float(summary["total_tokens_M"]) * 1e6) == int(summary["num_steps"]) * 8 * 256  # exact, to the token
    assert float(summary["val_bpb"]) < 0.9 * untrained, (summary["val_bpb"], untrained)
    assert float(summary["training_seconds"]) >= 15


def test_train_refuses_missing_data(tmp_path):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(tmp_path), AUTORESEARCH_PROFILE="cpu")
    r = subprocess.run([sys.executable, "model/train.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: no prepared data in {tmp_path}: run `python -m model.prepare --source stdlib` first"]


def test_a_step_smaller_than_a_forward_pass_takes_fewer_rows(stdlib_cache, tmp_path):
    # TOTAL_BATCH_SIZE below DEVICE_BATCH_SIZE x SEQ_LEN once meant a whole forward pass anyway: an
    # edit the proposer makes first on the CPU changed nothing but the noise
    source = open(os.path.join(ROOT, "model", "train.py")).read()
    assert "    TOTAL_BATCH_SIZE = 8 * 256\n" in source
    (tmp_path / "train.py").write_text(source.replace("    TOTAL_BATCH_SIZE = 8 * 256\n", "    TOTAL_BATCH_SIZE = 512\n"))
    env = dict(os.environ, AUTORESEARCH_CACHE=str(stdlib_cache), AUTORESEARCH_TIME_BUDGET="1",
               AUTORESEARCH_PROFILE="cpu", PYTHONPATH=os.path.join(ROOT, "model"))
    r = subprocess.run([sys.executable, str(tmp_path / "train.py")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "| batch: 512 tokens |" in r.stdout
    # less than one row cannot be a step: an error, not a silent row of 256
    (tmp_path / "train.py").write_text(source.replace("    TOTAL_BATCH_SIZE = 8 * 256\n", "    TOTAL_BATCH_SIZE = 128\n"))
    r = subprocess.run([sys.executable, str(tmp_path / "train.py")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "error: TOTAL_BATCH_SIZE 128 is less than one row of 256 tokens")


def test_the_adamw_of_train_py_steps_as_torchs():
    """train.py's own AdamW (torch.optim's imports torch._dynamo, 1.2-1.4 s of every CPU start) moves
    parameters as torch.optim.AdamW does: per-group learning rates, betas and weight decay, bias
    correction from the first step, and a learning rate changed between steps."""
    import collections
    import math
    import torch
    from conftest import train_section
    ns = train_section("def adamw_update", "class Muon", torch=torch, collections=collections, math=math)
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((8, 5), (5,), (3,))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]

    def groups(ps):
        return [dict(params=[ps[0]], lr=0.05, weight_decay=0.01), dict(params=[ps[1]], lr=0.5),
                dict(params=[ps[2]], lr=0.2, betas=(0.96, 0.95))]
    a = ns["AdamW"](groups(ours), betas=(0.8, 0.95), eps=1e-10)
    b = torch.optim.AdamW(groups(theirs), betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    for step in range(6):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        for opt in (a, b):
            for group in opt.param_groups:
                group["lr"] *= 0.9 if step else 1.0
        a.step()
        b.step()
        for p, q in zip(ours, theirs):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (step, (p - q).abs().max())
