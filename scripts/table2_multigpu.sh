#!/usr/bin/env bash
# Table 2 on several GPUs of one machine: every training stage runs under `accelerate launch` (DDP
# through the Trainer; pass an accelerate config with DeepSpeed ZeRO for the full fine-tuning baselines
# of a 7B model: ACCELERATE_CONFIG=path/to/zero2.yaml). The per-device batch is divided by the
# number of GPUs: the global batch stays the paper's 32, and so does the objective (each loss term is a mean over
# the rows of its role in the whole optimiser step, on every GPU; README, "Several GPUs").
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
CFG=${ACCELERATE_CONFIG:+--config_file $ACCELERATE_CONFIG}
export LAUNCH="accelerate launch --multi_gpu --num_processes=$NGPU $CFG"
export EXTRA="${EXTRA:-} --train_batch_size=$((32 / NGPU))"
exec bash "$(dirname "$0")/table2.sh"
