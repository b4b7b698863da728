"""Inference-time baselines that train nothing: in-context unlearning (ICUL), a guardrail prompt, a filter.

    python prompting.py --method=icul --model_checkpoints=runs/qlora-sst2 --icul_k=1 --icul_l=5
    python scripts/forget_terms.py --data_dir=../shared/data/sst2 --output=runs/sst2-terms.txt
    python prompting.py --method=guardrail --model_checkpoints=runs/qlora-sst2 --forget_terms=runs/sst2-terms.txt
    python prompting.py --method=filter --model_checkpoints=runs/qlora-sst2 --forget_terms=runs/sst2-terms.txt
    python prompting.py --method=filter --filter_gate=classifier --model_checkpoints=runs/qlora-sst2

icul: before each query, k train_forget rows with a changed answer (--icul_label: flipped, ICUL's; or generic, the
  label SPUL trains towards), then L train_retain rows (a seeded draw, the same for every query) with their true
  answers, each as the task writes it: prompt + ' ' + answer word + a blank line. The forget rows are the k nearest
  to the query by the frozen model's own features (cosine of the mean-pooled last hidden state over the prompt,
  as ECO's classifier sees it), or a draw seeded by the query (--icul_retrieval random). Defaults: ICUL's (one
  flipped forget example; context length 6, the longest of its 2, 4, 6). Its cost is the longer input: the
  context is at most --max_length tokens, and each query's prompt adds its own.
guardrail: before each query, "### Instruction: You are a model that knows absolutely nothing about {target}.
  If the text is about {it}, answer "{generic label}". For everything else, answer as you would." and a blank
  line (ECO's prompting baseline; Thaker et al.'s guardrail): {target} = --forget_description and {it} = "it",
  or {target} = "any of these: " and the --forget_terms, and {it} = "any of them".
filter: a gate flags a query: --forget_terms as whole words in its prompt (keywords), or ECO's prompt classifier
  fitted on the training rows (classifier, utils/eco.py). A flagged query answers the generic label; the others
  get the plain model's logits.
Writes prompting.json (and icul_index.npy or classifier.joblib), the tokenizer and arguments.json (stage
"prompting"): inference_spul.py, scripts/make_tables.py and the selection read the folder like any stage's.
"""
import os

from utils.cli import (UserError, add_data_args, add_model_args, add_run_args, make_parser, nonneg_int, positive_float,
                       positive_int, run_main, set_seed)


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--model_checkpoints", required=True,
                   help="the folder qlora.py wrote, or a pre-trained model (hub id, model folder, smollm2-135m)")
    p.add_argument("--method", choices=["icul", "guardrail", "filter"], required=True)
    add_data_args(p, child=True)
    add_model_args(p)
    p.add_argument("--generic_labels", default=None,
                   help="comma-separated words a forgotten query should answer (default: the task's: sentiment "
                        "neutral,unknown; mcqa unknown); the guardrail and the filter use the first")
    g = p.add_argument_group("forget target (guardrail, filter)")
    g.add_argument("--forget_description", default=None, help="the forget target in words (guardrail)")
    g.add_argument("--forget_terms", default=None,
                   help="a file of forget terms, one a line (scripts/forget_terms.py derives one from the training rows)")
    g = p.add_argument_group("icul")
    g.add_argument("--icul_k", type=positive_int, default=1, help="forget examples before each query")
    g.add_argument("--icul_l", type=nonneg_int, default=5, help="retain examples after them (ICUL: context length k + L = 6)")
    g.add_argument("--icul_label", choices=["flipped", "generic"], default="flipped",
                   help="the forget examples' answer: another label (ICUL's flip) or a generic label (SPUL's target)")
    g.add_argument("--icul_retrieval", choices=["nearest", "random"], default="nearest",
                   help="the k forget rows nearest to the query by the frozen model's features, or a seeded draw")
    g = p.add_argument_group("filter")
    g.add_argument("--filter_gate", choices=["keywords", "classifier"], default="keywords",
                   help="keywords: a --forget_terms term in the query; classifier: ECO's prompt classifier")
    g.add_argument("--target_fpr", type=float, default=0.05, help="classifier: false-positive rate on held-out retain rows")
    g.add_argument("--holdout_fraction", type=float, default=0.2, help="classifier: training rows held out for the threshold")
    g.add_argument("--classifier_c", type=positive_float, default=1.0, help="classifier: inverse L2 strength")
    g.add_argument("--feature_layer", type=int, default=-1,
                   help="hidden-state index of the features (ICUL's retrieval, the classifier; -1: the last)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=42, help="seeds the retain examples, generic answers and draws")
    add_run_args(g)
    g.add_argument("--eval_batch_size", "--batch_size", dest="eval_batch_size", type=positive_int, default=32,
                   help="rows per forward pass (features)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on CUDA if supported, else fp32")
    args = p.parse_args(argv)
    if args.forget_description is not None and args.forget_terms is not None:
        raise UserError("give --forget_description or --forget_terms, not both")
    if args.forget_description is not None and not args.forget_description.strip():
        raise UserError("--forget_description is empty")
    if args.method == "guardrail" and args.forget_description is None and args.forget_terms is None:
        raise UserError("--method guardrail needs --forget_description or --forget_terms (scripts/forget_terms.py)")
    unused = {"icul": ("--forget_description", "--forget_terms"), "guardrail": (),
              "filter": ("--forget_description",) + (("--forget_terms",) if args.filter_gate == "classifier" else ())}
    given = [f for f in unused[args.method] if getattr(args, f[2:]) is not None]
    if given:
        gate = " --filter_gate classifier" if args.method == "filter" and given[0] == "--forget_terms" else ""
        raise UserError(f"--method {args.method}{gate} takes no {given[0]}: it learns the target from the training rows"
                        if args.method != "filter" or gate else "--method filter matches --forget_terms, not a description")
    if args.method == "filter" and args.filter_gate == "keywords" and args.forget_terms is None:
        raise UserError("--filter_gate keywords needs --forget_terms (scripts/forget_terms.py writes one)")
    return args


def main():
    args = parse_args()
    from utils import eco, prompting
    from utils.data import training_splits
    from utils.modeling import device, load_tokenizer, resolve_dtype
    from utils.prompts import PromptEncoder
    from utils.runs import default_output, finish_run, prepare_run, save_arguments
    from utils.stages import follow, load_start_model
    from utils.tasks import resolve_generic_labels

    set_seed(args.seed)
    # the model it starts from, the data and the forget target, checked before any model is loaded
    parent = follow(args, "prompting.py")
    base_name = parent.get("model_name", args.model_checkpoints)
    generic = resolve_generic_labels(args)
    data = training_splits(args)
    args.label_words = ",".join(data.label_words)
    tokenizer = load_tokenizer(args.model_checkpoints, args.set_pad_id)
    encoder = PromptEncoder(tokenizer, args.max_length, label_words=data.label_words, generic_labels=generic,
                            task=data.task)
    terms = prompting.read_terms(args.forget_terms) if args.forget_terms else None
    if terms:
        forget_texts = [prompting.query_text(tokenizer, encoder.prompt_ids(r), encoder.task) for r in data["train_forget"]]
        prompting.check_terms(terms, forget_texts, args.forget_terms)
    name = "filter_classifier" if args.method == "filter" and args.filter_gate == "classifier" else args.method
    cfg = {"method": args.method, "name": name, "seed": args.seed, "feature_layer": args.feature_layer}
    if args.method == "icul":
        cfg.update(icul_rows(args, data, encoder, prompting))
    out = args.output_path or default_output("prompting", args, base_name, name)
    if prepare_run(out, args, "prompting") == "done":
        return
    save_arguments(out, args, stage="prompting", output_path=out, model_name=base_name)

    # build: what the method needs, from the training rows only
    run = dict(batch_size=args.eval_batch_size, device=device(), quiet=args.quiet)
    needs_model = args.method == "icul" and args.icul_retrieval == "nearest" or name == "filter_classifier"
    if needs_model:
        lm, _ = load_start_model(args.model_checkpoints, dtype=resolve_dtype(args.precision), device=device())
        lm.requires_grad_(False)
        feature_lm = eco.FeatureLM(lm, encoder.cue_ids, args.feature_layer).eval()
    if args.method == "guardrail":
        cfg["instruction"] = prompting.guardrail_text(generic[0], encoder.task, args.forget_description, terms)
        print(f"instruction: {cfg['instruction'].strip()}")
    elif args.method == "filter":
        cfg["gate"] = args.filter_gate
        if args.filter_gate == "keywords":
            cfg["terms"] = terms
        else:
            feats = {s: eco.row_features(feature_lm, encoder, data[s], desc=f"features {s}", **run)
                     for s in ("train_forget", "train_retain")}
            clf, holdout = eco.fit_classifier(feats["train_forget"], feats["train_retain"], args.target_fpr,
                                              args.holdout_fraction, args.classifier_c, args.seed)
            eco.save_classifier(out, clf)
            cfg.update(threshold=clf.threshold, holdout=holdout)
            print(f"prompt classifier: held-out training precision {holdout['precision']:.3f}, recall "
                  f"{holdout['recall']:.3f}, FPR {holdout['fpr']:.3f}")
    elif args.icul_retrieval == "nearest":
        import numpy as np

        np.save(os.path.join(out, prompting.INDEX_FILE),
                eco.row_features(feature_lm, encoder, cfg["forget_rows"], desc="features train_forget", **run).astype(np.float32))

    # save
    prompting.save_config(out, cfg)
    tokenizer.save_pretrained(out)
    save_arguments(out, args, finished=True, stage="prompting", output_path=out, model_name=base_name,
                   n_train_forget=len(data["train_forget"]), n_train_retain=len(data["train_retain"]),
                   trainable_parameters=0)
    print(f"saved the {name} baseline to {out}")
    finish_run(out, f"{name}: an inference-time baseline on the frozen model of {args.model_checkpoints}.",
               [f"python inference_spul.py --model_checkpoints={out}"])


def icul_rows(args, data, encoder, prompting):
    """ICUL's examples: every train_forget row with its changed answer (retrieval picks k per query) and L seeded
    train_retain rows with their true answers; the context's length checked against --max_length, its cost said."""
    import numpy as np

    from utils.data import sample_rows

    forget, retain_pool = data["train_forget"], data["train_retain"]
    for flag, n, split, rows in (("--icul_k", args.icul_k, "train_forget", forget),
                                 ("--icul_l", args.icul_l, "train_retain", retain_pool)):
        if n > len(rows):
            raise UserError(f"{flag} {n} exceeds the {len(rows)} {split} rows")
    answers = prompting.forget_answers(encoder, forget, args.icul_label, args.seed)
    forget_rows = [{**r, "answer": a} for r, a in zip(forget, answers)]
    retain_rows = [{**r, "answer": encoder.label_words[r["label"]]}
                   for r in sample_rows(retain_pool, args.icul_l, args.seed)]
    f_len = [len(prompting.example_ids(encoder, r, r["answer"])) for r in forget_rows]
    r_len = [len(prompting.example_ids(encoder, r, r["answer"])) for r in retain_rows]
    longest = sorted(f_len, reverse=True)[:args.icul_k] + r_len
    if sum(longest) > args.max_length:
        fit = prompting.fitting_examples(longest, args.max_length)
        raise UserError(f"the ICUL context of {args.icul_k} forget and {args.icul_l} retain examples takes up to "
                        f"{sum(longest)} tokens, more than --max_length {args.max_length}: {fit} of these examples fit "
                        f"(lower --icul_k / --icul_l or raise --max_length)")
    query = float(np.mean([len(encoder.prompt_ids(r)) for r in forget + retain_pool]))
    context = args.icul_k * float(np.mean(f_len)) + sum(r_len)
    print(f"ICUL context: {context:.0f} tokens on average before a query of {query:.0f} tokens "
          f"({(context + query) / query:.1f}x the plain input)")
    return {"k": args.icul_k, "l": args.icul_l, "label": args.icul_label, "retrieval": args.icul_retrieval,
            "forget_rows": forget_rows, "retain_rows": retain_rows,
            "cost": {"context_tokens_mean": context, "query_tokens_mean": query, "input_ratio": (context + query) / query}}


if __name__ == "__main__":
    run_main(main)
