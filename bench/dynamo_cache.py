"""Whether torch's own Dynamo cache (caching_precompile) could save a warm start's tracing:
a compiled toy's first forward and backward in a second process, with the inductor cache alone
and with Dynamo's cache too, then the second process after a module constant changed (what a
candidate's edit of train.py does). CPU is enough; prints one line per case.

    python bench/dynamo_cache.py
"""

import os
import subprocess
import sys
import tempfile

MODULE = """import torch
CAP = {cap}
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(64, 64) for _ in range(12)])
    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x)) * 1.5 + x.sin()
        return (CAP * torch.tanh(x / CAP)).sum()
"""

RUN = """import os, sys, time
import torch
torch._dynamo.config.caching_precompile = bool(int(sys.argv[1]))
import toy
torch.manual_seed(0)
m = torch.compile(toy.M(), dynamic=False)
t = time.time()
m(torch.randn(8, 64)).backward()
print(f"{time.time() - t:.2f}")
if torch._dynamo.config.caching_precompile:
    torch.compiler.save_cache_artifacts()  # writes Dynamo's entries beside the inductor cache
"""


def main():
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "run.py"), "w") as f:
            f.write(RUN)

        def run(precompile, cap, cache):
            with open(os.path.join(d, "toy.py"), "w") as f:
                f.write(MODULE.format(cap=cap))
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(d, cache), PYTHONDONTWRITEBYTECODE="1")
            p = subprocess.run([sys.executable, "run.py", str(precompile)], cwd=d, env=env, capture_output=True, text=True)
            if p.returncode:
                return "crashed: " + (p.stderr.strip().splitlines() or ["?"])[-1]
            return p.stdout.strip().splitlines()[-1] + " s"

        for precompile, name in ((0, "inductor cache"), (1, "inductor + Dynamo cache")):
            cache = f"cache{precompile}"
            print(f"{name}: first process {run(precompile, 15, cache)}, second {run(precompile, 15, cache)}, "
                  f"after a constant changed {run(precompile, 20, cache)}", flush=True)


if __name__ == "__main__":
    main()
