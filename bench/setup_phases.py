"""Where a warm start of model/train.py goes, statement by statement, and what two changes to its
setup would save: a GPU machine's time to the first optimizer step is most of a node's overhead
per experiment (bench/RESULTS.md, duty cycle).

    python3 bench/setup_phases.py [--variants base,ctx,dev] [--repeat 3] [--budget 3]

Variants of the file, run in turn (in process, the compile cache warmed by one cold run first):
  base  model/train.py as it is
  ctx   the CUDA context made by a thread started right after `import torch`, beside the imports
        and the data loading that follow
  dev   the model built on the device (`with torch.device(DEVICE)`), not on the CPU and copied
  pin1  the loader's six pinned buffers made in one allocation (model/prepare.py)
  dev+pin1  both
Prints, per variant, the median seconds since the process started at each mark, and the first
steps' times (the untimed ones included). Needs CUDA and prepared data (AUTORESEARCH_CACHE).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MARKS = [  # (statement the mark follows, mark, the mark's indent: inside the loop, at step 0 only)
    ("from torch.nn.attention.flex_attention import BlockMask, flex_attention\n", "imports", None),
    ('    sys.exit(f"error: {e}")\n', "data", None),
    ("model = GPT(data.vocab_size, data.bos_id).to(DEVICE)\n", "model", None),
    ("model.init_weights()\n", "init", None),
    ("adam, muon = make_optimizers(model)\n", "optimizers", None),
    ("loader = prepare.TrainLoader(data, rows, SEQ_LEN, DEVICE)\n", "loader", None),
    ("\nx, y, epoch = next(loader)\n", "first batch", None),
    ("            loss = train_model(x, y)\n", "forward", " " * 12),
    ("        (loss / grad_accum).backward()\n", "backward", " " * 8),
    ("    muon.step()\n", "optimizer step", " " * 4),
]
PIN_ONE = ("""            self._bufs = [torch.empty((batch_size, seq_len + 1), dtype=torch.int32, pin_memory=pin)
                          for _ in range(prefetch + 2)]""",
           """            self._bufs = list(torch.empty((prefetch + 2, batch_size, seq_len + 1), dtype=torch.int32, pin_memory=pin))""")
VARIANTS = {  # variant -> [(file, old text, new text)]
    "base": [],
    "ctx": [("train.py", "import torch\n", "import torch\nimport threading\nthreading.Thread(target=lambda: "
             "torch.cuda.is_available() and torch.zeros(1, device='cuda'), daemon=True).start()\n")],
    "dev": [("train.py", "model = GPT(data.vocab_size, data.bos_id).to(DEVICE)\n",
             "with torch.device(DEVICE):\n    model = GPT(data.vocab_size, data.bos_id)\n")],
    "pin1": [("prepare.py", *PIN_ONE)],  # the loader's pinned buffers in one allocation, not six
}
VARIANTS["dev+pin1"] = VARIANTS["dev"] + VARIANTS["pin1"]


def patched(text, variant, name):
    for file, old, new in VARIANTS[variant]:
        if file == name:
            assert text.count(old) == 1, old
            text = text.replace(old, new)
    return text


def instrumented(src, variant):
    """train.py of `variant` with a `diag_mark NAME: seconds` line after each mark's statement
    (once), and the first steps' times."""
    src = patched(src, variant, "train.py")
    for after, mark, indent in MARKS:
        if "dev" in variant and mark == "model":
            after = "    model = GPT(data.vocab_size, data.bos_id)\n"
        assert src.count(after) == 1, after
        line = f"print(f'diag_mark {mark}: {{time.time() - T_START:.3f}}', flush=True)\n"
        src = src.replace(after, after + (f"{indent}if step == 0: " + line if indent else line))
    after = "    dt = time.time() - t0\n"
    assert src.count(after) == 1
    return src.replace(after, after + "    if step < 14: print(f'diag_step {step}: {dt:.4f}', flush=True)\n")


def run(path, budget):
    env = dict(os.environ, AUTORESEARCH_TIME_BUDGET=str(budget), PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, path], cwd=os.path.dirname(path), env=env, capture_output=True, text=True,
                         timeout=600)
    out = out.stdout + out.stderr
    marks = {m: float(v) for m, v in re.findall(r"^diag_mark ([a-z ]+): ([0-9.]+)$", out, re.M)}
    steps = [float(v) for v in re.findall(r"^diag_step \d+: ([0-9.]+)$", out, re.M)]
    if not marks or not steps:
        raise SystemExit(f"{path} printed no marks:\n{out[-3000:]}")
    return marks, steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="base,ctx,dev")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget", type=float, default=3)
    args = ap.parse_args()
    variants = args.variants.split(",")
    src = open(os.path.join(ROOT, "model", "train.py")).read()
    folder = tempfile.mkdtemp(prefix="setup-phases-")
    paths = {}
    for v in variants:
        paths[v] = os.path.join(folder, v, "train.py")
        os.makedirs(os.path.dirname(paths[v]))
        with open(paths[v], "w") as f:
            f.write(instrumented(src, v))
        for name in os.listdir(os.path.join(ROOT, "model")):  # prepare.py and what it imports
            if name.endswith(".py") and name != "train.py":
                with open(os.path.join(ROOT, "model", name)) as f, open(os.path.join(folder, v, name), "w") as g:
                    g.write(patched(f.read(), v, name))
    marks, _ = run(paths["base"], args.budget)
    print(f"cold run (fills the compile cache): first optimizer step done at {marks['optimizer step']:.1f} s", flush=True)
    got = {v: [] for v in variants}
    for _ in range(args.repeat):
        for v in variants:  # interleaved: drift on the machine hits every variant alike
            got[v].append(run(paths[v], args.budget))
    names = [m for _, m, _ in MARKS]
    print("| mark (s since start, median) | " + " | ".join(variants) + " |")
    print("| --- |" + " ---: |" * len(variants))
    for m in names:
        print(f"| {m} | " + " | ".join(f"{statistics.median(r[0][m] for r in got[v]):.2f}" for v in variants) + " |")
    print("| steps 0-13, ms (median; step 0 compiles) | " + " | ".join(
        " ".join(f"{1000 * statistics.median(r[1][i] for r in got[v]):.0f}" for i in range(min(len(r[1]) for r in got[v])))
        for v in variants) + " |")
    for v in variants:
        print(f"{v}: first step done at " + ", ".join(f"{r[0]['optimizer step']:.2f}" for r in got[v]) + " s")


if __name__ == "__main__":
    main()
