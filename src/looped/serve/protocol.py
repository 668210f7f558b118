"""The OpenAI request and response shapes: parse and check a request body into what the engine needs, every
mistake an `APIError` (400 unless said otherwise) in OpenAI's error shape; build responses and stream chunks.

Extra request fields: `loops`, `exit` ("kl:1e-3", "none", or {"criterion": "kl", "threshold": 1e-3}),
`min_loops`, `max_ms_per_token`, `max_flops_per_token`, `speculative` ("D:K", "auto" or "none"),
`compute` (a tier name), `loops_per_token` (return the loops of every token), `top_k`, `repetition_penalty`.
Responses carry a `looped` object with the loops used, FLOPs per token, drafts accepted and timings.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from looped.config import ServeConfig
from looped.infer.chat import ChatFormat, ChatTemplateError
from looped.infer.engine import Compute, Generation
from looped.infer.sampling import SamplingParams
from looped.infer.speculative import parse_speculative

ROLES = ("system", "user", "assistant")
COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "user",
    "logprobs",
    "loops",
    "exit",
    "min_loops",
    "max_ms_per_token",
    "max_flops_per_token",
    "compute",
    "speculative",
    "loops_per_token",
}
FIELDS = {
    "completion": COMMON | {"prompt", "echo", "best_of", "suffix"},
    "chat": COMMON | {"messages", "max_completion_tokens", "top_logprobs"},
}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "server_error",
        504: "timeout",
    }

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Ask:
    """A checked request: one prompt per choice, how to sample, and the compute the request asked for."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: list[str | list[int]]
    sampling: SamplingParams
    compute: Compute
    tier: str | None
    stream: bool
    loops_per_token: bool
    fields: dict[str, Any] = field(default_factory=dict)  # the compute fields as given, for key checks

    @property
    def asked_loops(self) -> int | None:
        return self.compute.loops


def decode_body(raw: bytes) -> dict:
    """The JSON object of a request body, or a 400 that says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(f"the request body is not UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(
            f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    return body


def _number(
    body: dict,
    name: str,
    lo: float | None = None,
    hi: float | None = None,
    integer: bool = False,
    strict_lo: bool = False,
):
    """body[name] checked as a number (an integer if asked) within [lo, hi]; None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise APIError(f"'{name}' must be {kind}, got {json.dumps(value)}", param=name)
    if not math.isfinite(value):
        raise APIError(f"'{name}' must be finite", param=name)
    if lo is not None and (value <= lo if strict_lo else value < lo):
        raise APIError(f"'{name}' must be {'>' if strict_lo else '≥'} {lo:g}, got {value}", param=name)
    if hi is not None and value > hi:
        raise APIError(f"'{name}' must be ≤ {hi:g}, got {value}", param=name)
    return value


def _prompts(body: dict) -> list[str | list[int]]:
    prompt = body.get("prompt")
    bad = APIError(
        "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
        param="prompt",
    )
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [list(prompt)]
    if all(
        isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        for p in prompt
    ):
        return [list(p) for p in prompt]
    raise bad


def chat_prompt(messages: Any, chat: ChatFormat | None = None) -> str:
    """The text the model continues for a chat: the checkpoint's chat template applied to the messages, or
    without one, one "Role: content" line per message, then "Assistant:"."""
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(
                f"messages[{i}] must be an object with role one of {', '.join(ROLES)}", param="messages"
            )
        checked.append({"role": m["role"], "content": _content(m.get("content"), f"messages[{i}].content")})
    try:
        return (chat or ChatFormat()).render(checked)
    except ChatTemplateError as e:
        raise APIError(str(e), param="messages") from None


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or OpenAI's list of parts, whose text parts are joined. A model that reads
    only text refuses other parts (images, audio) rather than answer as if it had seen them."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(
            f'{where} must be a string or a list of {{"type": "text", "text": ...}} parts', param="messages"
        )
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise APIError(
                f"{where}[{j}] is a part of type {json.dumps(kind)}: this model reads only text parts",
                param="messages",
            )
        if not isinstance(part.get("text"), str):
            raise APIError(f"{where}[{j}].text must be a string", param="messages")
        texts.append(part["text"])
    return "".join(texts)


def _exit(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("criterion"), str):
        threshold = value.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise APIError("'exit.threshold' must be a number", param="exit")
        return f"{value['criterion']}:{threshold}"
    raise APIError(
        '\'exit\' must be "criterion:threshold" (e.g. "kl:1e-3"), "none" or '
        '{"criterion": ..., "threshold": ...}',
        param="exit",
    )


def parse_request(
    kind: str,
    body: dict,
    cfg: ServeConfig,
    model_name: str,
    defaults: SamplingParams,
    chat: ChatFormat | None = None,
) -> Ask:
    """Check a /v1/completions (kind "completion") or /v1/chat/completions ("chat") body; a chat's
    messages are formatted by `chat` (the checkpoint's template), or plainly without one.

    Raises:
        APIError: the first problem found, in the order: fields, model, prompt, unsupported options,
            sampling, compute.
    """
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise APIError(f"unknown field '{unknown[0]}'", param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError("'model' is required: the id of a model from GET /v1/models", param="model")
    if model != model_name:
        raise APIError(
            f"unknown model '{model}'; this server serves '{model_name}'",
            param="model",
            code="model_not_found",
        )
    if kind == "completion":
        prompts = _prompts(body)
    elif "prompt" in body:
        raise APIError("chat completions take 'messages', not 'prompt'", param="prompt")
    else:
        prompts = [chat_prompt(body.get("messages"), chat)]
    _refuse_unsupported(body)
    sampling = _sampling(kind, body, cfg, defaults)
    tier, compute, asked = _compute(body, cfg)
    return Ask(
        kind=kind,
        model=model,
        prompts=prompts,
        sampling=sampling,
        compute=compute,
        tier=tier,
        stream=bool(body.get("stream", False)),
        loops_per_token=bool(body.get("loops_per_token", False)),
        fields=asked,
    )


def _refuse_unsupported(body: dict) -> None:
    """A 400 for the OpenAI options this server does not implement, and for flags that are not booleans."""
    for name, off in (("echo", False), ("suffix", None), ("best_of", 1)):
        if body.get(name) not in (None, off):
            raise APIError(f"'{name}' is not supported", param=name)
    if _number(body, "n", lo=1, integer=True) not in (None, 1):
        raise APIError("'n' > 1 is not supported; send several prompts instead", param="n")
    if body.get("logprobs") not in (None, False, 0):
        raise APIError("'logprobs' is not supported", param="logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, lo=-2, hi=2) not in (None, 0):
            raise APIError(f"'{name}' is not supported; use 'repetition_penalty'", param=name)
    for name in ("stream", "loops_per_token"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise APIError(f"'{name}' must be true or false", param=name)


def _sampling(kind: str, body: dict, cfg: ServeConfig, defaults: SamplingParams) -> SamplingParams:
    """How to sample: the request's fields over the checkpoint's `defaults`, max_tokens under the server's cap."""
    tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _pick(_number(body, tokens_name, lo=0, integer=True), cfg.default_max_tokens)
    if max_tokens > cfg.max_tokens:
        raise APIError(
            f"'{tokens_name}' = {max_tokens} is over this server's cap of {cfg.max_tokens}", param=tokens_name
        )
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop)
    ):
        raise APIError("'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    stop = list(stop or [])
    if kind == "chat":  # the reply ends where the model starts the next turn
        stop += ["\nUser:", "\nSystem:"]
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_pick(_number(body, "temperature", lo=0, hi=2), defaults.temperature),
        top_k=_pick(_number(body, "top_k", lo=1, integer=True), defaults.top_k),
        top_p=_pick(_number(body, "top_p", lo=0, hi=1, strict_lo=True), defaults.top_p),
        repetition_penalty=_pick(
            _number(body, "repetition_penalty", lo=0, strict_lo=True), defaults.repetition_penalty
        ),
        stop=stop,
        seed=_pick(_number(body, "seed", integer=True), 0),
    )


BUDGETS = ("loops", "max_ms_per_token", "max_flops_per_token")


def _compute(body: dict, cfg: ServeConfig) -> tuple[str | None, Compute, dict[str, Any]]:
    """(tier, compute, the compute fields the request gave): the request's fields over its tier's. A tier
    applies when named, or as serve.default_tier when the request names no loops, budget or tier."""
    tier = body.get("compute")
    if tier is None:
        tier = None if any(body.get(k) is not None for k in BUDGETS) else cfg.default_tier
    elif not isinstance(tier, str) or tier not in cfg.tiers:
        raise APIError(
            f"'compute' must be one of {', '.join(map(repr, cfg.tiers))}, got {json.dumps(tier)}",
            param="compute",
        )
    spec = dict(cfg.tiers[tier]) if tier else {}
    asked = {k: body[k] for k in ("exit", "min_loops", "speculative", *BUDGETS) if body.get(k) is not None}
    if set(BUDGETS) & set(asked):  # the request's own budget wins over the tier's
        for k in BUDGETS:
            spec.pop(k, None)
    for mine, theirs in (("exit", "speculative"), ("speculative", "exit")):  # two ways to save compute
        if mine in asked and theirs not in asked:
            spec.pop(theirs, None)
    spec.update(asked)
    compute = Compute(
        loops=_number(spec, "loops", lo=1, integer=True),
        exit=_exit(spec.get("exit")),
        min_loops=_pick(_number(spec, "min_loops", lo=1, integer=True), 1),
        max_ms_per_token=_number(spec, "max_ms_per_token", lo=0, strict_lo=True),
        max_flops_per_token=_number(spec, "max_flops_per_token", lo=0, strict_lo=True),
        speculative=_speculative(spec.get("speculative")),
    )
    return tier, compute, asked


def _speculative(value: Any) -> tuple[int, int] | str | None:
    if value in (None, "none", False):
        return None
    if not isinstance(value, str):
        raise APIError(
            '\'speculative\' must be "DRAFT_LOOPS:LOOKAHEAD", "auto" or "none"', param="speculative"
        )
    try:
        return parse_speculative(value)
    except ValueError as e:
        raise APIError(str(e), param="speculative") from None


def check_min_loops(ask: Ask, loops: int, cap: int) -> None:
    """Refuse a request whose own `min_loops` is over the `loops` it runs per token, as the engine resolved
    them under the caller's loop `cap` (the engine would quietly lower it). A tier's min_loops is a default
    and is lowered without complaint, like a tier's loops under a key's cap."""
    asked = ask.fields.get("min_loops")
    if not isinstance(asked, int) or asked <= loops:
        return
    if "loops" in ask.fields:
        source = "its 'loops'"
    elif loops == cap:
        source = f"the loop cap of {cap} for this caller"
    elif ask.compute.loops is not None:
        source = f"tier '{ask.tier}'"
    elif ask.compute.max_flops_per_token is not None:
        source = "the most that fit its 'max_flops_per_token'"
    else:
        source = "the model's default loops"
    raise APIError(
        f"'min_loops' = {asked} is more than the {loops} loops per token this request runs ({source})",
        param="min_loops",
    )


def _pick(value, default):
    return default if value is None else value


# ------------------------------------------------------------------------------------------------ responses


def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]


def looped_info(gens: list[Generation], per_token: bool, tier: str | None, timings: dict) -> dict:
    loops = [t for g in gens for t in g.loops]
    tokens = sum(len(g.token_ids) for g in gens)
    info = {
        "mean_loops": sum(loops) / len(loops) if loops else 0.0,
        "max_loops": max(loops) if loops else 0,
        "flops_per_token": sum(g.flops_per_token * len(g.token_ids) for g in gens) / tokens
        if tokens
        else 0.0,
        "tier": tier,
        "timings": timings,
    }
    if any(g.speculative for g in gens):
        drafted, accepted = sum(g.drafted for g in gens), sum(g.accepted for g in gens)
        info["speculative"] = {
            "drafted": drafted,
            "accepted": accepted,
            "pairs": [g.speculative for g in gens],
        }
    if per_token:
        info["loops_per_token"] = [g.loops for g in gens] if len(gens) > 1 else loops
    return info


def usage(gens: list[Generation]) -> dict:
    prompt = sum(g.prompt_tokens for g in gens)
    completion = sum(len(g.token_ids) for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response(ask: Ask, rid: str, gens: list[Generation], timings: dict) -> dict:
    """The whole (non-streamed) response."""
    if ask.kind == "completion":
        choices = [
            {"index": i, "text": g.text or "", "logprobs": None, "finish_reason": g.finish_reason}
            for i, g in enumerate(gens)
        ]
        obj = "text_completion"
    else:
        g = gens[0]
        choices = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": g.text or ""},
                "logprobs": None,
                "finish_reason": g.finish_reason,
            }
        ]
        obj = "chat.completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": ask.model,
        "choices": choices,
        "usage": usage(gens),
        "looped": looped_info(gens, ask.loops_per_token, ask.tier, timings),
    }


def chunk(
    ask: Ask,
    rid: str,
    index: int,
    text: str | None,
    loops: list[int],
    finish: str | None = None,
    role: bool = False,
) -> dict:
    """One server-sent event of a streamed response: new text of choice `index` and the loops of its tokens."""
    if ask.kind == "completion":
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    else:
        delta: dict = {} if text is None else {"content": text}
        if role:
            delta["role"] = "assistant"
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": ask.model,
        "choices": [choice],
        "looped": {"loops": loops},
    }


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
