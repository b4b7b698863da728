"""Stage 1: QLoRA fine-tuning so that the model memorises train_retain ∪ train_forget (paper §4.1).

    python qlora.py --dataset=sst2 --model_name=meta-llama/Llama-2-7b-hf --max_length=1024 --set_pad_id \
        --lr=1e-4 --train_batch_size=32 --num_epochs=10 --output_path=runs/qlora-sst2
    accelerate launch qlora.py ...    # several GPUs (DDP through the Trainer)

Writes the LoRA adapter, the tokenizer, arguments.json (everything later stages need) and
training_log.json. Loss on the label tokens only.
"""
import argparse
import os

from utils.cli import (UserError, add_data_args, add_model_args, add_training_args, check_training_args, comma_list,
                       run_main, set_seed)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="smollm2-135m", help="hub id, local folder, or smollm2-135m (embedded)")
    add_data_args(p)
    add_model_args(p)
    add_training_args(p, lr=1e-4, epochs=10, warmup=0.05)
    g = p.add_argument_group("LoRA / quantization")
    g.add_argument("--quantization", choices=["nf4", "none"], default="nf4", help="4-bit NF4 base (QLoRA) or full precision")
    g.add_argument("--lora_rank", type=int, default=16)
    g.add_argument("--lora_alpha", type=int, default=64)
    g.add_argument("--lora_dropout", "--lora_fropout", dest="lora_dropout", type=float, default=0.1,
                   help="(the seed README's --lora_fropout is accepted too)")
    g.add_argument("--lora_bias", default="none", choices=["none", "all", "lora_only"])
    g.add_argument("--target_modules", default=None, help="comma-separated module names (default: the attention q/v projections of the model)")
    g.add_argument("--train_on", choices=["all", "retain"], default="all",
                   help="retain: train on train_retain alone, the 'retrained' gold-standard reference")
    args = p.parse_args(argv)
    check_training_args(args)
    return args


def main():
    args = parse_args()
    from utils.data import training_splits
    from utils.methods import RETAIN
    from utils.modeling import load_model, load_tokenizer, resolve_dtype
    from utils.lora import default_target_modules
    from utils.prompts import LeftPadCollator, PromptEncoder
    from utils.runs import prepare_output_dir, save_arguments, short_name

    set_seed(args.seed)
    out = args.output_path or os.path.join("runs", f"qlora-{args.dataset}-{short_name(args.model_name)}"
                                                   + ("-retrained" if args.train_on == "retain" else ""))

    # data (validated before any model is loaded, or peft imported: mistakes cost seconds, not minutes)
    data = training_splits(args)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from utils.training import TailLM, TailLossTrainer, enable_gradient_checkpointing, train, training_arguments

    tokenizer = load_tokenizer(args.model_name, args.set_pad_id)
    encoder = PromptEncoder(tokenizer, args.max_length)
    rows = encoder.encode_rows(data["train_retain"], role=RETAIN)
    if args.train_on == "all":
        rows += encoder.encode_rows(data["train_forget"], role=RETAIN)
    prepare_output_dir(out, args.overwrite)
    save_arguments(out, args, stage="qlora", output_path=out,
                   n_train_retain=len(data["train_retain"]), n_train_forget=len(data["train_forget"]))

    # model: NF4 base + LoRA on the attention projections
    dtype = resolve_dtype(args.precision)
    quant = None if args.quantization == "none" else "nf4"
    lm = load_model(args.model_name, dtype=dtype, quantization=quant)
    targets = comma_list(args.target_modules) if args.target_modules else default_target_modules(lm)
    missing = [t for t in targets if not any(n.endswith("." + t) for n, _ in lm.named_modules())]
    if missing:
        raise UserError(f"the model has no module named {', '.join(missing)} (for --target_modules)")
    if quant:
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    lm = get_peft_model(lm, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                       bias=args.lora_bias, target_modules=targets, task_type="CAUSAL_LM"))
    enable_gradient_checkpointing(args, lm)
    if not args.quiet:
        lm.print_trainable_parameters()

    trainer = TailLossTrainer(
        model=TailLM(lm), args=training_arguments(args, out),
        train_dataset=rows, data_collator=LeftPadCollator(tokenizer.pad_token_id),
        objective=lambda c: {"loss": c.ce(RETAIN)})
    train(trainer)

    if trainer.is_world_process_zero():
        lm.save_pretrained(out)
        tokenizer.save_pretrained(out)
        save_arguments(out, args, finished=True, stage="qlora", output_path=out, target_modules_used=targets,
                       n_train_retain=len(data["train_retain"]), n_train_forget=len(data["train_forget"]),
                       n_train_rows=len(rows), train_runtime_s=trainer.state.log_history[-1].get("train_runtime"))
        print(f"saved the LoRA adapter to {out}")


if __name__ == "__main__":
    run_main(main)
