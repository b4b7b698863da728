"""qlora.py on tiny random models: it memorises a toy set (the loss falls, accuracy rises), saves an
adapter that reloads and merges, runs NF4 on the CPU, honours --train_on retain and the released scripts'
flags, and reports bad arguments in one line."""
import json
import os
import random

import pytest
import torch

import qlora
from conftest import one_line_error, run_script, write_split_dir
from utils.lora import default_target_modules
from utils.modeling import load_merged_model, load_model, load_tokenizer, tail_logits
from utils.prompts import PromptEncoder


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


POS = ["great", "wonderful", "superb", "delightful", "brilliant", "charming", "moving", "excellent"]
NEG = ["awful", "terrible", "boring", "dreadful", "dull", "painful", "clumsy", "tedious"]
MAX_LENGTH = 64


def toy_rows(n, seed, prefix=""):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        a, b = rng.sample(POS if label else NEG, 2)
        rows.append((f"{prefix}a {a} and {b} film", label))
    return rows


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return write_split_dir(tmp_path_factory.mktemp("toy"), {
        "train_retain": toy_rows(24, 1), "train_forget": toy_rows(8, 2, "Alice Smith made "),
        "test_retain": toy_rows(8, 3), "test_forget": toy_rows(4, 4, "Alice Smith made ")})


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, tiny_llama, toy_dir):
    """qlora.py in full precision on the toy set, long enough to memorise it."""
    out = tmp_path_factory.mktemp("qlora") / "run"
    proc = run_script("qlora.py", "--model_name", tiny_llama, "--data_dir", toy_dir, "--quantization", "none",
                      "--max_length", MAX_LENGTH, "--train_batch_size", 8, "--num_epochs", 10, "--lr", 1e-2,
                      "--warmup_ratio", 0, "--logging_steps", 2, "--output_path", out, "--quiet")
    assert "saved the LoRA adapter" in proc.stdout
    return str(out)


def _args(folder):
    with open(os.path.join(folder, "arguments.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------ a finished run

def test_run_folder_holds_adapter_tokenizer_arguments_and_log(memorised, tiny_llama, toy_dir):
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "arguments.json",
                 "training_log.json"):
        assert os.path.exists(os.path.join(memorised, name)), name
    info = _args(memorised)
    assert info["finished"] is True and info["stage"] == "qlora"
    assert info["model_name"] == tiny_llama  # later stages need only this folder
    assert info["dataset"] == os.path.basename(toy_dir)  # own data keeps its folder's name (it was called sst2)
    assert info["target_modules_used"] == ["q_proj", "v_proj"]
    assert (info["lora_rank"], info["lora_alpha"], info["lora_dropout"], info["lora_bias"]) == (16, 64, 0.1, "none")
    assert (info["n_train_retain"], info["n_train_forget"], info["n_train_rows"]) == (24, 8, 32)
    with open(os.path.join(memorised, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (16, 64, 0.1)
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_loss_falls_on_a_memorisation_set(memorised):
    with open(os.path.join(memorised, "training_log.json")) as f:
        log = json.load(f)
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) >= 5
    assert losses[-1] < losses[0] - 1.0, losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert log[-1]["step"] == 40  # 32 rows / batch 8 x 10 epochs


def test_adapter_reloads_and_merges(memorised, tiny_llama, toy_dir):
    from peft import PeftModel

    from utils.data import load_splits
    from utils.evaluation import classification_metrics, predict_rows
    from utils.training import TailLM

    merged, info = load_merged_model(memorised)
    assert info["stage"] == "qlora"
    assert not any("lora" in n for n, _ in merged.named_modules())  # folded into plain weights
    base = load_model(tiny_llama).eval()
    unmerged = PeftModel.from_pretrained(load_model(tiny_llama), memorised).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        m = tail_logits(merged.eval(), ids, mask, keep=2)
        assert torch.allclose(m, tail_logits(unmerged, ids, mask, keep=2), atol=1e-4)
        assert not torch.allclose(m, tail_logits(base, ids, mask, keep=2), atol=1e-3)  # the adapter did something
    # the merged model memorised its training rows; the random base model knows none of them
    encoder = PromptEncoder(load_tokenizer(memorised), MAX_LENGTH)
    data = load_splits(data_dir=toy_dir)
    for split in ("train_retain", "train_forget"):
        after = classification_metrics(predict_rows(TailLM(merged), encoder, data[split], quiet=True), data[split], encoder)
        before = classification_metrics(predict_rows(TailLM(base), encoder, data[split], quiet=True), data[split], encoder)
        assert after["accuracy"] >= 0.9 and before["accuracy"] <= 0.5, (split, before, after)


def test_refuses_to_overwrite_a_finished_run(memorised, tiny_llama, toy_dir):
    before = os.path.getmtime(os.path.join(memorised, "adapter_model.safetensors"))
    proc = run_script("qlora.py", "--model_name", tiny_llama, "--data_dir", toy_dir, "--quantization", "none",
                      "--max_length", MAX_LENGTH, "--output_path", memorised, check=False)
    assert "--overwrite" in one_line_error(proc)
    assert os.path.getmtime(os.path.join(memorised, "adapter_model.safetensors")) == before


def test_nf4_on_cpu_with_train_on_retain_and_the_misspelt_dropout_flag(tmp_path, tiny_opt, toy_dir):
    """On the tiny OPT, so that its default target modules are exercised by the script too."""
    out = tmp_path / "nf4"
    run_script("qlora.py", "--model_name", tiny_opt, "--data_dir", toy_dir, "--quantization", "nf4",
               "--train_on", "retain", "--lora_fropout", "0.05", "--max_length", MAX_LENGTH,
               "--train_batch_size", 8, "--max_steps", 2, "--output_path", out, "--quiet")
    info = _args(out)
    assert info["finished"] and info["quantization"] == "nf4"
    assert info["train_on"] == "retain"
    assert info["n_train_rows"] == info["n_train_retain"] == 24  # not 24 + 8: train_forget left out
    assert info["lora_dropout"] == 0.05
    assert info["target_modules_used"] == ["q_proj", "v_proj"]
    with open(out / "adapter_config.json") as f:
        assert json.load(f)["lora_dropout"] == 0.05
    merged, _ = load_merged_model(str(out))  # an NF4-trained adapter folds into the full-precision base
    assert all(p.dtype == torch.float32 for p in merged.parameters())


def test_nf4_loads_4bit_layers_on_cpu(tiny_llama):
    import bitsandbytes as bnb

    model = load_model(tiny_llama, quantization="nf4")
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(n.endswith("q_proj") for n in four_bit) and any(n.endswith("v_proj") for n in four_bit)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.isfinite(tail_logits(model, ids, torch.ones_like(ids), keep=1)).all()


# ------------------------------------------------------------------ arguments

@pytest.mark.parametrize("name", ["tiny_llama", "tiny_opt"])
def test_default_target_modules(name, request):
    assert default_target_modules(load_model(request.getfixturevalue(name))) == ["q_proj", "v_proj"]


def test_seed_readme_command_parses():
    args = qlora.parse_args(["--dataset=sst2", "--model_name=meta-llama/Llama-2-7b-hf", "--max_length=1024", "--set_pad_id",
                             "--lr=1e-4", "--train_batch_size=32", "--eval_batch_size=32", "--num_epochs=10",
                             "--weight_decay=0.001", "--lora_rank=16", "--lora_alpha=64", "--lora_fropout=0.1",
                             "--lora_bias=none"])
    assert args.lora_dropout == 0.1 and args.set_pad_id and args.num_epochs == 10
    assert qlora.parse_args(["--lora_dropout", "0.2"]).lora_dropout == 0.2


def test_paper_defaults():
    a = qlora.parse_args([])
    assert (a.lr, a.train_batch_size, a.weight_decay, a.lr_scheduler_type, a.warmup_ratio, a.max_grad_norm) == (
        1e-4, 32, 0.001, "cosine", 0.05, 0.3)
    assert (a.lora_rank, a.lora_alpha, a.lora_dropout, a.lora_bias, a.quantization, a.train_on) == (
        16, 64, 0.1, "none", "nf4", "all")
    assert a.report_to == "none"
    with pytest.raises(SystemExit) as e:
        qlora.parse_args(["--help"])
    assert e.value.code == 0


def test_unknown_dataset(tmp_path):
    proc = run_script("qlora.py", "--dataset", "imdb", "--output_path", tmp_path / "out", check=False)
    assert "imdb" in one_line_error(proc)


def test_missing_data_folder(tmp_path):
    proc = run_script("qlora.py", "--data_dir", tmp_path / "nowhere", "--output_path", tmp_path / "out", check=False)
    assert "nowhere" in one_line_error(proc)


def test_zero_epochs(tmp_path, toy_dir):
    proc = run_script("qlora.py", "--data_dir", toy_dir, "--num_epochs", 0, "--output_path", tmp_path / "out", check=False)
    assert "--num_epochs" in one_line_error(proc)


def test_target_module_the_model_lacks(tmp_path, tiny_llama, toy_dir):
    proc = run_script("qlora.py", "--model_name", tiny_llama, "--data_dir", toy_dir, "--quantization", "none",
                      "--max_length", MAX_LENGTH, "--target_modules", "q_proj, query_key_value",
                      "--output_path", tmp_path / "out", check=False)
    line = one_line_error(proc)
    assert line.endswith("no module named query_key_value (for --target_modules)"), line  # q_proj exists
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_comma_lists_ignore_spaces():
    from utils.cli import comma_list

    assert comma_list("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert comma_list(" neutral,unknown ,") == ["neutral", "unknown"]
    assert comma_list("") == []
