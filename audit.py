"""Audit whether a stage's forgetting is real: attacks on any stage folder, by the same rows as its evaluation.

    python audit.py --model_checkpoints runs/demo/spul --max_eval_rows 64
    python audit.py --model_checkpoints runs/demo/eco --attacks templates,instruction,nf4

Attacks (--attacks, default all; utils/attacks.py):
  templates    the query reworded: six held-out templates no training stage ever writes (docs/audit_templates.md)
  instruction  a sentence asking for the true answer in spite of any instruction to forget (mcqa: + an answer prefill)
  nf4, int8    the deployed model's LLM quantized by bitsandbytes (4-bit NF4, 8-bit LLM.int8()), a prompt or gate kept
  relearn      LoRA on the LLM (prompt or gate in place) for a small budget on one half of train_forget with its true
               labels; the other half scored
  probe        a logistic regression on the LLM's last hidden state at the answer position, fitted on one half of
               train_forget (+ as many retain rows), scored on the other half
  mia          loss, zlib, Min-K% and Min-K%++ membership AUCs (train_forget vs test_forget); privleak against the
               retrained model

For each attack and split: the paper's top-token accuracy, the accuracy restricted to the label words, the rate of
generic answers, n and 95 % intervals, beside the same rows scored plainly; and on the forget splits

    recovery = (attacked − unlearned) / (fine-tuned − unlearned)

with the fine-tuned model's figures under the same attack (0: the attack gains nothing; 1: all back). The fine-tuned
model (--finetuned) is the qlora.py folder the stage started from, the retrained one (--retrained) a qlora.py folder
beside it trained on the retain rows; their audits are read from their folders' audit.json (computed and written
there when missing). Writes audit.json beside results.json, after each attack (a crash loses at most the running
one); attacks already in it with the same settings are kept, an audit of other settings is replaced only with
--overwrite.
"""
import os
import sys
import time

from utils.cli import UserError, add_bool, add_data_args, add_model_args, make_parser, positive_float, positive_int, run_main, set_seed

AUDIT_FILE = "audit.json"
SPLITS = ("train_retain", "train_forget", "test_retain", "test_forget")
# the fine-tuned and retrained models' figures are read on the forget splits, whose rows no retain cap changes
NOT_COMPARED = {"max_retain"}


def parse_args(argv=None):
    from utils.attacks import ATTACKS, parse_attacks

    p = make_parser(__doc__)
    p.add_argument("--model_checkpoints", required=True,
                   help="a stage folder (qlora/spul/baselines/eco/prompting) or a pre-trained model")
    add_data_args(p, child=True)
    add_model_args(p)
    p.set_defaults(forget_size=None)
    g = p.add_argument_group("audit")
    g.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attacks (default: all)")
    g.add_argument("--templates", default=None,
                   help="comma-separated held-out templates for the templates attack (default: all of the task's)")
    g.add_argument("--splits", default=",".join(SPLITS),
                   help="comma-separated splits scored under every attack; the forget splits always (default: all four)")
    g.add_argument("--max_eval_rows", type=positive_int, default=None, help="cap on rows per split (seeded draw)")
    g.add_argument("--eval_batch_size", type=positive_int, default=32, help="rows per forward pass")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on CUDA if supported, else fp32 (the nf4/int8 attacks quantize from it)")
    g.add_argument("--seed", type=int, default=42, help="seed of the row draw, the halves, LoRA's start and the batches")
    g.add_argument("--finetuned", default=None,
                   help="the fine-tuned model's stage folder for recovery, or 'none' (default: the chain's qlora.py folder)")
    g.add_argument("--retrained", default=None,
                   help="the retrained model's folder for privleak and the relearning control, or 'none' (default: a "
                        "qlora.py folder beside the fine-tuned one, trained on the retain rows)")
    r = p.add_argument_group("relearning")
    r.add_argument("--relearn_rows", type=positive_int, default=None,
                   help="forget rows relearned on, at most half of train_forget (default: the whole half)")
    r.add_argument("--relearn_epochs", type=positive_int, default=3, help="passes over the relearned rows")
    r.add_argument("--relearn_lr", type=positive_float, default=1e-3, help="AdamW learning rate of the LoRA weights")
    r.add_argument("--relearn_rank", type=positive_int, default=8, help="LoRA rank (alpha = 2 × rank) on q/v")
    r.add_argument("--relearn_batch_size", type=positive_int, default=8, help="rows per relearning step")
    q = p.add_argument_group("probe and membership")
    q.add_argument("--probe_c", type=positive_float, default=1.0, help="inverse L2 strength of the probe's regression")
    q.add_argument("--mia_k", type=float, default=20.0, help="percent of a row's text tokens Min-K%% and Min-K%%++ average")
    o = p.add_argument_group("output")
    o.add_argument("--output_path", default=None, help="audit file (*.json) or folder (default: the checkpoint folder)")
    add_bool(o, "--overwrite", help="replace an audit of other settings (attacks of the same settings are always kept: "
                                    "delete audit.json to compute them again)")
    add_bool(o, "--quiet", help="no progress bars")
    args = p.parse_args(argv)
    args.attacks = parse_attacks(args.attacks)
    args.templates = check_templates(args.templates)
    args.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if set(args.splits) - set(SPLITS) or not {"train_forget", "test_forget"} <= set(args.splits):
        raise UserError(f"--splits must name train_forget and test_forget, and only splits of {', '.join(SPLITS)}")
    if not 0 < args.mia_k <= 100:
        raise UserError(f"--mia_k must be in (0, 100], got {args.mia_k}")
    return args


def check_templates(text):
    from utils.tasks import INSTRUCTION, TRAINING

    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if TRAINING in names or INSTRUCTION in names:
        raise UserError(f"--templates lists '{TRAINING if TRAINING in names else INSTRUCTION}': the templates attack "
                        f"rewords queries with held-out templates only")
    if not names:
        raise UserError("--templates names no template")
    return names


def audit_settings(args):
    """What decides an audit's figures (not which attacks ran, nor where references come from)."""
    from utils.runs import settings_of

    skip = {"attacks", "finetuned", "retrained", "model_checkpoints", "precision"}
    return {k: v for k, v in settings_of(args).items() if k not in skip}


def output_path(args, trained):
    from inference_spul import default_output

    return os.path.join(os.path.dirname(default_output(args, trained)) or ".", AUDIT_FILE) \
        if not (args.output_path and args.output_path.endswith(".json")) else args.output_path


# ---------------------------------------------------------------- the fine-tuned and retrained references

def qlora_folder(path, train_on_retain):
    from utils.runs import read_json

    info = read_json(os.path.join(path, "arguments.json")) or {}
    return info.get("stage") == "qlora" and info.get("finished") and (info.get("train_on") == "retain") == train_on_retain


def sibling(folder, retain, like):
    """A finished qlora.py folder beside `folder` of the same model and data, trained on the retain rows (`retain`)
    or on all rows; None when there is none or more than one."""
    from utils.runs import read_json

    root = os.path.dirname(os.path.normpath(folder))
    keys = ("model_name", "dataset", "data_dir", "forget_size", "max_forget", "data_seed")
    found = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        info = read_json(os.path.join(path, "arguments.json")) or {}
        if os.path.normpath(path) != os.path.normpath(folder) and qlora_folder(path, retain) \
                and all(info.get(k) == like.get(k) for k in keys):
            found.append(path)
    return found[0] if len(found) == 1 else None


def references(args, trained):
    """(fine-tuned folder or None, retrained folder or None) of the audited stage: --finetuned / --retrained, else
    the chain's qlora.py folder and a retrained sibling of it."""
    from utils.stages import _parent, stage_arguments

    def given(value):
        if value in (None, "none"):
            return value
        if stage_arguments(value).get("stage") != "qlora":
            raise UserError(f"{value} is not a qlora.py folder: the references are the fine-tuned and retrained models")
        return os.path.abspath(value)

    ft, rt = given(args.finetuned), given(args.retrained)
    me, stage = args.model_checkpoints, trained.get("stage")
    retrained_me = stage == "qlora" and trained.get("train_on") == "retain"
    if ft is None and trained:
        if stage == "qlora":
            ft = sibling(me, False, trained) if retrained_me else None
        else:
            parent, pinfo = _parent(me, trained)
            ft = os.path.abspath(parent) if pinfo and pinfo.get("train_on") != "retain" else None
    if rt is None and trained and not retrained_me:
        anchor = ft if ft not in (None, "none") else (me if stage == "qlora" else None)
        rt = sibling(anchor, True, stage_arguments(anchor)) if anchor else None
    return tuple(None if x in (None, "none") or x == me else x for x in (ft, rt))


# ---------------------------------------------------------------- running the attacks

def load(args, path):
    """A loader of (model, encoder) for `path`: a fresh copy each call (quantizing or relearning changes it)."""
    from utils.modeling import resolve_dtype
    from utils.prompts import PromptEncoder
    from utils.stages import load_stage

    def fresh():
        model, tokenizer, info = load_stage(path, resolve_dtype(args.precision), args.set_pad_id)
        enc = PromptEncoder(tokenizer, args.max_length, label_words=args.label_words.split(","), task=args.task,
                            **info["encoder_kwargs"])
        fresh.info = info
        return model, enc
    return fresh


def run_attacks(args, path, data, out, refs=(None, None)):
    """Every attack of --attacks on `path`, reusing those `out` already holds with the same settings; saved after
    each attack (a crash loses at most the running one). Returns the audit dict."""
    from utils.attacks import ATTACKS, Audit, recoveries
    from utils.membership import privleak
    from utils.modeling import device
    from utils.runs import read_json, save_json, settings_diff

    settings = audit_settings(args)
    old = read_json(out) if out else None
    kept = {}
    if old is not None:
        diff = settings_diff(old.get("settings", {}), settings)
        if diff and not args.overwrite:
            raise UserError(f"{out} holds an audit of other settings ({', '.join(diff[:4])}); pass --overwrite to replace "
                            f"it or --output_path to keep both")
        kept = {} if diff else old.get("attacks", {})
    todo = [a for a in args.attacks if a not in kept]
    if kept:
        print(f"{out}: keeping {', '.join(a for a in args.attacks if a in kept) or 'no attack'} of these settings", flush=True)
    fresh = load(args, path)
    dev = device()
    model, encoder = fresh()
    model.to(dev)
    info = fresh.info
    audit = Audit(model, encoder, data, fresh, dev, args.eval_batch_size, args.seed,
                  settings={k: getattr(args, k) for k in ("templates", "relearn_rows", "relearn_epochs", "relearn_lr",
                                                          "relearn_rank", "relearn_batch_size", "probe_c", "mia_k")},
                  quiet=args.quiet, splits=[s for s in SPLITS if s in args.splits])
    res = {"method": info["method"], "model": info["model"], "stage": info["stage"], "checkpoint": info["checkpoint"],
           "dataset": args.dataset, "task": data.task, "settings": settings, "attacks": dict(kept), "seconds": {},
           **({} if not kept else {"seconds": {a: t for a, t in old.get("seconds", {}).items() if a in kept}})}
    res["plain"] = {s: audit.plain(s) for s in audit.splits}
    for name in todo:
        t0 = time.time()
        print(f"{info['method']}: {name}", flush=True)
        res["attacks"][name] = ATTACKS[name](audit)
        res["seconds"][name] = round(time.time() - t0, 1)
        if out:
            save_json(out, res)
    ft, rt = (read_reference(args, r, data) for r in refs)
    res["references"] = {"finetuned": refs[0], "retrained": refs[1]}
    res["recovery"] = {a: recoveries(r, (ft or {}).get("attacks", {}).get(a)) for a, r in res["attacks"].items()
                       if "splits" in r} if ft else {}
    res["control"] = {a: recoveries(r, (ft or {}).get("attacks", {}).get(a)) for a, r in (rt or {}).get("attacks", {}).items()
                      if "splits" in r} if ft and rt else {}
    if "mia" in res["attacks"] and rt and "mia" in rt.get("attacks", {}):
        theirs = rt["attacks"]["mia"]["aucs"]
        res["attacks"]["mia"]["privleak"] = {k: privleak(v["auc"], theirs[k]["auc"])
                                             for k, v in res["attacks"]["mia"]["aucs"].items() if k in theirs}
    res["command"] = " ".join(sys.argv)
    if out:
        save_json(out, res)
    return res


def read_reference(args, path, data):
    """A reference model's audit with the same settings: its folder's audit.json, else computed here (written
    into its folder when it holds no audit yet, else kept in memory)."""
    from utils.runs import read_json, settings_diff

    if path is None:
        return None
    out = os.path.join(path, AUDIT_FILE)
    old = read_json(out)
    mine = {k: v for k, v in audit_settings(args).items() if k not in NOT_COMPARED}
    if old is not None and not settings_diff(old.get("settings", {}), mine) \
            and all(a in old.get("attacks", {}) for a in args.attacks):
        return old
    print(f"auditing the reference {path} with the same settings first", flush=True)
    ref_args = type(args)(**{**vars(args), "overwrite": False})
    return run_attacks(ref_args, path, data, out if old is None else None)


def format_audit(res):
    """One line per attack: the metric recovery is read on, per split in percent, recovery on the forget splits."""
    splits = list(res["plain"])
    lines = [f"audit of {res['method']} | {res['model']} | {res['dataset']} ({res['task']})",
             f"{'attack':<14}{'metric':<16}" + "".join(f"{s:>14}" for s in splits) + f"{'recovery TF':>13}{'recovery TeF':>13}"]

    def pct(v):
        return f"{100 * v:>14.1f}" if v is not None else f"{'':>14}"

    for metric in ("accuracy", "label_accuracy"):
        lines.append(f"{'(plain)':<14}{metric:<16}" + "".join(pct(res["plain"][s].get(metric)) for s in splits))
    for name, r in res["attacks"].items():
        if "splits" not in r:
            continue
        rec = (res.get("recovery") or {}).get(name) or {}
        lines.append(f"{name:<14}{r['metric']:<16}" + "".join(pct(r["splits"].get(s, {}).get(r["metric"])) for s in splits)
                     + "".join(f"{rec.get(s):>13.2f}" if rec.get(s) is not None else f"{'-':>13}" for s in
                               ("train_forget", "test_forget")))
    if "mia" in res["attacks"]:
        m = res["attacks"]["mia"]
        leak = m.get("privleak") or {}
        lines.append("membership AUC (train_forget vs test_forget; privleak vs retrained): " + ", ".join(
            f"{k} {v['auc']:.3f}" + (f" ({leak[k]:+.1f})" if leak.get(k) is not None else "") for k, v in m["aucs"].items()))
    return "\n".join(lines)


def main():
    args = parse_args()
    from inference_spul import load_eval_splits, resolve_data_settings
    from utils.stages import stage_arguments

    set_seed(args.seed)
    # data first: mistakes cost seconds, not a model load
    trained = stage_arguments(args.model_checkpoints)
    if trained:
        args.model_checkpoints = os.path.abspath(args.model_checkpoints)
    resolve_data_settings(args, trained, args.model_checkpoints)
    scored, args.splits = args.splits, list(SPLITS)  # every split is read: the probe fits on train_retain rows
    data = load_eval_splits(args)
    args.splits = scored
    args.label_words = ",".join(data.label_words)
    refs = references(args, trained)
    out = output_path(args, trained)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    t0 = time.time()
    res = run_attacks(args, args.model_checkpoints, data, out, refs)
    print(format_audit(res))
    print(f"audited in {time.time() - t0:.0f} s; wrote {out}")


if __name__ == "__main__":
    run_main(main)
