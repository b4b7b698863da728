"""Gather results.json files (written by inference_spul.py) into the paper's table layout, with 95 %
intervals, the paper's own figures beside ours, and the forgetting/utility trade-off plot.

    python scripts/make_tables.py runs/                                  # every results.json under runs/
    python scripts/make_tables.py runs/qlora runs/spul --output_path runs/tables/sst2     # sst2.md/.csv/.png
    python scripts/make_tables.py runs/table3/sst2 --paper table3_alpha_beta_llama2_7b --output_path runs/table3/

Rows: one per run (methods in the paper's order), or one per group of runs that differ only by their
training seed (mean ± sd over the seeds). Columns: ACC and weighted F1 in percent on the four splits,
each with its 95 % interval, the rows scored per split (n) and the MIA AUC. Under our rows, the paper's
row for the same method, dataset, forget size and (where the paper varies them) settings, from
data/paper_tables.json (--paper; regenerate it with scripts/paper_tables.py).

Writes PREFIX.md, PREFIX.csv (every figure with its interval bounds, standard deviations and the
per-seed rows) and PREFIX.png (train_forget accuracy against test_retain accuracy, error bars from the
intervals); where the folders hold audit.json files of audit.py, also PREFIX_robustness.md and
PREFIX_robustness.png (scripts/robustness.py). --output_path is a file prefix; an existing folder or a path ending in '/' gets
FOLDER/table.md, FOLDER/table.csv, FOLDER/table.png. An existing table is replaced only with --overwrite.

Fields read from results.json: method, model, dataset, task (sentiment when absent), forget_size, metrics
(accuracy, f1 and their *_ci, n and chance per split), generation (same), mia_auc, mia_auc_ci, and for
grouping seeds train_seed (int or null) and run_settings (the training stage's settings without seed and
output paths). Files without run_settings are each their own row. Multiple-choice datasets get a footnote
with their chance level (a uniform guess among each question's choices).
"""
import argparse
import csv
import glob
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/robustness.py, however this file is loaded

import robustness  # noqa: E402
from utils.cli import UserError, add_bool, run_main  # noqa: E402

SPLITS = ("train_retain", "train_forget", "test_retain", "test_forget")
# the paper's row order first, then the methods beyond it
METHODS = {"vanilla": "Vanilla", "qlora": "QLoRA", "retrained": "Retrained", "gradient_ascent": "GA",
           "random_label": "RL", "gradient_ascent_kl": "GA+KL", "gradient_ascent_descent": "GA+GD",
           "llmu": "LLMU", "npo": "NPO", "npo_rt": "NPO+RT", "eco": "ECO", "spul": "SPUL", "icul": "ICUL",
           "guardrail": "Guardrail", "filter": "Filter (keywords)", "filter_classifier": "Filter (classifier)"}
REFERENCES = {"vanilla", "qlora", "retrained"}  # not unlearning methods: never ranked (bold)
PAPER_FILE = os.path.join(ROOT, "data", "paper_tables.json")
MIN_ROWS = 20  # fewer rows per split than this: a pipeline check, not a result
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p", "d", "8")
# matplotlib's tab10, then ten darker colours that stay visible as hollow paper markers
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
           "#000000", "#1a237e", "#556b2f", "#008080", "#800000", "#b8860b", "#c51b8a", "#4d9221", "#5e3c99", "#e6550d")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="folders holding results.json (searched recursively) or results files themselves")
    p.add_argument("--output_path", "--out", dest="output_path", default=os.path.join("runs", "tables", "table2"),
                   help="output prefix: writes PREFIX.md, PREFIX.csv, PREFIX.png; an existing folder or a path "
                        "ending in '/' writes FOLDER/table.md etc.")
    p.add_argument("--paper", default="table2_llama2_7b",
                   help="which of the paper's tables to print beside ours (a key of data/paper_tables.json, or none)")
    add_bool(p, "--overwrite", help="replace PREFIX.md, PREFIX.csv and PREFIX.png when they exist (else refused)")
    return p.parse_args(argv)


def check_free(prefix, overwrite):
    """A table is replaced only with --overwrite, as a run folder is."""
    there = [prefix + ext for ext in (".md", ".csv", ".png", "_robustness.md", "_robustness.png")
             if os.path.exists(prefix + ext)]
    if there and not overwrite:
        raise UserError(f"{there[0]} already exists: pass --overwrite to replace the table, or choose another --output_path")


def output_prefix(path):
    """PREFIX for PREFIX.md etc.: a folder (existing, or written with a trailing slash) gets FOLDER/table."""
    path = str(path)
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        return os.path.join(path, "table")
    return path


# ---------------------------------------------------------------- reading

def find_results(paths):
    files = []
    for p in paths:
        p = str(p)
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


# ---------------------------------------------------------------- rows

def _tau(r):
    return float(r.get("forget_size") or 1.0)


def _same(a, b):
    try:
        return abs(float(a) - float(b)) < 1e-9
    except (TypeError, ValueError):
        return a == b


def group_key(r):
    """Runs that differ only by their training seed share a key; results without run_settings (written
    before inference_spul.py recorded them) are each their own group."""
    if not isinstance(r.get("run_settings"), dict):
        return ("file", r["_path"])
    return (r["method"], str(r.get("model", "")), r.get("dataset", ""), _tau(r),
            json.dumps(r["run_settings"], sort_keys=True, default=str), r.get("max_eval_rows"), bool(r.get("generation")))


def group_runs(results):
    groups = {}
    for r in results:
        groups.setdefault(group_key(r), []).append(r)
    return [sorted(g, key=lambda r: (r.get("train_seed") is None, r.get("train_seed") or 0, r["_path"]))
            for g in groups.values()]


def _pct_pair(ci):
    return None if ci is None else [100 * ci[0], 100 * ci[1]]


def _block_stats(block):
    """A metrics block -> cells [[acc, f1]] in percent, intervals [[acc_ci, f1_ci]] and n per split."""
    cells, ci, n = [], [], []
    for s in SPLITS:
        m = (block or {}).get(s)
        m = m or {}
        cells.append([100 * m["accuracy"] if m else None, 100 * m["f1"] if m else None])
        ci.append([_pct_pair(m.get("accuracy_ci")), _pct_pair(m.get("f1_ci"))])
        n.append(m.get("n"))
    return cells, ci, n


def _mean_sd(values):
    if not values or any(v is None for v in values):
        return None, None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, sd


def _chance(r):
    """The chance level of each split's scored rows, in percent (None where results.json has none)."""
    return [None if (r["metrics"].get(s) or {}).get("chance") is None else 100 * r["metrics"][s]["chance"] for s in SPLITS]


def _run_row(r, block, protocol):
    cells, ci, n = _block_stats(block)
    mia = r.get("mia_auc") if protocol == "top_token" else None
    mia_ci = r.get("mia_auc_ci") if protocol == "top_token" else None
    return {"cells": cells, "ci": ci, "sd": None, "n": n, "mia_auc": mia, "mia_auc_ci": mia_ci, "mia_auc_sd": None}


def _aggregate(per_run):
    """Mean and sample sd over the runs of a group, cell by cell."""
    stats = [[_mean_sd([p["cells"][i][j] for p in per_run]) for j in range(2)] for i in range(len(SPLITS))]
    cells = [[mean for mean, _ in pair] for pair in stats]
    sd = [[s for _, s in pair] for pair in stats]
    n = [min((p["n"][i] for p in per_run if p["n"][i] is not None), default=None) for i in range(len(SPLITS))]
    mia, mia_sd = _mean_sd([p["mia_auc"] for p in per_run])
    return {"cells": cells, "ci": [[None, None] for _ in SPLITS], "sd": sd, "n": n,
            "mia_auc": mia, "mia_auc_ci": None, "mia_auc_sd": mia_sd}


def _fmt_value(v):
    if isinstance(v, str) and os.sep in v:
        return os.path.basename(os.path.normpath(v))
    return str(v)


def _varying_settings(groups):
    """Per method, the run_settings keys whose values differ between its groups (shown beside its name)."""
    seen = {}
    for g in groups:
        for k, v in (g[0].get("run_settings") or {}).items():
            seen.setdefault(g[0]["method"], {}).setdefault(k, set()).add(json.dumps(v, sort_keys=True, default=str))
    return {m: [k for k, vals in keys.items() if len(vals) > 1] for m, keys in seen.items()}


def _name(base, parts):
    parts = [p for p in parts if p]
    return f"{base} ({'; '.join(parts)})" if parts else base


def paper_match(paper, r):
    """The paper's row for run r: same method, dataset and forget size and, where the paper's row has
    settings, the same values in r's run_settings."""
    ours = r.get("run_settings") or {}
    for i, row in enumerate((paper or {}).get("rows", [])):
        if row["method"] != r["method"] or row["dataset"] != r.get("dataset", "") or not _same(row["forget_size"], _tau(r)):
            continue
        if all(k in ours and _same(v, ours[k]) for k, v in (row.get("settings") or {}).items()):
            return i
    return None


def _settings_sort(settings):
    return tuple((k, (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v)))
                 for k, v in sorted((settings or {}).items()))


def table_rows(results, paper):
    """Our rows (one per group of seeds; a vanilla model's generation protocol as its own row; per-seed rows
    with source 'seed', for the CSV), each paper row under the last of ours that it matches."""
    order = {m: i for i, m in enumerate(METHODS)}
    groups = group_runs(results)
    # by dataset, the full forget set first (Table 2), then the paper's method order, then settings
    groups.sort(key=lambda g: (g[0].get("dataset", ""), -_tau(g[0]), order.get(g[0]["method"], len(order)),
                               _settings_sort(g[0].get("run_settings")), g[0]["_path"]))
    varying = _varying_settings(groups)
    rows, paper_after = [], {}
    for g in groups:
        r = g[0]
        base = METHODS.get(r["method"], r["method"])
        settings = r.get("run_settings") or {}
        note = ", ".join(f"{k}={_fmt_value(settings[k])}" for k in varying.get(r["method"], []) if k in settings)
        seeds = [x.get("train_seed") for x in g]
        common = {"method": r["method"], "model": str(r.get("model", "")), "dataset": r.get("dataset", ""),
                  "task": r.get("task") or "sentiment", "chance": _chance(r),
                  "forget_size": r.get("forget_size", 1.0), "settings": settings, "base": base,
                  "seeds": seeds, "runs": [os.path.dirname(x["_path"]) for x in g]}
        protocols = [("top_token", "metrics")] + ([("generation", "generation")] if all(x.get("generation") for x in g) else [])
        for protocol, field in protocols:
            gen = "generation" if protocol == "generation" else ""
            per_run = [_run_row(x, x[field], protocol) for x in g]
            stats = per_run[0] if len(g) == 1 else _aggregate(per_run)
            count = f"{len(g)} seeds" if len(g) > 1 and None not in seeds else (f"{len(g)} runs" if len(g) > 1 else "")
            rows.append({**common, **stats, "source": "ours", "protocol": protocol, "n_seeds": len(g),
                         "name": _name(base, [note, gen, count]), "ref": None})
            if len(g) > 1:  # the per-seed rows, for the CSV
                for x, st, s in zip(g, per_run, seeds):
                    rows.append({**common, **st, "source": "seed", "protocol": protocol, "n_seeds": 1, "seeds": [s],
                                 "runs": [os.path.dirname(x["_path"])], "ref": None,
                                 "name": _name(base, [note, gen, f"seed {s}" if s is not None else
                                                      os.path.basename(os.path.dirname(x["_path"]))])})
        match = paper_match(paper, r)
        if match is not None:
            paper_after[match] = len(rows)  # after the last of our rows that this paper row matches
    _add_labels([x for x in rows if x["source"] == "ours"])
    # insert the paper rows, from the last position backwards so that earlier positions stay valid
    for i, pos in sorted(paper_after.items(), key=lambda kv: -kv[1]):
        prow = paper["rows"][i]
        proto = "generation" if prow["method"] == "vanilla" else "top_token"
        ours = [x for x in rows[:pos] if x["source"] == "ours" and paper_match(paper, _as_result(x)) == i]
        ref = next((x for x in reversed(ours) if x["protocol"] == proto), ours[-1])
        psettings = prow.get("settings") or {}
        rows.insert(pos, {
            "source": "paper", "method": prow["method"], "base": ref["base"], "protocol": proto,
            "name": _name(ref["base"], [f"paper, {paper['model']}", ", ".join(f"{k}={v}" for k, v in psettings.items())]),
            "model": paper["model"], "dataset": prow["dataset"], "forget_size": prow["forget_size"], "settings": psettings,
            "seeds": [], "n_seeds": 0, "runs": [], "cells": prow["cells"], "ci": [[None, None] for _ in SPLITS], "sd": None,
            "n": [None] * len(SPLITS), "mia_auc": None, "mia_auc_ci": None, "mia_auc_sd": None,
            "task": ref["task"], "chance": [None] * len(SPLITS),
            "ref": ref["label"], "label": ref["label"]})
    return rows


def _as_result(row):
    return {"method": row["method"], "dataset": row["dataset"], "forget_size": row["forget_size"], "run_settings": row["settings"]}


def _add_labels(rows):
    """Legend labels: the row's name plus what tells it from rows of the same name (data, model, τ),
    and the run folder where that is still not enough."""
    def short_model(m):
        return os.path.basename(os.path.normpath(m)) if m else ""

    by_name = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    for name, same in by_name.items():
        fields = [("data", lambda r: r["dataset"]), ("model", lambda r: short_model(r["model"])),
                  ("τ", lambda r: r["forget_size"])]
        vary = [(k, f) for k, f in fields if len({str(f(r)) for r in same}) > 1]
        for r in same:
            extra = ", ".join(f"{k}={f(r)}" for k, f in vary)
            r["label"] = f"{name} [{extra}]" if extra else name
    same = {}
    for r in rows:
        same.setdefault(r["label"], []).append(r)
    for group in same.values():
        if len(group) > 1:
            for r, tag in zip(group, run_tags([r["runs"][0] for r in group])):
                r["run_tag"] = tag
                r["label"] += f" [{tag}]"


def run_tags(folders):
    """The shortest tails of the run folders' paths that tell them apart (runs/demo-smoke/qlora and runs/demo/qlora:
    demo-smoke/qlora and demo/qlora)."""
    parts = [os.path.normpath(f).split(os.sep) for f in folders]
    for k in range(1, max(map(len, parts)) + 1):
        tags = ["/".join(p[-k:]) for p in parts]
        if len(set(tags)) == len(tags):
            return tags
    return tags


# ---------------------------------------------------------------- Markdown and CSV

def _f(v, digits=2):
    return "" if v is None else f"{v:.{digits}f}"


def _n_text(n):
    known = [x for x in n if x is not None]
    if not known:
        return ""
    return str(known[0]) if len(set(known)) == 1 and len(known) == len(n) else "/".join("" if x is None else str(x) for x in n)


def best_cells(rows):
    """{(row index, column)} of the best values among our unlearning rows, per dataset and model.
    Columns 0..7 are the split cells (split i, ACC/F1 j -> 2i + j), 8 the MIA AUC. Values are compared as
    printed; ties are all best, unless every row ties."""
    best = set()
    blocks = {}
    for i, r in enumerate(rows):
        if r["source"] == "ours" and r["method"] not in REFERENCES:
            blocks.setdefault((r["dataset"], r["model"]), []).append(i)
    for idx in blocks.values():
        if len(idx) < 2:
            continue
        for col in range(2 * len(SPLITS) + 1):
            vals = {}
            for i in idx:
                if col < 2 * len(SPLITS):
                    v = rows[i]["cells"][col // 2][col % 2]
                    if v is not None:
                        v = round(v, 2)
                        vals[i] = v if SPLITS[col // 2].endswith("_retain") else -v
                elif rows[i]["mia_auc"] is not None:
                    vals[i] = -abs(round(rows[i]["mia_auc"], 3) - 0.5)
            top = max(vals.values(), default=None)
            winners = {i for i, v in vals.items() if abs(v - top) < 1e-9}
            if len(winners) < len(vals):  # a column where every row ties has no best
                best |= {(i, col) for i in winners}
    return best


def _cell(v, ci, sd, digits, ci_digits, bold):
    if v is None:
        return ""
    s = f"**{v:.{digits}f}**" if bold else f"{v:.{digits}f}"
    if sd is not None:
        return f"{s} ± {sd:.{digits}f}"
    if ci is not None:
        return f"{s} [{ci[0]:.{ci_digits}f}, {ci[1]:.{ci_digits}f}]"
    return s


def small_counts(small):
    """The rows scored per split of the rows under MIN_ROWS, as the n column writes them: 'n = 4' or
    'n = 32/6/32/32 (train_retain/train_forget/test_retain/test_forget)'."""
    counts = list(dict.fromkeys(_n_text(r["n"]) for r in small))
    order = " (" + "/".join(SPLITS) + ")" if any("/" in c for c in counts) else ""
    return "n = " + ", ".join(counts) + order


def to_markdown(rows, paper):
    best = best_cells(rows)
    ours = [r for r in rows if r["source"] == "ours"]
    small = [r for r in ours if any(x is not None and x < MIN_ROWS for x in r["n"])]
    lines = []
    if small:
        which = "every row was" if len(small) == len(ours) else f"{len(small)} of the {len(ours)} rows were"
        lines += [f"> **Pipeline check, not a result:** {which} scored on fewer than {MIN_ROWS} rows in at least one "
                  f"split ({small_counts(small)}); the figures below only show that the pipeline runs.", ""]
    head = "| Method | Model | Data | τ | n | " + " | ".join(f"{s} ACC | {s} F1" for s in SPLITS) + " | MIA AUC | Run |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for i, r in enumerate(rows):
        if r["source"] == "seed":
            continue
        # rows of one method that nothing else tells apart (e.g. a smoke demo's and a hand run's) name their run folder
        name = f"*{r['name']}*" if r["source"] == "paper" else r["name"] + (f" [{r['run_tag']}]" if r.get("run_tag") else "")
        cells = []
        for si in range(len(SPLITS)):
            for j in range(2):
                sd = r["sd"][si][j] if r["sd"] else None
                cells.append(_cell(r["cells"][si][j], r["ci"][si][j], sd, 2, 1, (i, 2 * si + j) in best))
        mia = _cell(r["mia_auc"], r["mia_auc_ci"], r["mia_auc_sd"], 3, 3, (i, 2 * len(SPLITS)) in best)
        runs = [os.path.basename(x) for x in r["runs"]]
        run = runs[0] + (f" +{len(runs) - 1}" if len(runs) > 1 else "") if runs else ""
        model = os.path.basename(os.path.normpath(r["model"])) if r["model"] else ""
        lines.append(f"| {name} | {model} | {r['dataset']} | {r['forget_size']} | {_n_text(r['n'])} | "
                     + " | ".join(cells) + f" | {mia} | {run} |")
    return "\n".join(lines) + "\n\n" + "\n\n".join(footnotes(rows, paper, best)) + "\n"


def footnotes(rows, paper, best):
    ours = [r for r in rows if r["source"] == "ours"]
    notes = ["ACC and weighted F1 in percent: the top token over the whole vocabulary at the label position (the "
             "paper's protocol); '(generation)' rows: greedy answers with the label word matched, the paper's protocol "
             "for the pre-trained model. Higher is better on *_retain, lower on *_forget."]
    if any(c is not None for r in ours for pair in r["ci"] for c in pair) or any(r["mia_auc_ci"] for r in ours):
        notes.append("`82.81 [72.0, 90.2]`: the figure and its 95 % interval (ACC: Wilson score interval; F1 and MIA "
                     "AUC: percentile bootstrap over the rows, 1000 seeded resamples); exact bounds in the CSV.")
    if any(r["n_seeds"] > 1 for r in ours):
        notes.append("`82.81 ± 1.20`: rows over several training seeds (runs that differ only by their seed) show the "
                     "mean ± the sample standard deviation over the seeds; the CSV keeps the per-seed rows.")
    notes.append("τ: the fraction of the forget set unlearned (--forget_size; 1.0 = all of train_forget, a smaller τ "
                 "is a subset drawn with seed 42). n: rows scored per split (one figure when the four splits have the "
                 "same count, else train_retain/train_forget/test_retain/test_forget).")
    notes.append("MIA AUC: loss-based membership inference, the AUC of telling train_forget rows (members, the rows "
                 "unlearned) from test_forget rows (never trained on) by the log-likelihood of the true label. 0.5 = "
                 "indistinguishable, the goal; above 0.5 the forget rows still look like training data; below 0.5 "
                 "they look *less* like members than unseen rows, i.e. over-unlearning, itself a tell.")
    notes += mcqa_notes(ours)
    has_paper = bool(paper) and any(r["source"] == "paper" for r in rows)
    if best:
        notes.append("Bold: the best of our unlearning rows in each column (highest on *_retain, lowest on *_forget, "
                     "MIA AUC closest to 0.5; ties all bold) per dataset and model. Reference rows (Vanilla, QLoRA, "
                     "Retrained)" + (" and the paper's rows" if has_paper else "") + " are not ranked.")
    if has_paper:
        notes.append(f"Rows in italics: the paper's figures ({paper['settings']}; {paper['model']}), from "
                     "data/paper_tables.json, each under our row with the same method, dataset, τ and settings.")
    return notes


def mcqa_notes(ours):
    """What ACC means on multiple-choice data, and its chance level (a uniform guess among each question's choices),
    one note per such dataset: 25 % is no forgetting to speak of on four options."""
    notes = []
    for ds in dict.fromkeys(r["dataset"] for r in ours if r["task"] == "mcqa"):
        first = next(r for r in ours if r["dataset"] == ds and r["task"] == "mcqa")
        chance = " / ".join(_f(c, 1) or "–" for c in first["chance"])
        notes.append(f"{ds}: multiple-choice questions; ACC and F1 compare the top token with the right answer letter "
                     f"(A–E). Chance, a uniform guess among each question's choices: {chance} % (train_retain / "
                     f"train_forget / test_retain / test_forget, on the rows {os.path.basename(first['runs'][0])} scored; each "
                     f"run's own in the CSV, *_chance).")
    return notes


CSV_HEAD = ["source", "method", "name", "label", "protocol", "model", "dataset", "task", "forget_size", "settings",
            "seeds", "n_seeds"]


def write_csv(rows, path):
    cols = list(CSV_HEAD) + [f"{s}_{m}" for s in SPLITS for m in ("acc", "f1")]
    for s in SPLITS:
        cols += [f"{s}_acc_lo", f"{s}_acc_hi", f"{s}_f1_lo", f"{s}_f1_hi", f"{s}_acc_sd", f"{s}_f1_sd", f"{s}_n", f"{s}_chance"]
    cols += ["mia_auc", "mia_auc_lo", "mia_auc_hi", "mia_auc_sd", "n", "run"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            out = {c: r.get(c, "") for c in ("source", "method", "name", "label", "protocol", "model", "dataset", "task",
                                              "forget_size")}
            out["label"] = r.get("label", "")
            out["settings"] = json.dumps(r["settings"], sort_keys=True, default=str) if r["settings"] else ""
            out["seeds"] = ";".join("" if s is None else str(s) for s in r["seeds"])
            out["n_seeds"] = r["n_seeds"] or ""
            for si, s in enumerate(SPLITS):
                for j, m in enumerate(("acc", "f1")):
                    out[f"{s}_{m}"] = _f(r["cells"][si][j])
                    ci = r["ci"][si][j]
                    out[f"{s}_{m}_lo"], out[f"{s}_{m}_hi"] = (_f(ci[0], 3), _f(ci[1], 3)) if ci else ("", "")
                    out[f"{s}_{m}_sd"] = _f(r["sd"][si][j], 3) if r["sd"] else ""
                out[f"{s}_n"] = "" if r["n"][si] is None else r["n"][si]
                out[f"{s}_chance"] = _f(r["chance"][si])
            out["mia_auc"] = _f(r["mia_auc"], 4)
            ci = r["mia_auc_ci"]
            out["mia_auc_lo"], out["mia_auc_hi"] = (_f(ci[0], 4), _f(ci[1], 4)) if ci else ("", "")
            out["mia_auc_sd"] = _f(r["mia_auc_sd"], 4)
            known = [x for x in r["n"] if x is not None]
            out["n"] = min(known) if known else ""
            out["run"] = ";".join(r["runs"])
            w.writerow(out)


# ---------------------------------------------------------------- the trade-off plot

def _styles(labels):
    """One colour and one marker per label: both distinct up to 14 labels, the pair up to 140."""
    return {lab: (COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]) for i, lab in enumerate(labels)}


def _err(v, ci, sd):
    """Error bar half-lengths [[below], [above]] from an sd or an interval; None without either."""
    if sd is not None:
        return [[sd], [sd]]
    if ci is not None:
        return [[max(0.0, v - ci[0])], [max(0.0, ci[1] - v)]]
    return None


def spread_coincident(points, others=()):
    """Small offsets that set apart points drawn at the same place (a smoke run's methods often score alike): each group
    of k > 1 equal points on a circle of 2.5 % of the plotted span (at least 0.25 points), about a marker's width, so
    that each marker shows. Returns the offsets and how many points were moved."""
    xs, ys = [p[0] for p in [*points, *others]], [p[1] for p in [*points, *others]]  # the span of every point drawn
    span = max([max(xs) - min(xs), max(ys) - min(ys), 10.0]) if points else 10.0
    radius = 0.025 * span
    groups = {}
    for i, (x, y) in enumerate(points):
        groups.setdefault((round(x, 6), round(y, 6)), []).append(i)
    offsets, shifted = [(0.0, 0.0)] * len(points), 0
    for idx in groups.values():
        if len(idx) > 1:
            shifted += len(idx)
            for j, i in enumerate(idx):
                angle = 2 * math.pi * j / len(idx)
                offsets[i] = (radius * math.cos(angle), radius * math.sin(angle))
    return offsets, shifted


def tradeoff_figure(rows):
    """The trade-off plot as a matplotlib Figure: train_forget accuracy (x, lower is better) against
    test_retain accuracy (y, higher is better); one colour and marker per row label (method) with a
    legend, the paper's points hollow in their method's colour, error bars from the 95 % intervals (or
    the sd over seeds)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    def xy(r):
        return r["cells"][1][0], r["cells"][2][0]

    ours = [r for r in rows if r["source"] == "ours" and None not in xy(r)]
    papers = [r for r in rows if r["source"] == "paper" and None not in xy(r)]
    labels = list(dict.fromkeys(r["label"] for r in ours + papers))
    style = _styles(labels)
    fig = Figure(figsize=(7.0, 5.0))
    ax = fig.add_subplot()
    bars = set()
    offsets, shifted = spread_coincident([xy(r) for r in ours], [xy(r) for r in papers])
    for r, (dx, dy) in zip(ours, offsets):
        (x, y), (color, marker) = xy(r), style[r["label"]]
        x, y = x + dx, y + dy
        xerr = _err(x, r["ci"][1][0], r["sd"][1][0] if r["sd"] else None)
        yerr = _err(y, r["ci"][2][0], r["sd"][2][0] if r["sd"] else None)
        if xerr or yerr:
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="none", ecolor=color, elinewidth=1.0, capsize=2.5,
                        alpha=0.6, zorder=2)
            bars.add("± sd over seeds (multi-seed rows)" if r["sd"] else "95 % intervals")
        ax.scatter([x], [y], s=60, marker=marker, color=color, edgecolors="black", linewidths=0.5, zorder=3, gid="ours")
    for r in papers:
        (x, y), (color, marker) = xy(r), style[r["label"]]
        ax.scatter([x], [y], s=90, marker=marker, facecolors="none", edgecolors=[color], linewidths=1.6, zorder=3,
                   gid="paper")
    handles = [Line2D([], [], linestyle="none", marker=style[lab][1], markerfacecolor=style[lab][0],
                      markeredgecolor="black", markeredgewidth=0.5, markersize=8, label=lab) for lab in labels]
    if papers:
        models = sorted({r["model"] for r in papers})
        handles.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="dimgray",
                              markeredgewidth=1.6, markersize=9,
                              label=f"paper ({', '.join(models)})" if len(models) == 1 else "paper"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8,
                  frameon=False, ncol=1 if len(handles) <= 18 else 2, title="method", title_fontsize=8)
    else:
        ax.text(0.5, 0.5, "no row has both train_forget and test_retain", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, color="dimgray")
    ax.set_xlabel("train_forget accuracy (%)  ← better forgetting")
    ax.set_ylabel("test_retain accuracy (%)  ↑ better utility")
    ax.margins(0.08)
    ax.grid(alpha=0.3)
    what = ["filled: ours"] + (["hollow: the paper"] if papers else []) + ([f"bars: {', '.join(sorted(bars))}"] if bars else [])
    small = [r for r in ours if any(x is not None and x < MIN_ROWS for x in r["n"])]
    check = f"PIPELINE CHECK (fewer than {MIN_ROWS} rows in a split: {small_counts(small)}), not a result\n" if small else ""
    if shifted:
        what.append(f"{shifted} points at one place shifted slightly apart")
    ax.set_title(check + "Forgetting vs utility (best: top left)\n" + "; ".join(what), fontsize=9)
    return fig


def plot_tradeoff(rows, path):
    fig = tradeoff_figure(rows)
    fig.savefig(path, dpi=150, bbox_inches="tight")


def main():
    args = parse_args()
    prefix = output_prefix(args.output_path)
    check_free(prefix, args.overwrite)
    results = [read_result(p) for p in find_results(args.run_dirs)]
    paper = load_paper(args.paper)
    rows = table_rows(results, paper)
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    md = to_markdown(rows, paper)
    with open(prefix + ".md", "w") as f:
        f.write(md)
    write_csv(rows, prefix + ".csv")
    plot_tradeoff(rows, prefix + ".png")
    print(md)
    print(f"{len(results)} result file(s); wrote {prefix}.md, {prefix}.csv, {prefix}.png")
    audits = robustness.find_audits(args.run_dirs)
    if audits:  # audit.py's files beside the results: the robustness table and its heat map
        print(robustness.write(audits, prefix + "_robustness", METHODS, METHODS))
        print(f"{len(audits)} audit file(s); wrote {prefix}_robustness.md, {prefix}_robustness.png")


if __name__ == "__main__":
    run_main(main)
