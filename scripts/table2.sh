#!/usr/bin/env bash
# Table 2 of the paper: SST-2 and Yelp on LLaMA-2-7B — vanilla, QLoRA, GA, RL, GA+KL, GA+GD, SPUL.
# SPUL with p=30, alpha=1, beta=0.5 (the paper's main setting). Override MODEL=, DATA_DIR=, DATASETS=, METHODS=.
source "$(dirname "$0")/common.sh"
DATASETS=${DATASETS:-sst2 yelp}
METHODS=${METHODS:-gradient_ascent random_label gradient_ascent_kl gradient_ascent_descent}
for DATASET in $DATASETS; do
  if [ -n "$DATA_DIR" ] && [ "$DATASET" != sst2 ]; then continue; fi   # a local folder holds one dataset
  d="$OUT/table2/$DATASET"
  evaluate "$MODEL" "$d/vanilla"
  qlora "$d/qlora"
  evaluate "$d/qlora"
  runs=("$d/vanilla" "$d/qlora")
  for m in $METHODS; do
    baseline "$d/qlora" "$d/$m" "$m"
    evaluate "$d/$m"
    runs+=("$d/$m")
  done
  spul "$d/qlora" "$d/spul" --ptuning_num_tokens=30 --alpha=1.0 --beta=0.5
  evaluate "$d/spul"
  runs+=("$d/spul")
  tables "$d/table" table2_llama2_7b "${runs[@]}"
done
