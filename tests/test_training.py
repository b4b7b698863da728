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
