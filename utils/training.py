"""transformers' Trainer, taught to train on tail-only logits with a pluggable objective.

Scale goes through the Trainer itself: `accelerate launch` / `torchrun` give DDP (or DeepSpeed /
FSDP through an accelerate config) without any code here.
"""
import math
import os

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .cli import UserError
from .methods import LossContext
from .modeling import tail_logits


class NonFiniteLoss(UserError):
    pass


class TailLM(nn.Module):
    """A causal LM that returns only the last `keep` positions' logits.

    `reference=True` gives the frozen reference: a separate frozen copy when one is given, the
    base model with the LoRA adapter switched off for a PeftModel, else the model itself (only
    valid before training starts, which is when the reference cache is filled).
    """

    def __init__(self, lm, reference_lm=None):
        super().__init__()
        self.lm = lm
        self._reference = [reference_lm]  # a list, so that it is no submodule: not trained, not DDP-wrapped

    def forward(self, input_ids, attention_mask, keep=1, reference=False):
        if not reference:
            return tail_logits(self.lm, input_ids, attention_mask, keep)
        ref = self._reference[0]
        if ref is not None:
            ref.to(input_ids.device)
            return tail_logits(ref, input_ids, attention_mask, keep)
        if hasattr(self.lm, "disable_adapter") and getattr(self.lm, "peft_config", None):
            with self.lm.disable_adapter():
                return tail_logits(self.lm, input_ids, attention_mask, keep)
        return tail_logits(self.lm, input_ids, attention_mask, keep)


def training_arguments(args, output_dir, **overrides):
    cuda = torch.cuda.is_available()
    prec = args.precision
    bf16 = prec == "bf16" or (prec == "auto" and cuda and torch.cuda.is_bf16_supported())
    kw = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.train_batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.lr,
        num_train_epochs=args.num_epochs,
        max_steps=args.max_steps,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=args.lr_scheduler_type,
        max_grad_norm=args.max_grad_norm,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to=[] if args.report_to == "none" else [args.report_to],
        seed=args.seed,
        data_seed=args.seed,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        use_cpu=not cuda,
        bf16=bf16,
        fp16=prec == "fp16",
        disable_tqdm=args.quiet,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def enable_gradient_checkpointing(args, lm):
    on = args.gradient_checkpointing if args.gradient_checkpointing is not None else torch.cuda.is_available()
    if on:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.config.use_cache = False
    return on


class TailLossTrainer(Trainer):
    """Trainer whose loss is `objective(LossContext, **weights)` on the completion positions only.

    Each named term of the objective is averaged over the logging window and logged beside the loss.
    A loss that turns NaN or infinite stops training with NonFiniteLoss.
    """

    def __init__(self, *a, objective, reference=None, weights=None, **kw):
        super().__init__(*a, **kw)
        self.objective, self.reference, self.weights = objective, reference, weights or {}
        self._sums, self._count = {}, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["tail_labels"]
        logits = model(inputs["input_ids"], inputs["attention_mask"], keep=labels.shape[1] + 1)[:, :-1]
        terms = self.objective(LossContext(model, inputs, logits, self.reference), **self.weights)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"the loss became {loss.item()} at step {self.state.global_step}; stopping "
                                f"(lower --lr or check the data); nothing after the last save was kept")
        for k, v in terms.items():
            if k != "loss":
                self._sums[k] = self._sums.get(k, 0.0) + v.detach().float()
        self._count += 1
        return (loss, logits) if return_outputs else loss

    def log(self, logs, *a, **kw):
        if self._count and "loss" in logs:
            if self._sums:
                names = sorted(self._sums)
                means = torch.stack([self._sums[k] for k in names]) / self._count
                if self.args.world_size > 1:  # every rank logs at the same steps: average the terms over ranks, like the loss
                    means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
                logs.update({k: round(float(v), 6) for k, v in zip(names, means)})
            self._sums, self._count = {}, 0
        super().log(logs, *a, **kw)


def train(trainer):
    """trainer.train() with the training log kept even when the run stops early."""
    try:
        trainer.train()
        if trainer.args.world_size > 1:  # one line per process: shows that every rank trained
            print(f"[rank {trainer.args.process_index}/{trainer.args.world_size}] trained "
                  f"{trainer.state.global_step} optimiser steps", flush=True)
    finally:
        if trainer.is_world_process_zero():
            from .runs import save_json

            save_json(os.path.join(trainer.args.output_dir, "training_log.json"), trainer.state.log_history)


def steps_per_epoch(n_rows, args, world_size=1):
    return math.ceil(n_rows / (args.train_batch_size * args.gradient_accumulation_steps * world_size))
