"""Benchmark 1: one SPUL training step against one GA+GD (full fine-tuning) step: time and peak memory.

    python bench/spul_vs_gagd_step.py                            # SmolLM2-135M, fp32, batch 32, p = 10,30,50, gc off and on
    python bench/spul_vs_gagd_step.py --p_values 30 --gradient_checkpointing off --repeats 10

SPUL: the frozen LLM with a P-tuning prompt encoder (utils.soft_prompt.build_prompt_model), objective
METHODS['spul'] reading the top-k reference cache (computed before timing, as every epoch after the first
reads it), clipping, AdamW on the prompt encoder only; with the shared prefix (the default of spul.py: the p
virtual tokens' keys/values once per batch) and, for comparison, the full path (p virtual tokens in every
row). GA+GD: full fine-tuning of its own copy of the LLM (utils.training.TailLM), objective
METHODS['gradient_ascent_descent'], clipping, AdamW on all weights. Every variant takes the same real SST-2
rows (SST-2's share of forget rows; forget rows towards generic labels for SPUL, towards their labels for
GA+GD).

Per gradient-checkpointing setting (--gradient_checkpointing off,on; on as spul.py / baselines.py enable it:
non-reentrant, the models in train mode), all variants (SPUL shared and full for every p, GA+GD) in one
process: one warm-up step each, then --repeats timed steps alternating between them (A B C ... A B C ...)
so that machine load hits them alike; then --memory_repeats alternating steps under the memory probe
(common.PeakMemory: what a step allocates on top of what was held, plus the optimiser state the method
holds between steps: gradients, optimiser state, activations; the weights excluded). Every figure is a
median with min-max; the SPUL / GA+GD ratios are taken pair by pair within a repeat.

Then a projection, from per-token and per-parameter costs, of the SST-2 epoch time and the memory of SPUL
and GA+GD on LLaMA-2-7B on a GPU (p = 30, batch 32): see `project_llama2_7b`; its assumptions are printed
and written with it. Writes bench/results/spul_vs_gagd_step.json.
"""
import copy
import math

import common
import torch

TARGETS = {"time_ratio_p30_gc_off": 0.8, "memory_ratio_gc_on": 0.5}


def main():
    p = common.parser(__doc__, "spul_vs_gagd_step")
    p.add_argument("--p_values", default="10,30,50", help="SPUL's numbers of virtual tokens (default 10,30,50)")
    p.add_argument("--gradient_checkpointing", default="off,on",
                   help="gradient checkpointing settings to measure, 'off', 'on' or 'off,on' (default both)")
    p.add_argument("--memory_repeats", type=int, default=3, help="alternating steps of each variant under the memory probe (default 3)")
    p.add_argument("--full_path", type=common.str2bool, default=True,
                   help="also time SPUL's full path (p virtual tokens in every row) for comparison (default true)")
    p.set_defaults(precision="fp32")
    args = p.parse_args()
    common.check(args)
    ps = common.p_values(args.p_values)
    gcs = [s.strip() for s in args.gradient_checkpointing.split(",") if s.strip()]
    if not gcs or any(s not in ("off", "on") for s in gcs):
        from utils.cli import UserError
        raise UserError(f"--gradient_checkpointing takes off, on or off,on; got '{args.gradient_checkpointing}'")
    from utils.methods import METHODS, build_training_rows
    from utils.modeling import count_trainable, device
    from utils.prompts import LeftPadCollator
    from utils.reference import CachedReference
    from utils.soft_prompt import build_prompt_model
    from utils.training import TailLM

    env, tokenizer, lm, model_name = common.setup(args)
    dev = device()
    lm.to(dev)
    lm_full = copy.deepcopy(lm)  # GA+GD trains its own copy of every weight
    gagd_model = TailLM(lm_full).to(dev)
    for q in gagd_model.parameters():
        q.requires_grad_(True)

    # the same texts for every variant; SPUL's reference values computed once (the frozen LLM's, the same for every p)
    data = common.sst2_rows(args, args.batch_size - args.forget_rows, args.forget_rows)
    encoder = common.encoder_for(tokenizer, args)
    collate = LeftPadCollator(tokenizer.pad_token_id)
    spul_items = build_training_rows(encoder, data, "spul", args.seed)
    gagd_items = build_training_rows(encoder, data, "gradient_ascent_descent", args.seed)
    cache = common.reference_cache(TailLM(lm), spul_items, collate, args, dev)
    spul_batch = common.to_device(collate(spul_items), dev)
    gagd_batch = common.to_device(collate(gagd_items), dev)
    reference = CachedReference(cache)

    # the variants: SPUL per p (shared prefix, and the full path), GA+GD; each with its own AdamW
    models, opts = {}, {}
    for n in ps:
        for path in (("shared", "full") if args.full_path else ("shared",)):
            torch.manual_seed(args.seed)  # the same prompt encoder for both paths of a p
            models[f"spul_{path}_p{n}"] = build_prompt_model(lm, n, 128, shared_prefix=path == "shared").to(dev)
    models["gagd"] = gagd_model
    for name, m in models.items():
        opts[name] = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.001)
    update_seconds = []  # GA+GD's clipping + AdamW update alone, per timed step (for the projection)

    def step(name):
        m, opt = models[name], opts[name]
        if name == "gagd":
            return lambda: common.train_step(m, opt, gagd_batch, METHODS["gradient_ascent_descent"].objective,
                                             update_timer=update_seconds)
        return lambda: common.train_step(m, opt, spul_batch, METHODS["spul"].objective, reference, {"alpha": 0.5, "beta": 0.5})

    variants = {name: step(name) for name in models}
    results, weights = {}, common.param_bytes(lm)
    for gc in gcs:
        for m in (lm, lm_full):
            if gc == "on":  # as utils.training.enable_gradient_checkpointing
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                m.config.use_cache = False
            else:
                m.gradient_checkpointing_disable()
        for m in models.values():
            m.train()
        shared_active = {name: bool(m.shared_prefix and m._shared_prefix_usable())
                         for name, m in models.items() if name.startswith("spul_")}
        print(f"\ngradient checkpointing {gc}: {len(variants)} variants, 1 warm-up step each, {args.repeats} timed repeats")
        update_seconds.clear()
        times, _ = common.time_alternating(variants, args.repeats, label=f"gc {gc}: timed repeat")
        gagd_update = update_seconds[-args.repeats:]
        mem = common.peak_alternating(variants, args.memory_repeats,
                                      held={n: (lambda o=o: common.optimizer_state_bytes(o)) for n, o in opts.items()},
                                      label=f"gc {gc}: memory repeat")
        results[gc] = summarise(times, mem, gagd_update, ps, args, weights, models, shared_active)
        print(report(results[gc], ps, gc))

    mean_tokens = common.sst2_mean_tokens(encoder, args)
    res = {
        "model": model_name, "dtype": str(next(lm.parameters()).dtype), "device_type": dev.type,
        "batch_rows": args.batch_size, "forget_rows": args.forget_rows,
        "real_tokens_per_batch": {"spul": common.real_tokens(spul_batch), "gagd": common.real_tokens(gagd_batch)},
        "padded_shape": {"spul": list(spul_batch["input_ids"].shape), "gagd": list(gagd_batch["input_ids"].shape)},
        "p_values": ps, "trainable_parameters": {name: count_trainable(m) for name, m in models.items()},
        "llm_parameters": sum(q.numel() for q in lm.parameters()), "llm_weight_bytes": weights,
        "memory_measure": common.measure_method(), "by_gradient_checkpointing": results,
        "sst2_mean_tokens_per_row": mean_tokens,
    }
    res["targets"] = targets(results)
    # on a GPU spul.py and baselines.py turn gradient checkpointing on by default: both projected
    res["projection_llama2_7b"] = {
        f"gc_{gc}": project_llama2_7b(measured_calibration(results, ps, gc) if gc in results else None,
                                      tokens_per_row=mean_tokens, gradient_checkpointing=gc == "on")
        for gc in ("off", "on")}
    print()
    for t in res["targets"]:
        print(f"target {t['what']} <= {t['limit']}: measured {common.fmt(t['measured'])}: "
              f"{'met' if t['met'] else 'NOT met'} (median)")
    print()
    print(projection_text(res["projection_llama2_7b"]["gc_on"]))
    print()
    print(projection_text(res["projection_llama2_7b"]["gc_off"], assumptions=False))
    print(f"\nbatch: {args.batch_size} rows ({args.forget_rows} forget), {res['real_tokens_per_batch']['spul']} real tokens, "
          f"padded {tuple(res['padded_shape']['spul'])} (+ p virtual tokens for SPUL); {model_name}, {res['dtype']}; "
          f"{common.machine_line(env)}")
    common.write_results(args.out, env, args, res)


def summarise(times, mem, gagd_update, ps, args, weights, models, shared_active):
    out = {"step_seconds": times, "step_seconds_summary": {k: common.summary(v) for k, v in times.items()},
           "gagd_update_seconds": common.summary(gagd_update) if gagd_update else None,
           "peak_bytes_over_weights": mem, "peak_bytes_over_weights_summary": {k: common.summary(v) for k, v in mem.items()},
           "shared_prefix_active": shared_active, "by_p": {}}
    for n in ps:
        s = f"spul_shared_p{n}"
        row = {"time_ratio_spul_over_gagd": common.paired_ratio(times, s, "gagd"),
               "memory_ratio_spul_over_gagd": common.paired_ratio(mem, s, "gagd"),
               "memory_ratio_with_weights": common.summary(
                   [(weights + common.param_bytes(models[s], True) + a) / (weights + b) for a, b in zip(mem[s], mem["gagd"])])}
        f = f"spul_full_p{n}"
        if f in times:
            row["time_ratio_full_over_gagd"] = common.paired_ratio(times, f, "gagd")
            row["time_ratio_shared_over_full"] = common.paired_ratio(times, s, f)
            row["memory_ratio_full_over_gagd"] = common.paired_ratio(mem, f, "gagd")
        out["by_p"][n] = row
    return out


def report(r, ps, gc):
    t, m = r["step_seconds_summary"], r["peak_bytes_over_weights_summary"]
    rows = [[name, common.fmt(t[name]), common.fmt(m[name], 1 / 2**20)] for name in t]
    lines = [common.table(["per step, median (min-max)", "time (s)", "peak over weights (MiB)"], rows)]
    rows = []
    for n in ps:
        b = r["by_p"][n]
        rows.append([f"p = {n}", common.fmt(b["time_ratio_spul_over_gagd"]), common.fmt(b["memory_ratio_spul_over_gagd"]),
                     common.fmt(b["memory_ratio_with_weights"]),
                     common.fmt(b["time_ratio_full_over_gagd"]) if "time_ratio_full_over_gagd" in b else "",
                     common.fmt(b["time_ratio_shared_over_full"]) if "time_ratio_shared_over_full" in b else ""])
    lines.append(common.table(["SPUL / GA+GD, paired", "time", "memory over weights", "memory with weights",
                               "time, full path", "time shared / full"], rows))
    off = [k for k, v in r["shared_prefix_active"].items() if k.startswith("spul_shared") and not v]
    if off:
        lines.append(f"WARNING: the shared prefix did not run for {', '.join(off)} (the full path ran instead)")
    return f"gradient checkpointing {gc}\n" + "\n\n".join(lines)


def targets(results):
    out = []
    if "off" in results and 30 in results["off"]["by_p"]:
        s = results["off"]["by_p"][30]["time_ratio_spul_over_gagd"]
        out.append({"what": "step time SPUL / GA+GD, p = 30, gradient checkpointing off", "limit": TARGETS["time_ratio_p30_gc_off"],
                    "measured": s, "met": s["median"] <= TARGETS["time_ratio_p30_gc_off"]})
    if "on" in results:
        for n, b in results["on"]["by_p"].items():
            s = b["memory_ratio_spul_over_gagd"]
            out.append({"what": f"peak memory over the weights SPUL / GA+GD, p = {n}, gradient checkpointing on",
                        "limit": TARGETS["memory_ratio_gc_on"], "measured": s, "met": s["median"] <= TARGETS["memory_ratio_gc_on"]})
    return out


# ---------------------------------------------------------------- projection to LLaMA-2-7B on a GPU

LLAMA2_7B = {"name": "LLaMA-2-7B", "parameters": 6.74e9, "layers": 32, "hidden": 4096, "heads": 32, "vocab": 32000}
A100 = {"name": "A100 80GB SXM", "bf16_flops_per_s": 312e12, "model_flops_utilisation": 0.4, "memory_bytes_per_s": 2.0e12,
        "memory_bytes": 80e9}


def measured_calibration(results, ps, gc):
    """From the measurement with gradient checkpointing `gc`: SPUL's step time at p = 30 (else the p closest to
    it) over GA+GD's forward + backward (its step less its median clipping + AdamW update), pair by pair."""
    r = results[gc]
    n = min(ps, key=lambda v: abs(v - 30))
    times = r["step_seconds"]
    upd = r["gagd_update_seconds"]["median"] if r["gagd_update_seconds"] else 0.0
    ratios = [s / (g - upd) for s, g in zip(times[f"spul_shared_p{n}"], times["gagd"])]
    return {"gradient_checkpointing": gc, "p": n, "spul_step_over_gagd_forward_backward": common.summary(ratios),
            "gagd_update_share_of_step": upd / r["step_seconds_summary"]["gagd"]["median"]}


def project_llama2_7b(calibration=None, p=30, batch=32, tokens_per_row=35.5, rows=None, model=LLAMA2_7B, gpu=A100,
                      gradient_checkpointing=False):
    """SST-2 epoch time and memory of SPUL (shared prefix, and full path) and GA+GD for `model` on `gpu`, from
    per-token and per-parameter costs. A projection, not a measurement: the assumptions are returned with it."""
    N, L, h, a = model["parameters"], model["layers"], model["hidden"], model["heads"]
    rows = rows or common.SST2_RETAIN + common.SST2_FORGET
    steps = math.ceil(rows / batch)
    T = tokens_per_row
    flops_per_s = gpu["bf16_flops_per_s"] * gpu["model_flops_utilisation"]
    recompute = 1 if gradient_checkpointing else 0  # one more forward under checkpointing

    # compute per step (FLOPs): 2N per token forward, 2N backward to the inputs, 2N more for the weight gradients
    flops = {"spul_shared": (4 + 2 * recompute) * N * (batch * T + p),
             "spul_full": (4 + 2 * recompute) * N * batch * (T + p),
             "gagd": (6 + 2 * recompute) * N * batch * T}
    compute_s = {k: v / flops_per_s for k, v in flops.items()}
    # GA+GD's optimiser step: clipping + AdamW over fp32 master weights, gradients and two moments (16 bytes a
    # parameter), each read and written once: memory-bound
    update_s = 2 * 16 * N / gpu["memory_bytes_per_s"]
    step_s = {"spul_shared": compute_s["spul_shared"], "spul_full": compute_s["spul_full"], "gagd": compute_s["gagd"] + update_s}
    out = {"what": "PROJECTION (not measured): LLaMA-2-7B on one GPU, SST-2, one epoch", "model": model, "gpu": gpu,
           "p": p, "batch": batch, "rows_per_epoch": rows, "steps_per_epoch": steps, "tokens_per_row": T,
           "gradient_checkpointing": gradient_checkpointing,
           "flops_per_step": flops, "gagd_update_seconds_per_step": update_s,
           "step_seconds": step_s, "epoch_seconds": {k: v * steps for k, v in step_s.items()},
           "epoch_ratio_spul_over_gagd": step_s["spul_shared"] / step_s["gagd"],
           "epoch_ratio_spul_full_over_gagd": step_s["spul_full"] / step_s["gagd"]}
    if calibration:
        # the per-token cost measured here (SPUL's whole step over GA+GD's forward + backward, the same rows), carried
        # to the model by the parameter count (both scale with N), GA+GD's update as above
        r = calibration["spul_step_over_gagd_forward_backward"]["median"]
        spul = r * compute_s["gagd"]
        out["calibrated"] = {"from_measurement": calibration, "spul_step_seconds": spul,
                             "epoch_seconds": {"spul_shared": spul * steps, "gagd": step_s["gagd"] * steps},
                             "epoch_ratio_spul_over_gagd": spul / step_s["gagd"]}

    # memory (bytes): bf16 weights shared by both; what each method adds on top
    def activations(tokens, seq):
        # Korthikanti et al. 2022, bf16, no recomputation: per layer and token 34·h + 5·heads·seq bytes; with
        # checkpointing each layer keeps its input (2·h bytes a token) and one layer is recomputed at a time
        per_layer = 34 * h + 5 * a * seq
        return tokens * (L * 2 * h + per_layer) if gradient_checkpointing else tokens * L * per_layer

    enc = p * h + h * 128 + 128 * 128 + 128 * h + 2 * 128 + h  # P-tuning MLP encoder (hidden 128), fp32
    logits = batch * 3 * model["vocab"] * 4  # tail-only logits (label tokens + 1 positions), fp32
    add = {"spul_shared": 16 * enc + activations(batch * T + p, T + p) + logits,
           "spul_full": 16 * enc + activations(batch * (T + p), T + p) + logits,
           "gagd": 16 * N + activations(batch * T, T) + logits}
    weights = 2 * N
    out["memory"] = {"weights_bf16": weights, "added_over_weights": add,
                     "with_weights": {k: weights + v for k, v in add.items()},
                     "ratio_over_weights_spul_over_gagd": add["spul_shared"] / add["gagd"],
                     "ratio_with_weights_spul_over_gagd": (weights + add["spul_shared"]) / (weights + add["gagd"]),
                     "gagd_fits_one_gpu": weights + add["gagd"] <= gpu["memory_bytes"]}
    out["assumptions"] = [
        f"{model['name']}: N = {N / 1e9:.2f}e9 parameters, {L} layers, hidden {h}; bf16 weights ({weights / 1e9:.1f} GB) "
        f"held by both methods",
        f"SST-2: {rows:,} training rows per epoch, batch {batch} ({steps:,} steps), {T:.1f} real tokens per row "
        f"(measured with this tokenizer; LLaMA-2's gives a similar count), p = {p}",
        "compute: forward 2·N FLOPs per token, backward to the inputs 2·N, weight gradients 2·N more (GA+GD only); "
        "SPUL's shared prefix counts the p virtual tokens once per batch, its full path once per row; attention "
        "FLOPs (under 2 % at these lengths), the prompt encoder and the loss neglected"
        + ("; checkpointing adds one forward" if gradient_checkpointing else ""),
        f"GPU: {gpu['name']}, {gpu['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s bf16 at {gpu['model_flops_utilisation']:.0%} "
        f"utilisation, {gpu['memory_bytes_per_s'] / 1e12:.1f} TB/s memory bandwidth",
        "GA+GD's optimiser step: AdamW with fp32 master weights, fp32 gradients and two fp32 moments (16 bytes a "
        "parameter), each read and written once per step, memory-bound",
        "SPUL's KL reference read from the cache (computed once per row, in the first epoch or an earlier run): no "
        "reference forward in the steps counted",
        "memory: GA+GD adds fp32 master weights, gradients and AdamW moments (16 bytes a parameter); activations by "
        "Korthikanti et al. 2022 (bf16: 34·h + 5·heads·seq bytes per layer and token), the same formula for SPUL "
        "(an upper bound: frozen linear layers need not keep their inputs); SPUL adds its prompt encoder with AdamW",
    ]
    if calibration:
        out["assumptions"].append(
            "calibrated: SPUL's measured step time over GA+GD's measured forward + backward on the same rows here "
            f"(median {calibration['spul_step_over_gagd_forward_backward']['median']:.3f}, p = {calibration['p']}, "
            f"gradient checkpointing {calibration['gradient_checkpointing']}) times GA+GD's projected forward + "
            "backward: both scale with the parameter count, so the measured per-token ratio carries over")
    return out


def projection_text(pr, assumptions=True):
    gb = 1e9
    e, m = pr["epoch_seconds"], pr["memory"]
    rows = [["SPUL, shared prefix", e["spul_shared"] / 60, m["added_over_weights"]["spul_shared"] / gb, m["with_weights"]["spul_shared"] / gb],
            ["SPUL, full path", e["spul_full"] / 60, m["added_over_weights"]["spul_full"] / gb, m["with_weights"]["spul_full"] / gb],
            ["GA+GD", e["gagd"] / 60, m["added_over_weights"]["gagd"] / gb, m["with_weights"]["gagd"] / gb]]
    lines = [f"{pr['what']} (p = {pr['p']}, batch {pr['batch']}, {pr['steps_per_epoch']:,} steps, gradient checkpointing "
             f"{'on' if pr['gradient_checkpointing'] else 'off'})",
             common.table(["projected", "epoch (min)", "memory over weights (GB)", "memory with weights (GB)"], rows),
             f"SPUL / GA+GD: epoch {pr['epoch_ratio_spul_over_gagd']:.2f} (full path {pr['epoch_ratio_spul_full_over_gagd']:.2f}), "
             f"memory over weights {m['ratio_over_weights_spul_over_gagd']:.3f}, with weights {m['ratio_with_weights_spul_over_gagd']:.2f}"
             f"{'' if m['gagd_fits_one_gpu'] else '; GA+GD does not fit on one ' + pr['gpu']['name'] + ' (ZeRO offload)'}"]
    if "calibrated" in pr:
        c = pr["calibrated"]
        lines.append(f"calibrated by the per-token ratio measured here: SPUL epoch {c['epoch_seconds']['spul_shared'] / 60:.1f} min, "
                     f"SPUL / GA+GD {c['epoch_ratio_spul_over_gagd']:.2f}")
    if assumptions:
        lines.append("assumptions:\n" + "\n".join(f"- {a}" for a in pr["assumptions"]))
    return "\n".join(lines)


if __name__ == "__main__":
    common.run(main)
