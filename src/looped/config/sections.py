"""The training-side config sections: model, loops, data, optim, train, eval (one dataclass each)."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

from looped.config.section import ConfigError, Section, doc

Injection = Literal["diagonal", "linear", "additive", "none"]
MLPKind = Literal["swiglu", "relu2", "gelu"]
BlockNorm = Literal["pre-norm", "sandwich", "sandwich-residual"]
RopePairing = Literal["interleaved", "half"]
FinalNorm = Literal["head", "state-and-head", "every-loop"]
StateInit = Literal["zero", "normal", "like-init"]
SpectralGroup = Literal["injection", "readout", "core-out", "core"]
SamplerKind = Literal["fixed", "poisson", "poisson-lognormal"]


@dataclass
class ModelConfig(Section):
    """Architecture of a looped LM: embed → prelude → loops × (inject, core) → readout → coda → head."""

    _section: typing.ClassVar[str] = "model"

    vocab_size: int = doc(512, "Vocabulary size (rows of the embedding and the head).")
    width: int = doc(128, "Residual width d of every block, the recurrent state and the embedding.")
    n_heads: int = doc(4, "Attention query heads.")
    n_kv_heads: int | None = doc(None, "Key/value heads for grouped-query attention; None means n_heads.")
    head_dim: int | None = doc(None, "Per-head width; None means width // n_heads.")
    mlp: MLPKind = doc("relu2", "MLP kind: swiglu (gated), relu2 (ReLU squared) or gelu.")
    mlp_hidden: int | None = doc(
        None, "MLP hidden width; None means 4·width (swiglu: 8/3·width, rounded to 64)."
    )
    block_norm: BlockNorm = doc(
        "pre-norm",
        "Block layout: pre-norm (x + f(norm(x))); sandwich (x + norm(f(norm(x))), a norm on each branch "
        "output, Ouro); sandwich-residual (norm(x + f(norm(x))), a norm on the residual stream after each "
        "add, Huginn).",
    )
    norm_eps: float = doc(1e-5, "RMSNorm epsilon.")
    rope_base: float = doc(50000.0, "Rotary embedding base (theta).")
    rope_pairing: RopePairing = doc(
        "interleaved",
        "Which channels rotate together: interleaved pairs (2i, 2i+1) as Parcae and Huginn, or half: "
        '(i, i + head_dim/2) as Llama, Qwen and Ouro ("rotate half").',
    )
    rope_scale_kind: Literal["none", "llama3"] = doc(
        "none", "Frequency scaling of RoPE: none, or llama3 (Llama 3.1+ long-context scaling, fields below)."
    )
    rope_scale_factor: float = doc(8.0, "llama3 scaling: the factor low frequencies are divided by.")
    rope_low_freq_factor: float = doc(1.0, "llama3 scaling: wavelengths above original/this are scaled.")
    rope_high_freq_factor: float = doc(4.0, "llama3 scaling: wavelengths below original/this are kept.")
    rope_original_max_len: int = doc(8192, "llama3 scaling: the context the frequencies were trained at.")
    qk_bias: bool = doc(
        False,
        "A learned bias added to queries and keys per head before RoPE (Huginn; needs n_kv_heads = n_heads).",
    )
    embed_scale: float = doc(1.0, "The token embedding is multiplied by this (Huginn: sqrt(width)).")
    qk_norm: bool = doc(True, "Parameter-free RMSNorm on queries and keys per head.")
    causal: bool = doc(
        True, "Causal attention (a language model); false makes an encoder, as for looped.tasks."
    )
    attn_window: int | None = doc(
        None,
        "Attend only to positions at most this far away (a band); None: all. Local attention makes an encoder "
        "pass information on through loops rather than in one long look (looped.tasks).",
    )
    layout: Literal["sequence", "grid"] = doc(
        "sequence",
        "Token positions: sequence (RoPE by index), or grid: the S inputs are a √S × √S square in row-major "
        "order, RoPE turns half of each head's channel pairs by row and half by column, and attn_window "
        "bounds |Δrow| and |Δcolumn| (an encoder for mazes; any side at test time).",
    )
    value_embeds: bool = doc(False, "Gated value embeddings on alternating layers (last layer included).")
    value_embed_layers: list[int] | None = doc(
        None,
        "Explicit layer indices (prelude, core, coda in order) with value embeddings; overrides value_embeds.",
    )
    value_gate_channels: int = doc(32, "Input channels the value-embedding gate reads.")
    logit_softcap: float | None = doc(None, "Soft-cap c: logits ← c·tanh(logits / c); None disables.")
    tie_embeddings: bool = doc(True, "Share the embedding matrix with the output head.")
    max_seq_len: int = doc(1024, "Longest sequence the rotary table covers.")
    prelude_layers: int = doc(1, "Blocks run once before the loop.")
    core_layers: int = doc(2, "Blocks in the shared core, run once per loop; 0 makes a standard transformer.")
    coda_layers: int = doc(1, "Blocks run once after the loop.")
    loops: int = doc(4, "Default number of loops T at inference and in eval mode.")
    injection: Injection = doc(
        "diagonal",
        "How the prelude output e enters each loop: diagonal (Parcae), linear (Huginn), additive, or none: "
        "e is the initial state and nothing is re-injected (Ouro, where the whole stack loops).",
    )
    injection_bias: bool = doc(False, "A bias on the linear injection's matrix (Huginn's adapter with bias).")
    prelude_norm: bool = doc(True, "RMSNorm on the prelude output e before it is injected.")
    readout: bool = doc(
        False,
        "Linear readout C from the recurrent state to the coda (Parcae). Off by default: at the scales measured "
        "here it cost the looped model 0.03–0.22 nats (docs/results.md); the `parcae` preset turns it on.",
    )
    final_norm: FinalNorm = doc(
        "head",
        "Where the final RMSNorm applies: head (after the coda, before the head); state-and-head (also to "
        "the state after the last loop, before the coda: Huginn); every-loop (to the state at the end of "
        "every loop, which feeds the next loop and the head directly: Ouro, with no coda).",
    )
    exit_gate: bool = doc(
        False,
        "A learned exit gate Linear(width, 1) on the state after each loop: loop i exits with probability "
        "σ(g_i)·∏_{j<i}(1 − σ(g_j)) (Ouro); `--exit gate:P` stops a token once that reaches P cumulatively.",
    )
    readout_init: Literal["orthogonal", "identity", "residual"] = doc(
        "orthogonal",
        "Init of C: orthogonal with singular values √(2/5) (Parcae), the identity, which keeps the state in "
        "the embedding's basis (with tied embeddings, much faster to train at small budgets; docs/results.md), "
        "or residual: the readout is h + ΔC·h with ΔC starting at zero (weight decay pulls it to I, not 0).",
    )
    state_init: StateInit = doc(
        "zero",
        "Initial recurrent state: zero, normal (std 1) or like-init (truncated normal, init std). With "
        "injection = none the state starts at the prelude output instead.",
    )
    state_seed: int = doc(0, "Seed for a random initial state in eval mode (training draws fresh noise).")
    init_std: float | None = doc(None, "Std of hidden matrices at init; None means sqrt(2 / (5·width)).")
    init_decay: float = doc(
        0.447, "Initial per-channel decay of the diagonal injection (Parcae: ≈ sqrt(1/5))."
    )
    injection_gain: float = doc(
        1.0, "Initial B of the diagonal injection, as a multiple of the identity (B̄ = softplus(dt)·B)."
    )
    spectral_norm: list[SpectralGroup] = doc(
        [], "Weight groups held at σ_max ≤ spectral_bound: injection, readout, core-out, core."
    )
    spectral_bound: float = doc(1.0, "Upper bound on the largest singular value of constrained weights.")

    def validate(self) -> None:
        positive = ("vocab_size", "width", "n_heads", "max_seq_len", "loops", "value_gate_channels")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.layout == "grid" and (self.causal or self.resolved_head_dim % 4):
            raise ConfigError(
                "model.layout = 'grid' needs an encoder (model.causal = false) and a head width divisible by 4 "
                f"(rows and columns take half the rotary pairs each), got causal = {self.causal}, head width "
                f"{self.resolved_head_dim}"
            )
        if self.attn_window is not None and self.attn_window < 1:
            raise ConfigError(f"model.attn_window must be ≥ 1 (or None), got {self.attn_window}")
        for name in ("prelude_layers", "core_layers", "coda_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be ≥ 0, got {getattr(self, name)}")
        if self.prelude_layers + self.core_layers + self.coda_layers == 0:
            raise ConfigError("model.core_layers: the model needs at least one block")
        if self.head_dim is None and self.width % self.n_heads:
            raise ConfigError(
                f"model.n_heads = {self.n_heads} must divide model.width = {self.width} (or set model.head_dim)"
            )
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise ConfigError(
                f"model.head_dim must be an even number ≥ 2 for rotary embeddings, got {self.head_dim}"
            )
        if self.head_dim is None and (self.width // self.n_heads) % 2:
            raise ConfigError(
                f"model.width // model.n_heads = {self.width // self.n_heads} must be even for rotary embeddings"
            )
        kv = self.resolved_n_kv_heads
        if kv < 1 or self.n_heads % kv:
            raise ConfigError(
                f"model.n_kv_heads = {kv} must be ≥ 1 and divide model.n_heads = {self.n_heads}"
            )
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ConfigError(f"model.mlp_hidden must be ≥ 1, got {self.mlp_hidden}")
        if self.norm_eps <= 0:
            raise ConfigError(f"model.norm_eps must be > 0, got {self.norm_eps}")
        if self.rope_base <= 1:
            raise ConfigError(f"model.rope_base must be > 1, got {self.rope_base}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ConfigError(
                f"model.logit_softcap must be > 0 (or None to disable), got {self.logit_softcap}"
            )
        if self.init_std is not None and self.init_std <= 0:
            raise ConfigError(f"model.init_std must be > 0, got {self.init_std}")
        if not 0 < self.init_decay < 1:
            raise ConfigError(f"model.init_decay must lie in (0, 1), got {self.init_decay}")
        if not self.injection_gain > 0:
            raise ConfigError(f"model.injection_gain must be > 0, got {self.injection_gain}")
        if self.spectral_bound <= 0:
            raise ConfigError(f"model.spectral_bound must be > 0, got {self.spectral_bound}")
        if self.value_gate_channels > self.width:
            raise ConfigError(
                f"model.value_gate_channels = {self.value_gate_channels} exceeds model.width = {self.width}"
            )
        n = self.n_layers
        if self.value_embed_layers is not None:
            bad = [i for i in self.value_embed_layers if not 0 <= i < n]
            if bad:
                raise ConfigError(
                    f"model.value_embed_layers: {bad} outside 0..{n - 1} (the model has {n} distinct layers)"
                )
        if self.core_layers == 0:
            if "core" in self.spectral_norm or "core-out" in self.spectral_norm:
                raise ConfigError("model.spectral_norm names core weights, but model.core_layers = 0")
        if "injection" in self.spectral_norm and self.injection in ("additive", "none"):
            raise ConfigError(
                f"model.spectral_norm: 'injection' has no weights to constrain with model.injection = "
                f"'{self.injection}'"
            )
        self._validate_families()
        if "readout" in self.spectral_norm and not self.readout:
            raise ConfigError("model.spectral_norm: 'readout' needs model.readout = true")
        if "readout" in self.spectral_norm and self.readout_init == "residual":
            raise ConfigError(
                "model.spectral_norm: 'readout' bounds C, but readout_init = 'residual' learns ΔC of I + ΔC"
            )

    def _validate_families(self) -> None:
        """The options imported families need, checked against each other."""
        if self.qk_bias and self.resolved_n_kv_heads != self.n_heads:
            raise ConfigError(
                "model.qk_bias needs model.n_kv_heads = model.n_heads (one bias per query head)"
            )
        if self.injection_bias and self.injection != "linear":
            raise ConfigError("model.injection_bias needs model.injection = 'linear'")
        if self.final_norm == "every-loop" and (self.coda_layers or self.readout):
            raise ConfigError(
                "model.final_norm = 'every-loop' feeds the head from the loop: it needs model.coda_layers = 0 "
                "and model.readout = false"
            )
        if self.exit_gate and not self.looped:
            raise ConfigError("model.exit_gate needs a looped model (model.core_layers > 0)")
        if self.rope_pairing == "half" and self.layout == "grid":
            raise ConfigError("model.layout = 'grid' needs model.rope_pairing = 'interleaved'")
        if self.embed_scale <= 0:
            raise ConfigError(f"model.embed_scale must be > 0, got {self.embed_scale}")
        if (
            self.rope_scale_kind == "llama3"
            and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
        ):
            raise ConfigError("model.rope_low_freq_factor must lie in (0, model.rope_high_freq_factor)")

    # The values in effect of the optional fields (None = derived): one name per concept, `resolved_<field>`.
    @property
    def resolved_n_kv_heads(self) -> int:
        """`n_kv_heads`, or `n_heads` (no grouping) when unset."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def resolved_head_dim(self) -> int:
        """`head_dim`, or width // n_heads when unset."""
        return self.head_dim if self.head_dim is not None else self.width // self.n_heads

    @property
    def resolved_mlp_hidden(self) -> int:
        """`mlp_hidden`, or 4·width (⌈8·width/3⌉ rounded up to 64 for swiglu) when unset."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return 64 * math.ceil(8 * self.width / 3 / 64)
        return 4 * self.width

    @property
    def n_layers(self) -> int:
        """Distinct blocks: prelude + core + coda."""
        return self.prelude_layers + self.core_layers + self.coda_layers

    @property
    def looped(self) -> bool:
        return self.core_layers > 0

    @property
    def ve_layers(self) -> list[int]:
        """Global layer indices that carry a gated value embedding."""
        if self.value_embed_layers is not None:
            return sorted(set(self.value_embed_layers))
        if not self.value_embeds:
            return []
        n = self.n_layers
        return [i for i in range(n) if i % 2 == (n - 1) % 2]

    @property
    def resolved_init_std(self) -> float:
        """`init_std`, or √(2 / (5·width)) when unset."""
        return self.init_std if self.init_std is not None else math.sqrt(2 / (5 * self.width))


@dataclass
class LoopsConfig(Section):
    """How many loops each training sequence runs, and how many of them carry gradients."""

    _section: typing.ClassVar[str] = "loops"

    sampler: SamplerKind = doc(
        "poisson",
        "fixed (always μ), poisson (Parcae: T ~ Poisson(μ), T ≥ 1) or poisson-lognormal (Huginn, mean μ).",
    )
    mean_loops: float = doc(4.0, "μ, the mean loop count in training (fixed: rounded to an integer).")
    backprop_loops: int | None = doc(
        None, "k: gradients flow through the last min(T, k) loops; None means ⌈μ/2⌉ (Parcae)."
    )
    per: Literal["sequence", "batch"] = doc(
        "sequence", "Draw a depth per sequence (Parcae: fewer loss spikes) or one per batch."
    )
    max_sampled_loops: int | None = doc(None, "The most loops a training draw may give; None means ⌈4·μ⌉.")
    lognormal_sigma: float = doc(0.5, "σ of the log-normal rate in poisson-lognormal (Huginn: 0.5).")
    curriculum: Literal["none", "linear", "sqrt"] = doc(
        "none", "Ramp μ from 1: linear, or sqrt (μ_t = 1 + (μ−1)·(1 − √(1 − p)), slow start); none keeps μ."
    )
    curriculum_fraction: float = doc(0.25, "Fraction of training steps the curriculum ramp lasts.")

    def validate(self) -> None:
        if self.mean_loops < 1:
            raise ConfigError(f"loops.mean_loops must be ≥ 1, got {self.mean_loops}")
        if self.sampler == "poisson-lognormal" and self.mean_loops <= 1:
            raise ConfigError(
                "loops.mean_loops must be > 1 for sampler = 'poisson-lognormal' (T = 1 + Poisson)"
            )
        if self.backprop_loops is not None and self.backprop_loops < 1:
            raise ConfigError(f"loops.backprop_loops must be ≥ 1 (or None), got {self.backprop_loops}")
        if self.max_sampled_loops is not None and self.max_sampled_loops < max(1, round(self.mean_loops)):
            raise ConfigError(
                f"loops.max_sampled_loops = {self.max_sampled_loops} is below loops.mean_loops = {self.mean_loops}"
            )
        if self.lognormal_sigma <= 0:
            raise ConfigError(f"loops.lognormal_sigma must be > 0, got {self.lognormal_sigma}")
        if not 0 <= self.curriculum_fraction <= 1:
            raise ConfigError(f"loops.curriculum_fraction must lie in [0, 1], got {self.curriculum_fraction}")

    @property
    def resolved_backprop_loops(self) -> int:
        """Backprop depth k (explicit, or ⌈μ/2⌉)."""
        return self.backprop_loops if self.backprop_loops is not None else math.ceil(self.mean_loops / 2)

    @property
    def resolved_max_sampled_loops(self) -> int:
        """The most loops the sampler draws (explicit, or ⌈4μ⌉)."""
        return (
            self.max_sampled_loops
            if self.max_sampled_loops is not None
            else max(1, math.ceil(4 * self.mean_loops))
        )


@dataclass
class DataConfig(Section):
    """Where training tokens come from (a directory written by `looped data prepare`)."""

    _section: typing.ClassVar[str] = "data"

    path: str = doc("data/shakespeare", "Prepared token data: manifest.json, shards and tokenizer.json.")
    seq_len: int = doc(256, "Tokens per training sequence (≤ model.max_seq_len).")

    def validate(self) -> None:
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be ≥ 1, got {self.seq_len}")


@dataclass
class OptimConfig(Section):
    """Optimizer, learning-rate schedule and clipping."""

    _section: typing.ClassVar[str] = "optim"

    optimizer: Literal["adamw", "muon"] = doc(
        "muon",
        "muon for 2-D hidden matrices with AdamW (optim.lr) for the rest (Parcae), or adamw for everything.",
    )
    lr: float = doc(3e-3, "Peak AdamW learning rate.")
    muon_lr: float = doc(0.02, "Peak Muon learning rate (hidden matrices, when optimizer = muon).")
    muon_momentum: float = doc(0.95, "Muon momentum (Nesterov).")
    muon_ns_dtype: Literal["auto", "float32", "bfloat16"] = doc(
        "auto",
        "Dtype of Muon's Newton–Schulz products: auto is bfloat16 on a GPU and on a CPU with bf16 matrix "
        "units (as torch.optim.Muon), float32 elsewhere, where bfloat16 products are ~100× slower.",
    )
    core_lr_scale: Literal["1", "1/k", "1/sqrt(k)"] = doc(
        "1",
        "Learning rate of the core's parameters against the rest, with k = loops.backprop_loops: the core's "
        "gradient is a sum over k loops, so its effective step grows with k.",
    )
    injection_lr_scale: float = doc(
        1.0, "Learning rate of the injection, the prelude norm and the readout, as a multiple of the rest."
    )
    betas: list[float] = doc([0.9, 0.95], "AdamW (β1, β2).")
    eps: float = doc(1e-8, "AdamW epsilon.")
    weight_decay: float = doc(
        0.0, "Decoupled weight decay on hidden matrices only (never norms, injection, embeddings)."
    )
    schedule: Literal["wsd", "cosine", "constant"] = doc(
        "wsd", "wsd (warmup, constant, linear cooldown), cosine (warmup, cosine decay) or constant."
    )
    warmup_steps: int = doc(0, "Linear warmup steps from 0 to the peak rate.")
    cooldown_fraction: float = doc(
        0.5, "wsd: fraction of steps, at the end, that decay linearly (Parcae: 0.5)."
    )
    min_lr_ratio: float = doc(0.0, "Final learning rate as a fraction of the peak.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 disables.")

    def validate(self) -> None:
        for name in ("lr", "muon_lr", "injection_lr_scale"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"optim.{name} must be > 0, got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be ≥ 0, got {self.warmup_steps}")
        for name in ("cooldown_fraction", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"optim.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ConfigError("optim.weight_decay and optim.grad_clip must be ≥ 0 and optim.eps > 0")


@dataclass
class TrainConfig(Section):
    """The training run: length, batch, precision, parallelism, checkpoints, guards and logging."""

    _section: typing.ClassVar[str] = "train"

    out: str = doc("runs/run", "Run directory: checkpoints/, metrics.jsonl, final/ and tensorboard/.")
    steps: int = doc(1000, "Optimizer steps.")
    init_from: str | None = doc(
        None, "Start from this checkpoint's weights (fresh optimizer and schedule): fine-tuning, retrofits."
    )
    global_batch: int = doc(16, "Sequences per optimizer step, summed over ranks and micro-batches.")
    micro_batch: int | None = doc(None, "Sequences per forward pass; None means global_batch / world size.")
    seed: int = doc(0, "Seed of the model init, data order, loop depths and initial-state noise.")
    device: Literal["auto", "cpu", "cuda"] = doc("auto", "auto picks cuda when available.")
    precision: Literal["auto", "fp32", "bf16"] = doc(
        "auto",
        "auto: bf16 autocast on GPU, fp32 on CPU (bf16 pays only on CPUs with AVX-512 BF16 or AMX, and gives "
        "other numbers than fp32; docs/benchmarks.md measures it: set bf16 there).",
    )
    parallel: Literal["ddp", "fsdp"] = doc("ddp", "Under torchrun: DDP, or FSDP2 (fully_shard).")
    activation_checkpointing: bool = doc(
        False, "Recompute each gradient loop in backward instead of storing its activations."
    )
    threads: int | None = doc(None, "CPU threads for torch; None leaves torch's default.")
    log_every: int = doc(10, "Steps between metrics.jsonl records (state norms and ρ(Ā) included).")
    checkpoint_every: int = doc(200, "Steps between checkpoints (and one at the end).")
    keep_checkpoints: int = doc(2, "Checkpoints kept; older ones are deleted after a successful save.")
    max_bad_steps: int = doc(
        3, "Non-finite steps in a row (each skipped) before rolling back to a checkpoint."
    )
    rollback_lr_scale: float = doc(0.5, "Learning-rate factor applied at each roll-back.")
    max_rollbacks: int = doc(3, "Roll-backs before the run gives up.")
    tensorboard: bool = doc(False, "Also write TensorBoard logs (needs the tensorboard package).")
    progress: bool = doc(True, "Show a progress bar.")

    def validate(self) -> None:
        for name in (
            "steps",
            "global_batch",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "max_bad_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ConfigError(f"train.micro_batch must be ≥ 1 (or None), got {self.micro_batch}")
        if not 0 < self.rollback_lr_scale <= 1:
            raise ConfigError(f"train.rollback_lr_scale must lie in (0, 1], got {self.rollback_lr_scale}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"train.threads must be ≥ 1 (or None), got {self.threads}")


@dataclass
class EvalConfig(Section):
    """Validation during training: loss at a sweep of loop counts."""

    _section: typing.ClassVar[str] = "eval"

    every: int = doc(
        100, "Steps between validation sweeps (one always runs at the end); 0 means only at the end."
    )
    loops: list[int] = doc([], "Loop counts to evaluate; empty means 1, 2, 4, μ, 2μ.")
    max_windows: int = doc(64, "Validation sequences (of data.seq_len tokens) per sweep.")
    batch_size: int = doc(16, "Sequences per validation forward pass.")

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every must be ≥ 0, got {self.every}")
        if any(t < 1 for t in self.loops):
            raise ConfigError(f"eval.loops must all be ≥ 1, got {self.loops}")
        if self.max_windows < 1 or self.batch_size < 1:
            raise ConfigError("eval.max_windows and eval.batch_size must be ≥ 1")
