"""Loss terms, one small function each. Inputs are tail logits aligned with right-aligned labels.

`logits` [B, L, V] are the logits that predict `labels` [B, L] (IGNORE on the left of shorter
completions): logits[:, j] predicts labels[:, j]. Every term has a per-row form (`*_rows`, [B]); a term
is a mean over rows (per-row mean over label tokens, then mean over rows), so the weights α, β compare
terms and not row counts. In training the mean is over the rows of the term's role in the whole optimiser
step (utils.methods.LossContext), whatever the number of devices and accumulation steps. A term over no
rows is 0.
"""
import torch
import torch.nn.functional as F

from .prompts import IGNORE


def token_logprobs(logits, labels):
    """log p(label token) at each labelled position, 0 where IGNORE: [B, L]."""
    mask = labels != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return tok * mask


def sequence_nll(logits, labels):
    """Per-row mean cross-entropy over the completion tokens: [B]."""
    n = (labels != IGNORE).sum(-1).clamp(min=1)
    return -token_logprobs(logits, labels).sum(-1) / n


def sequence_logprob(logits, labels):
    """Per-row log-probability of the whole completion: [B] (NPO's log π(y|x))."""
    return token_logprobs(logits, labels).sum(-1)


def label_position_logits(logits, labels):
    """Logits at the position that predicts the first completion token: [B, V].

    Not the label token's own position (the released scripts' off-by-one): with right-aligned
    labels the first label token of row i is at column L - n_i, and logits[:, j] predict labels[:, j].
    """
    first = (labels == IGNORE).sum(-1)
    return logits[torch.arange(logits.shape[0], device=logits.device), first]


def _mean(x):
    return x.mean() if x.numel() else x.new_zeros(())


def mean_over(x, n):
    """Sum of per-row values over `n` rows (n may count rows of other micro-batches and devices); 0 when n = 0."""
    return x.sum() / n if n else x.sum() * 0.0


def cross_entropy_loss(logits, labels):
    """L_f (towards generic labels) and L_r (towards true labels): mean CE over the rows given."""
    return _mean(sequence_nll(logits, labels))


def gradient_ascent_loss(logits, labels):
    """GA: maximise the CE of the true label, i.e. minimise its negative."""
    return -_mean(sequence_nll(logits, labels))


def kl_full_rows(ref_logits, logits):
    """KL(p_ref || p) over the whole vocabulary at the label-prediction position, per row: [B]."""
    logq = torch.log_softmax(logits.float(), -1)
    logp = torch.log_softmax(ref_logits.float(), -1)
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


def kl_full(ref_logits, logits):
    """KL(p_ref || p), mean over rows."""
    return _mean(kl_full_rows(ref_logits, logits))


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, stable at both ends."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kl_topk(ref_idx, ref_logp, logits):
    """KL(p_ref || p) from a compact reference, mean over rows (see kl_topk_rows)."""
    return _mean(kl_topk_rows(ref_idx, ref_logp, logits))


def kl_topk_rows(ref_idx, ref_logp, logits):
    """KL(p_ref || p) per row from a compact reference: the reference's top-k log-probs plus one bucket
    for the rest of the vocabulary. Exact when the reference puts no mass outside its top k;
    otherwise a lower bound whose gap is the divergence inside the rest bucket."""
    logq = torch.log_softmax(logits.float(), -1)
    q_top = logq.gather(-1, ref_idx.long())
    p_top = ref_logp.float()
    p_rest = _log1mexp(torch.logsumexp(p_top, -1))
    q_rest = _log1mexp(torch.logsumexp(q_top, -1))
    return (p_top.exp() * (p_top - q_top)).sum(-1) + p_rest.exp() * (p_rest - q_rest)


def npo_rows(logp, ref_logp, beta):
    """NPO (Zhang et al. 2024) per row: -(2/β)·log σ(-β·(log π_θ(y|x) - log π_ref(y|x))): [B]."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp))


def npo_loss(logp, ref_logp, beta):
    """NPO on forget rows, mean over rows."""
    return _mean(npo_rows(logp, ref_logp, beta))
