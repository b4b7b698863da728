"""Benchmark 2: scoring throughput (rows per second) of SPUL, ECO, the training-free baselines and the plain model,
on the same rows.

    python bench/eval_throughput.py                       # SmolLM2-135M, fp32, 300 SST-2 test rows, batch 32
    python bench/eval_throughput.py --model_checkpoints runs/qlora-sst2 --spul_checkpoint runs/spul-sst2 \
        --eco_checkpoint runs/eco-sst2 --rows 1000

Every variant scores the same rows with utils.evaluation.predict_rows (length-sorted batches, one forward
per row, logits at the label-prediction position only, keep=1), as inference_spul.py does:
- plain: the merged model without any prompt (utils.training.TailLM): the reference every ratio is taken to;
- spul_shared: SPUL with the shared prefix: the soft prompt's keys/values computed once and reused for every
  batch (inference_spul.py's default; computed in the warm-up, its one-off cost reported apart);
- spul_full: SPUL's full path, the p virtual tokens prepended to every row;
- eco: ECO (utils.eco.EcoLM): a plain forward that also pools the classifier's features, then the rows the
  classifier flags run again with their prompt embeddings corrupted. The classifier is fitted here on
  --eco_fit_rows real training rows as eco.py fits it (logistic regression, threshold for 5 % false
  positives on held-out retain rows), the corruption strength fixed (the cost does not depend on it), or
  read from an eco.py folder (--eco_checkpoint);
- trainer: what transformers' Trainer.evaluate / predict does with a causal LM (batches in dataset order,
  full-sequence logits, the label position picked out afterwards), on the plain model (--trainer_reference);
- the inference-time baselines of prompting.py, built by utils.prompting.build_model from configs shaped as its
  prompting.json (prompting.icul_rows for ICUL's), from training rows alone:
  icul (--icul): k = --icul_k flipped forget examples, nearest to the query by the frozen model's features (an
    index over a seeded draw of --icul_forget_rows train_forget rows), then L = --icul_l seeded train_retain rows
    with their true answers; its cost is the longer input (recorded as input_ratio) and a feature forward of the
    query to retrieve its examples;
  guardrail (--guardrail): the instruction naming the forget terms, its keys/values computed once and shared by
    every row (as SPUL's shared prefix); guardrail_full (--guardrail_full) runs the longer input instead;
  filter (--filter): the keyword gate on the forget terms; filter_classifier (--filter_classifier): the gate is
    the ECO classifier above. The forget terms come from scripts/forget_terms.py's forget_terms over the
    train_forget and train_retain rows (no test row).
The soft prompt is an untrained prompt encoder of p = --ptuning_num_tokens (the cost of a trained one is the
same), or the one of a spul.py folder (--spul_checkpoint, whose merged model then serves every variant).
ECO's corruption hook sits on the shared model's embedding layer; it does nothing unless ECO is re-running
flagged rows (one Python call per forward for the other variants).
Rows: a seeded draw of --rows test_retain and test_forget rows, in SST-2's share of forget rows.
One warm-up of every variant (on one batch), then --repeats passes over all rows alternating between the
variants; rows per second as a median with min-max, and each variant's throughput over the plain model's,
pair by pair within a repeat. Checked: SPUL shared and full predict the same token for every row; the
Trainer-style reference agrees with plain; ECO and both filters leave the rows they do not flag as the plain model
scores them; the guardrail's shared and full paths predict the same token for every row (exit status 1 when SPUL's
or the guardrail's paths disagree or a filter changes an unflagged row). Each variant's mean input tokens per row
against the plain query's (input_ratio) are recorded. Writes bench/results/eval_throughput.json.
"""
import os
import sys

import common
import numpy as np
import torch

from utils.cli import nonneg_int, positive_int

sys.path.append(os.path.join(common.ROOT, "scripts"))  # forget_terms.py

TARGET = 0.9  # SPUL-shared's throughput over the plain model's
# checks that make the figures meaningful: a failure exits with status 1
MUST_AGREE = {"spul_shared_vs_full": "SPUL's shared prefix and full path disagree on some rows",
              "guardrail_shared_vs_full": "the guardrail's shared instruction and full path disagree on some rows",
              "filter_unflagged_vs_plain": "the keyword filter changed a row it does not flag",
              "filter_classifier_unflagged_vs_plain": "the classifier filter changed a row it does not flag"}


def main():
    p = common.parser(__doc__, "eval_throughput")
    p.add_argument("--rows", type=int, default=300, help="rows scored per pass (seeded draw of test rows; default 300)")
    p.add_argument("--spul_checkpoint", default=None, help="a spul.py folder: its soft prompt and merged model")
    p.add_argument("--eco_checkpoint", default=None,
                   help="an eco.py folder: its classifier and strength (on this benchmark's model: give the folder made "
                        "from the same --model_checkpoints)")
    p.add_argument("--eco_fit_rows", type=int, default=256,
                   help="training rows (a quarter of them forget rows) the ECO classifier is fitted on (default 256)")
    p.add_argument("--eco_sigma", type=float, default=10.0,
                   help="ECO's noise strength in units of the embedding RMS when fitted here (default 10)")
    p.add_argument("--trainer_reference", type=common.str2bool, default=True,
                   help="also time the Trainer-style full-sequence-logit scoring of the plain model (default true)")
    for name, what in (("icul", "in-context unlearning (ICUL)"),
                       ("guardrail", "the guardrail prompt, its instruction shared as past keys/values"),
                       ("guardrail_full", "the guardrail prompt on its longer input (no shared prefix)"),
                       ("filter", "the keyword filter on forget terms"),
                       ("filter_classifier", "the filter gated by the ECO classifier")):
        p.add_argument(f"--{name}", type=common.str2bool, default=True, help=f"also time {what} (default true)")
    p.add_argument("--icul_k", type=positive_int, default=1, help="ICUL's forget examples before each query (default 1)")
    p.add_argument("--icul_l", type=nonneg_int, default=5, help="ICUL's retain examples after them (default 5, ICUL's)")
    p.add_argument("--icul_forget_rows", type=positive_int, default=256,
                   help="train_forget rows (a seeded draw) ICUL retrieves its forget examples from (default 256)")
    # prompting.icul_rows reads these; the benchmark times ICUL's own setting
    p.set_defaults(icul_label="flipped", icul_retrieval="nearest")
    # max_length: the query's tokens (SST-2's are under 100) and ICUL's context (prompting.icul_rows checks it), as
    # qlora.py's default
    p.set_defaults(precision="fp32", max_length=1024)
    args = p.parse_args()
    common.check(args)
    from utils import eco
    from utils.data import load_splits, sample_rows
    from utils.evaluation import predict_rows
    from utils.modeling import device
    from utils.prompts import PromptEncoder
    from utils.soft_prompt import SoftPromptLM, build_prompt_model
    from utils.training import TailLM

    torch.manual_seed(args.seed)
    dev = device()
    env = common.environment()
    if args.spul_checkpoint:
        from utils.modeling import resolve_dtype
        from utils.stages import load_stage

        spul, tokenizer, info = load_stage(args.spul_checkpoint, resolve_dtype(args.precision), shared_prefix=True)
        lm, model_name = spul.lm, f"{info['model']} + {args.spul_checkpoint}"
        encoder = PromptEncoder(tokenizer, args.max_length, **info["encoder_kwargs"])
        print(f"{model_name} on {env['device']}; torch {env['torch']}, transformers {env['transformers']}")
    else:
        _, tokenizer, lm, model_name = common.setup(args)
        spul = build_prompt_model(lm, args.ptuning_num_tokens, 128, shared_prefix=True)
        encoder = common.encoder_for(tokenizer, args)
    spul.to(dev).eval()
    lm.eval()
    plain = TailLM(lm)
    spul_full = SoftPromptLM(spul.peft_model, shared_prefix=False)
    n_virtual = spul.peft_model.peft_config[spul.peft_model.active_adapter].num_virtual_tokens

    # the rows: test_retain and test_forget in SST-2's share of forget rows
    test = load_splits(data_dir=args.data_dir, splits=("test_retain", "test_forget"))
    n_forget = max(1, round(args.rows * common.SST2_FORGET / (common.SST2_FORGET + common.SST2_RETAIN)))
    rows = (sample_rows(test["test_retain"], args.rows - n_forget, args.seed)
            + sample_rows(test["test_forget"], n_forget, args.seed))
    lengths = [len(encoder.prompt_ids(r["text"])) for r in rows]

    eco_model, eco_info = make_eco(args, lm, tokenizer, encoder, dev, eco)
    run = dict(batch_size=args.batch_size, device=dev, quiet=True)
    baselines, base_info = make_baselines(args, lm, encoder, eco_model, run)
    models = {"plain": plain, "spul_shared": spul, "spul_full": spul_full, "eco": eco_model, **baselines}
    scorers = {name: (lambda rs, m=m: predict_rows(m, encoder, rs, **run)) for name, m in models.items()}
    if args.trainer_reference:
        scorers["trainer"] = lambda rs: trainer_predict(lm, encoder, rs, args.batch_size, dev)
    variants = {name: (lambda f=f: f(rows)) for name, f in scorers.items()}
    few = rows[:args.batch_size]
    warm = {name: (lambda f=f: f(few)) for name, f in scorers.items()}
    times, out = common.time_alternating(variants, args.repeats, warm_up=warm, label="timed pass")
    # the shared prefix: computed once per model (inference_spul.py: once for all four splits), in the warm-up; its cost apart
    with torch.no_grad():
        prefix_s = common.summary([common.timed(spul._run_prefix)[0] for _ in range(3)])["median"]
    shared_active = bool(spul.shared_prefix and spul._shared_prefix_usable())

    rps = {k: [len(rows) / t for t in v] for k, v in times.items()}
    first = torch.tensor(encoder.first_label_ids())
    checks = {"spul_shared_vs_full": agreement(out["spul_shared"]["pred"], out["spul_full"]["pred"],
                                               out["spul_shared"]["label_logits"], out["spul_full"]["label_logits"])}
    if "trainer" in out:
        checks["trainer_vs_plain"] = agreement(out["trainer"][0], out["plain"]["pred"], out["trainer"][1][:, first],
                                               out["plain"]["label_logits"])
    flags = eco_model.classifier.flags(eco.row_features(eco_model, encoder, rows, **run))
    kept = torch.as_tensor(~flags)
    checks["eco_unflagged_vs_plain"] = agreement(out["eco"]["pred"][kept], out["plain"]["pred"][kept],
                                                 out["eco"]["label_logits"][kept], out["plain"]["label_logits"][kept])
    eco_info.update(flag_counts(flags, n_forget))
    checks.update(baseline_checks(out, baselines, base_info, flags, encoder, rows, n_forget))
    plain_tokens = float(np.mean(lengths))
    input_tokens = {name: {"mean": float(np.mean(n)), "input_ratio": float(np.mean(n)) / plain_tokens}
                    for name, n in [("plain", lengths)] + [(k, input_lengths(m, encoder, rows, args.batch_size, dev))
                                                           for k, m in baselines.items()]}

    res = {"model": model_name, "dtype": str(next(lm.parameters()).dtype), "device_type": dev.type,
           "rows": len(rows), "forget_rows": n_forget, "batch_size": args.batch_size, "ptuning_num_tokens": n_virtual,
           "mean_prompt_tokens": float(np.mean(lengths)), "max_prompt_tokens": max(lengths),
           "shared_prefix_active": shared_active, "shared_prefix_once_seconds": prefix_s,
           "pass_seconds": times, "pass_seconds_summary": {k: common.summary(v) for k, v in times.items()},
           "rows_per_second": {k: common.summary(v) for k, v in rps.items()},
           "throughput_over_plain": {k: common.paired_ratio(times, "plain", k) for k in times},
           "checks": checks, "eco": eco_info, "input_tokens": input_tokens, **base_info}
    s = res["throughput_over_plain"]["spul_shared"]
    res["target"] = {"what": "SPUL (shared prefix) throughput / plain model throughput", "limit": TARGET, "measured": s,
                     "met": s["median"] >= TARGET}

    names = {"plain": "plain model, no prompt (reference)", "spul_shared": "SPUL, shared prefix (cached once)",
             "spul_full": "SPUL, full path", "eco": f"ECO ({eco_info['source']})",
             "trainer": "Trainer-style: full-sequence logits, plain model",
             "icul": f"ICUL, k = {args.icul_k}, L = {args.icul_l}, nearest", "guardrail": "guardrail, shared instruction",
             "guardrail_full": "guardrail, full path", "filter": "filter, keywords", "filter_classifier": "filter, ECO classifier"}
    print(common.table(["median (min-max)", "s / pass", "rows / s", "throughput / plain"],
                       [[names[k], common.fmt(res["pass_seconds_summary"][k]), common.fmt(res["rows_per_second"][k]),
                         common.fmt(res["throughput_over_plain"][k])] for k in times]))
    print(f"target: SPUL shared / plain >= {TARGET}: measured {common.fmt(s)}: {'met' if res['target']['met'] else 'NOT met'} (median)")
    print(f"shared prefix: computed once in {prefix_s * 1e3:.1f} ms{'' if shared_active else ' (NOT active: the full path ran)'}")
    for name, c in checks.items():
        print(f"{name}: same prediction on {c['same']}/{c['rows']} rows, max |label logit difference| {c['max_abs_label_logit_diff']:.1e}")
    print(f"ECO flagged {eco_info['flagged_rows']} of {len(rows)} rows ({eco_info['flagged_forget_rows']} of {n_forget} forget, "
          f"{eco_info['flagged_retain_rows']} of {len(rows) - n_forget} retain): they run twice")
    for name, t in input_tokens.items():
        if name != "plain":
            print(f"{name}: {t['mean']:.1f} input tokens a row on average, {t['input_ratio']:.2f}x the plain query's")
    if "guardrail" in base_info:
        g = base_info["guardrail"]
        once = ("" if "shared_prefix_active" not in g else f", computed once in {g['prefix_once_seconds'] * 1e3:.1f} ms"
                if g["shared_prefix_active"] else ": the shared prefix is NOT active (the longer input ran)")
        print(f"guardrail: {g['instruction_tokens']} instruction tokens ({len(g['terms'])} forget terms){once}")
    for name in ("filter", "filter_classifier"):
        if name in base_info:
            f = base_info[name]
            print(f"{name} flagged {f['flagged_rows']} of {len(rows)} rows ({f['flagged_forget_rows']} forget, "
                  f"{f['flagged_retain_rows']} retain): they answer the generic label")
    print(f"{len(rows)} SST-2 test rows ({n_forget} forget), {np.mean(lengths):.1f} prompt tokens on average, batch "
          f"{args.batch_size}, p = {n_virtual}; {model_name}, {res['dtype']}; {common.machine_line(env)}")
    common.write_results(args.out, env, args, res)
    failed = [what for name, what in MUST_AGREE.items() if name in checks and checks[name]["same"] != checks[name]["rows"]]
    if failed:
        print(f"error: {'; '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def make_eco(args, lm, tokenizer, encoder, dev, eco):
    """(EcoLM on `lm`, what it is): an eco.py folder, or a classifier fitted here on real training rows."""
    if args.eco_checkpoint:
        model, cfg = eco.load_eco_model(args.eco_checkpoint, lm=lm)
        return model.to(dev), {"source": f"from {args.eco_checkpoint}", "strength": cfg.get("strength"),
                               "threshold": cfg.get("threshold")}
    scale = float(lm.get_input_embeddings().weight.float().pow(2).mean().sqrt())
    model = eco.EcoLM(lm, eco.Corruption("rand_noise_first_n", args.eco_sigma * scale, None, args.seed),
                      encoder.cue_ids).to(dev)
    n_forget = max(2, args.eco_fit_rows // 4)
    data = common.sst2_rows(args, max(2, args.eco_fit_rows - n_forget), n_forget, offset=5)
    run = dict(batch_size=args.batch_size, device=dev, quiet=True)
    t, feats = common.timed(lambda: {s: eco.row_features(model, encoder, data[s], **run) for s in ("train_forget", "train_retain")})
    model.classifier, holdout = eco.fit_classifier(feats["train_forget"], feats["train_retain"], 0.05, 0.2, 1.0, args.seed)
    return model, {"source": f"classifier fitted here on {len(data['train_forget'])} forget + "
                             f"{len(data['train_retain'])} retain rows, sigma {args.eco_sigma} x embedding RMS",
                   "fit_seconds": t, "holdout": holdout, "strength": args.eco_sigma * scale,
                   "threshold": model.classifier.threshold}


def make_baselines(args, lm, encoder, eco_model, run):
    """({name: wrapper}, {name: what it is}) of the training-free baselines asked for, each built by
    utils.prompting.build_model from a prompting.json-shaped config, from training rows alone."""
    import prompting as script
    from utils import eco, prompting
    from utils.data import sample_rows
    from utils.soft_prompt import run_prefix, shared_prefix_blocker

    models, info = {}, {}
    train = load_training_rows(args) if args.icul or args.guardrail or args.guardrail_full or args.filter else None
    if args.icul:
        pool = {"train_forget": sample_rows(train["train_forget"], args.icul_forget_rows, args.seed),
                "train_retain": sample_rows(train["train_retain"], args.icul_l, args.seed)}
        cfg = {"method": "icul", "name": "icul", "seed": args.seed, "feature_layer": -1,
               **script.icul_rows(args, pool, encoder, prompting)}
        feature_lm = eco.FeatureLM(lm, encoder.cue_ids).eval()
        index = eco.row_features(feature_lm, encoder, cfg["forget_rows"], **run).astype(np.float32)
        models["icul"] = prompting.build_model(lm, encoder, cfg, index)
        info["icul"] = {"k": cfg["k"], "l": cfg["l"], "label": cfg["label"], "retrieval": cfg["retrieval"],
                        "forget_pool_rows": len(cfg["forget_rows"]), "training_rows_cost": cfg["cost"]}
    terms = train_terms(train, encoder) if args.guardrail or args.guardrail_full or args.filter else None
    if args.guardrail or args.guardrail_full:
        cfg = {"method": "guardrail", "name": "guardrail", "seed": args.seed,
               "instruction": prompting.guardrail_text(encoder.generic_labels[0], encoder.task, terms=terms)}
        shared, full = prompting.build_model(lm, encoder, cfg), prompting.build_model(lm, encoder, cfg)
        full.shared_prefix = False
        models.update({k: m for k, m in (("guardrail", shared), ("guardrail_full", full)) if getattr(args, k)})
        info["guardrail"] = {"terms": terms, "instruction_tokens": len(shared.instruction)}
        if args.guardrail:  # its one-off cost apart: start tokens + instruction through the model, as GuardrailLM caches them
            ids = torch.tensor([prompting.start_tokens(encoder.tokenizer) + shared.instruction], device=run["device"])
            with torch.no_grad():
                once = common.summary([common.timed(lambda: run_prefix(lm, input_ids=ids))[0] for _ in range(3)])
            info["guardrail"].update(prefix_once_seconds=once["median"], shared_prefix_active=shared_prefix_blocker(lm) is None)
    if args.filter:
        models["filter"] = prompting.build_model(lm, encoder, {"method": "filter", "name": "filter", "gate": "keywords",
                                                               "terms": terms})
        info["filter"] = {"terms": terms}
    if args.filter_classifier:
        cfg = {"method": "filter", "name": "filter_classifier", "gate": "classifier",
               "feature_layer": eco_model.feature_layer}
        models["filter_classifier"] = prompting.build_model(lm, encoder, cfg, classifier=eco_model.classifier)
        info["filter_classifier"] = {"classifier": "the ECO classifier above"}
    return {k: m.to(run["device"]).eval() for k, m in models.items()}, info


def load_training_rows(args):
    """SST-2's train_forget and train_retain rows (never a test row): what the baselines learn their target from."""
    from forget_terms import TRAINING_SPLITS

    from utils.data import load_splits

    return load_splits(data_dir=args.data_dir, splits=TRAINING_SPLITS)


def train_terms(train, encoder):
    """The forget terms scripts/forget_terms.py derives from the training rows (its defaults)."""
    from forget_terms import forget_terms, row_text

    from utils.cli import UserError

    terms = [t for t, _ in forget_terms([row_text(encoder.task, r) for r in train["train_forget"]],
                                        [row_text(encoder.task, r) for r in train["train_retain"]])]
    if not terms:
        raise UserError("scripts/forget_terms.py finds no forget term in these training rows: run without "
                        "--guardrail, --guardrail_full and --filter")
    return terms


def baseline_checks(out, baselines, info, eco_flags, encoder, rows, n_forget):
    """The guardrail's two paths agree; each filter leaves the rows it does not flag as the plain model scores them
    (flags from the gate's own functions: the terms in the query's text, the ECO classifier's flags)."""
    from utils import prompting

    checks = {}
    if "guardrail" in out and "guardrail_full" in out:
        checks["guardrail_shared_vs_full"] = agreement(out["guardrail"]["pred"], out["guardrail_full"]["pred"],
                                                       out["guardrail"]["label_logits"], out["guardrail_full"]["label_logits"])
    for name in ("filter", "filter_classifier"):
        if name not in baselines:
            continue
        if name == "filter":
            flags = np.array([prompting.has_term(prompting.query_text(encoder.tokenizer, encoder.prompt_ids(r), encoder.task),
                                                 info[name]["terms"]) for r in rows], dtype=bool)
        else:
            flags = eco_flags
        kept = torch.as_tensor(~flags)
        checks[f"{name}_unflagged_vs_plain"] = agreement(out[name]["pred"][kept], out["plain"]["pred"][kept],
                                                         out[name]["label_logits"][kept], out["plain"]["label_logits"][kept])
        info[name].update(flag_counts(flags, n_forget))
    return checks


def flag_counts(flags, n_forget):
    """Flagged rows in all, among the forget rows (the last n_forget) and among the retain rows."""
    n = len(flags)
    return {"flagged_rows": int(flags.sum()), "flagged_forget_rows": int(flags[n - n_forget:].sum()),
            "flagged_retain_rows": int(flags[:n - n_forget].sum())}


@torch.no_grad()
def input_lengths(model, encoder, rows, batch_size, dev):
    """Tokens each row puts through the model: its prompt, and a prefixed baseline's context before it (ICUL
    retrieves its examples by a forward of the query; the guardrail's instruction is counted in both paths)."""
    from utils.prompting import PrefixedLM
    from utils.prompts import LeftPadCollator

    collate, out = LeftPadCollator(encoder.tokenizer.pad_token_id), []
    for start in range(0, len(rows), batch_size):
        batch = collate([{"input_ids": encoder.prompt_ids(r)} for r in rows[start:start + batch_size]])
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        if isinstance(model, PrefixedLM):
            ids, mask = model.build(ids, mask)
        out += mask.sum(-1).tolist()
    return out


@torch.no_grad()
def trainer_predict(lm, encoder, rows, batch_size, dev):
    """Trainer-style: dataset order, full-sequence logits, then the last (label-predicting) position."""
    from utils.prompts import LeftPadCollator

    lm.eval()
    collate = LeftPadCollator(encoder.tokenizer.pad_token_id)
    preds, last = [], []
    for start in range(0, len(rows), batch_size):
        batch = collate([{"input_ids": encoder.prompt_ids(r["text"])} for r in rows[start:start + batch_size]])
        logits = lm(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
        preds.append(logits[:, -1].float().argmax(-1).cpu())
        last.append(logits[:, -1].float().cpu())
    return torch.cat(preds), torch.cat(last)


def agreement(pred_a, pred_b, logits_a, logits_b):
    n = len(pred_a)
    return {"rows": n, "same": int((pred_a == pred_b).sum()),
            "max_abs_label_logit_diff": float((logits_a - logits_b).abs().max()) if n else 0.0}


if __name__ == "__main__":
    common.run(main)
