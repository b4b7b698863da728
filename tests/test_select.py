"""scripts/select_settings.py: one selection rule on validation rows, test splits never read, one-line errors;
the demo and the recipes take the recorded choice."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, one_line_error, run_script

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import demo  # noqa: E402
import select_settings  # noqa: E402
from utils.cli import UserError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _cands(*rows):
    return [{"settings": {"lr": lr}, "forget_val": f, "retain_val": r} for lr, f, r in rows]


def test_the_rule_on_a_hand_made_score_table():
    """Parent retain accuracy 0.90, tolerance 0.05: settings keeping retain >= 0.85 qualify; the lowest forget
    accuracy among them wins, a tie goes to the smaller learning rate."""
    scored = _cands((1e-5, 0.80, 0.90), (3e-5, 0.40, 0.86), (1e-4, 0.10, 0.70), (3e-4, 0.40, 0.88))
    assert select_settings.choose(scored, 0.90, 0.05) == (1, True)  # 1e-4 forgets most but loses 20 points
    scored[3]["settings"]["lr"] = 2e-5  # the same forget accuracy at a smaller learning rate: the smaller change
    assert select_settings.choose(scored, 0.90, 0.05) == (3, True)
    assert select_settings.choose(_cands((1e-5, 0.5, 0.70), (1e-4, 0.1, 0.80)), 0.95, 0.05) == (1, False)  # none within


def test_grid_points_and_bad_grids():
    from utils.cli import UserError

    grid = select_settings.parse_grid("spul", ["lr=1e-3,2e-3", "alpha=1,1.5"])
    assert select_settings.candidates(grid) == [{"lr": 1e-3, "alpha": 1.0}, {"lr": 1e-3, "alpha": 1.5},
                                                {"lr": 2e-3, "alpha": 1.0}, {"lr": 2e-3, "alpha": 1.5}]
    for method, items, needle in (("spul", [], "names no setting"), ("gradient_ascent", ["alpha=1"], "no setting 'alpha'"),
                                  ("spul", ["lr="], "lists no value"), ("spul", ["lr=fast"], "must be numbers"),
                                  ("gradient_descent", ["lr=1"], "unknown --method")):
        with pytest.raises(UserError, match=needle):
            select_settings.parse_grid(method, items)


@pytest.fixture(scope="module")
def train_only(tmp_path_factory, tiny_llama, sst2_dir):
    """A qlora.py folder trained on a data folder that holds the two training splits and nothing else: any read of
    a test split would fail with 'no file for split'."""
    root = tmp_path_factory.mktemp("select")
    data = root / "data"
    data.mkdir()
    for split in ("train_retain", "train_forget"):
        shutil.copy(os.path.join(sst2_dir, f"{split}.csv"), data)
    run_script("qlora.py", "--model_name", tiny_llama, "--data_dir", data, "--quantization", "none", "--max_retain", 24,
               "--max_forget", 8, "--max_length", 64, "--max_steps", 2, "--train_batch_size", 8,
               "--output_path", root / "qlora", "--quiet")
    return root


def test_selection_runs_without_any_test_file_and_records_its_choice(train_only):
    out = train_only / "sel"
    proc = run_script("scripts/select_settings.py", "--model_checkpoints", train_only / "qlora", "--method",
                      "gradient_ascent", "--grid", "lr=1e-5,1e-3", "--max_eval_rows", 6, "--output_path", out, "--",
                      "--max_retain=16", "--max_steps=1", "--train_batch_size=8")
    assert "chosen for gradient_ascent" in proc.stdout
    sel = json.loads((out / "selection.json").read_text())
    assert [c["settings"] for c in sel["candidates"]] == [{"lr": 1e-5}, {"lr": 1e-3}]
    assert all(c["n_retain_val"] == 6 and c["n_forget_val"] == 6 for c in sel["candidates"])  # 8 held-out rows, capped
    assert sel["chosen"] in [c["settings"] for c in sel["candidates"]]
    assert sel["model"] and sel["dataset"] == "data" and "retain_val" in sel["parent"]  # named after its folder
    assert sel["seeds"] == [42]  # the training seed of its runs: a table's runs of the choice take another
    # a second call reuses the finished runs
    again = run_script("scripts/select_settings.py", "--model_checkpoints", train_only / "qlora", "--method",
                       "gradient_ascent", "--grid", "lr=1e-5,1e-3", "--max_eval_rows", 6, "--output_path", out, "--",
                       "--max_retain=16", "--max_steps=1", "--train_batch_size=8")
    assert again.stdout.count("nothing to do") == 2


def test_validation_reads_training_files_only(train_only, monkeypatch):
    """In process: every file the validation rows come from is a training split."""
    from utils import data

    read = []
    real = data._read_table
    monkeypatch.setattr(data, "_read_table", lambda path: read.append(path) or real(path))
    parent = json.loads((train_only / "qlora" / "arguments.json").read_text())
    run = {**parent, "max_retain": 16, "forget_size": 1.0}
    forget, retain, _ = select_settings.validation_rows(parent, run, dict(data_dir=parent["data_dir"]), None, 0)
    assert len(forget) == 8 and len(retain) == 8
    assert read and all(os.path.basename(p).startswith("train_") for p in read)
    held = {r["text"] for r in retain}
    trained = {r["text"] for r in data.select_training_rows(data.load_splits(data_dir=parent["data_dir"],
               splits=("train_retain",)), 1.0, None, 16, 42)["train_retain"]}
    assert not held & trained  # retain validation rows were never trained on by the unlearning run


def test_no_retain_rows_left_is_one_line(train_only, tmp_path):
    proc = run_script("scripts/select_settings.py", "--model_checkpoints", train_only / "qlora", "--method",
                      "gradient_ascent", "--grid", "lr=1e-5", "--output_path", tmp_path / "s", "--",
                      "--max_steps=1", "--train_batch_size=8", check=False)
    assert "no retain rows are held out" in one_line_error(proc)


def test_a_selection_from_another_model_or_dataset_is_refused(tmp_path):
    from utils.cli import UserError

    path = tmp_path / "sel.json"
    path.write_text(json.dumps({"model": "smollm2-135m", "dataset": "sst2",
                                "methods": {"npo": {"chosen": {"lr": 3e-5}}}}))
    assert select_settings.load_selection(str(path), "npo", "smollm2-135m", "sst2") == {"lr": 3e-5}
    with pytest.raises(UserError, match="model"):
        select_settings.load_selection(str(path), "npo", "meta-llama/Llama-2-7b-hf", "sst2")
    with pytest.raises(UserError, match="dataset"):
        select_settings.load_selection(str(path), "npo", "smollm2-135m", "yelp")
    with pytest.raises(UserError, match="no selection for spul"):
        select_settings.load_selection(str(path), "spul")


def test_the_demo_and_the_recipes_take_the_recorded_choice(tmp_path):
    import argparse

    import demo

    args = argparse.Namespace(output_path=str(tmp_path), data_dir=None, model_name="smollm2-135m", skip="",
                              methods="npo", seeds="42", seed_methods="spul")
    jobs = {j.name: j.args for j in demo.plan(args, demo.SCALES["demo"], {"npo": {"lr": 3e-5}, "spul": {"alpha": 1.5}})}
    assert "--lr=3e-05" in jobs["npo"] and "--lr=1e-05" not in jobs["npo"]
    assert "--alpha=1.5" in jobs["spul"] and "--alpha=1.25" not in jobs["spul"]
    # the recipes: SELECTION=... gives each stage its chosen flags
    path = tmp_path / "sel.json"
    path.write_text(json.dumps({"model": "m", "dataset": "sst2", "methods": {"npo": {"chosen": {"lr": 3e-5}}}}))
    cmd = f'source scripts/common.sh >/dev/null 2>&1; SELECTION={path} MODEL=m DATASET=sst2; selected npo'
    out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "EVAL_EXTRA": "--max_eval_rows=1"})
    # a selection that records no seed ran at the stages' default 42: the recipe's stage trains with another
    assert out.stdout.strip() == "--lr=3e-05 --seed=1", out.stderr


def _table_args(tmp_path, seeds=""):
    import argparse

    return argparse.Namespace(output_path=str(tmp_path), data_dir=None, model_name="smollm2-135m", skip="",
                              methods=demo.DEMO_METHODS, seeds=seeds, seed_methods="spul", selection="sel.json")


def _seed(job_args):
    return int(next((a.split("=")[1] for a in job_args if a.startswith("--seed=")), select_settings.DEFAULT_SEED))


def test_the_table_reports_fresh_runs_never_the_selections_own(tmp_path):
    """The demo's table runs train the chosen settings with a seed the selection's runs (on the same rows) did not
    use; asking for one of the selection's seeds is a one-line error. The recorded demo selection ran at seed 42."""
    recorded = json.load(open(demo.SELECTED))
    selected = {m: e["chosen"] for m, e in recorded["methods"].items()}
    args = _table_args(tmp_path)
    args.scale, args.selection = recorded["scale"], demo.SELECTED
    used = demo.selection_seeds_here(args, demo.SELECTED, selected)
    assert set(used) == set(selected) and all(used[m] == [42] for m in used)
    jobs = {j.name: j.args for j in demo.plan(args, demo.SCALES["demo"], selected, used)}
    for m in ["spul", "icul", *demo.DEMO_METHODS.split(",")]:
        assert _seed(jobs[m]) not in used[m], m
    assert {"spul", "gradient_ascent_descent"} <= set(jobs) and _seed(jobs["spul"]) == 1
    # another scale selects nothing on its rows: its own seed stays 42
    args.scale = "large"
    assert demo.selection_seeds_here(args, demo.SELECTED, selected) == {}
    # a seed of the selection's runs, asked for with --seeds: refused
    with pytest.raises(UserError, match="selected on its runs of seed 42"):
        demo.plan(_table_args(tmp_path, seeds="42,2"), demo.SCALES["demo"], selected, used)
    jobs = {j.name: j.args for j in demo.plan(_table_args(tmp_path, seeds="1,2"), demo.SCALES["demo"], selected, used)}
    assert _seed(jobs["spul"]) == 1 and _seed(jobs["spul-seed2"]) == 2 and "spul-seed1" not in jobs


def test_fresh_seeds_and_the_recorded_seeds(tmp_path):
    assert select_settings.fresh_seed([]) == 42 and select_settings.fresh_seed([42]) == 1
    assert select_settings.fresh_seed([42, 1, 2]) == 3 and select_settings.fresh_seed([7]) == 42
    path = tmp_path / "sel.json"
    path.write_text(json.dumps({"model": "m", "dataset": "sst2", "methods": {
        "npo": {"chosen": {"lr": 3e-5}, "seeds": [7]}, "spul": {"chosen": {"alpha": 1.0}}}}))
    assert select_settings.selection_seeds(str(path), "npo") == [7]
    assert select_settings.selection_seeds(str(path), "spul") == [42]  # recorded before seeds were: the default
    assert select_settings.table_flags(str(path), "npo") == ["--lr=3e-05"]  # 42 was not a selection seed
    assert select_settings.table_flags(str(path), "spul") == ["--alpha=1.0", "--seed=1"]


def test_a_duplicated_text_is_no_held_out_row(tmp_path):
    """The retain hold-out is decided by text, not by row: a held-out row whose text the run trained on (a duplicate
    within train_retain, or a forget row's text) is left out of retain validation."""
    import pandas as pd

    from utils.data import sample_rows

    texts = [f"retain text number {i} ." for i in range(12)]
    trained = {r["i"] for r in sample_rows([{"i": i} for i in range(12)], 6, 42)}
    held = sorted(set(range(12)) - trained)
    first = min(trained)
    texts[held[0]] = texts[first]  # a copy of a trained retain text among the held-out rows
    texts[held[1]] = "a forget text ."  # a forget row's text among the held-out rows
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame({"text": texts, "label": [i % 2 for i in range(12)]}).to_csv(data / "train_retain.csv", index=False)
    pd.DataFrame({"text": ["a forget text .", "another forget text ."], "label": [0, 1]}).to_csv(
        data / "train_forget.csv", index=False)
    parent = {"data_seed": 42}
    run = {"data_seed": 42, "max_retain": 6, "forget_size": 1.0}
    forget, retain, _ = select_settings.validation_rows(parent, run, dict(data_dir=str(data)), None, 0)
    assert len(forget) == 2
    assert [r["text"] for r in retain] == [texts[i] for i in held[2:]]  # every held-out row but the two copies


def test_the_recorded_selection_covers_every_method_the_demo_and_the_larger_table_run():
    import demo

    recorded = set(json.load(open(demo.SELECTED))["methods"])
    for scale in ("demo", "large"):
        assert set(demo.default_methods(scale).split(",")) | {"spul", "icul"} <= recorded, scale
    # the demo runs GA+GD; its selection (--select) and the larger table cover every Table 2 baseline and NPO
    assert demo.default_methods("demo") == "gradient_ascent_descent"
    assert {"gradient_ascent", "random_label", "gradient_ascent_kl", "npo"} <= set(demo.default_methods("demo", select=True).split(","))
    assert "npo" in demo.default_methods("large").split(",")
    assert demo.default_methods("smoke") == "gradient_ascent_descent"  # the smoke check runs one baseline


def test_icul_is_selected_on_its_k_and_l_by_the_same_rule(tmp_path):
    """ICUL's grid keys are integers; its grid points run prompting.py --method icul (checked by prompting.py's own
    parser before any run); the demo's selection covers it, and --skip leaves methods out."""
    import argparse

    grid = select_settings.parse_grid("icul", ["icul_k=1", "icul_l=1,3"])
    assert select_settings.candidates(grid) == [{"icul_k": 1, "icul_l": 1}, {"icul_k": 1, "icul_l": 3}]
    assert all(isinstance(v, int) for p in select_settings.candidates(grid) for v in p.values())
    with pytest.raises(UserError, match="no setting 'lr'"):
        select_settings.parse_grid("icul", ["lr=1e-3"])
    args = argparse.Namespace(method="icul", model_checkpoints="q", stage_flags=["--max_retain=64"],
                              grid=select_settings.parse_grid("icul", ["icul_l=0,2"]))
    assert select_settings.script_of("icul") == "prompting.py"
    assert select_settings.stage_argv(args, {"icul_l": 2})[1:] == ["--method=icul", "--max_retain=64", "--icul_l=2"]
    select_settings.check_points(args)
    args.grid = {"icul_k": [0]}
    with pytest.raises(UserError, match="prompting.py refuses the grid point"):
        select_settings.check_points(args)

    sel = argparse.Namespace(output_path=str(tmp_path), data_dir="d", model_name="m", task="sentiment",
                             methods="gradient_ascent", skip="")
    names = [j.name for j in demo.plan_selection(sel, demo.SCALES["demo"])]
    assert names == ["qlora", "select spul", "select gradient_ascent", "select icul"]
    sel.skip = "spul,baselines"
    jobs = demo.plan_selection(sel, demo.SCALES["demo"])
    assert [j.name for j in jobs] == ["qlora", "select icul"]
    assert {"--method=icul", "icul_k=1", "icul_l=1,3", "--max_retain=64"} <= set(jobs[1].args)


def test_a_partial_selection_keeps_the_other_methods(tmp_path, monkeypatch):
    """--select --skip=...: the methods selected now replace theirs, the others stay with the command that chose them;
    a file of another model starts afresh."""
    import argparse

    path = tmp_path / "selected.json"
    path.write_text(json.dumps({"command": "python scripts/demo.py --select", "scale": "demo", "model": "m",
                                "dataset": "sst2", "methods": {"spul": {"chosen": {"lr": 1e-3}}}}))
    entry = {"method": "icul", "chosen": {"icul_l": 3}, "qualified": False, "parent": {}, "grid": {}, "rule": "r",
             "seeds": [42], "candidates": []}
    (tmp_path / "icul.json").write_text(json.dumps(entry))
    args = argparse.Namespace(scale="demo", model_name="m", task="sentiment", data_dir=None)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--select", "--skip=spul,baselines"])
    demo.record_selection(args, [demo.Job("select icul", "s", [], [], str(tmp_path / "icul.json"))], str(path))
    got = json.loads(path.read_text())["methods"]
    assert got["spul"] == {"chosen": {"lr": 1e-3}, "command": "python scripts/demo.py --select"}
    assert got["icul"]["chosen"] == {"icul_l": 3} and got["icul"]["command"].endswith("--select --skip=spul,baselines")
    args.model_name = "other"
    demo.record_selection(args, [demo.Job("select icul", "s", [], [], str(tmp_path / "icul.json"))], str(path))
    assert set(json.loads(path.read_text())["methods"]) == {"icul"}


def test_the_demo_runs_the_training_free_baselines(tmp_path):
    """Forget terms from the qlora model's training rows, then the guardrail and the filter on them; ICUL with its
    selected k and L and a fresh seed; --skip leaves any of them out."""
    args = _table_args(tmp_path)
    scale = demo.SCALES["demo"]
    jobs = {j.name: j for j in demo.plan(args, scale, {"icul": {"icul_k": 1, "icul_l": 3}}, {"icul": [42]})}
    terms = os.path.join(str(tmp_path), "forget_terms.txt")
    t = jobs["forget terms"]
    assert t.script == "scripts/forget_terms.py" and t.after == set() and t.output == terms
    assert {"--max_retain=384", "--max_forget=128", "--min_rows=5", f"--output={terms}"} <= set(t.args)
    for m in ("guardrail", "filter"):
        assert jobs[m].after == {"qlora", "forget terms"} and f"--forget_terms={terms}" in jobs[m].args
        assert f"--method={m}" in jobs[m].args and not any(a.startswith("--icul") for a in jobs[m].args)
        assert jobs[f"{m} eval"].after == {m}
    icul = jobs["icul"].args
    assert {"--method=icul", "--icul_k=1", "--icul_l=3", "--seed=1", "--max_retain=64"} <= set(icul)
    assert not any(a.startswith("--forget_terms") for a in icul) and jobs["icul"].after == {"qlora"}
    # more seeds of a training-free method: prompting.py again, with the selected settings
    args.seeds, args.seed_methods = "2", "icul"
    again = {j.name: j for j in demo.plan(args, scale, {"icul": {"icul_k": 1, "icul_l": 3}}, {"icul": [42]})}
    assert again["icul-seed2"].script == "prompting.py" and {"--icul_l=3", "--seed=2"} <= set(again["icul-seed2"].args)
    args.seeds = ""
    for skip, gone in (("prompting", {"forget terms", "icul", "guardrail", "filter"}), ("icul", {"icul"}),
                       ("guardrail,filter", {"forget terms", "guardrail", "filter"})):
        args.skip = skip
        names = {j.name for j in demo.plan(args, scale)}
        assert not gone & names and ({"forget terms", "icul", "guardrail", "filter"} - gone) <= names, skip


def test_the_mcqa_demo_names_its_categories_and_gates_by_the_classifier(tmp_path):
    """The mcqa demo's forget set is four TruthfulQA categories: the guardrail names them, the filter is ECO's
    classifier gate, no terms are derived; on a folder of the user's own the categories are unknown: terms."""
    import argparse

    args = argparse.Namespace(output_path=str(tmp_path), data_dir=str(tmp_path / "data"), model_name="m", task="mcqa",
                              seeds="", seed_methods="spul", methods="gradient_ascent_descent", skip="", built_data=True)
    scale = demo.scale_of(argparse.Namespace(scale="mcqa", task="mcqa"))
    jobs = {j.name: j.args for j in demo.plan(args, scale)}
    assert "forget terms" not in jobs and "--filter_gate=classifier" in jobs["filter"]
    assert "--forget_description=health, nutrition, psychology and science" in jobs["guardrail"]
    args.built_data = False
    jobs = {j.name: j.args for j in demo.plan(args, scale)}
    assert "forget terms" in jobs and any(a.startswith("--forget_terms=") for a in jobs["guardrail"])
    assert "--filter_gate=classifier" in jobs["filter"]
