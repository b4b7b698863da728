"""Every baseline objective of utils/methods.py against values computed by hand on a toy batch.

Vocabulary of 4 tokens, completions of up to 2 tokens (right-aligned, IGNORE on the left). The
logits are log-probabilities written out below, so softmax gives back the listed probabilities and
every expected value is a short formula over them (math.log, no call into the code under test).
"""
import math

import pytest
import torch

from utils.methods import BASELINES, FORGET, FORGET_GENERIC, METHODS, RETAIN, LossContext
from utils.prompts import IGNORE
from utils.reference import CachedReference, OnlineReference, ReferenceCache

U = [0.25, 0.25, 0.25, 0.25]
# row: (role, labels, model probabilities per position, reference probabilities per position)
ROWS = [
    (FORGET, [IGNORE, 2], [U, [0.1, 0.2, 0.4, 0.3]], [U, [0.1, 0.2, 0.5, 0.2]]),
    (FORGET, [1, 3], [[0.25, 0.5, 0.125, 0.125], [0.1, 0.1, 0.1, 0.7]], [[0.25, 0.25, 0.25, 0.25], [0.1, 0.1, 0.4, 0.4]]),
    (RETAIN, [IGNORE, 0], [U, [0.6, 0.2, 0.1, 0.1]], [U, [0.5, 0.3, 0.1, 0.1]]),
    (FORGET_GENERIC, [IGNORE, 3], [U, U], [U, U]),
    (RETAIN, [2, 1], [[0.1, 0.1, 0.5, 0.3], [0.2, 0.4, 0.2, 0.2]], [U, U]),
]
log = math.log

# Per-row mean negative log-likelihood of the completion, by hand.
NLL_F0 = -log(0.4)
NLL_F1 = -(log(0.5) + log(0.7)) / 2
NLL_R2 = -log(0.6)
NLL_R4 = -(log(0.5) + log(0.4)) / 2
NLL_G3 = -log(0.25)
GA = -(NLL_F0 + NLL_F1) / 2                  # minus the mean forget cross-entropy
RL = NLL_G3                                  # generic-label cross-entropy
GD_RETAIN = (NLL_R2 + NLL_R4) / 2            # retain cross-entropy
# KL(reference || model) at the position that predicts the first label token of each retain row:
# row 2 (one label token) at column 1, row 4 (two label tokens) at column 0.
KL_R2 = 0.5 * log(0.5 / 0.6) + 0.3 * log(0.3 / 0.2) + 0.1 * log(0.1 / 0.1) + 0.1 * log(0.1 / 0.1)
KL_R4 = 0.25 * (log(0.25 / 0.1) + log(0.25 / 0.1) + log(0.25 / 0.5) + log(0.25 / 0.3))
KL = (KL_R2 + KL_R4) / 2
# NPO on forget rows: log-probability of the whole completion under the model and the reference.
LOGP = [log(0.4), log(0.5) + log(0.7)]
REF_LOGP = [log(0.5), log(0.25) + log(0.4)]


def npo_by_hand(beta):
    log_sigmoid = lambda x: -log(1 + math.exp(-x))  # noqa: E731
    return -(2 / beta) * sum(log_sigmoid(-beta * (a - b)) for a, b in zip(LOGP, REF_LOGP)) / len(LOGP)


class FakeReferenceModel:
    """model(ids, mask, keep, reference=True) for OnlineReference: row i's reference logits; input_ids
    hold the row number. The extra last position stands for the one after the completion (dropped)."""

    def __call__(self, input_ids, attention_mask, keep=1, reference=False):
        assert reference
        ref = torch.tensor([r[3] for r in ROWS]).log()
        ref = torch.cat([ref, torch.zeros(len(ROWS), 1, 4)], 1)
        return ref[input_ids[:, 0]][:, -keep:]


def context(rows=None, reference="cache"):
    rows = list(range(len(ROWS))) if rows is None else rows
    sel = [ROWS[i] for i in rows]
    inputs = {
        "input_ids": torch.tensor([[i] for i in rows]),
        "attention_mask": torch.ones(len(rows), 1, dtype=torch.long),
        "tail_labels": torch.tensor([r[1] for r in sel]),
        "role": torch.tensor([r[0] for r in sel]),
    }
    # The compact cache as ReferenceCache stores it: top-k (k = the whole vocabulary here) at the
    # label-prediction position, and the completion's log-probability, both written out from ROWS.
    first = [r[1].count(IGNORE) for r in sel]
    cache = ReferenceCache([{"input_ids": [i], "labels": r[1]} for i, r in zip(rows, sel)], k=4)
    cache.idx[:] = torch.tensor([[0, 1, 2, 3]] * len(rows))
    cache.logp[:] = torch.tensor([r[3][f] for r, f in zip(sel, first)]).log()
    cache.seq[:] = torch.tensor([sum(log(r[3][j][t]) for j, t in enumerate(r[1]) if t != IGNORE) for r in sel])
    cache.filled[:] = True
    inputs["row_id"] = torch.arange(len(rows))
    logits = torch.tensor([r[2] for r in sel]).log().requires_grad_()
    ref = CachedReference(cache) if reference == "cache" else OnlineReference()
    return LossContext(FakeReferenceModel(), inputs, logits, ref)


def objective(name, c, **weights):
    return METHODS[name].objective(c, **weights)


def test_gradient_ascent():
    t = objective("gradient_ascent", context())
    assert t["loss"].item() == pytest.approx(GA, abs=1e-6)
    assert t["forget_ga"].item() == pytest.approx(GA, abs=1e-6)


def test_gradient_ascent_pushes_the_true_label_down():
    c = context([0])
    objective("gradient_ascent", c)["loss"].backward()
    # loss = log p(label 2), so d loss / d logits = onehot(2) - p: a descent step lowers the label's logit
    # and raises the others; the ignored position gets no gradient.
    assert c.logits.grad[0, 1].tolist() == pytest.approx([-0.1, -0.2, 0.6, -0.3], abs=1e-6)
    assert c.logits.grad[0, 0].tolist() == [0, 0, 0, 0]


def test_random_label():
    t = objective("random_label", context())
    assert t["loss"].item() == pytest.approx(RL, abs=1e-6) == log(4)


@pytest.mark.parametrize("reference", ["cache", "online"])
def test_gradient_ascent_kl(reference):
    t = objective("gradient_ascent_kl", context(reference=reference))
    assert t["retain_kl"].item() == pytest.approx(KL, abs=1e-5)
    assert t["loss"].item() == pytest.approx(GA + KL, abs=1e-5)


def test_gradient_ascent_descent():
    t = objective("gradient_ascent_descent", context())
    assert t["retain_ce"].item() == pytest.approx(GD_RETAIN, abs=1e-6)
    assert t["loss"].item() == pytest.approx(GA + GD_RETAIN, abs=1e-6)


@pytest.mark.parametrize("weights,w", [({}, (0.5, 1.0, 1.0)), ({"ga_weight": 2.0, "rl_weight": 0.3, "kl_weight": 0.7}, (2.0, 0.3, 0.7))])
def test_llmu(weights, w):
    t = objective("llmu", context(), **weights)
    assert (t["forget_ga"].item(), t["forget_ce"].item(), t["retain_kl"].item()) == pytest.approx((GA, RL, KL), abs=1e-5)
    assert t["loss"].item() == pytest.approx(w[0] * GA + w[1] * RL + w[2] * KL, abs=1e-5)


@pytest.mark.parametrize("reference", ["cache", "online"])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo(reference, beta):
    t = objective("npo", context([0, 1], reference), npo_beta=beta)  # npo trains on forget rows only
    assert t["forget_npo"].item() == pytest.approx(npo_by_hand(beta), abs=1e-5)
    assert t["loss"].item() == pytest.approx(npo_by_hand(beta), abs=1e-5)


def test_npo_equals_its_known_value_when_model_and_reference_agree():
    # log σ(0) = -log 2, whatever β: the loss is (2/β)·log 2 at the first step.
    c = context([3])
    c.role[:] = FORGET
    t = objective("npo", c, npo_beta=0.5)
    assert t["loss"].item() == pytest.approx(4 * log(2), abs=1e-6)


@pytest.mark.parametrize("retain_weight", [1.0, 0.25])
def test_npo_rt(retain_weight):
    t = objective("npo_rt", context(), npo_beta=0.1, retain_weight=retain_weight)
    assert t["forget_npo"].item() == pytest.approx(npo_by_hand(0.1), abs=1e-5)
    assert t["loss"].item() == pytest.approx(npo_by_hand(0.1) + retain_weight * GD_RETAIN, abs=1e-5)


def test_terms_over_no_rows_are_zero():
    # A batch that holds forget rows only (e.g. the last batch of GA+GD): the retain terms are 0, not NaN.
    t = objective("gradient_ascent_kl", context([0, 1]))
    assert t["retain_kl"].item() == 0 and t["loss"].item() == pytest.approx(GA, abs=1e-6)


def test_registry_matches_the_paper():
    """Rows each baseline trains on (NOTES.md): GA and RL see the forget set only; the others both."""
    roles = {m: set(METHODS[m].roles) for m in BASELINES}
    assert roles == {
        "gradient_ascent": {FORGET}, "random_label": {FORGET_GENERIC},
        "gradient_ascent_kl": {FORGET, RETAIN}, "gradient_ascent_descent": {FORGET, RETAIN},
        "llmu": {FORGET, FORGET_GENERIC, RETAIN}, "npo": {FORGET}, "npo_rt": {FORGET, RETAIN}}
    assert {m for m in BASELINES if METHODS[m].needs_reference} == {"gradient_ascent_kl", "llmu", "npo", "npo_rt"}


class CountingReferenceModel(FakeReferenceModel):
    """FakeReferenceModel that counts its forwards (with sharded parameters each one is a collective)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return super().__call__(*a, **kw)


@pytest.mark.parametrize("reference", ["cache", "online"])
@pytest.mark.parametrize("method", ["gradient_ascent_kl", "npo_rt"])
def test_sharded_parameters_run_the_reference_forward_on_every_process(reference, method):
    """FSDP / ZeRO-3 (`lockstep`): a process whose micro-batch holds no row of the term's role still runs the
    online reference forward, as the processes that hold some do (a skipped collective leaves them waiting);
    the terms are unchanged. Unsharded, it skips the forward."""
    rows = [3, 4] if method == "npo_rt" else [0, 1]  # no forget row for NPO, no retain row for the KL
    values = {}
    for lockstep in (False, True):
        c = context(rows, reference)
        c.model, c.reference.lockstep = CountingReferenceModel(), lockstep
        values[lockstep] = {k: v.item() for k, v in objective(method, c, npo_beta=0.1).items()}
        expected = int(lockstep and reference == "online")  # the full cache needs no forward at all
        assert c.model.calls == expected, (lockstep, c.model.calls)
    assert values[True] == values[False]
    # with rows of the role, lockstep runs the forward on the whole micro-batch and selects: the same values
    for lockstep in (False, True):
        c = context(reference=reference)
        c.reference.lockstep = lockstep
        values[lockstep] = {k: v.item() for k, v in objective(method, c, npo_beta=0.1).items()}
    assert values[True] == pytest.approx(values[False], abs=1e-6)


@pytest.mark.parametrize("other_process_misses", [False, True])
def test_sharded_lazy_cache_computes_on_every_process_when_any_misses(monkeypatch, other_process_misses):
    """SPUL's lazy cache under FSDP / ZeRO-3: this process has every row of its micro-batch, another process misses
    some; every process must run the reference forward then. The processes learn it from one collective flag."""
    import utils.reference as reference_module

    asked = []

    def any_process(flag, device):
        asked.append(bool(flag))
        return bool(flag) or other_process_misses

    monkeypatch.setattr(reference_module, "any_process", any_process)
    c = context()
    c.model = CountingReferenceModel()
    c.reference.lazy = c.reference.lockstep = True
    t = objective("gradient_ascent_kl", c)
    assert asked == [False]  # this process's rows were all cached
    assert c.model.calls == int(other_process_misses)
    assert t["retain_kl"].item() == pytest.approx(KL, abs=1e-5)  # recomputed values equal the cached ones
    c.reference.cache.filled[:] = False  # unsharded (no lockstep): a process computes only the rows it misses
    c.reference.lockstep, c.model.calls = False, 0
    objective("gradient_ascent_kl", c)
    assert c.model.calls == 1 and asked == [False]
