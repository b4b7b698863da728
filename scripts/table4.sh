#!/usr/bin/env bash
# Table 4 of the paper: forget-set size tau in {0.25, 0.5, 1.0} (seed 42), SPUL alpha=beta=1, p=30, SST-2.
source "$(dirname "$0")/common.sh"
SIZES=${SIZES:-0.25 0.5 1.0}
d="$OUT/table4/$DATASET"
q=${QLORA_DIR:-$OUT/table2/$DATASET/qlora}
qlora "$q"
runs=()
for t in $SIZES; do
  spul "$q" "$d/spul-f$t" --ptuning_num_tokens=30 --alpha=1.0 --beta=1.0 --forget_size="$t"
  evaluate "$d/spul-f$t" --forget_size="$t"
  runs+=("$d/spul-f$t")
done
tables "$d/table" table4_forget_size_llama2_7b "${runs[@]}"
