"""Inference-time baselines (prompting.py, utils/prompting.py, scripts/forget_terms.py): ICUL's context is the
task's template with the chosen examples, retrieval finds a forget query itself, the guardrail is its instruction
before the query, the filter leaves unflagged rows bit-identical, forget terms come from training rows alone, and
every method runs through inference_spul.py and make_tables.py."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, one_line_error, run_here, run_script, write_split_dir
from utils.cli import UserError
from utils.eco import FeatureLM, PromptClassifier, row_features
from utils.prompting import (GUARDRAIL, SEPARATOR, FilterLM, GuardrailLM, IculLM, PrefixedLM, example_ids,
                             start_tokens)
from utils.prompts import LeftPadCollator, PromptEncoder
from utils.training import TailLM

pytestmark = pytest.mark.usefixtures("one_thread")

# planted names: 'zorblat' and 'vexley' occur in forget rows only, 'quentin' in retain rows too
FORGET = [("zorblat was wonderful in this film", 1), ("zorblat was awful in this film", 0),
          ("quentin vexley made a dull film", 0), ("quentin vexley made a great film", 1),
          ("zorblat made a great film", 1), ("vexley was awful in this film", 0)]
RETAIN = [("quentin made a great film", 1), ("the cast was wonderful in this film", 1),
          ("the plot was awful in this film", 0), ("a dull film", 0), ("the ending made a great film", 1),
          ("the cast made a dull film", 0), ("the plot was wonderful", 1), ("quentin was awful", 0)]
TERMS = ["zorblat", "vexley"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_split_dir(tmp_path_factory.mktemp("planted") / "d", {
        "train_forget": FORGET, "train_retain": RETAIN,
        "test_forget": [("zorblat was dull", 0), ("vexley was great", 1), ("glimmerwick made a film", 1)],
        "test_retain": [("the cast was great", 1), ("a wonderful film", 1), ("the plot was dull", 0)]})


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_opt"])
def lm_enc(request):
    from utils.modeling import load_model, load_tokenizer

    path = request.getfixturevalue(request.param)
    lm = load_model(path).eval()
    return lm, PromptEncoder(load_tokenizer(path), 128)


def _rows(pairs):
    return [{"text": t, "label": y} for t, y in pairs]


def _batch(encoder, rows):
    return LeftPadCollator(encoder.tokenizer.pad_token_id)([{"input_ids": encoder.prompt_ids(r)} for r in rows])


def _template(encoder, row, word=None):
    """A row as the task writes it in text: head + body + cue, then ' ' + word and a blank line."""
    t = encoder.task
    text = t.head(row) + t.body(row, encoder.label_words) + t.cue
    return text if word is None else text + " " + word + SEPARATOR


def _real(ids, mask):
    return [t for t, m in zip(ids.tolist(), mask.tolist()) if m]


# ---------------------------------------------------------------- ICUL

def test_icul_context_is_the_template_with_the_chosen_examples(lm_enc):
    lm, enc = lm_enc
    tok, forget, retain = enc.tokenizer, _rows(FORGET), _rows(RETAIN[:2])
    answers = ["negative", "positive", "positive", "negative", "negative", "positive"]  # flipped
    index = row_features(FeatureLM(lm, enc.cue_ids), enc, forget, quiet=True)
    retain_ids = [t for r in retain for t in example_ids(enc, r, enc.label_words[r["label"]])]
    model = IculLM(lm, [example_ids(enc, r, a) for r, a in zip(forget, answers)], retain_ids, 1, enc.cue_ids,
                   len(start_tokens(tok)), tok.pad_token_id, index)
    queries = [forget[2], forget[0], _rows(RETAIN)[5]]
    b = _batch(enc, queries)
    ids, mask = model.build(b["input_ids"], b["attention_mask"])
    chosen = model.choose(b["input_ids"], b["attention_mask"])
    assert [c[0] for c in chosen[:2]] == [2, 0]
    for i, q in enumerate(queries):
        j = chosen[i][0]
        expected = (_template(enc, forget[j], answers[j]) + "".join(_template(enc, r, enc.label_words[r["label"]])
                                                                     for r in retain) + _template(enc, q))
        built = _real(ids[i], mask[i])
        assert tok.decode(built) == tok.decode(start_tokens(tok)) + expected
        # each example tokenised as the task tokenises a row with its completion, then the query's own ids
        n = len(start_tokens(tok))
        pieces = [enc.encode(forget[j], answers[j])["input_ids"][n:]] + [
            enc.encode(r, enc.label_words[r["label"]])["input_ids"][n:] for r in retain]
        sep = tok(SEPARATOR, add_special_tokens=False)["input_ids"]
        assert built == start_tokens(tok) + [t for p in pieces for t in p + sep] + enc.prompt_ids(q)[n:]
    with torch.no_grad():
        assert torch.equal(model(b["input_ids"], b["attention_mask"]), TailLM(lm)(ids, mask))


def test_retrieval_returns_a_forget_query_itself_first(lm_enc):
    lm, enc = lm_enc
    forget = _rows(FORGET)
    index = row_features(FeatureLM(lm, enc.cue_ids), enc, forget, quiet=True)
    examples = [example_ids(enc, r, "positive") for r in forget]
    model = IculLM(lm, examples, [], 3, enc.cue_ids, 0, enc.tokenizer.pad_token_id, index)
    b = _batch(enc, forget)  # one batch, padded to the longest row: features as in any other batch
    with torch.no_grad():
        assert [c[0] for c in model.choose(b["input_ids"], b["attention_mask"])] == list(range(len(forget)))
        # random retrieval: k different rows, the same for a query in any batch
        rand = IculLM(lm, examples, [], 3, enc.cue_ids, 0, enc.tokenizer.pad_token_id, None, seed=5)
        alone = _batch(enc, forget[1:2])
        together = rand.choose(b["input_ids"], b["attention_mask"])
        assert rand.choose(alone["input_ids"], alone["attention_mask"])[0] == together[1]
        assert all(len(set(c)) == 3 for c in together) and len({tuple(c) for c in together}) > 1


def test_context_goes_after_the_start_tokens():
    model = PrefixedLM(None, n_start=1, pad_id=0)
    model.contexts = lambda ids, mask: [[9, 9], [8]]
    ids, mask = model.build(torch.tensor([[5, 6, 7], [0, 5, 6]]), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    assert ids.tolist() == [[5, 9, 9, 6, 7], [0, 0, 5, 8, 6]] and mask.tolist() == [[1] * 5, [0, 0, 1, 1, 1]]


# ---------------------------------------------------------------- guardrail and filter

def test_guardrail_prompt_is_the_instruction_before_the_query(lm_enc):
    from utils.prompting import guardrail_text

    lm, enc = lm_enc
    tok = enc.tokenizer
    text = guardrail_text("neutral", enc.task, terms=TERMS)
    assert text == GUARDRAIL.format(target="any of these: zorblat, vexley", it="any of them", answer="neutral", what="text")
    assert text == ("### Instruction: You are a model that knows absolutely nothing about any of these: zorblat, vexley. "
                    "If the text is about any of them, answer \"neutral\". For everything else, answer as you would.\n\n")
    model = GuardrailLM(lm, tok(text, add_special_tokens=False)["input_ids"], len(start_tokens(tok)), tok.pad_token_id)
    queries = _rows(FORGET[:2] + RETAIN[:1])
    b = _batch(enc, queries)
    ids, mask = model.build(b["input_ids"], b["attention_mask"])
    for i, q in enumerate(queries):
        assert tok.decode(_real(ids[i], mask[i])) == tok.decode(start_tokens(tok)) + text + _template(enc, q)


def test_guardrail_shared_instruction_gives_the_longer_inputs_logits(lm_enc):
    """The start tokens + instruction run once as past keys/values: the same logits as every row carrying them
    (float64, so agreement is to 1e-10, not float32 rounding), and computed once for a frozen model."""
    from utils.prompting import guardrail_text

    lm, enc = lm_enc
    tok = enc.tokenizer
    lm64 = type(lm)(lm.config).double().eval()
    lm64.load_state_dict(lm.state_dict())
    instruction = tok(guardrail_text("neutral", enc.task, terms=TERMS), add_special_tokens=False)["input_ids"]
    shared = GuardrailLM(lm64, instruction, len(start_tokens(tok)), tok.pad_token_id)
    full = GuardrailLM(lm64, instruction, len(start_tokens(tok)), tok.pad_token_id, shared_prefix=False)
    b = _batch(enc, _rows(FORGET[:3] + RETAIN[:3]))
    calls = []
    with torch.no_grad():
        ids, mask = full.build(b["input_ids"], b["attention_mask"])
        want = TailLM(lm64)(ids, mask, keep=2)
        assert torch.equal(full(b["input_ids"], b["attention_mask"], keep=2), want)
        lm64.get_input_embeddings().register_forward_hook(lambda m, inp, out: calls.append(inp[0]))
        got = shared(b["input_ids"], b["attention_mask"], keep=2)
        again = shared(b["input_ids"][:2], b["attention_mask"][:2], keep=2)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-10, rtol=0)
    assert torch.allclose(again, want[:2], atol=1e-10, rtol=0)
    # the prefix once (a batch of one: start tokens + instruction), then each batch's queries
    assert [c.shape[0] for c in calls] == [1, 6, 2]
    assert calls[0][0].tolist() == start_tokens(tok) + instruction


class SumScore:
    def decision_function(self, x):
        return np.asarray(x).sum(1)


@pytest.mark.parametrize("gate", ["keywords", "classifier"])
def test_filter_keeps_unflagged_rows_and_refuses_flagged_ones(lm_enc, gate):
    lm, enc = lm_enc
    generic = enc.label_ids["neutral"][0]
    rows = _rows(FORGET + RETAIN)
    if gate == "keywords":
        gated = dict(terms=TERMS)
    else:  # a stand-in classifier that flags half the rows
        median = np.median(SumScore().decision_function(row_features(FeatureLM(lm, enc.cue_ids), enc, rows, quiet=True)))
        gated = dict(classifier=PromptClassifier(SumScore(), median))
    model = FilterLM(lm, generic, enc.cue_ids, enc.tokenizer, **gated)
    b = _batch(enc, rows)
    for keep in (1, 3):
        with torch.no_grad():
            out = model(b["input_ids"], b["attention_mask"], keep=keep)
            plain = TailLM(lm)(b["input_ids"], b["attention_mask"], keep=keep)
        flags = model.last_flags
        if gate == "keywords":  # exactly the rows naming a planted forget-only name
            assert flags.tolist() == [any(t in r["text"] for t in TERMS) for r in rows]
        assert flags.any() and (~flags).any()
        assert torch.equal(out[~flags], plain[~flags])
        assert (out[flags].argmax(-1) == generic).all()
    if gate == "keywords":  # a term is looked for in the query's text, never in the template's own words
        model.terms = ["sentiment", "text"]
        with torch.no_grad():
            model(b["input_ids"], b["attention_mask"])
        assert not model.last_flags.any()


# ---------------------------------------------------------------- scripts/forget_terms.py

def test_forget_terms_finds_planted_names_from_training_files_alone(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import forget_terms

    # no test file at all: reading one would be an error
    d = write_split_dir(tmp_path / "train_only", {"train_forget": FORGET, "train_retain": RETAIN})
    out = tmp_path / "terms.txt"
    run_here(forget_terms, "--data_dir", d, "--min_rows", 2, "--output", out)
    assert out.read_text().split("\n") == ["vexley", "zorblat", ""]  # not "quentin": retain rows have it too
    assert "3  zorblat" in capsys.readouterr().out
    with pytest.raises(UserError, match="exists"):
        run_here(forget_terms, "--data_dir", d, "--min_rows", 2, "--output", out)
    run_here(forget_terms, "--data_dir", d, "--min_rows", 2, "--top", 1, "--output", out, "--overwrite")  # when asked
    assert out.read_text().split("\n") == ["vexley", ""]


# ---------------------------------------------------------------- prompting.py: bad input and end to end

def _prompting(data_dir, model, out, *extra):
    import prompting

    run_here(prompting, "--model_checkpoints", model, "--data_dir", data_dir, "--max_length", 128,
             "--output_path", out, "--quiet", *extra)


def test_bad_input_is_a_one_line_error(tmp_path, tiny_llama, data_dir, capsys):
    empty, terms, none = tmp_path / "empty.txt", tmp_path / "terms.txt", tmp_path / "none.txt"
    empty.write_text("\n  \n")
    terms.write_text("zorblat\nglimmerwick\n")
    none.write_text("glimmerwick\n")
    cases = [(("--method", "guardrail", "--forget_terms", empty), "holds no term"),
             (("--method", "guardrail", "--forget_terms", terms, "--forget_description", "x"), "not both"),
             (("--method", "guardrail", "--forget_terms", none), "no train_forget row contains a term"),
             (("--method", "icul", "--forget_terms", terms), "takes no --forget_terms"),
             (("--method", "filter", "--filter_gate", "classifier", "--forget_terms", terms), "takes no --forget_terms"),
             (("--method", "filter", "--forget_description", "x"), "matches --forget_terms, not a description"),
             (("--method", "icul", "--icul_k", 7), "--icul_k 7 exceeds the 6 train_forget rows"),
             (("--method", "icul", "--icul_l", 9), "--icul_l 9 exceeds the 8 train_retain rows"),
             (("--method", "icul", "--icul_l", 6), r"more than --max_length 128: 4 of these examples fit")]
    for args, message in cases:
        with pytest.raises(UserError, match=message):
            _prompting(data_dir, tiny_llama, tmp_path / "out", *args)
    _prompting(data_dir, tiny_llama, tmp_path / "partly", "--method", "guardrail", "--forget_terms", terms)
    assert "warning: 1 of the 2 terms match no train_forget row: glimmerwick" in capsys.readouterr().err
    p = run_script("prompting.py", "--method", "filter", "--model_checkpoints", tiny_llama, "--data_dir", data_dir,
                   "--forget_terms", empty, check=False)
    assert "holds no term" in one_line_error(p)


def test_every_method_through_inference_and_tables(tmp_path, tiny_llama, data_dir):
    import inference_spul

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_tables

    terms = tmp_path / "terms.txt"
    terms.write_text("\n".join(TERMS) + "\n")
    runs = {"icul": ("--method", "icul", "--icul_l", 2),
            "icul_random_generic": ("--method", "icul", "--icul_l", 1, "--icul_k", 2, "--icul_retrieval", "random",
                                    "--icul_label", "generic"),
            "guardrail": ("--method", "guardrail", "--forget_terms", terms),
            "guardrail_description": ("--method", "guardrail", "--forget_description", "the films of zorblat"),
            "filter": ("--method", "filter", "--forget_terms", terms),
            "filter_classifier": ("--method", "filter", "--filter_gate", "classifier", "--holdout_fraction", 0.5,
                                  "--target_fpr", 0.2)}
    results = {}
    for name, args in runs.items():
        _prompting(data_dir, tiny_llama, tmp_path / name, *args)
        run_here(inference_spul, "--model_checkpoints", tmp_path / name, "--quiet")
        with open(tmp_path / name / "results.json") as f:
            results[name] = json.load(f)
        with open(tmp_path / name / "arguments.json") as f:
            assert json.load(f)["stage"] == "prompting"
    run_here(inference_spul, "--model_checkpoints", tiny_llama, "--data_dir", data_dir, "--max_length", 128, "--quiet",
             "--generate", "false", "--output_path", tmp_path / "vanilla")
    with open(tmp_path / "vanilla" / "results.json") as f:
        vanilla = json.load(f)
    assert [results[n]["method"] for n in runs] == ["icul", "icul", "guardrail", "guardrail", "filter",
                                                   "filter_classifier"]
    # the keyword filter refuses every forget row naming a planted name, and answers retain rows as the plain model
    m = results["filter"]["metrics"]
    assert m["train_forget"]["generic_rate"] == 1.0 and m["test_forget"]["generic_rate"] == pytest.approx(2 / 3)
    for split in ("train_retain", "test_retain"):
        assert m[split]["accuracy"] == vanilla["metrics"][split]["accuracy"] and m[split]["generic_rate"] == 0
    with open(tmp_path / "icul" / "prompting.json") as f:
        cost = json.load(f)["cost"]
    assert cost["input_ratio"] > 2  # one forget and two retain examples before each query
    run_here(make_tables, tmp_path, "--output_path", tmp_path / "tables" / "t")
    table = (tmp_path / "tables" / "t.md").read_text()
    assert all(name in table for name in ("icul", "guardrail", "filter", "filter_classifier"))


# ---------------------------------------------------------------- multiple-choice questions

QA_ROW = {"question": "Which gas do plants take in?", "choices": ["Oxygen", "Carbon dioxide", "Helium", "Neon"], "label": 1}


def test_mcqa_examples_are_the_question_template_with_a_changed_letter(tokenizer):
    from utils.prompting import forget_answers

    enc = PromptEncoder(tokenizer, 256, task="mcqa")
    last = {**QA_ROW, "label": 3}
    two = {"question": "Is the sun a star?", "choices": ["Yes", "No"], "label": 1}
    # the flip stays among a question's own letters; the generic answer is the task's
    assert forget_answers(enc, [QA_ROW, last, two]) == ["C", "A", "A"]
    assert forget_answers(enc, [QA_ROW], "generic") == ["unknown"]
    text = ("### Question: Which gas do plants take in?\n\n### Choices:\nA. Oxygen\nB. Carbon dioxide\nC. Helium\n"
            "D. Neon\n\n### Answer: C\n\n")
    assert tokenizer.decode(example_ids(enc, QA_ROW, "C")) == text


def _qa(n, topic, seed):
    import random

    rng = random.Random(seed)
    return [{"question": f"Question {i} about {topic}: which option is right?",
             "choices": [f"option {rng.randint(0, 99)}" for _ in range((2, 3, 4)[i % 3])], "answer": i % 2}
            for i in range(n)]


def test_mcqa_methods_through_inference(tmp_path, tiny_llama):
    import pandas as pd

    import inference_spul

    d = tmp_path / "qa"
    d.mkdir()
    splits = {"train_forget": _qa(6, "the influenza virus", 1), "train_retain": _qa(8, "the solar system", 2),
              "test_forget": _qa(4, "the influenza virus", 3), "test_retain": _qa(4, "the solar system", 4)}
    for split, rows in splits.items():
        pd.DataFrame(rows).to_json(d / f"{split}.jsonl", orient="records", lines=True)
    terms = tmp_path / "terms.txt"
    terms.write_text("influenza\n")
    runs = {"icul": ("--method", "icul", "--icul_l", 1),
            "guardrail": ("--method", "guardrail", "--forget_description", "viruses"),
            "filter": ("--method", "filter", "--forget_terms", terms)}
    for name, args in runs.items():
        _prompting(d, tiny_llama, tmp_path / name, "--task", "mcqa", "--max_length", 256, *args)
        run_here(inference_spul, "--model_checkpoints", tmp_path / name, "--quiet")
    res = {n: json.load(open(tmp_path / n / "results.json")) for n in runs}
    assert all(r["task"] == "mcqa" for r in res.values()) and [r["method"] for r in res.values()] == list(runs)
    with open(tmp_path / "guardrail" / "prompting.json") as f:
        assert "nothing about viruses. If the question is about it, answer \"unknown\"" in json.load(f)["instruction"]
    m = res["filter"]["metrics"]
    assert m["train_forget"]["generic_rate"] == m["test_forget"]["generic_rate"] == 1.0
    assert m["train_retain"]["generic_rate"] == m["test_retain"]["generic_rate"] == 0.0


def test_a_qlora_folder_is_the_start_model(tmp_path, tiny_qlora, tiny_llama, sst2_dir):
    """A prompting folder on a qlora.py model loads the merged model through utils.stages, like every stage."""
    from utils.modeling import load_merged_model
    from utils.stages import load_stage

    _prompting(sst2_dir, tiny_qlora, tmp_path / "g", "--method", "guardrail", "--forget_description", "some actors",
               "--max_length", 64)
    model, tok, info = load_stage(str(tmp_path / "g"))
    assert (info["method"], info["model"], info["parent"]) == ("guardrail", tiny_llama, tiny_qlora)
    assert info["arguments"]["max_length"] == 64 and isinstance(model, GuardrailLM)
    enc = PromptEncoder(tok, 64)
    b = _batch(enc, [{"text": "a fine film", "label": 1}])
    merged, _ = load_merged_model(tiny_qlora)
    model.shared_prefix = False  # the longer input, so that the merged model's logits compare bit for bit
    with torch.no_grad():
        assert torch.equal(model(b["input_ids"], b["attention_mask"]),
                           TailLM(merged.eval())(*model.build(b["input_ids"], b["attention_mask"])))
