"""The paper's evaluation protocol: the top token over the whole vocabulary at the position that
predicts the label, compared with the true label's first token. Plus metrics beyond the paper.

Scoring needs one position per example: prompts are left-padded and the model returns the last
position's logits only (keep=1), in length-sorted batches. No full-sequence logits are formed.
"""
import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score
from tqdm.auto import tqdm

from .eco import follow_template
from .intervals import auc_ci, f1_ci, wilson
from .prompts import LeftPadCollator
from .tasks import match_label

# bootstrap settings of every interval below: seeded, so results.json is reproducible
N_BOOT, BOOT_SEED = 1000, 0


def rows_to_score(counts, max_eval_rows=None, capped_training=False):
    """The line said before a scoring pass: rows per split, and when nothing caps the test splits, that the
    training caps (--max_retain / --max_forget) do not reach them and which flag does."""
    line = f"scoring {sum(counts.values()):,} rows: " + ", ".join(f"{s} {n:,}" for s, n in counts.items())
    if max_eval_rows is not None:
        return line + f" (--max_eval_rows {max_eval_rows})"
    if any(s.startswith("test_") for s in counts):
        line += ("; the training caps (--max_retain, --max_forget) do not apply to the test splits" if capped_training
                 else "; the test splits are scored whole") + ": --max_eval_rows N caps every split"
    return line


@torch.no_grad()
def predict_rows(model, encoder, rows, batch_size=32, device="cpu", desc="scoring", quiet=False):
    """Score rows with `model(input_ids, attention_mask, keep=1)` (a TailLM or SoftPromptLM).

    Returns {"pred": top token id [N], "true_logp": log p(true label's first token) [N],
    "label_logits": logits of the label words' first tokens [N, n_labels]}, in the rows' order. A gated model
    (ECO, ICUL, a filter) is set to find the prompt's end by the cue of the encoder's template (follow_template).
    """
    follow_template(model, encoder)
    model.eval()
    prompts = [encoder.prompt_ids(r) for r in rows]
    order = np.argsort([len(p) for p in prompts], kind="stable")
    collate = LeftPadCollator(encoder.tokenizer.pad_token_id)
    label_first = torch.tensor(encoder.first_label_ids(), device=device)
    true = torch.tensor([encoder.label_ids[encoder.label_words[r["label"]]][0] for r in rows], device=device)
    pred = torch.empty(len(rows), dtype=torch.long, device=device)
    true_logp = torch.empty(len(rows), device=device)
    label_logits = torch.empty(len(rows), len(label_first), device=device)
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False, disable=quiet):
        idx = torch.as_tensor(order[start:start + batch_size], device=device)
        batch = collate([{"input_ids": prompts[i]} for i in idx.tolist()])
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), keep=1)[:, -1].float()
        pred[idx] = logits.argmax(-1)
        true_logp[idx] = torch.log_softmax(logits, -1).gather(-1, true[idx, None]).squeeze(-1)
        label_logits[idx] = logits[:, label_first]
    return {"pred": pred.cpu(), "true_logp": true_logp.cpu(), "label_logits": label_logits.cpu()}


def classification_metrics(scores, rows, encoder):
    """Accuracy and weighted F1 by the paper's protocol (the top token over the whole vocabulary against the
    right label's first token), the accuracy restricted to the labels each row may take (sentiment: every
    label word; mcqa: the question's letters), the rate of generic answers and the chance level of these rows
    (a uniform guess among each row's labels). Fractions in [0, 1], each with its 95 % interval `*_ci` =
    [lo, hi] (Wilson for the proportions, a seeded row bootstrap for F1; None for zero rows)."""
    label_first = encoder.first_label_ids()
    y_true = np.array([label_first[r["label"]] for r in rows])
    y_pred = scores["pred"].numpy()
    generic = list(set(encoder.first_label_ids(encoder.generic_labels)))
    labels = np.array([r["label"] for r in rows])
    restricted = scores["label_logits"].masked_fill(~encoder.valid_mask(rows), float("-inf")).argmax(-1).numpy()
    n = len(rows)
    correct = int((y_pred == y_true).sum())
    label_correct = int((restricted == labels).sum())
    n_generic = int(np.isin(y_pred, generic).sum())
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "accuracy_ci": wilson(correct, n),
        "f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "f1_ci": f1_ci(y_true, y_pred, n_boot=N_BOOT, seed=BOOT_SEED),
        "label_accuracy": float((restricted == labels).mean()),
        "label_accuracy_ci": wilson(label_correct, n),
        "generic_rate": float(np.isin(y_pred, generic).mean()),
        "generic_rate_ci": wilson(n_generic, n),
        "chance": encoder.chance(rows),
        "mean_true_nll": float(-scores["true_logp"].mean()),
        "n": n,
    }


def mia_auc(member_logp, nonmember_logp):
    """Loss-based membership inference: AUC of telling members (train_forget) from non-members
    (test_forget) by the log-likelihood of the true label. 0.5 means indistinguishable."""
    y = np.r_[np.ones(len(member_logp)), np.zeros(len(nonmember_logp))]
    s = np.r_[np.asarray(member_logp), np.asarray(nonmember_logp)]
    return float(roc_auc_score(y, s))


def mia_auc_ci(member_logp, nonmember_logp):
    """95 % interval [lo, hi] of mia_auc: a seeded bootstrap resampling members and non-members
    separately (two independent samples). None when either group is empty."""
    return auc_ci(member_logp, nonmember_logp, n_boot=N_BOOT, seed=BOOT_SEED)


# ---------------------------------------------------------------- the paper's generation protocol

GENERATION_PROTOCOL = ("generation: greedy decoding of up to {n} new tokens, the first label word found in the "
                       "answer (mcqa: the first answer letter standing alone) is the prediction (the paper's protocol "
                       "for the pre-trained 'vanilla' rows)")


@torch.no_grad()
def generate_rows(model, encoder, rows, max_new_tokens=5, batch_size=32, device="cpu", desc="generating", quiet=False):
    """Greedy answers (decoded new tokens) to each row's prompt, in the rows' order.

    Decodes through the same `model(input_ids, attention_mask, keep=1)` interface as scoring, so a
    pre-trained model, a prompt-tuned model and ECO are decoded alike. Left padding keeps every row's
    newest token at the last position; no KV cache (a handful of forwards per batch for 5 tokens). A gated model
    reads the encoder's template, as in predict_rows.
    """
    follow_template(model, encoder)
    model.eval()
    tok = encoder.tokenizer
    prompts = [encoder.prompt_ids(r) for r in rows]
    order = np.argsort([len(p) for p in prompts], kind="stable")
    collate = LeftPadCollator(tok.pad_token_id)
    eos = tok.eos_token_id
    out = [None] * len(rows)
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False, disable=quiet):
        idx = order[start:start + batch_size].tolist()
        batch = collate([{"input_ids": prompts[i]} for i in idx])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        new = []
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            nxt = model(ids, mask, keep=1)[:, -1].argmax(-1)
            new.append(nxt)
            if eos is not None:
                done |= nxt == eos
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones(len(idx), 1)], 1)
            if done.all():
                break
        new = torch.stack(new, 1).tolist()
        for j, i in enumerate(idx):
            seq = new[j][: new[j].index(eos)] if eos in new[j] else new[j]
            out[i] = tok.decode(seq, skip_special_tokens=True)
    return out


def generation_metrics(answers, rows, encoder):
    """Accuracy and weighted F1 of label words matched in generated answers (no match counts as wrong)."""
    y_true = np.array([r["label"] for r in rows])
    y_pred = np.array([encoder.task.match(a, encoder.label_words) for a in answers])
    generic = np.array([match_label(a, encoder.generic_labels) >= 0 for a in answers])
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "accuracy_ci": wilson(int((y_pred == y_true).sum()), len(rows)),
        "f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "f1_ci": f1_ci(y_true, y_pred, n_boot=N_BOOT, seed=BOOT_SEED),
        "matched_rate": float((y_pred >= 0).mean()),
        "generic_rate": float((generic & (y_pred < 0)).mean()),
        "n": len(rows),
    }
