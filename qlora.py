r"""Stage 1: QLoRA fine-tuning so that the model memorises train_retain ∪ train_forget (paper §4.1).

    python qlora.py --dataset=sst2 --model_name=meta-llama/Llama-2-7b-hf --max_length=1024 --set_pad_id \
        --lr=1e-4 --train_batch_size=32 --num_epochs=10 --output_path=runs/qlora-sst2
    accelerate launch qlora.py ...    # several GPUs (DDP through the Trainer), each process on its own GPU

Writes the LoRA adapter, the tokenizer, arguments.json (everything later stages need) and
training_log.json; while it runs, a checkpoint every epoch (--resume continues from the last one).
Loss on the label tokens only.
"""
import os

from utils.cli import (UserError, add_data_args, add_model_args, add_training_args, check_training_args, comma_list,
                       make_parser, positive_int, run_main, set_seed, unit_interval)


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--model_name", default="smollm2-135m", help="hub id, local folder, or smollm2-135m (embedded)")
    add_data_args(p)
    add_model_args(p)
    add_training_args(p, lr=1e-4, epochs=10, warmup=0.05)
    g = p.add_argument_group("LoRA / quantization")
    g.add_argument("--quantization", choices=["nf4", "none"], default="nf4", help="4-bit NF4 base (QLoRA) or full precision")
    g.add_argument("--lora_rank", type=positive_int, default=16, help="rank r of the LoRA matrices")
    g.add_argument("--lora_alpha", type=positive_int, default=64,
                   help="LoRA scaling numerator: updates are scaled by lora_alpha / lora_rank")
    g.add_argument("--lora_dropout", "--lora_fropout", dest="lora_dropout", type=unit_interval, default=0.1,
                   help="LoRA dropout (--lora_fropout, the released scripts' spelling, is accepted too)")
    g.add_argument("--lora_bias", default="none", choices=["none", "all", "lora_only"])
    g.add_argument("--target_modules", default=None, help="comma-separated module names (default: the attention q/v projections of the model)")
    g.add_argument("--train_on", choices=["all", "retain"], default="all",
                   help="retain: train on train_retain alone, the 'retrained' gold-standard reference")
    args = p.parse_args(argv)
    check_training_args(args)
    return args


def main():
    args = parse_args()
    from utils.data import resolve_task, training_splits
    from utils.methods import RETAIN
    from utils.modeling import load_model, load_tokenizer, resolve_dtype
    from utils.lora import default_target_modules
    from utils.prompts import LeftPadCollator, PromptEncoder
    from utils.runs import default_output, finish_run, prepare_run, recorded_dataset, remove_checkpoints, save_arguments
    from utils.stages import looks_like_path

    # data (validated before any model is loaded, or peft imported: mistakes cost seconds, not minutes)
    if args.data_dir:
        if not os.path.isdir(args.data_dir):
            raise UserError(f"data folder {args.data_dir} does not exist")
        args.data_dir = os.path.abspath(args.data_dir)
    if os.path.isdir(args.model_name):
        args.model_name = os.path.abspath(args.model_name)
    elif looks_like_path(args.model_name):  # else a hub download would fail with a cut-off tokenizer message
        raise UserError(f"--model_name {args.model_name} does not exist")
    recorded_dataset(args, args.output_path)
    resolve_task(args)
    data = training_splits(args)
    args.label_words = ",".join(data.label_words)
    out = args.output_path or default_output("qlora", args, args.model_name, "retrained" if args.train_on == "retain" else "")
    mode = prepare_run(out, args, "qlora")
    if mode == "done":
        return
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from utils.training import TailLM, TailLossTrainer, enable_gradient_checkpointing, train, training_arguments

    set_seed(args.seed)
    targs = training_arguments(args, out)  # sets up the processes: each one's device is targs.device
    tokenizer = load_tokenizer(args.model_name, args.set_pad_id)
    encoder = PromptEncoder(tokenizer, args.max_length, label_words=data.label_words, task=data.task)
    rows = encoder.encode_rows(data["train_retain"], role=RETAIN)
    if args.train_on == "all":
        rows += encoder.encode_rows(data["train_forget"], role=RETAIN)
    counts = dict(n_train_retain=len(data["train_retain"]), n_train_forget=len(data["train_forget"]), n_train_rows=len(rows))
    save_arguments(out, args, stage="qlora", output_path=out, **counts)

    # model: NF4 base (on this process's device) + LoRA on the attention projections
    quant = None if args.quantization == "none" else "nf4"
    lm = load_model(args.model_name, dtype=resolve_dtype(args.precision), quantization=quant, device=targs.device)
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
        model=TailLM(lm), args=targs, train_dataset=rows, data_collator=LeftPadCollator(tokenizer.pad_token_id),
        objective=lambda c: {"loss": c.ce(RETAIN)})
    train(trainer, resume=mode == "resume")

    if trainer.is_world_process_zero():
        lm.save_pretrained(out)
        tokenizer.save_pretrained(out)
        save_arguments(out, args, finished=True, stage="qlora", output_path=out, target_modules_used=targets, **counts,
                       train_runtime_s=trainer.state.log_history[-1].get("train_runtime"))
        if not args.keep_checkpoints:
            remove_checkpoints(out)
        print(f"saved the LoRA adapter to {out}")
        what = "retrained reference (train_retain only)" if args.train_on == "retain" else "fine-tuned model"
        finish_run(out, f"LoRA adapter of the {what} on {args.model_name}; later stages merge it into the base model.",
                   [f"python inference_spul.py --model_checkpoints={out}"] + ([] if args.train_on == "retain" else [
                       f"python spul.py --model_checkpoints={out} --ptuning_num_tokens=30 --alpha=1.0 --beta=0.5",
                       f"python baselines.py --model_checkpoints={out} --unlearn_method=gradient_ascent_descent"]))


if __name__ == "__main__":
    run_main(main)
