# Sourced by the bench scripts: `shape DIMxDEPTH` writes model/train.py at that MODEL_DIM and DEPTH
# beside it (train.py imports prepare from its own folder), sets f to its path, and removes it when
# the script exits.
SHAPED=()
shape() {
  f=model/train_$1.py
  sed -e "0,/    DEPTH = [0-9]*/s//    DEPTH = ${1#*x}/" -e "0,/    MODEL_DIM = [0-9]*/s//    MODEL_DIM = ${1%x*}/" model/train.py > "$f"
  SHAPED+=("$f")
  trap 'rm -f "${SHAPED[@]}"' EXIT
}
