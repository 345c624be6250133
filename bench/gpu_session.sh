#!/usr/bin/env bash
# The evaluation's overhead under the sandbox against train.py's own, on one GPU machine, and the
# same for an earlier tree in the same call (bench/RESULTS.md has the figures):
#   git archive REV | (mkdir -p .old && tar -x -C .old)   # here, before the call: the tree to compare with
#   bash bench/gpu_session.sh measure                     # on the device, carrying .old and the wheels
#       startup_diag.py ADE (or $CASES) on this tree (A: train.py in process, its own eval_seconds; D: the sandbox's
#       first, compiling run; E: a warm one, the harness's phases), then E on .old, same compile cache;
#       FIRST_USE=1 adds serve_first_use.py: a fresh server's load and first forwards, weights from a device buffer or the file
#   bash bench/gpu_session.sh duty [BUDGET]               # a node run: two baseline runs and one candidate
# The node needs its packages: .whl holds them as cp312 wheels (the device tool's README).
set -uo pipefail
case "${1:-measure}" in measure|duty) ;; *) echo "usage: bash bench/gpu_session.sh measure | duty [BUDGET]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench-out} AUTORESEARCH_CACHE=${AUTORESEARCH_CACHE:-/tmp/ar-session} AUTORESEARCH_PROFILE=gpu PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
[ -d /tmp/site ] || pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1 || { tail /tmp/pip.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m model.prepare --source stdlib > /tmp/prepare.log 2>&1 || { tail /tmp/prepare.log; exit 1; }
case "${1:-measure}" in
  measure)
    if [ -n "${FIRST_USE:-}" ]; then
      python3 bench/serve_first_use.py --variants default,file,default,file 2>&1 | grep -v Warning > "$OUT/first_use.txt"
      grep -v "^ \|^-\|^Name\|^Self" "$OUT/first_use.txt" | head -40
    fi
    python3 bench/startup_diag.py --budget 5 --deadline 400 --cases "${CASES:-ADE}" | grep -v "^diag"
    for f in "$OUT"/*.log; do grep -H "^harness:\|^eval_seconds:" "$f"; done
    if [ -d .old ]; then
      (cd .old && OUT=/tmp/old-out python3 bench/startup_diag.py --budget 5 --deadline 400 --cases E | grep -v "^diag")
      for f in /tmp/old-out/*.log; do grep -H "^harness:" "$f"; done
    fi ;;
  duty)
    python3 bench/duty_cycle.py --budget "${2:-150}" --max-experiments 1 --home /tmp/duty-home --deadline 560 2>&1 \
      | tee "$OUT/duty.txt" | grep -v "^step" ;;
esac
