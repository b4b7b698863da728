#!/usr/bin/env bash
# The SPUL trade-off curve at CPU scale (docs/spul_cpu_scale.md): one qlora.py model on SmolLM2-135M
# (384 retain + 128 forget SST-2 rows, 2 epochs, lr 1e-3), then spul.py over batch size, epochs, lr
# and alpha on its 128 forget + 128 retain rows, each evaluated on 200 rows per test split.
# About an hour on a 2-core CPU.  OUT=... DATA_DIR=... override.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/spul-cpu-curve}
DATA_DIR=${DATA_DIR:-../shared/data/sst2}
MODEL=${MODEL:-smollm2-135m}
ROWS="--data_dir=$DATA_DIR --max_length=128"

python qlora.py $ROWS --model_name="$MODEL" --max_retain=384 --max_forget=128 --train_batch_size=16 --lr=1e-3 \
  --num_epochs=2 --output_path="$OUT/qlora" --quiet || [ -f "$OUT/qlora/adapter_config.json" ]
python inference_spul.py --model_checkpoints="$OUT/qlora" --max_eval_rows=200 --quiet

# name  batch  epochs  lr    alpha  (p=10, beta=0.5 throughout)
while read -r name bs ep lr alpha; do
  python spul.py $ROWS --model_checkpoints="$OUT/qlora" --max_retain=128 --max_forget=128 --train_batch_size="$bs" \
    --num_epochs="$ep" --lr="$lr" --alpha="$alpha" --beta=0.5 --ptuning_num_tokens=10 --logging_steps=5 \
    --output_path="$OUT/$name" --quiet || [ -f "$OUT/$name/adapter_config.json" ]
  python inference_spul.py --model_checkpoints="$OUT/$name" --max_eval_rows=200 --quiet
done <<'RUNS'
sa 16 5 2e-3 1
sb 16 5 5e-4 1
sd 8 5 1e-3 1
sg 8 8 1e-3 1
sh 4 4 1e-3 1
sj 4 4 1e-3 2
si 8 8 1e-3 2
RUNS
python scripts/make_tables.py "$OUT"/qlora "$OUT"/s? --out="$OUT/table"
