# Sourced by the bench scripts: `shape DIMxDEPTH[bBITS]` writes model/train.py at that MODEL_DIM and
# DEPTH (and, with bBITS, TOTAL_BATCH_SIZE = 2**BITS) beside it (train.py imports prepare from its
# own folder), sets f to its path, and removes it when the script exits.
SHAPED=()
shape() {
  local s=${1%b*} bits=
  [ "$s" != "$1" ] && bits=${1##*b}
  f=model/train_$1.py
  sed -e "0,/    DEPTH = [0-9]*/s//    DEPTH = ${s#*x}/" -e "0,/    MODEL_DIM = [0-9]*/s//    MODEL_DIM = ${s%x*}/" \
      ${bits:+-e "0,/    TOTAL_BATCH_SIZE = 2\*\*[0-9]*/s//    TOTAL_BATCH_SIZE = 2**$bits/"} model/train.py > "$f"
  SHAPED+=("$f")
  trap 'rm -f "${SHAPED[@]}"' EXIT
}
