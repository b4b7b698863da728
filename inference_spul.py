"""Evaluate a checkpoint of any stage on the four unlearning splits, by the paper's protocol.

    python inference_spul.py --dataset=sst2 --model_checkpoints=runs/spul-p30-a0.5-b0.5-f1.0 --forget_size=1.0
    python inference_spul.py --model_checkpoints=smollm2-135m --data_dir=../shared/data/sst2 --max_eval_rows=200

--model_checkpoints is a pre-trained model (hub id, model folder or smollm2-135m) or a folder written
by qlora.py, spul.py, baselines.py, eco.py or prompting.py; earlier stages are found through its arguments.json.
Metrics per split: accuracy and weighted F1 of the top token over the whole vocabulary at the position
that predicts the label (the paper's protocol; for multiple-choice rows the label is the answer letter),
accuracy restricted to the label words a row may take (mcqa: its own choices' letters), the rate of
generic answers, the chance level of the split's rows (a uniform guess among each row's labels), and a
loss-based membership-inference AUC (train_forget vs test_forget; 0.5 is ideal after unlearning). --generate adds the paper's protocol for the pre-trained model (greedy, up to 5 new
tokens, label word matched); it is on by default for a pre-trained model only.

Writes results.json into the checkpoint folder (under runs/ for a pre-trained model) or --output_path,
and prints the table in the paper's layout. Data settings the stage trained with (--dataset, --data_dir,
--forget_size, --max_length, the row caps) are reused unless given. Results of other settings are never
replaced without --overwrite; --resume reuses results of the same settings.
"""
import os
import sys
import time

from utils.cli import (UserError, add_bool, add_data_args, add_model_args, make_parser, positive_int, run_main,
                       set_seed, str2bool)

SPLITS = ("train_retain", "train_forget", "test_retain", "test_forget")


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--model_checkpoints", required=True,
                   help="a stage folder (qlora/spul/baselines/eco/prompting) or a pre-trained model (hub id, folder, smollm2-135m)")
    add_data_args(p, child=True)
    add_model_args(p)
    # None = take the value the stage trained with (arguments.json), else the usual default
    p.set_defaults(forget_size=None)
    g = p.add_argument_group("evaluation")
    g.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits to evaluate (default: all four)")
    g.add_argument("--max_eval_rows", type=positive_int, default=None, help="cap on rows per split (seeded draw)")
    g.add_argument("--eval_batch_size", type=positive_int, default=32, help="rows per forward pass")
    add_bool(g, "--generate", default=None,
             help="also score by greedy generation, the paper's protocol for the pre-trained model "
                        "(default: on for a pre-trained model, off otherwise)")
    g.add_argument("--max_new_tokens", type=positive_int, default=5, help="tokens generated per answer with --generate")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="auto: bf16 on CUDA if supported, else fp32")
    g.add_argument("--shared_prefix", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="a spul folder: compute its soft prompt once and reuse it for every batch (default), or prepend "
                        "it to every row (false); the same numbers either way")
    g.add_argument("--output_path", default=None,
                   help="results file (*.json) or folder for results.json (default: the checkpoint folder; runs/ for a pre-trained model)")
    g.add_argument("--seed", type=int, default=42, help="seed of the --max_eval_rows draw")
    add_bool(g, "--overwrite", help="replace results computed with other settings")
    add_bool(g, "--resume", help="keep results already computed with the same settings (print them, compute nothing)")
    add_bool(g, "--quiet", help="no progress bars")
    args = p.parse_args(argv)
    args.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in args.splits if s not in SPLITS]
    if bad or not args.splits:
        raise UserError(f"unknown split {', '.join(bad) or '(none)'} in --splits: choose from {', '.join(SPLITS)}")
    return args


def resolve_data_settings(args, trained, name):
    """Fill the data flags the user left out with the stage's own (its arguments.json), else defaults. The
    train_* rows are exactly the rows the stage trained on: its forget size, row caps and data seed."""
    from utils.runs import inherit

    if args.forget_size is None:
        args.forget_size = trained.get("forget_size") or 1.0
    return inherit(args, trained, name, quiet=True)


def load_eval_splits(args):
    """The evaluation rows: train_forget and train_retain are the rows the stage trained on (--forget_size
    drawn with seed 42, then the --max_forget / --max_retain caps with the training seed, as
    utils.data.select_training_rows does); --max_eval_rows draws a seeded subset of every split."""
    from utils.data import data_kwargs, load_splits, sample_rows, select_training_rows

    data = load_splits(splits=args.splits, **data_kwargs(args))
    data = select_training_rows(data, args.forget_size, args.max_forget, args.max_retain, args.data_seed)
    return data.derive({s: sample_rows(rows, args.max_eval_rows, args.seed) for s, rows in data.items()})


def default_output(args, trained):
    from utils.runs import short_name

    if args.output_path:
        return args.output_path if args.output_path.endswith(".json") else os.path.join(args.output_path, "results.json")
    if trained:
        return os.path.join(args.model_checkpoints, "results.json")
    tag = f"-f{args.forget_size}" if args.forget_size != 1.0 else ""
    return os.path.join("runs", f"vanilla-{args.dataset}-{short_name(args.model_checkpoints)}{tag}", "results.json")


def format_table(res):
    """The paper's layout: ACC and F1 per split, in percent; extra rows for our metrics beyond the paper."""
    splits = list(res["metrics"])
    head = f"{'':<24}" + "".join(f"{s:>16}" for s in splits)
    sub = f"{'':<24}" + "".join(f"{'ACC':>8}{'F1':>8}" for _ in splits)

    def row(name, block, keys=("accuracy", "f1")):
        cells = ""
        for s in splits:
            vals = [block[s].get(k) if k else None for k in keys]
            cells += "".join(f"{100 * v:>8.2f}" if v is not None else f"{'':>8}" for v in vals)
        return f"{name:<24}{cells}"

    lines = [f"{res['method']} | {res['model']} | {res['dataset']} ({res.get('task', 'sentiment')}) | "
             f"forget_size {res['forget_size']} | "
             f"n = {', '.join(str(res['metrics'][s]['n']) for s in splits)}", head, sub,
             row("top token (paper)", res["metrics"])]
    if res.get("generation"):
        lines.append(row("generation (paper, vanilla)", res["generation"]))
    lines.append(row("label words only", res["metrics"], ("label_accuracy", None)))
    lines.append(row("chance (label words) %", res["metrics"], ("chance", None)))
    lines.append(row("generic answers %", res["metrics"], ("generic_rate", None)))
    lines += ci_lines(res)
    if res.get("mia_auc") is not None:
        ci = res.get("mia_auc_ci")
        lines.append(f"MIA AUC (train_forget members vs test_forget): {res['mia_auc']:.4f}"
                     f"{f' [{ci[0]:.3f}, {ci[1]:.3f}]' if ci else ''}  (0.5 = indistinguishable)")
    return "\n".join(lines)


def ci_lines(res):
    """ACC and F1 with their 95 % intervals, one line per split: '82.81 [72.0, 90.2]'."""
    def cell(m, key):
        ci = m.get(f"{key}_ci")
        return f"{100 * m[key]:6.2f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")

    out = ["95 % intervals (ACC: Wilson; F1: bootstrap over rows):"]
    for name, block in (("", res["metrics"]), (" (generation)", res.get("generation") or {})):
        out += [f"  {s + name:<28}ACC {cell(m, 'accuracy'):<22}F1 {cell(m, 'f1')}" for s, m in block.items()]
    return out


def main():
    args = parse_args()
    from utils.evaluation import (GENERATION_PROTOCOL, classification_metrics, generate_rows, generation_metrics,
                                  mia_auc, mia_auc_ci, predict_rows, rows_to_score)
    from utils.modeling import device, resolve_dtype
    from utils.prompts import PromptEncoder
    from utils.runs import read_json, save_json, settings_diff, settings_of
    from utils.stages import load_stage, stage_arguments

    set_seed(args.seed)
    # data first (settings the stage trained with): mistakes cost seconds, not a model load
    trained = stage_arguments(args.model_checkpoints)
    if args.shared_prefix is not None and trained.get("stage") != "spul":
        raise UserError(f"--shared_prefix is for a spul.py folder; {args.model_checkpoints} has no soft prompt")
    if trained:
        args.model_checkpoints = os.path.abspath(args.model_checkpoints)
    resolve_data_settings(args, trained, args.model_checkpoints)
    data = load_eval_splits(args)
    args.label_words = ",".join(data.label_words)
    settings = settings_of(args)
    out = default_output(args, trained)
    old = read_json(out)
    if old is not None:
        diff = settings_diff(old.get("settings", {}), settings)
        if not diff and args.resume:
            print(format_table(old))
            print(f"{out} holds results of these settings: kept (--overwrite computes them again)")
            return
        if diff and not args.overwrite:
            raise UserError(f"{out} holds results of other settings ({', '.join(diff[:4])}); pass --overwrite to "
                            f"replace them or --output_path to keep both")

    print(rows_to_score({s: len(r) for s, r in data.items()}, args.max_eval_rows,
                        args.max_retain is not None or args.max_forget is not None), flush=True)

    # model: whatever stage wrote the folder
    t0 = time.time()
    dtype = resolve_dtype(args.precision)
    model, tokenizer, info = load_stage(args.model_checkpoints, dtype, args.set_pad_id, args.shared_prefix is not False)
    dev = device()
    model.to(dev)
    encoder = PromptEncoder(tokenizer, args.max_length, label_words=data.label_words, task=data.task,
                            **info["encoder_kwargs"])
    load_s = time.time() - t0
    generate = args.generate if args.generate is not None else info["method"] == "vanilla"

    # evaluate: one tail-only forward per row (plus greedy decoding when asked)
    t0 = time.time()
    metrics, generation, true_logp = {}, {}, {}
    for split, rows in data.items():
        scores = predict_rows(model, encoder, rows, args.eval_batch_size, dev, desc=split, quiet=args.quiet)
        metrics[split] = classification_metrics(scores, rows, encoder)
        true_logp[split] = scores["true_logp"].numpy()
        if generate:
            answers = generate_rows(model, encoder, rows, args.max_new_tokens, args.eval_batch_size, dev,
                                    desc=f"{split} (generate)", quiet=args.quiet)
            generation[split] = generation_metrics(answers, rows, encoder)
    mia = mia_auc(true_logp["train_forget"], true_logp["test_forget"]) if {"train_forget", "test_forget"} <= set(data) else None
    mia_ci = mia_auc_ci(true_logp["train_forget"], true_logp["test_forget"]) if mia is not None else None
    seconds = time.time() - t0

    # save: results.json only; the checkpoint itself is never written to
    res = {
        "method": info["method"], "model": info["model"], "dataset": args.dataset, "task": data.task,
        "forget_size": args.forget_size,
        "metrics": metrics, "mia_auc": mia, "mia_auc_ci": mia_ci,
        "protocol": {"metrics": "top token over the whole vocabulary at the label-prediction position vs the true "
                                "label's first token (the paper's protocol)",
                     "generation": GENERATION_PROTOCOL.format(n=args.max_new_tokens) if generate else None},
        "seconds": round(seconds, 2), "load_seconds": round(load_s, 2),
        "stage": info["stage"], "checkpoint": info["checkpoint"], "data_dir": args.data_dir,
        "max_eval_rows": args.max_eval_rows, "max_length": args.max_length, "seed": args.seed,
        # for tables: runs that differ only by their training seed are one setting
        "train_seed": trained.get("seed"),
        "run_settings": {k: v for k, v in trained.get("settings", {}).items() if k != "seed"},
        "device": str(dev), "dtype": str(dtype).replace("torch.", ""), "command": " ".join(sys.argv),
        "settings": settings,
    }
    if generate:
        res["generation"] = generation
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    save_json(out, res)
    print(format_table(res))
    print(f"evaluated in {seconds:.1f} s (model loaded in {load_s:.1f} s); wrote {out}")


if __name__ == "__main__":
    run_main(main)
