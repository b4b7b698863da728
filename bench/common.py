"""Shared helpers of the benchmarks (imported by bench/*.py; running this file does nothing).

Flags, real SST-2 rows and batches, one training step as the Trainer takes it, timing with the
device synchronised, peak memory (CUDA allocator, or the process's resident set on the CPU), the
machine and library versions, and the results JSON in bench/results/.
"""
import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SST2_RETAIN, SST2_FORGET = 46_331, 1_425  # train_retain / train_forget rows of the paper's SST-2 split


def parser(doc, name, batch_size=16, steps=5):
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="hub id, local folder or smollm2-135m (embedded)")
    p.add_argument("--model_checkpoints", default=None, help="a qlora.py folder: benchmark its merged model instead of --model")
    p.add_argument("--data_dir", default=None, help="SST-2 split folder (default ../shared/data/sst2)")
    p.add_argument("--batch_size", type=int, default=batch_size, help=f"rows per training step (default {batch_size})")
    p.add_argument("--forget_rows", type=int, default=None,
                   help="forget rows in each batch (default: SST-2's share, 1,425 of 47,756, at least 1)")
    p.add_argument("--steps", type=int, default=steps, help=f"timed steps per variant, after one warm-up step (default {steps})")
    p.add_argument("--max_length", type=int, default=1024, help="max tokens per row (SST-2 rows are far shorter)")
    p.add_argument("--ptuning_num_tokens", type=int, default=30, help="SPUL's p")
    p.add_argument("--kl_topk", type=int, default=32, help="k of the compact KL cache (spul.py's default)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="dtype of the LLM weights (auto: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", f"{name}.json"), help="results JSON")
    return p


def check(args):
    from utils.cli import UserError

    if args.batch_size < 2 or args.steps < 1:
        raise UserError("--batch_size must be at least 2 and --steps at least 1")
    if args.forget_rows is None:
        args.forget_rows = max(1, round(args.batch_size * SST2_FORGET / (SST2_FORGET + SST2_RETAIN)))
    if not 0 < args.forget_rows < args.batch_size:
        raise UserError(f"--forget_rows must be in 1..{args.batch_size - 1}")
    args.data_dir = args.data_dir or _default_data_dir()


def _default_data_dir():
    from utils.cli import UserError
    from utils.data import default_data_dir

    d = default_data_dir()
    if d is None:
        raise UserError("no SST-2 folder beside the checkout (../shared/data/sst2): give --data_dir")
    return d


# ---------------------------------------------------------------- model and data

def setup(args):
    """Seed, record the environment, load the model and say what runs where: (env, tokenizer, lm, model name)."""
    import torch

    torch.manual_seed(args.seed)
    env = environment()
    tokenizer, lm, model_name = load_lm(args)
    print(f"{model_name} on {env['device']}; torch {env['torch']}, transformers {env['transformers']}")
    return env, tokenizer, lm, model_name


def load_lm(args):
    """(tokenizer, causal LM, model name): the merged qlora model when --model_checkpoints is given."""
    from utils.modeling import load_merged_model, load_model, load_tokenizer, resolve_dtype

    dtype = resolve_dtype(args.precision)
    if args.model_checkpoints:
        lm, info = load_merged_model(args.model_checkpoints, dtype=dtype)
        return load_tokenizer(args.model_checkpoints), lm, f"{info['model_name']} + {args.model_checkpoints} (merged)"
    return load_tokenizer(args.model), load_model(args.model, dtype=dtype), args.model


def sst2_rows(args, n_retain, n_forget, offset=0):
    """Seeded draws of real train_retain / train_forget rows ({"text", "label"})."""
    import random

    from utils.data import load_splits

    data = load_splits(data_dir=args.data_dir, splits=("train_retain", "train_forget"))
    out = {}
    for split, n in (("train_retain", n_retain), ("train_forget", n_forget)):
        idx = random.Random(args.seed + offset).sample(range(len(data[split])), n)
        out[split] = [data[split][i] for i in idx]
    return out


def encoder_for(tokenizer, args):
    from utils.prompts import PromptEncoder

    return PromptEncoder(tokenizer, args.max_length)


def to_device(batch, dev):
    return {k: v.to(dev) for k, v in batch.items()}


def real_tokens(batch):
    return int(batch["attention_mask"].sum())


def train_step(model, optimizer, batch, objective, reference=None, weights=None, max_grad_norm=0.3):
    """One optimiser step as TailLossTrainer takes it: tail logits, objective, backward, clip, step."""
    from utils.methods import LossContext

    model.train()
    labels = batch["tail_labels"]
    with autocast(batch["input_ids"].device):
        logits = model(batch["input_ids"], batch["attention_mask"], keep=labels.shape[1] + 1)[:, :-1]
        terms = objective(LossContext(model, batch, logits, reference), **(weights or {}))
    terms["loss"].backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(terms["loss"].detach())


def autocast(dev):
    """bf16 autocast on CUDA when the weights are bf16-capable (as the Trainer's bf16=True), else nothing."""
    import contextlib

    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def warm_up(model, batch):
    """One forward and backward, gradients dropped: the process's one-off costs (kernel setup,
    autograd threads, allocator pools) are paid before anything is measured."""
    model.train()
    with autocast(batch["input_ids"].device):
        model(batch["input_ids"], batch["attention_mask"], keep=batch["tail_labels"].shape[1] + 1).float().mean().backward()
    model.zero_grad(set_to_none=True)
    sync()


def param_bytes(module, trainable_only=False):
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------- measuring

def sync(dev=None):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """(seconds, fn's result), the device synchronised on both sides."""
    sync()
    t = time.perf_counter()
    r = fn()
    sync()
    return time.perf_counter() - t, r


def median(xs):
    return statistics.median(xs)


_libc = None


def _malloc(mmap_threshold):
    """glibc: serve allocations above `mmap_threshold` with mmap, so freed tensors leave the
    resident set at once and RSS follows live memory (the default, adaptive threshold keeps freed
    blocks in the heap: a later variant would look cheaper than it is)."""
    global _libc
    try:
        _libc = _libc or ctypes.CDLL("libc.so.6")
        _libc.mallopt(-3, int(mmap_threshold))  # M_MMAP_THRESHOLD; setting it turns the adaptive threshold off
        _libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory a block adds over what was held when it started, in bytes (`.peak`).

    CUDA: torch.cuda.max_memory_allocated against memory_allocated at the start. CPU: the resident
    set (/proc/self/statm), sampled every millisecond by a thread, against its value at the start,
    with glibc told to return freed blocks (see _malloc); timing runs after it with the usual threshold.
    """

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            sync()
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.exact = _malloc(128 * 1024)
        self.base = rss_bytes()
        self.max = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.max = max(self.max, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            sync()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return False
        self._stop.set()
        self._thread.join()
        self.peak = max(self.max, rss_bytes()) - self.base
        _malloc(32 * 1024 * 1024)  # glibc's largest adaptive threshold: fast reuse again for the timing
        return False


def measure_method():
    return ("torch.cuda.max_memory_allocated - memory_allocated at the start" if torch.cuda.is_available()
            else "peak resident set (/proc/self/statm, sampled every 1 ms) - resident set at the start; glibc mmap threshold 128 KiB")


# ---------------------------------------------------------------- reporting

def environment():
    import peft
    import transformers

    if torch.cuda.is_available():
        dev = f"CUDA: {torch.cuda.get_device_name(0)}"
    else:
        model = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
        except OSError:
            pass
        dev = f"CPU: {model}"
    return {"device": dev, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def table(headers, rows):
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x):
    if isinstance(x, float):
        if x == 0 or math.isnan(x):
            return f"{x:g}"
        return f"{x:.3g}" if abs(x) < 1e4 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def mib(n):
    return n / 2**20


def write_results(path, env, args, results):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"environment": env, "arguments": vars(args), "results": results}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"\nwrote {os.path.relpath(path, os.getcwd())}")
    return payload


def run(main):
    from utils.cli import run_main

    run_main(main)
