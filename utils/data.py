"""The four unlearning splits: loading (hub or local folder), validation, seeded caps."""
import os
import random

from .cli import UserError

SPLITS = ("train_retain", "train_forget", "test_retain", "test_forget")
HUB_DATASETS = {
    "sst2": "karuna-bhaila/Unlearning_SST2v3",
    "yelp": "karuna-bhaila/Unlearning_Yelp_Polarity",
}
LABEL_WORDS = ("negative", "positive")  # label 0, label 1
FORGET_SIZE_SEED = 42  # the paper draws the forget subset with seed 42
_EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet")


def default_data_dir():
    """../shared/data/sst2 beside the checkout, when present (tests and the demo read it)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = os.path.join(os.path.dirname(here), "shared", "data", "sst2")
    return d if os.path.isdir(d) else None


def _split_file(data_dir, split):
    for name in os.listdir(data_dir):
        stem, ext = os.path.splitext(name)
        # accept the hub's own names too (v3_train_retain.csv)
        if ext in _EXTENSIONS and (stem == split or stem.endswith("_" + split)):
            return os.path.join(data_dir, name)
    return None


def _read_table(path):
    import pandas as pd

    ext = os.path.splitext(path)[1]
    try:
        if ext == ".csv":
            return pd.read_csv(path, encoding="utf-8-sig", keep_default_na=False)
        if ext in (".jsonl", ".json"):
            try:
                return pd.read_json(path, lines=True)
            except ValueError:
                return pd.read_json(path)
        return pd.read_parquet(path)
    except Exception as e:  # malformed file: one line, not a trace
        raise UserError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


class Splits(dict):
    """{split: rows} plus the label words the rows' integer labels stand for."""

    label_words = LABEL_WORDS


def _label_text_words(frames, label_column, n_max=10):
    """Label words from a `label_text` column (label i -> its word), the same in every split; None without one."""
    pairs = {}
    for df, where in frames.values():
        if "label_text" not in df.columns or label_column not in df.columns:
            return None
        for lab, word in zip(df[label_column].tolist(), df["label_text"].tolist()):
            i, word = _label_value(lab), str(word).strip()
            if i is None or not 0 <= i < n_max or not word:
                return None  # text labels, or odd values: the label column alone decides (and reports them)
            if pairs.setdefault(i, word) != word:
                raise UserError(f"{where}: label {i} is '{pairs[i]}' in one row and '{word}' in another (label_text)")
    if not pairs or sorted(pairs) != list(range(len(pairs))):
        return None
    return tuple(pairs[i] for i in range(len(pairs)))


def _rows_from_frame(df, where, label_words, text_column="text", label_column="label"):
    for col in (text_column, label_column):
        if col not in df.columns:
            raise UserError(f"{where} has no '{col}' column (columns: {', '.join(map(str, df.columns))}); "
                            f"name yours with --text_column / --label_column")
    if len(df) == 0:
        raise UserError(f"{where} is empty")
    index = {w.lower(): i for i, w in enumerate(label_words)}
    rows = []
    for i, (text, label) in enumerate(zip(df[text_column].tolist(), df[label_column].tolist())):
        lab = _label_value(label)
        if lab is None and isinstance(label, str):
            lab = index.get(label.strip().lower())
        if lab is None or not 0 <= lab < len(label_words):
            raise UserError(f"{where} row {i}: label {label!r} is neither 0..{len(label_words) - 1} nor one of the label "
                            f"words {', '.join(label_words)}")
        rows.append({"text": str(text), "label": lab})
    return rows


def _label_value(label):
    """The integer a label cell holds, or None. A column with one non-numeric cell is read as strings,
    so the digits '0'/'1' count as labels too (else the error would name the wrong row)."""
    if isinstance(label, str):
        s = label.strip()
        return int(s) if s.lstrip("-").isdigit() else None
    try:
        lab = int(label)
    except (TypeError, ValueError, OverflowError):
        return None
    return lab if lab == label else None


def _hub_frames(dataset, splits):
    if dataset not in HUB_DATASETS:
        raise UserError(f"unknown dataset '{dataset}': choose one of {', '.join(HUB_DATASETS)} or give --data_dir")
    repo = HUB_DATASETS[dataset]
    try:
        from huggingface_hub import hf_hub_download, list_repo_files

        files = list_repo_files(repo, repo_type="dataset")
        out = {}
        for split in splits:
            match = [f for f in files if os.path.splitext(os.path.basename(f))[0].endswith(split)
                     and f.endswith(_EXTENSIONS)]
            if not match:
                raise UserError(f"hub dataset {repo} has no file for split '{split}'")
            out[split] = (_read_table(hf_hub_download(repo, match[0], repo_type="dataset")), f"{repo}:{match[0]}")
        return out
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load hub dataset {repo} ({type(e).__name__}); offline? use --data_dir with local copies")


def load_splits(dataset="sst2", data_dir=None, splits=SPLITS, text_column="text", label_column="label",
                label_words=None):
    """Return Splits {split: [{"text", "label"}, ...]} from --data_dir if given, else from the hub.

    Labels are integers 0..n-1 or the label words themselves. The label words come from `label_words`,
    else from a `label_text` column (consistent across splits), else negative/positive."""
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            raise UserError(f"data folder {data_dir} does not exist")
        frames = {}
        for split in splits:
            path = _split_file(data_dir, split)
            if path is None:
                raise UserError(f"no file for split '{split}' in {data_dir} (expected {split}.csv, .jsonl or .parquet)")
            frames[split] = (_read_table(path), path)
    else:
        frames = _hub_frames(dataset, splits)
    words = tuple(label_words) if label_words else (_label_text_words(frames, label_column) or LABEL_WORDS)
    if len(set(w.lower() for w in words)) != len(words) or len(words) < 2:
        raise UserError(f"the label words must be at least two different words, got {', '.join(words)}")
    out = Splits({s: _rows_from_frame(df, where, words, text_column, label_column) for s, (df, where) in frames.items()})
    out.label_words = words
    return out


def sample_rows(rows, n, seed):
    """A seeded random subset of n rows, in their original order (all rows when n is None or too big).
    The first n of one seeded permutation: a smaller cap is a subset of a larger one, so a stage capped
    below qlora.py's cap trains on rows the model memorised, and forget sizes are nested."""
    if n is None or n >= len(rows):
        return list(rows)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    keep = sorted(order[:n])
    return [rows[i] for i in keep]


def forget_subset(rows, forget_size):
    """The paper's forget-size ablation: keep floor(τ·|D_f|) rows, drawn with seed 42."""
    if not 0.0 < forget_size <= 1.0:
        raise UserError(f"--forget_size must be in (0, 1], got {forget_size}")
    n = int(len(rows) * forget_size + 1e-9)  # floor, but 0.29 * 100 keeps 29, not 28 (binary fractions)
    if n == 0:
        raise UserError(f"--forget_size {forget_size} keeps no row of the {len(rows)} forget rows")
    return sample_rows(rows, n, FORGET_SIZE_SEED)


def select_training_rows(data, forget_size=1.0, max_forget=None, max_retain=None, seed=42):
    """The train_* rows a stage trains on: the seeded caps (nested: a smaller cap keeps a subset of a larger
    one, so a stage capped at or below its parent's cap trains on rows its parent trained on), then the
    forget-size subset τ of the capped forget rows (seed 42, the paper's draw when there is no cap).
    Evaluation calls this too, so that train_forget is exactly the set that was unlearned."""
    out = Splits(data)
    out.label_words = getattr(data, "label_words", LABEL_WORDS)
    if "train_forget" in out:
        out["train_forget"] = forget_subset(sample_rows(out["train_forget"], max_forget, seed), forget_size)
    if "train_retain" in out:
        out["train_retain"] = sample_rows(out["train_retain"], max_retain, seed)
    return out


def data_kwargs(args):
    """load_splits' keyword arguments from a script's data flags."""
    from .cli import comma_list

    return dict(dataset=args.dataset, data_dir=args.data_dir, text_column=args.text_column,
                label_column=args.label_column, label_words=comma_list(args.label_words) if args.label_words else None)


def training_splits(args, splits=("train_retain", "train_forget")):
    """Load the training splits with --max_forget / --max_retain (seed --data_seed) and --forget_size applied."""
    data = load_splits(splits=splits, **data_kwargs(args))
    return select_training_rows(data, args.forget_size, args.max_forget, args.max_retain, args.data_seed)
