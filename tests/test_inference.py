"""utils.stages and inference_spul.py: every stage's folder loads as the model it saved, broken chains are
one-line errors, results.json has its schema and is repeatable, checkpoints are never written to."""
import argparse
import hashlib
import json
import os
import sys
import types

import pytest
import torch

from tests.conftest import run_script
from utils.cli import UserError
from utils.modeling import load_merged_model, load_model
from utils.stages import load_stage

SPLITS = ("train_retain", "train_forget", "test_retain", "test_forget")


def _logits(model, tokenizer, text="### Text: a fine film\n\n### Sentiment:"):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), keep=1)[:, -1]


def _write_args(folder, **info):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "arguments.json"), "w") as f:
        json.dump({"finished": True, **info}, f)
    return str(folder)


def _digest(folder):
    h = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name != "results.json":
                with open(os.path.join(root, name), "rb") as f:
                    h[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return h


@pytest.fixture(scope="module")
def tiny_spul(tmp_path_factory, tiny_qlora, sst2_dir):
    """A finished spul.py folder (one optimiser step) on the tiny qlora folder."""
    out = tmp_path_factory.mktemp("runs") / "spul"
    run_script("spul.py", "--model_checkpoints", tiny_qlora, "--data_dir", sst2_dir, "--max_retain", 16, "--max_forget", 8,
               "--max_steps", 1, "--train_batch_size", 8, "--max_length", 64, "--ptuning_num_tokens", 4,
               "--forget_size", 0.5, "--output_path", out, "--quiet")
    return str(out)


# ---------------------------------------------------------------- load_stage

def test_pretrained_and_qlora_stages(tiny_llama, tiny_qlora, tokenizer):
    model, tok, info = load_stage(tiny_llama)
    assert (info["method"], info["stage"], info["model"], info["checkpoint"]) == ("vanilla", "pretrained", tiny_llama, None)
    torch.testing.assert_close(_logits(model, tok), _logits(model, tokenizer))

    model, tok, info = load_stage(tiny_qlora)
    assert (info["method"], info["stage"], info["model"], info["checkpoint"]) == ("qlora", "qlora", tiny_llama, tiny_qlora)
    from utils.training import TailLM

    merged, _ = load_merged_model(tiny_qlora)
    torch.testing.assert_close(_logits(model, tok), _logits(TailLM(merged), tokenizer))


def test_set_pad_id_is_accepted_and_honoured(tiny_llama, tmp_path):
    """The scripts pass --set_pad_id to every stage, inference_spul.py included: pad becomes EOS."""
    import shutil

    import inference_spul
    from transformers import AutoTokenizer

    assert inference_spul.parse_args(["--model_checkpoints", tiny_llama, "--set_pad_id"]).set_pad_id
    assert not inference_spul.parse_args(["--model_checkpoints", tiny_llama]).set_pad_id
    folder = str(tmp_path / "own-pad")  # a model whose tokenizer has a pad token of its own
    shutil.copytree(tiny_llama, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = "<|endoftext|>"
    tok.save_pretrained(folder)
    assert load_stage(folder)[1].pad_token == "<|endoftext|>" != tok.eos_token
    assert load_stage(folder, set_pad_id=True)[1].pad_token == tok.eos_token


def test_spul_stage_applies_the_prompt(tiny_spul, tiny_qlora, tiny_llama, tokenizer):
    from utils.soft_prompt import SoftPromptLM

    model, tok, info = load_stage(tiny_spul)
    assert isinstance(model, SoftPromptLM)
    assert (info["method"], info["model"], info["parent"]) == ("spul", tiny_llama, tiny_qlora)
    assert info["encoder_kwargs"] == {"generic_labels": ["neutral", "unknown"]}
    qlora_model, _, _ = load_stage(tiny_qlora)
    with_prompt, without = _logits(model, tok), _logits(qlora_model, tok)
    assert not torch.allclose(with_prompt, without, atol=1e-4)
    # reference=True is the frozen merged model: the qlora stage exactly
    ids = torch.tensor([tok("### Text: x\n\n### Sentiment:")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, torch.ones_like(ids), keep=1, reference=True)[:, -1], _logits(qlora_model, tok, "### Text: x\n\n### Sentiment:"))


def test_baseline_stages(tmp_path, tiny_qlora, tiny_llama, tokenizer):
    from peft import LoraConfig, get_peft_model

    from utils.training import TailLM

    # a full unlearned model
    merged, _ = load_merged_model(tiny_qlora)
    with torch.no_grad():
        merged.model.norm.weight.mul_(1.5)
    full = tmp_path / "ga"
    merged.save_pretrained(full)
    _write_args(full, stage="baseline", unlearn_method="gradient_ascent", model_checkpoints=tiny_qlora, model_name=tiny_llama)
    model, tok, info = load_stage(str(full))
    assert (info["method"], info["model"]) == ("gradient_ascent", tiny_llama)
    torch.testing.assert_close(_logits(model, tok), _logits(TailLM(merged), tokenizer))

    # a LoRA adapter on top of the merged qlora model (random B: the adapter changes the output)
    merged, _ = load_merged_model(tiny_qlora)
    torch.manual_seed(0)
    peft = get_peft_model(merged, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora_dir = tmp_path / "npo-lora"
    peft.save_pretrained(lora_dir)
    _write_args(lora_dir, stage="baseline", unlearn_method="npo", lora=True, model_checkpoints=tiny_qlora, model_name=tiny_llama)
    model, tok, info = load_stage(str(lora_dir))
    assert info["method"] == "npo"
    torch.testing.assert_close(_logits(model, tok), _logits(TailLM(peft), tokenizer), atol=1e-5, rtol=1e-4)


def test_eco_stage_uses_utils_eco(tmp_path, tiny_qlora, tiny_llama, monkeypatch):
    from utils.training import TailLM

    calls = []

    def load_eco_model(folder, lm):  # the stage loader hands ECO the model it loaded
        calls.append((folder, type(lm).__name__))
        return TailLM(lm), {"sigma": 0.5}

    monkeypatch.setitem(sys.modules, "utils.eco", types.SimpleNamespace(load_eco_model=load_eco_model))
    folder = _write_args(tmp_path / "eco", stage="eco", model_checkpoints=tiny_qlora, model_name=tiny_llama)
    _, _, info = load_stage(folder)
    assert calls == [(folder, "LlamaForCausalLM")]
    assert (info["method"], info["model"], info["eco"]) == ("eco", tiny_llama, {"sigma": 0.5})


def test_broken_chains_are_user_errors(tmp_path, tiny_qlora, tiny_llama):
    with pytest.raises(UserError, match="does not exist"):
        load_stage(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="does not exist"):
        load_stage("runs/no-such-run-here")
    unfinished = _write_args(tmp_path / "unfinished", stage="spul", finished=False, model_checkpoints=tiny_qlora)
    with pytest.raises(UserError, match="did not finish"):
        load_stage(unfinished)
    orphan = _write_args(tmp_path / "orphan", stage="spul", model_checkpoints=str(tmp_path / "gone-qlora"))
    with pytest.raises(UserError, match="gone-qlora .*does not exist"):
        load_stage(orphan)
    # an adapter saved for another base model
    other = _write_args(tmp_path / "other-base", stage="spul", model_checkpoints=tiny_qlora, model_name=tiny_llama)
    with open(os.path.join(other, "adapter_config.json"), "w") as f:
        json.dump({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf", "peft_type": "P_TUNING"}, f)
    with pytest.raises(UserError, match="trained on 'meta-llama/Llama-2-7b-hf'"):
        load_stage(other)
    loose = tmp_path / "loose-adapter"
    loose.mkdir()
    (loose / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="no arguments.json"):
        load_stage(str(loose))


# ---------------------------------------------------------------- inference_spul.py

def test_eval_rows_use_the_forget_subset(sst2_dir):
    from inference_spul import load_eval_splits, resolve_data_settings
    from utils.data import forget_subset, load_splits, sample_rows

    blank = dict(text_column=None, label_column=None, label_words=None, data_seed=None, max_eval_rows=None,
                 max_forget=None, max_retain=None, max_length=None, seed=1)
    args = argparse.Namespace(**blank, dataset="sst2", data_dir=sst2_dir, splits=["train_forget", "test_forget"],
                              forget_size=0.5)
    resolve_data_settings(args, {}, "smollm2-135m")
    data = load_eval_splits(args)
    full = load_splits("sst2", sst2_dir, ["train_forget"])["train_forget"]
    assert len(data["train_forget"]) == int(len(full) * 0.5) == len(forget_subset(full, 0.5))
    assert data["train_forget"] == forget_subset(full, 0.5)
    assert len(data["test_forget"]) == 610  # test splits are never subset by --forget_size
    args.max_eval_rows = 20
    capped = load_eval_splits(args)
    assert all(len(r) == 20 for r in capped.values())
    assert all(r in data["train_forget"] for r in capped["train_forget"])
    assert capped == load_eval_splits(args)  # seeded

    # a stage trained on capped rows: train_forget is exactly the rows it unlearned (its cap and seed)
    args = argparse.Namespace(**blank, dataset=None, data_dir=None, splits=["train_forget"], forget_size=None)
    resolve_data_settings(args, {"dataset": "sst2", "data_dir": sst2_dir, "forget_size": 0.5, "max_forget": 16,
                                 "data_seed": 7}, "stage")
    assert load_eval_splits(args)["train_forget"] == forget_subset(sample_rows(full, 16, 7), 0.5)


def _check_schema(res):
    for key in ("method", "model", "dataset", "forget_size", "metrics", "mia_auc", "protocol", "seconds"):
        assert key in res
    for split, m in res["metrics"].items():
        assert split in SPLITS
        for k in ("accuracy", "f1", "label_accuracy", "generic_rate"):
            assert 0.0 <= m[k] <= 1.0
        assert isinstance(m["n"], int) and m["n"] > 0
        for k in ("accuracy", "label_accuracy", "generic_rate"):  # Wilson intervals hold their proportion
            assert 0.0 <= m[f"{k}_ci"][0] <= m[k] <= m[f"{k}_ci"][1] <= 1.0
        assert 0.0 <= m["f1_ci"][0] <= m["f1_ci"][1] <= 1.0
    assert res["mia_auc"] is None or 0.0 <= res["mia_auc"] <= 1.0
    if res["mia_auc"] is not None:
        assert 0.0 <= res["mia_auc_ci"][0] <= res["mia_auc_ci"][1] <= 1.0


def test_script_on_spul_folder_is_repeatable_and_leaves_the_checkpoint(tiny_spul, tiny_llama, sst2_dir):
    before = _digest(tiny_spul)
    results = []
    for _ in range(2):
        proc = run_script("inference_spul.py", "--dataset=sst2", f"--model_checkpoints={tiny_spul}",
                          "--max_eval_rows", 6, "--eval_batch_size", 4, "--quiet")
        with open(os.path.join(tiny_spul, "results.json")) as f:
            results.append(json.load(f))
    res = results[0]
    _check_schema(res)
    assert (res["method"], res["model"], res["dataset"]) == ("spul", tiny_llama, "sst2")
    # settings the stage trained with are reused: its data folder, forget size and max length
    assert (res["data_dir"], res["forget_size"], res["max_length"]) == (sst2_dir, 0.5, 64)
    # train_forget is the 4 rows unlearned (τ = 0.5 of the stage's 8 forget rows), the others 6 drawn rows
    assert list(res["metrics"]) == list(SPLITS)
    assert {s: m["n"] for s, m in res["metrics"].items()} == {**dict.fromkeys(SPLITS, 6), "train_forget": 4}
    assert "generation" not in res and res["protocol"]["generation"] is None  # off for unlearned models
    assert results[0]["metrics"] == results[1]["metrics"] and results[0]["mia_auc"] == results[1]["mia_auc"]
    assert _digest(tiny_spul) == before
    # the paper's layout in the printout
    assert "train_retain" in proc.stdout and "ACC" in proc.stdout and "MIA AUC" in proc.stdout


def test_script_on_pretrained_model_generates(tiny_llama, sst2_dir, tmp_path):
    out = tmp_path / "vanilla.json"
    run_script("inference_spul.py", f"--model_checkpoints={tiny_llama}", "--data_dir", sst2_dir,
               "--splits", "train_forget,test_forget", "--max_eval_rows", 4, "--max_length", 64,
               "--output_path", out, "--quiet")
    res = json.loads(out.read_text())
    _check_schema(res)
    assert res["method"] == "vanilla" and res["checkpoint"] is None
    assert list(res["metrics"]) == ["train_forget", "test_forget"]
    assert "greedy" in res["protocol"]["generation"]
    assert set(res["generation"]) == {"train_forget", "test_forget"}
    assert all(0 <= g["accuracy"] <= 1 and g["n"] == 4 for g in res["generation"].values())
    assert not os.path.exists(os.path.join(tiny_llama, "results.json"))  # a model folder is not written to


@pytest.mark.parametrize("case", ["missing", "unfinished", "bad_split"])
def test_script_errors_are_one_line(case, tmp_path, tiny_qlora, sst2_dir):
    if case == "missing":
        args = [f"--model_checkpoints={tmp_path / 'missing'}"]
    elif case == "unfinished":
        args = [f"--model_checkpoints={_write_args(tmp_path / 'half', stage='spul', finished=False, model_checkpoints=tiny_qlora)}"]
    else:
        args = [f"--model_checkpoints={tiny_qlora}", "--splits", "train_forgot"]
    proc = run_script("inference_spul.py", *args, "--data_dir", sst2_dir, check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_smollm2_vanilla(tmp_path, sst2_dir):
    out = tmp_path / "smol.json"
    run_script("inference_spul.py", "--model_checkpoints=smollm2-135m", "--data_dir", sst2_dir, "--splits",
               "test_retain", "--max_eval_rows", 8, "--output_path", out, "--quiet")
    res = json.loads(out.read_text())
    assert res["method"] == "vanilla" and res["model"] == "smollm2-135m" and res["metrics"]["test_retain"]["n"] == 8
    assert res["mia_auc"] is None and res["generation"]["test_retain"]["n"] == 8


def test_evaluation_uses_each_stages_generic_labels_stripped(tmp_path, tiny_qlora, tiny_llama):
    """A stage's --generic_labels reach evaluation word by word, spaces stripped (before: ' unknown' was scored,
    and baseline folders passed none, so their generic-answer rate counted the default words)."""
    from utils.modeling import load_merged_model

    merged, _ = load_merged_model(tiny_qlora)
    full = tmp_path / "rl"
    merged.save_pretrained(full)
    _write_args(full, stage="baseline", unlearn_method="random_label", model_checkpoints=tiny_qlora,
                model_name=tiny_llama, generic_labels="none, unknown ")
    assert load_stage(str(full)).info["encoder_kwargs"] == {"generic_labels": ["none", "unknown"]}
    spul = _write_args(tmp_path / "spul", stage="spul", model_checkpoints=tiny_qlora, generic_labels=" neutral,none")
    from utils.stages import _generic

    assert _generic(json.load(open(os.path.join(spul, "arguments.json")))) == ["neutral", "none"]
