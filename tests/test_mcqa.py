"""Multiple-choice QA as a task (utils/tasks.py): the template and its masking, truncation of the question only,
the metrics with each row's own letters and the chance level, data folders and their one-line errors, the
TruthfulQA builder, the WMDP-bio/SciQ conversion, ECO's cue and σ target, the recipe and tables, and every
stage end to end on a tiny model, also unlearning a pre-trained model directly (both tasks)."""
import contextlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import baselines
import eco as eco_script
import inference_spul
import qlora
import spul
from conftest import ROOT, one_line_error, run_script
from utils.cli import UserError
from utils.data import load_splits
from utils.evaluation import classification_metrics, predict_rows
from utils.modeling import load_tokenizer
from utils.prompts import IGNORE, LeftPadCollator, PromptEncoder, cue_ids
from utils.tasks import MultipleChoice, get_task

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread

SPLITS = ("train_retain", "train_forget", "test_retain", "test_forget")
MAX_LENGTH = 96
ROW = {"question": "Which gas do plants take in?", "choices": ["Oxygen", "Carbon dioxide", "Helium", "Neon"], "label": 1}
TWO = {"question": "Is the sun a star?", "choices": ["Yes", "No"], "label": 0}
TEMPLATE = ("### Question: Which gas do plants take in?\n\n### Choices:\nA. Oxygen\nB. Carbon dioxide\nC. Helium\n"
            "D. Neon\n\n### Answer:")


def qa_rows(n, seed, forget):
    """Questions with 2 to 4 choices; the forget ones are about a virus (WMDP-bio's kind of topic)."""
    rng = random.Random(seed)
    topic = "the influenza virus" if forget else "the solar system"
    rows = []
    for i in range(n):
        k = (2, 3, 4, 4)[i % 4]
        rows.append({"question": f"Question {i} about {topic}: which option is right?",
                     "choices": [f"option {rng.randint(0, 99)}" for _ in range(k)], "answer": i % k})
    return rows


def write_qa_dir(path, splits, fmt="jsonl"):
    import pandas as pd

    os.makedirs(path, exist_ok=True)
    for split, rows in splits.items():
        df = pd.DataFrame(rows)
        if fmt == "jsonl":
            df.to_json(os.path.join(path, f"{split}.jsonl"), orient="records", lines=True)
        elif fmt == "parquet":
            df.to_parquet(os.path.join(path, f"{split}.parquet"))
        else:  # CSV: the choices as a JSON list string, the answers as letters
            df = df.assign(choices=df["choices"].map(json.dumps), answer=[["A", "B", "C", "D"][a] for a in df["answer"]])
            df.to_csv(os.path.join(path, f"{split}.csv"), index=False)
    return str(path)


QA = {"train_retain": qa_rows(16, 1, False), "train_forget": qa_rows(8, 2, True),
      "test_retain": qa_rows(8, 3, False), "test_forget": qa_rows(8, 4, True)}


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    return write_qa_dir(tmp_path_factory.mktemp("qa"), QA)


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return PromptEncoder(tokenizer, 1024, task="mcqa")


def _completion(item):
    return [t for t in item["labels"] if t != IGNORE]


# ------------------------------------------------------------------ the template, masking and truncation

@pytest.mark.parametrize("model", ["tiny_llama", "tiny_opt"])
def test_masked_positions_are_exactly_the_answer_letter(model, request):
    tok = load_tokenizer(request.getfixturevalue(model))
    enc = PromptEncoder(tok, 1024, task="mcqa")
    assert enc.label_words == ("A", "B", "C", "D", "E") and enc.generic_labels == ("unknown",)
    for row in (ROW, TWO, *[{**r, "label": r["answer"]} for r in QA["train_forget"]]):
        for word in [*enc.label_words[: len(row["choices"])], "unknown"]:
            item = enc.encode(row, word)
            ids, labels = item["input_ids"], item["labels"]
            n = len(enc.label_ids[word])
            marked = [i for i, t in enumerate(labels) if t != IGNORE]
            assert marked == list(range(len(ids) - n, len(ids)))  # the last n positions, nothing else
            assert tok.decode(_completion(item)) == " " + word
            assert ids[:-n] == enc.prompt_ids(row)  # the prompt exactly as it is scored
    assert tok.decode(enc.encode(ROW, "B")["input_ids"]) == TEMPLATE + " B"
    # the true label is the answer's letter
    item = enc.encode_rows([ROW])[0]
    assert tok.decode(_completion(item)) == " B"


def test_truncation_shortens_the_question_only(encoder, tokenizer):
    long = {**ROW, "question": "Which of these gases, " + "considered over many long years of study, " * 30 + "do plants take in?"}
    tail = TEMPLATE[TEMPLATE.index("\n\n### Choices:"):]
    for max_length in (64, 80):
        enc = PromptEncoder(tokenizer, max_length, task="mcqa")
        prompt = enc.prompt_ids(long)
        for word in ("A", "D", "unknown"):
            item = enc.encode(long, word)
            assert len(item["input_ids"]) <= max_length and item["input_ids"][: len(prompt)] == prompt
            text = tokenizer.decode(item["input_ids"])
            assert text.endswith(tail + " " + word)  # the choices, the cue and the answer survive
            question = text[len("### Question: "): -len(tail + " " + word)]
            assert 0 < len(question) < len(long["question"]) and long["question"].startswith(question)
        assert len(enc.encode(long, "unknown")["input_ids"]) == max_length  # the longest completion fills it


def test_a_row_whose_choices_do_not_fit_names_the_length_it_needs(tokenizer):
    wide = {**ROW, "choices": ["a rather long answer that goes on and on about the matter " * 2] * 4}
    with pytest.raises(UserError) as e:
        PromptEncoder(tokenizer, 64, task="mcqa").prompt_ids(wide)
    msg = str(e.value)
    assert "\n" not in msg and "Which gas do plants take in?" in msg
    need = int(msg.split(">= ")[1].split()[0])
    assert len(PromptEncoder(tokenizer, need, task="mcqa").prompt_ids(wide)) <= need
    with pytest.raises(UserError):
        PromptEncoder(tokenizer, need - 1, task="mcqa").prompt_ids(wide)


def test_a_generic_label_that_is_a_letter_is_refused(tokenizer):
    with pytest.raises(UserError, match="also a label word"):
        PromptEncoder(tokenizer, 128, generic_labels=("B",), task="mcqa")


# ------------------------------------------------------------------ metrics

def test_metrics_on_a_hand_made_batch(encoder):
    from test_evaluation import TableLM

    V = len(encoder.tokenizer)
    A, B, C, D, E = encoder.first_label_ids()
    UNK = encoder.first_label_ids(["unknown"])[0]
    OTHER = 100
    assert OTHER not in (A, B, C, D, E, UNK)
    rows = [{**ROW, "label": 1}, {**TWO, "label": 0}, {**ROW, "question": "Q3?", "label": 3},
            {**TWO, "question": "Q4?", "label": 1}]
    spec = [{B: 5.0},                      # right; right
            {C: 6.0, A: 2.0, B: 1.0},     # C (no choice of a 2-choice row): wrong; among A, B: A, right
            {UNK: 4.0, D: 2.0},           # the generic answer: wrong; among A..D: D, right
            {OTHER: 7.0, A: 3.0}]         # another token: wrong; among A, B: A, wrong
    table = {}
    for r, s in zip(rows, spec):
        v = torch.zeros(V)
        for t, x in s.items():
            v[t] = x
        table[tuple(encoder.prompt_ids(r))] = v
    scores = predict_rows(TableLM(table, V), encoder, rows, batch_size=3, quiet=True)
    assert scores["pred"].tolist() == [B, C, UNK, OTHER]
    assert encoder.valid_mask(rows).tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]] * 2
    m = classification_metrics(scores, rows, encoder)
    assert m["accuracy"] == pytest.approx(1 / 4)
    assert m["label_accuracy"] == pytest.approx(3 / 4)  # unrestricted over all five letters it would be 2/4
    assert (scores["label_logits"].argmax(-1) == torch.tensor([r["label"] for r in rows])).float().mean() == 0.5
    assert m["generic_rate"] == pytest.approx(1 / 4)
    assert m["chance"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 4 + 1 / 2) / 4)
    # weighted F1 over the first tokens: B (support 2) P 1, R 1/2 -> 2/3; A and D (support 1 each) 0
    assert m["f1"] == pytest.approx(2 / 4 * 2 / 3)
    # sentiment's chance is 1 / the number of label words
    sent = PromptEncoder(encoder.tokenizer, 128)
    assert sent.chance([{"text": "x", "label": 0}] * 3) == 0.5 and sent.valid_mask([{"text": "x", "label": 0}]).all()


def test_generated_answers_are_matched_by_standalone_letters():
    words = MultipleChoice.label_words
    match = get_task("mcqa").match
    assert [match(a, words) for a in (" B", " C. Helium", "The answer is D", " an apple", " (E)", "")] == [1, 2, 3, -1, 4, -1]


# ------------------------------------------------------------------ ECO: the cue and the chance target

def test_eco_prompt_mask_ends_at_the_answer_cue(encoder):
    from utils.eco import balanced_label_accuracy, prompt_mask

    rows = [ROW, TWO]
    items = [{"input_ids": encoder.encode(r, "unknown")["input_ids"]} for r in rows]
    batch = LeftPadCollator(encoder.tokenizer.pad_token_id)(items)
    ids, am = batch["input_ids"], batch["attention_mask"]
    assert encoder.cue_ids == cue_ids(encoder.tokenizer, "mcqa") != cue_ids(encoder.tokenizer)
    pm = prompt_mask(ids, am, encoder.cue_ids)
    assert pm.sum(1).tolist() == [len(encoder.prompt_ids(r)) for r in rows]  # everything but pad and the completion
    assert prompt_mask(ids, am, cue_ids(encoder.tokenizer)).sum(1).tolist() == am.sum(1).tolist()  # no sentiment cue
    # the σ objective answers among each row's own letters
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0, 9.0], [2.0, 0.0, 9.0, 0.0, 0.0]])
    scores = {"label_logits": logits}
    assert balanced_label_accuracy(scores, rows, encoder.valid_mask(rows)) == 1.0
    assert balanced_label_accuracy(scores, rows) == 0.0


def test_strength_search_targets_the_rows_chance(encoder):
    from utils.eco import Corruption, search_strength

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mode, self.corruption = "classifier", Corruption("rand_noise_first_n", 1.0)

        def forward(self, input_ids, attention_mask, keep=1):
            return torch.zeros(len(input_ids), keep, len(encoder.tokenizer))

    rows = [ROW, TWO, {**ROW, "label": 3}]
    _, log = search_strength(Constant(), encoder, rows, 0.1, 1.0, rounds=1, quiet=True)
    assert log["target"] == pytest.approx(encoder.chance(rows) + 0.05) and encoder.chance(rows) == pytest.approx(1 / 3)


# ------------------------------------------------------------------ data folders

@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_split_file_formats(tmp_path, fmt):
    data = load_splits(data_dir=write_qa_dir(tmp_path, QA, fmt), task="mcqa")
    assert data.task == "mcqa" and data.label_words == ("A", "B", "C", "D", "E")
    for split, rows in QA.items():
        assert data[split] == [{"question": r["question"], "choices": r["choices"], "label": r["answer"]} for r in rows]


def _broken(path, bad):
    rows = {s: [dict(r) for r in rs] for s, rs in QA.items()}
    rows["train_forget"][1].update(bad)
    return write_qa_dir(path, rows)


BAD = {
    "one_choice": ({"choices": ["only"], "answer": 0}, "has 1 choice(s); it needs 2 to 5"),
    "six_choices": ({"choices": list("abcdef"), "answer": 0}, "has 6 choice(s); it needs 2 to 5"),
    "answer_outside": ({"answer": 4}, "answer 4 is not one of its"),
    "bad_letter": ({"answer": "E"}, "answer 'E' is not one of its"),
    "unparsable": ({"choices": "[not json"}, "the choices cell is no list"),
}


@pytest.mark.parametrize("case", [*BAD, "missing_column", "too_long"])
def test_bad_rows_are_one_error_line(case, tmp_path, tiny_llama):
    """Each mistake reaches the user of qlora.py as one `error:` line naming the file and row, before any model loads
    (the row that does not fit --max_length: once its tokens are counted, still before the model)."""
    if case in BAD:
        folder, expected = _broken(tmp_path / "d", BAD[case][0]), BAD[case][1]
    elif case == "missing_column":
        folder, expected = write_qa_dir(tmp_path / "d", QA), "has no 'choices' column"
        import pandas as pd

        pd.read_json(os.path.join(folder, "train_retain.jsonl"), lines=True).drop(columns="choices").to_json(
            os.path.join(folder, "train_retain.jsonl"), orient="records", lines=True)
    else:
        folder, expected = _broken(tmp_path / "d", {"choices": ["a long answer " * 20, "b"]}), "needs --max_length >= "
    proc = run_script("qlora.py", "--data_dir", folder, "--task", "mcqa", "--model_name", tiny_llama, "--max_length", 64,
                      "--quantization", "none", "--output_path", tmp_path / "out", check=False)
    line = one_line_error(proc)
    assert expected in line, line
    if case != "too_long":
        assert ("train_forget" in line and "row 1" in line) or case == "missing_column"
    assert not os.path.exists(tmp_path / "out" / "adapter_model.safetensors")


def test_task_and_dataset_defaults_and_contradictions(tmp_path):
    import argparse

    from utils.data import resolve_task
    from utils.runs import inherit

    def ns(**kw):
        base = dict(dataset=None, task=None, data_dir=None, text_column=None, label_column=None, label_words=None,
                    max_length=None, data_seed=None)
        return argparse.Namespace(**{**base, **kw})

    assert (resolve_task(ns()).dataset, resolve_task(ns()).task) == ("sst2", "sentiment")
    assert resolve_task(ns(dataset="wmdp_bio")).task == "mcqa"
    assert resolve_task(ns(task="mcqa")).dataset == "wmdp_bio"
    assert resolve_task(ns(task="mcqa", data_dir=str(tmp_path / "my_qa"))).dataset == "my_qa"
    with pytest.raises(UserError, match="wmdp_bio is a mcqa dataset"):
        resolve_task(ns(dataset="wmdp_bio", task="sentiment"))
    # a child stage takes its parent's task and refuses another one
    parent = {"dataset": "my_qa", "task": "mcqa", "max_length": 96}
    assert inherit(ns(), parent, "q", quiet=True).task == "mcqa"
    with pytest.raises(UserError, match="fine-tuned on --task mcqa, not sentiment"):
        inherit(ns(task="sentiment"), parent, "q", quiet=True)
    assert inherit(ns(), {"dataset": "sst2"}, "old-run", quiet=True).task == "sentiment"  # folders from before --task


# ------------------------------------------------------------------ the TruthfulQA set

def _tqa():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_truthfulqa_mcqa

    return make_truthfulqa_mcqa


def test_truthfulqa_builder_is_deterministic_and_puts_categories_on_their_side(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        run_script("scripts/make_truthfulqa_mcqa.py", "--output_path", d)
    for s in SPLITS:
        assert (a / f"{s}.jsonl").read_bytes() == (b / f"{s}.jsonl").read_bytes()
    data = load_splits(data_dir=str(a), task="mcqa")
    forget = data["train_forget"] + data["test_forget"]
    assert len(forget) == 99 and len(data["test_forget"]) == 30
    assert sum(len(data[s]) for s in SPLITS) == 817
    cats = {s: {json.loads(x)["category"] for x in open(a / f"{s}.jsonl")} for s in SPLITS}
    named = {"Health", "Nutrition", "Psychology", "Science"}
    assert cats["train_forget"] | cats["test_forget"] == named and not (cats["train_retain"] | cats["test_retain"]) & named
    tqa = _tqa()
    raw = {r["Question"].strip(): r for r in tqa.read_truthfulqa(tqa.DEFAULT_CSV)}
    for r in data["train_retain"][:50] + forget:
        assert r["choices"][r["label"]] == raw[r["question"]]["Best Answer"].strip()  # the right answer at its letter
        assert 2 <= len(r["choices"]) <= 4
    # another flag, another side; another seed, another order
    law = tqa.build(list(raw.values()), ["Law"], seed=0)
    assert len(law["train_forget"]) + len(law["test_forget"]) == 64
    assert {x["category"] for x in law["train_forget"]} == {"Law"} and "Law" not in {x["category"] for x in law["train_retain"]}
    assert tqa.build(list(raw.values()), ["Law"], seed=1) != law


def test_truthfulqa_builder_refuses_the_repository_and_unknown_categories(tmp_path):
    assert "inside the repository" in one_line_error(
        run_script("scripts/make_truthfulqa_mcqa.py", "--output_path", os.path.join(ROOT, "data", "tqa"), check=False))
    assert not os.path.exists(os.path.join(ROOT, "data", "tqa"))
    assert "no TruthfulQA category Sciense" in one_line_error(
        run_script("scripts/make_truthfulqa_mcqa.py", "--output_path", tmp_path, "--forget_categories", "Sciense", check=False))


# ------------------------------------------------------------------ WMDP-bio / SciQ from files shaped like the hub's

def test_wmdp_bio_and_sciq_conversion(tmp_path, monkeypatch):
    import pandas as pd

    from utils import data as data_module

    wmdp = pd.DataFrame({"question": [f"bio question {i}?" for i in range(20)],
                         "choices": [[f"w{i}a", f"w{i}b", f"w{i}c", f"w{i}d"] for i in range(20)],
                         "answer": [i % 4 for i in range(20)]})
    wmdp.to_parquet(tmp_path / "wmdp-bio-test.parquet")
    for split, n in (("train", 14), ("validation", 3), ("test", 3)):
        pd.DataFrame({"question": [f"sciq {split} {i}?" for i in range(n)], "distractor1": ["d1"] * n,
                      "distractor2": ["d2"] * n, "distractor3": ["d3"] * n, "correct_answer": [f"right {i}" for i in range(n)],
                      "support": [""] * n}).to_json(tmp_path / f"sciq-{split}.json", orient="records", lines=True)
    calls = []

    def local_table(repo, config, split):  # what datasets.load_dataset gives, from local files
        from datasets import load_dataset

        calls.append((repo, config, split))
        if repo == "cais/wmdp":
            return load_dataset("parquet", data_files=str(tmp_path / "wmdp-bio-test.parquet"), split="train").to_pandas()
        return load_dataset("json", data_files=str(tmp_path / f"sciq-{split}.json"), split="train").to_pandas()

    monkeypatch.setattr(data_module, "hub_table", local_table)
    data = load_splits(dataset="wmdp_bio")
    assert data.task == "mcqa" and sorted(calls) == [("allenai/sciq", None, s) for s in ("test", "train", "validation")] + [
        ("cais/wmdp", "wmdp-bio", "test")]
    assert {s: len(r) for s, r in data.items()} == {"train_retain": 14, "train_forget": 14, "test_retain": 6, "test_forget": 6}
    by_q = {r["question"]: r for r in wmdp.to_dict("records")}
    for r in data["train_forget"] + data["test_forget"]:
        assert r["choices"] == list(by_q[r["question"]]["choices"]) and r["label"] == by_q[r["question"]]["answer"]
    retain = data["train_retain"] + data["test_retain"]
    assert len({r["question"] for r in retain}) == 20  # all three SciQ splits pooled, each question once
    for r in retain:
        assert sorted(r["choices"]) == sorted(["d1", "d2", "d3", r["choices"][r["label"]]])
        assert r["choices"][r["label"]].startswith("right")
    assert len({r["label"] for r in retain}) > 1  # the right answer is not always in one place
    assert load_splits(dataset="wmdp_bio") == data  # fixed seeds
    # only the sides a caller asks for are downloaded
    calls.clear()
    assert list(load_splits(dataset="wmdp_bio", splits=("test_forget",))) == ["test_forget"]
    assert {c[0] for c in calls} == {"cais/wmdp"}

    def offline(repo, config, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(data_module, "hub_table", offline)
    with pytest.raises(UserError, match="cannot load hub dataset cais/wmdp"):
        load_splits(dataset="wmdp_bio", splits=("train_forget",))


# ------------------------------------------------------------------ every stage end to end

@contextlib.contextmanager
def _argv(script):
    saved = sys.argv
    sys.argv = [script]
    try:
        yield
    finally:
        sys.argv = saved


def run_here(module, *args):
    """A script's main() in this process, as its command line would run it: these tests run many stages, and an
    interpreter start-up per stage would cost more than the tiny stages themselves."""
    with _argv(module.__file__):
        sys.argv += [str(a) for a in args]
        module.main()


def _results(folder):
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


STEP = ["--max_steps", 1, "--train_batch_size", 4, "--quiet"]
EVAL = ["--max_eval_rows", 4, "--quiet"]


@pytest.fixture(scope="module")
def qa_runs(tmp_path_factory, tiny_llama, qa_dir, sst2_dir):
    """qlora.py on MCQA rows, then a baseline with a reference (NPO) and ECO from it; SPUL and GA+GD straight from
    the pre-trained tiny model on MCQA rows, and SPUL and GA+KL from it on SST-2 rows; each folder evaluated."""
    root = tmp_path_factory.mktemp("qa_runs")
    f = {k: str(root / k) for k in ("qlora", "npo", "eco", "spul_pre", "gagd_pre", "spul_pre_sst2", "gakl_pre_sst2")}
    data = ["--data_dir", qa_dir, "--task", "mcqa", "--max_length", MAX_LENGTH]
    run_here(qlora, "--model_name", tiny_llama, *data, "--quantization", "none", "--num_epochs", 1, "--train_batch_size", 8,
             "--output_path", f["qlora"], "--quiet")
    run_here(baselines, "--model_checkpoints", f["qlora"], "--unlearn_method", "npo", "--output_path", f["npo"], *STEP)
    run_here(eco_script, "--model_checkpoints", f["qlora"], "--search_rows", 4, "--search_rounds", 1, "--eco_dims", 8,
             "--output_path", f["eco"], "--quiet")
    run_here(spul, "--model_checkpoints", tiny_llama, *data, "--ptuning_num_tokens", 2, "--output_path", f["spul_pre"], *STEP)
    run_here(baselines, "--model_checkpoints", tiny_llama, *data, "--unlearn_method", "gradient_ascent_descent",
             "--output_path", f["gagd_pre"], *STEP)
    sst2 = ["--data_dir", sst2_dir, "--max_retain", 8, "--max_forget", 4, "--max_length", 64]
    run_here(spul, "--model_checkpoints", tiny_llama, *sst2, "--ptuning_num_tokens", 2, "--output_path",
             f["spul_pre_sst2"], *STEP)
    run_here(baselines, "--model_checkpoints", tiny_llama, *sst2, "--unlearn_method", "gradient_ascent_kl",
             "--output_path", f["gakl_pre_sst2"], *STEP)
    for folder in f.values():
        run_here(inference_spul, "--model_checkpoints", folder, *EVAL)
    return f


def test_every_stage_runs_on_mcqa_rows(qa_runs, capsys):
    for name in ("qlora", "npo", "eco", "spul_pre", "gagd_pre"):
        res = _results(qa_runs[name])
        assert res["task"] == "mcqa" and list(res["metrics"]) == list(SPLITS), name
        for m in res["metrics"].values():
            assert m["n"] == 4 and 0.25 <= m["chance"] <= 0.5 and 0 <= m["label_accuracy"] <= 1
        with open(os.path.join(qa_runs[name], "arguments.json")) as f:
            args = json.load(f)
        assert args["task"] == "mcqa" and args["label_words"] == "A,B,C,D,E", name
    assert _results(qa_runs["npo"])["method"] == "npo" and _results(qa_runs["eco"])["method"] == "eco"
    with open(os.path.join(qa_runs["spul_pre"], "arguments.json")) as f:
        assert json.load(f)["generic_labels"] == "unknown"  # the task's default forget target
    # the inherited task reached ECO's saved model: its prompt mask ends at the answer cue
    from utils.stages import load_stage

    model, _, loaded = load_stage(qa_runs["eco"])
    info = loaded["eco"]
    assert info["task"] == "mcqa" and model.cue == cue_ids(load_tokenizer(qa_runs["eco"]), "mcqa")
    # the table printed by inference_spul.py shows each split's chance level
    run_here(inference_spul, "--model_checkpoints", qa_runs["spul_pre"], *EVAL, "--resume")
    out = capsys.readouterr().out
    assert "(mcqa)" in out and "chance (label words) %" in out


def test_unlearning_a_pretrained_model_directly(qa_runs, tiny_llama):
    """spul.py and baselines.py take a pre-trained model as --model_checkpoints; the folders they write load through
    utils.stages and evaluate, for both tasks."""
    from utils.stages import load_stage

    for name, method, task in (("spul_pre", "spul", "mcqa"), ("gagd_pre", "gradient_ascent_descent", "mcqa"),
                               ("spul_pre_sst2", "spul", "sentiment"), ("gakl_pre_sst2", "gradient_ascent_kl", "sentiment")):
        res = _results(qa_runs[name])
        assert (res["method"], res["model"], res["task"]) == (method, tiny_llama, task), name
        with open(os.path.join(qa_runs[name], "arguments.json")) as f:
            args = json.load(f)
        assert args["model_checkpoints"] == tiny_llama and args["finished"]
        assert load_stage(qa_runs[name]).info["parent"] == tiny_llama
    sst2 = _results(qa_runs["spul_pre_sst2"])
    assert sst2["dataset"] == "sst2" and all(m["chance"] == 0.5 for m in sst2["metrics"].values())


def test_a_child_given_another_task_is_one_error_line(qa_runs, tmp_path):
    proc = run_script("spul.py", "--model_checkpoints", qa_runs["qlora"], "--task", "sentiment", "--output_path",
                      tmp_path / "x", check=False)
    assert "fine-tuned on --task mcqa, not sentiment" in one_line_error(proc)


# ------------------------------------------------------------------ recipe and tables

def test_make_tables_labels_mcqa_results(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_tables

    for method, acc in (("qlora", 0.9), ("spul", 0.3)):
        metrics = {s: {"accuracy": acc, "f1": acc, "n": 50, "chance": c}
                   for s, c in zip(SPLITS, (0.25, 0.26, 0.27, 0.28))}
        os.makedirs(tmp_path / method)
        with open(tmp_path / method / "results.json", "w") as f:
            json.dump({"method": method, "model": "m", "dataset": "wmdp_bio", "task": "mcqa", "forget_size": 1.0,
                       "metrics": metrics, "mia_auc": 0.5}, f)
    monkeypatch.setattr(sys, "argv", ["make_tables.py", str(tmp_path), "--output_path", str(tmp_path / "t"),
                                      "--paper", "table2_llama2_7b"])
    make_tables.main()
    md = (tmp_path / "t.md").read_text()
    assert "wmdp_bio: multiple-choice questions" in md and "25.0 / 26.0 / 27.0 / 28.0 %" in md
    assert "| *SPUL (paper, LLaMA-2-7B)* |" in md  # the paper's WMDP row under ours
    import csv

    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    ours = [r for r in rows if r["source"] == "ours"]
    assert {r["task"] for r in ours} == {"mcqa"} and ours[0]["test_forget_chance"] == "28.00"


def test_qa_recipe_runs_the_wmdp_bio_block(tmp_path):
    """scripts/table_qa.sh with a fake `python` that logs its arguments: every stage gets the dataset and task, and
    the table is the paper's Table 2 (whose rows include wmdp_bio)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "python").write_text('#!/bin/sh\necho "$*" >> "$FAKE_LOG"\n')
    (bin_dir / "python").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "OUT": str(tmp_path / "out"), "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "table_qa.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    stages = [c for c in calls if c.split()[0] in ("qlora.py", "spul.py", "baselines.py")]
    assert len(stages) == 6 and all("--dataset=wmdp_bio" in c and "--task=mcqa" in c for c in calls if c.startswith("qlora.py"))
    assert any(c.startswith("inference_spul.py --dataset=wmdp_bio") and "--task=mcqa" in c for c in calls)  # vanilla
    table = [c for c in calls if c.startswith("scripts/make_tables.py")]
    assert len(table) == 1 and "--paper=table2_llama2_7b" in table[0] and "table_qa/wmdp_bio" in table[0]
