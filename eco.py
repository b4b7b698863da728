r"""ECO: embedding-corrupted prompts (Liu et al., arXiv 2406.07933), weight-free unlearning on the qlora.py model.

    python eco.py --model_checkpoints=runs/qlora-sst2 --data_dir=../shared/data/sst2 --max_retain=2000 \
        --target_fpr=0.05 --output_path=runs/eco-sst2

1. A prompt classifier (logistic regression on the frozen model's own mean-pooled hidden states over
   the prompt tokens) is fitted on train_forget (positive) against train_retain (negative). Its
   threshold is chosen on a held-out slice of those training rows for --target_fpr on retain rows;
   the test splits only measure it (precision/recall in classifier.json).
2. Flagged prompts get their token embeddings corrupted by a hook on the embedding layer: seeded
   noise of strength σ on the first --eco_dims dimensions, or (--corruption zero_topk) each token's
   k largest dimensions zeroed. Unflagged prompts run through the plain model.
3. σ (or k) is the smallest strength at which corrupted train_forget rows are no better than chance,
   found by a zeroth-order log-space bisection on a seeded subset of train_forget.
No LLM weight changes. Writes classifier.joblib, eco.json (σ, threshold, search log), classifier.json,
the tokenizer and arguments.json (stage "eco"); utils.eco.load_eco_model reloads the folder.
"""
import os

from utils.cli import (UserError, add_data_args, add_model_args, add_run_args, make_parser, nonneg_float,
                       open_unit_interval, positive_float, positive_int, run_main, set_seed)


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--model_checkpoints", required=True,
                   help="the folder qlora.py wrote, or a pre-trained model (hub id, model folder, smollm2-135m)")
    add_data_args(p, child=True)
    add_model_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=42, help="seeds the held-out slice, the search subset and the noise")
    add_run_args(g)
    g.add_argument("--eval_batch_size", "--batch_size", dest="eval_batch_size", type=positive_int, default=32,
                   help="rows per forward pass")
    g.add_argument("--max_eval_rows", type=positive_int, default=None,
                   help="cap on the test rows the classifier's precision and recall are measured on (seeded draw)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="auto: bf16 on CUDA if supported, else fp32")
    g = p.add_argument_group("ECO classifier")
    g.add_argument("--target_fpr", type=open_unit_interval, default=0.05, help="false-positive rate on held-out retain rows the threshold is set for")
    g.add_argument("--holdout_fraction", type=open_unit_interval, default=0.2, help="slice of the training rows kept out of the fit to choose the threshold on")
    g.add_argument("--feature_layer", type=int, default=-1, help="hidden-state index the features are pooled from (-1: the last)")
    g.add_argument("--classifier_c", type=positive_float, default=1.0, help="inverse L2 strength of the logistic regression")
    g = p.add_argument_group("ECO corruption")
    g.add_argument("--corruption", choices=["rand_noise_first_n", "zero_topk"], default="rand_noise_first_n",
                   help="noise of strength σ on the first --eco_dims dimensions, or zero each token's k largest dimensions")
    g.add_argument("--eco_dims", type=positive_int, default=None, help="n, the noised dimensions (default: all of them)")
    g.add_argument("--strength_range", type=float, nargs=2, default=(0.01, 1000.0), metavar=("LO", "HI"),
                   help="σ search range in units of the embedding matrix's RMS (zero_topk searches k in [1, d])")
    g.add_argument("--search_rounds", type=positive_int, default=10, help="bisection rounds of the σ search")
    g.add_argument("--search_rows", type=positive_int, default=64, help="train_forget rows (seeded subset) the σ search evaluates")
    g.add_argument("--tolerance", type=nonneg_float, default=0.05, help="forget rows count as forgotten at balanced label accuracy <= chance + this")
    args = p.parse_args(argv)
    lo, hi = args.strength_range
    if not 0 < lo < hi:
        raise UserError(f"--strength_range needs 0 < LO < HI, got {lo} {hi}")
    return args


def main():
    args = parse_args()
    import numpy as np

    from utils import eco
    from utils.data import data_kwargs, load_splits, sample_rows, training_splits
    from utils.evaluation import predict_rows, rows_to_score
    from utils.modeling import device, load_tokenizer, resolve_dtype
    from utils.prompts import PromptEncoder
    from utils.runs import default_output, finish_run, prepare_run, save_arguments, save_json
    from utils.stages import follow, load_start_model

    set_seed(args.seed)
    # the model it starts from and the data, checked before any model is loaded
    parent = follow(args, "eco.py")
    base_name = parent.get("model_name", args.model_checkpoints)
    run = dict(batch_size=args.eval_batch_size, device=device(), quiet=args.quiet)

    # data: the training splits fit the classifier and σ; the test splits only measure the classifier
    data = training_splits(args)
    args.label_words = ",".join(data.label_words)
    test = {s: sample_rows(r, args.max_eval_rows, args.seed)
            for s, r in load_splits(splits=("test_retain", "test_forget"), **data_kwargs(args)).items()}
    out = args.output_path or default_output("eco", args, base_name, f"{args.corruption}-fpr{args.target_fpr}")
    if prepare_run(out, args, "eco") == "done":
        return
    print(rows_to_score({s: len(data[s]) for s in ("train_forget", "train_retain")} | {s: len(r) for s, r in test.items()},
                        args.max_eval_rows, args.max_retain is not None or args.max_forget is not None), flush=True)
    tokenizer = load_tokenizer(args.model_checkpoints, args.set_pad_id)
    encoder = PromptEncoder(tokenizer, args.max_length, label_words=data.label_words, task=data.task)
    save_arguments(out, args, stage="eco", output_path=out, model_name=base_name)

    # model: the model it starts from, frozen, behind the ECO gate
    lm, _ = load_start_model(args.model_checkpoints, dtype=resolve_dtype(args.precision), device=device())
    lm.requires_grad_(False)
    d = lm.get_input_embeddings().weight.shape[1]
    if args.eco_dims is not None and args.eco_dims > d:
        raise UserError(f"--eco_dims {args.eco_dims} exceeds the embedding size {d}")
    model = eco.EcoLM(lm, eco.Corruption(args.corruption, 1.0, args.eco_dims, args.seed), encoder.cue_ids,
                      feature_layer=args.feature_layer).to(device())

    # 1. the prompt classifier, threshold from held-out training rows
    feats = {s: eco.row_features(model, encoder, data[s], desc=f"features {s}", **run) for s in ("train_forget", "train_retain")}
    clf, holdout = eco.fit_classifier(feats["train_forget"], feats["train_retain"], args.target_fpr,
                                      args.holdout_fraction, args.classifier_c, args.seed)
    model.classifier = clf
    flags = {s: clf.flags(eco.row_features(model, encoder, test[s], desc=f"features {s}", **run)) for s in test}
    report = eco.binary_report(np.r_[flags["test_forget"], flags["test_retain"]],
                               np.r_[np.ones(len(test["test_forget"]), bool), np.zeros(len(test["test_retain"]), bool)])
    classifier_info = {"threshold": clf.threshold, "target_fpr": args.target_fpr, "holdout": holdout, "test": report,
                       "n_test_forget": len(test["test_forget"]), "n_test_retain": len(test["test_retain"])}
    save_json(os.path.join(out, "classifier.json"), classifier_info)
    print(f"prompt classifier: test precision {report['precision']:.3f}, recall {report['recall']:.3f}, "
          f"FPR {report['fpr']:.3f} (held-out training FPR {holdout['fpr']:.3f}, recall {holdout['recall']:.3f})")

    # 2. the corruption strength: smallest one that takes train_forget rows to chance
    rows = sample_rows(data["train_forget"], args.search_rows, args.seed)
    if args.corruption == "zero_topk":
        lo, hi, integer, scale = 1.0, float(d), True, 1.0
    else:
        n = args.eco_dims or d
        scale = float(lm.get_input_embeddings().weight[:, :n].float().pow(2).mean().sqrt())
        lo, hi, integer = args.strength_range[0] * scale, args.strength_range[1] * scale, False
    print(f"searching the {args.corruption} strength in [{lo:.4g}, {hi:.4g}] on {len(rows)} train_forget rows")
    strength, search = eco.search_strength(model, encoder, rows, lo, hi, args.search_rounds, args.tolerance, integer, **run)
    print(f"{'k' if integer else 'σ'} = {strength:.5g}" + ("" if integer else f" ({strength / scale:.4g} × embedding RMS)"))

    # side effect on retain rows of the training splits: only the classifier's false positives change
    retain_rows = sample_rows(data["train_retain"], args.search_rows, args.seed)
    gated = predict_rows(model, encoder, retain_rows, desc="retain check", **run)["pred"]
    model.mode = "none"
    plain = predict_rows(model, encoder, retain_rows, desc="retain check", **run)["pred"]
    model.mode = "classifier"
    retain_agreement = float((gated == plain).float().mean())
    print(f"train_retain check: {retain_agreement:.3f} of {len(retain_rows)} predictions unchanged")

    cfg = eco.save_eco(out, clf, model.corruption, args.feature_layer, embedding_rms=scale if not integer else None,
                       search=search, retain_agreement=retain_agreement)
    tokenizer.save_pretrained(out)
    save_arguments(out, args, finished=True, stage="eco", output_path=out, model_name=base_name,
                   strength=strength, sigma=None if integer else strength, threshold=clf.threshold,
                   classifier_test=report, n_train_forget=len(data["train_forget"]),
                   n_train_retain=len(data["train_retain"]), trainable_parameters=0)
    print(f"saved the ECO classifier and {cfg['corruption']} strength to {out}")
    finish_run(out, f"ECO prompt classifier and corruption strength for the frozen model of {args.model_checkpoints}.",
               [f"python inference_spul.py --model_checkpoints={out}"])


if __name__ == "__main__":
    run_main(main)
