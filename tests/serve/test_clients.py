"""A real server on 127.0.0.1: the official `openai` client unchanged, and batching across requests of
different depths giving the same tokens as serving each request alone."""

from __future__ import annotations

import concurrent.futures
import threading

import httpx
import pytest
from conftest import MODEL, sample
from helpers import require_optional

from looped.infer.engine import Engine

openai = require_optional("openai", "test")


def test_openai_client(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    r = client.completions.create(
        model=MODEL,
        prompt="The king",
        max_tokens=5,
        temperature=0,
        extra_body={"loops": 2, "loops_per_token": True},
    )
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    assert r.model_extra["looped"]["loops_per_token"] == [2] * r.usage.completion_tokens
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Speak."}],
        max_tokens=4,
        extra_body={"compute": "fast"},
    )
    assert chat.choices[0].message.role == "assistant" and chat.model_extra["looped"]["mean_loops"] == 1
    texts = client.chat.completions.create(  # content as a list of text parts
        model=MODEL,
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Spe"}, {"type": "text", "text": "ak."}]}
        ],
        max_tokens=4,
        temperature=0,
    )
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://a/b.png"}}]}
            ],
        )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Speak."}],
        max_tokens=4,
        stream=True,
        temperature=0,
    )
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    whole = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Speak."}], max_tokens=4, temperature=0
    )
    assert "".join(parts) == whole.choices[0].message.content == texts.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="loops"):
        client.completions.create(model=MODEL, prompt="a", extra_body={"loops": 0})
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        client.completions.create(model="gpt-4o", prompt="a")


def test_batching_mixed_depths_gives_the_tokens_of_each_request_alone(server, trained):
    url, _ = server
    prompts = ["The king", "A", "Now is the", "Good my lord", "O", "What say", "The queen is", "Fie"]
    loops = [1, 2, 3, 4, 6, 8, 2, 16]
    reference = Engine.from_checkpoint(trained)  # its own engine: the server's belongs to the server thread
    alone = [
        reference.generate(p, loops=t, max_new_tokens=8, temperature=0).text
        for p, t in zip(prompts, loops, strict=True)
    ]

    def steps() -> tuple[float, float]:  # (engine steps, steps that decoded one request) from GET /metrics
        text = httpx.get(f"{url}/metrics").text
        return sample(text, "looped_batch_size_count"), sample(text, "looped_batch_size_bucket", le="1.0")

    before = steps()
    barrier = threading.Barrier(len(prompts))

    def ask(i: int) -> dict:
        barrier.wait()
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 8, "temperature": 0, "loops": loops[i]}
        return httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, range(len(prompts))))
    assert [g["choices"][0]["text"] for g in got] == alone
    assert [g["looped"]["mean_loops"] for g in got] == loops
    (total, single), (total_before, single_before) = steps(), before
    assert (total - total_before) - (single - single_before) > 0  # some steps decoded several requests
    assert httpx.get(f"{url}/health").json()["running"] == 0
