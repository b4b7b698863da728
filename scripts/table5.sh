#!/usr/bin/env bash
# Table 5 of the paper: SST-2 on OPT-1.3B (all methods) and LLaMA-2-13B (vanilla, QLoRA, SPUL); alpha=beta=1, p=30.
source "$(dirname "$0")/common.sh"
MODELS=${MODELS:-facebook/opt-1.3b meta-llama/Llama-2-13b-hf}
for MODEL in $MODELS; do
  d="$OUT/table5/$(basename "$MODEL")"
  evaluate "$MODEL" "$d/vanilla"
  qlora "$d/qlora"
  evaluate "$d/qlora"
  runs=("$d/vanilla" "$d/qlora")
  if [ "${MODEL#*opt}" != "$MODEL" ] || [ -n "${ALL_BASELINES:-}" ]; then   # the paper ran the baselines on OPT only
    for m in gradient_ascent random_label gradient_ascent_kl gradient_ascent_descent; do
      baseline "$d/qlora" "$d/$m" "$m"; evaluate "$d/$m"; runs+=("$d/$m")
    done
  fi
  spul "$d/qlora" "$d/spul" --ptuning_num_tokens=30 --alpha=1.0 --beta=1.0
  evaluate "$d/spul"
  runs+=("$d/spul")
  case "$(basename "$MODEL" | tr '[:upper:]' '[:lower:]')" in opt*) paper=table5_opt_1.3b ;; *) paper=table5_llama2_13b ;; esac
  tables "$d/table" "$paper" "${runs[@]}"
done
