"""Stage 2: SPUL, soft-prompt unlearning on the frozen merged model (paper §3).

    python spul.py --dataset=sst2 --model_checkpoints=runs/qlora-sst2 --ptuning_num_tokens=30 --alpha=1.0 --beta=0.5
    accelerate launch spul.py ...     # several GPUs: the same objective as one GPU with their global batch

Merges the QLoRA adapter of --model_checkpoints into the full-precision base (or takes a pre-trained model
as it is), freezes every LLM weight and trains only a P-tuning prompt encoder (p virtual tokens through an
MLP with hidden size 128) on L = L_f + α·L_r + β·L_kl. The data settings of the qlora.py folder (dataset,
data folder, max_length, row caps) are used unless given. Writes the prompt adapter, arguments.json,
training_log.json (each loss term per logging step) and, while it runs, checkpoints (--resume continues
from the last one).
"""
from utils.cli import (add_bool, add_data_args, add_model_args, add_training_args, check_training_args, make_parser,
                       nonneg_float, positive_int, run_main, set_seed)


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--model_checkpoints", required=True,
                   help="the folder qlora.py wrote, or a pre-trained model (hub id, model folder, smollm2-135m)")
    add_data_args(p, child=True)
    add_model_args(p)
    add_training_args(p, lr=1e-4, epochs=10, warmup=0.1)
    g = p.add_argument_group("SPUL")
    g.add_argument("--ptuning_num_tokens", type=positive_int, default=30, help="p, the number of soft prompt tokens")
    g.add_argument("--ptuning_hidden_size", type=positive_int, default=128, help="hidden size of the prompt encoder's MLP")
    g.add_argument("--alpha", type=nonneg_float, default=0.5, help="weight of the retain cross-entropy L_r")
    g.add_argument("--beta", type=nonneg_float, default=0.5, help="weight of the retain KL term L_kl")
    g.add_argument("--generic_labels", default=None,
                   help="labels the forget rows are trained towards (default: the task's: sentiment neutral,unknown; "
                        "mcqa unknown)")
    g.add_argument("--kl_reference", choices=["cache", "online"], default="cache",
                   help="cache: the frozen model's top-k label distribution, computed once per row (and kept on disk "
                        "for later runs on the same model); online: a prompt-free forward every step")
    g.add_argument("--kl_topk", type=positive_int, default=32, help="k of the compact KL cache")
    add_bool(g, "--shared_prefix", default=True,
             help="compute the p virtual tokens once per batch and run the rows on their keys/values (the same numbers "
                  "as prepending them to every row, which false does; utils/soft_prompt.py)")
    args = p.parse_args(argv)
    check_training_args(args)
    return args


def main():
    args = parse_args()
    from utils.data import training_splits
    from utils.methods import METHODS, build_training_rows
    from utils.modeling import count_trainable, load_tokenizer, resolve_dtype
    from utils.prompts import LeftPadCollator, PromptEncoder
    from utils.reference import ReferenceCache, make_reference, store_path
    from utils.runs import default_output, finish_run, prepare_run, remove_checkpoints, save_arguments, short_name
    from utils.soft_prompt import build_prompt_model
    from utils.stages import follow, load_start_model
    from utils.tasks import resolve_generic_labels

    # the model it starts from and the data, checked before any model is loaded: mistakes cost seconds
    parent = follow(args, "spul")
    generic = resolve_generic_labels(args)
    data = training_splits(args)
    args.label_words = ",".join(data.label_words)
    base_name = parent.get("model_name", args.model_checkpoints)
    out = args.output_path or default_output(
        "spul", args, base_name, f"p{args.ptuning_num_tokens}-a{args.alpha}-b{args.beta}-f{args.forget_size}")
    mode = prepare_run(out, args, "spul")
    if mode == "done":
        return
    from utils.training import TailLossTrainer, enable_gradient_checkpointing, train, training_arguments

    set_seed(args.seed)
    targs = training_arguments(args, out)  # sets up the processes: each one's device is targs.device
    tokenizer = load_tokenizer(args.model_checkpoints, args.set_pad_id)
    encoder = PromptEncoder(tokenizer, args.max_length, label_words=data.label_words, generic_labels=generic, task=data.task)
    rows = build_training_rows(encoder, data, "spul", args.seed)
    counts = dict(model_name=base_name, n_train_rows=len(rows), n_train_forget=len(data["train_forget"]),
                  n_train_retain=len(data["train_retain"]))
    save_arguments(out, args, stage="spul", output_path=out, **counts)

    # model: merged, frozen LLM + trainable prompt encoder
    dtype = resolve_dtype(args.precision)
    lm, _ = load_start_model(args.model_checkpoints, dtype=dtype, device=targs.device)
    model = build_prompt_model(lm, args.ptuning_num_tokens, args.ptuning_hidden_size, args.shared_prefix)
    enable_gradient_checkpointing(args, lm)
    n_trainable = count_trainable(model)
    print(f"trainable parameters: {n_trainable:,} (p={args.ptuning_num_tokens}, d={lm.config.hidden_size}); LLM frozen")

    # the reference of L_kl: the frozen model without the prompt, the same at every step, so each retain row's
    # values are computed when the row is first seen (or read from an earlier run on the same model)
    cache = None
    if args.beta and args.kl_reference == "cache":
        cache = ReferenceCache(rows, args.kl_topk, store_path(args.model_checkpoints, args.kl_topk, dtype))
        if cache.reused:
            print(f"reference cache: {cache.reused:,} of {len(rows):,} rows reused from {cache.path}")
    trainer = TailLossTrainer(
        model=model, args=targs, train_dataset=rows, data_collator=LeftPadCollator(tokenizer.pad_token_id),
        objective=METHODS["spul"].objective, reference=make_reference(args.kl_reference, cache, lazy=True),
        weights={"alpha": args.alpha, "beta": args.beta})
    train(trainer, resume=mode == "resume")

    if trainer.is_world_process_zero():
        model.peft_model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        save_arguments(out, args, finished=True, stage="spul", output_path=out, **counts, trainable_parameters=n_trainable,
                       reference_cache=cache.describe() if cache else None,
                       train_runtime_s=trainer.state.log_history[-1].get("train_runtime"))
        if not args.keep_checkpoints:
            remove_checkpoints(out)
        print(f"saved the prompt adapter to {out}")
        finish_run(out, f"SPUL prompt adapter (p = {args.ptuning_num_tokens}) for the frozen model of "
                        f"{args.model_checkpoints} ({short_name(base_name)}).",
                   [f"python inference_spul.py --model_checkpoints={out}"])


if __name__ == "__main__":
    run_main(main)
