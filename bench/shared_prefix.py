"""Benchmark 5: the soft prompt's shared prefix against the full path (utils.soft_prompt), a micro-benchmark.

    python bench/shared_prefix.py                          # SmolLM2-135M, fp32, batch 32, p = 10, 30, 50
    python bench/shared_prefix.py --repeats 10 --p_values 30

full: the p virtual tokens prepended to every row, the whole sequence run. shared: the virtual
tokens' keys/values computed once (a batch of one), the rows run on them as past keys/values.
Per p, on one SoftPromptLM switched between the paths, the same real SST-2 batch (forget rows
towards generic labels, spul.py's rows):
- training: forward + METHODS['spul'] (compact KL cache) + backward to the prompt encoder, in train
  mode (gradients dropped after each, so every repeat sees the same prompt encoder);
- evaluation: the forward at the label-prediction position (keep=1) under no_grad in eval mode,
  the batch's prompts without labels: shared (the prefix cached once before timing, as in
  scoring), full, and the plain model without any prompt.
After one warm-up of every variant, the timed repeats alternate between the variants, so that a
changing machine load hits them alike; median and min-max per variant, the ratios pair by pair within
a repeat. Also checked on the same
batch: the largest difference between the paths (loss, prompt-encoder gradients, eval logits),
relative to each tensor's largest value: float rounding only (in float64 the paths agree to 1e-12 or better,
tests/test_shared_prefix.py; in fp32 each path's prompt-encoder gradients are ~4e-4 of their scale
from the float64 ones on such a batch). Writes bench/results/shared_prefix.json.
"""

import common
import torch


def main():
    p = common.parser(__doc__, "shared_prefix")
    p.add_argument("--p_values", default="10,30,50", help="numbers of virtual tokens to measure (default 10,30,50)")
    p.set_defaults(precision="fp32")
    args = p.parse_args()
    common.check(args)
    from utils.methods import METHODS, build_training_rows
    from utils.modeling import device
    from utils.prompts import LeftPadCollator
    from utils.reference import CachedReference
    from utils.soft_prompt import build_prompt_model
    from utils.training import TailLM

    env, tokenizer, lm, model_name = common.setup(args)
    dev = device()
    lm.to(dev)
    encoder = common.encoder_for(tokenizer, args)
    collate = LeftPadCollator(tokenizer.pad_token_id)
    data = common.sst2_rows(args, args.batch_size - args.forget_rows, args.forget_rows)
    items = build_training_rows(encoder, data, "spul", args.seed)
    # the frozen model's reference values (the same for every p), computed before timing
    reference = CachedReference(common.reference_cache(TailLM(lm), items, collate, args, dev))
    train_batch = common.to_device(collate(items), dev)
    prompts = [encoder.prompt_ids(r["text"]) for rows in data.values() for r in rows]
    eval_batch = common.to_device(collate([{"input_ids": ids} for ids in prompts]), dev)

    results = {}
    for n_virtual in common.p_values(args.p_values):
        torch.manual_seed(args.seed)
        model = build_prompt_model(lm, n_virtual, 128).to(dev)
        results[n_virtual] = measure(model, train_batch, eval_batch, METHODS["spul"].objective, reference, args)
        print(f"\np = {n_virtual}")
        print(report(results[n_virtual]))

    res = {"model": model_name, "dtype": str(next(lm.parameters()).dtype), "device_type": dev.type,
           "batch_rows": args.batch_size, "forget_rows": args.forget_rows,
           "real_tokens_per_batch": {"train": common.real_tokens(train_batch), "eval": common.real_tokens(eval_batch)},
           "padded_shape": {"train": list(train_batch["input_ids"].shape), "eval": list(eval_batch["input_ids"].shape)},
           "by_p": results}
    print(f"\nbatch: {args.batch_size} rows ({args.forget_rows} forget), {res['real_tokens_per_batch']} real tokens, "
          f"padded {res['padded_shape']}; {model_name}, {res['dtype']}; {common.machine_line(env)}")
    common.write_results(args.out, env, args, res)


def measure(model, train_batch, eval_batch, objective, reference, args):
    """Timings (seconds per repeat) of every variant and the differences between the paths."""
    from utils.methods import LossContext

    labels = train_batch["tail_labels"]
    enc_params = [q for q in model.parameters() if q.requires_grad]

    def train(shared):
        def step():
            model.shared_prefix = shared
            model.train()
            logits = model(train_batch["input_ids"], train_batch["attention_mask"], keep=labels.shape[1] + 1)[:, :-1]
            loss = objective(LossContext(model, train_batch, logits, reference), alpha=0.5, beta=0.5)["loss"]
            loss.backward()
            grads = [q.grad for q in enc_params]
            model.zero_grad(set_to_none=True)
            return loss.detach(), grads
        return step

    def evaluate(shared=None):
        @torch.no_grad()
        def forward():
            model.eval()
            model.shared_prefix = bool(shared)
            return model(eval_batch["input_ids"], eval_batch["attention_mask"], keep=1, reference=shared is None)
        return forward

    variants = {"train_shared": train(True), "train_full": train(False),
                "eval_shared_cached": evaluate(True), "eval_full": evaluate(False), "eval_plain": evaluate()}
    # one warm-up of each (the eval prefix is cached from there on), then alternating repeats
    times, outputs = common.time_alternating(variants, args.repeats)
    out = {"seconds": times, "summary": {k: common.summary(v) for k, v in times.items()},
           "max_difference_over_scale": {
               "loss": _rel(outputs["train_shared"][0], outputs["train_full"][0]),
               "prompt_encoder_grads": max(_rel(a, b) for a, b in zip(outputs["train_shared"][1], outputs["train_full"][1])),
               "eval_logits": _rel(outputs["eval_shared_cached"], outputs["eval_full"])}}
    out["speedup_full_over_shared"] = {"train": common.paired_ratio(times, "train_full", "train_shared"),
                                       "eval": common.paired_ratio(times, "eval_full", "eval_shared_cached")}
    out["eval_shared_over_plain"] = common.paired_ratio(times, "eval_shared_cached", "eval_plain")
    return out


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def report(r):
    names = {"train_shared": "train step, shared prefix", "train_full": "train step, full path",
             "eval_shared_cached": "eval forward, shared (cached prefix)", "eval_full": "eval forward, full path",
             "eval_plain": "eval forward, plain model (no prompt)"}
    rows = [[names[k], r["summary"][k]["median"], r["summary"][k]["min"], r["summary"][k]["max"]] for k in names]
    s = r["speedup_full_over_shared"]
    d = r["max_difference_over_scale"]
    return (common.table(["seconds per batch", "median", "min", "max"], rows)
            + f"\ntime full / shared, paired, median (min-max): train {common.fmt(s['train'])}, eval {common.fmt(s['eval'])}; "
              f"eval shared / plain {common.fmt(r['eval_shared_over_plain'])}\nmax |shared - full| / max |full|: loss "
              f"{d['loss']:.1e}, grads {d['prompt_encoder_grads']:.1e}, eval logits {d['eval_logits']:.1e}")


if __name__ == "__main__":
    common.run(main)
