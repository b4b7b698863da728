"""Benchmark 1: one SPUL training step against one GA+GD step on the same model, batch and tokens.

    python bench/spul_vs_gagd_step.py                      # SmolLM2-135M, batch 16, 5 timed steps each
    python bench/spul_vs_gagd_step.py --model_checkpoints runs/qlora-sst2 --batch_size 32 --steps 20

SPUL: the frozen LLM with a P-tuning prompt encoder (utils.soft_prompt.build_prompt_model), objective
METHODS['spul'] with the compact KL cache, AdamW on the prompt encoder only. GA+GD: full fine-tuning
of the same LLM (utils.training.TailLM), objective METHODS['gradient_ascent_descent'], AdamW on all
weights. Both take the same real SST-2 rows (forget rows towards generic labels for SPUL, towards
their labels for GA+GD). After one forward and backward of each (gradients dropped: the process's
one-off costs), peak memory (one warm-up step and one step per method, measured over what was held
before: weights excluded, gradients, optimiser state and activations included), then
time: one warm-up step each, then the timed steps alternating between the methods, so that a
changing machine load hits both alike. Prints medians and SPUL / GA+GD ratios; writes
bench/results/spul_vs_gagd_step.json.
"""
import copy

import common
import torch


def main():
    args = common.parser(__doc__, "spul_vs_gagd_step").parse_args()
    common.check(args)
    from utils.methods import METHODS, build_training_rows
    from utils.modeling import count_trainable, device
    from utils.prompts import LeftPadCollator
    from utils.reference import CachedReference, fill_reference_cache
    from utils.soft_prompt import build_prompt_model
    from utils.training import TailLM

    env, tokenizer, lm, model_name = common.setup(args)
    dev = device()
    lm_full = copy.deepcopy(lm)  # GA+GD trains its own copy of every weight

    spul_model = build_prompt_model(lm, args.ptuning_num_tokens, 128).to(dev)
    gagd_model = TailLM(lm_full).to(dev)
    for p in gagd_model.parameters():
        p.requires_grad_(True)

    # the same texts for both; SPUL needs its KL cache filled for them (once, before training, as in spul.py)
    data = common.sst2_rows(args, args.batch_size - args.forget_rows, args.forget_rows)
    encoder = common.encoder_for(tokenizer, args)
    collate = LeftPadCollator(tokenizer.pad_token_id)
    spul_items = build_training_rows(encoder, data, "spul", args.seed)
    gagd_items = build_training_rows(encoder, data, "gradient_ascent_descent", args.seed)
    fill_reference_cache(spul_model, spul_items, collate, k=args.kl_topk, batch_size=args.batch_size, device=dev)
    spul_batch = common.to_device(collate(spul_items), dev)
    gagd_batch = common.to_device(collate(gagd_items), dev)

    spul_opt = torch.optim.AdamW([p for p in spul_model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.001)
    gagd_opt = torch.optim.AdamW(gagd_model.parameters(), lr=args.lr, weight_decay=0.001)
    spul_step = lambda: common.train_step(spul_model, spul_opt, spul_batch, METHODS["spul"].objective,
                                          CachedReference(), {"alpha": 0.5, "beta": 0.5})
    gagd_step = lambda: common.train_step(gagd_model, gagd_opt, gagd_batch,
                                          METHODS["gradient_ascent_descent"].objective)

    # peak memory: a warm-up step (creates the optimiser state) and one more step per method
    common.warm_up(spul_model, spul_batch), common.warm_up(gagd_model, gagd_batch)
    mem = {}
    for name, step in (("spul", spul_step), ("gagd", gagd_step)):
        with common.PeakMemory() as m:
            step()
            step()
        mem[name] = m.peak
    # time: the timed steps alternate between the methods
    times = {"spul": [], "gagd": []}
    spul_step(), gagd_step()
    for i in range(args.steps):
        print(f"\rtimed step {i + 1}/{args.steps}", end="", flush=True)
        for name, step in (("spul", spul_step), ("gagd", gagd_step)):
            times[name].append(common.timed(step)[0])
    print()

    t = {k: common.median(v) for k, v in times.items()}
    weights = common.param_bytes(lm)
    res = {
        "model": model_name, "dtype": str(next(lm.parameters()).dtype), "device_type": dev.type,
        "batch_rows": args.batch_size, "forget_rows": args.forget_rows,
        "real_tokens_per_batch": {"spul": common.real_tokens(spul_batch), "gagd": common.real_tokens(gagd_batch)},
        "padded_shape": list(spul_batch["input_ids"].shape), "ptuning_num_tokens": args.ptuning_num_tokens,
        "trainable_parameters": {"spul": count_trainable(spul_model), "gagd": count_trainable(gagd_model)},
        "step_seconds": times, "step_seconds_median": t, "time_ratio_spul_over_gagd": t["spul"] / t["gagd"],
        "memory_measure": common.measure_method(), "llm_weight_bytes": weights,
        "peak_bytes_over_held": mem, "peak_ratio_over_held": mem["spul"] / mem["gagd"],
        "peak_bytes_with_weights": {"spul": weights + common.param_bytes(spul_model, True) + mem["spul"],
                                    "gagd": weights + mem["gagd"]},
    }
    pw = res["peak_bytes_with_weights"]
    res["peak_ratio_with_weights"] = pw["spul"] / pw["gagd"]

    print(common.table(
        ["per training step", "SPUL", "GA+GD", "SPUL / GA+GD"],
        [["time, median (s)", t["spul"], t["gagd"], res["time_ratio_spul_over_gagd"]],
         ["peak memory over weights (MiB)", common.mib(mem["spul"]), common.mib(mem["gagd"]), res["peak_ratio_over_held"]],
         ["peak memory with weights (MiB)", common.mib(pw["spul"]), common.mib(pw["gagd"]), res["peak_ratio_with_weights"]],
         ["trainable parameters", res["trainable_parameters"]["spul"], res["trainable_parameters"]["gagd"],
          res["trainable_parameters"]["spul"] / res["trainable_parameters"]["gagd"]]]))
    print(f"batch: {args.batch_size} rows ({args.forget_rows} forget), {res['real_tokens_per_batch']['spul']} real tokens, "
          f"padded {tuple(res['padded_shape'])} + p={args.ptuning_num_tokens} for SPUL; {env['device']}, "
          f"{env['torch_threads']} threads, load {env['load_average_at_start']}")
    common.write_results(args.out, env, args, res)


if __name__ == "__main__":
    common.run(main)
