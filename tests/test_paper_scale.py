"""What paper-scale runs need and this machine can still check: each process on its own device, runs that
survive a crash, full fine-tuning whose small updates are not lost, and the settings a stage may not get wrong.
Multi-process training itself is in test_multiprocess.py."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, one_line_error, run_script, write_split_dir

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ every process on its own device

def test_device_follows_the_local_rank(monkeypatch):
    """Rank 1 of 2 on a CUDA machine works on cuda:1 from the model load on (before, every rank used GPU 0)."""
    from utils import modeling

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert modeling.device() == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert modeling.device() == torch.device("cuda", 0)


def test_nf4_and_full_precision_loads_go_to_the_given_gpu(monkeypatch):
    """The weights (NF4 included) are placed by a device map for this process's GPU, not moved there later."""
    import transformers

    from utils import modeling

    seen = []

    class Stop(Exception):
        pass

    def fake(name, **kw):
        seen.append(kw)
        raise Stop

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    for quant in ("nf4", None):
        with pytest.raises(Stop):
            modeling.load_model("some/model", quantization=quant, device=torch.device("cuda", 1))
    assert [kw["device_map"] for kw in seen] == [{"": torch.device("cuda", 1)}] * 2
    assert "quantization_config" in seen[0]
    seen.clear()
    with pytest.raises(Stop):
        modeling.load_model("some/model", device=torch.device("cpu"))
    assert "device_map" not in seen[0]  # on the CPU the Trainer places the model


# ------------------------------------------------------------------ runs that survive a crash

STAGES = {
    "qlora.py": lambda m, q: ["--model_name", m, "--quantization", "none", "--num_epochs", 2],
    "spul.py": lambda m, q: ["--model_checkpoints", q, "--num_epochs", 2, "--ptuning_num_tokens", 4],
    "baselines.py": lambda m, q: ["--model_checkpoints", q, "--unlearn_method", "gradient_ascent_kl", "--num_epochs", 2],
}
COMMON = ["--max_retain", 16, "--max_forget", 8, "--max_length", 64, "--train_batch_size", 8, "--logging_steps", 1,
          "--lr", 1e-3, "--seed", 3, "--save_steps", 2, "--quiet"]


def _final_weights(folder):
    name = "adapter_model.safetensors" if os.path.exists(os.path.join(folder, "adapter_model.safetensors")) \
        else "model.safetensors"
    return load_file(os.path.join(folder, name))


def _losses(folder):
    with open(os.path.join(folder, "training_log.json")) as f:
        return [(e["step"], e["loss"]) for e in json.load(f) if "loss" in e]


@pytest.mark.parametrize("script", sorted(STAGES))
def test_a_crashed_run_resumes_to_the_same_result(script, tiny_llama, tiny_qlora, sst2_dir, tmp_path):
    """Stopped right after its step-2 checkpoint and resumed with --resume, a run ends with the same weights and
    the same training log as the same run uninterrupted (6 steps: 24 rows, batch 8, 2 epochs)."""
    args = [*STAGES[script](tiny_llama, tiny_qlora), "--data_dir", sst2_dir, *COMMON]
    run_script(script, *args, "--output_path", tmp_path / "whole")

    crashed = run_script(script, *args, "--output_path", tmp_path / "run", check=False,
                         env={"SPUL_TEST_CRASH_AFTER_STEP": "2"})
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    with open(tmp_path / "run" / "arguments.json") as f:
        assert json.load(f)["finished"] is False
    assert os.path.isdir(tmp_path / "run" / "checkpoint-2")

    # without --resume or --overwrite the unfinished run is neither continued nor deleted
    line = one_line_error(run_script(script, *args, "--output_path", tmp_path / "run", check=False))
    assert "--resume" in line and "--overwrite" in line and "checkpoint-2" in line
    assert os.path.isdir(tmp_path / "run" / "checkpoint-2")

    resumed = run_script(script, *args, "--output_path", tmp_path / "run", "--resume")
    assert "resuming from" in resumed.stdout
    (steps_run, losses_run), (steps_whole, losses_whole) = zip(*_losses(tmp_path / "run")), zip(*_losses(tmp_path / "whole"))
    assert steps_run == steps_whole
    assert losses_run == pytest.approx(losses_whole, rel=1e-6)
    assert len(_losses(tmp_path / "whole")) == 6
    a, b = _final_weights(tmp_path / "run"), _final_weights(tmp_path / "whole")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    with open(tmp_path / "run" / "arguments.json") as f:
        assert json.load(f)["finished"] is True
    assert not [d for d in os.listdir(tmp_path / "run") if d.startswith("checkpoint-")]  # removed once finished


def test_a_checkpoint_cut_short_is_passed_over(tiny_qlora, sst2_dir, tmp_path):
    """A crash while checkpoint-4 was being written (its trainer_state.json, written last, cut short): --resume
    names it, continues from checkpoint-2, and ends as the uninterrupted run does (before: a stack trace)."""
    args = [*STAGES["spul.py"](None, tiny_qlora), "--data_dir", sst2_dir, *COMMON]
    run_script("spul.py", *args, "--output_path", tmp_path / "whole")
    run_script("spul.py", *args, "--output_path", tmp_path / "run", check=False, env={"SPUL_TEST_CRASH_AFTER_STEP": "4"})
    state = tmp_path / "run" / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:100])
    resumed = run_script("spul.py", *args, "--output_path", tmp_path / "run", "--resume")
    line = next(x for x in resumed.stdout.splitlines() if x.startswith("resuming from"))
    assert line.split()[2] == str(tmp_path / "run" / "checkpoint-2") and "passing over checkpoint-4" in line
    (steps_run, losses_run), (steps_whole, losses_whole) = zip(*_losses(tmp_path / "run")), zip(*_losses(tmp_path / "whole"))
    assert steps_run == steps_whole and losses_run == pytest.approx(losses_whole, rel=1e-6)


def test_which_checkpoints_are_complete(tmp_path):
    """Complete: the trainable weights and a trainer_state.json of its own step (the Trainer writes it last)."""
    from utils.runs import is_complete, last_complete_checkpoint

    def checkpoint(step, state=None, weights=True):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if weights:
            (d / "trainable.safetensors").write_bytes(b"0")
        if state is not None:
            (d / "trainer_state.json").write_text(state)
        return str(d)

    good = checkpoint(2, json.dumps({"global_step": 2}))
    assert is_complete(good)
    assert not is_complete(checkpoint(3, json.dumps({"global_step": 3}), weights=False))
    assert not is_complete(checkpoint(4, json.dumps({"global_step": 2})))  # another step's state
    assert not is_complete(checkpoint(5, '{"global_st'))                  # cut short
    assert not is_complete(checkpoint(6))                                 # not written yet
    assert last_complete_checkpoint(str(tmp_path)) == (good, [str(tmp_path / f"checkpoint-{i}") for i in (3, 4, 5, 6)])


def test_a_resume_on_another_number_of_processes_is_refused(monkeypatch, tmp_path):
    """arguments.json records the processes and the global batch; --resume of a 4-process run by 2 processes (a
    global batch of 16 instead of 32) is refused naming both; the same number resumes, and a run written before the
    processes were recorded resumes on one process."""
    from utils.cli import UserError
    from utils.runs import decide, save_arguments, settings_of

    args = {"train_batch_size": 8, "gradient_accumulation_steps": 1, "lr": 1e-4, "seed": 1}
    folder = tmp_path / "run"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "trainable.safetensors").write_bytes(b"0")
    (folder / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    info = save_arguments(str(folder), args, stage="spul")
    assert info["settings"]["world_size"] == 4 and info["global_batch"] == 32
    assert decide(str(folder), settings_of(args, "spul"), resume=True)[0] == "resume"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError) as e:
        decide(str(folder), settings_of(args, "spul"), resume=True)
    assert "processes: 4 → 2" in str(e.value) and "global batch 32 → 16" in str(e.value) and "\n" not in str(e.value)

    monkeypatch.setenv("WORLD_SIZE", "1")
    old = json.loads((folder / "arguments.json").read_text())
    del old["settings"]["world_size"]
    (folder / "arguments.json").write_text(json.dumps(old))
    assert decide(str(folder), settings_of(args, "spul"), resume=True)[0] == "resume"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="processes: 1 → 2"):
        decide(str(folder), settings_of(args, "spul"), resume=True)


def test_checkpoints_hold_only_the_trainable_weights(tiny_qlora, sst2_dir, tmp_path):
    """A SPUL checkpoint is the prompt encoder (kilobytes), not another copy of the frozen LLM."""
    out = tmp_path / "spul"
    run_script("spul.py", *STAGES["spul.py"](None, tiny_qlora), "--data_dir", sst2_dir, *COMMON, "--keep_checkpoints",
               "--output_path", out)
    kept = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert kept == ["checkpoint-4", "checkpoint-6"]  # every 2 steps, the last --save_total_limit 2 kept
    state = load_file(str(out / kept[-1] / "trainable.safetensors"))
    assert state and all("prompt_encoder" in k for k in state)
    assert sum(t.numel() for t in state.values()) < 50_000
    assert os.path.exists(out / kept[-1] / "optimizer.pt")


def test_resume_of_a_finished_run_with_the_same_settings_does_nothing(tiny_qlora, sst2_dir, tmp_path):
    args = [*STAGES["spul.py"](None, tiny_qlora), "--data_dir", sst2_dir, *COMMON, "--output_path", tmp_path / "s"]
    run_script("spul.py", *args, "--max_steps", 1)
    stamp = os.path.getmtime(tmp_path / "s" / "adapter_model.safetensors")
    proc = run_script("spul.py", *args, "--max_steps", 1, "--resume")
    assert "nothing to do" in proc.stdout
    assert os.path.getmtime(tmp_path / "s" / "adapter_model.safetensors") == stamp
    line = one_line_error(run_script("spul.py", *args, "--max_steps", 2, "--resume", check=False))
    assert "max_steps: 1 → 2" in line and "--overwrite" in line


# ------------------------------------------------------------------ full fine-tuning that keeps its updates

def _changed_share(folder, qlora, dtype):
    from utils.modeling import load_merged_model

    before = {k: v.to(dtype) for k, v in load_merged_model(qlora)[0].state_dict().items()}
    after = load_file(os.path.join(folder, "model.safetensors"))
    changed = total = 0
    for k, v in after.items():
        changed += int((v.to(dtype) != before[k]).sum())
        total += v.numel()
    return changed / total


@pytest.fixture(scope="module")
def one_step(tiny_qlora, sst2_dir, tmp_path_factory):
    """One GA+GD step at lr 1e-5 in bf16 on the CPU: mixed precision (the default) and --pure_bf16."""
    root = tmp_path_factory.mktemp("bf16")
    args = ["--model_checkpoints", tiny_qlora, "--data_dir", sst2_dir, "--unlearn_method", "gradient_ascent_descent",
            "--max_retain", 16, "--max_forget", 8, "--max_length", 64, "--train_batch_size", 24, "--max_steps", 1,
            "--lr", 1e-5, "--warmup_ratio", 0, "--precision", "bf16", "--quiet"]
    run_script("baselines.py", *args, "--output_path", root / "mixed")
    pure = run_script("baselines.py", *args, "--pure_bf16", "--output_path", root / "pure")
    return root, pure


def test_mixed_precision_keeps_small_updates(one_step, tiny_qlora):
    """fp32 master weights under bf16 autocast: one AdamW step of size ~1e-5 changes essentially every weight
    (each one received a gradient: the tied embedding through the output layer too)."""
    root, _ = one_step
    share = _changed_share(root / "mixed", tiny_qlora, torch.float32)
    assert share > 0.99, share


def test_pure_bf16_loses_small_updates_and_says_so(one_step, tiny_qlora):
    """Weights kept in bf16: an update of 1e-5 is below half the bf16 spacing of most weights (2^-8 of the weight
    for ~0.02-sized weights, 2^-7 at the norm weights' 1.0), so most weights stay bitwise unchanged."""
    root, proc = one_step
    assert "warning: --pure_bf16" in proc.stdout
    share = _changed_share(root / "pure", tiny_qlora, torch.bfloat16)
    assert share < 0.5, share


@pytest.mark.parametrize("flags,needle", [(["--precision", "fp16"], "fp16"),
                                          (["--pure_bf16", "--lora"], "pure_bf16")])
def test_precision_flags_that_lose_updates_are_refused(flags, needle, tiny_qlora, tmp_path):
    proc = run_script("baselines.py", "--model_checkpoints", tiny_qlora, "--unlearn_method", "gradient_ascent", *flags,
                      "--output_path", tmp_path / "x", check=False)
    assert needle in one_line_error(proc)


def test_zero_offload_config_is_a_valid_accelerate_deepspeed_config():
    """configs/zero2_offload.yaml is what the table scripts pass to accelerate for 7B full fine-tuning on 40 GB."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(os.path.join(ROOT, "configs", "zero2_offload.yaml"))
    assert str(cfg.distributed_type).endswith("DEEPSPEED")
    with open(os.path.join(ROOT, cfg.deepspeed_config["deepspeed_config_file"])) as f:
        ds = json.load(f)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] == "auto"  # the Trainer's bf16 (mixed precision) decides


# ------------------------------------------------------------------ settings a stage may not get wrong

def test_forget_size_with_caps_unlearns_only_rows_the_model_trained_on(sst2_dir):
    """τ = 0.5 of a capped forget set is half of the capped rows (before: half of all 1,425, drawn first, so 29 of
    32 unlearned rows were rows the qlora model never saw)."""
    from utils.data import load_splits, select_training_rows

    data = load_splits(data_dir=sst2_dir, splits=("train_forget",))
    qlora = {r["text"] for r in select_training_rows(data, 1.0, max_forget=64)["train_forget"]}
    spul = select_training_rows(data, 0.5, max_forget=64)["train_forget"]
    assert len(spul) == 32 and {r["text"] for r in spul} <= qlora
    smaller = select_training_rows(data, 1.0, max_forget=32)["train_forget"]
    assert {r["text"] for r in smaller} <= qlora


def test_a_stage_cannot_use_more_rows_than_its_parent_trained_on(tiny_qlora, tmp_path):
    with open(os.path.join(tiny_qlora, "arguments.json")) as f:
        cap = json.load(f)["max_forget"]
    proc = run_script("spul.py", "--model_checkpoints", tiny_qlora, "--max_forget", cap + 1,
                      "--output_path", tmp_path / "s", check=False)
    assert "--max_forget" in one_line_error(proc)


@pytest.mark.parametrize("flag,value", [("--alpha", "-1"), ("--beta", "-0.5"), ("--kl_topk", "0"),
                                        ("--warmup_ratio", "1.5"), ("--lr", "0")])
def test_out_of_range_spul_flags(flag, value, tiny_qlora, tmp_path):
    proc = run_script("spul.py", "--model_checkpoints", tiny_qlora, flag, value, "--output_path", tmp_path / "s", check=False)
    assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["--llmu_ga_weight", "--llmu_kl_weight", "--npo_retain_weight", "--npo_beta"])
def test_out_of_range_baseline_weights(flag, tiny_qlora, tmp_path):
    proc = run_script("baselines.py", "--model_checkpoints", tiny_qlora, "--unlearn_method", "llmu", flag, "-1",
                      "--output_path", tmp_path / "b", check=False)
    assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr


def test_label_words_come_from_label_text(tmp_path):
    """A data set whose label 0 is 'positive' is read that way round; an inconsistent label_text is an error."""
    from utils.cli import UserError
    from utils.data import load_splits

    splits = {s: [("good fun", 0), ("dull", 1)] for s in ("train_retain", "train_forget", "test_retain", "test_forget")}
    folder = write_split_dir(tmp_path / "inv", splits)
    for s in splits:  # write_split_dir writes label_text negative/positive for 0/1: invert it
        p = os.path.join(folder, f"{s}.csv")
        with open(p) as f:
            text = f.read().replace(",negative", ",TMP").replace(",positive", ",negative").replace(",TMP", ",positive")
        with open(p, "w") as f:
            f.write(text)
    data = load_splits(data_dir=folder)
    assert data.label_words == ("positive", "negative")
    assert load_splits(data_dir=folder, label_words=["bad", "good"]).label_words == ("bad", "good")
    with open(os.path.join(folder, "test_forget.csv"), "a") as f:
        f.write("so so,0,negative\n")
    with pytest.raises(UserError, match="label_text"):
        load_splits(data_dir=folder)


def test_text_labels_and_own_columns(tmp_path):
    from utils.data import load_splits

    for s in ("train_retain", "train_forget", "test_retain", "test_forget"):
        (tmp_path / f"{s}.csv").write_text("review,sentiment\nlovely,positive\nawful,Negative\n")
    data = load_splits(data_dir=str(tmp_path), text_column="review", label_column="sentiment")
    assert [r["label"] for r in data["train_retain"]] == [1, 0]


def test_reference_is_computed_only_for_rows_that_need_it(tiny_qlora, sst2_dir, tmp_path):
    """GA+KL needs the reference on retain rows only, NPO on forget rows only; a baseline computes all of them
    before its first step (its weights move from then on), here 16 retain rows for a run of one 8-row step."""
    for method, role_rows in (("gradient_ascent_kl", 16), ("npo", 8)):
        out = tmp_path / method
        run_script("baselines.py", "--model_checkpoints", tiny_qlora, "--data_dir", sst2_dir, "--unlearn_method", method,
                   "--max_retain", 16, "--max_forget", 8, "--max_length", 64, "--max_steps", 1, "--kl_topk", 4,
                   "--output_path", out, "--quiet")
        with open(out / "arguments.json") as f:
            assert json.load(f)["reference_cache"]["rows"] == role_rows, method


def test_requirements_name_every_imported_package():
    """A fresh environment installs requirements.txt alone: every third-party import must be named there
    (matplotlib was not, and only a machine that had it by hand passed the tests)."""
    import ast
    import re
    import subprocess
    import sys

    alias = {"sklearn": "scikit-learn", "yaml": "pyyaml"}
    via = {"huggingface-hub", "safetensors", "tokenizers", "joblib", "scipy", "packaging", "pyyaml", "pyarrow"}
    req = set()
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            m = re.match(r"\s*([A-Za-z0-9_.-]+)", line.split("#")[0])
            if m:
                req.add(m.group(1).lower().replace("_", "-"))
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    local = {"utils", "bench", "scripts", "tests", "conftest"} | {os.path.basename(f)[:-3] for f in files}
    missing = set()
    for f in files:
        for n in ast.walk(ast.parse(open(os.path.join(ROOT, f)).read())):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module] if isinstance(n, ast.ImportFrom) and n.module and n.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in local:
                    continue
                dist = alias.get(top, top).lower().replace("_", "-")
                if dist not in req and dist not in via:
                    missing.add(f"{dist} ({f})")
    assert not missing, missing


def test_ci_builds_a_new_environment_every_time():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "venv" in ci and "mktemp" in ci and "make test" in ci


def test_spul_computes_the_reference_only_for_rows_it_trains_on_and_reuses_it(tiny_qlora, sst2_dir, tmp_path):
    """SPUL's LLM never changes: a retain row's reference is computed the first time the row is seen, so a
    one-step run pays for at most its 8 rows (not all 16), and a second run on the same model reads them."""
    common = ["--model_checkpoints", tiny_qlora, "--max_retain", 16, "--max_forget", 8, "--train_batch_size", 8,
              "--ptuning_num_tokens", 2, "--kl_topk", 5, "--quiet"]  # k = 5: a store of its own in the qlora folder
    run_script("spul.py", *common, "--max_steps", 1, "--output_path", tmp_path / "a")
    first = json.loads((tmp_path / "a" / "arguments.json").read_text())["reference_cache"]
    assert 0 < first["computed"] <= 8 and first["reused"] == 0
    proc = run_script("spul.py", *common, "--max_steps", 3, "--alpha", 1.0, "--output_path", tmp_path / "b")
    second = json.loads((tmp_path / "b" / "arguments.json").read_text())["reference_cache"]
    assert second["reused"] == first["computed"] and second["path"] == first["path"]
    assert f"reference cache: {first['computed']:,} of 24 rows reused" in proc.stdout
    assert second["reused"] + second["computed"] == 16  # three steps of 8 rows saw every row


def test_the_store_key_follows_the_weights_not_the_files_written_beside_them(tmp_path):
    """An evaluation writes results.json into the qlora folder between the runs of a grid: the store file those runs
    share must keep its name; new weights (or k, or dtype) must give another."""
    from utils.reference import store_path

    folder = tmp_path / "qlora"
    folder.mkdir()
    (folder / "arguments.json").write_text("{}")
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"0" * 16)
    first = store_path(str(folder), 32, torch.float32)
    assert first.startswith(str(folder / "reference_cache")) and os.path.basename(first).startswith("top32-float32-")
    for name in ("results.json", "training_log.json", "README.md"):
        (folder / name).write_text("{}")
    (folder / "reference_cache").mkdir()
    (folder / "reference_cache" / os.path.basename(first)).write_bytes(b"")
    assert store_path(str(folder), 32, torch.float32) == first
    assert store_path(str(folder), 16, torch.float32) != first and store_path(str(folder), 32, torch.bfloat16) != first
    (folder / "adapter_model.safetensors").write_bytes(b"1" * 17)  # retrained: other weights
    assert store_path(str(folder), 32, torch.float32) != first
