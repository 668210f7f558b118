"""prepare: shards decode back to the documents, split by document, manifest checksums, atomic output."""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import random_text

from looped.data import EOT, DataError, Document, Tokenizer, iter_documents, prepare
from looped.data import encode as encode_module
from looped.data.prepare import cut_document, split_documents, split_stream, token_dtype

# `looped.data.prepare` is the function; the module is reached by its full name.
prepare_module = importlib.import_module("looped.data.prepare")


def split_tokens(out: Path, manifest: dict, split: str) -> np.ndarray:
    """A split's tokens, read straight from its shard files in manifest order."""
    files = [s["file"] for s in manifest["shards"] if s["split"] == split]
    return np.concatenate([np.fromfile(out / f, dtype="<u2") for f in files])


def doc_names(out: Path, manifest: dict, split: str) -> list[str]:
    """A split's document names, in order, from its {split}_documents.jsonl."""
    lines = (out / manifest["documents"][split]["file"]).read_text().splitlines()
    return [json.loads(line)["name"] for line in lines]


def texts_by_name(source) -> dict[str, str]:
    return {d.name: d.text for d in iter_documents(source)}


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_shards_decode_to_documents(make_corpus, tmp_path: Path, kind: str) -> None:
    src = make_corpus(n=12)
    out = tmp_path / "out"
    manifest = prepare(
        src, out, tokenizer=kind, vocab_size=300, val_fraction=0.3, shard_tokens=700, progress=False
    )
    texts = texts_by_name(src)
    train, val = (doc_names(out, manifest, s) for s in ("train", "val"))
    assert train and val and not set(train) & set(val) and sorted(train + val) == sorted(texts)
    assert manifest["documents"]["train"]["count"] == len(train)
    tok = Tokenizer.load(out)
    separator = EOT if kind == "bpe" else "\n\n"
    assert (manifest["tokenizer"], manifest["eot_id"], manifest["separator"]) == (kind, tok.eot_id, separator)
    for split, names in (("train", train), ("val", val)):
        tokens = split_tokens(out, manifest, split)
        assert len(tokens) == manifest["tokens"][split]
        assert tok.decode(tokens) == separator.join(texts[n] for n in names)
    assert sum(s["split"] == "train" for s in manifest["shards"]) > 1  # crossing shard boundaries was tested


def test_manifest_checksums_and_dtype(make_corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = prepare(make_corpus(n=6), out, tokenizer="bytes", shard_tokens=1000, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert (manifest["format"], manifest["version"], manifest["dtype"]) == ("looped-tokens", 1, "uint16")
    assert (manifest["seed"], manifest["val_fraction"], manifest["vocab_size"]) == (0, 0.05, 256)
    files = sorted(p.name for p in out.iterdir())
    listed = [s["file"] for s in manifest["shards"]] + [d["file"] for d in manifest["documents"].values()]
    assert files == sorted(listed + ["manifest.json", "tokenizer.json"])
    for shard in manifest["shards"]:
        data = (out / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(data) == 2 * shard["tokens"] and shard["tokens"] <= 1000
    assert [s["file"] for s in manifest["shards"] if s["split"] == "train"][:2] == [
        "train_000.bin",
        "train_001.bin",
    ]


def test_token_dtype_by_vocab() -> None:
    assert token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")


def test_bpe_is_trained_on_train_only(make_corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = Tokenizer.train_bpe.__func__

    def spy(cls, texts, vocab_size=4096, progress=False):
        texts = list(texts)
        seen.extend(texts)
        return real(cls, texts, vocab_size, progress)

    monkeypatch.setattr(Tokenizer, "train_bpe", classmethod(spy))
    src = make_corpus(n=10)
    manifest = prepare(src, tmp_path / "out", vocab_size=300, val_fraction=0.3, progress=False)
    texts = texts_by_name(src)
    assert seen == [texts[n] for n in doc_names(tmp_path / "out", manifest, "train")]


def test_split_is_per_document_and_seeded() -> None:
    docs = [Document(f"d{i}", "x") for i in range(200)]
    train, val = split_documents(docs, 0.1, seed=0)
    assert 5 <= len(val) <= 40 and len(train) + len(val) == 200
    assert [d.name for d in train] == [d.name for d in docs if d not in val]  # source order kept
    # A document's split depends on (seed, name) only: adding documents moves none of the others.
    _, val_more = split_documents(docs + [Document(f"e{i}", "x") for i in range(50)], 0.1, seed=0)
    assert {d.name for d in val_more if d.name.startswith("d")} == {d.name for d in val}
    assert split_documents(docs, 0.1, seed=1)[1] != val


@pytest.mark.parametrize("fraction", [1e-9, 1 - 1e-9])
def test_split_keeps_one_document_each_side(fraction: float) -> None:
    train, val = split_documents([Document(f"d{i}", "x") for i in range(5)], fraction, seed=0)
    assert len(train) >= 1 and len(val) >= 1


def test_single_document_is_cut_into_pieces(tmp_path: Path) -> None:
    text = random_text(7, 4000)
    (tmp_path / "one.txt").write_text(text)
    out = tmp_path / "out"
    manifest = prepare(tmp_path / "one.txt", out, tokenizer="bytes", progress=False)
    assert manifest["pieces"]["document"] == "one.txt" and 32 <= manifest["pieces"]["count"] <= 80
    names = doc_names(out, manifest, "train") + doc_names(out, manifest, "val")
    assert len(names) == manifest["pieces"]["count"] and manifest["documents"]["val"]["count"] >= 1
    pieces = cut_document(Document("one.txt", text))
    assert "".join(p.text for p in pieces) == text
    assert all(p.text.endswith("\n\n") for p in pieces[:-1])  # cut at blank lines
    by_name = {p.name: p.text for p in pieces}
    val = doc_names(out, manifest, "val")
    assert Tokenizer.bytes().decode(split_tokens(out, manifest, "val")) == "\n\n".join(
        by_name[n] for n in val
    )


def test_cut_without_blank_lines_or_newlines() -> None:
    lines = cut_document(Document("l", "line\n" * 500))
    assert len(lines) > 1 and all(p.text.endswith("\n") for p in lines)
    flat = cut_document(Document("f", "x" * 640))
    assert len(flat) == 64 and "".join(p.text for p in flat) == "x" * 640
    with pytest.raises(DataError, match="too short"):
        cut_document(Document("tiny", "x"))


def test_deterministic(make_corpus, tmp_path: Path) -> None:
    src = make_corpus(n=8)
    a = prepare(src, tmp_path / "a", vocab_size=300, progress=False)
    b = prepare(src, tmp_path / "b", vocab_size=300, progress=False)
    assert a == b
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()


def test_no_overwrite_and_atomic(make_corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_corpus(n=4)
    out = tmp_path / "out"
    first = prepare(src, out, tokenizer="bytes", progress=False)
    with pytest.raises(DataError, match="not empty; pass overwrite=True"):
        prepare(src, out, tokenizer="bytes", seed=5, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == first
    second = prepare(src, out, tokenizer="bytes", seed=5, progress=False, overwrite=True)
    assert json.loads((out / "manifest.json").read_text()) == second and second["seed"] == 5

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare(src, stranger, tokenizer="bytes", progress=False, overwrite=True)
    assert (stranger / "precious.txt").read_text() == "keep me"

    # A failure half-way (here: while saving the tokenizer) leaves neither `out` nor a temporary folder.
    def boom(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tokenizer, "save", boom)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "killed", tokenizer="bytes", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_empty_source_and_bad_arguments(tmp_path: Path, make_corpus) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="no text"):
        prepare(tmp_path / "empty", tmp_path / "out", progress=False)
    src = make_corpus(n=3)
    for kw, message in [
        ({"val_fraction": 0}, "val_fraction"),
        ({"tokenizer": "char"}, "tokenizer must be"),
        ({"shard_tokens": 0}, "shard_tokens"),
    ]:
        with pytest.raises(DataError, match=message):
            prepare(src, tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_flows_through(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    for i in range(4):
        (tmp_path / "src" / f"ok{i}.txt").write_text(f"document {i}\n")
    (tmp_path / "src" / "bad.txt").write_bytes(b"abc\xffdef")
    warnings: list[str] = []
    manifest = prepare(
        tmp_path / "src",
        tmp_path / "out",
        tokenizer="bytes",
        invalid_utf8="skip",
        warn=warnings.append,
        progress=False,
    )
    names = doc_names(tmp_path / "out", manifest, "train") + doc_names(tmp_path / "out", manifest, "val")
    assert "bad.txt" not in names and len(names) == 4
    assert len(warnings) == 1 and "bad.txt: invalid UTF-8 at byte offset 3" in warnings[0]
    with pytest.raises(DataError, match="byte offset 3"):
        prepare(tmp_path / "src", tmp_path / "out2", invalid_utf8="error", progress=False)


def test_shakespeare_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = prepare("shakespeare", tmp_path / "out", tokenizer="bytes", progress=True)
    plays = texts_by_name("shakespeare")
    counts = {s: manifest["documents"][s]["count"] for s in ("train", "val")}
    assert counts["train"] + counts["val"] == 42 and counts["val"] >= 1
    total_bytes = sum(len(t.encode()) for t in plays.values())
    # Every byte of every play, plus a two-byte separator between neighbouring documents of a split.
    assert sum(manifest["tokens"].values()) == total_bytes + 2 * (42 - 2)
    assert "tokenizing" in capsys.readouterr().err


# Streaming: the output does not depend on the worker count, reading stays a few batches ahead of writing.


def test_workers_do_not_change_the_output(make_corpus, tmp_path: Path, monkeypatch) -> None:
    # Batches and segments smaller than a document: several batches, documents encoded in pieces.
    monkeypatch.setattr(encode_module, "BATCH_CHARS", 1500)
    monkeypatch.setattr(encode_module, "SEGMENT_CHARS", 400)
    src = make_corpus(n=12, words=200)
    kw = {"vocab_size": 300, "val_fraction": 0.3, "shard_tokens": 500, "progress": False}
    one = prepare(src, tmp_path / "one", workers=1, **kw)
    two = prepare(src, tmp_path / "two", workers=2, **kw)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(one["shards"]) > 4
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert one == two
    # The reference: each whole document encoded on its own in this process, joined by end-of-text.
    tok, texts = Tokenizer.load(tmp_path / "one"), texts_by_name(src)
    for split in ("train", "val"):
        expected = []
        for i, name in enumerate(doc_names(tmp_path / "one", one, split)):
            expected += ([tok.eot_id] if i else []) + tok.encode(texts[name])
        assert split_tokens(tmp_path / "one", one, split).tolist() == expected
    # A given tokenizer.json gives the same shards as the run that fitted it.
    given = prepare(src, tmp_path / "given", tokenizer=tmp_path / "one" / "tokenizer.json", workers=2, **kw)
    assert given["shards"] == one["shards"] and given["bpe_sample"] is None


class CountingSource:
    """A fake source of `n` documents of 100 characters that counts what each read has taken."""

    def __init__(self, n: int) -> None:
        self.n, self.reads = n, []

    def __call__(self, source, text_field, invalid_utf8, warn):
        self.reads.append(0)
        for i in range(self.n):
            self.reads[-1] += 1
            yield Document(f"doc{i}", random_text(i, 20)[:99].ljust(99) + "\n")


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_reading_stays_a_few_batches_ahead(kind: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(encode_module, "BATCH_CHARS", 1000)  # 10 documents a batch
    source = CountingSource(1500)
    monkeypatch.setattr(prepare_module, "iter_documents", source)
    ahead = []
    add = prepare_module._ShardWriter.add

    def spy(self, name, ids):
        ahead.append(source.reads[-1] - int(name.removeprefix("doc")) - 1)
        add(self, name, ids)

    monkeypatch.setattr(prepare_module._ShardWriter, "add", spy)
    manifest = prepare(
        "fake", tmp_path / "out", tokenizer=kind, vocab_size=300, bpe_sample=3000, workers=2, progress=False
    )
    assert sum(d["count"] for d in manifest["documents"].values()) == 1500 and len(ahead) == 1500
    # In flight at most: 2 batches per worker, the batch being filled, the one being written (6 × 10
    # documents), the document the split holds back and the two read to find out if there are several.
    assert max(ahead) <= 63
    if kind == "bpe":
        # The fitting read stopped once it had 3000 characters of train documents (~30 of the 1500).
        assert len(source.reads) == 2 and source.reads[0] <= 40
        assert manifest["bpe_sample"] == {"documents": 30, "characters": 3000, "limit": 3000}


def test_split_stream_decides_by_hash_and_fills_an_empty_split() -> None:
    docs = [Document(f"d{i}", "x") for i in range(300)]
    pairs = list(split_stream(docs, 0.2, seed=3))
    assert [d for d, _ in pairs] == docs
    # The rule, recomputed here: the first 8 bytes of sha256("seed\0name") as a fraction of 2^64.
    unit = [int.from_bytes(hashlib.sha256(f"3\0{d.name}".encode()).digest()[:8], "big") / 2**64 for d in docs]
    assert [s for _, s in pairs] == ["val" if u < 0.2 else "train" for u in unit]
    # When no other document fell into a split, the last document goes there.
    for fraction, lonely in ((1e-9, "val"), (1 - 1e-9, "train")):
        splits = [s for _, s in split_stream(docs[:5], fraction, seed=0)]
        assert splits == [{"val": "train", "train": "val"}[lonely]] * 4 + [lonely]


def test_error_mid_stream_leaves_nothing(make_corpus, tmp_path: Path, monkeypatch) -> None:
    import multiprocessing

    monkeypatch.setattr(encode_module, "BATCH_CHARS", 500)
    real = prepare_module.iter_documents
    calls = []

    def failing(*args):
        calls.append(1)
        for i, doc in enumerate(real(*args)):
            if i == 8 and len(calls) == 2:  # in the writing read, after some batches went to the workers
                raise DataError("doc_08.txt: broken")
            yield doc

    monkeypatch.setattr(prepare_module, "iter_documents", failing)
    before = sorted(p.name for p in tmp_path.iterdir())
    src = make_corpus(n=12)
    with pytest.raises(DataError, match="broken"):
        prepare(src, tmp_path / "out", vocab_size=300, workers=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + [src.name])
    assert not multiprocessing.active_children()


def test_hf_split_is_streamed(tmp_path: Path, monkeypatch) -> None:
    import sys
    import types

    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": f"{split} row {i}\n"} for i in range(6)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = tmp_path / "out"
    manifest = prepare("hf:org/set@validation", out, tokenizer="bytes", val_fraction=0.3, progress=False)
    assert calls == [("org/set", None, "validation", True)]
    names = doc_names(out, manifest, "train") + doc_names(out, manifest, "val")
    assert sorted(names) == [f"org/set@validation:{i}" for i in range(6)]
    assert b"validation row" in (out / "train_000.bin").read_bytes()[::2]
