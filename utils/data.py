"""The four unlearning splits: loading (hub or local folder), validation, seeded caps."""
import os
import random

from .cli import UserError
from .tasks import Sentiment, get_task

SPLITS = ("train_retain", "train_forget", "test_retain", "test_forget")
HUB_DATASETS = {
    "sst2": "karuna-bhaila/Unlearning_SST2v3",
    "yelp": "karuna-bhaila/Unlearning_Yelp_Polarity",
}
LABEL_WORDS = Sentiment.label_words
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
    """{split: rows} plus the task they belong to and the label words their integer labels stand for."""

    label_words = LABEL_WORDS
    task = "sentiment"

    def derive(self, rows):
        """A Splits of other rows of the same task and label words."""
        out = Splits(rows)
        out.label_words, out.task = self.label_words, self.task
        return out


def _hub_frames(dataset, splits):
    if dataset in QA_DATASETS:
        return qa_hub_frames(dataset, splits)
    if dataset not in HUB_DATASETS:
        raise UserError(f"unknown dataset '{dataset}': choose one of {', '.join([*HUB_DATASETS, *QA_DATASETS])} or give "
                        f"--data_dir")
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


# ---------------------------------------------------------------- the paper's multiple-choice data (WMDP-bio / SciQ)

# forget: WMDP-bio (its one split); retain: SciQ, all three splits pooled. Each side is split 70/30 into train/test
# with QA_SEED (the paper's own split is unpublished), and SciQ's four options are shuffled with QA_SEED.
QA_DATASETS = {"wmdp_bio": {"forget": ("cais/wmdp", "wmdp-bio", ("test",)),
                            "retain": ("allenai/sciq", None, ("train", "validation", "test"))}}
QA_SEED, QA_TEST_FRACTION = 42, 0.3


def hub_table(repo, config, split):
    """One split of a hub dataset as a pandas DataFrame, through `datasets` (tests replace this function)."""
    from datasets import load_dataset

    return load_dataset(repo, config, split=split).to_pandas()


def shuffle_options(correct, wrong, rng):
    """(choices, answer index): the right option and the wrong ones in an order drawn from `rng`."""
    options = [correct] + [w for w in wrong if w != correct]
    order = list(range(len(options)))
    rng.shuffle(order)
    return [options[i] for i in order], order.index(0)


def split_train_test(items, test_fraction, seed):
    """(train, test): a seeded draw of round(test_fraction · n) items for test, both in their original order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    test = set(order[: int(round(len(items) * test_fraction))])
    return [x for i, x in enumerate(items) if i not in test], [x for i, x in enumerate(items) if i in test]


def sciq_as_choices(df, seed=QA_SEED):
    """SciQ rows (question, distractor1..3, correct_answer) as multiple-choice rows with shuffled options."""
    rng = random.Random(seed)
    rows = []
    for r in df.to_dict("records"):
        choices, answer = shuffle_options(str(r["correct_answer"]), [str(r[f"distractor{i}"]) for i in (1, 2, 3)], rng)
        rows.append({"question": r["question"], "choices": choices, "answer": answer})
    return rows


def qa_hub_frames(dataset, splits):
    """{split: (frame, where)} of the multiple-choice hub dataset `dataset` (only the sides `splits` need)."""
    import pandas as pd

    out = {}
    for side, (repo, config, parts) in QA_DATASETS[dataset].items():
        wanted = [s for s in splits if s.endswith("_" + side)]
        if not wanted:
            continue
        try:
            df = pd.concat([hub_table(repo, config, p) for p in parts], ignore_index=True)
        except Exception as e:
            raise UserError(f"cannot load hub dataset {repo} ({type(e).__name__}); offline? use --data_dir with local "
                            f"copies (question, choices, answer)")
        rows = sciq_as_choices(df) if side == "retain" else df[["question", "choices", "answer"]].to_dict("records")
        train, test = split_train_test(rows, QA_TEST_FRACTION, QA_SEED)
        for split, part in ((f"train_{side}", train), (f"test_{side}", test)):
            if split in wanted:
                out[split] = (pd.DataFrame(part, columns=["question", "choices", "answer"]), f"{repo} ({split})")
    return {s: out[s] for s in splits}


def default_task(dataset):
    """The task of a dataset name: mcqa for the paper's multiple-choice data, else sentiment."""
    return "mcqa" if dataset in QA_DATASETS else "sentiment"


def default_dataset(task, data_dir=None):
    """The dataset name when --dataset is left out: the data folder's name (a copy of the paper's data kept in a
    folder named after it, such as ../shared/data/sst2, is that dataset), else the task's hub dataset (sst2;
    mcqa: wmdp_bio). Own data is never called by a paper dataset's name it does not have."""
    if data_dir:
        return os.path.basename(os.path.normpath(os.path.abspath(data_dir)))
    return next(iter(QA_DATASETS)) if task == "mcqa" else "sst2"


def resolve_task(args):
    """Fill --task and --dataset when left out, each from the other (neither: sst2, sentiment), and refuse a task
    that contradicts a known hub dataset."""
    if getattr(args, "task", None) is None:
        args.task = default_task(args.dataset)
    if args.dataset is None:
        args.dataset = default_dataset(args.task, args.data_dir)
    known = default_task(args.dataset) if args.dataset in {*HUB_DATASETS, *QA_DATASETS} else None
    if known and known != args.task and not args.data_dir:
        raise UserError(f"--dataset {args.dataset} is a {known} dataset, not --task {args.task}")
    get_task(args.task)
    return args


def load_splits(dataset="sst2", data_dir=None, splits=SPLITS, text_column="text", label_column="label",
                label_words=None, task=None):
    """Return Splits {split: rows} from --data_dir if given, else from the hub: the task's rows (sentiment:
    {"text", "label"}; mcqa: {"question", "choices", "label"}); `task` defaults to the dataset's.

    Labels are integers 0..n-1 or the label words themselves. The label words come from `label_words`,
    else from the data (sentiment: a `label_text` column, consistent across splits), else the task's own."""
    task = get_task(task or default_task(dataset))
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
    words = tuple(label_words) if label_words else (task.words_from_data(frames, label_column) or task.label_words)
    if len(set(w.lower() for w in words)) != len(words) or len(words) < 2:
        raise UserError(f"the label words must be at least two different words, got {', '.join(words)}")
    out = Splits({s: task.read_rows(df, where, words, text_column, label_column) for s, (df, where) in frames.items()})
    out.label_words, out.task = words, task.name
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
    out = data.derive(data) if isinstance(data, Splits) else Splits(data)
    if "train_forget" in out:
        out["train_forget"] = forget_subset(sample_rows(out["train_forget"], max_forget, seed), forget_size)
    if "train_retain" in out:
        out["train_retain"] = sample_rows(out["train_retain"], max_retain, seed)
    return out


def data_kwargs(args):
    """load_splits' keyword arguments from a script's data flags."""
    from .cli import comma_list

    return dict(dataset=args.dataset, data_dir=args.data_dir, text_column=args.text_column, label_column=args.label_column,
                label_words=comma_list(args.label_words) if args.label_words else None, task=getattr(args, "task", None))


def training_splits(args, splits=("train_retain", "train_forget")):
    """Load the training splits with --max_forget / --max_retain (seed --data_seed) and --forget_size applied."""
    data = load_splits(splits=splits, **data_kwargs(args))
    return select_training_rows(data, args.forget_size, args.max_forget, args.max_retain, args.data_seed)
