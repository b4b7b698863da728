"""The four unlearning splits: sizes of the real SST-2 files, the paper's seeded forget_size draw,
seeded caps, the file formats, and one-line errors for bad data folders."""
import argparse
import json
import os

import pytest

from conftest import run_script, write_split_dir
from utils.cli import UserError
from utils.data import SPLITS, forget_subset, load_splits, sample_rows, training_splits


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


TOY = {s: [(f"{s} review number {i}", i % 2) for i in range(6)] for s in SPLITS}


@pytest.fixture(scope="module")
def sst2(sst2_dir):
    return load_splits(data_dir=sst2_dir)


def _args(data_dir, **kw):
    base = dict(dataset="sst2", data_dir=data_dir, forget_size=1.0, max_retain=None, max_forget=None, data_seed=42,
                text_column="text", label_column="label", label_words=None)
    base.update(kw)
    return argparse.Namespace(**base)


def _texts(rows):
    return [r["text"] for r in rows]


# ------------------------------------------------------------------ the real SST-2 split

def test_sst2_split_sizes(sst2):
    assert {s: len(r) for s, r in sst2.items()} == {
        "train_retain": 46331, "train_forget": 1425, "test_retain": 19855, "test_forget": 610}


def test_sst2_rows_are_text_and_binary_label(sst2):
    for split, rows in sst2.items():
        assert set(rows[0]) == {"text", "label"}
        assert {r["label"] for r in rows} == {0, 1}, split
        assert all(isinstance(r["text"], str) and isinstance(r["label"], int) for r in rows)
    # class balance from ../shared/data/README.md
    assert sum(r["label"] for r in sst2["train_forget"]) == 769
    assert sum(r["label"] for r in sst2["test_forget"]) == 347


def test_forget_size_quarter_keeps_the_same_356_rows(sst2):
    forget = sst2["train_forget"]
    first = forget_subset(forget, 0.25)
    second = forget_subset(list(forget), 0.25)
    assert len(first) == 356
    assert first == second  # the same 356 rows every time
    assert _texts(first) != _texts(forget[:356])  # a random draw, not simply the head of the file
    # the kept rows are spread over the whole file and keep the file's order
    pos = {id(r): i for i, r in enumerate(forget)}
    idx = [pos[id(r)] for r in first]
    assert idx == sorted(idx) and idx[-1] > 1000 and idx[0] < 100
    assert len(forget_subset(forget, 0.5)) == 712
    assert forget_subset(forget, 1.0) == forget


def test_forget_size_through_training_splits_is_deterministic(sst2_dir, sst2):
    """The scripts' path (training_splits) gives the same subset, independent of --data_seed without caps."""
    a = training_splits(_args(sst2_dir, forget_size=0.25, data_seed=1), splits=("train_forget",))["train_forget"]
    b = training_splits(_args(sst2_dir, forget_size=0.25, data_seed=7), splits=("train_forget",))["train_forget"]
    assert len(a) == 356 and a == b
    assert a == forget_subset(sst2["train_forget"], 0.25)


def test_caps_are_seeded_and_deterministic(sst2_dir, sst2):
    retain = sst2["train_retain"]
    a = sample_rows(retain, 100, seed=3)
    assert len(a) == 100 and a == sample_rows(retain, 100, seed=3)
    assert a != sample_rows(retain, 100, seed=4)
    assert _texts(a) != _texts(retain[:100])
    pos = {id(r): i for i, r in enumerate(retain)}
    assert [pos[id(r)] for r in a] == sorted(pos[id(r)] for r in a)  # original order kept
    # nested: a smaller cap draws a subset of a larger one (stages capped below qlora.py's cap see memorised rows)
    drawn = [{id(r) for r in sample_rows(retain[:1425], n, seed=42)} for n in (64, 128, 400, 1000)]
    assert all(small < big for small, big in zip(drawn, drawn[1:]))
    assert sample_rows(retain[:10], None, seed=0) == retain[:10]
    assert sample_rows(retain[:10], 50, seed=0) == retain[:10]

    args = _args(sst2_dir, max_retain=40, max_forget=12, forget_size=0.25, data_seed=5)
    d1 = training_splits(args)
    d2 = training_splits(args)
    assert (len(d1["train_retain"]), len(d1["train_forget"])) == (40, 3)
    assert d1 == d2
    # the forget_size subset is drawn from the capped rows: rows a parent capped at 12 trained on
    capped = _texts(sample_rows(sst2["train_forget"], 12, seed=5))
    assert set(_texts(d1["train_forget"])) <= set(capped)
    d3 = training_splits(_args(sst2_dir, max_retain=40, max_forget=12, forget_size=0.25, data_seed=6))
    assert d3["train_retain"] != d1["train_retain"]


# ------------------------------------------------------------------ file formats

def _write_rows(path, split, rows, fmt):
    import pandas as pd

    df = pd.DataFrame({"text": [t for t, _ in rows], "label": [lab for _, lab in rows],
                       "label_text": [["negative", "positive"][lab] for _, lab in rows]})
    if fmt == "jsonl":
        with open(os.path.join(path, f"{split}.jsonl"), "w") as f:
            for rec in df.to_dict("records"):
                f.write(json.dumps(rec) + "\n")
    elif fmt == "parquet":
        df.to_parquet(os.path.join(path, f"{split}.parquet"))
    else:
        df.to_csv(os.path.join(path, f"{split}.csv"), index=False)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_split_file_formats(tmp_path, fmt):
    for split, rows in TOY.items():
        _write_rows(tmp_path, split, rows, fmt)
    data = load_splits(data_dir=str(tmp_path))
    assert set(data) == set(SPLITS)
    for split, rows in TOY.items():
        assert data[split] == [{"text": t, "label": lab} for t, lab in rows]


def test_hub_file_names_are_accepted(tmp_path):
    """The hub's own names (v3_train_retain.csv, ...) load as well."""
    write_split_dir(tmp_path, TOY)
    for s in SPLITS:
        os.rename(tmp_path / f"{s}.csv", tmp_path / f"v3_{s}.csv")
    assert len(load_splits(data_dir=str(tmp_path))["test_forget"]) == 6


# ------------------------------------------------------------------ one-line errors

def _error(fn, *a, **kw):
    with pytest.raises(UserError) as e:
        fn(*a, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_folder(tmp_path):
    msg = _error(load_splits, data_dir=str(tmp_path / "nowhere"))
    assert "nowhere" in msg and "does not exist" in msg


def test_missing_split_file(tmp_path):
    write_split_dir(tmp_path, {s: r for s, r in TOY.items() if s != "test_forget"})
    msg = _error(load_splits, data_dir=str(tmp_path))
    assert "test_forget" in msg


def test_missing_column(tmp_path):
    write_split_dir(tmp_path, TOY)
    (tmp_path / "train_forget.csv").write_text("review,label\nsome text,1\n")
    msg = _error(load_splits, data_dir=str(tmp_path))
    assert "train_forget" in msg and "'text'" in msg


@pytest.mark.parametrize("bad", ["2", "-1", "neutral", "0.5", ""])
def test_label_outside_the_label_set(tmp_path, bad):
    """Labels are 0..n-1 or the label words themselves ('positive' is a label; 'neutral' is not)."""
    write_split_dir(tmp_path, TOY)
    (tmp_path / "test_retain.csv").write_text(f"text,label\nfine,positive\nodd,{bad}\n")
    msg = _error(load_splits, data_dir=str(tmp_path))
    assert "test_retain" in msg and "label" in msg and "row 1" in msg


def test_empty_split(tmp_path):
    write_split_dir(tmp_path, TOY)
    (tmp_path / "train_retain.csv").write_text("text,label,label_text\n")
    msg = _error(load_splits, data_dir=str(tmp_path))
    assert "train_retain" in msg and "empty" in msg


def test_zero_byte_split_file(tmp_path):
    write_split_dir(tmp_path, TOY)
    (tmp_path / "train_retain.csv").write_text("")
    msg = _error(load_splits, data_dir=str(tmp_path))
    assert "train_retain" in msg


@pytest.mark.parametrize("size", [0.0, -0.25, 1.5])
def test_bad_forget_size(size):
    rows = [{"text": "t", "label": 0}] * 10
    assert "forget_size" in _error(forget_subset, rows, size)


def test_forget_size_counts_are_floors_without_rounding_errors():
    rows = [{"text": str(i), "label": 0} for i in range(100)]
    assert 0.29 * 100 < 29  # binary fractions: a plain int() would keep 28
    assert [len(forget_subset(rows, f)) for f in (0.29, 0.57, 0.255, 1.0)] == [29, 57, 25, 100]


def test_forget_size_that_keeps_no_row():
    rows = [{"text": "t", "label": 0}] * 10
    msg = _error(forget_subset, rows, 0.05)
    assert "forget_size" in msg and "no row" in msg


def test_unknown_dataset_without_data_dir():
    msg = _error(load_splits, dataset="imdb", data_dir=None)
    assert "imdb" in msg and "sst2" in msg


def _one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def test_script_reports_bad_data_in_one_line(tmp_path):
    """A label outside {0, 1} reaches the user of qlora.py as one `error:` line, before any model loads."""
    write_split_dir(tmp_path, TOY)
    (tmp_path / "train_forget.csv").write_text("text,label,label_text\nfine,1,positive\nodd,3,x\n")
    (tmp_path / "model").mkdir()  # a folder with no model in it: the data error must come before any load
    proc = run_script("qlora.py", "--data_dir", tmp_path, "--model_name", tmp_path / "model", "--quantization", "none",
                      "--output_path", tmp_path / "out", check=False)
    line = _one_line_error(proc)
    assert "train_forget" in line and "label" in line
    assert not (tmp_path / "out").exists()


def test_script_rejects_bad_forget_size(tmp_path):
    proc = run_script("qlora.py", "--data_dir", tmp_path, "--forget_size", "1.5", check=False)
    assert "forget_size" in _one_line_error(proc)
