#!/usr/bin/env bash
# GPU call: startup and compile-cache diagnosis (bench/startup_diag.py) on a small stdlib corpus.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench-out} AUTORESEARCH_CACHE=/tmp/ar-diag AUTORESEARCH_PROFILE=gpu PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"
mount | grep -E " /tmp | / " | head -3
t=$(date +%s); python3 -m model.prepare --source stdlib > "$OUT/prepare.log" 2>&1; echo "prepare rc $? $(( $(date +%s) - t )) s"; tail -4 "$OUT/prepare.log"
python3 bench/startup_diag.py --budget 5 --deadline 470 "$@"
