#!/usr/bin/env bash
# Figure 2 of the paper: the number of soft prompt tokens p in 10..50, SPUL on SST-2, LLaMA-2-7B, alpha=1, beta=0.5.
source "$(dirname "$0")/common.sh"
PS=${PS:-10 20 30 40 50}
d="$OUT/figure2/$DATASET"
q=${QLORA_DIR:-$OUT/table2/$DATASET/qlora}
qlora "$q"
runs=()
for p in $PS; do
  spul "$q" "$d/spul-p$p" --ptuning_num_tokens="$p" --alpha=1.0 --beta=0.5
  evaluate "$d/spul-p$p"
  runs+=("$d/spul-p$p")
done
tables "$d/table" none "${runs[@]}"   # the paper reports Figure 2 as a plot only
