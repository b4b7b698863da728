"""The benchmarks run end to end (on the tiny Llama, one repeat, a few rows) and their shared helpers hold:
a benchmark that no longer runs against the library's API is caught here, not by whoever takes the figures."""
import json
import os
import sys

import pytest

from conftest import ROOT, run_script

pytestmark = pytest.mark.usefixtures("one_thread")
sys.path.insert(0, os.path.join(ROOT, "bench"))

SMALL = ["--repeats", 1, "--batch_size", 4]


def _run(script, tmp_path, *args):
    out = tmp_path / f"{os.path.basename(script)[:-3]}.json"
    proc = run_script(script, *args, "--out", out, env={"OMP_NUM_THREADS": "1"})
    with open(out) as f:
        res = json.load(f)
    env = res["environment"]
    assert env["load_average_at_start"] and env["load_average_at_end"] and env["torch_threads"] >= 1
    return res["results"], proc.stdout


def test_helpers_alternate_and_pair():
    import common

    calls = []
    times, out = common.time_alternating({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 3,
                                         warm_up={"b": lambda: calls.append("wb")})
    assert calls == ["a", "wb", "a", "b", "a", "b", "a", "b"] and out == {"a": 1, "b": 2}
    assert [len(v) for v in times.values()] == [3, 3]
    assert common.summary([3, 1, 2]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    r = common.paired_ratio({"x": [2.0, 6.0, 3.0], "y": [1.0, 2.0, 3.0]}, "x", "y")
    assert (r["median"], r["min"], r["max"]) == (2.0, 1.0, 3.0)  # within each repeat, not median over median


def test_projection_states_its_assumptions():
    import spul_vs_gagd_step as b

    pr = b.project_llama2_7b(tokens_per_row=35.0)
    assert pr["what"].startswith("PROJECTION") and len(pr["assumptions"]) >= 5
    # per step: SPUL (shared) 4N(BT+p) against GA+GD's 6N·BT and a memory-bound update
    assert pr["flops_per_step"]["spul_shared"] == 4 * 6.74e9 * (32 * 35 + 30)
    assert 0.4 < pr["epoch_ratio_spul_over_gagd"] < 0.7 < pr["epoch_ratio_spul_full_over_gagd"]
    assert pr["memory"]["added_over_weights"]["gagd"] > 16 * 6.74e9 and pr["memory"]["ratio_over_weights_spul_over_gagd"] < 0.1
    on = b.project_llama2_7b(tokens_per_row=35.0, gradient_checkpointing=True)
    assert on["memory"]["added_over_weights"]["spul_shared"] < pr["memory"]["added_over_weights"]["spul_shared"]


def test_spul_vs_gagd_step(tiny_llama, sst2_dir, tmp_path):
    res, stdout = _run("bench/spul_vs_gagd_step.py", tmp_path, "--model", tiny_llama, "--data_dir", sst2_dir, *SMALL,
                       "--p_values", "2,30", "--memory_repeats", 1)
    for gc in ("off", "on"):
        r = res["by_gradient_checkpointing"][gc]
        assert all(r["shared_prefix_active"][f"spul_shared_p{n}"] for n in (2, 30)), r["shared_prefix_active"]
        assert set(r["by_p"]["30"]) >= {"time_ratio_spul_over_gagd", "memory_ratio_spul_over_gagd", "time_ratio_shared_over_full"}
    assert [t["limit"] for t in res["targets"]] == [0.8, 0.5, 0.5]
    assert set(res["projection_llama2_7b"]) == {"gc_off", "gc_on"} and "calibrated" in res["projection_llama2_7b"]["gc_on"]
    assert "PROJECTION" in stdout


def test_epoch_floor(tiny_llama, sst2_dir, tmp_path):
    res, _ = _run("bench/epoch_floor.py", tmp_path, "--model", tiny_llama, "--data_dir", sst2_dir, *SMALL,
                  "--ptuning_num_tokens", 4)
    assert set(res["step_seconds"]) == {"spul", "floor", "floor_full", "forward"}
    assert all(res["shared_prefix_active"].values()) and res["floor_gradient_max_difference_over_scale"] < 1e-4
    assert res["throughput_over_floor"]["floor"]["median"] == 1.0


def test_eval_throughput(tiny_llama, sst2_dir, tmp_path):
    res, _ = _run("bench/eval_throughput.py", tmp_path, "--model", tiny_llama, "--data_dir", sst2_dir, *SMALL,
                  "--rows", 8, "--eco_fit_rows", 16, "--ptuning_num_tokens", 4, "--icul_forget_rows", 8)
    assert set(res["throughput_over_plain"]) == {"plain", "spul_shared", "spul_full", "eco", "trainer", "icul", "guardrail",
                                                 "guardrail_full", "filter", "filter_classifier"}
    c = res["checks"]
    assert c["spul_shared_vs_full"]["same"] == 8 and c["guardrail_shared_vs_full"]["same"] == 8
    for name in ("eco", "filter", "filter_classifier"):  # the unflagged rows score as the plain model's, bit for bit
        assert c[f"{name}_unflagged_vs_plain"]["same"] == c[f"{name}_unflagged_vs_plain"]["rows"]
        assert c[f"{name}_unflagged_vs_plain"]["max_abs_label_logit_diff"] == 0
    assert res["shared_prefix_active"] and res["guardrail"]["shared_prefix_active"]
    n = res["input_tokens"]  # ICUL's cost: k + L examples before every query; the guardrail's instruction
    assert n["icul"]["input_ratio"] > 2 and n["filter"]["input_ratio"] == 1
    assert n["guardrail"]["mean"] == n["guardrail_full"]["mean"]
    assert n["guardrail"]["mean"] == pytest.approx(n["plain"]["mean"] + res["guardrail"]["instruction_tokens"])
    assert res["icul"]["k"] == 1 and res["icul"]["l"] == 5 and res["icul"]["forget_pool_rows"] == 8


def test_eval_throughput_from_stage_folders(tiny_qlora, sst2_dir, tmp_path):
    spul, eco = tmp_path / "spul", tmp_path / "eco"
    run_script("spul.py", "--model_checkpoints", tiny_qlora, "--data_dir", sst2_dir, "--max_retain", 8, "--max_forget", 4,
               "--max_steps", 1, "--train_batch_size", 4, "--max_length", 64, "--ptuning_num_tokens", 2,
               "--output_path", spul, "--quiet")
    run_script("eco.py", "--model_checkpoints", tiny_qlora, "--data_dir", sst2_dir, "--max_length", 64, "--max_retain", 16,
               "--search_rows", 4, "--search_rounds", 1, "--max_eval_rows", 8, "--output_path", eco, "--quiet")
    res, _ = _run("bench/eval_throughput.py", tmp_path, "--spul_checkpoint", spul, "--eco_checkpoint", eco,
                  "--data_dir", sst2_dir, *SMALL, "--rows", 8, "--trainer_reference", "false",
                  *[a for name in ("icul", "guardrail", "guardrail_full", "filter", "filter_classifier")
                    for a in (f"--{name}", "false")])
    assert res["ptuning_num_tokens"] == 2 and res["eco"]["source"].startswith("from ")
    assert set(res["throughput_over_plain"]) == {"plain", "spul_shared", "spul_full", "eco"}


def test_kl_reference_grid(tiny_qlora, sst2_dir, tmp_path):
    def stores():
        d = os.path.join(tiny_qlora, "reference_cache")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    before = stores()
    res, stdout = _run("bench/kl_reference.py", tmp_path, "--model_checkpoints", tiny_qlora, "--data_dir", sst2_dir, *SMALL,
                       "--kl_rows", 4, "--grid_rows", 8, "--ptuning_num_tokens", 2)
    g = res["grid"]
    assert g["runs_needing_reference"] == 9 and g["measured"]["rows"] == 8 and g["sst2_retain"]["rows"] == 46_331
    assert g["loaded_equals_computed_max_difference"] == 0
    assert g["measured"]["grid_seconds_saved"] > 0 and "Table 3 grid" in stdout
    assert stores() == before  # the grid's store is a fresh file apart: the qlora folder's store is left alone


def test_shared_prefix(tiny_llama, sst2_dir, tmp_path):
    res, _ = _run("bench/shared_prefix.py", tmp_path, "--model", tiny_llama, "--data_dir", sst2_dir, *SMALL, "--p_values", 2)
    r = res["by_p"]["2"]
    assert r["max_difference_over_scale"]["eval_logits"] < 1e-4 and set(r["speedup_full_over_shared"]) == {"train", "eval"}
