"""spul.py: the paper's trainable parameter counts (config-only models on the meta device), a frozen
LLM (a hash of its weights), forgetting on a toy set while retain accuracy holds, both KL references,
overwrite protection and one-line errors."""
import contextlib
import json
import os
import random
import sys

import pytest
import torch

import spul
from conftest import one_line_error, run_script, write_split_dir
from utils.data import load_splits
from utils.evaluation import classification_metrics, predict_rows
from utils import soft_prompt
from utils.modeling import count_trainable, load_merged_model, load_tokenizer, weights_fingerprint
from utils.soft_prompt import SoftPromptLM
from utils.prompts import PromptEncoder
from utils.training import TailLM


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


MAX_LENGTH = 64


# ------------------------------------------------------------------ parameter counts (no download)

def _meta_model(cfg):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _paper_configs():
    from transformers import LlamaConfig, OPTConfig

    return {
        "opt-1.3b": (OPTConfig(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                               word_embed_proj_dim=2048, vocab_size=50272), 604_416),
        "llama-2-7b": (LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, vocab_size=32000), 1_192_192),
        "llama-2-13b": (LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                    num_attention_heads=40, vocab_size=32000), 1_486_080),
    }


@pytest.mark.parametrize("name", ["opt-1.3b", "llama-2-7b", "llama-2-13b"])
def test_trainable_parameters_match_the_paper(name):
    cfg, expected = _paper_configs()[name]
    lm = _meta_model(cfg)
    n_llm = sum(p.numel() for p in lm.parameters())
    assert n_llm > 1e9  # the real shapes, never materialised
    model = soft_prompt.build_prompt_model(lm, 30, 128)
    assert count_trainable(model) == expected
    d = cfg.hidden_size
    # the paper's encoder: p x d embeddings, then Linear d->128, ReLU, Linear 128->128, ReLU, Linear 128->d
    enc = model.peft_model.prompt_encoder["default"]
    assert tuple(enc.embedding.weight.shape) == (30, d)
    linears = [m for m in enc.mlp_head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(d, 128), (128, 128), (128, d)]
    assert [type(m).__name__ for m in enc.mlp_head] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert 30 * d + (d * 128 + 128) + (128 * 128 + 128) + (128 * d + d) == expected
    assert all(not p.requires_grad for p in lm.parameters())  # every LLM weight frozen


def test_parser_defaults_and_seed_readme_command():
    a = spul.parse_args(["--dataset=sst2", "--model_checkpoints=runs/qlora-sst2", "--ptuning_num_tokens=30",
                         "--alpha=0.5", "--beta=0.5"])
    assert (a.ptuning_num_tokens, a.ptuning_hidden_size, a.alpha, a.beta) == (30, 128, 0.5, 0.5)
    assert (a.lr, a.num_epochs, a.train_batch_size, a.weight_decay, a.lr_scheduler_type, a.warmup_ratio,
            a.max_grad_norm, a.forget_size) == (1e-4, 10, 32, 0.001, "cosine", 0.1, 0.3, 1.0)
    assert a.generic_labels is None  # the task's own, resolved once the task is known (sentiment: neutral,unknown)
    from utils.tasks import resolve_generic_labels

    a.task = "sentiment"
    assert resolve_generic_labels(a) == ["neutral", "unknown"] and a.generic_labels == "neutral,unknown"
    with pytest.raises(SystemExit) as e:
        spul.parse_args(["--help"])
    assert e.value.code == 0


# ------------------------------------------------------------------ the toy set
#
# Sentiment from a few adjectives; forget rows are the reviews that name "Alice Smith" (the SST-2
# forget set is the reviews naming chosen people). The tiny Llama here is conftest's shape with
# initializer_range 0.1: with the default 0.02 its tied 64-wide head can move a logit by ~1 at most,
# so every accuracy hangs on margins of a few hundredths and the result flips with the seed.

POS = ["great", "wonderful", "superb", "delightful", "brilliant", "charming", "moving", "excellent"]
NEG = ["awful", "terrible", "boring", "dreadful", "dull", "painful", "clumsy", "tedious"]


def toy_rows(n, seed, forget):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        a, b = rng.sample(POS if label else NEG, 2)
        rows.append((f"Alice Smith made a {a} and {b} film" if forget else f"a {a} and {b} film", label))
    return rows


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return write_split_dir(tmp_path_factory.mktemp("toy"), {
        "train_retain": toy_rows(64, 1, False), "train_forget": toy_rows(32, 2, True),
        "test_retain": toy_rows(32, 3, False), "test_forget": toy_rows(16, 4, True)})


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                      initializer_range=0.1, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    path = str(tmp_path_factory.mktemp("toy_llama"))
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def toy_qlora(tmp_path_factory, toy_model, toy_dir):
    """Stage 1 on the toy set: the tiny model learns every row (full precision, LoRA on q/v)."""
    out = tmp_path_factory.mktemp("runs") / "qlora"
    run_script("qlora.py", "--model_name", toy_model, "--data_dir", toy_dir, "--quantization", "none",
               "--max_length", MAX_LENGTH, "--train_batch_size", 16, "--num_epochs", 10, "--lr", 1e-2,
               "--warmup_ratio", 0, "--output_path", out, "--quiet")
    return str(out)


@contextlib.contextmanager
def _argv(args):
    saved = sys.argv
    sys.argv = ["spul.py", *map(str, args)]
    try:
        yield
    finally:
        sys.argv = saved


@pytest.fixture(scope="module")
def toy_spul(toy_qlora, toy_dir):
    """spul.py's main() in this process, so that the trained model itself can be inspected afterwards."""
    out = os.path.join(os.path.dirname(toy_qlora), "spul")
    seen = {}
    build = soft_prompt.build_prompt_model

    def spy(lm, num_tokens, hidden_size, shared_prefix=True):
        model = build(lm, num_tokens, hidden_size, shared_prefix)
        seen["model"] = model
        seen["llm_before"] = weights_fingerprint(lm)
        seen["prompt_before"] = {k: v.detach().clone() for k, v in model.peft_model.prompt_encoder.state_dict().items()}
        return model

    soft_prompt.build_prompt_model = spy
    try:
        with _argv(["--model_checkpoints", toy_qlora, "--data_dir", toy_dir, "--max_length", MAX_LENGTH,
                    "--train_batch_size", 16, "--num_epochs", 20, "--lr", 1e-2, "--ptuning_num_tokens", 10,
                    "--alpha", 1.0, "--beta", 0.5, "--logging_steps", 5, "--output_path", out, "--quiet"]):
            spul.main()
    finally:
        soft_prompt.build_prompt_model = build
    seen["out"] = out
    return seen


def _metrics(model, folder, data_dir):
    enc = PromptEncoder(load_tokenizer(folder), MAX_LENGTH)
    data = load_splits(data_dir=data_dir)
    return {s: classification_metrics(predict_rows(model, enc, rows, quiet=True), rows, enc)["accuracy"]
            for s, rows in data.items()}


def test_spul_forgets_the_forget_set_and_keeps_the_retain_set(toy_qlora, toy_spul, toy_dir):
    merged, _ = load_merged_model(toy_qlora)
    before = _metrics(TailLM(merged), toy_qlora, toy_dir)
    after = _metrics(toy_spul["model"], toy_qlora, toy_dir)
    # stage 1 made forgetting meaningful: the model knew the forget rows
    assert before["train_forget"] >= 0.9 and before["train_retain"] >= 0.9, before
    assert before["train_forget"] - after["train_forget"] >= 0.4, (before, after)
    assert before["train_retain"] - after["train_retain"] <= 0.1, (before, after)
    # held-out rows of the same kinds follow
    assert before["test_forget"] - after["test_forget"] >= 0.4, (before, after)
    assert before["test_retain"] - after["test_retain"] <= 0.1, (before, after)


def test_saved_prompt_adapter_reproduces_the_trained_model(toy_qlora, toy_spul, toy_dir):
    from peft import PeftModel

    out = toy_spul["out"]
    merged, _ = load_merged_model(toy_qlora)
    reloaded = SoftPromptLM(PeftModel.from_pretrained(merged, out)).eval()
    trained = toy_spul["model"].eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids, mask, keep=1), trained(ids, mask, keep=1), atol=1e-5)


def test_llm_weights_unchanged_and_prompt_trained(toy_qlora, toy_spul):
    model = toy_spul["model"]
    after = weights_fingerprint(model.lm)
    assert after == toy_spul["llm_before"]  # no LLM weight changed during training
    merged, _ = load_merged_model(toy_qlora)
    assert after == weights_fingerprint(merged)  # and it is the merged QLoRA model
    trained = model.peft_model.prompt_encoder.state_dict()
    changed = [k for k, v in toy_spul["prompt_before"].items() if not torch.equal(v, trained[k])]
    assert changed and len(changed) == len(trained)  # the prompt encoder did train
    from safetensors.torch import load_file

    saved = load_file(os.path.join(toy_spul["out"], "adapter_model.safetensors"))
    assert saved and all("prompt" in k for k in saved)  # the adapter holds the prompt, not LLM weights
    assert sum(v.numel() for v in saved.values()) < 0.1 * sum(p.numel() for p in model.lm.parameters())


def test_arguments_and_training_log(toy_qlora, toy_spul):
    out = toy_spul["out"]
    with open(os.path.join(out, "arguments.json")) as f:
        info = json.load(f)
    assert info["finished"] and info["stage"] == "spul"
    assert info["model_checkpoints"] == toy_qlora  # points back to the QLoRA folder
    assert info["trainable_parameters"] == 10 * 64 + (64 * 128 + 128) + (128 * 128 + 128) + (128 * 64 + 64)
    assert (info["n_train_forget"], info["n_train_retain"], info["n_train_rows"]) == (32, 64, 96)
    with open(os.path.join(out, "training_log.json")) as f:
        log = json.load(f)
    steps = [e for e in log if "loss" in e]
    assert len(steps) >= 10
    for e in steps:  # each loss term per logging step, and the total is their weighted sum
        assert {"forget_ce", "retain_ce", "retain_kl"} <= set(e)
        assert e["retain_kl"] >= -1e-6
    assert steps[-1]["forget_ce"] < steps[0]["forget_ce"] - 0.5


def test_refuses_to_overwrite_a_finished_run(toy_qlora, toy_spul, toy_dir):
    out = toy_spul["out"]
    stamp = os.path.getmtime(os.path.join(out, "adapter_model.safetensors"))
    proc = run_script("spul.py", "--model_checkpoints", toy_qlora, "--data_dir", toy_dir, "--max_length", MAX_LENGTH,
                      "--output_path", out, check=False)
    assert "--overwrite" in one_line_error(proc)
    assert os.path.getmtime(os.path.join(out, "adapter_model.safetensors")) == stamp


def test_both_kl_references_run(toy_qlora, toy_spul, toy_dir, tmp_path):
    """The toy run above used the compact cache (the default); here the online reference, as a user runs it."""
    with open(os.path.join(toy_spul["out"], "arguments.json")) as f:
        assert json.load(f)["kl_reference"] == "cache"
    kind = "online"
    out = tmp_path / kind
    proc = run_script("spul.py", "--model_checkpoints", toy_qlora, "--data_dir", toy_dir, "--max_length", MAX_LENGTH,
                      "--kl_reference", kind, "--max_retain", 16, "--max_forget", 8, "--train_batch_size", 8,
                      "--max_steps", 3, "--logging_steps", 1, "--ptuning_num_tokens", 4, "--lr", 1e-2,
                      "--generic_labels", "none, unknown", "--output_path", out, "--quiet")
    assert "saved the prompt adapter" in proc.stdout
    with open(out / "arguments.json") as f:
        assert json.load(f)["kl_reference"] == kind
    with open(out / "training_log.json") as f:
        kls = [e["retain_kl"] for e in json.load(f) if "retain_kl" in e]
    assert len(kls) == 3 and all(k >= -1e-6 for k in kls)
    assert kls[-1] > 0  # the prompt moved the model away from the reference


def test_missing_checkpoint_folder(tmp_path, toy_dir):
    proc = run_script("spul.py", "--model_checkpoints", tmp_path / "no-run", "--data_dir", toy_dir, check=False)
    assert "no-run" in one_line_error(proc)


def test_no_generic_labels(toy_qlora, toy_dir, tmp_path):
    proc = run_script("spul.py", "--model_checkpoints", toy_qlora, "--data_dir", toy_dir, "--generic_labels", " , ",
                      "--output_path", tmp_path / "out", check=False)
    assert "--generic_labels" in one_line_error(proc)


def test_checkpoint_folder_of_another_stage(toy_spul, toy_dir):
    proc = run_script("spul.py", "--model_checkpoints", toy_spul["out"], "--data_dir", toy_dir,
                      "--output_path", os.path.join(toy_spul["out"], "x"), check=False)
    assert "qlora.py" in one_line_error(proc)
