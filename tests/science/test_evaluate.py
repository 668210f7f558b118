"""`looped eval`: loss, perplexity and bits per byte against loops; adaptive exit decoded through the cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from looped.checkpoint import load, load_config_dir
from looped.cli import main
from looped.data.loader import TokenData, val_windows
from looped.eval import loss_by_loops
from looped.science.evaluate import decode_loss, evaluate_checkpoint


@pytest.fixture(scope="module")
def windows(trained):
    cfg = load_config_dir(trained)
    return val_windows(TokenData.open(cfg.data.path), 24, 4)


def test_decode_loss_with_the_per_loop_cache_equals_the_full_forward(trained, windows):
    model = load(trained)
    full = loss_by_loops(model, windows, [1, 3])
    for t in (1, 3):
        loss, mean = decode_loss(model, windows, t, kv_cache="per-loop")
        assert loss == pytest.approx(full[t], abs=1e-4) and mean == t
    shared, _ = decode_loss(model, windows, 3, kv_cache="shared")
    assert shared != pytest.approx(full[3], abs=1e-6)  # the shared rule is a different computation
    exit_loss, exit_mean = decode_loss(model, windows, 8, exit="kl:1e-2")
    assert 1 < exit_mean < 8 and math.isfinite(exit_loss)


def test_bits_per_byte_and_exit_rows(trained, tmp_path):
    result = evaluate_checkpoint(
        str(trained), [1, 4], max_windows=4, exit="kl:1e-2", plot=str(tmp_path / "l.png")
    )
    assert result["bytes"] == result["tokens"]  # the bytes tokenizer: one byte per token
    for row in result["rows"]:
        assert row["bits_per_byte"] == pytest.approx(row["loss"] / math.log(2))
    assert [r["loop_limit"] for r in result["exit_rows"]] == [1, 4]
    assert result["exit_rows"][0]["mean_loops"] == 1 and result["exit_rows"][1]["mean_loops"] < 4
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_in_bfloat16(trained):
    fp32 = evaluate_checkpoint(str(trained), [1, 4], max_windows=4, exit="kl:1e-2")
    bf16 = evaluate_checkpoint(str(trained), [1, 4], max_windows=4, exit="kl:1e-2", dtype="bfloat16")
    for a, b in zip(fp32["rows"] + fp32["exit_rows"], bf16["rows"] + bf16["exit_rows"], strict=True):
        assert b["loss"] != a["loss"] and b["loss"] == pytest.approx(a["loss"], abs=0.05)  # bf16 rounding
    with pytest.raises(ValueError, match="unknown dtype"):
        evaluate_checkpoint(str(trained), [1], max_windows=4, dtype="float8")


def test_bits_per_byte_counts_the_bytes_of_bpe_tokens():
    from looped.data.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(["the cat sees the moon, façade café"] * 30, vocab_size=290)
    text = "the café sees a façade"
    ids = tok.encode(text)
    assert int(tok.token_bytes()[torch.tensor(ids).numpy()].sum()) == len(text.encode())
    assert tok.token_bytes()[tok.eot_id] == 0


def test_cli_eval_with_exit(trained, capsys):
    assert main(["eval", str(trained), "--loops", "2,6", "--max-windows", "2", "--exit", "state:5e-2"]) == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out and "adaptive exit state:5e-2" in out and "loop limit mean loops" in out
    assert (
        main(["eval", str(trained), "--loops", "2", "--max-windows", "2", "--exit", "kl:1e-3", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["exit_rows"][0]["loop_limit"] == 2
    assert main(["eval", str(trained), "--loops", "2", "--exit", "bogus:1"]) == 2
    assert "unknown exit criterion" in capsys.readouterr().err


def test_report_of_a_training_run(trained, tmp_path, capsys):
    run = trained.parent
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "Training run" in page and "data:image/png;base64," in page
    assert main(["report", str(tmp_path)]) == 2
    assert "nothing to report" in capsys.readouterr().err
