"""baselines.py on a tiny random Llama taught a toy sentiment task: every method lowers forget
accuracy, the retain-aware methods keep retain accuracy better than plain gradient ascent, and the
run folder, reference modes, errors and NaN handling behave as documented."""
import json
import os
import random

import pytest

from tests.conftest import one_line_error, run_script, write_split_dir

POS = ["great", "wonderful", "superb", "lovely", "brilliant", "charming"]
NEG = ["awful", "boring", "terrible", "dreadful", "dull", "clumsy"]


def toy_rows(n, forget, seed):
    """Forget rows are about 'Nolan' (the paper's forget sets are reviews naming chosen people)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        who = "Nolan" if forget else rng.choice(["the cast", "the script", "this film", "the plot"])
        rows.append((f"{who} was {rng.choice(POS if label else NEG)}", label))
    return rows


def teach_toy_task(base_dir, data_dir, epochs=10, lr=3e-3):
    """Full fine-tuning of the tiny model on train_forget ∪ train_retain until it is accurate.

    LoRA on the q/v projections of a random 64-wide model cannot learn the task in a test's time, so
    the base model learns it here and qlora.py then writes the stage folder later stages start from."""
    import torch
    from transformers import AutoModelForCausalLM

    from utils import losses
    from utils.data import load_splits
    from utils.modeling import load_tokenizer
    from utils.prompts import LeftPadCollator, PromptEncoder
    from utils.training import TailLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(base_dir)
    tok = load_tokenizer(base_dir)
    data = load_splits("sst2", data_dir, ("train_forget", "train_retain"))
    rows = PromptEncoder(tok, 64).encode_rows(data["train_forget"] + data["train_retain"])
    collate, model = LeftPadCollator(tok.pad_token_id), TailLM(lm)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(rows)).tolist()
        for s in range(0, len(rows), 16):
            b = collate([rows[i] for i in perm[s:s + 16]])
            logits = model(b["input_ids"], b["attention_mask"], keep=b["tail_labels"].shape[1] + 1)[:, :-1]
            loss = losses.cross_entropy_loss(logits, b["tail_labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    lm.save_pretrained(base_dir)


SETTINGS = ["--max_length", 64, "--num_epochs", 3, "--train_batch_size", 16, "--warmup_ratio", 0, "--logging_steps", 1, "--quiet"]
# The paper searched the baselines' learning rate; on the toy set the generic-label target needs a larger one.
LR = {"random_label": "1e-2"}
# Half the methods use the online reference (a frozen copy of the model), half the compact cache.
REFERENCE = {"gradient_ascent_kl": "online", "npo": "online"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_llama):
    import shutil

    root = tmp_path_factory.mktemp("baselines")
    data = write_split_dir(root / "data", {"train_forget": toy_rows(16, True, 1), "train_retain": toy_rows(32, False, 2),
                                           "test_forget": toy_rows(8, True, 3), "test_retain": toy_rows(16, False, 4)})
    base = str(root / "base")
    shutil.copytree(tiny_llama, base)
    teach_toy_task(base, data)
    qlora = str(root / "qlora")
    run_script("qlora.py", "--model_name", base, "--data_dir", data, "--quantization", "none", "--max_length", 64,
               "--max_steps", 1, "--lr", "1e-6", "--output_path", qlora, "--quiet")
    return {"root": root, "data": data, "qlora": qlora}


def accuracies(model, folder, data_dir):
    from utils.data import load_splits
    from utils.evaluation import classification_metrics, predict_rows
    from utils.modeling import load_tokenizer
    from utils.prompts import PromptEncoder

    encoder = PromptEncoder(load_tokenizer(folder), 64)
    data = load_splits("sst2", data_dir, ("train_forget", "train_retain"))
    return {s: classification_metrics(predict_rows(model, encoder, rows, quiet=True), rows, encoder)["accuracy"]
            for s, rows in data.items()}


def run_baseline(toy, method, *extra, out=None):
    import baselines

    out = out or str(toy["root"] / method)
    baselines.main(["--model_checkpoints", toy["qlora"], "--data_dir", toy["data"], "--unlearn_method", method,
                    "--output_path", out, "--lr", LR.get(method, "3e-3"), "--kl_reference", REFERENCE.get(method, "cache"),
                    *map(str, SETTINGS), *map(str, extra)])
    return out


@pytest.fixture(scope="module")
def unlearned(toy):
    """unlearned(method) -> (output folder, accuracies), each method run once per module."""
    from utils.stages import load_stage

    done = {}

    def get(method):
        if method not in done:
            out = run_baseline(toy, method)
            done[method] = (out, accuracies(load_stage(out).model, out, toy["data"]))
        return done[method]
    return get


def read_json(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def first_logged(folder, term):
    return next(e[term] for e in read_json(folder, "training_log.json") if term in e)


def test_toy_model_starts_accurate(toy):
    from utils.modeling import load_merged_model
    from utils.training import TailLM

    lm, _ = load_merged_model(toy["qlora"])
    assert accuracies(TailLM(lm), toy["qlora"], toy["data"]) == {"train_forget": 1.0, "train_retain": 1.0}


@pytest.mark.parametrize("method", ["gradient_ascent", "random_label", "gradient_ascent_kl", "gradient_ascent_descent",
                                    "llmu", "npo", "npo_rt"])
def test_each_method_lowers_forget_accuracy(unlearned, method):
    _, acc = unlearned(method)
    assert acc["train_forget"] <= 0.5, acc  # from 1.0


def test_retain_aware_methods_keep_retain_accuracy_better_than_ga(unlearned):
    ga = unlearned("gradient_ascent")[1]["train_retain"]
    assert unlearned("gradient_ascent_descent")[1]["train_retain"] > ga + 0.25
    assert unlearned("npo_rt")[1]["train_retain"] > ga + 0.25


def test_run_folder_holds_the_full_model_and_its_record(toy, unlearned):
    out, _ = unlearned("gradient_ascent_descent")
    args = read_json(out, "arguments.json")
    qlora_args = read_json(toy["qlora"], "arguments.json")
    assert (args["stage"], args["unlearn_method"], args["lora"], args["finished"]) == ("baseline", "gradient_ascent_descent", False, True)
    assert args["model_checkpoints"] == toy["qlora"] and args["model_name"] == qlora_args["model_name"]
    assert args["n_train_rows"] == 48 and args["trainable_parameters"] > 3_000_000  # every LLM weight
    assert os.path.exists(os.path.join(out, "model.safetensors")) and os.path.exists(os.path.join(out, "tokenizer.json"))
    log = read_json(out, "training_log.json")
    assert any("forget_ga" in e and "retain_ce" in e for e in log)


@pytest.mark.parametrize("method", ["npo", "npo_rt"])  # online frozen copy, and the cache
def test_npo_reference_is_the_original_model(unlearned, method):
    # At the first step the model still equals its reference: log σ(0) = -log 2, so the term is (2/β)·log 2.
    import math

    out, _ = unlearned(method)
    assert first_logged(out, "forget_npo") == pytest.approx(2 / 0.1 * math.log(2), abs=1e-3)


@pytest.mark.parametrize("method", ["gradient_ascent_kl", "llmu"])  # online frozen copy, and the cache
def test_kl_reference_is_the_original_model(unlearned, method):
    out, _ = unlearned(method)
    assert abs(first_logged(out, "retain_kl")) < 1e-4
    assert max(e.get("retain_kl", 0) for e in read_json(out, "training_log.json")) > 1e-3  # and it grows as the model moves


@pytest.mark.parametrize("method,term", [("gradient_ascent_kl", "retain_kl"), ("npo", "forget_npo")])
def test_cached_reference_is_computed_in_the_precision_of_training(toy, method, term):
    """Under bf16 autocast (the default on a GPU that has it) the cached reference is computed in the autocast the
    training forward runs in: at step 0 the KL is 0 and the NPO ratio 1 (the term (2/β)·log 2), as with the
    online reference. Computed in fp32, the reference differed from the bf16 forward by its rounding."""
    import math

    at_start = {"retain_kl": 0.0, "forget_npo": 2 / 0.1 * math.log(2)}[term]
    # An fp32 reference against the bf16 forward gave a KL of 2.4e-5 and an NPO term 7.4e-4 off (one bf16 rounding
    # of the logits, first order in NPO's log-ratio, second in the KL); computed in the same autocast, the cached
    # values equal the online reference's to the log's 6 decimals. A tenth of the rounding's effect is allowed.
    tol = {"retain_kl": 2e-6, "forget_npo": 7e-5}[term]
    first = {}
    for reference in ("cache", "online"):
        out = run_baseline(toy, method, "--precision", "bf16", "--max_steps", 1, "--kl_reference", reference,
                           out=str(toy["root"] / f"bf16-{method}-{reference}"))
        first[reference] = first_logged(out, term)
    assert first["cache"] == pytest.approx(at_start, abs=tol), first
    assert first["cache"] == pytest.approx(first["online"], abs=tol), first


def test_lora_trains_an_adapter_whose_reference_is_the_adapter_switched_off(toy):
    import math

    import torch
    from safetensors.torch import load_file

    from utils.modeling import load_merged_model
    from utils.stages import load_stage
    from utils.training import TailLM

    out = run_baseline(toy, "npo", "--lora", "--lr", "1e-2", out=str(toy["root"] / "npo-lora"))
    args = read_json(out, "arguments.json")
    assert args["lora"] is True and args["finished"] and args["trainable_parameters"] < 100_000
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at zero: it was trained
    assert first_logged(out, "forget_npo") == pytest.approx(2 / 0.1 * math.log(2), abs=1e-3)
    model = load_stage(out).model  # the merged qlora model with this adapter applied
    merged = TailLM(load_merged_model(toy["qlora"])[0])
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert not torch.allclose(model(ids, mask), merged(ids, mask))


def test_overwrite_protection(toy, unlearned):
    from utils.cli import UserError

    out, _ = unlearned("gradient_ascent")
    before = os.path.getmtime(os.path.join(out, "model.safetensors"))
    with pytest.raises(UserError, match="finished run"):
        run_baseline(toy, "gradient_ascent", out=out)
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == before


def test_bad_arguments_give_one_line_errors(toy):
    import baselines
    from utils.cli import UserError

    proc = run_script("baselines.py", "--model_checkpoints", toy["qlora"], "--unlearn_method", "gradient_descent", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown --unlearn_method 'gradient_descent': choose one of " + ", ".join(baselines.BASELINES)]
    with pytest.raises(UserError, match="does not exist"):
        baselines.main(["--model_checkpoints", str(toy["root"] / "nowhere"), "--unlearn_method", "npo"])
    proc = run_script("baselines.py", "--model_checkpoints", toy["qlora"], "--unlearn_method", "npo", "--npo_beta", "0",
                      check=False)
    assert "--npo_beta" in one_line_error(proc)
    with pytest.raises(UserError, match="optim"):
        run_baseline(toy, "gradient_ascent", "--optim", "no_such_optimiser", out=str(toy["root"] / "bad-optim"))


def test_non_finite_loss_stops_the_run_and_keeps_the_log(toy):
    out = str(toy["root"] / "nan")
    proc = run_script("baselines.py", "--model_checkpoints", toy["qlora"], "--data_dir", toy["data"], "--unlearn_method",
                      "gradient_ascent", "--output_path", out, "--lr", "1e30", *SETTINGS, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the loss became") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert read_json(out, "arguments.json")["finished"] is False
    assert len(read_json(out, "training_log.json")) >= 1  # the steps before the NaN
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


@pytest.mark.e2e
def test_smollm2_gradient_ascent_descent_smoke(tmp_path, smol_path, sst2_dir):
    caps = ["--data_dir", sst2_dir, "--max_retain", 4, "--max_forget", 4, "--max_length", 96, "--train_batch_size", 8,
            "--max_steps", 1, "--quiet"]
    run_script("qlora.py", "--model_name", "smollm2-135m", "--output_path", tmp_path / "qlora", *caps)
    proc = run_script("baselines.py", "--model_checkpoints", tmp_path / "qlora", "--unlearn_method", "gradient_ascent_descent",
                      "--output_path", tmp_path / "ga_gd", *caps)
    assert "saved the unlearned model" in proc.stdout
    args = read_json(tmp_path / "ga_gd", "arguments.json")
    assert args["finished"] and args["trainable_parameters"] > 100_000_000
    assert any("forget_ga" in e for e in read_json(tmp_path / "ga_gd", "training_log.json"))
