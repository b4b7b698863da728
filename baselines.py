r"""Stage 2 (comparison): the paper's fine-tuning baselines, plus LLMU and NPO, on the merged model.

    python baselines.py --dataset=sst2 --model_checkpoints=runs/qlora-sst2 --max_length=1024 --set_pad_id \
        --lr=1e-4 --train_batch_size=32 --eval_batch_size=32 --num_epochs=1 --weight_decay=0.001 \
        --unlearn_method=gradient_ascent

Methods (objectives in utils/methods.py; rows they train on in brackets):
  gradient_ascent          maximise the cross-entropy of the true label            [forget]
  random_label             cross-entropy towards a seeded generic label            [forget]
  gradient_ascent_kl       GA + KL to the original model at the label position     [forget, retain]
  gradient_ascent_descent  GA + ordinary cross-entropy                             [forget, retain]
  llmu                     Yao et al.: w_ga·GA + w_rl·generic-label CE + w_kl·KL   [forget, retain]
  npo                      negative preference optimisation against the original   [forget]
  npo_rt                   NPO + w·retain cross-entropy                            [forget, retain]

All LLM weights of the merged QLoRA model (or of a pre-trained model) are trained (the paper's setting),
in mixed precision: fp32 master weights, bf16 autocast where --precision is bf16 (the default on a GPU
that has it); --pure_bf16 keeps the weights themselves in bf16, where small updates round away. --lora
trains a LoRA adapter instead (its reference is the model with the adapter switched off). Writes the
unlearned model (or adapter), the tokenizer, arguments.json and training_log.json (each loss term per
logging step). 7B models on one 40 GB GPU: DeepSpeed ZeRO with the optimiser on the CPU
(configs/zero2_offload.yaml), see docs/baselines.md.
"""
import copy
import os

from utils.cli import (UserError, add_bool, add_data_args, add_model_args, add_training_args, check_training_args,
                       make_parser, nonneg_float, positive_float, positive_int, run_main, set_seed, unit_interval)
from utils.methods import BASELINES, METHODS


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--model_checkpoints", required=True,
                   help="the folder qlora.py wrote, or a pre-trained model (hub id, model folder, smollm2-135m)")
    p.add_argument("--unlearn_method", required=True, metavar="METHOD", help="one of: " + ", ".join(BASELINES))
    add_data_args(p, child=True)
    add_model_args(p)
    add_training_args(p, lr=1e-4, epochs=1, warmup=0.05)
    g = p.add_argument_group("unlearning")
    add_bool(g, "--pure_bf16", help="keep the trained weights in bf16 (no fp32 master copy): half the memory, but "
                                    "updates smaller than a weight's bf16 spacing are lost")
    g.add_argument("--optim", default="adamw_torch",
                   help="transformers optimiser name, e.g. paged_adamw_8bit or adafactor (docs/baselines.md)")
    g.add_argument("--generic_labels", default=None,
                   help="labels for random_label and LLMU's mismatch term (default: the task's: sentiment neutral,unknown; "
                        "mcqa unknown)")
    g.add_argument("--kl_reference", choices=["cache", "online"], default="cache",
                   help="cache: the original model's top-k label distribution and completion log-prob, computed once "
                        "before training; online: a frozen copy of the model (or the adapter switched off) every step")
    g.add_argument("--kl_topk", type=positive_int, default=32, help="k of the compact KL cache")
    g = p.add_argument_group("LoRA instead of full fine-tuning")
    add_bool(g, "--lora", help="train a LoRA adapter on the merged model instead of all its weights")
    g.add_argument("--lora_rank", type=positive_int, default=16, help="rank r of the LoRA matrices")
    g.add_argument("--lora_alpha", type=positive_int, default=64,
                   help="LoRA scaling numerator: updates are scaled by lora_alpha / lora_rank")
    g.add_argument("--lora_dropout", type=unit_interval, default=0.1, help="LoRA dropout")
    g.add_argument("--target_modules", default=None, help="comma-separated module names (default: the attention q/v projections)")
    g = p.add_argument_group("LLMU weights")
    g.add_argument("--llmu_ga_weight", type=nonneg_float, default=0.5, help="gradient ascent on forget rows (0.5, as Yao et al.)")
    g.add_argument("--llmu_rl_weight", type=nonneg_float, default=1.0, help="generic-label cross-entropy on forget rows")
    g.add_argument("--llmu_kl_weight", type=nonneg_float, default=1.0, help="KL to the original model on retain rows")
    g = p.add_argument_group("NPO")
    g.add_argument("--npo_beta", type=positive_float, default=0.1, help="β of NPO (0.1, as Zhang et al.)")
    g.add_argument("--npo_retain_weight", type=nonneg_float, default=1.0, help="weight of the retain cross-entropy of npo_rt")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    check_training_args(args)
    if args.unlearn_method not in BASELINES:
        raise UserError(f"unknown --unlearn_method '{args.unlearn_method}': choose one of {', '.join(BASELINES)}")
    if args.precision == "fp16" and not args.lora:
        raise UserError("--precision fp16 cannot train all weights (fp16 weights lose small updates and overflow); "
                        "use bf16 or fp32, or --lora")
    if args.pure_bf16 and args.lora:
        raise UserError("--pure_bf16 is for full fine-tuning; a LoRA adapter is trained in fp32 anyway")
    if args.pure_bf16 and args.precision == "fp32":
        raise UserError("--pure_bf16 contradicts --precision fp32")


def method_weights(args):
    """The objective's keyword weights from the method's flags."""
    if args.unlearn_method == "llmu":
        return {"ga_weight": args.llmu_ga_weight, "rl_weight": args.llmu_rl_weight, "kl_weight": args.llmu_kl_weight}
    if args.unlearn_method in ("npo", "npo_rt"):
        return {"npo_beta": args.npo_beta, "retain_weight": args.npo_retain_weight}
    return {}


def add_lora(lm, args):
    from peft import LoraConfig, get_peft_model

    from utils.lora import default_target_modules

    targets = args.target_modules.split(",") if args.target_modules else default_target_modules(lm)
    missing = [t for t in targets if not any(n.endswith("." + t) for n, _ in lm.named_modules())]
    if missing:
        raise UserError(f"the model has no module named {', '.join(missing)} (for --target_modules)")
    return get_peft_model(lm, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                         bias="none", target_modules=targets, task_type="CAUSAL_LM"))


def main(argv=None):
    args = parse_args(argv)
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")  # also the reference-cache pass
    import torch

    from utils.data import training_splits
    from utils.methods import build_training_rows
    from utils.modeling import count_trainable, load_tokenizer, resolve_dtype
    from utils.prompts import LeftPadCollator, PromptEncoder
    from utils.reference import ReferenceCache, make_reference, store_path
    from utils.runs import default_output, finish_run, prepare_run, remove_checkpoints, save_arguments, short_name
    from utils.stages import follow, load_start_model
    from utils.tasks import resolve_generic_labels
    from utils.training import TailLM, TailLossTrainer, enable_gradient_checkpointing, train, training_arguments

    method = METHODS[args.unlearn_method]
    # the model it starts from and the data, checked before any model is loaded
    parent = follow(args, "baselines.py")
    generic = resolve_generic_labels(args)
    data = training_splits(args)
    args.label_words = ",".join(data.label_words)
    base_name = parent.get("model_name", args.model_checkpoints)
    out = args.output_path or default_output(
        f"baseline-{args.unlearn_method}{'-lora' if args.lora else ''}", args, base_name, f"lr{args.lr:g}-f{args.forget_size}")
    mode = prepare_run(out, args, "baseline")
    if mode == "done":
        return
    try:
        set_seed(args.seed)
        targs = training_arguments(args, out, optim=args.optim)  # sets up the processes and each one's device
    except (ValueError, ImportError) as e:  # unknown --optim, bitsandbytes missing, ...
        raise UserError(f"bad training arguments: {str(e).splitlines()[0][:300]}")
    tokenizer = load_tokenizer(args.model_checkpoints, args.set_pad_id)
    encoder = PromptEncoder(tokenizer, args.max_length, label_words=data.label_words, generic_labels=generic, task=data.task)
    rows = build_training_rows(encoder, data, args.unlearn_method, args.seed)
    counts = dict(model_name=base_name, n_train_rows=len(rows), n_train_forget=len(data["train_forget"]),
                  n_train_retain=len(data["train_retain"]))
    save_arguments(out, args, stage="baseline", output_path=out, **counts)

    # model: all weights trainable, fp32 master weights unless --pure_bf16 (or a LoRA adapter on it)
    weights_dtype = torch.bfloat16 if args.pure_bf16 else (resolve_dtype(args.precision) if args.lora else torch.float32)
    if args.pure_bf16:
        print("warning: --pure_bf16: the weights are trained in bf16; updates below a weight's bf16 spacing "
              "(~0.4 % of its size) are lost", flush=True)
    lm, _ = load_start_model(args.model_checkpoints, dtype=weights_dtype, device=targs.device)
    reference_lm = None
    if args.lora:
        lm = add_lora(lm, args)
    else:
        lm.requires_grad_(True)  # PEFT froze the base weights when it loaded the QLoRA adapter
        if method.needs_reference and args.kl_reference == "online":
            reference_lm = copy.deepcopy(lm).requires_grad_(False).eval()  # the original model, kept frozen
    enable_gradient_checkpointing(args, lm)
    model = TailLM(lm, reference_lm)
    n_trainable = count_trainable(model)
    print(f"{args.unlearn_method}: {n_trainable:,} trainable parameters ({'LoRA adapter' if args.lora else 'all LLM weights'}), "
          f"{len(rows)} training rows")

    collator = LeftPadCollator(tokenizer.pad_token_id)
    cache = None
    if method.needs_reference and args.kl_reference == "cache":
        # the values depend on the precision the forward runs in: the weights' dtype and training's autocast
        amp = "bf16" if targs.bf16 else "fp16" if targs.fp16 else None
        key = f"{str(weights_dtype).replace('torch.', '')}{f'-autocast-{amp}' if amp else ''}"
        cache = ReferenceCache(rows, args.kl_topk, store_path(args.model_checkpoints, args.kl_topk, key))
    trainer = TailLossTrainer(
        model=model, args=targs, train_dataset=rows, data_collator=collator, objective=method.objective,
        reference=make_reference(args.kl_reference, cache) if method.needs_reference else None, weights=method_weights(args))
    if cache is not None:
        # The weights change from the first step: every reference row is computed before it, while the model
        # (for --lora: with the adapter switched off) is still the original, in the precision training runs its
        # forward in (the Trainer's autocast), so that the KL is 0 and the NPO ratio 1 at step 0. Rows an earlier
        # run on the same model computed are read from disk; several processes split the rest.
        need = [r for r in rows if r["role"] in method.reference_roles]
        model.to(targs.device)
        with trainer.accelerator.autocast():
            cache.fill(model, need, collator, args.eval_batch_size, targs.device, quiet=args.quiet)
        cache.save()
        print(f"reference cache: {len(need):,} rows ({cache.reused:,} read from {cache.path})")
    train(trainer, resume=mode == "resume")  # a NaN/inf loss raises NonFiniteLoss; the training log is written either way

    if trainer.is_world_process_zero():
        lm.config.use_cache = True  # gradient checkpointing switched it off
        lm.save_pretrained(out)  # the full unlearned model, or the LoRA adapter alone with --lora
        tokenizer.save_pretrained(out)
        save_arguments(out, args, finished=True, stage="baseline", output_path=out, **counts, trainable_parameters=n_trainable,
                       reference_cache=cache.describe() if cache else None,
                       train_runtime_s=trainer.state.log_history[-1].get("train_runtime"))
        if not args.keep_checkpoints:
            remove_checkpoints(out)
        print(f"saved the unlearned {'adapter' if args.lora else 'model'} to {out}")
        finish_run(out, f"{args.unlearn_method} unlearning of {args.model_checkpoints} ({short_name(base_name)}): "
                        f"{'a LoRA adapter' if args.lora else 'the whole model'}.",
                   [f"python inference_spul.py --model_checkpoints={out}"])


if __name__ == "__main__":
    run_main(main)
