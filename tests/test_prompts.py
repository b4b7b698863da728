"""The paper's template, label-only masking, truncation that keeps the question and the label,
seeded generic labels, and the left-padding collator with right-aligned tail labels."""
import json

import pytest
import torch

from utils.cli import UserError
from utils.prompts import (GENERIC_LABELS, IGNORE, QUESTION, TEXT_PREFIX, LeftPadCollator, PromptEncoder,
                           label_token_ids, position_ids_from_mask)

LONG = "an engrossing , beautifully acted film that stays with you long after the credits roll . " * 20


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return PromptEncoder(tokenizer, 1024)


@pytest.fixture(scope="module")
def sst2_sample(sst2_dir):
    from utils.data import load_splits, sample_rows

    data = load_splits(data_dir=sst2_dir, splits=("train_forget",))
    return sample_rows(data["train_forget"], 64, seed=0)


def _completion(item):
    return [t for t in item["labels"] if t != IGNORE]


def test_template_is_the_papers(encoder, tokenizer):
    item = encoder.encode("a gripping story .", "positive")
    assert tokenizer.decode(item["input_ids"]) == (
        "### Text: a gripping story .\n\n### Question: What is the sentiment of the given text?\n\n### Sentiment: positive")


@pytest.mark.parametrize("word", ["negative", "positive", "neutral", "unknown"])
def test_masked_positions_are_exactly_the_label_tokens(encoder, tokenizer, sst2_sample, word):
    for row in sst2_sample[:16]:
        item = encoder.encode(row["text"], word)
        ids, labels = item["input_ids"], item["labels"]
        assert len(ids) == len(labels)
        marked = [i for i, t in enumerate(labels) if t != IGNORE]
        n = len(encoder.label_ids[word])
        assert marked == list(range(len(ids) - n, len(ids)))  # the last n positions, nothing else
        assert [labels[i] for i in marked] == ids[-n:] == encoder.label_ids[word]
        assert tokenizer.decode([ids[i] for i in marked]) == " " + word
        # the unmasked part is the prompt exactly as it is scored at evaluation
        assert ids[:-n] == encoder.prompt_ids(row["text"])


def test_encode_rows_marks_the_true_label(encoder, tokenizer, sst2_sample):
    items = encoder.encode_rows(sst2_sample, completion="label", role=0)
    for row, item in zip(sst2_sample, items):
        assert tokenizer.decode(_completion(item)) == [" negative", " positive"][row["label"]]
        assert item["role"] == 0


def test_multi_token_generic_label_is_masked_whole(tokenizer):
    enc = PromptEncoder(tokenizer, 1024, generic_labels=("unclassifiable",))
    ids = enc.label_ids["unclassifiable"]
    assert len(ids) > 1  # the point of this test: a completion of several tokens
    item = enc.encode_rows([{"text": "fine .", "label": 1}], completion="generic", role=2, seed=0)[0]
    assert _completion(item) == ids == item["input_ids"][-len(ids):]
    assert tokenizer.decode(_completion(item)) == " unclassifiable"
    assert item["labels"][: -len(ids)] == [IGNORE] * (len(item["labels"]) - len(ids))


def test_label_tokens_are_tokenised_in_context(tokenizer):
    ids = label_token_ids(tokenizer, "positive")
    full = tokenizer(QUESTION + " positive", add_special_tokens=False)["input_ids"]
    assert full[-len(ids):] == ids


def test_truncation_shortens_the_text_and_keeps_question_and_label(tokenizer):
    for max_length in (32, 48, 100):
        enc = PromptEncoder(tokenizer, max_length)
        for word in ("positive", "negative", "unknown"):
            item = enc.encode(LONG, word)
            assert len(item["input_ids"]) == max_length
            text = tokenizer.decode(item["input_ids"])
            assert text.endswith(QUESTION + " " + word)  # the decoded tail: question and label intact
            assert text.startswith(TEXT_PREFIX)
            review = text[len(TEXT_PREFIX): -len(QUESTION + " " + word)]
            assert 0 < len(review) < len(LONG) and LONG.startswith(review)  # only the review was cut
            assert tokenizer.decode(_completion(item)) == " " + word
        # the evaluation prompt (no completion) is the training prompt: cut to leave room for the label
        prompt = enc.prompt_ids(LONG)
        assert prompt == item["input_ids"][:-1] and tokenizer.decode(prompt).endswith(QUESTION)


def test_a_texts_prompt_does_not_depend_on_its_completion(tokenizer, sst2_sample):
    """A truncated text is cut at one place for every completion and at evaluation, also when a generic
    label has more tokens than the true one: a row is scored on exactly the prompt it was trained on."""
    enc = PromptEncoder(tokenizer, 48, generic_labels=("unclassifiable", "neutral"))
    n = len(enc.label_ids["unclassifiable"])
    assert enc.longest_label == n > 1
    for text in [LONG] + [r["text"] for r in sst2_sample[:16]]:
        prompt = enc.prompt_ids(text)
        for word in ("positive", "negative", "unclassifiable", "neutral"):
            item = enc.encode(text, word)
            assert len(item["input_ids"]) <= 48
            assert item["input_ids"][: len(prompt)] == prompt
            assert item["input_ids"][len(prompt):] == enc.label_ids[word]
    assert len(enc.encode(LONG, "unclassifiable")["input_ids"]) == 48


def test_short_text_is_not_truncated(tokenizer):
    enc = PromptEncoder(tokenizer, 64)
    item = enc.encode("a gripping story .", "negative")
    assert len(item["input_ids"]) < 64
    assert tokenizer.decode(item["input_ids"]).startswith(TEXT_PREFIX + "a gripping story .")


def test_every_sst2_row_fits_with_its_label(tokenizer, sst2_sample):
    enc = PromptEncoder(tokenizer, 40)
    for item, row in zip(enc.encode_rows(sst2_sample), sst2_sample):
        assert len(item["input_ids"]) <= 40
        assert tokenizer.decode(item["input_ids"]).endswith(QUESTION + [" negative", " positive"][row["label"]])


def test_max_length_too_small_for_prompt_and_label(tokenizer):
    smallest = PromptEncoder(tokenizer, 1024).min_length
    enc = PromptEncoder(tokenizer, smallest)  # just enough: the label still fits
    item = enc.encode(LONG, "positive")
    assert len(item["input_ids"]) <= smallest
    assert tokenizer.decode(item["input_ids"]).endswith(QUESTION + " positive")
    with pytest.raises(UserError) as e:
        PromptEncoder(tokenizer, smallest - 1)
    assert "--max_length" in str(e.value) and str(smallest) in str(e.value)
    # a longer generic label needs more room
    with pytest.raises(UserError):
        PromptEncoder(tokenizer, smallest, generic_labels=("unclassifiable",))


def test_generic_labels_are_seeded(encoder, tokenizer):
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(60)]

    def draw(seed):
        items = encoder.encode_rows(rows, completion="generic", role=2, seed=seed)
        return [tokenizer.decode(_completion(it)).strip() for it in items]

    a = draw(0)
    assert a == draw(0)  # same seed, same draw
    assert set(a) == set(GENERIC_LABELS) == {"neutral", "unknown"}  # both words appear
    assert 15 <= a.count("neutral") <= 45  # roughly uniform
    assert a != draw(1)
    # never the true label
    assert not {"negative", "positive"} & set(a)


def test_configurable_generic_labels(tokenizer):
    enc = PromptEncoder(tokenizer, 128, generic_labels=("none", "unknown"))
    items = enc.encode_rows([{"text": "x", "label": 0}] * 30, completion="generic", seed=3)
    assert {tokenizer.decode(_completion(it)).strip() for it in items} == {"none", "unknown"}


def test_label_words_must_differ_in_their_first_token(tokenizer):
    with pytest.raises(UserError):
        PromptEncoder(tokenizer, 128, generic_labels=("positive",))


def test_collator_pads_left_and_right_aligns_the_tail_labels(tokenizer):
    enc = PromptEncoder(tokenizer, 1024, generic_labels=("unclassifiable", "neutral"))
    n_long = len(enc.label_ids["unclassifiable"])
    items = [enc.encode("short .", "positive"), enc.encode("a much longer review than the first one .", "unclassifiable"),
             enc.encode("medium length review .", "neutral")]
    for role, it in enumerate(items):
        it["role"] = role
    pad = tokenizer.pad_token_id
    batch = LeftPadCollator(pad)(items)
    width = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["tail_labels"].shape == (3, n_long)
    assert batch["role"].tolist() == [0, 1, 2]
    for i, it in enumerate(items):
        n = width - len(it["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == [pad] * n  # padding on the left
        assert batch["input_ids"][i, n:].tolist() == it["input_ids"]
        assert batch["attention_mask"][i].tolist() == [0] * n + [1] * len(it["input_ids"])
        comp = _completion(it)
        assert batch["tail_labels"][i].tolist() == [IGNORE] * (n_long - len(comp)) + comp
    # tail_labels[:, j] is the token at position -L + j: the logits at -(L + 1) + j predict it
    tl = batch["tail_labels"]
    end = batch["input_ids"][:, -n_long:]
    assert torch.equal(torch.where(tl != IGNORE, end, IGNORE), tl)


def test_collator_without_labels_and_with_reference_fields():
    batch = LeftPadCollator(0)([{"input_ids": [5, 6, 7], "ref_logp": [-0.1, -2.0]},
                                {"input_ids": [8], "ref_logp": [-0.5, -1.0]}])
    assert "tail_labels" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["ref_logp"].shape == (2, 2)


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = position_ids_from_mask(mask)
    assert pos[0, 2:].tolist() == [0, 1, 2] and pos[1].tolist() == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def llama2_style_tokenizer(sst2_sample):
    """A LLaMA-2-style tokenizer trained here in a second: SentencePiece-like BPE pieces ('▁' starts a word, byte
    fallback for newlines) in transformers' LlamaTokenizer with legacy=True, as LLaMA-2 loads: every text handed to
    it gets a dummy-prefix '▁'."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    from utils.tasks import MultipleChoice, Sentiment

    lines = [r["text"] for r in sst2_sample] + [t.head_prefix + t.cue for t in (Sentiment, MultipleChoice)]
    lines += [q["question"] for q in QUESTIONS] + ["### Choices: A B C D E positive negative neutral unknown"] * 20
    spm = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    spm.train_from_iterator([s.replace("\n", " ") for s in lines],
                            trainers.BpeTrainer(vocab_size=700, special_tokens=special, show_progress=False))
    merges = [tuple(m) for m in json.loads(spm.to_str())["model"]["merges"]]
    return LlamaTokenizer(vocab=spm.get_vocab(), merges=merges, legacy=True, add_bos_token=True)


QUESTIONS = [{"question": "What is the boiling point of water at sea level?", "choices": ["100 C", "50 C", "0 C"], "label": 0},
             {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium", "argon"],
              "label": 1}]


@pytest.mark.parametrize("which", ["llama2_style_tokenizer", "tokenizer"])
@pytest.mark.parametrize("task", ["sentiment", "mcqa"])
def test_a_prompt_has_the_ids_of_its_whole_text(which, task, sst2_sample, request):
    """Head, body and cue are written in pieces; the ids are those of tokenising the whole text (prompt, ' ', label)
    in one go, also for a SentencePiece tokenizer that would give each piece tokenised alone a dummy-prefix token.
    A head cut to fit loses its own ids only."""
    from utils.tasks import get_task

    tok = request.getfixturevalue(which)
    t = get_task(task)
    rows = QUESTIONS if task == "mcqa" else sst2_sample[:8]
    enc = PromptEncoder(tok, 1024, task=task)
    for row in rows:
        prompt_text = t.head(t.as_row(row)) + t.body(row, enc.label_words) + t.cue
        word = enc.label_words[row["label"]]
        assert enc.encode(row, word)["input_ids"] == tok(prompt_text + " " + word)["input_ids"]
    # cut: the whole text's ids, less some of the head's; nothing of the body, the cue or the label is lost
    row = {**rows[0], **({"question": rows[0]["question"] * 8} if task == "mcqa" else {"text": LONG.strip()})}
    prompt_text, head_text = t.head(row) + t.body(row, enc.label_words) + t.cue, t.head(row)
    whole, n_head = tok(prompt_text)["input_ids"], len(tok(head_text)["input_ids"])
    short = PromptEncoder(tok, n_head, task=task).prompt_ids(row)
    kept = len(short) - (len(whole) - n_head)
    assert 0 < kept < n_head and short == whole[:kept] + whole[n_head:]


def test_the_llama2_style_tokenizer_gives_pieces_a_dummy_prefix(llama2_style_tokenizer):
    """What the test above guards against: tokenised alone, the cue starts with a '▁' token its context does not
    have; the encoder's cue (which ECO's prompt mask looks for) is the one in context."""
    from utils.prompts import cue_ids

    from utils.eco import prompt_mask

    tok = llama2_style_tokenizer
    alone = tok(QUESTION, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone)[0] == "▁" and alone[1:] == cue_ids(tok) == PromptEncoder(tok, 256).cue_ids
    enc = PromptEncoder(tok, 256)
    item = enc.encode("a gripping story .", "positive")
    ids = torch.tensor([item["input_ids"]])
    assert prompt_mask(ids, torch.ones_like(ids), cue_ids(tok)).sum() == len(enc.prompt_ids("a gripping story ."))


def test_a_piece_a_token_would_straddle_is_tokenised_alone(tokenizer):
    """Byte-level BPE joins a text's trailing space with the newlines after it: no split of the whole text's ids
    gives the piece, which then keeps its own ids (the cue stays the one ECO looks for)."""
    from utils.prompts import piece_ids

    cue = "\n\n### Choices:"
    pre = tokenizer("a story . ", add_special_tokens=False)["input_ids"]
    assert tokenizer("a story . " + cue, add_special_tokens=False)["input_ids"][: len(pre)] != pre  # it straddles
    assert piece_ids(tokenizer, "a story . ", cue) == tokenizer(cue, add_special_tokens=False)["input_ids"]
    whole = tokenizer("a story ." + cue, add_special_tokens=False)["input_ids"]
    assert piece_ids(tokenizer, "a story .", cue) == whole[len(tokenizer("a story .", add_special_tokens=False)["input_ids"]):]


@pytest.mark.parametrize("task", ["sentiment", "mcqa"])
def test_held_out_templates_have_the_ids_of_their_whole_text(llama2_style_tokenizer, task, sst2_sample):
    """The held-out templates (tests/test_templates.py checks them on SmolLM2's byte-level BPE) keep the whole text's
    ids under a SentencePiece tokenizer too: the label word's ids are the tokens after the prompt."""
    from utils.tasks import INSTRUCTION, get_task, held_out_templates

    tok, t = llama2_style_tokenizer, get_task(task)
    rows = QUESTIONS if task == "mcqa" else sst2_sample[:4]
    for name in held_out_templates(task) + (INSTRUCTION,):
        enc = PromptEncoder(tok, 1024, task=task, template=name)
        for row in rows:
            text = t.head(t.as_row(row), enc.template) + t.body(row, enc.label_words, enc.template) + enc.template.cue
            word = enc.label_words[row["label"]]
            assert enc.prompt_ids(row) + enc.label_ids[word] == tok(text + " " + word)["input_ids"], name
