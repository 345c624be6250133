#!/usr/bin/env bash
# Screening on the GPU machine, one call: prepare the corpus, a 60 s run of this
# train.py (cold compile), its warm startup (plain and under cProfile), the step
# profile, and a 60 s run of BASE_TRAIN (another train.py) for comparison.
#   OUT=... BASE_TRAIN=path/to/train.py bash bench/screen.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
export AUTORESEARCH_CACHE=/tmp/autoresearch-bench AUTORESEARCH_PROFILE=gpu PYTHONUNBUFFERED=1
srcs=(--source /opt --source /usr/local/lib)
for d in /usr/lib/python3*; do [ -d "$d" ] && srcs+=(--source "$d"); done
t=$(date +%s); python3 -m model.prepare "${srcs[@]}" --ext .py > "$OUT/prepare.log" 2>&1; echo "prepare $(( $(date +%s) - t )) s"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader
AUTORESEARCH_TIME_BUDGET=60 python3 model/train.py > "$OUT/new60.log" 2>&1; grep -E "^(step 0001|val_bpb|mfu|num_steps|startup)" "$OUT/new60.log"; tail -3 "$OUT/new60.log"
AUTORESEARCH_TIME_BUDGET=2 python3 model/train.py > "$OUT/warm.log" 2>&1; grep startup "$OUT/warm.log"
AUTORESEARCH_TIME_BUDGET=2 python3 -m cProfile -o /tmp/warm.prof model/train.py > /dev/null 2>&1
python3 -c "import pstats; pstats.Stats('/tmp/warm.prof').sort_stats('cumulative').print_stats(60)" > "$OUT/warm_cprofile.txt" 2>&1
python3 bench/profile_step.py > "$OUT/profile_new.txt" 2>&1; grep -E "^step time|^kernel time|^ +[0-9.]+ %  " "$OUT/profile_new.txt"
if [ -n "${BASE_TRAIN:-}" ]; then
  AUTORESEARCH_TIME_BUDGET=60 python3 "$BASE_TRAIN" > "$OUT/base60.log" 2>&1; grep -E "^(val_bpb|mfu|num_steps|startup)" "$OUT/base60.log"
fi
