#!/usr/bin/env bash
# 60 s runs of several train.py variants in one call: OUT=... bash bench/screen2.sh model/train.py model/train_B.py ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
t=$(date +%s); source bench/h100_corpus.sh > /dev/null; echo "prepare $(( $(date +%s) - t )) s"
python3 -c "import sys, os, torch; d = os.path.dirname(torch.__file__); print('dont_write_bytecode', sys.flags.dont_write_bytecode, 'torch dir writable', os.access(d, os.W_OK), 'pycache there', os.path.isdir(d + '/__pycache__'))"
for f in "$@"; do
  n=$(basename "$f" .py)
  AUTORESEARCH_TIME_BUDGET=${BUDGET:-60} timeout 200 python3 "$f" > "$OUT/$n.log" 2>&1
  echo "== $f"; grep -E "^(val_bpb|mfu_percent|num_steps|startup_seconds|peak_vram)" "$OUT/$n.log" | tr '\n' ' '; echo; tail -2 "$OUT/$n.log" | grep -iE "error|fail" || true
done
