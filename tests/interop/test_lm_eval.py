"""lm-eval-harness through the exported model: a tiny local multiple-choice task gets an accuracy, and the
log-likelihood of every choice is the native model's at the num_loops passed in model_args."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import fixture_dir, randomize_, require_optional, tiny

import looped
from looped.data.tokenizer import Tokenizer

require_optional("transformers", "eval")
require_optional("lm_eval", "eval")
from looped.interop.hf import export_hf  # noqa: E402

TASK = "looped_tiny_mc"
DOCS = [
    {"question": "the cat sees", "choices": ["the moon.", "a rose.", "the sea."], "answer": 0},
    {"question": "a dog loves", "choices": ["the moon.", "a rose.", "the sea."], "answer": 1},
    {"question": "the king fears", "choices": ["the queen.", "his horse.", "the sea."], "answer": 2},
    {"question": "sweet kate mocks", "choices": ["her ring.", "the fool.", "a rose."], "answer": 0},
    {"question": "my lord greets", "choices": ["the queen.", "a rose.", "his horse."], "answer": 2},
]


def write_task(folder) -> None:
    """A multiple-choice task over a local jsonl file (lm-eval's `json` dataset builder, no network)."""
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data))}\n"
        f"  cache_dir: {json.dumps(str(folder / 'datasets'))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )


def native_loglikelihood(model, tok: Tokenizer, context: str, continuation: str, loops: int) -> float:
    """log p(continuation | context), split into tokens the way lm-eval does (whole string, then context)."""
    whole = tok.encode(context + continuation)
    n = len(tok.encode(context))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]]), loops=loops).logits[0], dim=-1)
    return sum(float(logp[n - 1 + i, t]) for i, t in enumerate(whole[n:]))


def check_lm_eval(native, tok: Tokenizer, ckpt, tmp_path, monkeypatch, loops: int) -> None:
    """Export `ckpt` (holding `native` and `tok`), run the task through lm-eval at `loops`, and check every
    log-likelihood against the native model and the accuracy against those."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = export_hf(ckpt, tmp_path / "hf")
    write_task(tmp_path)
    results = simple_evaluate(
        model="hf",
        model_args=f"pretrained={out},num_loops={loops},dtype=float32,backend=causal",
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        device="cpu",
        batch_size=4,
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    correct = []
    for sample in samples:
        got = [float(r[0]) for r in sample["filtered_resps"]]
        expected = [
            native_loglikelihood(native, tok, ctx, cont, loops=loops) for ctx, cont in sample["arguments"]
        ]
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-4), sample["doc"]
        correct.append(max(range(len(got)), key=got.__getitem__) == sample["doc"]["answer"])
    # num_loops reached the model: one loop scores differently
    ctx, cont = samples[0]["arguments"][0]
    assert (
        abs(native_loglikelihood(native, tok, ctx, cont, loops=1) - float(samples[0]["filtered_resps"][0][0]))
        > 1e-3
    )
    acc = results["results"][TASK]["acc,none"]
    assert acc == pytest.approx(sum(correct) / len(correct))


def task_tokenizer() -> Tokenizer:
    texts = [d["question"] + " " + c for d in DOCS for c in d["choices"]] * 4
    return Tokenizer.train_bpe(texts, vocab_size=300)


def test_lm_eval_multiple_choice_matches_the_native_model(tmp_path, monkeypatch):
    tok = task_tokenizer()
    native = randomize_(looped.LoopedLM(tiny(vocab_size=tok.vocab_size)), seed=5).eval()
    ckpt = looped.save(native, tmp_path / "ckpt")
    tok.save(ckpt)
    check_lm_eval(native, tok, ckpt, tmp_path, monkeypatch, loops=2)


def test_lm_eval_on_a_converted_ouro_checkpoint(tmp_path, monkeypatch):
    """An imported family through the same path: Ouro's fixture converted, with a tokenizer of its vocabulary."""
    from looped.interop.convert import convert

    _, ckpt = convert(fixture_dir("ouro-tiny"), tmp_path / "ouro")
    tok = task_tokenizer()  # 300 ids, within Ouro's 512
    tok.save(ckpt)
    check_lm_eval(looped.load(ckpt), tok, ckpt, tmp_path, monkeypatch, loops=3)
