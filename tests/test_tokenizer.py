"""The sentencepiece tokenizer against upstream's InternLM2Tokenizer under transformers 4.33.2
(tests/fixtures/inputs/tokenizer.json, made by tools/reference/make_input_fixtures.py)."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from mindxcomposer import InternLM2Tokenizer
from mindxcomposer.tokenization_internlm2 import BUNDLED_MODEL

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "inputs")

with open(os.path.join(FIXTURES, "tokenizer.json")) as f:
    GOLDEN = json.load(f)


@pytest.fixture(scope="module")
def tok():
    return InternLM2Tokenizer.from_pretrained()


def mismatches(pairs):
    return [p for p in pairs if p[1] != p[2]]


def test_golden_was_made_with_the_bundled_model():
    with open(BUNDLED_MODEL, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == GOLDEN["tokenizer_model_sha256"]


def test_encode_matches_upstream(tok):
    bad = mismatches([(e["text"], tok(e["text"])["input_ids"], e["ids"]) for e in GOLDEN["encodings"]])
    bad += mismatches([(e["text"], tok.encode(e["text"], add_special_tokens=False), e["ids_no_special"])
                       for e in GOLDEN["encodings"]])
    assert not bad, f"{len(bad)} texts differ, first: {bad[0]!r}"


def test_decode_matches_upstream(tok):
    pairs = []
    for e in GOLDEN["encodings"] + GOLDEN["decodes"]:
        pairs.append((e["ids"], tok.decode(e["ids"]), e["decode"]))
        pairs.append((e["ids"], tok.decode(e["ids"], skip_special_tokens=True), e["decode_skip"]))
    bad = mismatches(pairs)
    assert not bad, f"{len(bad)} decodes differ, first: {bad[0]!r}"


def test_golden_covers_the_hard_cases():
    texts = [e["text"] for e in GOLDEN["encodings"]]
    for needle in ("<s>", "</s>", "<unk>", "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]", "\n", "  ", " <s>", "<s> "):
        assert sum(needle in t for t in texts) >= 3, needle
    cjk = sum(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in texts)
    emoji = sum(any(ord(ch) >= 0x1F300 for ch in t) for t in texts)
    assert cjk >= 20 and emoji >= 20
    assert len(texts) >= 300 and len(GOLDEN["decodes"]) >= 100


def test_special_token_ids(tok):
    assert tok.bos_token_id == GOLDEN["bos_token_id"]
    assert tok.eos_token_id == GOLDEN["eos_token_id"]
    assert tok.pad_token_id == GOLDEN["pad_token_id"]
    assert tok.unk_token_id == GOLDEN["unk_token_id"]
    assert tok.vocab_size == len(tok) == GOLDEN["vocab_size"]
    assert sorted(tok.all_special_ids) == sorted(GOLDEN["all_special_ids"])
    names = GOLDEN["special_tokens"]
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
        names["bos"], names["eos"], names["unk"], names["pad"])
    assert tok.convert_tokens_to_ids(["[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"]) == GOLDEN["unused_145_146"]
    assert tok.convert_tokens_to_ids("[UNUSED_TOKEN_145]") == GOLDEN["unused_145_146"][0]
    assert tok.convert_ids_to_tokens(GOLDEN["unused_145_146"]) == ["[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"]


def test_numpy_outputs_and_padding(tok):
    batch = GOLDEN["batch"]
    out = tok(batch["texts"], padding="longest", return_tensors="np")
    assert out["input_ids"].dtype == np.int64 and out.input_ids.tolist() == batch["input_ids"]
    assert out["attention_mask"].tolist() == batch["attention_mask"]
    single = tok("Hello world", return_tensors="np")
    assert single["input_ids"].shape == (1, len(tok.encode("Hello world")))
    assert single["attention_mask"].tolist() == [[1] * single["input_ids"].shape[1]]
    with pytest.raises(ValueError, match="padding"):
        tok(["a", "a much longer text"], return_tensors="np")
    assert tok.decode(single["input_ids"][0]) == tok.decode(single["input_ids"][0].tolist())
    assert tok.batch_decode(out["input_ids"], skip_special_tokens=True)[0] == tok.decode(
        batch["input_ids"][0], skip_special_tokens=True)


def test_from_pretrained_directory_and_config(tmp_path):
    shutil.copy(BUNDLED_MODEL, tmp_path / "tokenizer.model")
    plain = InternLM2Tokenizer.from_pretrained(tmp_path)
    assert plain.encode("你好 <s> world") == InternLM2Tokenizer.from_pretrained(None).encode("你好 <s> world")
    assert InternLM2Tokenizer.from_pretrained(tmp_path / "tokenizer.model").encode("x") == plain.encode("x")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_eos_token": True, "bos_token": {"content": "<s>", "lstrip": False}, "tokenizer_class": "X"}))
    with_eos = InternLM2Tokenizer.from_pretrained(tmp_path)
    assert with_eos.encode("hi") == plain.encode("hi") + [plain.eos_token_id]
    with pytest.raises(FileNotFoundError):
        InternLM2Tokenizer.from_pretrained(tmp_path / "missing")


def test_bad_ids_are_reported(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(ValueError, match="return_tensors"):
        tok("x", return_tensors="pt")
