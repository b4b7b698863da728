"""Command-line plumbing: one-line errors for user mistakes, shared argument groups, seeds."""
import argparse
import os
import random
import sys

import numpy as np
import torch


class UserError(Exception):
    """A mistake in the user's input: reported as one line, never as a stack trace."""


def run_main(main):
    """Call `main()` and turn a UserError into `error: ...` on stderr with exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def fraction(s):
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def comma_list(s):
    """'q_proj, v_proj' -> ['q_proj', 'v_proj']: names from a comma-separated flag, spaces and empties dropped."""
    return [w.strip() for w in str(s).split(",") if w.strip()]


def str2bool(s):
    if isinstance(s, bool):
        return s
    if s.lower() in ("1", "true", "yes", "y"):
        return True
    if s.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s}")


def add_data_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="sst2", help="sst2 or yelp: the paper's hub datasets (ignored for loading when --data_dir is given)")
    g.add_argument("--data_dir", default=None, help="folder with train_retain/train_forget/test_retain/test_forget as .csv, .jsonl or .parquet (e.g. ../shared/data/sst2)")
    g.add_argument("--max_length", type=positive_int, default=1024, help="max tokens per example; the review text is shortened, never the question or the label")
    g.add_argument("--forget_size", type=fraction, default=1.0, help="fraction of train_forget kept (drawn with seed 42, as in the paper)")
    g.add_argument("--max_retain", type=positive_int, default=None, help="cap on train_retain rows used for training (seeded draw)")
    g.add_argument("--max_forget", type=positive_int, default=None, help="cap on train_forget rows used for training (seeded draw)")
    g.add_argument("--max_eval_rows", type=positive_int, default=None, help="cap on rows per split at evaluation (seeded draw)")
    return g


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--set_pad_id", action="store_true", help="force the pad token to the EOS token (models such as Mistral/Llama have none)")
    return g


def add_training_args(p: argparse.ArgumentParser, *, lr, epochs, warmup, batch=32):
    """The optimisation flags every training script shares, with the paper's defaults."""
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    g.add_argument("--train_batch_size", type=positive_int, default=batch, help=f"per-device batch size (default {batch})")
    g.add_argument("--eval_batch_size", type=positive_int, default=batch, help="per-device evaluation batch size")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    g.add_argument("--num_epochs", type=float, default=epochs, help=f"epochs (default {epochs})")
    g.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimiser steps (overrides --num_epochs when > 0)")
    g.add_argument("--weight_decay", type=float, default=0.001)
    g.add_argument("--warmup_ratio", type=float, default=warmup, help=f"linear warm-up fraction of the steps (default {warmup})")
    g.add_argument("--lr_scheduler_type", default="cosine")
    g.add_argument("--max_grad_norm", type=float, default=0.3, help="gradient clipping (default 0.3)")
    g.add_argument("--group_by_length", type=str2bool, nargs="?", const=True, default=False,
                   help="batch rows of similar length (less padding, faster). Off by default (random batches, the Trainer's "
                        "default): SST-2's forget rows are longer than its retain rows, so length-grouped batches "
                        "are mostly one role and unlearning learns less of the difference (README, deviation 12)")
    g.add_argument("--gradient_checkpointing", type=str2bool, default=None, help="default: on for CUDA, off on the CPU")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="auto: bf16 on CUDA if supported, else fp32")
    g.add_argument("--logging_steps", type=positive_int, default=10)
    g.add_argument("--report_to", default="none", help="none, tensorboard or wandb")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--output_path", default=None, help="output folder (default under runs/)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --output_path")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return g


def check_training_args(args):
    if args.num_epochs <= 0 and args.max_steps <= 0:
        raise UserError(f"--num_epochs must be positive, got {args.num_epochs}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.warmup_ratio < 1:
        raise UserError(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")


def local_rank_zero():
    return int(os.environ.get("RANK", "0")) == 0
