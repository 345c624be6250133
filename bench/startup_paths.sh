#!/usr/bin/env bash
# Diagnostic: does a warm compile cache still hit when train.py runs from another path, as
# another user, or with another HOME (what the sandbox changes)? Prints startup_seconds per case.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
source bench/h100_corpus.sh > /dev/null
C=$AUTORESEARCH_CACHE
run() {  # label, then the command
  local label=$1; shift
  local t0=$(date +%s%N)
  "$@" > "$OUT/$label.log" 2>&1
  local rc=$?
  echo "$label: startup $(grep -E '^startup_seconds' "$OUT/$label.log" | awk '{print $2}') s, wall $(( ($(date +%s%N) - t0) / 1000000 )) ms, rc $rc"
}
export AUTORESEARCH_TIME_BUDGET=2
run A_repo_warm python3 model/train.py
mkdir -p /tmp/elsewhere && cp model/*.py /tmp/elsewhere/
run B_other_path python3 /tmp/elsewhere/train.py
run C_other_path_again python3 /tmp/elsewhere/train.py
rm -rf /tmp/cc && cp -a "$C/inductor" /tmp/cc && cp -a "$C/pycache" /tmp/cc/pycache 2>/dev/null; mkdir -p /tmp/h && chmod 777 /tmp/h
run D_copied_cache_root env TORCHINDUCTOR_CACHE_DIR=/tmp/cc TRITON_CACHE_DIR=/tmp/cc/triton HOME=/tmp/h python3 /tmp/elsewhere/train.py
rm -rf /tmp/cc2 && cp -a "$C/inductor" /tmp/cc2 && chown -R nobody /tmp/cc2 /tmp/h /tmp/elsewhere
run E_copied_cache_nobody setpriv --reuid nobody --regid nogroup --clear-groups env TORCHINDUCTOR_CACHE_DIR=/tmp/cc2 TRITON_CACHE_DIR=/tmp/cc2/triton HOME=/tmp/h PYTHONPYCACHEPREFIX=/tmp/cc2/pycache python3 /tmp/elsewhere/train.py
tail -3 "$OUT/E_copied_cache_nobody.log"
du -sh "$C/inductor" /tmp/cc2 2>/dev/null
