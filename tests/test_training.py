"""What utils.training.training_arguments and the Trainer make of the flags: the order in which training rows reach
the model, one GPU per process, the transformers versions accepted, and one objective however a step is split."""
import argparse
import os

import pytest
import torch
from transformers import Trainer

from conftest import ROOT
from utils.cli import add_training_args
from utils.methods import FORGET, RETAIN
from utils.prompts import IGNORE, LeftPadCollator
from utils.training import training_arguments


def rows():
    # as on SST-2: forget rows (reviews naming people) longer than retain rows
    items = []
    for i in range(32):
        items.append({"input_ids": [5] * (40 + i % 10), "labels": [IGNORE] * (39 + i % 10) + [7], "role": FORGET})
        items.append({"input_ids": [5] * (10 + i % 10), "labels": [IGNORE] * (9 + i % 10) + [7], "role": RETAIN})
    return items


def batches(tmp_path, *flags):
    p = argparse.ArgumentParser()
    add_training_args(p, lr=1e-3, epochs=1, warmup=0.0, batch=8)
    args = p.parse_args(["--quiet", *flags])
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=training_arguments(args, str(tmp_path)),
                      train_dataset=rows(), data_collator=LeftPadCollator(0))
    return list(trainer.get_train_dataloader())


def mixed_share(bs):
    return sum(len(set(b["role"].tolist())) == 2 for b in bs) / len(bs)


@pytest.mark.filterwarnings("ignore")
def test_batches_mix_forget_and_retain_rows_by_default(tmp_path):
    """Random order (the paper's Trainer default): nearly every batch of 8 holds both roles
    (P(one role) ~ 1 % per batch), so each step contrasts forget with retain rows."""
    assert mixed_share(batches(tmp_path)) >= 0.75


@pytest.mark.filterwarnings("ignore")
def test_group_by_length_gives_one_role_batches(tmp_path):
    """--group_by_length sorts each megabatch (here 4 of 16 rows) by length: batches are one role except
    where a megabatch's long and short rows meet, which is why it is opt-in. It pads less."""
    grouped, default = batches(tmp_path, "--group_by_length"), batches(tmp_path)
    assert mixed_share(grouped) <= 0.5 < mixed_share(default)
    assert sum(b["input_ids"].shape[1] for b in grouped) < sum(b["input_ids"].shape[1] for b in default)


def _cuda_box(monkeypatch, n):
    """A machine with n GPUs as the Trainer sees it (nothing placed on them: the arguments only)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a, **k: None)
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.filterwarnings("ignore")
def test_a_plain_python_launch_trains_on_one_gpu_and_says_so(monkeypatch, tmp_path, capsys):
    """Four GPUs, no launcher: the Trainer would wrap the model in nn.DataParallel (n_gpu 4, a batch of 4 × 8);
    it gets one GPU, the per-device batch is the batch, and one line says how to use them all."""
    from transformers.training_args import ParallelMode

    _cuda_box(monkeypatch, 4)
    p = argparse.ArgumentParser()
    add_training_args(p, lr=1e-3, epochs=1, warmup=0.0, batch=8)
    targs = training_arguments(p.parse_args(["--quiet"]), str(tmp_path))
    assert targs.n_gpu == 1 and targs.train_batch_size == 8
    assert targs.parallel_mode == ParallelMode.NOT_PARALLEL and targs.device == torch.device("cuda", 0)
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "1 of the 4 GPUs" in said[0]
    assert "accelerate launch" in said[0] and "torchrun" in said[0] and "CUDA_VISIBLE_DEVICES" in said[0]
    _cuda_box(monkeypatch, 1)  # one GPU: nothing to say
    assert training_arguments(p.parse_args(["--quiet"]), str(tmp_path)).n_gpu == 1
    assert capsys.readouterr().out == ""


def _first_step(lm_path, out, batch, accumulation):
    """One GA+GD optimiser step of 6 rows on the tiny Llama: its logged loss and gradient norm."""
    from transformers import AutoModelForCausalLM

    from utils.methods import METHODS
    from utils.training import TailLM, TailLossTrainer

    torch.manual_seed(0)
    p = argparse.ArgumentParser()
    add_training_args(p, lr=1e-3, epochs=1, warmup=0.0, batch=batch)
    args = p.parse_args(["--quiet", "--max_steps", "1", "--logging_steps", "1",
                         "--gradient_accumulation_steps", str(accumulation)])
    items = [{"input_ids": [5 + i, 9, 11 + i], "labels": [IGNORE, IGNORE, 7 + i % 2], "role": FORGET if i < 2 else RETAIN}
             for i in range(6)]
    trainer = TailLossTrainer(model=TailLM(AutoModelForCausalLM.from_pretrained(lm_path)),
                              args=training_arguments(args, str(out), save_strategy="no", data_seed=None,
                                                      train_sampling_strategy="sequential"),
                              train_dataset=items, data_collator=LeftPadCollator(0),
                              objective=METHODS["gradient_ascent_descent"].objective)
    trainer.train()
    return next(e for e in trainer.state.log_history if "loss" in e)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("reads_attribute", [True, False], ids=["trainer_reads_ga_scaling", "older_trainer"])
def test_accumulation_trains_the_objective_of_one_batch(reads_attribute, monkeypatch, tiny_llama, tmp_path):
    """6 rows as one batch or as 2 rows × 3 accumulation steps: the same step-1 loss and gradient norm, on a
    Trainer that reads `loss_is_scaled_for_ga` and on one that does not (transformers 5.6-5.18, which divide
    the loss by the micro-batches of the window; simulated by taking the attribute away)."""
    from utils.training import TailLossTrainer, trainer_reads_ga_scaling

    if not reads_attribute:
        monkeypatch.delattr(Trainer, "loss_is_scaled_for_ga", raising=False)
        monkeypatch.setattr(TailLossTrainer, "loss_is_scaled_for_ga", None)  # None: the Trainer's own rule decides
        assert not trainer_reads_ga_scaling()
    one, accumulated = _first_step(tiny_llama, tmp_path / "one", 6, 1), _first_step(tiny_llama, tmp_path / "acc", 2, 3)
    scale = abs(one["forget_ga"]) + abs(one["retain_ce"])  # the loss is their difference: compare on their scale
    for k in ("loss", "forget_ga", "retain_ce", "grad_norm"):
        assert accumulated[k] == pytest.approx(one[k], rel=1e-5, abs=1e-5 * scale), (k, accumulated[k], one[k])
    assert scale > 1 and one["grad_norm"] > 1e-3


def test_an_older_transformers_is_refused_at_the_start(monkeypatch, tmp_path):
    """transformers 5.2-5.5 train 2 rows × 3 accumulation steps with a third of the gradient of 6 rows (the test above
    fails so on 5.2.0: their accelerator divides the loss by the steps too); 5.0-5.1 have no train_sampling_strategy:
    the run stops before it starts, in one line."""
    import transformers

    from utils.cli import UserError
    from utils.training import MIN_TRANSFORMERS

    p = argparse.ArgumentParser()
    add_training_args(p, lr=1e-3, epochs=1, warmup=0.0)
    monkeypatch.setattr(transformers, "__version__", "5.5.4")
    with pytest.raises(UserError, match=f"transformers>={MIN_TRANSFORMERS}"):
        training_arguments(p.parse_args([]), str(tmp_path))
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        assert f"transformers>={MIN_TRANSFORMERS}," in f.read()


def fake_accelerator(distributed_type="NO", zero_stage=None, processes=1, index=0, remainder=-1, total_batch=8):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    loader = SimpleNamespace(remainder=remainder, total_batch_size=total_batch)
    return SimpleNamespace(distributed_type=DistributedType[distributed_type], num_processes=processes,
                           process_index=index, state=SimpleNamespace(deepspeed_plugin=plugin),
                           gradient_state=SimpleNamespace(active_dataloader=loader))


@pytest.mark.parametrize("kind,stage,sharded", [("NO", None, False), ("MULTI_GPU", None, False), ("FSDP", None, True),
                                                ("DEEPSPEED", 2, False), ("DEEPSPEED", 3, True)])
def test_sharded_parameters_are_told_from_the_accelerator(kind, stage, sharded):
    from utils.training import parameters_sharded

    assert parameters_sharded(fake_accelerator(kind, stage)) is sharded


@pytest.mark.parametrize("processes,index,remainder,real", [
    (2, 0, 4, 3), (2, 1, 4, 1),   # 22 rows, 2 processes x 3: the epoch's last 4 rows, then 2 repeated ones
    (3, 2, 4, 0),                 # a process whose last micro-batch is all repeated rows
    (2, 1, 0, 3),                 # the rows divide the global batch: nothing repeated
    (1, 0, 4, 3)])                # one process: its last batch holds no repeated row
def test_rows_repeated_to_fill_the_last_batches_get_the_padding_role(processes, index, remainder, real):
    from utils.methods import PADDING
    from utils.training import mark_epoch_fill

    batch = {"role": torch.tensor([FORGET, RETAIN, FORGET])}
    mark_epoch_fill(batch, fake_accelerator(processes=processes, index=index, remainder=remainder, total_batch=3 * processes))
    assert batch["role"].tolist() == [FORGET, RETAIN, FORGET][:real] + [PADDING] * (3 - real)


class _Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(1, 1)

    def forward(self, x, y):
        return {"loss": ((self.w(x) - y) ** 2).mean()}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("max_steps,logging_steps,expected", [(6, 10, [1, 2, 3, 4, 5, 6]),
                                                              (40, 10, [1, *range(4, 41, 4)]),
                                                              (40, 2, [1, *range(2, 41, 2)])])
def test_a_short_run_logs_every_step(tmp_path, max_steps, logging_steps, expected):
    """A short run logs at least ten points: a 6-step run with the default --logging_steps 10 logs every step,
    not its first step and an average; a 40-step one every 4th; a smaller --logging_steps is kept."""
    from utils.training import ShortRunLogging

    p = argparse.ArgumentParser()
    add_training_args(p, lr=1e-2, epochs=1, warmup=0.0, batch=2)
    args = p.parse_args(["--quiet", "--max_steps", str(max_steps), "--logging_steps", str(logging_steps)])
    data = [{"x": torch.tensor([i / 12]), "y": torch.tensor([i / 6])} for i in range(12)]
    trainer = Trainer(model=_Regression(), args=training_arguments(args, str(tmp_path), save_strategy="no"),
                      train_dataset=data, callbacks=[ShortRunLogging()])
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == expected


def test_the_training_scripts_trainer_logs_short_runs_densely():
    from utils.training import ShortRunLogging, TailLossTrainer

    trainer = TailLossTrainer(model=torch.nn.Linear(1, 1), args=None, objective=lambda ctx: {})
    assert any(isinstance(c, ShortRunLogging) for c in trainer.callback_handler.callbacks)
