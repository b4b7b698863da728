"""The frozen reference for KL and NPO terms: computed on the fly, or cached compactly.

The released scripts pickled the full-vocabulary logits of every training row (gigabytes for
SST-2). Here the cache keeps, per row, the reference's top-k log-probs at the label-prediction
position (k ids + k values) and the log-probability of the completion: a few hundred bytes a row,
in tensors indexed by the row's `row_id`, and on disk in one file per model and k (`store_path`),
keyed by the row's tokens: a second run on the same model and rows (a Table 3 grid, a resumed run)
reads them instead of recomputing them.

Two ways to fill it:
- lazily, as rows are first seen in training (SPUL: its LLM never changes, so the prompt-free forward
  is the reference at any step); a short run pays only for the rows it trains on;
- before the first step (`ReferenceCache.fill`, the fine-tuning baselines: their weights change from
  the first step), split over the processes of a multi-process run.
The online variant runs the reference forward (prompt off, or the frozen copy) in every step.

With sharded parameters (FSDP, DeepSpeed ZeRO-3) every forward through the trained model is a collective: all
processes must run it, or the others wait forever. `lockstep` (set by the Trainer from accelerate's state) makes
every process run each reference forward of a step, on its whole micro-batch, whether or not its own rows need it.
"""
import fcntl
import hashlib
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from .losses import kl_full_rows, kl_topk_rows, label_position_logits, sequence_logprob


def _eval_mode(model):
    """Switch a model to eval mode (a model with dropout, OPT has 0.1, would give a noisy reference);
    return a function that restores its mode."""
    was = isinstance(model, torch.nn.Module) and model.training
    if was:
        model.eval()
    return (lambda: model.train()) if was else (lambda: None)


@torch.no_grad()
def reference_logits(model, input_ids, attention_mask, tail_labels):
    """The frozen reference's logits that predict the completion: [B, L, V]."""
    restore = _eval_mode(model)
    try:
        return model(input_ids, attention_mask, keep=tail_labels.shape[1] + 1, reference=True)[:, :-1]
    finally:
        restore()


def any_process(flag, device):
    """Whether `flag` holds on any process (a collective: every process must call it)."""
    from accelerate.utils import reduce

    return bool(reduce(torch.tensor([int(flag)], device=device), reduction="sum").item())


class OnlineReference:
    """Reference logits from `model(..., reference=True)` in every step, under no_grad. Exact."""

    name = "online"
    lockstep = False  # True under sharded parameters: the forward runs on every process, on its whole micro-batch

    def _logits(self, model, inputs, sel):
        labels = inputs["tail_labels"][sel]
        if self.lockstep:
            every = reference_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["tail_labels"])
            return every[sel], labels
        return reference_logits(model, inputs["input_ids"][sel], inputs["attention_mask"][sel], labels), labels

    def kl_rows(self, model, inputs, sel, logits_at_label):
        lg, labels = self._logits(model, inputs, sel)
        return kl_full_rows(label_position_logits(lg, labels), logits_at_label)

    def kl(self, model, inputs, sel, logits_at_label):
        return self.kl_rows(model, inputs, sel, logits_at_label).mean()

    def seq_logprob(self, model, inputs, sel):
        lg, labels = self._logits(model, inputs, sel)
        return sequence_logprob(lg, labels)


def row_key(item):
    """A 64-bit key of a row's tokens and completion: the same row gets the same cache entry in any run."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(item["input_ids"], dtype=np.int64).tobytes())
    h.update(np.asarray(item["labels"], dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


class ReferenceCache:
    """Per-row reference values: top-k log-probs at the label-prediction position (`idx`, `logp` [N, k])
    and the completion's log-probability (`seq` [N]), for the rows `items` (indexed by their `row_id`).
    `path`: the file it is read from at start and merged into by `save` (several runs may share it)."""

    def __init__(self, items, k=32, path=None):
        n = len(items)
        self.k, self.path = k, path
        self.keys = np.zeros(n, dtype=np.uint64)
        for i, it in enumerate(items):
            self.keys[it.setdefault("row_id", i)] = row_key(it)  # rows are numbered 0..n-1
        self.idx = torch.zeros(n, k, dtype=torch.int32)
        self.logp = torch.zeros(n, k)
        self.seq = torch.zeros(n)
        self.filled = torch.zeros(n, dtype=torch.bool)
        self.reused = self.computed = 0
        if path and os.path.exists(path):
            self.reused = self._load(path)

    def _load(self, path):
        with np.load(path) as f:
            keys, idx, logp, seq = f["keys"], f["idx"], f["logp"], f["seq"]
        if idx.shape[1] != self.k:
            return 0
        where = {int(key): j for j, key in enumerate(keys)}
        hits = [(i, where[int(key)]) for i, key in enumerate(self.keys) if int(key) in where]
        if hits:
            mine, theirs = map(list, zip(*hits))
            self.idx[mine] = torch.from_numpy(idx[theirs].astype(np.int32))
            self.logp[mine] = torch.from_numpy(logp[theirs].astype(np.float32))
            self.seq[mine] = torch.from_numpy(seq[theirs].astype(np.float32))
            self.filled[mine] = True
        return len(hits)

    def save(self):
        """Merge the filled rows into `path` (under a file lock: runs side by side share the file)."""
        if not self.path or not self.computed:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            rows = self.filled.nonzero().squeeze(-1).numpy()
            keys, idx, logp, seq = self.keys[rows], self.idx.numpy()[rows], self.logp.numpy()[rows], self.seq.numpy()[rows]
            if os.path.exists(self.path):
                with np.load(self.path) as f:
                    if f["idx"].shape[1] == self.k:
                        new = ~np.isin(f["keys"], keys)
                        keys, idx = np.r_[f["keys"][new], keys], np.r_[f["idx"][new], idx]
                        logp, seq = np.r_[f["logp"][new], logp], np.r_[f["seq"][new], seq]
            tmp = f"{self.path}.tmp{os.getpid()}.npz"
            np.savez(tmp, keys=keys, idx=idx, logp=logp, seq=seq)
            os.replace(tmp, self.path)

    @torch.no_grad()
    def compute(self, model, input_ids, attention_mask, tail_labels, row_ids):
        """Run the reference on these rows and store their values."""
        logits = reference_logits(model, input_ids, attention_mask, tail_labels)
        logp = torch.log_softmax(label_position_logits(logits, tail_labels).float(), -1)
        top = logp.topk(min(self.k, logp.shape[-1]), -1)
        rows = row_ids.cpu()
        self.idx[rows, :top.indices.shape[1]] = top.indices.cpu().int()
        self.logp[rows, :top.values.shape[1]] = top.values.cpu()
        self.seq[rows] = sequence_logprob(logits, tail_labels).float().cpu()
        self.filled[rows] = True
        self.computed += len(rows)

    def fill(self, model, items, collator, batch_size=32, device="cpu", desc="reference cache", quiet=False):
        """Fill every row of `items` that lacks a value before training starts. In a multi-process run each
        process computes a share and the shares are exchanged (accelerate's gather_object)."""
        from accelerate import PartialState

        state = PartialState()
        todo = [it for it in items if not self.filled[it["row_id"]]]
        todo.sort(key=lambda it: len(it["input_ids"]))  # less padding
        mine = todo[state.process_index::state.num_processes]
        for start in tqdm(range(0, len(mine), batch_size), desc=desc, leave=False, disable=quiet):
            part = mine[start:start + batch_size]
            b = collator([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in part])
            self.compute(model, b["input_ids"].to(device), b["attention_mask"].to(device), b["tail_labels"].to(device),
                         torch.tensor([it["row_id"] for it in part]))
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            rows = torch.tensor([it["row_id"] for it in mine], dtype=torch.long)
            shares = gather_object([(rows, self.idx[rows], self.logp[rows], self.seq[rows])])
            for rows, idx, logp, seq in shares:
                self.idx[rows], self.logp[rows], self.seq[rows], self.filled[rows] = idx, logp, seq, True
        return self

    def describe(self):
        return {"path": self.path, "k": self.k, "rows": int(self.filled.sum()), "reused": self.reused,
                "computed": self.computed}


class CachedReference:
    """Reference values from a ReferenceCache. `lazy`: rows without a value are computed when first seen
    (valid only while the model's prompt-free forward is the reference: SPUL); otherwise a missing row is
    a bug (the baselines fill every row before the first step)."""

    name = "cache"
    lockstep = False  # True under sharded parameters: when any process misses a row, every process runs the forward

    def __init__(self, cache, lazy=False):
        self.cache, self.lazy = cache, lazy

    def _rows(self, model, inputs, sel):
        rows = inputs["row_id"][sel].cpu()
        missing = ~self.cache.filled[rows]
        if missing.any() and not self.lazy:
            raise RuntimeError(f"the reference cache has no value for {int(missing.sum())} rows: it must be "
                               f"filled before the first step")
        if self.lazy and self.lockstep:
            if any_process(missing.any(), sel.device):  # the whole micro-batch: its other rows' values are valid too
                self.cache.compute(model, inputs["input_ids"], inputs["attention_mask"], inputs["tail_labels"],
                                   inputs["row_id"])
        elif missing.any():
            m = sel.nonzero().squeeze(-1)[missing.to(sel.device)]
            self.cache.compute(model, inputs["input_ids"][m], inputs["attention_mask"][m], inputs["tail_labels"][m],
                               rows[missing])
        return rows

    def kl_rows(self, model, inputs, sel, logits_at_label):
        rows = self._rows(model, inputs, sel)
        dev = logits_at_label.device
        return kl_topk_rows(self.cache.idx[rows].to(dev), self.cache.logp[rows].to(dev), logits_at_label)

    def kl(self, model, inputs, sel, logits_at_label):
        return self.kl_rows(model, inputs, sel, logits_at_label).mean()

    def seq_logprob(self, model, inputs, sel):
        return self.cache.seq[self._rows(model, inputs, sel)]


def fill_reference_cache(model, items, collator, k=32, batch_size=32, device="cpu", desc="reference cache", path=None,
                         quiet=False):
    """A ReferenceCache for `items`, filled now (before training). Returns the cache."""
    return ReferenceCache(items, k, path).fill(model, items, collator, batch_size, device, desc, quiet)


WEIGHT_FILES = (".safetensors", ".bin", ".gguf")
CONFIG_FILES = ("config.json", "adapter_config.json")


def store_path(model_checkpoints, k, dtype):
    """Where the reference values of the model `model_checkpoints` (a stage folder, a model folder, a hub id
    or the embedded name) live: inside a stage folder of ours, else under the cache root; the file name
    carries what the values depend on (the weights' files, k, the dtype)."""
    from .modeling import cache_root
    from .runs import short_name

    name = str(model_checkpoints)
    folder = os.path.abspath(name) if os.path.isdir(name) else None
    h = hashlib.sha1((folder or name).encode())
    if folder:
        # the weights and their configuration only: an evaluation's results.json or a README written into the
        # folder later must not change the key (a grid's runs around an evaluation share one store)
        for f in sorted(os.listdir(folder)):
            if f.endswith(WEIGHT_FILES) or f in CONFIG_FILES:
                st = os.stat(os.path.join(folder, f))
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    if folder and os.path.exists(os.path.join(folder, "arguments.json")):
        base = os.path.join(folder, "reference_cache")
    else:
        base = os.path.join(cache_root(), "reference", short_name(name))
    return os.path.join(base, f"top{k}-{str(dtype).replace('torch.', '')}-{h.hexdigest()[:12]}.npz")


def make_reference(kind, cache=None, lazy=False):
    return OnlineReference() if kind == "online" else CachedReference(cache, lazy)
