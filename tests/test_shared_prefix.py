"""utils.soft_prompt's shared prefix: the virtual tokens' keys/values computed once per batch (or once
at inference) give the full path's logits and prompt-encoder gradients, in eval and train mode and
under gradient checkpointing, on batches with different left padding: in float64 to 1e-12 (the same
function, exactly), in fp32 to float rounding. The prefix is never dropped silently, and a model the
shared path cannot serve runs the full path with one notice."""
import json
import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F

from utils import soft_prompt
from utils.evaluation import generate_rows, predict_rows
from utils.modeling import load_model
from utils.prompts import IGNORE, LeftPadCollator, PromptEncoder, position_ids_from_mask
from utils.soft_prompt import SharedPrefixCache, SoftPromptLM, build_prompt_model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread

TEXTS = ["a", "a fine film", "dull and long and slow", "wonderful acting throughout the whole movie",
         "bad, bad, bad, bad, really bad", "the plot goes nowhere at all, sadly, and the jokes fall flat one after another"]
LABELS = [1, 1, 1, 0, 0, 0]
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32; atol only for values near zero


def _close(actual, expected, scale=None):
    """Within rtol 1e-5; near zero within atol 1e-6, or within `scale` times the tensor's largest value (SmolLM2:
    30 layers of fp32 rounding, ~3e-6 of the logits' scale, as the full path moves when a batch gets more
    padding; its prompt-encoder gradients are themselves ~4e-4 of their scale from float64 on a 32-row batch)."""
    atol = scale * expected.abs().max().item() if scale else TOL["atol"]
    torch.testing.assert_close(actual, expected, rtol=TOL["rtol"], atol=atol)


def _model(path, p=5, shared_prefix=True, seed=0, perturb=0.5, **kw):
    """A prompt model whose prompt encoder is moved off its initialisation (`perturb`), so the prompt matters."""
    torch.manual_seed(seed)
    model = build_prompt_model(load_model(path, **kw), p, 16, shared_prefix=shared_prefix)
    with torch.no_grad():
        for q in model.peft_model.prompt_encoder.parameters():
            q.add_(torch.randn_like(q) * perturb)
    return model


def _tiny(name, request, **kw):
    """tiny_llama, or tiny_opt without dropout (dropout in train mode draws its masks at random)."""
    path = request.getfixturevalue(name)
    return _model(path, **({"dropout": 0.0} if name == "tiny_opt" else {}), **kw)


def _batch(tokenizer, texts=TEXTS, labels=LABELS):
    """SST-2-style prompts with their label completion: rows of different lengths, left-padded."""
    enc = PromptEncoder(tokenizer, 128)
    items = [enc.encode(t, enc.label_words[y]) for t, y in zip(texts, labels)]
    return LeftPadCollator(tokenizer.pad_token_id)(items)


def _run(model, batch, shared, keep):
    """Logits of the last `keep` positions and every prompt-encoder gradient of a training-style loss."""
    model.shared_prefix = shared
    model.zero_grad(set_to_none=True)
    labels = batch["tail_labels"]
    logits = model(batch["input_ids"], batch["attention_mask"], keep=max(keep, labels.shape[1] + 1))
    loss = F.cross_entropy(logits[:, -labels.shape[1] - 1:-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    loss.backward()
    grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    return logits[:, -keep:].detach(), grads


def _assert_same(model, batch, keep, logit_scale=None, grad_scale=None):
    full, g_full = _run(model, batch, False, keep)
    shared, g_shared = _run(model, batch, True, keep)
    _close(shared, full, logit_scale)
    assert g_full and g_shared.keys() == g_full.keys() and all("prompt_encoder" in n for n in g_full)
    for n in g_full:
        _close(g_shared[n], g_full[n], grad_scale)


def _spy_shared(monkeypatch):
    calls = []
    shared = SoftPromptLM._shared_forward
    monkeypatch.setattr(SoftPromptLM, "_shared_forward", lambda self, *a: calls.append(a[0].shape) or shared(self, *a))
    return calls


# ------------------------------------------------------------------ the same numbers as the full path

@pytest.mark.parametrize("name", ["tiny_llama", "tiny_opt"])
@pytest.mark.parametrize("mode", ["eval", "train", "checkpointing"])
@pytest.mark.parametrize("keep", [1, 3])
def test_shared_prefix_gives_the_full_paths_logits_and_gradients(name, mode, keep, request, tokenizer, monkeypatch):
    model = _tiny(name, request)
    if mode == "checkpointing":
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(mode != "eval")
    batch = _batch(tokenizer)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == len(TEXTS)  # every row padded differently
    calls = _spy_shared(monkeypatch)
    _assert_same(model, batch, keep)
    assert len(calls) == 1  # the shared path ran (no fallback)


def _rmsnorm_in_input_dtype(monkeypatch):
    """transformers' LlamaRMSNorm computes in float32 whatever the input dtype, which would cap a float64
    comparison at float32 precision; the same norm in the input's dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


def _assert_exact_in_float64(model, batch):
    """In float64 the two paths agree to rounding (~1e-15 of each tensor's scale): the shared prefix
    computes the same function and the same gradient; in fp32 they differ by float rounding only."""
    model.double()
    for keep in (1, 3):
        full, g_full = _run(model, batch, False, keep)
        shared, g_shared = _run(model, batch, True, keep)
        assert full.dtype == torch.float64
        for a, b in [(shared, full)] + [(g_shared[n], g_full[n]) for n in g_full]:
            assert (a - b).abs().max() <= 1e-12 * b.abs().max()


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_opt"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_is_exact_in_float64(name, checkpointing, request, tokenizer, monkeypatch):
    _rmsnorm_in_input_dtype(monkeypatch)
    model = _tiny(name, request)
    if checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    _assert_exact_in_float64(model, _batch(tokenizer))


def test_checkpointing_really_checkpoints_and_leaves_the_layers_as_they_were(tiny_llama, tokenizer):
    """Under gradient checkpointing both passes (prefix, rows) go through the checkpoint function of every
    layer, with the prefix kept; the layers' cache flag is set only for the shared forward."""
    model = _model(tiny_llama)
    lm = model.lm
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    layers = lm.model.layers
    calls = []
    func = layers[0]._gradient_checkpointing_func  # partial(checkpoint, use_reentrant=False)
    counted = functools.partial(lambda *a, **k: calls.append(1) or func.func(*a, **k), **func.keywords)
    for layer in layers:
        layer._gradient_checkpointing_func = counted
    batch = _batch(tokenizer)
    _run(model, batch, True, 1)
    assert len(calls) == 2 * len(layers)
    assert all("_can_checkpoint_with_cache" not in vars(layer) for layer in layers)
    assert not type(layers[0])._can_checkpoint_with_cache


def test_the_prefix_cache_is_read_only(tiny_llama):
    """A replay of a checkpointed layer must see what its forward saw: update() stores nothing."""
    model = _model(tiny_llama).eval()
    with torch.no_grad():
        prefix = model._run_prefix()
    cache = SharedPrefixCache(prefix)
    k, v = prefix[0]
    new = torch.randn(3, k.shape[1], 4, k.shape[3])
    for _ in range(2):
        keys, values = cache.update(new, new, 0)
        assert keys.shape == (3, k.shape[1], k.shape[2] + 4, k.shape[3])
        assert torch.equal(keys[:, :, :k.shape[2]], k.expand(3, -1, -1, -1)) and torch.equal(values[:, :, k.shape[2]:], new)
    assert cache.layers[0].keys is k and cache.get_seq_length() == k.shape[2] == 5
    assert cache.get_mask_sizes(4, 0) == (9, 0) and cache.read_layers == {0}


# ------------------------------------------------------------------ inference: the prefix computed once

@pytest.mark.parametrize("name", ["tiny_llama", "tiny_opt"])
def test_cached_prefix_matches_the_full_path_across_batches(name, request, tokenizer, monkeypatch):
    model = _tiny(name, request).eval()
    runs = []
    run_prefix = SoftPromptLM._run_prefix
    monkeypatch.setattr(SoftPromptLM, "_run_prefix", lambda self: runs.append(1) or run_prefix(self))
    batches = [_batch(tokenizer, TEXTS[i:j], LABELS[i:j]) for i, j in ((0, 6), (1, 3), (3, 4), (2, 6))]
    assert len({b["input_ids"].shape for b in batches}) == len(batches)  # different widths and sizes

    def check(keep=2):
        for b in batches:
            model.shared_prefix = False
            full = model(b["input_ids"], b["attention_mask"], keep=keep)
            model.shared_prefix = True
            _close(model(b["input_ids"], b["attention_mask"], keep=keep), full)

    with torch.no_grad():
        check()
        assert len(runs) == 1  # once for all batches
        for q in model.peft_model.prompt_encoder.parameters():  # the prompt changes: the prefix follows
            q.mul_(1.5)
        check()
        assert len(runs) == 2
        with torch.autocast("cpu", dtype=torch.bfloat16):  # keys/values of other dtypes: computed again
            model(batches[1]["input_ids"], batches[1]["attention_mask"])
        assert len(runs) == 3
        check()
        assert len(runs) == 4
    model.train()  # training computes it afresh every forward
    model(batches[1]["input_ids"], batches[1]["attention_mask"])
    model(batches[1]["input_ids"], batches[1]["attention_mask"])
    assert len(runs) == 6 and model._cached_prefix is None


def test_scoring_and_greedy_decoding_are_the_same_on_both_paths(tiny_llama, tokenizer):
    """generate_rows calls the same forward with growing inputs; the cached prefix serves every step."""
    model = _model(tiny_llama)
    enc = PromptEncoder(tokenizer, 128)
    rows = [{"text": t, "label": y} for t, y in zip(TEXTS, LABELS)]
    out = {}
    for shared in (False, True):
        model.shared_prefix = shared
        out[shared] = (predict_rows(model, enc, rows, batch_size=4, quiet=True),
                       generate_rows(model, enc, rows, max_new_tokens=4, batch_size=4, quiet=True))
    assert out[True][1] == out[False][1]
    for k in ("pred", "true_logp", "label_logits"):
        _close(out[True][0][k], out[False][0][k])


# ------------------------------------------------------------------ never a silent difference

def test_the_prefix_matters_and_dropping_it_is_caught(tiny_llama, tokenizer, monkeypatch):
    """The rows' tokens alone (the prefix dropped, positions kept) give other logits; and a layer that runs
    without the prefix, in either pass, is an error rather than a quiet result."""
    model = _model(tiny_llama).eval()
    b = _batch(tokenizer)
    p = 5
    with torch.no_grad():
        shared = model(b["input_ids"], b["attention_mask"], keep=1)
        mask = torch.cat([b["attention_mask"].new_ones(len(TEXTS), p), b["attention_mask"]], 1)
        alone = model.lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         position_ids=position_ids_from_mask(mask)[:, p:], logits_to_keep=1).logits
    assert (shared - alone).abs().max() > 1e-2

    # the rows' pass: layer 1 drops its past keys/values and cuts the mask to the keys it has left (as some
    # attention implementations do), so that it would run on without the prefix
    attn = model.lm.model.layers[1].self_attn
    forward = attn.forward
    width = b["input_ids"].shape[1]
    # (the past keys/values come as `cache` from transformers 5.24 on, as `past_key_values` before)
    monkeypatch.setattr(attn, "forward", lambda *a, **k: forward(
        *a, **{**{n: v for n, v in k.items() if n not in ("past_key_values", "cache")},
               "attention_mask": k["attention_mask"][..., -width:]}))
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"read the shared prefix in layers \[0\] of 2"):
        model(b["input_ids"], b["attention_mask"])
    monkeypatch.undo()
    # both passes: checkpointing left to drop the cache, as transformers does for a layer that writes it
    model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    monkeypatch.setattr(soft_prompt, "_cache_kept_under_checkpointing", lambda lm: contextlib.nullcontext())
    with pytest.raises(RuntimeError, match="recorded the prefix in 0 of 2 layers"):
        model(b["input_ids"], b["attention_mask"])


def _notices(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if "shared soft-prompt prefix off" in line]


def test_an_unverified_model_runs_the_full_path_with_one_notice(tiny_llama, tokenizer, monkeypatch, capsys):
    model = _model(tiny_llama).eval()
    b = _batch(tokenizer)
    with torch.no_grad():
        shared = model(b["input_ids"], b["attention_mask"], keep=2)
        monkeypatch.setattr(soft_prompt, "SHARED_PREFIX_MODEL_TYPES", ("opt",))
        calls = _spy_shared(monkeypatch)
        outs = [model(b["input_ids"], b["attention_mask"], keep=2) for _ in range(3)]
    assert not calls
    notices = _notices(capsys)
    assert len(notices) == 1 and "'llama'" in notices[0], notices
    for out in outs:
        _close(out, shared)


@pytest.mark.parametrize("case", ["dropout", "reentrant"])
def test_training_the_shared_path_cannot_reproduce_falls_back(case, tiny_llama, tiny_opt, tokenizer, monkeypatch, capsys):
    """Dropout in train mode (OPT's 0.1: each row's prefix gets its own mask in the full path) and reentrant
    checkpointing (no gradient through past keys/values) train on the full path; eval stays shared."""
    if case == "dropout":
        model = _model(tiny_opt)
        assert model.lm.config.dropout > 0
    else:
        model = _model(tiny_llama)
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    b = _batch(tokenizer)
    calls = _spy_shared(monkeypatch)
    model.train()
    for _ in range(2):
        model(b["input_ids"], b["attention_mask"]).sum().backward()
    assert not calls and model.peft_model.prompt_encoder["default"].embedding.weight.grad is not None
    notices = _notices(capsys)
    assert len(notices) == 1 and ("dropout=0.1" if case == "dropout" else "reentrant") in notices[0], notices
    model.eval()
    with torch.no_grad():
        model(b["input_ids"], b["attention_mask"])
    assert len(calls) == 1 and not _notices(capsys)


def test_bf16_lm_keeps_an_fp32_prompt_encoder(tiny_llama, tokenizer):
    model = _model(tiny_llama, dtype=torch.bfloat16).train()
    enc = model.peft_model.prompt_encoder["default"]
    assert all(q.dtype == torch.float32 for q in enc.parameters())
    b = _batch(tokenizer)
    full, g_full = _run(model, b, False, 2)
    shared, g_shared = _run(model, b, True, 2)
    assert shared.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in g_shared.values())
    torch.testing.assert_close(shared.float(), full.float(), rtol=2e-2, atol=2e-2)
    for n in g_full:
        torch.testing.assert_close(g_shared[n], g_full[n], rtol=5e-2, atol=1e-4)
    model.eval()
    with torch.no_grad():
        model(b["input_ids"], b["attention_mask"])
    assert model._cached_prefix[1][0][0].dtype == torch.bfloat16


def test_spul_trains_on_the_shared_prefix_unless_told_otherwise():
    import spul

    assert spul.parse_args(["--model_checkpoints", "m"]).shared_prefix is True
    assert spul.parse_args(["--model_checkpoints", "m", "--shared_prefix", "false"]).shared_prefix is False


# ------------------------------------------------------------------ SmolLM2-135M, real SST-2 rows

def _sst2_rows(sst2_dir, n=6):
    from utils.data import load_splits, sample_rows

    return sample_rows(load_splits(data_dir=sst2_dir, splits=("train_retain",))["train_retain"], n, seed=0)


@pytest.mark.e2e
def test_smollm2_shared_prefix_is_exact_in_float64(smol_path, tokenizer, sst2_dir, monkeypatch):
    _rmsnorm_in_input_dtype(monkeypatch)
    rows = _sst2_rows(sst2_dir)
    model = _model(smol_path, p=10, perturb=0.0).train()
    _assert_exact_in_float64(model, _batch(tokenizer, [r["text"] for r in rows], [r["label"] for r in rows]))


@pytest.mark.e2e
@pytest.mark.parametrize("checkpointing", [False, True])
def test_smollm2_shared_prefix_matches_the_full_path(checkpointing, smol_path, tokenizer, sst2_dir, monkeypatch):
    rows = _sst2_rows(sst2_dir)
    b = _batch(tokenizer, [r["text"] for r in rows], [r["label"] for r in rows])
    assert len(set(b["attention_mask"].sum(1).tolist())) > 3
    model = _model(smol_path, p=10, perturb=0.0)  # the initial encoder: virtual tokens of the embeddings' norm
    if checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = _spy_shared(monkeypatch)
    for keep in (1, 3):
        _assert_same(model, b, keep, logit_scale=1e-5, grad_scale=3e-5)  # measured: 3.0e-6 and 7.1e-6
    assert len(calls) == 2
    model.eval()
    with torch.no_grad():
        for sub in (b, _batch(tokenizer, [r["text"] for r in rows[:3]], [r["label"] for r in rows[:3]])):
            model.shared_prefix = False
            full = model(sub["input_ids"], sub["attention_mask"], keep=3)
            model.shared_prefix = True
            _close(model(sub["input_ids"], sub["attention_mask"], keep=3), full, 1e-5)


def test_shared_prefix_is_refused_for_a_model_without_a_soft_prompt(tiny_qlora):
    from conftest import one_line_error, run_script

    proc = run_script("inference_spul.py", "--model_checkpoints", tiny_qlora, "--shared_prefix", "true", check=False)
    assert "--shared_prefix is for a spul.py folder" in one_line_error(proc)


def test_a_checkpoint_evaluates_identically_on_both_paths(tiny_qlora, sst2_dir, tmp_path):
    """Trained on the shared prefix, scored with and without it: the same results.json metrics."""
    from conftest import run_script

    out = tmp_path / "spul"
    run_script("spul.py", "--model_checkpoints", tiny_qlora, "--max_steps", 2, "--ptuning_num_tokens", 3,
               "--train_batch_size", 8, "--lr", 1e-2, "--output_path", out, "--quiet")
    res = []
    for flag in ("true", "false"):
        dest = tmp_path / f"{flag}.json"
        run_script("inference_spul.py", "--model_checkpoints", out, "--max_eval_rows", 8, "--shared_prefix", flag,
                   "--output_path", dest, "--quiet")
        res.append(json.loads(dest.read_text()))
    for split in res[0]["metrics"]:
        for k in ("accuracy", "f1", "label_accuracy", "mean_true_nll"):
            assert res[0]["metrics"][split][k] == pytest.approx(res[1]["metrics"][split][k], rel=1e-5), (split, k)
