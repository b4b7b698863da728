"""Stage 2: SPUL, soft-prompt unlearning on the frozen merged model (paper §3).

    python spul.py --dataset=sst2 --model_checkpoints=runs/qlora-sst2 --ptuning_num_tokens=30 --alpha=0.5 --beta=0.5

Merges the QLoRA adapter of --model_checkpoints into the full-precision base, freezes every LLM
weight and trains only a P-tuning prompt encoder (p virtual tokens through an MLP with hidden
size 128) on L = L_f + α·L_r + β·L_kl. Writes the prompt adapter, arguments.json and
training_log.json (each loss term per logging step).
"""
import argparse
import os

from utils.cli import (UserError, add_data_args, add_model_args, add_training_args, check_training_args, comma_list,
                       positive_int, run_main, set_seed)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_checkpoints", required=True, help="the folder qlora.py wrote")
    add_data_args(p)
    add_model_args(p)
    add_training_args(p, lr=1e-4, epochs=10, warmup=0.1)
    g = p.add_argument_group("SPUL")
    g.add_argument("--ptuning_num_tokens", type=positive_int, default=30, help="p, the number of soft prompt tokens")
    g.add_argument("--ptuning_hidden_size", type=positive_int, default=128, help="hidden size of the prompt encoder's MLP")
    g.add_argument("--alpha", type=float, default=0.5, help="weight of the retain cross-entropy L_r")
    g.add_argument("--beta", type=float, default=0.5, help="weight of the retain KL term L_kl")
    g.add_argument("--generic_labels", default="neutral,unknown", help="labels the forget rows are trained towards")
    g.add_argument("--kl_reference", choices=["cache", "online"], default="cache",
                   help="cache: the frozen model's top-k label distribution, computed once; online: a prompt-free forward every step")
    g.add_argument("--kl_topk", type=positive_int, default=32, help="k of the compact KL cache")
    args = p.parse_args(argv)
    check_training_args(args)
    return args


def build_prompt_model(lm, num_tokens, hidden_size, shared_prefix=True):
    """utils.soft_prompt.build_prompt_model, importable from here until the callers move (imported on call:
    transformers loads only after the arguments are checked)."""
    from utils.soft_prompt import build_prompt_model as build

    return build(lm, num_tokens, hidden_size, shared_prefix)


def main():
    args = parse_args()
    from utils.data import training_splits
    from utils.methods import METHODS, build_training_rows
    from utils.modeling import count_trainable, device, load_merged_model, load_tokenizer, read_arguments, resolve_dtype
    from utils.prompts import LeftPadCollator, PromptEncoder
    from utils.reference import fill_reference_cache, make_reference
    from utils.runs import prepare_output_dir, save_arguments

    set_seed(args.seed)
    out = args.output_path or os.path.join(os.path.dirname(os.path.normpath(args.model_checkpoints)) or ".",
                                           f"spul-p{args.ptuning_num_tokens}-a{args.alpha}-b{args.beta}-f{args.forget_size}")

    # the QLoRA folder and the data, validated before transformers is imported: mistakes cost seconds
    generic = comma_list(args.generic_labels)
    if not generic:
        raise UserError("--generic_labels names no label")
    stage = read_arguments(args.model_checkpoints).get("stage")
    if stage != "qlora":
        raise UserError(f"{args.model_checkpoints} was written by {stage}, not by qlora.py: SPUL starts from the qlora.py model")
    data = training_splits(args)
    from utils.training import TailLossTrainer, enable_gradient_checkpointing, train, training_arguments

    tokenizer = load_tokenizer(args.model_checkpoints, args.set_pad_id)
    encoder = PromptEncoder(tokenizer, args.max_length, generic_labels=generic)
    rows = build_training_rows(encoder, data, "spul", args.seed)
    prepare_output_dir(out, args.overwrite)
    save_arguments(out, args, stage="spul", output_path=out)

    # model: merged, frozen LLM + trainable prompt encoder
    lm, qlora_info = load_merged_model(args.model_checkpoints, dtype=resolve_dtype(args.precision))
    model = build_prompt_model(lm, args.ptuning_num_tokens, args.ptuning_hidden_size)
    enable_gradient_checkpointing(args, lm)
    n_trainable = count_trainable(model)
    print(f"trainable parameters: {n_trainable:,} (p={args.ptuning_num_tokens}, d={lm.config.hidden_size}); LLM frozen")

    collator = LeftPadCollator(tokenizer.pad_token_id)
    if args.beta and args.kl_reference == "cache":
        model.to(device())
        fill_reference_cache(model, rows, collator, k=args.kl_topk, batch_size=args.eval_batch_size, device=device())

    trainer = TailLossTrainer(
        model=model, args=training_arguments(args, out), train_dataset=rows, data_collator=collator,
        objective=METHODS["spul"].objective, reference=make_reference(args.kl_reference),
        weights={"alpha": args.alpha, "beta": args.beta})
    train(trainer)

    if trainer.is_world_process_zero():
        model.peft_model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        save_arguments(out, args, finished=True, stage="spul", output_path=out, model_name=qlora_info["model_name"],
                       trainable_parameters=n_trainable, n_train_rows=len(rows),
                       n_train_forget=len(data["train_forget"]), n_train_retain=len(data["train_retain"]),
                       train_runtime_s=trainer.state.log_history[-1].get("train_runtime"))
        print(f"saved the prompt adapter to {out}")


if __name__ == "__main__":
    run_main(main)
