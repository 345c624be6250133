#!/usr/bin/env bash
# A node whose first run is untrusted (started with --start FILE, or joining a swarm's task):
# no trusted baseline ever fills the shared bytecode cache. Runs one edited baseline twice under
# the sandbox on a fresh cache and prints each run's startup (launch to first step), compile
# included the first time; the harness compiles torch's bytecode once before the first.
#   bash bench/untrusted_first.sh [BUDGET]      # on a GPU machine: the gpu profile
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench-out} AUTORESEARCH_CACHE=${AUTORESEARCH_CACHE:-/tmp/ar-untrusted-first} PYTHONUNBUFFERED=1
mkdir -p "$OUT" /tmp/ar-candidate
python3 -m model.prepare --source stdlib --max-mb 5 > "$OUT/prepare.log" 2>&1 || { tail "$OUT/prepare.log"; exit 1; }
sed 's/^MATRIX_LR = 0.04/MATRIX_LR = 0.05/' model/train.py > /tmp/ar-candidate/train.py
cmp -s model/train.py /tmp/ar-candidate/train.py && { echo "the edit did not apply" >&2; exit 1; }
echo "| run | status | wall s | startup s | training s (launch to hand-over) | evaluation s |"
echo "| --- | --- | --- | --- | --- | --- |"
for i in 1 2; do
  t0=$(date +%s.%N)
  python3 -m node experiment /tmp/ar-candidate/train.py --budget "${1:-5}" --json > "$OUT/untrusted-$i.json" 2> "$OUT/untrusted-$i.err"
  wall=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
  python3 - "$OUT/untrusted-$i.json" "$i" "$wall" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1]))
start = re.findall(r"^startup_seconds:\s+([0-9.]+)", r["log_tail"], re.M)
print(f"| {sys.argv[2]} | {r['status']} | {sys.argv[3]} | {start[-1] if start else '-'} | {r['training_seconds']} | {r['evaluation_seconds']} |")
PY
done
