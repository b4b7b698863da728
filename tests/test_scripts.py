"""The paper-table recipes: each passes `bash -n` and runs end to end on a tiny model with tiny caps
(grids shortened through the scripts' own environment overrides)."""
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.sh")))
CAPS = "--max_retain=12 --max_forget=6 --max_length=64"


def test_every_script_parses():
    assert len(SCRIPTS) >= 6
    for s in SCRIPTS:
        subprocess.run(["bash", "-n", s], check=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llama, sst2_dir):
    out = tmp_path_factory.mktemp("tables")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MODEL": tiny_llama, "DATA_DIR": sst2_dir, "OUT": str(out),
            "EXTRA": f"{CAPS} --num_epochs=1 --train_batch_size=6 --quiet", "QLORA_EXTRA": "--quantization=none",
            "SPUL_EPOCHS": "1", "EVAL_EXTRA": f"{CAPS} --max_eval_rows=6 --quiet --generate=false"}


def run(script, env, **extra):
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", script)], cwd=ROOT, capture_output=True, text=True,
                          env={**env, **extra}, timeout=900)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def methods_in(table_md):
    with open(table_md) as f:
        return f.read()


def test_table2_and_the_grid_scripts_that_reuse_its_model(env):
    """Table 2 end to end (two of its baselines), then one grid point of each grid recipe (a grid is a loop over
    the same stage): each starts from table2's qlora folder instead of training its own. One test, so that the
    order and the folder hold however the tests are spread over processes."""
    run("table2.sh", env, DATASETS="sst2", METHODS="gradient_ascent_kl gradient_ascent_descent")
    d = os.path.join(env["OUT"], "table2", "sst2")
    for m in ("vanilla", "qlora", "gradient_ascent_kl", "gradient_ascent_descent", "spul"):
        with open(os.path.join(d, m, "results.json")) as f:
            assert set(json.load(f)["metrics"]) == {"train_retain", "train_forget", "test_retain", "test_forget"}
    table = methods_in(os.path.join(d, "table.md"))
    assert "spul" in table and "gradient_ascent_descent" in table

    assert "nothing to do" in run("table3.sh", env, ALPHAS="1.0", BETAS="0.5").stdout  # table2's qlora kept
    run("table4.sh", env, SIZES="0.5")
    run("figure2.sh", env, PS="4")
    for sub in ("table3/sst2/spul-a1.0-b0.5", "table4/sst2/spul-f0.5", "figure2/sst2/spul-p4"):
        assert os.path.exists(os.path.join(env["OUT"], sub, "results.json")), sub
    with open(os.path.join(env["OUT"], "table4", "sst2", "spul-f0.5", "arguments.json")) as f:
        assert json.load(f)["forget_size"] == 0.5


def test_table5_runs_end_to_end(env, tiny_llama):
    run("table5.sh", env, MODELS=tiny_llama)
    d = os.path.join(env["OUT"], "table5", os.path.basename(tiny_llama))
    assert os.path.exists(os.path.join(d, "spul", "results.json"))
    assert os.path.exists(os.path.join(d, "table.md"))


def demo(*args):
    """scripts/demo.py at the smoke scale (a step or two per stage)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--scale", "smoke", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.usefixtures("one_thread")
def test_demo_runs_every_stage_and_resumes(tmp_path, tiny_llama, sst2_dir):
    """scripts/demo.py at --scale smoke on the tiny model: every stage ends in the table, two at a time;
    a second run finds every stage finished with the same settings, keeps them and only rebuilds the table."""
    out = tmp_path / "demo"
    args = ["--model_name", tiny_llama, "--data_dir", sst2_dir, "--output_path", out, "--methods", "gradient_ascent_descent",
            "--jobs", 2, "--skip=retrained,prompting"]  # the vanilla evaluation too (the smoke scale skips it by default);
    # the retrained reference is qlora.py --train_on retain, run by tests/test_qlora.py; the training-free baselines
    # run end to end in tests/test_prompting.py, their demo stages are checked in tests/test_select.py
    first = demo(*args)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    stages = ("vanilla", "qlora", "spul", "gradient_ascent_descent", "eco")
    for m in stages:
        assert os.path.exists(out / m / "results.json"), m
        assert os.path.exists(out / "logs" / f"{m}_eval.log"), m
    with open(out / "table.md") as f:
        table = f.read()
    for row in ("| Vanilla |", "| QLoRA |", "| GA+GD |", "| ECO |", "| SPUL |"):
        assert row in table, row
    with open(out / "spul" / "arguments.json") as f:
        assert json.load(f)["max_steps"] == 2  # the smoke scale reached the stage
    with open(out / "timings.json") as f:
        assert set(json.load(f)["stages_s"]) == {*stages[1:], *(f"{m} eval" for m in stages)}
    again = demo(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    kept = next(line for line in said.splitlines() if line.startswith("finished earlier with the same settings, kept:"))
    assert all(f"{m} eval" in kept for m in stages) and " done in " not in said
    with open(out / "timings.json") as f:
        timings = json.load(f)
    assert len(timings["stages_s"]) == 2 * len(stages) - 1  # the first run's figures are kept
    assert [len(r["stages_s"]) for r in timings["runs"]] == [2 * len(stages) - 1, 0]  # and each run's own
    # a kept stage's log still holds its training, above this run's "nothing to do"
    log = (out / "logs" / "qlora.log").read_text()
    assert "train_loss" in log and log.index("train_loss") < log.index("nothing to do")


def test_demo_stops_with_the_failing_stage_named(tmp_path, tiny_llama):
    proc = demo("--model_name", tiny_llama, "--data_dir", tmp_path / "missing", "--output_path", tmp_path / "d",
                "--skip", "vanilla,retrained,baselines,eco", "--jobs", 1)
    assert proc.returncode != 0
    assert "demo stopped: qlora failed" in proc.stderr and "Traceback" not in proc.stderr
    assert "missing" in proc.stderr  # the stage's own one-line error, from its log


def test_demo_stages_are_kept_only_with_the_same_settings(tmp_path):
    """Every stage of the demo runs with --resume --overwrite (kept when its settings are the same, run again when
    they differ), and each scale writes to its own folder: a smoke run never stands in for the demo's results."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import argparse

    import demo as demo_script

    args = argparse.Namespace(output_path=str(tmp_path), data_dir="d", model_name="m", skip="", methods="npo",
                              task="sentiment", seeds="42,1", seed_methods="spul,npo")
    for scale in demo_script.SCALES.values():
        for job in demo_script.plan(args, scale):
            if job.script == "scripts/forget_terms.py":  # no run folder: the same rows give the same file, rewritten
                assert "--overwrite" in job.args, job.name
                continue
            assert "--resume" in job.args and "--overwrite" in job.args, job.name
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--help"], capture_output=True, text=True)
    assert "runs/demo-<scale>" in proc.stdout


def test_a_finished_stage_is_rerun_when_its_settings_differ(tiny_llama, sst2_dir, tmp_path):
    """The mechanism behind the demo's and the recipes' reuse: same settings kept, other settings replaced only
    with --overwrite (and named in the message)."""
    from conftest import run_script

    args = ["--model_name", tiny_llama, "--data_dir", sst2_dir, "--quantization", "none", "--max_retain", 8,
            "--max_forget", 4, "--max_length", 64, "--train_batch_size", 4, "--output_path", tmp_path / "q", "--quiet"]
    run_script("qlora.py", *args, "--max_steps", 1)
    same = run_script("qlora.py", *args, "--max_steps", 1, "--resume", "--overwrite")
    assert "nothing to do" in same.stdout
    other = run_script("qlora.py", *args, "--max_steps", 2, "--resume", "--overwrite")
    assert "replacing the finished run" in other.stdout and "max_steps: 1 → 2" in other.stdout
    with open(tmp_path / "q" / "arguments.json") as f:
        assert json.load(f)["max_steps"] == 2


def multigpu_plan(**env):
    e = {k: v for k, v in os.environ.items() if k not in ("NGPU", "CUDA_VISIBLE_DEVICES", "DEVICE_BATCH")}
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "table2_multigpu.sh")], cwd=ROOT, capture_output=True,
                          text=True, env={**e, "PLAN_ONLY": "1", **env}, timeout=60)


@pytest.mark.parametrize("env", [{"NGPU": n} for n in ("1", "2", "4", "8", "16", "32")]
                         + [{"NGPU": "2", "DEVICE_BATCH": "6"}, {"NGPU": "1", "DEVICE_BATCH": "5"},
                            {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}])
def test_multigpu_recipe_keeps_the_global_batch_of_32(env):
    """Per-device batch × GPUs × accumulation steps = 32 rows per optimiser step (before: 32 // NGPU per device, so
    a global batch of 30 on 3, 5 or 6 GPUs), the micro-batch within DEVICE_BATCH."""
    import re

    proc = multigpu_plan(**env)
    assert proc.returncode == 0, proc.stderr
    batch, ngpu, accum = map(int, re.fullmatch(r"global batch 32 = (\d+) rows per GPU × (\d+) GPUs × (\d+) accumulation "
                                                r"steps\n", proc.stdout).groups())
    assert batch * ngpu * accum == 32 and ngpu == int(env.get("NGPU", 4))
    assert batch <= int(env.get("DEVICE_BATCH", 32))


@pytest.mark.parametrize("ngpu,fit", [("3", 2), ("5", 4), ("6", 4), ("7", 4), ("33", 32), ("0", None)])
def test_multigpu_recipe_refuses_a_gpu_count_that_cannot_give_32(ngpu, fit):
    proc = multigpu_plan(NGPU=ngpu)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert (f"NGPU={fit}" if fit else "no GPU") in proc.stderr


def test_demo_threads_respect_omp_num_threads():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import demo as demo_script

    assert demo_script.threads_per_job(2, {}, cores=8) == 4
    assert demo_script.threads_per_job(2, {"OMP_NUM_THREADS": "1"}, cores=8) == 1
    assert demo_script.threads_per_job(2, {"OMP_NUM_THREADS": "16"}, cores=8) == 4
    assert demo_script.threads_per_job(4, {"OMP_NUM_THREADS": ""}, cores=2) == 1


def test_the_smoke_scale_runs_a_few_stages():
    """The smoke check: qlora, SPUL, one baseline, ECO and their evaluations, not every reference and baseline."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import argparse

    import demo as demo_script

    args = argparse.Namespace(output_path="o", data_dir="d", model_name="m", task="sentiment", seeds="42",
                              seed_methods="spul", methods=demo_script.default_methods("smoke"),
                              skip=demo_script.SCALES["smoke"]["skip"])
    names = [j.name for j in demo_script.plan(args, demo_script.SCALES["smoke"])]
    assert sorted(names) == sorted(["qlora", "spul", "eco", "gradient_ascent_descent", "qlora eval", "spul eval",
                                    "eco eval", "gradient_ascent_descent eval"])


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_stopping_the_demo_stops_its_running_stages(tmp_path, signame):
    """Ctrl-C (SIGINT) or SIGTERM during run_jobs terminates the stage it started and leaves a word in its log."""
    import signal
    import threading
    import time

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import demo as demo_script

    pidfile = tmp_path / "pid"
    script = tmp_path / "sleeper.py"
    script.write_text(f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    jobs = [demo_script.Job("sleep", str(script), [], (), str(tmp_path / "out"))]

    def stop():
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.1)
        os.kill(os.getpid(), getattr(signal, signame))

    threading.Thread(target=stop, daemon=True).start()
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        demo_script.run_jobs(jobs, 1, str(tmp_path), 1)
    assert time.time() - t0 < 30
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):  # terminated and reaped
        os.kill(pid, 0)
    assert "[stopped: the demo was interrupted]" in (tmp_path / "sleep.log").read_text()
    assert signal.getsignal(signal.SIGTERM) is not demo_script._stop  # the handler is put back
