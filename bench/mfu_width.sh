#!/usr/bin/env bash
# MFU of wider or deeper variants of model/train.py on one GPU, short runs on prepared data
# (MFU depends on the shapes, not the corpus): the shipped file first, then each DIMxDEPTH.
#   BUDGET=25 bash bench/mfu_width.sh 768x8 640x8     # prints one line per variant
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/shape.sh
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
for v in base "$@"; do
  f=model/train.py
  if [ "$v" != base ]; then
    shape "$v"
  fi
  AUTORESEARCH_TIME_BUDGET=${BUDGET:-25} timeout 240 python3 "$f" > "$OUT/mfu_$v.log" 2>&1
  echo "$v: $(grep -E '^(val_bpb|mfu_percent|num_steps|num_params_M|peak_vram_mb|startup_seconds)' "$OUT/mfu_$v.log" | tr -s ' ' | tr '\n' ' ')"
  tail -3 "$OUT/mfu_$v.log" | grep -iE "error|fail" || true
done
