"""What a new user meets in the first hour: stages that follow their parent, results that are never silently
replaced, one flag vocabulary (no abbreviations, aliases for the old spellings, booleans that read alike),
paths that stay paths."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, one_line_error, run_script, write_split_dir
from utils.cli import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

# each script with the arguments it requires
SCRIPTS = {"qlora.py": [], "spul.py": ["--model_checkpoints", "m"], "eco.py": ["--model_checkpoints", "m"],
           "baselines.py": ["--model_checkpoints", "m", "--unlearn_method", "npo"],
           "inference_spul.py": ["--model_checkpoints", "m"], "scripts/demo.py": [], "scripts/make_tables.py": ["r"]}


def _args(folder):
    with open(os.path.join(folder, "arguments.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------ stages follow their parent

def test_spul_follows_its_qlora_folder(tiny_qlora, tmp_path):
    """No --data_dir, no --max_length: the qlora folder's data folder, max_length and row caps are used, and the
    run says so (before: the hub was tried, and max_length fell back to 1024)."""
    parent = _args(tiny_qlora)
    out = tmp_path / "spul"
    proc = run_script("spul.py", "--model_checkpoints", tiny_qlora, "--max_steps", 1, "--ptuning_num_tokens", 2,
                      "--train_batch_size", 8, "--output_path", out, "--quiet")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("following "))
    assert "data_dir=" in line and "max_length=64" in line
    mine = _args(out)
    for k in ("dataset", "data_dir", "max_length", "max_retain", "max_forget", "data_seed", "label_words"):
        assert mine[k] == parent[k], k
    assert os.path.isabs(mine["data_dir"]) and os.path.isabs(mine["model_checkpoints"])


def test_a_contradicting_dataset_is_an_error_and_a_longer_max_length_a_warning(tiny_qlora, tmp_path):
    proc = run_script("spul.py", "--model_checkpoints", tiny_qlora, "--dataset", "yelp", "--output_path", tmp_path / "a",
                      check=False)
    assert "fine-tuned on --dataset sst2, not yelp" in one_line_error(proc)
    proc = run_script("spul.py", "--model_checkpoints", tiny_qlora, "--max_length", 96, "--max_steps", 1,
                      "--ptuning_num_tokens", 2, "--output_path", tmp_path / "b", "--quiet")
    assert "warning: --max_length 96 is longer than" in proc.stderr


@pytest.mark.parametrize("script", ["spul.py", "baselines.py", "eco.py", "inference_spul.py", "qlora.py"])
def test_a_missing_checkpoint_folder_is_reported_as_such(script, tmp_path):
    """Without --data_dir the data would come from the hub; the missing folder must be what the user hears of."""
    extra = ["--unlearn_method", "gradient_ascent"] if script == "baselines.py" else []
    flag = "--model_name" if script == "qlora.py" else "--model_checkpoints"
    proc = run_script(script, flag, tmp_path / "runs" / "qlora-typo", *extra, check=False)
    line = one_line_error(proc)
    assert "qlora-typo" in line and "does not exist" in line and "hub" not in line


def test_evaluation_works_from_any_directory_and_never_falls_back_to_the_hub(tiny_llama, sst2_dir, tmp_path):
    """data_dir is stored as an absolute path; when that folder is gone, evaluation says so instead of loading
    the hub dataset of the same name."""
    data = tmp_path / "data"
    shutil.copytree(sst2_dir, data)
    q = tmp_path / "q"
    subprocess.run([sys.executable, os.path.join(ROOT, "qlora.py"), "--model_name", tiny_llama, "--data_dir", "data",
                    "--quantization", "none", "--max_retain", "8", "--max_forget", "4", "--max_length", "64",
                    "--max_steps", "1", "--train_batch_size", "4", "--output_path", "q", "--quiet"],
                   cwd=tmp_path, check=True, capture_output=True)
    assert _args(q)["data_dir"] == str(data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "inference_spul.py"), "--model_checkpoints", str(q),
                           "--max_eval_rows", "2", "--quiet"], cwd=elsewhere, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shutil.rmtree(data)
    line = one_line_error(run_script("inference_spul.py", "--model_checkpoints", q, "--max_eval_rows", 2, "--overwrite",
                                     check=False))
    assert str(data) in line and "does not exist" in line


def _small_data(path, rows=3):
    """A data folder of its own: `rows` rows in every split."""
    texts = [("a fine film", 1), ("a dull film", 0), ("a fine, fine film", 1), ("dull", 0)][:rows]
    return write_split_dir(path, {s: texts for s in ("train_retain", "train_forget", "test_retain", "test_forget")})


def test_other_data_than_the_parents_is_an_error_unless_other_data(sst2_dir, tmp_path, capsys):
    """--data_dir OTHER once unlearned rows the parent never saw with only a warning, the parent's row caps applied
    to them and the data folder left out of the 'following' line."""
    import spul
    from utils.runs import inherit

    other = _small_data(tmp_path / "mydata")
    parent = {"stage": "qlora", "dataset": "sst2", "task": "sentiment", "data_dir": sst2_dir, "max_forget": 16,
              "max_retain": 48, "data_seed": 42, "max_length": 64, "label_words": "negative,positive"}
    with pytest.raises(UserError, match=r"--data_dir \S*mydata is not the data q1 was trained on .*--other_data"):
        inherit(spul.parse_args(["--model_checkpoints", "q1", "--data_dir", other]), parent, "q1")
    args = inherit(spul.parse_args(["--model_checkpoints", "q1", "--data_dir", other, "--other_data"]), parent, "q1")
    out, err = capsys.readouterr()
    assert "warning: --other_data: the rows of" in err and "are not ones q1 trained on" in err
    assert out.startswith(f"following q1: data_dir={other} (not its data: --other_data), ") and "max_length=64" in out
    # its own name, and no cap of the parent's taken as rows it trained on
    assert (args.dataset, args.max_forget, args.max_retain, args.max_length) == ("mydata", None, None, 64)
    # a parent trained on the hub's sst2: a folder named sst2 is a copy of it, a folder named otherwise is not
    hub = {k: v for k, v in parent.items() if k != "data_dir"}
    assert inherit(spul.parse_args(["--model_checkpoints", "q1", "--data_dir", sst2_dir]), hub, "q1").max_forget == 16
    with pytest.raises(UserError, match=r"not the data q1 was trained on \(the hub dataset sst2\)"):
        inherit(spul.parse_args(["--model_checkpoints", "q1", "--data_dir", other]), hub, "q1")
    capsys.readouterr()
    # the parent's own folder, given or left out: the line names it
    for given in ([], ["--data_dir", sst2_dir]):
        args = inherit(spul.parse_args(["--model_checkpoints", "q1", *given]), parent, "q1")
        assert f"following q1: data_dir={sst2_dir}" in capsys.readouterr().out and args.max_forget == 16


def test_a_run_written_when_own_data_was_called_sst2_keeps_that_name(tmp_path):
    """Resuming such a run must not fail on 'dataset: sst2 → mydata'; a new run takes the folder's name."""
    from utils.runs import recorded_dataset

    data = _small_data(tmp_path / "mydata")
    run = tmp_path / "q"
    run.mkdir()
    (run / "arguments.json").write_text(json.dumps({"dataset": "sst2", "data_dir": data,
                                                     "command": f"qlora.py --data_dir {data}"}))
    ns = lambda **kw: argparse.Namespace(**{"dataset": None, "data_dir": data, "resume": True, **kw})  # noqa: E731
    assert recorded_dataset(ns(), str(run)).dataset == "sst2"
    assert recorded_dataset(ns(resume=False), str(run)).dataset is None  # a new run: the folder's name
    assert recorded_dataset(ns(), str(tmp_path / "new")).dataset is None
    assert recorded_dataset(ns(dataset="mine"), str(run)).dataset == "mine"


# ------------------------------------------------------------------ a stage never destroys what it reads

def _files(folder):
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for here, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(here, n), "rb") as f:
                out[os.path.relpath(os.path.join(here, n), folder)] = f.read()
    return out


def test_an_output_path_in_the_chain_is_refused(tmp_path):
    """Is, contains or lies inside a folder the run reads, its parent's included (through arguments.json)."""
    from utils.runs import check_chain

    data, base, q = tmp_path / "data", tmp_path / "base", tmp_path / "runs" / "q1"
    for d in (data, base, q):
        d.mkdir(parents=True)
    (q / "arguments.json").write_text(json.dumps({"stage": "qlora", "finished": True, "model_name": str(base),
                                                  "data_dir": str(data)}))
    args = argparse.Namespace(model_checkpoints=str(q), data_dir=None)
    for out, relation in ((q, "is"), (tmp_path / "runs", "contains"), (q / "spul", "lies inside"), (base, "is"),
                          (data / "x", "lies inside"), (tmp_path, "contains")):
        with pytest.raises(UserError, match=f"--output_path {re.escape(str(out))} {relation} "):
            check_chain(str(out), args)
    check_chain(str(tmp_path / "runs" / "spul"), args)  # beside its parent: fine


@pytest.mark.parametrize("script,output", [("spul.py", "q1"), ("baselines.py", "runs")])
def test_overwrite_never_deletes_the_folder_a_stage_starts_from(tiny_qlora, tmp_path, script, output):
    """--output_path runs/q1 --overwrite emptied the qlora folder the stage was about to load."""
    q = tmp_path / "runs" / "q1"
    shutil.copytree(tiny_qlora, q)
    before = _files(tmp_path)
    out = q if output == "q1" else tmp_path / "runs"
    extra = ["--unlearn_method", "gradient_ascent"] if script == "baselines.py" else []
    line = one_line_error(run_script(script, "--model_checkpoints", q, *extra, "--output_path", out, "--overwrite",
                                     check=False))
    assert f"--output_path {out} " in line and "a run never writes where it reads" in line
    assert _files(tmp_path) == before


# ------------------------------------------------------------------ refused early, nothing left behind

def test_a_range_error_is_refused_before_any_model_loads(tiny_qlora, tmp_path):
    out = tmp_path / "eco"
    line = one_line_error(run_script("eco.py", "--model_checkpoints", tiny_qlora, "--target_fpr", 5, "--output_path",
                                     out, check=False))
    assert "--target_fpr: must be in (0, 1), got 5" in line and not out.exists()


def test_a_refused_run_leaves_no_folder(tiny_qlora, tmp_path):
    """A label-word collision is found once the tokenizer is loaded, after the run folder was made: it goes again."""
    out = tmp_path / "s"
    line = one_line_error(run_script("spul.py", "--model_checkpoints", tiny_qlora, "--generic_labels", "positive",
                                     "--output_path", out, "--quiet", check=False))
    assert "is also a label word" in line and not out.exists()


def test_evaluation_says_how_many_rows_it_scores(tiny_llama, tmp_path):
    from utils.evaluation import rows_to_score

    data = _small_data(tmp_path / "small")
    proc = run_script("inference_spul.py", "--model_checkpoints", tiny_llama, "--data_dir", data, "--max_retain", 2,
                      "--generate", "false", "--output_path", tmp_path / "r.json", "--quiet")
    assert ("scoring 11 rows: train_retain 2, train_forget 3, test_retain 3, test_forget 3; the training caps "
            "(--max_retain, --max_forget) do not apply to the test splits: --max_eval_rows N caps every split") in proc.stdout
    assert rows_to_score({"test_retain": 4}, 4) == "scoring 4 rows: test_retain 4 (--max_eval_rows 4)"


# ------------------------------------------------------------------ advice that fits the mistake

def test_multiple_choice_rows_without_task_mcqa_are_told_to_pass_it(tmp_path):
    import pandas as pd

    qa = tmp_path / "qa"
    qa.mkdir()
    rows = pd.DataFrame({"question": ["Which is red?", "Which is blue?"], "choices": [["sky", "rose"], ["sky", "rose"]],
                         "answer": [1, 0]})
    for s in ("train_retain", "train_forget", "test_retain", "test_forget"):
        rows.to_json(qa / f"{s}.jsonl", orient="records", lines=True)
    line = one_line_error(run_script("qlora.py", "--data_dir", qa, "--output_path", tmp_path / "q", check=False))
    assert "no 'text' column" in line and "multiple-choice rows (question, choices, answer): pass --task mcqa" in line


def test_an_intermediate_checkpoint_is_not_a_stage(tmp_path):
    """checkpoint-N inside a run folder fell back to the hub dataset, then to a cut-off tokenizer message."""
    run = tmp_path / "spul"
    ckpt = run / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (run / "arguments.json").write_text(json.dumps({"stage": "spul", "finished": False}))
    (ckpt / "trainable.safetensors").write_bytes(b"")
    for script in ("inference_spul.py", "eco.py"):
        line = one_line_error(run_script(script, "--model_checkpoints", ckpt, check=False))
        assert f"{ckpt} is an intermediate checkpoint of a run, not a stage: finish the run in {run} first" in line
        assert "--resume" in line


# ------------------------------------------------------------------ results are never silently replaced

def test_results_of_other_settings_are_kept_unless_overwrite(tiny_qlora, tmp_path):
    out = tmp_path / "r.json"
    base = ["--model_checkpoints", tiny_qlora, "--output_path", out, "--splits", "test_retain", "--quiet"]
    run_script("inference_spul.py", *base, "--max_eval_rows", 6)
    assert json.loads(out.read_text())["metrics"]["test_retain"]["n"] == 6
    line = one_line_error(run_script("inference_spul.py", *base, "--max_eval_rows", 4, check=False))
    assert "max_eval_rows: 6 → 4" in line and "--overwrite" in line
    assert json.loads(out.read_text())["metrics"]["test_retain"]["n"] == 6
    # the typo of the report: an abbreviated flag is refused, not taken for --max_eval_rows
    proc = run_script("inference_spul.py", *base, "--max_eval_row", 4, check=False)
    assert proc.returncode == 2 and "--max_eval_row" in proc.stderr
    kept = run_script("inference_spul.py", *base, "--max_eval_rows", 6, "--resume")
    assert "kept" in kept.stdout
    run_script("inference_spul.py", *base, "--max_eval_rows", 4, "--overwrite")
    assert json.loads(out.read_text())["metrics"]["test_retain"]["n"] == 4


# ------------------------------------------------------------------ one vocabulary

@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_abbreviated_flags_are_refused_and_help_shows_defaults(script):
    path = os.path.join(ROOT, script)
    proc = subprocess.run([sys.executable, path, *SCRIPTS[script], "--output_pat", "x"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2 and "unrecognized arguments: --output_pat" in proc.stderr, proc.stderr[-500:]
    helptext = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    assert "--output_path" in helptext and "(default:" in helptext
    # every flag says its default, a flag without help text too
    blocks = _flag_blocks(helptext)
    silent = [flag for flag, text in blocks.items() if flag != "-h" and "default" not in text]
    assert blocks and not silent, silent
    # a stage's data flags left out are its parent's, not "none"
    if script in ("spul.py", "eco.py", "baselines.py", "inference_spul.py"):
        for flag in ("--text_column", "--label_column", "--data_seed", "--max_length", "--data_dir"):
            assert "(default: the parent stage's" in blocks[flag], (flag, blocks[flag])
    # boolean flags read alike: [BOOL], never [NAME]
    import re

    assert {m for text in blocks.values() for m in re.findall(r"^-\S+ \[([A-Z_]+)\]", text)} <= {"BOOL"}


def _flag_blocks(helptext):
    """{first flag name: its usage and help text, whitespace collapsed} from an argparse --help."""
    import re

    blocks, flag = {}, None
    for line in helptext.split("options:", 1)[-1].splitlines():
        m = re.match(r"  (-{1,2}\w+)", line)
        if m:
            flag = m.group(1)
            blocks[flag] = line
        elif flag and line.startswith("    "):
            blocks[flag] += line
        else:
            flag = None
    return {f: " ".join(t.split()) for f, t in blocks.items()}


def test_canonical_names_and_old_spellings():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import eco
    import make_tables
    import qlora

    assert qlora.parse_args(["--lora_fropout", "0.2"]).lora_dropout == 0.2
    assert eco.parse_args(["--model_checkpoints", "m", "--batch_size", "4"]).eval_batch_size == 4
    assert make_tables.parse_args(["r", "--out", "t"]).output_path == "t"
    helptext = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--help"], capture_output=True,
                              text=True).stdout
    assert "--model_name MODEL_NAME, --model MODEL_NAME" in helptext
    assert "--output_path OUTPUT_PATH, --out OUTPUT_PATH" in helptext


@pytest.mark.parametrize("script", ["qlora.py", "spul.py", "baselines.py"])
def test_training_scripts_take_no_evaluation_flags(script):
    """--max_eval_rows belongs to evaluation: a training script that accepted and ignored it misled users."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--model_checkpoints", "m", "--unlearn_method",
                           "npo", "--max_eval_rows", "4"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "--max_eval_rows" in proc.stderr


def test_boolean_flags_read_alike():
    import baselines
    import spul

    for value, expected in (([], True), (["true"], True), (["false"], False), (["no"], False)):
        a = spul.parse_args(["--model_checkpoints", "m", "--set_pad_id", *value, "--quiet", *value])
        assert a.set_pad_id is expected and a.quiet is expected
    assert baselines.parse_args(["--model_checkpoints", "m", "--unlearn_method", "npo", "--lora", "false"]).lora is False
    assert spul.parse_args(["--model_checkpoints", "m"]).set_pad_id is False


def test_default_run_folders_name_dataset_and_model():
    import argparse

    from utils.runs import default_output

    a = default_output("spul", argparse.Namespace(dataset="sst2"), "meta-llama/Llama-2-7b-hf", "p30")
    b = default_output("spul", argparse.Namespace(dataset="yelp"), "meta-llama/Llama-2-7b-hf", "p30")
    assert a == os.path.join("runs", "spul-sst2-Llama-2-7b-hf-p30") and a != b


def test_a_run_folder_says_what_it_holds(tiny_qlora):
    """PEFT's empty model card is replaced by a README naming the next command."""
    with open(os.path.join(tiny_qlora, "README.md")) as f:
        text = f.read()
    assert "LoRA adapter" in text and "inference_spul.py --model_checkpoints=" in text


def test_usage_examples_read_as_written():
    """A usage example continued with a backslash reads as two lines in --help, not one line with a run of spaces
    (a backslash-newline in a plain docstring joins the lines)."""
    import ast
    import glob
    import re

    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "scripts", "*.py"))):
        doc = ast.get_docstring(ast.parse(open(path).read()), clean=False) or ""
        for line in doc.splitlines():
            command = line.strip().split("  #")[0].rstrip()  # an aligned comment may follow
            if command.startswith(("python ", "accelerate ", "torchrun ")):
                assert not re.search(r"\S {2,}\S", command), (path, line)
