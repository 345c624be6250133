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
