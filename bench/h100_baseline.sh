#!/usr/bin/env bash
# The H100 yardstick of the model issue: build the corpus of every .py file on the
# machine (under /opt, /usr/lib/python3*, /usr/local/lib; de-duplicated, 200 B to 2 MB,
# ~3 % of files by content hash for validation), then train the baseline RUNS times
# under the same budget and evaluation settings and print one table.
#
#   RUNS=2 BUDGET=300 bash bench/h100_baseline.sh      # on the GPU machine
#
# Logs go to $OUT (or ./bench-out). The inductor cache lives under AUTORESEARCH_CACHE,
# so the second run of a call starts warm.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-2}
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export AUTORESEARCH_CACHE=${AUTORESEARCH_CACHE:-/tmp/autoresearch-bench}
export AUTORESEARCH_PROFILE=gpu
export AUTORESEARCH_TIME_BUDGET=${BUDGET:-300}
export PYTHONUNBUFFERED=1
srcs=(--source /opt --source /usr/local/lib)
for d in /usr/lib/python3*; do [ -d "$d" ] && srcs+=(--source "$d"); done
python3 -m model.prepare "${srcs[@]}" --ext .py 2>&1 | tee "$OUT/prepare.log"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
for i in $(seq "$RUNS"); do
  python3 model/train.py > "$OUT/run$i.log" 2>&1 || { tail -30 "$OUT/run$i.log"; exit 1; }
  grep -A20 '^---' "$OUT/run$i.log"
done
python3 bench/summarize.py "$OUT"/run*.log
