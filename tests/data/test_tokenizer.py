"""Tokenizer: BPE and bytes round-trips, determinism, byte ids, save/load, the byte-symbol map."""

from __future__ import annotations

import random

import pytest
from conftest import SAMPLE, random_text
from tokenizers import pre_tokenizers

from looped.data import EOT, DataError, Tokenizer
from looped.data.tokenizer import byte_symbols

TEXTS = [random_text(i, 300) + SAMPLE for i in range(6)]
HARD = [
    "",
    " ",
    "plain words",
    SAMPLE,
    "Кириллица не была в обучении; ελληνικά; עברית; 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\x00\x01\x7f\x80\xa0\xad\t\r\n  leading and trailing  ",
    f"a document that spells {EOT} in its text",
    "\ufffd replacement char and \ufeff BOM",
]


def random_string(seed: int, n: int = 200) -> str:
    """Random code points of every UTF-8 length."""
    rng = random.Random(seed)
    # Any code point but surrogates, which have no UTF-8 form.
    return "".join(
        chr(rng.choice([rng.randrange(0, 0xD800), rng.randrange(0xE000, 0x110000), rng.randrange(128)]))
        for _ in range(n)
    )


CASES = HARD + [random_string(s) for s in range(3)]
CASE_IDS = [f"case{i}" for i in range(len(CASES))]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe(TEXTS, vocab_size=400)


@pytest.mark.parametrize("text", CASES, ids=CASE_IDS)
def test_bpe_round_trip(bpe: Tokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bpe_shape_and_eot(bpe: Tokenizer) -> None:
    assert (bpe.kind, bpe.vocab_size) == ("bpe", 400)
    assert isinstance(bpe.eot_id, int)
    assert bpe.decode([bpe.eot_id]) == EOT
    # Text that spells the token stays text: only prepare inserts the id.
    assert bpe.eot_id not in bpe.encode(f"x{EOT}y")
    # Merges were learnt: training text takes fewer tokens than bytes.
    assert len(bpe.encode(TEXTS[0])) < 0.8 * len(TEXTS[0].encode())
    assert bpe.encode_batch(TEXTS[:2]) == [bpe.encode(t) for t in TEXTS[:2]]


def test_bpe_is_deterministic(bpe: Tokenizer) -> None:
    again = Tokenizer.train_bpe(TEXTS, vocab_size=400)
    assert again.hf.to_str() == bpe.hf.to_str()
    other = Tokenizer.train_bpe(TEXTS[:3], vocab_size=400)
    assert other.hf.to_str() != bpe.hf.to_str()


def test_bpe_vocab_too_small() -> None:
    with pytest.raises(DataError, match="257"):
        Tokenizer.train_bpe(TEXTS, vocab_size=256)


@pytest.mark.parametrize("text", CASES, ids=CASE_IDS)
def test_bytes_ids_are_byte_values(text: str) -> None:
    tok = Tokenizer.bytes()
    assert tok.encode(text) == list(text.encode("utf-8"))
    # The saved pipeline (what transformers would load) agrees with the fast path used here.
    assert tok.hf.encode(text, add_special_tokens=False).ids == list(text.encode("utf-8"))
    assert tok.hf.decode(list(text.encode("utf-8"))) == text
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_array(text).tolist() == list(text.encode("utf-8"))


def test_bytes_shape() -> None:
    tok = Tokenizer.bytes()
    assert (tok.kind, tok.vocab_size, tok.eot_id) == ("bytes", 256, None)
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # a cut multi-byte character decodes, lossily
    with pytest.raises(DataError, match="0..255"):
        tok.decode([300])


def test_byte_symbols_match_byte_level() -> None:
    symbols = byte_symbols()
    assert len(set(symbols)) == 256
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
    text = "".join(chr(c) for c in range(0x250)) + SAMPLE
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    assert "".join(p for p, _ in pieces) == "".join(symbols[b] for b in text.encode("utf-8"))


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
@pytest.mark.parametrize("target", ["folder", "file.json"])
def test_save_load(bpe: Tokenizer, tmp_path, kind: str, target: str) -> None:
    tok = bpe if kind == "bpe" else Tokenizer.bytes()
    written = tok.save(tmp_path / target)
    assert written.name == ("tokenizer.json" if target == "folder" else "file.json")
    loaded = Tokenizer.load(tmp_path / target)
    assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == (tok.kind, tok.vocab_size, tok.eot_id)
    assert loaded.encode(SAMPLE + EOT) == tok.encode(SAMPLE + EOT)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="no tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable tokenizer"):
        Tokenizer.load(tmp_path)
