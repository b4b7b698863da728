"""Inference-time baselines that need no training: in-context unlearning, a guardrail prompt and a filter.

Each wraps a frozen model it is given (utils.stages loads it) into the `model(input_ids, attention_mask, keep)`
interface of every stage, working from the plain prompt's token ids alone (no decoding, except the keyword gate):

    icul       (Pawelczyk et al., ICML 2024) k forget rows with a changed answer, then L retain rows with their
               true answers, each in the task's template (prompt + ' ' + answer word + a blank line), before the query
    guardrail  (Thaker et al. 2024; ECO's prompting baseline) an instruction before the query, GUARDRAIL below
    filter     a gate (keywords of the forget target, or ECO's prompt classifier) gives flagged queries the generic
               label; unflagged queries get the plain model's logits, bit for bit

The text a method adds goes after the query's special start tokens (BOS, when the tokenizer writes one) and
before its head, and is tokenised apart from the query, so the query keeps the ids the task gives it.
prompting.py writes what each method needs (prompting.json; classifier.joblib, icul_index.npy) and
load_prompting_model rebuilds the wrapper around the model utils.stages hands it.
"""
import json
import os
import random
import re
import sys

import numpy as np
import torch
from torch import nn

from .cli import UserError
from .eco import CueReader, load_classifier, prompt_features, prompt_mask, row_seed
from .modeling import tail_logits
from .prompts import LeftPadCollator, PromptEncoder
from .soft_prompt import compute_state, forward_on_prefix, run_prefix, shared_prefix_blocker
from .tasks import get_task

METHODS = ("icul", "guardrail", "filter")
CONFIG_FILE = "prompting.json"
INDEX_FILE = "icul_index.npy"
SEPARATOR = "\n\n"  # between ICUL's examples, and after the guardrail's instruction
# ECO's prompting baseline ("You are a model that knows absolutely nothing about {target}...") in the task's template
# (the target is named once: a list of 30 terms would otherwise double the instruction's length)
GUARDRAIL = ("### Instruction: You are a model that knows absolutely nothing about {target}. If the {what} is about "
             "{it}, answer \"{answer}\". For everything else, answer as you would." + SEPARATOR)
WHAT = {"sentiment": "text", "mcqa": "question"}
REFUSAL_LOGIT = 100.0  # a flagged query's logit of the generic label's first token; every other logit is 0


# ---------------------------------------------------------------- the forget target as words

def words(text):
    """Lower-case word tokens: what forget terms are made of and matched against."""
    return re.findall(r"[a-z0-9]+", text.lower())


def has_term(text, terms):
    """Whether any term (a word sequence) occurs in `text` as whole words."""
    padded = f" {' '.join(words(text))} "
    return any(f" {' '.join(words(t))} " in padded for t in terms)


def read_terms(path):
    """One term a line ('#' starts a comment); an empty or missing file is a one-line error."""
    if not os.path.isfile(path):
        raise UserError(f"--forget_terms {path} does not exist")
    with open(path, encoding="utf-8") as f:
        terms = [line.split("#")[0].strip() for line in f]
    terms = [t for t in terms if words(t)]
    if not terms:
        raise UserError(f"--forget_terms {path} holds no term (one term a line)")
    return terms


def query_text(tokenizer, prompt_ids, task):
    """What a keyword gate reads of a prompt: its ids decoded, without the template's own words (the head's prefix
    and the cue), so that a term such as 'sentiment' matches a query's text, not every prompt's cue. `task`: a Task
    (its training template) or a utils.tasks.Template."""
    text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    start, end = text.find(task.head_prefix.strip()), text.rfind(task.cue.strip())
    return text[start + len(task.head_prefix.strip()) if start >= 0 else 0: end if end >= 0 else len(text)]


def check_terms(terms, texts, path):
    """A terms file must match some train_forget row (error), and should match with every term (warning)."""
    hits = {t: sum(has_term(x, [t]) for x in texts) for t in terms}
    if not any(hits.values()):
        raise UserError(f"no train_forget row contains a term of --forget_terms {path}: wrong file or wrong data?")
    unused = [t for t, n in hits.items() if n == 0]
    if unused:
        print(f"warning: {len(unused)} of the {len(terms)} terms match no train_forget row: {', '.join(unused[:10])}",
              file=sys.stderr)
    return hits


def guardrail_text(answer, task, description=None, terms=None):
    """The instruction for a target in words (`description`) or a list of `terms` ('any of these: a, b')."""
    target, it = (description, "it") if description else ("any of these: " + ", ".join(terms), "any of them")
    return GUARDRAIL.format(target=target, it=it, answer=answer, what=WHAT.get(task.name, "input"))


# ---------------------------------------------------------------- ICUL's examples

def start_tokens(tokenizer):
    """The special tokens the tokenizer writes before any text (OPT: </s>; SmolLM2: none)."""
    return tokenizer("")["input_ids"]


def example_ids(encoder, row, word):
    """One in-context example as the task tokenises it: the prompt (no start tokens), ' ' + word, a blank line. The
    examples are ICUL's context, the same for every query: written in the training template only."""
    encoder.require_training("an in-context example")
    prompt = encoder.prompt_ids(row)
    n = len(start_tokens(encoder.tokenizer))
    sep = encoder.tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    return prompt[n:] + encoder.label_ids[word] + sep


def forget_answers(encoder, rows, label="flipped", seed=0):
    """The changed answer of each forget example: 'flipped' = the next label the row may take (the other one for
    two labels, ICUL's flip), 'generic' = a seeded generic label (the target SPUL trains towards)."""
    rng = random.Random(seed)
    if label == "generic":
        return [rng.choice(encoder.generic_labels) for _ in rows]
    return [encoder.label_words[(r["label"] + 1) % encoder.task.n_valid(r, len(encoder.label_words))] for r in rows]


def fitting_examples(lengths, max_length):
    """How many of these examples, longest first, fit into max_length tokens."""
    total, n = 0, 0
    for length in sorted(lengths, reverse=True):
        total += length
        if total > max_length:
            break
        n += 1
    return n


# ---------------------------------------------------------------- the wrappers

def real_rows(input_ids, attention_mask):
    """Each row's ids without its padding."""
    return [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(input_ids.tolist(), attention_mask.bool().tolist())]


class PrefixedLM(nn.Module):
    """A frozen LM whose every query is preceded by ids of its own (`contexts`), inserted after the query's start
    tokens; the longer rows are left-padded again and positions are counted from the new mask."""

    def __init__(self, lm, n_start, pad_id):
        super().__init__()
        self.lm, self.n_start, self.pad_id = lm, int(n_start), pad_id if pad_id is not None else 0

    def contexts(self, input_ids, attention_mask):
        raise NotImplementedError

    def build(self, input_ids, attention_mask):
        """The longer batch: (input_ids, attention_mask) with each row's context before its query."""
        rows = [real[:self.n_start] + list(ctx) + real[self.n_start:]
                for real, ctx in zip(real_rows(input_ids, attention_mask), self.contexts(input_ids, attention_mask))]
        return self.collate(rows, input_ids.device)

    def collate(self, rows, device):
        batch = LeftPadCollator(self.pad_id)([{"input_ids": r} for r in rows])
        return batch["input_ids"].to(device), batch["attention_mask"].to(device)

    def forward(self, input_ids, attention_mask, keep=1, reference=False):
        if reference:
            return tail_logits(self.lm, input_ids, attention_mask, keep)
        return tail_logits(self.lm, *self.build(input_ids, attention_mask), keep)


class GuardrailLM(PrefixedLM):
    """The same instruction (token ids) before every query. The start tokens and the instruction are the same for
    every row, so (for the architectures the soft prompt's shared prefix is verified on) their keys/values are
    computed once and every query runs on top of them, as SPUL's shared prefix does: the cost of a plain forward,
    not of the longer input. `shared_prefix=False`, or another architecture, runs the longer rows."""

    def __init__(self, lm, instruction_ids, n_start, pad_id, shared_prefix=True):
        super().__init__(lm, n_start, pad_id)
        self.instruction, self.shared_prefix = list(instruction_ids), shared_prefix
        self._cached_prefix = None  # (the ids and the LM's state they were computed for, keys/values)

    def contexts(self, input_ids, attention_mask):
        return [self.instruction] * len(input_ids)

    def forward(self, input_ids, attention_mask, keep=1, reference=False):
        if reference or not self.shared_prefix or shared_prefix_blocker(self.lm) is not None:
            return super().forward(input_ids, attention_mask, keep, reference)
        rows = real_rows(input_ids, attention_mask)
        starts = {tuple(r[:self.n_start]) for r in rows}
        if len(starts) != 1:  # rows with start tokens of their own: no shared prefix
            return super().forward(input_ids, attention_mask, keep, reference)
        prefix = self._prefix(list(starts.pop()) + self.instruction, input_ids.device)
        return forward_on_prefix(self.lm, prefix, *self.collate([r[self.n_start:] for r in rows], input_ids.device), keep)

    def _prefix(self, ids, device):
        """The keys/values of the start tokens + instruction, computed once for these ids, weights, dtype and
        autocast (the LM is frozen; computed afresh when grad is on)."""
        weight = self.lm.get_input_embeddings().weight
        state = (tuple(ids), id(weight), weight._version, *compute_state(self.lm))
        if torch.is_grad_enabled():
            return run_prefix(self.lm, input_ids=torch.tensor([ids], device=device))
        if self._cached_prefix is None or self._cached_prefix[0] != state:
            self._cached_prefix = (state, run_prefix(self.lm, input_ids=torch.tensor([ids], device=device)))
        return self._cached_prefix[1]


class IculLM(CueReader, PrefixedLM):
    """ICUL: k forget examples (changed answers) chosen per query, then the fixed retain examples (true answers).

    retrieval 'nearest': the k forget rows whose features (the frozen model's mean-pooled hidden state over the
    prompt, utils.eco.prompt_features) have the highest cosine similarity to the query's, nearest first: a query
    that is a forget row finds itself first. 'random': k forget rows drawn with a seed from the query's own tokens,
    so that a query gets the same examples in any batch."""

    def __init__(self, lm, forget_examples, retain_context, k, cue, n_start, pad_id, index=None, feature_layer=-1,
                 seed=0):
        super().__init__(lm, n_start, pad_id)
        self.forget, self.retain, self.k, self.cue = forget_examples, list(retain_context), int(k), list(cue)
        self.feature_layer, self.seed = feature_layer, int(seed)
        self.register_buffer("index", None if index is None else
                             nn.functional.normalize(torch.as_tensor(index, dtype=torch.float32), dim=-1), persistent=False)

    def choose(self, input_ids, attention_mask):
        """[B, k] indices of the forget examples of each query."""
        if self.index is not None:
            _, feats, _ = prompt_features(self.lm, input_ids, attention_mask, self.cue, self.feature_layer)
            sim = nn.functional.normalize(feats.float(), dim=-1) @ self.index.T
            return sim.topk(self.k, dim=-1).indices.tolist()
        pmask = prompt_mask(input_ids, attention_mask, self.cue)
        return [np.random.default_rng(row_seed(self.seed, ids[m])).choice(len(self.forget), self.k, replace=False).tolist()
                for ids, m in zip(input_ids, pmask)]

    def contexts(self, input_ids, attention_mask):
        return [[t for j in chosen for t in self.forget[j]] + self.retain
                for chosen in self.choose(input_ids, attention_mask)]


class FilterLM(CueReader, nn.Module):
    """A gate in front of a frozen LM: flagged queries answer the generic label (its first token REFUSAL_LOGIT, every
    other logit 0); the others get the plain model's logits of the same batch (bit-identical).

    gate 'keywords': the query's text (its prompt decoded, without the template's words) holds a forget term as whole
    words;
    'classifier': ECO's prompt classifier (utils.eco.PromptClassifier) on the frozen model's features."""

    def __init__(self, lm, generic_id, cue, tokenizer=None, terms=None, classifier=None, feature_layer=-1, task=None):
        super().__init__()
        if (terms is None) == (classifier is None):
            raise UserError("the filter needs either forget terms or a prompt classifier")
        self.lm, self.generic_id, self.cue, self.tokenizer = lm, int(generic_id), list(cue), tokenizer
        self.template = get_task(task).template()  # the template words the keyword gate leaves out of a query's text
        self.terms, self.classifier, self.feature_layer = terms, classifier, feature_layer
        self.last_flags = None

    def read_template(self, encoder):
        super().read_template(encoder)
        self.template = encoder.template

    def flags_and_logits(self, input_ids, attention_mask, keep=1):
        if self.classifier is not None:
            logits, feats, _ = prompt_features(self.lm, input_ids, attention_mask, self.cue, self.feature_layer, keep)
            return torch.as_tensor(self.classifier.flags(feats.detach().cpu().numpy())), logits
        logits = tail_logits(self.lm, input_ids, attention_mask, keep)
        pmask = prompt_mask(input_ids, attention_mask, self.cue)
        texts = [query_text(self.tokenizer, ids[m], self.template) for ids, m in zip(input_ids, pmask)]
        return torch.tensor([has_term(t, self.terms) for t in texts], dtype=torch.bool), logits

    def forward(self, input_ids, attention_mask, keep=1, reference=False):
        if reference:
            return tail_logits(self.lm, input_ids, attention_mask, keep)
        flags, logits = self.flags_and_logits(input_ids, attention_mask, keep)
        self.last_flags = flags
        if flags.any():
            sel = flags.nonzero().squeeze(-1).to(logits.device)
            logits = logits.clone()
            logits[sel] = 0
            logits[sel, :, self.generic_id] = REFUSAL_LOGIT
        return logits


# ---------------------------------------------------------------- saving and loading

def save_config(folder, cfg):
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(cfg, f, indent=2, default=str)


def build_model(lm, encoder, cfg, index=None, classifier=None):
    """The wrapper of a prompting.json config around `lm` (index: ICUL's forget features; classifier: the gate)."""
    tok = encoder.tokenizer
    n_start, pad = len(start_tokens(tok)), tok.pad_token_id
    method = cfg["method"]
    if method == "guardrail":
        return GuardrailLM(lm, tok(cfg["instruction"], add_special_tokens=False)["input_ids"], n_start, pad)
    if method == "icul":
        forget = [example_ids(encoder, r, r["answer"]) for r in cfg["forget_rows"]]
        retain = [t for r in cfg["retain_rows"] for t in example_ids(encoder, r, r["answer"])]
        return IculLM(lm, forget, retain, cfg["k"], encoder.cue_ids, n_start, pad,
                      index if cfg["retrieval"] == "nearest" else None, cfg.get("feature_layer", -1), cfg.get("seed", 0))
    if method == "filter":
        generic = encoder.label_ids[encoder.generic_labels[0]][0]
        return FilterLM(lm, generic, encoder.cue_ids, tok, cfg.get("terms") if classifier is None else None, classifier,
                        cfg.get("feature_layer", -1), encoder.task)
    raise UserError(f"unknown prompting method '{method}': choose one of {', '.join(METHODS)}")


def load_prompting_model(folder, lm, tokenizer):
    """A prompting.py folder around the model it started from (`lm`, loaded by utils.stages) -> (wrapper, the
    folder's arguments.json + prompting.json). A classifier gate is a pickle: load folders you trust."""
    from .cli import comma_list
    from .modeling import read_arguments

    info = read_arguments(folder)
    path = os.path.join(folder, CONFIG_FILE)
    if info.get("stage") != "prompting" or not info.get("finished") or not os.path.exists(path):
        raise UserError(f"{folder} holds no finished prompting.py run ({CONFIG_FILE} missing): rerun prompting.py")
    with open(path) as f:
        cfg = json.load(f)
    lm.eval()
    lm.requires_grad_(False)
    encoder = PromptEncoder(tokenizer, info["max_length"], comma_list(info.get("label_words") or ""),
                            comma_list(info.get("generic_labels") or ""), info.get("task"))
    index = np.load(os.path.join(folder, INDEX_FILE)) if cfg.get("retrieval") == "nearest" else None
    classifier = load_classifier(folder) if cfg.get("gate") == "classifier" else None
    return build_model(lm, encoder, cfg, index, classifier), {**info, **cfg}
