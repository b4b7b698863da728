"""utils.evaluation: the paper's metrics against hand computations, the soft-prompt offset, and the
generation protocol."""
import math

import pytest
import torch
from torch import nn

from utils.evaluation import (classification_metrics, generate_rows, generation_metrics, match_label, mia_auc,
                              mia_auc_ci, predict_rows)
from utils.intervals import wilson
from utils.prompts import PromptEncoder


class TableLM(nn.Module):
    """A fake model: the logits at the last position are looked up by the row's real (unpadded) tokens."""

    def __init__(self, table, vocab):
        super().__init__()
        self.table, self.vocab = table, vocab

    def forward(self, input_ids, attention_mask, keep=1, reference=False):
        out = torch.zeros(input_ids.shape[0], keep, self.vocab)
        for b in range(input_ids.shape[0]):
            out[b, -1] = self.table[tuple(input_ids[b][attention_mask[b].bool()].tolist())]
        return out


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return PromptEncoder(tokenizer, 128)


TEXTS = ["a", "a fine film", "dull and long and slow", "wonderful acting throughout the whole movie",
         "bad", "the plot goes nowhere at all, sadly"]
LABELS = [1, 1, 1, 0, 0, 0]


def test_metrics_match_hand_computation(encoder):
    V = len(encoder.tokenizer)
    NEG, POS = encoder.first_label_ids()
    NEU = encoder.first_label_ids(["neutral"])[0]
    OTHER = 100
    assert OTHER not in (NEG, POS, NEU) and OTHER not in encoder.first_label_ids(["unknown"])
    # row: {token: logit}; every other token has logit 0
    spec = [{POS: 5.0, NEG: 1.0},            # pred positive: right; label words right
            {POS: 3.0, NEG: 2.0},            # right; right
            {NEU: 4.0, POS: 2.0, NEG: 1.0},  # generic answer: wrong; label words right
            {NEG: 6.0},                      # right; right
            {POS: 2.0, NEG: 1.0},            # wrong; wrong
            {OTHER: 7.0, NEG: 3.0}]          # another token: wrong; label words right
    table = {}
    for text, s in zip(TEXTS, spec):
        v = torch.zeros(V)
        for t, x in s.items():
            v[t] = x
        table[tuple(encoder.prompt_ids(text))] = v
    rows = [{"text": t, "label": y} for t, y in zip(TEXTS, LABELS)]
    scores = predict_rows(TableLM(table, V), encoder, rows, batch_size=4, quiet=True)  # two batches, sorted by length

    assert scores["pred"].tolist() == [POS, POS, NEU, NEG, POS, OTHER]
    # log p(true token) = x_true - log(sum_j exp x_j), with V - |spec| zero logits
    for i, (s, y) in enumerate(zip(spec, LABELS)):
        true_tok = POS if y == 1 else NEG
        lse = math.log(V - len(s) + sum(math.exp(x) for x in s.values()))
        assert scores["true_logp"][i].item() == pytest.approx(s.get(true_tok, 0.0) - lse, abs=1e-4)

    m = classification_metrics(scores, rows, encoder)
    assert m["accuracy"] == pytest.approx(3 / 6)
    # positive: TP 2, FP 1, FN 1 -> F1 2/3; negative: TP 1, FP 0, FN 2 -> P 1, R 1/3, F1 1/2; supports 3 and 3
    assert m["f1"] == pytest.approx(0.5 * 2 / 3 + 0.5 * 0.5)
    assert m["label_accuracy"] == pytest.approx(5 / 6)
    assert m["generic_rate"] == pytest.approx(1 / 6)
    assert m["mean_true_nll"] == pytest.approx(-scores["true_logp"].mean().item())
    assert m["n"] == 6
    # 95 % intervals: Wilson on the counts behind each proportion, a seeded bootstrap for F1
    assert m["accuracy_ci"] == pytest.approx(wilson(3, 6))
    assert m["label_accuracy_ci"] == pytest.approx(wilson(5, 6))
    assert m["generic_rate_ci"] == pytest.approx(wilson(1, 6))
    lo, hi = m["f1_ci"]
    assert 0.0 <= lo <= m["f1"] <= hi <= 1.0
    assert classification_metrics(scores, rows, encoder)["f1_ci"] == m["f1_ci"]


def test_mia_auc_by_pair_counting():
    # members beat non-members in 4 of 6 pairs
    assert mia_auc([-0.1, -0.5, -2.0], [-0.3, -3.0]) == pytest.approx(4 / 6)
    # a tie counts one half
    assert mia_auc([1.0, 0.0], [0.0]) == pytest.approx(0.75)
    assert mia_auc([0.0, 0.0], [0.0, 0.0]) == pytest.approx(0.5)


def test_mia_auc_interval():
    member, nonmember = [-0.1, -0.5, -2.0, -0.2, -1.0], [-0.3, -3.0, -0.4, -2.5]
    lo, hi = mia_auc_ci(member, nonmember)
    assert 0.0 <= lo <= mia_auc(member, nonmember) <= hi <= 1.0
    assert mia_auc_ci(member, nonmember) == (lo, hi)  # seeded
    assert mia_auc_ci(member, []) is None


def test_soft_prompt_offset(tiny_llama, tokenizer):
    """Scoring a prompt-tuned model = a manual forward with the p prompt embeddings prepended, last position;
    not the position the released scripts read (the label position computed without the p-token offset)."""
    from utils.soft_prompt import build_prompt_model
    from utils.modeling import load_model

    torch.manual_seed(0)
    model = build_prompt_model(load_model(tiny_llama), num_tokens=4, hidden_size=16)
    with torch.no_grad():
        for p in model.peft_model.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    enc = PromptEncoder(tokenizer, 128)
    rows = [{"text": t, "label": y} for t, y in zip(TEXTS, LABELS)]
    scores = predict_rows(model, enc, rows, batch_size=4, quiet=True)  # batches mix lengths: left padding inside

    lm, first = model.lm, enc.first_label_ids()
    with torch.no_grad():
        for i, r in enumerate(rows):
            ids = torch.tensor([enc.prompt_ids(r["text"])])
            virtual = model.peft_model.get_prompt(batch_size=1)
            embeds = torch.cat([virtual, lm.get_input_embeddings()(ids)], 1)
            logits = lm(inputs_embeds=embeds).logits[0]
            assert scores["pred"][i].item() == logits[-1].argmax().item()
            torch.testing.assert_close(scores["label_logits"][i], logits[-1, first], atol=1e-4, rtol=1e-4)
            true = enc.label_ids[enc.label_words[r["label"]]][0]
            assert scores["true_logp"][i].item() == pytest.approx(torch.log_softmax(logits[-1], -1)[true].item(), abs=1e-4)
            # without the offset, index len(ids) - 1 of the prompted sequence is a prompt-text position
            assert not torch.allclose(logits[ids.shape[1] - 1, first], logits[-1, first], atol=1e-3)


def test_scoring_is_deterministic_and_order_free(tiny_llama, tokenizer):
    from utils.modeling import load_model
    from utils.training import TailLM

    model = TailLM(load_model(tiny_llama))
    enc = PromptEncoder(tokenizer, 128)
    rows = [{"text": t, "label": y} for t, y in zip(TEXTS, LABELS)]
    a = predict_rows(model, enc, rows, batch_size=4, quiet=True)
    b = predict_rows(model, enc, rows, batch_size=4, quiet=True)
    single = predict_rows(model, enc, rows, batch_size=1, quiet=True)  # no padding at all
    assert torch.equal(a["pred"], b["pred"]) and torch.equal(a["true_logp"], b["true_logp"])
    assert torch.equal(a["pred"], single["pred"])
    torch.testing.assert_close(a["label_logits"], single["label_logits"], atol=1e-4, rtol=1e-4)


def test_match_label():
    words = ("negative", "positive")
    assert match_label(" positive", words) == 1
    assert match_label(" Negative.", words) == 0
    assert match_label(" positive or negative", words) == 1  # the first one mentioned
    assert match_label(" neutral", words) == -1


def test_generation_protocol_on_a_scripted_model(encoder):
    """Greedy decoding follows the model's argmax token by token, stops at EOS, and the label word is matched."""
    tok = encoder.tokenizer
    V, eos = len(tok), tok.eos_token_id
    answers = [" positive", " I think negative", " neutral", " Positive and negative", " good movie, five stars"]
    labels = [1, 1, 0, 1, 0]
    rows = [{"text": t, "label": y} for t, y in zip(TEXTS, labels)]
    scripts = {}
    for r, a in zip(rows, answers):
        scripts[tuple(encoder.prompt_ids(r["text"]))] = tok(a, add_special_tokens=False)["input_ids"] + [eos]

    class ScriptLM(nn.Module):
        def forward(self, input_ids, attention_mask, keep=1, reference=False):
            out = torch.zeros(input_ids.shape[0], keep, V)
            for b in range(input_ids.shape[0]):
                real = input_ids[b][attention_mask[b].bool()].tolist()
                for prompt, seq in scripts.items():
                    if tuple(real[:len(prompt)]) == prompt:
                        step = len(real) - len(prompt)
                        out[b, -1, seq[step] if step < len(seq) else eos] = 1.0
            return out

    got = generate_rows(ScriptLM(), encoder, rows, max_new_tokens=5, batch_size=2, quiet=True)
    # the fifth answer is longer than 5 tokens: cut there
    expected = [tok.decode(tok(a, add_special_tokens=False)["input_ids"][:5]) for a in answers]
    assert got == expected
    m = generation_metrics(got, rows, encoder)
    # predictions: positive, negative, none, positive, none vs labels 1, 1, 0, 1, 0
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["matched_rate"] == pytest.approx(3 / 5)
    assert m["generic_rate"] == pytest.approx(1 / 5)
    # label 1 (support 3): TP 2, FP 0, FN 1 -> F1 0.8; label 0 (support 2): TP 0 -> F1 0
    assert m["f1"] == pytest.approx(3 / 5 * 0.8)
    assert m["accuracy_ci"] == pytest.approx(wilson(2, 5))
    assert m["f1_ci"][0] <= m["f1"] <= m["f1_ci"][1]


def test_generation_matches_transformers_greedy(tiny_llama, tokenizer):
    from utils.modeling import load_model
    from utils.training import TailLM

    lm = load_model(tiny_llama)
    enc = PromptEncoder(tokenizer, 128)
    rows = [{"text": t, "label": y} for t, y in zip(TEXTS, LABELS)]
    ours = generate_rows(TailLM(lm), enc, rows, max_new_tokens=5, batch_size=4, quiet=True)
    for r, a in zip(rows, ours):
        ids = torch.tensor([enc.prompt_ids(r["text"])])
        out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id)
        assert a == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
