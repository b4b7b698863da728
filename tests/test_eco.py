"""ECO (eco.py, utils/eco.py) on the tiny qlora model: the gate leaves unflagged rows bit-identical,
the hook corrupts only the selected positions and dimensions, the threshold never sees test data, and a
saved folder reloads with the same behaviour."""
import json
import os

import joblib
import numpy as np
import pytest
import torch

from conftest import run_script, write_split_dir
from utils.cli import UserError
from utils.data import load_splits
from utils.eco import (Corruption, EcoLM, PromptClassifier, binary_report, fit_classifier, fpr_threshold,
                       load_eco_model, prompt_mask, row_features)
from utils.prompts import LeftPadCollator, PromptEncoder, cue_ids
from utils.training import TailLM


class SumScore:
    """A stand-in classifier: the score is the feature sum (the gate only needs decision_function)."""

    def decision_function(self, x):
        return np.asarray(x).sum(1)


@pytest.fixture(scope="module")
def rows(sst2_dir):
    d = load_splits(data_dir=sst2_dir, splits=("train_forget", "train_retain"))
    return d["train_forget"][:6] + d["train_retain"][:6]


@pytest.fixture(scope="module")
def merged(tiny_qlora):
    from utils.modeling import load_merged_model, load_tokenizer

    lm, _ = load_merged_model(tiny_qlora)
    lm.eval()
    tok = load_tokenizer(tiny_qlora)
    return lm, tok, PromptEncoder(tok, 64)


def _batch(encoder, rows, completion=False):
    items = [{"input_ids": encoder.prompt_ids(r["text"]) + (encoder.label_ids["positive"] if completion else [])} for r in rows]
    return LeftPadCollator(encoder.tokenizer.pad_token_id)(items)


def _capture(lm):
    """Record every output of the embedding layer (hooks run in order: after ECO's own hook)."""
    seen = []
    h = lm.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    return seen, h


def test_fpr_threshold_hand_computed():
    neg = np.arange(1, 11) / 10  # 0.1 .. 1.0
    assert fpr_threshold(neg, 0.2) == 0.8  # flag = score > 0.8: 0.9 and 1.0, FPR 2/10
    assert fpr_threshold(neg, 0.05) == 1.0  # floor(0.5) = 0 false positives allowed
    assert fpr_threshold(neg, 0.25) == 0.8  # floor(2.5) = 2
    r = binary_report(np.array([1, 1, 0, 1, 0], bool), np.array([1, 0, 0, 1, 1], bool))
    assert (r["precision"], r["recall"], r["fpr"]) == (2 / 3, 2 / 3, 0.5)


def test_prompt_mask_excludes_pad_and_completion():
    q = [7, 8]
    ids = torch.tensor([[0, 0, 5, 7, 8, 9], [5, 7, 8, 6, 7, 8], [0, 5, 6, 6, 6, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 1, 1, 1, 0],   # completion 9 after the question is no prompt
                             [1, 1, 1, 1, 1, 1],   # the last occurrence of the question ends the prompt
                             [0, 1, 1, 1, 1, 1]], dtype=torch.bool)  # no question: every real token
    assert torch.equal(prompt_mask(ids, mask, q), expected)


def test_unflagged_rows_bit_identical_flagged_rows_corrupted(merged, rows):
    lm, tok, enc = merged
    eco = EcoLM(lm, Corruption("rand_noise_first_n", 0.5, 16, seed=3), cue_ids(tok), PromptClassifier(SumScore(), 0.0))
    batch = _batch(enc, rows, completion=True)
    ids, am = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        _, feats, _ = eco.features(ids, am)
        s = feats.double().numpy().sum(1)
        eco.classifier.threshold = float(np.median(s))
        out = eco(ids, am, keep=3)
        plain = TailLM(lm)(ids, am, keep=3)
    flags = eco.last_flags.numpy()
    assert flags.tolist() == (s > np.median(s)).tolist() and 0 < flags.sum() < len(flags)
    assert out.shape == plain.shape == (len(rows), 3, lm.config.vocab_size)
    assert torch.equal(out[~flags], plain[~flags])  # bit-identical, not merely close
    assert all(not torch.allclose(out[i], plain[i], atol=1e-4) for i in np.flatnonzero(flags))
    eco.mode = "none"
    with torch.no_grad():
        assert torch.equal(eco(ids, am, keep=3), plain)


def test_noise_only_on_prompt_positions_and_first_n_dims(merged, rows):
    lm, tok, enc = merged
    n, sigma = 16, 0.5
    eco = EcoLM(lm, Corruption("rand_noise_first_n", sigma, n, seed=3), cue_ids(tok), mode="all")
    batch = _batch(enc, rows[:4], completion=True)
    ids, am = batch["input_ids"], batch["attention_mask"]
    seen, h = _capture(lm)
    try:
        with torch.no_grad():
            eco(ids, am)
            clean = lm.get_input_embeddings()(ids)  # seen[1]: the hook is inactive outside EcoLM's forward
            real = am[2].bool()
            alone = eco(ids[2, real][None], am[2, real][None])  # the same query, unpadded, alone
    finally:
        h.remove()
    corrupted = seen[0]
    pm = prompt_mask(ids, am, cue_ids(tok))
    n_completion = len(enc.label_ids["positive"])
    assert pm.sum(1).tolist() == (am.sum(1) - n_completion).tolist()
    diff = (corrupted - clean) != 0
    assert not diff[:, :, n:].any()  # dimensions beyond the first n untouched
    assert not diff[~pm].any()  # pad and completion positions untouched
    assert diff[pm][:, :n].float().mean() > 0.99  # every selected entry moved
    for b in range(len(ids)):  # the noise is exactly σ·N(0,1) from the row's own seed
        pos = pm[b].nonzero().squeeze(-1)
        expected = eco.corruption.noise(ids[b, pos], n)
        assert torch.allclose(corrupted[b, pos, :n] - clean[b, pos, :n], expected, atol=1e-5)
    assert abs(float(expected.std()) - sigma) < 0.1
    # the same query gets the same noise alone as in a batch (seeded per row, not per batch)
    assert torch.equal(seen[1], clean)
    assert torch.equal(seen[2][0], corrupted[2, real])
    assert torch.isfinite(alone).all()


def test_zero_topk_zeroes_each_selected_tokens_largest_dims(merged, rows):
    lm, tok, enc = merged
    k = 5
    eco = EcoLM(lm, Corruption("zero_topk", k), cue_ids(tok), mode="all")
    batch = _batch(enc, rows[:3])
    ids, am = batch["input_ids"], batch["attention_mask"]
    seen, h = _capture(lm)
    try:
        with torch.no_grad():
            eco(ids, am)
            clean = lm.get_input_embeddings()(ids)
    finally:
        h.remove()
    pm = prompt_mask(ids, am, cue_ids(tok))
    changed = seen[0] != clean
    assert not changed[~pm].any()
    assert torch.equal(changed[pm].sum(-1), torch.full((int(pm.sum()),), k))
    top = clean[pm].abs().topk(k, -1).indices
    assert torch.equal(seen[0][pm].gather(-1, top), torch.zeros_like(top, dtype=seen[0].dtype))


def test_classifier_threshold_from_training_rows_only():
    rng = np.random.default_rng(0)
    f, r = rng.normal(1.0, 1.0, (40, 3)), rng.normal(-1.0, 1.0, (200, 3))
    clf, ho = fit_classifier(f, r, target_fpr=0.1, holdout_fraction=0.25, seed=0)
    assert ho["n_holdout_retain"] == 50 and ho["n_holdout_forget"] == 10
    assert ho["fpr"] <= 0.1 and ho["recall"] > 0.5
    with pytest.raises(UserError, match="target_fpr"):
        fit_classifier(f, r, target_fpr=1.5)
    with pytest.raises(UserError, match="too few"):
        fit_classifier(f[:1], r)


# ---------------------------------------------------------------- eco.py end to end

@pytest.fixture(scope="module")
def split_dirs(tmp_path_factory, sst2_dir):
    """Two data folders with the same training files and different test files."""
    d = load_splits(data_dir=sst2_dir)
    pairs = lambda rs: [(r["text"], r["label"]) for r in rs]  # noqa: E731
    train = {"train_forget": pairs(d["train_forget"][:20]), "train_retain": pairs(d["train_retain"][:60])}
    root = tmp_path_factory.mktemp("eco_data")
    a = write_split_dir(root / "a", {**train, "test_forget": pairs(d["test_forget"][:16]),
                                     "test_retain": pairs(d["test_retain"][:16])})
    b = write_split_dir(root / "b", {**train, "test_forget": pairs(d["test_forget"][100:112]),
                                     "test_retain": pairs(d["test_retain"][100:124])})
    return a, b


def _eco(qlora, data_dir, out, *extra):
    # rows of SST-2 in folders of their own: other data than the qlora folder's, as far as a stage can tell
    return run_script("eco.py", "--model_checkpoints", qlora, "--data_dir", data_dir, "--other_data", "--max_length", 64,
                      "--search_rows", 8, "--search_rounds", 2, "--eco_dims", 16, "--target_fpr", 0.1,
                      "--output_path", out, "--quiet", *extra)


@pytest.fixture(scope="module")
def eco_runs(tiny_qlora, split_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("eco_runs")
    procs = [_eco(tiny_qlora, d, root / name) for d, name in zip(split_dirs, ("a", "b"))]
    return [str(root / "a"), str(root / "b")], procs


def test_eco_script_threshold_ignores_test_files(eco_runs):
    (a, b), procs = eco_runs
    assert "test precision" in procs[0].stdout and "σ = " in procs[0].stdout
    ca, cb = (json.load(open(os.path.join(x, "classifier.json"))) for x in (a, b))
    assert (ca["n_test_forget"], ca["n_test_retain"], cb["n_test_forget"], cb["n_test_retain"]) == (16, 16, 12, 24)
    assert ca["threshold"] == cb["threshold"]  # different test files, same threshold and same classifier
    ja, jb = (joblib.load(os.path.join(x, "classifier.joblib")) for x in (a, b))
    assert np.array_equal(ja["model"][-1].coef_, jb["model"][-1].coef_)
    ea, eb = (json.load(open(os.path.join(x, "eco.json"))) for x in (a, b))
    assert ea["strength"] == eb["strength"] and ea["search"]["evaluations"]
    args = json.load(open(os.path.join(a, "arguments.json")))
    assert args["stage"] == "eco" and args["finished"] and args["model_name"] and args["sigma"] == ea["strength"]


def test_saved_folder_reloads_with_same_flags_and_logits(eco_runs, split_dirs, tiny_qlora):
    from utils.modeling import load_merged_model, load_tokenizer

    from utils.stages import load_stage

    a = eco_runs[0][0]
    model, _, loaded = load_stage(a)
    info = loaded["eco"]
    assert info["stage"] == "eco" and model.corruption.strength == info["strength"] and model.corruption.dims == 16
    enc = PromptEncoder(load_tokenizer(a), 64)
    d = load_splits(data_dir=split_dirs[0], splits=("test_forget", "test_retain"))
    # the reloaded gate flags the test rows exactly as eco.py measured them
    flags = {s: model.classifier.flags(row_features(model, enc, d[s], quiet=True)) for s in d}
    r = binary_report(np.r_[flags["test_forget"], flags["test_retain"]],
                      np.r_[np.ones(len(d["test_forget"]), bool), np.zeros(len(d["test_retain"]), bool)])
    saved = json.load(open(os.path.join(a, "classifier.json")))["test"]
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (saved["tp"], saved["fp"], saved["fn"], saved["tn"])
    # logits: a second load gives the same ones; unflagged rows are the plain merged model's
    batch = _batch(enc, d["test_forget"][:8] + d["test_retain"][:8])
    lm, _ = load_merged_model(tiny_qlora)
    model2, _ = load_eco_model(a, load_merged_model(tiny_qlora)[0])
    model.mode = model2.mode = "all"  # every row corrupted: the saved σ and seed at work
    with torch.no_grad():
        assert torch.equal(model(batch["input_ids"], batch["attention_mask"]), model2(batch["input_ids"], batch["attention_mask"]))
        model.mode = "classifier"
        out = model(batch["input_ids"], batch["attention_mask"], keep=2)
        plain = TailLM(lm.eval())(batch["input_ids"], batch["attention_mask"], keep=2)
    assert torch.equal(out[~model.last_flags], plain[~model.last_flags])


def test_user_errors_are_one_line(eco_runs, tiny_qlora, tmp_path, sst2_dir):
    a = eco_runs[0][0]
    with pytest.raises(UserError, match="not by eco.py"):
        load_eco_model(tiny_qlora, None)
    with pytest.raises(UserError, match="unknown corruption"):
        Corruption("shuffle")
    p = run_script("eco.py", "--model_checkpoints", a, "--data_dir", sst2_dir, "--output_path", tmp_path / "x", check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "starts from a qlora.py folder" in p.stderr
    p = run_script("eco.py", "--model_checkpoints", tiny_qlora, "--strength_range", "5", "1", check=False)
    assert p.returncode == 2 and p.stderr.strip() == "error: --strength_range needs 0 < LO < HI, got 5.0 1.0"


class StubEco(torch.nn.Module):
    """Answers 'positive' for rows holding the token `good_id`, until the corruption strength reaches
    `breaks`; from there on always 'positive' (balanced accuracy exactly 0.5, chance)."""

    def __init__(self, encoder, good_id, breaks):
        super().__init__()
        self.mode, self.corruption = "classifier", Corruption("rand_noise_first_n", 1.0)
        self.enc, self.good_id, self.breaks = encoder, good_id, breaks

    def forward(self, input_ids, attention_mask, keep=1):
        neg, pos = self.enc.first_label_ids()
        positive = (input_ids == self.good_id).any(-1) | (self.corruption.strength >= self.breaks)
        logits = torch.zeros(len(input_ids), keep, len(self.enc.tokenizer))
        logits[:, -1, pos] = positive.float()
        logits[:, -1, neg] = 1 - positive.float()
        return logits


def test_strength_search_finds_first_crossing(tokenizer):
    from utils.eco import search_strength

    enc = PromptEncoder(tokenizer, 64)
    good = set(enc.prompt_ids("good")) - set(enc.prompt_ids("bad"))
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}] * 4
    stub = StubEco(enc, good.pop(), breaks=3.7)
    best, log = search_strength(stub, enc, rows, 0.01, 1000.0, rounds=12, tolerance=0.05, quiet=True)
    s = [e["strength"] for e in log["evaluations"]]
    assert s[:4] == pytest.approx([0.01, 0.1, 1.0, 10.0])  # grows by 10 until chance is reached
    assert [e["met"] for e in log["evaluations"][:4]] == [False, False, False, True]
    assert 3.7 <= best < 3.7 * 1.01 and len(s) == 4 + 12  # then 12 bisection rounds in [1, 10]
    assert stub.mode == "classifier" and stub.corruption.strength == best
    best_k, log_k = search_strength(stub, enc, rows, 1.0, 64.0, integer=True, quiet=True)
    assert best_k == 4.0 and [e["strength"] for e in log_k["evaluations"]][:3] == [1.0, 2.0, 4.0]


def test_loading_flows_one_way():
    """utils.stages loads models; method modules (utils/eco.py, utils/prompting.py) wrap a model they are given and
    never import the stage loader back."""
    import ast

    for name in ("eco.py", "prompting.py"):
        tree = ast.parse(open(os.path.join(os.path.dirname(__file__), "..", "utils", name)).read())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"stages", "utils.stages"}, name
