"""The CPU quickstart (`make demo`): the whole pipeline on the embedded SmolLM2-135M and a seeded
SST-2 subset, ending in the results table (runs/demo/table.md).

vanilla eval → qlora.py → spul.py → baselines.py (every method) → qlora.py --train_on retain
(the retrained reference) → eco.py → inference_spul.py on every checkpoint → make_tables.py.

Re-running resumes: a stage whose folder holds a finished run (or a results.json) is skipped.
Sizes are chosen to finish within ~30 minutes on a 2-core CPU; see README for the figures.
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.data import default_data_dir  # noqa: E402
from utils.methods import BASELINES  # noqa: E402
from utils.runs import is_finished  # noqa: E402

# Demo scale (CPU): rows used for training (qlora.py) and rows scored per split.
SIZES = dict(max_retain=384, max_forget=128, max_length=128)
EVAL = dict(max_eval_rows=64, max_length=128)  # train_* caps come from each stage's own arguments.json
QLORA = dict(num_epochs=2, train_batch_size=16, lr=1e-3)
# SPUL unlearns the 128 forget rows with 128 of the memorised retain rows (a subset of qlora.py's 384),
# the baselines with 64 of them (the 30-minute budget). SPUL: p=10 (CPU time grows with p); small batches, since at this scale the prompt
# learns to tell forget rows from retain rows only with enough updates (README, "the demo").
SPUL = dict(num_epochs=5, train_batch_size=8, lr=1e-3, ptuning_num_tokens=10, alpha=1.0, beta=0.5, max_retain=128)
BASELINE = dict(num_epochs=1, train_batch_size=16, lr=1e-5, max_retain=64)


def flags(d):
    return [f"--{k}={v}" for k, v in d.items()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data_dir", default=default_data_dir(), help="default: ../shared/data/sst2 when present, else the hub")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"))
    p.add_argument("--methods", default=",".join(BASELINES), help="baselines to run (comma-separated)")
    p.add_argument("--skip", default="", help="comma-separated stages to skip (vanilla, retrained, baselines, eco)")
    args = p.parse_args()
    data = [f"--data_dir={args.data_dir}"] if args.data_dir else ["--dataset=sst2"]
    skip = set(filter(None, args.skip.split(",")))
    out = args.out
    os.makedirs(out, exist_ok=True)
    t0 = time.time()

    def run(script, *a):
        cmd = [sys.executable, os.path.join(ROOT, script), *a]
        print(f"\n$ {' '.join(cmd)}", flush=True)
        if subprocess.call(cmd, cwd=ROOT) != 0:
            sys.exit(f"demo stopped: {script} failed (re-run `make demo` to resume)")

    def stage(script, name, *a):
        folder = os.path.join(out, name)
        if is_finished(folder):
            print(f"[{name}] finished run found, skipped")
        else:
            run(script, *data, *flags(SIZES), f"--output_path={folder}", "--overwrite", *a)
        return folder

    def evaluate(folder, *a):
        results = os.path.join(folder, "results.json")
        if os.path.exists(results):
            print(f"[{os.path.basename(folder)}] results.json found, skipped")
        else:
            run("inference_spul.py", *data, *flags(EVAL), f"--model_checkpoints={folder}", *a)
        return folder

    evaluated = []
    if "vanilla" not in skip:
        folder = os.path.join(out, "vanilla")
        if not os.path.exists(os.path.join(folder, "results.json")):
            # top-token protocol only: greedy generation (the paper's vanilla protocol) costs 5 forwards a row on a CPU
            run("inference_spul.py", *data, *flags(SIZES), *flags(EVAL), f"--model_checkpoints={args.model}",
                f"--output_path={folder}",
                "--generate=false")
        evaluated.append(folder)
    qlora = stage("qlora.py", "qlora", f"--model_name={args.model}", *flags(QLORA))
    evaluated.append(evaluate(qlora))
    evaluated.append(evaluate(stage("spul.py", "spul", f"--model_checkpoints={qlora}", *flags(SPUL))))
    if "baselines" not in skip:
        for m in filter(None, args.methods.split(",")):
            evaluated.append(evaluate(stage("baselines.py", m, f"--model_checkpoints={qlora}",
                                            f"--unlearn_method={m}", *flags(BASELINE))))
    if "retrained" not in skip:
        evaluated.append(evaluate(stage("qlora.py", "retrained", f"--model_name={args.model}", "--train_on=retain",
                                        *flags(QLORA))))
    if "eco" not in skip and os.path.exists(os.path.join(ROOT, "eco.py")):
        evaluated.append(evaluate(stage("eco.py", "eco", f"--model_checkpoints={qlora}", "--search_rows=32",
                                        f"--max_eval_rows={EVAL['max_eval_rows']}")))

    run("scripts/make_tables.py", *evaluated, f"--out={os.path.join(out, 'table')}")
    print(f"\ndemo finished in {time.time() - t0:.0f} s; table in {os.path.join(out, 'table.md')}")


if __name__ == "__main__":
    main()
