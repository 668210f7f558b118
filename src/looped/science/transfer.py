"""Training from a checkpoint at another depth: `looped finetune` (continue a looped model at another mean
loop count) and `looped retrofit` (turn a trained standard model into a looped one, then train it).

Retrofitting follows McLeish et al. 2025 ("Teaching Pretrained Language Models to Think Deeper with
Retrofitted Recurrence", arXiv 2511.07384): the prelude takes the first layers of the standard model, the
coda its last layers, and the core starts from layers in the middle; embeddings, value embeddings where the
layer keeps one, the final norm and the head carry over. The injection starts as in a fresh model
(B = I, decay ≈ 0.447) and the readout as the identity, so that the state reaches the coda unscaled.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from looped.checkpoint import WEIGHTS, CheckpointError, load, load_config_dir, save
from looped.config import Config, ConfigError, ModelConfig, from_dict, load_config
from looped.model import accounting
from looped.model.lm import LoopedLM
from looped.science.compare import steps_for
from looped.science.sweep import RESULTS, execute, finished_runs, read_results, set_lr
from looped.train.trainer import TrainResult, train


def _with(checkpoint: Path, files: list[str], overrides: list[str]) -> Config:
    """The checkpoint's config, then more files and `--set` overrides on top (the usual precedence)."""
    load_config_dir(checkpoint)  # a clear error when it is not a checkpoint directory
    return load_config([checkpoint / "config.toml", *files], overrides)


def finetune(
    checkpoint: str | Path, files: list[str], overrides: list[str], resume: bool = False
) -> TrainResult:
    """Continue training `checkpoint` with its own config changed by `files` and `overrides` (e.g.
    loops.mean_loops=8): fresh optimizer and schedule, weights from the checkpoint. The run goes to
    train.out if set, otherwise beside the checkpoint as NAME-finetune."""
    checkpoint = Path(checkpoint)
    cfg = _with(checkpoint, files, overrides)
    tree = cfg.to_dict()
    if not any(o.startswith("train.out=") for o in overrides):
        tree["train"]["out"] = str(checkpoint.parent / f"{checkpoint.name}-finetune")
    tree["train"]["init_from"] = str(checkpoint)
    return train(from_dict(tree), resume=resume)


def retrofit_model(standard: LoopedLM, prelude: int, core: int, coda: int, loops: int) -> LoopedLM:
    """A looped model whose prelude, core and coda blocks are copies of `standard`'s first, middle and last
    layers; see the module docstring."""
    src = standard.cfg
    if src.looped:
        raise CheckpointError("looped retrofit needs a standard model (model.core_layers = 0)")
    n = src.n_layers
    if min(prelude, core, coda) < 0 or core < 1 or prelude + core + coda > n:
        raise CheckpointError(
            f"retrofit layers {prelude}/{core}/{coda} need 0 ≤ prelude, coda, 1 ≤ core and at most the "
            f"standard model's {n} layers in all"
        )
    cfg = dataclasses.replace(
        src, prelude_layers=prelude, core_layers=core, coda_layers=coda, loops=loops, value_embed_layers=None
    )
    model = LoopedLM(cfg)
    start = prelude + (n - prelude - core - coda) // 2  # the core comes from the middle of what is left
    sources = list(range(prelude)) + list(range(start, start + core)) + list(range(n - coda, n))
    blocks = [*model.prelude, *model.core, *model.coda]
    theirs_all = [*standard.prelude, *standard.coda]  # a standard model's layers, in order
    with torch.no_grad():
        model.embed.weight.copy_(standard.embed.weight)
        model.final_norm.weight.copy_(standard.final_norm.weight)
        if not cfg.tie_embeddings:
            model.head.weight.copy_(standard.head.weight)
        for j, (block, i) in enumerate(zip(blocks, sources, strict=True)):
            theirs = theirs_all[i]
            mine = block.state_dict()
            for key, value in theirs.state_dict().items():
                if key in mine and mine[key].shape == value.shape:
                    mine[key] = value
            block.load_state_dict(mine)
            if str(j) in model.value_embeds and str(i) in standard.value_embeds:
                model.value_embeds[str(j)].weight.copy_(standard.value_embeds[str(i)].weight)
        if model.readout is not None:  # the identity: a readout that passes the state on unchanged
            eye = torch.eye(cfg.width)
            model.readout.weight.copy_(eye if cfg.readout_init != "residual" else torch.zeros_like(eye))
    return model


def retrofit(
    checkpoint: str | Path,
    layers: tuple[int, int, int],
    files: list[str],
    overrides: list[str],
    resume: bool = False,
) -> TrainResult:
    """Retrofit a standard checkpoint into prelude/core/coda = `layers` and train it with loop sampling
    (the config's [loops], changed by `files` and `overrides`). The converted weights are kept in
    train.out/retrofit-init; the run goes to train.out if set, otherwise beside the checkpoint."""
    checkpoint = Path(checkpoint)
    cfg = _with(checkpoint, files, overrides)
    out = (
        Path(cfg.train.out)
        if any(o.startswith("train.out=") for o in overrides)
        else checkpoint.parent / f"{checkpoint.name}-retrofit"
    )
    init = out / "retrofit-init"
    if not (init / "model.safetensors").is_file():
        model = retrofit_model(load(checkpoint), *layers, loops=max(1, round(cfg.loops.mean_loops)))
        tree = cfg.to_dict()
        tree["model"] = model.cfg.to_dict()
        save(model, init, from_dict(tree), retrofit_of=str(checkpoint))
        if (checkpoint / "tokenizer.json").is_file():
            shutil.copyfile(checkpoint / "tokenizer.json", init / "tokenizer.json")
    tree = cfg.to_dict()
    tree["model"] = load_config_dir(init).model.to_dict()
    tree["train"].update(out=str(out), init_from=str(init))
    return train(from_dict(tree), resume=resume)


# ---- `looped study transfer` -------------------------------------------------------------------------------


@dataclass
class _Study:
    """What every phase of the transfer study shares: the config, μ₀, where runs go, how they are evaluated."""

    cfg: Config
    out: Path
    mus: list[int]
    mu0: int
    eval_loops: list[int]
    eval_windows: int
    parallel: int
    say: Callable[[str], None]

    def job(
        self,
        name: str,
        tokens: float,
        record: dict,
        lr: float,
        mu: int | None = None,
        model: ModelConfig | None = None,
        **train: object,
    ) -> tuple[str, Config, dict]:
        """One run for `execute`: the standard model made of the config's layers when `mu` is None, else the
        looped model (or `model`) at mean loops `mu`; `tokens` at learning rate `lr`, `train` overriding
        [train] keys; its records carry `record` (phase first) and lr."""
        tree = self.cfg.to_dict()
        if mu is None:
            m = self.cfg.model
            tree["model"] = accounting.standard_config(
                m, m.prelude_layers + m.core_layers + m.coda_layers
            ).to_dict()
        else:
            if model is not None:
                tree["model"] = model.to_dict()
            tree["loops"]["mean_loops"] = float(mu)
            tree["model"]["loops"] = mu
        steps = steps_for(from_dict(tree), "tokens", tokens)
        set_lr(tree, lr)
        tree["train"].update(steps=steps, out=str(self.out / name), **train)
        tree["eval"]["every"] = 0
        phase, rest = record["phase"], {k: v for k, v in record.items() if k != "phase"}
        return name, from_dict(tree), {"phase": phase, "lr": lr, **rest}

    def run(self, jobs: list[tuple[str, Config, dict]]) -> list[dict]:
        """Run the jobs that have no records yet; returns every record so far."""
        results = self.out / RESULTS
        done = finished_runs(results)
        todo = [j for j in jobs if j[0] not in done]
        execute(todo, results, self.parallel, self.eval_loops, self.eval_windows, self.say)
        return read_results(results)


def study_transfer(
    config: list[str],
    overrides: list[str],
    budget: float,
    finetune_tokens: float,
    mus: list[int],
    lrs: list[float],
    out: str | Path,
    eval_loops: list[int] | None = None,
    eval_windows: int = 64,
    parallel: int = 1,
    say: Callable[[str], None] = print,
) -> dict:
    """Run (or resume) the transfer study; returns its summary (also OUT/transfer.json and OUT/transfer.png).

    1. From scratch, `budget` tokens: the looped config at every mean loop count μ in `mus`, and the standard
       model made of the same layers, each at every learning rate in `lrs` (does the best rate move with μ?).
    2. Transfer: the model trained at the config's μ₀ (at its best rate) fine-tuned for `finetune_tokens` at
       every μ in `mus` (μ₀ too, the control for the extra tokens), each at that μ's best rate.
    3. Retrofit: the standard model (at its best rate) retrofitted into the config's prelude/core/coda and
       trained for `finetune_tokens` at μ₀, against a looped model from scratch with those same tokens.
    Fine-tunes read the data in another order (train.seed + 1) than the runs they start from."""
    cfg = _transfer_config(config, overrides, budget, finetune_tokens, mus, lrs)
    mu0 = max(1, round(cfg.loops.mean_loops))
    mus = sorted(set(mus) | {mu0})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = _Study(
        cfg=cfg,
        out=out,
        mus=mus,
        mu0=mu0,
        eval_loops=eval_loops or sorted({1, 2, 4, 8, 16, *mus, 2 * max(mus)}),
        eval_windows=eval_windows,
        parallel=parallel,
        say=say,
    )
    say(f"transfer study: μ ∈ {mus} (μ₀ = {mu0}) × {len(lrs)} learning rates, then fine-tunes and a retrofit")
    best = _best_lrs(study.run(_scratch_jobs(study, budget, lrs)), mus)
    missing = [k for k in [*mus, "standard"] if k not in best]
    if missing:
        raise ConfigError(
            f"transfer study: no finished from-scratch run for {missing[0]}; see the messages above"
        )
    jobs = _finetune_jobs(study, best, finetune_tokens) + _retrofit_jobs(study, best, finetune_tokens)
    summary = summarize_transfer(study.run(jobs), mus, mu0, lrs, budget, finetune_tokens)
    (out / "transfer.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["plot"] = str(plot_transfer(summary, out / "transfer.png"))
    return summary


def _transfer_config(
    config: list[str],
    overrides: list[str],
    budget: float,
    finetune_tokens: float,
    mus: list[int],
    lrs: list[float],
) -> Config:
    """The study's config, after checking that its arguments make a study."""
    cfg = load_config(config, overrides)
    if not cfg.model.looped:
        raise ConfigError("looped study transfer needs a looped model (model.core_layers > 0)")
    if not mus or min(mus) < 1:
        raise ConfigError("--mus must be mean loop counts ≥ 1, e.g. 1,2,4,8")
    if not lrs or min(lrs) <= 0:
        raise ConfigError("--lrs must be positive learning rates, e.g. 3e-3,1e-2,3e-2")
    if not budget > 0 or not finetune_tokens > 0:
        raise ConfigError("--budget and --finetune-tokens must be positive token counts")
    return cfg


def _scratch_jobs(study: _Study, budget: float, lrs: list[float]) -> list[tuple[str, Config, dict]]:
    """Phase 1: from scratch at every μ and learning rate, and the standard model at every learning rate."""
    jobs = [
        study.job(f"scratch_mu{mu}_lr{lr:g}", budget, {"phase": "scratch"}, lr, mu)
        for mu in study.mus
        for lr in lrs
    ]
    return jobs + [study.job(f"standard_lr{lr:g}", budget, {"phase": "standard"}, lr) for lr in lrs]


def _finetune_jobs(study: _Study, best: dict, tokens: float) -> list[tuple[str, Config, dict]]:
    """Phase 2: the μ₀ model (at its best rate) fine-tuned at every μ, each at that μ's best rate."""
    base = study.out / f"scratch_mu{study.mu0}_lr{best[study.mu0]:g}" / "final"
    seed = study.cfg.train.seed + 1
    record = {"phase": "finetune", "from_mu": study.mu0}
    return [
        study.job(f"finetune_mu{mu}", tokens, record, best[mu], mu, init_from=str(base), seed=seed)
        for mu in study.mus
    ]


def _retrofit_jobs(study: _Study, best: dict, tokens: float) -> list[tuple[str, Config, dict]]:
    """Phase 3: the best standard model retrofitted into the config's prelude/core/coda (written once to
    OUT/retrofit-init) and trained at μ₀, and a looped model from scratch with the same tokens and data order."""
    m, mu0, seed = study.cfg.model, study.mu0, study.cfg.train.seed + 1
    init = study.out / "retrofit-init"
    if not (init / WEIGHTS).is_file():
        source = study.out / f"standard_lr{best['standard']:g}"
        model = retrofit_model(load(source / "final"), m.prelude_layers, m.core_layers, m.coda_layers, mu0)
        tree = {**study.cfg.to_dict(), "model": model.cfg.to_dict()}
        save(model, init, from_dict(tree), retrofit_of=str(source))
    retrofitted = load_config_dir(init).model
    return [
        study.job(
            f"retrofit_mu{mu0}",
            tokens,
            {"phase": "retrofit"},
            best[mu0],
            mu0,
            model=retrofitted,
            init_from=str(init),
            seed=seed,
        ),
        study.job(f"scratch-short_mu{mu0}", tokens, {"phase": "scratch-short"}, best[mu0], mu0, seed=seed),
    ]


def _judged_at(r: dict) -> int:
    """The loop count a run is judged at: its own mean loops for a looped model, 1 for a standard one."""
    return max(1, round(r["mean_loops"])) if r["looped"] else 1


def _best_lrs(records: list[dict], mus: list[int]) -> dict:
    """μ (or "standard") → the learning rate with the lowest from-scratch loss at the loops it is judged at."""
    grid: dict = {}
    for r in records:
        if r["phase"] in ("scratch", "standard") and r["loops"] == _judged_at(r):
            key = "standard" if r["phase"] == "standard" else max(1, round(r["mean_loops"]))
            grid.setdefault(key, {})[r["lr"]] = r["loss"]
    return {k: min(v, key=v.get) for k, v in grid.items() if k == "standard" or k in mus}


def summarize_transfer(
    records: list[dict], mus: list[int], mu0: int, lrs: list[float], budget: float, finetune_tokens: float
) -> dict:
    best = _best_lrs(records, mus)
    lr_grid: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, float]] = {}
    for r in records:
        mu = max(1, round(r["mean_loops"]))
        if r["phase"] in ("scratch", "standard") and r["loops"] == _judged_at(r):
            key = "standard" if r["phase"] == "standard" else f"μ={mu}"
            lr_grid.setdefault(key, {})[f"{r['lr']:g}"] = r["loss"]
        label = {
            "scratch": f"scratch μ={mu}",
            "standard": "standard",
            "finetune": f"fine-tuned {r.get('from_mu', mu0)}→{mu}",
            "retrofit": f"retrofit μ={mu}",
            "scratch-short": f"scratch μ={mu}, {finetune_tokens:.3g} tokens",
        }[r["phase"]]
        chosen = best.get("standard" if r["phase"] == "standard" else mu)
        if r["phase"] in ("scratch", "standard") and r["lr"] != chosen:
            continue
        curves.setdefault(label, {})[str(r["loops"])] = r["loss"]
    rows = []
    for mu in mus:
        scratch, tuned = curves.get(f"scratch μ={mu}", {}), curves.get(f"fine-tuned {mu0}→{mu}", {})
        rows.append(
            {
                "mu": mu,
                "best_lr": best.get(mu),
                "scratch": scratch.get(str(mu)),
                "finetuned": tuned.get(str(mu)),
                "base_at_mu": curves.get(f"scratch μ={mu0}", {}).get(str(mu)),
            }
        )
    retro = {
        "retrofit": curves.get(f"retrofit μ={mu0}", {}).get(str(mu0)),
        "scratch_same_tokens": curves.get(f"scratch μ={mu0}, {finetune_tokens:.3g} tokens", {}).get(str(mu0)),
        "source_standard": curves.get("standard", {}).get("1"),
        "scratch_full": curves.get(f"scratch μ={mu0}", {}).get(str(mu0)),
    }
    return {
        "budget_tokens": budget,
        "finetune_tokens": finetune_tokens,
        "base_mu": mu0,
        "mus": mus,
        "lrs": lrs,
        "best_lr": {str(k): v for k, v in best.items()},
        "lr_grid": lr_grid,
        "rows": rows,
        "retrofit": retro,
        "curves": curves,
    }


def format_transfer(s: dict) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    mu0 = s["base_mu"]
    lines = [
        f"from scratch: {s['budget_tokens']:.3g} tokens; fine-tunes and retrofit: {s['finetune_tokens']:.3g} "
        f"tokens; base μ₀ = {mu0}; each model judged at T = its μ",
        f"{'μ':>4} {'best lr':>8} {'scratch':>9} {f'μ₀={mu0} at T=μ':>14} {f'tuned {mu0}→μ':>12}",
    ]
    for r in s["rows"]:
        lines.append(
            f"{r['mu']:>4} {r['best_lr'] or 0:>8.2g} {f(r['scratch']):>9} {f(r['base_at_mu']):>14} "
            f"{f(r['finetuned']):>12}"
        )
    lines.append("learning rates (loss at T = μ; standard at T = 1):")
    for key, grid in s["lr_grid"].items():
        lines.append(
            f"  {key:<9} "
            + "  ".join(f"{lr}: {v:.4f}" for lr, v in sorted(grid.items(), key=lambda x: float(x[0])))
        )
    r = s["retrofit"]
    lines.append(
        f"retrofit at μ₀={mu0}: {f(r['retrofit'])}; from scratch with the same tokens {f(r['scratch_same_tokens'])}; "
        f"the standard source {f(r['source_standard'])}; from scratch with the full budget {f(r['scratch_full'])}"
    )
    if "plot" in s:
        lines.append(f"plot: {s['plot']}")
    return "\n".join(lines)


def plot_transfer(s: dict, path: Path) -> Path:
    """Three panels: loss against loops from scratch (solid) and fine-tuned from μ₀ (dashed) per μ; the
    retrofit against its from-scratch control; validation loss against learning rate per μ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    curves, mu0 = s["curves"], s["base_mu"]

    def draw(ax, label: str, **kw) -> None:
        points = curves.get(label)
        if points:
            xs = sorted(int(t) for t in points)
            ax.plot(xs, [points[str(x)] for x in xs], marker="o", markersize=3, label=label, **kw)

    for i, mu in enumerate(s["mus"]):
        color = colors[i % len(colors)]
        draw(a, f"scratch μ={mu}", color=color)
        draw(a, f"fine-tuned {mu0}→{mu}", color=color, linestyle="--")
    draw(b, f"retrofit μ={mu0}", color=colors[0])
    draw(b, f"scratch μ={mu0}, {s['finetune_tokens']:.3g} tokens", color=colors[1])
    draw(b, f"scratch μ={mu0}", color=colors[2], linestyle=":")
    if s["retrofit"]["source_standard"] is not None:
        b.axhline(s["retrofit"]["source_standard"], color="gray", linestyle="--", label="standard source")
    for ax, title in (
        (a, "from scratch (—) and fine-tuned from μ₀ (- -)"),
        (b, "retrofit from the standard model"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("loops T at test time")
        ax.set_ylabel("validation loss")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for i, (key, grid) in enumerate(s["lr_grid"].items()):
        xs = sorted(grid, key=float)
        c.plot(
            [float(x) for x in xs],
            [grid[x] for x in xs],
            marker="o",
            label=key,
            color="black" if key == "standard" else colors[i % len(colors)],
        )
    c.set_xscale("log")
    c.set_xticks([float(lr) for lr in s["lrs"]], [f"{float(lr):g}" for lr in s["lrs"]])
    c.minorticks_off()
    c.set_xlabel("learning rate")
    c.set_ylabel("validation loss at T = μ")
    c.set_title("does the best learning rate move with μ?")
    c.grid(True, alpha=0.3)
    c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
