"""The generation engine: prefill then cached decode for a batch of requests, each with its own loops, exit,
budget and sampling; requests may join between decode steps (the server's continuous batching).

    engine = Engine.from_checkpoint("runs/demo/final")
    out = engine.generate("KING HENRY.", loops=8)                    # fixed depth
    out = engine.generate(["To be", "Once"], loops=[2, 16])          # a depth per request, one batch
    out = engine.generate("KING HENRY.", loops=16, exit="kl:1e-3")   # at most 16, fewer per token where it can
    out = engine.generate("KING HENRY.", max_ms_per_token=15)        # loops that fit this machine right now
    out = engine.generate("KING HENRY.", loops=8, speculative="1:4") # draft at 1 loop, verify at 8
    out.text, out.loops  # the text and the loops each token ran
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from looped.config import InferConfig
from looped.infer.budget import LatencyController, Profile, calibrate, calibrate_speculation, loops_for_flops
from looped.infer.cache import KV_MODES, KVCache
from looped.infer.chat import ChatFormat
from looped.infer.exit import ExitCriterion, parse_exit
from looped.infer.forward import forward_cached
from looped.infer.sampling import SamplingParams, find_stop, next_token, token_probs
from looped.infer.speculative import RowPlan, choose, parse_speculative, speculative_round
from looped.model.lm import LoopedLM
from looped.precision import resolve_dtype


@dataclass
class Compute:
    """How much compute a request may spend per token. Give `loops`, or one budget, or neither (the model's
    default loops); `exit` then lets each token stop early, with `loops` (or the budget's choice) the most."""

    loops: int | None = None
    exit: str | ExitCriterion | None = None
    min_loops: int = 1
    max_flops_per_token: float | None = None
    max_ms_per_token: float | None = None
    warm_start: bool = False
    loop_cap: int | None = None  # a cap below infer.max_request_loops (a server's per-key limit)
    # True: min_loops is the caller's own, and one over the loops the request runs (asked for, the model's
    # default, a budget's choice or a cap) is a ValueError; False: a default ([infer]), lowered to fit.
    strict_min_loops: bool = False
    # Self-speculative decoding (`looped.infer.speculative`): "D:K" or (D, K) drafts K tokens at D loops and
    # verifies them at the request's loops in one pass; "auto" picks the pair from the calibration profile.
    speculative: str | tuple[int, int] | None = None


@dataclass
class Generation:
    """One finished request."""

    text: str | None  # None without a tokenizer
    token_ids: list[int]
    loops: list[int]  # loops each generated token ran
    finish_reason: str  # "stop": end-of-text or a stop string; "length": max_new_tokens or the context
    prompt_tokens: int
    prefill_ms: float  # wall time of the prefill this request took part in (shared with its batch)
    decode_ms: float  # wall time of the decode steps it took part in (shared with its batch)
    flops_per_token: float  # forward FLOPs per generated token at the loops it ran, averaged
    speculative: tuple[int, int] | None = None  # (draft loops, lookahead) it decoded with
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # drafts the verifier kept

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_loops(self) -> float:
        return sum(self.loops) / len(self.loops) if self.loops else 0.0

    @property
    def tokens_per_s(self) -> float:
        seconds = (self.prefill_ms + self.decode_ms) / 1000
        return len(self.token_ids) / seconds if seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_loops"] = self.mean_loops
        d["tokens_per_s"] = self.tokens_per_s
        d["acceptance"] = self.acceptance
        d["ms_per_token"] = (self.prefill_ms + self.decode_ms) / max(1, len(self.token_ids))
        return d


@dataclass(eq=False)
class Request:
    """A request in flight: its tokens, its settings and what it has produced so far."""

    id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    loops: int  # fixed loops, or the most with exit or a latency target
    exit: ExitCriterion | None
    min_loops: int
    warm_start: bool
    max_ms_per_token: float | None
    on_token: Callable[[Request, str], None] | None = None
    speculative: tuple[int, int] | None = None  # (draft loops, lookahead)
    drafted: int = 0
    accepted: int = 0
    row: int = -1
    generated: list[int] = field(default_factory=list)
    loops_used: list[int] = field(default_factory=list)
    pending: int | None = None  # sampled, not yet in the cache
    state: torch.Tensor | None = None
    finish_reason: str | None = None
    text: str = ""
    emitted: int = 0  # characters of text passed to on_token
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)


class Engine:
    """Generates from one model for many requests at once; see the module docstring."""

    def __init__(
        self,
        model: LoopedLM,
        tokenizer=None,
        *,
        kv_cache: str | None = None,
        infer: InferConfig | None = None,
        profile: Profile | None = None,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        if not model.cfg.causal or model.cfg.attn_window is not None:
            raise ValueError(
                "generation needs a causal model with full attention (model.causal = true, attn_window = None)"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.infer = infer or InferConfig()
        self.kv_cache = kv_cache or self.infer.kv_cache
        if self.kv_cache not in KV_MODES:
            raise ValueError(f"unknown kv_cache {self.kv_cache!r}; choose one of {', '.join(KV_MODES)}")
        p = next(model.parameters())
        self.device = p.device
        self.cache = KVCache(model.cfg, self.kv_cache, rows=4, slots=128, device=p.device, dtype=p.dtype)
        self.notice = notice or (lambda msg: print(msg, file=sys.stderr))
        why = profile.mismatch(p.device, p.dtype) if profile is not None else None
        if why is not None:  # latencies measured elsewhere would pick the wrong loops for max_ms_per_token
            self.notice(
                f"calibration profile ignored: {why}; run `looped calibrate` with this device and dtype"
            )
            profile = None
        self.profile = profile
        self.controller = LatencyController(profile) if profile is not None else None
        self.clock = time.perf_counter
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._ids = 0
        self._flops_cache: dict[tuple[int, int], float] = {}
        self.checkpoint: Path | None = None
        # Ids that end a generation: the tokenizer's end of text, and a checkpoint's own eos ids.
        eot = tokenizer.eot_id if tokenizer is not None else None
        self.stop_ids: set[int] = {eot} if eot is not None else set()
        self.chat_format = ChatFormat()  # the plain "Role: content" format; a checkpoint may carry its own
        # A padded vocabulary (released models round it up): ids past the tokenizer's are never text.
        vocab = tokenizer.vocab_size if tokenizer is not None else model.cfg.vocab_size
        self.vocab_limit = vocab if vocab < model.cfg.vocab_size else None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        kv_cache: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        infer: InferConfig | None = None,
    ) -> Engine:
        """Load a checkpoint directory: weights, its tokenizer (checked against the model), [infer] defaults
        and the calibration profile `looped calibrate` stored there, if any.

        Args:
            path: The checkpoint directory.
            kv_cache: "shared" or "per-loop"; None: infer.kv_cache.
            device: "auto" (CUDA when available), "cpu", "cuda" or a torch.device; None: infer.device.
            dtype: "float32", "bfloat16" or a torch.dtype; None: infer.dtype.
            infer: The [infer] settings (a server's, merged over the checkpoint's); None: the checkpoint's.
        """
        from looped.checkpoint import CheckpointError, check_tokenizer, load, load_config_dir
        from looped.data.tokenizer import Tokenizer

        path = Path(path)
        infer = infer if infer is not None else load_config_dir(path).infer
        device = resolve_device(device if device is not None else infer.device)
        dtype = resolve_dtype(dtype if dtype is not None else infer.dtype, device)
        model = load(path, device=device, dtype=dtype)
        tokenizer = None
        if (path / "tokenizer.json").is_file():
            tokenizer = Tokenizer.load(path)
            check_tokenizer(path, tokenizer, model.cfg.vocab_size)
        elif not (path / "config.toml").is_file():
            raise CheckpointError(f"{path}: not a looped checkpoint directory")
        engine = cls(model, tokenizer, kv_cache=kv_cache, infer=infer, profile=Profile.load(path))
        engine.checkpoint = path
        engine.chat_format = ChatFormat.from_checkpoint(path)
        engine.stop_ids |= checkpoint_stop_ids(path, tokenizer, engine.chat_format)
        return engine

    # ------------------------------------------------------------------ requests
    def sampling(self, **overrides) -> SamplingParams:
        """SamplingParams from the [infer] defaults with `overrides` (None values are ignored)."""
        base = {
            "max_new_tokens": self.infer.max_new_tokens,
            "temperature": self.infer.temperature,
            "top_k": self.infer.top_k,
            "top_p": self.infer.top_p,
            "repetition_penalty": self.infer.repetition_penalty,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        params = SamplingParams(**base)
        params.validate()
        return params

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt, checked: not empty, within the vocabulary, room for one more token."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "this engine has no tokenizer: pass token ids, or load a checkpoint with one"
                )
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab, context = self.model.cfg.vocab_size, self.model.cfg.max_seq_len
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab}), the model's vocabulary")
        if len(ids) >= context:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the model's context is {context} tokens "
                f"(at most {context - 1} for the prompt)"
            )
        return ids

    def submit(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams | None = None,
        compute: Compute | None = None,
        on_token: Callable[[Request, str], None] | None = None,
    ) -> Request:
        """Queue a request; it is prefilled at the next `step()`. `on_token(request, new_text)` streams."""
        sampling = sampling or self.sampling()
        compute = compute or Compute()
        ids, loops, crit, spec = self.prepare(prompt, sampling, compute)
        if compute.max_ms_per_token is not None and self.controller is None:
            self._calibrate_now()
        if spec == "auto":
            spec = self._auto_speculation(loops)
        req = Request(
            id=self._ids,
            prompt_ids=ids,
            sampling=sampling,
            loops=loops,
            exit=crit,
            min_loops=min(compute.min_loops, loops),
            warm_start=compute.warm_start,
            max_ms_per_token=compute.max_ms_per_token,
            on_token=on_token,
            speculative=spec,
            generator=torch.Generator().manual_seed(sampling.seed),
        )
        self._ids += 1
        if sampling.max_new_tokens == 0:
            req.finish_reason = "length"
        else:
            self.waiting.append(req)
        return req

    def prepare(
        self, prompt: str | Sequence[int], sampling: SamplingParams, compute: Compute
    ) -> tuple[list[int], int, ExitCriterion | None, tuple[int, int] | str | None]:
        """Check a request without queueing it: (prompt ids, loops, exit criterion, speculation: (draft loops,
        lookahead), "auto" or None), or a ValueError that says what is wrong. Touches no engine state, so a
        server may call it from any thread."""
        ids = self.encode(prompt)
        sampling.validate()
        loops, crit = self._resolve(compute, len(ids) + sampling.max_new_tokens)
        return ids, loops, crit, self._speculation(compute, loops, crit)

    def _speculation(
        self, compute: Compute, loops: int, crit: ExitCriterion | None
    ) -> tuple[int, int] | str | None:
        spec = parse_speculative(compute.speculative)
        if spec is None:
            return None
        if not self.model.cfg.looped:
            raise ValueError("speculative decoding drafts at fewer loops: this model does not loop")
        if crit is not None or compute.warm_start:
            raise ValueError(
                "speculative decoding verifies several tokens in one pass at fixed loops: it does not combine "
                "with adaptive exit or warm start"
            )
        budget = compute.max_ms_per_token is not None  # loops follow the machine's load, step by step
        if spec != "auto" and spec[0] >= loops and not budget:
            raise ValueError(f"draft loops must be fewer than the request's loops ({loops}), got {spec[0]}")
        return spec

    def _auto_speculation(self, loops: int) -> tuple[int, int] | None:
        """The pair `looped calibrate` predicts fastest at `loops`, measuring now if the profile lacks it."""
        if self.profile is None or not self.profile.speculative:
            self.notice(
                "no speculation calibration for speculative='auto': measuring one now "
                "(run `looped calibrate` to keep one)"
            )
            if self.profile is None:
                self._calibrate_now()
            grid = sorted({t for t in (2, 4, 8, 16) if t <= self.infer.max_request_loops} | {loops})
            self.profile.speculative = calibrate_speculation(self.model, grid, kv_cache=self.kv_cache)
        return choose(self.profile.speculative, lambda t: self.profile.predict(1, t), loops)

    def cancel(self, req: Request, reason: str = "cancelled") -> None:
        """Stop a request (a client went away, a timeout): it gets no more tokens and frees its row at the
        next `step()`."""
        if req.finished:
            return
        req.finish_reason, req.pending = reason, None
        if req in self.waiting:
            self.waiting.remove(req)

    def _resolve(self, compute: Compute, length: int) -> tuple[int, ExitCriterion | None]:
        """(loops, exit criterion) for a request, with every bad value a ValueError."""
        cap = min(self.infer.max_request_loops, compute.loop_cap or self.infer.max_request_loops)
        where = (
            "infer.max_request_loops" if cap == self.infer.max_request_loops else "the cap for this caller"
        )
        budgets = [
            name
            for name, v in (
                ("loops", compute.loops),
                ("max_flops_per_token", compute.max_flops_per_token),
                ("max_ms_per_token", compute.max_ms_per_token),
            )
            if v is not None
        ]
        if len(budgets) > 1:
            raise ValueError(
                f"give one of loops, max_flops_per_token, max_ms_per_token (got {', '.join(budgets)})"
            )
        crit = parse_exit(compute.exit)
        if crit is not None and crit.needs_gate and self.model.exit_gate is None:
            raise ValueError(f"exit {crit!r} needs a model with an exit gate (model.exit_gate), as Ouro has")
        if compute.loops is not None:
            loops, source = int(compute.loops), "the loops asked for"
            if not 1 <= loops <= cap:
                raise ValueError(f"loops must lie in [1, {cap}] ({where}), got {compute.loops}")
        elif compute.max_flops_per_token is not None:
            seq_len = min(length, self.model.cfg.max_seq_len)
            loops = loops_for_flops(self.model, compute.max_flops_per_token, seq_len, cap)
            source = f"capped by {where}" if loops == cap else "the most loops that fit max_flops_per_token"
        elif compute.max_ms_per_token is not None:
            if not compute.max_ms_per_token > 0:
                raise ValueError(f"max_ms_per_token must be > 0, got {compute.max_ms_per_token}")
            loops, source = cap, f"the most for max_ms_per_token, capped by {where}"
        else:
            loops = min(self.model.cfg.loops, cap)
            source = "the model's default loops" if loops < cap else f"the model's default, capped by {where}"
        if compute.min_loops < 1:
            raise ValueError(f"min_loops must be ≥ 1, got {compute.min_loops}")
        if compute.strict_min_loops and compute.min_loops > loops:
            raise ValueError(f"min_loops = {compute.min_loops} is more than loops = {loops} ({source})")
        return loops, crit

    def _calibrate_now(self) -> None:
        self.notice(
            "no calibration profile for max_ms_per_token: measuring one now (run `looped calibrate` to keep one)"
        )
        cap = self.infer.max_request_loops
        grid = sorted({t for t in (1, 2, 4, 8, 16, 32) if t <= cap} | {min(cap, 2)})
        self.profile = calibrate(self.model, loops=grid, tokens=8, repeats=1, kv_cache=self.kv_cache)
        self.controller = LatencyController(self.profile)

    # ------------------------------------------------------------------ running
    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.inference_mode()  # no autograd bookkeeping at all: ~1 ms less per decode step than no_grad
    def step(self) -> list[Request]:
        """Prefill waiting requests, then decode one token for every running one; returns the requests that
        got a token. Finished requests leave the batch and free their cache rows."""
        touched: list[Request] = []
        if self.waiting:
            batch, self.waiting = self.waiting, []
            self._prefill(batch)
            touched += batch
        decoding = [r for r in self.running if r.pending is not None and r not in touched]
        groups: dict[tuple, list[Request]] = {}
        for r in decoding:
            key = ("speculative",) if r.speculative else (repr(r.exit), r.min_loops, r.warm_start)
            groups.setdefault(key, []).append(r)
        for key, group in groups.items():
            (self._speculate if key == ("speculative",) else self._decode)(group)
            touched += group
        for r in [r for r in self.running if r.finished]:
            self.cache.release(r.row)
            self.running.remove(r)
        if not self.busy:
            self.cache.reset()
        return touched

    def _loops_now(self, req: Request, batch: int) -> int:
        if req.max_ms_per_token is None or self.controller is None:
            return req.loops
        return self.controller.pick(req.max_ms_per_token, batch, req.loops)

    def _prefill(self, batch: list[Request]) -> None:
        for r in batch:
            r.row = self.cache.allocate()
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        rows = torch.tensor([r.row for r in batch])
        lengths = torch.tensor([len(r.prompt_ids) for r in batch])
        loops = torch.tensor([self._loops_now(r, len(batch)) for r in batch])
        start = self.clock()
        out = forward_cached(
            self.model,
            self.cache,
            ids.to(self.device),
            rows=rows,
            loops=loops.to(self.device),
            lengths=lengths,
        )
        ms = (self.clock() - start) * 1000
        for b, r in enumerate(batch):
            r.prefill_ms = ms
            self._accept(r, out.logits[b], int(out.loops[b]), None if out.state is None else out.state[b])
        self.running += batch

    def _decode(self, batch: list[Request]) -> None:
        first = batch[0]
        ids = torch.tensor([[r.pending] for r in batch], device=self.device)
        rows = torch.tensor([r.row for r in batch])
        loops = torch.tensor([self._loops_now(r, len(batch)) for r in batch])
        warm = None
        if first.warm_start and self.model.cfg.looped:
            warm = torch.stack([r.state for r in batch])
        start = self.clock()
        out = forward_cached(
            self.model,
            self.cache,
            ids,
            rows=rows,
            loops=loops.to(self.device),
            exit=first.exit,
            min_loops=first.min_loops,
            warm_state=warm,
        )
        ms = (self.clock() - start) * 1000
        if self.controller is not None and self.model.cfg.looped:
            self.controller.observe(len(batch), float(out.loops.float().mean()), ms)
        for b, r in enumerate(batch):
            r.decode_ms += ms
            r.pending = None
            self._accept(r, out.logits[b], int(out.loops[b]), None if out.state is None else out.state[b])

    def _speculate(self, batch: list[Request]) -> None:
        """One speculative round for `batch`: each row drafts, is verified and gets 1 to lookahead + 1 tokens."""
        plans = []
        for r in batch:
            loops = self._loops_now(r, len(batch))
            draft, ahead = r.speculative
            room = min(r.sampling.max_new_tokens - len(r.generated), self.model.cfg.max_seq_len - r.length)
            plans.append(
                RowPlan(
                    row=r.row,
                    token=r.pending,
                    loops=loops,
                    draft_loops=min(draft, loops),
                    lookahead=max(0, min(ahead, room)) if draft < loops else 0,
                    probs=lambda logits, drafts, r=r: self._probs(r, logits, drafts),
                    greedy=r.sampling.temperature == 0,
                    generator=r.generator,
                )
            )
        start = self.clock()
        speculative_round(self.model, self.cache, plans)
        ms = (self.clock() - start) * 1000
        for r, p in zip(batch, plans, strict=True):
            r.decode_ms += ms
            r.pending = None
            r.drafted, r.accepted = r.drafted + p.lookahead, r.accepted + p.accepted
            for token in p.tokens:
                self._take(r, token, p.loops, None)
                if r.finished:
                    break

    def _probs(self, req: Request, logits: torch.Tensor, drafts: list[int]) -> torch.Tensor:
        """The distribution `req` samples its next token from after `drafts` (speculation compares two)."""
        return token_probs(logits, req.sampling, self._mask_and_history(req, logits, drafts))

    def _accept(self, req: Request, logits: torch.Tensor, loops: int, state: torch.Tensor | None) -> None:
        """Sample the next token of `req` and decide whether it is done."""
        history = self._mask_and_history(req, logits, [])
        self._take(req, next_token(logits, req.sampling, history, req.generator), loops, state)

    def _mask_and_history(self, req: Request, logits: torch.Tensor, drafts: list[int]) -> torch.Tensor | None:
        """The ids the repetition penalty sees (None without one); masks padded vocabulary ids in `logits`,
        a row of this step's logits that is not kept."""
        if self.vocab_limit is not None:
            logits[..., self.vocab_limit :] = float("-inf")
        if req.sampling.repetition_penalty == 1:
            return None
        return torch.tensor(req.prompt_ids + req.generated + drafts)

    def _take(self, req: Request, token: int, loops: int, state: torch.Tensor | None) -> None:
        """Append the chosen `token` to `req` (or end it there) and stream what became text."""
        req.loops_used.append(loops)
        req.state = state
        tok = self.tokenizer
        if token in self.stop_ids:
            req.finish_reason = "stop"
            self._emit(req, final=True)
            return
        req.generated.append(token)
        if tok is not None:
            req.text = tok.decode(req.generated)
            cut = find_stop(req.text, req.sampling.stop)
            if cut is not None:
                req.text = req.text[:cut]
                req.finish_reason = "stop"
        if req.finish_reason is None and (
            len(req.generated) >= req.sampling.max_new_tokens or req.length > self.model.cfg.max_seq_len
        ):
            req.finish_reason = "length"
        if req.finish_reason is None:
            req.pending = token
        self._emit(req, final=req.finished)

    def _emit(self, req: Request, final: bool) -> None:
        """Stream new text, holding back what could still become a stop string or a partial character."""
        if req.on_token is None or self.tokenizer is None:
            return
        end = len(req.text)
        if not final:
            while end and req.text[end - 1] == "\ufffd":
                end -= 1
            for s in req.sampling.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if req.text[:end].endswith(s[:k]):
                        end -= k
                        break
        if end > req.emitted:
            delta, req.emitted = req.text[req.emitted : end], end
            req.on_token(req, delta)
        elif final:
            req.on_token(req, "")

    def result(self, req: Request) -> Generation:
        """The Generation of a finished request."""
        flops = [
            self._flops(t, min(len(req.prompt_ids) + i + 1, self.model.cfg.max_seq_len))
            for i, t in enumerate(req.loops_used)
        ]
        return Generation(
            text=req.text if self.tokenizer is not None else None,
            token_ids=list(req.generated),
            loops=list(req.loops_used),
            finish_reason=req.finish_reason or "length",
            prompt_tokens=len(req.prompt_ids),
            prefill_ms=req.prefill_ms,
            decode_ms=req.decode_ms,
            flops_per_token=sum(flops) / len(flops) if flops else 0.0,
            speculative=req.speculative,
            drafted=req.drafted,
            accepted=req.accepted,
        )

    def _flops(self, loops: int, seq_len: int) -> float:
        key = (loops, seq_len)
        if key not in self._flops_cache:  # per engine: a cache on the class would keep engines alive
            self._flops_cache[key] = self.model.flops_per_token(max(1, loops), seq_len)
        return self._flops_cache[key]

    # ------------------------------------------------------------------ the one-call API
    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
        *,
        loops: int | Sequence[int] | None = None,
        exit: str | ExitCriterion | None = None,
        min_loops: int | None = None,
        max_flops_per_token: float | None = None,
        max_ms_per_token: float | None = None,
        warm_start: bool | None = None,
        speculative: str | tuple[int, int] | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        seed: int = 0,
        on_token: Callable[[Request, str], None] | None = None,
    ) -> Generation | list[Generation]:
        """Generate for one prompt (text or token ids) or a list of them, batched; returns one Generation per
        prompt. `loops` may be a list, one per prompt; the other arguments apply to all (None: [infer])."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], int)
        )
        if isinstance(prompts, torch.Tensor):
            single, prompts = prompts.ndim == 1, prompts.tolist()
            prompts = [prompts] if single else prompts
        elif single:
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        per_loops = list(loops) if isinstance(loops, Sequence) else [loops] * len(prompts)
        if len(per_loops) != len(prompts):
            raise ValueError(f"{len(per_loops)} loop counts for {len(prompts)} prompts")
        params = self.sampling(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            stop=list(stop) if stop is not None else None,
            seed=seed,
        )
        if exit is None:  # [infer]'s exit and warm start are defaults that speculation replaces
            exit = None if self.infer.exit == "none" or speculative else self.infer.exit
        if warm_start is None:
            warm_start = self.infer.warm_start and not speculative
        computes = [
            Compute(
                loops=t,
                exit=exit,
                min_loops=min_loops if min_loops is not None else self.infer.min_loops,
                max_flops_per_token=max_flops_per_token,
                max_ms_per_token=max_ms_per_token,
                warm_start=warm_start,
                strict_min_loops=min_loops is not None,  # the caller's own min_loops is never lowered
                speculative=speculative,
            )
            for t in per_loops
        ]
        for p, c in zip(prompts, computes, strict=True):  # every request checked before any is queued
            self.prepare(p, params, c)
        requests = [self.submit(p, params, c, on_token) for p, c in zip(prompts, computes, strict=True)]
        while any(not r.finished for r in requests):
            self.step()
        results = [self.result(r) for r in requests]
        return results[0] if single else results


def checkpoint_stop_ids(path: Path, tokenizer, chat: ChatFormat) -> set[int]:
    """The end-of-sequence ids a converted checkpoint names: `eos_token_id` of generation_config.json (one
    id or a list), and the tokenizer's id of the eos token its tokenizer_config.json names (`chat`)."""
    ids: set[int] = set()
    file = path / "generation_config.json"
    if file.is_file():
        try:
            eos = json.loads(file.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            eos = None
        ids |= {e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)}
    eos_text = chat.special.get("eos_token")
    if tokenizer is not None and eos_text is not None:
        found = tokenizer.hf.token_to_id(eos_text)
        if found is not None:
            ids.add(found)
    return ids


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch.device for "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N"; asking for
    CUDA where there is none is a ValueError that says so (rather than torch's error deep in a load)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"device {device!r} asked for, but CUDA is not available ({why}); use cpu or auto")
    return resolved
