"""Several processes on the CPU (torchrun → the Trainer's DDP over gloo) train exactly the objective of one.

Each loss term is a mean over the rows of its role in the whole optimiser step (all micro-batches, all
processes), so these three runs of the same rows must agree: 2 processes × 3 rows per device, 1 process
× 3 rows × 2 accumulation steps, and 1 process × 6 rows. With random batch order (the default) the
sampler's permutation depends on the seed alone, and step k holds rows 6k..6k+5 of it in all three.
Before, a term was a mean over its rows *within a micro-batch*, so the first two runs trained a different
objective from the third (a micro-batch without forget rows had L_f = 0): this test fails on that code.
The 22 rows do not divide the global batch of 6: each epoch's last step holds 4 rows, and with 2 processes
accelerate fills the second one's last micro-batch with 2 rows from the start of the epoch; counted as rows,
they changed that step's loss by a third (30.44 against 20.21 on the code before they were masked).
"""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

# Agreement measured here: the loss to the last float32 digits (1.2e-7 of a term's scale, 4e-7 of the prompt's;
# 1e-5 leaves room for another reduction order). Values are compared within SCALE of the largest value of their
# series (a logged term over the steps) or tensor (weights), as tests/test_shared_prefix.py does: another
# reduction order moves a value near zero by float32 rounding of its larger neighbours, not of itself.
# A wrong data split, a lost rank, a repeated row or per-micro-batch means change these numbers by more than 1e-2.
SCALE = 1e-5
TERMS = ("loss", "forget_ce", "retain_ce", "grad_norm")


def _run(script, qlora, sst2, out, batch, *extra, nproc=1):
    args = [script, "--model_checkpoints", qlora, "--data_dir", sst2, "--max_retain", ROWS - FORGET_ROWS, "--max_forget", FORGET_ROWS,
            "--max_length", 64, "--train_batch_size", batch, "--logging_steps", 1, "--lr", 1e-2, "--seed", 7,
            "--output_path", out, "--quiet", *extra]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 \
        else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(launch + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(os.path.join(out, "training_log.json")) as f:
        steps = [e for e in json.load(f) if "loss" in e]
    return proc, steps


ROWS, FORGET_ROWS = 22, 8  # 22 rows: not a multiple of the global batch of 6
# one test process builds the module's runs (under pytest -n, each process that ran a test here would build them)
pytestmark = pytest.mark.xdist_group("multiprocess")

SPUL = ("--num_epochs", 2, "--ptuning_num_tokens", 4)


def _assert_steps_agree(steps, ref, terms, scale=SCALE):
    """Each logged term, a series over the steps, within `scale` of its largest value (and of itself): a step whose
    terms are all rounding noise (no forget row, the model not moved yet) is compared at the run's scale."""
    assert [e["step"] for e in steps] == [e["step"] for e in ref]
    for k in terms:
        atol = scale * max(abs(b[k]) for b in ref)
        for a, b in zip(steps, ref):
            assert a[k] == pytest.approx(b[k], rel=scale, abs=atol), (a["step"], k, a[k], b[k])


@pytest.fixture(scope="module")
def runs(tiny_qlora, sst2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    out = {}
    for name, batch, extra, nproc in (("ddp", 3, (), 2), ("accumulation", 3, ("--gradient_accumulation_steps", 2), 1),
                                      ("batch6", 6, (), 1)):
        out[name] = _run("spul.py", tiny_qlora, sst2_dir, root / name / "spul", batch, *SPUL, *extra, nproc=nproc)
    return root, out


def test_both_ranks_train_with_world_size_two(runs):
    _, r = runs
    proc, steps = r["ddp"]
    out = proc.stdout + proc.stderr
    # 22 rows, 2 epochs, global batch 2 x 3 = 6 rows: 4 optimiser steps an epoch (8 if a rank had run alone)
    assert "[rank 0/2] trained 8 optimiser steps" in out
    assert "[rank 1/2] trained 8 optimiser steps" in out
    assert [e["step"] for e in steps] == list(range(1, 9))


def test_exactly_one_adapter_is_saved(runs):
    root, _ = runs
    saved = glob.glob(str(root / "ddp" / "**" / "adapter_model.safetensors"), recursive=True)
    assert saved == [str(root / "ddp" / "spul" / "adapter_model.safetensors")]
    assert sorted(os.listdir(root / "ddp")) == ["spul"]
    with open(root / "ddp" / "spul" / "arguments.json") as f:
        info = json.load(f)
    assert info["finished"] is True and info["stage"] == "spul"
    assert info["n_train_rows"] == ROWS


@pytest.mark.parametrize("other", ["accumulation", "batch6"])
def test_one_objective_whatever_the_split_of_the_step(runs, other):
    """Every step agrees, each epoch's last (steps 4 and 8, 4 rows, 2 of them repeated on the second process) too."""
    root, r = runs
    ddp, ref = r["ddp"][1], r[other][1]
    # the loss and each term (the step's value, not one process's or one micro-batch's share)
    _assert_steps_agree(ddp, ref, TERMS)
    wa = load_file(str(root / "ddp" / "spul" / "adapter_model.safetensors"))
    wb = load_file(str(root / other / "spul" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=SCALE, atol=SCALE * wb[k].abs().max().item())
    # gradients flowed in every step: the comparison is not between two untouched initialisations
    assert all(e["grad_norm"] > 1e-3 for e in ddp)


def test_forget_rows_are_weighted_as_in_one_batch(runs):
    """The steps where one process's micro-batch held no forget row are the ones the old per-micro-batch mean
    got wrong: in every step that holds forget rows the logged forget term is a whole mean over them (the tiny
    random model's cross-entropy, ~ln of its vocabulary), not half of it, not zero."""
    _, r = runs
    with_forget = {e["step"] for e in r["batch6"][1] if e["forget_ce"] > 0}
    assert len(with_forget) >= 6  # of 8 (step 2 of this seed draws retain rows only)
    assert all(e["forget_ce"] > 1.0 for e in r["ddp"][1] if e["step"] in with_forget)


def test_each_process_fills_the_reference_rows_it_sees(runs, tiny_qlora):
    """The KL cache is filled lazily, by the process that sees a row; the file beside the qlora folder ends up
    holding every retain row once (the three runs share it)."""
    _, r = runs
    files = glob.glob(os.path.join(tiny_qlora, "reference_cache", "top32-float32-*.npz"))
    assert len(files) == 1
    with np.load(files[0]) as f:
        assert len(f["keys"]) == len(set(f["keys"].tolist())) >= ROWS - FORGET_ROWS


def test_baseline_reference_fill_is_split_over_processes(tiny_qlora, sst2_dir, tmp_path):
    """GA+KL fills its reference before the first step, each process a share, then exchanges them: two processes
    of 4 rows train the same steps as one process of 8, the third (the epoch's last: 6 of the 22 rows, 2 repeated on
    the second process) too."""
    extra = ("--unlearn_method", "gradient_ascent_kl", "--max_steps", 3, "--kl_topk", 8)
    _, ddp = _run("baselines.py", tiny_qlora, sst2_dir, tmp_path / "ddp", 4, *extra, nproc=2)
    _, one = _run("baselines.py", tiny_qlora, sst2_dir, tmp_path / "one", 8, *extra)
    _assert_steps_agree(ddp, one, ("loss", "forget_ga", "retain_kl"), scale=1e-4)
