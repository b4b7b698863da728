"""Benchmark 4: tokens per second of SPUL training against the floor the method cannot beat.

    python bench/epoch_floor.py
    python bench/epoch_floor.py --model_checkpoints runs/qlora-sst2 --batch_size 32 --steps 20

SPUL step: what spul.py's Trainer does per step (SoftPromptLM forward with the prompt encoder,
METHODS['spul'] with the compact KL cache, backward, clipping, AdamW on the prompt encoder).
Floor: the frozen LLM's forward and backward over exactly the same positions (the same p virtual
tokens, taken from the prompt encoder once, then the batch's tokens) down to the input embeddings,
with the same tail-only logits and a plain mean as the loss: no prompt encoder, no loss terms, no
optimiser. Any method that trains an input-side prompt through the frozen model does at least this
work. Also shown: the forward alone under no_grad (what filling the KL cache costs per token).
Tokens are the batch's real (unpadded) tokens. One warm-up step each, then alternating timed
steps; medians. The projected SST-2 epoch multiplies the mean tokens of 2,000 real training rows
by the 47,756 rows. Writes bench/results/epoch_floor.json.
"""
import sys

import common
import torch


def main():
    args = common.parser(__doc__, "epoch_floor").parse_args()
    common.check(args)
    from utils.methods import METHODS, build_training_rows
    from utils.modeling import device
    from utils.prompts import LeftPadCollator, position_ids_from_mask
    from utils.reference import CachedReference, fill_reference_cache
    from utils.soft_prompt import build_prompt_model

    env, tokenizer, lm, model_name = common.setup(args)
    dev = device()
    model = build_prompt_model(lm, args.ptuning_num_tokens, 128).to(dev)
    encoder = common.encoder_for(tokenizer, args)
    collate = LeftPadCollator(tokenizer.pad_token_id)
    items = build_training_rows(encoder, common.sst2_rows(args, args.batch_size - args.forget_rows, args.forget_rows),
                                "spul", args.seed)
    fill_reference_cache(model, items, collate, k=args.kl_topk, batch_size=args.batch_size, device=dev)
    batch = common.to_device(collate(items), dev)
    keep = batch["tail_labels"].shape[1] + 1
    tokens = common.real_tokens(batch)

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.001)
    spul_step = lambda: common.train_step(model, opt, batch, METHODS["spul"].objective, CachedReference(),
                                          {"alpha": 0.5, "beta": 0.5})

    # the floor's input: the same virtual tokens and token embeddings, as a leaf that wants its gradient
    base = model.lm
    with torch.no_grad():
        embeds = base.get_input_embeddings()(batch["input_ids"])
        virtual = model.peft_model.get_prompt(batch_size=embeds.shape[0]).to(embeds.dtype)
        x0 = torch.cat([virtual, embeds], 1)
    mask = torch.cat([batch["attention_mask"].new_ones(virtual.shape[:2]), batch["attention_mask"]], 1)
    pos = position_ids_from_mask(mask)

    def forward(x):
        with common.autocast(dev):
            return base(inputs_embeds=x, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False).logits

    def floor_step():
        x = x0.detach().requires_grad_(True)
        forward(x).float().mean().backward()
        return x.grad

    def forward_only():
        with torch.no_grad():
            return forward(x0)

    variants = {"spul": spul_step, "floor": floor_step, "forward": forward_only}
    for f in variants.values():
        f()
    times = {k: [] for k in variants}
    for i in range(args.steps):
        print(f"\rtimed step {i + 1}/{args.steps}", end="", flush=True, file=sys.stderr)
        for name, f in variants.items():
            times[name].append(common.timed(f)[0])
    print(file=sys.stderr)

    t = {k: common.median(v) for k, v in times.items()}
    tps = {k: tokens / v for k, v in t.items()}
    sample = common.sst2_rows(args, 2000 - 60, 60, offset=3)
    mean_tokens = sum(len(it["input_ids"]) for it in build_training_rows(encoder, sample, "spul", args.seed)) / 2000
    epoch_tokens = mean_tokens * (common.SST2_RETAIN + common.SST2_FORGET)
    res = {"model": model_name, "device_type": dev.type, "batch_rows": args.batch_size, "forget_rows": args.forget_rows,
           "real_tokens_per_batch": tokens, "padded_shape": list(batch["input_ids"].shape),
           "ptuning_num_tokens": args.ptuning_num_tokens, "step_seconds": times, "step_seconds_median": t,
           "tokens_per_second": tps, "spul_over_floor_throughput": tps["spul"] / tps["floor"],
           "spul_over_forward_throughput": tps["spul"] / tps["forward"],
           "sst2_mean_tokens_per_row": mean_tokens,
           "sst2_epoch_seconds_projected": {k: epoch_tokens / v for k, v in tps.items()}}

    names = {"spul": "SPUL training step", "floor": "floor: frozen forward + backward to the inputs",
             "forward": "forward only (no_grad)"}
    print(common.table(["", "s / step (median)", "tokens / s", "SPUL / this", "SST-2 epoch, projected (min)"],
                       [[names[k], t[k], tps[k], tps["spul"] / tps[k], res["sst2_epoch_seconds_projected"][k] / 60]
                        for k in variants]))
    print(f"batch: {args.batch_size} rows, {tokens} real tokens, padded {tuple(batch['input_ids'].shape)} "
          f"+ p={args.ptuning_num_tokens}; {env['device']}, {env['torch_threads']} threads, load {env['load_average_at_start']}")
    common.write_results(args.out, env, args, res)


if __name__ == "__main__":
    common.run(main)
