#!/usr/bin/env bash
# The SPUL trade-off curve at CPU scale (docs/spul_cpu_scale.md): one qlora.py model on SmolLM2-135M
# (384 retain + 128 forget SST-2 rows, 2 epochs, lr 1e-3, the demo's), then spul.py over batch order,
# batch size, epochs, lr, alpha and the number of retain rows, each evaluated on 200 rows per test split.
# About two hours on a 2-core CPU.  OUT=... DATA_DIR=... override.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/spul-cpu-curve}
DATA_DIR=${DATA_DIR:-../shared/data/sst2}
MODEL=${MODEL:-smollm2-135m}
ROWS="--data_dir=$DATA_DIR --max_length=128"

python qlora.py $ROWS --model_name="$MODEL" --max_retain=384 --max_forget=128 --train_batch_size=16 --lr=1e-3 \
  --num_epochs=2 --group_by_length --output_path="$OUT/qlora" --quiet || [ -f "$OUT/qlora/adapter_config.json" ]
python inference_spul.py --model_checkpoints="$OUT/qlora" --max_eval_rows=200 --quiet

# name  batch order  batch  steps  lr  alpha  retain rows  generic labels  (p=10, beta=0.5 throughout)
while read -r name group bs steps lr alpha retain generic; do
  python spul.py $ROWS --model_checkpoints="$OUT/qlora" --max_retain="$retain" --max_forget=128 --train_batch_size="$bs" \
    --max_steps="$steps" --lr="$lr" --alpha="$alpha" --beta=0.5 --ptuning_num_tokens=10 --generic_labels="$generic" \
    --group_by_length="$group" --logging_steps=5 --output_path="$OUT/$name" --quiet || [ -f "$OUT/$name/adapter_config.json" ]
  python inference_spul.py --model_checkpoints="$OUT/$name" --max_eval_rows=200 --quiet
done <<'RUNS'
sa true 16 80 2e-3 1 128 neutral,unknown
sb true 16 80 5e-4 1 128 neutral,unknown
sd true 8 160 1e-3 1 128 neutral,unknown
sg true 8 256 1e-3 1 128 neutral,unknown
sh true 4 256 1e-3 1 128 neutral,unknown
sj true 4 256 1e-3 2 128 neutral,unknown
si true 8 256 1e-3 2 128 neutral,unknown
y1 true 8 160 1e-3 1 128 neutral
y2 true 8 160 1e-3 1.5 128 neutral
y3 false 8 160 1e-3 1 128 neutral,unknown
y4 false 8 160 1e-3 1.5 128 neutral,unknown
z1 false 8 160 2e-3 1.5 128 neutral,unknown
z2 false 8 160 2e-3 2 128 neutral,unknown
w1 false 8 160 2e-3 2 384 neutral,unknown
w2 false 8 160 2e-3 2 256 neutral,unknown
RUNS
python scripts/make_tables.py "$OUT"/qlora "$OUT"/[syzw]? --output_path="$OUT/table" --overwrite
