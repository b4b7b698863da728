"""Benchmark 2: SPUL's KL reference, on the fly against the compact top-k cache.

    python bench/kl_reference.py                                       # SmolLM2-135M base model
    python bench/kl_reference.py --model_checkpoints runs/qlora-sst2   # the merged qlora model

online (utils.reference.OnlineReference): a prompt-free forward of the retain rows in every step.
cache (CachedReference): the frozen model's top-k log-probs at the label-prediction position,
filled once before training by fill_reference_cache (spul.py's default, k = --kl_topk).

Measured in one process on the same SPUL model and the same real SST-2 batch:
- time per training step of each (one warm-up step each, then alternating timed steps), and the
  cost of filling the cache per row; per step and per --epochs epochs of SST-2 (47,756 rows),
  the fill counted once;
- bytes held: the cache per row (as stored in the dataset items now, and as int32 + float32 arrays)
  times SST-2's 46,331 retain rows, against the released scripts' full-vocabulary pickle
  (rows x vocab x 4 bytes); the online reference holds nothing beyond the frozen model;
- the error of the top-k KL: |kl_topk - kl_full| per row over --kl_rows real retain rows with the
  prompt on, for k in 8, 32, 128, with the fresh prompt encoder and after the timed training steps.
Writes bench/results/kl_reference.json.
"""
import math
import sys

import common
import torch

KS = (8, 32, 128)


def main():
    p = common.parser(__doc__, "kl_reference")
    p.add_argument("--epochs", type=int, default=10, help="epochs the cache fill is spread over (default 10, the paper's)")
    p.add_argument("--fill_rows", type=int, default=64, help="rows the cache fill is timed on (default 64)")
    p.add_argument("--kl_rows", type=int, default=128, help="real retain rows the KL error is measured on (default 128)")
    args = p.parse_args()
    common.check(args)
    from utils.losses import kl_full, kl_topk, label_position_logits
    from utils.methods import METHODS, RETAIN, build_training_rows
    from utils.modeling import device
    from utils.prompts import LeftPadCollator
    from utils.reference import CachedReference, OnlineReference, fill_reference_cache
    from utils.soft_prompt import build_prompt_model

    env, tokenizer, lm, model_name = common.setup(args)
    dev = device()
    vocab = lm.get_output_embeddings().weight.shape[0]
    model = build_prompt_model(lm, args.ptuning_num_tokens, 128).to(dev)
    encoder = common.encoder_for(tokenizer, args)
    collate = LeftPadCollator(tokenizer.pad_token_id)

    # one training batch, its cache filled (the cache step needs it; the online step ignores it)
    data = common.sst2_rows(args, args.batch_size - args.forget_rows, args.forget_rows)
    items = build_training_rows(encoder, data, "spul", args.seed)
    fill_reference_cache(model, items, collate, k=args.kl_topk, batch_size=args.batch_size, device=dev)
    batch = common.to_device(collate(items), dev)

    # KL error with the fresh prompt encoder (measured before training moves it)
    kl_data = common.sst2_rows(args, args.kl_rows, 0, offset=1)["train_retain"]
    kl_items = encoder.encode_rows(kl_data, role=RETAIN)
    errors = {"fresh_prompt": kl_errors(model, kl_items, collate, args.batch_size, dev, kl_full, kl_topk, label_position_logits)}

    # time: the cache fill per row (eval batches of --batch_size, as spul.py fills with --eval_batch_size)
    fill_items = build_training_rows(encoder, common.sst2_rows(args, args.fill_rows, 0, offset=2), "spul", args.seed)
    fill_reference_cache(model, fill_items[:args.batch_size], collate, k=args.kl_topk, batch_size=args.batch_size, device=dev)
    fill_s, _ = common.timed(lambda: fill_reference_cache(model, fill_items, collate, k=args.kl_topk,
                                                          batch_size=args.batch_size, device=dev))
    fill_per_row = fill_s / len(fill_items)

    # time: training steps, alternating
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.001)
    refs = {"online": OnlineReference(), "cache": CachedReference()}
    step = lambda ref: common.train_step(model, opt, batch, METHODS["spul"].objective, ref, {"alpha": 0.5, "beta": 0.5})
    common.warm_up(model, batch)
    times = {k: [] for k in refs}
    for r in refs.values():
        step(r)
    for i in range(args.steps):
        print(f"\rtimed step {i + 1}/{args.steps}", end="", flush=True, file=sys.stderr)
        for name, r in refs.items():
            times[name].append(common.timed(lambda: step(r))[0])
    print(file=sys.stderr)
    errors["after_training_steps"] = kl_errors(model, kl_items, collate, args.batch_size, dev, kl_full, kl_topk,
                                               label_position_logits)
    errors["after_training_steps"]["steps"] = 2 * (args.steps + 1)

    t = {k: common.median(v) for k, v in times.items()}
    n_rows = common.SST2_RETAIN + common.SST2_FORGET
    steps_per_epoch = math.ceil(n_rows / args.batch_size)
    fill_total = fill_per_row * n_rows
    per_step = {"online": t["online"], "cache": t["cache"] + fill_per_row * args.batch_size / args.epochs}
    totals = {"online": t["online"] * steps_per_epoch * args.epochs,
              "cache": t["cache"] * steps_per_epoch * args.epochs + fill_total}

    # bytes: now Python lists in the dataset items; as arrays, k int32 ids + k float32 log-probs + 1 float32
    def deep(x):
        return sys.getsizeof(x) + (sum(sys.getsizeof(v) for v in x) if isinstance(x, list) else 0)
    held_row = sum(deep(items[0][f]) for f in ("ref_idx", "ref_logp", "ref_seq_logp"))
    array_row = args.kl_topk * 8 + 4
    full_row = vocab * 4
    bytes_ = {"cache_row_python_lists": held_row, "cache_row_arrays": array_row, "full_vocab_row": full_row,
              "sst2_retain_rows": common.SST2_RETAIN,
              "sst2_cache_python_lists": held_row * common.SST2_RETAIN, "sst2_cache_arrays": array_row * common.SST2_RETAIN,
              "sst2_full_vocab_pickle": full_row * common.SST2_RETAIN,
              "sst2_full_vocab_pickle_llama2_32000": 32000 * 4 * common.SST2_RETAIN, "online": 0}

    res = {"model": model_name, "vocab": vocab, "device_type": dev.type, "batch_rows": args.batch_size,
           "forget_rows": args.forget_rows, "kl_topk": args.kl_topk, "epochs": args.epochs,
           "step_seconds": times, "step_seconds_median": t, "step_ratio_cache_over_online": t["cache"] / t["online"],
           "fill_seconds_per_row": fill_per_row, "fill_rows_timed": len(fill_items),
           "per_step_with_amortised_fill": per_step,
           "per_step_ratio_cache_over_online": per_step["cache"] / per_step["online"],
           "sst2_steps_per_epoch": steps_per_epoch, "sst2_total_seconds": totals,
           "sst2_fill_seconds": fill_total, "sst2_total_ratio_cache_over_online": totals["cache"] / totals["online"],
           "bytes": bytes_, "kl_error": errors}

    print(common.table(
        ["KL reference", "online", f"cache (top-{args.kl_topk})", "cache / online"],
        [["training step, median (s)", t["online"], t["cache"], t["cache"] / t["online"]],
         [f"step + fill amortised over {args.epochs} epochs (s)", per_step["online"], per_step["cache"],
          res["per_step_ratio_cache_over_online"]],
         [f"SST-2, {args.epochs} epochs of {steps_per_epoch:,} steps (h)", totals["online"] / 3600,
          totals["cache"] / 3600, res["sst2_total_ratio_cache_over_online"]],
         ["bytes per row held", 0, f"{held_row:,} (arrays: {array_row})", ""],
         ["SST-2 retain rows (MiB)", 0, f"{common.mib(bytes_['sst2_cache_python_lists']):.1f} "
          f"(arrays: {common.mib(bytes_['sst2_cache_arrays']):.1f})", ""],
         ["released scripts' full-vocabulary pickle (MiB)", "", common.mib(bytes_["sst2_full_vocab_pickle"]), ""]]))
    print(f"cache fill: {fill_per_row * 1e3:.1f} ms per row, {fill_total / 60:.1f} min for SST-2's {n_rows:,} rows, once")
    print()
    rows = []
    for state, e in errors.items():
        for k in KS:
            rows.append([state, k, e[f"k{k}"]["max_abs_error"], e[f"k{k}"]["mean_abs_error"],
                         e[f"k{k}"]["error_over_mean_kl"], e[f"k{k}"]["mean_mass_outside_topk"], e["mean_kl_full"]])
    print(common.table(["prompt", "k", "max |kl_topk - kl_full|", "mean |...|", "mean |...| / mean kl_full", "ref. mass outside top-k",
                        "mean kl_full"], rows))
    print(f"over {args.kl_rows} real SST-2 retain rows; {env['device']}, {env['torch_threads']} threads, "
          f"load {env['load_average_at_start']}")
    common.write_results(args.out, env, args, res)


@torch.no_grad()
def kl_errors(model, items, collate, batch_size, dev, kl_full, kl_topk, label_position_logits):
    """Per row: exact KL(p_ref || p_prompted) over the vocabulary against the top-k cache's value."""
    model.eval()
    full, approx, outside = [], {k: [] for k in KS}, {k: [] for k in KS}
    for start in range(0, len(items), batch_size):
        b = common.to_device(collate(items[start:start + batch_size]), dev)
        labels, keep = b["tail_labels"], b["tail_labels"].shape[1] + 1
        with common.autocast(dev):
            ref = label_position_logits(model(b["input_ids"], b["attention_mask"], keep, reference=True)[:, :-1], labels)
            cur = label_position_logits(model(b["input_ids"], b["attention_mask"], keep)[:, :-1], labels)
        ref_logp = torch.log_softmax(ref.float(), -1)
        for i in range(len(labels)):
            full.append(float(kl_full(ref[i:i + 1], cur[i:i + 1])))
            for k in KS:
                top = ref_logp[i:i + 1].topk(k, -1)
                approx[k].append(float(kl_topk(top.indices, top.values, cur[i:i + 1])))
                outside[k].append(float(1 - top.values.exp().sum()))
    full_t = torch.tensor(full)
    out = {"rows": len(full), "mean_kl_full": float(full_t.mean()), "max_kl_full": float(full_t.max())}
    for k in KS:
        err = (torch.tensor(approx[k]) - full_t).abs()
        out[f"k{k}"] = {"max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
                        "error_over_mean_kl": float(err.mean() / full_t.mean().clamp(min=1e-12)),
                        "mean_mass_outside_topk": float(torch.tensor(outside[k]).mean()),
                        "max_mass_outside_topk": float(torch.tensor(outside[k]).max())}
    return out


if __name__ == "__main__":
    common.run(main)
