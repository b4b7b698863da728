r"""Choose a method's settings the same way for every method, on validation rows only.

    python scripts/select_settings.py --model_checkpoints runs/qlora-sst2 --method spul --grid lr=1e-4,3e-4 alpha=0.5,1 \
        --output_path runs/select/spul -- --max_retain=40000 --num_epochs=10
    python scripts/select_settings.py --model_checkpoints runs/qlora-sst2 --method gradient_ascent_descent --grid lr=1e-5,1e-4
    python scripts/select_settings.py --model_checkpoints runs/qlora-sst2 --method icul --grid icul_k=1,2 icul_l=1,3 \
        -- --max_retain=64

Trains the method (spul.py, baselines.py --unlearn_method METHOD, or for ICUL, which trains nothing, builds it with
prompting.py --method icul) once per point of the grid, with the flags after `--` for every run, then scores every
run on two validation sets:
- forget validation: the rows the run unlearned (its train_forget);
- retain validation: train_retain rows its parent (the qlora.py model) trained on but the unlearning run did not
  (the parent's retain rows minus the run's: give the run a smaller --max_retain than its parent; ICUL draws its
  retain examples from the run's rows), at most
  --max_eval_rows of them.
The rule: among the settings whose retain-validation accuracy stays within --retain_tolerance of the parent
model's, the lowest forget-validation accuracy; ties go to the smaller change (the smaller learning rate, then
the earlier grid point). When no setting stays within the tolerance, the one with the best retain-validation
accuracy is chosen and the JSON says so. Test splits are never read: only the two training splits are loaded,
here and in the stages it runs. Writes OUTPUT_PATH/selection.json (grid, scores, the chosen setting); each run
stays in OUTPUT_PATH/<setting>; a second call reuses finished runs of the same settings and redoes the others.

The chosen setting's score is biased towards forgetting (it is the lowest of several on the same rows): a table
reports fresh runs of it, never these. selection.json records the training seeds of its runs ("seeds"); the demo
and the recipes (SELECTION=...) train their stages with a seed the selection did not use (fresh_seed).
"""
import itertools
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.cli import UserError, fraction, make_parser, positive_int, run_main  # noqa: E402
from utils.methods import BASELINES  # noqa: E402

# the settings each method's grid may vary (any flag of its script would run; these are the ones that matter)
COMMON = ("lr", "num_epochs", "max_steps", "weight_decay")
GRID_KEYS = {"spul": COMMON + ("alpha", "beta", "ptuning_num_tokens"),
             "llmu": COMMON + ("llmu_ga_weight", "llmu_rl_weight", "llmu_kl_weight"),
             "npo": COMMON + ("npo_beta",), "npo_rt": COMMON + ("npo_beta", "npo_retain_weight"),
             "icul": ("icul_k", "icul_l")}
INT_KEYS = ("num_epochs", "max_steps", "ptuning_num_tokens", "icul_k", "icul_l")
# the stage that runs a method (and its method flag): SPUL, the prompting methods with settings, else a baseline
SCRIPTS = {"spul": ("spul.py", None), "icul": ("prompting.py", "--method")}
TRAIN_SPLITS = ("train_retain", "train_forget")
DEFAULT_SEED = 42  # the stages' --seed default: what a selection recorded without its seeds trained with


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    stage_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = make_parser(__doc__)
    p.add_argument("--model_checkpoints", required=True, help="the qlora.py folder the method starts from")
    p.add_argument("--method", required=True, help="spul, icul or one of: " + ", ".join(BASELINES))
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="the values to try per setting, e.g. lr=1e-5,1e-4 alpha=0.5,1")
    p.add_argument("--output_path", default=None, help="folder of the runs and selection.json (default: runs/select/<method>)")
    p.add_argument("--retain_tolerance", type=fraction, default=0.05,
                   help="the largest drop of retain-validation accuracy below the parent model's a setting may cause")
    p.add_argument("--max_eval_rows", type=positive_int, default=None, help="cap on validation rows per set (seeded draw)")
    p.add_argument("--seed", type=int, default=42, help="seed of the --max_eval_rows draw")
    p.add_argument("--eval_batch_size", type=positive_int, default=32)
    args = p.parse_args(argv)
    args.stage_flags = stage_flags
    args.grid = parse_grid(args.method, args.grid)
    args.output_path = args.output_path or os.path.join("runs", "select", args.method)
    check_points(args)
    return args


def stage_argv(args, point):
    """The run's flags for one grid point (without its --output_path and run-folder flags)."""
    flag = stage_of(args.method)[1]
    method_flags = [f"{flag}={args.method}"] if flag else []
    return [f"--model_checkpoints={os.path.abspath(args.model_checkpoints)}", *method_flags, *args.stage_flags,
            *(f"--{k}={v}" for k, v in point.items())]


def check_points(args):
    """Every grid point's flags, checked by the stage's own parser before the first run starts: a value out of
    range is refused now, not after the runs before it."""
    import contextlib
    import io

    import importlib

    sys.path.insert(0, ROOT)
    stage = importlib.import_module(script_of(args.method)[:-len(".py")])
    for point in candidates(args.grid):
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                stage.parse_args(stage_argv(args, point))
        except SystemExit:
            why = [line.split("error: ", 1)[1] for line in said.getvalue().splitlines() if "error: " in line]
            raise UserError(f"{stage.__name__}.py refuses the grid point {point}: {why[-1] if why else said.getvalue()}")


def stage_of(method):
    """(the script that runs `method`, its method flag or None)."""
    return SCRIPTS.get(method, ("baselines.py", "--unlearn_method"))


def script_of(method):
    return stage_of(method)[0]


def parse_grid(method, items):
    if method not in SCRIPTS and method not in BASELINES:
        raise UserError(f"unknown --method '{method}': choose {', '.join(SCRIPTS)} or one of {', '.join(BASELINES)}")
    if not items:
        raise UserError("--grid names no setting to try (e.g. --grid lr=1e-5,1e-4)")
    allowed, grid = GRID_KEYS.get(method, COMMON), {}
    for item in items:
        key, _, values = item.partition("=")
        key = key.strip().lstrip("-")
        if key not in allowed:
            raise UserError(f"--grid {key}: {method} has no setting '{key}' to select (it takes {', '.join(allowed)})")
        try:
            vals = [float(v) if key not in INT_KEYS else int(v)
                    for v in values.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--grid {item}: the values must be numbers")
        if not vals:
            raise UserError(f"--grid {item} lists no value")
        grid[key] = vals
    return grid


def candidates(grid):
    """Every point of the grid, in grid order: [{key: value}, ...]."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def run_name(method, point):
    return method + "".join(f"-{k}{v:g}" for k, v in point.items())


def choose(scored, reference, tolerance):
    """The rule, on [{"settings", "forget_val", "retain_val"}, ...]: the lowest forget-validation accuracy among
    the settings whose retain-validation accuracy is at least reference - tolerance; ties to the smaller learning
    rate, then the earlier grid point. Returns (index, qualified)."""
    ok = [i for i, s in enumerate(scored) if s["retain_val"] >= reference - tolerance - 1e-12]
    if not ok:
        return max(range(len(scored)), key=lambda i: (scored[i]["retain_val"], -i)), False
    return min(ok, key=lambda i: (scored[i]["forget_val"], scored[i]["settings"].get("lr", 0.0), i)), True


def validation_rows(parent, run, data_args, max_rows, seed):
    """(forget validation rows, retain validation rows, the encoder's label words and task): the run's own
    train_forget, and the parent's train_retain rows the run did not train on. Loads the training splits only."""
    from utils.data import load_splits, sample_rows, select_training_rows

    data = load_splits(splits=TRAIN_SPLITS, **data_args)
    mine = select_training_rows(data, run["forget_size"], run.get("max_forget"), run.get("max_retain"), run["data_seed"])
    theirs = select_training_rows(data, 1.0, parent.get("max_forget"), parent.get("max_retain"), parent["data_seed"])
    held_out = held_out_rows(theirs["train_retain"], mine["train_retain"] + mine["train_forget"])
    if not held_out:
        raise UserError(f"no retain rows are held out for validation: the runs train on all {len(mine['train_retain'])} "
                        f"retain rows their parent trained on; give them a smaller --max_retain (after --)")
    encoding = {"label_words": data.label_words, "task": data.task}
    return sample_rows(mine["train_forget"], max_rows, seed), sample_rows(held_out, max_rows, seed), encoding


def text_key(row):
    """What the model reads of a row (every field but its label), hashable."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(row.items()) if k != "label")


def held_out_rows(rows, trained):
    """The rows whose text is in no row of `trained`: a split may hold one text twice (SST-2's train_retain: 182
    times), and a copy of a trained text is no held-out row."""
    seen = {text_key(r) for r in trained}
    return [r for r in rows if text_key(r) not in seen]


def fresh_seed(used, default=DEFAULT_SEED):
    """A training seed no selection run used: `default`, else the smallest positive one free."""
    used = set(used)
    return default if default not in used else next(s for s in itertools.count(1) if s not in used)


def accuracy(folder, rows, encoding, batch_size):
    """Top-token accuracy (the paper's protocol) of the model in `folder` on `rows`."""
    from utils.evaluation import classification_metrics, predict_rows
    from utils.modeling import device
    from utils.prompts import PromptEncoder
    from utils.stages import load_stage

    model, tok, info = load_stage(folder)
    model.to(device())
    encoder = PromptEncoder(tok, info["arguments"].get("max_length") or info.get("max_length") or 1024,
                            **encoding, **info["encoder_kwargs"])
    return classification_metrics(predict_rows(model, encoder, rows, batch_size, device(), quiet=True), rows, encoder)["accuracy"]


def main():
    args = parse_args()
    from utils.data import data_kwargs
    from utils.runs import read_json, save_json
    from utils.stages import start_point

    parent = start_point(args.model_checkpoints, "select_settings.py")
    if not parent:
        raise UserError(f"{args.model_checkpoints} is not a qlora.py folder: the retain validation rows are rows it "
                        f"trained on, so selection starts from one")
    script = script_of(args.method)
    os.makedirs(args.output_path, exist_ok=True)
    scored = []
    for point in candidates(args.grid):
        out = os.path.join(args.output_path, run_name(args.method, point))
        cmd = [sys.executable, os.path.join(ROOT, script), *stage_argv(args, point), f"--output_path={out}",
               "--resume", "--overwrite", "--quiet"]  # its own runs: kept when the settings are the same, else redone
        print(f"[{run_name(args.method, point)}] " + " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode != 0:
            raise UserError(f"the run {out} failed (exit {proc.returncode}); fix it and call select_settings.py again: finished "
                            f"runs are reused")
        run = read_json(os.path.join(out, "arguments.json"))
        forget, retain, encoding = validation_rows(parent, run, data_kwargs(_namespace(run)), args.max_eval_rows, args.seed)
        if not scored:  # the parent model on the same retain rows: what "within the tolerance" is measured from
            reference = accuracy(args.model_checkpoints, retain, encoding, args.eval_batch_size)
            reference_forget = accuracy(args.model_checkpoints, forget, encoding, args.eval_batch_size)
        scored.append({"settings": point, "run": out, "seed": run.get("seed", DEFAULT_SEED),
                       "forget_val": accuracy(out, forget, encoding, args.eval_batch_size),
                       "retain_val": accuracy(out, retain, encoding, args.eval_batch_size),
                       "n_forget_val": len(forget), "n_retain_val": len(retain)})
        print(f"  forget validation {scored[-1]['forget_val']:.3f}, retain validation {scored[-1]['retain_val']:.3f} "
              f"(parent: {reference_forget:.3f} / {reference:.3f})", flush=True)
    best, qualified = choose(scored, reference, args.retain_tolerance)
    result = {
        "method": args.method, "model_checkpoints": os.path.abspath(args.model_checkpoints),
        "model": parent.get("model_name"), "dataset": parent.get("dataset"), "grid": args.grid,
        "stage_flags": args.stage_flags,
        "rule": f"lowest forget-validation accuracy among settings whose retain-validation accuracy is at least the "
                f"parent's minus {args.retain_tolerance}; ties to the smaller learning rate, then the earlier grid point",
        "parent": {"retain_val": reference, "forget_val": reference_forget},
        "candidates": scored, "chosen": scored[best]["settings"], "chosen_run": scored[best]["run"],
        "seeds": sorted({c["seed"] for c in scored}),  # the training seeds: a table's runs take another
        "qualified": qualified, "command": " ".join(["python", "scripts/select_settings.py", *sys.argv[1:]]),
    }
    save_json(os.path.join(args.output_path, "selection.json"), result)
    note = "" if qualified else f" (no setting kept retain validation within {args.retain_tolerance}: the closest one)"
    print(f"chosen for {args.method}: {scored[best]['settings']}{note}; wrote {os.path.join(args.output_path, 'selection.json')}")


def _namespace(run):
    import argparse

    keys = ("dataset", "data_dir", "text_column", "label_column", "label_words", "task")
    return argparse.Namespace(**{k: run.get(k) for k in keys})


def load_selection(path, method, model=None, dataset=None):
    """The chosen settings of `method` in a selection.json (or a file of several, {"methods": {method: ...}}),
    checked to come from the same base model and dataset."""
    return _selection_entry(path, method, model, dataset)["chosen"]


def selection_seeds(path, method):
    """The training seeds of the runs `method`'s settings were selected on (a file that does not record them was
    made before seeds were recorded: its runs trained with the stages' default seed)."""
    return list(_selection_entry(path, method).get("seeds") or [DEFAULT_SEED])


def table_flags(path, method, model=None, dataset=None):
    """The flags of a table's `method` stage that takes the selection: the chosen settings, and a seed the selection's
    runs did not use (a stage of the selection's settings and seed on its rows would be one of the runs that won)."""
    seed = fresh_seed(selection_seeds(path, method))
    chosen = load_selection(path, method, model, dataset)
    return [f"--{k}={v}" for k, v in chosen.items()] + ([f"--seed={seed}"] if seed != DEFAULT_SEED else [])


def _selection_entry(path, method, model=None, dataset=None):
    from utils.runs import read_json

    data = read_json(path)
    if data is None:
        raise UserError(f"cannot read the selection file {path}")
    entry = data.get("methods", {}).get(method) if "methods" in data else (data if data.get("method") == method else None)
    if entry is None:
        raise UserError(f"{path} holds no selection for {method}")
    for key, want in (("model", model), ("dataset", dataset)):
        have = entry.get(key, data.get(key))
        if want is not None and have is not None and os.path.basename(str(have)) != os.path.basename(str(want)):
            raise UserError(f"{path} was selected on {key} {have}, not {want}: select again for this {key}")
    return entry


if __name__ == "__main__":
    run_main(main)
