"""Gather results.json files (written by inference_spul.py) into the paper's Table 2 layout.

    python scripts/make_tables.py runs/                       # every results.json under runs/
    python scripts/make_tables.py runs/qlora-sst2 runs/spul-p30-a1.0-b0.5-f1.0 --out runs/tables/sst2

Methods as rows, the four splits as columns (ACC / F1 in percent), the MIA AUC beside them, and the
paper's own figures (data/paper_tables.json, --paper) in a row under ours where the paper has the same
method, dataset and forget size. Writes PREFIX.md, PREFIX.csv and, when matplotlib is installed,
PREFIX.png: the trade-off of train_forget accuracy (lower is better) against test_retain accuracy.
"""
import argparse
import csv
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.cli import UserError, run_main  # noqa: E402

SPLITS = ("train_retain", "train_forget", "test_retain", "test_forget")
# the paper's row order first, then the methods beyond it
METHODS = {"vanilla": "Vanilla", "qlora": "QLoRA", "retrained": "Retrained", "gradient_ascent": "GA",
           "random_label": "RL", "gradient_ascent_kl": "GA+KL", "gradient_ascent_descent": "GA+GD",
           "llmu": "LLMU", "npo": "NPO", "npo_rt": "NPO+RT", "eco": "ECO", "spul": "SPUL"}
PAPER_FILE = os.path.join(ROOT, "data", "paper_tables.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="folders holding results.json (searched recursively) or results files themselves")
    p.add_argument("--out", default=os.path.join("runs", "tables", "table2"),
                   help="output prefix: writes PREFIX.md, PREFIX.csv, PREFIX.png (default runs/tables/table2)")
    p.add_argument("--paper", default="table2_llama2_7b",
                   help="which of the paper's tables to print beside ours (a key of data/paper_tables.json, or 'none')")
    return p.parse_args(argv)


def find_results(paths):
    files = []
    for p in paths:
        if os.path.isfile(p):
            files.append(p)
        elif os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "**", "results.json"), recursive=True))
            if not found:
                raise UserError(f"no results.json under {p}: run inference_spul.py on it first")
            files += found
        else:
            raise UserError(f"{p} does not exist")
    return list(dict.fromkeys(os.path.normpath(f) for f in files))


def read_result(path):
    try:
        with open(path) as f:
            r = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    missing = [k for k in ("method", "metrics") if k not in r]
    if missing:
        raise UserError(f"{path} is not a results.json of inference_spul.py (no {', '.join(missing)})")
    r["_path"] = path
    return r


def load_paper(key):
    if key == "none":
        return None
    with open(PAPER_FILE) as f:
        tables = json.load(f)["tables"]
    if key not in tables:
        raise UserError(f"unknown --paper '{key}': choose one of {', '.join(tables)} or none")
    return tables[key]


def paper_cells(table, method, dataset, forget_size):
    for row in (table or {}).get("rows", []):
        if row["method"] == method and row["dataset"] == dataset and abs(row["forget_size"] - float(forget_size or 1.0)) < 1e-9:
            return row["cells"]
    return None


def table_rows(results, paper):
    """One row per result (plus one for a vanilla model's generation protocol) and the paper's row under
    the last of ours with the same method, dataset and forget size."""
    order = {m: i for i, m in enumerate(METHODS)}
    # by dataset, the full forget set first (Table 2), then the paper's method order
    results = sorted(results, key=lambda r: (r.get("dataset", ""), -float(r.get("forget_size") or 1.0),
                                             order.get(r["method"], len(order)), r["_path"]))
    rows = []
    for i, r in enumerate(results):
        name = METHODS.get(r["method"], r["method"])
        common = {"method": r["method"], "model": r.get("model", ""), "dataset": r.get("dataset", ""),
                  "forget_size": r.get("forget_size", 1.0), "run": os.path.dirname(r["_path"])}

        def cells(block):
            return [[100 * block[s]["accuracy"], 100 * block[s]["f1"]] if s in block else [None, None] for s in SPLITS]

        rows.append({**common, "source": "ours", "name": name, "protocol": "top_token",
                     "cells": cells(r["metrics"]), "mia_auc": r.get("mia_auc"),
                     "n": max((m.get("n", 0) for m in r["metrics"].values()), default=0)})
        if r.get("generation"):
            rows.append({**common, "source": "ours", "name": f"{name} (generation)", "protocol": "generation",
                         "cells": cells(r["generation"]), "mia_auc": None,
                         "n": max((m.get("n", 0) for m in r["generation"].values()), default=0)})
        key = (r["method"], common["dataset"], float(common["forget_size"] or 1.0))
        nxt = results[i + 1] if i + 1 < len(results) else None
        last_of_group = nxt is None or (nxt["method"], nxt.get("dataset", ""), float(nxt.get("forget_size") or 1.0)) != key
        pc = paper_cells(paper, *key) if last_of_group else None
        if pc:
            proto = "generation" if r["method"] == "vanilla" else "top_token"
            rows.append({**common, "source": "paper", "name": f"{name} (paper, {paper['model']})", "protocol": proto,
                         "model": paper["model"], "run": "", "cells": pc, "mia_auc": None, "n": None})
    return rows


def _pct(v):
    return "" if v is None else f"{v:.2f}"


def to_markdown(rows, paper):
    head = "| Method | Model | Data | τ | " + " | ".join(f"{s} ACC | {s} F1" for s in SPLITS) + " | MIA AUC | Run |"
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for r in rows:
        name = f"*{r['name']}*" if r["source"] == "paper" else r["name"]
        cells = " | ".join(f"{_pct(a)} | {_pct(f)}" for a, f in r["cells"])
        mia = "" if r["mia_auc"] is None else f"{r['mia_auc']:.3f}"
        run = os.path.basename(r["run"]) if r["run"] else ""
        model = os.path.basename(os.path.normpath(str(r["model"]))) if r["model"] else ""
        lines.append(f"| {name} | {model} | {r['dataset']} | {r['forget_size']} | {cells} | {mia} | {run} |")
    notes = ["", "ACC and weighted F1 in percent: the top token over the whole vocabulary at the label position "
                 "(the paper's protocol); '(generation)' rows: greedy answers with the label word matched, the paper's "
                 "protocol for the pre-trained model. Higher is better on *_retain, lower on *_forget; "
                 "MIA AUC near 0.5 means train_forget cannot be told from test_forget."]
    if paper:
        notes.append(f"Rows in italics: the paper's figures ({paper['settings']}; {paper['model']}), from data/paper_tables.json.")
    return "\n".join(lines + notes) + "\n"


def write_csv(rows, path):
    cols = ["source", "method", "name", "protocol", "model", "dataset", "forget_size"]
    cols += [f"{s}_{m}" for s in SPLITS for m in ("acc", "f1")] + ["mia_auc", "n", "run"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            vals = [r[c] for c in cols[:7]] + [_pct(v) for pair in r["cells"] for v in pair]
            w.writerow(vals + ["" if r["mia_auc"] is None else f"{r['mia_auc']:.4f}", r["n"] if r["n"] is not None else "", r["run"]])


def plot_tradeoff(rows, path):
    """train_forget accuracy (x, lower is better) against test_retain accuracy (y, higher is better)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        x, y = r["cells"][1][0], r["cells"][2][0]
        if x is None or y is None:
            continue
        ours = r["source"] == "ours"
        ax.scatter(x, y, s=50, marker="o" if ours else "s", facecolors="C0" if ours else "none",
                   edgecolors="C0" if ours else "gray")
        ax.annotate(r["name"], (x, y), fontsize=7,
                    xytext=(4, 3), textcoords="offset points", color="black" if ours else "gray")
    ax.set_xlabel("train_forget accuracy (%)  ← better forgetting")
    ax.set_ylabel("test_retain accuracy (%)  ↑ better utility")
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.set_title("Forgetting vs utility (filled: ours, hollow: paper)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main():
    args = parse_args()
    results = [read_result(p) for p in find_results(args.run_dirs)]
    paper = load_paper(args.paper)
    rows = table_rows(results, paper)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    md = to_markdown(rows, paper)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    write_csv(rows, args.out + ".csv")
    print(md)
    written = [args.out + ".md", args.out + ".csv"]
    if plot_tradeoff(rows, args.out + ".png"):
        written.append(args.out + ".png")
    print(f"{len(results)} result file(s); wrote {', '.join(written)}")


if __name__ == "__main__":
    run_main(main)
