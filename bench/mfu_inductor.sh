#!/usr/bin/env bash
# Step time, MFU and kernel shares of model/train.py's compiled step under inductor settings, on one
# GPU with prepared data (shapes decide MFU, not the corpus): one bench/profile_step.py per variant,
# each a fresh process (settings change inductor's cache key, so each compiles cold once).
#   bash bench/mfu_inductor.sh base cdt=TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 tune=TORCHINDUCTOR_MAX_AUTOTUNE=1
# A variant is NAME or NAME=VAR=VALUE[,VAR=VALUE...] (values without commas); FILE=PATH there profiles
# another train.py (a file, or REV:model/train.py). Full logs go to $OUT/prof_NAME.txt; LIMIT caps each (300 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
for v in "$@"; do
  name=${v%%=*} sets=() envs=() file=model/train.py
  [ "$name" != "$v" ] && IFS=, read -ra sets <<< "${v#*=}"
  for e in ${sets[@]+"${sets[@]}"}; do
    [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || { echo "error: $v: '$e' is not VAR=VALUE" >&2; exit 2; }
    if [ "${e%%=*}" = FILE ]; then file=${e#FILE=}; else envs+=("$e"); fi
  done
  t=$(date +%s)
  env ${envs[@]+"${envs[@]}"} timeout "${LIMIT:-300}" python3 bench/profile_step.py --file "$file" > "$OUT/prof_$name.txt" 2>&1
  rc=$?
  echo "$name ($(( $(date +%s) - t )) s in all$([ $rc = 124 ] && echo ", timed out")): $(grep -E '^(first step|step time|kernel time)' "$OUT/prof_$name.txt" | tr '\n' ' ')"
  grep -iE "error|Traceback" "$OUT/prof_$name.txt" | head -3
done
