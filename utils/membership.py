"""Membership-inference scores on a row's own text: does the model remember having been trained on it?

utils/evaluation.py's `mia_auc` scores a row by the log-likelihood of its label's first token only. The scores here
read every token of the row's text (sentiment: the review; mcqa: the question) as it stands in the row's prompt,
which is what a model that memorised its training rows is most likely to give away. Every score is "higher =
more likely a member", so the AUC of train_forget (members) against test_forget (non-members) is above 0.5 when
the model still tells its training rows apart, as in utils/evaluation.py and open-unlearning.

With log p(x_t) the log-probability of the row's text token x_t given everything before it in the prompt:

- loss: the mean of log p(x_t) over the text tokens (the negative of the LOSS attack's mean NLL;
  Yeom et al. 2018, "Privacy risk in machine learning", CSF).
- zlib: mean log p(x_t) / len(zlib.compress(text.encode("utf-8"))), Python's zlib at its default level: the loss
  normalised by the text's zlib entropy in bytes, so that texts that are merely easy to predict (repetitive)
  score lower (Carlini et al. 2021, "Extracting training data from large language models", USENIX Security:
  the ratio of the log-perplexity to the zlib entropy; the sign flipped so that higher means member, as
  open-unlearning's mia_zlib does with its average loss). The mean, not the sum, as the log-perplexity is.
- min_k: the mean of the lowest k % of the log p(x_t), k = 20 by default, at least one token: members have
  fewer surprising tokens (Shi et al. 2024, "Detecting pretraining data from large language models", ICLR).
- min_k_plus_plus: per position z_t = (log p(x_t) − μ_t) / σ_t with μ_t = Σ_v p_t(v) log p_t(v) and
  σ_t² = Σ_v p_t(v) (log p_t(v))² − μ_t², the mean and variance of log p over the vocabulary under the model's
  own distribution p_t at that position; then the mean of the lowest k % of the z_t (Zhang et al. 2024,
  "Min-K%++: improved baseline for detecting pre-training data from large language models", ICLR 2025). A
  training row sits at a local maximum of the likelihood, so its tokens stand high in their position's
  distribution.

k % of n tokens is floor(n · k / 100), at least 1 (the reference implementations' int(n · ratio)).

`privleak` compares an unlearned model's AUC with that of the model retrained without the forget rows, as
open-unlearning (MUSE's PrivLeak) defines it; see its docstring for the sign.
"""
import math
import zlib
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .cli import UserError
from .evaluation import mia_auc, mia_auc_ci
from .prompts import LeftPadCollator

SCORES = ("loss", "zlib", "min_k", "min_k_plus_plus")
DEFAULT_K = 20  # percent of a row's text tokens that Min-K% and Min-K%++ average


class TextTokens(NamedTuple):
    """One row's text tokens and what each score needs of them (float64 arrays of the text's length n)."""
    ids: np.ndarray    # [n] the text's token ids as they stand in the prompt
    logp: np.ndarray   # [n] log p(x_t | the prompt before it)
    mu: np.ndarray     # [n] Σ_v p log p at the position that predicts x_t
    sigma: np.ndarray  # [n] sqrt(Σ_v p (log p − μ)²) there
    text: str          # the text scored (zlib compresses it)


def common_prefix_length(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def text_span(encoder, row, prefix_ids=None):
    """(prompt ids, start, end, text): the row's text tokens are prompt[start:end].

    They are the tokens of the prompt's head (start tokens + the task's head prefix + the text, cut where
    --max_length cuts it) after the longest run of ids the head shares with the head prefix tokenised alone
    (`prefix_ids`): the text's own tokens, of which the first may carry the prefix's trailing space (' great'
    after '### Text:'). Sentiment: the review; mcqa: the question (its choices and the cue are not text).
    `text` is the row's text, or the kept tokens decoded (stripped) when the head was cut."""
    tok, task, row = encoder.tokenizer, encoder.task, encoder.task.as_row(row)
    if prefix_ids is None:
        prefix_ids = tok(encoder.template.head_prefix)["input_ids"]
    head, body, cue = encoder.prompt_parts(row)
    start = max(1, common_prefix_length(head, prefix_ids))  # position 0 has no logits that predict it
    text = task.query(row)
    if start >= len(head):
        raise UserError(f"{task.describe(row)} has no text tokens to score "
                        f"(an empty text, or --max_length {encoder.max_length} leaves none of it)")
    if len(head) < len(tok(task.head(row, encoder.template))["input_ids"]):
        text = tok.decode(head[start:], skip_special_tokens=True).strip()
    return head + body + cue, start, len(head), text


def position_stats(logits, targets):
    """From logits [T, V] at T positions and their tokens [T]: (log p(target), μ, σ) per position, float32.

    μ = Σ p log p and σ² = Σ p (log p − μ)² (the same as Σ p (log p)² − μ², without its cancellation).
    σ = 0 (a one-hot distribution) is raised to the smallest normal float so that Min-K%++ stays finite."""
    logp = torch.log_softmax(logits.float(), -1)
    p = logp.exp()
    live = p > 0  # p underflows to 0 where log p is very small (or -inf): no contribution, and no 0·inf
    mu = torch.where(live, p * logp, 0.0).sum(-1)
    var = torch.where(live, p * (logp - mu[:, None]).square(), 0.0).sum(-1)
    sigma = var.clamp_min(torch.finfo(torch.float32).tiny).sqrt()
    return logp.gather(-1, targets[:, None]).squeeze(-1), mu, sigma


@torch.no_grad()
def token_logprobs(model, encoder, rows, batch_size=8, device="cpu", desc="text log-probs", quiet=False):
    """TextTokens of each row (text_span's tokens), in the rows' order, through `model(input_ids, attention_mask,
    keep)`: any stage of utils.stages.load_stage (a soft prompt or a guardrail instruction goes before the
    prompt inside the model, so the last `keep` positions are still the prompt's).

    Each row's prompt (encoder.prompt_ids: what the model was trained and is evaluated on) is left-padded in
    length-sorted batches; keep covers the position before each row's first text token. Per batch only the
    positions that predict a text token are gathered from the [B, keep, V] logits, and only their log p of the
    token, μ and σ leave the batch. Logits over the whole vocabulary are V floats per kept position: lower
    batch_size for a large vocabulary and long texts."""
    model.eval()
    prefix_ids = encoder.tokenizer(encoder.template.head_prefix)["input_ids"]
    spans = [text_span(encoder, r, prefix_ids) for r in rows]
    order = np.argsort([len(s[0]) for s in spans], kind="stable")
    collate = LeftPadCollator(encoder.tokenizer.pad_token_id)
    out = [None] * len(rows)
    for first in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False, disable=quiet):
        idx = order[first:first + batch_size].tolist()
        batch = collate([{"input_ids": spans[i][0]} for i in idx])
        keep = max(len(spans[i][0]) - spans[i][1] + 1 for i in idx)
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), keep=keep)
        # prompt position j of a row of length P sits at tail index keep − P + j; its token is predicted one before
        b_idx, t_idx, targets, sizes = [], [], [], []
        for b, i in enumerate(idx):
            ids, start, end, _ = spans[i]
            b_idx += [b] * (end - start)
            t_idx += [keep - len(ids) + j - 1 for j in range(start, end)]
            targets += ids[start:end]
            sizes.append(end - start)
        picked = logits[torch.tensor(b_idx, device=logits.device), torch.tensor(t_idx, device=logits.device)]
        del logits
        stats = position_stats(picked, torch.tensor(targets, device=picked.device))
        del picked
        stats = [s.double().cpu().numpy() for s in stats]
        bounds = np.cumsum([0] + sizes)
        for b, i in enumerate(idx):
            ids, start, end, text = spans[i]
            lo, hi = bounds[b], bounds[b + 1]
            out[i] = TextTokens(np.asarray(ids[start:end]), stats[0][lo:hi], stats[1][lo:hi], stats[2][lo:hi], text)
    return out


# ---------------------------------------------------------------- scores: higher = more likely a member

def lowest_k_mean(values, k=DEFAULT_K):
    """Mean of the lowest k % of `values` (floor(n · k / 100) of them, at least one)."""
    values = np.sort(np.asarray(values, dtype=float))
    return float(values[:max(1, math.floor(len(values) * k / 100))].mean())


def loss_score(tokens):
    """LOSS (Yeom et al. 2018): the mean log p of the text tokens."""
    return float(np.mean(tokens.logp))


def zlib_score(tokens):
    """zlib (Carlini et al. 2021): mean log p of the text tokens / zlib-compressed UTF-8 bytes of the text."""
    return loss_score(tokens) / len(zlib.compress(tokens.text.encode("utf-8")))


def min_k_score(tokens, k=DEFAULT_K):
    """Min-K% (Shi et al. 2024): the mean of the lowest k % of the text tokens' log p."""
    return lowest_k_mean(tokens.logp, k)


def min_k_plus_plus_score(tokens, k=DEFAULT_K):
    """Min-K%++ (Zhang et al. 2024): the mean of the lowest k % of (log p(x_t) − μ_t) / σ_t."""
    return lowest_k_mean((tokens.logp - tokens.mu) / tokens.sigma, k)


def row_scores(token_stats, k=DEFAULT_K):
    """{score name: [N] array} of every score in SCORES for each row's TextTokens."""
    fns = {"loss": loss_score, "zlib": zlib_score, "min_k": lambda t: min_k_score(t, k),
           "min_k_plus_plus": lambda t: min_k_plus_plus_score(t, k)}
    return {name: np.array([fns[name](t) for t in token_stats], dtype=float) for name in SCORES}


def membership_aucs(member_scores, nonmember_scores):
    """{score name: {"auc", "auc_ci"}} of members (train_forget) against non-members (test_forget): the ROC AUC
    with members scored higher (0.5: indistinguishable) and its seeded two-group percentile bootstrap interval,
    as utils.evaluation.mia_auc / mia_auc_ci compute the label-token AUC."""
    return {name: {"auc": mia_auc(member_scores[name], nonmember_scores[name]),
                   "auc_ci": mia_auc_ci(member_scores[name], nonmember_scores[name])}
            for name in member_scores}


def privleak(auc, retrained_auc):
    """open-unlearning's privleak (MUSE's PrivLeak) in percent, from AUCs where members score higher:

        privleak = ((1 − AUC) − (1 − AUC_retrained)) / (1 − AUC_retrained) · 100

    MUSE reports its AUC as 1 − this AUC, and open-unlearning converts before taking the relative difference.
    0: the unlearned model leaks membership as much as the retrained one. Negative: it still tells the forget
    rows from unseen ones better than the retrained model does (under-unlearning; an AUC of 1 gives −100).
    Positive: the forget rows look less like members than under the retrained model (over-unlearning, itself a
    sign that they were removed).
    None when either AUC is missing or the retrained AUC is 1 (no scale to compare with)."""
    if auc is None or retrained_auc is None or retrained_auc >= 1:
        return None
    return ((1 - auc) - (1 - retrained_auc)) / (1 - retrained_auc) * 100
