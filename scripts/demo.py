"""The CPU quickstart (`make demo`): the whole pipeline on the embedded SmolLM2-135M and a seeded
SST-2 subset, ending in the results table (runs/demo/table.md).

vanilla eval → qlora.py → spul.py → baselines.py (GA+GD; --methods adds the others) → qlora.py --train_on retain
(the retrained reference) → eco.py → the training-free baselines (scripts/forget_terms.py, then prompting.py: ICUL,
the guardrail prompt, the keyword filter) → inference_spul.py on every checkpoint → make_tables.py.
`--task mcqa` runs the same pipeline on multiple-choice questions: a TruthfulQA set built into
runs/demo-mcqa/data by scripts/make_truthfulqa_mcqa.py, at its own scale (`mcqa`, 14 minutes measured), GA+GD
by default, table in runs/demo-mcqa/table.md.

Stages that do not depend on each other run side by side (--jobs, default 2 on a machine with two or
more cores, each with its share of the cores): on a 2-core CPU that is ~20 % more work per second
than one stage on both cores, and it hides each process's start-up; OMP_NUM_THREADS, when set, caps each
stage's threads. Each stage's output is appended to runs/demo/logs/STAGE.log (a re-run keeps the earlier
lines); the terminal shows one progress bar over the stages; timings.json keeps every run's stage times.
Ctrl-C (or SIGTERM) stops the running stages too.
Re-running resumes: every stage runs with --resume --overwrite, so a stage whose folder holds a finished
run of the same settings is kept, an unfinished one continues from its last checkpoint, and one made with
other settings (another --scale or --model_name, an edited recipe) is run again. Each scale writes to its
own folder (runs/demo, runs/demo-smoke, runs/demo-mcqa, runs/demo-mcqa-smoke). Sizes are chosen to
finish within ~30 minutes (mcqa: ~15) on a 2-core CPU; see README for the figures.
"""
import os
import signal
import subprocess
import sys
import time
from collections import deque

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.cli import UserError, add_bool, make_parser, positive_int, run_main  # noqa: E402
from utils.data import default_data_dir  # noqa: E402
from utils.methods import BASELINES  # noqa: E402
from utils.runs import read_json, save_json  # noqa: E402

# GA+GD, the paper's best Table 2 baseline, as in the mcqa demo: with the training-free baselines the demo keeps within
# 30 minutes; GA, RL, GA+KL and NPO, all selected, join with --methods (~2-4 min each; at their selected settings
# none moved train_forget more than 1.6 points from QLoRA's in a run of this table); the larger table runs them all
DEMO_METHODS = "gradient_ascent_descent"
SELECTED_METHODS = "gradient_ascent,random_label,gradient_ascent_kl,gradient_ascent_descent,npo"  # the demo scale's selection
# `make audit` within ~15 minutes on a 2-core CPU: 24 rows of the forget splits and of test_retain (the retain accuracy
# under attack), two of the six reworded templates, two relearning epochs; int8 (+30 s a stage) joins with
# `python audit.py --attacks ...`
AUDIT = dict(max_eval_rows=24, splits="train_forget,test_forget,test_retain", templates="plain,question_first",
             relearn_epochs=2, attacks="templates,instruction,nf4,relearn,probe,mia")
SCALES = {
    # The demo (CPU, < 30 min with the installation): qlora.py memorises 384 retain + 128 forget rows; SPUL unlearns the 128 forget
    # rows with 256 of the memorised retain rows (a subset), the baselines with 64 of them; 64 rows per split
    # are scored (train_* caps come from each stage's own arguments.json). SPUL: p=10 (CPU time grows with p),
    # 160 steps of 8 rows at lr 2e-3; twice as many retain rows as forget rows keep test_retain answers
    # from turning generic, alpha=1.25 sits between the curve's two nearest points (docs/spul_cpu_scale.md).
    "demo": dict(
        sizes=dict(max_retain=384, max_forget=128, max_length=128),
        eval=dict(max_eval_rows=64),
        # qlora.py batches rows of similar length: 1.4x less padding; memorising all rows needs no forget/retain
        # contrast in each batch, unlike the unlearning objectives (random batches, the default)
        qlora=dict(num_epochs=2, train_batch_size=16, lr=1e-3, group_by_length=True),
        spul=dict(max_steps=160, train_batch_size=8, lr=2e-3, ptuning_num_tokens=10, alpha=1.25, beta=0.5, max_retain=256),
        baseline=dict(num_epochs=1, train_batch_size=16, lr=1e-5, max_retain=64),
        # 5 bisection rounds narrow σ to 7.5 %: finer than 32 rows can tell apart (the default 10 re-scores them 5 more times)
        eco=dict(search_rows=32, search_rounds=5),
        # the training-free baselines: forget terms from the qlora model's training rows (n-grams in >= 5 of its 128
        # forget rows and in none of its retain rows); ICUL's retain examples drawn from 64 of the memorised retain
        # rows, as the baselines' (the others held out for selection), k and L selected; the context may take 512
        # tokens (each query is still cut at the scale's max_length)
        terms=dict(min_rows=5), prompting=dict(max_retain=64, max_length=512, icul_k=1, icul_l=1),
        # GA+GD with its selected learning rate (--methods adds GA, RL, GA+KL and NPO, selected too, and LLMU, NPO+RT,
        # which then run with the default settings above, not selected ones)
        methods=DEMO_METHODS,
        # --select: the grid of every method, scored on validation rows (scripts/select_settings.py); its choice, recorded in
        # data/selected/demo.json, replaces the values above
        # ICUL: its context lengths 2 and 4 (one forget example, then 1 or 3 retain ones); its 6 would make each
        # query 7 times longer, ~5 more minutes of the demo on a 2-core CPU
        select=dict(spul=dict(lr=[5e-4, 1e-3], alpha=[1.0, 1.5]), baseline=dict(lr=[3e-6, 1e-5, 3e-5]),
                    icul=dict(icul_k=[1], icul_l=[1, 3]), max_eval_rows=128, methods=SELECTED_METHODS),
        audit=AUDIT),
    # The larger CPU-scale table (docs/cpu_scale_table.md, about two hours): three times the demo's forget rows
    # and twice as many retain rows, the selected settings, 300 rows per split scored; --seeds repeats chosen
    # methods. SPUL: 320 steps of 8 over its 1,152 rows (2.2 epochs; the demo's 3.3 would take 480 steps and
    # the table ~2.5 h).
    "large": dict(
        sizes=dict(max_retain=768, max_forget=384, max_length=128),
        eval=dict(max_eval_rows=300),
        qlora=dict(num_epochs=2, train_batch_size=16, lr=1e-3, group_by_length=True),
        spul=dict(max_steps=320, train_batch_size=8, lr=2e-3, ptuning_num_tokens=10, alpha=1.25, beta=0.5),
        baseline=dict(num_epochs=1, train_batch_size=16, lr=1e-5, max_retain=192),
        eco=dict(search_rows=64),
        terms=dict(min_rows=5), prompting=dict(max_retain=192, max_length=512, icul_k=1, icul_l=1),
        methods=SELECTED_METHODS),
    # The multiple-choice demo (--task mcqa, CPU, <= 15 min): TruthfulQA questions as a four-split set
    # (scripts/make_truthfulqa_mcqa.py: forget = Health, Nutrition, Psychology, Science; ~75-token prompts, about
    # twice SST-2's). A letter per question must be memorised, not a skill learnt: at lr 2e-3 (4 epochs of 48 + 48
    # questions) QLoRA learnt only the commonest letter (loss 1.2, every model answered "A"); 8 epochs at lr 5e-3 on
    # 32 + 32 questions bring the loss to ~0.6 (lr 1e-2: 1.3). SPUL unlearns the 32 with those 32 retain rows (24
    # steps of 8: 3 epochs); GA+GD (--methods adds others) for 2 epochs at lr 5e-5 (not selected: at 1e-5 its few
    # steps changed no answer); every training row and 32 test rows per split scored. Timed in README.
    "mcqa": dict(
        sizes=dict(max_retain=32, max_forget=32, max_length=192),
        eval=dict(max_eval_rows=32),
        qlora=dict(num_epochs=8, train_batch_size=8, lr=5e-3, group_by_length=True),
        spul=dict(max_steps=24, train_batch_size=8, lr=2e-3, ptuning_num_tokens=10, alpha=1.0, beta=0.5),
        baseline=dict(num_epochs=2, train_batch_size=8, lr=5e-5, max_retain=32),
        eco=dict(search_rows=16, search_rounds=5),
        # the forget set is four TruthfulQA categories, not names: n-grams of 32 questions find words such as
        # 'their' and 'on', so the guardrail names the categories (--forget_description) and the filter is ECO's
        # classifier gate; ICUL's retain example drawn from the 32 memorised retain rows (as many as the other stages
        # score)
        target=dict(guardrail="description", filter="classifier"),
        prompting=dict(max_retain=32, max_length=768, icul_k=1, icul_l=1),
        methods="gradient_ascent_descent",
        select=dict(spul=dict(lr=[1e-3, 2e-3], alpha=[0.5, 1.0]), baseline=dict(lr=[1e-5, 1e-4]),
                    icul=dict(icul_k=[1], icul_l=[1, 3]), max_eval_rows=32),
        audit={**AUDIT, "templates": "qa_options,letter"}),
    # A pipeline check in minutes (any model; with the embedded model 111 s measured on a 2-core CPU with little else
    # running, 15-33 s a stage, mostly start-up and loading; 15 min under load average ~10; README): qlora,
    # SPUL, one baseline and ECO, each for a step or two on a handful of rows, and their evaluations on 4 rows per
    # split. The vanilla and retrained references and the training-free baselines are skipped (--skip= runs them;
    # --methods adds baselines).
    "smoke": dict(
        methods="gradient_ascent_descent", skip="vanilla,retrained,prompting",
        sizes=dict(max_retain=12, max_forget=6, max_length=64),
        eval=dict(max_eval_rows=4),
        qlora=dict(num_epochs=1, train_batch_size=6, lr=1e-3),
        spul=dict(max_steps=2, train_batch_size=4, ptuning_num_tokens=2, max_retain=8),
        baseline=dict(max_steps=1, train_batch_size=4, max_retain=8),
        eco=dict(search_rows=4),
        terms=dict(min_rows=1), prompting=dict(max_retain=8, max_length=256, icul_k=1, icul_l=1),
        select=dict(spul=dict(lr=[1e-3, 2e-3]), baseline=dict(lr=[1e-5, 1e-4]), icul=dict(icul_l=[1, 2]),
                    max_eval_rows=4),
        audit=dict(max_eval_rows=4, templates="plain", splits="train_forget,test_forget,test_retain", relearn_epochs=1)),
}
SELECTED = os.path.join(ROOT, "data", "selected", "demo.json")  # the demo scale's choice, recorded with its command
# what a task changes at every scale: TruthfulQA's longest prompt (question, four options, cue) is 170 tokens
TASK_SIZES = {"mcqa": dict(max_length=192)}
MCQA_DATASET = "truthfulqa_mcqa"  # the name the demo's TruthfulQA set carries in results and tables


def flags(d):
    return [f"--{k}={v}" for k, v in d.items()]


# a finished stage of the same settings is kept, anything else (other settings, unfinished) is redone or resumed
REUSE = ["--resume", "--overwrite"]


# what a stage prints when it keeps a finished run (or results) of the same settings
KEPT = ("nothing to do", ": kept (")


class Job:
    def __init__(self, name, script, args, after, output):
        self.name, self.script, self.args, self.after = name, script, list(args), set(after)
        self.output = output  # a stage folder or a results.json path


PROMPTING = ("icul", "guardrail", "filter")  # prompting.py's methods the demo runs (--skip prompting skips them all)


def settings_key(method):
    """The scale's entry of a method's settings and selection grid."""
    return "spul" if method == "spul" else "prompting" if method in PROMPTING else "baseline"


def stage_settings(scale, method, selected):
    """The flags of one unlearning stage: the scale's, with the selected settings of `method` over them (the
    selection's step count belongs to the demo's rows: a scale with more rows keeps its own)."""
    base = dict(scale[settings_key(method)])
    if method in PROMPTING and method != "icul":  # ICUL's k and L are its alone
        base = {k: v for k, v in base.items() if not k.startswith("icul_")}
    chosen = {k: v for k, v in selected.get(method, {}).items() if k not in ("max_steps", "num_epochs")}
    return {**base, **chosen}


def forget_target(args, scale, method, terms):
    """How a training-free baseline is told the forget target: the guardrail by the forget terms (`terms`, written by
    scripts/forget_terms.py) or, for the mcqa demo's own set, by naming its forget categories; the filter by the terms or by
    ECO's prompt classifier, which learns the target from the training rows (as ICUL does)."""
    how = scale.get("target", {}).get(method, "terms")
    if method == "icul":
        return []
    if how == "classifier":
        return ["--filter_gate=classifier"]
    if how == "description" and getattr(args, "built_data", False):  # another folder's forget set is unnamed
        sys.path.insert(0, os.path.join(ROOT, "scripts"))
        from make_truthfulqa_mcqa import FORGET_CATEGORIES

        cats = [c.strip().lower() for c in FORGET_CATEGORIES.split(",")]
        return [f"--forget_description={', '.join(cats[:-1])} and {cats[-1]}"]
    return [f"--forget_terms={terms}"]


def data_flags(args):
    """The data flags of every stage: the demo's data folder (mcqa: with its task and name), else the hub's SST-2."""
    if getattr(args, "task", "sentiment") == "mcqa":
        return ["--task=mcqa", f"--dataset={MCQA_DATASET}", f"--data_dir={args.data_dir}"]
    return [f"--data_dir={args.data_dir}"] if args.data_dir else ["--dataset=sst2"]


def scale_of(args):
    """The scale's settings with the task's sizes over them."""
    scale = dict(SCALES[args.scale])
    scale["sizes"] = {**scale["sizes"], **TASK_SIZES.get(args.task, {})}
    return scale


def default_methods(scale, select=False):
    """The baselines a scale runs (--select: the ones its selection covers); every baseline when it names none."""
    own = SCALES[scale]
    return (select and own.get("select", {}).get("methods")) or own.get("methods", ",".join(BASELINES))


def build_mcqa_data(args):
    """The TruthfulQA multiple-choice set in OUTPUT_PATH/data (scripts/make_truthfulqa_mcqa.py; deterministic)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_truthfulqa_mcqa as tqa

    tqa.check_output(args.data_dir)
    tqa.write(tqa.build(tqa.read_truthfulqa(tqa.DEFAULT_CSV), tqa.comma_list(tqa.FORGET_CATEGORIES)), args.data_dir)


def plan(args, scale, selected=None, used=None):
    """The jobs in priority order (the longest chains first; evaluations fill the gaps). `used`: {method: training
    seeds its selection ran on these rows}; the table's runs take other seeds, so it reports fresh runs."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from select_settings import DEFAULT_SEED, fresh_seed

    selected, used = selected or {}, used or {}
    out = args.output_path
    data = data_flags(args)
    sizes, ev = flags(scale["sizes"]), flags({**scale["eval"], "max_length": scale["sizes"]["max_length"]})
    skip = set(filter(None, args.skip.split(",")))
    jobs, evals = [], []

    def seed_flags(method, seed=None):
        """--seed of a table run of `method`: by default one its selection did not use on these rows."""
        seed = fresh_seed(used.get(method, ())) if seed is None else seed
        if seed in used.get(method, ()):
            raise UserError(f"--seeds {seed}: {method}'s settings were selected on its runs of seed {seed} on these rows "
                            f"({getattr(args, 'selection', None) or 'the selection'}); the table reports fresh runs: "
                            f"choose seeds other than {', '.join(map(str, sorted(used[method])))}")
        return [f"--seed={seed}"] if seed != DEFAULT_SEED else []

    def stage(script, name, *a, after=("qlora",), long_eval=False):
        """A stage and its evaluation; a `long_eval` (ICUL's, on inputs several times longer) is queued right after
        its stage, so that it runs beside the others rather than alone at the end."""
        folder = os.path.join(out, name)
        jobs.append(Job(name, script, [*data, *sizes, f"--output_path={folder}", *REUSE, *a], after, folder))
        (jobs if long_eval else evals).append(Job(f"{name} eval", "inference_spul.py",
                                                  [*ev, f"--model_checkpoints={folder}", *REUSE, "--quiet"],
                                                  [name], os.path.join(folder, "results.json")))

    qlora = os.path.join(out, "qlora")
    stage("qlora.py", "qlora", f"--model_name={args.model_name}", *flags(scale["qlora"]), after=())
    stage("spul.py", "spul", f"--model_checkpoints={qlora}", *flags(stage_settings(scale, "spul", selected)),
          *seed_flags("spul"))
    if "retrained" not in skip:
        stage("qlora.py", "retrained", f"--model_name={args.model_name}", "--train_on=retain", *flags(scale["qlora"]), after=())
    if "eco" not in skip:
        stage("eco.py", "eco", f"--model_checkpoints={qlora}", *flags(scale["eco"]),
              f"--max_eval_rows={scale['eval']['max_eval_rows']}")
    if "vanilla" not in skip:
        # top-token protocol only: greedy generation (the paper's vanilla protocol) costs 5 forwards a row on a CPU
        vanilla = os.path.join(out, "vanilla")
        evals.insert(0, Job("vanilla eval", "inference_spul.py",
                            [*data, *sizes, *ev, f"--model_checkpoints={args.model_name}", f"--output_path={vanilla}",
                             "--generate=false", *REUSE, "--quiet"], (), os.path.join(vanilla, "results.json")))
    prompting = [m for m in PROMPTING if m not in skip and "prompting" not in skip]
    terms = os.path.join(out, "forget_terms.txt")
    target = {m: forget_target(args, scale, m, terms) for m in PROMPTING}
    reads_terms = {m for m, t in target.items() if f"--forget_terms={terms}" in t}

    def method_stage(m, name, *seed):
        """The stage of a baseline or a training-free method `m` from the qlora model."""
        if m in PROMPTING:
            after = ("qlora", "forget terms") if m in reads_terms else ("qlora",)
            stage("prompting.py", name, f"--model_checkpoints={qlora}", f"--method={m}",
                  *flags(stage_settings(scale, m, selected)), *target[m], *seed, after=after, long_eval=m == "icul")
        else:
            stage("baselines.py", name, f"--model_checkpoints={qlora}", f"--unlearn_method={m}",
                  *flags(stage_settings(scale, m, selected)), *seed)

    seeded = [m for m in filter(None, args.seed_methods.split(",")) if args.seeds]
    if reads_terms & {*prompting, *seeded}:
        # from the qlora model's training rows, never a test row
        jobs.append(Job("forget terms", "scripts/forget_terms.py",
                        [*data, *sizes, *flags(scale.get("terms", {})), f"--output={terms}", "--overwrite"], (), terms))
    for m in prompting:  # before the baselines: ICUL's long evaluation then runs beside their training
        method_stage(m, m, *seed_flags(m))
    if "baselines" not in skip:
        for m in filter(None, args.methods.split(",")):
            method_stage(m, m, *seed_flags(m))
    # more seeds of chosen methods (the table's own seed's run is the one above); tables report mean ± sd over them
    for seed in map(int, filter(None, str(args.seeds).split(","))):
        for m in seeded:
            if seed == fresh_seed(used.get(m, ())):
                continue
            if m == "spul":
                stage("spul.py", f"spul-seed{seed}", f"--model_checkpoints={qlora}", f"--seed={seed}",
                      *flags(stage_settings(scale, "spul", selected)), *seed_flags(m, seed))
            else:
                method_stage(m, f"{m}-seed{seed}", *seed_flags(m, seed) or [f"--seed={seed}"])
    # training jobs first in list order, each evaluation as soon as its model exists
    return jobs + evals


def plan_audit(args, scale):
    """audit.py on every stage folder the demo wrote (attacks of the same settings kept, other settings replaced): the fine-tuned and retrained references first (each without the
    other, side by side), then every method (reading both), then the references again with each other (their
    attacks kept: only recovery and privleak are added)."""
    out, a = args.output_path, flags(scale.get("audit", AUDIT))
    folders = [d for d in sorted(os.listdir(out)) if os.path.isfile(os.path.join(out, d, "arguments.json"))
               and (read_json(os.path.join(out, d, "arguments.json")) or {}).get("finished")] if os.path.isdir(out) else []
    if "qlora" not in folders:
        raise UserError(f"{out} holds no finished demo: run the demo first (`make demo`, or scripts/demo.py with the same "
                        f"flags), then --audit")
    refs = [d for d in ("qlora", "retrained") if d in folders]

    def audit(name, folder, *extra, after=()):
        return Job(name, "audit.py", [f"--model_checkpoints={os.path.join(out, folder)}", *a, *extra, "--overwrite", "--quiet"], after,
                   os.path.join(out, folder, "audit.json"))

    jobs = [audit("qlora audit", "qlora", "--retrained=none")]
    if "retrained" in refs:
        jobs.append(audit("retrained audit", "retrained", "--finetuned=none"))
    first = {j.name for j in jobs}
    # ICUL's inputs are several times longer than a plain query's: its audit first, beside the others
    jobs += [audit(f"{d} audit", d, after=first) for d in sorted(folders, key=lambda d: d != "icul") if d not in refs]
    if "retrained" in refs:
        jobs += [audit(f"{d} references", d, after=first) for d in refs]
    return jobs


def plan_selection(args, scale):
    """--select: qlora.py, then scripts/select_settings.py for every method on its grid (the stage's other flags as the
    demo runs it), two methods at a time."""
    out = args.output_path
    data = data_flags(args)
    qlora = os.path.join(out, "qlora")
    jobs = [Job("qlora", "qlora.py", [*data, *flags(scale["sizes"]), f"--model_name={args.model_name}",
                                      *flags(scale["qlora"]), f"--output_path={qlora}", *REUSE], (), qlora)]
    grids, skip = scale["select"], set(filter(None, args.skip.split(",")))
    methods = ([m for m in ["spul"] if m not in skip] + [m for m in filter(None, args.methods.split(",")) if "baselines" not in skip]
               + [m for m in ["icul"] if not {"icul", "prompting"} & skip])  # ICUL: the one with settings
    for m in methods:
        grid = grids.get(m) or grids[settings_key(m)]
        fixed = {k: v for k, v in scale[settings_key(m)].items() if k not in grid}
        cmd = [f"--model_checkpoints={qlora}", f"--method={m}", "--grid", *(f"{k}={','.join(map(str, v))}" for k, v in grid.items()),
               f"--output_path={os.path.join(out, 'select', m)}", f"--max_eval_rows={grids['max_eval_rows']}", "--",
               *flags(fixed)]
        jobs.append(Job(f"select {m}", "scripts/select_settings.py", cmd, ["qlora"],
                        os.path.join(out, "select", m, "selection.json")))
    return jobs


def record_selection(args, jobs, path):
    """Gather the chosen settings of every method into one file the demo reads (committed for the demo scale). A file
    of the same scale, model and data keeps the methods this selection did not cover (--skip)."""
    earlier = read_json(path) or {}
    same = all(earlier.get(k) == v for k, v in (("scale", args.scale), ("model", args.model_name),
                                                 ("dataset", demo_dataset(args))))
    methods = dict(earlier.get("methods", {})) if same else {}
    for m in methods:  # each method keeps the command that selected it
        methods[m].setdefault("command", earlier.get("command"))
    for job in jobs:
        if job.name.startswith("select "):
            sel = read_json(job.output)
            methods[sel["method"]] = {k: sel[k] for k in ("chosen", "qualified", "parent", "grid", "rule", "seeds")}
            methods[sel["method"]]["command"] = "python scripts/demo.py " + " ".join(sys.argv[1:])
            methods[sel["method"]]["candidates"] = [{k: c[k] for k in ("settings", "forget_val", "retain_val",
                                                                       "n_forget_val", "n_retain_val")}
                                                    for c in sel["candidates"]]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_json(path, {"command": "python scripts/demo.py " + " ".join(sys.argv[1:]), "scale": args.scale,
                     "model": args.model_name, "dataset": demo_dataset(args),
                     "methods": methods})
    print(f"recorded the selected settings of {len(methods)} methods in {path}")


def demo_dataset(args):
    if args.task == "mcqa":
        return MCQA_DATASET
    return "sst2" if not args.data_dir else os.path.basename(args.data_dir)


def read_selected(args, path, explicit):
    """{method: chosen settings} for this model and data, from the recorded selection ({} when it does not apply)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from select_settings import load_selection

    data = read_json(path)
    if data is None:
        if explicit:
            raise UserError(f"cannot read the selection file {path}")
        return {}
    dataset = demo_dataset(args)
    if not explicit and (os.path.basename(str(data.get("model"))) != os.path.basename(args.model_name)
                         or data.get("dataset") != dataset):
        print(f"{path} was selected for {data.get('model')} on {data.get('dataset')}: using the scale's own settings")
        return {}
    return {m: load_selection(path, m, args.model_name, dataset) for m in data.get("methods", {})}


def selection_seeds_here(args, path, selected):
    """{method: the training seeds its selection's runs used}, for a selection made on this scale's rows (a file
    naming another scale selected on other rows: {})."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from select_settings import selection_seeds

    if not selected or (read_json(path) or {}).get("scale", args.scale) != args.scale:
        return {}
    return {m: selection_seeds(path, m) for m in selected}


def threads_per_job(n_jobs, environ=os.environ, cores=None):
    """Each stage's share of the cores, never more than OMP_NUM_THREADS when the user set it."""
    share = max(1, (cores or os.cpu_count() or 1) // n_jobs)
    given = environ.get("OMP_NUM_THREADS", "")
    return min(share, int(given)) if given.isdigit() and int(given) > 0 else share


def record_timings(path, seconds, jobs, threads, wall):
    """timings.json: the latest wall seconds of every stage (a resumed run keeps the figures of the stages it kept),
    and the history of runs, each with the stages it ran."""
    earlier = read_json(path) or {}
    run = {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "stages_s": {k: round(v, 1) for k, v in seconds.items()},
           "jobs": jobs, "threads_per_job": threads, "wall_s": round(wall, 1)}
    save_json(path, {"stages_s": {**earlier.get("stages_s", {}), **run["stages_s"]}, "jobs": jobs,
                     "threads_per_job": threads, "last_run_wall_s": run["wall_s"], "runs": [*earlier.get("runs", []), run]})


class Stopped(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the running stages are stopped too."""


def _stop(signum, frame):
    raise Stopped()


def stop_all(running):
    """Terminate the running stages (then kill what still runs after 10 s)."""
    for proc, *_ in running.values():
        if proc.poll() is None:
            proc.terminate()
    for proc, job, log, _ in running.values():
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.write("\n[stopped: the demo was interrupted]\n")
        log.close()


def run_jobs(jobs, n_jobs, log_dir, threads):
    """Run `jobs` (_run_jobs); on Ctrl-C or SIGTERM the running stages are stopped before the interruption goes on,
    so that no stage keeps training after the demo has ended."""
    running = {}
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return _run_jobs(jobs, n_jobs, log_dir, threads, running)
    except KeyboardInterrupt:
        names = ", ".join(running)
        stop_all(running)
        print(f"\ndemo interrupted; stopped {names or 'no running stage'}; run it again to resume", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_jobs(jobs, n_jobs, log_dir, threads, running):
    """Run `jobs`, at most n_jobs at a time, each after the jobs it needs. A stage that finds its finished run
    (or results) of the same settings says so and stops at once: it counts as kept, not run."""
    from tqdm.auto import tqdm

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, done, kept = deque(jobs), set(), []
    failed, seconds, shown, start = None, {}, None, {}
    bar = tqdm(total=len(jobs), desc="demo", unit="stage", dynamic_ncols=True, mininterval=5)
    while pending or running:
        while not failed and len(running) < n_jobs:
            job = next((j for j in pending if j.after <= done), None)
            if job is None:
                break
            pending.remove(job)
            # appended: a re-run that keeps a finished stage leaves its training log above the "nothing to do"
            log = open(os.path.join(log_dir, job.name.replace(" ", "_") + ".log"), "a")
            cmd = [sys.executable, os.path.join(ROOT, job.script), *job.args]
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}\n$ " + " ".join(cmd) + "\n")
            log.flush()
            start[job.name] = os.path.getsize(log.name)
            running[job.name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                                 job, log, time.time())
        if shown != list(running):  # redraw only when the running stages change
            shown = list(running)
            bar.set_postfix_str(", ".join(shown))
        time.sleep(0.5)
        for name, (proc, job, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            log.close()
            if proc.returncode != 0:
                failed = failed or (job, log.name)
                tqdm.write(f"[{name}] FAILED after {time.time() - t0:.0f} s; log: {log.name}")
                continue
            done.add(name)
            bar.update(1)
            with open(log.name) as f:
                f.seek(start[name])
                said = f.read()  # this run's lines only
            if any(k in said for k in KEPT) and not job.name.startswith("select "):
                kept.append(name)
                continue
            seconds[name] = time.time() - t0
            tqdm.write(f"[{name}] done in {seconds[name]:.0f} s")
        if failed and not running:
            break
    bar.close()
    if kept:
        print(f"finished earlier with the same settings, kept: {', '.join(kept)}")
    return failed, seconds


def main():
    p = make_parser(__doc__)
    p.add_argument("--model_name", "--model", dest="model_name", default="smollm2-135m",
                   help="hub id, local folder, or smollm2-135m (embedded)")
    p.add_argument("--task", choices=["sentiment", "mcqa"], default="sentiment",
                   help="sentiment: SST-2; mcqa: multiple-choice questions from TruthfulQA, built into OUTPUT_PATH/data "
                        "by scripts/make_truthfulqa_mcqa.py")
    p.add_argument("--data_dir", default=None,
                   help="default: sentiment: ../shared/data/sst2 when present, else the hub; mcqa: OUTPUT_PATH/data")
    p.add_argument("--output_path", "--out", dest="output_path", default=None,
                   help="folder of every stage (default: runs/demo, runs/demo-<scale> for other scales; runs/demo-mcqa, "
                        "runs/demo-mcqa-<scale> for --task mcqa)")
    p.add_argument("--methods", default=None,
                   help="baselines to run (comma-separated; default: every one, or the scale's own list)")
    p.add_argument("--skip", default=None,
                   help="comma-separated stages to skip (vanilla, retrained, baselines, eco, prompting or one of icul, "
                        "guardrail, filter; with --select also spul; default: none, at the smoke scale "
                        "vanilla,retrained,prompting; --skip= runs every stage)")
    p.add_argument("--scale", choices=sorted(SCALES), default=None,
                   help="demo: the sizes of README's table (the default; mcqa for --task mcqa); large: the two-hour CPU "
                        "table of docs/cpu_scale_table.md; smoke: a check in minutes that qlora, SPUL, one baseline, "
                        "ECO and their evaluations run (a step or two each)")
    p.add_argument("--jobs", type=positive_int, default=min(2, os.cpu_count() or 1), help="stages run side by side")
    p.add_argument("--seeds", default="",
                   help="more training seeds of --seed_methods; each stage's own seed is 42, or 1 where its selection "
                        "trained on these rows with 42 (the demo scale), so that the table reports fresh runs")
    p.add_argument("--seed_methods", default="spul", help="methods repeated with every seed of --seeds")
    add_bool(p, "--audit", help="instead of the demo: audit.py's attacks on every stage folder of a finished demo, "
                                "then the robustness table (OUTPUT_PATH/table_robustness.md)")
    add_bool(p, "--select", help="instead of the demo: choose every method's settings on validation rows "
                                 "(scripts/select_settings.py over the scale's grids) and record them in --selection")
    p.add_argument("--selection", default=None,
                   help="the recorded selected settings (default: data/selected/demo.json at the demo scale, "
                        "OUTPUT_PATH/selection.json otherwise)")
    args = p.parse_args()
    mcqa = args.task == "mcqa"
    args.scale = args.scale or ("mcqa" if mcqa else "demo")
    if args.scale in ("demo", "mcqa") and (args.scale == "mcqa") != mcqa:
        p.error(f"--scale {args.scale} is the {'mcqa' if args.scale == 'mcqa' else 'sentiment'} task's scale "
                f"(--task {args.task} has its own: leave --scale out)")
    args.methods = args.methods or default_methods(args.scale, args.select)
    args.skip = SCALES[args.scale].get("skip", "") if args.skip is None else args.skip
    bad = [m for m in filter(None, args.methods.split(",")) if m not in BASELINES]
    if bad:
        p.error(f"unknown method {', '.join(bad)} in --methods: choose from {', '.join(BASELINES)}")
    name = "demo-mcqa" if mcqa else "demo"
    own = args.scale in ("demo", "mcqa")  # a task's own scale writes to the task's folder
    args.output_path = args.output_path or os.path.join(ROOT, "runs", name if own else f"{name}-{args.scale}")
    args.out = args.output_path
    explicit = args.selection is not None
    # the demo scale's selection also serves the larger table: its settings are chosen on the demo's rows
    args.selection = args.selection or (SELECTED if args.scale in ("demo", "large") else os.path.join(args.out, "selection.json"))
    if mcqa and args.data_dir is None:
        args.data_dir, args.built_data = os.path.join(args.out, "data"), True
        build_mcqa_data(args)
    elif args.data_dir is None:
        args.data_dir = default_data_dir()
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    t0 = time.time()

    from utils.modeling import resolve_model

    resolve_model(args.model_name)  # the embedded model is converted once here, not by stages started side by side
    if args.select:
        jobs = plan_selection(args, scale_of(args))
    elif args.audit:
        jobs = plan_audit(args, scale_of(args))
    else:
        selected = read_selected(args, args.selection, explicit)
        jobs = plan(args, scale_of(args), selected, selection_seeds_here(args, args.selection, selected))
    threads = threads_per_job(args.jobs)
    print(f"{len(jobs)} stages, {args.jobs} at a time, {threads} thread(s) each; logs in {os.path.join(args.out, 'logs')}",
          flush=True)
    failed, seconds = run_jobs(jobs, args.jobs, os.path.join(args.out, "logs"), threads)
    if failed:
        job, log = failed
        with open(log) as f:
            tail = f.read().splitlines()[-15:]
        print("\n".join(["", f"--- last lines of {log} ---", *tail]), file=sys.stderr)
        sys.exit(f"demo stopped: {job.name} failed (see {log}); re-run `make demo` to resume")
    if args.select:
        record_selection(args, jobs, args.selection)
        return

    # wall seconds of each stage, for README's figures
    record_timings(os.path.join(args.out, "audit_timings.json" if args.audit else "timings.json"), seconds, args.jobs,
                   threads, time.time() - t0)
    if args.audit:
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "robustness.py"), args.out, "--overwrite",
                        f"--output_path={os.path.join(args.out, 'table_robustness')}"], cwd=ROOT, check=True)
        print(f"\naudit finished in {time.time() - t0:.0f} s; table in {os.path.join(args.out, 'table_robustness.md')}")
        return
    results = [j.output for j in jobs if j.output.endswith("results.json")]
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tables.py"), *results,
                    f"--output_path={os.path.join(args.out, 'table')}", "--overwrite"],  # regenerated on every run
                   cwd=ROOT, check=True)
    print(f"\ndemo finished in {time.time() - t0:.0f} s; table in {os.path.join(args.out, 'table.md')}")


if __name__ == "__main__":
    run_main(main)
