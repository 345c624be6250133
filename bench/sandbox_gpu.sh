#!/usr/bin/env bash
# The sandbox on a GPU machine, on that machine's small stdlib corpus (start-up and evaluation
# do not depend on the corpus; bench/RESULTS.md has the figures):
#   bash bench/sandbox_gpu.sh startup [CASES]   # bench/startup_diag.py's cases (default DEEKM)
#   bash bench/sandbox_gpu.sh duty              # a node's runs: bench/duty_cycle.py (BUDGET, EXPERIMENTS, DEADLINE)
#   bash bench/sandbox_gpu.sh inproc            # model/train.py RUNS times without the sandbox (BUDGET): its own evaluation
#   bash bench/sandbox_gpu.sh overhead          # the evaluation's overhead on one machine: bench/serve_first_use.py
#                                               # (fresh servers, profiles of a first and a warm forward), then
#                                               # startup_diag.py's ABDEE (train.py's own evaluation, the harness's)
#   START=1 AUTORESEARCH_CACHE=/tmp/fresh bash bench/sandbox_gpu.sh duty   # the node starts from an edited baseline
#     (MATRIX_LR 0.04 -> 0.05): untrusted from its first run, so only its kept layer can keep it warm
# Both first time the in-process evaluation (bench/eval_overhead.py). The node needs its packages:
# carry them as wheels (the device tool's README).
set -uo pipefail
case "${1:-startup}" in startup|duty|inproc|overhead) ;;
  *) echo "usage: bash bench/sandbox_gpu.sh startup [CASES] | duty | inproc | overhead" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench-out} AUTORESEARCH_CACHE=${AUTORESEARCH_CACHE:-/tmp/ar-sandbox-gpu} AUTORESEARCH_PROFILE=gpu PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m model.prepare --source stdlib > "$OUT/prepare.log" 2>&1 || { tail "$OUT/prepare.log"; exit 1; }
python3 bench/eval_overhead.py --repeat 3 2>&1 | grep -v Warning
case "${1:-startup}" in
  startup)
    python3 bench/startup_diag.py --budget 5 --deadline 400 --cases "${2:-DEEKM}"
    for f in "$OUT"/*.log; do grep -H "^harness:" "$f"; done ;;
  duty)
    start=()
    if [ -n "${START:-}" ]; then
      mkdir -p /tmp/ar-start && sed 's/^MATRIX_LR = 0.04/MATRIX_LR = 0.05/' model/train.py > /tmp/ar-start/train.py
      cmp -s model/train.py /tmp/ar-start/train.py && { echo "the edit did not apply" >&2; exit 1; }
      start=(--start /tmp/ar-start/train.py)
    fi
    python3 bench/duty_cycle.py "${start[@]}" --budget "${BUDGET:-30}" --max-experiments "${EXPERIMENTS:-4}" --home "/tmp/duty-home${START:+-start}" \
      --deadline "${DEADLINE:-480}" 2>&1 | tee "$OUT/duty.txt" | grep -v "^step" ;;
  overhead)
    python3 bench/serve_first_use.py 2>&1 | grep -v Warning | tee "$OUT/first_use.txt"
    python3 bench/startup_diag.py --budget 5 --deadline 400 --cases ABDEE
    for f in "$OUT"/*.log; do grep -H "^harness:" "$f"; done ;;
  inproc)  # train.py alone, as without the sandbox: its own evaluation, in the process that trained
    for i in $(seq "${RUNS:-2}"); do
      AUTORESEARCH_TIME_BUDGET="${BUDGET:-30}" python3 model/train.py > "$OUT/inproc-$i.log" 2>&1
      echo "in-process run $i (rc $?): $(grep -E '^(val_bpb|startup_seconds|eval_seconds):' "$OUT/inproc-$i.log" | tr -s ' ' | paste -sd' ')"
    done ;;
esac
