"""Membership-inference scores (utils/membership.py): each score against a hand computation from the plain model's
full-sequence logits, the text tokens they read, left padding, the AUC table and privleak."""
import math
import zlib

import numpy as np
import pytest
import torch

from utils.cli import UserError
from utils.membership import (SCORES, lowest_k_mean, membership_aucs, privleak, row_scores, text_span,
                              token_logprobs)
from utils.prompts import PromptEncoder
from utils.modeling import load_model
from utils.soft_prompt import build_prompt_model
from utils.stages import load_stage

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread

TEXTS = ["a", "a fine film", "dull and long and slow, with jokes that fall flat one after another",
         "wonderful acting throughout the whole movie"]
ROWS = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)]
MCQA = [{"question": "Which planet is known as the red planet?", "choices": ["Venus", "Mars", "Jupiter"], "label": 1}]
# fp32 rounding over a forward pass, relative to the scale of what is compared (the log-probs' largest magnitude)
F32 = 64 * torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def stage(tiny_llama):
    return load_stage(tiny_llama)


@pytest.fixture(scope="module")
def encoder(stage):
    return PromptEncoder(stage.tokenizer, 96)


def hand_text_positions(tokenizer, task, row, prompt):
    """Indices of the prompt's text tokens found another way: the head's tokens whose characters reach into the
    text (the fast tokenizer's offsets), on a row whose head is not cut."""
    head = task.head(row)
    enc = tokenizer(head, return_offsets_mapping=True)
    assert prompt[:len(enc["input_ids"])] == enc["input_ids"]
    return [j for j, (_, end) in enumerate(enc["offset_mapping"]) if end > len(task.head_prefix)]


def hand_stats(lm, prompt, positions):
    """log p of each text token, μ = Σ p log p and σ² = Σ p (log p)² − μ², from the full-sequence logits in float64."""
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([prompt])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[[j - 1 for j in positions]]
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * logp.square()).sum(-1) - mu.square()
    tok = logp[torch.arange(len(positions)), torch.tensor([prompt[j] for j in positions])]
    return tok.numpy(), mu.numpy(), var.sqrt().numpy()


def close(actual, expected, scale):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=F32 * scale)


@pytest.mark.parametrize("k", [20, 50])
def test_every_score_equals_a_hand_computation(stage, encoder, k):
    stats = token_logprobs(stage.model, encoder, ROWS, batch_size=len(ROWS), quiet=True)  # one left-padded batch
    scores = row_scores(stats, k)
    assert set(scores) == set(SCORES)
    for i, row in enumerate(ROWS):
        prompt = encoder.prompt_ids(row)
        positions = hand_text_positions(encoder.tokenizer, encoder.task, row, prompt)
        logp, mu, sigma = hand_stats(stage.model.lm, prompt, positions)
        scale = np.abs(logp).max()
        n_low = max(1, math.floor(len(logp) * k / 100))
        z = (logp - mu) / sigma
        close(stats[i].logp, logp, scale)
        close(scores["loss"][i], logp.mean(), scale)
        close(scores["zlib"][i], logp.mean() / len(zlib.compress(row["text"].encode("utf-8"))), scale)
        close(scores["min_k"][i], np.sort(logp)[:n_low].mean(), scale)
        close(scores["min_k_plus_plus"][i], np.sort(z)[:n_low].mean(), scale / sigma.min())


def test_left_padding_does_not_change_a_rows_scores(stage, encoder):
    lengths = {len(encoder.prompt_ids(r)) for r in ROWS}
    assert len(lengths) == len(ROWS)  # every row padded differently in the batch
    batched = token_logprobs(stage.model, encoder, ROWS, batch_size=len(ROWS), quiet=True)
    alone = [token_logprobs(stage.model, encoder, [row], batch_size=1, quiet=True)[0] for row in ROWS]
    b_scores, a_scores = row_scores(batched), row_scores(alone)
    for i, (b, a) in enumerate(zip(batched, alone)):
        assert b.ids.tolist() == a.ids.tolist()
        scale = np.abs(a.logp).max()
        for field in ("logp", "mu", "sigma"):
            close(getattr(b, field), getattr(a, field), scale)
        for name in ("loss", "zlib", "min_k"):
            close(b_scores[name][i], a_scores[name][i], scale)
        close(b_scores["min_k_plus_plus"][i], a_scores["min_k_plus_plus"][i], scale / a.sigma.min())


def test_a_soft_prompt_model_scores_its_text_after_its_virtual_tokens(stage, encoder, tiny_llama):
    """The soft prompt goes before the prompt inside the model: the text's positions are counted from the end."""
    torch.manual_seed(0)
    model = build_prompt_model(load_model(tiny_llama), 5, 16)
    with torch.no_grad():
        for q in model.peft_model.prompt_encoder.parameters():
            q.add_(torch.randn_like(q) * 0.5)  # off its initialisation, so that the prompt matters
    model.eval()
    stats = token_logprobs(model, encoder, ROWS, batch_size=len(ROWS), quiet=True)
    plain = token_logprobs(stage.model, encoder, ROWS, batch_size=len(ROWS), quiet=True)
    for row, s, p in zip(ROWS, stats, plain):
        prompt, start, end, _ = text_span(encoder, row)
        with torch.no_grad():  # every position of the row alone, unpadded
            logp = torch.log_softmax(model(torch.tensor([prompt]), torch.ones(1, len(prompt)), keep=len(prompt))[0]
                                     .double(), -1)
        hand = logp[torch.arange(start - 1, end - 1), torch.tensor(prompt[start:end])].numpy()
        close(s.logp, hand, np.abs(hand).max())
        assert np.abs(s.logp - p.logp).max() > 10 * F32 * np.abs(hand).max()  # the soft prompt changed them


def test_the_tokens_scored_are_exactly_the_text(stage, encoder):
    tok = encoder.tokenizer
    stats = token_logprobs(stage.model, encoder, ROWS, quiet=True)
    for row, s in zip(ROWS, stats):
        prompt, start, end, text = text_span(encoder, row)
        assert text == row["text"] and s.text == row["text"]
        assert prompt[start:end] == s.ids.tolist()
        assert tok.decode(s.ids) in (row["text"], " " + row["text"])  # the first may carry the prefix's space
        assert tok.decode(prompt[:start], skip_special_tokens=True).strip() == encoder.task.head_prefix.strip()
        assert tok.decode(prompt[end:]) == encoder.task.cue
    # mcqa: the question, not its choices
    mcqa = PromptEncoder(tok, 96, task="mcqa")
    prompt, start, end, text = text_span(mcqa, MCQA[0])
    assert tok.decode(prompt[start:end]).strip() == MCQA[0]["question"] == text
    assert tok.decode(prompt[end:]).startswith("\n\n### Choices:")
    # a head cut by --max_length: the kept part of the text only, and zlib compresses what was kept
    short = PromptEncoder(tok, 30)
    prompt, start, end, text = text_span(short, ROWS[2])
    assert len(prompt) == 30 - short.longest_label and 0 < len(text) < len(ROWS[2]["text"]) and ROWS[2]["text"].startswith(text)
    assert tok.decode(prompt[start:end]).strip() == text


def test_a_row_without_text_is_a_clear_error(encoder):
    with pytest.raises(UserError, match="no text tokens"):
        text_span(encoder, {"text": "", "label": 0})


def test_lowest_k_mean_takes_at_least_one_value():
    assert lowest_k_mean([3.0, 1.0, 2.0], 20) == 1.0  # 20 % of 3 is 0.6: one value
    assert lowest_k_mean(np.arange(10.0)[::-1], 20) == 0.5  # the two lowest of ten
    assert lowest_k_mean([4.0, -1.0, 2.0, 0.0], 50) == -0.5


def test_auc_table_against_a_hand_count():
    members = {"loss": [3.0, 2.0, 2.0, 4.0], "zlib": [0.0, 0.0, 1.0, 1.0]}
    nonmembers = {"loss": [1.0, 2.0, 5.0], "zlib": [1.0, 1.0, 1.0]}
    # loss: 3 beats 1, 2 (2 pairs); each 2 beats 1 and ties 2 (1.5 each); 4 beats 1, 2 (2): 7 of 12 pairs.
    # zlib: the members' 1s tie all three (3 · ½ each), their 0s lose: 3 of 12
    table = membership_aucs(members, nonmembers)
    assert table["loss"]["auc"] == pytest.approx(7 / 12) and table["zlib"]["auc"] == pytest.approx(3 / 12)
    for name, cell in table.items():
        lo, hi = cell["auc_ci"]
        assert lo <= cell["auc"] <= hi and lo < hi
        assert membership_aucs(members, nonmembers)[name]["auc_ci"] == cell["auc_ci"]  # seeded


def test_privleak_follows_open_unlearning():
    # ((1 - 0.8) - (1 - 0.6)) / (1 - 0.6) · 100: the unlearned model still tells members apart better
    assert privleak(0.8, 0.6) == pytest.approx(-50.0)
    assert privleak(0.5, 0.6) == pytest.approx(25.0)
    assert privleak(0.6, 0.6) == 0
    assert privleak(1.0, 0.5) == pytest.approx(-100.0)
    assert privleak(0.7, 1.0) is None and privleak(None, 0.5) is None
