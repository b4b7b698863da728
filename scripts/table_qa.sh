#!/usr/bin/env bash
# Table 2's multiple-choice block (paper v2): WMDP-bio questions to forget, SciQ questions to retain, on LLaMA-2-7B —
# vanilla, QLoRA, GA, RL, GA+KL, GA+GD, SPUL (p=30, alpha=1, beta=0.5), on a CUDA machine. The hub data is
# converted by utils/data.py (qa_hub_frames: a seeded 70/30 split of each side, not the paper's unpublished split);
# DATA_DIR= takes a local folder of question,choices,answer files instead (named QA_DATASET, default wmdp_bio).
# The paper gives no QA-specific hyperparameters: the SST-2 ones are used (QLORA_EPOCHS= overrides).
source "$(dirname "$0")/common.sh"
DATASET=${QA_DATASET:-wmdp_bio}
TASK=${TASK:-mcqa}
d="$OUT/table_qa/$DATASET"
evaluate "$MODEL" "$d/vanilla"
qlora "$d/qlora"
evaluate "$d/qlora"
runs=("$d/vanilla" "$d/qlora")
for m in gradient_ascent random_label gradient_ascent_kl gradient_ascent_descent; do
  baseline "$d/qlora" "$d/$m" "$m"
  evaluate "$d/$m"
  runs+=("$d/$m")
done
spul "$d/qlora" "$d/spul" --ptuning_num_tokens=30 --alpha=1.0 --beta=0.5
evaluate "$d/spul"
runs+=("$d/spul")
tables "$d/table" table2_llama2_7b "${runs[@]}"
