"""SPUL's loss terms, each against a value worked out by hand on a toy batch, and the position the KL
term is taken at (the one that predicts the label, not the label token's own), through
utils.methods.spul / LossContext with both kinds of reference."""
import math

import pytest
import torch

from utils import methods
from utils.losses import (cross_entropy_loss, kl_full, kl_topk, label_position_logits, sequence_nll,
                          token_logprobs)
from utils.methods import FORGET_GENERIC, RETAIN, LossContext
from utils.prompts import IGNORE, LeftPadCollator
from utils.reference import CachedReference, OnlineReference, fill_reference_cache

L2, L3, L5 = math.log(2), math.log(3), math.log(5)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def close(a, b, tol=1e-6):
    return abs(float(a) - float(b)) <= tol


# ------------------------------------------------------------------ the terms on their own

def test_token_logprobs_and_sequence_nll_by_hand():
    # vocabulary of 3; row 0 has a one-token label (1), row 1 a two-token label (0, 2)
    logits = t([[[9.0, 9.0, 9.0], [0.0, L2, 0.0]],        # row 0: column 0 is unused (IGNORE)
                [[L3, 0.0, 0.0], [0.0, 0.0, L2]]])         # row 1
    labels = torch.tensor([[IGNORE, 1], [0, 2]])
    # softmax([0, ln2, 0]) = [1/4, 1/2, 1/4]; softmax([ln3, 0, 0]) = [3/5, 1/5, 1/5]; softmax([0, 0, ln2]) = [1/4, 1/4, 1/2]
    lp = token_logprobs(logits, labels)
    assert torch.allclose(lp, t([[0.0, math.log(1 / 2)], [math.log(3 / 5), math.log(1 / 2)]]), atol=1e-6)
    nll = sequence_nll(logits, labels)
    assert torch.allclose(nll, t([L2, (math.log(5 / 3) + L2) / 2]), atol=1e-6)


def test_cross_entropy_loss_by_hand():
    logits = t([[[9.0, 9.0, 9.0], [0.0, L2, 0.0]],
                [[L3, 0.0, 0.0], [0.0, 0.0, L2]]])
    labels = torch.tensor([[IGNORE, 1], [0, 2]])
    # per-row mean over the row's label tokens, then mean over rows: (ln 2 + (ln 5/3 + ln 2)/2) / 2
    expected = (L2 + (math.log(5 / 3) + L2) / 2) / 2
    assert close(cross_entropy_loss(logits, labels), expected)
    assert close(cross_entropy_loss(logits[:1], labels[:1]), L2)
    # no rows: zero, not NaN
    assert float(cross_entropy_loss(logits[:0], labels[:0])) == 0.0
    # the gradient flows into the labelled positions only
    x = logits.clone().requires_grad_(True)
    cross_entropy_loss(x, labels).backward()
    assert torch.all(x.grad[0, 0] == 0) and x.grad[1].abs().sum() > 0


def test_label_position_logits_picks_the_column_that_predicts_the_first_label_token():
    V = 4
    logits = torch.arange(3 * 3 * V, dtype=torch.float32).view(3, 3, V)
    labels = torch.tensor([[IGNORE, IGNORE, 1],   # one label token: predicted by column 2
                           [IGNORE, 2, 3],        # two: column 1
                           [1, 2, 3]])            # three: column 0
    out = label_position_logits(logits, labels)
    assert out.shape == (3, V)
    assert torch.equal(out[0], logits[0, 2]) and torch.equal(out[1], logits[1, 1]) and torch.equal(out[2], logits[2, 0])


def test_kl_full_by_hand():
    # p = softmax([ln 4, 0, 0, 0]) = [4/7, 1/7, 1/7, 1/7]; q = uniform 1/4
    ref = t([[math.log(4), 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    cur = t([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, L3]])
    kl0 = 4 / 7 * math.log((4 / 7) / (1 / 4)) + 3 * (1 / 7) * math.log((1 / 7) / (1 / 4))
    # row 1: p uniform, q = [1/6, 1/6, 1/6, 1/2]
    kl1 = 3 * 0.25 * math.log(0.25 / (1 / 6)) + 0.25 * math.log(0.25 / 0.5)
    assert close(kl_full(ref[:1], cur[:1]), kl0)
    assert close(kl_full(ref, cur), (kl0 + kl1) / 2)
    assert close(kl_full(ref, ref), 0.0)
    # the direction is KL(reference || model): swapping the arguments gives another number
    assert not close(kl_full(cur[:1], ref[:1]), kl0, tol=1e-3)
    assert float(kl_full(ref[:0], cur[:0])) == 0.0


def test_kl_topk_by_hand_with_small_k():
    p = [0.7, 0.2, 0.05, 0.05]
    q = [0.4, 0.3, 0.2, 0.1]
    ref_logp = t([math.log(0.7), math.log(0.2)]).unsqueeze(0)  # the reference's top 2
    ref_idx = torch.tensor([[0, 1]])
    logits = t([math.log(x) for x in q]).unsqueeze(0)
    # top-2 plus one bucket for the rest: p_rest = 0.1, q_rest = 0.3
    bucketed = 0.7 * math.log(0.7 / 0.4) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.3)
    full = sum(a * math.log(a / b) for a, b in zip(p, q))
    got = kl_topk(ref_idx, ref_logp, logits)
    assert close(got, bucketed, 1e-5)
    assert close(kl_full(t([math.log(x) for x in p]).unsqueeze(0), logits), full, 1e-5)
    assert float(got) <= full  # a lower bound ...
    assert full - float(got) < 0.01  # ... and close: the rest bucket holds little mass


def test_kl_topk_equals_kl_full_when_k_is_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(5, 50, generator=g) * 3
    cur = torch.randn(5, 50, generator=g) * 3
    logp = torch.log_softmax(ref, -1)
    top = logp.topk(50, -1)
    assert close(kl_topk(top.indices, top.values, cur), kl_full(ref, cur), 1e-5)
    # permuted order of the top-k entries makes no difference
    perm = torch.randperm(50, generator=g)
    assert close(kl_topk(top.indices[:, perm], top.values[:, perm], cur), kl_full(ref, cur), 1e-5)
    # gradients stay finite at k = V, where the rest bucket is empty
    x = cur.clone().requires_grad_(True)
    kl_topk(top.indices, top.values, x).backward()
    assert torch.isfinite(x.grad).all()


def test_kl_topk_is_a_close_lower_bound_for_peaked_references():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(8, 1000, generator=g)
    ref[:, :5] += 12.0  # a trained classifier's reference: nearly all mass on a few tokens
    cur = ref + 0.5 * torch.randn(8, 1000, generator=g)
    full = float(kl_full(ref, cur))
    logp = torch.log_softmax(ref, -1)
    prev = -1.0
    for k in (1, 8, 32, 256):
        top = logp.topk(k, -1)
        got = float(kl_topk(top.indices, top.values, cur))
        assert got <= full + 1e-6
        assert got >= prev - 1e-6  # more k, tighter bound
        prev = got
    top = logp.topk(32, -1)
    assert abs(float(kl_topk(top.indices, top.values, cur)) - full) < 0.02 * full + 1e-4


# ------------------------------------------------------------------ the KL position, end to end
#
# A bigram model over a vocabulary of 4: the logits at a position are a table row picked by the
# token there, so every value below is known by hand. Token 1 ends every prompt: its row is what
# predicts the first label token. Tokens 2 and 3 are label tokens: their rows sit at the label
# tokens' own positions (where the released scripts took the KL).

POLICY = t([[0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, L3],        # softmax: [1/6, 1/6, 1/6, 1/2]
            [0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, L2, 0.0]])       # softmax: [1/5, 1/5, 2/5, 1/5]


class Bigram(torch.nn.Module):
    """model(input_ids, attention_mask, keep, reference) like TailLM/SoftPromptLM: [B, keep, V]."""

    def __init__(self, reference_table):
        super().__init__()
        self.ref = reference_table

    def forward(self, input_ids, attention_mask, keep=1, reference=False):
        table = self.ref if reference else POLICY
        return table[input_ids[:, -keep:]]


def _items():
    return [  # prompt tokens + label tokens; labels IGNORE on the prompt
        {"input_ids": [0, 0, 1, 3], "labels": [IGNORE] * 3 + [3], "role": RETAIN},           # one-token label
        {"input_ids": [0, 1, 3, 2], "labels": [IGNORE] * 2 + [3, 2], "role": RETAIN},        # two-token label
        {"input_ids": [0, 0, 0, 1, 2], "labels": [IGNORE] * 4 + [2], "role": FORGET_GENERIC},
    ]


def _spul_terms(reference_table, kind, alpha=0.5, beta=0.5):
    model = Bigram(reference_table)
    items = _items()
    collate = LeftPadCollator(pad_id=0)
    if kind == "cache":
        reference = CachedReference(fill_reference_cache(model, items, collate, k=4, batch_size=2))
    else:
        reference = OnlineReference()
    inputs = collate(items)
    assert inputs["tail_labels"].tolist() == [[IGNORE, 3], [3, 2], [IGNORE, 2]]
    labels = inputs["tail_labels"]
    # what TailLossTrainer.compute_loss does: the last L + 1 positions, minus the last one
    logits = model(inputs["input_ids"], inputs["attention_mask"], keep=labels.shape[1] + 1)[:, :-1]
    return methods.spul(LossContext(model, inputs, logits, reference), alpha=alpha, beta=beta)


# KL(p_ref || p_model) when the reference is uniform and the model is [1/6, 1/6, 1/6, 1/2]
KL_AT_PREDICTING = 3 * 0.25 * math.log(0.25 / (1 / 6)) + 0.25 * math.log(0.25 / 0.5)
RETAIN_CE = (math.log(2) + (math.log(2) + math.log(5 / 2)) / 2) / 2  # -ln 1/2; (-ln 1/2 - ln 2/5) / 2
FORGET_CE = math.log(6)  # -ln 1/6


@pytest.mark.parametrize("kind", ["online", "cache"])
def test_kl_is_taken_where_the_label_is_predicted(kind):
    """The reference differs from the model only at the prompt's last token (token 1): the KL must see it."""
    ref = POLICY.clone()
    ref[1] = 0.0  # uniform at the position that predicts the label
    terms = _spul_terms(ref, kind)
    assert close(terms["retain_kl"], KL_AT_PREDICTING, 1e-5)
    assert KL_AT_PREDICTING > 0.1
    assert close(terms["retain_ce"], RETAIN_CE) and close(terms["forget_ce"], FORGET_CE)
    assert close(terms["loss"], FORGET_CE + 0.5 * RETAIN_CE + 0.5 * KL_AT_PREDICTING, 1e-5)


@pytest.mark.parametrize("kind", ["online", "cache"])
def test_kl_is_not_taken_at_the_label_tokens_own_position(kind):
    """The reference differs only at the label tokens' own positions (tokens 2 and 3): the KL must be 0.
    The released scripts' off-by-one would report KL(softmax([3, 0, 0, 0]) || [1/5, 1/5, 2/5, 1/5]) > 0.5 here."""
    ref = POLICY.clone()
    ref[2] = t([5.0, 0.0, 0.0, 0.0])
    ref[3] = t([3.0, 0.0, 0.0, 0.0])
    terms = _spul_terms(ref, kind)
    assert close(terms["retain_kl"], 0.0, 1e-6)
    off_by_one = kl_full(ref[3:4], POLICY[3:4])
    assert float(off_by_one) > 0.5


def test_kl_covers_retain_rows_only():
    """Forget rows never enter L_kl: a reference that differs on the forget row's last token changes nothing."""
    ref = POLICY.clone()
    ref[1] = 0.0
    base = _spul_terms(ref, "online")
    items = _items()
    items[2]["input_ids"] = [0, 0, 0, 3, 2]  # the forget row's predicting token is now 3 (reference = policy there)
    model = Bigram(ref)
    inputs = LeftPadCollator(0)(items)
    logits = model(inputs["input_ids"], inputs["attention_mask"], keep=3)[:, :-1]
    terms = methods.spul(LossContext(model, inputs, logits, OnlineReference()), alpha=0.5, beta=0.5)
    assert close(terms["retain_kl"], base["retain_kl"])


def test_spul_weights_and_beta_zero():
    ref = POLICY.clone()
    ref[1] = 0.0
    terms = _spul_terms(ref, "online", alpha=1.0, beta=0.0)
    assert float(terms["retain_kl"]) == 0.0
    assert close(terms["loss"], FORGET_CE + RETAIN_CE)
    terms = _spul_terms(ref, "online", alpha=0.1, beta=2.0)
    assert close(terms["loss"], FORGET_CE + 0.1 * RETAIN_CE + 2.0 * KL_AT_PREDICTING, 1e-5)


def test_online_reference_is_deterministic_and_matches_the_cache_under_dropout(tiny_opt):
    """OPT has dropout 0.1: in a training step (train mode) the online reference must still be the frozen
    model's exact distribution, as the cache (filled in eval mode) stores it."""
    from utils.modeling import load_model
    from utils.soft_prompt import build_prompt_model

    torch.manual_seed(0)
    model = build_prompt_model(load_model(tiny_opt), 4, 16)
    assert model.lm.config.dropout > 0
    V = model.lm.config.vocab_size
    items = [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE] * 4 + [9], "role": RETAIN},
             {"input_ids": [5, 6, 10, 11], "labels": [IGNORE] * 2 + [10, 11], "role": RETAIN}]
    collate = LeftPadCollator(pad_id=1)
    cache = fill_reference_cache(model, items, collate, k=V, batch_size=2)
    inputs = collate(items)
    model.train()
    sel = torch.tensor([True, True])
    with torch.no_grad():
        logits = model(inputs["input_ids"], inputs["attention_mask"], keep=3)[:, :-1]
    at_label = label_position_logits(logits, inputs["tail_labels"])
    online = [float(OnlineReference().kl(model, inputs, sel, at_label)) for _ in range(3)]
    cached = float(CachedReference(cache).kl(model, inputs, sel, at_label))
    assert model.training  # the reference forward left the mode as it found it
    assert online[0] == online[1] == online[2]
    assert close(online[0], cached, 1e-5)
