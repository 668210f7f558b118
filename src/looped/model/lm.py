"""LoopedLM: embed → prelude → initial state → loops × (inject, core) → readout → coda → norm → head."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from looped.config import ModelConfig
from looped.model import accounting
from looped.model.block import Block
from looped.model.injection import SpectralConstraint, make_injection, sigma_max
from looped.model.kv import KVProvider
from looped.model.layers import RMSNorm, grid_side, model_rope_table, rope_grid_table


@dataclass
class LoopedOutput:
    """What a forward pass returns."""

    logits: torch.Tensor  # (B, S, V), float32
    loss: torch.Tensor | None = None  # mean token cross-entropy when labels are given
    loops: torch.Tensor | None = None  # (B,) loops each sequence ran
    state_norms: torch.Tensor | None = None  # (T_max,) mean ‖h‖ over tokens after each loop, detached


@dataclass
class LoopInputs:
    """What every loop of one forward pass reads; made once by `LoopedLM.loop_inputs`."""

    e: (
        torch.Tensor | None
    )  # (B, S, D) prelude output as injected; None in a row selection (only h_0 reads it)
    u: Any  # the injection's term in e (model/injection.py `prepare`)
    rope: torch.Tensor  # rotary table (2, S, hd/2), or a per-sequence rotation (B, S, hd/2)
    ves: dict[int, torch.Tensor]  # value embeddings by layer index


@dataclass
class StabilityReport:
    """Spectral facts of the loop and, when computed on an input, how the state evolves across loops."""

    rho: float  # spectral radius of Ā (the state-to-state map of the injection)
    sigma: dict[str, float]  # σ_max of the injection input matrix, the readout C and each core matrix
    state_norms: list[float] = field(default_factory=list)  # mean ‖h_t‖ after each loop t = 1..T
    contraction: list[float] = field(default_factory=list)  # ‖h_{t+1} − h_t‖ / ‖h_t − h_{t−1}‖, t = 1..T−1

    def to_dict(self) -> dict:
        return {
            "rho": self.rho,
            "sigma": self.sigma,
            "state_norms": self.state_norms,
            "contraction": self.contraction,
        }


class LoopedLM(nn.Module):
    """A looped (recurrent-depth) language model; `core_layers = 0` gives a standard transformer from the same code."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ve = set(cfg.ve_layers)
        p, c = cfg.prelude_layers, cfg.core_layers
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.value_embeds = nn.ModuleDict(
            {
                str(i): nn.Embedding(cfg.vocab_size, cfg.resolved_n_kv_heads * cfg.resolved_head_dim)
                for i in sorted(ve)
            }
        )
        self.prelude = nn.ModuleList(Block(cfg, i in ve) for i in range(p))
        self.core = nn.ModuleList(Block(cfg, p + i in ve) for i in range(c))
        self.coda = nn.ModuleList(Block(cfg, p + c + i in ve) for i in range(cfg.coda_layers))
        if cfg.looped:
            self.prelude_norm = RMSNorm(cfg.width, cfg.norm_eps) if cfg.prelude_norm else None
            self.injection = make_injection(cfg)
            self.readout = nn.Linear(cfg.width, cfg.width, bias=False) if cfg.readout else None
        else:
            self.prelude_norm = self.injection = self.readout = None
        self.exit_gate = nn.Linear(cfg.width, 1) if cfg.exit_gate else None
        self.final_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.register_buffer("rope", model_rope_table(cfg), persistent=False)
        self._grid_tables: dict[int, torch.Tensor] = {}  # model.layout = "grid": rotary tables by side
        # Set by the trainer (a memory/compute trade-off, not part of the architecture).
        self.activation_checkpointing = False
        self._state_table: torch.Tensor | None = (
            None  # eval-mode initial state by position, made on first use
        )
        self.constraint = (
            SpectralConstraint(self.constrained_weights(), cfg.spectral_bound) if cfg.spectral_norm else None
        )
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Parcae's "scaled-zero" init: truncated-normal hidden matrices (std √(2/(5d))), zero output projections,
        B = injection_gain · I with decay ≈ init_decay, orthogonal readout with singular values √(2/5) (or the
        identity, or a zero ΔC of the residual readout h + ΔC·h: model.readout_init)."""
        std = self.cfg.resolved_init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std, a=-3 * std, b=3 * std)
                if name.endswith(("attn.wo", "mlp.w_out")):
                    module.weight.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std, a=-3 * std, b=3 * std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        for module in self.modules():
            if getattr(module, "qk_bias", None) is not None:
                module.qk_bias.zero_()
        if self.exit_gate is not None:
            self.exit_gate.bias.zero_()
        if self.injection is not None:
            self.injection.reset_parameters()
        if self.readout is not None and self.cfg.readout_init == "identity":
            self.readout.weight.copy_(torch.eye(self.cfg.width))
        elif self.readout is not None and self.cfg.readout_init == "residual":
            self.readout.weight.zero_()
        elif self.readout is not None:
            nn.init.orthogonal_(self.readout.weight)
            self.readout.weight.mul_(math.sqrt(2 / 5))
        if self.constraint is not None:
            self.constrain_()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        loops: int | torch.Tensor | None = None,
        backprop_loops: int | None = None,
        embeds: torch.Tensor | None = None,
    ) -> LoopedOutput:
        """Run the model: the pieces below in order, without a cache.

        Args:
            input_ids: (B, S) token ids, or None with `embeds`.
            labels: (B, S) targets (already shifted); -100 is ignored.
            loops: loop count T, an int or a (B,) LongTensor giving each sequence its own depth.
                None uses `cfg.loops`; the depth is never random unless the caller samples it.
            backprop_loops: k, how many of the last loops carry gradients (per sequence min(T_b, k));
                earlier loops run without autograd. None means all loops.
            embeds: (B, S, D) inputs already embedded (image patches, another stream's states) instead of
                input_ids; the token embedding is skipped. Not with value embeddings, which need ids.
        """
        x, ves = self.embed_inputs(input_ids, embeds)
        rope = self.rotary(x.shape[1])
        x = self.run_prelude(x, rope, ves)
        loop_counts = norms = None
        if self.cfg.looped:
            loop_counts = self.loop_counts(loops, x.shape[0], x.device)
            inputs = self.loop_inputs(x, rope, ves)
            x, norms, _ = self.iterate(inputs, loop_counts, backprop_loops)
        logits = self.logits(self.run_coda(x, rope, ves))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return LoopedOutput(logits=logits, loss=loss, loops=loop_counts, state_norms=norms)

    # The pieces of the forward pass. Every path that runs the model (training, `looped.Engine`'s cached
    # decoding, the Hugging Face wrapper) calls these; a cache comes in as a `KVProvider` (model/kv.py).
    def embed_inputs(
        self, input_ids: torch.Tensor | None, embeds: torch.Tensor | None = None, packed: bool = False
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Token embeddings (B, S, D), or `embeds` as given, and the value embeddings by layer index.
        `packed`: the S tokens are several sequences in one row (an engine such as vLLM packs them, with
        positions of their own), so S is not a sequence length to check against the context."""
        if (input_ids is None) == (embeds is None):
            raise ValueError("give exactly one of input_ids and embeds")
        if embeds is not None and len(self.value_embeds):
            raise ValueError(
                "embeds cannot be used with value embeddings (model.value_embeds), which need ids"
            )
        S = (input_ids if input_ids is not None else embeds).shape[1]
        if S > self.cfg.max_seq_len and not packed:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len = {self.cfg.max_seq_len}")
        if embeds is not None:
            return embeds, {}
        ves = {int(i): emb(input_ids) for i, emb in self.value_embeds.items()}
        x = self.embed(input_ids)
        return (x * self.cfg.embed_scale if self.cfg.embed_scale != 1 else x), ves

    def rotary(self, length: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The rotary table for positions 0..length-1, (2, S, hd/2) — or, with `positions` (B, P), each
        sequence's own (2, B, P, hd/2) cosines and sines, made once and shared by every layer."""
        if positions is None:
            return self.rope[:, :length] if self.cfg.layout == "sequence" else self._grid_rope(length)
        if self.cfg.layout != "sequence":
            raise ValueError("explicit positions need model.layout = 'sequence'")
        return self.rope[:, positions.to(self.rope.device)].float()  # (2, B, P, hd/2)

    def run_prelude(
        self, x: torch.Tensor, rope: torch.Tensor, ves: dict[int, torch.Tensor], kv: KVProvider | None = None
    ) -> torch.Tensor:
        """The prelude blocks: (B, S, D) → (B, S, D)."""
        for i, block in enumerate(self.prelude):
            x = block(x, rope, ves.get(i), None if kv is None else kv.layer("prelude", i))
        return x

    def loop_inputs(self, x: torch.Tensor, rope: torch.Tensor, ves: dict[int, torch.Tensor]) -> LoopInputs:
        """What every loop reads: e = the (normed) prelude output, the injection's term in e, computed once."""
        e = self.prelude_norm(x) if self.prelude_norm is not None else x
        return LoopInputs(e=e, u=self.injection.prepare(e), rope=rope, ves=ves)

    def select_rows(self, inputs: LoopInputs, rows: torch.Tensor, rope_per_row: bool = False) -> LoopInputs:
        """The loop inputs of batch entries `rows`; the rotary table too when it is per sequence."""
        return LoopInputs(
            e=None,
            u=self.injection.select(inputs.u, rows),
            rope=inputs.rope[:, rows] if rope_per_row else inputs.rope,  # per sequence: (2, B, P, hd/2)
            ves={i: v[rows] for i, v in inputs.ves.items()},
        )

    def loop_step(
        self, h: torch.Tensor, inputs: LoopInputs, kv: KVProvider | None = None, loop: int = 0
    ) -> torch.Tensor:
        """One loop: inject e into the state h (B, S, D), then the core blocks; `loop` (from 0) picks the
        cache entries of this loop."""
        h = self.injection.step(h, inputs.u)
        p = self.cfg.prelude_layers
        for i, block in enumerate(self.core):
            h = block(
                h, inputs.rope, inputs.ves.get(p + i), None if kv is None else kv.layer("core", i, loop)
            )
        if self.cfg.final_norm == "every-loop":  # Ouro: the normed state feeds the next loop and the head
            h = self.final_norm(h)
        return h

    def exit_logit(self, h: torch.Tensor) -> torch.Tensor:
        """The exit gate's logit g of the state after a loop, (...,) float32: the loop's exit probability is
        σ(g) times the probability that no earlier loop exited (`exit_probs`)."""
        return self.exit_gate(h).squeeze(-1).float()

    def run_coda(
        self, h: torch.Tensor, rope: torch.Tensor, ves: dict[int, torch.Tensor], kv: KVProvider | None = None
    ) -> torch.Tensor:
        """The state after the loop through the final norm (`final_norm = state-and-head`), the readout (looped
        models with `model.readout`) and the coda blocks: (B, S, D) → (B, S, D)."""
        if self.cfg.final_norm == "state-and-head":
            h = self.final_norm(h)
        x = h
        if self.readout is not None:
            x = h + self.readout(h) if self.cfg.readout_init == "residual" else self.readout(h)
        offset = self.cfg.prelude_layers + self.cfg.core_layers
        for i, block in enumerate(self.coda):
            x = block(x, rope, ves.get(offset + i), None if kv is None else kv.layer("coda", i))
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm (unless every loop already ends with it), head and the optional soft-cap: (..., D) →
        float32 logits (..., V)."""
        if self.cfg.final_norm != "every-loop":
            x = self.final_norm(x)
        logits = self.head(x).float()
        if self.cfg.logit_softcap is not None:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def _grid_rope(self, length: int) -> torch.Tensor:
        side = grid_side(length)
        table = self._grid_tables.get(side)
        if table is None or table.device != self.rope.device:
            table = rope_grid_table(self.cfg.resolved_head_dim, side, self.cfg.rope_base).to(self.rope.device)
            self._grid_tables[side] = table
        return table

    def loop_counts(self, loops: int | torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """`loops` as a (batch,) LongTensor on `device`: an int for every sequence, a tensor of counts, or None
        for `cfg.loops`; counts below 1 are refused."""
        if loops is None:
            loops = self.cfg.loops
        if isinstance(loops, torch.Tensor):
            if loops.ndim == 0:
                loops = int(loops)
            elif loops.shape != (batch,):
                raise ValueError(
                    f"loops must be an int or a tensor of shape ({batch},), got shape {tuple(loops.shape)}"
                )
        counts = torch.full((batch,), loops, dtype=torch.long) if isinstance(loops, int) else loops.long()
        if counts.numel() and int(counts.min()) < 1:
            raise ValueError(
                f"loops must be ≥ 1, got {counts.tolist() if counts.numel() < 9 else int(counts.min())}"
            )
        return counts.to(device)

    def initial_state(self, e: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The state before the first loop: zero, N(0, 1), or truncated normal at the init std; with
        `injection = none`, e itself.

        In training a random state is fresh noise each call. In eval mode it is a fixed function of the
        position, drawn once from `state_seed`, so evaluation is deterministic and a token decoded with a KV
        cache starts from the same state as in a full forward pass. `positions`: (B, S), default 0..S-1.
        """
        kind = self.cfg.state_init
        if self.cfg.injection == "none":  # nothing is re-injected: the input itself starts the loop
            return e.clone()
        if kind == "zero":
            return torch.zeros_like(e)
        if self.training:
            return self._noise(e.shape, None).to(device=e.device, dtype=e.dtype)
        table = self._state_table
        if table is None or table.device != e.device or table.dtype != e.dtype:
            gen = torch.Generator().manual_seed(self.cfg.state_seed)
            table = self._noise((self.cfg.max_seq_len, e.shape[-1]), gen).to(device=e.device, dtype=e.dtype)
            self._state_table = table
        if positions is None:
            return table[: e.shape[1]].expand(e.shape).clone()
        return table[positions.to(e.device)]

    def _noise(self, shape: tuple[int, ...], gen: torch.Generator | None) -> torch.Tensor:
        h = torch.empty(shape, dtype=torch.float32)
        if self.cfg.state_init == "like-init":
            std = self.cfg.resolved_init_std
            return nn.init.trunc_normal_(h, std=std, a=-3 * std, b=3 * std, generator=gen)
        return h.normal_(generator=gen)

    def iterate(
        self,
        inputs: LoopInputs,
        loops: torch.Tensor,
        backprop_loops: int | None = None,
        keep_states: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Run the recurrence from the initial state; returns (final state, mean state norm per loop,
        [h_0, h_1, ..., h_T] if kept).

        Sequences are right-aligned: a sequence with T_b < T_max loops idles (and costs nothing) during the
        first T_max − T_b iterations, so the last k iterations are the gradient ones for every sequence.
        With `activation_checkpointing` set, each gradient loop is recomputed in backward instead of
        keeping its activations, so memory holds one loop's activations plus k states.
        (`looped.infer.forward` schedules rows the other way round, for decoding with adaptive exit.)
        """
        t_max = int(loops.max())
        k = t_max if backprop_loops is None else max(0, min(int(backprop_loops), t_max))
        start = t_max - loops  # (B,) iteration at which each sequence begins
        h = self.initial_state(inputs.e)
        norms: list[torch.Tensor] = []
        states = [h.detach()] if keep_states else []
        for t in range(t_max):
            grad = torch.is_grad_enabled() and t >= t_max - k
            step = self._checkpointed_step if grad and self.activation_checkpointing else self.loop_step
            with torch.set_grad_enabled(grad):
                active = start <= t
                if bool(active.all()):
                    h = step(h, inputs)
                else:
                    rows = active.nonzero().squeeze(1)
                    h = h.index_copy(0, rows, step(h[rows], self.select_rows(inputs, rows)))
            norms.append(h.detach().norm(dim=-1).mean())
            if keep_states:
                states.append(h.detach())
        return h, torch.stack(norms), states

    def _checkpointed_step(self, h: torch.Tensor, inputs: LoopInputs) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.loop_step, h, inputs, use_reentrant=False)

    @torch.no_grad()
    def exit_probs(self, input_ids: torch.Tensor, loops: int | None = None) -> torch.Tensor:
        """The exit gate's distribution over loops, (B, S, T) (Ouro): loop i < T exits with probability
        σ(g_i)·∏_{j<i}(1 − σ(g_j)), and the last loop takes what remains, ∏_{j<T}(1 − σ(g_j))."""
        if self.exit_gate is None:
            raise ValueError("exit_probs needs a model with an exit gate (model.exit_gate)")
        x, ves = self.embed_inputs(input_ids)
        rope = self.rotary(x.shape[1])
        inputs = self.loop_inputs(self.run_prelude(x, rope, ves), rope, ves)
        t_max = self.cfg.loops if loops is None else loops
        h = self.initial_state(inputs.e)
        survive = torch.ones(x.shape[:2], device=x.device)
        probs = []
        for t in range(t_max):
            h = self.loop_step(h, inputs)
            if t == t_max - 1:
                probs.append(survive)
            else:
                lam = torch.sigmoid(self.exit_logit(h))
                probs.append(lam * survive)
                survive = survive * (1 - lam)
        return torch.stack(probs, dim=-1)

    # ------------------------------------------------------------------ constraints and reports
    def constrained_weights(self) -> dict[str, nn.Parameter]:
        """The weights named by `cfg.spectral_norm`, by parameter name."""
        groups, out = set(self.cfg.spectral_norm), {}
        for name, p in self.named_parameters():
            if p.ndim != 2:
                continue
            in_core = name.startswith("core.")
            if (
                ("injection" in groups and name in ("injection.B.weight", "injection.W.weight"))
                or ("readout" in groups and name == "readout.weight")
                or ("core" in groups and in_core)
                or (
                    "core-out" in groups and in_core and name.endswith(("attn.wo.weight", "mlp.w_out.weight"))
                )
            ):
                out[name] = p
        return out

    def constrain_(self) -> dict[str, float]:
        """Scale constrained weights back to σ_max ≤ spectral_bound; call after each optimizer step."""
        return self.constraint.apply_() if self.constraint is not None else {}

    @torch.no_grad()
    def stability_report(
        self, input_ids: torch.Tensor | None = None, loops: int | None = None
    ) -> StabilityReport:
        """ρ(Ā), σ_max of B̄, C and each core matrix; with input_ids, state norms and contraction per loop."""
        if not self.cfg.looped:
            raise ValueError("stability_report needs a looped model (model.core_layers > 0)")
        sigma = {"injection.input": sigma_max(self.injection.input_matrix())}
        if self.readout is not None:
            sigma["readout.C"] = sigma_max(self.readout.weight)
        for name, p in self.core.named_parameters():
            if p.ndim == 2:
                sigma[f"core.{name}"] = sigma_max(p)
        report = StabilityReport(rho=self.injection.spectral_radius(), sigma=sigma)
        if input_ids is None:
            return report
        was_training = self.training
        self.eval()
        try:
            x, ves = self.embed_inputs(input_ids)
            rope = self.rotary(x.shape[1])
            inputs = self.loop_inputs(self.run_prelude(x, rope, ves), rope, ves)
            counts = self.loop_counts(loops, input_ids.shape[0], input_ids.device)
            _, norms, states = self.iterate(inputs, counts, keep_states=True)
        finally:
            self.train(was_training)
        report.state_norms = [float(n) for n in norms]
        steps = [float((b - a).norm()) for a, b in zip(states[:-1], states[1:], strict=True)]
        report.contraction = [
            b / a if a > 0 else float("nan") for a, b in zip(steps[:-1], steps[1:], strict=True)
        ]
        return report

    # ------------------------------------------------------------------ accounting
    def num_params(self) -> dict[str, int]:
        """Unique parameters by part: embedding, value_embeds, prelude, injection, core, readout, coda, head, total."""
        return accounting.param_breakdown(self)

    def flops_per_token(
        self,
        loops: int | None = None,
        seq_len: int | None = None,
        training: bool = False,
        backprop_loops: int | None = None,
    ) -> float:
        """Matmul FLOPs per token (see `looped.model.accounting.flops_per_token`)."""
        return accounting.flops_per_token(
            self.cfg, loops or self.cfg.loops, seq_len or self.cfg.max_seq_len, training, backprop_loops
        )

    def kv_cache_bytes_per_token(
        self, loops: int | None = None, dtype: torch.dtype = torch.bfloat16, shared: bool = False
    ) -> int:
        """KV-cache bytes per token; `shared` keeps one entry per core layer instead of one per (loop, layer)."""
        return accounting.kv_cache_bytes_per_token(self.cfg, loops or self.cfg.loops, dtype, shared)
