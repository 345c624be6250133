#!/usr/bin/env bash
# GPU call: the in-process evaluation timed, then a node's duty cycle (its runs under the sandbox with
# frozen models and fresh servers), on a small stdlib corpus. Carries .whl for the node's packages.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench-out} AUTORESEARCH_CACHE=/tmp/ar-duty AUTORESEARCH_PROFILE=gpu PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -m model.prepare --source stdlib > "$OUT/prepare.log" 2>&1 || { tail "$OUT/prepare.log"; exit 1; }
python3 bench/eval_overhead.py --repeat 3 2>&1 | grep -v Warning
python3 bench/duty_cycle.py --budget ${BUDGET:-30} --max-experiments ${EXPERIMENTS:-4} --home /tmp/duty-home --deadline ${DEADLINE:-480} 2>&1 | tee "$OUT/duty.txt" | grep -v "^step"
