"""The HTTP API: each endpoint, streaming, the table of bad requests, keys, tiers, caps and limits."""

from __future__ import annotations

import json
import time

import pytest
from conftest import MODEL, client_for

from looped.serve.auth import hash_key


def complete(client, **body):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "The king", **body})


def events(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_completion_reports_loops_flops_and_timings(client, engine):
    r = complete(client, max_tokens=6, loops=3, temperature=0, loops_per_token=True)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    alone = engine.generate("The king", loops=3, max_new_tokens=6, temperature=0)
    assert body["choices"][0]["text"] == alone.text
    assert body["choices"][0]["finish_reason"] == alone.finish_reason
    assert body["usage"]["completion_tokens"] == len(alone.token_ids)
    looped = body["looped"]
    assert looped["loops_per_token"] == [3] * len(alone.token_ids) and looped["mean_loops"] == 3
    assert looped["flops_per_token"] == pytest.approx(alone.flops_per_token)
    assert set(looped["timings"]) == {"queue_ms", "prefill_ms", "decode_ms", "ttft_ms", "total_ms"}


def test_several_prompts_and_tiers(client):
    r = complete(client, prompt=["The king", "A"], max_tokens=3, compute="fast")
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["looped"]["tier"] == "fast" and body["looped"]["mean_loops"] == 1
    r = complete(client, max_tokens=3, compute="balanced", loops_per_token=True)  # kl exit, at most 4 loops
    assert all(1 <= t <= 4 for t in r.json()["looped"]["loops_per_token"])
    r = complete(client, prompt=[[70, 71, 72]], max_tokens=2)  # token ids
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3


def test_chat_and_streaming(client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Speak."}], "max_tokens": 5}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    msg = r.json()["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "temperature": 0}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        got = events(r)
    assert got[-1] == "[DONE]" and got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in got[:-1])
    whole = client.post("/v1/chat/completions", json={**body, "temperature": 0}).json()
    assert text == whole["choices"][0]["message"]["content"]
    assert (
        got[-2]["choices"][0]["finish_reason"] in ("stop", "length") and got[-2]["usage"]["completion_tokens"]
    )
    loops = [t for e in got[:-1] for t in e["looped"]["loops"]]
    assert len(loops) == got[-2]["usage"]["completion_tokens"]  # every token's loops reach the client


def test_streamed_completion_matches_whole(client):
    with client.stream(
        "POST",
        "/v1/completions",
        json={"model": MODEL, "prompt": "The", "max_tokens": 8, "temperature": 0, "stream": True, "loops": 2},
    ) as r:
        got = events(r)
    text = "".join(e["choices"][0]["text"] for e in got[:-1])
    assert (
        text
        == complete(client, prompt="The", max_tokens=8, temperature=0, loops=2).json()["choices"][0]["text"]
    )
    assert got[-2]["looped"]["mean_loops"] == 2


def test_models_health_metrics_and_page(client):
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL and set(models["data"][0]["tiers"]) == {
        "fast",
        "balanced",
        "best",
    }
    assert client.get("/health").json()["status"] == "ok"
    complete(client, max_tokens=2)
    text = client.get("/metrics").text
    assert 'looped_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "# TYPE looped_request_seconds histogram" in text and "looped_loops_total" in text
    page = client.get("/")
    assert page.status_code == 200 and 'id="strip"' in page.text and MODEL in page.text


BAD = [
    ("bad JSON", b"{", "not valid JSON"),
    ("not UTF-8", b'{"model": "\xff"}', "not UTF-8"),
    ("not an object", b"[1, 2]", "JSON object"),
    ("no model", {"prompt": "a"}, "'model' is required"),
    ("unknown model", {"model": "gpt-5", "prompt": "a"}, "unknown model"),
    ("no prompt", {"model": MODEL}, "'prompt' must be"),
    ("empty prompt", {"model": MODEL, "prompt": ""}, "empty"),
    ("prompt of wrong type", {"model": MODEL, "prompt": 5}, "'prompt' must be"),
    ("max_tokens of wrong type", {"model": MODEL, "prompt": "a", "max_tokens": "ten"}, "integer"),
    ("negative max_tokens", {"model": MODEL, "prompt": "a", "max_tokens": -1}, "≥ 0"),
    ("max_tokens over the cap", {"model": MODEL, "prompt": "a", "max_tokens": 10**6}, "cap"),
    ("loops 0", {"model": MODEL, "prompt": "a", "loops": 0}, "≥ 1"),
    ("negative loops", {"model": MODEL, "prompt": "a", "loops": -3}, "≥ 1"),
    ("loops over the cap", {"model": MODEL, "prompt": "a", "loops": 65}, "[1, 64]"),
    ("loops a string", {"model": MODEL, "prompt": "a", "loops": "4"}, "integer"),
    ("loops a bool", {"model": MODEL, "prompt": "a", "loops": True}, "integer"),
    ("prompt over the context", {"model": MODEL, "prompt": "x" * 200}, "context"),
    ("token id outside the vocabulary", {"model": MODEL, "prompt": [1, 99999]}, "vocabulary"),
    ("unknown exit", {"model": MODEL, "prompt": "a", "exit": "magic:1"}, "exit"),
    ("unknown tier", {"model": MODEL, "prompt": "a", "compute": "turbo"}, "'compute' must be one of"),
    ("temperature too high", {"model": MODEL, "prompt": "a", "temperature": 5}, "≤ 2"),
    ("n > 1", {"model": MODEL, "prompt": "a", "n": 2}, "not supported"),
    ("unknown field", {"model": MODEL, "prompt": "a", "loop": 2}, "unknown field 'loop'"),
    ("stop of wrong type", {"model": MODEL, "prompt": "a", "stop": 3}, "'stop'"),
    ("two budgets", {"model": MODEL, "prompt": "a", "loops": 2, "max_flops_per_token": 1e9}, "one of"),
]


@pytest.mark.parametrize("what,body,message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_400_and_the_server_keeps_serving(client, what, body, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, (what, r.text)
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert client.get("/health").json()["status"] == "ok"
    assert complete(client, max_tokens=1).status_code == 200


def test_bad_chat_messages(client):
    for messages in ([], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}]):
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_limits_body_queue_timeout(engine):
    with client_for(engine, max_body_bytes=200) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "a" * 300})
        assert r.status_code == 413 and "200 bytes" in r.json()["error"]["message"]
    with client_for(engine, queue_size=1, max_batch=1) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "max_tokens": 1})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert (
            c.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1}).status_code
            == 200
        )
    with client_for(engine, request_timeout_s=0.05, max_tokens=4096) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 60, "loops": 32})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        deadline = time.monotonic() + 10  # the timed-out request is stopped and its batch slot freed
        while c.get("/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/health").json() == {"status": "ok", "queued": 0, "running": 0}


def test_keys_tiers_caps_and_rates(engine):
    keys = [
        {
            "name": "alice",
            "sha256": hash_key("sk-alice"),
            "tiers": ["fast"],
            "max_loops": 2,
            "rate_per_minute": 3,
        },
        {"name": "bob", "sha256": hash_key("sk-bob")},
    ]
    with client_for(engine, keys=keys) as c:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 1}

        def post(key, **extra):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return c.post("/v1/completions", json={**body, **extra}, headers=headers)

        assert post(None).status_code == 401 and c.get("/v1/models").status_code == 401
        r = post("sk-wrong")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert "sk-wrong" not in r.text
        assert post("sk-alice", compute="best").status_code == 403
        r = post("sk-alice", loops=3)
        assert r.status_code == 400 and "[1, 2]" in r.json()["error"]["message"]
        for extra in ({"compute": "fast"}, {"loops": 2}, {}):  # refused requests did not count
            assert post("sk-alice", **extra).status_code == 200
        r = post("sk-alice", compute="fast")
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert post("sk-bob", loops=16).status_code == 200  # another key, no limits
        assert c.get("/v1/models", headers={"Authorization": "Bearer sk-bob"}).status_code == 200
        assert "sk-alice" not in c.get("/metrics").text


def test_hash_key_cli(capsys):
    from looped.cli import main

    assert main(["serve", "--hash-key", "sk-x"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("sk-x")


def test_serve_cli_starts_and_answers(trained, tmp_path):
    """`looped serve CKPT` as users run it: a process on a free port that answers, with the config's tiers."""
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_toml = tmp_path / "serve.toml"
    serve_toml.write_text('[serve]\nmodel_name = "tiny"\ntiers = { quick = { loops = 1 } }\n')
    cmd = [
        sys.executable,
        "-m",
        "looped",
        "serve",
        str(trained),
        "--port",
        str(port),
        "--config",
        str(serve_toml),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)
        r = httpx.post(
            url + "/v1/completions",
            json={"model": "tiny", "prompt": "a", "max_tokens": 2, "compute": "quick"},
        )
        assert r.status_code == 200 and r.json()["looped"]["mean_loops"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_cli_errors(tmp_path, capsys):
    from looped.cli import main

    assert main(["serve", str(tmp_path)]) == 2
    assert "looped serve: error:" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "needs a checkpoint" in capsys.readouterr().err


def test_example_serve_config(engine):
    """configs/serve.toml loads, and its example keys work as its comments say."""
    from pathlib import Path

    from looped.config import load_config

    cfg = load_config([Path(__file__).parents[2] / "configs" / "serve.toml"]).serve
    with client_for(engine, **cfg.to_dict()) as c:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 1}
        free = {"Authorization": "Bearer sk-free-example"}
        assert c.post("/v1/completions", json={**body, "compute": "fast"}, headers=free).status_code == 200
        assert c.post("/v1/completions", json={**body, "compute": "best"}, headers=free).status_code == 403
        pro = {"Authorization": "Bearer sk-pro-example"}
        assert c.post("/v1/completions", json={**body, "compute": "best"}, headers=pro).status_code == 200
