#!/usr/bin/env bash
# The sandbox on a GPU. The baseline train.py first runs in-process for a short
# budget (its own evaluation, timed); then the same file runs through
# `python -m node experiment` for the full budget (its compile cache is the sandbox's
# own: in-process caches record other paths and keys, see bench/RESULTS.md), where the
# harness drives the evaluation over CUDA IPC. Prints both, the overhead and what each
# phase of the harness's evaluation took.
#
#   BUDGET=300 SHORT=20 bash bench/h100_sandbox.sh     # on the GPU machine
#
# Logs go to $OUT (or ./bench-out).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
source bench/h100_corpus.sh
AUTORESEARCH_TIME_BUDGET=${SHORT:-20} python3 model/train.py > "$OUT/inprocess.log" 2>&1 || { tail -30 "$OUT/inprocess.log"; exit 1; }
grep -A20 '^---' "$OUT/inprocess.log"
python3 -m node experiment model/train.py --budget "${BUDGET:-300}" --json > "$OUT/sandbox.json" 2> "$OUT/sandbox.err" || true
python3 - "$OUT/inprocess.log" "$OUT/sandbox.json" <<'PY'
import json, re, sys
log, r = open(sys.argv[1]).read(), json.load(open(sys.argv[2]))
field = lambda text, key: float((re.findall(rf"^{key}:\s+([0-9.]+)", text, re.M) or ["nan"])[-1])
print("| run | status | val_bpb | startup s | training s | eval s | total s | isolation |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
ev = field(log, "eval_seconds")
print(f"| in-process | ok | {field(log, 'val_bpb'):.6f} | {field(log, 'startup_seconds'):.1f} | {field(log, 'training_seconds'):.1f} "
      f"| {ev:.1f} | {field(log, 'total_seconds'):.1f} | - |")
print(f"| sandbox | {r['status']} {','.join(r['violations'])} | {r['val_bpb'] or float('nan'):.6f} | "
      f"{field(r['log_tail'], 'startup_seconds'):.1f} | {r['training_seconds']:.1f} | {r['evaluation_seconds'] or float('nan'):.1f} "
      f"| {r['total_seconds']:.1f} | {', '.join(r['isolation'])} |")
if r["evaluation_seconds"]:
    print(f"evaluation overhead: {100 * (r['evaluation_seconds'] / ev - 1):+.1f} % ({r['evaluation_seconds']:.2f} s vs {ev:.2f} s)")
    print(f"probe_max_diff: {r['probe_max_diff']}")
    print(next((line for line in r["log_tail"].splitlines() if line.startswith("harness:")), ""))  # the evaluation's phases
if r["status"] != "ok":
    print(r["log_tail"])
PY
