"""The robustness table of audit.py's audit.json files (scripts/make_tables.py writes it beside the results table
when the folders hold audits; this module alone: `python scripts/robustness.py runs/demo --output_path runs/demo/robustness`).

Three Markdown tables and a heat map:
- recovery on train_forget / test_forget per method and attack: (attacked − unlearned) / (fine-tuned − unlearned),
  0 = the attack gains nothing, 1 = everything back; "–" where the method forgot less than 5 points (nothing to
  recover) or no fine-tuned reference was audited. The retrained model's row is the control: a method at or under
  it recovers no more than a model that never saw the rows.
- the retain accuracy (test_retain) under the same attack, in the attack's metric, beside the plain one;
- the membership AUCs (train_forget vs test_forget) and privleak against the retrained model.
"""
import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.cli import UserError, add_bool, run_main  # noqa: E402

ATTACKS = ("templates", "instruction", "nf4", "int8", "relearn", "probe")
MIA_SCORES = ("loss", "zlib", "min_k", "min_k_plus_plus")


def find_audits(paths):
    files = []
    for p in map(str, paths):
        if os.path.isfile(p):
            files += [p] if os.path.basename(p) == "audit.json" else []
        elif os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "**", "audit.json"), recursive=True))
    return list(dict.fromkeys(os.path.normpath(f) for f in files))


def read_audit(path):
    try:
        with open(path) as f:
            a = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}")
    if "attacks" not in a or "method" not in a:
        raise UserError(f"{path} is not an audit.json of audit.py")
    a["_path"] = path
    return a


def rows_of(audits, names=None, order=None):
    """One row per audit, in `order` of their methods (the tables' method order), then by path."""
    names, order = names or {}, list(order or [])
    rank = {m: i for i, m in enumerate(order)}
    audits = sorted(audits, key=lambda a: (rank.get(a["method"], len(order)), a["_path"]))
    labels = [names.get(a["method"], a["method"]) for a in audits]
    for i, a in enumerate(audits):  # two audits of one method: name their folders
        if labels.count(labels[i]) > 1:
            labels[i] += f" ({os.path.basename(os.path.dirname(a['_path']))})"
    return list(zip(labels, audits))


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}"


def _rec(v):
    return "–" if v is None else f"{v:.2f}"


def attacks_in(rows):
    return [a for a in ATTACKS if any(a in r["attacks"] for _, r in rows)]


def to_markdown(rows):
    attacks = attacks_in(rows)
    out = ["### Recovery under attack (train_forget / test_forget)", "",
           "| Method | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for label, a in rows:
        cells = []
        for name in attacks:
            rec = (a.get("recovery") or {}).get(name) or {}
            cells.append(f"{_rec(rec.get('train_forget'))} / {_rec(rec.get('test_forget'))}" if name in a["attacks"] else "")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "### Accuracy under attack: train_forget / test_retain, in the attack's metric (plain: top token / "
                "label words only)", "",
            "| Method | plain | " + " | ".join(attacks) + " |", "|---|---|" + "---|" * len(attacks)]
    for label, a in rows:
        p = a["plain"]
        cells = [f"{_pct(p['train_forget']['accuracy'])} / {_pct(p.get('test_retain', {}).get('accuracy'))} "
                 f"(label words {_pct(p['train_forget']['label_accuracy'])} / "
                 f"{_pct(p.get('test_retain', {}).get('label_accuracy'))})"]
        for name in attacks:
            r = a["attacks"].get(name)
            if r is None:
                cells.append("")
                continue
            m = r["metric"]
            tf, tr = r["splits"].get("train_forget", {}).get(m), r["splits"].get("test_retain", {}).get(m)
            cells.append(f"{_pct(tf)} / {_pct(tr)}" + ("" if m == "accuracy" else " ‡"))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "‡ the accuracy restricted to the label words (a reworded query's top token need not be a label word; "
                "the probe answers with a label). train_forget under relearn and probe: the half never trained on."]
    mia = [(label, a) for label, a in rows if "mia" in a["attacks"]]
    if mia:
        out += ["", "### Membership: AUC of train_forget against test_forget (privleak against the retrained model)", "",
                "| Method | " + " | ".join(MIA_SCORES) + " |", "|---|" + "---|" * len(MIA_SCORES)]
        for label, a in mia:
            m = a["attacks"]["mia"]
            leak = m.get("privleak") or {}
            out.append(f"| {label} | " + " | ".join(
                f"{m['aucs'][s]['auc']:.3f}" + (f" ({leak[s]:+.1f})" if leak.get(s) is not None else "")
                for s in MIA_SCORES if s in m["aucs"]) + " |")
    out += ["", "Recovery = (attacked − unlearned) / (fine-tuned − unlearned) on the same rows, the fine-tuned model under "
                "the same attack: 0 = the attack gains nothing, 1 = everything back; – = the method forgot less than 5 "
                "points there (nothing to recover) or no fine-tuned model was audited. The Retrained row is the control: "
                "at or under it, no more comes back than to a model that never saw the rows."]
    return "\n".join(out) + "\n"


def heatmap(rows, path):
    """Recovery on train_forget, methods × attacks, annotated; grey where there is no figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attacks = attacks_in(rows)
    grid = np.array([[((a.get("recovery") or {}).get(n) or {}).get("train_forget") for n in attacks] for _, a in rows],
                    dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(attacks) + 2.5, 0.45 * len(rows) + 1.5))
    cmap = matplotlib.colormaps["RdYlGn_r"].with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-0.25, vmax=1.25, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, "–" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_title("recovery on train_forget (0: nothing back, 1: all back)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def write(audit_files, prefix, names=None, order=None):
    """PREFIX.md and PREFIX.png of the audits; returns the Markdown."""
    rows = rows_of([read_audit(p) for p in audit_files], names, order)
    md = to_markdown(rows)
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with open(prefix + ".md", "w") as f:
        f.write(md)
    heatmap(rows, prefix + ".png")
    return md


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="folders holding audit.json (searched recursively) or the files")
    p.add_argument("--output_path", required=True, help="output prefix: writes PREFIX.md and PREFIX.png")
    add_bool(p, "--overwrite", help="replace PREFIX.md and PREFIX.png when they exist")
    args = p.parse_args()
    from make_tables import METHODS

    files = find_audits(args.run_dirs)
    if not files:
        raise UserError(f"no audit.json under {', '.join(args.run_dirs)}: run audit.py first")
    there = [args.output_path + e for e in (".md", ".png") if os.path.exists(args.output_path + e)]
    if there and not args.overwrite:
        raise UserError(f"{there[0]} already exists: pass --overwrite to replace it")
    print(write(files, args.output_path, METHODS, METHODS))
    print(f"{len(files)} audit file(s); wrote {args.output_path}.md, {args.output_path}.png")


if __name__ == "__main__":
    run_main(main)
