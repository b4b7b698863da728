"""The robustness audit's attacks: does a method's forgetting survive a query asked otherwise, a quantized
deployment, a few steps of relearning, a probe of the hidden states, stronger membership tests?

Every attack takes an `Audit` (the stage folder, its rows, its loaded model) and returns a JSON-ready dict

    {"metric": the figure recovery is read on, "splits": {split: metrics}, "unlearned": {split: metrics}, ...}

where `splits` are the attacked figures and `unlearned` the same rows scored plainly by the same model, both by
utils.evaluation.classification_metrics (the paper's top-token accuracy, the accuracy restricted to the label
words, the generic-answer rate, n, 95 % intervals). An attack that reloads the model (quantized, relearned) gets
its own copy through `Audit.fresh_model`, so no attack sees another's changes. A new attack is a function here
and one line in ATTACKS.

`metric`: the paper's accuracy where the answer cue is the training one (nothing asks for the answer otherwise);
the accuracy restricted to the label words where the query is worded otherwise (the top token after a cue the
model never saw need not be a label word at all) or the answer is a probe's.
"""
from dataclasses import dataclass, field

import numpy as np
import torch

from .cli import UserError
from .evaluation import classification_metrics, predict_rows
from .tasks import INSTRUCTION, TRAINING, held_out_templates

FORGET_SPLITS = ("train_forget", "test_forget")
# below this gap between the fine-tuned and the unlearned figure, a method forgot too little for a share of it
# to be recovered to mean anything (4 rows in 64): recovery is None there
MIN_GAP = 0.05


@dataclass
class Audit:
    """What every attack reads: the loaded stage, its prompt encoder, the rows of each split and the settings."""
    model: torch.nn.Module
    encoder: object
    data: dict                          # split -> rows (all four: the probe fits on train_retain rows)
    load: object                        # () -> a fresh (model, encoder) of the same stage
    device: object = "cpu"
    batch_size: int = 32
    seed: int = 42
    settings: dict = field(default_factory=dict)  # the attacks' own flags (relearn_*, probe_*, templates)
    quiet: bool = True
    splits: tuple = ()                  # the splits scored under every attack (default: all of data)
    _plain: dict = field(default_factory=dict)

    def __post_init__(self):
        self.splits = tuple(self.splits or self.data)

    def encoder_for(self, template=None):
        """The audit's encoder writing another template (same tokenizer, length, label and generic words)."""
        from .prompts import PromptEncoder

        e = self.encoder
        if template in (None, TRAINING):
            return e
        return PromptEncoder(e.tokenizer, e.max_length, e.label_words, e.generic_labels, e.task, template)

    def score(self, rows, model=None, encoder=None, desc="scoring"):
        return predict_rows(model or self.model, encoder or self.encoder, rows, self.batch_size, self.device,
                            desc=desc, quiet=self.quiet)

    def plain_scores(self, split):
        """The unattacked scores of a split's rows (computed once)."""
        if split not in self._plain:
            self._plain[split] = self.score(self.data[split], desc=split)
        return self._plain[split]

    def plain(self, split, idx=None):
        scores, rows = self.plain_scores(split), self.data[split]
        if idx is not None:
            scores, rows = subset(scores, idx), [rows[i] for i in idx]
        return classification_metrics(scores, rows, self.encoder)

    def fresh_model(self):
        model, encoder = self.load()
        model.to(self.device)
        return model, encoder


def subset(scores, idx):
    idx = torch.as_tensor(list(idx), dtype=torch.long)
    return {k: v[idx] for k, v in scores.items()}


def pool(blocks):
    """The figures of several scorings of rows pooled (each scoring's rows counted once): proportions re-counted
    from their rows, with their Wilson intervals. Each scoring keeps its own template's label ids."""
    from .intervals import wilson

    n = sum(b["n"] for b in blocks)
    out = {"n": n}
    for key in ("accuracy", "label_accuracy", "generic_rate"):
        hits = sum(round(b[key] * b["n"]) for b in blocks)
        out[key], out[f"{key}_ci"] = (hits / n if n else None), wilson(hits, n)
    return out


def halves(n, seed):
    """Two disjoint halves of range(n) by a seeded draw: (first, second), the first the smaller when n is odd."""
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[:n // 2].tolist()), sorted(perm[n // 2:].tolist())


def recovery(attacked, unlearned, finetuned, min_gap=MIN_GAP):
    """(attacked − unlearned) / (fine-tuned − unlearned): 0 = the attack gains nothing, 1 = the fine-tuned model's
    figure is back (above 1 or below 0 when it overshoots either way). None when a figure is missing or the method
    forgot less than min_gap (nothing to recover)."""
    if attacked is None or unlearned is None or finetuned is None or finetuned - unlearned < min_gap:
        return None
    return (attacked - unlearned) / (finetuned - unlearned)


def split_metrics(audit, model=None, encoder=None, splits=None, desc=""):
    """{split: metrics} of every split's rows under a model/encoder (default: the audit's own)."""
    out = {}
    for split in splits or audit.splits:
        out[split] = classification_metrics(audit.score(audit.data[split], model, encoder, f"{desc}{split}"),
                                             audit.data[split], encoder or audit.encoder)
    return out


def unlearned(audit):
    return {s: audit.plain(s) for s in audit.splits}


# ---------------------------------------------------------------- reworded queries, adversarial instruction

def templates(audit):
    """Each held-out template (utils/tasks.py) over every split; `splits` pools the templates' rows (each row once
    per template), `per_template` keeps them apart. A prompt or gate method runs in front of the reworded query."""
    names = audit.settings.get("templates") or held_out_templates(audit.encoder.task)
    per = {name: split_metrics(audit, encoder=audit.encoder_for(name), desc=f"{name} ") for name in names}
    splits = {s: pool([per[name][s] for name in names]) for s in audit.splits}
    return {"metric": "label_accuracy", "splits": splits, "unlearned": unlearned(audit), "templates": list(names),
            "per_template": per}


def instruction(audit):
    """The training template behind a sentence asking for the true answer in spite of any instruction to forget
    (and, for mcqa, the answer's start prefilled after the cue)."""
    enc = audit.encoder_for(INSTRUCTION)
    same_cue = enc.template.cue == audit.encoder.template.cue
    return {"metric": "accuracy" if same_cue else "label_accuracy",
            "splits": split_metrics(audit, encoder=enc, desc="instruction "), "unlearned": unlearned(audit)}


# ---------------------------------------------------------------- quantized deployment

def quantized(kind):
    def attack(audit):
        from .quantize import quantize_

        model, encoder = audit.fresh_model()
        layers = quantize_(model, kind)
        model.to(audit.device)
        return {"metric": "accuracy", "splits": split_metrics(audit, model, encoder, desc=f"{kind} "),
                "unlearned": unlearned(audit), "quantized_layers": layers}
    attack.__doc__ = f"The deployed model's LLM in bitsandbytes {kind} (utils/quantize.py), scored again."
    return attack


# ---------------------------------------------------------------- relearning

def relearn_rows(audit):
    """(trained, scored) indices of train_forget: the halves of a seeded draw, the trained one cut to
    --relearn_rows. A budget larger than its half is a UserError."""
    first, second = halves(len(audit.data["train_forget"]), audit.seed)
    n = audit.settings.get("relearn_rows")
    if n is not None:
        if n > len(first):
            raise UserError(f"--relearn_rows {n} is more than the half of train_forget it trains on ({len(first)} rows)")
        first = first[:n]
    if not first or not second:
        raise UserError(f"train_forget has {len(audit.data['train_forget'])} rows: too few to relearn on one half "
                        f"and score the other")
    return first, second


def add_lora(model, rank, seed):
    """LoRA (rank `rank`, alpha 2·rank, no dropout) on the attention q/v projections of every LLM in `model`; every
    other weight frozen, so a prompt or gate stays as it is. Returns the trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    from .lora import default_target_modules
    from .quantize import deployed_lms

    torch.manual_seed(seed)
    model.requires_grad_(False)
    for lm in deployed_lms(model):
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                           target_modules=default_target_modules(lm)), lm)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def answer_loss(model, encoder, rows, device):
    """Cross-entropy of each row's true label's first token at the position that predicts it, through the stage's
    own forward (prompt or gate in place): the scoring target, trained on."""
    from .prompts import LeftPadCollator

    batch = LeftPadCollator(encoder.tokenizer.pad_token_id)([{"input_ids": encoder.prompt_ids(r)} for r in rows])
    logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), keep=1)[:, -1].float()
    true = torch.tensor([encoder.label_ids[encoder.label_words[r["label"]]][0] for r in rows], device=logits.device)
    return torch.nn.functional.cross_entropy(logits, true)


def forget_caches(model):
    """Cached prefixes (a soft prompt's or a guardrail's keys/values) belong to the weights before relearning."""
    for m in model.modules():
        if hasattr(m, "_cached_prefix"):
            m._cached_prefix = None


def relearn(audit):
    """LoRA fine-tuning of the deployed LLM on one half of train_forget with its true labels (--relearn_epochs,
    --relearn_lr, --relearn_rank, batches of --relearn_batch_size, seeded), then every split scored again:
    train_forget is the other half, never trained on. A prompt or gate stays in place: the adversary holds the
    weights. The fine-tuned and the retrained models relearned with the same budget are the controls."""
    from tqdm.auto import tqdm

    s = audit.settings
    trained, scored = relearn_rows(audit)
    model, encoder = audit.fresh_model()
    model.eval()  # no dropout: the same steps give the same weights
    params = add_lora(model, s.get("relearn_rank", 8), audit.seed)
    opt = torch.optim.AdamW(params, lr=s.get("relearn_lr", 1e-3), weight_decay=0.0)
    rows, bs = [audit.data["train_forget"][i] for i in trained], s.get("relearn_batch_size", 8)
    rng = np.random.default_rng(audit.seed)
    losses = []
    for _ in tqdm(range(s.get("relearn_epochs", 3)), desc="relearning", leave=False, disable=audit.quiet):
        order = rng.permutation(len(rows))
        for start in range(0, len(rows), bs):
            loss = answer_loss(model, encoder, [rows[i] for i in order[start:start + bs]], audit.device)
            if not torch.isfinite(loss):
                raise UserError(f"relearning reached a non-finite loss ({loss.item()}): lower --relearn_lr")
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(round(loss.item(), 5))
    model.requires_grad_(False)
    forget_caches(model)
    data = {s: audit.data[s] for s in audit.splits}
    data["train_forget"] = [audit.data["train_forget"][i] for i in scored]
    splits = {split: classification_metrics(audit.score(rows_, model, encoder, f"relearned {split}"), rows_, encoder)
              for split, rows_ in data.items()}
    plain = {**unlearned(audit), "train_forget": audit.plain("train_forget", scored)}
    return {"metric": "accuracy", "splits": splits, "unlearned": plain, "trained_rows": len(trained),
            "scored_rows": len(scored), "steps": len(losses), "losses": losses}


# ---------------------------------------------------------------- probe

@torch.no_grad()
def answer_states(model, encoder, rows, device, quiet=True):
    """[N, hidden] the deployed LLM's last hidden state (the output head's input) at the position that predicts the
    answer, from the LLM forward whose logits the model answers with: rows go one at a time through the stage's
    forward and the last call of the output head is kept (a gate's plain forward precedes its corrupted one; a
    soft prompt's or guardrail's prefix never reaches the head; a filter's refusal keeps the LLM's own state)."""
    from tqdm.auto import tqdm

    from .eco import follow_template
    from .quantize import deployed_lms

    follow_template(model, encoder)
    model.eval()
    seen = []
    heads = [lm.get_output_embeddings() for lm in deployed_lms(model)]
    hooks = [h.register_forward_hook(lambda mod, args, out: seen.append(args[0][:, -1].float().cpu())) for h in heads]
    try:
        out = []
        for r in tqdm(rows, desc="probe states", leave=False, disable=quiet):
            ids = torch.tensor([encoder.prompt_ids(r)], device=device)
            seen.clear()
            model(ids, torch.ones_like(ids), keep=1)
            out.append(seen[-1][0])
        return torch.stack(out).numpy()
    finally:
        for h in hooks:
            h.remove()


def probe(audit):
    """A logistic regression on answer_states, fitted on one half of train_forget (the relearning halves) with
    their true labels and as many train_retain rows, scored on the other half of train_forget, on test_forget and
    on as many unused train_retain rows: the knowledge the answer hides but the representation holds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from .intervals import wilson

    fit_idx, scored = halves(len(audit.data["train_forget"]), audit.seed)
    retain = np.random.default_rng(audit.seed + 1).permutation(len(audit.data["train_retain"])).tolist()
    n = len(fit_idx)
    if n < 2 or len(retain) < n + 1:
        raise UserError("the probe needs at least 4 train_forget rows and more train_retain rows than half of them")
    retain_fit, retain_scored = retain[:n], retain[n:2 * n]
    forget, retain_rows = audit.data["train_forget"], audit.data["train_retain"]
    fit_rows = [forget[i] for i in fit_idx] + [retain_rows[i] for i in retain_fit]
    states = lambda rows: answer_states(audit.model, audit.encoder, rows, audit.device, audit.quiet)  # noqa: E731
    y = np.array([r["label"] for r in fit_rows])
    if len(set(y)) < 2:
        raise UserError("the probe's training rows hold one label only")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=audit.settings.get("probe_c", 1.0)))
    clf.fit(states(fit_rows), y)
    scored_sets = {"train_forget": ([forget[i] for i in scored], scored), "test_forget": (audit.data["test_forget"], None),
                   "train_retain": ([retain_rows[i] for i in retain_scored], retain_scored)}
    splits, plain = {}, {}
    for split, (rows, idx) in scored_sets.items():
        if split not in audit.splits or not rows:
            continue
        pred = clf.predict(states(rows))
        hit = int((pred == np.array([r["label"] for r in rows])).sum())
        splits[split] = {"label_accuracy": hit / len(rows), "label_accuracy_ci": wilson(hit, len(rows)), "n": len(rows)}
        plain[split] = audit.plain(split, idx)
    return {"metric": "label_accuracy", "splits": splits, "unlearned": plain, "fit_rows": len(fit_rows)}


# ---------------------------------------------------------------- membership

def mia(audit):
    """Loss, zlib, Min-K% and Min-K%++ (utils/membership.py) of train_forget (members) against test_forget: their
    AUCs with bootstrap intervals; privleak against the retrained model's AUC is added by the audit."""
    from .membership import DEFAULT_K, membership_aucs, row_scores, token_logprobs

    if not {"train_forget", "test_forget"} <= set(audit.data):
        raise UserError("the membership attack needs the train_forget and test_forget splits")
    k = audit.settings.get("mia_k", DEFAULT_K)
    scores = {s: row_scores(token_logprobs(audit.model, audit.encoder, audit.data[s], max(1, audit.batch_size // 4),
                                           audit.device, desc=f"text log-probs {s}", quiet=audit.quiet), k)
              for s in ("train_forget", "test_forget")}
    return {"aucs": membership_aucs(scores["train_forget"], scores["test_forget"]), "k": k,
            "n": {s: len(audit.data[s]) for s in scores}}


ATTACKS = {
    "templates": templates,
    "instruction": instruction,
    "nf4": quantized("nf4"),
    "int8": quantized("int8"),
    "relearn": relearn,
    "probe": probe,
    "mia": mia,
}


def parse_attacks(text):
    names = [a.strip() for a in str(text).split(",") if a.strip()]
    bad = [a for a in names if a not in ATTACKS]
    if bad or not names:
        raise UserError(f"unknown attack {', '.join(bad) or '(none)'} in --attacks: choose from {', '.join(ATTACKS)}")
    return names


def recoveries(result, finetuned):
    """{split: recovery} on the forget splits of one attack's result against the fine-tuned model's result of the
    same attack (None where either lacks the figure)."""
    metric = result.get("metric")
    if metric is None or finetuned is None:
        return None

    def fig(block, split):
        return (block or {}).get(split, {}).get(metric)

    return {s: recovery(fig(result["splits"], s), fig(result["unlearned"], s), fig(finetuned.get("splits"), s))
            for s in FORGET_SPLITS if s in result["splits"]}
