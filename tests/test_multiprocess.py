"""spul.py as two processes on the CPU (torchrun → the Trainer's DDP over gloo), against one process.

What must match: with DDP each of the 2 ranks takes a per-device batch of b rows and the gradients
are averaged, so one optimiser step is the mean of two b-row objectives. The single-process run
that computes exactly that is batch b with --gradient_accumulation_steps 2 (the Trainer averages
the two micro-batches' losses), not batch 2b: SPUL's terms are per-role means over the rows of a
batch (a b-row batch without forget rows has L_f = 0), so the 2b objective is a different number.
Same seed, same length-grouped order (the sampler's megabatches depend on the per-device batch b
only), the same micro-batches in the same steps. The one difference is how the two gradients are
combined: DDP halves each rank's gradient and gloo sums them, the Trainer halves each micro-batch's
loss and accumulates; halving is exact in binary floating point, so the runs agree to the bit here
(measured). The tolerance below leaves room for a reduction order that differs on other builds.
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

# Bit-identical here; 1e-5 allows a few float32 roundings per step. A wrong data split, a lost
# rank or rank-0-only terms change these numbers by more than 1e-2.
RTOL = 1e-5


def _spul(qlora, sst2, out, batch, *extra, nproc=1):
    args = ["spul.py", "--model_checkpoints", qlora, "--data_dir", sst2, "--max_retain", 24, "--max_forget", 8,
            "--max_length", 64, "--train_batch_size", batch, "--num_epochs", 2, "--logging_steps", 1,
            "--ptuning_num_tokens", 4, "--lr", 1e-2, "--seed", 7, "--output_path", out, "--quiet", *extra]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 \
        else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(launch + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"spul.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(os.path.join(out, "training_log.json")) as f:
        steps = [e for e in json.load(f) if "loss" in e]
    return proc, steps


@pytest.fixture(scope="module")
def runs(tiny_qlora, sst2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    ddp = _spul(tiny_qlora, sst2_dir, root / "ddp" / "spul", 4, nproc=2)
    single = _spul(tiny_qlora, sst2_dir, root / "single" / "spul", 4, "--gradient_accumulation_steps", 2)
    return root, ddp, single


def test_both_ranks_train_with_world_size_two(runs):
    _, (proc, steps), _ = runs
    out = proc.stdout + proc.stderr
    # 32 rows, 2 epochs, global batch 2 x 4 = 8 rows: 8 optimiser steps (16 if a rank had run alone)
    assert "[rank 0/2] trained 8 optimiser steps" in out
    assert "[rank 1/2] trained 8 optimiser steps" in out
    assert [e["step"] for e in steps] == list(range(1, 9))


def test_exactly_one_adapter_is_saved(runs):
    root, _, _ = runs
    saved = glob.glob(str(root / "ddp" / "**" / "adapter_model.safetensors"), recursive=True)
    assert saved == [str(root / "ddp" / "spul" / "adapter_model.safetensors")]
    assert sorted(os.listdir(root / "ddp")) == ["spul"]
    with open(root / "ddp" / "spul" / "arguments.json") as f:
        info = json.load(f)
    assert info["finished"] is True and info["stage"] == "spul"
    assert info["n_train_rows"] == 32


def test_losses_and_prompt_match_one_process_with_accumulation(runs):
    root, (_, ddp), (_, single) = runs
    assert [e["step"] for e in ddp] == [e["step"] for e in single]
    for a, b in zip(ddp, single):
        # the loss, and each term (averaged over ranks like the loss, not rank 0's share alone)
        for k in ("loss", "forget_ce", "retain_ce", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=RTOL, abs=1e-6), (a["step"], k, a[k], b[k])
    # the trained prompt encoder itself
    wa = load_file(str(root / "ddp" / "spul" / "adapter_model.safetensors"))
    wb = load_file(str(root / "single" / "spul" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=RTOL, atol=1e-6)
    # gradients flowed in every step: the comparison is not between two untouched initialisations
    assert all(e["grad_norm"] > 1e-3 for e in ddp)
