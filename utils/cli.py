"""Command-line plumbing: one-line errors for user mistakes, shared argument groups, seeds.

Every script builds its parser with `make_parser`: abbreviated flags are refused (a typo such as
`--max_eval_row` must not silently mean `--max_eval_rows`), every default shows in --help, and
boolean flags accept `--x`, `--x true` and `--x false` alike.
"""
import argparse
import copy
import os
import random
import sys

import numpy as np
import torch


class UserError(Exception):
    """A mistake in the user's input: reported as one line, never as a stack trace."""


# what to undo when the run is refused: the run folder it has just created, still empty of results
_UNDO = []


def on_user_error(undo):
    """Call `undo()` when the running script stops on a UserError (run_main): a refused run leaves nothing behind."""
    _UNDO.append(undo)


def run_main(main):
    """Call `main()` and turn a UserError into `error: ...` on stderr with exit status 2."""
    _UNDO.clear()
    try:
        main()
    except UserError as e:
        for undo in reversed(_UNDO):
            undo()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and '(default: X)' after every flag that has a default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None:
            return (text + " (default: none)").strip()
        return super()._get_help_string(action).strip()

    def _format_action(self, action):
        # argparse prints no help line for a flag without help text: give it one that shows its default
        if not (action.help or "").strip() and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


def make_parser(doc):
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter, allow_abbrev=False)


# ---------------------------------------------------------------- value types

def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def nonneg_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {s}")
    return v


def nonneg_float(s):
    v = float(s)
    if not v >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def positive_float(s):
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def unit_interval(s):
    """[0, 1): dropout rates, warm-up ratios."""
    v = float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def open_unit_interval(s):
    """(0, 1): a rate that must leave something on both sides (a false-positive rate, a held-out slice)."""
    v = float(s)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {s}")
    return v


def fraction(s):
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def comma_list(s):
    """'q_proj, v_proj' -> ['q_proj', 'v_proj']: names from a comma-separated flag, spaces and empties dropped."""
    if isinstance(s, (list, tuple)):
        return [str(w).strip() for w in s if str(w).strip()]
    return [w.strip() for w in str(s).split(",") if w.strip()]


def str2bool(s):
    if isinstance(s, bool):
        return s
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s}")


def add_bool(g, *names, default=False, help=None):
    """A boolean flag that takes `--x`, `--x true` and `--x false`."""
    g.add_argument(*names, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help)


# ---------------------------------------------------------------- argument groups

def add_data_args(p, child=False):
    """Data flags. `child`: a stage that follows another (spul, baselines, eco, evaluation): flags left out
    are taken from the folder it starts from (utils.runs.inherit), so their defaults here are None."""
    g = p.add_argument_group("data")

    def default(own):
        """'(default: ...)': a child's flags left out are its parent's, then `own`."""
        if child:
            return " (default: the parent stage's" + (f", else {own})" if own else ")")
        return f" (default: {own})" if own else ""

    g.add_argument("--dataset", default=None,
                   help="sst2, yelp (sentiment) or wmdp_bio (mcqa): the paper's hub datasets; a name for --data_dir's "
                        "data otherwise" + default("the --data_dir folder's name, else sst2; for --task mcqa wmdp_bio"))
    g.add_argument("--task", choices=["sentiment", "mcqa"], default=None,
                   help="sentiment: text,label rows; mcqa: multiple-choice question,choices,answer rows answered by a "
                        "letter" + default("mcqa for --dataset wmdp_bio, else sentiment"))
    g.add_argument("--data_dir", default=None,
                   help="folder with train_retain, train_forget, test_retain, test_forget as .csv, .jsonl or .parquet "
                        "(e.g. ../shared/data/sst2)" + default("none: the hub dataset --dataset"))
    if child:
        add_bool(g, "--other_data", help="allow a --data_dir other than the parent stage's: its rows are then not ones "
                                         "the parent trained on, and the parent's row caps are not applied")
    g.add_argument("--text_column", default=None if child else "text",
                   help="column holding the text (sentiment)" + default("text" if child else None))
    g.add_argument("--label_column", default=None if child else "label",
                   help="column holding the label: an integer 0..n-1 or one of the label words (sentiment)"
                        + default("label" if child else None))
    g.add_argument("--label_words", default=None,
                   help="comma-separated words for labels 0, 1, ..." + default(
                       "sentiment: from a label_text column when the data has one, else negative,positive; mcqa: A,B,C,D,E"))
    g.add_argument("--max_length", type=positive_int, default=None if child else 1024,
                   help="max tokens per example; the text (mcqa: the question) is shortened, never the rest of the "
                        "prompt or the label" + default("1024" if child else None))
    g.add_argument("--forget_size", type=fraction, default=1.0,
                   help="fraction τ of the train_forget rows kept (drawn with seed 42, as in the paper)")
    g.add_argument("--max_retain", type=positive_int, default=None,
                   help="cap on train_retain rows (seeded draw; a stage's cap may not exceed its parent's)"
                        + default("every row"))
    g.add_argument("--max_forget", type=positive_int, default=None,
                   help="cap on train_forget rows (seeded draw; a stage's cap may not exceed its parent's)"
                        + default("every row"))
    g.add_argument("--data_seed", type=int, default=None if child else 42,
                   help="seed of the --max_retain / --max_forget draws; the draws are nested, so a smaller cap "
                        "keeps rows its parent trained on" + default("42" if child else None))
    return g


def add_model_args(p):
    g = p.add_argument_group("model")
    add_bool(g, "--set_pad_id", help="force the pad token to the EOS token (models such as Mistral/Llama have none)")
    return g


def add_run_args(g):
    """Where a run goes and what happens to a folder that already holds one."""
    g.add_argument("--output_path", default=None, help="output folder (default: named after the stage, dataset and model)")
    add_bool(g, "--overwrite", help="replace the run in --output_path (with --resume: only when its settings differ)")
    add_bool(g, "--resume", help="continue an unfinished run in --output_path from its last checkpoint, or reuse a "
                                 "finished one with the same settings")
    add_bool(g, "--quiet", help="no progress bars")


def add_training_args(p, *, lr, epochs, warmup, batch=32):
    """The optimisation flags every training script shares, with the paper's defaults."""
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=positive_float, default=lr, help="learning rate")
    g.add_argument("--train_batch_size", type=positive_int, default=batch,
                   help="rows per device per micro-batch; the loss of an optimiser step is the same for any split of "
                        "its rows into devices and accumulation steps")
    g.add_argument("--eval_batch_size", type=positive_int, default=batch, help="rows per forward pass outside training")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                   help="micro-batches per optimiser step")
    g.add_argument("--num_epochs", type=float, default=epochs, help="epochs")
    g.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimiser steps (overrides --num_epochs when > 0)")
    g.add_argument("--weight_decay", type=nonneg_float, default=0.001, help="AdamW weight decay")
    g.add_argument("--warmup_ratio", type=unit_interval, default=warmup, help="linear warm-up fraction of the steps")
    g.add_argument("--lr_scheduler_type", default="cosine",
                   help="learning-rate schedule after the warm-up (transformers' names: cosine, linear, constant, ...)")
    g.add_argument("--max_grad_norm", type=nonneg_float, default=0.3, help="gradient clipping (0: none)")
    add_bool(g, "--group_by_length",
             help="batch rows of similar length (less padding, faster). Off by default (random batches, the Trainer's "
                  "default): SST-2's forget rows are longer than its retain rows, so length-grouped batches are mostly "
                  "one role and unlearning learns less of the difference (README, deviation 12)")
    g.add_argument("--gradient_checkpointing", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="recompute activations in the backward pass (default: on for CUDA, off on the CPU)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on CUDA if supported, else fp32")
    g.add_argument("--logging_steps", type=positive_int, default=10,
                   help="log the loss every N optimiser steps (a run of fewer than 10 N steps logs at least ten points)")
    g.add_argument("--report_to", default="none", help="none, tensorboard or wandb")
    g.add_argument("--seed", type=int, default=42, help="seeds initialisation, batch order and generic-label draws")
    g = p.add_argument_group("run folder and checkpoints")
    add_run_args(g)
    g.add_argument("--save_steps", type=positive_int, default=None,
                   help="save a checkpoint every N optimiser steps (default: at the end of every epoch)")
    g.add_argument("--save_total_limit", type=positive_int, default=2, help="checkpoints kept (the oldest are removed)")
    add_bool(g, "--keep_checkpoints", help="keep the checkpoints once the run has finished (default: removed then)")
    return g


def check_training_args(args):
    if not args.num_epochs > 0 and args.max_steps <= 0:  # also refuses nan
        raise UserError(f"--num_epochs must be positive, got {args.num_epochs}")


def local_rank_zero():
    return int(os.environ.get("RANK", "0")) == 0
