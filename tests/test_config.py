"""Config: defaults, precedence, `--set` parsing, every error path, presets, TOML round trip, derived sizes."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from looped.config import (
    PRESET_DIR,
    Config,
    ConfigError,
    ModelConfig,
    from_dict,
    load_config,
    presets,
    to_toml,
)
from looped.model import param_counts

# ---------------------------------------------------------------- defaults and docs


def test_defaults_construct():
    cfg = Config()
    assert isinstance(cfg.model, ModelConfig)
    assert cfg == load_config()
    assert cfg.model.width == 128 and cfg.model.loops == 4 and cfg.model.n_kv_heads is None


def test_every_field_has_a_one_line_doc():
    docs = ModelConfig.field_docs()
    assert set(docs) == {f.name for f in dataclasses.fields(ModelConfig)}
    for name, text in docs.items():
        assert text.strip(), f"model.{name} has no doc"
        assert "\n" not in text, f"model.{name} doc is not one line"


# ---------------------------------------------------------------- precedence and --set parsing


def _write(path, text):
    path.write_text(text)
    return path


def test_precedence_defaults_files_then_set(tmp_path):
    first = _write(tmp_path / "a.toml", "[model]\nwidth = 256\nn_heads = 8\nloops = 3\n")
    second = _write(tmp_path / "b.toml", '[model]\nwidth = 512\nmlp = "swiglu"\n')
    m = load_config([first, second], ["model.loops=6"]).model
    assert m.width == 512  # second file overrides the first
    assert m.n_heads == 8  # first file survives where the second is silent
    assert m.mlp == "swiglu"
    assert m.loops == 6  # --set overrides both files
    assert m.vocab_size == ModelConfig().vocab_size  # untouched default
    # file order matters
    assert load_config([second, first]).model.width == 256
    # without --set the file value stands
    assert load_config([first, second]).model.loops == 3


def test_set_overrides_a_preset():
    assert load_config(["debug"]).model.width == 64
    assert load_config(["debug"], ["model.width=96", "model.width=128"]).model.width == 128


@pytest.mark.parametrize(
    ("item", "key", "expected"),
    [
        ("model.width=256", "width", 256),
        ("model.norm_eps=1e-6", "norm_eps", 1e-6),
        ("model.logit_softcap=30.5", "logit_softcap", 30.5),
        ("model.qk_norm=false", "qk_norm", False),
        ("model.readout = true", "readout", True),
        ('model.spectral_norm=["core", "readout"]', "spectral_norm", ["core", "readout"]),
        ("model.value_embed_layers=[0, 2]", "value_embed_layers", [0, 2]),
        ('model.mlp="swiglu"', "mlp", "swiglu"),
        ("model.injection='linear'", "injection", "linear"),
        ("model.mlp=gelu", "mlp", "gelu"),  # bare string
        (" model.state_init = like-init ", "state_init", "like-init"),  # bare, with spaces
    ],
)
def test_set_parses_values(item, key, expected):
    value = getattr(load_config(overrides=["model.readout=true", item]).model, key)
    assert value == expected
    assert type(value) is type(expected)


def test_set_none_clears_an_optional_field_only():
    cfg = load_config(["prefix-sums"], ["model.attn_window=none", "model.head_dim=None"])
    assert cfg.model.attn_window is None and cfg.model.head_dim is None
    assert load_config(overrides=["loops.curriculum=none"]).loops.curriculum == "none"  # a string value
    with pytest.raises(ConfigError, match="width"):
        load_config(overrides=["model.width=none"])


@pytest.mark.parametrize("text", ["123", "nan", "inf", "true", "1e3", "[1, 2]", "runs/a b"])
def test_set_string_field_takes_any_text(text):
    cfg = load_config(overrides=[f"train.out={text}", f"train.init_from={text}"])
    assert cfg.train.out == text and cfg.train.init_from == text


def test_set_quoted_string_is_unquoted_and_typed_fields_stay_checked():
    assert load_config(overrides=['train.out="runs/x"']).train.out == "runs/x"
    with pytest.raises(ConfigError, match=r"train\.steps must be an integer, got 'many'"):
        load_config(overrides=["train.steps=many"])
    with pytest.raises(ConfigError, match=r"train\.device = 123 is not one of"):
        load_config(overrides=["train.device=123"])  # a Literal of strings is not free text


def test_string_field_in_a_file_is_still_type_checked(tmp_path):
    path = _write(tmp_path / "c.toml", "[train]\nout = 123\n")
    _raises(r"train\.out must be a string, got 123", [path])


def test_int_for_float_field_becomes_float():
    m = load_config(overrides=["model.rope_base=10000"]).model
    assert m.rope_base == 10000.0 and isinstance(m.rope_base, float)


# ---------------------------------------------------------------- error paths


def _raises(match, files=(), overrides=()):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(files, overrides)
    return str(info.value)


def test_unknown_key_in_file_suggests_nearest(tmp_path):
    path = _write(tmp_path / "c.toml", "[model]\nwidht = 64\n")
    msg = _raises(r"model\.widht", [path])
    assert "'width'" in msg and str(path) in msg


def test_unknown_key_in_set_suggests_nearest():
    msg = _raises(r"model\.widht", overrides=["model.widht=64"])
    assert "did you mean 'width'" in msg


def test_unknown_section_in_file(tmp_path):
    path = _write(tmp_path / "c.toml", "[modle]\nwidth = 64\n")
    msg = _raises(r"\[modle\]", [path])
    assert "'model'" in msg


def test_unknown_section_in_set():
    assert "'model'" in _raises(r"\[modle\]", overrides=["modle.width=64"])


def test_top_level_key_outside_a_section(tmp_path):
    path = _write(tmp_path / "c.toml", "width = 64\n")
    msg = _raises(r"'width' must be a \[section\]", [path])
    assert "'model'" in msg


def test_from_dict_rejects_unknown_keys_and_sections():
    with pytest.raises(ConfigError, match=r"model\.widht.*'width'"):
        from_dict({"model": {"widht": 64}})
    with pytest.raises(ConfigError, match=r"\[modle\].*'model'"):
        from_dict({"modle": {}})


@pytest.mark.parametrize("item", ["model.width", "model.width 64"])
def test_set_without_equals(item):
    _raises(r"expected section\.key=value", overrides=[item])


def test_set_without_section():
    msg = _raises(r"expected section\.key=value", overrides=["width=64"])
    assert "'width=64'" in msg


def test_bad_literal_lists_allowed_values():
    msg = _raises(r"model\.mlp = 'swish' is not one of", overrides=["model.mlp=swish"])
    for choice in ("'swiglu'", "'relu2'", "'gelu'"):
        assert choice in msg


def test_bad_literal_inside_list():
    msg = _raises(r"model\.spectral_norm", overrides=['model.spectral_norm=["cores"]'])
    assert "'core-out'" in msg


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ('model.width="wide"', r"model\.width must be an integer, got 'wide'"),
        ("model.width=wide", r"model\.width must be an integer"),
        ("model.width=true", r"model\.width must be an integer, got True"),
        ("model.width=128.0", r"model\.width must be an integer, got 128\.0"),
        ("model.n_kv_heads=2.5", r"model\.n_kv_heads must be an integer"),  # Optional[int]
        ("model.norm_eps=false", r"model\.norm_eps must be a finite number"),
        ("model.norm_eps=nan", r"model\.norm_eps must be a finite number"),
        ("model.rope_base=inf", r"model\.rope_base must be a finite number"),
        ("model.qk_norm=1", r"model\.qk_norm must be true or false"),
        ('model.spectral_norm="core"', r"model\.spectral_norm must be a list"),
        ("model.value_embed_layers=3", r"model\.value_embed_layers must be a list"),
        ("model.value_embed_layers=[1.0]", r"model\.value_embed_layers must be an integer"),
        ("model.value_embed_layers=[true]", r"model\.value_embed_layers must be an integer"),
    ],
)
def test_wrong_types(item, match):
    _raises(match, overrides=[item])


def test_wrong_type_in_file(tmp_path):
    path = _write(tmp_path / "c.toml", '[model]\nloops = "four"\n')
    _raises(r"model\.loops must be an integer", [path])


# Every raise in ModelConfig.validate: (fields, regex the message must match — it names the key).
VALIDATE_CASES = {
    "vocab_size < 1": ({"vocab_size": 0}, r"model\.vocab_size must be ≥ 1"),
    "width < 1": ({"width": 0}, r"model\.width must be ≥ 1"),
    "n_heads < 1": ({"n_heads": 0}, r"model\.n_heads must be ≥ 1"),
    "max_seq_len < 1": ({"max_seq_len": 0}, r"model\.max_seq_len must be ≥ 1"),
    "loops < 1": ({"loops": 0}, r"model\.loops must be ≥ 1"),
    "value_gate_channels < 1": ({"value_gate_channels": 0}, r"model\.value_gate_channels must be ≥ 1"),
    "negative prelude": ({"prelude_layers": -1}, r"model\.prelude_layers must be ≥ 0"),
    "negative core": ({"core_layers": -1}, r"model\.core_layers must be ≥ 0"),
    "negative coda": ({"coda_layers": -2}, r"model\.coda_layers must be ≥ 0"),
    "zero layers": (
        {"prelude_layers": 0, "core_layers": 0, "coda_layers": 0},
        r"model\.core_layers: the model needs at least one block",
    ),
    "n_heads not dividing width": ({"n_heads": 3}, r"model\.n_heads = 3 must divide model\.width = 128"),
    "odd head dim from width": (
        {"width": 96, "n_heads": 32},
        r"model\.width // model\.n_heads = 3 must be even",
    ),
    "odd explicit head_dim": ({"head_dim": 15}, r"model\.head_dim must be an even number"),
    "head_dim < 2": ({"head_dim": 0}, r"model\.head_dim must be an even number"),
    "n_kv_heads not dividing n_heads": (
        {"n_kv_heads": 3},
        r"model\.n_kv_heads = 3 must be ≥ 1 and divide model\.n_heads = 4",
    ),
    "n_kv_heads zero": ({"n_kv_heads": 0}, r"model\.n_kv_heads = 0 must be ≥ 1"),
    "mlp_hidden < 1": ({"mlp_hidden": 0}, r"model\.mlp_hidden must be ≥ 1"),
    "norm_eps zero": ({"norm_eps": 0.0}, r"model\.norm_eps must be > 0"),
    "norm_eps negative": ({"norm_eps": -1e-5}, r"model\.norm_eps must be > 0"),
    "rope_base one": ({"rope_base": 1.0}, r"model\.rope_base must be > 1"),
    "logit_softcap zero": ({"logit_softcap": 0.0}, r"model\.logit_softcap must be > 0"),
    "init_std negative": ({"init_std": -0.02}, r"model\.init_std must be > 0"),
    "init_decay zero": ({"init_decay": 0.0}, r"model\.init_decay must lie in \(0, 1\)"),
    "init_decay one": ({"init_decay": 1.0}, r"model\.init_decay must lie in \(0, 1\)"),
    "injection_gain zero": ({"injection_gain": 0.0}, r"model\.injection_gain must be > 0"),
    "residual readout bounded": (
        {"readout": True, "readout_init": "residual", "spectral_norm": ["readout"]},
        r"'readout' bounds C, but readout_init = 'residual'",
    ),
    "spectral_bound zero": ({"spectral_bound": 0.0}, r"model\.spectral_bound must be > 0"),
    "value_gate_channels > width": (
        {"value_gate_channels": 129},
        r"model\.value_gate_channels = 129 exceeds model\.width = 128",
    ),
    "value_embed_layers too high": (
        {"value_embed_layers": [0, 4]},
        r"model\.value_embed_layers: \[4\] outside 0\.\.3",
    ),
    "value_embed_layers negative": (
        {"value_embed_layers": [-1]},
        r"model\.value_embed_layers: \[-1\] outside",
    ),
    "core spectral norm without core": (
        {"core_layers": 0, "spectral_norm": ["core"]},
        r"model\.spectral_norm names core weights",
    ),
    "core-out spectral norm without core": (
        {"core_layers": 0, "spectral_norm": ["core-out"]},
        r"model\.spectral_norm names core weights",
    ),
    "injection spectral norm, additive": (
        {"injection": "additive", "spectral_norm": ["injection"]},
        r"model\.spectral_norm: 'injection' has no weights",
    ),
    "readout spectral norm without readout": (
        {"readout": False, "spectral_norm": ["readout"]},
        r"model\.spectral_norm: 'readout' needs model\.readout = true",
    ),
}


@pytest.mark.parametrize(("fields", "match"), VALIDATE_CASES.values(), ids=VALIDATE_CASES.keys())
def test_validate_rejects(fields, match):
    # through the constructor (which calls validate) ...
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**fields)
    # ... through validate() itself on a config that was valid when built ...
    cfg = ModelConfig()
    for name, value in fields.items():
        setattr(cfg, name, value)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()
    # ... and through --set, as a user would hit it.
    toml = {k: str(v).lower() if isinstance(v, bool) else repr(v) for k, v in fields.items()}
    _raises(match, overrides=[f"model.{k}={v}".replace("'", '"') for k, v in toml.items()])


def test_validate_accepts_the_edges():
    ModelConfig(head_dim=16, n_heads=3)  # explicit head_dim lifts the divisibility rule
    ModelConfig(core_layers=0)  # a standard transformer
    ModelConfig(prelude_layers=0, coda_layers=0, core_layers=1)
    ModelConfig(value_gate_channels=128, value_embed_layers=[0, 3])
    ModelConfig(readout=True, spectral_norm=["injection", "readout", "core-out", "core"])


def test_invalid_toml_file(tmp_path):
    path = _write(tmp_path / "broken.toml", "[model\nwidth = \n")
    msg = _raises(r"not valid TOML", [path])
    assert str(path) in msg


def test_unknown_preset_lists_presets_and_suggests():
    msg = _raises(r"no config file or preset named 'parcae-140'", ["parcae-140"])
    assert "did you mean 'parcae-140m'" in msg
    for name in presets():
        assert name in msg


# ---------------------------------------------------------------- presets


def test_every_preset_file_loads():
    files = sorted(PRESET_DIR.glob("*.toml"))
    assert files and presets() == sorted(f.stem for f in files)
    for f in files:
        by_name, by_path = load_config([f.stem]), load_config([f])
        assert by_name == by_path
        assert param_counts(by_name.model)["total"] > 0


@pytest.mark.parametrize(
    ("name", "layers", "width"),
    [
        ("parcae-140m", 2, 768),
        ("parcae-370m", 4, 1024),
        ("parcae-770m", 6, 1280),
        ("parcae-1.3b", 8, 1536),
    ],
)
def test_parcae_presets_shapes(name, layers, width):
    m = load_config([name]).model
    assert (m.prelude_layers, m.core_layers, m.coda_layers) == (layers, layers, layers)
    assert m.width == width
    assert m.resolved_head_dim == 128 and m.resolved_mlp_hidden == 4 * width and m.mlp == "relu2"
    assert m.vocab_size == 32768 and m.tie_embeddings and m.injection == "diagonal"


@pytest.mark.parametrize(("name", "total"), [("parcae-140m", 144_323_136), ("parcae-370m", 388_003_328)])
def test_parcae_published_param_counts(name, total):
    assert param_counts(load_config([name]).model)["total"] == total


# ---------------------------------------------------------------- TOML round trip


def _round_trip(cfg, tmp_path):
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    return load_config([path])


@pytest.mark.parametrize("name", presets())
def test_round_trip_presets(name, tmp_path):
    cfg = load_config([name])
    assert _round_trip(cfg, tmp_path) == cfg


def test_round_trip_none_fields_and_lists(tmp_path):
    cfg = load_config(
        ["debug"],
        [
            "model.n_kv_heads=2",
            "model.mlp=swiglu",
            "model.logit_softcap=30.0",
            "model.value_embed_layers=[0, 3]",
            "model.readout=true",
            'model.spectral_norm=["core", "readout"]',
            "model.init_decay=0.25",
            "model.norm_eps=1e-6",
            "model.block_norm=sandwich",
        ],
    )
    assert cfg.model.head_dim is None and cfg.model.init_std is None and cfg.model.mlp_hidden is None
    back = _round_trip(cfg, tmp_path)
    assert back == cfg
    assert back.model.head_dim is None and back.model.init_std is None
    assert back.model.value_embed_layers == [0, 3]
    assert back.model.spectral_norm == ["core", "readout"]
    # None stays None (not written), an empty list stays an empty list
    text = to_toml(Config())
    assert "head_dim" not in text and "spectral_norm = []" in text
    assert _round_trip(Config(), tmp_path) == Config()


@settings(max_examples=50, deadline=None)
@given(
    eps=st.floats(min_value=1e-300, max_value=1e300, allow_subnormal=False),
    base=st.floats(min_value=1.0, max_value=1e300, exclude_min=True),
    decay=st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True),
    layers=st.lists(st.integers(0, 3), max_size=4),
)
def test_round_trip_floats_exactly(tmp_path_factory, eps, base, decay, layers):
    cfg = Config(model=ModelConfig(norm_eps=eps, rope_base=base, init_decay=decay, value_embed_layers=layers))
    assert _round_trip(cfg, tmp_path_factory.mktemp("rt")) == cfg


# ---------------------------------------------------------------- derived properties


def test_n_kv_heads_and_head_dim():
    m = ModelConfig(width=128, n_heads=4)
    assert m.resolved_n_kv_heads == 4 and m.resolved_head_dim == 32
    m = ModelConfig(width=128, n_heads=8, n_kv_heads=2, head_dim=64)
    assert m.resolved_n_kv_heads == 2 and m.resolved_head_dim == 64


@pytest.mark.parametrize(("width", "hidden"), [(64, 192), (96, 256), (100, 320), (128, 384), (768, 2048)])
def test_swiglu_hidden_rounds_up_to_multiple_of_64(width, hidden):
    m = ModelConfig(width=width, n_heads=2, value_gate_channels=32, mlp="swiglu")
    assert m.resolved_mlp_hidden == hidden
    assert m.resolved_mlp_hidden % 64 == 0 and 8 * width / 3 <= m.resolved_mlp_hidden < 8 * width / 3 + 64
    assert m.resolved_mlp_hidden == 64 * math.ceil(8 * width / 3 / 64)


def test_hidden_other_mlps_and_explicit():
    assert ModelConfig(mlp="relu2").resolved_mlp_hidden == 4 * 128
    assert ModelConfig(mlp="gelu").resolved_mlp_hidden == 4 * 128
    assert ModelConfig(mlp="swiglu", mlp_hidden=100).resolved_mlp_hidden == 100


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ((1, 2, 1), [1, 3]),
        ((1, 1, 1), [0, 2]),
        ((2, 2, 2), [1, 3, 5]),
        ((0, 1, 0), [0]),
        ((0, 2, 0), [1]),
    ],
)
def test_ve_layers_alternate_and_include_last(layers, expected):
    p, c, k = layers
    m = ModelConfig(prelude_layers=p, core_layers=c, coda_layers=k, value_embeds=True)
    assert m.ve_layers == expected
    assert m.n_layers - 1 in m.ve_layers
    assert ModelConfig(prelude_layers=p, core_layers=c, coda_layers=k).ve_layers == []


def test_explicit_value_embed_layers_override():
    assert ModelConfig(value_embeds=True, value_embed_layers=[2, 0, 2]).ve_layers == [0, 2]
    assert ModelConfig(value_embeds=False, value_embed_layers=[1]).ve_layers == [1]
    assert ModelConfig(value_embeds=True, value_embed_layers=[]).ve_layers == []


def test_section_that_is_not_a_table_is_a_config_error():
    with pytest.raises(ConfigError, match=r"\[model\] must be a table"):
        from_dict({"model": 5})


def test_integers_become_floats_in_optional_float_fields():
    cfg = ModelConfig(logit_softcap=30, init_std=1)
    assert type(cfg.logit_softcap) is float and type(cfg.init_std) is float


def test_renamed_keys(tmp_path):
    """An old name reads as its new one wherever a config comes from: a checkpoint's config.toml (from_dict),
    a config file and --set (load_config); what is saved afterwards uses the new name only."""
    cfg = from_dict({"loops": {"max_loops": 9}, "infer": {"max_loops": 7}})
    assert cfg.loops.max_sampled_loops == 9 and cfg.infer.max_request_loops == 7
    cfg = load_config(["debug"], ["loops.max_loops=9", "infer.max_loops=7"])
    assert cfg.loops.max_sampled_loops == 9 and cfg.infer.max_request_loops == 7
    old = tmp_path / "old.toml"
    old.write_text("[loops]\nmax_loops = 11\n\n[infer]\nmax_loops = 13\n")
    cfg = load_config(["debug", old])
    assert cfg.loops.max_sampled_loops == 11 and cfg.infer.max_request_loops == 13
    assert "max_loops =" not in to_toml(cfg) and "max_request_loops = 13" in to_toml(cfg)
    # precedence is unchanged: a later file or --set wins, whichever name each uses
    new = tmp_path / "new.toml"
    new.write_text("[infer]\nmax_request_loops = 5\n")
    assert load_config([old, new]).infer.max_request_loops == 5
    assert load_config([new], ["infer.max_loops=6"]).infer.max_request_loops == 6
    with pytest.raises(ConfigError, match="unknown key loops.max_loop"):  # other misspellings still fail
        load_config([], ["loops.max_loop=3"])


def test_checkpoint_config_with_old_names_loads(tmp_path):
    """A checkpoint saved before the renames (its config.toml says max_loops) loads through load_config, as
    `looped serve`, `finetune` and `retrofit` read it, with its values under the new names."""
    saved = to_toml(load_config(["debug"], ["loops.max_sampled_loops=12", "infer.max_request_loops=24"]))
    saved = saved.replace("max_sampled_loops", "max_loops").replace("max_request_loops", "max_loops")
    (tmp_path / "config.toml").write_text(saved)
    cfg = load_config([tmp_path / "config.toml"], ["serve.port=9000"])
    assert cfg.loops.max_sampled_loops == 12 and cfg.infer.max_request_loops == 24 and cfg.serve.port == 9000


def test_a_key_that_is_not_a_digest_says_how_to_make_one():
    """The hint is a command that works as written: --hash-key reads the key from stdin, not an argument."""
    with pytest.raises(
        ConfigError, match=r"64 lowercase hex digits \(`looped serve --hash-key < key\.txt`\)"
    ):
        from_dict({"serve": {"keys": [{"name": "me", "sha256": "my-secret-key"}]}})


def test_the_defaults_are_the_recipe_and_the_parcae_preset_restores_parcaes_parts():
    cfg = load_config(["cpu-compare"])
    assert not cfg.model.readout and cfg.optim.optimizer == "muon"
    assert cfg.model.injection == "diagonal" and cfg.model.prelude_norm and cfg.loops.sampler == "poisson"
    parcae = load_config(["cpu-compare", "parcae"])
    assert parcae.model.readout and parcae.model.readout_init == "orthogonal"
    assert parcae.optim.optimizer == "adamw"
    # the rest of the config is the one it was stacked on
    assert parcae.model.width == cfg.model.width and parcae.loops == cfg.loops and parcae.data == cfg.data
    # the task presets keep the readout and AdamW their documented results were measured with
    for name in ("prefix-sums", "mazes", "vision"):
        task = load_config([name])
        assert task.model.readout and task.optim.optimizer == "adamw"
