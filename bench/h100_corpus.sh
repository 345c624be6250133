#!/usr/bin/env bash
# Prepare the H100 yardstick corpus: every .py file on the machine (under /opt,
# /usr/lib/python3*, /usr/local/lib; de-duplicated, 200 B to 2 MB, ~3 % of files by
# content hash for validation). Sourced by the h100_*.sh benchmarks; logs to $OUT.
export AUTORESEARCH_CACHE=${AUTORESEARCH_CACHE:-/tmp/autoresearch-bench}
export AUTORESEARCH_PROFILE=gpu
export PYTHONUNBUFFERED=1
srcs=(--source /opt --source /usr/local/lib)
for d in /usr/lib/python3*; do [ -d "$d" ] && srcs+=(--source "$d"); done
python3 -m model.prepare "${srcs[@]}" --ext .py 2>&1 | tee "$OUT/prepare.log"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
