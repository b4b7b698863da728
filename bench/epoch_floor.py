"""Benchmark 3: SPUL's training throughput (real tokens per second) against the floor the method cannot beat.

    python bench/epoch_floor.py                                  # SmolLM2-135M, fp32, batch 32, p = 30
    python bench/epoch_floor.py --model_checkpoints runs/qlora-sst2 --repeats 10

SPUL step: what spul.py's Trainer does per step with the shared prefix (its default): the prompt encoder's
MLP, the p virtual tokens' keys/values once per batch, the rows on top of them, METHODS['spul'] reading
the top-k reference cache (computed before timing, as every epoch after the first reads it), backward,
clipping, AdamW on the prompt encoder.
Floor: the frozen LLM's forward and backward over the same real tokens with the p virtual tokens counted
once per batch: the very same shared-prefix forward (utils.soft_prompt.SoftPromptLM) fed with fixed
virtual tokens (taken from the prompt encoder once) instead of the prompt encoder, the same tail-only
logits, a plain mean as the loss and the backward down to the virtual tokens; no prompt encoder MLP, no
loss terms, no clipping, no optimiser. Any method that trains an input-side prompt through the frozen
model does at least this work.
Also: the old full-path floor (the same, with the virtual tokens prepended to every row), and the forward
alone (the floor's forward under no_grad, the prefix computed afresh as in training).
One warm-up of each, then --repeats timed repeats alternating between the variants; tokens per second
are the batch's real (unpadded) tokens over the step's time; every figure a median with min-max, the
ratios to the floor pair by pair within a repeat. The projected SST-2 epoch multiplies the mean tokens
of 2,000 real training rows by the 47,756 rows. Writes bench/results/epoch_floor.json.
"""
import common
import torch

TARGET = 0.8  # SPUL's throughput over the floor's


class FixedPrompt(torch.nn.Module):
    """Stands in for the PEFT model inside SoftPromptLM: the virtual tokens are a given tensor `virtual`
    [1, p, d] (no prompt encoder), broadcast to the rows asked for."""

    def __init__(self, lm):
        super().__init__()
        self.base = lm
        self.virtual = None

    def get_base_model(self):
        return self.base

    def get_prompt(self, batch_size):
        return self.virtual.expand(batch_size, -1, -1)


def main():
    p = common.parser(__doc__, "epoch_floor")
    p.add_argument("--full_path", type=common.str2bool, default=False,
                   help="also time SPUL's step on the full path (p virtual tokens in every row) (default false)")
    p.set_defaults(precision="fp32")
    args = p.parse_args()
    common.check(args)
    from utils.methods import METHODS, build_training_rows
    from utils.modeling import device
    from utils.prompts import LeftPadCollator
    from utils.reference import CachedReference
    from utils.soft_prompt import SoftPromptLM, build_prompt_model

    env, tokenizer, lm, model_name = common.setup(args)
    dev = device()
    model = build_prompt_model(lm, args.ptuning_num_tokens, 128).to(dev)
    encoder = common.encoder_for(tokenizer, args)
    collate = LeftPadCollator(tokenizer.pad_token_id)
    items = build_training_rows(encoder, common.sst2_rows(args, args.batch_size - args.forget_rows, args.forget_rows),
                                "spul", args.seed)
    cache = common.reference_cache(model, items, collate, args, dev)
    batch = common.to_device(collate(items), dev)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    keep = batch["tail_labels"].shape[1] + 1
    tokens = common.real_tokens(batch)

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.001)
    reference = CachedReference(cache)
    variants = {"spul": lambda: common.train_step(model, opt, batch, METHODS["spul"].objective, reference,
                                                  {"alpha": 0.5, "beta": 0.5})}
    if args.full_path:
        torch.manual_seed(args.seed)
        full_model = build_prompt_model(lm, args.ptuning_num_tokens, 128, shared_prefix=False).to(dev)
        full_opt = torch.optim.AdamW([q for q in full_model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.001)
        variants["spul_full"] = lambda: common.train_step(full_model, full_opt, batch, METHODS["spul"].objective, reference,
                                                          {"alpha": 0.5, "beta": 0.5})

    # the floor: SoftPromptLM's own forwards on fixed virtual tokens (a leaf that wants its gradient)
    with torch.no_grad():
        x0 = model.peft_model.get_prompt(batch_size=1).detach().to(lm.get_input_embeddings().weight.dtype)
    fixed = FixedPrompt(model.lm)
    floor_shared, floor_full = SoftPromptLM(fixed, shared_prefix=True), SoftPromptLM(fixed, shared_prefix=False)

    def floor(m):
        def step():
            m.train()
            fixed.virtual = x0.detach().requires_grad_(True)
            with common.autocast(dev):
                m(ids, mask, keep).float().mean().backward()
            return fixed.virtual.grad
        return step

    def forward_only():
        floor_shared.train()  # as in training: the prefix is computed afresh
        fixed.virtual = x0
        with torch.no_grad(), common.autocast(dev):
            return floor_shared(ids, mask, keep)

    variants.update({"floor": floor(floor_shared), "floor_full": floor(floor_full), "forward": forward_only})
    model.train()
    shared_active = {"spul": bool(model._shared_prefix_usable()), "floor": bool(floor_shared._shared_prefix_usable())}
    times, outputs = common.time_alternating(variants, args.repeats)
    # the two floors compute the same gradient (float rounding apart)
    g_shared, g_full = outputs["floor"].float(), outputs["floor_full"].float()
    floor_grad_difference = float((g_shared - g_full).abs().max() / g_full.abs().max())

    tps = {k: [tokens / t for t in v] for k, v in times.items()}
    mean_tokens = common.sst2_mean_tokens(encoder, args)
    epoch_tokens = mean_tokens * (common.SST2_RETAIN + common.SST2_FORGET)
    res = {"model": model_name, "dtype": str(next(lm.parameters()).dtype), "device_type": dev.type,
           "batch_rows": args.batch_size, "forget_rows": args.forget_rows, "real_tokens_per_batch": tokens,
           "padded_shape": list(ids.shape), "ptuning_num_tokens": args.ptuning_num_tokens,
           "shared_prefix_active": shared_active, "floor_gradient_max_difference_over_scale": floor_grad_difference,
           "step_seconds": times, "step_seconds_summary": {k: common.summary(v) for k, v in times.items()},
           "tokens_per_second": {k: common.summary(v) for k, v in tps.items()},
           # throughput ratio this / floor = floor's time / this time, pair by pair within a repeat
           "throughput_over_floor": {k: common.paired_ratio(times, "floor", k) for k in times},
           "throughput_over_floor_full": {k: common.paired_ratio(times, "floor_full", k) for k in times},
           "sst2_mean_tokens_per_row": mean_tokens,
           "sst2_epoch_seconds_projected": {k: common.summary([epoch_tokens / x for x in v]) for k, v in tps.items()}}
    s = res["throughput_over_floor"]["spul"]
    res["target"] = {"what": "SPUL throughput / floor throughput", "limit": TARGET, "measured": s, "met": s["median"] >= TARGET}

    names = {"spul": "SPUL training step (shared prefix)", "spul_full": "SPUL training step (full path)",
             "floor": "floor: frozen fwd + bwd, virtual tokens once per batch",
             "floor_full": "old floor: virtual tokens in every row", "forward": "forward only (no_grad, shared prefix)"}
    print(common.table(["median (min-max)", "s / step", "real tokens / s", "this / floor", "SST-2 epoch, projected (min)"],
                       [[names[k], common.fmt(res["step_seconds_summary"][k]), common.fmt(res["tokens_per_second"][k]),
                         common.fmt(res["throughput_over_floor"][k]), common.fmt(res["sst2_epoch_seconds_projected"][k], 1 / 60)]
                        for k in times]))
    print(f"target: SPUL / floor throughput >= {TARGET}: measured {common.fmt(s)}: {'met' if res['target']['met'] else 'NOT met'} (median)")
    print(f"floors agree: max |grad shared - grad full| / max |grad full| = {floor_grad_difference:.1e}")
    if not all(shared_active.values()):
        print(f"WARNING: the shared prefix did not run for {[k for k, v in shared_active.items() if not v]}")
    print(f"batch: {args.batch_size} rows ({args.forget_rows} forget), {tokens} real tokens, padded {tuple(ids.shape)} "
          f"+ p={args.ptuning_num_tokens}; {model_name}, {res['dtype']}; {common.machine_line(env)}")
    common.write_results(args.out, env, args, res)


if __name__ == "__main__":
    common.run(main)
