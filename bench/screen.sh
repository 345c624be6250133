#!/usr/bin/env bash
# Screening on the GPU machine, one call: prepare the corpus, a 60 s run of this
# train.py (cold compile), its warm startup (plain and under cProfile), the step
# profile, and a 60 s run of BASE_TRAIN (another train.py) for comparison.
#   OUT=... BASE_TRAIN=path/to/train.py bash bench/screen.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
t=$(date +%s); source bench/h100_corpus.sh > /dev/null; echo "prepare $(( $(date +%s) - t )) s"
cat "$OUT/gpu.txt"
AUTORESEARCH_TIME_BUDGET=60 python3 model/train.py > "$OUT/new60.log" 2>&1; grep -E "^(step 0001|val_bpb|mfu|num_steps|startup)" "$OUT/new60.log"; tail -3 "$OUT/new60.log"
AUTORESEARCH_TIME_BUDGET=2 python3 model/train.py > "$OUT/warm.log" 2>&1; grep startup "$OUT/warm.log"
AUTORESEARCH_TIME_BUDGET=2 python3 -m cProfile -o /tmp/warm.prof model/train.py > /dev/null 2>&1
python3 -c "import pstats; pstats.Stats('/tmp/warm.prof').sort_stats('cumulative').print_stats(60)" > "$OUT/warm_cprofile.txt" 2>&1
python3 bench/profile_step.py > "$OUT/profile_new.txt" 2>&1; grep -E "^step time|^kernel time|^ +[0-9.]+ %  " "$OUT/profile_new.txt"
if [ -n "${BASE_TRAIN:-}" ]; then
  AUTORESEARCH_TIME_BUDGET=60 python3 "$BASE_TRAIN" > "$OUT/base60.log" 2>&1; grep -E "^(val_bpb|mfu|num_steps|startup)" "$OUT/base60.log"
fi
