"""scripts/make_tables.py: results.json files -> the paper's table layout in Markdown and CSV, with 95 %
intervals, seed aggregation, the paper's figures beside ours, and the trade-off plot; scripts/paper_tables.py
and the per-table recipes' paper keys."""
import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_script
from utils.intervals import wilson

SPLITS = ("train_retain", "train_forget", "test_retain", "test_forget")
SHARED_PAPER = os.path.join(os.path.dirname(ROOT), "shared", "paper", "tables.json")


def _load_module():
    spec = importlib.util.spec_from_file_location("make_tables", os.path.join(ROOT, "scripts", "make_tables.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mt = _load_module()


def _result(folder, method, accs, f1s, forget_size=1.0, generation=None, mia=0.6, n=64, ci=True, seed=None,
            settings=None, dataset="sst2"):
    os.makedirs(folder, exist_ok=True)
    metrics = {}
    for s, a, f in zip(SPLITS, accs, f1s):
        metrics[s] = {"accuracy": a, "f1": f, "label_accuracy": a, "generic_rate": 0.0, "n": n}
        if ci:
            metrics[s].update(accuracy_ci=wilson(round(a * n), n), f1_ci=[max(0.0, f - 0.05), min(1.0, f + 0.04)])
    res = {"method": method, "model": "smollm2-135m", "dataset": dataset, "forget_size": forget_size,
           "metrics": metrics, "mia_auc": mia, "mia_auc_ci": [mia - 0.08, mia + 0.07] if ci else None,
           "protocol": {"metrics": "top token", "generation": None}, "seconds": 1.0}
    if seed is not None or settings is not None:
        res["train_seed"], res["run_settings"] = seed, settings or {}
    if generation:
        res["generation"] = {s: {"accuracy": a, "f1": a, "n": n} for s, a in zip(SPLITS, generation)}
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


def _rows(paths, paper="table2_llama2_7b"):
    return mt.table_rows([mt.read_result(p) for p in mt.find_results(paths)], mt.load_paper(paper))


def _md_table(md):
    """{Method: [cells...]} of a Markdown table (the first column is the key)."""
    lines = [l for l in md.splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out.setdefault(cells[0], []).append(dict(zip(head, cells)))
    return out


def _main(*argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["make_tables.py", *map(str, argv)])
    mt.main()


def test_table2_layout_with_paper_rows(runs, tmp_path):
    out = tmp_path / "tab" / "t2"
    proc = run_script("scripts/make_tables.py", runs, "--output_path", out)
    rows = _csv(f"{out}.csv")
    names = [r["name"] for r in rows]
    # the paper's row order; generation row and paper rows under ours; the forget-size-0.5 run after the 1.0 block
    assert names == ["Vanilla", "Vanilla (generation)", "Vanilla (paper, LLaMA-2-7B)", "QLoRA", "QLoRA (paper, LLaMA-2-7B)",
                     "GA", "GA (paper, LLaMA-2-7B)", "ECO", "SPUL", "SPUL (paper, LLaMA-2-7B)", "SPUL"]
    spul = rows[names.index("SPUL")]
    assert (spul["source"], spul["forget_size"], spul["mia_auc"], spul["n"]) == ("ours", "1.0", "0.5200", "64")
    assert [spul[f"{s}_acc"] for s in SPLITS] == ["99.00", "12.50", "95.00", "16.00"]
    assert [spul[f"{s}_f1"] for s in SPLITS] == ["98.00", "20.00", "94.00", "25.00"]
    # the interval columns: Wilson bounds in percent, the F1 and AUC bounds as given
    lo, hi = wilson(8, 64)
    assert (spul["train_forget_acc_lo"], spul["train_forget_acc_hi"]) == (f"{100 * lo:.3f}", f"{100 * hi:.3f}")
    assert (spul["train_forget_f1_lo"], spul["train_forget_f1_hi"]) == ("15.000", "24.000")
    assert (spul["mia_auc_lo"], spul["mia_auc_hi"], spul["test_forget_n"]) == ("0.4400", "0.5900", "64")
    paper = rows[names.index("SPUL (paper, LLaMA-2-7B)")]
    assert (paper["source"], paper["train_retain_acc"], paper["test_forget_f1"]) == ("paper", "99.15", "27.42")
    assert paper["train_retain_acc_lo"] == "" and paper["n"] == ""
    assert rows[names.index("Vanilla (paper, LLaMA-2-7B)")]["protocol"] == "generation"
    assert rows[names.index("Vanilla (generation)")]["train_forget_acc"] == "30.00"
    assert rows[-1]["forget_size"] == "0.5" and rows[-1]["source"] == "ours"  # no paper figure in Table 2 for τ = 0.5

    md = (tmp_path / "tab" / "t2.md").read_text()
    lines = [l for l in md.splitlines() if l.startswith("|")]
    assert lines[0] == ("| Method | Model | Data | τ | n | " + " | ".join(f"{s} ACC | {s} F1" for s in SPLITS)
                        + " | MIA AUC | Run |")
    assert len(lines) == 2 + len(rows)
    wl = f"[{100 * lo:.1f}, {100 * hi:.1f}]"
    assert f"| SPUL | smollm2-135m | sst2 | 1.0 | 64 | **99.00** [" in md
    assert f"| 12.50 {wl} | 20.00 [15.0, 24.0] |" in md  # ECO forgets more: not bold
    assert "| **0.520** [0.440, 0.590] | spul-a |" in md
    assert "| *SPUL (paper, LLaMA-2-7B)* | LLaMA-2-7B | sst2 | 1.0 |  | 99.15 | 99.39 | 12.98 |" in md
    assert "Pipeline check" not in md
    assert md in proc.stdout
    with open(f"{out}.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_paper_rows_only_beside_the_papers_datasets(tmp_path):
    """A run on own data (named after its folder) gets no paper row; one on the paper's SST-2 does."""
    _result(tmp_path / "own", "spul", [0.99, 0.1, 0.95, 0.2], [0.99, 0.1, 0.95, 0.2], dataset="mydata")
    _result(tmp_path / "sst2", "spul", [0.99, 0.1, 0.95, 0.2], [0.99, 0.1, 0.95, 0.2], dataset="sst2")
    rows = _rows([tmp_path])
    assert [(r["source"], r["dataset"]) for r in rows] == [("ours", "mydata"), ("ours", "sst2"), ("paper", "sst2")]


def test_bold_marks_the_best_of_our_unlearning_rows(tmp_path):
    d = tmp_path / "runs"
    # QLoRA is best on train_retain and test_forget but is a reference: never bold
    _result(d / "qlora", "qlora", [1.0, 1.0, 0.99, 0.01], [1.0, 1.0, 0.99, 0.01], mia=0.5)
    _result(d / "ga", "gradient_ascent", [0.8, 0.3, 0.7, 0.4], [0.8, 0.3, 0.7, 0.4], mia=0.45)
    _result(d / "eco", "eco", [0.9, 0.2, 0.8, 0.4], [0.9, 0.25, 0.7, 0.5], mia=0.56)
    _result(d / "spul", "spul", [0.9, 0.25, 0.8, 0.3], [0.85, 0.25, 0.8, 0.35], mia=0.55)
    rows = _rows([d])
    md = mt.to_markdown(rows, mt.load_paper("table2_llama2_7b"))
    t = _md_table(md)
    bold = {name: [col for col, v in cells[0].items() if v.startswith("**")] for name, cells in t.items()}
    assert bold["QLoRA"] == [] and bold["*QLoRA (paper, LLaMA-2-7B)*"] == [] and bold["*SPUL (paper, LLaMA-2-7B)*"] == []
    # max on *_retain, min on *_forget, MIA closest to 0.5; ties all bold (ECO and SPUL on train_retain ACC,
    # train_forget F1 and test_retain ACC; GA's 0.45 and SPUL's 0.55 are both 0.05 from 0.5)
    assert bold["ECO"] == ["train_retain ACC", "train_retain F1", "train_forget ACC", "train_forget F1", "test_retain ACC"]
    assert bold["SPUL"] == ["train_retain ACC", "train_forget F1", "test_retain ACC", "test_retain F1", "test_forget ACC",
                            "test_forget F1", "MIA AUC"]
    assert bold["GA"] == ["MIA AUC"]
    assert "Bold: the best of our unlearning rows" in md


def test_footnotes_explain_tau_and_mia_and_mention_only_present_paper_rows(runs, tmp_path):
    md = mt.to_markdown(_rows([runs]), mt.load_paper("table2_llama2_7b"))
    assert "τ: the fraction of the forget set unlearned (--forget_size" in md
    assert "MIA AUC: loss-based membership inference" in md and "train_forget" in md and "over-unlearning" in md
    assert "95 % interval" in md and "Wilson" in md
    assert "Rows in italics: the paper's figures" in md
    # no paper rows: no footnote about them (--paper none, or a paper table that matches none of our rows)
    for key in ("none", "table3_alpha_beta_llama2_7b"):
        paper = mt.load_paper(key)
        rows = _rows([runs], key)
        assert not any(r["source"] == "paper" for r in rows)
        md = mt.to_markdown(rows, paper)
        assert "(paper," not in md and "italics" not in md and "the paper's rows" not in md
        assert "paper_tables.json" not in md
    # no seeds aggregated, no sd footnote
    assert "standard deviation" not in md


def test_pipeline_check_banner_under_20_rows(tmp_path):
    small, big = tmp_path / "small", tmp_path / "big"
    _result(small / "spul", "spul", [0.9, 0.2, 0.8, 0.3], [0.9, 0.2, 0.8, 0.3], n=6)
    _result(big / "spul", "spul", [0.9, 0.2, 0.8, 0.3], [0.9, 0.2, 0.8, 0.3], n=20)
    md = mt.to_markdown(_rows([small]), None)
    assert md.splitlines()[0].startswith("> **Pipeline check, not a result:** every row was scored on fewer than 20 rows")
    assert "(n = 6)" in md.splitlines()[0]
    assert "Pipeline check" not in mt.to_markdown(_rows([big]), None)
    mixed = mt.to_markdown(_rows([small, big]), None)
    assert "1 of the 2 rows were scored on fewer than 20" in mixed.splitlines()[0]
    title = mt.tradeoff_figure(_rows([small])).axes[0].get_title()
    assert "PIPELINE CHECK" in title and "n = 6" in title
    # three splits of 32 rows, one of 6: the banner says so, not "fewer than 20 rows per split"
    one = tmp_path / "one"
    path = _result(one / "spul", "spul", [0.9, 0.2, 0.8, 0.3], [0.9, 0.2, 0.8, 0.3], n=32)
    res = json.load(open(os.path.join(path, "results.json")))
    res["metrics"]["train_forget"]["n"] = 6
    json.dump(res, open(os.path.join(path, "results.json"), "w"))
    banner = mt.to_markdown(_rows([one]), None).splitlines()[0]
    assert "in at least one split (n = 32/6/32/32 (train_retain/train_forget/test_retain/test_forget))" in banner
    assert "per split" not in banner


def test_an_existing_table_is_replaced_only_with_overwrite(runs, tmp_path, monkeypatch):
    prefix = tmp_path / "t" / "table"
    _main(runs, "--output_path", prefix, "--paper", "none", monkeypatch=monkeypatch)
    before = (tmp_path / "t" / "table.md").read_text()
    _result(runs / "ga2", "gradient_ascent", [0.4, 0.4, 0.4, 0.4], [0.4, 0.4, 0.4, 0.4])
    with pytest.raises(mt.UserError, match="table.md already exists: pass --overwrite"):
        _main(runs, "--output_path", prefix, "--paper", "none", monkeypatch=monkeypatch)
    assert (tmp_path / "t" / "table.md").read_text() == before  # untouched
    _main(runs, "--output_path", prefix, "--paper", "none", "--overwrite", monkeypatch=monkeypatch)
    assert (tmp_path / "t" / "table.md").read_text() != before


def test_rows_of_one_method_from_different_run_folders_name_them(tmp_path):
    """A smoke demo's runs and a hand run under one folder: rows that nothing else tells apart carry their run
    folder (the shortest distinct tail of its path), in the table and in the plot's legend."""
    accs = [0.9, 0.2, 0.8, 0.3]
    _result(tmp_path / "runs" / "demo-smoke" / "qlora", "qlora", accs, accs)
    _result(tmp_path / "runs" / "hand" / "qlora", "qlora", accs, accs)
    _result(tmp_path / "runs" / "demo-smoke" / "spul", "spul", accs, accs)
    _result(tmp_path / "runs" / "spul-mine", "spul", accs, accs)
    _result(tmp_path / "runs" / "demo-smoke" / "eco", "eco", accs, accs)
    rows = _rows([tmp_path / "runs"], paper="none")
    table = _md_table(mt.to_markdown(rows, None))
    assert {"QLoRA [demo-smoke/qlora]", "QLoRA [hand/qlora]", "SPUL [spul]", "SPUL [spul-mine]", "ECO"} <= set(table)
    assert "SPUL [spul-mine]" in [r["label"] for r in rows]


def test_points_at_one_place_are_set_apart_and_the_caption_says_so(tmp_path):
    accs = [0.9, 0.5, 0.5, 0.5]
    for m in ("gradient_ascent", "random_label", "npo", "spul"):
        _result(tmp_path / m, m, accs, accs, n=4, ci=False)
    _result(tmp_path / "eco", "eco", [0.9, 0.1, 0.9, 0.1], [0.9, 0.1, 0.9, 0.1], n=4, ci=False)
    ax = mt.tradeoff_figure(_rows([tmp_path], paper="none")).axes[0]
    points = [tuple(c.get_offsets()[0]) for c in ax.collections if c.get_gid() == "ours"]
    assert len(set(points)) == len(points) == 5  # each marker visible
    near = [p for p in points if abs(p[0] - 50) < 2 and abs(p[1] - 50) < 2]
    assert len(near) == 4  # still at their place, within 5 % of the 40-point span
    assert (10.0, 90.0) in points  # a point alone is not moved
    assert "4 points at one place shifted slightly apart" in ax.get_title()


def test_output_path_prefix_folder_and_alias(runs, tmp_path, monkeypatch):
    folder = tmp_path / "t"
    _main(runs, "--output_path", f"{folder}/", "--paper", "none", monkeypatch=monkeypatch)
    assert sorted(os.listdir(folder)) == ["table.csv", "table.md", "table.png"]  # no hidden t/.md
    existing = tmp_path / "existing"
    existing.mkdir()
    _main(runs, "--out", existing, "--paper", "none", monkeypatch=monkeypatch)  # --out: the old name
    assert sorted(os.listdir(existing)) == ["table.csv", "table.md", "table.png"]
    _main(runs, "--output_path", tmp_path / "deep" / "sst2", monkeypatch=monkeypatch)
    assert sorted(os.listdir(tmp_path / "deep")) == ["sst2.csv", "sst2.md", "sst2.png"]


def test_help_shows_defaults_and_abbreviations_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        mt.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--output_path OUTPUT_PATH, --out OUTPUT_PATH" in text
    assert "(default: table2_llama2_7b)" in text and "(default: runs/tables/table2)" in text
    with pytest.raises(SystemExit) as e:
        mt.parse_args([str(tmp_path), "--output", str(tmp_path / "x")])
    assert e.value.code == 2 and "unrecognized arguments: --output" in capsys.readouterr().err


def _legend(ax):
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()], leg.legend_handles


def test_figure_one_style_per_method_hollow_paper_points_and_error_bars(runs):
    from matplotlib.colors import to_rgba

    rows = _rows([runs])
    fig = mt.tradeoff_figure(rows)
    ax = fig.axes[0]
    labels, handles = _legend(ax)
    ours = [r for r in rows if r["source"] == "ours"]
    assert labels[:-1] == [r["label"] for r in ours]  # one entry per method, then the paper's once
    assert labels[-1] == "paper (LLaMA-2-7B)"
    assert "SPUL [τ=1.0]" in labels and "SPUL [τ=0.5]" in labels  # same method, told apart
    colours = [to_rgba(h.get_markerfacecolor()) for h in handles[:-1]]
    markers = [h.get_marker() for h in handles[:-1]]
    assert len(set(colours)) == len(colours) and len(set(markers)) == len(markers)
    assert handles[-1].get_markerfacecolor() == "none"
    # our points filled, the paper's hollow in their method's colour
    style = dict(zip(labels[:-1], colours))
    ours_pts = [c for c in ax.collections if c.get_gid() == "ours"]
    paper_pts = [c for c in ax.collections if c.get_gid() == "paper"]
    papers = [r for r in rows if r["source"] == "paper"]
    assert len(ours_pts) == len(ours) and len(paper_pts) == len(papers) == 4
    for coll, r in zip(paper_pts, papers):
        face = coll.get_facecolor()
        assert len(face) == 0 or all(c[3] == 0 for c in face)
        assert tuple(coll.get_edgecolor()[0]) == pytest.approx(style[r["ref"]])
        assert tuple(coll.get_offsets()[0]) == pytest.approx((r["cells"][1][0], r["cells"][2][0]))
    for coll in ours_pts:
        assert coll.get_facecolor()[0][3] == 1
    # error bars from the intervals: one per our row; x from train_forget, y from test_retain
    bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    with_ci = [r for r in ours if r["ci"][1][0] or r["ci"][2][0]]
    assert len(bars) == len(with_ci) == len(ours) - 1  # the fixture's generation row has no intervals
    spul = next(r for r in ours if r["label"] == "SPUL [τ=1.0]")
    xbar, ybar = bars[with_ci.index(spul)].lines[2]
    (x0, y0), (x1, y1) = xbar.get_segments()[0]
    assert (x0, x1, y0, y1) == pytest.approx((*spul["ci"][1][0], 95.0, 95.0))
    (x0, y0), (x1, y1) = ybar.get_segments()[0]
    assert (y0, y1, x0) == pytest.approx((*spul["ci"][2][0], 12.5))
    # no intervals, no error bars
    for r in rows:
        r["ci"] = [[None, None] for _ in SPLITS]
    assert mt.tradeoff_figure(rows).axes[0].containers == []


def test_three_seeds_become_one_row_by_hand(tmp_path):
    d = tmp_path / "runs"
    settings = {"alpha": 1.0, "beta": 0.5, "ptuning_num_tokens": 30}
    accs = [0.30, 0.20, 0.25]  # train_forget accuracy of seeds 1, 2, 3
    for seed, a in zip((1, 2, 3), accs):
        _result(d / f"spul-s{seed}", "spul", [0.9, a, 0.8, 0.3], [0.9, a, 0.8, 0.3], mia=0.5 + a / 10, seed=seed,
                settings=settings)
    _result(d / "spul-b1", "spul", [0.9, 0.5, 0.8, 0.3], [0.9, 0.5, 0.8, 0.3], seed=1, settings={**settings, "beta": 1.0})
    _result(d / "old-a", "spul", [0.9, 0.1, 0.8, 0.3], [0.9, 0.1, 0.8, 0.3])  # no run_settings: its own row
    _result(d / "old-b", "spul", [0.9, 0.1, 0.8, 0.3], [0.9, 0.1, 0.8, 0.3])
    rows = _rows([d], "none")
    ours = [r for r in rows if r["source"] == "ours"]
    assert len(ours) == 4
    agg = next(r for r in ours if r["n_seeds"] == 3)
    assert agg["name"] == "SPUL (beta=0.5; 3 seeds)" and agg["seeds"] == [1, 2, 3]
    mean = 100 * sum(accs) / 3  # 25.0
    sd = 100 * math.sqrt(sum((a - sum(accs) / 3) ** 2 for a in accs) / 2)  # sample sd: 5.0
    assert agg["cells"][1][0] == pytest.approx(mean) and agg["sd"][1][0] == pytest.approx(sd)
    assert agg["mia_auc"] == pytest.approx(0.525) and agg["mia_auc_sd"] == pytest.approx(0.005)
    assert agg["sd"][0][0] == pytest.approx(0.0)
    assert next(r for r in ours if r["runs"][0].endswith("spul-b1"))["name"] == "SPUL (beta=1.0)"
    # Markdown: mean ± sd; CSV: the aggregate and the three per-seed rows
    md = mt.to_markdown(rows, None)
    assert "| SPUL (beta=0.5; 3 seeds) | smollm2-135m | sst2 | 1.0 | 64 | 90.00 ± 0.00 | 90.00 ± 0.00 | 25.00 ± 5.00 |" in md
    assert "| **0.525** ± 0.005 | spul-s1 +2 |" in md and "mean ± the sample standard deviation" in md
    out = tmp_path / "t.csv"
    mt.write_csv(rows, out)
    csv_rows = _csv(out)
    seeds = [r for r in csv_rows if r["source"] == "seed"]
    assert [(r["seeds"], r["train_forget_acc"]) for r in seeds] == [("1", "30.00"), ("2", "20.00"), ("3", "25.00")]
    a = next(r for r in csv_rows if r["n_seeds"] == "3")
    assert (a["seeds"], a["train_forget_acc"], a["train_forget_acc_sd"], a["train_forget_acc_lo"]) == ("1;2;3", "25.00", "5.000", "")
    # the seed's spread as the plot's error bars
    fig = mt.tradeoff_figure(rows)
    assert "sd over seeds" in fig.axes[0].get_title()


def test_table3_paper_rows_match_by_settings(tmp_path):
    d = tmp_path / "runs"
    for a, b in ((1.0, 0.5), (0.1, 0.0), (0.7, 0.5)):  # alpha 0.7 is not in the paper's grid
        _result(d / f"spul-a{a}-b{b}", "spul", [0.9, 0.2, 0.8, 0.3], [0.9, 0.2, 0.8, 0.3], seed=42,
                settings={"alpha": a, "beta": b, "ptuning_num_tokens": 30})
    rows = _rows([d], "table3_alpha_beta_llama2_7b")
    got = [(r["source"], r["settings"].get("alpha"), r["settings"].get("beta")) for r in rows]
    assert got == [("ours", 0.1, 0.0), ("paper", 0.1, 0.0), ("ours", 0.7, 0.5), ("ours", 1.0, 0.5), ("paper", 1.0, 0.5)]
    assert rows[1]["cells"][1] == [9.12, 16.55] and rows[4]["cells"][1] == [12.98, 22.94]
    assert rows[1]["name"] == "SPUL (paper, LLaMA-2-7B; alpha=0.1, beta=0.0)"
    assert rows[0]["name"] == "SPUL (alpha=0.1, beta=0.0)"
    # Table 2's paper rows have no settings: they match any SPUL run on the same data and τ (under the last)
    rows = _rows([d], "table2_llama2_7b")
    assert [r["source"] for r in rows] == ["ours", "ours", "ours", "paper"]


def test_paper_figures_carry_their_source():
    with open(os.path.join(ROOT, "data", "paper_tables.json")) as f:
        data = json.load(f)
    assert "2406.12038" in data["_source"]
    tables = data["tables"]
    assert {"table2_llama2_7b", "table3_alpha_beta_llama2_7b", "table4_forget_size_llama2_7b", "table5_opt_1.3b",
            "table5_llama2_13b"} <= set(tables)
    t2 = {(r["dataset"], r["method"]): r["cells"] for r in tables["table2_llama2_7b"]["rows"]}
    assert t2[("sst2", "spul")] == [[99.15, 99.39], [12.98, 22.94], [94.93, 95.24], [16.07, 27.42]]
    assert {ds for ds, _ in t2} == {"sst2", "yelp", "wmdp_bio"}
    t3 = {(r["settings"]["alpha"], r["settings"]["beta"]): r["cells"] for r in tables["table3_alpha_beta_llama2_7b"]["rows"]}
    assert len(t3) == 12 and t3[(1.0, 0.5)] == t2[("sst2", "spul")]  # Table 2's setting is a cell of Table 3
    assert t3[(0.5, 0.1)][0] == [97.57, 97.95]


@pytest.mark.skipif(not os.path.exists(SHARED_PAPER), reason="../shared/paper/tables.json is absent")
def test_paper_tables_script_regenerates_the_data_file(tmp_path):
    out = tmp_path / "paper.json"
    run_script("scripts/paper_tables.py", SHARED_PAPER, "--output_path", out)
    with open(os.path.join(ROOT, "data", "paper_tables.json")) as f:
        assert out.read_text() == f.read()


def test_table_scripts_pass_their_own_paper_key(tmp_path):
    """Each recipe run with a fake `python` that only logs its arguments: the make_tables call it ends in
    names its own table of the paper."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    fake = bin_dir / "python"
    fake.write_text('#!/bin/sh\necho "$*" >> "$FAKE_LOG"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "OUT": str(tmp_path / "out"),
           "HOME": str(tmp_path)}
    expected = {"table2.sh": ["table2_llama2_7b", "table2_llama2_7b"], "table3.sh": ["table3_alpha_beta_llama2_7b"],
                "table4.sh": ["table4_forget_size_llama2_7b"], "table5.sh": ["table5_opt_1.3b", "table5_llama2_13b"],
                "figure2.sh": ["none"]}
    for script, keys in expected.items():
        log.write_text("")
        proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", script)], env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        calls = [l for l in log.read_text().splitlines() if l.startswith("scripts/make_tables.py")]
        assert [re.search(r"--paper=(\S+)", c).group(1) for c in calls] == keys, script
        assert all(re.search(r"--output_path=\S+/table( |$)", c) for c in calls), calls


@pytest.mark.parametrize("case", ["empty", "bad_json", "bad_paper", "exists"])
def test_errors_are_one_line(case, runs, tmp_path):
    if case == "empty":
        (tmp_path / "empty").mkdir()
        args = [tmp_path / "empty"]
    elif case == "bad_json":
        (tmp_path / "bad.json").write_text("{not json")
        args = [tmp_path / "bad.json"]
    elif case == "exists":
        (tmp_path / "x.csv").write_text("mine")
        args = [runs]
    else:
        args = [runs, "--paper", "table9"]
    proc = run_script("scripts/make_tables.py", *args, "--output_path", tmp_path / "x", check=False)
    assert proc.returncode == 2
    assert len([l for l in proc.stderr.splitlines() if l.startswith("error:")]) == 1 and "Traceback" not in proc.stderr
    if case == "exists":
        assert (tmp_path / "x.csv").read_text() == "mine" and not (tmp_path / "x.md").exists()
