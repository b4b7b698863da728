"""scripts/make_tables.py: results.json files -> the paper's Table 2 layout in Markdown and CSV, with the
paper's figures beside ours, and the trade-off plot."""
import csv
import json
import os

import pytest

from tests.conftest import ROOT, run_script

SPLITS = ("train_retain", "train_forget", "test_retain", "test_forget")


def _result(folder, method, accs, f1s, forget_size=1.0, generation=None, mia=0.6):
    os.makedirs(folder, exist_ok=True)
    res = {"method": method, "model": "smollm2-135m", "dataset": "sst2", "forget_size": forget_size,
           "metrics": {s: {"accuracy": a, "f1": f, "label_accuracy": a, "generic_rate": 0.0, "n": 10}
                       for s, a, f in zip(SPLITS, accs, f1s)},
           "mia_auc": mia, "protocol": {"metrics": "top token", "generation": None}, "seconds": 1.0}
    if generation:
        res["generation"] = {s: {"accuracy": a, "f1": a, "n": 10} for s, a in zip(SPLITS, generation)}
        res["protocol"]["generation"] = "greedy"
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(res, f)
    return str(folder)


@pytest.fixture
def runs(tmp_path):
    d = tmp_path / "runs"
    _result(d / "spul-a", "spul", [0.99, 0.125, 0.95, 0.16], [0.98, 0.2, 0.94, 0.25], mia=0.52)
    _result(d / "qlora", "qlora", [1.0, 1.0, 0.9, 0.9], [1.0, 1.0, 0.9, 0.9], mia=0.71)
    _result(d / "vanilla", "vanilla", [0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1], generation=[0.4, 0.3, 0.4, 0.3])
    _result(d / "ga", "gradient_ascent", [0.5, 0.5, 0.5, 0.5], [0.4, 0.4, 0.4, 0.4])
    _result(d / "spul-half", "spul", [0.97, 0.2, 0.93, 0.25], [0.97, 0.3, 0.93, 0.35], forget_size=0.5)
    _result(d / "eco", "eco", [0.9, 0.05, 0.9, 0.05], [0.9, 0.05, 0.9, 0.05])
    return d


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_table2_layout_with_paper_rows(runs, tmp_path):
    out = tmp_path / "tab" / "t2"
    proc = run_script("scripts/make_tables.py", runs, "--out", out)
    rows = _csv(f"{out}.csv")
    names = [r["name"] for r in rows]
    # the paper's row order; generation row and paper rows under ours; the forget-size-0.5 run after the 1.0 block
    assert names == ["Vanilla", "Vanilla (generation)", "Vanilla (paper, LLaMA-2-7B)", "QLoRA", "QLoRA (paper, LLaMA-2-7B)",
                     "GA", "GA (paper, LLaMA-2-7B)", "ECO", "SPUL", "SPUL (paper, LLaMA-2-7B)", "SPUL"]
    spul = rows[names.index("SPUL")]
    assert (spul["source"], spul["forget_size"], spul["mia_auc"]) == ("ours", "1.0", "0.5200")
    assert [spul[f"{s}_acc"] for s in SPLITS] == ["99.00", "12.50", "95.00", "16.00"]
    assert [spul[f"{s}_f1"] for s in SPLITS] == ["98.00", "20.00", "94.00", "25.00"]
    paper = rows[names.index("SPUL (paper, LLaMA-2-7B)")]
    assert (paper["source"], paper["train_retain_acc"], paper["test_forget_f1"]) == ("paper", "99.15", "27.42")
    assert rows[names.index("Vanilla (paper, LLaMA-2-7B)")]["protocol"] == "generation"
    assert rows[names.index("Vanilla (generation)")]["train_forget_acc"] == "30.00"
    assert rows[-1]["forget_size"] == "0.5" and rows[-1]["source"] == "ours"  # no paper figure in Table 2 for τ = 0.5

    md = (tmp_path / "tab" / "t2.md").read_text()
    lines = [l for l in md.splitlines() if l.startswith("|")]
    assert lines[0].startswith("| Method | Model | Data | τ | train_retain ACC | train_retain F1 | train_forget ACC")
    assert len(lines) == 2 + len(rows)
    assert "| SPUL | smollm2-135m | sst2 | 1.0 | 99.00 | 98.00 | 12.50 | 20.00 | 95.00 | 94.00 | 16.00 | 25.00 | 0.520 | spul-a |" in md
    assert "| *SPUL (paper, LLaMA-2-7B)* |" in md
    assert md in proc.stdout
    with open(f"{out}.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_other_paper_tables_and_none(runs, tmp_path):
    out = tmp_path / "t4"
    run_script("scripts/make_tables.py", runs / "spul-half", runs / "spul-a" / "results.json", "--out", out,
               "--paper", "table4_forget_size_llama2_7b")
    rows = _csv(f"{out}.csv")
    assert [(r["source"], r["forget_size"]) for r in rows] == [("ours", "1.0"), ("paper", "1.0"), ("ours", "0.5"), ("paper", "0.5")]
    assert rows[3]["train_retain_acc"] == "97.66"  # Table 4, τ = 0.5

    run_script("scripts/make_tables.py", runs, "--out", out, "--paper", "none")
    assert all(r["source"] == "ours" for r in _csv(f"{out}.csv"))


def test_paper_figures_carry_their_source():
    with open(os.path.join(ROOT, "data", "paper_tables.json")) as f:
        data = json.load(f)
    assert "2406.12038" in data["_source"]
    t2 = {(r["dataset"], r["method"]): r["cells"] for r in data["tables"]["table2_llama2_7b"]["rows"]}
    assert t2[("sst2", "spul")] == [[99.15, 99.39], [12.98, 22.94], [94.93, 95.24], [16.07, 27.42]]


@pytest.mark.parametrize("case", ["empty", "bad_json", "bad_paper"])
def test_errors_are_one_line(case, runs, tmp_path):
    if case == "empty":
        (tmp_path / "empty").mkdir()
        args = [tmp_path / "empty"]
    elif case == "bad_json":
        (tmp_path / "bad.json").write_text("{not json")
        args = [tmp_path / "bad.json"]
    else:
        args = [runs, "--paper", "table9"]
    proc = run_script("scripts/make_tables.py", *args, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2
    assert len([l for l in proc.stderr.splitlines() if l.startswith("error:")]) == 1 and "Traceback" not in proc.stderr
