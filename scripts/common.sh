# Shared settings of the paper-table recipes. Every variable can be overridden from the environment:
#   MODEL=smollm2-135m DATA_DIR=../shared/data/sst2 EXTRA="--max_retain=256 --max_forget=64" bash scripts/table2.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
DATASET=${DATASET:-sst2}
DATA_DIR=${DATA_DIR:-}                 # local split files instead of the hub dataset
OUT=${OUT:-runs}
LAUNCH=${LAUNCH:-python}              # "accelerate launch" (or torchrun) for several GPUs
EXTRA=${EXTRA:-}                      # extra flags for every training stage (caps, --max_steps, ...)
QLORA_EXTRA=${QLORA_EXTRA:-}          # extra flags for qlora.py only (e.g. --quantization=none)
EVAL_EXTRA=${EVAL_EXTRA:-}            # extra flags for every evaluation (e.g. --max_eval_rows=500)
QLORA_EPOCHS=${QLORA_EPOCHS:-}        # paper: 10 for SST-2, 2 for Yelp
SPUL_EPOCHS=${SPUL_EPOCHS:-10}
BASELINE_LR=${BASELINE_LR:-1e-4}      # the paper searched it per method; 1e-4 is its default
MAX_LENGTH=${MAX_LENGTH:-1024}

data_flags() {
  if [ -n "$DATA_DIR" ]; then echo "--data_dir=$DATA_DIR"; else echo "--dataset=$DATASET"; fi
}

# qlora OUTDIR: fine-tune MODEL on the whole training set (skipped when finished)
qlora() {
  local out=$1; shift
  local epochs=${QLORA_EPOCHS:-$([ "$DATASET" = yelp ] && echo 2 || echo 10)}
  if ! finished "$out"; then
    $LAUNCH qlora.py $(data_flags) --model_name="$MODEL" --max_length="$MAX_LENGTH" --set_pad_id --lr=1e-4 \
      --train_batch_size=32 --num_epochs="$epochs" --weight_decay=0.001 --lora_rank=16 --lora_alpha=64 \
      --lora_dropout=0.1 --output_path="$out" --overwrite $EXTRA $QLORA_EXTRA "$@"
  fi
}

# spul QLORA_DIR OUTDIR [flags]: soft-prompt unlearning (skipped when finished)
spul() {
  local q=$1 out=$2; shift 2
  if ! finished "$out"; then
    $LAUNCH spul.py $(data_flags) --model_checkpoints="$q" --max_length="$MAX_LENGTH" --set_pad_id --lr=1e-4 \
      --train_batch_size=32 --num_epochs="$SPUL_EPOCHS" --weight_decay=0.001 --output_path="$out" --overwrite $EXTRA "$@"
  fi
}

# baseline QLORA_DIR OUTDIR METHOD [flags]: fine-tuning baseline, 1 epoch (skipped when finished)
baseline() {
  local q=$1 out=$2 method=$3; shift 3
  if ! finished "$out"; then
    $LAUNCH baselines.py $(data_flags) --model_checkpoints="$q" --max_length="$MAX_LENGTH" --set_pad_id \
      --lr="$BASELINE_LR" --train_batch_size=32 --num_epochs=1 --weight_decay=0.001 --unlearn_method="$method" \
      --output_path="$out" --overwrite $EXTRA "$@"
  fi
}

# evaluate CHECKPOINT [OUTDIR] [flags]: the four splits, paper protocol (skipped when results exist)
evaluate() {
  local ckpt=$1; shift
  local res="$ckpt/results.json" outflag=()
  if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then res="$1/results.json"; outflag=(--output_path="$1"); shift; fi
  if [ ! -f "$res" ]; then
    python inference_spul.py $(data_flags) --model_checkpoints="$ckpt" --max_length="$MAX_LENGTH" --set_pad_id \
      "${outflag[@]}" $EVAL_EXTRA "$@"
  fi
}

finished() {
  [ -f "$1/arguments.json" ] && python -c "import json,sys; sys.exit(0 if json.load(open('$1/arguments.json')).get('finished') else 1)"
}

tables() {  # tables OUTPREFIX PAPER_KEY RUN_DIRS...: PAPER_KEY is a key of data/paper_tables.json, or none
  local prefix=$1 paper=$2; shift 2
  python scripts/make_tables.py "$@" --output_path="$prefix" --paper="$paper"
}
