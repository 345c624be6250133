import math
import os
import re
import subprocess
import sys

import numpy as np

import prepare
from conftest import ROOT


def test_tiny_cpu_training_beats_the_untrained_model(stdlib_cache, stdlib_data):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(stdlib_cache), AUTORESEARCH_TIME_BUDGET="15",
               AUTORESEARCH_PROFILE="cpu")
    r = subprocess.run([sys.executable, "model/train.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = dict(re.findall(r"^(\w+):\s+(\S+)$", r.stdout, re.M))
    for key in ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth"):
        assert key in summary, key
    # untrained: the output layer starts at ~zero, i.e. a uniform guess over the vocabulary
    rows = prepare.eval_rows(stdlib_data.val, stdlib_data.val_docs)
    b = stdlib_data.token_bytes[rows[:, 1:]]
    uniform_bpb = (b > 0).sum() * math.log2(stdlib_data.vocab_size) / b.sum()
    assert float(summary["val_bpb"]) < 0.8 * uniform_bpb, (summary["val_bpb"], uniform_bpb)
    assert float(summary["training_seconds"]) >= 15


def test_train_refuses_missing_data(tmp_path):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(tmp_path), AUTORESEARCH_PROFILE="cpu")
    r = subprocess.run([sys.executable, "model/train.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: no prepared data in {tmp_path}: run `python -m model.prepare --source stdlib` first"]
