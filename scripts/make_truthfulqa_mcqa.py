"""A real multiple-choice unlearning set from TruthfulQA (817 questions), for CPU demos and tests.

    python scripts/make_truthfulqa_mcqa.py --output_path runs/demo-mcqa/data
    python qlora.py --task mcqa --dataset truthfulqa_mcqa --data_dir runs/demo-mcqa/data ...

Each question becomes a row with its Best Answer and up to three of its Incorrect Answers (split on '; '),
the options in an order drawn with --seed. Forget rows are the questions of --forget_categories (by default
Health, Nutrition, Psychology and Science: 99 questions), retain rows those of every other category; each side
is split --test_fraction / rest into test / train with --seed. Writes train_retain.jsonl, train_forget.jsonl,
test_retain.jsonl and test_forget.jsonl (question, choices, answer, category) into --output_path; the same
flags write the same files. The data never goes into the repository: --output_path must lie outside it, or in
its git-ignored runs/ folder.
"""
import csv
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.cli import UserError, comma_list, make_parser, run_main, unit_interval  # noqa: E402
from utils.data import shuffle_options, split_train_test  # noqa: E402

DEFAULT_CSV = os.path.join(os.path.dirname(ROOT), "shared", "data", "truthfulqa", "TruthfulQA.csv")
FORGET_CATEGORIES = "Health,Nutrition,Psychology,Science"
MAX_WRONG = 3  # four options at most, as in WMDP and SciQ


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--output_path", required=True, help="folder the four split files are written to")
    p.add_argument("--forget_categories", default=FORGET_CATEGORIES, help="comma-separated TruthfulQA categories to forget")
    p.add_argument("--seed", type=int, default=0, help="seeds the option order and the train/test split")
    p.add_argument("--test_fraction", type=unit_interval, default=0.3, help="fraction of each side that becomes test rows")
    p.add_argument("--truthfulqa_csv", default=DEFAULT_CSV, help="TruthfulQA.csv (the shared copy beside the checkout)")
    return p.parse_args(argv)


def read_truthfulqa(path):
    """The CSV's rows (the file starts with a UTF-8 byte-order mark)."""
    if not os.path.isfile(path):
        raise UserError(f"no TruthfulQA file at {path} (pass --truthfulqa_csv)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    missing = {"Category", "Question", "Best Answer", "Incorrect Answers"} - set(rows[0] if rows else {})
    if missing:
        raise UserError(f"{path} is no TruthfulQA file (no {', '.join(sorted(missing))} column)")
    return rows


def build(rows, forget_categories, seed=0, test_fraction=0.3):
    """{split: [{"question", "choices", "answer", "category"}, ...]}: deterministic for the same arguments."""
    forget = set(forget_categories)
    unknown = forget - {r["Category"] for r in rows}
    if unknown:
        raise UserError(f"no TruthfulQA category {', '.join(sorted(unknown))} (categories: "
                        f"{', '.join(sorted({r['Category'] for r in rows}))})")
    rng = random.Random(seed)
    sides = {"forget": [], "retain": []}
    for r in rows:
        wrong = [w.strip() for w in r["Incorrect Answers"].split("; ") if w.strip()][:MAX_WRONG]
        choices, answer = shuffle_options(r["Best Answer"].strip(), wrong, rng)
        sides["forget" if r["Category"] in forget else "retain"].append(
            {"question": r["Question"].strip(), "choices": choices, "answer": answer, "category": r["Category"]})
    out = {}
    for side, items in sides.items():
        if not items:
            raise UserError(f"no {side} questions: --forget_categories names {'no' if side == 'forget' else 'every'} category")
        out[f"train_{side}"], out[f"test_{side}"] = split_train_test(items, test_fraction, seed)
    return out


def check_output(path):
    """Refuse a folder inside the repository (data is never committed), except its git-ignored runs/."""
    real, root = os.path.realpath(path), os.path.realpath(ROOT)
    inside = os.path.commonpath([real, root]) == root
    if inside and os.path.commonpath([real, os.path.join(root, "runs")]) != os.path.join(root, "runs"):
        raise UserError(f"--output_path {path} is inside the repository: write the data outside it (or under runs/)")


def write(splits, path):
    os.makedirs(path, exist_ok=True)
    for split, items in splits.items():
        with open(os.path.join(path, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in items)


def main():
    args = parse_args()
    check_output(args.output_path)
    splits = build(read_truthfulqa(args.truthfulqa_csv), comma_list(args.forget_categories), args.seed, args.test_fraction)
    write(splits, args.output_path)
    print(f"wrote {', '.join(f'{s} {len(r)}' for s, r in splits.items())} rows to {args.output_path}")


if __name__ == "__main__":
    run_main(main)
