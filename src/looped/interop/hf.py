"""Hugging Face `transformers` classes for looped checkpoints, and `export_hf` to write a loadable folder.

    import looped.interop.hf  # registers model_type "looped" with AutoConfig and AutoModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_hf("runs/demo/final", "hf/demo")  # or: looped export hf runs/demo/final hf/demo
    model = AutoModelForCausalLM.from_pretrained("hf/demo")
    tok = AutoTokenizer.from_pretrained("hf/demo")
    out = model.generate(**tok("KING HENRY.", return_tensors="pt"), max_new_tokens=40, num_loops=8)

Importing this module is all `from_pretrained` needs: no `trust_remote_code`. An exported folder also
carries `auto_map` and a two-line `modeling_looped.py` that imports these classes, so tools that cannot
import our module first load it with `trust_remote_code=True`, provided the `looped` package is installed;
the folder holds no model code of its own. (Without the import or that flag, transformers asks whether to
run the folder's code, for the tokenizer too.) lm-eval, for example:

    lm_eval --model hf --model_args pretrained=hf/demo,trust_remote_code=True,num_loops=8,backend=causal ...
    # or in Python, after `import looped.interop.hf`:
    lm_eval.simple_evaluate(model="hf", model_args="pretrained=hf/demo,num_loops=8,backend=causal", ...)

(`num_loops`, like any config attribute, can be set through from_pretrained's keywords; `backend=causal`
because lm-eval only recognises the model types transformers ships.)

The loop count is a runtime argument like everywhere else: `num_loops` in `forward` and `generate` overrides
`config.num_loops` (the export's default). It is kept out of generation_config.json on purpose: `generate`
would absorb a `num_loops` keyword into its generation config instead of passing it to the model.

Generation keeps a `looped.infer.cache.KVCache` (`config.kv_cache`: `per-loop`, exact, or `shared`) inside
`LoopedCache`, a `transformers.Cache` that generate() carries between steps; the model tells generate() not
to build a DynamicCache (`_supports_default_dynamic_cache`) and makes its own on the first cached call.
Left-padded batches work with and without the cache: positions are cumsum(attention_mask) − 1 and padding
keys are never attended. The cached and padded paths are inference-only (no gradients).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Cache,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from looped.checkpoint import CheckpointError, atomic_dir, load, load_config_dir
from looped.config import ConfigError, ModelConfig
from looped.data.errors import DataError
from looped.data.tokenizer import EOT, Tokenizer
from looped.infer.cache import KV_MODES, KVCache
from looped.infer.engine import resolve_device, resolve_dtype
from looped.infer.forward import forward_cached
from looped.model.layers import model_rope_table
from looped.model.lm import LoopedLM

MODEL_TYPE = "looped"
SHIM = "modeling_looped.py"
_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
# transformers ≥ 5.2x names the output's cache `cache`; earlier 5.x releases call it `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class LoopedHFConfig(PreTrainedConfig):
    """A `looped.config.ModelConfig` as a transformers config: every model field is an attribute of the same
    name, plus `num_loops` (default loop count, `loops` unless set) and `kv_cache` (`per-loop` | `shared`)."""

    model_type = MODEL_TYPE
    # The names other libraries look for (lm-eval reads the context length from max_position_embeddings).
    attribute_map = {
        "hidden_size": "width",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
        "tie_word_embeddings": "tie_embeddings",
    }

    def __init__(self, num_loops: int | None = None, kv_cache: str = "per-loop", **kwargs: Any) -> None:
        fields = {k: kwargs.pop(k) for k in _MODEL_FIELDS if k in kwargs}
        super().__init__(**kwargs)
        # After the base class, which may set tie_word_embeddings (mapped onto tie_embeddings) by default.
        for name, value in {**ModelConfig().to_dict(), **fields}.items():
            setattr(self, name, value)
        self.num_loops = self.loops if num_loops is None else num_loops
        if kv_cache not in KV_MODES:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_MODES)}, got {kv_cache!r}")
        self.kv_cache = kv_cache

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs: Any) -> LoopedHFConfig:
        """The transformers config of a native ModelConfig; kwargs set num_loops, kv_cache or base fields."""
        return cls(**cfg.to_dict(), **kwargs)

    def model_config(self) -> ModelConfig:
        """The native ModelConfig these attributes describe (validated)."""
        try:
            return ModelConfig(**{k: getattr(self, k) for k in _MODEL_FIELDS})
        except ConfigError as e:
            raise ValueError(f"config.json: {e}") from None


class LoopedCache(Cache):
    """A `looped.infer.cache.KVCache` in the shape transformers' generate() carries between forward calls.

    Every row holds one sequence of the batch, left padding included, so all rows have the same length.
    """

    def __init__(self, kv: KVCache) -> None:
        super().__init__(layers=[])
        self.kv = kv

    def __len__(self) -> int:  # the number of cached attention groups (never 0: a cache is truthy)
        return max(1, len(self.kv.groups))

    def __repr__(self) -> str:
        return f"LoopedCache(mode={self.kv.mode!r}, rows={self.kv.rows}, length={self.get_seq_length()})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.kv.lengths.max()) if self.kv.lengths.numel() else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.kv.cfg.max_seq_len

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def batch_size(self) -> int:
        return self.kv.rows

    def reset(self) -> None:
        self.kv.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row r takes the contents of row beam_idx[r]."""
        idx = beam_idx.to(self.kv.device)
        for kv in self.kv.groups.values():
            for x in kv:
                x.copy_(x.index_select(0, idx))
        self.kv.lengths = self.kv.lengths.index_select(0, beam_idx.cpu())

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("LoopedCache cannot be cropped (assisted generation is not supported)")


class LoopedPreTrainedModel(PreTrainedModel):
    """Binds the config class and the weight prefix; the weights are LoopedLM's own under `model.`."""

    config_class = LoopedHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # LoopedLM initialises itself (Parcae's scaled-zero init) when built; transformers' generic init would
        # overwrite it. Only the rotary table, a non-persistent buffer that from_pretrained leaves empty
        # (it builds the model on the meta device), is recomputed here.
        if isinstance(module, LoopedLM):
            module.rope.copy_(model_rope_table(module.cfg, module.rope.device))


class LoopedForCausalLM(LoopedPreTrainedModel, GenerationMixin):
    """A LoopedLM behind transformers' causal-LM interface: forward(), generate(), from_pretrained().

    `num_loops` (an int or a (B,) tensor) in forward() or generate() overrides `config.num_loops`.
    """

    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}

    def __init__(self, config: LoopedHFConfig, model: LoopedLM | None = None) -> None:
        super().__init__(config)
        if model is None:
            cfg = config.model_config()
            if cfg.spectral_norm and torch.get_default_device().type == "meta":
                # from_pretrained builds on the meta device, but the spectral constraint measures the initial
                # weights, which needs real tensors; the loaded weights replace them anyway.
                with torch.device("cpu"):
                    model = LoopedLM(cfg)
            else:
                model = LoopedLM(cfg)
        self.model = model
        self.post_init()

    @classmethod
    def from_native(cls, model: LoopedLM, **config_kwargs: Any) -> LoopedForCausalLM:
        """Wrap a native LoopedLM (its parameters are shared, not copied); kwargs go to the config."""
        config = LoopedHFConfig.from_model_config(model.cfg, **config_kwargs)
        config.dtype = next(model.parameters()).dtype
        return cls(config, model=model)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """transformers' from_pretrained, made strict like `looped.load`: a missing, unexpected or mis-shaped
        weight is a CheckpointError instead of a warning and a randomly initialised tensor."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            keys = sorted(str(k) for k in info.get(kind) or ())
            if keys:
                more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
                raise CheckpointError(f"{args[0] if args else ''}: {kind.replace('_', ' ')}: {keys[0]}{more}")
        return (model, info) if want_info else model

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # keys and values live in a LoopedCache, made by forward() on the first cached call

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LoopedCache | None = None,
        past_key_values: LoopedCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        num_loops: int | torch.Tensor | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Next-token logits for `input_ids` (B, P), appended to `cache` when one is given or use_cache is set.

        Args:
            input_ids: (B, P) token ids; with a cache, only the tokens it has not seen.
            attention_mask: (B, S) 1 for tokens, 0 for (left) padding; S counts cached tokens too.
            position_ids: (B, P) rotary positions; default cumsum(attention_mask) − 1, or 0..S−1 without a mask.
            cache / past_key_values: a LoopedCache from an earlier call (two names: transformers renamed it).
            use_cache: return a LoopedCache (made here when none is given); default only when one is given.
            labels: (B, P) targets equal to input_ids (shifted inside, as in transformers); -100 is ignored.
            num_loops: loop count T (int or (B,) tensor); None uses config.num_loops.
            cache_position: accepted for older generate() loops and ignored (the cache knows its length).
            logits_to_keep: 0 for logits at every position, k for the last k, or a tensor of positions.
        """
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("LoopedForCausalLM takes input_ids (inputs_embeds are not supported)")
        cache = cache if cache is not None else past_key_values
        use_cache = cache is not None if use_cache is None else use_cache
        loops = self.config.num_loops if num_loops is None else num_loops
        keep_last = isinstance(logits_to_keep, int) and logits_to_keep == 1 and labels is None
        if cache is not None or use_cache:
            logits, cache = self._forward_cached(
                input_ids, attention_mask, position_ids, cache, loops, keep_last
            )
        else:
            logits = self._forward_full(input_ids, attention_mask, position_ids, loops, keep_last)
        loss = None
        if labels is not None:
            loss = _shifted_loss(logits, labels, kwargs.get("num_items_in_batch"))
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0 and logits.shape[1] > logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        else:
            logits = logits[:, logits_to_keep]
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None}
        )

    def _forward_full(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        loops: int | torch.Tensor,
        keep_last: bool = False,
    ) -> torch.Tensor:
        """Logits at every position without keeping a cache: LoopedLM.forward itself unless there is padding
        before a token or explicit positions, which go through the cached path into a throwaway cache."""
        B, S = input_ids.shape
        if position_ids is not None and torch.equal(
            position_ids.to(input_ids.device), torch.arange(S, device=input_ids.device).expand(B, S)
        ):
            position_ids = None
        if position_ids is None and (attention_mask is None or _no_left_padding(attention_mask)):
            # Padding only after the last token (or none) cannot change earlier logits in a causal model.
            return self.model(input_ids, loops=loops).logits
        logits, _ = self._forward_cached(input_ids, attention_mask, position_ids, None, loops, keep_last)
        return logits

    def _forward_cached(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: LoopedCache | None,
        loops: int | torch.Tensor,
        keep_last: bool,
    ) -> tuple[torch.Tensor, LoopedCache]:
        B, P = input_ids.shape
        if cache is None:
            kv = KVCache(
                self.model.cfg,
                mode=self.config.kv_cache,
                rows=B,
                slots=P,
                device=input_ids.device,
                dtype=self.model.embed.weight.dtype,
            )
            cache = LoopedCache(kv)
        if cache.kv.rows < B:
            raise ValueError(f"the cache holds {cache.kv.rows} sequences, the input {B}")
        seen = cache.get_seq_length()
        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, seen + P):
                raise ValueError(
                    f"attention_mask must cover the {seen} cached and {P} new tokens: expected shape "
                    f"{(B, seen + P)}, got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.to(torch.bool)
            if not bool(mask.all()):
                key_mask = mask
                if position_ids is None:
                    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -P:]
        out = forward_cached(
            self.model,
            cache.kv,
            input_ids,
            loops=loops,
            positions=position_ids,
            key_mask=key_mask,
            all_logits=not keep_last,
        )
        logits = out.logits[:, None] if keep_last else out.logits  # (B, 1 or P, V)
        return logits, cache

    # ------------------------------------------------------------------ generate() glue
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: LoopedCache | None = None,
        past_key_values: LoopedCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The tokens the cache has not seen, the full attention mask, and every model keyword (num_loops...)."""
        if inputs_embeds is not None:
            raise ValueError("LoopedForCausalLM.generate takes input_ids (inputs_embeds are not supported)")
        cache = cache if cache is not None else past_key_values
        seen = cache.get_seq_length() if cache is not None else 0
        inputs: dict[str, Any] = {"input_ids": input_ids[:, seen:], "cache": cache}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is not None:
            inputs["position_ids"] = position_ids[:, seen:]
        for key in ("next_sequence_length", "is_first_iteration", "cache_position", "labels"):
            kwargs.pop(key, None)
        inputs.update(kwargs)
        return inputs


def _no_left_padding(mask: torch.Tensor) -> bool:
    """Whether every row of a (B, S) attention mask is ones followed only by zeros."""
    m = mask.to(torch.int8)
    return bool((m[:, 1:] <= m[:, :-1]).all())


def _shifted_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of logits[:, t] against labels[:, t + 1] (the transformers convention)."""
    logits = logits[:, :-1].float().flatten(0, 1)
    target = labels[:, 1:].to(logits.device).flatten()
    if num_items is None:
        return F.cross_entropy(logits, target, ignore_index=-100)
    return F.cross_entropy(logits, target, ignore_index=-100, reduction="sum") / num_items


# ---------------------------------------------------------------------- export
def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    num_loops: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Write a native checkpoint as a Hugging Face folder that `from_pretrained` loads.

    The folder holds config.json (`model_type = "looped"`, the model config, `num_loops`, `auto_map`),
    model.safetensors (LoopedLM's weights under `model.`, the tied head left out, as in the checkpoint),
    generation_config.json (end of text as eos and pad), the tokenizer (tokenizer.json, tokenizer_config.json)
    and modeling_looped.py, which imports the classes of this module. It is written to a temporary folder and
    renamed into place, replacing `out`.

    Args:
        checkpoint: A checkpoint directory (config.toml, model.safetensors, tokenizer.json); those written by
            `looped train` carry their tokenizer.
        out: The folder to write.
        num_loops: The default loop count of the exported model (`config.num_loops`); None keeps the
            checkpoint's `model.loops`. Callers still choose per call with `num_loops=`.
        device: Where the weights are loaded while converting ("auto", "cpu", "cuda"); None: the CPU.
        dtype: The dtype of the written weights ("float32" or "bfloat16"); None keeps float32.

    Returns:
        The path of the written folder.

    Raises:
        CheckpointError: the checkpoint is unreadable or has no (or an unusable) tokenizer.json.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    cfg = load_config_dir(checkpoint)
    if not (checkpoint / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{checkpoint}: no tokenizer.json; a Hugging Face export needs the tokenizer "
            "(checkpoints written by `looped train` carry one; copy the data's tokenizer.json in otherwise)"
        )
    try:
        tok = Tokenizer.load(checkpoint)
    except DataError as e:
        raise CheckpointError(str(e)) from None
    if tok.vocab_size > cfg.model.vocab_size:
        raise CheckpointError(
            f"{checkpoint}: tokenizer.json has {tok.vocab_size} ids, more than model.vocab_size = "
            f"{cfg.model.vocab_size}"
        )
    if num_loops is not None and num_loops < 1:
        raise ValueError(f"num_loops must be ≥ 1, got {num_loops}")
    where = resolve_device(device or "cpu")
    native = load(checkpoint, device=where, dtype=resolve_dtype(dtype or "float32", where))
    model = LoopedForCausalLM.from_native(native.cpu(), num_loops=num_loops)
    model.config.auto_map = {
        "AutoConfig": f"{SHIM[:-3]}.LoopedHFConfig",
        "AutoModelForCausalLM": f"{SHIM[:-3]}.LoopedForCausalLM",
    }
    eot = tok.eot_id
    model.generation_config = GenerationConfig(eos_token_id=eot, pad_token_id=eot)
    special = {"eos_token": EOT, "pad_token": EOT} if eot is not None else {}
    # split_special_tokens: text that spells "<|endoftext|>" stays text, as in looped's own tokenizer; the
    # end-of-text token is only ever inserted by id.
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok.hf,
        model_max_length=cfg.model.max_seq_len,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        **special,
    )
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        (tmp / SHIM).write_text(
            '"""Hugging Face classes for a looped checkpoint; they live in the `looped` package."""\n\n'
            "from looped.interop.hf import LoopedForCausalLM, LoopedHFConfig  # noqa: F401\n"
        )
    return out


AutoConfig.register(MODEL_TYPE, LoopedHFConfig, exist_ok=True)
AutoModelForCausalLM.register(LoopedHFConfig, LoopedForCausalLM, exist_ok=True)
