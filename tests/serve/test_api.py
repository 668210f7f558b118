"""The HTTP API: each endpoint, streaming, the table of bad requests, keys, tiers, caps and limits."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import time
from pathlib import Path

import pytest
from conftest import MODEL, client_for, sample, scrape

from looped.config import ServeConfig, load_config
from looped.errors import ConfigError
from looped.infer.engine import Engine
from looped.serve.app import create_app
from looped.serve.auth import PLACEHOLDER, hash_key
from looped.serve.protocol import chat_prompt

EXAMPLE = Path(__file__).parents[2] / "configs" / "serve.toml"


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
    page = client.get("/")
    assert page.status_code == 200 and 'id="strip"' in page.text and MODEL in page.text


def test_metrics_count_what_one_app_served(engine, client):
    """GET /metrics read by prometheus_client's parser: a second app in this process (the module's `client`
    lives on) counts exactly its own requests, tokens and loops."""
    assert complete(client, max_tokens=1).status_code == 200  # counted by the other app only
    with client_for(engine) as c:
        r = complete(c, max_tokens=4, loops=3, temperature=0, loops_per_token=True)
        assert r.status_code == 200 and complete(c, loops=0).status_code == 400
        response = c.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text, usage, looped = response.text, r.json()["usage"], r.json()["looped"]
    types = {name: family["type"] for name, family in scrape(text).items()}
    assert types["looped_requests"] == types["looped_loops"] == "counter"
    assert types["looped_request_seconds"] == types["looped_batch_size"] == "histogram"
    assert types["looped_queued_requests"] == types["looped_running_requests"] == "gauge"
    assert sample(text, "looped_requests_total", endpoint="/v1/completions", status="200") == 1
    assert sample(text, "looped_requests_total", endpoint="/v1/completions", status="400") == 1
    assert sample(text, "looped_generated_tokens_total") == usage["completion_tokens"]
    assert sample(text, "looped_prompt_tokens_total") == usage["prompt_tokens"]
    assert (
        sample(text, "looped_loops_total") == sum(looped["loops_per_token"]) == 3 * usage["completion_tokens"]
    )
    flops = looped["flops_per_token"] * usage["completion_tokens"]
    assert sample(text, "looped_flops_total") == pytest.approx(flops)
    assert sample(text, "looped_request_seconds_count") == 1
    assert sample(text, "looped_request_seconds_bucket", le="+Inf") == 1
    assert sample(text, "looped_time_to_first_token_seconds_count") == 1
    assert sample(text, "looped_batch_size_count") >= 1
    assert sample(text, "looped_queued_requests") == sample(text, "looped_running_requests") == 0


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


def chat(client, messages, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, **body})


def test_bad_chat_messages(client):
    for messages in ([], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}]):
        r = chat(client, messages)
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_chat_content_as_text_parts(client):
    """OpenAI's list-of-parts content: the text parts, joined, read as the same string would be."""
    parts = [{"type": "text", "text": "Spe"}, {"type": "text", "text": "ak."}]
    assert chat_prompt([{"role": "system", "content": [parts[0]]}, {"role": "user", "content": parts}]) == (
        "System: Spe\nUser: Speak.\nAssistant:"
    )
    whole = chat(client, [{"role": "user", "content": "Speak."}], max_tokens=6, temperature=0)
    split = chat(client, [{"role": "user", "content": parts}], max_tokens=6, temperature=0)
    assert split.status_code == 200, split.text
    assert split.json()["usage"] == whole.json()["usage"]
    assert split.json()["choices"][0]["message"] == whole.json()["choices"][0]["message"]


NOT_TEXT = [
    ("image", {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, 'type "image_url"'),
    ("audio", {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, 'type "input_audio"'),
    ("no type", {"text": "a"}, "type null"),
    ("a bare string", "a", "type null"),
    ("text not a string", {"type": "text", "text": 3}, "text must be a string"),
]


@pytest.mark.parametrize("what,part,message", NOT_TEXT, ids=[n[0] for n in NOT_TEXT])
def test_chat_content_parts_other_than_text_get_400(client, what, part, message):
    content = [{"type": "text", "text": "Look:"}, part]
    r = chat(client, [{"role": "user", "content": "Hi."}, {"role": "user", "content": content}])
    assert r.status_code == 400, (what, r.text)
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    assert error["message"].startswith("messages[1].content[1]") and message in error["message"]
    if what in ("image", "audio"):
        assert "only text parts" in error["message"]


def test_min_loops_over_the_loops_run_gets_400(client, engine):
    """A request's min_loops above the loops it runs per token is refused, wherever those loops come from;
    up to them it is honoured."""
    default = engine.model.cfg.loops
    cases = [
        (
            {"loops": 2, "min_loops": 3, "exit": "kl:1e-3"},
            "'min_loops' = 3 is more than the 2 loops",
            "'loops'",
        ),
        ({"compute": "fast", "min_loops": 2}, "more than the 1 loops", "tier 'fast'"),
        ({"min_loops": default + 1}, f"more than the {default} loops", "default loops"),
        ({"max_flops_per_token": 1e30, "min_loops": 65}, "more than the 64 loops", "loop cap of 64"),
    ]
    for extra, message, source in cases:
        r = complete(client, max_tokens=2, **extra)
        assert r.status_code == 400, (extra, r.text)
        error = r.json()["error"]
        assert message in error["message"] and source in error["message"] and error["param"] == "min_loops"
    r = complete(client, max_tokens=3, loops=3, min_loops=3, exit="kl:1e30", loops_per_token=True)
    assert r.status_code == 200 and set(r.json()["looped"]["loops_per_token"]) == {3}


def test_a_tier_with_min_loops_over_its_loops_is_a_startup_error(engine):
    tiers = {"odd": {"loops": 2, "min_loops": 3, "exit": "kl:1e-3"}}
    with pytest.raises(ValueError, match="serve.tiers.odd: min_loops = 3 is more than its loops = 2"):
        create_app(engine, ServeConfig(tiers=tiers))


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
            "loop_cap": 2,
            "rate_per_minute": 3,
        },
        {"name": "bob", "sha256": hash_key("sk-bob")},
        {"name": "carol", "sha256": hash_key("sk-carol"), "loop_cap": 2},
    ]
    with client_for(engine, keys=keys) as c:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 1}

        def post(key, **extra):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return c.post("/v1/completions", json={**body, **extra}, headers=headers)

        assert post(None).status_code == 401 and c.get("/v1/models").status_code == 401
        assert post(" ").status_code == 401  # an empty key is no key
        r = post("sk-wrong")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert "sk-wrong" not in r.text
        assert post("sk-alice", compute="best").status_code == 403
        r = post("sk-alice", loops=3)
        assert r.status_code == 400 and "[1, 2]" in r.json()["error"]["message"]
        r = post("sk-alice", min_loops=3)  # the model's 4 loops, held at the key's 2
        assert r.status_code == 400 and "loop cap of 2 for this caller" in r.json()["error"]["message"]
        for extra in ({"compute": "fast"}, {"loops": 2}, {}):  # refused requests did not count
            assert post("sk-alice", **extra).status_code == 200
        r = post("sk-alice", compute="fast")
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert post("sk-bob", loops=16).status_code == 200  # another key, no limits
        for tier in ("balanced", "best"):  # a tier's 4 or 16 loops are held at carol's 2
            r = post("sk-carol", compute=tier, max_tokens=3, loops_per_token=True)
            assert r.status_code == 200, r.text
            assert r.json()["looped"]["max_loops"] <= 2 and r.json()["looped"]["tier"] == tier
        assert post("sk-carol", compute="best", loops=3).status_code == 400  # loops it asked for itself
        assert c.get("/v1/models", headers={"Authorization": "Bearer sk-bob"}).status_code == 200
        assert "sk-alice" not in c.get("/metrics").text


def test_hash_key():
    """The digest is SHA-256 of the key as sent, without the whitespace a terminal or a header adds."""
    assert hash_key("sk-x") == hashlib.sha256(b"sk-x").hexdigest()
    assert hash_key(" sk-x\n") == hash_key("sk-x")
    with pytest.raises(ValueError, match="empty"):
        hash_key(" \n")


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


def test_example_serve_config_ships_no_working_key(engine, trained, monkeypatch, capsys):
    """configs/serve.toml holds placeholders, not digests of public keys; serving it as shipped stops at once
    with a message that says what to do, before the model loads."""
    cfg = load_config([EXAMPLE]).serve
    assert cfg.keys and {k["sha256"] for k in cfg.keys} == {PLACEHOLDER}
    with pytest.raises(ConfigError, match="looped serve --hash-key"):
        create_app(engine, cfg)

    def never(*args, **kwargs):
        raise AssertionError("the server started with placeholder keys")

    monkeypatch.setattr("uvicorn.run", never)
    monkeypatch.setattr("looped.infer.engine.Engine.from_checkpoint", never)
    from looped.cli import main

    assert main(["serve", str(trained), "--config", str(EXAMPLE)]) == 2
    err = capsys.readouterr().err
    assert "'free', 'pro'" in err and "placeholder" in err and "looped serve --hash-key" in err


def test_example_serve_config_with_own_keys(engine):
    """configs/serve.toml with the digests of keys made here: its tiers and limits work as its comments say."""
    cfg = load_config([EXAMPLE]).serve
    secret = {name: secrets.token_urlsafe(16) for name in ("free", "pro")}
    keys = [dict(k, sha256=hash_key(secret[k["name"]])) for k in cfg.keys]
    with client_for(engine, **(cfg.to_dict() | {"keys": keys})) as c:

        def post(name, **extra):
            body = {"model": MODEL, "prompt": "a", "max_tokens": 1, **extra}
            return c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {secret[name]}"})

        assert post("free", compute="fast").status_code == 200
        assert post("free", compute="best").status_code == 403
        assert post("free", loops=5).status_code == 400  # at most 4 loops per token
        assert post("pro", compute="best").status_code == 200
        assert post("pro", loops=16).status_code == 200


def _served_engine(checkpoint, monkeypatch, capsys, overrides=()):
    """The engine `looped serve CHECKPOINT --set ...` would serve (uvicorn.run is caught: nothing listens)."""
    from looped.serve.app import serve

    apps = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: apps.append(app))
    serve(checkpoint, [], list(overrides))
    assert "looped serve: model" in capsys.readouterr().out
    return apps[0].state.scheduler.engine


def test_serve_loads_a_checkpoint_saved_before_the_renames(trained, tmp_path, monkeypatch, capsys):
    """A config.toml that says `max_loops` in [loops] and [infer] (written before the renames) serves, with
    its values under the new names."""
    old = tmp_path / "old"
    shutil.copytree(trained, old)
    text = (old / "config.toml").read_text()
    text, n = re.subn(r"(?m)^max_request_loops = \d+$", "max_loops = 24", text)
    assert n == 1 and "max_sampled_loops" not in text  # None (derived) is not written: add the old key
    text = text.replace("[loops]\n", "[loops]\nmax_loops = 12\n", 1)
    (old / "config.toml").write_text(text)
    engine = _served_engine(old, monkeypatch, capsys)
    assert engine.infer.max_request_loops == 24


def test_serve_set_infer_reaches_the_engine(trained, monkeypatch, capsys):
    """`looped serve … --set infer.kv_cache=per-loop` builds the engine's cache per loop (the engine is made
    from the merged [infer], not the checkpoint's)."""
    assert Engine.from_checkpoint(trained).kv_cache == "shared"
    engine = _served_engine(
        trained, monkeypatch, capsys, ["infer.kv_cache=per-loop", "infer.max_request_loops=20"]
    )
    assert engine.kv_cache == "per-loop" and engine.cache.mode == "per-loop"
    assert engine.infer.max_request_loops == 20


def test_speculative_requests_and_tiers(trained):
    """A request's `speculative` field and a tier's give plain decoding's tokens (per-loop cache), streamed or
    not, with the drafts counted; malformed values and exit + speculation are 400s."""
    engine = Engine.from_checkpoint(trained, kv_cache="per-loop")
    plain = engine.generate("The king", loops=6, max_new_tokens=10, temperature=0)
    tiers = {"quick": {"loops": 6, "speculative": "1:3"}, "careful": {"loops": 6, "exit": "kl:1e-3"}}
    with client_for(engine, tiers=tiers) as c:
        r = complete(c, max_tokens=10, loops=6, temperature=0, speculative="1:3")
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain.text
        spec = r.json()["looped"]["speculative"]
        assert spec["pairs"] == [[1, 3]] and 0 <= spec["accepted"] <= spec["drafted"] > 0
        r = complete(c, max_tokens=10, compute="quick", temperature=0)
        assert r.json()["choices"][0]["text"] == plain.text and r.json()["looped"]["tier"] == "quick"
        with c.stream(
            "POST",
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": "The king",
                "max_tokens": 10,
                "compute": "quick",
                "temperature": 0,
                "stream": True,
            },
        ) as s:
            streamed = "".join(e["choices"][0]["text"] for e in events(s)[:-1])
        assert streamed == plain.text
        r = complete(
            c, max_tokens=4, compute="quick", exit="kl:1e-3"
        )  # the request's exit replaces the tier's
        assert r.status_code == 200 and "speculative" not in r.json()["looped"]
        r = complete(c, max_tokens=4, compute="careful", speculative="1:2")  # and its speculation the exit
        assert r.status_code == 200 and r.json()["looped"]["speculative"]["pairs"] == [[1, 2]]
        for bad, message in (("1-3", "DRAFT_LOOPS:LOOKAHEAD"), (3, "must be")):
            r = complete(c, max_tokens=4, loops=6, speculative=bad)
            assert r.status_code == 400 and message in r.json()["error"]["message"]
        r = complete(c, max_tokens=4, loops=6, speculative="1:3", exit="kl:1e-3")
        assert r.status_code == 400 and "adaptive exit" in r.json()["error"]["message"]
        r = complete(c, max_tokens=4, loops=2, speculative="2:3")
        assert r.status_code == 400 and "draft loops must be fewer" in r.json()["error"]["message"]
