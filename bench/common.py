"""Shared helpers of the benchmarks (imported by bench/*.py; running this file does nothing).

Flags, real SST-2 rows and batches, one training step as the Trainer takes it, timing with the
device synchronised (`time_alternating`: one warm-up of every variant, then repeats that alternate
A B C A B C ... so that a changing machine load hits every variant alike), figures as median with
min-max (`summary`), ratios taken pair by pair within a repeat (`paired_ratio`), peak memory (CUDA
allocator, or the process's resident set on the CPU), the machine, thread count, library versions
and load average at the start and the end, and the results JSON in bench/results/.
"""
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# the benchmarks switch checkpointing as utils.training does, by the name transformers 5 deprecates
warnings.filterwarnings("ignore", message="`gradient_checkpointing_(enable|disable)` is deprecated", category=FutureWarning)

SST2_RETAIN, SST2_FORGET = 46_331, 1_425  # train_retain / train_forget rows of the paper's SST-2 split


def parser(doc, name, batch_size=32, repeats=5):
    from utils.cli import make_parser

    p = make_parser(doc)
    p.add_argument("--model", default="smollm2-135m", help="hub id, local folder or smollm2-135m (embedded)")
    p.add_argument("--model_checkpoints", default=None, help="a qlora.py folder: benchmark its merged model instead of --model")
    p.add_argument("--data_dir", default=None, help="SST-2 split folder (default ../shared/data/sst2)")
    p.add_argument("--batch_size", type=int, default=batch_size, help=f"rows per training step (default {batch_size})")
    p.add_argument("--forget_rows", type=int, default=None,
                   help="forget rows in each batch (default: SST-2's share, 1,425 of 47,756, at least 1)")
    p.add_argument("--repeats", "--steps", dest="repeats", type=int, default=repeats,
                   help=f"timed repeats of every variant, alternating, after one warm-up of each (default {repeats})")
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

    if args.batch_size < 2 or args.repeats < 1:
        raise UserError("--batch_size must be at least 2 and --repeats at least 1")
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


def sst2_mean_tokens(encoder, args, n=2000):
    """Mean real tokens per SST-2 training row (prompt + label), over a seeded draw of n rows with SST-2's
    share of forget rows: what one epoch's rows cost per row."""
    from utils.methods import build_training_rows

    n_forget = max(1, round(n * SST2_FORGET / (SST2_FORGET + SST2_RETAIN)))
    rows = build_training_rows(encoder, sst2_rows(args, n - n_forget, n_forget, offset=3), "spul", args.seed)
    return sum(len(r["input_ids"]) for r in rows) / len(rows)


def reference_cache(model, items, collate, args, dev):
    """The frozen model's top-k reference values for `items` (a ReferenceCache), computed before timing: spul.py
    computes a row's values the first time it sees the row and reads them afterwards (and in later runs on the
    same model), so a training step of any epoch after the first reads them, as the timed steps do."""
    from utils.reference import fill_reference_cache

    return fill_reference_cache(model, items, collate, k=args.kl_topk, batch_size=args.batch_size, device=dev, quiet=True)


def p_values(text):
    from utils.cli import UserError

    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise UserError(f"--p_values takes positive integers separated by commas, got '{text}'")
    return vals


def to_device(batch, dev):
    return {k: v.to(dev) for k, v in batch.items()}


def real_tokens(batch):
    return int(batch["attention_mask"].sum())


def str2bool(s):
    from utils.cli import str2bool as parse

    return parse(s)


def train_step(model, optimizer, batch, objective, reference=None, weights=None, max_grad_norm=0.3, update_timer=None):
    """One optimiser step as TailLossTrainer takes it: tail logits, objective, backward, clip, step.
    `update_timer`: a list the seconds of the clipping + optimiser step alone are appended to."""
    from utils.methods import LossContext

    model.train()
    labels = batch["tail_labels"]
    with autocast(batch["input_ids"].device):
        logits = model(batch["input_ids"], batch["attention_mask"], keep=labels.shape[1] + 1)[:, :-1]
        terms = objective(LossContext(model, batch, logits, reference), **(weights or {}))
    terms["loss"].backward()
    if update_timer is not None:
        sync()
        t = time.perf_counter()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if update_timer is not None:
        sync()
        update_timer.append(time.perf_counter() - t)
    return float(terms["loss"].detach())


def autocast(dev):
    """bf16 autocast on CUDA when the weights are bf16-capable (as the Trainer's bf16=True), else nothing."""
    import contextlib

    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def optimizer_state_bytes(optimizer):
    """Bytes of the tensors an optimiser holds between steps (AdamW: two moments per parameter, and its step)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


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


def summary(xs):
    """{"median", "min", "max", "n"} of a list of numbers: how every figure is reported."""
    xs = [float(x) for x in xs]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def paired_ratios(times, num, den):
    """times[num][i] / times[den][i] for every repeat i: both sides measured within the same repeat."""
    return [a / b for a, b in zip(times[num], times[den])]


def paired_ratio(times, num, den):
    """summary() of the pair-by-pair ratios num / den."""
    return summary(paired_ratios(times, num, den))


def time_alternating(variants, repeats, warm_up=True, label="timed repeat"):
    """Time every variant (a dict name -> function of no arguments): one warm-up call of each (`warm_up`:
    True, or a dict name -> a cheaper warm-up function, or False for none), then `repeats` rounds that call
    each variant once, in order (A B C A B C ...), the device synchronised around every call. Returns
    ({name: [seconds per repeat]}, {name: the last call's result})."""
    out = {}
    if warm_up:
        for name, f in variants.items():
            (warm_up.get(name, f) if isinstance(warm_up, dict) else f)()
            sync()
    times = {name: [] for name in variants}
    for i in range(repeats):
        print(f"\r{label} {i + 1}/{repeats}", end="", flush=True, file=sys.stderr)
        for name, f in variants.items():
            t, out[name] = timed(f)
            times[name].append(t)
    print(file=sys.stderr)
    return times, out


def fmt(s, scale=1.0):
    """A summary() as text, 'median (min-max)', every value multiplied by `scale`."""
    return f"{_fmt(s['median'] * scale)} ({_fmt(s['min'] * scale)}-{_fmt(s['max'] * scale)})"


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


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


def peak_alternating(variants, repeats, held=None, label="memory repeat"):
    """Peak memory each variant (a dict name -> function) adds while it runs, `repeats` times in alternation:
    PeakMemory over one call, plus `held[name]()` (bytes the variant keeps between calls and that were already
    held at the start, e.g. its optimiser state). Returns {name: [bytes per repeat]}."""
    held = held or {}
    out = {name: [] for name in variants}
    for i in range(repeats):
        print(f"\r{label} {i + 1}/{repeats}", end="", flush=True, file=sys.stderr)
        for name, f in variants.items():
            extra = held[name]() if name in held else 0
            with PeakMemory() as m:
                f()
            out[name].append(m.peak + extra)
    print(file=sys.stderr)
    return out


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
            "load_average_at_start": load_average(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
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
        return f"{x:.3g}" if abs(x) < 1e3 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def mib(n):
    return n / 2**20


def machine_line(env):
    """One line: device, threads and the load average at the start and now."""
    return (f"{env['device']}, {env['torch_threads']} threads, load average {env['load_average_at_start']} at the "
            f"start, {load_average()} now")


def write_results(path, env, args, results):
    """The results JSON: environment (with the load average at the end), arguments, results."""
    env["load_average_at_end"] = load_average()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"environment": env, "arguments": vars(args), "results": results}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"\nwrote {os.path.relpath(path, os.getcwd())}")
    return payload


def run(main):
    from utils.cli import run_main

    run_main(main)
