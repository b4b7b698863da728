"""Benchmark 4: SPUL's KL reference: on the fly against the compact top-k cache, and the cache kept for a grid.

    python bench/kl_reference.py                                       # SmolLM2-135M base model
    python bench/kl_reference.py --model_checkpoints runs/qlora-sst2   # the merged qlora model SPUL runs on

online (utils.reference.OnlineReference): a prompt-free forward of the retain rows in every step.
cache (utils.reference.CachedReference over a ReferenceCache): the frozen model's top-k log-probs at the
label-prediction position per row (k = --kl_topk), computed once per row (spul.py: when the row is first
seen) and kept in a store file per model and k (utils.reference.store_path), so that a later run on the
same model and rows reads them.

Measured in one process on the same SPUL model and the same real SST-2 rows, every figure a median with
min-max over --repeats repeats that alternate between the variants after one warm-up of each:
- time per training step with each reference (ratio pair by pair within a repeat); per step with the
  cache's computation spread over --epochs epochs, and for --epochs epochs of SST-2 (47,756 rows);
- the Table 3 grid: --grid_runs SPUL runs (the alpha x beta grid, 12) on the same qlora folder and rows
  compute the reference once, not once per run: the time to compute it for --grid_rows retain rows
  (ReferenceCache.fill on an empty cache), to save it to a fresh store file and to load it from that file
  (a new ReferenceCache on the file); the time saved over the grid (the runs with beta > 0 need the
  reference: all but --grid_runs_without_kl; each after the first loads instead of computing), and the
  same for SST-2's 46,331 retain rows at the measured rates;
- bytes held: the cache per row in memory and in the store file, times SST-2's retain rows, against the
  released scripts' full-vocabulary pickle (rows x vocab x 4 bytes); the online reference holds nothing
  beyond the frozen model;
- the error of the top-k KL: |kl_topk - kl_full| per row over --kl_rows real retain rows with the
  prompt on, for k in 8, 32, 128, with the fresh prompt encoder and after the timed training steps.
Writes bench/results/kl_reference.json.
"""
import math
import os
import shutil
import tempfile

import common
import torch

KS = (8, 32, 128)


def main():
    p = common.parser(__doc__, "kl_reference")
    p.add_argument("--epochs", type=int, default=10, help="epochs the reference's computation is spread over (default 10, the paper's)")
    p.add_argument("--kl_rows", type=int, default=128, help="real retain rows the KL error is measured on (default 128)")
    p.add_argument("--grid_rows", type=int, default=256,
                   help="retain rows the reference is computed, saved and loaded for (default 256, the demo's SPUL rows)")
    p.add_argument("--grid_runs", type=int, default=12, help="SPUL runs of the grid (default 12: Table 3's 3 alphas x 4 betas)")
    p.add_argument("--grid_runs_without_kl", type=int, default=3,
                   help="runs of the grid with beta = 0, which need no reference (default 3: Table 3's beta = 0 column)")
    p.set_defaults(precision="fp32")
    args = p.parse_args()
    common.check(args)
    from utils.cli import UserError

    if not 0 <= args.grid_runs_without_kl < args.grid_runs:
        raise UserError("--grid_runs_without_kl must be in 0..--grid_runs - 1")
    from utils.losses import kl_full, kl_topk, label_position_logits
    from utils.methods import METHODS, RETAIN, build_training_rows
    from utils.modeling import device
    from utils.prompts import LeftPadCollator
    from utils.reference import CachedReference, OnlineReference, ReferenceCache, store_path
    from utils.soft_prompt import build_prompt_model

    env, tokenizer, lm, model_name = common.setup(args)
    dev = device()
    vocab = lm.get_output_embeddings().weight.shape[0]
    model = build_prompt_model(lm, args.ptuning_num_tokens, 128).to(dev)
    encoder = common.encoder_for(tokenizer, args)
    collate = LeftPadCollator(tokenizer.pad_token_id)

    # one training batch and its reference values (the cache step reads them; the online step ignores them)
    data = common.sst2_rows(args, args.batch_size - args.forget_rows, args.forget_rows)
    items = build_training_rows(encoder, data, "spul", args.seed)
    cache = common.reference_cache(model, items, collate, args, dev)
    batch = common.to_device(collate(items), dev)

    # KL error with the fresh prompt encoder (measured before training moves it)
    kl_data = common.sst2_rows(args, args.kl_rows, 0, offset=1)["train_retain"]
    kl_items = encoder.encode_rows(kl_data, role=RETAIN)
    errors = {"fresh_prompt": kl_errors(model, kl_items, collate, args.batch_size, dev, kl_full, kl_topk, label_position_logits)}

    # the grid: compute the reference for R retain rows (an empty cache), save it to a fresh store, load it back
    grid_items = build_training_rows(encoder, {"train_retain": common.sst2_rows(args, args.grid_rows, 0, offset=2)["train_retain"],
                                               "train_forget": []}, "spul", args.seed)
    store_dir = tempfile.mkdtemp(prefix="kl-reference-store-")
    path = os.path.join(store_dir, os.path.basename(store_path(args.model_checkpoints or args.model, args.kl_topk,
                                                               next(lm.parameters()).dtype)))
    computed = {}

    def compute():
        computed["cache"] = ReferenceCache(grid_items, args.kl_topk).fill(model, grid_items, collate, args.batch_size, dev,
                                                                          quiet=True)
        return computed["cache"]

    def save():
        if os.path.exists(path):
            os.remove(path)  # a fresh store each time: the first run of a grid writes it
        c = computed["cache"]
        c.path = path
        c.save()
        return os.path.getsize(path)

    def load():
        return ReferenceCache(grid_items, args.kl_topk, path)

    try:
        grid_times, grid_out = common.time_alternating({"compute": compute, "save": save, "load": load}, args.repeats,
                                                       label="grid: timed repeat")
        store_bytes = os.path.getsize(path)
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    loaded, fresh = grid_out["load"], grid_out["compute"]
    if loaded.reused != len(grid_items):
        raise RuntimeError(f"the store gave back {loaded.reused} of {len(grid_items)} rows")
    load_difference = max(float((loaded.logp - fresh.logp).abs().max()), float((loaded.seq - fresh.seq).abs().max()),
                          float((loaded.idx != fresh.idx).sum()))

    # time: training steps with each reference, alternating
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.001)
    refs = {"online": OnlineReference(), "cache": CachedReference(cache)}
    steps = {name: (lambda r=r: common.train_step(model, opt, batch, METHODS["spul"].objective, r, {"alpha": 0.5, "beta": 0.5}))
             for name, r in refs.items()}
    times, _ = common.time_alternating(steps, args.repeats, label="training step: timed repeat")
    errors["after_training_steps"] = kl_errors(model, kl_items, collate, args.batch_size, dev, kl_full, kl_topk,
                                               label_position_logits)
    errors["after_training_steps"]["steps"] = 2 * (args.repeats + 1)

    # figures
    R, G = len(grid_items), args.grid_runs - args.grid_runs_without_kl
    per_row = {k: [t / R for t in v] for k, v in grid_times.items()}
    t = {k: common.summary(v) for k, v in times.items()}
    compute_row = common.summary(per_row["compute"])["median"]
    n_rows = common.SST2_RETAIN + common.SST2_FORGET
    steps_per_epoch = math.ceil(n_rows / args.batch_size)
    retain_share = (args.batch_size - args.forget_rows) / args.batch_size  # rows of a batch that need the reference
    per_step = {"online": t["online"]["median"],
                "cache": t["cache"]["median"] + compute_row * args.batch_size * retain_share / args.epochs}
    totals = {"online": t["online"]["median"] * steps_per_epoch * args.epochs,
              "cache": t["cache"]["median"] * steps_per_epoch * args.epochs + compute_row * common.SST2_RETAIN}

    def grid(rows):
        """Seconds the reference costs a grid of G runs that need it: computed by each, or once and then loaded."""
        c, s, l = (common.summary([x * rows for x in per_row[k]]) for k in ("compute", "save", "load"))
        without = G * c["median"]
        with_store = c["median"] + s["median"] + (G - 1) * l["median"]
        return {"rows": rows, "compute_seconds": c, "save_seconds": s, "load_seconds": l,
                "grid_seconds_without_store": without, "grid_seconds_with_store": with_store,
                "grid_seconds_saved": without - with_store,
                "fills_saved": G - 1, "compute_over_load": c["median"] / l["median"]}

    measured_grid = grid(R)
    measured_grid.update(compute_seconds=common.summary(grid_times["compute"]), save_seconds=common.summary(grid_times["save"]),
                         load_seconds=common.summary(grid_times["load"]),
                         compute_over_load=common.paired_ratio(grid_times, "compute", "load"))
    sst2_grid = grid(common.SST2_RETAIN)
    sst2_grid["note"] = "projected from the measured per-row times (load time taken as linear in the rows)"

    mem_row = args.kl_topk * (cache.idx.element_size() + cache.logp.element_size()) + cache.seq.element_size() + \
        cache.keys.itemsize + cache.filled.element_size()
    file_row = store_bytes / R
    full_row = vocab * 4
    bytes_ = {"cache_row_in_memory": mem_row, "store_file_bytes": store_bytes, "store_file_row": file_row,
              "full_vocab_row": full_row, "sst2_retain_rows": common.SST2_RETAIN,
              "sst2_cache_in_memory": mem_row * common.SST2_RETAIN, "sst2_store_file": file_row * common.SST2_RETAIN,
              "sst2_full_vocab_pickle": full_row * common.SST2_RETAIN,
              "sst2_full_vocab_pickle_llama2_32000": 32000 * 4 * common.SST2_RETAIN, "online": 0}

    res = {"model": model_name, "vocab": vocab, "dtype": str(next(lm.parameters()).dtype), "device_type": dev.type,
           "batch_rows": args.batch_size, "forget_rows": args.forget_rows, "kl_topk": args.kl_topk, "epochs": args.epochs,
           "step_seconds": times, "step_seconds_summary": t,
           "step_ratio_cache_over_online": common.paired_ratio(times, "cache", "online"),
           "compute_seconds_per_row": common.summary(per_row["compute"]),
           "per_step_with_computation_spread": per_step,
           "per_step_ratio_cache_over_online": per_step["cache"] / per_step["online"],
           "sst2_steps_per_epoch": steps_per_epoch, "sst2_total_seconds": totals,
           "sst2_total_ratio_cache_over_online": totals["cache"] / totals["online"],
           "grid": {"runs": args.grid_runs, "runs_without_kl": args.grid_runs_without_kl, "runs_needing_reference": G,
                    "grid_seconds": grid_times, "measured": measured_grid, "sst2_retain": sst2_grid,
                    "loaded_equals_computed_max_difference": load_difference},
           "bytes": bytes_, "kl_error": errors}

    print(common.table(
        ["KL reference, median (min-max)", "online", f"cache (top-{args.kl_topk})", "cache / online"],
        [["training step (s)", common.fmt(t["online"]), common.fmt(t["cache"]), common.fmt(res["step_ratio_cache_over_online"])],
         [f"step + computation spread over {args.epochs} epochs (s)", per_step["online"], per_step["cache"],
          res["per_step_ratio_cache_over_online"]],
         [f"SST-2, {args.epochs} epochs of {steps_per_epoch:,} steps (h)", totals["online"] / 3600,
          totals["cache"] / 3600, res["sst2_total_ratio_cache_over_online"]],
         ["bytes per row held (memory / store file)", 0, f"{mem_row:,} / {file_row:,.0f}", ""],
         ["SST-2 retain rows (MiB, memory / store file)", 0,
          f"{common.mib(bytes_['sst2_cache_in_memory']):.1f} / {common.mib(bytes_['sst2_store_file']):.1f}", ""],
         ["released scripts' full-vocabulary pickle (MiB)", "", common.mib(bytes_["sst2_full_vocab_pickle"]), ""]]))
    print(f"\nTable 3 grid: {args.grid_runs} runs, {G} need the reference (beta > 0); the reference for the same rows is "
          f"computed once and loaded {G - 1} times instead of computed {G} times")
    rows = []
    for name, g in (((f"{R} rows, measured"), measured_grid), ((f"SST-2, {common.SST2_RETAIN:,} retain rows, projected"), sst2_grid)):
        rows.append([name, common.fmt(g["compute_seconds"]), common.fmt(g["save_seconds"]), common.fmt(g["load_seconds"]),
                     g["grid_seconds_without_store"] / 60, g["grid_seconds_with_store"] / 60, g["grid_seconds_saved"] / 60])
    print(common.table(["reference for", "compute (s)", "save (s)", "load (s)", f"grid: {G} x compute (min)",
                        "grid: 1 compute + save + loads (min)", "saved (min)"], rows))
    print(f"compute / load, paired: {common.fmt(measured_grid['compute_over_load'])}; loaded values equal the computed ones "
          f"(max difference {load_difference:.1e}); store file {store_bytes:,} bytes for {R} rows")
    print()
    rows = []
    for state, e in errors.items():
        for k in KS:
            rows.append([state, k, e[f"k{k}"]["max_abs_error"], e[f"k{k}"]["mean_abs_error"],
                         e[f"k{k}"]["error_over_mean_kl"], e[f"k{k}"]["mean_mass_outside_topk"], e["mean_kl_full"]])
    print(common.table(["prompt", "k", "max |kl_topk - kl_full|", "mean |...|", "mean |...| / mean kl_full", "ref. mass outside top-k",
                        "mean kl_full"], rows))
    print(f"over {args.kl_rows} real SST-2 retain rows; {model_name}, {res['dtype']}; {common.machine_line(env)}")
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
