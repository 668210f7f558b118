"""The Engine: batching, per-request loops, adaptive exit, budgets, sampling, streaming and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import randomize_, tiny

from looped.checkpoint import CheckpointError
from looped.config import InferConfig
from looped.data.tokenizer import Tokenizer
from looped.infer.budget import LatencyController, Profile, calibrate, loops_for_flops
from looped.infer.engine import Compute, Engine
from looped.model.lm import LoopedLM

PROMPTS = [[3, 5, 7], [11, 13, 17, 19, 23, 29, 31], [2, 4]]


@pytest.fixture(scope="module")
def model():
    return randomize_(LoopedLM(tiny(state_init="like-init", max_seq_len=64))).eval()


@pytest.fixture(scope="module")
def text_engine():
    tok = Tokenizer.train_bpe(["the cat sees the moon. a dog greets the sea."] * 20, vocab_size=280)
    model = randomize_(LoopedLM(tiny(vocab_size=tok.vocab_size, max_seq_len=64))).eval()
    return Engine(model, tok)


def uncached_greedy(model, prompt, loops, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), loops=loops).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("kv_cache", ["per-loop", "shared"])
def test_batched_equals_one_by_one_with_mixed_loops(model, kv_cache):
    loops = [1, 5, 3]
    batched = Engine(model, kv_cache=kv_cache).generate(PROMPTS, loops=loops, max_new_tokens=8, temperature=0)
    for prompt, t, got in zip(PROMPTS, loops, batched, strict=True):
        alone = Engine(model, kv_cache=kv_cache).generate(prompt, loops=t, max_new_tokens=8, temperature=0)
        assert got.token_ids == alone.token_ids and got.loops == [t] * 8
    # per-loop with a fixed depth is the model itself
    if kv_cache == "per-loop":
        assert batched[1].token_ids == uncached_greedy(model, PROMPTS[1], 5, 8)


def test_sampling_is_seeded_per_request_and_batch_independent(model):
    kw = dict(max_new_tokens=10, temperature=1.2, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=7)
    batched = Engine(model).generate(PROMPTS, loops=[2, 3, 4], **kw)
    alone = [Engine(model).generate(p, loops=t, **kw) for p, t in zip(PROMPTS, [2, 3, 4], strict=True)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    other = Engine(model).generate(PROMPTS[0], loops=2, **{**kw, "seed": 8})
    assert other.token_ids != alone[0].token_ids


def test_a_request_joins_a_running_batch(model):
    engine = Engine(model, kv_cache="per-loop")
    params = engine.sampling(max_new_tokens=6, temperature=0)
    first = engine.submit(PROMPTS[0], params, Compute(loops=3))
    engine.step()
    engine.step()
    second = engine.submit(PROMPTS[1], params, Compute(loops=5))
    while engine.busy:
        engine.step()
    assert engine.result(first).token_ids == uncached_greedy(model, PROMPTS[0], 3, 6)
    assert engine.result(second).token_ids == uncached_greedy(model, PROMPTS[1], 5, 6)
    assert engine.cache.in_use == [False] * engine.cache.rows  # rows are given back


def test_a_stopped_sequence_costs_no_core_compute(model):
    rows_seen: list[int] = []
    hook = model.core[0].register_forward_pre_hook(lambda m, args: rows_seen.append(args[0].shape[0]))
    try:
        Engine(model).generate([PROMPTS[0], PROMPTS[2]], loops=[2, 6], max_new_tokens=2, temperature=0)
    finally:
        hook.remove()
    # prefill and one decode step: 2 loops with both rows, then 4 with only the deeper one
    assert rows_seen == [2, 2, 1, 1, 1, 1] * 2


@pytest.mark.parametrize("criterion", ["kl:1e-2", "entropy:1e-2", "state:5e-2", "argmax:2"])
def test_adaptive_exit_lowers_mean_loops_on_a_trained_model(trained, criterion):
    engine = Engine.from_checkpoint(trained)
    prompt = "the king loves"
    fixed = engine.generate(prompt, loops=12, max_new_tokens=24, temperature=0)
    adaptive = engine.generate(
        prompt, loops=12, exit=criterion, min_loops=2, max_new_tokens=24, temperature=0
    )
    assert len(adaptive.loops) == len(adaptive.token_ids) + (adaptive.finish_reason == "stop")
    assert all(2 <= t <= 12 for t in adaptive.loops)
    assert adaptive.mean_loops < 0.8 * fixed.mean_loops, adaptive.loops
    assert adaptive.flops_per_token < fixed.flops_per_token
    agree = sum(a == b for a, b in zip(adaptive.token_ids, fixed.token_ids, strict=False))
    assert agree >= len(fixed.token_ids) // 2  # exits where more loops change little


def test_exit_with_a_tight_threshold_runs_every_loop(model):
    out = Engine(model).generate(PROMPTS[0], loops=5, exit="kl:1e-30", max_new_tokens=4, temperature=0)
    assert out.loops == [5] * 4
    assert (
        out.token_ids
        == Engine(model).generate(PROMPTS[0], loops=5, max_new_tokens=4, temperature=0).token_ids
    )


@torch.no_grad()
def warm_greedy(model: LoopedLM, prompt: list[int], loops: int, steps: int) -> list[int]:
    """Greedy decoding without a cache in which every generated token's loop starts from the previous
    position's final state: the whole sequence is recomputed each step with those initial states."""
    ids, warm = list(prompt), []
    for _ in range(steps):
        x, ves = model.embed_inputs(torch.tensor([ids]))
        rope = model.rotary(len(ids))
        inputs = model.loop_inputs(model.run_prelude(x, rope, ves), rope, ves)
        h = model.initial_state(inputs.e)
        if warm:
            h[0, len(prompt) :] = torch.stack(warm)
        for _ in range(loops):
            h = model.loop_step(h, inputs)
        ids.append(int(model.logits(model.run_coda(h, rope, ves))[0, -1].argmax()))
        warm.append(h[0, -1])  # the next position starts from this one's final state
    return ids[len(prompt) :]


def test_warm_start_runs_from_the_previous_state(model):
    cold = Engine(model, kv_cache="per-loop").generate(PROMPTS[1], loops=2, max_new_tokens=8, temperature=0)
    warm = Engine(model, kv_cache="per-loop").generate(
        PROMPTS[1], loops=2, warm_start=True, max_new_tokens=8, temperature=0
    )
    assert warm.token_ids == warm_greedy(model, PROMPTS[1], 2, 8)
    assert cold.token_ids == uncached_greedy(model, PROMPTS[1], 2, 8)
    assert warm.token_ids != cold.token_ids  # the two starts lead to different text on this model


def test_flop_budget_picks_the_most_loops_that_fit(model):
    budget = model.flops_per_token(5, 16) + 1
    assert loops_for_flops(model, budget, 16, 64) == 5
    # A request is costed at its full length: 3 prompt + 13 new tokens = 16.
    out = Engine(model).generate(PROMPTS[0], max_flops_per_token=budget, max_new_tokens=13, temperature=0)
    assert out.loops == [5] * 13
    assert model.flops_per_token(6, 16) > budget  # the sixth loop would not have fit
    with pytest.raises(ValueError, match="below the cost of one loop"):
        Engine(model).generate(PROMPTS[0], max_flops_per_token=10.0, max_new_tokens=3)


def test_latency_controller_follows_the_machine():
    profile = Profile(fit={1: (1.0, 1.0)})  # 1 ms + 1 ms per loop
    ctl = LatencyController(profile)
    assert ctl.pick(9.5, 1, 32) == 8
    for _ in range(10):  # the machine gets 2× slower
        ctl.observe(1, 4, 2 * profile.predict(1, 4))
    assert ctl.pick(9.5, 1, 32) in (3, 4)
    for _ in range(10):  # and free again
        ctl.observe(1, 4, profile.predict(1, 4))
    assert ctl.pick(9.5, 1, 32) == 8
    assert ctl.pick(0.5, 1, 32) == 1  # never below one loop


def test_engine_lowers_loops_when_steps_get_slower(model, monkeypatch):
    import looped.infer.engine as eng

    engine = Engine(model, profile=Profile(fit={1: (1.0, 1.0)}, device="cpu", dtype="float32"))
    now = [0.0]
    slowdown = [1.0]
    real = eng.forward_cached

    def timed(model_, cache, ids, **kw):
        out = real(model_, cache, ids, **kw)
        now[0] += slowdown[0] * (1.0 + float(out.loops.float().mean())) / 1000  # what the profile predicts
        return out

    monkeypatch.setattr(eng, "forward_cached", timed)
    engine.clock = lambda: now[0]
    req = engine.submit(
        PROMPTS[0], engine.sampling(max_new_tokens=40, temperature=0), Compute(max_ms_per_token=9.5)
    )
    for _ in range(10):
        engine.step()
    assert req.loops_used[-1] == 8
    slowdown[0] = 3.0
    for _ in range(10):
        engine.step()
    assert req.loops_used[-1] <= 3
    slowdown[0] = 1.0
    while engine.busy:
        engine.step()
    assert req.loops_used[-1] == 8


def test_profile_from_another_device_or_dtype_is_ignored(model):
    """Latencies measured on another device or dtype say nothing about this engine's: such a profile (or one
    that does not say) is dropped with a notice, and max_ms_per_token calibrates afresh."""
    fit = {1: (1.0, 1.0)}
    for profile, why in [
        (Profile(fit, device="cuda", dtype="float32"), "measured on cuda in float32, not on cpu in float32"),
        (Profile(fit, device="cpu", dtype="bfloat16"), "measured on cpu in bfloat16, not on cpu in float32"),
        (Profile(fit), "does not say which device and dtype"),
    ]:
        notes = []
        engine = Engine(model, profile=profile, notice=notes.append)
        assert engine.profile is None and engine.controller is None
        assert len(notes) == 1 and "calibration profile ignored" in notes[0] and why in notes[0]
    notes = []
    here = Profile(fit, device="cpu", dtype="float32")
    engine = Engine(model, profile=here, notice=notes.append)
    assert engine.profile is here and engine.controller is not None and notes == []
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert Engine(bf16, profile=here, notice=notes.append).profile is None
    assert "not on cpu in bfloat16" in notes[0]
    fresh = calibrate(model, loops=[1, 2], tokens=2, repeats=1)
    assert (fresh.device, fresh.dtype) == ("cpu", "float32")
    assert Profile.from_dict(fresh.to_dict()) == fresh
    fresh = calibrate(bf16, loops=[1, 2], tokens=2, repeats=1)  # its cache in the model's dtype
    assert (fresh.device, fresh.dtype) == ("cpu", "bfloat16")
    assert Engine(bf16, profile=fresh).profile is fresh


def test_max_ms_without_a_profile_calibrates_once(model, capsys):
    engine = Engine(model)
    out = engine.generate(PROMPTS[0], max_ms_per_token=1e6, max_new_tokens=2)
    assert engine.profile is not None and "calibration" in capsys.readouterr().err
    assert out.loops[-1] == engine.infer.max_request_loops  # a generous target allows the cap


def test_stop_strings_end_of_text_and_streaming(text_engine):
    streamed: list[str] = []
    out = text_engine.generate(
        "ab", max_new_tokens=30, temperature=0, on_token=lambda r, d: streamed.append(d)
    )
    assert "".join(streamed) == out.text and len(out.token_ids) == 30 and out.finish_reason == "length"
    stop = out.text[5:7]
    cut = text_engine.generate("ab", max_new_tokens=30, temperature=0, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == out.text[: out.text.find(stop)]
    # a model that always says end-of-text stops at once
    eot = text_engine.tokenizer.eot_id

    def always_eot(module, args, out):
        out[..., eot] += 1000
        return out

    hook = text_engine.model.head.register_forward_hook(always_eot)
    try:
        out = text_engine.generate("ab", max_new_tokens=30, temperature=0)
        assert out.token_ids == [] and out.finish_reason == "stop" and len(out.loops) == 1
    finally:
        hook.remove()


def test_generation_stops_at_the_context(model):
    out = Engine(model).generate(list(range(1, 60)), max_new_tokens=50, temperature=0, loops=1)
    assert out.finish_reason == "length" and len(out.token_ids) == 64 - 59 + 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=""), "the prompt is empty"),
        (dict(prompts=[[]]), "the prompt is empty"),
        (dict(prompts="x" * 64), "context is 64 tokens"),
        (dict(prompts="hi", loops=0), r"loops must lie in \[1, 64\]"),
        (dict(prompts="hi", loops=65), r"loops must lie in \[1, 64\]"),
        (dict(prompts="hi", exit="patience:3"), "unknown exit criterion 'patience'"),
        (dict(prompts="hi", exit="kl:abc"), "must be a number"),
        (dict(prompts="hi", exit="argmax:1.5"), "whole number"),
        (dict(prompts="hi", loops=2, max_ms_per_token=5), "give one of"),
        (dict(prompts="hi", temperature=-1), "temperature"),
        (dict(prompts="hi", top_p=0), "top_p"),
        (dict(prompts=[[5, 999]]), "vocabulary"),
    ],
)
def test_bad_input_is_one_clear_error(text_engine, kwargs, message):
    prompts = kwargs.pop("prompts")
    with pytest.raises(ValueError, match=message):
        text_engine.generate(prompts, max_new_tokens=2, **kwargs)


def test_a_checkpoint_with_another_tokenizer_is_refused(trained, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    assert json.loads((ckpt / "run.json").read_text())["tokenizer_sha256"]
    Engine.from_checkpoint(ckpt)
    # same size, other ids: caught by the hash recorded at training time
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="not the tokenizer this model was trained with"):
        Engine.from_checkpoint(ckpt)
    # another size
    Tokenizer.train_bpe(["the cat sees the moon"] * 50, vocab_size=300).save(ckpt / "tokenizer.json")
    with pytest.raises(CheckpointError, match="belongs to another model"):
        Engine.from_checkpoint(ckpt)


def test_engine_on_token_ids_matches_uncached_greedy(model):
    out = Engine(model, kv_cache="per-loop").generate(PROMPTS[0], loops=3, max_new_tokens=5, temperature=0)
    assert out.token_ids == uncached_greedy(model, PROMPTS[0], 3, 5)


def test_a_deep_request_does_not_leave_its_loops_behind(model):
    engine = Engine(model, kv_cache="per-loop")
    engine.generate(PROMPTS[0], loops=1, max_new_tokens=3, temperature=0)
    shallow = engine.cache.nbytes()
    deep = engine.generate(PROMPTS[0], loops=16, max_new_tokens=3, temperature=0)
    assert engine.cache.nbytes() == shallow  # the idle engine gave the 16 loop groups back
    again = engine.generate(PROMPTS[0], loops=16, max_new_tokens=3, temperature=0)
    assert again.token_ids == deep.token_ids


def test_min_loops_over_the_loops_asked_is_refused(model):
    engine = Engine(model)
    with pytest.raises(ValueError, match="min_loops = 5 is more than loops = 3"):
        engine.generate(PROMPTS[0], loops=3, min_loops=5, max_new_tokens=2)
    with pytest.raises(ValueError, match="min_loops = 5 is more than loops = 2"):
        engine.generate([PROMPTS[0], PROMPTS[1]], loops=[8, 2], min_loops=5, max_new_tokens=2)
    assert not engine.busy  # the first prompt, which was fine, was not left queued
    out = engine.generate(PROMPTS[0], loops=5, min_loops=5, exit="kl:1e9", max_new_tokens=3, temperature=0)
    assert out.loops == [5, 5, 5]  # no token exits before min_loops, however loose the criterion
    # loops that come from elsewhere than the call are not a licence to lower the caller's min_loops either
    assert model.cfg.loops == 3
    with pytest.raises(
        ValueError, match=r"min_loops = 4 is more than loops = 3 \(the model's default loops\)"
    ):
        engine.generate(PROMPTS[0], min_loops=4, max_new_tokens=2)
    budget = model.flops_per_token(2, 5) + 1  # 2 loops fit a 3-token prompt + 2 new tokens
    with pytest.raises(
        ValueError, match=r"more than loops = 2 \(the most loops that fit max_flops_per_token\)"
    ):
        engine.generate(PROMPTS[0], min_loops=3, max_flops_per_token=budget, max_new_tokens=2)
    capped = Engine(model, infer=InferConfig(max_request_loops=2))
    with pytest.raises(
        ValueError, match=r"more than loops = 2 \(the model's default, capped by infer.max_request_loops\)"
    ):
        capped.generate(PROMPTS[0], min_loops=3, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"more than loops = 2 \(the most for max_ms_per_token, capped by"):
        capped.generate(PROMPTS[0], min_loops=3, max_ms_per_token=1e6, max_new_tokens=2)
    strict = Compute(min_loops=3, loop_cap=2, strict_min_loops=True)
    with pytest.raises(ValueError, match=r"more than loops = 2 \(.*capped by the cap for this caller\)"):
        engine.submit(PROMPTS[0], engine.sampling(max_new_tokens=2), strict)
    assert not engine.busy  # a refused request leaves nothing queued, even the prompts before it in a batch
    assert engine.generate(PROMPTS[0], max_flops_per_token=budget, min_loops=2, max_new_tokens=2).loops == [
        2,
        2,
    ]
    # the [infer] default min_loops is a default: lowered to the loops a request runs, as before
    lenient = Engine(model, infer=InferConfig(min_loops=6))
    assert lenient.generate(PROMPTS[0], exit="kl:1e9", max_new_tokens=2).loops == [3, 3]
    assert lenient.generate(PROMPTS[0], loops=2, exit="kl:1e9", max_new_tokens=2).loops == [2, 2]
    assert lenient.submit(PROMPTS[0], compute=Compute(min_loops=6, loop_cap=2)).min_loops == 2
