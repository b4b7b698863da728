"""The task's prompt template, label-only masking, truncation that keeps the label, and collation.

Every example ends with its completion (the label tokens). Batches are padded on the *left*, so
the label tokens sit at the same final positions in every row, also after soft-prompt tokens are
prepended: the position that predicts the label is always -(n_label_tokens + 1). That lets the
model compute logits for the last few positions only (`logits_to_keep`). What a prompt says is the
task's (utils/tasks.py): head (cut to fit) + body + cue (kept whole), in the task's training template unless
the encoder is given a held-out one (scoring only: training refuses it, see PromptEncoder.require_training).
"""
import random

import numpy as np
import torch

from .cli import UserError
from .tasks import TRAINING, Sentiment, get_task

TEXT_PREFIX = Sentiment.head_prefix
QUESTION = Sentiment.cue
GENERIC_LABELS = Sentiment.generic_labels
IGNORE = -100


# What a piece of the prompt follows when its ids are taken out of context: a word, as a prompt's text ends
ANCHOR = "x"


def piece_ids(tokenizer, prefix, piece):
    """Token ids of `piece` as it is tokenised after `prefix`: ids(prefix + piece) minus ids(prefix), so that a
    prompt written in pieces has the ids of its whole text. A SentencePiece tokenizer (LLaMA-2) gives every text
    it is handed a dummy-prefix '▁'; tokenised alone, a piece would carry one where the whole text has none. When a
    token spans the boundary (prefix's ids not a prefix of the whole's), no split of the whole text's ids gives
    the piece: its ids alone then."""
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full = tokenizer(prefix + piece, add_special_tokens=False)["input_ids"]
    if full[: len(head)] != head:
        return tokenizer(piece, add_special_tokens=False)["input_ids"]
    return full[len(head):]


def cue_ids(tokenizer, task=None, template=None):
    """The tokens of the cue of the task's template (None: its training template), the prompt's end, as
    PromptEncoder writes them: in context after a word (a prompt's text precedes the cue), so ECO's prompt mask
    finds the very ids the encoder emits."""
    return piece_ids(tokenizer, ANCHOR, get_task(task).template(template).cue)


def label_token_ids(tokenizer, word, cue=QUESTION):
    """Token ids of ' word' as it follows the prompt's cue (tokenised in context, so merges match)."""
    head = tokenizer(cue, add_special_tokens=False)["input_ids"]
    full = tokenizer(cue + " " + word, add_special_tokens=False)["input_ids"]
    if full[: len(head)] != head or len(full) == len(head):
        raise UserError(f"the tokenizer merges the label '{word}' into the prompt; cannot mask it")
    return full[len(head):]


class PromptEncoder:
    """Turns a task's rows into token ids with the label (or a given completion) masked in.

    `task`: a name of utils.tasks.TASKS (default sentiment); label and generic words default to the task's.
    `template`: None writes the task's training template; the name of a held-out template (utils.tasks.
    held_out_templates) or 'instruction' writes the prompt with it, for scoring only: the label words are the same,
    tokenised after that template's cue."""

    def __init__(self, tokenizer, max_length, label_words=None, generic_labels=None, task=None, template=None):
        self.task = get_task(task)
        self.template = self.task.template(template)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.label_words = tuple(label_words or self.task.label_words)
        self.generic_labels = tuple(generic_labels or self.task.generic_labels)
        clash = {w.lower() for w in self.label_words} & {w.lower() for w in self.generic_labels}
        if clash:
            raise UserError(f"the generic label {', '.join(sorted(clash))} is also a label word; choose --generic_labels "
                            f"outside {', '.join(self.label_words)}")
        self.label_ids = {w: label_token_ids(tokenizer, w, self.template.cue) for w in self.label_words + self.generic_labels}
        firsts = [self.label_ids[w][0] for w in self.label_words + self.generic_labels]
        if len(set(firsts)) != len(firsts):
            raise UserError("two label words share their first token; the first-token metric cannot tell them apart")
        self.cue_ids = cue_ids(tokenizer, self.task, template)
        self.longest_label = longest = max(len(v) for v in self.label_ids.values())
        self.head_min = len(tokenizer(self.template.head_prefix)["input_ids"])
        self.min_length = self.head_min + len(self.cue_ids) + longest
        if max_length < self.min_length:
            raise UserError(f"--max_length {max_length} cannot hold the prompt and the label (needs at least {self.min_length})")

    def require_training(self, what):
        """Refuse `what`, a step of a training stage, unless this encoder writes the training template: a held-out
        template measures how forgetting holds on queries worded otherwise, so no stage may train or select on it."""
        if self.template.name != TRAINING:
            raise UserError(f"{what} needs the {self.task.name} task's training template; the template "
                            f"'{self.template.name}' is held out for scoring, no training stage may use it")

    def first_label_ids(self, words=None):
        return [self.label_ids[w][0] for w in (words or self.label_words)]

    def prompt_ids(self, row, room=None):
        """Prompt tokens (no completion) of a row; the head is cut so that `room` completion tokens still fit.

        By default room is the longest label's length, so that a row's prompt is the same for every
        completion and at evaluation: a memorised row is scored on exactly the prompt it was trained on."""
        head, body, cue = self.prompt_parts(row, room)
        return head + body + cue

    def prompt_parts(self, row, room=None):
        """The prompt's three parts as prompt_ids joins them: (head ids as kept, body ids, cue ids)."""
        row = self.task.as_row(row)
        text = self.task.head(row, self.template)
        head = self.tokenizer(text)["input_ids"]
        # the body in context after the whole head, so that the ids are the whole text's (only the head's are cut);
        # the cue has one tokenisation (in context after a word), by which ECO finds the prompt's end
        body_text = self.task.body(row, self.label_words, self.template)
        body = piece_ids(self.tokenizer, text, body_text) if body_text else []
        budget = self.max_length - len(body) - len(self.cue_ids) - (self.longest_label if room is None else room)
        if budget < self.head_min:  # the parts that are never cut do not fit
            raise UserError(f"{self.task.describe(row)} needs --max_length >= {self.max_length - budget + self.head_min} "
                            f"to keep its choices and answer (--max_length is {self.max_length})")
        return head[:budget], body, self.cue_ids

    def encode(self, row, completion):
        """input_ids = prompt + completion tokens; labels = IGNORE except on the completion tokens: a training
        example, so the training template only."""
        self.require_training("a training example")
        comp = self.label_ids[completion]
        prompt = self.prompt_ids(row)
        return {"input_ids": prompt + comp, "labels": [IGNORE] * len(prompt) + comp}

    def encode_rows(self, rows, completion="label", role=0, seed=0):
        """Encode rows towards their true label ('label') or a seeded generic label ('generic')."""
        rng = random.Random(seed)
        out = []
        for r in rows:
            word = self.label_words[r["label"]] if completion == "label" else rng.choice(self.generic_labels)
            item = self.encode(r, word)
            item["role"] = role
            out.append(item)
        return out

    def valid_mask(self, rows):
        """[N, n_labels] bool: the label words each row may answer with (a question's first len(choices) letters)."""
        n = torch.tensor([self.task.n_valid(r, len(self.label_words)) for r in rows], dtype=torch.long)
        return torch.arange(len(self.label_words))[None] < n[:, None]

    def chance(self, rows):
        return self.task.chance(rows, len(self.label_words))


def _left_pad(seqs, value):
    width = max(len(s) for s in seqs)
    return torch.tensor([[value] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)


class LeftPadCollator:
    """Left-pads input_ids; returns the completion labels right-aligned as `tail_labels` [B, L].

    tail_labels[:, j] is predicted by the logits at position -(L + 1) + j, so a model that returns
    the last L + 1 positions' logits gives exactly what the loss needs (logits[:, :-1]).
    Extra numeric fields of the items (role, reference values) are stacked as tensors.
    """

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, items):
        ids = [it["input_ids"] for it in items]
        batch = {"input_ids": _left_pad(ids, self.pad_id),
                 "attention_mask": _left_pad([[1] * len(s) for s in ids], 0)}
        if "labels" in items[0]:
            tails = []
            for it in items:
                lab = it["labels"]
                n = next(i for i, t in enumerate(lab) if t != IGNORE)
                tails.append(lab[n:])
            batch["tail_labels"] = _left_pad(tails, IGNORE)
        for k in items[0]:
            if k not in ("input_ids", "labels", "text"):
                vals = [it[k] for it in items]
                batch[k] = torch.as_tensor(np.stack(vals)) if isinstance(vals[0], np.ndarray) else torch.tensor(vals)
        return batch


def position_ids_from_mask(mask):
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
