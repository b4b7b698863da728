"""The robustness audit (audit.py, utils/attacks.py, utils/quantize.py): quantizing a loaded stage gives what
transformers' own bitsandbytes load gives, recovery is the ratio computed by hand, relearning and the probe never
touch the rows they score, and audit.py runs every attack on a baseline, a SPUL and an ECO folder and keeps its
audit.json unless told to overwrite it."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, one_line_error, run_here, run_script
from utils.cli import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- quantization

@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantizing_a_loaded_model_equals_transformers_bitsandbytes_load(tiny_llama, kind):
    """Every stage is quantized after it is loaded (merged adapters, prompts, gates): the weights and logits are
    those of a reload through from_pretrained with the same bitsandbytes settings, bit for bit."""
    from transformers import BitsAndBytesConfig

    from utils.modeling import load_model
    from utils.quantize import quantize_
    from utils.training import TailLM

    cfg = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
           if kind == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    ref = load_model(tiny_llama, quantization_config=cfg).eval()
    plain = load_model(tiny_llama).eval()
    model = TailLM(load_model(tiny_llama).eval())
    assert quantize_(model, kind) == 2 * 7  # q, k, v, o, gate, up, down per layer; the output head stays
    assert type(model.lm.lm_head) is torch.nn.Linear
    ids = torch.randint(3, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got, want, before = model(ids, mask, keep=9), ref(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.equal(got, want)
    assert not torch.equal(got, before)  # it did quantize


def test_quantizing_a_soft_prompt_model_leaves_the_prompt(tiny_llama):
    from utils.modeling import load_model
    from utils.quantize import quantize_
    from utils.soft_prompt import build_prompt_model

    model = build_prompt_model(load_model(tiny_llama), 4, 16)
    encoder = [type(m) for m in model.peft_model.prompt_encoder.modules()]
    quantize_(model, "nf4")
    assert [type(m) for m in model.peft_model.prompt_encoder.modules()] == encoder
    assert type(model.lm.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_a_model_without_linear_layers_cannot_be_quantized(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from utils.quantize import quantize_
    from utils.training import TailLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer)))
    with pytest.raises(UserError, match="no linear layers"):
        quantize_(TailLM(gpt2), "int8")
    with pytest.raises(UserError, match="unknown quantization"):
        quantize_(TailLM(gpt2), "int4")


# ---------------------------------------------------------------- recovery and halves

def test_recovery_by_hand():
    from utils.attacks import recoveries, recovery

    # fine-tuned 0.9, unlearned 0.3: an attack back at 0.6 recovers half, at 0.9 all, at 0.2 less than nothing
    assert recovery(0.6, 0.3, 0.9) == pytest.approx(0.5)
    assert recovery(0.9, 0.3, 0.9) == pytest.approx(1.0)
    assert recovery(0.2, 0.3, 0.9) == pytest.approx(-1 / 6)
    assert recovery(0.8, 0.88, 0.9) is None  # forgot 2 points: nothing to recover
    assert recovery(None, 0.3, 0.9) is None
    table = {"metric": "label_accuracy",
             "splits": {"train_forget": {"label_accuracy": 0.75, "accuracy": 0.1},
                        "test_forget": {"label_accuracy": 0.5}, "test_retain": {"label_accuracy": 0.9}},
             "unlearned": {"train_forget": {"label_accuracy": 0.5}, "test_forget": {"label_accuracy": 0.4}}}
    finetuned = {"splits": {"train_forget": {"label_accuracy": 1.0}, "test_forget": {"label_accuracy": 0.8}}}
    got = recoveries(table, finetuned)
    assert got == {"train_forget": pytest.approx(0.5), "test_forget": pytest.approx(0.25)}


def test_halves_are_disjoint_seeded_and_the_budget_is_checked():
    from utils.attacks import Audit, halves, relearn_rows

    a, b = halves(11, 3)
    assert len(a) == 5 and len(b) == 6 and not set(a) & set(b) and set(a) | set(b) == set(range(11))
    assert halves(11, 3) == (a, b) and halves(11, 4) != (a, b)
    audit = Audit(None, None, {"train_forget": list(range(11))}, None, seed=3, settings={"relearn_rows": 4})
    assert relearn_rows(audit) == (a[:4], b)
    audit.settings["relearn_rows"] = 6
    with pytest.raises(UserError, match="more than the half"):
        relearn_rows(audit)


# ---------------------------------------------------------------- attacks on a loaded stage

@pytest.fixture(scope="module")
def audit(tiny_qlora, sst2_dir):
    """The attacks' view of the tiny qlora folder: 16 train_forget rows, 24 train_retain rows, 8 of each test split."""
    from utils.attacks import Audit
    from utils.data import load_splits, sample_rows
    from utils.prompts import PromptEncoder
    from utils.stages import load_stage

    data = load_splits(data_dir=sst2_dir)
    data = data.derive({s: sample_rows(r, {"train_forget": 16, "train_retain": 24}.get(s, 8), 0) for s, r in data.items()})

    def fresh():
        model, tok, _ = load_stage(tiny_qlora)
        return model, PromptEncoder(tok, 64)

    model, encoder = fresh()
    return Audit(model, encoder, data, fresh, batch_size=8, seed=1,
                 settings={"relearn_epochs": 2, "relearn_lr": 1e-2, "relearn_rank": 2, "relearn_batch_size": 4})


def test_relearning_trains_on_one_half_and_scores_the_other(audit, monkeypatch):
    from utils import attacks
    from utils.modeling import weights_fingerprint

    trained_on, real = [], attacks.answer_loss
    monkeypatch.setattr(attacks, "answer_loss", lambda m, e, rows, d: (trained_on.extend(r["text"] for r in rows),
                                                                          real(m, e, rows, d))[1])
    before = weights_fingerprint(audit.model)
    res = attacks.relearn(audit)
    first, second = attacks.halves(16, 1)
    forget = audit.data["train_forget"]
    assert sorted(trained_on) == sorted(forget[i]["text"] for i in first for _ in range(2))  # each row once an epoch
    assert res["splits"]["train_forget"]["n"] == res["scored_rows"] == len(second) == 8
    assert res["steps"] == 4 and all(np.isfinite(res["losses"]))
    # the unlearned figure is the plain model's on the scored half; the audited model itself is untouched
    plain = attacks.classification_metrics(attacks.subset(audit.plain_scores("train_forget"), second),
                                           [forget[i] for i in second], audit.encoder)
    assert res["unlearned"]["train_forget"] == plain
    assert weights_fingerprint(audit.model) == before
    assert res["losses"][-1] < res["losses"][0]  # it did learn


def test_the_probe_never_sees_the_rows_it_scores(audit, monkeypatch):
    from utils import attacks

    calls, real = [], attacks.answer_states
    monkeypatch.setattr(attacks, "answer_states", lambda m, e, rows, d, q: (calls.append([r["text"] for r in rows]),
                                                                            real(m, e, rows, d, q))[1])
    res = attacks.probe(audit)
    fit, scored = calls[0], [t for c in calls[1:] for t in c]
    assert len(fit) == 16 and not set(fit) & set(scored)
    assert set(res["splits"]) == {"train_forget", "test_forget", "train_retain"}
    assert [res["splits"][s]["n"] for s in ("train_forget", "test_forget", "train_retain")] == [8, 8, 8]


def test_answer_states_are_the_output_heads_input(audit):
    """The probe reads the hidden state the answer's logits come from: the head applied to it gives the logits."""
    from utils.attacks import answer_states

    rows = audit.data["test_retain"][:3]
    states = torch.from_numpy(answer_states(audit.model, audit.encoder, rows, "cpu"))
    head = audit.model.lm.get_output_embeddings()
    logits = audit.score(rows)
    with torch.no_grad():
        want = head(states).argmax(-1)
    assert torch.equal(want, logits["pred"])


# ---------------------------------------------------------------- audit.py end to end

@pytest.fixture(scope="module")
def stage_folders(tmp_path_factory, tiny_qlora, sst2_dir):
    """Beside a copy of the tiny qlora folder: a retrained model, a GA baseline, SPUL and ECO, one step each."""
    import shutil

    import baselines
    import eco
    import qlora
    import spul

    root = tmp_path_factory.mktemp("audit_runs")
    ft = root / "qlora"
    shutil.copytree(tiny_qlora, ft)
    common = ["--data_dir", sst2_dir, "--max_length", 64, "--quiet"]
    run_here(qlora, "--model_name", json.load(open(ft / "arguments.json"))["model_name"], "--train_on", "retain",
             "--max_retain", 48, "--max_forget", 16, "--max_steps", 1, "--train_batch_size", 8, "--quantization", "none",
             "--output_path", root / "retrained", *common)
    step = ["--model_checkpoints", ft, "--max_steps", 1, "--train_batch_size", 8, *common]
    run_here(baselines, *step, "--unlearn_method", "gradient_ascent", "--output_path", root / "ga")
    run_here(spul, *step, "--ptuning_num_tokens", 4, "--output_path", root / "spul")
    run_here(eco, "--model_checkpoints", ft, "--search_rows", 8, "--search_rounds", 2, "--eco_dims", 16, *common,
             "--output_path", root / "eco")
    return root


ALL = ["--max_eval_rows", 8, "--relearn_epochs", 1, "--relearn_batch_size", 4, "--templates", "plain,brackets", "--quiet"]


@pytest.mark.xdist_group("audit_runs")  # one worker builds the stage folders
def test_every_attack_on_a_baseline_spul_and_eco_folder(stage_folders, capsys):
    import audit

    for name in ("ga", "spul", "eco"):
        run_here(audit, "--model_checkpoints", stage_folders / name, *ALL)
        res = json.load(open(stage_folders / name / "audit.json"))
        assert set(res["attacks"]) == {"templates", "instruction", "nf4", "int8", "relearn", "probe", "mia"}
        assert res["references"] == {"finetuned": str(stage_folders / "qlora"), "retrained": str(stage_folders / "retrained")}
        for attack, r in res["attacks"].items():
            if attack == "mia":
                assert set(r["aucs"]) == {"loss", "zlib", "min_k", "min_k_plus_plus"} and set(r["privleak"]) == set(r["aucs"])
                continue
            assert set(r["splits"]) <= set(r["unlearned"]) and set(res["recovery"][attack]) <= {"train_forget", "test_forget"}
            for m in r["splits"].values():
                assert 0 <= m[r["metric"]] <= 1 and m["n"] > 0
        assert res["attacks"]["templates"]["templates"] == ["plain", "brackets"]
        assert res["attacks"]["templates"]["splits"]["test_retain"]["n"] == 2 * 8
    # the references were audited once, in their own folders, and read by every later audit
    assert json.load(open(stage_folders / "qlora" / "audit.json"))["method"] == "qlora"
    assert json.load(open(stage_folders / "retrained" / "audit.json"))["method"] == "retrained"
    out = capsys.readouterr().out
    assert out.count("auditing the reference") == 2 and "recovery TF" in out
    # the robustness table: a row per audited folder, references included, and the heat map
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_tables
    import robustness

    files = robustness.find_audits([stage_folders])
    md = robustness.write(files, str(stage_folders / "robustness"), make_tables.METHODS, make_tables.METHODS)
    rows = [line.split(" | ")[0] for line in md.split("### Accuracy")[0].splitlines() if line.startswith("| ")][1:]
    assert rows == ["| QLoRA", "| Retrained", "| GA", "| ECO", "| SPUL"]
    assert os.path.getsize(stage_folders / "robustness.png") > 0


@pytest.mark.xdist_group("audit_runs")  # one worker builds the stage folders
def test_audit_json_is_kept_unless_overwrite(stage_folders, capsys):
    import audit

    path = stage_folders / "ga" / "audit.json"
    run_here(audit, "--model_checkpoints", stage_folders / "ga", "--attacks", "instruction", "--max_eval_rows", 4,
             "--quiet", "--output_path", stage_folders / "ga-audit.json")
    before = path.read_bytes()
    with pytest.raises(UserError, match="other settings.*--overwrite"):
        run_here(audit, "--model_checkpoints", stage_folders / "ga", "--attacks", "instruction", "--max_eval_rows", 4)
    assert path.read_bytes() == before
    # the same settings: the attacks already there are kept, not computed again
    run_here(audit, "--model_checkpoints", stage_folders / "ga", "--attacks", "instruction,nf4", *ALL)
    assert "keeping instruction, nf4" in capsys.readouterr().out
    assert json.load(open(path))["attacks"]["nf4"] == json.loads(before)["attacks"]["nf4"]
    run_here(audit, "--model_checkpoints", stage_folders / "ga", "--attacks", "instruction", "--max_eval_rows", 4,
             "--overwrite", "--quiet")
    assert set(json.load(open(path))["attacks"]) == {"instruction"}


@pytest.mark.xdist_group("audit_runs")  # one worker builds the stage folders
def test_bad_input_is_a_one_line_error(stage_folders, tmp_path):
    for args, message in (
            (["--attacks", "templates,jailbreak"], "unknown attack jailbreak"),
            (["--templates", "plain,training"], "held-out templates only"),
            (["--relearn_rows", 999, "--attacks", "relearn", "--max_eval_rows", 8], "more than the half"),
            (["--finetuned", stage_folders / "spul"], "not a qlora.py folder")):
        p = run_script("audit.py", "--model_checkpoints", stage_folders / "ga", *args, "--output_path", tmp_path / "a.json",
                       check=False)
        assert message in one_line_error(p)
    p = run_script("audit.py", "--model_checkpoints", tmp_path / "nothing", check=False)
    assert "does not exist" in one_line_error(p)


def test_the_demo_audits_the_references_first_then_every_method(tmp_path):
    """`make audit`: the fine-tuned and retrained models each without the other, side by side; every method after
    both (reading their audits); then the references again with each other. Folders without a finished stage
    (the vanilla results, an unfinished run) are not audited."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import argparse

    import demo

    for name, finished in (("qlora", True), ("retrained", True), ("spul", True), ("eco", True), ("ga", False)):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "arguments.json").write_text(json.dumps({"finished": finished}))
    os.makedirs(tmp_path / "vanilla")
    jobs = demo.plan_audit(argparse.Namespace(output_path=str(tmp_path)), demo.SCALES["demo"])
    names = [j.name for j in jobs]
    assert names == ["qlora audit", "retrained audit", "eco audit", "spul audit", "qlora references", "retrained references"]
    first = {"qlora audit", "retrained audit"}
    assert all(j.after == set() for j in jobs[:2]) and all(j.after == first for j in jobs[2:])
    assert "--retrained=none" in jobs[0].args and "--finetuned=none" in jobs[1].args
    assert all(j.script == "audit.py" and "--max_eval_rows=24" in j.args and "--overwrite" in j.args for j in jobs)
    with pytest.raises(UserError, match="run the demo first"):
        demo.plan_audit(argparse.Namespace(output_path=str(tmp_path / "nothing")), demo.SCALES["demo"])
