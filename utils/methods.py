"""Unlearning objectives, registered in one place: adding a method is one function and one line.

Each objective takes a LossContext (the batch's tail logits split by row role) and its weights, and
returns a dict of named terms with the total under "loss". Rows carry a role: retain rows are
trained towards their true label; forget rows towards their true label (for GA-type terms) or
towards a seeded generic label ('forget_generic', for SPUL, RL and LLMU's mismatch term).
"""
from dataclasses import dataclass

from . import losses

RETAIN, FORGET, FORGET_GENERIC = 0, 1, 2
ROLE_NAMES = {RETAIN: "retain", FORGET: "forget", FORGET_GENERIC: "forget_generic"}
PADDING = -1  # a row repeated only to fill a batch: it goes through the forward and counts in no term


class LossContext:
    """The tail logits of one micro-batch, split by row role, and the means the objectives are made of.

    `counts` {role: rows} are the rows of each role in the whole optimiser step (every micro-batch of the
    accumulation window, every process): each term sums its rows here and divides by that count, so one
    step trains the same objective whether its rows come as one batch, as micro-batches or from several
    devices. Without counts (outside training), the batch's own rows are the step."""

    def __init__(self, model, inputs, logits, reference, counts=None):
        self.model, self.inputs, self.logits, self.reference = model, inputs, logits, reference
        self.labels = inputs["tail_labels"]
        self.role = inputs["role"]
        self.counts = counts

    def rows(self, role):
        sel = self.role == role
        return self.logits[sel], self.labels[sel], sel

    def mean(self, role, per_row):
        n = self.counts.get(role, 0) if self.counts is not None else per_row.shape[0]
        return losses.mean_over(per_row, n)

    def ce(self, role):
        lg, lb, _ = self.rows(role)
        return self.mean(role, losses.sequence_nll(lg, lb))

    def ga(self, role=FORGET):
        return -self.ce(role)

    def _skips_reference(self, sel):
        """No row of the role here: no reference forward, unless every process must run it (sharded parameters)."""
        return not sel.any() and not self.reference.lockstep

    def kl(self, role=RETAIN):
        """KL(reference || model) at the label-prediction position of `role` rows."""
        lg, lb, sel = self.rows(role)
        if self._skips_reference(sel):
            return self.mean(role, lg.new_zeros(0))
        return self.mean(role, self.reference.kl_rows(self.model, self.inputs, sel, losses.label_position_logits(lg, lb)))

    def npo(self, beta, role=FORGET):
        lg, lb, sel = self.rows(role)
        if self._skips_reference(sel):
            return self.mean(role, lg.new_zeros(0))
        ref = self.reference.seq_logprob(self.model, self.inputs, sel)
        return self.mean(role, losses.npo_rows(losses.sequence_logprob(lg, lb), ref.to(lg.device), beta))


@dataclass(frozen=True)
class Method:
    objective: callable
    roles: tuple            # which row roles the training set holds
    reference_roles: tuple  # the roles whose rows need the frozen reference (KL on retain, NPO on forget)

    @property
    def needs_reference(self):
        return bool(self.reference_roles)


def spul(c, alpha=0.5, beta=0.5, **_):
    """SPUL: L_f (generic labels on forget rows) + α·L_r + β·L_kl (retain rows)."""
    t = {"forget_ce": c.ce(FORGET_GENERIC), "retain_ce": c.ce(RETAIN), "retain_kl": c.kl(RETAIN) if beta else c.logits.new_zeros(())}
    t["loss"] = t["forget_ce"] + alpha * t["retain_ce"] + beta * t["retain_kl"]
    return t


def gradient_ascent(c, **_):
    t = {"forget_ga": c.ga(FORGET)}
    t["loss"] = t["forget_ga"]
    return t


def random_label(c, **_):
    t = {"forget_ce": c.ce(FORGET_GENERIC)}
    t["loss"] = t["forget_ce"]
    return t


def gradient_ascent_kl(c, **_):
    t = {"forget_ga": c.ga(FORGET), "retain_kl": c.kl(RETAIN)}
    t["loss"] = t["forget_ga"] + t["retain_kl"]
    return t


def gradient_ascent_descent(c, **_):
    t = {"forget_ga": c.ga(FORGET), "retain_ce": c.ce(RETAIN)}
    t["loss"] = t["forget_ga"] + t["retain_ce"]
    return t


def llmu(c, ga_weight=0.5, rl_weight=1.0, kl_weight=1.0, **_):
    """LLMU (Yao et al.): GA on forget rows + mismatch (generic label) on forget rows + KL on retain rows."""
    t = {"forget_ga": c.ga(FORGET), "forget_ce": c.ce(FORGET_GENERIC), "retain_kl": c.kl(RETAIN)}
    t["loss"] = ga_weight * t["forget_ga"] + rl_weight * t["forget_ce"] + kl_weight * t["retain_kl"]
    return t


def npo(c, npo_beta=0.1, retain_weight=1.0, **_):
    """NPO on forget rows against the frozen reference; with retain rows (npo_rt) plus a retain CE."""
    t = {"forget_npo": c.npo(npo_beta, FORGET), "retain_ce": c.ce(RETAIN)}
    t["loss"] = t["forget_npo"] + retain_weight * t["retain_ce"]
    return t


METHODS = {
    "spul": Method(spul, (FORGET_GENERIC, RETAIN), (RETAIN,)),
    "gradient_ascent": Method(gradient_ascent, (FORGET,), ()),
    "random_label": Method(random_label, (FORGET_GENERIC,), ()),
    "gradient_ascent_kl": Method(gradient_ascent_kl, (FORGET, RETAIN), (RETAIN,)),
    "gradient_ascent_descent": Method(gradient_ascent_descent, (FORGET, RETAIN), ()),
    "llmu": Method(llmu, (FORGET, FORGET_GENERIC, RETAIN), (RETAIN,)),
    "npo": Method(npo, (FORGET,), (FORGET,)),
    "npo_rt": Method(npo, (FORGET, RETAIN), (FORGET,)),
}
BASELINES = [m for m in METHODS if m != "spul"]


def build_training_rows(encoder, data, method, seed):
    """Encode train_forget / train_retain into the rows `method` trains on, each with its role and a
    `row_id` (its index: the reference cache's row)."""
    rows = []
    for role in METHODS[method].roles:
        split = "train_retain" if role == RETAIN else "train_forget"
        completion = "generic" if role == FORGET_GENERIC else "label"
        rows += encoder.encode_rows(data[split], completion=completion, role=role, seed=seed)
    for i, r in enumerate(rows):
        r["row_id"] = i
    return rows
