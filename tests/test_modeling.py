"""Model loading (the embedded SmolLM2 offline, local folders), tail-only forwards on left-padded
batches, the soft-prompt wrapper's independence from padding (full and shared-prefix paths), and the
weights fingerprint."""
import os

import pytest
import torch

from utils.cli import UserError
from utils.modeling import (load_merged_model, load_model, load_tokenizer, read_arguments, tail_logits,
                            weights_fingerprint)
from utils.prompts import LeftPadCollator, PromptEncoder


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


ROWS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16], [17, 18, 19, 20, 21, 22], [23, 24]]  # keep <= 2 stays inside each row


def _batch(pad_id, rows=ROWS):
    return LeftPadCollator(pad_id)([{"input_ids": r} for r in rows])


# ------------------------------------------------------------------ the embedded model

def test_embedded_conversion_tolerates_a_process_that_finished_first(tmp_path, monkeypatch):
    """Stages started side by side (scripts/demo.py) may convert the GGUF file at the same time: each
    writes its own temporary folder, and the one that loses the race keeps the winner's folder."""
    import transformers

    from utils import modeling

    out = tmp_path / "smollm2-135m"

    class Fake:
        def __init__(self):
            self.config = type("Config", (), {})()
            self.config.quantization_config = None

        def save_pretrained(self, path):
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "config.json"), "w") as f:
                f.write("{}")
            if not out.exists():  # the other process finishes while this one is still writing
                os.makedirs(out)
                (out / "config.json").write_text('{"winner": true}')

    monkeypatch.setenv("SPUL_CACHE", str(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Fake())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Fake())
    assert modeling._embedded_path("smollm2-135m") == str(out)
    assert (out / "config.json").read_text() == '{"winner": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]  # no temporary folder left behind


@pytest.mark.e2e
def test_embedded_model_loads_offline_and_answers_with_a_label_word(smol_path, tokenizer):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert os.path.exists(os.path.join(smol_path, "model.safetensors"))  # converted once, cached
    model = load_model("smollm2-135m").eval()  # the short name resolves to the cached folder
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    enc = PromptEncoder(tokenizer, 256)
    ids = torch.tensor([enc.prompt_ids("an utterly charming and hilarious film that reminded me why i love the movies .")])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, ids.shape[1]:]).strip().lower()
    assert answer.split()[0] in ("positive", "negative"), answer
    assert answer.startswith("positive"), answer


# ------------------------------------------------------------------ loading

def test_tokenizer_pad_token_and_side(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    assert tok.pad_token is not None and tok.padding_side == "left"
    tok2 = load_tokenizer(tiny_llama, set_pad_id=True)  # --set_pad_id: pad = EOS
    assert tok2.pad_token_id == tok2.eos_token_id


def test_loading_errors_are_user_errors(tmp_path):
    for fn in (load_model, load_tokenizer):
        with pytest.raises(UserError) as e:
            fn(str(tmp_path / "no-such-model"))
        assert "no-such-model" in str(e.value)
    with pytest.raises(UserError):
        read_arguments(str(tmp_path / "missing"))
    with pytest.raises(UserError) as e:
        load_merged_model(str(tmp_path))  # a folder that no stage wrote
    assert "arguments.json" in str(e.value)


# ------------------------------------------------------------------ tail-only forwards

@pytest.mark.parametrize("name", ["tiny_llama", "tiny_opt"])
def test_tail_logits_on_a_left_padded_batch_match_single_rows(name, request, tokenizer):
    model = load_model(request.getfixturevalue(name)).eval()
    batch = _batch(tokenizer.pad_token_id)
    with torch.no_grad():
        out = tail_logits(model, batch["input_ids"], batch["attention_mask"], keep=1)
        assert out.shape == (len(ROWS), 1, model.config.vocab_size)
        for i, row in enumerate(ROWS):
            ids = torch.tensor([row])
            alone = model(input_ids=ids).logits[0, -1]  # the plain forward, no padding, all positions
            assert torch.allclose(out[i, -1], alone, atol=1e-5), (name, i, (out[i, -1] - alone).abs().max())
        # keep = 3 returns the last three positions, the last of which is keep = 1
        out3 = tail_logits(model, batch["input_ids"], batch["attention_mask"], keep=3)
        assert out3.shape[1] == 3 and torch.allclose(out3[:, -1], out[:, -1], atol=1e-5)
        full = model(input_ids=torch.tensor([ROWS[0]])).logits[0, -3:]
        assert torch.allclose(out3[0], full, atol=1e-5)


def _soft_prompt(path, seed=0, shared_prefix=True):
    from utils.soft_prompt import build_prompt_model

    torch.manual_seed(seed)
    return build_prompt_model(load_model(path), 5, 16, shared_prefix=shared_prefix).eval()


@pytest.mark.parametrize("shared_prefix", [True, False])
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_opt"])
def test_soft_prompt_results_do_not_depend_on_left_padding(name, shared_prefix, request, tokenizer):
    model = _soft_prompt(request.getfixturevalue(name), shared_prefix=shared_prefix)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        batch = _batch(pad)
        together = model(batch["input_ids"], batch["attention_mask"], keep=2)
        for i, row in enumerate(ROWS):
            alone = model(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), keep=2)
            assert torch.allclose(together[i], alone[0], atol=1e-5), (name, i)
            for extra in (1, 7):  # the same row with more padding
                ids = torch.tensor([[pad] * extra + row])
                mask = torch.tensor([[0] * extra + [1] * len(row)])
                assert torch.allclose(model(ids, mask, keep=2)[0], alone[0], atol=1e-5), (name, i, extra)
        # the prompt does something, and reference=True is the frozen model without it
        ref = model(batch["input_ids"], batch["attention_mask"], keep=2, reference=True)
        plain = tail_logits(model.lm, batch["input_ids"], batch["attention_mask"], keep=2)
        assert torch.allclose(ref, plain, atol=1e-6)
        assert not torch.allclose(ref, together, atol=1e-3)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_soft_prompt_gradients_reach_only_the_prompt_encoder(shared_prefix, tiny_llama, tokenizer):
    model = _soft_prompt(tiny_llama, shared_prefix=shared_prefix).train()
    batch = _batch(tokenizer.pad_token_id)
    model(batch["input_ids"], batch["attention_mask"], keep=1).float().logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("prompt_encoder" in n for n in grads)
    assert all(not p.requires_grad for p in model.lm.parameters())


def test_weights_fingerprint(tiny_llama):
    a = load_model(tiny_llama)
    b = load_model(tiny_llama)
    fa = weights_fingerprint(a)
    assert fa == weights_fingerprint(b) and len(fa) == 64
    with torch.no_grad():
        b.model.layers[1].self_attn.v_proj.weight[3, 7] += 1e-3  # one weight, slightly
    assert weights_fingerprint(b) != fa
    assert weights_fingerprint(a) == fa  # reading does not change it
