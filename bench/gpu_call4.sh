#!/usr/bin/env bash
# GPU call: the in-process evaluation timed, then start-up cases under the sandbox (bench/startup_diag.py),
# including a kept candidate's compiled layer serving its child. Small stdlib corpus.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench-out} AUTORESEARCH_CACHE=/tmp/ar-diag AUTORESEARCH_PROFILE=gpu PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -m model.prepare --source stdlib > "$OUT/prepare.log" 2>&1 || { tail "$OUT/prepare.log"; exit 1; }
python3 bench/eval_overhead.py --repeat 3 2>&1 | grep -v Warning
python3 bench/startup_diag.py --budget 5 --deadline 400 --cases "${CASES:-DEEKM}"
for f in "$OUT"/*.log; do grep -H "^harness:\|probe_max\|warming" "$f"; done
