#!/usr/bin/env bash
# The H100 yardstick of the model issue: build the corpus (bench/h100_corpus.sh),
# then train the baseline RUNS times
# under the same budget and evaluation settings and print one table.
#
#   RUNS=2 BUDGET=300 bash bench/h100_baseline.sh      # on the GPU machine
#   SHAPE=1024x6 RUNS=1 bash bench/h100_baseline.sh     # the baseline at another MODEL_DIM x DEPTH
#   SHAPE=1024x6b16 RUNS=1 bash bench/h100_baseline.sh  # ... and TOTAL_BATCH_SIZE 2**16
#   FILE=model/train_x.py RUNS=1 bash bench/h100_baseline.sh  # another train.py, in model/ (it imports prepare)
#
# Logs go to $OUT (or ./bench-out). The inductor cache lives under AUTORESEARCH_CACHE,
# so the second run of a call starts warm.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${FILE:-}" ] && [ -n "${SHAPE:-}" ]; then
  echo "error: FILE and SHAPE do not combine (SHAPE edits model/train.py)" >&2; exit 2
fi
RUNS=${RUNS:-2}
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export AUTORESEARCH_TIME_BUDGET=${BUDGET:-300}
source bench/h100_corpus.sh
source bench/shape.sh
f=${FILE:-model/train.py}
if [ -n "${SHAPE:-}" ]; then
  shape "$SHAPE"
fi
for i in $(seq "$RUNS"); do
  python3 "$f" > "$OUT/run$i.log" 2>&1 || { tail -30 "$OUT/run$i.log"; exit 1; }
  grep -A20 '^---' "$OUT/run$i.log"
done
python3 bench/summarize.py "$OUT"/run*.log
