"""Chat formats: a checkpoint's own Jinja chat template (as converted checkpoints carry it) drives `looped chat`
and /v1/chat/completions; checkpoints without one keep the plain "Role: content" format."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers import fixture_dir, require_optional

import looped
from looped.data.tokenizer import EOT, Tokenizer
from looped.infer.chat import ChatFormat, ChatTemplateError
from looped.infer.engine import Engine
from looped.infer.session import chat
from looped.interop.convert import convert

# A ChatML-like template, written here: each message framed by <|im_start|>role … then the eos token.
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat?"}]
EXPECTED = f"<|im_start|>system\nBe brief.{EOT}\n<|im_start|>user\nthe cat?{EOT}\n<|im_start|>assistant\n"


def test_template_renders_as_transformers_does(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE, "eos_token": {"content": EOT, "special": True}})
    )
    fmt = ChatFormat.from_checkpoint(tmp_path)
    assert fmt.render(MESSAGES) == EXPECTED and fmt.end_of_turn == EOT
    with pytest.raises(ChatTemplateError, match="bad role"):
        fmt.render([{"role": "tool", "content": "x"}])
    (tmp_path / "chat_template.jinja").write_text("{{ messages[-1]['content'] }}!")  # a file of its own wins
    assert ChatFormat.from_checkpoint(tmp_path).render(MESSAGES) == "the cat?!"
    plain = ChatFormat.from_checkpoint(tmp_path / "missing")
    assert plain.render(MESSAGES) == "System: Be brief.\nUser: the cat?\nAssistant:"
    assert plain.end_of_turn is None


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """A converted Ouro checkpoint with a tokenizer (with EOT) and a chat template whose eos is EOT."""
    root = tmp_path_factory.mktemp("chat")
    _, ckpt = convert(fixture_dir("ouro-tiny"), root / "ouro")
    tok = Tokenizer.train_bpe([EXPECTED, "the cat sat on the mat. " * 20], vocab_size=300)
    tok.save(ckpt)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": EOT}))
    return ckpt, tok


def test_engine_stops_at_the_templates_end_of_turn(templated):
    ckpt, tok = templated
    engine = Engine.from_checkpoint(ckpt)
    assert tok.eot_id in engine.stop_ids
    # Make the end-of-turn token the model's only choice: generation stops at once, with reason "stop".
    with torch.no_grad():
        engine.model.head.weight.zero_()
        engine.model.head.weight[tok.eot_id] = 1.0
    g = engine.generate("x", max_new_tokens=5, temperature=0)
    assert g.token_ids == [] and g.finish_reason == "stop"


def test_looped_chat_sends_the_templated_prompt(templated, monkeypatch):
    ckpt, tok = templated
    seen = []
    original = Engine.generate

    def spy(self, prompts, **kwargs):
        seen.append(tok.decode(prompts))
        return original(self, prompts, **kwargs)

    monkeypatch.setattr(Engine, "generate", spy)
    lines = iter(["the cat?", "and the dog?"])

    def read(prompt: str) -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError  # what input() raises at the end of the input
        return line

    out = io.StringIO()
    chat(ckpt, read=read, out=out, max_new_tokens=4, temperature=0)
    assert seen[0] == "<|im_start|>user\nthe cat?" + EOT + "\n<|im_start|>assistant\n"
    assert seen[1].startswith(seen[0]) and seen[1].endswith(
        f"<|im_start|>user\nand the dog?{EOT}\n<|im_start|>assistant\n"
    )
    assert "chat template" in out.getvalue()


def test_server_applies_the_chat_template(templated):
    require_optional("fastapi", "serve")
    from serve.conftest import client_for

    ckpt, tok = templated
    engine = Engine.from_checkpoint(ckpt)
    with client_for(engine) as client:
        r = client.post(
            "/v1/chat/completions",
            json={"model": "ouro", "messages": MESSAGES, "max_tokens": 2, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(EXPECTED))
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": "ouro",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            },
        )
        assert r.status_code == 200
    plain = Engine(looped.load(ckpt), tok)  # no template: the plain format
    assert plain.chat_format.render(MESSAGES).endswith("Assistant:")


def test_ids_past_a_smaller_tokenizer_are_never_generated(templated):
    """A converted model whose vocabulary is padded past its tokenizer's never emits the padding ids."""
    ckpt, tok = templated
    engine = Engine.from_checkpoint(ckpt)
    with torch.no_grad():  # make a padding row the model's favourite
        engine.model.head.weight[tok.vocab_size + 5] = 100 * engine.model.head.weight.abs().max()
    g = engine.generate("the cat", max_new_tokens=5, temperature=0)
    assert g.token_ids and max(g.token_ids) < tok.vocab_size
