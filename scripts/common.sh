# Shared settings of the paper-table recipes. Every variable can be overridden from the environment:
#   MODEL=smollm2-135m DATA_DIR=../shared/data/sst2 EXTRA="--max_retain=256 --max_forget=64" bash scripts/table2.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
DATASET=${DATASET:-sst2}
DATA_DIR=${DATA_DIR:-}                 # local split files instead of the hub dataset (named DATASET in the tables)
TASK=${TASK:-}                        # sentiment or mcqa (default: the dataset's: mcqa for wmdp_bio)
OUT=${OUT:-runs}
LAUNCH=${LAUNCH:-python}              # python trains on one GPU; "accelerate launch" (or torchrun) on several
# Full fine-tuning baselines of a 7B model on one 40 GB GPU: ZERO_OFFLOAD=1 runs them under DeepSpeed ZeRO-2 with
# the optimiser on the CPU (configs/zero2_offload.yaml; pip install deepspeed). BASELINE_LAUNCH overrides.
if [ -n "${ZERO_OFFLOAD:-}" ]; then
  BASELINE_LAUNCH=${BASELINE_LAUNCH:-accelerate launch --config_file configs/zero2_offload.yaml}
fi
BASELINE_LAUNCH=${BASELINE_LAUNCH:-$LAUNCH}
EXTRA=${EXTRA:-}                      # extra flags for every training stage (caps, --max_steps, ...)
QLORA_EXTRA=${QLORA_EXTRA:-}          # extra flags for qlora.py only (e.g. --quantization=none)
EVAL_EXTRA=${EVAL_EXTRA:-}            # extra flags for every evaluation (e.g. --max_eval_rows=500)
QLORA_EPOCHS=${QLORA_EPOCHS:-}        # paper: 10 for SST-2, 2 for Yelp
SPUL_EPOCHS=${SPUL_EPOCHS:-10}
BASELINE_LR=${BASELINE_LR:-1e-4}      # the paper searched it per method; 1e-4 is its default
MAX_LENGTH=${MAX_LENGTH:-1024}
SELECTION=${SELECTION:-}              # scripts/select_settings.py's selection.json (or a file of several methods):
                                      # each method's chosen settings replace the recipe's (its lr, SPUL's alpha, ...)

# On a machine without a GPU, scoring every test row (19,855 test_retain rows of SST-2) takes hours: say so once.
if [ -z "${EVAL_EXTRA##*--max_eval_rows*}" ] && [ -n "$EVAL_EXTRA" ]; then :
elif ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "warning: no GPU here and no --max_eval_rows in EVAL_EXTRA: every evaluation scores all rows of every split" \
       "(SST-2: 19,855 test_retain rows, hours on a CPU); e.g. EVAL_EXTRA=\"--max_eval_rows=500\"" >&2
fi

data_flags() {
  echo "--dataset=$DATASET"
  if [ -n "$DATA_DIR" ]; then echo "--data_dir=$DATA_DIR"; fi
  if [ -n "$TASK" ]; then echo "--task=$TASK"; fi
}

# Every stage runs with --resume: a finished run with the same settings is kept, an unfinished one continues
# from its last checkpoint, and a folder holding a run of other settings stops the recipe with a one-line error
# naming the difference (nothing is replaced unless you delete it or pass --overwrite in EXTRA).

# qlora OUTDIR: fine-tune MODEL on the whole training set
qlora() {
  local out=$1; shift
  local epochs=${QLORA_EPOCHS:-$([ "$DATASET" = yelp ] && echo 2 || echo 10)}
  $LAUNCH qlora.py $(data_flags) --model_name="$MODEL" --max_length="$MAX_LENGTH" --set_pad_id --lr=1e-4 \
    --train_batch_size=32 --num_epochs="$epochs" --weight_decay=0.001 --lora_rank=16 --lora_alpha=64 \
    --lora_dropout=0.1 --output_path="$out" --resume $EXTRA $QLORA_EXTRA "$@"
}

# selected METHOD: the settings chosen for METHOD in $SELECTION, as flags (none without SELECTION), with a training
# seed the selection's runs did not use (--seed=1 after a selection at the default 42): the table reports fresh runs
# of the chosen settings, not the runs they won on. A selection made on another model or dataset is an error
selected() {
  [ -n "$SELECTION" ] || return 0
  python -c "import sys; sys.path[:0] = ['.', 'scripts']
from select_settings import table_flags
from utils.cli import run_main
run_main(lambda: print(' '.join(table_flags(*sys.argv[1:]))))" \
    "$SELECTION" "$1" "$MODEL" "$DATASET"
}

# spul QLORA_DIR OUTDIR [flags]: soft-prompt unlearning (data settings follow the qlora folder)
spul() {
  local q=$1 out=$2 sel; shift 2
  sel=$(selected spul)
  $LAUNCH spul.py --model_checkpoints="$q" --set_pad_id --lr=1e-4 --train_batch_size=32 --num_epochs="$SPUL_EPOCHS" \
    --weight_decay=0.001 --output_path="$out" --resume $EXTRA $sel "$@"
}

# baseline QLORA_DIR OUTDIR METHOD [flags]: fine-tuning baseline, 1 epoch
baseline() {
  local q=$1 out=$2 method=$3 sel; shift 3
  sel=$(selected "$method")
  $BASELINE_LAUNCH baselines.py --model_checkpoints="$q" --set_pad_id --lr="$BASELINE_LR" --train_batch_size=32 \
    --num_epochs=1 --weight_decay=0.001 --unlearn_method="$method" --output_path="$out" --resume $EXTRA $sel "$@"
}

# evaluate CHECKPOINT [OUTDIR] [flags]: the four splits, paper protocol (results of the same settings are kept)
evaluate() {
  local ckpt=$1; shift
  local outflag=() data=()
  if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then outflag=(--output_path="$1"); shift; fi
  if [ ! -f "$ckpt/arguments.json" ]; then data=($(data_flags) --max_length="$MAX_LENGTH"); fi   # a pre-trained model: no stage to follow
  python inference_spul.py "${data[@]}" --model_checkpoints="$ckpt" --set_pad_id "${outflag[@]}" --resume $EVAL_EXTRA "$@"
}

tables() {  # tables OUTPREFIX PAPER_KEY RUN_DIRS...: PAPER_KEY is a key of data/paper_tables.json, or none
  local prefix=$1 paper=$2; shift 2
  python scripts/make_tables.py "$@" --output_path="$prefix" --paper="$paper" --overwrite  # the recipe regenerates its table
}
