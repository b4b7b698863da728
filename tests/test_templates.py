"""Held-out prompt templates (utils/tasks.py): reworded queries no training stage may write, and the instruction
attack's template. Each differs from the training template, puts the label where the scorer reads it, is refused
by every training path, leaves the training template's ids as they were, and moves the prompt end that ECO, ICUL
and the filters look for."""
import importlib.util
import os
import re

import pytest
import torch

from conftest import ROOT
from utils.cli import UserError
from utils.eco import Corruption, EcoLM, follow_template, prompt_mask, row_features, search_strength
from utils.evaluation import predict_rows
from utils.prompting import FilterLM, IculLM, example_ids
from utils.prompts import LeftPadCollator, PromptEncoder, cue_ids, label_token_ids
from utils.tasks import INSTRUCTION, INSTRUCTION_TEXT, TRAINING, get_task, held_out_templates

ROWS = {
    "sentiment": [{"text": "a gripping story .", "label": 1},
                  {"text": "the plot is thin , but the acting is n't bad", "label": 1},
                  {"text": "it 's a dull , lifeless film that never finds its footing .", "label": 0}],
    "mcqa": [{"question": "What is the boiling point of water at sea level?", "choices": ["100 C", "50 C", "0 C"],
              "label": 0},
             {"question": "Which gas do plants take in?",
              "choices": ["Oxygen.", "Carbon dioxide.", "Helium (a noble gas).", "Argon"], "label": 1}],
}
TASKS = ("sentiment", "mcqa")
# every template that is not the training one: (task, name)
OTHERS = [(t, n) for t in TASKS for n in held_out_templates(t) + (INSTRUCTION,)]


def _text(task, row, template, words):
    """A row as the template writes it in text, then ' ' + its label word: what a reader of the prompt sees."""
    t = get_task(task)
    return t.head(row, template) + t.body(row, words, template) + template.cue + " " + words[row["label"]]


def test_each_task_has_five_held_out_templates_unlike_its_training_one():
    for task in TASKS:
        t = get_task(task)
        names = held_out_templates(task)
        assert len(names) >= 5 and len(set(names)) == len(names) and not {TRAINING, INSTRUCTION} & set(names)
        texts = {n: [_text(task, r, t.template(n), t.label_words) for r in ROWS[task]] for n in (TRAINING,) + names}
        for n in names:  # no two templates write any row alike
            assert all(texts[n][i] not in [texts[m][i] for m in texts if m != n] for i in range(len(ROWS[task])))
        # the instruction template is the training one with the attack's sentence first (and mcqa's prefill)
        att = t.template(INSTRUCTION)
        assert att.head_prefix == INSTRUCTION_TEXT + t.head_prefix and att.cue.startswith(t.cue)
        assert (att.cue != t.cue) == (task == "mcqa")
    assert get_task("mcqa").template(INSTRUCTION).cue.endswith("The correct answer is")
    with pytest.raises(UserError, match="no prompt template 'nope'"):
        PromptEncoder(None, 64, template="nope")


@pytest.mark.parametrize("task,name", OTHERS)
def test_the_label_follows_the_templates_cue_where_the_scorer_reads_it(tokenizer, task, name):
    """The prompt's ids are the whole text's, and the label word's ids (tokenised in context after this template's
    cue) are exactly the tokens after the prompt: predict_rows reads the logits at the prompt's last position."""
    enc = PromptEncoder(tokenizer, 1024, task=task, template=name)
    t = get_task(task)
    assert enc.template is t.template(name) and enc.cue_ids == cue_ids(tokenizer, task, name)
    for row in ROWS[task]:
        prompt = enc.prompt_ids(row)
        assert prompt[-len(enc.cue_ids):] == enc.cue_ids  # the cue ECO looks for ends the prompt
        for word in enc.label_words[:t.n_valid(row, len(enc.label_words))]:
            whole = tokenizer(_text(task, {**row, "label": enc.label_words.index(word)}, enc.template,
                                    enc.label_words))["input_ids"]
            assert whole == prompt + enc.label_ids[word]
            assert enc.label_ids[word] == label_token_ids(tokenizer, word, enc.template.cue)
            assert tokenizer.decode(enc.label_ids[word]) == " " + word
    # the scorer's true token for a row is its label's first token after this cue
    assert enc.first_label_ids() == [label_token_ids(tokenizer, w, enc.template.cue)[0] for w in enc.label_words]


@pytest.mark.parametrize("task", TASKS)
def test_the_training_template_keeps_its_ids(tokenizer, task):
    """template=None, 'training' and the encoder as it was built before templates existed write the same ids: the
    paper's texts, spelled out here."""
    row = ROWS[task][0]
    written = {"sentiment": "### Text: a gripping story .\n\n### Question: What is the sentiment of the given text?"
                            "\n\n### Sentiment: positive",
               "mcqa": "### Question: What is the boiling point of water at sea level?\n\n### Choices:\nA. 100 C\n"
                       "B. 50 C\nC. 0 C\n\n### Answer: A"}[task]
    ids = tokenizer(written)["input_ids"]
    for enc in (PromptEncoder(tokenizer, 1024, task=task), PromptEncoder(tokenizer, 1024, task=task, template=TRAINING)):
        word = enc.label_words[row["label"]]
        assert enc.encode(row, word)["input_ids"] == ids
        assert enc.cue_ids == cue_ids(tokenizer, task)
        assert enc.label_ids[word] == label_token_ids(tokenizer, word, get_task(task).cue)


@pytest.mark.parametrize("task,name", OTHERS)
def test_every_training_path_refuses_a_held_out_template(tokenizer, task, name):
    enc = PromptEncoder(tokenizer, 1024, task=task, template=name)
    row = ROWS[task][0]
    calls = {"encode": lambda: enc.encode(row, enc.label_words[0]),            # qlora, spul, baselines
             "encode_rows": lambda: enc.encode_rows(ROWS[task], completion="generic"),
             "row_features": lambda: row_features(None, enc, ROWS[task]),        # eco.py's and the filter's gate
             "search_strength": lambda: search_strength(None, enc, ROWS[task], 0.1, 1.0),  # eco.py's σ
             "example_ids": lambda: example_ids(enc, row, enc.label_words[0])}   # ICUL's context
    for what, call in calls.items():
        with pytest.raises(UserError, match=f"'{name}' is held out"):
            call()
    # the training template passes the same guard
    PromptEncoder(tokenizer, 1024, task=task).encode(row, "A" if task == "mcqa" else "positive")


@pytest.mark.parametrize("script", ["qlora.py", "spul.py", "baselines.py", "eco.py", "prompting.py"])
def test_no_training_script_has_a_template_flag(script, capsys):
    spec = importlib.util.spec_from_file_location(f"script_{script[:-3]}", os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    flags = re.findall(r"--[\w-]+", capsys.readouterr().out)
    assert "--max_length" in flags and not [f for f in flags if "template" in f]


@pytest.fixture(scope="module")
def lm(tiny_llama):
    from utils.modeling import load_model

    return load_model(tiny_llama).eval()


def _scored_batch(enc, rows):
    """Rows with their label appended (teacher-forced scoring) and the prompt lengths."""
    items = [{"input_ids": enc.prompt_ids(r) + enc.label_ids[enc.label_words[r["label"]]]} for r in rows]
    return LeftPadCollator(enc.tokenizer.pad_token_id)(items), [len(enc.prompt_ids(r)) for r in rows]


@pytest.mark.parametrize("task", TASKS)
def test_ecos_prompt_mask_follows_the_encoders_template(lm, tokenizer, task):
    """ECO is built with the training template's cue (load_eco_model); scored with another template its gate must
    end the prompt at that template's cue, not at a training cue inside the prompt (mcqa's prefill) or nowhere (the
    label would count as prompt). predict_rows sets it; the training template gives the same ids back."""
    eco = EcoLM(lm, Corruption("rand_noise_first_n", 0.5), cue_ids(tokenizer, task), mode="all")
    followed_a_change = False
    for name in held_out_templates(task) + (INSTRUCTION,):
        enc = PromptEncoder(tokenizer, 1024, task=task, template=name)
        batch, lengths = _scored_batch(enc, ROWS[task])
        ids, am = batch["input_ids"], batch["attention_mask"]
        before = prompt_mask(ids, am, eco.cue).sum(1).tolist()
        followed_a_change |= before != lengths
        with torch.no_grad():
            predict_rows(eco, enc, ROWS[task][:1], quiet=True)
            _, _, pmask = eco.features(ids, am)
        assert eco.cue == enc.cue_ids and pmask.sum(1).tolist() == lengths
        # exactly the prompt's positions: the last real ones before the label
        for i, n in enumerate(lengths):
            real = am[i].nonzero().squeeze(-1)
            assert pmask[i].nonzero().squeeze(-1).tolist() == real[:n].tolist()
    assert followed_a_change  # the training cue alone would have marked another prompt end
    training = PromptEncoder(tokenizer, 1024, task=task)
    predict_rows(eco, training, ROWS[task][:1], quiet=True)
    assert eco.cue == cue_ids(tokenizer, task)


def test_icul_and_the_filter_follow_the_template(lm, tokenizer):
    """ICUL's retrieval and the filters find the prompt by the cue too; the keyword gate also leaves the template's
    own words out of a query's text (the held-out 'review_question' template says 'review', the rows do not)."""
    enc = PromptEncoder(tokenizer, 1024, template="review_question")
    train = PromptEncoder(tokenizer, 1024)
    generic = train.label_ids["neutral"][0]
    icul = IculLM(lm, [[1, 2]], [], 1, train.cue_ids, 0, tokenizer.pad_token_id)
    assert follow_template(icul, enc).cue == enc.cue_ids != train.cue_ids
    gate = FilterLM(lm, generic, train.cue_ids, tokenizer, terms=["review"])
    rows = ROWS["sentiment"]
    with torch.no_grad():
        predict_rows(gate, enc, rows, quiet=True)
    assert gate.cue == enc.cue_ids and not gate.last_flags.any()
    gate.terms = ["gripping"]  # a word of a row's own text is still found
    with torch.no_grad():
        predict_rows(gate, enc, rows, quiet=True)
    assert gate.last_flags.tolist() == ["gripping" in r["text"] for r in rows]


def test_the_docs_list_every_template():
    """docs/audit_templates.md shows each template written out on the doc's example row."""
    with open(os.path.join(ROOT, "docs", "audit_templates.md"), encoding="utf-8") as f:
        doc = f.read()
    for task in TASKS:
        t = get_task(task)
        for name in (TRAINING,) + held_out_templates(task) + (INSTRUCTION,):
            assert f"`{name}`" in doc and _text(task, ROWS[task][0], t.template(name), t.label_words) in doc, name
