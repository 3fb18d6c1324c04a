"""`vitpipe study`: the seed's claims measured over several seeds, each printed as a table.

resolution  per seed: pre-train, fine-tune at finetune.image_size; the pre-trained model at its own
            resolution, the same model at the fine-tune resolution before fine-tuning, and the
            fine-tuned one, all on the same held-out images; mean and seed-to-seed spread.
posembed    per seed and position-embedding start (finetune.pos_embed_init): the same fine-tune
            from the same pre-trained weights, same budget (the paper's resample-vs-reinit ablation).

Layout of the study folder (default runs/<recipe>-study): prepare/ (one dataset for every seed; the
split depends on data.seed, not on the training seed), seed<N>/pretrain/ and
seed<N>/finetune-<pos_embed_init>/. Every stage keeps its stage.json, so a study run again, or
the other study in the same folder, reuses each stage that is already done: the posembed study's
"resample" fine-tunes are the resolution study's. The table is written as study-<kind>.json/.txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.config import ConfigError, PipelineConfig
from pipeline.model.pos_embed import INITS
from pipeline.track import NullTracker, Tracker, start_tracker
from stages import finetune, prepare, pretrain

KINDS = ("resolution", "posembed")


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: distinct non-negative integers."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: {text!r} is not a comma-separated list of integers, e.g. --seeds 0,1,2") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: need distinct non-negative integers, e.g. --seeds 0,1,2; got {text!r}")
    return seeds


def parse_modes(text: str) -> list[str]:
    """'resample,reinit' -> ['resample', 'reinit'], each one of pos_embed.INITS."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in INITS]
    if not modes or bad or len(set(modes)) != len(modes):
        raise ConfigError(f"--modes: need distinct values among {', '.join(INITS)}; got {text!r}")
    return modes


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _pm(values: list[float]) -> str:
    m, sd = mean_sd(values)
    return f"{m:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")


class Study:
    """The stages of one study folder, each run (or reused) through the stage modules."""

    def __init__(self, cfg: PipelineConfig, root: Path, tracker: Tracker, force: bool):
        self.cfg, self.root, self.tracker, self.force = cfg, root, tracker, force
        self.manifest: Path | None = None
        self.walls: dict[str, float] = {}
        self.results: dict[str, dict] = {}  # stage name -> its result, so each stage runs once per study

    def _stage(self, name: str, fn, *args):
        if name in self.results:
            return self.results[name]
        child = self.tracker.child(name) if not isinstance(self.tracker, NullTracker) else self.tracker
        start = time.perf_counter()
        try:
            result = fn(*args, child, self.force)
        except BaseException:
            child.finish("FAILED")
            raise
        child.finish()
        self.walls[name] = round(time.perf_counter() - start, 1)
        self.results[name] = result
        return result

    def dataset(self) -> Path:
        if self.manifest is None:
            r = self._stage("prepare", prepare.run, self.cfg.data, self.root / "prepare")
            self.manifest = Path(r["manifest"])
        return self.manifest

    def pretrained(self, seed: int) -> dict:
        train = dataclasses.replace(self.cfg.pretrain, seed=seed)
        return self._stage(f"seed{seed}/pretrain", pretrain.run, self.cfg.model, train, self.dataset(),
                           self.root / f"seed{seed}" / "pretrain")

    def finetuned(self, seed: int, mode: str) -> dict:
        pre = self.pretrained(seed)
        train = dataclasses.replace(self.cfg.finetune, seed=seed, pos_embed_init=mode)
        return self._stage(f"seed{seed}/finetune-{mode}", finetune.run, train, self.dataset(), pre["weights"],
                           self.root / f"seed{seed}" / f"finetune-{mode}")


def _val_images(study: Study) -> int:
    from pipeline.data.manifest import load_manifest

    return load_manifest(study.dataset()).num_samples("val")


def resolution(study: Study, seeds: list[int]) -> dict:
    """Claim 1 per seed: pre-trained @ own res, @ fine-tune res before fine-tuning, fine-tuned."""
    rows = []
    for seed in seeds:
        pre, ft = study.pretrained(seed), study.finetuned(seed, "resample")
        rows.append({"seed": seed, "pretrained": pre["val_accuracy"], "before": ft.get("val_accuracy_before"),
                     "finetuned": ft["val_accuracy"]})
    return {"kind": "resolution", "rows": rows, "val_images": _val_images(study),
            "pretrain_size": study.cfg.pretrain.image_size, "finetune_size": study.cfg.finetune.image_size}


def posembed(study: Study, seeds: list[int], modes: list[str]) -> dict:
    """Claim 2: the same fine-tune from the same pre-trained weights per position-embedding start."""
    rows = []
    for seed in seeds:
        for mode in modes:
            ft = study.finetuned(seed, mode)
            rows.append({"seed": seed, "mode": mode, "before": ft.get("val_accuracy_before"),
                         "finetuned": ft["val_accuracy"]})
    return {"kind": "posembed", "rows": rows, "modes": modes, "val_images": _val_images(study),
            "pretrain_size": study.cfg.pretrain.image_size, "finetune_size": study.cfg.finetune.image_size}


def resolution_verdict(rows: list[dict]) -> tuple[bool | None, str]:
    """Does fine-tuning beat the pre-trained model at its own resolution by more than the spread?

    Holds when the mean gain exceeds the larger seed-to-seed standard deviation of the two figures
    and every seed gains; undecided (None) with fewer than two seeds.
    """
    gains = [r["finetuned"] - r["pretrained"] for r in rows]
    gain = sum(gains) / len(gains)
    _, sd_pre = mean_sd([r["pretrained"] for r in rows])
    _, sd_ft = mean_sd([r["finetuned"] for r in rows])
    if sd_pre is None or sd_ft is None:
        return None, f"mean gain {gain:+.4f}; one seed has no spread: run --seeds 0,1,2 to judge the claim"
    spread = max(sd_pre, sd_ft)
    holds = gain > spread and min(gains) > 0
    return holds, (f"mean gain {gain:+.4f} (per seed {', '.join(f'{g:+.4f}' for g in gains)}) vs seed-to-seed "
                   f"spread (sd) {spread:.4f}: the claim {'holds' if holds else 'does NOT hold'}")


def resolution_table(res: dict) -> str:
    """Claim 1 as plain text: one row per seed, then mean ± sd."""
    p, f = res["pretrain_size"], res["finetune_size"]
    cols = (f"pre-trained @{p}px", f"pre-trained @{f}px (no ft)", f"fine-tuned @{f}px", "gain")
    lines = [f"claim 1: fine-tuning at {f}px vs the pre-trained model at {p}px, val accuracy on the same "
             f"{res['val_images']} held-out images", "",
             f"{'seed':<8}" + "".join(f"{c:>28}" for c in cols)]
    for r in res["rows"]:
        before = "n/a (new head)" if r["before"] is None else f"{r['before']:.4f}"
        lines.append(f"{r['seed']:<8}{r['pretrained']:>28.4f}{before:>28}{r['finetuned']:>28.4f}"
                     f"{r['finetuned'] - r['pretrained']:>+28.4f}")
    rows = res["rows"]
    befores = [r["before"] for r in rows if r["before"] is not None]
    lines.append(f"{'mean±sd':<8}{_pm([r['pretrained'] for r in rows]):>28}"
                 f"{(_pm(befores) if befores else 'n/a'):>28}{_pm([r['finetuned'] for r in rows]):>28}"
                 f"{_pm([r['finetuned'] - r['pretrained'] for r in rows]):>28}")
    lines += ["", resolution_verdict(rows)[1]]
    return "\n".join(lines)


def posembed_table(res: dict) -> str:
    """Claim 2 as plain text: one row per position-embedding start, mean ± sd over seeds."""
    seeds = sorted({r["seed"] for r in res["rows"]})
    lines = [f"claim 2: fine-tuning {res['pretrain_size']}px -> {res['finetune_size']}px with each start of the "
             f"position embeddings, same budget; val accuracy on {res['val_images']} held-out images, "
             f"seeds {','.join(map(str, seeds))}", "",
             f"{'pos_embed_init':<16}{'before fine-tuning':>24}{'after fine-tuning':>24}{'vs resample':>14}"]
    after = {m: [r["finetuned"] for r in res["rows"] if r["mode"] == m] for m in res["modes"]}
    base = mean_sd(after["resample"])[0] if "resample" in after else None
    for m in res["modes"]:
        before = [r["before"] for r in res["rows"] if r["mode"] == m and r["before"] is not None]
        delta = "" if base is None or m == "resample" else f"{mean_sd(after[m])[0] - base:+.4f}"
        lines.append(f"{m:<16}{(_pm(before) if before else 'n/a (new head)'):>24}{_pm(after[m]):>24}{delta:>14}")
    return "\n".join(lines)


def run(kind: str, cfg: PipelineConfig, root: str | Path, seeds: list[int], modes: list[str] | None = None,
        force: bool = False) -> dict:
    """Run (or reuse) every stage the study needs; write and print its table; return its figures."""
    if kind not in KINDS:
        raise ConfigError(f"study: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tracker = start_tracker(cfg.tracking, run_name=f"{cfg.name}/study-{kind}",
                            tags={"vitpipe.recipe": cfg.name, "vitpipe.study": kind})
    study = Study(cfg, root, tracker, force)
    start = time.perf_counter()
    try:
        res = resolution(study, seeds) if kind == "resolution" else posembed(study, seeds, modes or list(INITS))
    except BaseException:
        tracker.finish("FAILED")
        raise
    res.update(recipe=cfg.name, seeds=seeds, stage_wall_s=study.walls,
               wall_s=round(time.perf_counter() - start, 1))
    text = resolution_table(res) if kind == "resolution" else posembed_table(res)
    if kind == "resolution":
        res["claim_holds"] = resolution_verdict(res["rows"])[0]
    write_json(root / f"study-{kind}.json", res)
    (root / f"study-{kind}.txt").write_text(text + "\n")
    tracker.log_artifact(root / f"study-{kind}.txt")
    tracker.finish()
    print("\n" + text)
    return res


def add_study_parser(sub) -> None:
    """`vitpipe study resolution|posembed RECIPE [overrides] --seeds 0,1,2 [--modes ...]`."""
    p = sub.add_parser("study", help="the seed's claims over several seeds: resolution gain, pos-embed ablation",
                       description="resolution: per seed, pre-train and fine-tune the recipe and compare the "
                       "pre-trained model at its own resolution with the fine-tuned one on the same held-out "
                       "images. posembed: per seed, the same fine-tune with each finetune.pos_embed_init. "
                       "Stages already done in the study folder are reused; prints and writes "
                       "<workdir>/study-<kind>.txt/.json.")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("recipe", help="recipe YAML, e.g. configs/pipeline/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. finetune.steps=200")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (default 0,1,2)")
    p.add_argument("--modes", default=",".join(INITS),
                   help=f"posembed: position-embedding starts to compare (default {','.join(INITS)})")
    p.add_argument("--workdir", type=Path, help="study folder (default runs/<recipe name>-study)")
    p.add_argument("--force", action="store_true", help="rerun every stage even if it is up to date")


def dispatch_study(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    """Run the parsed `vitpipe study` command."""
    seeds, modes = parse_seeds(args.seeds), parse_modes(args.modes)
    run(args.kind, cfg, args.workdir or Path("runs") / f"{cfg.name}-study", seeds, modes, args.force)
    return 0
