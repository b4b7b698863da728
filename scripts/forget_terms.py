"""Forget terms from the training rows alone: word n-grams frequent in train_forget and absent from train_retain.

    python scripts/forget_terms.py --data_dir=../shared/data/sst2 --output=runs/sst2-terms.txt

Reads train_forget and train_retain only (never a test file), so the terms a guardrail or a filter uses
(prompting.py --forget_terms) say nothing the evaluation rows could have taught. A term is a sequence of 1 to
--max_n lower-case words found in at least --min_rows train_forget rows and in no train_retain row; an n-gram
that holds a shorter term is left out (it adds nothing to a whole-word match). Prints each term with the number of
train_forget rows it occurs in, most frequent first; --output writes the terms, one a line.
"""
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.cli import UserError, add_bool, add_data_args, make_parser, positive_int, run_main  # noqa: E402

TRAINING_SPLITS = ("train_retain", "train_forget")


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_data_args(p)
    g = p.add_argument_group("terms")
    g.add_argument("--max_n", type=positive_int, default=2, help="longest n-gram, in words")
    g.add_argument("--min_rows", type=positive_int, default=5, help="train_forget rows a term must occur in")
    g.add_argument("--top", type=positive_int, default=30, help="terms kept, most frequent first")
    g.add_argument("--output", default=None, help="file to write the terms to, one a line (refused if it exists)")
    add_bool(g, "--overwrite", help="replace the --output file when it exists")
    return p.parse_args(argv)


def row_text(task, row):
    return task.head(row)[len(task.head_prefix):] + task.body(row, ())


def ngrams(text, max_n):
    from utils.prompting import words

    w = words(text)
    return {" ".join(w[i:i + n]) for n in range(1, max_n + 1) for i in range(len(w) - n + 1)}


def forget_terms(forget_texts, retain_texts, max_n=2, min_rows=5, top=30):
    """[(term, train_forget rows holding it)], most frequent first: n-grams in >= min_rows forget texts, in no retain
    text, and holding no shorter term."""
    seen = set().union(*(ngrams(t, max_n) for t in retain_texts)) if retain_texts else set()
    counts = Counter(g for t in forget_texts for g in ngrams(t, max_n))
    found = sorted(((g, c) for g, c in counts.items() if c >= min_rows and g not in seen), key=lambda x: (-x[1], x[0]))
    kept = {g for g, _ in found}
    return [(g, c) for g, c in found if not any(sub in kept for sub in ngrams(g, len(g.split()) - 1))][:top]


def main():
    args = parse_args()
    from utils.data import load_splits, resolve_task, select_training_rows
    from utils.data import data_kwargs
    from utils.tasks import get_task

    resolve_task(args)
    if args.output and os.path.exists(args.output) and not args.overwrite:
        raise UserError(f"{args.output} exists: choose another --output, or --overwrite to replace it")
    data = load_splits(splits=TRAINING_SPLITS, **data_kwargs(args))
    data = select_training_rows(data, args.forget_size, args.max_forget, args.max_retain, args.data_seed)
    task = get_task(data.task)
    terms = forget_terms([row_text(task, r) for r in data["train_forget"]],
                         [row_text(task, r) for r in data["train_retain"]], args.max_n, args.min_rows, args.top)
    if not terms:
        raise UserError(f"no word n-gram occurs in {args.min_rows} or more train_forget rows and in no train_retain "
                        f"row (lower --min_rows)")
    for t, c in terms:
        print(f"{c:6d}  {t}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("".join(f"{t}\n" for t, _ in terms))
        print(f"wrote {len(terms)} terms to {args.output}")


if __name__ == "__main__":
    run_main(main)
