"""Turning a conversation into the text a model continues: the checkpoint's own chat template, or a plain one.

A converted checkpoint carries its tokenizer files (`looped convert`), and with them, when the model has
one, its chat template: a Jinja template in `chat_template.jinja` or under `chat_template` in
`tokenizer_config.json`, as transformers reads them. It is rendered the way transformers renders it: a
sandboxed environment with `trim_blocks` and `lstrip_blocks`, the messages, `add_generation_prompt`, the
special tokens by name and `raise_exception`. A checkpoint without one (every model `looped` trains) gets the
plain format: one "Role: content" line per message, then "Assistant:".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """A template that does not render these messages (its own `raise_exception`, or a Jinja error)."""


@dataclass
class ChatFormat:
    """How messages become a prompt; `template` None is the plain format."""

    template: str | None = None
    special: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... by name

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ChatFormat:
        """The chat format a checkpoint directory carries (its template and special tokens), or the plain one."""
        path = Path(path)
        config: dict[str, Any] = {}
        file = path / "tokenizer_config.json"
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not valid JSON: {e}") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: transformers uses "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if (path / "chat_template.jinja").is_file():  # the newer layout: a file of its own wins
            template = (path / "chat_template.jinja").read_text()
        special = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = config.get(name)
            if isinstance(value, dict):  # an AddedToken written out
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        return cls(template if isinstance(template, str) else None, special)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for `messages` ({role, content} with string content), ending where the assistant's
        reply starts."""
        if self.template is None:
            lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
            return "\n".join(lines) + "\nAssistant:"
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"the chat template refused these messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.template).render(
                messages=messages, add_generation_prompt=True, **self.special
            )
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template does not render: {e}") from None

    @property
    def end_of_turn(self) -> str | None:
        """The text that ends the assistant's turn under the template (its eos token), a stop for replies."""
        return self.special.get("eos_token") if self.template is not None else None
