#!/usr/bin/env bash
# Table 2 on several GPUs of one machine: every training stage runs under `accelerate launch` (DDP
# through the Trainer; pass an accelerate config with DeepSpeed ZeRO for the full fine-tuning baselines
# of a 7B model: ACCELERATE_CONFIG=path/to/zero2.yaml). The global batch stays the paper's 32 rows per
# optimiser step: per-device batch × NGPU × accumulation steps = 32, and so does the objective (each loss term
# is a mean over the rows of its role in the whole optimiser step, on every GPU; README, "Several GPUs").
# NGPU (default: the GPUs CUDA_VISIBLE_DEVICES names, else all) must divide 32: 1, 2, 4, 8, 16 or 32 GPUs (on 3,
# NGPU=2 or CUDA_VISIBLE_DEVICES=0,1; other counts are refused, saying which to use). DEVICE_BATCH=N
# caps the rows per GPU per micro-batch (the rest by gradient accumulation). PLAN_ONLY=1 prints the split and stops.
set -euo pipefail
GLOBAL_BATCH=32
if [ -z "${NGPU:-}" ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then NGPU=$(tr , '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c . || true)
  else NGPU=$( (nvidia-smi -L 2>/dev/null || true) | wc -l); fi
fi
DEVICE_BATCH=${DEVICE_BATCH:-$GLOBAL_BATCH}

refuse() { echo "error: $*" >&2; exit 2; }
[[ "$NGPU" =~ ^[0-9]+$ ]] && [ "$NGPU" -ge 1 ] || refuse "no GPU found (NGPU=$NGPU); set NGPU to the number of GPUs to use"
[[ "$DEVICE_BATCH" =~ ^[0-9]+$ ]] && [ "$DEVICE_BATCH" -ge 1 ] || refuse "DEVICE_BATCH=$DEVICE_BATCH is not a positive number"
if [ $((GLOBAL_BATCH % NGPU)) -ne 0 ]; then
  fit=$NGPU; while [ $((GLOBAL_BATCH % fit)) -ne 0 ]; do fit=$((fit - 1)); done
  refuse "$NGPU GPUs cannot share the paper's global batch of $GLOBAL_BATCH rows equally (every GPU takes the same" \
         "rows per step); use $fit of them: NGPU=$fit, or CUDA_VISIBLE_DEVICES naming $fit GPUs"
fi
PER_GPU=$((GLOBAL_BATCH / NGPU))        # rows of one GPU per optimiser step
BATCH=$(( DEVICE_BATCH < PER_GPU ? DEVICE_BATCH : PER_GPU ))
while [ $((PER_GPU % BATCH)) -ne 0 ]; do BATCH=$((BATCH - 1)); done   # the largest micro-batch that divides it
ACCUM=$((PER_GPU / BATCH))
echo "global batch $GLOBAL_BATCH = $BATCH rows per GPU × $NGPU GPUs × $ACCUM accumulation steps"
if [ -n "${PLAN_ONLY:-}" ]; then exit 0; fi

CFG=${ACCELERATE_CONFIG:+--config_file $ACCELERATE_CONFIG}
export LAUNCH="accelerate launch --multi_gpu --num_processes=$NGPU $CFG"
export EXTRA="${EXTRA:-} --train_batch_size=$BATCH --gradient_accumulation_steps=$ACCUM"
exec bash "$(dirname "$0")/table2.sh"
