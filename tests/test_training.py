"""The order in which training rows reach the model (utils.training.training_arguments)."""
import argparse

import pytest
import torch
from transformers import Trainer

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
