"""The frozen reference for KL and NPO terms: computed on the fly, or cached compactly once.

The released scripts pickled the full-vocabulary logits of every training row (gigabytes for
SST-2). Here the cache keeps, per row, the reference's top-k log-probs at the label-prediction
position (k ids + k values) and the log-probability of the completion: a few hundred bytes a row.
The online variant runs the reference forward (prompt off, or the frozen copy) in every step.
"""
import numpy as np
import torch
from tqdm.auto import tqdm

from .losses import kl_full, kl_topk, label_position_logits, sequence_logprob


class OnlineReference:
    """Reference logits from `model(..., reference=True)` in every step, under no_grad. Exact.

    The reference forward runs in eval mode, as the cache is filled: a model with dropout (OPT has
    0.1) would otherwise give a noisy reference that changes from one call to the next."""

    name = "online"

    def _logits(self, model, inputs, sel):
        labels = inputs["tail_labels"][sel]
        was_training = isinstance(model, torch.nn.Module) and model.training
        if was_training:
            model.eval()
        try:
            with torch.no_grad():
                lg = model(inputs["input_ids"][sel], inputs["attention_mask"][sel], keep=labels.shape[1] + 1,
                           reference=True)[:, :-1]
        finally:
            if was_training:
                model.train()
        return lg, labels

    def kl(self, model, inputs, sel, logits_at_label):
        lg, labels = self._logits(model, inputs, sel)
        return kl_full(label_position_logits(lg, labels), logits_at_label)

    def seq_logprob(self, model, inputs, sel):
        lg, labels = self._logits(model, inputs, sel)
        return sequence_logprob(lg, labels)


class CachedReference:
    """Reference values stored in the dataset items by `fill_reference_cache` (fields ref_*)."""

    name = "cache"

    def kl(self, model, inputs, sel, logits_at_label):
        return kl_topk(inputs["ref_idx"][sel], inputs["ref_logp"][sel], logits_at_label)

    def seq_logprob(self, model, inputs, sel):
        return inputs["ref_seq_logp"][sel]


@torch.no_grad()
def fill_reference_cache(model, items, collator, k=32, batch_size=32, device="cpu", desc="reference cache"):
    """Run the reference once over `items` and store ref_idx/ref_logp (top-k) and ref_seq_logp in them."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))  # less padding
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[start:start + batch_size]
        batch = collator([{"input_ids": items[i]["input_ids"], "labels": items[i]["labels"]} for i in idx])
        labels = batch["tail_labels"].to(device)
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                       keep=labels.shape[1] + 1, reference=True)[:, :-1]
        logp = torch.log_softmax(label_position_logits(logits, labels).float(), -1)
        top = logp.topk(min(k, logp.shape[-1]), -1)
        seq = sequence_logprob(logits, labels)
        for j, i in enumerate(idx):
            # compact arrays (k·8 bytes a row), not Python lists (~9x larger)
            items[i]["ref_idx"] = top.indices[j].cpu().numpy().astype(np.int32)
            items[i]["ref_logp"] = top.values[j].cpu().numpy().astype(np.float32)
            items[i]["ref_seq_logp"] = float(seq[j])
    model.train(was_training)
    return items


def make_reference(kind):
    return {"online": OnlineReference, "cache": CachedReference}[kind]()
