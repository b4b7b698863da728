"""ECO (Liu et al., arXiv 2406.07933): embedding-corrupted prompts, a weight-free unlearning method.

A prompt classifier (logistic regression on the frozen model's own mean-pooled hidden states over
the prompt tokens) flags queries that belong to the forget target. For a flagged query, a forward
hook on the embedding layer corrupts the prompt's token embeddings (seeded noise of strength σ on
the first n dimensions, or zeroing each token's k largest dimensions) before the rest of the forward
pass. Unflagged queries keep the plain forward pass, so their logits are bit-identical to the model's.

Everything runs from token ids alone: `EcoLM(input_ids, attention_mask, keep)` computes the classifier
features with a plain forward (whose logits serve the unflagged rows), then re-runs only the flagged
rows with the hook active.
"""
import json
import os
import zlib

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .cli import UserError
from .prompts import LeftPadCollator, cue_ids
from .modeling import tail_logits

CORRUPTIONS = ("rand_noise_first_n", "zero_topk")
CLASSIFIER_FILE = "classifier.joblib"
ECO_FILE = "eco.json"


# ---------------------------------------------------------------- which positions are the prompt

def prompt_mask(input_ids, attention_mask, cue):
    """[B, T] bool: real (non-pad) tokens up to the end of the prompt's cue.

    The prompt ends with the task's cue (`cue`, its tokens: utils.prompts.cue_ids: '### Sentiment:',
    '### Answer:'); tokens after its last occurrence are a completion (a label appended for
    teacher-forced scoring) and are no part of the prompt. Rows without the cue are all prompt.
    """
    real = attention_mask.bool()
    B, T = input_ids.shape
    L = len(cue)
    end = torch.full((B,), T, dtype=torch.long, device=input_ids.device)
    if 0 < L <= T:
        q = torch.as_tensor(cue, device=input_ids.device)
        hit = (input_ids.unfold(1, L, 1) == q).all(-1) & real[:, L - 1:]  # [B, T-L+1]
        start = torch.arange(T - L + 1, device=input_ids.device).expand(B, -1)
        last = torch.where(hit, start, torch.full_like(start, -1)).max(-1).values
        end = torch.where(last >= 0, last + L, end)
    return real & (torch.arange(T, device=input_ids.device)[None] < end[:, None])


class CueReader:
    """A model whose gate finds a prompt's end by the cue's ids (`self.cue`): ECO, ICUL's retrieval, the filters.
    They are built with the training template's cue; scored on prompts of another template (utils.tasks: the
    held-out and instruction templates), they must look for that template's cue instead."""

    def read_template(self, encoder):
        self.cue = list(encoder.cue_ids)


def follow_template(model, encoder):
    """Make a loaded model read prompts as `encoder` writes them: a CueReader takes the cue of the encoder's template
    (the same ids as before for the training template); any other model is left as it is. Returns the model."""
    if isinstance(model, CueReader):
        model.read_template(encoder)
    return model


def mean_pool(hidden, mask):
    """Mean of hidden [B, T, d] over the positions of mask [B, T], in float32."""
    m = mask.unsqueeze(-1).float()
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def prompt_features(lm, input_ids, attention_mask, cue, feature_layer=-1, keep=1):
    """One plain forward of `lm`: (logits of the last `keep` positions, the prompt's mean-pooled hidden state
    [B, d] at `feature_layer`, the prompt mask). The features of ECO's gate and of ICUL's retrieval."""
    from .prompts import position_ids_from_mask

    out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
             logits_to_keep=keep, use_cache=False, output_hidden_states=True)
    pmask = prompt_mask(input_ids, attention_mask, cue)
    return out.logits, mean_pool(out.hidden_states[feature_layer], pmask), pmask


def check_feature_layer(lm, feature_layer):
    n_states = lm.config.num_hidden_layers + 1
    if not -n_states <= int(feature_layer) < n_states:
        raise UserError(f"--feature_layer {feature_layer} is out of range for a model with {n_states} hidden states")
    return int(feature_layer)


class FeatureLM(CueReader, nn.Module):
    """A frozen LM that only gives prompt features (row_features takes it as it takes an EcoLM)."""

    def __init__(self, lm, cue, feature_layer=-1):
        super().__init__()
        self.lm, self.cue, self.feature_layer = lm, list(cue), check_feature_layer(lm, feature_layer)

    def features(self, input_ids, attention_mask, keep=1):
        return prompt_features(self.lm, input_ids, attention_mask, self.cue, self.feature_layer, keep)


# ---------------------------------------------------------------- corruption

def row_seed(seed, ids):
    """A seed from the run's seed and the row's own prompt tokens: a query gets the same noise in any batch."""
    return zlib.crc32(np.asarray(ids.cpu(), dtype=np.int64).tobytes(), seed & 0xFFFFFFFF)


class Corruption:
    """The ECO corruption of selected token embeddings.

    rand_noise_first_n: add σ·N(0, 1) noise to the first `dims` dimensions (σ = `strength`).
    zero_topk: set each token's k = round(`strength`) largest-magnitude dimensions to zero.
    """

    def __init__(self, kind="rand_noise_first_n", strength=1.0, dims=None, seed=0):
        if kind not in CORRUPTIONS:
            raise UserError(f"unknown corruption '{kind}': choose one of {', '.join(CORRUPTIONS)}")
        self.kind, self.strength, self.dims, self.seed = kind, float(strength), dims, int(seed)

    def noise(self, ids, n_dims):
        """The noise rows for one query's selected token ids: [len(ids), n_dims], σ·N(0, 1), seeded."""
        g = torch.Generator().manual_seed(row_seed(self.seed, ids))
        return torch.randn(len(ids), n_dims, generator=g) * self.strength

    def __call__(self, embeds, input_ids, mask):
        """embeds [B, T, d] with the positions of mask [B, T] corrupted (a new tensor)."""
        out = embeds.clone()
        d = embeds.shape[-1]
        if self.kind == "rand_noise_first_n":
            n = d if self.dims is None else min(int(self.dims), d)
            for b in range(embeds.shape[0]):
                pos = mask[b].nonzero().squeeze(-1)
                if len(pos):
                    noise = self.noise(input_ids[b, pos], n).to(embeds.device)
                    out[b, pos, :n] = (embeds[b, pos, :n].float() + noise).to(embeds.dtype)
        else:
            k = int(min(max(round(self.strength), 1), d))
            top = embeds.abs().topk(k, dim=-1).indices
            zero = torch.zeros_like(embeds, dtype=torch.bool).scatter_(-1, top, True) & mask.unsqueeze(-1)
            out = out.masked_fill(zero, 0)
        return out

    def describe(self):
        return {"corruption": self.kind, "strength": self.strength, "eco_dims": self.dims, "noise_seed": self.seed}


# ---------------------------------------------------------------- the classifier gate

class PromptClassifier:
    """A fitted scikit-learn binary classifier and its threshold: flag = decision_function > threshold."""

    def __init__(self, model, threshold):
        self.model, self.threshold = model, float(threshold)

    def scores(self, features):
        return self.model.decision_function(np.asarray(features, dtype=np.float64))

    def flags(self, features):
        return self.scores(features) > self.threshold


def fpr_threshold(negative_scores, target_fpr):
    """The lowest threshold t at which at most floor(target_fpr · n) negatives score above t (flag = score > t)."""
    s = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    if len(s) == 0:
        raise UserError("no retain rows in the held-out slice to choose the classifier threshold on")
    allowed = int(np.floor(target_fpr * len(s) + 1e-9))  # < len(s) since target_fpr < 1
    return float(s[allowed])


def binary_report(flags, truth):
    """Precision, recall and false-positive rate of flags against truth (both bool arrays)."""
    flags, truth = np.asarray(flags, bool), np.asarray(truth, bool)
    tp, fp = int((flags & truth).sum()), int((flags & ~truth).sum())
    fn, tn = int((~flags & truth).sum()), int((~flags & ~truth).sum())
    return {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "fpr": fp / (fp + tn) if fp + tn else 0.0, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def fit_classifier(forget_features, retain_features, target_fpr=0.05, holdout_fraction=0.2, c=1.0, seed=0):
    """Logistic regression, forget rows positive, retain rows negative, on the training splits only.

    A stratified, seeded held-out slice of those training rows is kept out of the fit; the threshold
    is chosen on its retain rows for `target_fpr`. Returns (PromptClassifier, report on the held-out slice).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not 0.0 < target_fpr < 1.0:
        raise UserError(f"--target_fpr must be in (0, 1), got {target_fpr}")
    if not 0.0 < holdout_fraction < 1.0:
        raise UserError(f"--holdout_fraction must be in (0, 1), got {holdout_fraction}")
    nf, nr = len(forget_features), len(retain_features)
    for name, n in (("train_forget", nf), ("train_retain", nr)):
        if min(round(n * holdout_fraction), n - round(n * holdout_fraction)) < 1:
            raise UserError(f"{name} has {n} rows: too few to fit the classifier and hold out a "
                            f"{holdout_fraction} slice (need at least one row on each side)")
    X = np.concatenate([forget_features, retain_features]).astype(np.float64)
    y = np.r_[np.ones(nf, dtype=int), np.zeros(nr, dtype=int)]
    X_fit, X_ho, y_fit, y_ho = train_test_split(X, y, test_size=holdout_fraction, stratify=y, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000))
    model.fit(X_fit, y_fit)
    s_ho = model.decision_function(X_ho)
    clf = PromptClassifier(model, fpr_threshold(s_ho[y_ho == 0], target_fpr))
    report = binary_report(s_ho > clf.threshold, y_ho == 1)
    report.update(n_fit=int(len(y_fit)), n_holdout_forget=int(y_ho.sum()), n_holdout_retain=int((y_ho == 0).sum()))
    return clf, report


# ---------------------------------------------------------------- the ECO model

class EcoLM(CueReader, nn.Module):
    """A frozen causal LM behind the ECO gate: `model(input_ids, attention_mask, keep)` -> [B, keep, V].

    mode 'classifier' flags rows by the classifier; 'all' corrupts every row (the σ search);
    'none' is the plain model. `reference=True` is the plain model too. The latest flags are kept in
    `last_flags` (rows of the latest batch).
    """

    def __init__(self, lm, corruption, cue, classifier=None, feature_layer=-1, mode="classifier"):
        super().__init__()
        self.lm, self.corruption, self.classifier = lm, corruption, classifier
        self.cue, self.feature_layer, self.mode = list(cue), check_feature_layer(lm, feature_layer), mode
        self.last_flags = None
        self._pending = None  # (input_ids, positions) while a corrupted forward runs
        lm.get_input_embeddings().register_forward_hook(self._corrupt_hook)

    def _corrupt_hook(self, module, inputs, output):
        if self._pending is None:
            return None
        ids, mask = self._pending
        return self.corruption(output, ids, mask)

    def features(self, input_ids, attention_mask, keep=1):
        """The plain forward: (logits of the last `keep` positions, classifier features [B, d], prompt mask)."""
        return prompt_features(self.lm, input_ids, attention_mask, self.cue, self.feature_layer, keep)

    def corrupted_logits(self, input_ids, attention_mask, pmask, keep=1):
        self._pending = (input_ids, pmask)
        try:
            return tail_logits(self.lm, input_ids, attention_mask, keep)
        finally:
            self._pending = None

    def forward(self, input_ids, attention_mask, keep=1, reference=False):
        if reference or self.mode == "none":
            self.last_flags = torch.zeros(len(input_ids), dtype=torch.bool)
            return tail_logits(self.lm, input_ids, attention_mask, keep)
        if self.mode == "all":
            self.last_flags = torch.ones(len(input_ids), dtype=torch.bool)
            return self.corrupted_logits(input_ids, attention_mask, prompt_mask(input_ids, attention_mask, self.cue), keep)
        if self.classifier is None:
            raise UserError("this ECO model has no fitted prompt classifier")
        logits, feats, pmask = self.features(input_ids, attention_mask, keep)
        flags = torch.as_tensor(self.classifier.flags(feats.detach().cpu().numpy()))
        self.last_flags = flags
        if flags.any():
            sel = flags.nonzero().squeeze(-1).to(input_ids.device)
            logits = logits.clone()
            logits[sel] = self.corrupted_logits(input_ids[sel], attention_mask[sel], pmask[sel], keep)
        return logits


@torch.no_grad()
def row_features(eco, encoder, rows, batch_size=32, device="cpu", desc="features", quiet=False):
    """Classifier features [N, d] (float64) of rows' prompts, computed exactly as EcoLM.forward does,
    in the length-sorted batches of utils.evaluation.predict_rows."""
    encoder.require_training("fitting a prompt classifier")
    eco.eval()
    prompts = [encoder.prompt_ids(r) for r in rows]
    order = np.argsort([len(p) for p in prompts], kind="stable")
    collate = LeftPadCollator(encoder.tokenizer.pad_token_id)
    out = None
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False, disable=quiet):
        idx = order[start:start + batch_size]
        batch = collate([{"input_ids": prompts[i]} for i in idx])
        _, feats, _ = eco.features(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        if out is None:
            out = np.empty((len(rows), feats.shape[-1]), dtype=np.float64)
        out[idx] = feats.cpu().double().numpy()
    return out


# ---------------------------------------------------------------- σ by zeroth-order search

def balanced_label_accuracy(scores, rows, valid=None):
    """Balanced accuracy of the label-restricted prediction (argmax over the logits of the label words each row
    may take, `valid` [N, n_labels], default all). With every row taking every label: exactly 1/n_labels for any
    predictor that ignores the input, whatever its bias: 'chance'."""
    logits = scores["label_logits"] if valid is None else scores["label_logits"].masked_fill(~valid, float("-inf"))
    pred = logits.argmax(-1).numpy()
    true = np.array([r["label"] for r in rows])
    return float(np.mean([(pred[true == c] == c).mean() for c in np.unique(true)]))


def search_strength(eco, encoder, rows, lo, hi, rounds=10, tolerance=0.05, integer=False, batch_size=32,
                    device="cpu", quiet=False, factor=None):
    """Smallest corruption strength whose corrupted forget rows are no better than chance.

    Zeroth-order: only the objective's values are used. f(s) = balanced label accuracy of the rows (each row's
    answer among its own valid labels) with every row corrupted at strength s; target f(s) <= the rows' chance
    level + tolerance (1/n_labels for sentiment; the mean of 1/n_choices for multiple-choice rows). The strength grows from
    lo by `factor` (10, or 2 for integer k) until the target is met, then a log-space bisection of
    `rounds` rounds narrows the last bracket (integer strengths stop at adjacent integers). Growing
    from below finds the first crossing: at very large strengths the prediction is a function of the
    noise alone and f wanders around chance by sampling error. The smallest strength is kept so
    that retain rows the classifier flags by mistake are hurt as little as possible.
    Returns (strength, {"target", "evaluations": [...]}).
    """
    from .evaluation import predict_rows

    encoder.require_training("choosing the corruption strength")
    target = encoder.chance(rows) + tolerance
    valid = encoder.valid_mask(rows)
    factor = factor or (2.0 if integer else 10.0)
    mode, log = eco.mode, []
    eco.mode = "all"

    def f(s):
        eco.corruption.strength = s
        scores = predict_rows(eco, encoder, rows, batch_size=batch_size, device=device, desc=f"strength {s:.4g}", quiet=True)
        value = balanced_label_accuracy(scores, rows, valid)
        log.append({"strength": s, "balanced_label_accuracy": value, "met": value <= target})
        if not quiet:  # one line per evaluation: the search is a dozen forwards over a small subset
            print(f"  strength {s:.5g}: balanced label accuracy {value:.3f} (target <= {target:.3f})")
        return value <= target

    try:
        below, s = None, lo
        while not f(s):
            if s >= hi:
                print(f"warning: no strength up to {hi:.4g} takes the forget rows to chance; using it (raise the range)")
                break
            below, s = s, min(s * factor, hi)
        above = s
        if below is not None and log[-1]["met"]:
            for _ in range(rounds):
                mid = float(np.sqrt(below * above))
                if integer:
                    mid = float(round(mid))
                    if mid <= below or mid >= above:
                        break
                if f(mid):
                    above = mid
                else:
                    below = mid
        best = above
    finally:
        eco.mode = mode
    eco.corruption.strength = best
    return best, {"target": target, "evaluations": log}


# ---------------------------------------------------------------- saving and loading

def save_classifier(folder, classifier):
    """The fitted gate as classifier.joblib (a pickle): eco.py and a classifier-gated filter write it."""
    import joblib

    joblib.dump({"model": classifier.model, "threshold": classifier.threshold}, os.path.join(folder, CLASSIFIER_FILE))


def load_classifier(folder):
    """The PromptClassifier saved in `folder`. A pickle (joblib): load folders you wrote yourself or trust."""
    import joblib

    saved = joblib.load(os.path.join(folder, CLASSIFIER_FILE))
    return PromptClassifier(saved["model"], saved["threshold"])


def save_eco(folder, classifier, corruption, feature_layer, **extra):
    save_classifier(folder, classifier)
    cfg = {**corruption.describe(), "feature_layer": feature_layer, "threshold": classifier.threshold, **extra}
    with open(os.path.join(folder, ECO_FILE), "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    return cfg


def load_eco_model(folder, lm):
    """An eco.py folder around the model it started from (`lm`, loaded by utils.stages) -> (EcoLM, the folder's
    arguments.json + eco.json). Loading flows one way: utils.stages loads models, this module only wraps one.

    The classifier file is a pickle (joblib): load folders you wrote yourself or trust.
    """
    from .modeling import load_tokenizer, read_arguments

    info = read_arguments(folder)
    if info.get("stage") != "eco":
        raise UserError(f"{folder} was written by {info.get('stage')}, not by eco.py")
    for name in (ECO_FILE, CLASSIFIER_FILE):
        if not info.get("finished") or not os.path.exists(os.path.join(folder, name)):
            raise UserError(f"{folder} has no {name} or did not finish: rerun eco.py")
    with open(os.path.join(folder, ECO_FILE)) as f:
        cfg = json.load(f)
    lm.eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    tokenizer = load_tokenizer(folder)
    corruption = Corruption(cfg["corruption"], cfg["strength"], cfg.get("eco_dims"), cfg.get("noise_seed", 0))
    model = EcoLM(lm, corruption, cue_ids(tokenizer, info.get("task")), load_classifier(folder), cfg["feature_layer"])
    return model, {**info, **cfg}
