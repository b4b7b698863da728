"""transformers' Trainer, taught to train on tail-only logits with a pluggable objective.

Scale goes through the Trainer itself: `accelerate launch` / `torchrun` give DDP (or DeepSpeed /
FSDP through an accelerate config) without any code here. Three things are ours:
- the objective of an optimiser step: every term is a mean over the rows of its role in the whole step
  (all micro-batches of the accumulation window, all processes), so N processes × B rows, or B rows ×
  N accumulation steps, train exactly the objective of one batch of N·B rows;
- checkpoints hold the trainable weights only (a SPUL checkpoint is its prompt encoder, a QLoRA one
  its adapter, not a copy of the frozen LLM), plus the Trainer's optimiser, scheduler and RNG state;
- the training log is written even when a run stops early.
"""
import math
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .cli import UserError
from .methods import PADDING, ROLE_NAMES, LossContext
from .modeling import tail_logits
from .runs import TRAINABLE_FILE, resume_point
# Tests only: raise right after the checkpoint of this optimiser step is saved, as a crash would.
CRASH_AFTER_STEP = "SPUL_TEST_CRASH_AFTER_STEP"


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


# The first transformers whose Trainer this module trains right with (requirements.txt, README "Several GPUs"):
# before 5.2 TrainingArguments has no train_sampling_strategy; before 5.6 accelerate divides every loss by the
# accumulation steps once more (the gradient of 2 rows × 3 steps is a third of that of 6 rows).
MIN_TRANSFORMERS = "5.6.0"


def check_transformers(version=None):
    import transformers
    from packaging.version import Version

    version = version or transformers.__version__
    if Version(version) < Version(MIN_TRANSFORMERS):
        raise UserError(f"transformers {version} trains a different objective with gradient accumulation; this toolkit "
                        f"needs transformers>={MIN_TRANSFORMERS} (pip install -r requirements.txt)")


def training_arguments(args, output_dir, **overrides):
    check_transformers()
    cuda = torch.cuda.is_available()
    prec = args.precision
    bf16 = prec == "bf16" or (prec == "auto" and cuda and torch.cuda.is_bf16_supported())
    save = dict(save_strategy="steps", save_steps=args.save_steps) if args.save_steps else dict(save_strategy="epoch")
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
        **save,
        save_total_limit=args.save_total_limit,
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
    try:
        targs = TrainingArguments(**kw)
    except ValueError as e:  # a value the flags' types cannot check alone: --lr_scheduler_type, --report_to, ...
        raise UserError(f"bad training arguments: {str(e).splitlines()[0][:300]}")
    return one_gpu_unless_launched(targs)


def one_gpu_unless_launched(targs):
    """A process not started by `accelerate launch` / `torchrun` trains on one GPU, never through nn.DataParallel
    (which the Trainer picks when it sees several GPUs in one process: the batch silently becomes per-device ×
    GPUs, and our wrappers hide the 4-bit flag its guard against quantized models reads). n_gpu = 1 is what the
    Trainer itself sets for a model-parallel model; the device stays the first visible GPU."""
    if targs.n_gpu > 1:
        if targs.process_index == 0:
            print(f"using 1 of the {targs.n_gpu} GPUs here ({targs.device}): this process was not started by "
                  f"`accelerate launch` or `torchrun`, which train on all of them (or choose with CUDA_VISIBLE_DEVICES)",
                  flush=True)
        targs._n_gpu = 1
    return targs


def enable_gradient_checkpointing(args, lm):
    on = args.gradient_checkpointing if args.gradient_checkpointing is not None else torch.cuda.is_available()
    if on:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.config.use_cache = False
    return on


def trainable_state(model, state_dict=None):
    """{name: tensor} of the trainable parameters (tied weights once), from `state_dict` when given."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    src = state_dict if state_dict is not None else params
    return {n: src[n].detach().contiguous().cpu() for n in params if n in src}


def load_trainable(model, path):
    state = load_file(path)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        raise UserError(f"the checkpoint {os.path.dirname(path)} does not hold this model's trainable weights "
                        f"({len(set(params) - set(state))} missing, {len(set(state) - set(params))} unexpected)")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def trainer_reads_ga_scaling():
    """Whether this transformers' Trainer honours `loss_is_scaled_for_ga` (5.19 on); before, its training_step
    divides a loss computed without num_items_in_batch by `current_gradient_accumulation_steps`."""
    return hasattr(Trainer, "loss_is_scaled_for_ga")


class _CrashAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step >= self.step:
            raise RuntimeError(f"simulated crash after the checkpoint of step {state.global_step} ({CRASH_AFTER_STEP})")


def parameters_sharded(accelerator):
    """Whether the model's parameters are sharded over the processes (FSDP, DeepSpeed ZeRO-3): then each forward
    gathers them from every process, and all processes must run the same forwards."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    return plugin is not None and plugin.zero_stage == 3


def mark_epoch_fill(batch, accelerator):
    """Give the padding role to the rows accelerate repeats to fill the last micro-batches of an epoch.

    With several processes, accelerate's `even_batches` hands every process a full last micro-batch, filled with
    rows from the start of the epoch. Ordered by process, the epoch's last micro-batches hold its last
    `remainder` real rows first, then the fill (the rule of accelerate's own `gather_for_metrics`); as padding
    they run through the forward like any row and count in no term, so the step trains the rows of one process.
    """
    loader = accelerator.gradient_state.active_dataloader
    remainder = getattr(loader, "remainder", -1)
    if accelerator.num_processes == 1 or remainder <= 0:  # nothing repeated (or a loader of unknown length)
        return
    per_process = loader.total_batch_size // accelerator.num_processes
    first = accelerator.process_index * per_process  # this process's offset in the last global batch
    position = first + torch.arange(batch["role"].shape[0], device=batch["role"].device)
    batch["role"] = batch["role"].masked_fill(position >= remainder, PADDING)


class ShortRunLogging(TrainerCallback):
    """Log at least ten points of a short run: the interval is min(--logging_steps, total steps // 10), at least 1,
    so a 6-step run logs every step instead of one line and an average."""

    def on_train_begin(self, args, state, control, **kw):
        if state.max_steps > 0 and state.logging_steps:
            state.logging_steps = max(1, min(int(state.logging_steps), state.max_steps // 10))


class TailLossTrainer(Trainer):
    """Trainer whose loss is `objective(LossContext, **weights)` on the completion positions only.

    Each named term of the objective is logged beside the loss (its value per optimiser step, averaged
    over the logging window). A loss that turns NaN or infinite stops training with NonFiniteLoss.
    """

    # Each term is already divided by its rows in the whole optimiser step: the Trainer must not divide the loss
    # by the micro-batches of the window. transformers >= 5.19 reads this attribute; earlier 5.x always divide
    # (our get_batch_samples gives no num_items_in_batch), which compute_loss then undoes.
    loss_is_scaled_for_ga = True

    def __init__(self, *a, objective, reference=None, weights=None, **kw):
        super().__init__(*a, **kw)
        self.objective, self.reference, self.weights = objective, reference, weights or {}
        if reference is not None:  # sharded parameters: every process runs each reference forward (utils.reference)
            reference.lockstep = parameters_sharded(self.accelerator)
        self._sums, self._steps, self._counts = {}, 0, None
        self.add_callback(ShortRunLogging())
        if os.environ.get(CRASH_AFTER_STEP):
            self.add_callback(_CrashAfterSave(int(os.environ[CRASH_AFTER_STEP])))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimiser step, and the rows of each role in all of them on all processes."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
            if self.accelerator.gradient_state.end_of_dataloader:
                mark_epoch_fill(batches[-1], self.accelerator)
        counts = torch.zeros(len(ROLE_NAMES), dtype=torch.long, device=device)
        for b in batches:
            role = b["role"].flatten().to(device)
            counts += torch.bincount(role[role != PADDING], minlength=len(ROLE_NAMES))
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        self._counts = dict(enumerate(counts.tolist()))
        self._steps += 1
        return batches, None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["tail_labels"]
        logits = model(inputs["input_ids"], inputs["attention_mask"], keep=labels.shape[1] + 1)[:, :-1]
        counts = self._counts if model.training else None
        context = LossContext(self.accelerator.unwrap_model(model), inputs, logits, self.reference, counts)
        terms = self.objective(context, **self.weights)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"the loss became {loss.item()} at step {self.state.global_step}; stopping "
                                f"(lower --lr or check the data); nothing after the last checkpoint was kept")
        for k, v in terms.items():
            if k != "loss":
                self._sums[k] = self._sums.get(k, 0.0) + v.detach().float()
        if counts is not None:
            # DDP and DeepSpeed average the processes' gradients; the step's objective is their sum
            loss = loss * self.accelerator.num_processes
            if not trainer_reads_ga_scaling():
                loss = loss * self.current_gradient_accumulation_steps
        return (loss, logits) if return_outputs else loss

    def log(self, logs, *a, **kw):
        if self._steps and "loss" in logs:
            if self._sums:
                names = sorted(self._sums)
                sums = torch.stack([self._sums[k] for k in names]).to(self.args.device)
                if self.accelerator.num_processes > 1:  # every process holds its rows' share of each term
                    sums = self.accelerator.reduce(sums, reduction="sum")
                logs.update({k: round(float(v) / self._steps, 6) for k, v in zip(names, sums)})
            self._sums, self._steps = {}, 0
        super().log(logs, *a, **kw)

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_file(trainable_state(self.model, state_dict), os.path.join(output_dir, TRAINABLE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_trainable(model or self.model, os.path.join(resume_from_checkpoint, TRAINABLE_FILE))

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        cache = getattr(self.reference, "cache", None)
        if cache is not None:  # every process keeps the reference rows it computed
            cache.save()


def train(trainer, resume=False):
    """trainer.train() (from the run's last checkpoint with `resume`), with the training log and the reference
    cache kept even when the run stops early."""
    try:
        last, line = resume_point(trainer.args.output_dir) if resume else (None, None)
        if line and trainer.is_world_process_zero():
            print(line, flush=True)
        trainer.train(resume_from_checkpoint=last)
        if trainer.args.world_size > 1:  # one line per process: shows that every rank trained
            print(f"[rank {trainer.args.process_index}/{trainer.args.world_size}] trained "
                  f"{trainer.state.global_step} optimiser steps", flush=True)
    finally:
        cache = getattr(trainer.reference, "cache", None)
        if cache is not None:
            cache.save()
        if trainer.is_world_process_zero():
            from .runs import save_json

            save_json(os.path.join(trainer.args.output_dir, "training_log.json"), trainer.state.log_history)


def steps_per_epoch(n_rows, args, world_size=1):
    return math.ceil(n_rows / (args.train_batch_size * args.gradient_accumulation_steps * world_size))
