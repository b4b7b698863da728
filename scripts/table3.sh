#!/usr/bin/env bash
# Table 3 of the paper: the alpha/beta grid of SPUL on SST-2, LLaMA-2-7B, p=30.
source "$(dirname "$0")/common.sh"
ALPHAS=${ALPHAS:-0.1 0.5 1.0}
BETAS=${BETAS:-0.0 0.1 0.5 1.0}
d="$OUT/table3/$DATASET"
q=${QLORA_DIR:-$OUT/table2/$DATASET/qlora}   # reuses Table 2's fine-tuned model when present
qlora "$q"
runs=()
for a in $ALPHAS; do
  for b in $BETAS; do
    spul "$q" "$d/spul-a$a-b$b" --ptuning_num_tokens=30 --alpha="$a" --beta="$b"
    evaluate "$d/spul-a$a-b$b"
    runs+=("$d/spul-a$a-b$b")
  done
done
tables "$d/table" table3_alpha_beta_llama2_7b "${runs[@]}"
